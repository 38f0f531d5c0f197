//! SessionActor: child of the root supervisor, one per session; terminal state, idle timer, busy check, parent of its CommandActors.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::command::{CommandActor, CommandArgs, CommandMsg, ExecReply};
use super::registry::RegistryMsg;
use crate::cgroup::{CgroupLimits, Cgroups};
use crate::context::Context;
use crate::limits::Rlimit;
use crate::process::ProcessTable;
use crate::process::run::{CgroupPlace, RunSpec};
use crate::process::shell::EnvMap;
use crate::process::table::SessionKey;
use crate::process::terminal::TerminalState;
use crate::protocol::{KeepOutput, KilledBy, RequestError, SessionInfo};
use crate::stats::Stats;

/// A validated `exec.run` on its way to a session.
#[derive(Debug)]
pub struct ExecRequest {
    pub command: String,
    /// As asked; the session resolves default and maximum.
    pub timeout: Option<Duration>,
    pub stdin: Option<Vec<u8>>,
    pub env: EnvMap,
    pub keep_output: KeepOutput,
}

/// One session. Supervision policy (`handle_supervisor_evt`): a CommandActor
/// that ends — normally, killed or panicking — frees its slot and nothing
/// else; a panic is counted and logged, its request answered `INTERNAL` by
/// the dropped reply port, and the session stays usable. The session never
/// restarts a command.
pub struct SessionActor;

/// What a SessionActor is started with.
pub struct SessionArgs {
    pub ctx: Arc<Context>,
    pub key: SessionKey,
    pub id: String,
    pub owner: u32,
    pub cwd: PathBuf,
    pub env: EnvMap,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub rlimits: [Rlimit; 5],
    /// Limits of the session's cgroup (used when cgroups are on).
    pub cgroup_limits: CgroupLimits,
}

/// Messages of a SessionActor. Run, Cancel and Destroy come only through the
/// registry, so a Destroy is always the last of them a session sees.
pub enum SessionMsg {
    /// Start a command (if this session is not busy and a global slot is free); answer on `reply`.
    Run {
        request: ExecRequest,
        reply: ExecReply,
    },
    /// A CommandActor finished; `state` is the terminal state it left, if it ended by itself.
    CommandDone {
        command: ActorId,
        state: Option<Box<TerminalState>>,
    },
    /// Kill every running command (`killed_by: "cancelled"`); answers whether any ran.
    Cancel {
        reply: RpcReplyPort<Result<bool, RequestError>>,
    },
    /// For `session.list` and for a restarted registry.
    Describe {
        reply: RpcReplyPort<SessionDescription>,
    },
    /// Kill everything, then stop. `reason` goes to running commands; `reply` when all is dead.
    Destroy {
        reason: KilledBy,
        reply: Option<RpcReplyPort<Result<(), RequestError>>>,
    },
    /// The idle timer fired.
    IdleCheck,
    /// Destroy took too long: stop anyway (the Drop guard still kills).
    ForceEnd,
    /// Fault injection: strike this session, or its running commands.
    #[cfg(feature = "fault-injection")]
    Fault {
        target: crate::fault::FaultTarget,
        fault: crate::fault::Fault,
        reply: RpcReplyPort<Result<u64, RequestError>>,
    },
}

/// What a session says of itself.
#[derive(Debug, Clone)]
pub struct SessionDescription {
    pub key: SessionKey,
    pub owner: u32,
    pub phase: SessionPhase,
    pub info: SessionInfo,
}

/// Where a session is in its life, for a registry rebuilding its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    /// Serving commands.
    Live,
    /// Idle past its timeout, waiting for the registry's Destroy.
    Expiring,
    /// Destroy received: killing its commands, then stopping.
    Ending,
}

/// While expiring, how often the session repeats `SessionExpired` until the
/// registry (perhaps a restarted one) answers with Destroy.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// The session's cgroup node.
struct SessionCgroup {
    cgroups: Arc<Cgroups>,
    rel: String,
}

