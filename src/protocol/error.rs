//! The one mapping from internal refusals and failures to wire error codes.

use serde::{Deserialize, Serialize};

/// Why a request was refused or failed. Every refusal the daemon makes is one
/// of these; [`RequestError::to_wire`] is the only place that turns them into
/// protocol codes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// Malformed frame, missing or mistyped param, bad value.
    #[error("{0}")]
    InvalidRequest(String),
    /// `timeout_s` over the session's own maximum (its `limits.timeout_s`);
    /// decided by the session, the one place that knows that maximum.
    #[error("param `timeout_s`: {}s is over this session's maximum of {}s", .asked.as_secs_f64(), .max.as_secs_f64())]
    TimeoutOverSessionMax {
        asked: std::time::Duration,
        max: std::time::Duration,
    },
    /// The method name is not known.
    #[error("unknown method {}", quote(.0))]
    UnknownMethod(String),
    /// The request frame's length prefix is over `max_request_bytes`.
    #[error("request frame is over the limit of {limit} bytes")]
    FrameTooLarge { limit: u64 },
    /// `stdin` is over `max_stdin_bytes`.
    #[error("stdin of {size} bytes is over the limit of {limit} bytes")]
    StdinTooLarge { size: u64, limit: u64 },
    /// `max_sessions` live sessions already.
    #[error("the daemon already holds its maximum of {limit} sessions")]
    TooManySessions { limit: u64 },
    /// This client already holds `max_sessions_per_client`.
    #[error("this client already holds its maximum of {limit} sessions")]
    ClientSessionLimit { limit: u64 },
    /// Unknown, expired, or another client's command id.
    #[error("no command {}", quote(.0))]
    CommandNotFound(String),
    /// Unknown, destroyed, expired, or another client's session.
    #[error("no session {}", quote(.0))]
    SessionNotFound(String),
    /// The session runs its maximum of commands.
    #[error("session {} already runs its maximum of commands", quote(.0))]
    SessionBusy(String),
    /// This client's request rate is over its budget.
    #[error("this client sends requests faster than its budget; retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    /// Accepting the request would take the daemon over `server.memory_budget`.
    #[error("the daemon is at its memory budget; retry after {retry_after_ms} ms")]
    Overloaded { retry_after_ms: u64 },
    /// `max_concurrent` commands run across the daemon.
    #[error("the daemon already runs its maximum of {limit} commands")]
    TooManyCommands { limit: u64 },
    /// The daemon is draining after SIGTERM.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The command could not be started.
    #[error("{0}")]
    SpawnFailed(String),
    /// The peer's uid may not use this daemon.
    #[error("uid {0} is not allowed to use this daemon")]
    PermissionDenied(u32),
    /// `max_connections` connections are open.
    #[error("the daemon already serves its maximum of {limit} connections")]
    TooManyConnections { limit: u64 },
    /// This client uid already holds `max_connections_per_client` connections.
    #[error("this client already holds its maximum of {limit} connections")]
    ClientConnectionLimit { limit: u64 },
    /// The actor serving the request failed; the daemon goes on.
    #[error("{0}")]
    Internal(String),
}

/// Bytes of a client's value an error message shows, at most (escaped).
pub const QUOTE_BYTES: usize = 64;

/// A value the client sent, as an error message names it: escaped (control
/// bytes and quotes shown as Rust escapes), cut to [`QUOTE_BYTES`] of escaped
/// text and marked `…(N bytes)` when cut, in backquotes. Every error that
/// names a client's value goes through here, so no error echoes more than a
/// short prefix of what the client sent, whatever its size.
pub fn quote(value: &str) -> String {
    format!("`{}`", clip(value, QUOTE_BYTES))
}

/// `text` escaped and cut to at most `max` bytes of escaped text (plus the
/// `…(N bytes)` mark when cut). For messages of other code that may embed a
/// client's value (serde's), which cannot be quoted value by value.
pub fn clip(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let escaped: String = if c == '`' {
            "\\`".into()
        } else {
            c.escape_debug().collect()
        };
        if out.len() + escaped.len() > max {
            out.push_str(&format!("…({} bytes)", text.len()));
            return out;
        }
        out.push_str(&escaped);
    }
    out
}

