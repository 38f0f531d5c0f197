//! Configuration: embedded defaults, the TOML file, validation → [`ConfigError`]; read at start and again on SIGHUP ([`Config::reloaded`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, CgroupsConfig};
use crate::isolation::{IsolationMode, UidRange};
use crate::limits::RlimitsConfig;

/// Everything the daemon can be told at start. Every field has a default, so
/// the daemon runs with no file at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The socket and the connections on it.
    pub server: ServerConfig,
    /// How many sessions, for how long, with which shell.
    pub sessions: SessionsConfig,
    /// How commands run: concurrency, timeouts, output and stdin caps, base environment.
    pub commands: CommandsConfig,
    /// setrlimit values applied to every command before it runs.
    pub rlimits: RlimitsConfig,
    /// Per-client request rate.
    pub rate_limit: RateLimitConfig,
    /// One cgroup per session with hard memory, CPU and pids limits.
    pub cgroups: CgroupsConfig,
    /// The Prometheus listener.
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus text format over HTTP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `GET /metrics` on (e.g. `127.0.0.1:9464`); empty: off.
    pub listen: String,
}

/// `[rate_limit]`: a token bucket per client uid (`system.ping` is exempt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client; 0 turns rate limiting off.
    pub requests_per_second: u32,
    /// Requests a client may send at once before the rate applies.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            requests_per_second: 200,
            burst: 400,
        }
    }
}

/// `[server]`: the listening socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Socket path; `None` means `$XDG_RUNTIME_DIR/sessiond.sock`, else
    /// `/tmp/sessiond-<uid>/sessiond.sock` (see [`Config::socket_path`]).
    pub socket: Option<PathBuf>,
    /// File mode of the socket; the socket is created with it, never wider.
    pub socket_mode: u32,
    /// Peer uids allowed to connect; empty means the daemon's own uid and root.
    pub allowed_uids: Vec<u32>,
    /// Open connections at once; the next one is refused with an error frame.
    pub max_connections: usize,
    /// Open connections one client uid may hold, so one uid cannot take every
    /// slot; `None`: a quarter of `max_connections` (see
    /// [`ServerConfig::connections_per_client`]).
    pub max_connections_per_client: Option<usize>,
    /// Largest request frame; checked against the length prefix before allocating.
    pub max_request_bytes: ByteSize,
    /// A request frame that has begun must be complete within this; a client
    /// that sends part of one and stalls is disconnected. Idle connections are not.
    #[serde(with = "humantime_serde")]
    pub request_read_timeout: Duration,
    /// Answers queued for a connection behind the one being written, in
    /// bytes; past this the client is not reading and the connection is dropped.
    pub max_unsent_bytes: ByteSize,
    /// Everything the daemon holds for clients (command output, queued
    /// answers and events, request frames, session state) is charged to
    /// this; past it new work is refused with OVERLOADED. Reloadable: a cut
    /// below current use refuses new work until use falls, never kills.
    pub memory_budget: ByteSize,
    /// After SIGTERM: how long running commands may finish before they are killed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The daemon's own oom_score_adj (-1000..=1000), set at start: low, so when
    /// the host runs out of memory the kernel picks a command, not the daemon.
    /// Lowering it needs root (CAP_SYS_RESOURCE); without, it stays as inherited.
    pub oom_score_adj: i32,
    /// Group that owns the socket (a name or a number); with `socket_mode =
    /// 0o660` its members may connect (they must still be in `allowed_uids`). Empty: the daemon's group.
    pub socket_group: String,
    /// Log filter (`info`, `debug`, `sessiond=debug,info`…); empty: `RUST_LOG`, else `info`.
    /// Reloaded on SIGHUP.
    pub log_level: String,
}

