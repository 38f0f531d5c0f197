//! sessiond: a daemon that hosts shell sessions and runs their commands under limits.
//!
//! The actor tree (ractor on tokio; see actors.md):
//!
//! ```text
//! RootSupervisor                 restarts the registry; tells it when a session ends
//! ├── RegistryActor              session table, admission, routing, periodic sweep
//! └── SessionActor (per session) terminal state (cwd, variables, functions…), idle timer, SESSION_BUSY
//!     └── CommandActor (per run) spawns, enforces the timeout, caps output, answers
//! ```
//!
//! The data path: socket → [`protocol::frame`] → [`server::connection`] →
//! [`server::methods`] (one file per method: parse, validate) → RegistryActor
//! (reached through the `actors::tree::ActorTree` handle) → SessionActor → CommandActor →
//! [`process::run`] (spawn, timeout, kill, capture) → result → frame → socket.
//! Counters live in `stats`, outside any actor; the processes the daemon owns
//! are in [`process::ProcessTable`].

// Public is what others build on: clients (`client`, `protocol`), the daemon
// binary (`config`, `server`) and the integration tests (`process`: the
// process table, reaper and procfs scans; `fault`; `cgroup_dirs_named`, for
// the tests and the benchmark to find what a daemon left). The rest is internal.
pub(crate) mod actors;
pub(crate) mod budget;
pub(crate) mod cgroup;
pub mod client;
pub mod config;
pub(crate) mod context;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod isolation;
pub(crate) mod limits;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod server;
pub(crate) mod socket_dir;
pub(crate) mod stats;
pub(crate) mod timing;

pub use cgroup::fs::dirs_named as cgroup_dirs_named;
