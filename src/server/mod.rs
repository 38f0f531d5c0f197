//! The daemon's front door and lifetime: socket binding, accepting connections, signals, graceful shutdown.

pub mod connection;
pub mod methods;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::actors::registry::RegistryMsg;
use crate::actors::tree::ActorTree;
use crate::cgroup::{Cgroups, OsRoots};
use crate::config::Config;
use crate::context::Context;
use crate::protocol::RequestError;
use crate::stats::Stats;
use crate::timing;

/// What a connection serves with: the shared state and the actor tree.
#[derive(Clone)]
pub struct Daemon {
    pub ctx: Arc<Context>,
    pub tree: ActorTree,
}

/// Why the daemon could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another sessiond is already serving on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start the actor tree: {0}")]
    Actors(String),
    #[error("cgroups: {0}")]
    Cgroups(String),
}

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained and stopped cleanly after SIGTERM/SIGINT.
    Graceful,
    /// A second signal cut the shutdown short (every child was still killed).
    Forced,
}

/// A bound listening socket and the path it owns.
pub struct BoundSocket {
    listener: StdUnixListener,
    path: PathBuf,
    inode: u64,
}

/// Binds the socket at `path` with `mode`, before any other thread exists
/// (the umask is process-wide). A stale socket from a dead daemon is
/// replaced; a live one is not.
///
/// 1. Create the parent directory (0700) when missing.
/// 2. If `path` exists: refuse when it is not a socket or a daemon answers on
///    it; otherwise it is stale: remove it.
/// 3. Bind under a umask that leaves exactly `mode`, so the socket is never
///    wider than `mode`, not even for an instant; then chmod to `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<BoundSocket, ServeError> {
    let io_err = |action, source| ServeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| io_err("create the directory of", e))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io_err("set the mode of the directory of", e))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::AlreadyRunning(path.to_path_buf())),
            Err(_) => {
                tracing::warn!(path = %path.display(), "removing stale socket of a daemon that is gone");
                std::fs::remove_file(path).map_err(|e| io_err("remove the stale socket", e))?;
            }
        }
    }
    let old = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = StdUnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| io_err("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("set the mode of", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("configure", e))?;
    let inode = std::fs::metadata(path)
        .map_err(|e| io_err("stat", e))?
        .ino();
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        inode,
    })
}