/// `[sessions]`: admission and lifetime of sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Live sessions at once, across all clients (`TOO_MANY_SESSIONS`).
    pub max_sessions: usize,
    /// Live sessions one client uid may hold (`CLIENT_SESSION_LIMIT`).
    pub max_sessions_per_client: usize,
    /// A session with no command for this long is destroyed (`expired_total`).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The shell that runs each command as `shell -c`; falls back to /bin/sh when absent.
    pub shell: PathBuf,
    /// Where sessions start when `session.create` names no `cwd`; `None` means the daemon user's home.
    pub default_cwd: Option<PathBuf>,
    /// How often dead sessions, dead process groups and orphaned zombies are swept.
    #[serde(with = "humantime_serde")]
    pub reap_interval: Duration,
    /// Become a child subreaper, so orphaned descendants of commands are
    /// reparented to the daemon and reaped by it at once (not by an init that
    /// may reap slowly); needs no privilege.
    pub subreaper: bool,
    /// Largest terminal state a session carries; a command that leaves a larger
    /// one gets `state_error` and the session keeps its previous state.
    pub max_state_bytes: ByteSize,
    /// Per second per session: how fast output that background writers keep
    /// sending after their command answered is read and discarded (one budget
    /// shared by all the session's leftover pipes; faster writers block on
    /// the full pipe).
    pub background_drain_rate: ByteSize,
    /// Pipes kept open per session for background writers; past it the oldest
    /// are closed (counted in `background_pipes_closed_total`).
    pub max_background_pipes: usize,
}

/// `[commands]`: how each command runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Commands running at once across all sessions (`TOO_MANY_COMMANDS`).
    pub max_concurrent: usize,
    /// Commands running at once in one session (`SESSION_BUSY`).
    pub max_per_session: usize,
    /// Timeout of a command whose request names none.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Largest timeout a request may ask for (`INVALID_REQUEST` above it).
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// SIGTERM to the process group, then SIGKILL after this.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// Bytes kept per stream (stdout, stderr); the rest is drained and counted.
    pub max_output_bytes: ByteSize,
    /// Largest `stdin` a request (or one `exec.write`) may carry (`STDIN_TOO_LARGE`).
    pub max_stdin_bytes: ByteSize,
    /// How long a finished command stays readable with `exec.read`.
    #[serde(with = "humantime_serde")]
    pub retain_finished: Duration,
    /// Finished commands kept readable per session, oldest dropped first (0: none).
    pub retain_per_session: usize,
    /// When the daemon is root: run commands as this user (its uid and primary
    /// group, no supplementary groups; HOME, USER, SHELL from its entry). Empty: the daemon's user.
    pub run_as_user: String,
    /// oom_score_adj of every command (-1000..=1000): high, so the OOM killer takes commands first.
    pub oom_score_adj: i32,
    /// The base environment of every command; the daemon's own is never passed on.
    pub env: BTreeMap<String, String>,
    /// Who a session's commands run as: `shared` (all as `run_as_user` or the
    /// daemon's user) or `uid-per-session` (a uid and gid of its own per session).
    pub isolation: IsolationMode,
    /// `uid-per-session`: the uids (and the same gids) handed to sessions; none may belong to an account.
    pub uid_range: UidRange,
    /// `uid-per-session`: where each session's home (0700, owned by its uid) is made.
    pub state_dir: PathBuf,
    /// `uid-per-session`: `TMPDIR` is a directory inside the session's home.
    pub private_tmp: bool,
}

impl ServerConfig {
    /// The connections one client uid may hold: `max_connections_per_client`,
    /// or a quarter of `max_connections` (at least 1).
    pub fn connections_per_client(&self) -> usize {
        self.max_connections_per_client
            .unwrap_or((self.max_connections / 4).max(1))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket: None,
            socket_mode: 0o600,
            allowed_uids: Vec::new(),
            max_connections: 256,
            max_connections_per_client: None,
            max_request_bytes: ByteSize::mib(2),
            request_read_timeout: Duration::from_secs(10),
            max_unsent_bytes: ByteSize::mib(64),
            memory_budget: ByteSize::mib(512),
            shutdown_grace: Duration::from_secs(10),
            oom_score_adj: -900,
            socket_group: String::new(),
            log_level: String::new(),
        }
    }
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            max_sessions_per_client: 8,
            idle_timeout: Duration::from_secs(3600),
            shell: PathBuf::from("/bin/bash"),
            default_cwd: None,
            reap_interval: Duration::from_secs(5),
            subreaper: true,
            max_state_bytes: ByteSize::kib(256),
            background_drain_rate: ByteSize::mib(8),
            max_background_pipes: 64,
        }
    }
}

