//! `exec.cancel`: by `command_id` (that command) or by `session_id` (every command the session runs) → registry → session, which kills and answers whether anything ran.

use super::{Pending, cast};
use crate::actors::registry::RegistryMsg;
use crate::protocol::{CancelParams, CancelResult, RequestError, parse_params};
use crate::server::Daemon;

pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<Pending<CancelResult>, RequestError> {
    let p: CancelParams = parse_params(params)?;
    let reply = match (p.session_id, p.command_id) {
        (Some(session_id), None) => cast(daemon, |reply| RegistryMsg::Cancel {
            uid,
            session_id,
            reply,
        })?,
        (None, Some(command_id)) => cast(daemon, |reply| RegistryMsg::CancelCommand {
            uid,
            command_id,
            reply,
        })?,
        _ => {
            return Err(RequestError::InvalidRequest(
                "params: give exactly one of `session_id` and `command_id`".into(),
            ));
        }
    };
    Ok(Box::pin(async move {
        Ok(CancelResult {
            cancelled: reply.await??,
        })
    }))
}
