//! CommandRecord: one command as clients see it — its id, its output and stdin, and its result once it ended; made by its SessionActor, finished by its CommandActor, retained by the session after the end, read by any number of requests.

use std::sync::{Arc, OnceLock};

use crate::process::live_output::LiveOutput;
use crate::protocol::{CommandResult, ExecResult, RequestError};

/// One command, shared (behind an `Arc`) by its actors and its readers.
#[derive(Debug)]
pub struct CommandRecord {
    /// `<session id>/c-<random>`: unguessable, and names the session that owns it.
    pub id: String,
    pub output: Arc<LiveOutput>,
    /// When it was started, to order a session's running commands.
    pub started: std::time::Instant,
    /// Set once, when the command has ended (or its actor failed).
    outcome: OnceLock<Result<CommandResult, RequestError>>,
}

impl CommandRecord {
    pub fn new(id: String, output: LiveOutput) -> CommandRecord {
        CommandRecord {
            id,
            output: Arc::new(output),
            started: std::time::Instant::now(),
            outcome: OnceLock::new(),
        }
    }

    /// The session id in a command id, for routing (`None`: not one of ours).
    pub fn session_of(command_id: &str) -> Option<&str> {
        command_id
            .split_once('/')
            .map(|(session, _)| session)
            .filter(|s| !s.is_empty())
    }

    /// Records how the command ended and wakes every reader; the first call wins.
    pub fn finish(&self, outcome: Result<CommandResult, RequestError>) {
        if self.outcome.set(outcome).is_ok() {
            self.output.end();
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<&Result<CommandResult, RequestError>> {
        self.outcome.get()
    }

    /// Waits until the command has ended.
    pub async fn ended(&self) -> &Result<CommandResult, RequestError> {
        let mut changes = self.output.subscribe();
        loop {
            if let Some(outcome) = self.outcome() {
                return outcome;
            }
            if changes.changed().await.is_err() {
                // The sender lives in `self.output`; it cannot be gone while we borrow it.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The `exec.run` answer of an ended command: its result with the kept output.
    pub fn exec_result(&self, result: &CommandResult) -> ExecResult {
        let kept = self.output.kept();
        result.clone().with_output(kept.stdout, kept.stderr)
    }
}

/// Held by the CommandActor: if the actor dies before its command's end is
/// recorded (a panic, a kill), every reader is answered `INTERNAL` instead of
/// waiting forever (ractor skips `post_stop` then; `Drop` always runs).
pub struct FinishOnDrop(pub Arc<CommandRecord>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish(Err(RequestError::Internal(
            "the command's actor failed; its processes were killed".into(),
        )));
    }
}
