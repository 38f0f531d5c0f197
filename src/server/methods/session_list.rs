//! `session.list`: through the registry, which has the caller's sessions describe themselves (in a task of its own) and answers.

use super::ask;
use crate::actors::registry::RegistryMsg;
use crate::protocol::{ListResult, RequestError};
use crate::server::Daemon;

pub(super) async fn serve(daemon: &Daemon, uid: u32) -> Result<ListResult, RequestError> {
    let sessions = ask(daemon, |reply| RegistryMsg::List { uid, reply }).await?;
    Ok(ListResult { sessions })
}
