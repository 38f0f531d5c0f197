//! The wire schema: method names, typed params and results shared by the daemon and the client.

pub mod commands;
pub mod error;
pub mod frame;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;

pub use commands::{
    CancelParams, CommandResult, Event, EventFrame, ReadParams, ReadResult, ResizeParams,
    ResizeResult, StartResult, StreamName, WriteParams, WriteResult,
};
pub use error::{RequestError, WireError, clip, quote};

/// Bumped on any breaking change to this schema; reported by `system.ping`.
pub const PROTOCOL_VERSION: u32 = 2;

/// Every method the daemon knows.
pub mod method {
    pub const PING: &str = "system.ping";
    pub const STATS: &str = "system.stats";
    pub const SESSION_CREATE: &str = "session.create";
    pub const SESSION_DESTROY: &str = "session.destroy";
    pub const SESSION_LIST: &str = "session.list";
    pub const EXEC_RUN: &str = "exec.run";
    pub const EXEC_CANCEL: &str = "exec.cancel";
    pub const EXEC_START: &str = "exec.start";
    pub const EXEC_READ: &str = "exec.read";
    pub const EXEC_WRITE: &str = "exec.write";
    pub const EXEC_RESIZE: &str = "exec.resize";
    /// Only with the `fault-injection` feature; else `UNKNOWN_METHOD`.
    #[cfg(feature = "fault-injection")]
    pub const DEBUG_FAULT: &str = "debug.fault";
}

/// Decodes a request's `params` (MessagePack bytes of a map, or empty) into
/// `T`; a wrong type is an `INVALID_REQUEST` whose message names the param
/// (its path, e.g. `limits.timeout_s`).
///
/// The path can hold a client's map keys (`env.<name>`) and serde's message
/// the client's values (`invalid type: string "…"`, `unknown field …`): both
/// are cut short ([`quote`], [`clip`]), so the error stays small whatever
/// the client sent.
pub fn parse_params<T: DeserializeOwned>(params: &[u8]) -> Result<T, RequestError> {
    const EMPTY_MAP: &[u8] = &[0x80];
    /// serde's messages name the expected type too: room for that.
    const MESSAGE_BYTES: usize = 4 * error::QUOTE_BYTES;
    let bytes = if params.is_empty() { EMPTY_MAP } else { params };
    let mut de = rmp_serde::Deserializer::new(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = clip(&e.into_inner().to_string(), MESSAGE_BYTES);
        if path == "." {
            RequestError::InvalidRequest(format!("params: {inner}"))
        } else {
            RequestError::InvalidRequest(format!("param {}: {inner}", quote(&path)))
        }
    })
}

/// The shortest duration a param may give: 1 ms (the daemon's timers are no finer).
pub const MIN_SECONDS: f64 = 0.001;

/// A duration param in seconds (int or float), checked to be finite, at
/// least [`MIN_SECONDS`] and at most 1e9.
pub fn seconds_param(name: &str, secs: f64) -> Result<Duration, RequestError> {
    if !secs.is_finite() || secs > 1e9 {
        return Err(RequestError::InvalidRequest(format!(
            "param `{name}`: {secs} is not a duration in seconds (finite, at most 1e9)"
        )));
    }
    if secs < MIN_SECONDS {
        return Err(RequestError::InvalidRequest(format!(
            "param `{name}`: {secs} is below the minimum of {MIN_SECONDS} s (1 ms)"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Deserializes an optional struct only from a map: rmp-serde also decodes
/// a struct from an array, by position, so `limits: [1, 2]` would silently
/// set the first two limits, whatever their names.
fn map_only<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct MapVisitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for MapVisitor<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    de.deserialize_any(MapVisitor(std::marker::PhantomData))
}

/// Most variables an `env` param may carry.
pub const MAX_ENV_VARS: usize = 4096;

/// Deserializes an optional `env` map, refusing more than [`MAX_ENV_VARS`]
/// entries while it reads (before they are all allocated).
fn bounded_env<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct EnvVisitor;
    impl<'de> serde::de::Visitor<'de> for EnvVisitor {
        type Value = Option<BTreeMap<String, String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a map of at most {MAX_ENV_VARS} string variables")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.len() >= MAX_ENV_VARS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_ENV_VARS} variables"
                    )));
                }
                out.insert(k, v);
            }
            Ok(Some(out))
        }
    }
    de.deserialize_any(EnvVisitor)
}

