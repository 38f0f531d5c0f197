//! `exec.cancel`: params → the registry → the session, which kills its running commands and answers whether any ran.

use super::ask;
use crate::actors::registry::RegistryMsg;
use crate::protocol::{CancelResult, RequestError, SessionIdParams, parse_params};
use crate::server::Daemon;

pub(super) async fn serve(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<CancelResult, RequestError> {
    let p: SessionIdParams = parse_params(params)?;
    let cancelled = ask(daemon, |reply| RegistryMsg::Cancel {
        uid,
        session_id: p.session_id,
        reply,
    })
    .await??;
    Ok(CancelResult { cancelled })
}
