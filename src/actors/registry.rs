//! RegistryActor: child of the root supervisor; the session table, admission (sessions and command slots), routing, the periodic sweep.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::command::StartReply;
use super::command_record::CommandRecord;
use super::session::{
    CreateReply, ExecRequest, SessionActor, SessionArgs, SessionDescription, SessionEnd,
    SessionMsg, SessionPhase,
};
use crate::context::Context;
use crate::limits::Rlimit;
use crate::process::reaper;
use crate::process::shell::EnvMap;
use crate::protocol::{KilledBy, RequestError, SessionInfo};
use crate::stats::Stats;
use crate::timing;

/// The admission point of the daemon: it alone decides `TOO_MANY_SESSIONS`,
/// `CLIENT_SESSION_LIMIT`, `SHUTTING_DOWN` and `SESSION_NOT_FOUND`, and it is
/// the only router of Create/Run/Cancel/Destroy/List to sessions. It never
/// awaits a session: it forwards the reply port and moves on (a new session
/// makes its cgroup in its own task and answers `session.create` itself;
/// `session.list` is collected by a task of its own). The one exception is a
/// restarted registry rebuilding its table, which asks every live session at
/// once, bounded by [`timing::DESCRIBE`].
/// Sessions are children of the root supervisor, not of the registry, so a
/// registry failure loses no session: its successor rebuilds the table from them.
pub struct RegistryActor;

/// What a RegistryActor is started with.
pub struct RegistryArgs {
    pub ctx: Arc<Context>,
    /// The root supervisor: parent of every SessionActor.
    pub supervisor: ActorCell,
    /// Rebuild the table from the supervisor's live sessions (after a restart).
    pub recover: bool,
}

/// A validated `session.create`.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub cwd: Option<PathBuf>,
    pub env: EnvMap,
    /// The session's default and maximum command timeout, when it tightened it.
    pub timeout: Option<Duration>,
    /// The setrlimit values of the session's commands.
    pub rlimits: [Rlimit; 5],
    /// The session's cgroup limits.
    pub cgroup_limits: crate::cgroup::CgroupLimits,
    /// Run before the session is handed out (`session.create` `init`).
    pub init: Option<String>,
}

/// Messages of the RegistryActor.
pub enum RegistryMsg {
    Create {
        uid: u32,
        request: CreateRequest,
        reply: CreateReply,
    },
    Destroy {
        uid: u32,
        session_id: String,
        reply: RpcReplyPort<Result<(), RequestError>>,
    },
    Run {
        uid: u32,
        session_id: String,
        request: ExecRequest,
        reply: StartReply,
    },
    Cancel {
        uid: u32,
        session_id: String,
        reply: RpcReplyPort<Result<bool, RequestError>>,
    },
    /// The caller's command by id, from the session that owns it.
    FindCommand {
        uid: u32,
        command_id: String,
        reply: RpcReplyPort<Result<Arc<CommandRecord>, RequestError>>,
    },
    /// Cancel the caller's command by id.
    CancelCommand {
        uid: u32,
        command_id: String,
        reply: RpcReplyPort<Result<bool, RequestError>>,
    },
    /// The sessions of `uid`, described by a task of the registry's (it never awaits them).
    List {
        uid: u32,
        reply: RpcReplyPort<Vec<SessionInfo>>,
    },
    /// A SessionActor stopped or failed, and why (from the root supervisor:
    /// the one way a session's end reaches the registry).
    SessionEnded { actor: ActorId, end: SessionEnd },
    /// Periodic: prune dead process groups, reap orphaned zombies.
    Sweep,
    /// Destroy every session with `killed_by: "shutdown"`; answer when all have ended.
    Shutdown { reply: RpcReplyPort<()> },
    /// Fault injection: strike the registry itself, or pass the fault to a session.
    #[cfg(feature = "fault-injection")]
    Fault {
        uid: u32,
        target: crate::fault::FaultTarget,
        session_id: String,
        fault: crate::fault::Fault,
        reply: RpcReplyPort<Result<u64, RequestError>>,
    },
}

