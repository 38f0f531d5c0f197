//! cgroup v2 backend: one directory per node under `<own cgroup>/<parent>`; limits, join files, cgroup.kill, memory.events.

use std::path::{Path, PathBuf};

use super::fs::{child_dirs, kill_by_file, mkdir, mkdir_new, read_key, rmdir, wait_empty, write};
use super::{Backend, CgroupError, CgroupLimits};

/// Controllers a session needs, enabled for its children.
const CONTROLLERS: &str = "+memory +cpu +pids";

/// `cpu.weight` of the daemon's leaf and of the sessions' parent: under load
/// the daemon gets 100 times the sessions' CPU together (weights only
/// matter when CPU is short; idle, the sessions may use it all), so it keeps
/// answering while every session spins. At the root (no leaf of its own)
/// each daemon thread weighs as a nice-0 task, 100, against the parent's 10.
pub const DAEMON_CPU_WEIGHT: u64 = 1000;
pub const SESSIONS_CPU_WEIGHT: u64 = 10;

/// A delegated cgroup v2 subtree: `base` = `<mount><own cgroup>/<parent>`.
#[derive(Debug, Clone)]
pub struct V2 {
    base: PathBuf,
    /// `<mount><own cgroup>`: where we enabled controllers.
    own_dir: PathBuf,
    /// `<own>/daemon`, when we moved into it (every cgroup but the real root).
    leaf: Option<PathBuf>,
    /// The processes we moved into `leaf` (the daemon, plus the container's
    /// other processes at a cgroup namespace root), moved back at exit.
    moved: Vec<u32>,
    /// The controllers we enabled on `<own>` (those it had are left alone).
    enabled: Vec<&'static str>,
}

/// Where the daemon's own cgroup sits, which decides whether it may hold
/// processes while enabling controllers for its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The host's real root cgroup: exempt from the no-internal-processes
    /// rule, so the daemon stays where it is.
    RealRoot,
    /// The root of a cgroup namespace (a container with its own cgroupns):
    /// it looks like the root (`0::/`, the mount's top) but is an ordinary
    /// cgroup of the host, so the rule holds. Everything in it is the
    /// container's: its processes move into the leaf with the daemon.
    NamespaceRoot,
    /// A cgroup delegated to us (systemd `Delegate=yes`): it must hold no one
    /// but us.
    Delegated,
}

impl V2 {
    /// Prepares the subtree. `mount` is the cgroup2 mount (e.g. /sys/fs/cgroup),
    /// `own` the daemon's cgroup path in it (from /proc/self/cgroup, `0::/…`).
    ///
    /// 1. Unless our cgroup is the host's real root, move the daemon into a
    ///    leaf `<own>/daemon`: a cgroup that enables controllers for its
    ///    children may hold no processes, and the daemon must never sit in a
    ///    session's cgroup. At a cgroup namespace root the other processes
    ///    there (the container's init, a shell) move into the leaf too: the
    ///    namespace is the container's, and nothing else can empty that cgroup.
    ///    A delegated cgroup holding anyone else is refused before anything moves.
    /// 2. Enable memory, cpu and pids for `<own>`'s children, then create
    ///    `<own>/<parent>` and enable them for its children (the sessions).
    ///
    /// A failure part-way undoes what was done ([`V2::release`]).
    pub fn setup(
        mount: &Path,
        own: &Path,
        parent: &str,
        daemon_pid: u32,
    ) -> Result<V2, CgroupError> {
        let own_dir = mount.join(own.strip_prefix("/").unwrap_or(own));
        let unusable = |why: String| CgroupError::Unusable {
            mode: super::CgroupMode::V2,
            why,
        };
        // Check before changing anything: the controllers must be available
        // to our cgroup's children, and a delegated cgroup must hold no one
        // but us.
        let available =
            std::fs::read_to_string(own_dir.join("cgroup.controllers")).unwrap_or_default();
        for c in ["memory", "cpu", "pids"] {
            if !available.split_whitespace().any(|x| x == c) {
                return Err(unusable(format!(
                    "the {c} controller is not available in {}",
                    own_dir.display()
                )));
            }
        }
        let place = place_of(mount, &own_dir);
        let others = other_procs(&own_dir, daemon_pid);
        if place == Place::Delegated && !others.is_empty() {
            return Err(unusable(format!(
                "{} also holds processes {others:?}: it is not delegated to us (under systemd: Delegate=yes)",
                own_dir.display()
            )));
        }
        let mut v2 = V2 {
            base: own_dir.join(parent),
            own_dir,
            leaf: None,
            moved: Vec::new(),
            enabled: Vec::new(),
        };
        match v2.prepare(place, daemon_pid) {
            Ok(()) => Ok(v2),
            Err(e) => {
                v2.release();
                Err(e)
            }
        }
    }

