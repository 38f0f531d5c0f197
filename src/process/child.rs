//! One spawned shell: waiting for its exit (pidfd + wait4 for rusage) and killing its process group.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use super::procfs::{self, ProcStat};
use super::table::ProcessTable;

/// How a process ended and what it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code when it exited.
    pub code: Option<i32>,
    /// Signal number when a signal ended it.
    pub signal: Option<i32>,
    /// User + system CPU time of the process and its waited-for descendants.
    pub cpu: Duration,
    /// Peak resident set size (ru_maxrss), bytes.
    pub max_rss_bytes: u64,
}

/// A spawned shell the daemon waits for. Dropping it before its exit was
/// collected kills its whole process group and hands the pid to the reaper,
/// so an aborted task or a panicking actor leaves nothing running.
#[derive(Debug)]
pub struct ChildProcess {
    pid: Pid,
    /// Becomes readable when the process exits (Linux ≥ 5.3). `None` when
    /// pidfd_open is unavailable; then [`ChildProcess::wait`] polls.
    pidfd: Option<AsyncFd<OwnedFd>>,
    table: Arc<ProcessTable>,
    collected: bool,
}

impl ChildProcess {
    /// Takes ownership of a freshly spawned, already recorded child.
    pub(crate) fn adopt(pid: Pid, table: Arc<ProcessTable>) -> Self {
        let pidfd = pidfd_open(pid).and_then(|fd| {
            // SAFETY: an OwnedFd stays open and keeps returning the same fd
            // until the AsyncFd that owns it is dropped.
            unsafe { AsyncFd::register(fd) }.ok()
        });
        ChildProcess {
            pid,
            pidfd,
            table,
            collected: false,
        }
    }

    /// The shell's pid, which is also its process group id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends `signal` to the shell's whole process group.
    pub fn signal_group(&self, signal: Signal) -> bool {
        !matches!(killpg(self.pid, signal), Err(Errno::ESRCH))
    }

    /// Sends `signal` to the shell's process group and to every descendant of
    /// the shell that left the group (`setsid`, `setpgid`) while still below it.
    /// A descendant already orphaned by an earlier command's exit is out of
    /// reach without cgroups (see README "Limits of process-group kill").
    /// Returns the process groups of those escaped descendants.
    pub async fn signal_tree(&self, signal: Signal) -> Vec<i32> {
        let root = self.pid.as_raw();
        let escaped = tokio::task::spawn_blocking(move || descendants_outside_group(root))
            .await
            .unwrap_or_default();
        let mut groups = Vec::new();
        for p in escaped {
            let _ = nix::sys::signal::kill(Pid::from_raw(p.pid), signal);
            if !groups.contains(&p.pgrp) {
                groups.push(p.pgrp);
            }
        }
        self.signal_group(signal);
        groups
    }

    /// Whether any process of the group is still alive. Zombies do not
    /// count: an orphan's zombie waits for whoever adopted it to reap it, and
    /// an init that reaps every 1–2 s made a 1 s timeout take 3 s
    /// (docs/design-notes.md, "Reaping").
    pub async fn group_alive(&self) -> bool {
        let pgid = self.pid.as_raw();
        // The cheap probe first: no member at all, zombies included.
        if matches!(killpg(self.pid, None), Err(Errno::ESRCH)) {
            return false;
        }
        tokio::task::spawn_blocking(move || group_has_live_member(pgid))
            .await
            .unwrap_or(true)
    }

    /// The shell's exit, if it has exited: collects it (as [`Self::wait`]
    /// would) without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitInfo>> {
        self.try_collect()
    }

    /// Waits for the shell to exit and collects its status and rusage. Cancel-safe.
    pub async fn wait(&mut self) -> std::io::Result<ExitInfo> {
        loop {
            if let Some(info) = self.try_collect()? {
                return Ok(info);
            }
            match &self.pidfd {
                Some(fd) => {
                    let mut guard = fd.readable().await?;
                    guard.clear_ready();
                }
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn try_collect(&mut self) -> std::io::Result<Option<ExitInfo>> {
        if self.collected {
            return Err(std::io::Error::other("exit status already collected"));
        }
        let pid = self.pid;
        let mut failure = None;
        let collected = self.table.collect(pid, || {
            let mut status: libc::c_int = 0;
            // SAFETY: rusage is plain data; all-zero is valid.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointers to locals; WNOHANG never blocks.
            let rc = unsafe { libc::wait4(pid.as_raw(), &mut status, libc::WNOHANG, &mut usage) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINTR) {
                    failure = Some(err);
                }
            }
            (rc > 0).then_some((status, usage))
        });
        if let Some(err) = failure {
            return Err(err);
        }
        let Some((status, usage)) = collected else {
            return Ok(None);
        };
        self.collected = true;
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
        Ok(Some(ExitInfo {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
            max_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        }))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.collected {
            // Abandoned before its exit was seen: kill the tree, let the reaper collect the zombie.
            let _ = killpg(self.pid, Signal::SIGKILL);
            self.table.release(self.pid);
        }
    }
}

/// Whether a process of group `pgid` that is not a zombie exists (blocking /proc scan).
fn group_has_live_member(pgid: i32) -> bool {
    procfs::all_processes()
        .iter()
        .any(|p| p.pgrp == pgid && !p.is_zombie())
}

/// Descendants of `root` (by parent links in /proc) whose process group is not `root`'s.
fn descendants_outside_group(root: i32) -> Vec<ProcStat> {
    let mut children: std::collections::HashMap<i32, Vec<ProcStat>> = Default::default();
    for p in procfs::all_processes() {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(parent) = todo.pop() {
        for p in children.get(&parent).map(Vec::as_slice).unwrap_or(&[]) {
            if p.pgrp != root {
                out.push(*p);
            }
            todo.push(p.pid);
        }
    }
    out
}

fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    // pidfds are always close-on-exec.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Some(fd)
}