/// The `error` member of a failure response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// Stable machine-readable code, e.g. `SESSION_BUSY`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The limit that was hit, for the codes that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// For `RATE_LIMITED` and `OVERLOADED`: when to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl RequestError {
    /// The protocol code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::InvalidRequest(_) | RequestError::TimeoutOverSessionMax { .. } => {
                "INVALID_REQUEST"
            }
            RequestError::UnknownMethod(_) => "UNKNOWN_METHOD",
            RequestError::FrameTooLarge { .. } => "FRAME_TOO_LARGE",
            RequestError::StdinTooLarge { .. } => "STDIN_TOO_LARGE",
            RequestError::TooManySessions { .. } => "TOO_MANY_SESSIONS",
            RequestError::ClientSessionLimit { .. } => "CLIENT_SESSION_LIMIT",
            RequestError::SessionNotFound(_) => "SESSION_NOT_FOUND",
            RequestError::CommandNotFound(_) => "COMMAND_NOT_FOUND",
            RequestError::SessionBusy(_) => "SESSION_BUSY",
            RequestError::TooManyCommands { .. } => "TOO_MANY_COMMANDS",
            RequestError::RateLimited { .. } => "RATE_LIMITED",
            RequestError::Overloaded { .. } => "OVERLOADED",
            RequestError::ShuttingDown => "SHUTTING_DOWN",
            RequestError::SpawnFailed(_) => "SPAWN_FAILED",
            RequestError::PermissionDenied(_) => "PERMISSION_DENIED",
            RequestError::TooManyConnections { .. }
            | RequestError::ClientConnectionLimit { .. } => "TOO_MANY_CONNECTIONS",
            RequestError::Internal(_) => "INTERNAL",
        }
    }

    /// The limit carried in the error frame, where the code has one.
    fn limit(&self) -> Option<u64> {
        match self {
            RequestError::FrameTooLarge { limit }
            | RequestError::StdinTooLarge { limit, .. }
            | RequestError::TooManySessions { limit }
            | RequestError::ClientSessionLimit { limit }
            | RequestError::TooManyCommands { limit }
            | RequestError::TooManyConnections { limit }
            | RequestError::ClientConnectionLimit { limit } => Some(*limit),
            _ => None,
        }
    }

    /// The error as it goes on the wire.
    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code().to_string(),
            message: self.to_string(),
            limit: self.limit(),
            retry_after_ms: match self {
                RequestError::RateLimited { retry_after_ms }
                | RequestError::Overloaded { retry_after_ms } => Some(*retry_after_ms),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14, "a 2 MiB env key or cwd of control bytes": a value echoed in
    /// an error is a short escaped prefix, whatever its size.
    #[test]
    fn quoted_values_are_short_and_escaped() {
        assert_eq!(quote("s-1"), "`s-1`");
        assert_eq!(quote("a\u{1b}b`"), "`a\\u{1b}b\\``");
        let huge = "\u{1}".repeat(2 << 20);
        let q = quote(&huge);
        assert!(q.len() < QUOTE_BYTES + 32, "{} bytes", q.len());
        assert!(q.ends_with(&format!("…({} bytes)`", huge.len())), "{q}");
        let message = RequestError::SessionNotFound("x".repeat(1 << 20)).to_string();
        assert!(message.len() < 128, "{message}");
        // Multi-byte characters are never split.
        assert!(clip(&"é".repeat(100), 9).starts_with("éééé…"));
    }

    #[test]
    fn limits_travel_with_their_codes() {
        let w = RequestError::TooManySessions { limit: 3 }.to_wire();
        assert_eq!(w.code, "TOO_MANY_SESSIONS");
        assert_eq!(w.limit, Some(3));
        let w = RequestError::SessionBusy("s".into()).to_wire();
        assert_eq!(w.code, "SESSION_BUSY");
        assert_eq!(w.limit, None);
    }
}
