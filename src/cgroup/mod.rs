//! Kernel isolation layer: one cgroup per session (limits) and one leaf per command, on cgroup v2 or v1; owned by SessionActor and CommandActor.
//!
//! Layout: `<parent>/session-<key>` carries memory, CPU and pids limits;
//! each command runs in its own leaf `<parent>/session-<key>/cmd-<n>`, joined
//! by the command's process before it executes anything (the spawn child
//! writes "0" to `cgroup.procs` files opened here). One leaf per command
//! tells which command the OOM killer hit, and lets a timeout kill that
//! command's tree only, while background processes of earlier commands live
//! on in their leaves until the session ends.
//!
//! Why files, not cgroups-rs (docs/design-notes.md, "cgroups"): it can
//! only add a process after spawn (grandchildren escaped 3 of 3 runs), that
//! its kill refuses v1, and that on v2 several calls are wrong or silent (zero
//! OOM count, ignored subtree_control failures, destroy moving live processes
//! instead of killing them). What we need is a handful of files per version,
//! written and read here, each checked; all of it is blocking I/O, called off
//! the async workers (`spawn_blocking`). OS roots (mountinfo, the cgroup
//! mounts, /proc/self/cgroup) are parameters, so both backends and the
//! detection are tested against fake trees.
//!
//! Files: this one is the facade ([`Cgroups`]) and the [`Backend`] trait
//! `v1.rs` and `v2.rs` implement; `detect.rs` finds the mounts and picks the
//! backend; `node.rs` holds the owned nodes ([`CgroupNode`]); `pool.rs` a
//! session's command leaves, made ahead ([`SessionLeaves`]); `limits.rs` the
//! config, limits and their minimums; `fs.rs` the file helpers and the lock;
//! `error.rs` [`CgroupError`].

pub mod detect;
pub mod error;
pub mod fs;
pub mod limits;
pub mod node;
pub mod pool;
pub mod v1;
pub mod v2;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use detect::OsRoots;
pub use error::CgroupError;
pub use limits::{
    CPU_PERIOD_US, CgroupLimits, CgroupMode, CgroupsConfig, MIN_CPU_CORES, MIN_MEMORY_BYTES,
    MIN_PIDS,
};
pub use node::CgroupNode;
pub use pool::{CommandLeaf, SessionLeaves, SessionLeavesHandle};

use error::io_err;

/// One cgroup hierarchy layout (v1 or v2): the operations the facade needs,
/// on nodes named by their path below our subtree (`session-1/cmd-2`). All
/// blocking.
pub trait Backend: std::fmt::Debug + Send + Sync {
    /// "v1" or "v2".
    fn name(&self) -> &'static str;
    /// Creates the node `rel` (an existing one is an error): with `limits`
    /// a session, and they are written; without, a command's leaf (v1 makes
    /// it only in the hierarchies where it counts or kills something).
    fn create(&self, rel: &str, limits: Option<&CgroupLimits>) -> Result<(), CgroupError>;
    /// The `cgroup.procs` files a process writes "0" to, to join command leaf `rel`.
    fn procs_files(&self, rel: &str) -> Vec<PathBuf>;
    /// Kills every process in `rel` and below, and waits until it is empty.
    fn kill(&self, rel: &str) -> Result<(), CgroupError>;
    /// Whether `rel` still holds processes.
    fn populated(&self, rel: &str) -> bool;
    /// Removes the node (it must be empty); one already gone is fine.
    fn remove(&self, rel: &str) -> Result<(), CgroupError>;
    /// The files of `rel`'s OOM kills, peak memory and refused forks, which
    /// a command's leaf opens when it is made and reads at the command's end.
    fn counter_files(&self, rel: &str) -> pool::CounterFiles;
    /// OOM kills of `rel`, read by path from its [`Backend::counter_files`]
    /// (the daemon reads them from the files its leaf holds open; the
    /// backends' tests check the files they name).
    #[cfg(test)]
    fn oom_kills(&self, rel: &str) -> u64 {
        let files = self.counter_files(rel);
        fs::read_key(&files.oom.0, files.oom.1).unwrap_or(0)
    }
    /// Peak memory of `rel`, read by path like [`Backend::oom_kills`].
    #[cfg(test)]
    fn memory_peak(&self, rel: &str) -> Option<u64> {
        fs::read_u64(&self.counter_files(rel).peak)
    }
    /// Whether [`Backend::reset_leaf`] can ever succeed.
    fn reuses_leaves(&self) -> bool {
        false
    }
    /// Starts the peak of the empty command leaf `rel` over, for another
    /// command, where the kernel allows it: whether it did. Its OOM and
    /// fork counters keep counting, and the pool reads all three as growth
    /// from the reset.
    fn reset_leaf(&self, _rel: &str) -> bool {
        false
    }
    /// The child nodes of `rel` ("" for the sessions), for recovery and teardown.
    fn children(&self, rel: &str) -> Vec<String>;
    /// The base directories of our subtree; the first is the one we lock.
    fn base_dirs(&self) -> Vec<PathBuf>;
    /// Undoes what setting up changed outside the base directories (v2: the
    /// daemon's leaf and the controllers enabled on its own cgroup), after
    /// they are removed or when the start fails.
    fn release(&self) {}
}

