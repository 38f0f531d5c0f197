//! The daemon's side of systemd, at the edge of the server's lifetime: readiness and watchdog notifications (`sd_notify`) and a listening socket handed over by socket activation.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::time::Duration;

use nix::sys::socket::{SockType, getsockopt, sockopt};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Why a passed fd cannot be served on.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(
        "LISTEN_FDS={0}: expected exactly one socket (give the .socket unit one ListenStream=)"
    )]
    Count(String),
    #[error("fd 3 passed by systemd is not {0}")]
    NotAListener(&'static str),
    #[error("fd 3 passed by systemd: {0}")]
    Check(nix::errno::Errno),
}

/// Takes the listening socket systemd passed (LISTEN_PID is us and
/// LISTEN_FDS = 1): fd 3, checked to be a Unix stream socket in listening
/// state, made non-blocking and close-on-exec. `None` when nothing was
/// passed. Call before any other thread exists: it unsets the LISTEN_*
/// variables (as `sd_listen_fds(1)` does), so nothing started later sees them.
pub fn take_listener() -> Option<Result<UnixListener, ActivationError>> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    if pid.trim().parse::<u32>().ok()? != std::process::id() {
        return None;
    }
    let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called from `main` before the runtime or any other thread
        // exists, so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    if fds.trim() != "1" {
        return Some(Err(ActivationError::Count(fds)));
    }
    Some(check(LISTEN_FDS_START))
}

fn check(fd: RawFd) -> Result<UnixListener, ActivationError> {
    // SAFETY: fd 3 is ours for the whole process life (systemd passed it and
    // nothing else claims it). It is owned by this listener from here on; if
    // a check below fails it is dropped (closed): it is of no use to us then.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // std's local_addr refuses any address family but AF_UNIX.
    listener
        .local_addr()
        .map_err(|_| ActivationError::NotAListener("a Unix socket"))?;
    let kind = getsockopt(&listener, sockopt::SockType).map_err(ActivationError::Check)?;
    if kind != SockType::Stream {
        return Err(ActivationError::NotAListener("a stream socket"));
    }
    if !getsockopt(&listener, sockopt::AcceptConn).map_err(ActivationError::Check)? {
        return Err(ActivationError::NotAListener("in listening state"));
    }
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(ActivationError::Check)?;
    listener.set_nonblocking(true).map_err(|e| {
        ActivationError::Check(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    })?;
    Ok(listener)
}

/// Sends `state` (e.g. `READY=1`) to the service manager at `NOTIFY_SOCKET`,
/// if there is one (a path, or an abstract name written `@name`). Best
/// effort: a manager that is gone must not stop the daemon.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(&target)
    };
    let sent = addr.and_then(|addr| {
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(notify_socket = %target, error = %e, state, "cannot notify the service manager");
    }
}

/// How often to send `WATCHDOG=1`, when systemd asks for it (`WatchdogSec=`:
/// WATCHDOG_USEC, for our pid): half the interval, as sd_watchdog_enabled advises.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
