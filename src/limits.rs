//! Process-layer limits: the `[rlimits]` section, session tightening, and the (resource, soft, hard) set each spawn applies.

use std::fmt;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cgroup::{CgroupLimits, MIN_CPU_CORES, MIN_MEMORY_BYTES, MIN_PIDS};
use crate::protocol::{RequestError, SessionLimits};

/// A limit: a number in the resource's unit, or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Value(u64),
    Unlimited,
}

impl Limit {
    /// The tighter of two limits.
    pub fn min(self, other: Limit) -> Limit {
        match (self, other) {
            (Limit::Unlimited, x) | (x, Limit::Unlimited) => x,
            (Limit::Value(a), Limit::Value(b)) => Limit::Value(a.min(b)),
        }
    }

    /// Whether `self` is at most `other` (tightens or keeps it).
    pub fn within(self, other: Limit) -> bool {
        match (self, other) {
            (_, Limit::Unlimited) => true,
            (Limit::Unlimited, Limit::Value(_)) => false,
            (Limit::Value(a), Limit::Value(b)) => a <= b,
        }
    }
}

/// How a limit is written in the config file.
#[derive(Clone, Copy)]
enum Unit {
    /// humantime duration, e.g. "300s" (stored as whole seconds).
    Seconds,
    /// bytes or a size string, e.g. "16 GiB".
    Bytes,
    /// a plain count.
    Count,
}

fn parse_limit<'de, D: Deserializer<'de>>(de: D, unit: Unit) -> Result<Limit, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let raw = Raw::deserialize(de)?;
    let text = match raw {
        Raw::Int(n) => return Ok(Limit::Value(n)),
        Raw::Text(t) => t,
    };
    if text == "unlimited" {
        return Ok(Limit::Unlimited);
    }
    let parsed = match unit {
        Unit::Seconds => humantime::parse_duration(&text)
            .map(|d| d.as_secs())
            .map_err(|e| e.to_string()),
        Unit::Bytes => text.parse::<ByteSize>().map(|b| b.as_u64()),
        Unit::Count => text.parse::<u64>().map_err(|e| e.to_string()),
    };
    parsed.map(Limit::Value).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a limit: expected {} or \"unlimited\" ({e})",
            match unit {
                Unit::Seconds => "a duration like \"300s\"",
                Unit::Bytes => "a size like \"16 GiB\"",
                Unit::Count => "a whole number",
            }
        ))
    })
}

fn write_limit<S: Serializer>(limit: &Limit, s: S, unit: Unit) -> Result<S::Ok, S::Error> {
    match (limit, unit) {
        (Limit::Unlimited, _) => s.serialize_str("unlimited"),
        (Limit::Value(v), Unit::Seconds) => {
            s.serialize_str(&humantime::format_duration(Duration::from_secs(*v)).to_string())
        }
        (Limit::Value(v), Unit::Bytes) => s.serialize_str(&ByteSize(*v).to_string()),
        (Limit::Value(v), Unit::Count) => s.serialize_u64(*v),
    }
}

macro_rules! limit_serde {
    ($module:ident, $unit:expr) => {
        mod $module {
            use super::*;
            pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Limit, D::Error> {
                parse_limit(de, $unit)
            }
            pub fn serialize<S: Serializer>(limit: &Limit, s: S) -> Result<S::Ok, S::Error> {
                write_limit(limit, s, $unit)
            }
        }
    };
}
limit_serde!(seconds_limit, Unit::Seconds);
limit_serde!(bytes_limit, Unit::Bytes);
limit_serde!(count_limit, Unit::Count);

/// `[rlimits]`: set in every command's process before it executes anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlimitsConfig {
    /// RLIMIT_CPU: CPU seconds per process (SIGXCPU at the limit, SIGKILL a
    /// little after). Counts CPU, not wall time: it is no timeout.
    #[serde(with = "seconds_limit")]
    pub cpu: Limit,
    /// RLIMIT_AS: address space per process, a backstop only (runtimes such as
    /// Java, node and Go reserve far more than they use).
    #[serde(with = "bytes_limit")]
    pub address_space: Limit,
    /// RLIMIT_NPROC: processes of the command's user. Ignored by the kernel for root.
    #[serde(with = "count_limit")]
    pub nproc: Limit,
    /// RLIMIT_NOFILE: open files per process.
    #[serde(with = "count_limit")]
    pub nofile: Limit,
    /// RLIMIT_CORE: core file size; 0 keeps SIGXCPU and crashes from dumping cores into the cwd.
    #[serde(with = "bytes_limit")]
    pub core: Limit,
}

impl Default for RlimitsConfig {
    fn default() -> Self {
        RlimitsConfig {
            cpu: Limit::Value(300),
            address_space: Limit::Value(16 << 30),
            nproc: Limit::Value(1024),
            nofile: Limit::Value(1024),
            core: Limit::Value(0),
        }
    }
}

/// The CPU hard limit is the soft one plus this, so a process that catches or
/// ignores SIGXCPU still dies (SIGKILL at the hard limit).
pub const CPU_HARD_MARGIN_SECS: u64 = 2;

