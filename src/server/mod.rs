//! The daemon's front door and lifetime: socket binding, accepting connections, signals, graceful shutdown.

pub mod connection;
pub mod methods;
pub mod systemd;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
use crate::isolation::{Isolation, IsolationMode};
use crate::process::reaper;
use crate::protocol::RequestError;
use crate::socket_dir::{SocketDir, SocketDirError};
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
    #[error(
        "{0} is a symlink; refusing to follow or replace it (remove it, or give the socket another path)"
    )]
    SymlinkAtSocket(PathBuf),
    #[error("{0}")]
    SocketDir(#[from] SocketDirError),
    #[error("isolation: {0}")]
    Isolation(#[from] crate::isolation::IsolationError),
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

/// A listening socket: bound by us (with the directory it is in and the
/// inode we own, removed at exit), or passed by systemd (whose file systemd
/// owns: never removed by us).
pub struct BoundSocket {
    listener: StdUnixListener,
    /// `None` for a socket systemd passed.
    owned: Option<(SocketDir, u64)>,
    path: PathBuf,
}

/// Binds the socket at `path` with `mode`, before any other thread exists
/// (the umask is process-wide). A stale socket from a dead daemon is
/// replaced; a live one is not.
///
/// 1. Create the parent directory (0700) when missing.
/// 2. Open the parent with `O_NOFOLLOW|O_DIRECTORY` and check it on the fd
///    ([`SocketDir`]): owned by us or root, not writable by group or others
///    unless sticky and ours, not a symlink. A directory that fails (the
///    default one included) is a start error saying what to fix.
/// 3. If the name exists in it: refuse a symlink (named, never followed)
///    and anything that is not a socket, and a socket a daemon answers on;
///    otherwise it is stale: remove it (by name in the open directory).
/// 4. Bind through `/proc/self/fd/N/NAME` (that very directory) under a
///    umask that leaves exactly `mode`, so the socket is never wider than
///    `mode`, not even for an instant, and no path-based chmod follows.
///    Then check the new entry: a socket, with `mode`, owned by us.
/// 5. With `group` (`server.socket_group`): hand the entry to that group
///    (through the directory fd, never following a link) and check it. Until
///    then it has our own group, which `allowed_uids` still guards.
///
/// Anything refused before step 4 leaves the path as it was: a second daemon
/// on the socket of a live one removes nothing and creates nothing.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<BoundSocket, ServeError> {
    let io_err = |action, source| ServeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && std::fs::symlink_metadata(parent).is_err() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| io_err("create the directory of", e))?;
        }
    }
    let euid = nix::unistd::geteuid().as_raw();
    let dir = SocketDir::open(path, euid)?;
    let errno_err = |action, errno: nix::errno::Errno| io_err(action, io::Error::from(errno));
    if let Some(st) = dir.stat_entry().map_err(|e| errno_err("stat", e))? {
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFLNK {
            return Err(ServeError::SymlinkAtSocket(path.to_path_buf()));
        }
        if kind != libc::S_IFSOCK {
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        match std::os::unix::net::UnixStream::connect(dir.fd_path()) {
            Ok(_) => return Err(ServeError::AlreadyRunning(path.to_path_buf())),
            Err(_) => {
                tracing::warn!(path = %path.display(), "removing stale socket of a daemon that is gone");
                nix::unistd::unlinkat(
                    dir.fd(),
                    dir.name(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|e| errno_err("remove the stale socket", e))?;
            }
        }
    }
    let old = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = StdUnixListener::bind(dir.fd_path());
    umask(old);
    let listener = bound.map_err(|e| io_err("bind", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("configure", e))?;
    let st = dir
        .stat_entry()
        .map_err(|e| errno_err("stat", e))?
        .ok_or_else(|| io_err("stat", io::ErrorKind::NotFound.into()))?;
    let bound = BoundSocket {
        listener,
        path: path.to_path_buf(),
        owned: Some((dir, st.st_ino)),
    };
    let Some((dir, _)) = &bound.owned else {
        unreachable!("just set")
    };
    // From here on a failure removes the socket we made (`bound` is dropped
    // after `remove`), leaving nothing behind.
    let fail = |e: ServeError| {
        bound.remove();
        Err(e)
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK
        || st.st_mode & 0o7777 != mode
        || st.st_uid != euid
    {
        return fail(io_err(
            "check",
            io::Error::other(format!(
                "the new socket has mode {:04o} and owner {} instead of {mode:04o} and {euid}",
                st.st_mode & 0o7777,
                st.st_uid
            )),
        ));
    }
    if let Some(gid) = group {
        if let Err(e) = nix::unistd::fchownat(
            dir.fd(),
            dir.name(),
            None,
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            return fail(errno_err("give server.socket_group ownership of", e));
        }
        match dir.stat_entry() {
            Ok(Some(now)) if now.st_gid == gid && now.st_ino == st.st_ino => {}
            _ => {
                return fail(io_err(
                    "check",
                    io::Error::other(format!("the socket is not owned by group {gid}")),
                ));
            }
        }
    }
    Ok(bound)
}

impl BoundSocket {
    /// A listening socket systemd passed (socket activation); `path` is for
    /// the logs only. The file stays at exit: it is systemd's.
    pub fn activated(listener: StdUnixListener, path: PathBuf) -> BoundSocket {
        BoundSocket {
            listener,
            owned: None,
            path,
        }
    }

    /// Removes the socket file, if we made it and it is still ours (not
    /// replaced by another daemon). A socket systemd passed is left to it.
    /// Also on drop: a start that fails after binding (the cgroup layer
    /// refuses, the actors do not start) leaves no socket file behind.
    fn remove(&self) {
        let Some((dir, inode)) = &self.owned else {
            return;
        };
        if dir
            .stat_entry()
            .is_ok_and(|st| st.is_some_and(|st| st.st_ino == *inode))
        {
            let _ = nix::unistd::unlinkat(
                dir.fd(),
                dir.name(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// What a SIGHUP needs to reload: where the configuration came from and how
/// to change the log filter.
#[derive(Default)]
pub struct Reloading {
    /// The `--config` file (`None`: the embedded defaults).
    pub config_path: Option<PathBuf>,
    /// `--socket`, which overrides the file's `server.socket`.
    pub socket_override: Option<PathBuf>,
    /// Puts a new log filter in force (`tracing_subscriber`'s reload layer).
    #[allow(clippy::type_complexity)]
    pub set_log_filter: Option<Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>>,
}

/// Runs the daemon on `socket` until SIGTERM/SIGINT, then shuts down:
///
/// 1. Drain: refuse new sessions and commands (`SHUTTING_DOWN`) while ping and
///    stats still answer; running commands get `shutdown_grace` to finish.
/// 2. Destroy every session; commands still running are killed and answer
///    `killed_by: "shutdown"`.
/// 3. Stop reading connections, flush the answers in flight, stop the actors.
/// 4. Kill every process group the daemon ever started that is still alive,
///    remove the socket file (unless systemd passed it).
///
/// A second signal at any point skips to step 4 at once. SIGHUP reloads the
/// configuration ([`reload`]). Under systemd (`NOTIFY_SOCKET`) it says
/// `READY=1` once connections are accepted, `STOPPING=1` when it drains, and
/// `WATCHDOG=1` at half of `WatchdogSec=` while the runtime is alive.
pub async fn run(
    config: Config,
    socket: BoundSocket,
    reloading: Reloading,
) -> Result<Exit, ServeError> {
    // Handlers first: clients can connect from the moment the socket is bound,
    // and a SIGTERM from then on must drain, not kill (see `block_stop_signals`).
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| ServeError::Actors(e.to_string()))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| ServeError::Actors(e.to_string()))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| ServeError::Actors(e.to_string()))?;
    unblock_stop_signals();
    // (An early return drops `socket`, which removes its file.)
    let metrics = bind_metrics(&config)?;
    let mut ctx = Context::new(config);
    shield_from_oom(ctx.config.server.oom_score_adj);
    // uid-per-session: lock the state directory, then kill and remove what the
    // sessions of a dead daemon left under their uids, before any session starts.
    if ctx.config.commands.isolation == IsolationMode::UidPerSession {
        let c = &ctx.config.commands;
        let (range, state_dir, private_tmp) = (c.uid_range, c.state_dir.clone(), c.private_tmp);
        let isolation = tokio::task::spawn_blocking(move || {
            let isolation = Isolation::init(range, &state_dir, private_tmp)?;
            let recovered = isolation.recover();
            Ok::<_, crate::isolation::IsolationError>((isolation, recovered))
        })
        .await
        .map_err(|e| ServeError::Actors(e.to_string()))?;
        let (isolation, recovered) = isolation?;
        if recovered.uids > 0 {
            tracing::warn!(
                uids = recovered.uids,
                processes = recovered.processes,
                "recovered the uids of a dead daemon's sessions: processes killed, homes removed"
            );
        }
        tracing::info!(uid_range = %range, "isolation: a uid of its own per session");
        ctx.isolation = Some(Arc::new(isolation));
    }
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
    // From here on the cgroups (and isolation) are set up: a failed start
    // releases them as a stop does, rather than leaving them to the next start.
    let started = async {
        #[cfg(feature = "fault-injection")]
        if crate::fault::start_fails() {
            return Err(ServeError::Actors(format!(
                "{} is set: failing the start after the cgroup setup",
                crate::fault::FAIL_START_ENV
            )));
        }
        let tree = ActorTree::start(ctx.clone())
            .await
            .map_err(|e| ServeError::Actors(e.to_string()))?;
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
        Ok((tree, listener))
    }
    .await;
    let (tree, listener) = match started {
        Ok(started) => started,
        Err(e) => {
            release_kernel_layers(&ctx).await;
            return Err(e);
        }
    };
    let daemon = Daemon {
        ctx: ctx.clone(),
        tree: tree.clone(),
    };
    if let Some(listener) = metrics {
        let addr = listener.local_addr().ok();
        tracing::info!(listen = ?addr, "metrics: GET /metrics in the Prometheus text format");
        let stats_ctx = ctx.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::new(move || methods::system::stats(&stats_ctx)),
        ));
    }
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                reload(&ctx, &reloading);
            }
        });
    }
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
    systemd::notify("READY=1");
    if let Some(every) = systemd::watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                systemd::notify("WATCHDOG=1");
            }
        });
    }

    let _ = signals.recv().await;
    tracing::info!("signal received: draining");
    systemd::notify("STOPPING=1");
    ctx.start_draining();

    let forced = async {
        let _ = signals.recv().await;
        tracing::warn!("second signal: stopping at once");
    };
    let graceful = async {
        // 1. Let running commands finish.
        let grace_end = tokio::time::Instant::now() + ctx.live().server.shutdown_grace;
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
    release_kernel_layers(&ctx).await;
    socket.remove();
    tracing::info!(?exit, "sessiond stopped");
    Ok(exit)
}

