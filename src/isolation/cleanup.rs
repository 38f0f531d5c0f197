//! What a session's uid leaves behind, found and removed before the uid is handed out again: its processes (from /proc), its SysV IPC objects, its files in the shared temporary directories, its home; used by the uid pool, below the actors.
//!
//! Everything here is blocking file I/O: call it off the async workers.
//! Files are removed through directory fds (`openat` with `O_NOFOLLOW`,
//! `unlinkat`), never by path: the trees walked are writable by other
//! sessions, which could otherwise swap a directory for a symlink under us.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// The shared directories a session can write to (besides its home), where
/// its files are looked for: files there outlive their processes.
pub const SHARED_TMP: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue"];

/// How deep the walk of a shared directory goes (bounds fds in use).
const MAX_DEPTH: usize = 32;

/// Live (non-zombie) processes whose real, effective or saved uid `owned`
/// accepts, as (pid, that uid). A zombie runs nothing and holds nothing but its pid.
pub fn processes_of(owned: &dyn Fn(u32) -> bool) -> Vec<(i32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let uid = owner_in_status(&status, owned)?;
            Some((pid, uid))
        })
        .collect()
}

/// The first of real, effective, saved uid that `owned` accepts, unless the
/// process is a zombie.
fn owner_in_status(status: &str, owned: &dyn Fn(u32) -> bool) -> Option<u32> {
    let mut uid = None;
    for line in status.lines() {
        if let Some(state) = line.strip_prefix("State:") {
            if state.trim_start().starts_with('Z') {
                return None;
            }
        } else if let Some(ids) = line.strip_prefix("Uid:") {
            uid = ids
                .split_whitespace()
                .take(3)
                .filter_map(|u| u.parse().ok())
                .find(|u| owned(*u));
        }
    }
    uid
}

/// Removes every SysV shared memory segment, semaphore set and message queue
/// whose owner or creator `owned` accepts (as systemd's `RemoveIPC=`).
/// Returns how many it removed.
pub fn remove_sysv_ipc(owned: &dyn Fn(u32) -> bool) -> usize {
    let mut removed = 0;
    for (table, id_column) in [("shm", "shmid"), ("sem", "semid"), ("msg", "msqid")] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/sysvipc/{table}")) else {
            continue;
        };
        for id in sysv_ids(&text, id_column, owned) {
            // SAFETY: IPC_RMID on an id read from /proc; a stale id fails with EINVAL, harmlessly.
            let rc = unsafe {
                match table {
                    "shm" => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                    "sem" => libc::semctl(id, 0, libc::IPC_RMID),
                    _ => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                }
            };
            if rc == 0 {
                removed += 1;
            }
        }
    }
    removed
}

/// The ids in a /proc/sysvipc table whose `uid` or `cuid` column `owned` accepts.
fn sysv_ids(text: &str, id_column: &str, owned: &dyn Fn(u32) -> bool) -> Vec<i32> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let col = |name: &str| header.split_whitespace().position(|c| c == name);
    let (Some(id), Some(uid), Some(cuid)) = (col(id_column), col("uid"), col("cuid")) else {
        return Vec::new();
    };
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| fields.get(i)?.parse::<u32>().ok();
            let owner_matches = [num(uid)?, num(cuid)?].into_iter().any(owned);
            owner_matches.then(|| fields[id].parse().ok()).flatten()
        })
        .collect()
}

/// Removes, in each of `roots`, every entry `owned` accepts as owner (a
/// directory with all it holds), looking into the directories anyone may
/// write to (mode o+w, like /tmp itself or a subdirectory a session opened
/// to all), the only places outside its home where a session can leave files.
/// Stays on each root's filesystem. Returns how many entries it removed.
pub fn remove_files_in(roots: &[&str], owned: &dyn Fn(u32) -> bool) -> usize {
    let mut removed = 0;
    for root in roots {
        let Ok(fd) = open_dir(None, OsStr::new(root)) else {
            continue;
        };
        let Ok(st) = fstat(&fd) else {
            continue;
        };
        removed += sweep(&fd, st.st_dev, owned, 0);
    }
    removed
}

fn sweep(dir: &OwnedFd, dev: u64, owned: &dyn Fn(u32) -> bool, depth: usize) -> usize {
    let mut removed = 0;
    for name in names(dir) {
        let Ok(st) = fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let is_dir = is_dir(&st);
        if owned(st.st_uid) {
            if remove_entry(dir, &name, &st, dev) {
                removed += 1;
            }
        } else if is_dir && st.st_dev == dev && st.st_mode & 0o002 != 0 && depth < MAX_DEPTH {
            if let Ok(sub) = open_dir(Some(dir), &name) {
                removed += sweep(&sub, dev, owned, depth + 1);
            }
        }
    }
    removed
}