/// One limit as `setrlimit` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: libc::__rlimit_resource_t,
    pub soft: libc::rlim_t,
    pub hard: libc::rlim_t,
}

/// The limits one session's commands run under (config tightened by the session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRlimits {
    pub cpu: Limit,
    pub address_space: Limit,
    pub nproc: Limit,
    pub nofile: Limit,
    pub core: Limit,
}

impl From<&RlimitsConfig> for SessionRlimits {
    fn from(c: &RlimitsConfig) -> Self {
        SessionRlimits {
            cpu: c.cpu,
            address_space: c.address_space,
            nproc: c.nproc,
            nofile: c.nofile,
            core: c.core,
        }
    }
}

impl SessionRlimits {
    /// Applies a session's `limits`, which may only tighten: a value above the
    /// configured one is `INVALID_REQUEST` naming the param.
    pub fn tightened(self, limits: &SessionLimits) -> Result<SessionRlimits, RequestError> {
        let tighten = |name: &str, current: Limit, asked: Option<u64>| match asked {
            None => Ok(current),
            Some(0) => Err(RequestError::InvalidRequest(format!(
                "param `limits.{name}`: 0 would leave the session unable to run anything; at least 1"
            ))),
            Some(v) if Limit::Value(v).within(current) => Ok(Limit::Value(v)),
            Some(v) => Err(RequestError::InvalidRequest(format!(
                "param `limits.{name}`: {v} would loosen the configured limit ({current}); limits may only tighten"
            ))),
        };
        Ok(SessionRlimits {
            cpu: tighten("rlimit_cpu_s", self.cpu, limits.rlimit_cpu_s)?,
            address_space: tighten(
                "rlimit_as_bytes",
                self.address_space,
                limits.rlimit_as_bytes,
            )?,
            nproc: tighten("rlimit_nproc", self.nproc, limits.rlimit_nproc)?,
            nofile: tighten("rlimit_nofile", self.nofile, limits.rlimit_nofile)?,
            core: self.core,
        })
    }