/// The daemon's cgroup subtree and the limits sessions start from.
#[derive(Debug)]
pub struct Cgroups {
    backend: Box<dyn Backend>,
    /// An exclusive flock on our subtree's base directory, held for the
    /// daemon's life: a second daemon with the same `parent` refuses to start
    /// instead of sharing (and, at its start, "recovering") our sessions.
    _lock: OwnedFd,
    /// Source of command leaf names.
    next_command: AtomicU64,
    /// Forks refused by sessions' pids limits, daemon-wide (see
    /// [`SessionLeaves`]: counted at each command's end, the rest at its
    /// session's end).
    pids_limit_hits: AtomicU64,
}

impl Cgroups {
    /// Sets up the subtree for `config.mode` (see [`detect::backend`]).
    /// `Ok(None)`: cgroups off (asked, or `auto` found nothing usable —
    /// logged once). An explicit mode that cannot work is an error: the
    /// daemon refuses to start.
    pub fn init(config: &CgroupsConfig, roots: &OsRoots) -> Result<Option<Cgroups>, CgroupError> {
        let Some(backend) = detect::backend(config, roots)? else {
            return Ok(None);
        };
        let lock_dir = backend
            .base_dirs()
            .into_iter()
            .next()
            .expect("a backend has a base");
        let lock = match fs::lock_subtree(&lock_dir) {
            Ok(lock) => lock,
            Err(e) => {
                backend.release();
                return Err(e);
            }
        };
        Ok(Some(Cgroups {
            backend,
            _lock: lock,
            next_command: AtomicU64::new(1),
            pids_limit_hits: AtomicU64::new(0),
        }))
    }

    /// "v1" or "v2", for `system.stats`.
    pub fn mode_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Forks refused by sessions' pids limits so far, for `system.stats`.
    pub fn pids_limit_hits_total(&self) -> u64 {
        self.pids_limit_hits.load(Ordering::Relaxed)
    }

    pub(crate) fn count_pids_limit_hits(&self, n: u64) {
        self.pids_limit_hits.fetch_add(n, Ordering::Relaxed);
    }

    /// The counter files of `rel`.
    pub(crate) fn counter_files(&self, rel: &str) -> pool::CounterFiles {
        self.backend.counter_files(rel)
    }

    /// Creates the cgroup of session `key` with `limits`; returns its node name.
    pub fn create_session(&self, key: u64, limits: &CgroupLimits) -> Result<String, CgroupError> {
        let rel = format!("session-{key}");
        let created = self.backend.create(&rel, Some(limits));
        if created.is_err() {
            let _ = self.backend.remove(&rel);
        }
        created.map(|()| rel)
    }

    /// Creates a command leaf in `session`; returns its node name.
    pub fn create_command(&self, session: &str) -> Result<String, CgroupError> {
        let rel = format!(
            "{session}/cmd-{}",
            self.next_command.fetch_add(1, Ordering::Relaxed)
        );
        self.backend.create(&rel, None)?;
        Ok(rel)
    }

