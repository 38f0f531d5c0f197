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
//! Why files and not the cgroups-rs crate: design-rules measured that it can
//! only add a process after spawn (grandchildren escaped 3 of 3 runs), that
//! its kill refuses v1, and that on v2 several calls are wrong or silent (zero
//! OOM count, ignored subtree_control failures, destroy moving live processes
//! instead of killing them). What we need is a handful of files per version,
//! written and read here, each checked; all of it is blocking I/O, called off
//! the async workers (`spawn_blocking`). OS roots (mountinfo, the cgroup
//! mounts, /proc/self/cgroup) are parameters, so the v2 backend is tested
//! against a fake tree on this hybrid host.

pub mod node;
pub mod v1;
pub mod v2;

pub use node::{CgroupNode, LeafParent};

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// cpu.max / cfs period, µs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long a kill may take to empty a cgroup.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// `[cgroups] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Use what the host offers; off with one warning when nothing usable.
    Auto,
    V2,
    V1,
    Off,
}

/// `[cgroups]`: one cgroup per session with hard limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupsConfig {
    /// auto | v2 | v1 | off.
    pub mode: CgroupMode,
    /// Our subtree: under the daemon's own cgroup (v2) or each controller's root (v1).
    pub parent: String,
    /// memory.max per session.
    pub memory_max: ByteSize,
    /// cpu.max per session, in cores.
    pub cpu_max_cores: f64,
    /// pids.max per session (counts threads: a JVM needs ≥ 64).
    pub pids_max: u64,
}

impl Default for CgroupsConfig {
    fn default() -> Self {
        CgroupsConfig {
            mode: CgroupMode::Auto,
            parent: "sessiond".into(),
            memory_max: ByteSize::gib(1),
            cpu_max_cores: 1.0,
            pids_max: 512,
        }
    }
}

/// The limits of one session's cgroup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    pub memory_max: u64,
    pub cpu_max_cores: f64,
    pub pids_max: u64,
}

impl CgroupLimits {
    /// The configured defaults.
    pub fn from_config(c: &CgroupsConfig) -> CgroupLimits {
        CgroupLimits {
            memory_max: c.memory_max.as_u64(),
            cpu_max_cores: c.cpu_max_cores,
            pids_max: c.pids_max,
        }
    }

    /// CPU quota per period, µs.
    pub fn cpu_quota_us(&self) -> u64 {
        ((self.cpu_max_cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
    }
}

/// Why a cgroup operation failed: the path and the error.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is missing after creation: the controller is not enabled for our subtree")]
    MissingController(PathBuf),
    #[error("{0} still holds processes after the kill")]
    NotEmpty(PathBuf),
    #[error("cgroup mode {mode:?} is not usable here: {why}")]
    Unusable { mode: CgroupMode, why: String },
    #[error(
        "cgroups.parent {0} is in use by another running sessiond: give each daemon its own parent"
    )]
    InUse(PathBuf),
    #[error("the blocking cgroup task failed: {0}")]
    Task(String),
}

pub(crate) fn io_err(action: &'static str, path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

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
    let text = std::fs::read_to_string(file).ok()?;
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

/// Where the OS keeps what detection reads; parameters so tests can fake them.
#[derive(Debug, Clone)]
pub struct OsRoots {
    pub mountinfo: PathBuf,
    pub self_cgroup: PathBuf,
}

impl Default for OsRoots {
    fn default() -> Self {
        OsRoots {
            mountinfo: "/proc/self/mountinfo".into(),
            self_cgroup: "/proc/self/cgroup".into(),
        }
    }
}

/// The cgroup mounts of this host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mounts {
    /// A cgroup2 mount (the whole tree on pure v2; `unified` on a hybrid host).
    pub cgroup2: Option<PathBuf>,
    /// v1 controller name → mount point.
    pub v1: Vec<(String, PathBuf)>,
}

impl Mounts {
    /// Parses /proc/self/mountinfo: `… mountpoint … - fstype source superopts`.
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut m = Mounts::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let (fstype, _source, opts) = (r.next(), r.next(), r.next().unwrap_or(""));
            match fstype {
                Some("cgroup2") => {
                    m.cgroup2.get_or_insert_with(|| PathBuf::from(point));
                }
                Some("cgroup") => {
                    for opt in opts.split(',') {
                        if matches!(opt, "memory" | "cpu" | "pids" | "freezer") {
                            m.v1.push((opt.to_string(), PathBuf::from(point)));
                        }
                    }
                }
                _ => {}
            }
        }
        m
    }

    fn v1_mount(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p.as_path())
    }
}

