//! CommandRecord: one command as clients see it — its id, its output and stdin, and its result once it ended; made by its SessionActor, finished by its CommandActor, retained by the session after the end, read by any number of requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::budget::Charge;

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
    /// Its share of the memory budget: what its output may grow to while it
    /// runs, then (once trimmed) what it retains; returned when the record
    /// is dropped or evicted.
    charge: Mutex<Option<Charge>>,
    /// Its retained output was evicted to make room: it answers `COMMAND_NOT_FOUND`.
    evicted: AtomicBool,
}

impl CommandRecord {
    /// A record holding `charge` (its reservation under the memory budget).
    pub fn new(id: String, output: LiveOutput, charge: Charge) -> CommandRecord {
        CommandRecord {
            id,
            output: Arc::new(output),
            started: std::time::Instant::now(),
            outcome: OnceLock::new(),
            charge: Mutex::new(Some(charge)),
            evicted: AtomicBool::new(false),
        }
    }

    /// Cuts the output to what a finished command retains, and its charge with it.
    pub fn trim(&self) {
        self.output.trim();
        let held = self.output.held() as u64;
        let mut charge = self.charge.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(charge) = charge.as_mut() {
            charge.resize(held.min(charge.bytes()));
        }
    }

    /// Drops the retained output of an ended command and returns its charge;
    /// from now on it is not found. False when there was nothing to evict.
    pub fn evict(&self) -> bool {
        if self.outcome().is_none() || self.evicted.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.output.clear();
        self.charge.lock().unwrap_or_else(|p| p.into_inner()).take();
        true
    }

    /// Whether its retained output was evicted.
    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
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
