//! What the `[cgroups]` config asks and the limits one session's cgroup gets, with the smallest values any of them may take.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// cpu.max / cfs period, µs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The smallest memory limit, bytes: below it a shell and its helpers cannot start.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// The smallest CPU limit, cores.
pub const MIN_CPU_CORES: f64 = 0.01;
/// The smallest pids limit (the shell and its helpers count, threads too).
pub const MIN_PIDS: u64 = 8;

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

#[cfg(test)]
mod tests {
    use super::*;

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
