//! Cgroup file helpers shared by both backends: create, write, read, kill, wait, list, and the lock on our subtree. All blocking.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{CgroupError, io_err};

/// How long a kill may take to empty a cgroup.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Creates a node's cgroup directory; one that exists already is an error:
/// a session or command must never share a cgroup with anything else.
pub(crate) fn mkdir_new(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir(dir).map_err(|e| io_err("create", dir, e))
}

/// Creates a base directory of our subtree (one that exists already is fine).
pub(crate) fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io_err("create", dir, e)),
        _ => Ok(()),
    }
}

/// Writes a cgroup file.
pub(crate) fn write(file: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(file, value).map_err(|e| io_err("write", file, e))
}

/// Removes a cgroup directory (one already gone is fine).
pub(crate) fn rmdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", dir, e)),
        _ => Ok(()),
    }
}

/// The value of `key` in a `key value` file (cgroup.events, memory.events, memory.oom_control).
pub(crate) fn read_key(file: &Path, key: &str) -> Option<u64> {
    key_value(&std::fs::read_to_string(file).ok()?, key)
}

/// The value of `key` in the text of a `key value` file.
pub(crate) fn key_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Writes "1" to `dir/cgroup.kill`: SIGKILL to every process in it and below (kernel ≥ 5.14).
pub(crate) fn kill_by_file(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.kill");
    match std::fs::write(&file, "1") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("write", &file, e)),
        _ => Ok(()),
    }
}

/// Waits until no process is left in `dir` or below.
pub(crate) fn wait_empty(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + KILL_WAIT;
    while !all_pids_below(dir).is_empty() {
        if Instant::now() > deadline {
            return Err(CgroupError::NotEmpty(dir.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Every pid in `dir/cgroup.procs` and in its descendants'.
pub(crate) fn all_pids_below(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        todo.extend(child_dirs(&d).into_iter().map(|c| d.join(c)));
    }
    out
}

/// Names of the subdirectories of `dir` (child cgroups).
pub(crate) fn child_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// A file holding one number (memory.peak, memory.usage_in_bytes).
pub(crate) fn read_u64(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Takes an exclusive, non-blocking flock on `dir`; the lock lives with the
/// open file we keep, and the kernel drops it when the daemon dies (so a
/// crashed daemon never blocks its successor).
pub(crate) fn lock_subtree(dir: &Path) -> Result<OwnedFd, CgroupError> {
    let fd = OwnedFd::from(std::fs::File::open(dir).map_err(|e| io_err("open", dir, e))?);
    // SAFETY: flock on a valid fd we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } == 0
    {
        Ok(fd)
    } else {
        Err(CgroupError::InUse(dir.to_path_buf()))
    }
}

/// Every directory named `name` under /sys/fs/cgroup, three levels down (the
/// v1 hierarchies, the unified mount and v2 subtrees): where a daemon's
/// subtree of that name lives, for tools that check one left nothing (the
/// benchmark, the tests).
pub fn dirs_named(name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_string_lossy() == name {
                found.push(e.path());
            } else if depth < 3 {
                todo.push((e.path(), depth + 1));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.oom_control");
        std::fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(read_key(&f, "oom_kill"), Some(3));
        assert_eq!(read_key(&f, "missing"), None);
    }

    #[test]
    fn a_locked_subtree_refuses_a_second_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = lock_subtree(dir.path()).unwrap();
        assert!(matches!(
            lock_subtree(dir.path()),
            Err(CgroupError::InUse(_))
        ));
    }
}