    /// Steps 1 and 2 of [`V2::setup`], recording what it changes.
    fn prepare(&mut self, place: Place, daemon_pid: u32) -> Result<(), CgroupError> {
        let own_dir = self.own_dir.clone();
        if place != Place::RealRoot {
            let leaf = own_dir.join("daemon");
            mkdir(&leaf)?;
            self.leaf = Some(leaf.clone());
            write(&leaf.join("cgroup.procs"), &daemon_pid.to_string())?;
            self.moved.push(daemon_pid);
            if place == Place::NamespaceRoot {
                self.move_others_into(&leaf, daemon_pid)?;
            }
        }
        // Only the controllers `<own>` lacks: those are the ones to disable at exit.
        let had =
            std::fs::read_to_string(own_dir.join("cgroup.subtree_control")).unwrap_or_default();
        let missing: Vec<&'static str> = ["memory", "cpu", "pids"]
            .into_iter()
            .filter(|c| !had.split_whitespace().any(|x| x == *c))
            .collect();
        if !missing.is_empty() {
            let plus: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
            write(&own_dir.join("cgroup.subtree_control"), &plus.join(" "))?;
            if place != Place::RealRoot {
                self.enabled = missing;
            }
        }
        if let Some(leaf) = &self.leaf {
            write(&leaf.join("cpu.weight"), &DAEMON_CPU_WEIGHT.to_string())?;
        }
        mkdir(&self.base)?;
        write(&self.base.join("cgroup.subtree_control"), CONTROLLERS)?;
        write(
            &self.base.join("cpu.weight"),
            &SESSIONS_CPU_WEIGHT.to_string(),
        )?;
        Ok(())
    }

    /// Moves every other process of a namespace root into `leaf`. A process
    /// may fork meanwhile, so this repeats until the cgroup is empty; one that
    /// exits first is fine.
    fn move_others_into(&mut self, leaf: &Path, daemon_pid: u32) -> Result<(), CgroupError> {
        for _ in 0..20 {
            let others = other_procs(&self.own_dir, daemon_pid);
            if others.is_empty() {
                return Ok(());
            }
            for pid in others {
                match std::fs::write(leaf.join("cgroup.procs"), pid.to_string()) {
                    Ok(()) => self.moved.push(pid),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => {
                        return Err(CgroupError::Unusable {
                            mode: super::CgroupMode::V2,
                            why: format!(
                                "cannot move process {pid} out of the cgroup namespace root {} into {}: {e}",
                                self.own_dir.display(),
                                leaf.display()
                            ),
                        });
                    }
                }
            }
        }
        Err(CgroupError::Unusable {
            mode: super::CgroupMode::V2,
            why: format!(
                "{} keeps gaining processes: cannot empty it",
                self.own_dir.display()
            ),
        })
    }