impl Default for CommandsConfig {
    fn default() -> Self {
        let env = [
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("LANG", "C.UTF-8"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Self {
            max_concurrent: 16,
            max_per_session: 1,
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(3600),
            kill_grace: Duration::from_secs(2),
            max_output_bytes: ByteSize::mib(4),
            max_stdin_bytes: ByteSize::mib(1),
            retain_finished: Duration::from_secs(600),
            retain_per_session: 16,
            run_as_user: String::new(),
            oom_score_adj: 1000,
            env,
            isolation: IsolationMode::Shared,
            uid_range: UidRange::default(),
            state_dir: PathBuf::from("/var/lib/sessiond"),
            private_tmp: false,
        }
    }
}

/// Why a configuration was refused. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value parsed but is not allowed.
    #[error("config key `{key}` = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

fn invalid(key: &'static str, value: impl fmt::Debug, allowed: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: format!("{value:?}"),
        allowed: allowed.into(),
    }
}

impl Config {
    /// Reads `path` (or the embedded defaults when `None`) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every value that parsed but may still be wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.socket_mode & !0o777 != 0 || s.socket_mode & 0o600 != 0o600 {
            return Err(invalid(
                "server.socket_mode",
                format!("{:o}", s.socket_mode),
                "a permission mode like 0o600 or 0o660 that keeps the owner's read and write bits",
            ));
        }
        if s.request_read_timeout.is_zero() {
            return Err(invalid(
                "server.request_read_timeout",
                s.request_read_timeout,
                "a duration above zero",
            ));
        }
        if s.max_unsent_bytes.as_u64() < 64 * 1024 {
            return Err(invalid(
                "server.max_unsent_bytes",
                s.max_unsent_bytes.as_u64(),
                "at least 64 KiB",
            ));
        }
        // One command's reservation must fit, or no command could ever run.
        let one_command =
            4 * self.commands.max_output_bytes.as_u64() + self.sessions.max_state_bytes.as_u64();
        if s.memory_budget.as_u64() < one_command {
            return Err(invalid(
                "server.memory_budget",
                s.memory_budget.as_u64(),
                format!(
                    "at least one command's reservation: 4 × commands.max_output_bytes + sessions.max_state_bytes = {one_command} bytes"
                ),
            ));
        }
        let cg = &self.cgroups;
        if cg.parent.is_empty() || cg.parent.contains('/') || cg.parent.starts_with('.') {
            return Err(invalid(
                "cgroups.parent",
                &cg.parent,
                "a plain directory name (no '/', not starting with '.')",
            ));
        }
        if cg.memory_max.as_u64() < cgroup::MIN_MEMORY_BYTES {
            return Err(invalid(
                "cgroups.memory_max",
                cg.memory_max.as_u64(),
                "at least 4 MiB",
            ));
        }
        if !(cg.cpu_max_cores.is_finite() && cg.cpu_max_cores >= cgroup::MIN_CPU_CORES) {
            return Err(invalid(
                "cgroups.cpu_max_cores",
                cg.cpu_max_cores,
                "a number of cores, at least 0.01",
            ));
        }
        if cg.pids_max < cgroup::MIN_PIDS {
            return Err(invalid(
                "cgroups.pids_max",
                cg.pids_max,
                "at least 8 (the shell and its helpers count)",
            ));
        }
        let r = &self.rate_limit;
        if r.requests_per_second > 0 && r.burst == 0 {
            return Err(invalid(
                "rate_limit.burst",
                r.burst,
                "at least 1 when requests_per_second is above 0",
            ));
        }
        if s.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                s.max_connections,
                "at least 1",
            ));
        }
        if let Some(per_client) = s.max_connections_per_client {
            if per_client == 0 || per_client > s.max_connections {
                return Err(invalid(
                    "server.max_connections_per_client",
                    per_client,
                    "at least 1 and at most server.max_connections",
                ));
            }
        }
        if s.max_request_bytes.as_u64() < 1024 || s.max_request_bytes.as_u64() > u64::from(u32::MAX)
        {
            return Err(invalid(
                "server.max_request_bytes",
                s.max_request_bytes.as_u64(),
                "between 1 KiB and 4 GiB - 1 (the frame length is a u32)",
            ));
        }
        if let Some(socket) = &s.socket {
            if !socket.is_absolute() {
                return Err(invalid("server.socket", socket, "an absolute path"));
            }
        }

        self.socket_gid()?;
        if !s.log_level.is_empty() {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.log_level) {
                return Err(invalid(
                    "server.log_level",
                    &s.log_level,
                    format!("a tracing filter such as \"info\" or \"sessiond=debug,info\" ({e})"),
                ));
            }
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                &self.metrics.listen,
                "an address and port such as \"127.0.0.1:9464\", or empty for off",
            ));
        }

        let ss = &self.sessions;
        if ss.max_sessions == 0 {
            return Err(invalid(
                "sessions.max_sessions",
                ss.max_sessions,
                "at least 1",
            ));
        }
        if ss.max_sessions_per_client == 0 {
            return Err(invalid(
                "sessions.max_sessions_per_client",
                ss.max_sessions_per_client,
                "at least 1",
            ));
        }
        if ss.idle_timeout.is_zero() {
            return Err(invalid(
                "sessions.idle_timeout",
                ss.idle_timeout,
                "a duration above zero",
            ));
        }
        if ss.reap_interval < Duration::from_millis(10) {
            return Err(invalid(
                "sessions.reap_interval",
                ss.reap_interval,
                "at least 10ms",
            ));
        }
        if ss.background_drain_rate.as_u64() < 1024 {
            return Err(invalid(
                "sessions.background_drain_rate",
                ss.background_drain_rate.as_u64(),
                "at least 1 KiB (per second)",
            ));
        }
        if ss.max_background_pipes == 0 {
            return Err(invalid(
                "sessions.max_background_pipes",
                ss.max_background_pipes,
                "at least 1",
            ));
        }
        if !ss.shell.is_absolute() {
            return Err(invalid("sessions.shell", &ss.shell, "an absolute path"));
        }
        if let Some(cwd) = &ss.default_cwd {
            if !cwd.is_absolute() || !cwd.is_dir() {
                return Err(invalid(
                    "sessions.default_cwd",
                    cwd,
                    "an absolute path to an existing directory",
                ));
            }
        }

        let c = &self.commands;
        if c.max_concurrent == 0 {
            return Err(invalid(
                "commands.max_concurrent",
                c.max_concurrent,
                "at least 1",
            ));
        }
        if c.max_per_session == 0 {
            return Err(invalid(
                "commands.max_per_session",
                c.max_per_session,
                "at least 1",
            ));
        }
        if c.max_timeout.is_zero() {
            return Err(invalid(
                "commands.max_timeout",
                c.max_timeout,
                "a duration above zero",
            ));
        }
        if c.default_timeout.is_zero() || c.default_timeout > c.max_timeout {
            return Err(invalid(
                "commands.default_timeout",
                c.default_timeout,
                format!(
                    "above zero and at most commands.max_timeout ({})",
                    humantime::format_duration(c.max_timeout)
                ),
            ));
        }
        if c.max_output_bytes.as_u64() < 2 {
            return Err(invalid(
                "commands.max_output_bytes",
                c.max_output_bytes.as_u64(),
                "at least 2 bytes",
            ));
        }
        self.command_user()?;
        if let Err((key, value, allowed)) = crate::isolation::check_config(
            c.isolation,
            c.uid_range,
            &c.state_dir,
            &c.run_as_user,
            ss.max_sessions,
        ) {
            return Err(invalid(key, value, allowed));
        }
        for (key, value) in [
            ("server.oom_score_adj", self.server.oom_score_adj),
            ("commands.oom_score_adj", c.oom_score_adj),
        ] {
            if !(-1000..=1000).contains(&value) {
                return Err(invalid(key, value, "between -1000 and 1000"));
            }
        }
        if let Err((key, value, hard)) = crate::limits::check_against_daemon(&self.rlimits) {
            return Err(invalid(
                key,
                value,
                format!(
                    "at most the daemon's own hard limit ({hard}), which every command inherits"
                ),
            ));
        }
        for (key, value) in &c.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(
                    "commands.env",
                    key,
                    "variable names that are non-empty and hold no '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(invalid("commands.env", value, "values without NUL bytes"));
            }
        }
        Ok(())
    }

    /// The user commands run as: `run_as_user` when set (which needs a root
    /// daemon and an existing user), else `None` (the daemon's own user).
    pub fn command_user(&self) -> Result<Option<nix::unistd::User>, ConfigError> {
        let name = &self.commands.run_as_user;
        if name.is_empty() {
            return Ok(None);
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(invalid(
                "commands.run_as_user",
                name,
                "empty unless the daemon runs as root (only root can switch users)",
            ));
        }
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Ok(Some(user)),
            _ => Err(invalid(
                "commands.run_as_user",
                name,
                "the name of an existing user",
            )),
        }
    }

    /// The gid of `server.socket_group` (`None` when empty): a group name, or a number.
    pub fn socket_gid(&self) -> Result<Option<u32>, ConfigError> {
        let name = &self.server.socket_group;
        if name.is_empty() {
            return Ok(None);
        }
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(Some(gid));
        }
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(Some(group.gid.as_raw())),
            _ => Err(invalid(
                "server.socket_group",
                name,
                "the name (or number) of an existing group",
            )),
        }
    }

    /// The configuration a SIGHUP puts in force, given the one running now
    /// (`self`) and the file just read (`file`, validated): `file`'s values
    /// for what may change while running, ours for the rest (see
    /// [`Config::pin_restart_only`]). Returns it with the keys that change
    /// and the keys that differ in the file but stay as they are until a
    /// restart, each as `section.key`.
    pub fn reloaded(&self, file: &Config) -> Reload {
        let mut next = file.clone();
        next.pin_restart_only(self);
        Reload {
            changed: differing_keys(self, &next),
            ignored: differing_keys(&next, file),
            config: next,
        }
    }

    /// Copies from `running` every key that is never reloaded: what the
    /// socket, the identities, the isolation layer and the shared pools were
    /// built from at start. The rest (limits and timeouts of new sessions and
    /// commands, rlimits, cgroup limits, rate limits, per-client caps, the log
    /// level, the shutdown grace) is taken from the file.
    fn pin_restart_only(&mut self, running: &Config) {
        let (s, r) = (&mut self.server, &running.server);
        s.socket.clone_from(&r.socket);
        s.socket_mode = r.socket_mode;
        s.socket_group.clone_from(&r.socket_group);
        s.allowed_uids.clone_from(&r.allowed_uids);
        s.max_connections = r.max_connections;
        s.max_request_bytes = r.max_request_bytes;
        s.request_read_timeout = r.request_read_timeout;
        s.max_unsent_bytes = r.max_unsent_bytes;
        s.oom_score_adj = r.oom_score_adj;
        let (ss, rs) = (&mut self.sessions, &running.sessions);
        ss.shell.clone_from(&rs.shell);
        ss.default_cwd.clone_from(&rs.default_cwd);
        ss.reap_interval = rs.reap_interval;
        ss.subreaper = rs.subreaper;
        // Fixed in the process table's drains at start.
        ss.background_drain_rate = rs.background_drain_rate;
        ss.max_background_pipes = rs.max_background_pipes;
        let (c, rc) = (&mut self.commands, &running.commands);
        c.max_concurrent = rc.max_concurrent;
        c.run_as_user.clone_from(&rc.run_as_user);
        c.oom_score_adj = rc.oom_score_adj;
        c.env.clone_from(&rc.env);
        c.isolation = rc.isolation;
        c.uid_range = rc.uid_range;
        c.state_dir.clone_from(&rc.state_dir);
        c.private_tmp = rc.private_tmp;
        self.cgroups.mode = running.cgroups.mode;
        self.cgroups.parent.clone_from(&running.cgroups.parent);
        self.metrics.clone_from(&running.metrics);
    }

    /// The socket path in force: the configured one, else the per-user default.
    pub fn socket_path(&self) -> PathBuf {
        if let Some(path) = &self.server.socket {
            return path.clone();
        }
        default_socket_path()
    }

    /// The configuration as TOML, for `check-config`.
    /// File modes print in octal (`socket_mode = 0o600`, a TOML integer
    /// that parses back to the same value), as they are written in the file.
    pub fn to_toml(&self) -> String {
        let text =
            toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        let decimal = format!("socket_mode = {}\n", self.server.socket_mode);
        text.replacen(
            &decimal,
            &format!("socket_mode = 0o{:o}\n", self.server.socket_mode),
            1,
        )
    }
}

