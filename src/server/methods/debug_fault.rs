//! `debug.fault` (feature `fault-injection` only): delivers an injected fault to the spawn path, the root supervisor, the registry or a session's actors.

#![cfg(feature = "fault-injection")]

use super::cast;
use crate::actors::registry::RegistryMsg;
use crate::actors::supervisor::SupervisorMsg;
use crate::fault::{FAIL_NEXT_SPAWN, Fault, FaultParams, FaultResult, FaultTarget};
use crate::protocol::{RequestError, parse_params};
use crate::server::Daemon;

pub(super) async fn serve(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<FaultResult, RequestError> {
    let p: FaultParams = parse_params(params)?;
    let fault = Fault {
        action: p.action,
        stall: std::time::Duration::from_millis(p.stall_ms.unwrap_or(1000)),
    };
    match p.target {
        FaultTarget::Spawn => {
            FAIL_NEXT_SPAWN.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(FaultResult { injected: 1 })
        }
        FaultTarget::Supervisor => {
            let _ = daemon.tree.root().cast(SupervisorMsg::Fault(fault));
            Ok(FaultResult { injected: 1 })
        }
        target => {
            let session_id = p.session_id.unwrap_or_default();
            let injected = cast(daemon, |reply| RegistryMsg::Fault {
                uid,
                target,
                session_id,
                fault,
                reply,
            })?
            .await??;
            Ok(FaultResult { injected })
        }
    }
}