/// The backend in use: same operations, one implementation per version.
#[derive(Debug, Clone)]
pub enum Backend {
    V1(v1::V1),
    V2(v2::V2),
}

macro_rules! forward {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.backend {
            Backend::V1($b) => $e,
            Backend::V2($b) => $e,
        }
    };
}

/// The daemon's cgroup subtree and the limits sessions start from.
#[derive(Debug)]
pub struct Cgroups {
    backend: Backend,
    /// An exclusive flock on our subtree's base directory, held for the
    /// daemon's life: a second daemon with the same `parent` refuses to start
    /// instead of sharing (and, at its start, "recovering") our sessions.
    _lock: OwnedFd,
    /// Source of command leaf names.
    next_command: AtomicU64,
}

impl Cgroups {
    /// Sets up the subtree for `config.mode`. `Ok(None)`: cgroups off (asked,
    /// or `auto` found nothing usable — logged once). An explicit mode that
    /// cannot work is an error: the daemon refuses to start.
    pub fn init(config: &CgroupsConfig, roots: &OsRoots) -> Result<Option<Cgroups>, CgroupError> {
        let mode = config.mode;
        if mode == CgroupMode::Off {
            return Ok(None);
        }
        let mounts = Mounts::parse(&std::fs::read_to_string(&roots.mountinfo).unwrap_or_default());
        let attempt = |want: CgroupMode| -> Result<Backend, CgroupError> {
            let unusable = |why: String| CgroupError::Unusable { mode: want, why };
            match want {
                CgroupMode::V2 => {
                    let mount = mounts
                        .cgroup2
                        .clone()
                        .ok_or_else(|| unusable("no cgroup2 mount".into()))?;
                    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers"))
                        .unwrap_or_default();
                    for c in ["memory", "cpu", "pids"] {
                        if !controllers.split_whitespace().any(|x| x == c) {
                            return Err(unusable(format!(
                                "the {c} controller is not available in {}",
                                mount.display()
                            )));
                        }
                    }
                    let own = own_v2_cgroup(&roots.self_cgroup)
                        .ok_or_else(|| unusable("no v2 entry in /proc/self/cgroup".into()))?;
                    Ok(Backend::V2(v2::V2::setup(
                        &mount,
                        &own,
                        &config.parent,
                        std::process::id(),
                    )?))
                }
                CgroupMode::V1 => {
                    let need = |c: &str| {
                        mounts
                            .v1_mount(c)
                            .map(Path::to_path_buf)
                            .ok_or_else(|| unusable(format!("no v1 {c} hierarchy mounted")))
                    };
                    let (memory, cpu, pids) = (need("memory")?, need("cpu")?, need("pids")?);
                    Ok(Backend::V1(v1::V1::setup(
                        &memory,
                        &cpu,
                        &pids,
                        mounts.v1_mount("freezer"),
                        mounts.cgroup2.as_deref(),
                        &config.parent,
                    )?))
                }
                CgroupMode::Auto | CgroupMode::Off => unreachable!("resolved below"),
            }
        };
        let backend = match mode {
            CgroupMode::Auto => {
                // Pure v2 when the cgroup2 mount has the controllers, else v1 (a hybrid host).
                let first = if mounts.v1_mount("memory").is_some() {
                    CgroupMode::V1
                } else {
                    CgroupMode::V2
                };
                match attempt(first) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "cgroups unavailable; running without the kernel isolation layer (mode = off)");
                        return Ok(None);
                    }
                }
            }
            explicit => attempt(explicit)?,
        };
        let lock_dir = match &backend {
            Backend::V1(b) => b
                .base_dirs()
                .into_iter()
                .next()
                .expect("v1 has a memory base"),
            Backend::V2(b) => b.base().to_path_buf(),
        };
        let lock = lock_subtree(&lock_dir)?;
        Ok(Some(Cgroups {
            backend,
            _lock: lock,
            next_command: AtomicU64::new(1),
        }))
    }

    /// "v1" or "v2", for `system.stats`.
    pub fn mode_name(&self) -> &'static str {
        match self.backend {
            Backend::V1(_) => "v1",
            Backend::V2(_) => "v2",
        }
    }

    /// Creates the cgroup of session `key` with `limits`; returns its node name.
    pub fn create_session(&self, key: u64, limits: &CgroupLimits) -> Result<String, CgroupError> {
        let rel = format!("session-{key}");
        let created = forward!(self, b => b.create(&rel, Some(limits)));
        if created.is_err() {
            let _ = forward!(self, b => b.remove(&rel));
        }
        created.map(|()| rel)
    }

    /// Creates a command leaf in `session`; returns its node name.
    pub fn create_command(&self, session: &str) -> Result<String, CgroupError> {
        let rel = format!(
            "{session}/cmd-{}",
            self.next_command.fetch_add(1, Ordering::Relaxed)
        );
        forward!(self, b => b.create(&rel, None))?;
        Ok(rel)
    }

    /// Opens the `cgroup.procs` files of `rel` for writing (close-on-exec):
    /// the spawn child writes "0" to each before it executes anything.
    pub fn open_procs(&self, rel: &str) -> Result<Vec<OwnedFd>, CgroupError> {
        let files = forward!(self, b => b.procs_files(rel));
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
        forward!(self, b => b.kill(rel))
    }

    /// Whether `rel` still holds processes (background children of a command).
    pub fn populated(&self, rel: &str) -> bool {
        forward!(self, b => b.populated(rel))
    }

    /// Removes an empty node.
    pub fn remove(&self, rel: &str) -> Result<(), CgroupError> {
        forward!(self, b => b.remove(rel))
    }

    /// OOM kills inside `rel` so far.
    pub fn oom_kills(&self, rel: &str) -> u64 {
        forward!(self, b => b.oom_kills(rel))
    }

    /// Peak memory of `rel`, where the kernel reports it.
    pub fn memory_peak(&self, rel: &str) -> Option<u64> {
        forward!(self, b => b.memory_peak(rel))
    }

    /// Kills everything in a node (a session, a command leaf) and removes its
    /// leaves and itself.
    pub fn destroy(&self, session: &str) -> Result<(), CgroupError> {
        let killed = self.kill(session);
        // A command being spawned at this moment may add a leaf after we
        // listed them: kill and list again until the session can go.
        let mut removed = Err(CgroupError::NotEmpty(PathBuf::from(session)));
        for _ in 0..3 {
            for cmd in forward!(self, b => b.commands(session)) {
                let rel = format!("{session}/{cmd}");
                let _ = self.kill(&rel);
                let _ = self.remove(&rel);
            }
            removed = self.remove(session);
            if removed.is_ok() {
                break;
            }
        }
        killed.and(removed)
    }

    /// Crash recovery: kills and removes every session cgroup left by an
    /// earlier daemon (SIGKILL, power loss); returns how many.
    pub fn recover_stale(&self) -> u64 {
        let stale = forward!(self, b => b.sessions());
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

    /// At exit: destroys whatever sessions remain and removes our subtree.
    pub fn teardown(&self) {
        self.recover_stale();
        match &self.backend {
            Backend::V1(b) => {
                for dir in b.base_dirs() {
                    let _ = std::fs::remove_dir(dir);
                }
            }
            Backend::V2(b) => {
                let _ = std::fs::remove_dir(b.base());
            }
        }
    }
}