struct SessionEntry {
    owner: u32,
    actor: ActorRef<SessionMsg>,
}

/// The session table and its indexes. Bounded by `max_sessions`.
pub struct RegistryState {
    ctx: Arc<Context>,
    supervisor: ActorCell,
    sessions: HashMap<String, SessionEntry>,
    by_actor: HashMap<ActorId, String>,
    per_uid: HashMap<u32, usize>,
    /// Sessions told to end whose actors have not stopped yet.
    ending: HashSet<ActorId>,
    shutdown_waiters: Vec<RpcReplyPort<()>>,
    shutting_down: bool,
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RegistryMsg>,
        args: RegistryArgs,
    ) -> Result<RegistryState, ActorProcessingErr> {
        let mut state = RegistryState {
            ctx: args.ctx,
            supervisor: args.supervisor,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            per_uid: HashMap::new(),
            ending: HashSet::new(),
            shutdown_waiters: Vec::new(),
            shutting_down: false,
        };
        if args.recover {
            state.recover().await;
        }
        // A fresh table (a restarted tree) starts the count from what it holds.
        state.publish_count();
        let interval = state.ctx.config.sessions.reap_interval;
        myself.send_interval(interval, || RegistryMsg::Sweep);
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<RegistryMsg>,
        msg: RegistryMsg,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Create {
                uid,
                request,
                reply,
            } => state.create(uid, request, reply).await,
            RegistryMsg::Destroy {
                uid,
                session_id,
                reply,
            } => match state.unlist(uid, &session_id) {
                Ok(entry) => {
                    Stats::bump(&state.ctx.stats.sessions_destroyed);
                    state.end_session(entry, KilledBy::SessionDestroyed, Some(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            RegistryMsg::Run {
                uid,
                session_id,
                request,
                reply,
            } => state.route_run(uid, &session_id, request, reply),
            RegistryMsg::Cancel {
                uid,
                session_id,
                reply,
            } => match state.lookup(uid, &session_id) {
                // The session answers directly.
                Ok(entry) => {
                    if let Err(ractor::MessagingErr::SendErr(SessionMsg::Cancel { reply })) =
                        entry.actor.cast(SessionMsg::Cancel { reply })
                    {
                        let _ = reply.send(Err(RequestError::SessionNotFound(session_id)));
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            RegistryMsg::FindCommand {
                uid,
                command_id,
                reply,
            } => state.route_to_command(uid, command_id, reply, |command_id, reply| {
                SessionMsg::Find { command_id, reply }
            }),
            RegistryMsg::CancelCommand {
                uid,
                command_id,
                reply,
            } => state.route_to_command(uid, command_id, reply, |command_id, reply| {
                SessionMsg::CancelCommand { command_id, reply }
            }),
            RegistryMsg::List { uid, reply } => state.list(uid, reply),
            RegistryMsg::SessionEnded { actor, end } => state.session_ended(actor, end),
            RegistryMsg::Sweep => state.sweep(),
            #[cfg(feature = "fault-injection")]
            RegistryMsg::Fault {
                uid,
                target,
                session_id,
                fault,
                reply,
            } => {
                if target == crate::fault::FaultTarget::Registry {
                    let _ = reply.send(Ok(1));
                    return fault.strike("RegistryActor").await;
                }
                match state.lookup(uid, &session_id) {
                    Ok(entry) => {
                        let _ = entry.actor.cast(SessionMsg::Fault {
                            target,
                            fault,
                            reply,
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            RegistryMsg::Shutdown { reply } => {
                state.shutting_down = true;
                let all: Vec<(String, u32)> = state
                    .sessions
                    .iter()
                    .map(|(id, e)| (id.clone(), e.owner))
                    .collect();
                for (id, owner) in all {
                    if let Ok(entry) = state.unlist(owner, &id) {
                        Stats::bump(&state.ctx.stats.sessions_destroyed);
                        state.end_session(entry, KilledBy::Shutdown, None);
                    }
                }
                state.shutdown_waiters.push(reply);
                state.answer_shutdown_waiters();
            }
        }
        Ok(())
    }
}

impl RegistryState {
    /// Admission of a new session, then its start. The session makes its
    /// cgroup in its own task and answers `reply` itself; this only spawns the
    /// actor (whose `pre_start` does no I/O), so a slow cgroup never holds
    /// the registry's mailbox.
    async fn create(&mut self, uid: u32, request: CreateRequest, reply: CreateReply) {
        if let Err(e) = self.admit(uid) {
            Stats::bump(&self.ctx.stats.sessions_rejected);
            let _ = reply.send(Err(e));
            return;
        }
        let cfg = self.ctx.live();
        // `limits.timeout_s` is the session's default and maximum timeout.
        let (default_timeout, max_timeout) = match request.timeout {
            Some(t) => (t, t),
            None => (cfg.commands.default_timeout, cfg.commands.max_timeout),
        };
        let cwd_explicit = request.cwd.is_some();
        let cwd = request.cwd.unwrap_or_else(|| self.ctx.default_cwd.clone());
        let mut env = self.ctx.base_env.clone();
        env.extend(request.env);

        let key = self.ctx.new_session_key();
        let id = format!("s-{}", uuid::Uuid::new_v4().simple());
        let args = SessionArgs {
            ctx: self.ctx.clone(),
            config: cfg.clone(),
            key,
            id: id.clone(),
            owner: uid,
            cwd,
            cwd_explicit,
            env,
            default_timeout,
            max_timeout,
            rlimits: request.rlimits,
            cgroup_limits: request.cgroup_limits,
            init: request.init,
            created: reply,
        };
        match Actor::spawn_linked(None, SessionActor, args, self.supervisor.clone()).await {
            Ok((actor, _)) => self.insert(id, SessionEntry { owner: uid, actor }),
            // pre_start cannot fail (it does no I/O); if it did, its args and
            // the reply port are gone, so the client sees INTERNAL.
            Err(e) => {
                Stats::bump(&self.ctx.stats.sessions_rejected);
                tracing::error!(error = %e, "could not start a SessionActor");
            }
        }
    }

    /// Decides `SHUTTING_DOWN`, `TOO_MANY_SESSIONS` and `CLIENT_SESSION_LIMIT`
    /// (sessions still starting count).
    fn admit(&self, uid: u32) -> Result<(), RequestError> {
        let cfg = self.ctx.live();
        if self.ctx.draining() || self.shutting_down {
            return Err(RequestError::ShuttingDown);
        }
        if self.sessions.len() >= cfg.sessions.max_sessions {
            return Err(RequestError::TooManySessions {
                limit: cfg.sessions.max_sessions as u64,
            });
        }
        if self.per_uid.get(&uid).copied().unwrap_or(0) >= cfg.sessions.max_sessions_per_client {
            return Err(RequestError::ClientSessionLimit {
                limit: cfg.sessions.max_sessions_per_client as u64,
            });
        }
        Ok(())
    }

    /// Answers `session.list` from a task: every session of `uid` describes
    /// itself at once, each within [`timing::DESCRIBE`]; one that ends meanwhile
    /// is simply not listed.
    fn list(&self, uid: u32, reply: RpcReplyPort<Vec<SessionInfo>>) {
        let sessions: Vec<ActorRef<SessionMsg>> = self
            .sessions
            .values()
            .filter(|e| e.owner == uid)
            .map(|e| e.actor.clone())
            .collect();
        tokio::spawn(async move {
            let described = futures::future::join_all(sessions.iter().map(describe)).await;
            // Each session's count of refused forks: a few cgroup files
            // each, read here on the blocking pool, not by the sessions.
            let counted = tokio::task::spawn_blocking(move || {
                described
                    .into_iter()
                    .flatten()
                    .map(|mut d| {
                        d.info.pids_limit_hits = d.leaves.map(|l| l.pids_limit_hits());
                        d.info
                    })
                    .collect::<Vec<SessionInfo>>()
            })
            .await;
            let Ok(mut out) = counted else { return };
            out.sort_by_key(|s| std::cmp::Reverse(s.created_ms_ago));
            let _ = reply.send(out);
        });
    }

    fn insert(&mut self, id: String, entry: SessionEntry) {
        self.by_actor.insert(entry.actor.get_id(), id.clone());
        *self.per_uid.entry(entry.owner).or_default() += 1;
        self.sessions.insert(id, entry);
        self.publish_count();
    }

    /// The caller's session, or `SESSION_NOT_FOUND` (also for another uid's: no hint it exists).
    fn lookup(&self, uid: u32, session_id: &str) -> Result<&SessionEntry, RequestError> {
        match self.sessions.get(session_id) {
            Some(entry) if entry.owner == uid => Ok(entry),
            _ => Err(RequestError::SessionNotFound(session_id.to_string())),
        }
    }

    /// Removes the caller's session from the table, so nothing more is routed to it.
    fn unlist(&mut self, uid: u32, session_id: &str) -> Result<SessionEntry, RequestError> {
        self.lookup(uid, session_id)?;
        let entry = self
            .sessions
            .remove(session_id)
            .expect("looked up just above");
        self.by_actor.remove(&entry.actor.get_id());
        if let Some(n) = self.per_uid.get_mut(&entry.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&entry.owner);
            }
        }
        self.publish_count();
        Ok(entry)
    }

    /// Tells an unlisted session to end; `reply` answers `session.destroy` once it has.
    fn end_session(
        &mut self,
        entry: SessionEntry,
        reason: KilledBy,
        reply: Option<RpcReplyPort<Result<(), RequestError>>>,
    ) {
        self.ending.insert(entry.actor.get_id());
        // The session answers `reply` itself once its processes are dead.
        if let Err(ractor::MessagingErr::SendErr(SessionMsg::Destroy { reply, .. })) =
            entry.actor.cast(SessionMsg::Destroy { reason, reply })
        {
            // Already gone: its Drop guard killed its processes; destroyed either way.
            self.ending.remove(&entry.actor.get_id());
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Decides `SHUTTING_DOWN` and `SESSION_NOT_FOUND`, then hands the command
    /// to the session (which decides `SESSION_BUSY` and `TOO_MANY_COMMANDS`).
    fn route_run(&mut self, uid: u32, session_id: &str, request: ExecRequest, reply: StartReply) {
        if self.ctx.draining() || self.shutting_down {
            let _ = reply.send(Err(RequestError::ShuttingDown));
            return;
        }
        let entry = match self.lookup(uid, session_id) {
            Ok(entry) => entry,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if let Err(ractor::MessagingErr::SendErr(SessionMsg::Run { reply, .. })) =
            entry.actor.cast(SessionMsg::Run { request, reply })
        {
            let _ = reply.send(Err(RequestError::SessionNotFound(session_id.to_string())));
        }
    }

    /// Forwards a request about a command to the session its id names; a
    /// command id of another uid's session, an unknown or a malformed one is
    /// `COMMAND_NOT_FOUND` (never a hint that it exists).
    fn route_to_command<T: Send + 'static>(
        &self,
        uid: u32,
        command_id: String,
        reply: RpcReplyPort<Result<T, RequestError>>,
        message: impl FnOnce(String, RpcReplyPort<Result<T, RequestError>>) -> SessionMsg,
    ) {
        let session = CommandRecord::session_of(&command_id)
            .and_then(|session| self.lookup(uid, session).ok())
            .map(|entry| entry.actor.clone());
        let Some(session) = session else {
            let _ = reply.send(Err(RequestError::CommandNotFound(command_id)));
            return;
        };
        // A session that is gone drops the port: INTERNAL would mislead, so answer here.
        let (tx, rx) = tokio::sync::oneshot::channel();
        if session
            .cast(message(command_id.clone(), tx.into()))
            .is_err()
        {
            let _ = reply.send(Err(RequestError::CommandNotFound(command_id)));
            return;
        }
        tokio::spawn(async move {
            let answer = rx
                .await
                .unwrap_or(Err(RequestError::CommandNotFound(command_id)));
            let _ = reply.send(answer);
        });
    }

    /// A session stopped: unlist it if it still is, and count why.
    fn session_ended(&mut self, actor: ActorId, end: SessionEnd) {
        self.ending.remove(&actor);
        if let Some(id) = self.by_actor.get(&actor).cloned() {
            let owner = self.sessions[&id].owner;
            let _ = self.unlist(owner, &id);
            match end {
                SessionEnd::Expired => Stats::bump(&self.ctx.stats.sessions_expired),
                SessionEnd::SetupFailed => Stats::bump(&self.ctx.stats.sessions_rejected),
                SessionEnd::Destroyed | SessionEnd::Failed => {
                    // Ended without being told to: a failure (its Drop guard killed its processes).
                    Stats::bump(&self.ctx.stats.sessions_destroyed);
                    tracing::warn!(session = %id, ?end, "session ended unexpectedly; unlisted");
                }
            }
        }
        self.answer_shutdown_waiters();
    }

    fn answer_shutdown_waiters(&mut self) {
        if self.shutting_down && self.sessions.is_empty() && self.ending.is_empty() {
            for waiter in self.shutdown_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// Prunes dead process groups and reaps orphaned zombies, off the async workers.
    fn sweep(&mut self) {
        // Entries whose actor is gone without a supervision event reaching us.
        let dead: Vec<(String, u32)> = self
            .sessions
            .iter()
            .filter(|(_, e)| e.actor.get_status() >= ractor::ActorStatus::Stopping)
            .map(|(id, e)| (id.clone(), e.owner))
            .collect();
        for (id, owner) in dead {
            let _ = self.unlist(owner, &id);
            Stats::bump(&self.ctx.stats.sessions_destroyed);
        }
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || {
            ctx.processes.prune_dead_groups();
            let reaped = reaper::reap_orphans(&ctx.processes);
            Stats::add(&ctx.stats.zombies_reaped, reaped);
        });
    }

    fn publish_count(&self) {
        Stats::set(&self.ctx.stats.sessions_active, self.sessions.len() as u64);
    }

    /// After a restart: rebuild the table from the sessions that are still alive.
    ///
    /// Every session is asked at once (so this takes at most
    /// [`timing::DESCRIBE`], however many there are). A live session is listed
    /// again; one that is ending is only awaited (it is already unlisted and
    /// counted). A session that does not describe itself in time is stuck: it
    /// is killed, and its Drop guard kills its processes.
    async fn recover(&mut self) {
        let sessions: Vec<ActorRef<SessionMsg>> = self
            .supervisor
            .get_children()
            .into_iter()
            .filter(|cell| cell.is_message_type_of::<SessionMsg>() == Some(true))
            .map(ActorRef::from)
            .collect();
        let described = futures::future::join_all(sessions.iter().map(describe)).await;
        for (actor, described) in sessions.into_iter().zip(described) {
            match described {
                Some(SessionDescription {
                    owner,
                    phase: SessionPhase::Live,
                    info,
                    ..
                }) => self.insert(info.session_id, SessionEntry { owner, actor }),
                Some(SessionDescription {
                    phase: SessionPhase::Ending,
                    ..
                }) => {
                    self.ending.insert(actor.get_id());
                }
                None => {
                    tracing::error!(actor = %actor.get_id(), "session did not describe itself to the new registry; killing it");
                    Stats::bump(&self.ctx.stats.sessions_destroyed);
                    actor.kill();
                }
            }
        }
        tracing::info!(
            sessions = self.sessions.len(),
            "registry recovered its table from live sessions"
        );
    }
}

/// Asks a session to describe itself, within [`timing::DESCRIBE`]; `None` when it does not.
async fn describe(session: &ActorRef<SessionMsg>) -> Option<SessionDescription> {
    ractor::call_t!(
        session,
        |reply| SessionMsg::Describe { reply },
        timing::DESCRIBE.as_millis() as u64
    )
    .ok()
}
