//! Runs one command to its end: spawn, feed stdin, capture capped output, with [`super::kill`] enforcing the timeout and kill requests.
//!
//! This is where "done" is decided: the shell process exited (its timeout
//! and kills are in [`super::kill::supervise`]). Background children that keep
//! the pipes open get [`DRAIN_AFTER_EXIT`] more, then the pipes go to the
//! session's [`super::background`] drains (docs/design-notes.md, "Ending a
//! command": EOF waited for `sleep 2 &`).

use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;

use super::child::ExitInfo;
use super::kill::{self, KillReason};
use super::live_output::{LiveOutput, Stream};
use super::pty::{Pty, PtyError, PtySize};
use super::shell::{self, EnvMap};
use super::simple_command;
use super::spawn::{self, Credentials, SpawnError, SpawnRequest};
use super::table::{ProcessTable, SessionKey};
use super::terminal::{self, StateError, TerminalState};
use crate::cgroup::{CgroupError, CommandLeaf, SessionLeaves};
use crate::limits::Rlimit;
use std::os::fd::AsRawFd;

/// How long output is still read after the shell exited, for what it wrote
/// last; a background child holding the pipe open does not hold the answer.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

/// Size of each read from a pipe.
const READ_CHUNK: usize = 64 * 1024;

/// Everything needed to run one command.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub shell: PathBuf,
    pub command: String,
    /// The session's terminal state before this command (its cwd included).
    pub state: Arc<TerminalState>,
    /// The request's own `env`: exported for this command only.
    pub request_env: EnvMap,
    /// `sessions.max_state_bytes`: a larger saved state is refused (`state_error`).
    pub max_state_bytes: usize,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    /// Kill the command when it writes nothing for this long.
    pub idle_timeout: Option<Duration>,
    pub kill_grace: Duration,
    /// Where its output goes (and its stdin comes from, when kept open).
    pub output: Arc<LiveOutput>,
    /// setrlimit values for the command's processes.
    pub rlimits: [Rlimit; 5],
    /// oom_score_adj of the command's processes.
    pub oom_score_adj: i32,
    /// The identity to run as, when not the daemon's.
    pub credentials: Option<Credentials>,
    /// The session's command leaves, of which the command takes one of its own.
    pub cgroup: Option<Arc<SessionLeaves>>,
    /// Run on a pseudo-terminal of this size (`output` then made with stdin open).
    pub pty: Option<PtySize>,
}

/// A finished command, as the process layer saw it (the CommandActor turns
/// it into the wire's answer).
#[derive(Debug)]
pub struct RunReport {
    /// How the shell ended, its CPU time and rusage peak.
    pub exit: ExitInfo,
    /// Why the daemon or a limit ended it, if one did.
    pub killed_by: Option<KillReason>,
    /// Wall time from spawn to the shell's exit (and the output drained).
    pub duration: Duration,
    /// Peak memory: the command's cgroup leaf's where the kernel reports it
    /// (at most the session's `memory_max`), else the shell's own peak RSS.
    pub max_rss_bytes: u64,
    /// Forks the session's pids limit refused while the command ran (`None`
    /// without cgroups).
    pub pids_limit_hits: Option<u64>,
    /// The working directory after the command (the session's when it left no state).
    pub cwd: PathBuf,
    /// The terminal state it left, when it ended by itself.
    pub state: Option<Box<TerminalState>>,
    /// Why the state it left was not kept (the session keeps its previous one).
    pub state_error: Option<String>,
}

/// Why a command could not be run to an answer.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    #[error("working directory {0} does not exist or is not a directory")]
    CwdGone(PathBuf),
    #[error("{0}")]
    BadCommand(String),
    #[error("waiting for the command failed: {0}")]
    Wait(std::io::Error),
    #[error("cannot set up the command's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Pty(#[from] PtyError),
}

