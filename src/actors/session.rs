//! SessionActor: child of the root supervisor, one per session; terminal state, idle timer, busy check, parent of its CommandActors.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::command::{CommandActor, CommandArgs, CommandMsg, StartReply};
use super::command_record::CommandRecord;
use crate::cgroup::{CgroupLimits, CgroupNode, SessionLeaves, SessionLeavesHandle};
use crate::config::Config;
use crate::context::Context;
use crate::isolation::Lease;
use crate::limits::Rlimit;
use crate::process::ProcessTable;
use crate::process::live_output::LiveOutput;
use crate::process::pty::PtySize;
use crate::process::run::RunSpec;
use crate::process::shell::EnvMap;
use crate::process::table::SessionKey;
use crate::process::terminal::TerminalState;
use crate::protocol::{
    CommandResult, CreateResult, KeepOutput, KilledBy, RequestError, SessionInfo,
};
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
    /// Keep stdin open for `exec.write` until `eof`.
    pub stdin_open: bool,
    /// Kill the command after this long without output.
    pub idle_timeout: Option<Duration>,
    /// Run it on a pseudo-terminal of this size (stdin then open, as with `stdin_open`).
    pub pty: Option<PtySize>,
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
    /// The configuration in force when the session was created: its limits
    /// for the session's whole life, whatever a later SIGHUP changes.
    pub config: Arc<Config>,
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
    /// Run as the session's first command before `created` is answered.
    pub init: Option<String>,
}

/// Messages of a SessionActor. Run, Cancel and Destroy come only through the
/// registry, so a Destroy is always the last of them a session sees.
pub enum SessionMsg {
    /// The first message, sent to itself: make the cgroup, run `init`, answer `session.create`.
    Setup,
    /// `init` ended (from the task that waits for it): hand the session out, or fail its create.
    InitDone(Result<(), RequestError>),
    /// Start a command (if this session is not busy and a global slot is
    /// free); `reply` gets its record once it runs.
    Run {
        request: ExecRequest,
        reply: StartReply,
    },
    /// A running or retained command of this session, by id.
    Find {
        command_id: String,
        reply: RpcReplyPort<Result<Arc<CommandRecord>, RequestError>>,
    },
    /// Cancel one running command by id; answers whether it was running.
    CancelCommand {
        command_id: String,
        reply: RpcReplyPort<Result<bool, RequestError>>,
    },
    /// Drop retained commands that ended more than `retain_finished` ago.
    PruneRetained,
    /// Cut the retained commands that ended `TRIM_AFTER_END` ago to their kept output.
    TrimRetained,
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
    pub owner: u32,
    pub phase: SessionPhase,
    pub info: SessionInfo,
    /// Where `info.pids_limit_hits` is read from (blocking file reads, done by
    /// the `session.list` task, not by the session).
    pub leaves: Option<Arc<SessionLeaves>>,
}

/// Where a session is in its life, for a registry rebuilding its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    /// Setting up or serving commands.
    Live,
    /// Destroyed or expired: killing its commands, then stopping.
    Ending,
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

/// A command the session runs now.
struct Running {
    actor: ActorRef<CommandMsg>,
    record: Arc<CommandRecord>,
}

