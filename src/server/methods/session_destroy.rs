//! `session.destroy`: params → the registry, which unlists the session and tells it to end; answered once its processes are dead.

use super::{Pending, cast};
use crate::actors::registry::RegistryMsg;
use crate::protocol::{DestroyResult, RequestError, SessionIdParams, parse_params};
use crate::server::Daemon;

pub(super) fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<Pending<DestroyResult>, RequestError> {
    let p: SessionIdParams = parse_params(params)?;
    let reply = cast(daemon, |reply| RegistryMsg::Destroy {
        uid,
        session_id: p.session_id,
        reply,
    })?;
    Ok(Box::pin(async move {
        reply.await??;
        Ok(DestroyResult { destroyed: true })
    }))
}
