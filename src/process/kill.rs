//! Where a command's timeout is enforced and kill requests are carried out (inside the CommandActor's run task), and how a kill the daemon did not order is attributed.
//!
//! [`supervise`] waits for the shell or ends it: SIGTERM to its tree, the
//! grace, SIGKILL, and with cgroups the kill of the command's whole leaf
//! (setsid'd descendants included). [`attribute`] names the limit that ended
//! a command by itself: the cgroup's OOM killer, or RLIMIT_CPU.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::watch;

use super::child::{ChildProcess, ExitInfo};
use super::live_output::LiveOutput;
use crate::cgroup::CgroupNode;
use crate::limits::Rlimit;

/// Why the daemon ended a command (the process layer's; the wire names it `killed_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// Its timeout passed.
    Timeout,
    /// It wrote nothing to stdout or stderr for its idle timeout.
    IdleTimeout,
    /// RLIMIT_CPU ended it.
    CpuLimit,
    /// The OOM killer acted in its cgroup leaf.
    MemoryLimit,
    /// A cancel request.
    Cancelled,
    /// Its session was destroyed (no grace: the session's was given).
    SessionDestroyed,
    /// The daemon is shutting down (no grace: the shutdown's was given).
    Shutdown,
}

/// The limit that ended a command nobody asked to kill, if any: OOM kills
/// in its cgroup leaf, else RLIMIT_CPU (see [`cpu_limit_kill`]).
pub fn attribute(exit: &ExitInfo, oom_kills: u64, rlimits: &[Rlimit]) -> Option<KillReason> {
    (oom_kills > 0)
        .then_some(KillReason::MemoryLimit)
        .or_else(|| cpu_limit_kill(exit, rlimits))
}

/// Waits for the shell to exit, or ends it: on timeout, idle timeout (no
/// output on either stream of `idle.1` for `idle.0`) or a kill request,
/// SIGTERM to its process group, then SIGKILL after `grace` (at once for
/// session destroy and shutdown, whose grace was already given). This is
/// where a command's timeouts are enforced.
pub async fn supervise(
    child: &mut ChildProcess,
    leaf: Option<&CgroupNode>,
    timeout: Duration,
    idle: Option<(Duration, &LiveOutput)>,
    grace: Duration,
    kill: &mut watch::Receiver<Option<KillReason>>,
) -> std::io::Result<(ExitInfo, Option<KillReason>)> {
    let reason = tokio::select! {
        // The exit first: when the exit and a timer are both ready (the
        // daemon was stopped past the deadline), the command was not killed.
        biased;
        r = child.wait() => return Ok((r?, None)),
        r = kill_requested(kill) => r,
        _ = tokio::time::sleep(timeout) => KillReason::Timeout,
        _ = silent_for(idle) => KillReason::IdleTimeout,
    };
    // Exit wins a tie: it may have come while the timer fired.
    if let Some(exited) = child.try_wait()? {
        return Ok((exited, None));
    }
    let mut exited = None;
    // Groups of descendants that left the shell's group (setsid); found while
    // the shell is alive, killed at the end even if the shell is gone by then.
    let mut escaped = Vec::new();
    if !matches!(reason, KillReason::SessionDestroyed | KillReason::Shutdown) {
        escaped.extend(child.signal_tree(Signal::SIGTERM).await);
        let grace_end = tokio::time::Instant::now() + grace;
        tokio::select! {
            r = child.wait() => exited = Some(r?),
            _ = tokio::time::sleep_until(grace_end) => {}
            // Only an escalation (destroy, shutdown) changes the value now; it ends the grace.
            _ = escalation(kill) => {}
        }
        // The shell is gone; the rest of its group gets what is left of the
        // grace, and the kill is done as soon as no live process is left.
        while exited.is_some()
            && tokio::time::Instant::now() < grace_end
            && child.group_alive().await
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if exited.is_none() {
        escaped.extend(child.signal_tree(Signal::SIGKILL).await);
    }
    child.signal_group(Signal::SIGKILL);
    // With cgroups, the command's leaf holds its whole tree, setsid'd or not.
    if let Some(leaf) = leaf {
        let _ = leaf.kill_off_workers().await;
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
fn cpu_limit_kill(exit: &ExitInfo, rlimits: &[Rlimit]) -> Option<KillReason> {
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
    (xcpu || hard_kill).then_some(KillReason::CpuLimit)
}

/// Resolves once `idle.1` has had no output for `idle.0`; never without an idle timeout.
async fn silent_for(idle: Option<(Duration, &LiveOutput)>) {
    let Some((after, output)) = idle else {
        return std::future::pending().await;
    };
    loop {
        let quiet_until = output.last_output() + after;
        if Instant::now() >= quiet_until {
            return;
        }
        tokio::time::sleep_until(quiet_until.into()).await;
    }
}

/// Resolves when the kill request changes after it was first seen; never when the sender is gone.
async fn escalation(kill: &mut watch::Receiver<Option<KillReason>>) {
    if kill.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when a kill is requested (at once if one already was); never when the sender is gone.
async fn kill_requested(kill: &mut watch::Receiver<Option<KillReason>>) -> KillReason {
    loop {
        if let Some(reason) = *kill.borrow_and_update() {
            return reason;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
