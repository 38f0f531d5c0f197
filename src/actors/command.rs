//! CommandActor: short-lived child of a SessionActor; owns one running command from spawn to end, and records how it ended in the command's [`CommandRecord`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::command_record::{CommandRecord, FinishOnDrop};
use super::session::SessionMsg;
use crate::context::Context;
use crate::process::kill::KillReason;
use crate::process::run::{RunError, RunReport, RunSpec, run_command};
use crate::process::shell::EnvMap;
use crate::process::stream_buffer;
use crate::process::table::SessionKey;
use crate::process::terminal::{self, TerminalState};
use crate::protocol::{CommandResult, KeepOutput, KilledBy, RequestError};
use crate::stats::Stats;

/// The answer `exec.start` (and `exec.run`, which starts then waits) gets
/// once the command runs: its record, to read, write and wait on.
pub type StartReply = RpcReplyPort<Result<Arc<CommandRecord>, RequestError>>;

/// Runs one command in a task it owns. Nobody waits on the actor: readers
/// wait on the command's [`CommandRecord`], which this actor finishes. It has
/// no children; if it panics, its state is dropped, which aborts the task,
/// whose [`crate::process::ChildProcess`] kills the command's process group
/// and whose [`crate::cgroup::CgroupNode`] kills and removes the command's
/// cgroup leaf (setsid'd descendants included), and whose [`FinishOnDrop`]
/// answers every reader (and the waiting `exec.run`) with `INTERNAL`.
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
    /// This command's share of `max_concurrent`; returned before its end is recorded.
    pub permit: OwnedSemaphorePermit,
    pub record: Arc<CommandRecord>,
    /// Answered once the command runs (or could not be started).
    pub started: StartReply,
}

