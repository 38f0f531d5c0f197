//! ActorTree: the handle the rest of the daemon holds on the actor tree — it owns the root supervisor, replaces a failed one, and says where the registry is.
//!
//! The shared state ([`crate::context::Context`]) knows no actor; whoever
//! needs an actor asks this handle. It is the one owner of the root
//! supervisor (`RootWatch` duty) and the one place the current registry is
//! published (by the root supervisor, each time it starts one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ractor::{Actor, ActorRef};

use super::registry::RegistryMsg;
use super::supervisor::{RootSupervisor, SupervisorArgs, SupervisorMsg};
use crate::context::Context;
use crate::stats::Stats;
use crate::timing;

/// Where the current registry is; written by the root supervisor only.
#[derive(Default)]
pub struct RegistrySlot(RwLock<Option<ActorRef<RegistryMsg>>>);

impl RegistrySlot {
    /// The registry in service, if any (none while it restarts).
    pub fn get(&self) -> Option<ActorRef<RegistryMsg>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes the registry the supervisor just (re)started, or none.
    pub(super) fn set(&self, registry: Option<ActorRef<RegistryMsg>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = registry;
    }
}

/// A running actor tree. Cheap to clone: every clone is the same tree.
#[derive(Clone)]
pub struct ActorTree {
    inner: Arc<TreeInner>,
}

struct TreeInner {
    root: Mutex<ActorRef<SupervisorMsg>>,
    registry: Arc<RegistrySlot>,
    /// Set at shutdown: a root that ends is not replaced any more.
    stopping: AtomicBool,
    /// Watches the root and replaces it when it fails.
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Why the actor tree could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the actor tree: {0}")]
pub struct TreeError(String);

impl ActorTree {
    /// Starts the root supervisor (which starts the registry) and watches it:
    /// the root only fails through a bug of ours, but if it does, its whole
    /// tree (registry, sessions, commands) dies with it — their Drop guards
    /// kill their processes and cgroups — and a fresh tree takes over, so the
    /// daemon goes on serving (sessions of the old tree answer
    /// `SESSION_NOT_FOUND`). Counted in `actor_failures_total`.
    pub async fn start(ctx: Arc<Context>) -> Result<ActorTree, TreeError> {
        let registry = Arc::new(RegistrySlot::default());
        let args = {
            let (ctx, registry) = (ctx.clone(), registry.clone());
            move || SupervisorArgs {
                ctx: ctx.clone(),
                registry: registry.clone(),
            }
        };
        let (root, handle) = Actor::spawn(None, RootSupervisor, args())
            .await
            .map_err(|e| TreeError(e.to_string()))?;
        let tree = ActorTree {
            inner: Arc::new(TreeInner {
                root: Mutex::new(root),
                registry: registry.clone(),
                stopping: AtomicBool::new(false),
                watch: Mutex::new(None),
            }),
        };
        let watched = Arc::downgrade(&tree.inner);
        let task = tokio::spawn(async move {
            let mut handle = handle;
            loop {
                let _ = (&mut handle).await;
                let Some(inner) = watched.upgrade() else {
                    return;
                };
                if inner.stopping.load(Ordering::SeqCst) {
                    return;
                }
                Stats::bump(&ctx.stats.actor_failures);
                tracing::error!(
                    "the root supervisor ended; starting a fresh actor tree (its sessions are lost)"
                );
                match Actor::spawn(None, RootSupervisor, args()).await {
                    Ok((root, next)) => {
                        *inner.root.lock().unwrap_or_else(|p| p.into_inner()) = root;
                        handle = next;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot restart the actor tree");
                        return;
                    }
                }
            }
        });
        *tree.inner.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(tree)
    }

    /// The registry in service; none while it restarts (milliseconds).
    pub fn registry(&self) -> Option<ActorRef<RegistryMsg>> {
        self.inner.registry.get()
    }

    /// The root supervisor in service.
    pub fn root(&self) -> ActorRef<SupervisorMsg> {
        self.inner
            .root
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Shutdown has begun: no restart of the root or of the registry from now on.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.root().cast(SupervisorMsg::Stopping);
    }

    /// Stops the whole tree (every Drop guard below runs) and the watch.
    pub async fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.root().stop(None);
        let watch = self
            .inner
            .watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(watch) = watch {
            let _ = tokio::time::timeout(timing::ROOT_STOP, watch).await;
        }
    }
}
