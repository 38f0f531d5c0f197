//! sessiond: a daemon that hosts shell sessions and runs their commands under limits.
//!
//! The actor tree (ractor on tokio; see actors.md):
//!
//! ```text
//! RootSupervisor                 restarts the registry; tells it when a session ends
//! ├── RegistryActor              session table, admission, routing, periodic sweep
//! └── SessionActor (per session) shell state (cwd, env), idle timer, SESSION_BUSY
//!     └── CommandActor (per run) spawns, enforces the timeout, caps output, answers
//! ```
//!
//! The data path: socket → [`protocol::frame`] → [`server::connection`] →
//! [`server::methods`] (one file per method: parse, validate) → RegistryActor
//! (reached through [`actors::tree::ActorTree`]) → SessionActor → CommandActor →
//! [`process::run`] (spawn, timeout, kill, capture) → result → frame → socket.
//! Counters live in [`stats`], outside any actor; the processes the daemon owns
//! are in [`process::ProcessTable`].

pub mod actors;
pub mod bench;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod context;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod isolation;
pub mod limits;
pub mod process;
pub mod protocol;
pub mod server;
pub mod socket_dir;
pub mod stats;
pub mod timing;
