//! `session.list`: through the registry, which has the caller's sessions describe themselves (in a task of its own) and answers.

use super::{Pending, cast};
use crate::actors::registry::RegistryMsg;
use crate::protocol::{ListResult, RequestError};
use crate::server::Daemon;

pub(super) fn dispatch(daemon: &Daemon, uid: u32) -> Result<Pending<ListResult>, RequestError> {
    let reply = cast(daemon, |reply| RegistryMsg::List { uid, reply })?;
    Ok(Box::pin(async move {
        Ok(ListResult {
            sessions: reply.await?,
        })
    }))
}