impl BoundSocket {
    /// Removes the socket file, if it is still ours (not replaced by another daemon).
    fn remove(&self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Runs the daemon on `socket` until SIGTERM/SIGINT, then shuts down:
///
/// 1. Drain: refuse new sessions and commands (`SHUTTING_DOWN`) while ping and
///    stats still answer; running commands get `shutdown_grace` to finish.
/// 2. Destroy every session; commands still running are killed and answer
///    `killed_by: "shutdown"`.
/// 3. Stop reading connections, flush the answers in flight, stop the actors.
/// 4. Kill every process group the daemon ever started that is still alive,
///    remove the socket file.
///
/// A second signal at any point skips to step 4 at once.
pub async fn run(config: Config, socket: BoundSocket) -> Result<Exit, ServeError> {
    // Handlers first: clients can connect from the moment the socket is bound,
    // and a SIGTERM from then on must drain, not kill (see `block_stop_signals`).
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| ServeError::Actors(e.to_string()))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| ServeError::Actors(e.to_string()))?;
    unblock_stop_signals();
    let mut ctx = Context::new(config);
    shield_from_oom(ctx.config.server.oom_score_adj);
    // The kernel isolation layer: set up our subtree, clean what a crashed daemon left.
    // (cgroup file I/O runs off the async workers, like all of it)
    let cgroups_config = ctx.config.cgroups.clone();
    let (cgroups, recovered) = tokio::task::spawn_blocking(move || {
        let cgroups = Cgroups::init(&cgroups_config, &OsRoots::default())?;
        let recovered = cgroups.as_ref().map_or(0, Cgroups::recover_stale);
        Ok::<_, crate::cgroup::CgroupError>((cgroups, recovered))
    })
    .await
    .map_err(|e| ServeError::Cgroups(e.to_string()))?
    .map_err(|e| ServeError::Cgroups(e.to_string()))?;
    if let Some(cgroups) = &cgroups {
        tracing::info!(
            mode = cgroups.mode_name(),
            "cgroups on: one cgroup per session"
        );
    }
    ctx.cgroups = cgroups.map(Arc::new);
    Stats::set(&ctx.stats.cgroups_recovered, recovered);
    ctx.subreaper = become_subreaper(ctx.config.sessions.subreaper);
    let ctx = Arc::new(ctx);
    if ctx.subreaper {
        tokio::spawn(reap_on_sigchld(ctx.clone()));
    }
    let tree = ActorTree::start(ctx.clone())
        .await
        .map_err(|e| ServeError::Actors(e.to_string()))?;
    let daemon = Daemon {
        ctx: ctx.clone(),
        tree: tree.clone(),
    };
    let listener =
        UnixListener::from_std(socket.listener.try_clone().map_err(|e| ServeError::Io {
            action: "use",
            path: socket.path.clone(),
            source: e,
        })?)
        .map_err(|e| ServeError::Io {
            action: "listen on",
            path: socket.path.clone(),
            source: e,
        })?;
    let (signal_tx, mut signals) = tokio::sync::mpsc::channel::<()>(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
            if signal_tx.send(()).await.is_err() {
                return;
            }
        }
    });

    tracing::info!(socket = %socket.path.display(), pid = std::process::id(), "sessiond serving");
    let stop_connections = CancellationToken::new();
    let connection_slots = Arc::new(Semaphore::new(ctx.config.server.max_connections));
    let accept = accept_loop(
        daemon,
        listener,
        connection_slots.clone(),
        stop_connections.clone(),
    );
    let accept_task = tokio::spawn(accept);

    let _ = signals.recv().await;
    tracing::info!("signal received: draining");
    ctx.start_draining();

    let forced = async {
        let _ = signals.recv().await;
        tracing::warn!("second signal: stopping at once");
    };
    let graceful = async {
        // 1. Let running commands finish.
        let grace_end = tokio::time::Instant::now() + ctx.config.server.shutdown_grace;
        while ctx.running_commands() > 0 && tokio::time::Instant::now() < grace_end {
            tokio::time::sleep(timing::DRAIN_POLL).await;
        }
        // 2. Destroy every session.
        tree.stopping();
        if let Some(registry) = tree.registry() {
            let deadline = ctx.config.commands.kill_grace + timing::SHUTDOWN_DESTROY_SLACK;
            let _ = ractor::call_t!(
                registry,
                |reply| RegistryMsg::Shutdown { reply },
                deadline.as_millis() as u64
            );
        }
        // 3. Flush and close connections, stop the actors.
        stop_connections.cancel();
        let max = ctx.config.server.max_connections as u32;
        let _ = tokio::time::timeout(
            timing::CONNECTIONS_FLUSH,
            connection_slots.acquire_many(max),
        )
        .await;
    };
    let exit = tokio::select! {
        _ = graceful => Exit::Graceful,
        _ = forced => Exit::Forced,
    };
    accept_task.abort();
    tree.stop().await;
    // 4. Whatever is left — nothing, after a graceful drain — dies with us.
    let left = ctx.processes.signal_all(Signal::SIGKILL);
    if left > 0 {
        tracing::warn!(groups = left, "killed process groups still alive at exit");
    }
    if let Some(cgroups) = ctx.cgroups.clone() {
        // Sessions ended cleanly remove their own cgroups; this catches a forced stop.
        let _ = tokio::task::spawn_blocking(move || cgroups.teardown()).await;
    }
    socket.remove();
    tracing::info!(?exit, "sessiond stopped");
    Ok(exit)
}

