//! Fault points for the fault-injection harness (`debug.fault`, cargo feature `fault-injection`; absent from release builds).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::ActorProcessingErr;
use serde::{Deserialize, Serialize};

/// Which actor a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// The CommandActors running in `session_id`.
    Command,
    /// The SessionActor of `session_id`.
    Session,
    /// The RegistryActor.
    Registry,
    /// The root supervisor (its whole tree dies; a fresh one takes over).
    Supervisor,
    /// The next spawn of a command fails (`SPAWN_FAILED`).
    Spawn,
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// The handler panics.
    Panic,
    /// The handler returns an error.
    Error,
    /// The handler sleeps `stall_ms` before going on.
    Stall,
}

/// `debug.fault` params.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultParams {
    pub target: FaultTarget,
    #[serde(default = "default_action")]
    pub action: FaultAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
}

fn default_action() -> FaultAction {
    FaultAction::Panic
}

/// `debug.fault` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultResult {
    /// How many actors the fault was delivered to.
    pub injected: u64,
}

/// A fault on its way to an actor.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub action: FaultAction,
    pub stall: Duration,
}

impl Fault {
    /// Carries the fault out inside the handler of `actor`.
    pub async fn strike(self, actor: &str) -> Result<(), ActorProcessingErr> {
        match self.action {
            FaultAction::Panic => panic!("injected fault: {actor} panics"),
            FaultAction::Error => Err(format!("injected fault: {actor} fails").into()),
            FaultAction::Stall => {
                tokio::time::sleep(self.stall).await;
                Ok(())
            }
        }
    }
}

/// Set by a `spawn` fault; the next command's spawn consumes it and fails.
pub static FAIL_NEXT_SPAWN: AtomicBool = AtomicBool::new(false);

/// Whether this spawn must fail (and clears the flag).
pub fn take_spawn_failure() -> bool {
    FAIL_NEXT_SPAWN.swap(false, Ordering::SeqCst)
}

/// Set in the daemon's environment: its start fails once the cgroups (and
/// the socket) are set up, as a failure of the actor tree would, so tests
/// can check that a failed start leaves nothing behind.
pub const FAIL_START_ENV: &str = "SESSIOND_FAULT_START";

/// Whether this start must fail after the cgroup setup.
pub fn start_fails() -> bool {
    std::env::var_os(FAIL_START_ENV).is_some()
}