/// What a SIGHUP does: see [`Config::reloaded`].
#[derive(Debug)]
pub struct Reload {
    /// The configuration now in force.
    pub config: Config,
    /// Keys whose value changes, `section.key`.
    pub changed: Vec<String>,
    /// Keys that differ in the file but are kept until a restart.
    pub ignored: Vec<String>,
}

/// The `section.key` names whose values differ between `a` and `b`.
fn differing_keys(a: &Config, b: &Config) -> Vec<String> {
    fn flat(c: &Config) -> BTreeMap<String, toml::Value> {
        let mut out = BTreeMap::new();
        if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(c) {
            for (section, value) in sections {
                match value {
                    toml::Value::Table(keys) => {
                        for (k, v) in keys {
                            out.insert(format!("{section}.{k}"), v);
                        }
                    }
                    v => {
                        out.insert(section, v);
                    }
                }
            }
        }
        out
    }
    let (a, b) = (flat(a), flat(b));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// `$XDG_RUNTIME_DIR/sessiond.sock`, else `/tmp/sessiond-<uid>/sessiond.sock`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("sessiond.sock"),
        _ => {
            PathBuf::from(format!("/tmp/sessiond-{}", nix::unistd::getuid())).join("sessiond.sock")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_matches_the_defaults() {
        let text = include_str!("../config.example.toml");
        let parsed = Config::parse(text).expect("config.example.toml parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn sizes_and_durations_parse_in_both_forms() {
        let c = Config::parse(
            "[server]\nmax_request_bytes = \"512 KiB\"\nshutdown_grace = \"1m 30s\"\n\
             [commands]\nmax_output_bytes = 4096\n",
        )
        .unwrap();
        assert_eq!(c.server.max_request_bytes.as_u64(), 512 * 1024);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(90));
        assert_eq!(c.commands.max_output_bytes.as_u64(), 4096);
    }

    /// Issue 14, "one uid opens 256 idle connections": a per-uid share, a
    /// quarter of the whole by default, validated.
    #[test]
    fn connections_per_client_default_to_a_quarter() {
        assert_eq!(Config::default().server.connections_per_client(), 64);
        let c = Config::parse("[server]\nmax_connections = 2\n").unwrap();
        assert_eq!(c.server.connections_per_client(), 1);
        let c = Config::parse("[server]\nmax_connections_per_client = 5\n").unwrap();
        assert_eq!(c.server.connections_per_client(), 5);
        for bad in [0, 257] {
            let err = Config::parse(&format!("[server]\nmax_connections_per_client = {bad}\n"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("server.max_connections_per_client"), "{err}");
        }
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::parse("[sessions]\nmax_sesions = 3\n").unwrap_err();
        assert!(err.contains("max_sesions"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_value() {
        let err = Config::parse("[sessions]\nmax_sessions = \"many\"\n").unwrap_err();
        assert!(
            err.contains("max_sessions") && err.contains("many"),
            "{err}"
        );
    }

    #[test]
    fn bad_duration_is_refused() {
        let err = Config::parse("[commands]\nkill_grace = \"soon\"\n").unwrap_err();
        assert!(err.contains("kill_grace"), "{err}");
    }

    #[test]
    fn validation_names_key_value_and_allowed() {
        let mut c = Config::default();
        c.commands.default_timeout = Duration::from_secs(7200);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("commands.default_timeout"), "{err}");
        assert!(err.contains("7200"), "{err}");
        assert!(err.contains("at most commands.max_timeout"), "{err}");

        let mut c = Config::default();
        c.sessions.max_sessions = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("sessions.max_sessions") && err.contains("at least 1"),
            "{err}"
        );

        let mut c = Config::default();
        c.server.socket_mode = 0o200;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server.socket_mode")
        );
    }

    #[test]
    fn rlimits_above_the_daemons_hard_limit_are_refused() {
        // Never unlimited on Linux: the kernel caps it at fs.nr_open.
        let (_, hard) = crate::limits::current(libc::RLIMIT_NOFILE);
        let c = Config::parse(&format!("[rlimits]\nnofile = {}\n", hard + 1)).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("rlimits.nofile") && err.contains("hard limit"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_run_as_user_is_refused() {
        let c = Config::parse("[commands]\nrun_as_user = \"no-such-user-x\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("commands.run_as_user"), "{err}");
    }

    #[test]
    fn isolation_keys_parse_and_are_checked() {
        let c = Config::parse(
            "[commands]\nisolation = \"uid-per-session\"\nuid_range = \"300000-300009\"\nprivate_tmp = true\n",
        )
        .unwrap();
        assert_eq!(c.commands.isolation, IsolationMode::UidPerSession);
        assert_eq!(c.commands.uid_range.len(), 10);
        let err = c.validate().unwrap_err().to_string();
        // 10 uids for 64 sessions (or, not as root: no uid switching at all).
        assert!(
            err.contains("commands.uid_range") || err.contains("commands.isolation"),
            "{err}"
        );
        let err = Config::parse("[commands]\nuid_range = \"9-3\"\n").unwrap_err();
        assert!(
            err.contains("uid_range") && err.contains("FIRST-LAST"),
            "{err}"
        );
        let err = Config::parse("[commands]\nisolation = \"per-uid\"\n").unwrap_err();
        assert!(err.contains("uid-per-session"), "{err}");
    }

    #[test]
    fn reload_takes_limits_and_keeps_what_needs_a_restart() {
        let running = Config::default();
        let mut file = Config::default();
        file.sessions.max_sessions = 3;
        file.rate_limit.burst = 7;
        file.server.socket = Some(PathBuf::from("/elsewhere.sock"));
        file.commands.isolation = IsolationMode::UidPerSession;
        file.cgroups.parent = "other".into();
        let r = running.reloaded(&file);
        assert_eq!(r.config.sessions.max_sessions, 3);
        assert_eq!(r.config.rate_limit.burst, 7);
        assert_eq!(r.config.server.socket, None);
        assert_eq!(r.config.commands.isolation, IsolationMode::Shared);
        assert_eq!(r.config.cgroups.parent, "sessiond");
        assert_eq!(r.changed, ["rate_limit.burst", "sessions.max_sessions"]);
        assert_eq!(
            r.ignored,
            ["cgroups.parent", "commands.isolation", "server.socket"]
        );
        assert!(running.reloaded(&running).changed.is_empty());
    }

    #[test]
    fn socket_group_log_level_and_metrics_are_checked() {
        let c = Config::parse("[server]\nsocket_group = \"no-such-group-x\"\n").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("server.socket_group"), "{err}");
        let c = Config::parse("[server]\nsocket_group = \"0\"\n").unwrap();
        assert_eq!(c.socket_gid().unwrap(), Some(0));
        let c = Config::parse("[server]\nlog_level = \"sessiond=loud\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server.log_level")
        );
        let c = Config::parse("[metrics]\nlisten = \"localhost\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("metrics.listen")
        );
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }
}
