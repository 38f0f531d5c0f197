//! The method table: a request's method name → the one file that parses, validates and serves it (between the connection and the actors).
//!
//! Each method file turns its params into a typed, fully validated request
//! (every `INVALID_REQUEST` about a param is decided there) before any actor
//! sees it, then asks the registry or answers inline. The refusals that need
//! an actor's state (`SESSION_NOT_FOUND`, `SESSION_BUSY`, the session's own
//! timeout maximum, `TOO_MANY_*`) are decided by that actor.

mod debug_fault;
mod exec_cancel;
mod exec_read;
mod exec_resize;
mod exec_run;
mod exec_start;
mod exec_write;
mod session_create;
mod session_destroy;
mod session_list;
pub(crate) mod system;

use std::collections::BTreeMap;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use ractor::RpcReplyPort;
use serde::Serialize;

use super::Daemon;
use super::connection::{EventSink, WriteTickets};
use crate::actors::registry::RegistryMsg;
use crate::context::Context;
use crate::process::shell::{EnvMap, MAX_ARG_BYTES};
use crate::protocol::frame::{Request, encode_error, encode_result};
use crate::protocol::{RequestError, method, quote};
use crate::stats::Stats;

/// Every method the daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Ping,
    Stats,
    SessionCreate,
    SessionDestroy,
    SessionList,
    ExecRun,
    ExecStart,
    ExecRead,
    ExecWrite,
    ExecResize,
    ExecCancel,
    /// Only with the `fault-injection` feature; else `UNKNOWN_METHOD`.
    #[cfg(feature = "fault-injection")]
    DebugFault,
}

/// Name → method. Adding a method is one row here, one arm in [`dispatch`] and one file.
const TABLE: &[(&str, Method)] = &[
    (method::PING, Method::Ping),
    (method::STATS, Method::Stats),
    (method::SESSION_CREATE, Method::SessionCreate),
    (method::SESSION_DESTROY, Method::SessionDestroy),
    (method::SESSION_LIST, Method::SessionList),
    (method::EXEC_RUN, Method::ExecRun),
    (method::EXEC_START, Method::ExecStart),
    (method::EXEC_READ, Method::ExecRead),
    (method::EXEC_WRITE, Method::ExecWrite),
    (method::EXEC_RESIZE, Method::ExecResize),
    (method::EXEC_CANCEL, Method::ExecCancel),
    #[cfg(feature = "fault-injection")]
    (method::DEBUG_FAULT, Method::DebugFault),
];

impl Method {
    /// The method of this name, if the daemon serves one.
    pub fn from_name(name: &str) -> Option<Method> {
        TABLE.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }

    /// Answered on the connection's own task: cheap, never waits on an actor.
    pub fn is_inline(self) -> bool {
        matches!(self, Method::Ping | Method::Stats)
    }
}

/// A request once dispatched: answered at once (inline methods, refusals
/// decided before any actor), or sent to its actor, with the rest of its
/// serving (awaiting the actor's reply, streaming events) still to run.
pub enum Dispatched {
    Answered(Bytes),
    Waiting(BoxFuture<'static, Bytes>),
}

/// What a method still has to do once its request reached the actor.
type Pending<R> = BoxFuture<'static, Result<R, RequestError>>;

/// Dispatches one request from client `uid`: parses its params and sends it
/// to its actor before returning, so the requests of one connection reach
/// the actors in the order they were sent (the connection awaits this before
/// it reads the next frame). Event frames, for a streaming request, go to
/// `events` before its answer; `writes` orders a connection's `exec.write`s.
pub async fn dispatch(
    daemon: &Daemon,
    uid: u32,
    request: Request,
    events: EventSink,
    writes: &WriteTickets,
) -> Dispatched {
    let ctx = &daemon.ctx;
    let id = request.id;
    let timed = Timed {
        began: std::time::Instant::now(),
        slot: crate::stats::method_index(&request.method),
        id,
        uid,
    };
    Stats::bump(&ctx.stats.requests);
    let method = Method::from_name(&request.method);
    // Health checks are exempt, so a client at its budget can still be seen alive.
    if method != Some(Method::Ping) {
        if let Err(e) = ctx.admit_request(uid) {
            Stats::bump(&ctx.stats.errors);
            timed.done(ctx, e.code());
            return Dispatched::Answered(encode_error(Some(id), &e));
        }
    }
    let params = &request.params;
    let ctx = ctx.clone();
    let answered = |ctx: &Context, frame: Bytes| {
        timed.done(ctx, "ok");
        Dispatched::Answered(frame)
    };
    match method {
        Some(Method::Ping) => answered(&ctx, encode(id, system::ping(&ctx))),
        Some(Method::Stats) => answered(&ctx, encode(id, system::stats(&ctx))),
        Some(Method::SessionCreate) => {
            // Its cwd is checked (off the async workers) before the next frame is read.
            let dispatched = session_create::dispatch(daemon, uid, params).await;
            waiting(ctx, timed, dispatched)
        }
        Some(Method::SessionDestroy) => {
            waiting(ctx, timed, session_destroy::dispatch(daemon, uid, params))
        }
        Some(Method::SessionList) => waiting(ctx, timed, session_list::dispatch(daemon, uid)),
        Some(Method::ExecRun) => {
            waiting(ctx, timed, exec_run::dispatch(daemon, uid, params, events))
        }
        Some(Method::ExecStart) => waiting(ctx, timed, exec_start::dispatch(daemon, uid, params)),
        Some(Method::ExecRead) => waiting(ctx, timed, exec_read::dispatch(daemon, uid, params)),
        Some(Method::ExecWrite) => waiting(
            ctx,
            timed,
            exec_write::dispatch(daemon, uid, params, writes),
        ),
        Some(Method::ExecResize) => waiting(ctx, timed, exec_resize::dispatch(daemon, uid, params)),
        Some(Method::ExecCancel) => waiting(ctx, timed, exec_cancel::dispatch(daemon, uid, params)),
        #[cfg(feature = "fault-injection")]
        Some(Method::DebugFault) => {
            let (daemon, params) = (daemon.clone(), params.clone());
            let pending: Pending<_> =
                Box::pin(async move { debug_fault::serve(&daemon, uid, &params).await });
            waiting(ctx, timed, Ok(pending))
        }
        None => waiting::<()>(
            ctx,
            timed,
            Err(RequestError::UnknownMethod(request.method.clone())),
        ),
    }
}

/// A method's dispatch outcome as the connection takes it: a refusal is
/// answered at once, else the rest runs on the request's own task.
fn waiting<R: Serialize + Send + 'static>(
    ctx: Arc<Context>,
    timed: Timed,
    dispatched: Result<Pending<R>, RequestError>,
) -> Dispatched {
    let id = timed.id;
    let refused = move |ctx: &Context, e: RequestError| {
        Stats::bump(&ctx.stats.errors);
        timed.done(ctx, e.code());
        encode_error(Some(id), &e)
    };
    match dispatched {
        Err(e) => Dispatched::Answered(refused(&ctx, e)),
        Ok(pending) => Dispatched::Waiting(Box::pin(async move {
            match pending.await {
                Ok(result) => {
                    timed.done(&ctx, "ok");
                    encode(id, result)
                }
                Err(e) => refused(&ctx, e),
            }
        })),
    }
}

