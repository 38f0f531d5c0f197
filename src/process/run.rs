//! Runs one command to its end: spawn, feed stdin, capture capped output, and enforce the timeout and kill requests.
//!
//! This is where a command's timeout is enforced ([`supervise`]) and where
//! "done" is decided: the shell process exited. Background children that keep
//! the pipes open get [`DRAIN_AFTER_EXIT`] more, then the pipes are dropped
//! (design-rules: waiting for EOF took as long as `sleep 2 &`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;

use super::child::{ChildProcess, ExitInfo};
use super::output::CappedOutput;
use super::shell::{self, EnvMap};
use super::spawn::{self, Credentials, SpawnError, SpawnRequest};
use super::table::{ProcessTable, SessionKey};
use super::terminal::{self, StateError, TerminalState};
use crate::cgroup::{CgroupError, Cgroups};
use crate::limits::Rlimit;
use std::os::fd::AsRawFd;

/// A command's cgroup leaf.
#[derive(Debug, Clone)]
struct CommandCgroup {
    cgroups: Arc<Cgroups>,
    rel: String,
}
use crate::protocol::{ExecResult, KeepOutput, KilledBy};

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
    pub kill_grace: Duration,
    pub max_output_bytes: usize,
    pub keep_output: KeepOutput,
    /// setrlimit values for the command's processes.
    pub rlimits: [Rlimit; 5],
    /// oom_score_adj of the command's processes.
    pub oom_score_adj: i32,
    /// The identity to run as, when not the daemon's.
    pub credentials: Option<Credentials>,
    /// The session's cgroup, in which the command gets a leaf of its own.
    pub cgroup: Option<CgroupPlace>,
}

/// Where a command's cgroup leaf goes: the daemon's cgroups and the session's node.
#[derive(Debug, Clone)]
pub struct CgroupPlace {
    pub cgroups: Arc<Cgroups>,
    pub session: String,
}

/// A finished command: its result and, when it ended by itself, the terminal state it left.
#[derive(Debug)]
pub struct RunOutcome {
    pub result: ExecResult,
    pub state: Option<Box<TerminalState>>,
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
}