/// Runs `spec` in a group of `session`. `kill` carries a kill request
/// (cancel, session destroyed, shutdown); `spawned` is called once the
/// command runs. Its output goes to `spec.output` as it comes, and the
/// output is cut to what the result keeps when the command has ended.
pub async fn run_command(
    table: &Arc<ProcessTable>,
    session: SessionKey,
    spec: RunSpec,
    mut kill: watch::Receiver<Option<KillReason>>,
    on_spawned: impl FnOnce(),
) -> Result<RunReport, RunError> {
    let argv = shell::wrapper_argv(&spec.shell, &spec.command).map_err(RunError::BadCommand)?;
    // The state goes in and out through two memfds (not argv: E2BIG past 128 KiB).
    let nonce = terminal::nonce();
    let bash = shell::is_bash(&spec.shell);
    let (restore, env, keeps_state, bare) = if bash {
        let defaults = terminal::ShellDefaults::of(&spec.shell).await;
        let keeps_state = defaults.as_deref().is_some_and(|d| {
            simple_command::keeps_state(&spec.command, &spec.state, &spec.request_env, d)
        });
        // Exported variables of the state come in the environment where bash
        // takes them as from an assignment, the request's `env` over them;
        // the script restores the rest.
        let mut env = terminal::exec_env(&spec.state, &spec.request_env, defaults.as_deref());
        env.extend(spec.request_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let restore =
            terminal::restore(&spec.state, &nonce, &env, defaults.as_deref(), !keeps_state);
        let bare = match restore.bare.filter(|_| keeps_state) {
            Some(b) => BareStart::new(&spec, &env, b)?,
            None => None,
        };
        env.insert(
            b"BASH_ENV".to_vec(),
            format!("/dev/fd/{}", terminal::RESTORE_FD).into_bytes(),
        );
        (restore.script, env, keeps_state, bare)
    } else {
        let mut env = spec.state.env();
        env.extend(spec.request_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        (
            shell::sh_restore_script(&spec.state, &nonce, &spec.request_env),
            env,
            false,
            None,
        )
    };
    let save_code = if bash && !keeps_state {
        Some(state_memfd(&terminal::save_code(&nonce))?)
    } else {
        None
    };
    let save = if keeps_state {
        None
    } else {
        Some(state_memfd(b"")?)
    };
    let cwd = std::ffi::CString::new(spec.state.cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| RunError::BadCommand("cwd holds a NUL byte".into()))?;
    let (at_restore, at_save) = if bash {
        (terminal::RESTORE_FD, terminal::SAVE_FD)
    } else {
        (shell::SH_RESTORE_FD, shell::SH_SAVE_FD)
    };
    let save_at = [
        save.as_ref()
            .map_or((-1, -1), |fd| (fd.as_raw_fd(), at_save)),
        save_code
            .as_ref()
            .map_or((-1, -1), |fd| (fd.as_raw_fd(), terminal::SAVE_CODE_FD)),
    ];
    let with_stdin = spec.stdin.is_some() || spec.output.stdin_open();
    let (spawn_table, cwd_path) = (table.clone(), spec.state.cwd.clone());
    let (rlimits, credentials, place) = (spec.rlimits, spec.credentials, spec.cgroup.clone());
    let pty_size = spec.pty;
    let oom_score_adj = std::ffi::CString::new(spec.oom_score_adj.to_string()).expect("digits");

    let started = Instant::now();
    // Off the async workers: a cwd on a stalled mount must hang this spawn
    // only, never the runtime (stat and chdir can block indefinitely).
    let spawned = tokio::task::spawn_blocking(move || {
        if !cwd_path.is_dir() {
            return Err(RunError::CwdGone(cwd_path));
        }
        #[cfg(feature = "fault-injection")]
        if crate::fault::take_spawn_failure() {
            return Err(RunError::Spawn(SpawnError::Child {
                program: argv[0].to_string_lossy().into_owned(),
                cwd: cwd_path.display().to_string(),
                step: spawn::ChildStep::Exec,
                errno: nix::errno::Errno::EAGAIN,
            }));
        }
        // The command's own leaf, made ahead by the session with its
        // cgroup.procs files open for the child to join. On any error below,
        // dropping the leaf removes it.
        let leaf = place.as_ref().map(SessionLeaves::take).transpose()?;
        let procs: Vec<i32> = leaf.as_ref().map(CommandLeaf::procs).unwrap_or_default();
        let pty = pty_size
            .map(|size| Pty::open(size, credentials.map(|c| (c.uid, c.gid))))
            .transpose()?;
        // Bare when OLDPWD, if carried, still names a directory (checked
        // here, off the async workers, like the cwd); else with the restore.
        let bare = bare.filter(BareStart::oldpwd_holds);
        let restore = match bare {
            Some(_) => None,
            None => Some(state_memfd(&restore)?),
        };
        let with_restore;
        let (argv, envp) = match &bare {
            Some(b) => (&b.argv, &b.envp),
            None => {
                with_restore = shell::envp(&env, &cwd_path);
                (&argv, &with_restore)
            }
        };
        let restore_at = restore
            .as_ref()
            .map_or((-1, -1), |fd| (fd.as_raw_fd(), at_restore));
        let request = SpawnRequest {
            program: &argv[0],
            argv,
            envp,
            cwd: &cwd,
            with_stdin,
            terminal: pty.as_ref().map(|p| p.slave.as_raw_fd()),
            rlimits: &rlimits,
            oom_score_adj: Some(&oom_score_adj),
            credentials,
            cgroup_procs: &procs,
            state_fds: [restore_at, save_at[0], save_at[1]],
        };
        let (child, pipes) = spawn::spawn(&spawn_table, session, &request)?;
        // The slave closes here: the daemon holds only the master.
        Ok((child, pipes, leaf, pty.map(|p| p.master)))
    })
    .await
    .map_err(|e| RunError::Wait(std::io::Error::other(e)))?;
    let (mut child, mut pipes, mut leaf, master) = spawned?;
    let output = spec.output.clone();
    let terminal = master.is_some();
    let (mut stdout_rx, mut stderr_rx) = match master {
        // One open file, three fds: read here, keystrokes and resizes
        // through `output` (each close-on-exec, each closed by the end).
        Some(master) => {
            let dup = || master.try_clone().map_err(RunError::Wait);
            let keys = pipe::Sender::from_owned_fd_unchecked(dup()?).map_err(RunError::Wait)?;
            output.install_terminal(keys, dup()?);
            let rx = pipe::Receiver::from_owned_fd_unchecked(master).map_err(RunError::Wait)?;
            (rx, None)
        }
        None => {
            if output.stdin_open() {
                if let Some(fd) = pipes.stdin.take() {
                    output.install_stdin(pipe::Sender::from_owned_fd(fd).map_err(RunError::Wait)?);
                }
            }
            let receiver = |fd: Option<std::os::fd::OwnedFd>| {
                pipe::Receiver::from_owned_fd(fd.expect("pipes without a terminal"))
                    .map_err(RunError::Wait)
            };
            (receiver(pipes.stdout)?, Some(receiver(pipes.stderr)?))
        }
    };
    on_spawned();

    let (stdout_eof, stderr_eof) = (AtomicBool::new(false), AtomicBool::new(false));
    let (exit, killed_by, io_done) = {
        let io = async {
            tokio::join!(
                pump(&mut stdout_rx, &stdout_eof, |b| output
                    .push(Stream::Stdout, b)),
                async {
                    match stderr_rx.as_mut() {
                        Some(rx) => pump(rx, &stderr_eof, |b| output.push(Stream::Stderr, b)).await,
                        // A terminal has one output stream: stdout.
                        None => stderr_eof.store(true, Ordering::Relaxed),
                    }
                },
                feed(pipes.stdin, spec.stdin.as_deref(), &output),
            )
        };
        tokio::pin!(io);
        let idle = spec.idle_timeout.map(|after| (after, &*output));
        let ended = kill::supervise(
            &mut child,
            leaf.as_ref().map(CommandLeaf::node),
            spec.timeout,
            idle,
            spec.kill_grace,
            &mut kill,
        );
        tokio::pin!(ended);
        let mut io_done = false;
        let ended = loop {
            tokio::select! {
                r = &mut ended => break r,
                _ = &mut io, if !io_done => io_done = true,
            }
        };
        if !io_done {
            io_done = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut io)
                .await
                .is_ok();
        }
        let (exit, killed_by) = ended.map_err(RunError::Wait)?;
        (exit, killed_by, io_done)
    };
    let duration = started.elapsed();
    // Cut to what the result keeps; readers and the result read it from there.
    output.end();
    if terminal {
        // A terminal ends with its command, as a login's does: every fd of
        // the master is closed now (hangup: SIGHUP to whoever still holds the
        // slave), and the command's process group is killed. The group's id
        // is the shell's pid, which the kernel does not hand out again while
        // any process still belongs to that group.
        drop(stdout_rx);
        child.signal_group(nix::sys::signal::Signal::SIGKILL);
    } else if !io_done {
        // Background children still hold the pipes. Closing our ends would kill
        // them with SIGPIPE at their next write, so the session keeps reading
        // and discarding, within its drain rate, until they exit or it ends.
        let open = [
            Some((stdout_rx, stdout_eof.load(Ordering::Relaxed))),
            stderr_rx.map(|rx| (rx, stderr_eof.load(Ordering::Relaxed))),
        ];
        table.background().adopt(
            session,
            open.into_iter().flatten().filter(|p| !p.1).map(|p| p.0),
        );
    }
    // What the kernel says of the command's leaf (from files open since the
    // leaf was made); it is given back below.
    let reading = leaf.as_mut().map(CommandLeaf::finish);
    let oom_kills = reading.map_or(0, |r| r.oom_kills);
    let killed_by = killed_by.or_else(|| kill::attribute(&exit, oom_kills, &spec.rlimits));

    // Only a command that ended by itself leaves a state; a killed one keeps the old.
    let saved = match (killed_by, exit.code, &save) {
        (None, Some(code), None) => Ok(Some(TerminalState {
            status: code as u8,
            ..(*spec.state).clone()
        })),
        (None, Some(_), Some(save)) => read_saved(save, spec.max_state_bytes, &nonce, bash),
        _ => Ok(None),
    };
    let (state, state_error) = match saved {
        Ok(state) => (state.map(Box::new), None),
        Err(e) => (None, Some(e.to_string())),
    };
    // The saved state's pages were charged to the leaf by the shell that
    // wrote them: freed first, so they are not in the usage the leaf's next
    // command's peak is counted from. Then the leaf is given back to the session (used again, or
    // removed unless background processes still live in it); neither the
    // cgroup writes nor rmdir need delay the answer.
    drop(save);
    if let Some(leaf) = leaf {
        tokio::task::spawn_blocking(move || leaf.release());
    }
    let cwd = state.as_ref().map_or(&spec.state.cwd, |s| &s.cwd).clone();
    Ok(RunReport {
        exit,
        killed_by,
        duration,
        max_rss_bytes: reading
            .and_then(|r| r.memory_peak)
            .unwrap_or(exit.max_rss_bytes),
        pids_limit_hits: reading.map(|r| r.pids_limit_hits),
        cwd,
        state,
        state_error,
    })
}

/// How a command that keeps the state starts when nothing of the state it
/// could see needs the restore (see [`terminal::Restore::bare`]): no
/// `BASH_ENV`, and its `-c` string after the empty EXIT trap. This saves
/// bash reading a restore file, ≈ 100 µs of `exec.run true`
/// (docs/benchmarks.md).
struct BareStart {
    argv: Vec<std::ffi::CString>,
    envp: Vec<std::ffi::CString>,
    oldpwd: Option<PathBuf>,
}

impl BareStart {
    fn new(
        spec: &RunSpec,
        env: &EnvMap,
        bare: terminal::Bare,
    ) -> Result<Option<BareStart>, RunError> {
        // The daemon can check that OLDPWD is a directory only as itself:
        // the shell of another identity might not reach it any more.
        if bare.oldpwd.is_some() && spec.credentials.is_some() {
            return Ok(None);
        }
        let Some(command) = terminal::bare_command(&spec.command) else {
            return Ok(None);
        };
        let argv = shell::wrapper_argv(&spec.shell, &command).map_err(RunError::BadCommand)?;
        // The environment has no OLDPWD of its own (it never comes there but
        // here, and a request `env` makes a command not plain).
        let mut envp = shell::envp(env, &spec.state.cwd);
        if let Some(oldpwd) = &bare.oldpwd {
            envp.extend(std::ffi::CString::new(
                [b"OLDPWD=", oldpwd.as_slice()].concat(),
            ));
        }
        let oldpwd = bare
            .oldpwd
            .map(|p| PathBuf::from(std::ffi::OsString::from_vec(p)));
        Ok(Some(BareStart { argv, envp, oldpwd }))
    }

    /// Whether bash keeps the carried OLDPWD from its environment: it
    /// drops one that names no directory, where the restore would set it.
    fn oldpwd_holds(&self) -> bool {
        self.oldpwd.as_ref().is_none_or(|p| p.is_dir())
    }
}

/// A close-on-exec memfd holding `data`, read from the start by the child.
fn state_memfd(data: &[u8]) -> Result<std::os::fd::OwnedFd, RunError> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: a valid NUL-terminated name; the returned fd is checked and then owned.
    let fd = unsafe { libc::memfd_create(c"sessiond-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(RunError::Wait(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh fd that nothing else owns.
    let fresh = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // Above every fd number the child moves fds to (0-2, the state fds at
    // 8/9 or 61-63): a memfd that happened to sit at 62 would be overwritten
    // by the child's dup2 of the other one onto 62 before it was moved to
    // 63, and the save would land in the restore memfd — the state silently
    // not carried. (A daemon with more than 60 fds open hit it in the soak.)
    // SAFETY: fcntl on an fd we own; the result is checked and then owned.
    let high = unsafe { libc::fcntl(fresh.as_raw_fd(), libc::F_DUPFD_CLOEXEC, STATE_FD_FLOOR) };
    if high < 0 {
        return Err(RunError::Wait(std::io::Error::last_os_error()));
    }
    drop(fresh);
    // SAFETY: `high` is a fresh fd that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(high) };
    file.write_all(data).map_err(RunError::Wait)?;
    file.rewind().map_err(RunError::Wait)?;
    Ok(file.into())
}

/// The lowest fd number a state memfd may have in the daemon: above every
/// fd number the spawn child moves fds to.
const STATE_FD_FLOOR: i32 = 64;

/// Reads and parses what the save trap wrote to its memfd, bounded by `limit`.
fn read_saved(
    fd: &std::os::fd::OwnedFd,
    limit: usize,
    nonce: &str,
    bash: bool,
) -> Result<Option<TerminalState>, StateError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone().map_err(|_| StateError::Malformed("memfd"))?);
    let size = file.metadata().map_or(0, |m| m.len() as usize);
    if size > limit {
        return Err(StateError::TooLarge { size, limit });
    }
    let mut report = vec![0u8; size];
    file.read_exact_at(&mut report, 0)
        .map_err(|_| StateError::Malformed("memfd"))?;
    if bash {
        terminal::parse_save(&report, nonce)
    } else {
        shell::parse_sh_save(&report, nonce)
    }
}

