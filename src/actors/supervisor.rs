//! RootSupervisor: the top of the actor tree; parent of the RegistryActor and of every SessionActor.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::registry::{RegistryActor, RegistryArgs, RegistryMsg};
use super::session::SessionEnd;
use super::tree::RegistrySlot;
use crate::context::Context;
use crate::stats::Stats;

/// The root of the tree. Supervision policy (all of it lives in
/// `handle_supervisor_evt`):
///
/// | child | ends normally | fails (panic/error) |
/// |---|---|---|
/// | RegistryActor | restarted, unless the daemon is stopping | counted, logged, restarted; the new one rebuilds its table from the live sessions |
/// | SessionActor  | registry told why (destroyed, expired, setup failed), so it unlists and counts the session | counted, logged, registry told; the session's Drop guard already killed its processes |
///
/// This is the one way a session's end reaches the registry. The supervisor
/// itself never stops because a child did (ractor's default would stop it on
/// ANY child exit).
pub struct RootSupervisor;

/// What the root supervisor is started with.
pub struct SupervisorArgs {
    pub ctx: Arc<Context>,
    /// Where it publishes each registry it starts (read by the connections).
    pub registry: Arc<RegistrySlot>,
}

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
    slot: Arc<RegistrySlot>,
    registry: ActorRef<RegistryMsg>,
    stopping: bool,
}

impl Actor for RootSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let registry = start_registry(&myself, &args.ctx, &args.slot(), false).await?;
        Ok(SupervisorState {
            ctx: args.ctx,
            slot: args.registry,
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
        let (cell, failure, reason) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, None, reason),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string()), None),
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
            state.slot.set(None);
            if state.stopping {
                return Ok(());
            }
            tracing::warn!("restarting the registry");
            state.registry = start_registry(&myself, &state.ctx, &state.slot, true).await?;
        } else {
            let end = match failure {
                Some(_) => SessionEnd::Failed,
                None => SessionEnd::from_stop_reason(reason.as_deref()),
            };
            let _ = state.registry.cast(RegistryMsg::SessionEnded {
                actor: cell.get_id(),
                end,
            });
        }
        Ok(())
    }
}

impl SupervisorArgs {
    fn slot(&self) -> Arc<RegistrySlot> {
        self.registry.clone()
    }
}

/// Starts a registry (rebuilding its table from the live sessions when
/// `recover`) and publishes it.
async fn start_registry(
    myself: &ActorRef<SupervisorMsg>,
    ctx: &Arc<Context>,
    slot: &RegistrySlot,
    recover: bool,
) -> Result<ActorRef<RegistryMsg>, ActorProcessingErr> {
    let args = RegistryArgs {
        ctx: ctx.clone(),
        supervisor: myself.get_cell(),
        recover,
    };
    let (registry, _) = Actor::spawn_linked(None, RegistryActor, args, myself.get_cell()).await?;
    slot.set(Some(registry.clone()));
    Ok(registry)
}