/// Takes an exclusive, non-blocking flock on `dir`; the lock lives with the
/// open file we keep, and the kernel drops it when the daemon dies (so a
/// crashed daemon never blocks its successor).
fn lock_subtree(dir: &Path) -> Result<OwnedFd, CgroupError> {
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

/// The daemon's own cgroup in the v2 hierarchy, from `/proc/self/cgroup` (`0::/path`).
fn own_v2_cgroup(self_cgroup: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(self_cgroup).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_of_a_hybrid_host() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(
            m.cgroup2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            m.v1_mount("memory"),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(m.v1_mount("cpu"), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(m.v1_mount("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
    }

    #[test]
    fn mountinfo_of_a_pure_v2_host() {
        let m =
            Mounts::parse("25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n");
        assert_eq!(m.cgroup2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(m.v1.is_empty());
    }

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

    #[test]
    fn key_value_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.oom_control");
        std::fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(read_key(&f, "oom_kill"), Some(3));
        assert_eq!(read_key(&f, "missing"), None);
    }

    #[test]
    fn cpu_quota_follows_cores() {
        let l = CgroupLimits {
            memory_max: 1,
            cpu_max_cores: 0.2,
            pids_max: 1,
        };
        assert_eq!(l.cpu_quota_us(), 20_000);
    }
}