    /// Undoes [`V2::setup`] outside the sessions' parent (removed first, by
    /// the caller): disables the controllers we enabled on `<own>`, moves
    /// the processes we moved back into `<own>` and removes `<own>/daemon`,
    /// so a daemon started again in the same cgroup finds it as it was
    /// (without this, joining `<own>` fails with EBUSY). Best effort: what
    /// cannot be undone (a session cgroup still holding processes) is logged.
    pub fn release(&self) {
        let Some(leaf) = &self.leaf else {
            // The real root: its controllers stay on (others may use them now).
            return;
        };
        let undo = || -> Result<(), CgroupError> {
            if !self.enabled.is_empty() {
                let minus: Vec<String> = self.enabled.iter().map(|c| format!("-{c}")).collect();
                write(
                    &self.own_dir.join("cgroup.subtree_control"),
                    &minus.join(" "),
                )?;
            }
            let here = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
            for pid in here
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if self.moved.contains(&pid) {
                    write(&self.own_dir.join("cgroup.procs"), &pid.to_string())?;
                }
            }
            rmdir(leaf)
        };
        if let Err(e) = undo() {
            tracing::warn!(error = %e, "cgroups: cannot restore our own cgroup as it was at start");
        }
    }

    /// Where the sessions live.
    #[cfg(test)]
    pub fn base(&self) -> &Path {
        &self.base
    }

    fn dir(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }
}

/// Which [`Place`] `own_dir` is. The real root is the only cgroup without a
/// `cgroup.type` file; a cgroup namespace root has one, though it is the
/// top of the mount and `/proc/self/cgroup` says `0::/`.
fn place_of(mount: &Path, own_dir: &Path) -> Place {
    if own_dir != mount {
        Place::Delegated
    } else if own_dir.join("cgroup.type").exists() {
        Place::NamespaceRoot
    } else {
        Place::RealRoot
    }
}

/// The processes in `dir` other than `daemon_pid`. (One of a pid namespace
/// we cannot see reads as 0: it cannot be named, so it is not listed, and
/// enabling controllers then fails with EBUSY.)
fn other_procs(dir: &Path, daemon_pid: u32) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| *p != daemon_pid && *p != 0)
        .collect()
}