fn stop_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Called in `main` before the socket is bound: SIGTERM and SIGINT stay
/// pending (in every thread created later) until [`run`] has its handlers, so
/// a signal that arrives while the daemon starts drains it instead of killing
/// it with the default action.
pub fn block_stop_signals() {
    let _ = stop_signals().thread_block();
}

/// The thread that runs [`run`] takes the pending stop signals from here on.
fn unblock_stop_signals() {
    let _ = stop_signals().thread_unblock();
}

/// Sets the daemon's own oom_score_adj, so under memory pressure the kernel
/// kills a command (which start at `commands.oom_score_adj`) rather than us.
/// Lowering it needs CAP_SYS_RESOURCE; without it the inherited value stays.
fn shield_from_oom(score: i32) {
    match std::fs::write("/proc/self/oom_score_adj", score.to_string()) {
        Ok(()) => tracing::info!(oom_score_adj = score, "daemon OOM score set"),
        Err(e) => {
            tracing::warn!(oom_score_adj = score, error = %e, "cannot set the daemon's oom_score_adj; keeping the inherited one")
        }
    }
}

/// Becomes a child subreaper (`sessions.subreaper`, on by default; PID 1 is
/// one anyway): orphaned descendants of commands are then reparented to us
/// instead of init, and we reap them at once (see [`reap_on_sigchld`]). Off,
/// an orphan's zombie waits for init, which may reap slowly.
fn become_subreaper(wanted: bool) -> bool {
    if !wanted {
        return std::process::id() == 1;
    }
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => {
            tracing::info!("running as a child subreaper");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot become a child subreaper");
            false
        }
    }
}

/// As a subreaper, reaps orphaned zombies as soon as SIGCHLD says one may
/// exist (zombies hold their pid, and their cgroup's pids.max slot, until
/// reaped); the periodic sweep catches any signal that was coalesced.
async fn reap_on_sigchld(ctx: Arc<Context>) {
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        tracing::warn!("cannot listen for SIGCHLD; orphans are reaped by the periodic sweep only");
        return;
    };
    while sigchld.recv().await.is_some() {
        let table = ctx.processes.clone();
        if let Ok(reaped) =
            tokio::task::spawn_blocking(move || crate::process::reaper::reap_orphans(&table)).await
        {
            Stats::add(&ctx.stats.zombies_reaped, reaped);
        }
    }
}

/// Accepts connections: checks the peer's uid and the connection limit, then
/// serves each on its own task.
async fn accept_loop(
    daemon: Daemon,
    listener: UnixListener,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let own_uid = nix::unistd::getuid().as_raw();
    let ctx = daemon.ctx.clone();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(timing::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(_) => continue,
        };
        let allowed = if ctx.config.server.allowed_uids.is_empty() {
            uid == own_uid || uid == 0
        } else {
            ctx.config.server.allowed_uids.contains(&uid)
        };
        if !allowed {
            Stats::bump(&ctx.stats.connections_refused);
            tokio::spawn(connection::refuse(
                stream,
                RequestError::PermissionDenied(uid),
            ));
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            Stats::bump(&ctx.stats.connections_refused);
            let limit = ctx.config.server.max_connections as u64;
            tokio::spawn(connection::refuse(
                stream,
                RequestError::TooManyConnections { limit },
            ));
            continue;
        };
        Stats::bump(&ctx.stats.connections_total);
        let open = OpenConnection::new(ctx.clone(), slot);
        let (daemon, stop) = (daemon.clone(), stop.clone());
        tokio::spawn(async move {
            connection::serve(daemon, stream, uid, stop).await;
            drop(open);
        });
    }
}

/// Counts an open connection and holds its slot; released on drop, so even a
/// connection task that panics gives both back.
struct OpenConnection {
    ctx: Arc<Context>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(ctx: Arc<Context>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        Stats::bump(&ctx.stats.connections);
        OpenConnection { ctx, _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        Stats::drop_one(&self.ctx.stats.connections);
    }
}