impl SessionCgroup {
    fn destroy(self) {
        if let Err(e) = self.cgroups.destroy_session(&self.rel) {
            tracing::error!(cgroup = %self.rel, error = %e, "cannot remove the session's cgroup");
        }
    }
}

/// Kills and removes the session's cgroup when dropped without `end` (a
/// panic, a kill): ractor skips `post_stop` then, `Drop` always runs.
struct SessionCgroupGuard(Option<SessionCgroup>);

impl Drop for SessionCgroupGuard {
    fn drop(&mut self) {
        if let Some(cgroup) = self.0.take() {
            // Blocking file I/O: off the async workers when a runtime is there.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || cgroup.destroy());
                }
                Err(_) => cgroup.destroy(),
            }
        }
    }
}

/// Kills every process group of the session when dropped — on stop, kill or
/// panic alike (ractor skips `post_stop` on a panic; `Drop` always runs).
struct SessionProcesses {
    table: Arc<ProcessTable>,
    key: SessionKey,
}

impl Drop for SessionProcesses {
    fn drop(&mut self) {
        self.table.signal_session(self.key, Signal::SIGKILL);
        self.table.forget_session(self.key);
    }
}

/// State of one session.
pub struct SessionState {
    ctx: Arc<Context>,
    key: SessionKey,
    id: String,
    owner: u32,
    created: Instant,
    last_active: Instant,
    /// The terminal state the next command starts from (cwd, variables, functions…).
    terminal: Arc<TerminalState>,
    default_timeout: Duration,
    max_timeout: Duration,
    /// setrlimit values of every command of this session.
    rlimits: [Rlimit; 5],
    /// The session's cgroup, when cgroups are on; removed when the session ends.
    cgroup: SessionCgroupGuard,
    /// Commands running now; at most `max_per_session`.
    running: HashMap<ActorId, ActorRef<CommandMsg>>,
    /// Set once the session decided to expire: it refuses new commands.
    expiring: bool,
    /// Set by the first Destroy: waiting for running commands to end.
    ending: bool,
    /// Everyone waiting for the end (a destroy may be asked twice across a registry restart).
    end_waiters: Vec<RpcReplyPort<Result<(), RequestError>>>,
    _processes: SessionProcesses,
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let cgroup = match args.ctx.cgroups.clone() {
            Some(cgroups) => {
                let (key, limits) = (args.key, args.cgroup_limits);
                let rel = tokio::task::spawn_blocking({
                    let cgroups = cgroups.clone();
                    move || cgroups.create_session(key, &limits)
                })
                .await??;
                SessionCgroupGuard(Some(SessionCgroup { cgroups, rel }))
            }
            None => SessionCgroupGuard(None),
        };
        let idle = args.ctx.config.sessions.idle_timeout;
        myself.send_after(idle, || SessionMsg::IdleCheck);
        let now = Instant::now();
        Ok(SessionState {
            _processes: SessionProcesses {
                table: args.ctx.processes.clone(),
                key: args.key,
            },
            ctx: args.ctx,
            key: args.key,
            id: args.id,
            owner: args.owner,
            created: now,
            last_active: now,
            terminal: Arc::new(TerminalState::new(args.cwd, &args.env)),
            default_timeout: args.default_timeout,
            max_timeout: args.max_timeout,
            rlimits: args.rlimits,
            cgroup,
            running: HashMap::new(),
            expiring: false,
            ending: false,
            end_waiters: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Run { request, reply } => state.run(&myself, request, reply).await,
            SessionMsg::CommandDone {
                command,
                state: shell,
            } => {
                state.running.remove(&command);
                if let Some(shell) = shell {
                    state.terminal = Arc::from(shell);
                }
                state.last_active = Instant::now();
                state.end_if_idle(&myself).await;
            }
            SessionMsg::Cancel { reply } => {
                for command in state.running.values() {
                    let _ = command.cast(CommandMsg::Kill(KilledBy::Cancelled));
                }
                let _ = reply.send(Ok(!state.running.is_empty()));
            }
            SessionMsg::Describe { reply } => {
                let _ = reply.send(state.describe());
            }
            SessionMsg::Destroy { reason, reply } => {
                for command in state.running.values() {
                    let _ = command.cast(CommandMsg::Kill(reason));
                }
                // Background groups of earlier commands die in `end`, after the running
                // commands: killing a running shell's group first would orphan its
                // setsid'd children before its CommandActor could walk its tree.
                state.end_waiters.extend(reply);
                if !state.ending {
                    state.ending = true;
                    let force_after = state.ctx.config.commands.kill_grace + Duration::from_secs(5);
                    myself.send_after(force_after, || SessionMsg::ForceEnd);
                }
                state.end_if_idle(&myself).await;
            }
            SessionMsg::IdleCheck => state.idle_check(&myself),
            #[cfg(feature = "fault-injection")]
            SessionMsg::Fault {
                target,
                fault,
                reply,
            } => {
                if target == crate::fault::FaultTarget::Session {
                    let _ = reply.send(Ok(1));
                    return fault.strike("SessionActor").await;
                }
                for command in state.running.values() {
                    let _ = command.cast(CommandMsg::Fault(fault));
                }
                let _ = reply.send(Ok(state.running.len() as u64));
            }
            SessionMsg::ForceEnd => {
                tracing::warn!(session = %state.id, "commands did not end after destroy; stopping the session anyway");
                state.end(&myself).await;
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SessionMsg>,
        event: SupervisionEvent,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.running.remove(&cell.get_id());
                state.end_if_idle(&myself).await;
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                Stats::bump(&state.ctx.stats.actor_failures);
                tracing::error!(session = %state.id, actor = %cell.get_id(), error = %err, "CommandActor failed; its request gets INTERNAL, the session goes on");
                state.running.remove(&cell.get_id());
                state.last_active = Instant::now();
                state.end_if_idle(&myself).await;
            }
            _ => {}
        }
        Ok(())
    }
}