/// Binds `[metrics] listen` (before anything else starts, so a taken port
/// is a start error); `None` when it is off.
fn bind_metrics(config: &Config) -> Result<Option<tokio::net::TcpListener>, ServeError> {
    let listen = &config.metrics.listen;
    if listen.is_empty() {
        return Ok(None);
    }
    let io_err = |action, source| ServeError::Io {
        action,
        path: PathBuf::from(listen),
        source,
    };
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| io_err("listen for metrics on", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("configure", e))?;
    tokio::net::TcpListener::from_std(listener)
        .map(Some)
        .map_err(|e| io_err("listen for metrics on", e))
}

/// SIGHUP: reads the configuration again and puts in force what may change
/// while running ([`Config::reloaded`]); logs each key that changed and each
/// that differs in the file but waits for a restart. A file that cannot be
/// read or is refused changes nothing: the error is logged, the daemon
/// serves on with the configuration it has.
fn reload(ctx: &Context, reloading: &Reloading) {
    let path = reloading.config_path.as_deref();
    let file = match Config::load(path) {
        Ok(mut file) => {
            if reloading.socket_override.is_some() {
                file.server.socket.clone_from(&reloading.socket_override);
            }
            file
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration refused; keeping the running one");
            return;
        }
    };
    let running = ctx.live();
    let next = running.reloaded(&file);
    if let Err(e) = next.config.validate() {
        tracing::error!(error = %e, "SIGHUP: configuration refused; keeping the running one");
        return;
    }
    if next.changed.iter().any(|k| k == "server.log_level") {
        if let Some(set) = &reloading.set_log_filter {
            let filter = log_filter(&next.config.server.log_level);
            if let Err(e) = set(&filter) {
                tracing::error!(error = %e, filter, "SIGHUP: cannot change the log filter");
            }
        }
    }
    for key in &next.ignored {
        tracing::warn!(
            key,
            "SIGHUP: changed in the file but never reloaded; kept until a restart"
        );
    }
    let (changed, ignored) = (next.changed, next.ignored);
    ctx.set_live(next.config);
    // After the swap: whoever reads this line finds the new config in force.
    tracing::info!(
        config = %path.map_or_else(|| "(embedded defaults)".into(), |p| p.display().to_string()),
        changed = ?changed,
        ignored = ?ignored,
        "SIGHUP: configuration reloaded; new sessions and commands use it, running sessions keep theirs"
    );
}