/// Messages of a CommandActor.
#[derive(Debug)]
pub enum CommandMsg {
    /// Kill the command's process tree; it ends with `killed_by: reason`.
    Kill(KilledBy),
    /// The command runs (sent by the run task).
    Spawned,
    /// The run task finished (sent by the task itself).
    Finished(Result<RunReport, RunFailure>),
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
    kill: watch::Sender<Option<KillReason>>,
    /// Aborts the run task when the state is dropped (stop, kill or panic).
    _task: AbortOnDrop,
    permit: Option<OwnedSemaphorePermit>,
    /// Finishes the record with `INTERNAL` if the actor dies first.
    record: FinishOnDrop,
    started: Option<StartReply>,
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
            // and comes back as a message, panics included (docs/design-notes.md, "Actors").
            let spawned = {
                let me = me.clone();
                move || {
                    let _ = me.cast(CommandMsg::Spawned);
                }
            };
            let run =
                AssertUnwindSafe(run_command(&table, key, spec, kill_rx, spawned)).catch_unwind();
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
            record: FinishOnDrop(args.record),
            started: Some(args.started),
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
                let reason = kill_reason(reason);
                state.kill.send_if_modified(|current| {
                    if current.is_none() {
                        *current = Some(reason);
                        true
                    } else if matches!(reason, KillReason::SessionDestroyed | KillReason::Shutdown)
                    {
                        // Escalation during a grace period: the first reason stays, the kill is now.
                        true
                    } else {
                        false
                    }
                });
            }
            CommandMsg::Spawned => {
                if let Some(started) = state.started.take() {
                    let _ = started.send(Ok(state.record.0.clone()));
                }
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
    /// slot, then records the end (which wakes every reader) — in that order,
    /// so a client that sends its next command on seeing the end finds the
    /// session idle, the slot free and the new cwd. A command that never ran
    /// answers its `exec.start` with the error instead.
    fn finish(&mut self, me: ActorId, finished: Result<RunReport, RunFailure>) {
        let stats = &self.ctx.stats;
        let record = self.record.0.clone();
        let (outcome, new_state) = match finished {
            Ok(mut report) => {
                Stats::bump(&stats.commands_completed);
                let state = report.state.take();
                let r = command_result(&record, report);
                if r.timed_out {
                    Stats::bump(&stats.commands_timed_out);
                }
                if r.killed_by == Some(KilledBy::IdleTimeout) {
                    Stats::bump(&stats.commands_idle_timed_out);
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
                let new_state = state.map(|s| {
                    Box::new(terminal::carry_over(
                        &self.session_state,
                        &self.request_env,
                        *s,
                    ))
                });
                (Ok(r), new_state)
            }
            Err(RunFailure::Run(
                e @ (RunError::Spawn(_)
                | RunError::CwdGone(_)
                | RunError::Cgroup(_)
                | RunError::Pty(_)),
            )) => {
                Stats::bump(&stats.spawn_failed);
                (Err(RequestError::SpawnFailed(e.to_string())), None)
            }
            // The method files refuse NUL bytes; one here is a bug of ours.
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
        match (self.started.take(), &outcome) {
            // It never ran: `exec.start` gets the error itself.
            (Some(started), Err(e)) => {
                let _ = started.send(Err(e.clone()));
            }
            (Some(started), Ok(_)) => {
                let _ = started.send(Ok(record.clone()));
            }
            (None, _) => {}
        }
        let elapsed = record.started.elapsed();
        stats.command_seconds.observe(elapsed);
        let session = CommandRecord::session_of(&record.id).unwrap_or("");
        let duration_ms = elapsed.as_millis() as u64;
        match &outcome {
            Ok(r) => {
                tracing::debug!(session, command = %record.id, duration_ms, exit_code = ?r.exit_code, signal = ?r.signal, killed_by = ?r.killed_by.map(|k| k.name()), "command ended")
            }
            Err(e) => {
                tracing::debug!(session, command = %record.id, duration_ms, outcome = e.code(), "command failed")
            }
        }
        record.finish(outcome);
    }
}

/// The wire's result (without output) of a finished command.
fn command_result(record: &CommandRecord, report: RunReport) -> CommandResult {
    let killed_by = report.killed_by.map(killed_by);
    let (stdout_total_bytes, stderr_total_bytes) = record.output.totals();
    let (stdout_truncated, stderr_truncated) = record.output.truncated();
    let (stdout_cut_at, stderr_cut_at) = record.output.cut_at();
    CommandResult {
        command_id: Some(record.id.clone()),
        exit_code: report.exit.code,
        signal: report.exit.signal,
        // An idle timeout is a timeout too (`timed_out: true`), with its own `killed_by`.
        timed_out: matches!(killed_by, Some(KilledBy::Timeout | KilledBy::IdleTimeout)),
        killed_by,
        stdout_truncated,
        stderr_truncated,
        stdout_total_bytes,
        stderr_total_bytes,
        stdout_cut_at,
        stderr_cut_at,
        duration_ms: report.duration.as_millis() as u64,
        cpu_ms: Some(report.exit.cpu.as_millis() as u64),
        max_rss_bytes: Some(report.max_rss_bytes),
        pids_limit_hits: report.pids_limit_hits,
        cwd: report.cwd.to_string_lossy().into_owned(),
        state_error: report.state_error,
    }
}

/// The wire's name of why a command was ended.
fn killed_by(reason: KillReason) -> KilledBy {
    match reason {
        KillReason::Timeout => KilledBy::Timeout,
        KillReason::IdleTimeout => KilledBy::IdleTimeout,
        KillReason::CpuLimit => KilledBy::CpuLimit,
        KillReason::MemoryLimit => KilledBy::MemoryLimit,
        KillReason::Cancelled => KilledBy::Cancelled,
        KillReason::SessionDestroyed => KilledBy::SessionDestroyed,
        KillReason::Shutdown => KilledBy::Shutdown,
    }
}

/// A kill request from the wire's side, for the run task.
fn kill_reason(reason: KilledBy) -> KillReason {
    match reason {
        KilledBy::Timeout => KillReason::Timeout,
        KilledBy::IdleTimeout => KillReason::IdleTimeout,
        KilledBy::CpuLimit => KillReason::CpuLimit,
        KilledBy::MemoryLimit => KillReason::MemoryLimit,
        KilledBy::Cancelled => KillReason::Cancelled,
        KilledBy::SessionDestroyed => KillReason::SessionDestroyed,
        KilledBy::Shutdown => KillReason::Shutdown,
        // Only a client decodes `Other`; a kill request never carries it.
        KilledBy::Other => KillReason::Cancelled,
    }
}

/// The request's `keep_output`, for the process layer's capture.
pub fn keep_output(keep: KeepOutput) -> stream_buffer::KeepOutput {
    match keep {
        KeepOutput::Head => stream_buffer::KeepOutput::Head,
        KeepOutput::Tail => stream_buffer::KeepOutput::Tail,
        KeepOutput::Both => stream_buffer::KeepOutput::Both,
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
