//! cgroup v1 backend (hybrid hosts): limits in the memory, cpu and pids hierarchies, tracking and cgroup.kill in the unified one.

use std::path::{Path, PathBuf};

use super::fs::{
    all_pids_below, child_dirs, kill_by_file, mkdir, mkdir_new, read_key, read_u64, rmdir,
    wait_empty, write,
};
use super::{Backend, CgroupError, CgroupLimits};

/// `cpu.shares` of the sessions' parent: an eighth of the default 1024 the
/// daemon's own cgroup has (or, in the root cgroup, each of its threads), so
/// under load the daemon keeps CPU while every session spins. Shares only
/// matter when CPU is short; idle, the sessions may use it all.
pub const SESSIONS_CPU_SHARES: u64 = 128;

/// A command leaf is used again only if at most this much is charged to it
/// once its command has ended: kernel objects of its processes awaiting an
/// RCU grace period (≈ 70 KiB per process, measured), the directory entries
/// and inodes it looked up first, a charge batch, a small file's pages. Its
/// next command's peak is read as growth over what is charged at the reset,
/// so what stays charged does not count; what is freed during that command
/// may hide up to as much of its own use. A leaf holding more is removed,
/// as every leaf used to be.
pub const REUSE_LEFT_CHARGED_MAX: u64 = 2 << 20;

/// The v1 hierarchies a node is created in, plus the cgroup2 ("unified")
/// mount of a hybrid host, used to track every process and to kill them all
/// with one `cgroup.kill` (v1 has no such file; without a unified mount we
/// fall back to freezing and signalling each pid).
#[derive(Debug, Clone)]
pub struct V1 {
    /// `<controller mount>/<parent>` for memory, cpu, pids.
    memory: PathBuf,
    cpu: PathBuf,
    pids: PathBuf,
    /// `<freezer mount>/<parent>`, for the kill fallback.
    freezer: Option<PathBuf>,
    /// `<cgroup2 mount>/<parent>`, when the host has one.
    unified: Option<PathBuf>,
    /// Whether its cgroups have `cgroup.kill` (Linux 5.14 on): without it a
    /// command's tree is killed by freezing, and its leaf is made in freezer too.
    unified_kills: bool,
}

impl V1 {
    /// Prepares `<mount>/<parent>` in every hierarchy (created under each
    /// controller's root, never inside a cgroup of the machine's).
    pub fn setup(
        memory: &Path,
        cpu: &Path,
        pids: &Path,
        freezer: Option<&Path>,
        unified: Option<&Path>,
        parent: &str,
    ) -> Result<V1, CgroupError> {
        let mut v1 = V1 {
            memory: memory.join(parent),
            cpu: cpu.join(parent),
            pids: pids.join(parent),
            freezer: freezer.map(|f| f.join(parent)),
            unified: unified.map(|u| u.join(parent)),
            unified_kills: false,
        };
        for dir in v1.bases() {
            mkdir(&dir)?;
        }
        v1.unified_kills = v1
            .unified
            .as_ref()
            .is_some_and(|u| u.join("cgroup.kill").exists());
        write(&v1.cpu.join("cpu.shares"), &SESSIONS_CPU_SHARES.to_string())?;
        Ok(v1)
    }

    fn bases(&self) -> Vec<PathBuf> {
        let mut out = vec![self.memory.clone(), self.cpu.clone(), self.pids.clone()];
        out.extend(self.freezer.clone());
        out.extend(self.unified.clone());
        out
    }

    fn dirs(&self, rel: &str) -> Vec<PathBuf> {
        self.bases().into_iter().map(|b| b.join(rel)).collect()
    }

    /// The hierarchies a command's own leaf is made in: memory (its peak and
    /// OOM kills), pids (its refused forks: v1 counts them in the forking
    /// task's cgroup), the unified one (tracking, and the kill of its tree
    /// by `cgroup.kill`) and, where that kill is not available, freezer
    /// (which the fallback kill freezes). In the others (cpu; freezer beside
    /// `cgroup.kill`) the command joins its session's node: a leaf there
    /// would hold nothing of its own and cost a mkdir and an rmdir per command.
    fn leaf_bases(&self) -> Vec<PathBuf> {
        let mut out = vec![self.memory.clone(), self.pids.clone()];
        out.extend(self.unified.clone());
        if !self.unified_kills {
            out.extend(self.freezer.clone());
        }
        out
    }

    /// The hierarchies where a command joins its session's node.
    fn shared_bases(&self) -> Vec<PathBuf> {
        let leaf = self.leaf_bases();
        self.bases()
            .into_iter()
            .filter(|b| !leaf.contains(b))
            .collect()
    }

