//! Isolation between sessions (`[commands] isolation`): under `uid-per-session` each session leases a uid and gid of its own with a home under `state_dir`, cleaned of everything before reuse and recovered after a crash; beside the process layer, below the actors, knows nothing of the wire.
//!
//! A [`Lease`] is held by its SessionActor for the session's life; it goes
//! back when the session ends (`SessionActor::end`) or, on a panic, from its
//! `Drop`. A uid is handed out again only after [`Isolation`] has seen that
//! nothing of its previous session is left: no live process with that uid in
//! /proc (not only in the daemon's table: `setsid`, double forks and
//! reparenting hide processes from it), no SysV IPC object, no file in the
//! shared temporary directories ([`cleanup::SHARED_TMP`]), no home. The homes
//! are named by uid, so a daemon restarted after a crash knows which uids
//! were in use from `state_dir` alone ([`Isolation::recover`]).

pub mod as_uid;
pub mod cleanup;
pub mod pool;

use std::ffi::OsStr;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod, fstat, mkdirat};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::process::spawn::Credentials;
use crate::timing;
use pool::UidPool;

/// `[commands] isolation`: who the commands of a session run as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationMode {
    /// Every command runs as `run_as_user`, else as the daemon's user.
    #[default]
    Shared,
    /// Each session gets a uid and gid of its own from `uid_range`.
    UidPerSession,
}

impl IsolationMode {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            IsolationMode::Shared => "shared",
            IsolationMode::UidPerSession => "uid-per-session",
        }
    }
}

/// `[commands] uid_range`: `"FIRST-LAST"`, both included; the same numbers are the gids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            first: 200_000,
            last: 265_535,
        }
    }
}

impl UidRange {
    /// How many uids the range holds.
    pub fn len(self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Never empty (parsing refuses FIRST > LAST); for clippy's `len` rule.
    pub fn is_empty(self) -> bool {
        false
    }

    pub fn contains(self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a uid range: expected \"FIRST-LAST\" with 0 < FIRST <= LAST < 4294967295, e.g. \"200000-265535\""
            )
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last || last == u32::MAX {
            return Err(bad());
        }
        Ok(UidRange { first, last })
    }
}

impl Serialize for UidRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UidRange {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why isolation could not start, or a uid could not be leased or cleaned.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("commands.state_dir {path}: {why}")]
    StateDir { path: PathBuf, why: String },
    #[error(
        "another sessiond holds the state directory {0}; give each daemon on a host its own state_dir and uid_range"
    )]
    Locked(PathBuf),
    #[error(
        "no free uid in commands.uid_range: {leased} leased, {dirty} held back because their cleanup failed"
    )]
    Exhausted { leased: usize, dirty: usize },
    #[error("cannot make the session's home {path}: {errno}")]
    Home { path: PathBuf, errno: Errno },
    #[error("uid {uid}: {left} of its processes are still alive after SIGKILL")]
    ProcessesLeft { uid: u32, left: usize },
    #[error("uid {uid}: cannot remove its home {path}")]
    HomeLeft { uid: u32, path: PathBuf },
}