    /// The `setrlimit` calls for a command. An unlimited value keeps the
    /// daemon's own hard limit as both soft and hard (what "no limit of ours" means
    /// for a process that may not raise its hard limit).
    pub fn to_rlimits(self) -> [Rlimit; 5] {
        let set = |resource, limit: Limit, margin: u64| {
            let (_, daemon_hard) = current(resource);
            let soft = match limit {
                Limit::Value(v) => v.min(daemon_hard),
                Limit::Unlimited => daemon_hard,
            };
            let hard = match limit {
                Limit::Value(_) => soft.saturating_add(margin).min(daemon_hard),
                Limit::Unlimited => daemon_hard,
            };
            Rlimit {
                resource,
                soft,
                hard,
            }
        };
        [
            set(libc::RLIMIT_CPU, self.cpu, CPU_HARD_MARGIN_SECS),
            set(libc::RLIMIT_AS, self.address_space, 0),
            set(libc::RLIMIT_NPROC, self.nproc, 0),
            set(libc::RLIMIT_NOFILE, self.nofile, 0),
            set(libc::RLIMIT_CORE, self.core, 0),
        ]
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Value(v) => write!(f, "{v}"),
            Limit::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// Everything a session's `limits` resolve to.
#[derive(Debug, Clone, Copy)]
pub struct ResolvedLimits {
    /// The session's default and maximum command timeout, when it set one.
    pub timeout: Option<Duration>,
    pub rlimits: SessionRlimits,
    pub cgroup: CgroupLimits,
}

/// Decides a `session.create`'s `limits`: each may only tighten the
/// configuration; a value that would loosen one is `INVALID_REQUEST` naming
/// it. cgroup limits on a daemon running without cgroups are refused too,
/// rather than accepted and not enforced.
pub fn session_limits(
    config: &crate::config::Config,
    cgroups_on: bool,
    limits: Option<&SessionLimits>,
) -> Result<ResolvedLimits, RequestError> {
    let mut resolved = ResolvedLimits {
        timeout: None,
        rlimits: SessionRlimits::from(&config.rlimits),
        cgroup: CgroupLimits::from_config(&config.cgroups),
    };
    let Some(limits) = limits else {
        return Ok(resolved);
    };
    let loosen = |name: &str, asked: String, configured: String| {
        RequestError::InvalidRequest(format!(
            "param `limits.{name}`: {asked} would loosen the configured limit ({configured}); limits may only tighten"
        ))
    };
    let wants_cgroup = limits.memory_max_bytes.is_some()
        || limits.cpu_max_cores.is_some()
        || limits.pids_max.is_some();
    if wants_cgroup && !cgroups_on {
        let name = if limits.memory_max_bytes.is_some() {
            "memory_max_bytes"
        } else if limits.cpu_max_cores.is_some() {
            "cpu_max_cores"
        } else {
            "pids_max"
        };
        return Err(RequestError::InvalidRequest(format!(
            "param `limits.{name}`: cgroups are off on this daemon, so it cannot be enforced"
        )));
    }
    let c = &mut resolved.cgroup;
    if let Some(v) = limits.memory_max_bytes {
        if v > c.memory_max || v < MIN_MEMORY_BYTES {
            return Err(loosen(
                "memory_max_bytes",
                v.to_string(),
                format!("{} (and at least 4 MiB)", c.memory_max),
            ));
        }
        c.memory_max = v;
    }
    if let Some(v) = limits.cpu_max_cores {
        if !(v.is_finite() && v >= MIN_CPU_CORES && v <= c.cpu_max_cores) {
            return Err(loosen(
                "cpu_max_cores",
                v.to_string(),
                format!("{} (and at least 0.01)", c.cpu_max_cores),
            ));
        }
        c.cpu_max_cores = v;
    }
    if let Some(v) = limits.pids_max {
        if v > c.pids_max || v < MIN_PIDS {
            return Err(loosen(
                "pids_max",
                v.to_string(),
                format!("{} (and at least 8)", c.pids_max),
            ));
        }
        c.pids_max = v;
    }
    if let Some(secs) = limits.timeout_s {
        let timeout = crate::protocol::seconds_param("limits.timeout_s", secs)?;
        let max = config.commands.max_timeout;
        if timeout > max {
            return Err(loosen(
                "timeout_s",
                format!("{secs}s"),
                format!("max_timeout {}s", max.as_secs_f64()),
            ));
        }
        resolved.timeout = Some(timeout);
    }
    resolved.rlimits = resolved.rlimits.tightened(limits)?;
    Ok(resolved)
}

/// The daemon's own (soft, hard) limit of `resource`.
pub fn current(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; nothing else.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return (libc::RLIM_INFINITY, libc::RLIM_INFINITY);
    }
    (r.rlim_cur, r.rlim_max)
}

/// Checks the configured limits against the daemon's own hard limits: a
/// command cannot be given more than the daemon has. Returns the offending
/// key, its value and the hard limit.
pub fn check_against_daemon(c: &RlimitsConfig) -> Result<(), (&'static str, u64, u64)> {
    for (key, resource, limit) in [
        ("rlimits.cpu", libc::RLIMIT_CPU, c.cpu),
        ("rlimits.address_space", libc::RLIMIT_AS, c.address_space),
        ("rlimits.nproc", libc::RLIMIT_NPROC, c.nproc),
        ("rlimits.nofile", libc::RLIMIT_NOFILE, c.nofile),
        ("rlimits.core", libc::RLIMIT_CORE, c.core),
    ] {
        let (_, hard) = current(resource);
        if let Limit::Value(v) = limit {
            if hard != libc::RLIM_INFINITY && v > hard {
                return Err((key, v, hard));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize, Debug, PartialEq)]
    struct Wrap {
        r: RlimitsConfig,
    }

    #[test]
    fn parses_every_form_and_round_trips() {
        let w: Wrap = toml::from_str(
            "[r]\ncpu = \"1m\"\naddress_space = \"512 MiB\"\nnproc = \"unlimited\"\nnofile = 64\ncore = 0\n",
        )
        .unwrap();
        assert_eq!(w.r.cpu, Limit::Value(60));
        assert_eq!(w.r.address_space, Limit::Value(512 << 20));
        assert_eq!(w.r.nproc, Limit::Unlimited);
        assert_eq!(w.r.nofile, Limit::Value(64));
        let again: Wrap = toml::from_str(&toml::to_string(&w).unwrap()).unwrap();
        assert_eq!(again, w);
    }

    #[test]
    fn a_bad_value_names_what_is_allowed() {
        let err = toml::from_str::<Wrap>("[r]\ncpu = \"often\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpu") && err.contains("unlimited"), "{err}");
    }

    #[test]
    fn sessions_may_only_tighten() {
        let base = SessionRlimits::from(&RlimitsConfig::default());
        let tighter = base
            .tightened(&SessionLimits {
                rlimit_nofile: Some(64),
                rlimit_cpu_s: Some(10),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (tighter.nofile, tighter.cpu),
            (Limit::Value(64), Limit::Value(10))
        );
        let err = base
            .tightened(&SessionLimits {
                rlimit_nofile: Some(1 << 20),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("limits.rlimit_nofile"), "{err}");
        let unlimited = SessionRlimits {
            nproc: Limit::Unlimited,
            ..base
        };
        assert!(
            unlimited
                .tightened(&SessionLimits {
                    rlimit_nproc: Some(5),
                    ..Default::default()
                })
                .is_ok()
        );
    }

    #[test]
    fn cpu_hard_limit_has_a_margin_and_nothing_exceeds_the_daemon() {
        let limits = SessionRlimits::from(&RlimitsConfig::default()).to_rlimits();
        let cpu = limits
            .iter()
            .find(|l| l.resource == libc::RLIMIT_CPU)
            .unwrap();
        let (_, hard) = current(libc::RLIMIT_CPU);
        assert_eq!(cpu.soft, 300.min(hard));
        assert_eq!(cpu.hard, (300 + CPU_HARD_MARGIN_SECS).min(hard));
        for l in limits {
            assert!(l.soft <= l.hard && l.hard <= current(l.resource).1);
        }
    }
}