/// Removes the directory `name` in `parent` with everything it holds (not
/// crossing into another filesystem). True when it is gone.
pub fn remove_tree_at(parent: &OwnedFd, name: &OsStr) -> bool {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => remove_entry(parent, name, &st, st.st_dev),
        Err(nix::errno::Errno::ENOENT) => true,
        Err(_) => false,
    }
}

/// Removes one entry (a directory recursively) of `parent`.
fn remove_entry(parent: &OwnedFd, name: &OsStr, st: &FileStat, dev: u64) -> bool {
    if !is_dir(st) {
        return unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).is_ok();
    }
    if st.st_dev != dev {
        // A mount point: not ours to empty.
        return false;
    }
    if let Ok(dir) = open_dir(Some(parent), name) {
        empty_dir(&dir, dev, 0);
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir).is_ok()
}

fn empty_dir(dir: &OwnedFd, dev: u64, depth: usize) {
    for name in names(dir) {
        let Ok(st) = fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        if is_dir(&st) {
            if st.st_dev == dev && depth < 4 * MAX_DEPTH {
                if let Ok(sub) = open_dir(Some(dir), &name) {
                    empty_dir(&sub, dev, depth + 1);
                }
                let _ = unlinkat(dir, name.as_os_str(), UnlinkatFlags::RemoveDir);
            }
        } else {
            let _ = unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Opens a directory (relative to `parent` when given) without following a symlink.
pub fn open_dir(parent: Option<&OwnedFd>, name: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match parent {
        Some(parent) => openat(parent, name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    }
}

/// The names in an open directory, listed through its fd (`/proc/self/fd/N`
/// resolves to exactly that directory, wherever it has moved since).
fn names(dir: &OwnedFd) -> Vec<std::ffi::OsString> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
        return Vec::new();
    };
    entries.flatten().map(|e| e.file_name()).collect()
}

/// A path as a C string (for the probes run as a uid).
pub fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_uids_from_status_and_skips_zombies() {
        let live = "Name:\tsleep\nState:\tS (sleeping)\nUid:\t1\t200001\t200001\t200001\n";
        assert_eq!(owner_in_status(live, &|u| u == 200001), Some(200001));
        assert_eq!(owner_in_status(live, &|u| u == 7), None);
        let zombie = "Name:\tsh\nState:\tZ (zombie)\nUid:\t200001\t200001\t200001\t200001\n";
        assert_eq!(owner_in_status(zombie, &|u| u == 200001), None);
    }

    #[test]
    fn finds_sysv_ids_by_owner_or_creator() {
        let shm = "       key      shmid perms       size  cpid  lpid nattch   uid   gid  cuid  cgid\n\
                   0 5 600 4096 10 0 0 200001 200001 200001 200001\n\
                   0 6 600 4096 10 0 0 0 0 200002 200002\n\
                   0 7 600 4096 10 0 0 0 0 0 0\n";
        let ours = |u: u32| (200001..=200002).contains(&u);
        assert_eq!(sysv_ids(shm, "shmid", &ours), vec![5, 6]);
    }

    #[test]
    fn removes_owned_entries_through_open_world_writable_dirs_only() {
        use std::os::unix::fs::{PermissionsExt, lchown};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (gives files to another uid)");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let p = root.path();
        std::fs::create_dir(p.join("open")).unwrap();
        std::fs::set_permissions(p.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(p.join("closed")).unwrap();
        for f in ["a", "open/b", "closed/c", "keep"] {
            std::fs::write(p.join(f), "x").unwrap();
        }
        std::fs::create_dir(p.join("mine")).unwrap();
        std::fs::write(p.join("mine/inner"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("link")).unwrap();
        let other = 200_777;
        for f in ["a", "open/b", "closed/c", "mine", "link"] {
            lchown(p.join(f), Some(other), None).unwrap();
        }
        let removed = remove_files_in(&[p.to_str().unwrap()], &|u| u == other);
        assert_eq!(removed, 4, "a, open/b, mine (with inner), link");
        assert!(!p.join("a").exists() && !p.join("open/b").exists());
        assert!(!p.join("mine").exists() && std::fs::symlink_metadata(p.join("link")).is_err());
        assert!(p.join("closed/c").exists(), "not looked into a closed dir");
        assert!(p.join("keep").exists() && std::path::Path::new("/etc/passwd").exists());
    }
}
