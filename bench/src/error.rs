//! The bench's one error type: what stopped a run (a daemon that would not start or stop cleanly, a failed request, a file not written).

use std::path::PathBuf;

use sessiond::client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the daemon binary {path}: {source} (build it with `cargo build --release -p sessiond`, or pass --daemon PATH)"
    )]
    DaemonBinary {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("request to the bench daemon: {0}")]
    Client(#[from] ClientError),
    /// The daemon misbehaved: did not start, did not exit cleanly, left something behind.
    #[error("bench daemon: {0}")]
    Daemon(String),
    /// A workload's own check failed (e.g. the output drain counted the wrong number of bytes).
    #[error("{workload}: {message}")]
    Workload {
        workload: &'static str,
        message: String,
    },
}

impl BenchError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> BenchError {
        BenchError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
