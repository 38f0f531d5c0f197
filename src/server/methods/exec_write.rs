//! `exec.write`: bytes to a running command's open stdin (and `eof`), in the order received, never blocking the daemon on a command that does not read.

use std::time::Duration;

use super::exec_read::find;
use crate::protocol::commands::WRITE_TIMEOUT_S;
use crate::protocol::{RequestError, WriteParams, WriteResult, parse_params};
use crate::server::Daemon;

pub(super) async fn serve(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<WriteResult, RequestError> {
    let p: WriteParams = parse_params(params)?;
    let limit = daemon.ctx.live().commands.max_stdin_bytes.as_u64();
    if p.data.len() as u64 > limit {
        return Err(RequestError::StdinTooLarge {
            size: p.data.len() as u64,
            limit,
        });
    }
    let record = find(daemon, uid, p.command_id).await?;
    let written = record
        .output
        .write(&p.data, p.eof, Duration::from_secs(WRITE_TIMEOUT_S))
        .await
        .map_err(|refused| RequestError::InvalidRequest(format!("cannot write: {refused}")))?;
    Ok(WriteResult { written })
}
