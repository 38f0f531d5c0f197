//! `exec.write`: bytes to a running command's open stdin (and `eof`), in the order received, never blocking the daemon on a command that does not read.

use std::time::Duration;

use super::Pending;
use super::exec_read::find;
use crate::protocol::commands::WRITE_TIMEOUT_S;
use crate::protocol::{RequestError, WriteParams, WriteResult, parse_params};
use crate::server::Daemon;
use crate::server::connection::WriteTickets;

/// Writes of one connection to one command apply in the order they were
/// sent: each takes its ticket here, at dispatch, and writes when the
/// previous one's is done.
pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
    writes: &WriteTickets,
) -> Result<Pending<WriteResult>, RequestError> {
    let p: WriteParams = parse_params(params)?;
    let limit = daemon.ctx.live().commands.max_stdin_bytes.as_u64();
    if p.data.len() as u64 > limit {
        return Err(RequestError::StdinTooLarge {
            size: p.data.len() as u64,
            limit,
        });
    }
    // Held until written (a command that does not read keeps each write
    // waiting its turn, up to 64 per connection): charged from here on, as
    // a command's reservation is — evicting retained output first, then
    // OVERLOADED (the writer piling up data is the one to wait; no reader
    // is dropped for it). An `eof` alone holds nothing and is never refused.
    let charge = daemon.ctx.reserve(p.data.len() as u64)?;
    let mut ticket = writes.take(&p.command_id);
    let record = find(daemon, uid, p.command_id)?;
    Ok(Box::pin(async move {
        let record = record.await?;
        ticket.turn().await;
        let written = record
            .output
            .write(&p.data, p.eof, Duration::from_secs(WRITE_TIMEOUT_S))
            .await
            .map_err(|refused| RequestError::InvalidRequest(format!("cannot write: {refused}")))?;
        drop(charge);
        Ok(WriteResult { written })
    }))
}
