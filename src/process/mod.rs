//! Processes under the CommandActor: spawn, pseudo-terminals, terminal state, capped output, the run loop, the timeout and kills, the process table and reaper, background output after the answer.

pub mod background;
pub mod child;
pub mod kill;
pub mod live_output;
pub mod procfs;
pub mod pty;
pub mod reaper;
pub mod run;
pub mod shell;
pub mod simple_command;
pub mod spawn;
pub mod stream_buffer;
pub mod table;
pub mod terminal;

pub use child::{ChildProcess, ExitInfo};
pub use table::ProcessTable;