impl SessionState {
    /// Decides, in this order, `SESSION_BUSY`, the command's timeout
    /// (`INVALID_REQUEST` above the session's maximum) and `TOO_MANY_COMMANDS`
    /// (a permit of the global semaphore, held by the CommandActor), then starts
    /// the CommandActor. Busy is checked first so a request that is refused
    /// never holds a global slot, not even for a moment.
    async fn run(&mut self, myself: &ActorRef<SessionMsg>, request: ExecRequest, reply: ExecReply) {
        if self.expiring || self.ending {
            let _ = reply.send(Err(RequestError::SessionNotFound(self.id.clone())));
            return;
        }
        if self.running.len() >= self.ctx.config.commands.max_per_session {
            Stats::bump(&self.ctx.stats.commands_rejected_busy);
            let _ = reply.send(Err(RequestError::SessionBusy(self.id.clone())));
            return;
        }
        let timeout = match request.timeout {
            None => self.default_timeout,
            Some(t) if t <= self.max_timeout => t,
            Some(t) => {
                let _ = reply.send(Err(RequestError::InvalidRequest(format!(
                    "param `timeout_s`: {}s is over this session's maximum of {}s",
                    t.as_secs_f64(),
                    self.max_timeout.as_secs_f64()
                ))));
                return;
            }
        };
        let Ok(permit) = self.ctx.command_slots.clone().try_acquire_owned() else {
            Stats::bump(&self.ctx.stats.commands_rejected_capacity);
            let _ = reply.send(Err(RequestError::TooManyCommands {
                limit: self.ctx.config.commands.max_concurrent as u64,
            }));
            return;
        };
        let commands = &self.ctx.config.commands;
        let spec = RunSpec {
            shell: self.ctx.shell.clone(),
            command: request.command,
            state: self.terminal.clone(),
            request_env: request.env.clone(),
            max_state_bytes: self.ctx.config.sessions.max_state_bytes.as_u64() as usize,
            stdin: request.stdin,
            timeout,
            kill_grace: commands.kill_grace,
            max_output_bytes: commands.max_output_bytes.as_u64() as usize,
            keep_output: request.keep_output,
            rlimits: self.rlimits,
            oom_score_adj: commands.oom_score_adj,
            credentials: self.ctx.credentials,
            cgroup: self.cgroup.0.as_ref().map(|c| CgroupPlace {
                cgroups: c.cgroups.clone(),
                session: c.rel.clone(),
            }),
        };
        let args = CommandArgs {
            ctx: self.ctx.clone(),
            session: myself.clone(),
            session_key: self.key,
            spec,
            session_state: self.terminal.clone(),
            request_env: request.env,
            permit,
            reply,
        };
        match Actor::spawn_linked(None, CommandActor, args, myself.get_cell()).await {
            Ok((command, _)) => {
                self.running.insert(command.get_id(), command);
                self.last_active = Instant::now();
            }
            // pre_start cannot fail today; its args (and the reply port) are gone if it did,
            // so the client sees INTERNAL.
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "could not start a CommandActor")
            }
        }
    }

    fn describe(&self) -> SessionDescription {
        SessionDescription {
            key: self.key,
            owner: self.owner,
            phase: if self.ending {
                SessionPhase::Ending
            } else if self.expiring {
                SessionPhase::Expiring
            } else {
                SessionPhase::Live
            },
            info: SessionInfo {
                session_id: self.id.clone(),
                created_ms_ago: self.created.elapsed().as_millis() as u64,
                idle_ms: if self.running.is_empty() {
                    self.last_active.elapsed().as_millis() as u64
                } else {
                    0
                },
                busy: !self.running.is_empty(),
                cwd: self.terminal.cwd.to_string_lossy().into_owned(),
            },
        }
    }

    /// Idle timer: one pending timer per session, re-armed for the time left.
    fn idle_check(&mut self, myself: &ActorRef<SessionMsg>) {
        if self.ending {
            return;
        }
        if self.expiring {
            // The registry has not answered yet (it may have been restarted): say it again.
            self.report_expiry(myself);
            return;
        }
        let idle_timeout = self.ctx.config.sessions.idle_timeout;
        let idle_for = self.last_active.elapsed();
        if !self.running.is_empty() || idle_for < idle_timeout {
            let left = if self.running.is_empty() {
                idle_timeout - idle_for
            } else {
                idle_timeout
            };
            myself.send_after(left, || SessionMsg::IdleCheck);
            return;
        }
        // Refuse commands from now on; the registry unlists us and sends Destroy.
        self.expiring = true;
        tracing::info!(session = %self.id, idle_ms = idle_for.as_millis() as u64, "session idle too long; expiring");
        self.report_expiry(myself);
    }

    /// Tells the registry we expired, and checks again later in case the message is lost.
    fn report_expiry(&self, myself: &ActorRef<SessionMsg>) {
        // Looked up now, not remembered: the registry may have been restarted since we started.
        if let Some(registry) = self.ctx.registry() {
            let _ = registry.cast(RegistryMsg::SessionExpired { key: self.key });
        }
        myself.send_after(EXPIRY_RETRY, || SessionMsg::IdleCheck);
    }

    async fn end_if_idle(&mut self, myself: &ActorRef<SessionMsg>) {
        if self.ending && self.running.is_empty() {
            self.end(myself).await;
        }
    }

    /// Kills what is left (the whole cgroup, or every process group of the
    /// session), removes the cgroup, answers the destroyers, stops. Awaiting the
    /// cgroup teardown here only holds this ending session's own mailbox.
    async fn end(&mut self, myself: &ActorRef<SessionMsg>) {
        if let Some(cgroup) = self.cgroup.0.take() {
            let _ = tokio::task::spawn_blocking(move || cgroup.destroy()).await;
        }
        self.ctx.processes.signal_session(self.key, Signal::SIGKILL);
        for reply in self.end_waiters.drain(..) {
            let _ = reply.send(Ok(()));
        }
        myself.stop(Some("destroyed".into()));
    }
}