/// The log filter for `server.log_level`: itself, else `RUST_LOG`, else `info`.
pub fn log_filter(level: &str) -> String {
    if !level.is_empty() {
        return level.to_string();
    }
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "info".to_string())
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
    let written = std::fs::write("/proc/self/oom_score_adj", score.to_string());
    // What the kernel kept, read back: the value really in force.
    let kept = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match (written, kept) {
        (Ok(()), Some(kept)) if kept == score => {
            tracing::info!(oom_score_adj = kept, "daemon OOM score set")
        }
        (written, kept) => tracing::warn!(
            asked = score,
            kept = ?kept,
            error = ?written.err().map(|e| e.to_string()),
            "cannot set the daemon's oom_score_adj to the configured value; it stays at `kept`"
        ),
    }
}

/// Raises the daemon's soft limit of open files to its hard limit. The
/// daemon's own files grow with what it hosts — per connection a socket,
/// per running command its pipes and pidfd, per session on cgroup v1 two
/// command leaves of 8 open files each (1 024 at the default 64 sessions) —
/// and the soft limit a service inherits is often 1 024. Commands get
/// `rlimits.nofile`, set in each spawn, whatever the daemon's own is.
/// Called before the socket is bound.
pub fn raise_open_files() {
    let (soft, hard) = crate::limits::current(libc::RLIMIT_NOFILE);
    if soft >= hard {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass; nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::info!(
            from = soft,
            to = hard,
            "daemon's open-file limit raised to its hard limit"
        );
    } else {
        tracing::warn!(soft, hard, error = %std::io::Error::last_os_error(), "cannot raise the daemon's open-file limit");
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

/// At the end (a stop, or a start that failed after the setup): removes our
/// cgroup subtree and restores our own cgroup, frees the session uids.
async fn release_kernel_layers(ctx: &Context) {
    if let Some(cgroups) = ctx.cgroups.clone() {
        // Sessions ended cleanly remove their own cgroups; this catches a forced stop.
        let _ = tokio::task::spawn_blocking(move || cgroups.teardown()).await;
    }
    if let Some(isolation) = ctx.isolation.clone() {
        // Sessions that ended cleanly freed their uids; this catches a forced stop.
        let _ = tokio::task::spawn_blocking(move || isolation.release_all()).await;
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
        // One read of our own /proc entry: done here, without a hop to the
        // blocking pool (every command's exit comes here).
        let reaped = match reaper::reap_adopted(&ctx.processes) {
            Some(reaped) => reaped,
            None => {
                let table = ctx.processes.clone();
                tokio::task::spawn_blocking(move || reaper::reap_orphans(&table))
                    .await
                    .unwrap_or(0)
            }
        };
        Stats::add(&ctx.stats.zombies_reaped, reaped);
    }
}

/// Accepts connections: checks the peer's uid, its uid's share of the
/// connections and the connection limit, then serves each on its own task.
/// Checking the share first means one uid at its share is refused before it
/// can take one of the last global slots from the others.
async fn accept_loop(
    daemon: Daemon,
    listener: UnixListener,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let own_uid = nix::unistd::getuid().as_raw();
    let ctx = daemon.ctx.clone();
    let open_by_uid = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
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
                None,
            ));
            continue;
        }
        let held = open_by_uid
            .lock()
            .map_or(0, |m| m.get(&uid).copied().unwrap_or(0));
        // Read per connection: a SIGHUP may have changed it.
        let per_client = ctx.live().server.connections_per_client();
        let refusal = if held >= per_client {
            Some(RequestError::ClientConnectionLimit {
                limit: per_client as u64,
            })
        } else {
            None
        };
        let slot =
            match refusal {
                Some(refusal) => Err(refusal),
                None => slots.clone().try_acquire_owned().map_err(|_| {
                    RequestError::TooManyConnections {
                        limit: ctx.config.server.max_connections as u64,
                    }
                }),
            };
        let slot = match slot {
            Ok(slot) => slot,
            Err(refusal) => {
                Stats::bump(&ctx.stats.connections_refused);
                // An allowed uid: its pings are still answered while the refusal lingers.
                tokio::spawn(connection::refuse(stream, refusal, Some(ctx.clone())));
                continue;
            }
        };
        Stats::bump(&ctx.stats.connections_total);
        let open = OpenConnection::new(ctx.clone(), slot, uid, open_by_uid.clone());
        let (daemon, stop) = (daemon.clone(), stop.clone());
        tokio::spawn(async move {
            connection::serve(daemon, stream, uid, stop).await;
            drop(open);
        });
    }
}

/// Open connections per client uid (only uids with at least one).
type OpenByUid = Arc<Mutex<HashMap<u32, usize>>>;

/// Counts an open connection (in the stats and its uid's share) and holds
/// its slot; released on drop, so even a connection task that panics gives
/// all back.
struct OpenConnection {
    ctx: Arc<Context>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    uid: u32,
    open_by_uid: OpenByUid,
}

impl OpenConnection {
    fn new(
        ctx: Arc<Context>,
        slot: tokio::sync::OwnedSemaphorePermit,
        uid: u32,
        open_by_uid: OpenByUid,
    ) -> Self {
        Stats::bump(&ctx.stats.connections);
        if let Ok(mut m) = open_by_uid.lock() {
            *m.entry(uid).or_default() += 1;
        }
        OpenConnection {
            ctx,
            _slot: slot,
            uid,
            open_by_uid,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        Stats::drop_one(&self.ctx.stats.connections);
        if let Ok(mut m) = self.open_by_uid.lock() {
            if let Some(n) = m.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.uid);
                }
            }
        }
    }
}
