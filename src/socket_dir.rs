//! The socket's directory, checked by the daemon before it binds (`server::bind`) and by the client before it connects (`client::Client::connect`): a real directory, owned by a trusted uid, that nobody else can write to.
//!
//! Whoever can write to the directory can replace the socket (rename their
//! own over it) and receive every request meant for the daemon. So the
//! directory is opened once with `O_PATH|O_NOFOLLOW|O_DIRECTORY`, checked with
//! `fstat` on that fd, and the socket is then bound or connected through
//! `/proc/self/fd/N/NAME`, which resolves to that very directory even if
//! the path was swapped after the check.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};

/// Why a socket directory is not safe (each says what to fix).
#[derive(Debug, thiserror::Error)]
pub enum SocketDirError {
    #[error(
        "socket directory {0} is a symlink (or not a directory); use a path whose directory is a real one"
    )]
    NotARealDirectory(PathBuf),
    #[error(
        "socket directory {dir} is owned by uid {owner}; it must be owned by uid {trusted} or root (fix: `chown {trusted} {dir}`, or use another socket path)",
        dir = .dir.display()
    )]
    Owner {
        dir: PathBuf,
        owner: u32,
        trusted: u32,
    },
    #[error(
        "socket directory {dir} has mode {mode:04o}: others can write to it and replace the socket (fix: `chmod go-w {dir}`, e.g. 0700, or use another socket path)",
        dir = .dir.display()
    )]
    Writable { dir: PathBuf, mode: u32 },
    #[error(
        "socket {path} is owned by uid {owner} in a directory anyone may write to; only uid {trusted} or root may own it there",
        path = .path.display()
    )]
    ForeignSocket {
        path: PathBuf,
        owner: u32,
        trusted: u32,
    },
    #[error("socket path {0} has no file name or is too long for a Unix socket")]
    BadPath(PathBuf),
    #[error("cannot open socket directory {dir}: {errno}", dir = .dir.display())]
    Open { dir: PathBuf, errno: Errno },
}

/// An open, checked socket directory and the socket's name in it.
#[derive(Debug)]
pub struct SocketDir {
    fd: OwnedFd,
    dir: PathBuf,
    name: OsString,
    /// The directory is writable by others (allowed only when sticky and trusted-owned).
    shared: bool,
}

/// `sun_path` holds 108 bytes including the NUL.
const SUN_PATH_MAX: usize = 107;

impl SocketDir {
    /// Opens the directory of `socket` without following a symlink and checks
    /// it: owned by `trusted` or root, and not writable by group or others
    /// unless it is sticky (like /tmp) and owned by `trusted`.
    pub fn open(socket: &Path, trusted: u32) -> Result<SocketDir, SocketDirError> {
        let (dir, name) = split(socket)?;
        let fd = nix::fcntl::open(
            &dir,
            // O_PATH: search permission is enough (a client of another uid
            // may reach the socket through a 0711 directory it cannot list).
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            Errno::ELOOP | Errno::ENOTDIR => SocketDirError::NotARealDirectory(dir.clone()),
            errno => SocketDirError::Open {
                dir: dir.clone(),
                errno,
            },
        })?;
        let st = fstat(&fd).map_err(|errno| SocketDirError::Open {
            dir: dir.clone(),
            errno,
        })?;
        let shared = check(&dir, &st, trusted)?;
        let opened = SocketDir {
            fd,
            dir,
            name,
            shared,
        };
        if opened.fd_path().as_os_str().len() > SUN_PATH_MAX {
            return Err(SocketDirError::BadPath(socket.to_path_buf()));
        }
        Ok(opened)
    }

    /// The socket's path through the open directory, for bind and connect.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd())).join(&self.name)
    }

    /// The socket's path as configured, for messages.
    pub fn display_path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// The socket's name in the directory.
    pub fn name(&self) -> &OsStr {
        &self.name
    }

    /// The open directory.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// lstat of the socket's entry (never follows a symlink); `None` when absent.
    pub fn stat_entry(&self) -> Result<Option<FileStat>, Errno> {
        match fstatat(
            &self.fd,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// For a client: in a directory others may write to (sticky), the socket
    /// itself must be owned by `trusted` or root, or anyone could have put it there first.
    pub fn check_socket_owner(&self, trusted: u32) -> Result<(), SocketDirError> {
        if !self.shared {
            return Ok(());
        }
        if let Ok(Some(st)) = self.stat_entry() {
            if st.st_uid != trusted && st.st_uid != 0 {
                return Err(SocketDirError::ForeignSocket {
                    path: self.display_path(),
                    owner: st.st_uid,
                    trusted,
                });
            }
        }
        Ok(())
    }
}

/// Splits a socket path into its directory and name.
fn split(socket: &Path) -> Result<(PathBuf, OsString), SocketDirError> {
    let bad = || SocketDirError::BadPath(socket.to_path_buf());
    let name = socket.file_name().ok_or_else(bad)?.to_os_string();
    let dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// The rule itself; `Ok(true)` when the directory is a shared sticky one.
fn check(dir: &Path, st: &FileStat, trusted: u32) -> Result<bool, SocketDirError> {
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return Err(SocketDirError::NotARealDirectory(dir.to_path_buf()));
    }
    if st.st_uid != trusted && st.st_uid != 0 {
        return Err(SocketDirError::Owner {
            dir: dir.to_path_buf(),
            owner: st.st_uid,
            trusted,
        });
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 == 0 {
        return Ok(false);
    }
    if mode & 0o1000 != 0 && st.st_uid == trusted {
        return Ok(true);
    }
    Err(SocketDirError::Writable {
        dir: dir.to_path_buf(),
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn open_in(dir: &Path) -> Result<SocketDir, SocketDirError> {
        SocketDir::open(&dir.join("s.sock"), nix::unistd::geteuid().as_raw())
    }

    #[test]
    fn private_dirs_pass_and_open_or_linked_ones_do_not() {
        let t = tempfile::tempdir().unwrap();
        let ok = t.path().join("ok");
        std::fs::create_dir(&ok).unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(open_in(&ok).is_ok());

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = open_in(&open).unwrap_err().to_string();
        assert!(err.contains("0777") && err.contains("chmod"), "{err}");

        let sticky = t.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(
            open_in(&sticky).unwrap().shared,
            "sticky and ours: allowed, shared"
        );

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        let err = open_in(&link).unwrap_err().to_string();
        assert!(err.contains("symlink") && err.contains("link"), "{err}");
    }

    #[test]
    fn a_dir_of_another_owner_is_refused_naming_the_fix() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (gives a directory to another uid)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(t.path(), Some(65534), None).unwrap();
        let err = open_in(t.path()).unwrap_err().to_string();
        assert!(
            err.contains("uid 65534") && err.contains("chown 0"),
            "{err}"
        );
        // The same directory is fine for its owner.
        assert!(SocketDir::open(&t.path().join("s.sock"), 65534).is_ok());
    }
}
