//! Process-layer limits: the `[rlimits]` section and the (resource, soft, hard) set each spawn applies (a session's tightening is decided in `server::methods::session_create`).

use std::fmt;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