    /// v1 fallback: freeze (so nothing forks meanwhile), SIGKILL every pid, thaw; until empty.
    fn kill_by_freezing(&self, rel: &str) -> Result<(), CgroupError> {
        let pids_dir = self.pids.join(rel);
        let freezer = self.freezer.as_ref().map(|f| f.join(rel));
        for _ in 0..100 {
            let pids = all_pids_below(&pids_dir);
            if pids.is_empty() {
                return Ok(());
            }
            if let Some(f) = &freezer {
                let _ = std::fs::write(f.join("freezer.state"), "FROZEN");
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if let Some(f) = &freezer {
                let _ = std::fs::write(f.join("freezer.state"), "THAWED");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Err(CgroupError::NotEmpty(pids_dir))
    }
}

impl Backend for V1 {
    fn name(&self) -> &'static str {
        "v1"
    }

    /// Creates the node `rel`: a session (with `limits`, written) in every
    /// hierarchy, a command's leaf in its [`V1::leaf_bases`] only.
    fn create(&self, rel: &str, limits: Option<&CgroupLimits>) -> Result<(), CgroupError> {
        let bases = match limits {
            Some(_) => self.bases(),
            None => self.leaf_bases(),
        };
        for base in bases {
            mkdir_new(&base.join(rel))?;
        }
        if let Some(l) = limits {
            let memory = self.memory.join(rel);
            write(
                &memory.join("memory.limit_in_bytes"),
                &l.memory_max.to_string(),
            )?;
            // Swap counts against the limit too, where the kernel accounts it.
            let _ = std::fs::write(
                memory.join("memory.memsw.limit_in_bytes"),
                l.memory_max.to_string(),
            );
            let cpu = self.cpu.join(rel);
            write(
                &cpu.join("cpu.cfs_period_us"),
                &super::CPU_PERIOD_US.to_string(),
            )?;
            write(&cpu.join("cpu.cfs_quota_us"), &l.cpu_quota_us().to_string())?;
            write(
                &self.pids.join(rel).join("pids.max"),
                &l.pids_max.to_string(),
            )?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes "0" to, to join command
    /// leaf `rel`: one per hierarchy, the leaf's or (where it has none) its
    /// session's.
    fn procs_files(&self, rel: &str) -> Vec<PathBuf> {
        let session = rel.rsplit_once('/').map_or(rel, |(session, _)| session);
        let leaf = self.leaf_bases().into_iter().map(|b| b.join(rel));
        let shared = self.shared_bases().into_iter().map(|b| b.join(session));
        leaf.chain(shared).map(|d| d.join("cgroup.procs")).collect()
    }

    /// Kills every process in `rel` and below and waits until it is empty:
    /// `cgroup.kill` in the unified hierarchy, else freeze / SIGKILL each / thaw.
    fn kill(&self, rel: &str) -> Result<(), CgroupError> {
        if let Some(unified) = &self.unified {
            let dir = unified.join(rel);
            if dir.join("cgroup.kill").exists() {
                kill_by_file(&dir)?;
                return wait_empty(&dir);
            }
        }
        self.kill_by_freezing(rel)
    }

    /// Whether `rel` still holds processes.
    fn populated(&self, rel: &str) -> bool {
        match &self.unified {
            Some(u) => {
                read_key(&u.join(rel).join("cgroup.events"), "populated").is_some_and(|v| v > 0)
            }
            None => !all_pids_below(&self.pids.join(rel)).is_empty(),
        }
    }

    /// Removes the node from every hierarchy it is in (it must be empty).
    fn remove(&self, rel: &str) -> Result<(), CgroupError> {
        let mut first_error = None;
        for dir in self.dirs(rel) {
            if let Err(e) = rmdir(&dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// memory.oom_control, memory.max_usage_in_bytes, and the pids
    /// hierarchy's pids.events (v1 counts a refused fork in the forking
    /// task's cgroup).
    fn counter_files(&self, rel: &str) -> super::pool::CounterFiles {
        let memory = self.memory.join(rel);
        super::pool::CounterFiles {
            oom: (memory.join("memory.oom_control"), "oom_kill"),
            peak: memory.join("memory.max_usage_in_bytes"),
            pids: self.pids.join(rel).join("pids.events"),
        }
    }

    fn reuses_leaves(&self) -> bool {
        true
    }

    /// v1 can start a leaf's peak over: a write to
    /// `memory.max_usage_in_bytes` resets it to the current usage, which the
    /// pool then reads as its baseline. Nothing is reclaimed
    /// (`memory.force_empty` would also drop the page cache, directory
    /// entries and inodes the command brought in, and every later command
    /// would read them from disk again). Only a leaf with at most
    /// [`REUSE_LEFT_CHARGED_MAX`] charged is reset, and, where the kill
    /// freezes, one that is not left frozen. Its OOM count
    /// (`memory.oom_control`) and refused forks (`pids.events`) go on
    /// counting: the pool reads their growth too.
    fn reset_leaf(&self, rel: &str) -> bool {
        let memory = self.memory.join(rel);
        let left = read_u64(&memory.join("memory.usage_in_bytes"));
        if left.is_none_or(|b| b > REUSE_LEFT_CHARGED_MAX) {
            return false;
        }
        if !self.unified_kills {
            let thawed = self.freezer.as_ref().is_none_or(|f| {
                std::fs::read_to_string(f.join(rel).join("freezer.state"))
                    .is_ok_and(|s| s.trim() == "THAWED")
            });
            if !thawed {
                return false;
            }
        }
        std::fs::write(memory.join("memory.max_usage_in_bytes"), "0").is_ok()
    }

    /// The child nodes of `rel` found in any hierarchy.
    fn children(&self, rel: &str) -> Vec<String> {
        children_in_any(&self.dirs(rel))
    }

    /// The per-hierarchy bases, memory's first.
    fn base_dirs(&self) -> Vec<PathBuf> {
        self.bases()
    }
}

/// The child cgroups found in any of `dirs` (a session lives in every
/// hierarchy, a command leaf in some; a half-created or half-removed one may
/// be in fewer).
fn children_in_any(dirs: &[PathBuf]) -> Vec<String> {
    let mut all: Vec<String> = dirs.iter().flat_map(|d| child_dirs(d)).collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    //! The v1 backend against a fake hybrid tree in a temp dir.
    use super::*;

    /// Fake mounts under a temp dir: memory, cpu, pids, freezer, and a
    /// unified (cgroup2) one when `unified`, whose cgroups have
    /// `cgroup.kill` (Linux 5.14 on); the backend set up in them.
    fn fake_tree(unified: bool) -> (tempfile::TempDir, V1) {
        fake_tree_with(unified, true)
    }

    /// [`fake_tree`], on a kernel with or without `cgroup.kill`.
    fn fake_tree_with(unified: bool, cgroup_kill: bool) -> (tempfile::TempDir, V1) {
        let root = tempfile::tempdir().unwrap();
        let m = |c: &str| {
            let dir = root.path().join(c);
            std::fs::create_dir(&dir).unwrap();
            dir
        };
        let (memory, cpu, pids, freezer) = (m("memory"), m("cpu"), m("pids"), m("freezer"));
        let unified = unified.then(|| m("unified"));
        if let Some(u) = unified.as_ref().filter(|_| cgroup_kill) {
            // As a kernel with cgroup.kill (5.14 on) shows it in our parent.
            std::fs::create_dir(u.join("sessiond")).unwrap();
            std::fs::write(u.join("sessiond/cgroup.kill"), "").unwrap();
        }
        let v1 = V1::setup(
            &memory,
            &cpu,
            &pids,
            Some(&freezer),
            unified.as_deref(),
            "sessiond",
        )
        .unwrap();
        (root, v1)
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    fn limits() -> CgroupLimits {
        CgroupLimits {
            memory_max: 64 << 20,
            cpu_max_cores: 0.5,
            pids_max: 32,
        }
    }

    #[test]
    fn setup_makes_the_parent_in_every_hierarchy_memory_first() {
        let (root, v1) = fake_tree(true);
        let bases = v1.base_dirs();
        assert_eq!(bases[0], root.path().join("memory/sessiond"));
        assert_eq!(bases.len(), 5);
        assert!(bases.iter().all(|b| b.is_dir()));
        // Under load the daemon's CPU share (1024 by default) is larger than all sessions' together.
        assert_eq!(read(&root.path().join("cpu/sessiond/cpu.shares")), "128");
    }

    #[test]
    fn setup_is_refused_when_a_hierarchy_is_not_there() {
        let root = tempfile::tempdir().unwrap();
        let gone = root.path().join("gone");
        let err = V1::setup(&gone, &gone, &gone, None, None, "sessiond").unwrap_err();
        assert!(matches!(err, CgroupError::Io { .. }), "{err}");
    }

    #[test]
    fn a_session_gets_its_limit_files_and_a_leaf_joins_every_hierarchy() {
        let (root, v1) = fake_tree(true);
        v1.create("s-1", Some(&limits())).unwrap();
        let dir = |c: &str| root.path().join(c).join("sessiond/s-1");
        assert_eq!(
            read(&dir("memory").join("memory.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(
            read(&dir("memory").join("memory.memsw.limit_in_bytes")),
            "67108864"
        );
        assert_eq!(read(&dir("cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&dir("cpu").join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&dir("pids").join("pids.max")), "32");
        v1.create("s-1/cmd-1", None).unwrap();
        let procs = v1.procs_files("s-1/cmd-1");
        assert_eq!(procs.len(), 5);
        // Its own leaf where it has something of its own to count or kill;
        // the session's node in cpu and (beside unified) freezer.
        for own in ["memory", "pids", "unified"] {
            assert!(dir(own).join("cmd-1").is_dir(), "{own}");
            assert!(
                procs.contains(&dir(own).join("cmd-1/cgroup.procs")),
                "{own}"
            );
        }
        for shared in ["cpu", "freezer"] {
            assert!(!dir(shared).join("cmd-1").exists(), "{shared}");
            assert!(
                procs.contains(&dir(shared).join("cgroup.procs")),
                "{shared}"
            );
        }
        v1.remove("s-1/cmd-1").unwrap();
        assert!(!dir("memory").join("cmd-1").exists());
    }

    /// A leaf `s-1/cmd-1` whose command left `usage` bytes charged and a
    /// peak of 50 MiB.
    fn used_leaf(unified: bool, usage: u64) -> (tempfile::TempDir, V1, PathBuf) {
        let (root, v1) = fake_tree(unified);
        v1.create("s-1", Some(&limits())).unwrap();
        v1.create("s-1/cmd-1", None).unwrap();
        let memory = root.path().join("memory/sessiond/s-1/cmd-1");
        std::fs::write(memory.join("memory.usage_in_bytes"), format!("{usage}\n")).unwrap();
        std::fs::write(memory.join("memory.max_usage_in_bytes"), "52428800\n").unwrap();
        (root, v1, memory)
    }

    #[test]
    fn a_leaf_left_with_little_charged_has_its_peak_reset_and_nothing_reclaimed() {
        let (_root, v1, memory) = used_leaf(true, 300 << 10);
        assert!(v1.reuses_leaves());
        assert!(v1.reset_leaf("s-1/cmd-1"));
        assert_eq!(read(&memory.join("memory.max_usage_in_bytes")), "0");
        assert!(
            !memory.join("memory.force_empty").exists(),
            "its cache is left alone"
        );
    }

    #[test]
    fn a_leaf_holding_more_or_frozen_is_not_reset() {
        let (_root, v1, memory) = used_leaf(true, REUSE_LEFT_CHARGED_MAX + 4096);
        assert!(!v1.reset_leaf("s-1/cmd-1"));
        assert_eq!(
            read(&memory.join("memory.max_usage_in_bytes")),
            "52428800\n"
        );
        // Left frozen by the freezing kill (no cgroup.kill).
        let (root, v1, _memory) = used_leaf(false, 0);
        let state = root.path().join("freezer/sessiond/s-1/cmd-1/freezer.state");
        std::fs::write(&state, "FROZEN\n").unwrap();
        assert!(!v1.reset_leaf("s-1/cmd-1"));
        std::fs::write(&state, "THAWED\n").unwrap();
        assert!(v1.reset_leaf("s-1/cmd-1"));
    }

    #[test]
    fn without_cgroup_kill_in_unified_a_leaf_is_made_in_freezer_too() {
        // A kernel without cgroup.kill (before 5.14).
        let (root, v1) = fake_tree_with(true, false);
        v1.create("s-1", Some(&limits())).unwrap();
        v1.create("s-1/cmd-1", None).unwrap();
        let dir = |c: &str| root.path().join(c).join("sessiond/s-1");
        for own in ["memory", "pids", "unified", "freezer"] {
            assert!(dir(own).join("cmd-1").is_dir(), "{own}");
        }
        assert!(!dir("cpu").join("cmd-1").exists());
        let procs = v1.procs_files("s-1/cmd-1");
        assert_eq!(procs.len(), 5);
        assert!(procs.contains(&dir("freezer").join("cmd-1/cgroup.procs")));
        assert!(procs.contains(&dir("cpu").join("cgroup.procs")));
    }

    #[test]
    fn without_a_unified_mount_a_leaf_is_made_in_freezer_for_the_kill() {
        let (root, v1) = fake_tree(false);
        v1.create("s-1", Some(&limits())).unwrap();
        v1.create("s-1/cmd-1", None).unwrap();
        let dir = |c: &str| root.path().join(c).join("sessiond/s-1");
        assert!(dir("freezer").join("cmd-1").is_dir());
        assert!(!dir("cpu").join("cmd-1").exists());
        let procs = v1.procs_files("s-1/cmd-1");
        assert!(procs.contains(&dir("freezer").join("cmd-1/cgroup.procs")));
        assert!(procs.contains(&dir("cpu").join("cgroup.procs")));
    }

    #[test]
    fn an_existing_node_is_refused() {
        let (_root, v1) = fake_tree(false);
        v1.create("s-1", None).unwrap();
        assert!(v1.create("s-1", None).is_err());
    }

    #[test]
    fn kill_with_a_unified_mount_writes_cgroup_kill() {
        let (root, v1) = fake_tree(true);
        v1.create("s-1", None).unwrap();
        let dir = root.path().join("unified/sessiond/s-1");
        std::fs::write(dir.join("cgroup.kill"), "").unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        v1.kill("s-1").unwrap();
        assert_eq!(read(&dir.join("cgroup.kill")), "1");
    }

    #[test]
    fn kill_without_a_unified_mount_freezes_and_kills_each_pid() {
        let (root, v1) = fake_tree(false);
        v1.create("s-1", None).unwrap();
        let procs = root.path().join("pids/sessiond/s-1/cgroup.procs");
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        std::fs::write(&procs, format!("{}\n", child.id())).unwrap();
        let killer = std::thread::spawn(move || v1.kill("s-1"));
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        // The kernel would drop the pid from the file; the fake tree is told.
        std::fs::write(&procs, "").unwrap();
        killer.join().unwrap().unwrap();
        assert_eq!(
            read(&root.path().join("freezer/sessiond/s-1/freezer.state")),
            "THAWED"
        );
    }

    #[test]
    fn populated_comes_from_unified_events_or_else_the_pids_hierarchy() {
        let (root, v1) = fake_tree(true);
        v1.create("s-1", None).unwrap();
        let events = root.path().join("unified/sessiond/s-1/cgroup.events");
        std::fs::write(&events, "populated 1\nfrozen 0\n").unwrap();
        assert!(v1.populated("s-1"));
        std::fs::write(&events, "populated 0\nfrozen 0\n").unwrap();
        assert!(!v1.populated("s-1"));

        let (root, v1) = fake_tree(false);
        v1.create("s-1", None).unwrap();
        let procs = root.path().join("pids/sessiond/s-1/cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        assert!(!v1.populated("s-1"));
        std::fs::write(&procs, "4242\n").unwrap();
        assert!(v1.populated("s-1"));
    }

    #[test]
    fn remove_takes_the_node_out_of_every_hierarchy() {
        let (root, v1) = fake_tree(true);
        // A session: in all five (its limit files are real files here, not
        // the kernel's, and go first).
        v1.create("s-1", Some(&limits())).unwrap();
        for c in ["memory", "cpu", "pids", "freezer", "unified"] {
            let dir = root.path().join(c).join("sessiond/s-1");
            assert!(dir.is_dir(), "{c}");
            for file in std::fs::read_dir(&dir).unwrap() {
                std::fs::remove_file(file.unwrap().path()).unwrap();
            }
        }
        v1.remove("s-1").unwrap();
        for c in ["memory", "cpu", "pids", "freezer", "unified"] {
            assert!(!root.path().join(c).join("sessiond/s-1").exists(), "{c}");
        }
        v1.remove("s-1").expect("a node already gone is fine");
    }

    #[test]
    fn oom_kills_and_peak_come_from_the_memory_hierarchy() {
        let (root, v1) = fake_tree(true);
        v1.create("s-1", None).unwrap();
        let dir = root.path().join("memory/sessiond/s-1");
        assert_eq!((v1.oom_kills("s-1"), v1.memory_peak("s-1")), (0, None));
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(dir.join("memory.max_usage_in_bytes"), "123456\n").unwrap();
        assert_eq!(
            (v1.oom_kills("s-1"), v1.memory_peak("s-1")),
            (2, Some(123456))
        );
    }

    #[test]
    fn recovery_lists_nodes_found_in_any_hierarchy() {
        let (root, v1) = fake_tree(true);
        v1.create("s-1", Some(&limits())).unwrap();
        v1.create("s-1/cmd-1", None).unwrap();
        // Half-made by a daemon that died: in the pids hierarchy only.
        std::fs::create_dir(root.path().join("pids/sessiond/s-2")).unwrap();
        std::fs::create_dir(root.path().join("cpu/sessiond/s-1/cmd-7")).unwrap();
        assert_eq!(v1.children(""), vec!["s-1".to_string(), "s-2".to_string()]);
        assert_eq!(
            v1.children("s-1"),
            vec!["cmd-1".to_string(), "cmd-7".to_string()]
        );
    }
}
