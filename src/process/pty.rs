//! A command's pseudo-terminal (under the CommandActor's run, beside the pipes): opened by the daemon, its slave given to the spawned shell as controlling terminal and stdio, its master kept by the daemon alone.
//!
//! Every fd here is close-on-exec from the moment it exists (`posix_openpt`
//! and `TIOCGPTPEER` with `O_CLOEXEC`, not glibc's `openpty`, which opens
//! both without it): the daemon spawns from several threads, and an fd
//! without it would leak into whatever command is spawned meanwhile. The
//! spawn child moves the slave to 0-2 (dup2 clears close-on-exec there only).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;

/// The largest number of rows or columns a terminal may have: far above any
/// screen (a 4K display in a tiny font is ≈ 400 columns), far below `u16`.
pub const MAX_DIMENSION: u16 = 4096;

/// `TERM` of a command on a pseudo-terminal whose request's env sets none.
pub const DEFAULT_TERM: &[u8] = b"xterm-256color";

/// Adds `TERM` (as [`DEFAULT_TERM`]) to a request's env that sets none: as
/// part of the request's env it wins over the session's, and does not stick.
pub fn default_term(env: &mut super::shell::EnvMap) {
    env.entry(b"TERM".to_vec())
        .or_insert_with(|| DEFAULT_TERM.to_vec());
}

/// A terminal's window size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

impl PtySize {
    fn winsize(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// Why a pseudo-terminal could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("cannot open a pseudo-terminal: {step}: {errno}")]
    Open { step: &'static str, errno: Errno },
    #[error("cannot resize the pseudo-terminal: {0}")]
    Resize(Errno),
}

/// Both ends of a fresh pseudo-terminal of a given size.
#[derive(Debug)]
pub struct Pty {
    /// Non-blocking, for the daemon's reads and writes.
    pub master: OwnedFd,
    /// Given to the child, then dropped by the daemon once it has spawned.
    pub slave: OwnedFd,
}

impl Pty {
    /// Opens a pseudo-terminal of `size`, whose slave belongs to `owner`
    /// (uid, gid) when given: a command running as another user may then
    /// reopen its terminal by name (`/dev/pts/N`), as after a login.
    pub fn open(size: PtySize, owner: Option<(u32, u32)>) -> Result<Pty, PtyError> {
        let step = |step| move |errno| PtyError::Open { step, errno };
        let master = nix::pty::posix_openpt(
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        )
        .map_err(step("posix_openpt"))?;
        nix::pty::unlockpt(&master).map_err(step("unlockpt"))?;
        // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd
        // (checked), which we then own.
        let slave = unsafe {
            let fd = libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(PtyError::Open {
                    step: "TIOCGPTPEER",
                    errno: Errno::last(),
                });
            }
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: a PtyMaster owns its fd; it is moved into an OwnedFd as is.
        let master = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
        set_size(master.as_fd(), size).map_err(step("TIOCSWINSZ"))?;
        if let Some((uid, gid)) = owner {
            nix::unistd::fchown(
                &slave,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(step("fchown"))?;
        }
        Ok(Pty { master, slave })
    }
}

/// Sets the window size of the terminal whose master (or slave) is `fd`;
/// the kernel sends SIGWINCH to its foreground process group when it changed.
pub fn set_size(fd: BorrowedFd<'_>, size: PtySize) -> Result<(), Errno> {
    let ws = size.winsize();
    // SAFETY: TIOCSWINSZ reads a `winsize` through a pointer valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The terminal's EOF character (`VEOF`, ^D unless a program changed it),
/// read from its current settings through the master.
pub fn eof_char(fd: BorrowedFd<'_>) -> u8 {
    nix::sys::termios::tcgetattr(fd)
        .map(|t| t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize])
        .unwrap_or(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(fd: &OwnedFd) -> i32 {
        // SAFETY: F_GETFD on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) }
    }

    #[test]
    fn both_ends_are_close_on_exec_and_sized() {
        let pty = Pty::open(
            PtySize {
                rows: 33,
                cols: 101,
            },
            None,
        )
        .unwrap();
        assert_eq!(flags(&pty.master) & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(flags(&pty.slave) & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let mut size_of_slave = || {
            // SAFETY: TIOCGWINSZ writes a winsize through a valid pointer.
            let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
            assert_eq!(rc, 0);
            (ws.ws_row, ws.ws_col)
        };
        assert_eq!(size_of_slave(), (33, 101));
        set_size(pty.master.as_fd(), PtySize { rows: 5, cols: 7 }).unwrap();
        assert_eq!(size_of_slave(), (5, 7));
        assert_eq!(eof_char(pty.master.as_fd()), 4);
    }
}
