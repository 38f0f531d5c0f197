//! The cgroup layer's one error type (every backend, detection and the node handles).

use std::path::{Path, PathBuf};

use super::CgroupMode;

/// Why a cgroup operation failed: the path and the error.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is missing after creation: the controller is not enabled for our subtree")]
    MissingController(PathBuf),
    #[error("{0} still holds processes after the kill")]
    NotEmpty(PathBuf),
    #[error("cgroup mode {mode:?} is not usable here: {why}")]
    Unusable { mode: CgroupMode, why: String },
    #[error(
        "cgroups.parent {0} is in use by another running sessiond: give each daemon its own parent"
    )]
    InUse(PathBuf),
    #[error("the blocking cgroup task failed: {0}")]
    Task(String),
}

pub(crate) fn io_err(action: &'static str, path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
