//! The actor tree: RootSupervisor → RegistryActor + SessionActor* → CommandActor* (see actors.md).

pub mod command;
pub mod command_record;
pub mod registry;
pub mod session;
pub mod supervisor;
pub mod tree;
