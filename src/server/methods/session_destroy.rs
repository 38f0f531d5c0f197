//! `session.destroy`: params → the registry, which unlists the session and tells it to end; answered once its processes are dead.

use super::ask;
use crate::actors::registry::RegistryMsg;
use crate::protocol::{DestroyResult, RequestError, SessionIdParams, parse_params};
use crate::server::Daemon;

pub(super) async fn serve(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<DestroyResult, RequestError> {
    let p: SessionIdParams = parse_params(params)?;
    ask(daemon, |reply| RegistryMsg::Destroy {
        uid,
        session_id: p.session_id,
        reply,
    })
    .await??;
    Ok(DestroyResult { destroyed: true })
}