/// `session.create` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateParams {
    /// Working directory of the first command; default: the configured `default_cwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Added to the base environment of every command of the session.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "bounded_env"
    )]
    pub env: Option<BTreeMap<String, String>>,
    /// Limits that may only tighten the configured ones (a map; unknown keys refused).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "map_only"
    )]
    pub limits: Option<SessionLimits>,
    /// A script run in the new session before it is handed out; the state it
    /// leaves is the session's starting state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
}

/// Per-session tightening of the configured limits. Unlike params, an
/// unknown key here is refused: a misspelt limit must never silently apply nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionLimits {
    /// This session's default and maximum command timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Session cgroup memory.max, bytes (refused when cgroups are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_bytes: Option<u64>,
    /// Session cgroup CPU limit, cores (refused when cgroups are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_cores: Option<f64>,
    /// Session cgroup pids.max (refused when cgroups are off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// RLIMIT_CPU of the session's commands, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rlimit_cpu_s: Option<u64>,
    /// RLIMIT_AS of the session's commands, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rlimit_as_bytes: Option<u64>,
    /// RLIMIT_NOFILE of the session's commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rlimit_nofile: Option<u64>,
    /// RLIMIT_NPROC of the session's commands (binds non-root users only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rlimit_nproc: Option<u64>,
}

/// Params of the methods that name only a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionIdParams {
    pub session_id: String,
}

/// What to keep of a stream longer than `max_output_bytes`. Decoded only
/// from its name (rmp-serde would also take a variant index: `1` for `tail`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum KeepOutput {
    /// The first bytes.
    #[default]
    Head,
    /// The last bytes.
    Tail,
    /// The first half and the last half of the cap; the middle is dropped.
    Both,
}

impl TryFrom<String> for KeepOutput {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        match name.as_str() {
            "head" => Ok(KeepOutput::Head),
            "tail" => Ok(KeepOutput::Tail),
            "both" => Ok(KeepOutput::Both),
            _ => Err(format!(
                "unknown value {}, expected `head`, `tail` or `both`",
                quote(&name)
            )),
        }
    }
}

/// `exec.run` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecParams {
    pub session_id: String,
    /// Run by the session's shell as `shell -c`.
    pub command: String,
    /// Seconds; default `default_timeout` (or the session's `timeout_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Bytes fed to the command's stdin, then EOF. `bin` or `str` on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<ByteBuf>,
    /// Environment for this command only.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "bounded_env"
    )]
    pub env: Option<BTreeMap<String, String>>,
    /// Which part of an over-long stream to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_output: Option<KeepOutput>,
    /// `exec.run` only: send `started` and `output` events before the result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Keep stdin open for `exec.write` (after `stdin`) until `eof`
    /// (`exec.start`, or `exec.run` with `stream`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_open: bool,
    /// Seconds without output on either stream after which the command is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<f64>,
    /// Run on a pseudo-terminal of this size (`exec.start`, or `exec.run` with `stream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtyParams>,
}

/// The `pty` param: a terminal's window size. An unknown key is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtyParams {
    pub rows: u64,
    pub cols: u64,
}

/// `system.ping` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub pong: bool,
    pub version: String,
    pub protocol: u32,
    pub uptime_ms: u64,
    /// The protocol 2 additions this daemon has (see [`FEATURES`]).
    #[serde(default)]
    pub features: Vec<String>,
}

/// What `system.ping` lists in `features`: each protocol 2 addition this daemon implements.
pub const FEATURES: &[&str] = &[
    "stream",
    "start",
    "idle-timeout",
    "terminal-state",
    "init",
    "memory-budget",
    "pty",
];

/// `system.stats` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsResult {
    pub sessions: SessionStats,
    pub commands: CommandStats,
    pub clients: ClientStats,
    pub runtime: RuntimeStats,
    /// Latency histograms: `request_duration_seconds` per method and
    /// `command_duration_seconds` (absent from daemons before 0.1 of protocol 2).
    #[serde(default)]
    pub latency: Vec<HistogramStats>,
}

