//! `exec.start`: params (as `exec.run`'s) → the same start path → `{"command_id"}` as soon as the command runs; read, write and cancel it by id.

use super::{Pending, exec_run};
use crate::protocol::{RequestError, StartResult};
use crate::server::Daemon;

pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<Pending<StartResult>, RequestError> {
    // `stream` means nothing here: events belong to `exec.run`.
    let (session_id, request, _stream) = exec_run::parse(&daemon.ctx.live(), params)?;
    let record = exec_run::start(daemon, uid, session_id, request)?;
    Ok(Box::pin(async move {
        Ok(StartResult {
            command_id: record.await?.id.clone(),
        })
    }))
}
