//! RootSupervisor: the top of the actor tree; parent of the RegistryActor and of every SessionActor.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::registry::{RegistryActor, RegistryArgs, RegistryMsg};
use crate::context::Context;
use crate::stats::Stats;

/// The root of the tree. Supervision policy (all of it lives in
/// `handle_supervisor_evt`):
///
/// | child | ends normally | fails (panic/error) |
/// |---|---|---|
/// | RegistryActor | restarted, unless the daemon is stopping | counted, logged, restarted; the new one rebuilds its table from the live sessions |
/// | SessionActor  | registry told (it unlists the session) | counted, logged, registry told; the session's Drop guard already killed its processes |
///
/// The supervisor itself never stops because a child did (ractor's default
/// would stop it on ANY child exit).
pub struct RootSupervisor;

/// Messages of the root supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Stop restarting the registry: the daemon is stopping.
    Stopping,
    /// Fault injection: strike the root supervisor itself.
    #[cfg(feature = "fault-injection")]
    Fault(crate::fault::Fault),
}

/// State of the root supervisor.
pub struct SupervisorState {
    ctx: Arc<Context>,
    registry: ActorRef<RegistryMsg>,
    stopping: bool,
}

impl Actor for RootSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        ctx: Arc<Context>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let registry = start_registry(&myself, &ctx, false).await?;
        Ok(SupervisorState {
            ctx,
            registry,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Stopping => state.stopping = true,
            #[cfg(feature = "fault-injection")]
            SupervisorMsg::Fault(fault) => return fault.strike("RootSupervisor").await,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        if let Some(err) = &failure {
            Stats::bump(&state.ctx.stats.actor_failures);
            let kind = if cell.get_id() == state.registry.get_id() {
                "RegistryActor"
            } else {
                "SessionActor"
            };
            tracing::error!(actor = %cell.get_id(), kind, error = %err, "actor failed");
        }
        if cell.get_id() == state.registry.get_id() {
            state.ctx.set_registry(None);
            if state.stopping {
                return Ok(());
            }
            tracing::warn!("restarting the registry");
            state.registry = start_registry(&myself, &state.ctx, true).await?;
        } else {
            let _ = state.registry.cast(RegistryMsg::SessionEnded {
                actor: cell.get_id(),
                failed: failure.is_some(),
            });
        }
        Ok(())
    }
}

async fn start_registry(
    myself: &ActorRef<SupervisorMsg>,
    ctx: &Arc<Context>,
    recover: bool,
) -> Result<ActorRef<RegistryMsg>, ActorProcessingErr> {
    let args = RegistryArgs {
        ctx: ctx.clone(),
        supervisor: myself.get_cell(),
        recover,
    };
    let (registry, _) = Actor::spawn_linked(None, RegistryActor, args, myself.get_cell()).await?;
    ctx.set_registry(Some(registry.clone()));
    Ok(registry)
}
