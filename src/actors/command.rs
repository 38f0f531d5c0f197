//! CommandActor: short-lived child of a SessionActor; owns one running command and answers its `exec.run`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::session::SessionMsg;
use crate::context::Context;
use crate::process::run::{RunError, RunOutcome, RunSpec, run_command};
use crate::process::shell::EnvMap;
use crate::process::table::SessionKey;
use crate::process::terminal::{self, TerminalState};
use crate::protocol::{ExecResult, KilledBy, RequestError};
use crate::stats::Stats;

/// The answer an `exec.run` waits for.
pub type ExecReply = RpcReplyPort<Result<ExecResult, RequestError>>;

/// Runs one command in a task it owns and answers with its result. It has no
/// children; if it panics, its state is dropped, which aborts the task, whose
/// [`crate::process::ChildProcess`] kills the command's process group; the
/// dropped reply port makes the connection answer `INTERNAL`.
pub struct CommandActor;

/// What a CommandActor is started with.
pub struct CommandArgs {
    pub ctx: Arc<Context>,
    pub session: ActorRef<SessionMsg>,
    pub session_key: SessionKey,
    pub spec: RunSpec,
    /// The session's state before this command and the request's own env, to
    /// keep per-command variables from sticking to the session.
    pub session_state: Arc<TerminalState>,
    pub request_env: EnvMap,
    /// This command's share of `max_concurrent`; returned before the answer goes out.
    pub permit: OwnedSemaphorePermit,
    pub reply: ExecReply,
}

/// Messages of a CommandActor.
#[derive(Debug)]
pub enum CommandMsg {
    /// Kill the command's process tree; it answers with `killed_by: reason`.
    Kill(KilledBy),
    /// The run task finished (sent by the task itself).
    Finished(Result<RunOutcome, RunFailure>),
    /// Fault injection: strike this actor's handler.
    #[cfg(feature = "fault-injection")]
    Fault(crate::fault::Fault),
}

/// Why the run task produced no outcome.
#[derive(Debug)]
pub enum RunFailure {
    Run(RunError),
    /// The task panicked; turned into a message so the actor learns of it.
    Panicked(String),
}

/// State of a running command.
pub struct CommandState {
    ctx: Arc<Context>,
    session: ActorRef<SessionMsg>,
    session_state: Arc<TerminalState>,
    request_env: EnvMap,
    kill: watch::Sender<Option<KilledBy>>,
    /// Aborts the run task when the state is dropped (stop, kill or panic).
    _task: AbortOnDrop,
    permit: Option<OwnedSemaphorePermit>,
    reply: Option<ExecReply>,
}

/// Aborts a task when dropped: the task must not outlive its actor.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Actor for CommandActor {
    type Msg = CommandMsg;
    type State = CommandState;
    type Arguments = CommandArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CommandMsg>,
        args: CommandArgs,
    ) -> Result<CommandState, ActorProcessingErr> {
        let (kill_tx, kill_rx) = watch::channel(None);
        let table = args.ctx.processes.clone();
        let key = args.session_key;
        let spec = args.spec;
        let me = myself.clone();
        let task = tokio::spawn(async move {
            // Never await the process inside `handle`: the run lives in this task
            // and comes back as a message, panics included (design-rules).
            let run = AssertUnwindSafe(run_command(&table, key, spec, kill_rx)).catch_unwind();
            let finished = match run.await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(e)) => Err(RunFailure::Run(e)),
                Err(panic) => Err(RunFailure::Panicked(panic_message(&panic))),
            };
            let _ = me.cast(CommandMsg::Finished(finished));
        });
        Stats::bump(&args.ctx.stats.commands_started);
        Ok(CommandState {
            ctx: args.ctx,
            session: args.session,
            session_state: args.session_state,
            request_env: args.request_env,
            kill: kill_tx,
            _task: AbortOnDrop(task),
            permit: Some(args.permit),
            reply: Some(args.reply),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<CommandMsg>,
        msg: CommandMsg,
        state: &mut CommandState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CommandMsg::Kill(reason) => {
                state.kill.send_if_modified(|current| {
                    if current.is_none() {
                        *current = Some(reason);
                        true
                    } else if matches!(reason, KilledBy::SessionDestroyed | KilledBy::Shutdown) {
                        // Escalation during a grace period: the first reason stays, the kill is now.
                        true
                    } else {
                        false
                    }
                });
            }
            #[cfg(feature = "fault-injection")]
            CommandMsg::Fault(fault) => return fault.strike("CommandActor").await,
            CommandMsg::Finished(finished) => {
                state.finish(myself.get_id(), finished);
                myself.stop(None);
            }
        }
        Ok(())
    }
}

impl CommandState {
    /// Counts the outcome, hands the shell state to the session, returns the
    /// slot, then answers — in that order, so a client that sends its next
    /// command on receipt finds the session idle, the slot free and the new cwd.
    fn finish(&mut self, me: ActorId, finished: Result<RunOutcome, RunFailure>) {
        let stats = &self.ctx.stats;
        let (answer, new_state) = match finished {
            Ok(outcome) => {
                Stats::bump(&stats.commands_completed);
                let r = &outcome.result;
                if r.timed_out {
                    Stats::bump(&stats.commands_timed_out);
                }
                if r.killed_by.is_some() {
                    Stats::bump(&stats.commands_killed);
                }
                if r.killed_by == Some(KilledBy::MemoryLimit) {
                    Stats::bump(&stats.oom_killed);
                }
                if r.stdout_truncated || r.stderr_truncated {
                    Stats::bump(&stats.output_truncated);
                }
                let new_state = outcome.state.map(|s| {
                    Box::new(terminal::carry_over(
                        &self.session_state,
                        &self.request_env,
                        *s,
                    ))
                });
                (Ok(outcome.result), new_state)
            }
            Err(RunFailure::Run(
                e @ (RunError::Spawn(_) | RunError::CwdGone(_) | RunError::Cgroup(_)),
            )) => {
                Stats::bump(&stats.spawn_failed);
                (Err(RequestError::SpawnFailed(e.to_string())), None)
            }
            Err(RunFailure::Run(e @ RunError::BadCommand(_))) => {
                (Err(RequestError::InvalidRequest(e.to_string())), None)
            }
            Err(RunFailure::Run(e)) => (Err(RequestError::Internal(e.to_string())), None),
            Err(RunFailure::Panicked(msg)) => {
                Stats::bump(&stats.actor_failures);
                tracing::error!(panic = %msg, "command run task panicked");
                (
                    Err(RequestError::Internal(format!(
                        "the command's task failed: {msg}"
                    ))),
                    None,
                )
            }
        };
        let _ = self.session.cast(SessionMsg::CommandDone {
            command: me,
            state: new_state,
        });
        drop(self.permit.take());
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(answer);
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}