/// Checks the isolation keys of `[commands]`; `Err((key, value, allowed))`.
/// Only `uid-per-session` has anything to check.
pub fn check_config(
    mode: IsolationMode,
    range: UidRange,
    state_dir: &Path,
    run_as_user: &str,
    max_sessions: usize,
) -> Result<(), (&'static str, String, String)> {
    if mode == IsolationMode::Shared {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err((
            "commands.isolation",
            mode.name().into(),
            "\"shared\" unless the daemon runs as root (only root can switch to a session's uid)"
                .into(),
        ));
    }
    if !run_as_user.is_empty() {
        return Err((
            "commands.run_as_user",
            run_as_user.into(),
            "empty under isolation = \"uid-per-session\" (each session runs as a uid of its own)"
                .into(),
        ));
    }
    if range.len() < max_sessions as u64 {
        return Err((
            "commands.uid_range",
            range.to_string(),
            format!("at least sessions.max_sessions ({max_sessions}) uids, one per live session"),
        ));
    }
    if let Some((kind, name, id)) = account_in(range) {
        return Err((
            "commands.uid_range",
            range.to_string(),
            format!(
                "uids (and gids) that belong to no account: {kind} {name:?} has id {id}; pick a range no user or group of this host uses"
            ),
        ));
    }
    if !state_dir.is_absolute() {
        return Err((
            "commands.state_dir",
            state_dir.display().to_string(),
            "an absolute path".into(),
        ));
    }
    // Each session must reach its home through every directory above it.
    for dir in state_dir.ancestors() {
        if let Ok(meta) = std::fs::metadata(dir) {
            if meta.mode() & 0o001 == 0 {
                return Err((
                    "commands.state_dir",
                    state_dir.display().to_string(),
                    format!(
                        "a directory every ancestor of which others may search (o+x): {} has mode {:04o}, so no session could reach its home",
                        dir.display(),
                        meta.mode() & 0o7777
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// For `check-config`: both isolation modes, which one is in force and what it means.
pub fn explain(
    mode: IsolationMode,
    range: UidRange,
    state_dir: &Path,
    private_tmp: bool,
    run_as_user: &str,
) -> String {
    let runs_as = if run_as_user.is_empty() {
        "the daemon's own user".to_string()
    } else {
        format!("user {run_as_user:?}")
    };
    let shared = format!(
        "shared: every session's commands run as {runs_as}; sessions separate shell state and limits, not trust (one can signal, ptrace and read another)"
    );
    let tmp = if private_tmp {
        "TMPDIR is HOME/tmp".to_string()
    } else {
        "TMPDIR is unset: /tmp is shared (private_tmp = true gives each session its own)"
            .to_string()
    };
    let per_session = format!(
        "uid-per-session: each session runs as a uid and gid of its own from {range} with no supplementary groups; its HOME and default cwd is {}/<uid> (0700, removed with the session); {tmp}; no session can signal, ptrace or read another's processes or private files, and rlimits.nproc is per session",
        state_dir.display()
    );
    let (on, off) = match mode {
        IsolationMode::Shared => (shared, per_session),
        IsolationMode::UidPerSession => (per_session, shared),
    };
    format!("# isolation in force: {on}\n# the other mode: {off}\n")
}

/// The first user or group whose id is in `range`, as (kind, name, id).
fn account_in(range: UidRange) -> Option<(&'static str, String, u32)> {
    // getpwent/getgrent walk a process-wide cursor: one walker at a time.
    static WALK: Mutex<()> = Mutex::new(());
    let _walk = WALK.lock().unwrap_or_else(|p| p.into_inner());
    let name = |p: *const libc::c_char| {
        // SAFETY: a NUL-terminated name from the entry libc just returned.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    };
    let mut found = None;
    // SAFETY: the enumeration functions are used under WALK; each entry is
    // read before the next call overwrites it.
    unsafe {
        libc::setpwent();
        loop {
            let p = libc::getpwent();
            if p.is_null() {
                break;
            }
            if range.contains((*p).pw_uid) {
                found = Some(("user", name((*p).pw_name), (*p).pw_uid));
                break;
            }
        }
        libc::endpwent();
        if found.is_none() {
            libc::setgrent();
            loop {
                let g = libc::getgrent();
                if g.is_null() {
                    break;
                }
                if range.contains((*g).gr_gid) {
                    found = Some(("group", name((*g).gr_name), (*g).gr_gid));
                    break;
                }
            }
            libc::endgrent();
        }
    }
    found
}

/// What [`Isolation::recover`] found of a dead daemon.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovered {
    /// Uids that had a home or a live process.
    pub uids: usize,
    /// Live processes of those uids, killed.
    pub processes: usize,
}

/// The uid pool of a `uid-per-session` daemon, with its state directory.
#[derive(Debug)]
pub struct Isolation {
    range: UidRange,
    state_dir: PathBuf,
    /// The state directory, opened once (homes are made and removed through it).
    state_fd: OwnedFd,
    private_tmp: bool,
    pool: Mutex<UidPool>,
    /// An exclusive flock on `state_dir/.lock` for the daemon's life.
    _lock: OwnedFd,
}

impl Isolation {
    /// Creates `state_dir` (0711, root's) when missing, checks it, and locks
    /// it, so a second daemon given the same one refuses to start rather than
    /// "recover" the first one's live sessions. Blocking.
    pub fn init(
        range: UidRange,
        state_dir: &Path,
        private_tmp: bool,
    ) -> Result<Isolation, IsolationError> {
        let fail = |why: String| IsolationError::StateDir {
            path: state_dir.to_path_buf(),
            why,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(state_dir)
            .map_err(|e| fail(format!("cannot create it: {e}")))?;
        let state_fd = cleanup::open_dir(None, state_dir.as_os_str()).map_err(|e| {
            fail(match e {
                Errno::ELOOP | Errno::ENOTDIR => {
                    "is not a directory (or is a symlink); point state_dir at a real directory"
                        .into()
                }
                e => format!("cannot open it: {e}"),
            })
        })?;
        let st = fstat(&state_fd).map_err(|e| fail(format!("cannot stat it: {e}")))?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 || st.st_mode & 0o001 == 0 {
            return Err(fail(format!(
                "is owned by uid {} with mode {:04o}; it must be root's, writable by root only and searchable by others (fix: chown root {dir} && chmod 0711 {dir})",
                st.st_uid,
                st.st_mode & 0o7777,
                dir = state_dir.display()
            )));
        }
        let lock = openat(
            &state_fd,
            ".lock",
            OFlag::O_CREAT | OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| fail(format!("cannot open its .lock: {e}")))?;
        // SAFETY: flock on an fd we own; non-blocking.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(IsolationError::Locked(state_dir.to_path_buf()));
        }
        Ok(Isolation {
            range,
            state_dir: state_dir.to_path_buf(),
            state_fd,
            private_tmp,
            pool: Mutex::new(UidPool::new(range)),
            _lock: lock,
        })
    }

    /// The uid range in force.
    pub fn range(&self) -> UidRange {
        self.range
    }

    /// At start, before any session: everything a dead daemon's sessions
    /// left is removed. Uids with a home under `state_dir` or any live
    /// process in /proc are cleaned one by one (processes killed, home
    /// removed); then IPC objects and shared-tmp files of every uid of the
    /// range go. A uid whose processes do not die is held back. Blocking.
    pub fn recover(&self) -> Recovered {
        let range = self.range;
        let in_range = |u: u32| range.contains(u);
        let mut uids: std::collections::BTreeSet<u32> = self.homes().into_iter().collect();
        let procs = cleanup::processes_of(&in_range);
        uids.extend(procs.iter().map(|(_, uid)| *uid));
        for &uid in &uids {
            if let Err(e) = self.kill_processes(uid) {
                tracing::error!(uid, error = %e, "recovery: uid held back");
                self.pool().mark_dirty(uid);
            }
            cleanup::remove_tree_at(&self.state_fd, OsStr::new(&uid.to_string()));
        }
        cleanup::remove_sysv_ipc(&in_range);
        cleanup::remove_files_in(&cleanup::SHARED_TMP, &in_range);
        Recovered {
            uids: uids.len(),
            processes: procs.len(),
        }
    }

    /// Uids with a home under `state_dir`.
    fn homes(&self) -> Vec<u32> {
        std::fs::read_dir(&self.state_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|uid| self.range.contains(*uid))
            .collect()
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, UidPool> {
        // Each pool operation is a single queue/set update: poisoning leaves nothing half done.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leases the least recently used clean uid and makes its home (0700,
    /// owned by the uid; with `private_tmp`, a `tmp` inside). Only when no
    /// uid is free are those whose cleanup failed earlier retried (a retry
    /// may wait for processes that will not die). Blocking.
    pub fn acquire(self: &Arc<Self>) -> Result<Lease, IsolationError> {
        let mut taken = self.pool().take();
        if taken.is_none() {
            let dirty = self.pool().dirty();
            for uid in dirty {
                if self.clean(uid).is_ok() {
                    tracing::info!(uid, "uid cleaned on retry; free again");
                    self.pool().put_back(uid);
                }
            }
            taken = self.pool().take();
        }
        let uid = taken.ok_or_else(|| {
            let pool = self.pool();
            IsolationError::Exhausted {
                leased: pool.leased().len(),
                dirty: pool.dirty().len(),
            }
        })?;
        let lease = Lease {
            iso: self.clone(),
            uid,
            released: false,
        };
        // On an error the lease's Drop cleans what was made and frees the uid.
        self.make_home(uid)?;
        Ok(lease)
    }

    fn make_home(&self, uid: u32) -> Result<(), IsolationError> {
        let name = uid.to_string();
        let home = self.state_dir.join(&name);
        let err = |errno| IsolationError::Home {
            path: home.clone(),
            errno,
        };
        // A leftover of a removal that failed: never reuse what is in it.
        cleanup::remove_tree_at(&self.state_fd, OsStr::new(&name));
        mkdirat(
            &self.state_fd,
            name.as_str(),
            Mode::from_bits_truncate(0o700),
        )
        .map_err(err)?;
        let dir = cleanup::open_dir(Some(&self.state_fd), OsStr::new(&name)).map_err(err)?;
        own(&dir, uid).map_err(err)?;
        if self.private_tmp {
            mkdirat(&dir, "tmp", Mode::from_bits_truncate(0o700)).map_err(err)?;
            let tmp = cleanup::open_dir(Some(&dir), OsStr::new("tmp")).map_err(err)?;
            own(&tmp, uid).map_err(err)?;
        }
        Ok(())
    }

    /// Kills every process of `uid` until /proc shows none alive.
    fn kill_processes(&self, uid: u32) -> Result<(), IsolationError> {
        let mine = |u: u32| u == uid;
        for _ in 0..timing::UID_KILL_ROUNDS {
            if cleanup::processes_of(&mine).is_empty() {
                return Ok(());
            }
            if let Err(e) = as_uid::kill_all(uid, uid) {
                tracing::warn!(uid, error = %e, "cannot kill the processes of a uid");
            }
            std::thread::sleep(timing::UID_KILL_POLL);
        }
        let left = cleanup::processes_of(&mine).len();
        if left == 0 {
            return Ok(());
        }
        Err(IsolationError::ProcessesLeft { uid, left })
    }

    /// Removes everything of `uid`: processes, IPC objects, shared-tmp files, home.
    fn clean(&self, uid: u32) -> Result<(), IsolationError> {
        self.kill_processes(uid)?;
        let mine = |u: u32| u == uid;
        cleanup::remove_sysv_ipc(&mine);
        cleanup::remove_files_in(&cleanup::SHARED_TMP, &mine);
        let name = uid.to_string();
        if !cleanup::remove_tree_at(&self.state_fd, OsStr::new(&name)) {
            return Err(IsolationError::HomeLeft {
                uid,
                path: self.state_dir.join(name),
            });
        }
        Ok(())
    }

    /// Cleans `uid` and frees it, or holds it back when the cleanup failed.
    fn release_uid(&self, uid: u32) {
        match self.clean(uid) {
            Ok(()) => self.pool().put_back(uid),
            Err(e) => {
                tracing::error!(uid, error = %e, "uid held back until its cleanup succeeds");
                self.pool().mark_dirty(uid);
            }
        }
    }

    /// At exit: cleans every uid still leased or held back (a forced stop
    /// leaves sessions that never ended). Blocking.
    pub fn release_all(&self) {
        let uids: Vec<u32> = {
            let pool = self.pool();
            pool.leased().into_iter().chain(pool.dirty()).collect()
        };
        for uid in uids {
            self.release_uid(uid);
        }
    }
}

/// Gives an open directory to `uid` (and the same gid), mode 0700.
fn own(dir: &OwnedFd, uid: u32) -> Result<(), Errno> {
    nix::unistd::fchown(
        dir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    )?;
    fchmod(dir, Mode::from_bits_truncate(0o700))?;
    Ok(())
}

/// A session's uid and home, for the session's life. Released (everything
/// of the uid removed, the uid freed) by [`Lease::release`] when the session
/// ends, or by `Drop` when its actor dies without ending.
#[derive(Debug)]
pub struct Lease {
    iso: Arc<Isolation>,
    uid: u32,
    released: bool,
}

impl Lease {
    /// The uid (and gid) of the session.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// What the session's commands run as: the uid, the same gid, no supplementary groups.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            uid: self.uid,
            gid: self.uid,
        }
    }

    /// The session's home: its default cwd and `HOME`.
    pub fn home(&self) -> PathBuf {
        self.iso.state_dir.join(self.uid.to_string())
    }

    /// The session's `TMPDIR` under `private_tmp`.
    pub fn tmpdir(&self) -> Option<PathBuf> {
        self.iso.private_tmp.then(|| self.home().join("tmp"))
    }

    /// Whether the session's uid may enter `dir`, as its commands would try
    /// (modes, ACLs, every component of the path). Blocking.
    pub fn can_enter(&self, dir: &Path) -> Result<(), Errno> {
        let path = cleanup::c_path(dir).ok_or(Errno::EINVAL)?;
        as_uid::can_enter(self.uid, self.uid, &path)
    }

    /// Removes everything of the session's uid and frees it. Blocking.
    pub fn release(mut self) {
        self.released = true;
        self.iso.release_uid(self.uid);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (iso, uid) = (self.iso.clone(), self.uid);
        // Blocking cleanup: off the async workers when a runtime is there.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || iso.release_uid(uid));
            }
            Err(_) => iso.release_uid(uid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_nonsense() {
        let r: UidRange = "200000-265535".parse().unwrap();
        assert_eq!((r.first, r.last, r.len()), (200000, 265535, 65536));
        assert_eq!(r.to_string(), "200000-265535");
        for bad in ["", "5", "0-10", "10-5", "a-b", "1-4294967295"] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_range_holding_an_account_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: uid-per-session needs a root daemon, so its checks run as root");
            return;
        }
        // Root's uid 0 is never in a range; `nobody` (65534) almost always exists.
        let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
            eprintln!("skipped: no `nobody` account here");
            return;
        };
        let n = nobody.uid.as_raw();
        let range = UidRange {
            first: n - 1,
            last: n + 1,
        };
        let (key, _, allowed) = check_config(
            IsolationMode::UidPerSession,
            range,
            Path::new("/var/lib/sessiond"),
            "",
            1,
        )
        .unwrap_err();
        assert_eq!(key, "commands.uid_range");
        assert!(allowed.contains("belong to no account"), "{allowed}");
    }
}