/// One request's clock: observed into `request_duration_seconds` and logged
/// (one debug line per request) when it is answered.
#[derive(Clone, Copy)]
struct Timed {
    began: std::time::Instant,
    /// Its method's slot in `stats::REQUEST_METHODS`.
    slot: usize,
    id: u64,
    uid: u32,
}

impl Timed {
    fn done(&self, ctx: &Context, outcome: &str) {
        let elapsed = self.began.elapsed();
        ctx.stats.request_seconds[self.slot].observe(elapsed);
        tracing::debug!(
            method = crate::stats::REQUEST_METHODS[self.slot],
            id = self.id,
            uid = self.uid,
            duration_us = elapsed.as_micros() as u64,
            outcome,
            "request"
        );
    }
}

/// The answer to a `system.ping` of id `id`, for a connection that is
/// otherwise refused (see `connection::refuse`): health checks are answered
/// even past the connection caps.
pub fn answer_ping(ctx: &crate::context::Context, id: u64) -> Bytes {
    encode(id, system::ping(ctx))
}

fn encode<T: Serialize>(id: u64, result: T) -> Bytes {
    encode_result(id, &result)
}

/// Sends a message built around a fresh reply port to the registry now (so
/// messages reach it in the order of these calls) and returns the wait for
/// its answer. A registry that is gone or drops the port (its actor failed)
/// is `INTERNAL`.
fn cast<T: Send + 'static>(
    daemon: &Daemon,
    build: impl FnOnce(RpcReplyPort<T>) -> RegistryMsg,
) -> Result<BoxFuture<'static, Result<T, RequestError>>, RequestError> {
    let restarting = || RequestError::Internal("the registry is restarting; try again".into());
    let registry = daemon.tree.registry().ok_or_else(restarting)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    registry.cast(build(tx.into())).map_err(|_| restarting())?;
    Ok(Box::pin(async move {
        rx.await
            .map_err(|_| RequestError::Internal("the actor serving this request failed".into()))
    }))
}

/// Checks an `env` param (of `session.create` or `exec.run`): names
/// non-empty without `=` or NUL, values without NUL, each variable short
/// enough to pass to exec.
fn env_param(name: &str, env: Option<BTreeMap<String, String>>) -> Result<EnvMap, RequestError> {
    let mut out = EnvMap::new();
    for (k, v) in env.unwrap_or_default() {
        if k.is_empty()
            || k.contains('=')
            || k.contains('\0')
            || v.contains('\0')
            || k.len() + 1 + v.len() > MAX_ARG_BYTES
        {
            return Err(RequestError::InvalidRequest(format!(
                "param `{name}`: variable {} must have a non-empty name without '=' or NUL, a value without NUL, and at most {MAX_ARG_BYTES} bytes in all",
                quote(&k)
            )));
        }
        out.insert(k.into_bytes(), v.into_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_name_is_in_the_table_once() {
        for (name, m) in TABLE {
            assert_eq!(Method::from_name(name), Some(*m), "{name}");
            assert_eq!(TABLE.iter().filter(|(n, _)| n == name).count(), 1, "{name}");
        }
        assert_eq!(Method::from_name("exec.nope"), None);
        assert!(Method::Ping.is_inline() && Method::Stats.is_inline());
        assert!(!Method::ExecRun.is_inline() && !Method::SessionList.is_inline());
    }
}