/// State of one session.
pub struct SessionState {
    ctx: Arc<Context>,
    /// The configuration the session was created under (see [`SessionArgs::config`]).
    config: Arc<Config>,
    key: SessionKey,
    id: String,
    owner: u32,
    created: Instant,
    last_active: Instant,
    /// The terminal state the next command starts from (cwd, variables, functions…).
    terminal: Arc<TerminalState>,
    /// The stored terminal state's share of the memory budget.
    terminal_charge: crate::budget::Charge,
    default_timeout: Duration,
    max_timeout: Duration,
    /// setrlimit values of every command of this session.
    rlimits: [Rlimit; 5],
    /// The session's command leaves (made ahead) and its count of refused
    /// forks, shared with its commands' runs; ended with the cgroup. Declared
    /// before it: dropped first (an actor failure), it stops the refill before
    /// the cgroup goes.
    leaves: Option<SessionLeavesHandle>,
    /// The session's cgroup, when cgroups are on (made by `Setup`); destroyed
    /// in `end`, or by its Drop when the session ends without `end` (a panic,
    /// a kill: ractor skips `post_stop` then, `Drop` always runs).
    cgroup: Option<CgroupNode>,
    /// Limits for the cgroup, made by `Setup`.
    cgroup_limits: CgroupLimits,
    /// The `session.create` waiting for `Setup` (and `init`).
    create_reply: Option<CreateReply>,
    /// The script to run before the session is handed out.
    init: Option<String>,
    /// Whether `session.create` named the cwd.
    cwd_explicit: bool,
    /// Under uid-per-session: the session's own uid and home, made by `Setup`;
    /// released by `end`, or by its Drop when the actor dies without ending.
    identity: Option<Lease>,
    /// Commands running now; at most `max_per_session`.
    running: HashMap<ActorId, Running>,
    /// Finished commands still readable, oldest first: at most
    /// `retain_per_session`, none older than `retain_finished`.
    retained: VecDeque<(Instant, Arc<CommandRecord>)>,
    /// A `TrimRetained` / `PruneRetained` is pending: one timer each per
    /// session, re-armed for the next due record, never one per command
    /// (a fast client would pile up `retain_finished` worth of timers).
    trim_armed: bool,
    prune_armed: bool,
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
        let idle = args.config.sessions.idle_timeout;
        myself.send_after(idle, || SessionMsg::IdleCheck);
        let now = Instant::now();
        // The starting state (the create's env and cwd, at most one request
        // frame) is charged as it is stored; past the budget it makes the
        // next commands wait, it does not fail the create.
        let mut terminal_charge = args.ctx.budget.empty();
        let env_bytes: usize = args.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        terminal_charge.resize((env_bytes + args.cwd.as_os_str().len()) as u64);
        Ok(SessionState {
            terminal_charge,
            _processes: SessionProcesses {
                table: args.ctx.processes.clone(),
                key: args.key,
            },
            ctx: args.ctx,
            config: args.config,
            key: args.key,
            id: args.id,
            owner: args.owner,
            created: now,
            last_active: now,
            terminal: Arc::new(TerminalState::new(args.cwd, &args.env)),
            default_timeout: args.default_timeout,
            max_timeout: args.max_timeout,
            rlimits: args.rlimits,
            cgroup: None,
            leaves: None,
            cgroup_limits: args.cgroup_limits,
            create_reply: Some(args.created),
            init: args.init,
            cwd_explicit: args.cwd_explicit,
            identity: None,
            running: HashMap::new(),
            retained: VecDeque::new(),
            trim_armed: false,
            prune_armed: false,
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
            SessionMsg::InitDone(outcome) => state.init_done(&myself, outcome).await,
            SessionMsg::Run { request, reply } => state.run(&myself, request, reply).await,
            SessionMsg::CommandDone {
                command,
                state: shell,
            } => {
                state.retire(&myself, &command);
                if let Some(shell) = shell {
                    // Covered by the command's reservation until now: never refused.
                    state.terminal_charge.resize(shell.bytes as u64);
                    state.terminal = Arc::from(shell);
                }
                state.last_active = Instant::now();
                state.end_if_idle(&myself).await;
            }
            SessionMsg::Cancel { reply } => {
                for command in state.running.values() {
                    let _ = command.actor.cast(CommandMsg::Kill(KilledBy::Cancelled));
                }
                let _ = reply.send(Ok(!state.running.is_empty()));
            }
            SessionMsg::CancelCommand { command_id, reply } => {
                let running = state.running.values().find(|c| c.record.id == command_id);
                let answer = match running {
                    Some(command) => {
                        let _ = command.actor.cast(CommandMsg::Kill(KilledBy::Cancelled));
                        Ok(true)
                    }
                    None if state.find(&command_id).is_some() => Ok(false),
                    None => Err(RequestError::CommandNotFound(command_id)),
                };
                let _ = reply.send(answer);
            }
            SessionMsg::Find { command_id, reply } => {
                let _ = reply.send(
                    state
                        .find(&command_id)
                        .ok_or(RequestError::CommandNotFound(command_id)),
                );
            }
            SessionMsg::PruneRetained => state.prune_retained(&myself),
            SessionMsg::TrimRetained => state.trim_retained(&myself),
            SessionMsg::Describe { reply } => {
                let _ = reply.send(state.describe());
            }
            SessionMsg::Destroy { reason, reply } => {
                for command in state.running.values() {
                    let _ = command.actor.cast(CommandMsg::Kill(reason));
                }
                // Background groups of earlier commands die in `end`, after the running
                // commands: killing a running shell's group first would orphan its
                // setsid'd children before its CommandActor could walk its tree.
                state.end_waiters.extend(reply);
                if !state.ending {
                    state.ending = true;
                    let force_after = state.config.commands.kill_grace + timing::FORCE_END_SLACK;
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
                    let _ = command.actor.cast(CommandMsg::Fault(fault));
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
                // Supervision events may overtake the actor's last message
                // (`CommandDone`): whichever comes first retires the command.
                state.retire(&myself, &cell.get_id());
                state.end_if_idle(&myself).await;
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                Stats::bump(&state.ctx.stats.actor_failures);
                tracing::error!(session = %state.id, actor = %cell.get_id(), error = %err, "CommandActor failed; its request gets INTERNAL, the session goes on");
                // Its record was finished with INTERNAL by its Drop guard; keep it
                // readable like any ended command, so a re-attaching client sees why.
                state.retire(&myself, &cell.get_id());
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
            let made = tokio::task::spawn_blocking(move || {
                let node = CgroupNode::create_session(&cgroups, key, &limits)?;
                let leaves = SessionLeaves::new(&cgroups, &node, limits.memory_max);
                Ok::<_, crate::cgroup::CgroupError>((node, leaves))
            })
            .await;
            match made {
                Ok(Ok((node, leaves))) => {
                    self.cgroup = Some(node);
                    self.leaves = Some(SessionLeavesHandle::new(leaves));
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
        match self.init.take() {
            Some(script) => self.start_init(myself, script).await,
            None => self.hand_out(),
        }
    }

    /// Runs `init` as the session's first command, like any other (its
    /// limits, its default timeout, a command slot); a task waits for its
    /// end and reports it, so nothing waits here.
    async fn start_init(&mut self, myself: &ActorRef<SessionMsg>, script: String) {
        let request = ExecRequest {
            command: script,
            timeout: None,
            stdin: None,
            env: EnvMap::new(),
            // The last bytes of stderr are what a failed init reports.
            keep_output: KeepOutput::Tail,
            stdin_open: false,
            idle_timeout: None,
            pty: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.run(myself, request, tx.into()).await;
        let me = myself.clone();
        tokio::spawn(async move {
            let outcome = match rx.await {
                Ok(Ok(record)) => init_outcome(&record, record.ended().await)
                    .map_err(|why| RequestError::SpawnFailed(format!("init failed: {why}"))),
                // Refused (TOO_MANY_COMMANDS) or not started (SPAWN_FAILED): as it is.
                Ok(Err(e)) => Err(e),
                Err(_) => Err(RequestError::Internal(
                    "the init command could not be started".into(),
                )),
            };
            let _ = me.cast(SessionMsg::InitDone(outcome));
        });
    }

    /// `init` ended: the session is handed out, or its create fails with
    /// `SPAWN_FAILED` and the session ends (nothing of it remains).
    async fn init_done(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        outcome: Result<(), RequestError>,
    ) {
        match outcome {
            Ok(()) if !self.ending => self.hand_out(),
            failed => {
                // Ok while ending: destroyed (shutdown) while init ran.
                let error = failed.err().unwrap_or(RequestError::ShuttingDown);
                if let Some(reply) = self.create_reply.take() {
                    let _ = reply.send(Err(error));
                }
                self.ending = true;
                self.end(myself, SessionEnd::SetupFailed).await;
            }
        }
    }

    /// Answers `session.create`: the session is the client's from now on.
    fn hand_out(&mut self) {
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
        let explicit = self.cwd_explicit.then(|| self.terminal.cwd.clone());
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
        // A session starts with no state but its env: rebuild it for the uid.
        let mut env = self.terminal.env();
        // The daemon user's HOME and USER from the base env do not apply; a
        // HOME the client set in `session.create` stays.
        if env.get(b"HOME".as_slice()) == self.ctx.base_env.get(b"HOME".as_slice()) {
            env.insert(b"HOME".to_vec(), bytes(&home));
        }
        env.insert(b"USER".to_vec(), lease.uid().to_string().into_bytes());
        if let Some(tmp) = lease.tmpdir() {
            env.insert(b"TMPDIR".to_vec(), bytes(&tmp));
        }
        let cwd = if self.cwd_explicit {
            self.terminal.cwd.clone()
        } else {
            home
        };
        self.terminal = Arc::new(TerminalState::new(cwd, &env));
        self.identity = Some(lease);
        Ok(())
    }

    /// Decides, in this order, `SESSION_BUSY`, the command's timeout
    /// (`INVALID_REQUEST` above the session's maximum) and `TOO_MANY_COMMANDS`
    /// (a permit of the global semaphore, held by the CommandActor), then
    /// `OVERLOADED` (the command's reservation under the memory budget, after
    /// evicting retained output), then starts the CommandActor. Busy is
    /// checked first so a request that is refused never holds a global slot,
    /// not even for a moment.
    async fn run(
        &mut self,
        myself: &ActorRef<SessionMsg>,
        request: ExecRequest,
        reply: StartReply,
    ) {
        if self.ending {
            // Expired or destroyed while the request was on its way.
            let _ = reply.send(Err(RequestError::SessionNotFound(self.id.clone())));
            return;
        }
        if self.running.len() >= self.config.commands.max_per_session {
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
        let commands = &self.config.commands;
        // What it may come to hold: per stream its kept output and retained
        // window (2 × max_output_bytes), and the terminal state it leaves.
        let reservation = 2 * 2 * commands.max_output_bytes.as_u64()
            + self.config.sessions.max_state_bytes.as_u64();
        let charge = match self.ctx.reserve(reservation) {
            Ok(charge) => charge,
            Err(overloaded) => {
                drop(permit);
                let _ = reply.send(Err(overloaded));
                return;
            }
        };
        let mut request = request;
        if request.pty.is_some() {
            crate::process::pty::default_term(&mut request.env);
        }
        let record = Arc::new(CommandRecord::new(
            format!("{}/c-{}", self.id, uuid::Uuid::new_v4().simple()),
            LiveOutput::new(
                commands.max_output_bytes.as_u64() as usize,
                super::command::keep_output(request.keep_output),
                request.stdin_open || request.pty.is_some(),
            ),
            charge,
        ));
        let spec = RunSpec {
            shell: self.ctx.shell.clone(),
            command: request.command,
            state: self.terminal.clone(),
            request_env: request.env.clone(),
            max_state_bytes: self.config.sessions.max_state_bytes.as_u64() as usize,
            stdin: request.stdin,
            timeout,
            idle_timeout: request.idle_timeout,
            kill_grace: commands.kill_grace,
            output: record.output.clone(),
            rlimits: self.rlimits,
            oom_score_adj: commands.oom_score_adj,
            credentials: self
                .identity
                .as_ref()
                .map(Lease::credentials)
                .or(self.ctx.credentials),
            cgroup: self.leaves.as_ref().map(SessionLeavesHandle::shared),
            pty: request.pty,
        };
        let args = CommandArgs {
            ctx: self.ctx.clone(),
            session: myself.clone(),
            session_key: self.key,
            spec,
            session_state: self.terminal.clone(),
            request_env: request.env,
            permit,
            record: record.clone(),
            started: reply,
        };
        match Actor::spawn_linked(None, CommandActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.running
                    .insert(actor.get_id(), Running { actor, record });
                self.last_active = Instant::now();
            }
            // pre_start cannot fail today; its args (and the reply port) are gone if it did,
            // so the client sees INTERNAL.
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "could not start a CommandActor")
            }
        }
    }

    /// A running or retained command by id.
    fn find(&self, command_id: &str) -> Option<Arc<CommandRecord>> {
        self.running
            .values()
            .map(|c| &c.record)
            .chain(self.retained.iter().map(|(_, r)| r))
            .find(|r| r.id == command_id && !r.evicted())
            .cloned()
    }

    /// The running commands' ids, oldest first.
    fn running_ids(&self) -> Vec<String> {
        let mut running: Vec<&Running> = self.running.values().collect();
        running.sort_by_key(|c| c.record.started);
        running.iter().map(|c| c.record.id.clone()).collect()
    }

    /// A command ended (or its actor failed): from running to retained,
    /// dropping the oldest past `retain_per_session`; the newest is dropped
    /// after `retain_finished` by a timer.
    fn retire(&mut self, myself: &ActorRef<SessionMsg>, command: &ActorId) {
        let Some(running) = self.running.remove(command) else {
            return;
        };
        let commands = &self.config.commands;
        if commands.retain_per_session == 0 {
            return;
        }
        let retain_finished = commands.retain_finished;
        self.ctx.retain(&running.record);
        self.retained.push_back((Instant::now(), running.record));
        while self.retained.len() > commands.retain_per_session {
            self.retained.pop_front();
        }
        // Its window goes a little later, not now: a streaming reader that
        // keeps up may not have read the last bytes yet.
        self.arm_trim(myself, timing::TRIM_AFTER_END);
        self.arm_prune(myself, retain_finished);
    }

    fn arm_trim(&mut self, myself: &ActorRef<SessionMsg>, after: std::time::Duration) {
        if !self.trim_armed {
            self.trim_armed = true;
            myself.send_after(after, || SessionMsg::TrimRetained);
        }
    }

    fn arm_prune(&mut self, myself: &ActorRef<SessionMsg>, after: std::time::Duration) {
        if !self.prune_armed {
            self.prune_armed = true;
            myself.send_after(after, || SessionMsg::PruneRetained);
        }
    }

    /// Cuts the retained commands that ended `TRIM_AFTER_END` ago or more to
    /// their kept output; re-arms for the next one due.
    fn trim_retained(&mut self, myself: &ActorRef<SessionMsg>) {
        self.trim_armed = false;
        let mut next = None;
        for (ended, record) in &self.retained {
            match timing::TRIM_AFTER_END.checked_sub(ended.elapsed()) {
                None | Some(std::time::Duration::ZERO) => record.trim(),
                Some(left) => next = Some(next.map_or(left, |n: std::time::Duration| n.min(left))),
            }
        }
        if let Some(left) = next {
            self.arm_trim(myself, left);
        }
    }

    /// Drops retained commands that ended `retain_finished` ago or more;
    /// re-arms for the oldest left.
    fn prune_retained(&mut self, myself: &ActorRef<SessionMsg>) {
        self.prune_armed = false;
        let keep_for = self.config.commands.retain_finished;
        while self
            .retained
            .front()
            .is_some_and(|(ended, _)| ended.elapsed() >= keep_for)
        {
            self.retained.pop_front();
        }
        if let Some((ended, _)) = self.retained.front() {
            self.arm_prune(myself, keep_for.saturating_sub(ended.elapsed()));
        }
    }

    fn describe(&self) -> SessionDescription {
        let running_ids = self.running_ids();
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
                cwd: self.terminal.cwd.to_string_lossy().into_owned(),
                command_id: running_ids.last().cloned(),
                command_ids: running_ids,
                pids_limit_hits: None,
            },
            leaves: self.leaves.as_ref().map(SessionLeavesHandle::shared),
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
        let idle_timeout = self.config.sessions.idle_timeout;
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
        if let Some(cgroup) = self.cgroup.take() {
            let leaves = self.leaves.take();
            let destroyed = tokio::task::spawn_blocking(move || {
                let name = cgroup.name().to_string();
                // Killed first, so the count of refused forks is final.
                let killed = cgroup.kill();
                if let Some(leaves) = leaves {
                    leaves.finish();
                }
                let destroyed = cgroup.destroy();
                killed.and(destroyed).map_err(|e| (name, e))
            })
            .await;
            if let Ok(Err((cgroup, e))) = destroyed {
                tracing::error!(%cgroup, error = %e, "cannot remove the session's cgroup");
            }
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

/// Whether `init` succeeded: it exited 0 by itself. Otherwise its exit
/// status or kill reason and the last bytes of its stderr (at most 4 KiB).
fn init_outcome(
    record: &CommandRecord,
    ended: &Result<CommandResult, RequestError>,
) -> Result<(), String> {
    const STDERR_TAIL: usize = 4096;
    let result = ended.as_ref().map_err(|e| e.to_string())?;
    if result.exit_code == Some(0) && result.killed_by.is_none() {
        return Ok(());
    }
    let status = match (result.killed_by, result.exit_code, result.signal) {
        (Some(by), _, _) => format!("killed ({})", by.name()),
        (None, Some(code), _) => format!("exit status {code}"),
        (None, None, Some(signal)) => format!("ended by signal {signal}"),
        (None, None, None) => "ended".to_string(),
    };
    let stderr = record.output.kept().stderr;
    let tail = &stderr[stderr.len().saturating_sub(STDERR_TAIL)..];
    Err(format!(
        "{status}; stderr (last {} bytes): {}",
        tail.len(),
        String::from_utf8_lossy(tail)
    ))
}