/// Reads a pipe (or a terminal's master) to EOF into `out`, which keeps what its cap allows and
/// counts the rest; sets `eof` when the pipe reached it.
async fn pump(rx: &mut pipe::Receiver, eof: &AtomicBool, mut out: impl FnMut(&[u8])) {
    // Uninitialised capacity, filled by `read_buf`: a command that prints
    // little touches one page of it, not 64 KiB zeroed three times per
    // command (memset and page faults were the top user-space cost in a
    // profile of `exec.run true`).
    let mut buf = bytes::BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.clear();
        match rx.read_buf(&mut buf).await {
            Ok(0) => return eof.store(true, Ordering::Relaxed),
            Ok(_) => out(&buf),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A pseudo-terminal's master reads EIO once every slave fd is closed: its EOF.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                return eof.store(true, Ordering::Relaxed);
            }
            Err(_) => return,
        }
    }
}

/// Writes the request's stdin: to a pipe of its own that is then closed so
/// the command sees EOF, or (`stdin_open`, the pipe already kept by `output`)
/// ahead of any `exec.write`. A command that exits without reading makes the
/// write fail with EPIPE, which is fine.
async fn feed(fd: Option<std::os::fd::OwnedFd>, data: Option<&[u8]>, output: &LiveOutput) {
    let data = data.unwrap_or_default();
    match fd {
        Some(fd) => {
            if let Ok(mut tx) = pipe::Sender::from_owned_fd(fd) {
                let _ = tx.write_all(data).await;
            }
        }
        None if !data.is_empty() => output.feed_initial(data).await,
        None => {}
    }
}

// Both state fds must sit above every target of the child's dup2s.
const _: () =
    assert!(STATE_FD_FLOOR > super::terminal::SAVE_FD && STATE_FD_FLOOR > super::shell::SH_SAVE_FD);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A state memfd never sits at an fd number the spawn child moves fds to
    /// (the soak found the save landing in the restore memfd when it did).
    #[test]
    fn state_memfds_sit_above_every_dup2_target() {
        let fds: Vec<_> = (0..4).map(|_| state_memfd(b"x").unwrap()).collect();
        for fd in &fds {
            assert!(fd.as_raw_fd() >= STATE_FD_FLOOR, "fd {}", fd.as_raw_fd());
        }
        let mut back = String::new();
        std::io::Read::read_to_string(
            &mut std::fs::File::from(fds[0].try_clone().unwrap()),
            &mut back,
        )
        .unwrap();
        assert_eq!(back, "x");
    }
}
