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
mod exec_run;
mod exec_start;
mod exec_write;
mod session_create;
mod session_destroy;
mod session_list;
pub(crate) mod system;

use std::collections::BTreeMap;

use bytes::Bytes;
use ractor::RpcReplyPort;
use serde::Serialize;

use super::Daemon;
use super::connection::EventSink;
use crate::actors::registry::RegistryMsg;
use crate::process::shell::{EnvMap, MAX_ARG_BYTES};
use crate::protocol::frame::{Request, encode_error, encode_result};
use crate::protocol::{RequestError, method};
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

/// Answers one request from client `uid`: the encoded response frame body
/// (event frames, for a streaming request, go to `events` before it). Times
/// it into `request_duration_seconds` and logs one debug line per request.
pub async fn dispatch(daemon: &Daemon, uid: u32, request: Request, events: &EventSink) -> Bytes {
    let ctx = &daemon.ctx;
    let id = request.id;
    let began = std::time::Instant::now();
    let slot = crate::stats::method_index(&request.method);
    let method_name = crate::stats::REQUEST_METHODS[slot];
    Stats::bump(&ctx.stats.requests);
    let answer = answer(daemon, uid, request, events).await;
    let elapsed = began.elapsed();
    ctx.stats.request_seconds[slot].observe(elapsed);
    let outcome = match &answer {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    tracing::debug!(
        method = method_name,
        id,
        uid,
        duration_us = elapsed.as_micros() as u64,
        outcome,
        "request"
    );
    answer.unwrap_or_else(|e| {
        Stats::bump(&ctx.stats.errors);
        encode_error(Some(id), &e)
    })
}

/// Serves one request: its encoded result, or the error to answer with.
async fn answer(
    daemon: &Daemon,
    uid: u32,
    request: Request,
    events: &EventSink,
) -> Result<Bytes, RequestError> {
    let ctx = &daemon.ctx;
    let id = request.id;
    let method = Method::from_name(&request.method);
    // Health checks are exempt, so a client at its budget can still be seen alive.
    if method != Some(Method::Ping) {
        ctx.admit_request(uid)?;
    }
    let params = &request.params;
    match method {
        Some(Method::Ping) => Ok(encode(id, system::ping(ctx))),
        Some(Method::Stats) => Ok(encode(id, system::stats(ctx))),
        Some(Method::SessionCreate) => session_create::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        Some(Method::SessionDestroy) => session_destroy::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        Some(Method::SessionList) => session_list::serve(daemon, uid)
            .await
            .map(|r| encode(id, r)),
        Some(Method::ExecRun) => exec_run::serve(daemon, uid, params, events)
            .await
            .map(|r| encode(id, r)),
        Some(Method::ExecStart) => exec_start::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        Some(Method::ExecRead) => exec_read::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        Some(Method::ExecWrite) => exec_write::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        Some(Method::ExecCancel) => exec_cancel::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        #[cfg(feature = "fault-injection")]
        Some(Method::DebugFault) => debug_fault::serve(daemon, uid, params)
            .await
            .map(|r| encode(id, r)),
        None => Err(RequestError::UnknownMethod(request.method.clone())),
    }
}

fn encode<T: Serialize>(id: u64, result: T) -> Bytes {
    encode_result(id, &result)
}

/// Sends a message built around a fresh reply port to the registry and awaits the answer.
/// A registry that is gone or drops the port (its actor failed) is `INTERNAL`.
async fn ask<T>(
    daemon: &Daemon,
    build: impl FnOnce(RpcReplyPort<T>) -> RegistryMsg,
) -> Result<T, RequestError> {
    let restarting = || RequestError::Internal("the registry is restarting; try again".into());
    let registry = daemon.tree.registry().ok_or_else(restarting)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    registry.cast(build(tx.into())).map_err(|_| restarting())?;
    rx.await
        .map_err(|_| RequestError::Internal("the actor serving this request failed".into()))
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
                "param `{name}`: variable {k:?} must have a non-empty name without '=' or NUL, a value without NUL, and at most {MAX_ARG_BYTES} bytes in all"
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
