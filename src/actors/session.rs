//! SessionActor: child of the root supervisor, one per session; shell state, idle timer, busy check, parent of its CommandActors.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::command::{CommandActor, CommandArgs, CommandMsg, ExecReply};
use crate::cgroup::{CgroupLimits, Cgroups};
use crate::context::Context;
use crate::isolation::Lease;
use crate::limits::Rlimit;
use crate::process::ProcessTable;
use crate::process::run::{CgroupPlace, RunSpec};
use crate::process::shell::{EnvMap, ShellState};
use crate::process::table::SessionKey;
use crate::protocol::{CreateResult, KeepOutput, KilledBy, RequestError, SessionInfo};
use crate::stats::Stats;
use crate::timing;

/// The answer a `session.create` waits for; the new session gives it once its cgroup exists.
pub type CreateReply = RpcReplyPort<Result<CreateResult, RequestError>>;

/// Why a session stopped, as the root supervisor tells the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Told to end (`session.destroy`, shutdown).
    Destroyed,
    /// Idle past `sessions.idle_timeout`: it ended itself.
    Expired,
    /// Its cgroup could not be made; `session.create` was answered with the error.
    SetupFailed,
    /// It failed (panic or error); its Drop guards killed its processes.
    Failed,
}

impl SessionEnd {
    const DESTROYED: &str = "destroyed";
    const EXPIRED: &str = "expired";
    const SETUP_FAILED: &str = "setup failed";

    /// The stop reason a session gives ractor for this end.
    fn stop_reason(self) -> String {
        match self {
            SessionEnd::Destroyed | SessionEnd::Failed => Self::DESTROYED,
            SessionEnd::Expired => Self::EXPIRED,
            SessionEnd::SetupFailed => Self::SETUP_FAILED,
        }
        .to_string()
    }

    /// Reads back the reason a session stopped with.
    pub fn from_stop_reason(reason: Option<&str>) -> SessionEnd {
        match reason {
            Some(Self::EXPIRED) => SessionEnd::Expired,
            Some(Self::SETUP_FAILED) => SessionEnd::SetupFailed,
            _ => SessionEnd::Destroyed,
        }
    }
}

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
    /// Whether `session.create` named the cwd (else, under uid-per-session, it is the session's home).
    pub cwd_explicit: bool,
    pub env: EnvMap,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub rlimits: [Rlimit; 5],
    /// Limits of the session's cgroup (used when cgroups are on).
    pub cgroup_limits: CgroupLimits,
    /// Answered by the session once it is set up (or could not be).
    pub created: CreateReply,
}