/// `system.stats` → `latency[]`: one histogram, its buckets cumulative as in Prometheus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramStats {
    /// `request_duration_seconds` or `command_duration_seconds`.
    pub name: String,
    /// The request method (`request_duration_seconds` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Upper bounds of the buckets, in seconds (the `+Inf` bucket is `count`).
    pub le: Vec<f64>,
    /// Observations at or below each bound.
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

/// `system.stats` → `sessions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionStats {
    pub active: u64,
    pub max: u64,
    pub created_total: u64,
    pub destroyed_total: u64,
    pub expired_total: u64,
    pub rejected_total: u64,
}

/// `system.stats` → `commands`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandStats {
    pub running: u64,
    pub max: u64,
    pub started_total: u64,
    pub completed_total: u64,
    pub timed_out_total: u64,
    pub killed_total: u64,
    pub rejected_busy_total: u64,
    pub rejected_capacity_total: u64,
    pub output_truncated_total: u64,
    pub oom_killed_total: u64,
    pub spawn_failed_total: u64,
    /// Commands killed for writing nothing for `idle_timeout_s`.
    #[serde(default)]
    pub idle_timed_out_total: u64,
    /// Forks refused by sessions' `pids_max`: each command's at its end, the
    /// rest (background processes) at its session's end.
    #[serde(default)]
    pub pids_limit_hits_total: u64,
    /// Pipes of background writers closed because their session already had
    /// `sessions.max_background_pipes` open (the oldest goes first).
    #[serde(default)]
    pub background_pipes_closed_total: u64,
}

/// `system.stats` → `clients`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientStats {
    pub connections: u64,
    pub connections_total: u64,
    pub connections_refused_total: u64,
    pub rate_limited_total: u64,
    pub bad_frames_total: u64,
    /// Connections closed for a partial frame older than `request_read_timeout`.
    #[serde(default)]
    pub stalled_total: u64,
    /// Connections dropped for unread answers over `max_unsent_bytes`.
    #[serde(default)]
    pub slow_readers_dropped_total: u64,
    pub requests_total: u64,
    pub errors_total: u64,
}

/// `system.stats` → `runtime`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeStats {
    pub pid: u32,
    pub uptime_ms: u64,
    pub rss_bytes: u64,
    pub cgroups: String,
    pub actor_failures_total: u64,
    pub zombies_reaped_total: u64,
    pub draining: bool,
    /// The daemon's own oom_score_adj, read back from /proc.
    pub oom_score_adj: i64,
    /// The oom_score_adj every command starts with.
    pub commands_oom_score_adj: i64,
    /// Whether the daemon is a child subreaper (orphans of commands are reparented to it).
    pub subreaper: bool,
    /// Stale session cgroups of an earlier daemon killed and removed at start.
    pub cgroups_recovered_total: u64,
    /// `[commands] isolation`: `shared` or `uid-per-session` (empty from an
    /// older daemon). With `run_as_user` it tells a client whether commands
    /// run as the daemon's own uid, so whether they can enter the client's cwd.
    #[serde(default)]
    pub isolation: String,
    /// Whether `[commands] run_as_user` is set (commands of `shared` sessions
    /// run as that user).
    #[serde(default)]
    pub run_as_user: bool,
    /// `server.memory_budget` in force, in bytes.
    #[serde(default)]
    pub memory_budget_bytes: u64,
    /// Bytes charged to the budget now (output, queued answers, frames, state).
    #[serde(default)]
    pub memory_used_bytes: u64,
    /// Requests and frames refused with `OVERLOADED`.
    #[serde(default)]
    pub overloaded_total: u64,
}

/// `session.create` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateResult {
    pub session_id: String,
}

/// `session.destroy` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestroyResult {
    pub destroyed: bool,
}

/// One entry of `session.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub created_ms_ago: u64,
    pub idle_ms: u64,
    pub busy: bool,
    pub cwd: String,
    /// The running commands' ids (empty when idle).
    #[serde(default)]
    pub command_ids: Vec<String>,
    /// The most recently started running command, nil when idle.
    #[serde(default)]
    pub command_id: Option<String>,
    /// Forks the session's `pids_max` refused so far, by any of its
    /// processes (nil without cgroups, or from an older daemon).
    #[serde(default)]
    pub pids_limit_hits: Option<u64>,
}