    /// Opens the `cgroup.procs` files of `rel` for writing (close-on-exec):
    /// the spawn child writes "0" to each before it executes anything.
    pub fn open_procs(&self, rel: &str) -> Result<Vec<OwnedFd>, CgroupError> {
        let files = self.backend.procs_files(rel);
        files
            .iter()
            .map(|f| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)
                    .map(OwnedFd::from)
                    .map_err(|e| io_err("open", f, e))
            })
            .collect()
    }

    /// Kills every process in `rel` and below, and waits until it is empty.
    pub fn kill(&self, rel: &str) -> Result<(), CgroupError> {
        self.backend.kill(rel)
    }

    /// Whether `rel` still holds processes (background children of a command).
    pub fn populated(&self, rel: &str) -> bool {
        self.backend.populated(rel)
    }

    /// Removes an empty node.
    pub fn remove(&self, rel: &str) -> Result<(), CgroupError> {
        self.backend.remove(rel)
    }

    /// Kills everything in a node (a session, a command leaf) and removes its
    /// leaves and itself.
    pub fn destroy(&self, node: &str) -> Result<(), CgroupError> {
        let killed = self.kill(node);
        // A command being spawned at this moment may add a leaf after we
        // listed them: kill and list again until the node can go.
        let mut removed = Err(CgroupError::NotEmpty(PathBuf::from(node)));
        for _ in 0..3 {
            for child in self.backend.children(node) {
                let rel = format!("{node}/{child}");
                let _ = self.kill(&rel);
                let _ = self.remove(&rel);
            }
            removed = self.remove(node);
            if removed.is_ok() {
                break;
            }
        }
        killed.and(removed)
    }

    /// Crash recovery: kills and removes every session cgroup left by an
    /// earlier daemon (SIGKILL, power loss); returns how many.
    pub fn recover_stale(&self) -> u64 {
        let stale = self.backend.children("");
        let mut recovered = 0;
        for session in stale {
            match self.destroy(&session) {
                Ok(()) => recovered += 1,
                Err(e) => {
                    tracing::error!(session, error = %e, "cannot clean up a stale session cgroup")
                }
            }
        }
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "killed and removed session cgroups left by an earlier daemon"
            );
        }
        recovered
    }

    /// At exit: destroys whatever sessions remain, removes our subtree and
    /// restores our own cgroup as it was at start (a daemon started again in
    /// it then finds it usable).
    pub fn teardown(&self) {
        self.recover_stale();
        for dir in self.backend.base_dirs() {
            let _ = std::fs::remove_dir(dir);
        }
        self.backend.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_on_a_fake_pure_v2_host_sets_up_the_v2_backend() {
        let root = tempfile::tempdir().unwrap();
        let mount = root.path().join("cgroup");
        std::fs::create_dir_all(mount.join("user.slice/sessiond")).unwrap();
        std::fs::write(
            mount.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(
            mount.join("user.slice/sessiond/cgroup.controllers"),
            "cpu memory pids\n",
        )
        .unwrap();
        std::fs::write(
            mount.join("user.slice/sessiond/cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let mountinfo = root.path().join("mountinfo");
        std::fs::write(
            &mountinfo,
            format!("25 1 0:22 / {} rw - cgroup2 cgroup2 rw\n", mount.display()),
        )
        .unwrap();
        let self_cgroup = root.path().join("cgroup-self");
        std::fs::write(&self_cgroup, "0::/user.slice/sessiond\n").unwrap();
        let config = CgroupsConfig {
            parent: "sd".into(),
            ..Default::default()
        };
        let cg = Cgroups::init(
            &config,
            &OsRoots {
                mountinfo,
                self_cgroup,
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(cg.mode_name(), "v2");
        assert!(
            mount
                .join("user.slice/sessiond/daemon/cgroup.procs")
                .exists()
        );
        let s = cg
            .create_session(7, &CgroupLimits::from_config(&config))
            .unwrap();
        assert_eq!(s, "session-7");
        assert_eq!(
            std::fs::read_to_string(mount.join("user.slice/sessiond/sd/session-7/memory.max"))
                .unwrap(),
            "1073741824"
        );
        let c = cg.create_command(&s).unwrap();
        assert!(mount.join("user.slice/sessiond/sd").join(&c).is_dir());
    }

    #[test]
    fn an_explicit_mode_that_cannot_work_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let mountinfo = root.path().join("mountinfo");
        std::fs::write(&mountinfo, "").unwrap();
        let roots = OsRoots {
            mountinfo,
            self_cgroup: root.path().join("none"),
        };
        let v2 = CgroupsConfig {
            mode: CgroupMode::V2,
            ..Default::default()
        };
        assert!(matches!(
            Cgroups::init(&v2, &roots),
            Err(CgroupError::Unusable { .. })
        ));
        let auto = CgroupsConfig::default();
        assert!(
            Cgroups::init(&auto, &roots).unwrap().is_none(),
            "auto falls back to off"
        );
    }
}