/// Runs `spec` in a group of `session`. `kill` carries a kill request
/// (cancel, session destroyed, shutdown); the timeout is enforced here.
pub async fn run_command(
    table: &Arc<ProcessTable>,
    session: SessionKey,
    spec: RunSpec,
    mut kill: watch::Receiver<Option<KilledBy>>,
) -> Result<RunOutcome, RunError> {
    let argv = shell::wrapper_argv(&spec.shell, &spec.command).map_err(RunError::BadCommand)?;
    // The state goes in and out through two memfds (not argv: E2BIG past 128 KiB).
    let nonce = terminal::nonce();
    let bash = shell::is_bash(&spec.shell);
    let (restore, env) = if bash {
        let mut env = spec.request_env.clone();
        env.insert(
            b"BASH_ENV".to_vec(),
            format!("/dev/fd/{}", terminal::RESTORE_FD).into_bytes(),
        );
        (
            terminal::restore_script(&spec.state, &nonce, &spec.request_env),
            env,
        )
    } else {
        let mut env = spec.state.env();
        env.extend(spec.request_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        (
            shell::sh_restore_script(&spec.state, &nonce, &spec.request_env),
            env,
        )
    };
    let state_fds = (state_memfd(&restore)?, state_memfd(b"")?);
    let envp = shell::envp(&env, &spec.state.cwd);
    let cwd = std::ffi::CString::new(spec.state.cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| RunError::BadCommand("cwd holds a NUL byte".into()))?;
    let (table, cwd_path, with_stdin) =
        (table.clone(), spec.state.cwd.clone(), spec.stdin.is_some());
    let (at_restore, at_save) = if bash {
        (terminal::RESTORE_FD, terminal::SAVE_FD)
    } else {
        (shell::SH_RESTORE_FD, shell::SH_SAVE_FD)
    };
    let fds = [
        (state_fds.0.as_raw_fd(), at_restore),
        (state_fds.1.as_raw_fd(), at_save),
    ];
    let (rlimits, credentials, place) = (spec.rlimits, spec.credentials, spec.cgroup.clone());
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
        // The command's own leaf, and its cgroup.procs files open for the child to join.
        let leaf = match &place {
            Some(p) => {
                let rel = p.cgroups.create_command(&p.session)?;
                let fds = match p.cgroups.open_procs(&rel) {
                    Ok(fds) => fds,
                    Err(e) => {
                        p.cgroups.release_command(&rel);
                        return Err(e.into());
                    }
                };
                Some((p.cgroups.clone(), rel, fds))
            }
            None => None,
        };
        let procs: Vec<i32> = leaf
            .iter()
            .flat_map(|(_, _, fds)| fds.iter().map(|f| f.as_raw_fd()))
            .collect();
        let request = SpawnRequest {
            program: &argv[0],
            argv: &argv,
            envp: &envp,
            cwd: &cwd,
            with_stdin,
            rlimits: &rlimits,
            oom_score_adj: Some(&oom_score_adj),
            credentials,
            cgroup_procs: &procs,
            state_fds: fds,
        };
        let spawned = spawn::spawn(&table, session, &request);
        let leaf = leaf.map(|(cgroups, rel, _fds)| CommandCgroup { cgroups, rel });
        match spawned {
            Ok((child, pipes)) => Ok((child, pipes, leaf)),
            Err(e) => {
                if let Some(leaf) = leaf {
                    leaf.cgroups.release_command(&leaf.rel);
                }
                Err(e.into())
            }
        }
    })
    .await
    .map_err(|e| RunError::Wait(std::io::Error::other(e)))?;
    let (mut child, pipes, leaf) = spawned?;

    let receiver = |fd| pipe::Receiver::from_owned_fd(fd).map_err(RunError::Wait);
    let (mut stdout_rx, mut stderr_rx) = (receiver(pipes.stdout)?, receiver(pipes.stderr)?);
    let mut stdout = CappedOutput::new(spec.max_output_bytes, spec.keep_output);
    let mut stderr = CappedOutput::new(spec.max_output_bytes, spec.keep_output);

    let (exit, killed_by, io_done) = {
        let io = async {
            tokio::join!(
                pump(&mut stdout_rx, &mut stdout),
                pump(&mut stderr_rx, &mut stderr),
                feed(pipes.stdin, spec.stdin.as_deref()),
            )
        };
        tokio::pin!(io);
        let ended = supervise(
            &mut child,
            leaf.as_ref(),
            spec.timeout,
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
    if !io_done {
        // Background children still hold the pipes. Closing our ends would kill
        // them with SIGPIPE at their next write, so keep reading and discarding
        // until they exit (or the session's end kills them).
        tokio::spawn(discard_until_eof([stdout_rx, stderr_rx]));
    }
    let duration = started.elapsed();
    // What the kernel says of the command's leaf: OOM kills and peak memory;
    // then the leaf goes, unless background processes still live in it.
    let (oom_kills, memory_peak) = match &leaf {
        Some(leaf) => {
            let reading = leaf.clone();
            let found = tokio::task::spawn_blocking(move || {
                let cg = &reading.cgroups;
                (cg.oom_kills(&reading.rel), cg.memory_peak(&reading.rel))
            })
            .await
            .unwrap_or((0, None));
            // Removing the leaf (rmdir in every hierarchy, the slowest part on
            // v1) need not delay the answer.
            let leaf = leaf.clone();
            tokio::task::spawn_blocking(move || leaf.cgroups.release_command(&leaf.rel));
            found
        }
        None => (0, None),
    };
    let killed_by = killed_by
        .or((oom_kills > 0).then_some(KilledBy::MemoryLimit))
        .or_else(|| cpu_limit_kill(&exit, &spec.rlimits));

    // Only a command that ended by itself leaves a state; a killed one keeps the old.
    let saved = match (killed_by, exit.code) {
        (None, Some(_)) => read_saved(&state_fds.1, spec.max_state_bytes, &nonce, bash),
        _ => Ok(None),
    };
    let (state, state_error) = match saved {
        Ok(state) => (state.map(Box::new), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let cwd = state
        .as_ref()
        .map_or(&spec.state.cwd, |s| &s.cwd)
        .to_string_lossy()
        .into_owned();
    let result = ExecResult {
        exit_code: exit.code,
        signal: exit.signal,
        timed_out: killed_by == Some(KilledBy::Timeout),
        killed_by,
        stdout_truncated: stdout.truncated(),
        stderr_truncated: stderr.truncated(),
        stdout_total_bytes: stdout.total(),
        stderr_total_bytes: stderr.total(),
        stdout: ByteBuf::from(stdout.into_bytes()),
        stderr: ByteBuf::from(stderr.into_bytes()),
        duration_ms: duration.as_millis() as u64,
        cpu_ms: Some(exit.cpu.as_millis() as u64),
        max_rss_bytes: Some(memory_peak.unwrap_or(exit.max_rss_bytes)),
        cwd,
        state_error,
    };
    Ok(RunOutcome { result, state })
}

/// Waits for the shell to exit, or ends it: on timeout or a kill request,
/// SIGTERM to its process group, then SIGKILL after `grace` (at once for
/// session destroy and shutdown, whose grace was already given).
async fn supervise(
    child: &mut ChildProcess,
    leaf: Option<&CommandCgroup>,
    timeout: Duration,
    grace: Duration,
    kill: &mut watch::Receiver<Option<KilledBy>>,
) -> std::io::Result<(ExitInfo, Option<KilledBy>)> {
    let reason = tokio::select! {
        r = child.wait() => return Ok((r?, None)),
        _ = tokio::time::sleep(timeout) => KilledBy::Timeout,
        r = kill_requested(kill) => r,
    };
    let mut exited = None;
    // Groups of descendants that left the shell's group (setsid); found while
    // the shell is alive, killed at the end even if the shell is gone by then.
    let mut escaped = Vec::new();
    if !matches!(reason, KilledBy::SessionDestroyed | KilledBy::Shutdown) {
        escaped.extend(child.signal_tree(Signal::SIGTERM).await);
        let grace_end = tokio::time::Instant::now() + grace;
        tokio::select! {
            r = child.wait() => exited = Some(r?),
            _ = tokio::time::sleep_until(grace_end) => {}
            // Only an escalation (destroy, shutdown) changes the value now; it ends the grace.
            _ = escalation(kill) => {}
        }
        // The shell is gone; the rest of its group gets what is left of the grace.
        while exited.is_some() && child.group_alive() && tokio::time::Instant::now() < grace_end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if exited.is_none() {
        escaped.extend(child.signal_tree(Signal::SIGKILL).await);
    }
    child.signal_group(Signal::SIGKILL);
    // With cgroups, the command's leaf holds its whole tree, setsid'd or not.
    if let Some(leaf) = leaf.cloned() {
        let _ = tokio::task::spawn_blocking(move || leaf.cgroups.kill(&leaf.rel)).await;
    }
    for pgid in escaped {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), Signal::SIGKILL);
    }
    let info = match exited {
        Some(info) => info,
        None => child.wait().await?,
    };
    Ok((info, Some(reason)))
}

/// Whether RLIMIT_CPU ended the command: SIGXCPU at the soft limit (or SIGKILL
/// at the hard one) ended the shell, or a child of it (the shell then exits
/// 128 + signal), and the command's processes used at least the soft limit of
/// a good part of it in CPU. rusage reads well under the limit (851 ms of a
/// 1 s limit was measured here, with cgroup CPU throttling), so the bar is
/// half the limit: enough to keep a command's own `exit 152` or an outside
/// `kill -9` of an idle command from being taken for a CPU-limit kill.
fn cpu_limit_kill(exit: &ExitInfo, rlimits: &[Rlimit]) -> Option<KilledBy> {
    let soft = rlimits
        .iter()
        .find(|l| l.resource == libc::RLIMIT_CPU)?
        .soft;
    if soft == libc::RLIM_INFINITY {
        return None;
    }
    let by_signal = |sig: i32| exit.signal == Some(sig) || exit.code == Some(128 + sig);
    let cpu_ms = exit.cpu.as_millis();
    let soft_ms = u128::from(soft) * 1_000;
    // SIGXCPU comes from nothing else in practice; SIGKILL has many senders
    // (OOM killer, `timeout -s KILL`), so it counts only with the full limit used.
    let xcpu = by_signal(libc::SIGXCPU) && cpu_ms * 2 >= soft_ms;
    let hard_kill = by_signal(libc::SIGKILL) && cpu_ms >= soft_ms;
    (xcpu || hard_kill).then_some(KilledBy::CpuLimit)
}

/// Resolves when the kill request changes after it was first seen; never when the sender is gone.
async fn escalation(kill: &mut watch::Receiver<Option<KilledBy>>) {
    if kill.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when a kill is requested (at once if one already was); never when the sender is gone.
async fn kill_requested(kill: &mut watch::Receiver<Option<KilledBy>>) -> KilledBy {
    loop {
        if let Some(reason) = *kill.borrow_and_update() {
            return reason;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Reads what background children write after their command answered, and drops it.
async fn discard_until_eof(pipes: [pipe::Receiver; 2]) {
    let mut buf = vec![0u8; 4096];
    for mut rx in pipes {
        while let Ok(n) = rx.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
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
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).map_err(RunError::Wait)?;
    file.rewind().map_err(RunError::Wait)?;
    Ok(file.into())
}

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

/// Reads a pipe to EOF into `out`, which keeps what its cap allows and counts the rest.
async fn pump(rx: &mut pipe::Receiver, out: &mut CappedOutput) {
    // Uninitialised capacity, filled by `read_buf`: a command that prints
    // little touches one page of it, not 64 KiB zeroed three times per
    // command (memset and page faults were the top user-space cost in a
    // profile of `exec.run true`).
    let mut buf = bytes::BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.clear();
        match rx.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => out.push(&buf),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes stdin and closes it so the command sees EOF; a command that exits
/// without reading makes the write fail with EPIPE, which is fine.
async fn feed(fd: Option<std::os::fd::OwnedFd>, data: Option<&[u8]>) {
    let (Some(fd), Some(data)) = (fd, data) else {
        return;
    };
    let Ok(mut tx) = pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    let _ = tx.write_all(data).await;
}