/// `session.list` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResult {
    pub sessions: Vec<SessionInfo>,
}

/// Why the daemon killed a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KilledBy {
    Timeout,
    /// Nothing written to stdout or stderr for `idle_timeout_s`.
    IdleTimeout,
    CpuLimit,
    MemoryLimit,
    Cancelled,
    SessionDestroyed,
    Shutdown,
    /// A reason this client does not know (from a newer daemon); never sent by this one.
    #[serde(other)]
    Other,
}

impl KilledBy {
    /// Its name on the wire, e.g. `idle_timeout`.
    pub fn name(self) -> &'static str {
        match self {
            KilledBy::Timeout => "timeout",
            KilledBy::IdleTimeout => "idle_timeout",
            KilledBy::CpuLimit => "cpu_limit",
            KilledBy::MemoryLimit => "memory_limit",
            KilledBy::Cancelled => "cancelled",
            KilledBy::SessionDestroyed => "session_destroyed",
            KilledBy::Shutdown => "shutdown",
            KilledBy::Other => "other",
        }
    }
}

/// `exec.run` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The command's id (protocol 2).
    #[serde(default)]
    pub command_id: Option<String>,
    /// Exit code, or nil when killed by a signal.
    pub exit_code: Option<i32>,
    /// The signal that ended the shell, if any.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub killed_by: Option<KilledBy>,
    pub stdout: ByteBuf,
    pub stderr: ByteBuf,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_total_bytes: u64,
    pub stderr_total_bytes: u64,
    /// Where, in `stdout`, bytes were dropped past the cap: after the head
    /// (`head`, and between the halves for `both`), at 0 (`tail`); nil when none were.
    #[serde(default)]
    pub stdout_cut_at: Option<u64>,
    /// The same for `stderr`.
    #[serde(default)]
    pub stderr_cut_at: Option<u64>,
    pub duration_ms: u64,
    pub cpu_ms: Option<u64>,
    pub max_rss_bytes: Option<u64>,
    /// Forks the session's `pids_max` refused while the command ran (nil
    /// without cgroups, or from an older daemon).
    #[serde(default)]
    pub pids_limit_hits: Option<u64>,
    /// The session's working directory after the command.
    pub cwd: String,
    /// Why the state this command left was not kept (the session keeps its previous one).
    #[serde(default)]
    pub state_error: Option<String>,
}