/// Messages of a SessionActor. Run, Cancel and Destroy come only through the
/// registry, so a Destroy is always the last of them a session sees.
pub enum SessionMsg {
    /// The first message, sent to itself: make the cgroup, answer `session.create`.
    Setup,
    /// Start a command (if this session is not busy and a global slot is free); answer on `reply`.
    Run {
        request: ExecRequest,
        reply: ExecReply,
    },
    /// A CommandActor finished; `state` is the shell state it left, if it ended by itself.
    CommandDone {
        command: ActorId,
        state: Option<ShellState>,
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
    pub owner: u32,
    pub phase: SessionPhase,
    pub info: SessionInfo,
}

/// Where a session is in its life, for a registry rebuilding its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    /// Setting up or serving commands.
    Live,
    /// Destroyed or expired: killing its commands, then stopping.
    Ending,
}

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
    cwd: PathBuf,
    env: EnvMap,
    default_timeout: Duration,
    max_timeout: Duration,
    /// setrlimit values of every command of this session.
    rlimits: [Rlimit; 5],
    /// The session's cgroup, when cgroups are on; removed when the session ends.
    cgroup: SessionCgroupGuard,
    /// Limits for the cgroup, made by `Setup`.
    cgroup_limits: CgroupLimits,
    /// The `session.create` waiting for `Setup`.
    create_reply: Option<CreateReply>,
    /// Whether `session.create` named the cwd.
    cwd_explicit: bool,
    /// Under uid-per-session: the session's own uid and home, made by `Setup`;
    /// released by `end`, or by its Drop when the actor dies without ending.
    identity: Option<Lease>,
    /// Commands running now; at most `max_per_session`.
    running: HashMap<ActorId, ActorRef<CommandMsg>>,
    /// Set by the first Destroy, or on expiry: refuses new commands, waits for running ones to end.
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
        // No I/O here: ractor runs pre_start in the spawner's task (the
        // registry's). The cgroup is made by the first message, in our own task.
        let _ = myself.cast(SessionMsg::Setup);
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
            cwd: args.cwd,
            env: args.env,
            default_timeout: args.default_timeout,
            max_timeout: args.max_timeout,
            rlimits: args.rlimits,
            cgroup: SessionCgroupGuard(None),
            cgroup_limits: args.cgroup_limits,
            create_reply: Some(args.created),
            cwd_explicit: args.cwd_explicit,
            identity: None,
            running: HashMap::new(),
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
            SessionMsg::Setup => state.setup(&myself).await,
            SessionMsg::Run { request, reply } => state.run(&myself, request, reply).await,
            SessionMsg::CommandDone {
                command,
                state: shell,
            } => {
                state.running.remove(&command);
                if let Some(shell) = shell {
                    state.cwd = shell.cwd;
                    state.env = shell.env;
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
                    let force_after =
                        state.ctx.config.commands.kill_grace + timing::FORCE_END_SLACK;
                    myself.send_after(force_after, || SessionMsg::ForceEnd);
                }
                state.end_if_idle(&myself).await;
            }
            SessionMsg::IdleCheck => state.idle_check(&myself).await,
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
                state.end(&myself, SessionEnd::Destroyed).await;
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
    /// Makes the session's cgroup (blocking file I/O, off the async workers;
    /// awaited here, where it holds only this new session's mailbox), then
    /// answers `session.create`. When the cgroup cannot be made, the create
    /// fails and the session stops without ever having been handed out.
    async fn setup(&mut self, myself: &ActorRef<SessionMsg>) {
        if let Err(e) = self.take_identity().await {
            tracing::warn!(session = %self.id, error = %e, "cannot give the session a uid of its own");
            if let Some(reply) = self.create_reply.take() {
                let _ = reply.send(Err(e));
            }
            self.ending = true;
            myself.stop(Some(SessionEnd::SetupFailed.stop_reason()));
            return;
        }
        if let Some(cgroups) = self.ctx.cgroups.clone() {
            let (key, limits) = (self.key, self.cgroup_limits);
            let made = tokio::task::spawn_blocking({
                let cgroups = cgroups.clone();
                move || cgroups.create_session(key, &limits)
            })
            .await;
            match made {
                Ok(Ok(rel)) => {
                    self.cgroup = SessionCgroupGuard(Some(SessionCgroup { cgroups, rel }))
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => unreachable!("matched above"),
                    };
                    tracing::error!(session = %self.id, error = %why, "cannot make the session's cgroup");
                    if let Some(reply) = self.create_reply.take() {
                        let _ = reply.send(Err(RequestError::Internal(format!(
                            "cannot start the session: {why}"
                        ))));
                    }
                    self.ending = true;
                    myself.stop(Some(SessionEnd::SetupFailed.stop_reason()));
                    return;
                }
            }
        }
        Stats::bump(&self.ctx.stats.sessions_created);
        tracing::info!(session = %self.id, uid = self.owner, "session created");
        if let Some(reply) = self.create_reply.take() {
            let _ = reply.send(Ok(CreateResult {
                session_id: self.id.clone(),
            }));
        }
    }

    /// Under uid-per-session: leases the session's uid and makes its home
    /// (blocking, off the async workers; awaited here, in this new session's
    /// own task). The home is the default cwd and `HOME` (`TMPDIR` with
    /// `private_tmp`), `USER` is the uid. An explicit cwd is checked here,
    /// where the uid is known: one the uid cannot enter is `INVALID_REQUEST`
    /// (the uid is freed again by the lease's Drop).
    async fn take_identity(&mut self) -> Result<(), RequestError> {
        let Some(isolation) = self.ctx.isolation.clone() else {
            return Ok(());
        };
        let explicit = self.cwd_explicit.then(|| self.cwd.clone());
        let lease = tokio::task::spawn_blocking(move || {
            let lease = isolation
                .acquire()
                .map_err(|e| RequestError::Internal(format!("cannot start the session: {e}")))?;
            if let Some(cwd) = explicit {
                lease.can_enter(&cwd).map_err(|errno| {
                    RequestError::InvalidRequest(format!(
                        "param `cwd`: {} cannot be entered by the session's uid {} ({errno}); under uid-per-session a session runs as a uid of its own, so its cwd needs search permission for others on every directory of the path, or omit `cwd` to start in the session's home",
                        cwd.display(),
                        lease.uid()
                    ))
                })?;
            }
            Ok(lease)
        })
        .await
        .map_err(|e| RequestError::Internal(format!("cannot start the session: {e}")))??;
        let home = lease.home();
        let bytes = |p: &std::path::Path| p.as_os_str().as_encoded_bytes().to_vec();
        // The daemon user's HOME and USER from the base env do not apply; a
        // HOME the client set in `session.create` stays.
        if self.env.get(b"HOME".as_slice()) == self.ctx.base_env.get(b"HOME".as_slice()) {
            self.env.insert(b"HOME".to_vec(), bytes(&home));
        }
        self.env
            .insert(b"USER".to_vec(), lease.uid().to_string().into_bytes());
        if let Some(tmp) = lease.tmpdir() {
            self.env.insert(b"TMPDIR".to_vec(), bytes(&tmp));
        }
        if !self.cwd_explicit {
            self.cwd = home;
        }
        self.identity = Some(lease);
        Ok(())
    }

    /// Decides, in this order, `SESSION_BUSY`, the command's timeout
    /// (`INVALID_REQUEST` above the session's maximum) and `TOO_MANY_COMMANDS`
    /// (a permit of the global semaphore, held by the CommandActor), then starts
    /// the CommandActor. Busy is checked first so a request that is refused
    /// never holds a global slot, not even for a moment.
    async fn run(&mut self, myself: &ActorRef<SessionMsg>, request: ExecRequest, reply: ExecReply) {
        if self.ending {
            // Expired or destroyed while the request was on its way.
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
            Some(asked) => {
                let _ = reply.send(Err(RequestError::TimeoutOverSessionMax {
                    asked,
                    max: self.max_timeout,
                }));
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
        let mut env = self.env.clone();
        env.extend(request.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let spec = RunSpec {
            shell: self.ctx.shell.clone(),
            command: request.command,
            cwd: self.cwd.clone(),
            env,
            stdin: request.stdin,
            timeout,
            kill_grace: commands.kill_grace,
            max_output_bytes: commands.max_output_bytes.as_u64() as usize,
            keep_output: request.keep_output,
            rlimits: self.rlimits,
            oom_score_adj: commands.oom_score_adj,
            credentials: self
                .identity
                .as_ref()
                .map(Lease::credentials)
                .or(self.ctx.credentials),
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
            session_env: self.env.clone(),
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
            owner: self.owner,
            phase: if self.ending {
                SessionPhase::Ending
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
                cwd: self.cwd.to_string_lossy().into_owned(),
            },
        }
    }

    /// Idle timer: one pending timer per session, re-armed for the time left.
    /// Idle past `idle_timeout`, the session ends itself; the registry learns
    /// of it from the root supervisor (`SessionEnd::Expired`) and unlists it.
    /// A request routed to it meanwhile gets `SESSION_NOT_FOUND` from [`Self::run`].
    async fn idle_check(&mut self, myself: &ActorRef<SessionMsg>) {
        if self.ending {
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
        self.ending = true;
        tracing::info!(session = %self.id, idle_ms = idle_for.as_millis() as u64, "session idle too long; expiring");
        self.end(myself, SessionEnd::Expired).await;
    }

    async fn end_if_idle(&mut self, myself: &ActorRef<SessionMsg>) {
        if self.ending && self.running.is_empty() {
            self.end(myself, SessionEnd::Destroyed).await;
        }
    }

    /// Kills what is left (the whole cgroup, or every process group of the
    /// session), removes the cgroup, answers the destroyers, stops. Awaiting the
    /// cgroup teardown here only holds this ending session's own mailbox.
    async fn end(&mut self, myself: &ActorRef<SessionMsg>, why: SessionEnd) {
        if let Some(cgroup) = self.cgroup.0.take() {
            let _ = tokio::task::spawn_blocking(move || cgroup.destroy()).await;
        }
        self.ctx.processes.signal_session(self.key, Signal::SIGKILL);
        if let Some(lease) = self.identity.take() {
            // Everything else of the uid (setsid'd escapees, IPC, tmp files,
            // the home) goes before the destroy is answered.
            let _ = tokio::task::spawn_blocking(move || lease.release()).await;
        }
        for reply in self.end_waiters.drain(..) {
            let _ = reply.send(Ok(()));
        }
        myself.stop(Some(why.stop_reason()));
    }
}