impl Backend for V2 {
    fn name(&self) -> &'static str {
        "v2"
    }

    /// Creates the node `rel`; with `limits` (a session), writes them and
    /// enables the controllers for its children (its command leaves), then
    /// checks the limit files exist (a silently missing controller would
    /// leave the session unlimited).
    fn create(&self, rel: &str, limits: Option<&CgroupLimits>) -> Result<(), CgroupError> {
        let dir = self.dir(rel);
        mkdir_new(&dir)?;
        if let Some(l) = limits {
            write(&dir.join("memory.max"), &l.memory_max.to_string())?;
            write(&dir.join("memory.swap.max"), "0").ok();
            write(
                &dir.join("cpu.max"),
                &format!("{} {}", l.cpu_quota_us(), super::CPU_PERIOD_US),
            )?;
            write(&dir.join("pids.max"), &l.pids_max.to_string())?;
            write(&dir.join("cgroup.subtree_control"), CONTROLLERS)?;
            for file in ["memory.max", "pids.max", "cpu.max"] {
                if !dir.join(file).exists() {
                    return Err(CgroupError::MissingController(dir.join(file)));
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes "0" to, to join `rel`.
    fn procs_files(&self, rel: &str) -> Vec<PathBuf> {
        vec![self.dir(rel).join("cgroup.procs")]
    }

    /// Kills every process in `rel` and below (cgroup.kill), and waits until it is empty.
    fn kill(&self, rel: &str) -> Result<(), CgroupError> {
        let dir = self.dir(rel);
        kill_by_file(&dir)?;
        wait_empty(&dir)
    }

    /// Whether `rel` still holds processes.
    fn populated(&self, rel: &str) -> bool {
        read_key(&self.dir(rel).join("cgroup.events"), "populated").is_some_and(|v| v > 0)
    }

    /// Removes the node (it must be empty of processes and children).
    fn remove(&self, rel: &str) -> Result<(), CgroupError> {
        rmdir(&self.dir(rel))
    }

    /// memory.events, memory.peak, pids.events.
    fn counter_files(&self, rel: &str) -> super::pool::CounterFiles {
        let dir = self.dir(rel);
        super::pool::CounterFiles {
            oom: (dir.join("memory.events"), "oom_kill"),
            peak: dir.join("memory.peak"),
            pids: dir.join("pids.events"),
        }
    }

    /// The child nodes of `rel`.
    fn children(&self, rel: &str) -> Vec<String> {
        child_dirs(&self.dir(rel))
    }

    /// Where the sessions live.
    fn base_dirs(&self) -> Vec<PathBuf> {
        vec![self.base.clone()]
    }

    /// Restores our own cgroup as it was at start ([`V2::release`]).
    fn release(&self) {
        V2::release(self);
    }
}

#[cfg(test)]
mod tests {
    //! The v2 backend against a fake cgroupfs in a temp dir (this host is hybrid).
    use super::*;

    fn fake_tree() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/sessiond.service");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(
            own.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        (root, own)
    }

    /// Setup as the daemon (pid 4242) of `sessiond.service` in the fake tree.
    fn setup_as_service(root: &tempfile::TempDir) -> Result<V2, CgroupError> {
        V2::setup(
            root.path(),
            Path::new("/system.slice/sessiond.service"),
            "sessiond",
            4242,
        )
    }

    #[test]
    fn a_cgroup_shared_with_other_processes_is_refused_before_anything_moves() {
        let (root, own) = fake_tree();
        std::fs::write(own.join("cgroup.procs"), "4242\n999\n").unwrap();
        let err = setup_as_service(&root).unwrap_err();
        assert!(err.to_string().contains("Delegate=yes"), "{err}");
        assert!(!own.join("daemon").exists(), "nothing was changed");
    }

    #[test]
    fn missing_controllers_are_refused() {
        let (root, own) = fake_tree();
        std::fs::write(own.join("cgroup.controllers"), "cpu pids\n").unwrap();
        let err = V2::setup(
            root.path(),
            Path::new("/system.slice/sessiond.service"),
            "sessiond",
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("memory"), "{err}");
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn setup_moves_the_daemon_into_a_leaf_and_enables_controllers() {
        let (root, own) = fake_tree();
        let v2 = setup_as_service(&root).unwrap();
        assert_eq!(read(&own.join("daemon/cgroup.procs")), "4242");
        assert_eq!(read(&own.join("cgroup.subtree_control")), CONTROLLERS);
        assert_eq!(
            read(&own.join("sessiond/cgroup.subtree_control")),
            CONTROLLERS
        );
        assert_eq!(v2.base(), own.join("sessiond"));
        // Under load the daemon's CPU share is larger than all sessions' together.
        assert_eq!(read(&own.join("daemon/cpu.weight")), "1000");
        assert_eq!(read(&own.join("sessiond/cpu.weight")), "10");
    }

    #[test]
    fn a_session_gets_its_limit_files() {
        let (root, own) = fake_tree();
        let v2 = V2::setup(
            root.path(),
            Path::new("/system.slice/sessiond.service"),
            "sessiond",
            1,
        )
        .unwrap();
        let limits = CgroupLimits {
            memory_max: 64 << 20,
            cpu_max_cores: 0.5,
            pids_max: 32,
        };
        v2.create("s-1", Some(&limits)).unwrap();
        let dir = own.join("sessiond/s-1");
        assert_eq!(read(&dir.join("memory.max")), "67108864");
        assert_eq!(read(&dir.join("cpu.max")), "50000 100000");
        assert_eq!(read(&dir.join("pids.max")), "32");
        assert_eq!(read(&dir.join("cgroup.subtree_control")), CONTROLLERS);
        v2.create("s-1/c-1", None).unwrap();
        assert_eq!(
            v2.procs_files("s-1/c-1"),
            vec![dir.join("c-1/cgroup.procs")]
        );
        assert_eq!(v2.children(""), vec!["s-1".to_string()]);
        assert_eq!(v2.children("s-1"), vec!["c-1".to_string()]);
    }

    #[test]
    fn kill_writes_cgroup_kill_and_waits_for_empty() {
        let (root, own) = fake_tree();
        let v2 = V2::setup(
            root.path(),
            Path::new("/system.slice/sessiond.service"),
            "sessiond",
            1,
        )
        .unwrap();
        v2.create("s-1", None).unwrap();
        let dir = own.join("sessiond/s-1");
        std::fs::write(dir.join("cgroup.kill"), "").unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        v2.kill("s-1").unwrap();
        assert_eq!(read(&dir.join("cgroup.kill")), "1");
    }

    #[test]
    fn memory_events_are_parsed() {
        let (root, own) = fake_tree();
        let v2 = V2::setup(
            root.path(),
            Path::new("/system.slice/sessiond.service"),
            "sessiond",
            1,
        )
        .unwrap();
        v2.create("s-1", None).unwrap();
        let dir = own.join("sessiond/s-1");
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.peak"), "123456\n").unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert_eq!(v2.oom_kills("s-1"), 1);
        assert_eq!(v2.memory_peak("s-1"), Some(123456));
        assert!(v2.populated("s-1"));
    }

    #[test]
    fn a_cgroup_namespace_root_is_not_the_real_root() {
        // Inside `docker run --cgroupns=private`: `0::/`, the mount's top,
        // but an ordinary cgroup of the host (it has a cgroup.type).
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory cpu pids\n").unwrap();
        std::fs::write(root.path().join("cgroup.type"), "domain\n").unwrap();
        std::fs::write(root.path().join("cgroup.procs"), "4242\n").unwrap();
        let v2 = V2::setup(root.path(), Path::new("/"), "sessiond", 4242).unwrap();
        assert_eq!(read(&root.path().join("daemon/cgroup.procs")), "4242");
        assert_eq!(
            read(&root.path().join("cgroup.subtree_control")),
            CONTROLLERS
        );
        assert_eq!(v2.base(), root.path().join("sessiond"));
    }

    #[test]
    fn release_disables_only_what_setup_enabled_and_moves_the_daemon_back() {
        let (root, own) = fake_tree();
        std::fs::write(own.join("cgroup.procs"), "4242\n").unwrap();
        let v2 = setup_as_service(&root).unwrap();
        v2.release();
        assert_eq!(
            read(&own.join("cgroup.subtree_control")),
            "-memory -cpu -pids"
        );
        assert_eq!(read(&own.join("cgroup.procs")), "4242");
        // Controllers `<own>` had before are left on.
        let (root, own) = fake_tree();
        std::fs::write(own.join("cgroup.subtree_control"), "cpu memory\n").unwrap();
        let v2 = setup_as_service(&root).unwrap();
        assert_eq!(read(&own.join("cgroup.subtree_control")), "+pids");
        v2.release();
        assert_eq!(read(&own.join("cgroup.subtree_control")), "-pids");
    }

    #[test]
    fn a_failed_setup_moves_the_daemon_back() {
        let (root, own) = fake_tree();
        // The sessions' parent cannot be created: a file is in its way.
        std::fs::write(own.join("sessiond"), "").unwrap();
        setup_as_service(&root).unwrap_err();
        assert_eq!(read(&own.join("cgroup.procs")), "4242");
        assert_eq!(
            read(&own.join("cgroup.subtree_control")),
            "-memory -cpu -pids"
        );
    }

    #[test]
    fn a_root_cgroup_is_not_moved() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory cpu pids\n").unwrap();
        let v2 = V2::setup(root.path(), Path::new("/"), "sessiond", 1).unwrap();
        assert!(!root.path().join("daemon").exists());
        assert_eq!(v2.base(), root.path().join("sessiond"));
    }
}
