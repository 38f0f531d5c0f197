//! The wire schema of protocol 2's long-running commands: command ids, event frames, `exec.start`, `exec.read`, `exec.write`, `exec.resize`, `exec.cancel` by id.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{ExecResult, KilledBy};

/// Longest `wait_s` an `exec.read` may ask for, seconds.
pub const MAX_READ_WAIT_S: f64 = 60.0;

/// How long an `exec.write` may wait for a command to take its stdin before
/// it answers with what was written.
pub const WRITE_TIMEOUT_S: u64 = 5;

/// `exec.start` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartResult {
    pub command_id: String,
}

/// `exec.read` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadParams {
    pub command_id: String,
    #[serde(default)]
    pub stdout_offset: u64,
    #[serde(default)]
    pub stderr_offset: u64,
    /// Seconds to wait for output past the offsets or the end; 0: do not wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_s: Option<f64>,
}

/// `exec.read` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadResult {
    pub stdout: ByteBuf,
    pub stderr: ByteBuf,
    /// Offset of the first returned byte of each stream.
    pub stdout_offset: u64,
    pub stderr_offset: u64,
    /// Where to read from next.
    pub stdout_next: u64,
    pub stderr_next: u64,
    pub done: bool,
    /// Once done: every `exec.run` result field but the output (read it here).
    pub result: Option<CommandResult>,
}

/// A finished command's result without its output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    #[serde(default)]
    pub command_id: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub killed_by: Option<KilledBy>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_total_bytes: u64,
    pub stderr_total_bytes: u64,
    /// Where, in the kept `stdout`, bytes were dropped (nil: none were).
    #[serde(default)]
    pub stdout_cut_at: Option<u64>,
    /// Where, in the kept `stderr`, bytes were dropped (nil: none were).
    #[serde(default)]
    pub stderr_cut_at: Option<u64>,
    pub duration_ms: u64,
    pub cpu_ms: Option<u64>,
    pub max_rss_bytes: Option<u64>,
    /// Forks the session's `pids_max` refused while the command ran (nil
    /// without cgroups, or from an older daemon).
    #[serde(default)]
    pub pids_limit_hits: Option<u64>,
    pub cwd: String,
    /// Why the state this command left was not kept (nil when it was, or when it left none).
    #[serde(default)]
    pub state_error: Option<String>,
}

impl CommandResult {
    /// The `exec.run` result of this command, with its kept output.
    pub fn with_output(self, stdout: Vec<u8>, stderr: Vec<u8>) -> ExecResult {
        ExecResult {
            command_id: self.command_id,
            exit_code: self.exit_code,
            signal: self.signal,
            timed_out: self.timed_out,
            killed_by: self.killed_by,
            stdout: ByteBuf::from(stdout),
            stderr: ByteBuf::from(stderr),
            stdout_truncated: self.stdout_truncated,
            stderr_truncated: self.stderr_truncated,
            stdout_total_bytes: self.stdout_total_bytes,
            stderr_total_bytes: self.stderr_total_bytes,
            stdout_cut_at: self.stdout_cut_at,
            stderr_cut_at: self.stderr_cut_at,
            duration_ms: self.duration_ms,
            cpu_ms: self.cpu_ms,
            max_rss_bytes: self.max_rss_bytes,
            pids_limit_hits: self.pids_limit_hits,
            cwd: self.cwd,
            state_error: self.state_error,
        }
    }
}

/// `exec.write` params.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WriteParams {
    pub command_id: String,
    /// Bytes for the command's stdin (`bin` or `str`).
    #[serde(default)]
    pub data: ByteBuf,
    /// Close the command's stdin after `data`.
    #[serde(default)]
    pub eof: bool,
}

/// `exec.write` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteResult {
    pub written: u64,
}

/// `exec.resize` params: a command's pseudo-terminal and its new size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResizeParams {
    pub command_id: String,
    pub rows: u64,
    pub cols: u64,
}

/// `exec.resize` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResizeResult {
    pub resized: bool,
}

/// `exec.cancel` params: a command by id, or every command of a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CancelParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamName {
    Stdout,
    Stderr,
}

/// An event frame: sent before a streaming request's result, never after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// First, once the command runs.
    Started { command_id: String },
    /// Output as it comes; `offset` is the stream offset of `data[0]` (a jump shows skipped bytes).
    Output {
        stream: StreamName,
        offset: u64,
        data: ByteBuf,
    },
}

/// An event frame as it goes on the wire: the request's id, then the event's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFrame {
    pub id: u64,
    #[serde(flatten)]
    pub event: Event,
}