/// `exec.cancel` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelResult {
    pub cancelled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(entries: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
        rmpv::Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    fn parse_params<T: DeserializeOwned>(v: rmpv::Value) -> Result<T, RequestError> {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &v).unwrap();
        super::parse_params(&bytes)
    }

    #[test]
    fn wrong_type_names_the_param() {
        let err = parse_params::<ExecParams>(value(vec![
            ("session_id", "s".into()),
            ("command", 5.into()),
        ]))
        .unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
        assert!(err.to_string().contains("command"), "{err}");
    }

    #[test]
    fn nested_param_path_is_named() {
        let err = parse_params::<CreateParams>(value(vec![(
            "limits",
            value(vec![("timeout_s", "soon".into())]),
        )]))
        .unwrap_err();
        assert!(err.to_string().contains("limits.timeout_s"), "{err}");
    }

    #[test]
    fn stdin_accepts_bin_and_str_and_unknown_params_are_ignored() {
        let p: ExecParams = parse_params(value(vec![
            ("session_id", "s".into()),
            ("command", "cat".into()),
            ("stdin", "text".into()),
            ("whatever", 1.into()),
        ]))
        .unwrap();
        assert_eq!(p.stdin.unwrap().as_slice(), b"text");
        let p: ExecParams = parse_params(value(vec![
            ("session_id", "s".into()),
            ("command", "cat".into()),
            ("stdin", rmpv::Value::Binary(vec![0, 1])),
            ("timeout_s", 2.into()),
        ]))
        .unwrap();
        assert_eq!(p.stdin.unwrap().as_slice(), &[0, 1]);
        assert_eq!(p.timeout_s, Some(2.0));
    }

    #[test]
    fn keep_output_values() {
        let p: ExecParams = parse_params(value(vec![
            ("session_id", "s".into()),
            ("command", "x".into()),
            ("keep_output", "tail".into()),
        ]))
        .unwrap();
        assert_eq!(p.keep_output, Some(KeepOutput::Tail));
        let err = parse_params::<ExecParams>(value(vec![
            ("session_id", "s".into()),
            ("command", "x".into()),
            ("keep_output", "middle".into()),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("keep_output"), "{err}");
    }

    /// Issue 14, "`keep_output: 1`, `limits: [1,2]`, `{"limits": {"memry_max_bytes": 1}}`":
    /// enums only by name, structs only from maps, no unknown key in `limits`.
    #[test]
    fn params_are_strict_where_a_mistake_would_apply_silently() {
        let exec = |keep: rmpv::Value| {
            parse_params::<ExecParams>(value(vec![
                ("session_id", "s".into()),
                ("command", "x".into()),
                ("keep_output", keep),
            ]))
        };
        let err = exec(1.into()).unwrap_err();
        assert!(err.to_string().contains("keep_output"), "{err}");
        assert_eq!(
            exec("both".into()).unwrap().keep_output,
            Some(KeepOutput::Both)
        );
        let err = parse_params::<CreateParams>(value(vec![(
            "limits",
            rmpv::Value::Array(vec![1.into(), 2.into()]),
        )]))
        .unwrap_err();
        assert!(err.to_string().contains("limits"), "{err}");
        let err = parse_params::<CreateParams>(value(vec![(
            "limits",
            value(vec![("memry_max_bytes", 1.into())]),
        )]))
        .unwrap_err();
        assert_eq!(err.code(), "INVALID_REQUEST");
        assert!(err.to_string().contains("memry_max_bytes"), "{err}");
        let ok = parse_params::<CreateParams>(value(vec![
            ("limits", value(vec![("pids_max", 64.into())])),
            ("a_param_from_the_future", 1.into()),
        ]))
        .unwrap();
        assert_eq!(ok.limits.unwrap().pids_max, Some(64));
        let none = parse_params::<CreateParams>(value(vec![("limits", rmpv::Value::Nil)])).unwrap();
        assert!(none.limits.is_none());
    }

    /// Issue 14, "a 2 MiB env key": serde's messages embed the client's
    /// values and map keys; the error stays small.
    #[test]
    fn serde_errors_are_bounded() {
        let big = "k".repeat(2 << 20);
        let err = parse_params::<ExecParams>(value(vec![
            ("session_id", "s".into()),
            ("command", big.as_str().into()),
            ("env", value(vec![(big.as_str(), 5.into())])),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().len() < 512,
            "{} bytes",
            err.to_string().len()
        );
        let err = parse_params::<ExecParams>(value(vec![
            ("session_id", "s".into()),
            ("command", "x".into()),
            ("keep_output", big.as_str().into()),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().len() < 512,
            "{} bytes",
            err.to_string().len()
        );
        let err = parse_params::<ExecParams>(value(vec![
            ("session_id", 5.into()),
            ("command", big.as_str().into()),
            ("timeout_s", big.as_str().into()),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().len() < 512,
            "{} bytes",
            err.to_string().len()
        );
    }

    #[test]
    fn missing_required_param_is_named() {
        let err = parse_params::<ExecParams>(value(vec![("session_id", "s".into())])).unwrap_err();
        assert!(err.to_string().contains("command"), "{err}");
    }

    #[test]
    fn seconds_must_be_positive_and_finite() {
        assert!(seconds_param("timeout_s", 0.5).is_ok());
        assert!(seconds_param("timeout_s", 0.0).is_err());
        assert!(seconds_param("timeout_s", -1.0).is_err());
        assert!(seconds_param("timeout_s", f64::NAN).is_err());
        // Issue 14, "`timeout_s: 1e-9`": durations have a floor of 1 ms.
        let err = seconds_param("timeout_s", 1e-9).unwrap_err();
        assert!(
            err.to_string().contains("`timeout_s`")
                && err.to_string().contains("below the minimum of 0.001"),
            "{err}"
        );
        assert!(seconds_param("timeout_s", 0.001).is_ok());
    }
}
