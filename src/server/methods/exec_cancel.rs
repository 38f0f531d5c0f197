//! `exec.cancel`: by `command_id` (that command) or by `session_id` (every command the session runs) → registry → session, which kills and answers whether anything ran.

use super::ask;
use crate::actors::registry::RegistryMsg;
use crate::protocol::{CancelParams, CancelResult, RequestError, parse_params};
use crate::server::Daemon;

pub(super) async fn serve(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<CancelResult, RequestError> {
    let p: CancelParams = parse_params(params)?;
    let cancelled = match (p.session_id, p.command_id) {
        (Some(session_id), None) => {
            ask(daemon, |reply| RegistryMsg::Cancel {
                uid,
                session_id,
                reply,
            })
            .await??
        }
        (None, Some(command_id)) => {
            ask(daemon, |reply| RegistryMsg::CancelCommand {
                uid,
                command_id,
                reply,
            })
            .await??
        }
        _ => {
            return Err(RequestError::InvalidRequest(
                "params: give exactly one of `session_id` and `command_id`".into(),
            ));
        }
    };
    Ok(CancelResult { cancelled })
}
