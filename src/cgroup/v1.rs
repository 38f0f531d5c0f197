//! cgroup v1 backend (hybrid hosts): limits in the memory, cpu and pids hierarchies, tracking and cgroup.kill in the unified one.

use std::path::{Path, PathBuf};

use super::{
    CgroupError, CgroupLimits, kill_by_file, mkdir, mkdir_new, read_key, rmdir, wait_empty, write,
};

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
        let v1 = V1 {
            memory: memory.join(parent),
            cpu: cpu.join(parent),
            pids: pids.join(parent),
            freezer: freezer.map(|f| f.join(parent)),
            unified: unified.map(|u| u.join(parent)),
        };
        for dir in v1.bases() {
            mkdir(&dir)?;
        }
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

    /// Creates the node `rel` in every hierarchy; with `limits` (a session), writes them.
    pub fn create(&self, rel: &str, limits: Option<&CgroupLimits>) -> Result<(), CgroupError> {
        for dir in self.dirs(rel) {
            mkdir_new(&dir)?;
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

    /// The `cgroup.procs` files a process writes "0" to, to join `rel`: one per hierarchy.
    pub fn procs_files(&self, rel: &str) -> Vec<PathBuf> {
        self.dirs(rel)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Kills every process in `rel` and below and waits until it is empty:
    /// `cgroup.kill` in the unified hierarchy, else freeze / SIGKILL each / thaw.
    pub fn kill(&self, rel: &str) -> Result<(), CgroupError> {
        if let Some(unified) = &self.unified {
            let dir = unified.join(rel);
            if dir.join("cgroup.kill").exists() {
                kill_by_file(&dir)?;
                return wait_empty(&dir);
            }
        }
        self.kill_by_freezing(rel)
    }

    /// v1 fallback: freeze (so nothing forks meanwhile), SIGKILL every pid, thaw; until empty.
    fn kill_by_freezing(&self, rel: &str) -> Result<(), CgroupError> {
        let pids_dir = self.pids.join(rel);
        let freezer = self.freezer.as_ref().map(|f| f.join(rel));
        for _ in 0..100 {
            let pids = super::all_pids_below(&pids_dir);
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

    /// Whether `rel` still holds processes.
    pub fn populated(&self, rel: &str) -> bool {
        match &self.unified {
            Some(u) => {
                read_key(&u.join(rel).join("cgroup.events"), "populated").is_some_and(|v| v > 0)
            }
            None => !super::all_pids_below(&self.pids.join(rel)).is_empty(),
        }
    }

    /// Removes the node from every hierarchy (it must be empty).
    pub fn remove(&self, rel: &str) -> Result<(), CgroupError> {
        let mut first_error = None;
        for dir in self.dirs(rel) {
            if let Err(e) = rmdir(&dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// How many processes of `rel` the OOM killer has killed (memory.oom_control).
    pub fn oom_kills(&self, rel: &str) -> u64 {
        read_key(
            &self.memory.join(rel).join("memory.oom_control"),
            "oom_kill",
        )
        .unwrap_or(0)
    }

    /// Peak memory of `rel`, bytes.
    pub fn memory_peak(&self, rel: &str) -> Option<u64> {
        std::fs::read_to_string(self.memory.join(rel).join("memory.max_usage_in_bytes"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The session nodes found in any hierarchy (for crash recovery).
    pub fn sessions(&self) -> Vec<String> {
        children_in_any(&self.bases())
    }

    /// The command nodes of a session, in any hierarchy.
    pub fn commands(&self, session: &str) -> Vec<String> {
        children_in_any(&self.dirs(session))
    }

    /// The per-hierarchy bases (for removing the parent at exit).
    pub fn base_dirs(&self) -> Vec<PathBuf> {
        self.bases()
    }
}

/// The child cgroups found in any of `dirs` (a node lives in every hierarchy;
/// a half-created or half-removed one may be in some only).
fn children_in_any(dirs: &[PathBuf]) -> Vec<String> {
    let mut all: Vec<String> = dirs.iter().flat_map(|d| super::child_dirs(d)).collect();
    all.sort();
    all.dedup();
    all
}
