//! Request routing: method name → params check → registry (or an inline answer) → encoded response. One function per method.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use ractor::RpcReplyPort;

use crate::actors::registry::{CreateRequest, RegistryMsg};
use crate::actors::session::{ExecRequest, SessionMsg};
use crate::context::Context;
use crate::limits::session_limits;
use crate::process::shell::{EnvMap, MAX_ARG_BYTES};
use crate::protocol::frame::{Request, encode_error, encode_result};
use crate::protocol::{
    CancelResult, ClientStats, CommandStats, CreateParams, DestroyResult, ExecParams, ListResult,
    PROTOCOL_VERSION, PingResult, RequestError, RuntimeStats, SessionIdParams, SessionStats,
    StatsResult, method, parse_params, seconds_param,
};
use crate::stats::{Stats, rss_bytes};

/// How long `session.list` waits for one session to describe itself.
const DESCRIBE_TIMEOUT_MS: u64 = 1000;

/// Whether `method` is answered on the connection's own task (cheap, never waits on an actor).
pub fn is_inline(method: &str) -> bool {
    method == method::PING || method == method::STATS
}

/// Answers one request from client `uid`: the encoded response frame body.
pub async fn dispatch(ctx: &Arc<Context>, uid: u32, request: Request) -> Bytes {
    let id = request.id;
    Stats::bump(&ctx.stats.requests);
    // Health checks are exempt, so a client at its budget can still be seen alive.
    if request.method != method::PING {
        if let Err(e) = ctx.admit_request(uid) {
            Stats::bump(&ctx.stats.errors);
            return encode_error(Some(id), &e);
        }
    }
    let answer = match request.method.as_str() {
        method::PING => Ok(encode_result(id, &ping(ctx))),
        method::STATS => Ok(encode_result(id, &stats(ctx))),
        method::SESSION_CREATE => create(ctx, uid, &request.params)
            .await
            .map(|r| encode_result(id, &r)),
        method::SESSION_DESTROY => destroy(ctx, uid, &request.params)
            .await
            .map(|r| encode_result(id, &r)),
        method::SESSION_LIST => list(ctx, uid).await.map(|r| encode_result(id, &r)),
        method::EXEC_RUN => exec_run(ctx, uid, &request.params)
            .await
            .map(|r| encode_result(id, &r)),
        method::EXEC_CANCEL => cancel(ctx, uid, &request.params)
            .await
            .map(|r| encode_result(id, &r)),
        #[cfg(feature = "fault-injection")]
        method::DEBUG_FAULT => fault(ctx, uid, &request.params)
            .await
            .map(|r| encode_result(id, &r)),
        other => Err(RequestError::UnknownMethod(other.to_string())),
    };
    answer.unwrap_or_else(|e| {
        Stats::bump(&ctx.stats.errors);
        encode_error(Some(id), &e)
    })
}

/// Sends a message built around a fresh reply port to the registry and awaits the answer.
/// A registry that is gone or drops the port (its actor failed) is `INTERNAL`.
async fn ask<T>(
    ctx: &Context,
    build: impl FnOnce(RpcReplyPort<T>) -> RegistryMsg,
) -> Result<T, RequestError> {
    let registry = ctx
        .registry()
        .ok_or_else(|| RequestError::Internal("the registry is restarting; try again".into()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    registry
        .cast(build(tx.into()))
        .map_err(|_| RequestError::Internal("the registry is restarting; try again".into()))?;
    rx.await
        .map_err(|_| RequestError::Internal("the actor serving this request failed".into()))
}

fn ping(ctx: &Context) -> PingResult {
    PingResult {
        pong: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        uptime_ms: ctx.uptime_ms(),
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
    }
}

/// Protocol additions this daemon implements (`system.ping` `features`).
pub const FEATURES: &[&str] = &["terminal-state"];

fn stats(ctx: &Context) -> StatsResult {
    let s = &ctx.stats;
    let g = Stats::get;
    StatsResult {
        sessions: SessionStats {
            active: g(&s.sessions_active),
            max: ctx.config.sessions.max_sessions as u64,
            created_total: g(&s.sessions_created),
            destroyed_total: g(&s.sessions_destroyed),
            expired_total: g(&s.sessions_expired),
            rejected_total: g(&s.sessions_rejected),
        },
        commands: CommandStats {
            running: ctx.running_commands(),
            max: ctx.config.commands.max_concurrent as u64,
            started_total: g(&s.commands_started),
            completed_total: g(&s.commands_completed),
            timed_out_total: g(&s.commands_timed_out),
            killed_total: g(&s.commands_killed),
            rejected_busy_total: g(&s.commands_rejected_busy),
            rejected_capacity_total: g(&s.commands_rejected_capacity),
            output_truncated_total: g(&s.output_truncated),
            oom_killed_total: g(&s.oom_killed),
            spawn_failed_total: g(&s.spawn_failed),
        },
        clients: ClientStats {
            connections: g(&s.connections),
            connections_total: g(&s.connections_total),
            connections_refused_total: g(&s.connections_refused),
            rate_limited_total: g(&s.rate_limited),
            bad_frames_total: g(&s.bad_frames),
            stalled_total: g(&s.stalled_connections),
            slow_readers_dropped_total: g(&s.slow_readers_dropped),
            requests_total: g(&s.requests),
            errors_total: g(&s.errors),
        },
        runtime: RuntimeStats {
            pid: std::process::id(),
            uptime_ms: ctx.uptime_ms(),
            rss_bytes: rss_bytes(),
            cgroups: ctx
                .cgroups
                .as_ref()
                .map_or("off", |c| c.mode_name())
                .to_string(),
            cgroups_recovered_total: g(&s.cgroups_recovered),
            actor_failures_total: g(&s.actor_failures),
            zombies_reaped_total: g(&s.zombies_reaped),
            draining: ctx.draining(),
            oom_score_adj: std::fs::read_to_string("/proc/self/oom_score_adj")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
            commands_oom_score_adj: i64::from(ctx.config.commands.oom_score_adj),
            subreaper: ctx.subreaper,
        },
    }
}

/// Checks an `env` param: names non-empty without `=` or NUL, values without NUL.
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

async fn create(
    ctx: &Context,
    uid: u32,
    params: &[u8],
) -> Result<crate::protocol::CreateResult, RequestError> {
    let p: CreateParams = parse_params(params)?;
    let cwd = match p.cwd {
        None => None,
        Some(cwd) => {
            let path = PathBuf::from(&cwd);
            // stat off the async workers: a path on a stalled mount can block.
            let probe = path.clone();
            let is_dir = tokio::task::spawn_blocking(move || probe.is_dir())
                .await
                .unwrap_or(false);
            if !path.is_absolute() || !is_dir {
                return Err(RequestError::InvalidRequest(format!(
                    "param `cwd`: {cwd:?} is not an absolute path to an existing directory"
                )));
            }
            Some(path)
        }
    };
    let limits = session_limits(&ctx.config, ctx.cgroups.is_some(), p.limits.as_ref())?;
    let request = CreateRequest {
        cwd,
        env: env_param("env", p.env)?,
        timeout: limits.timeout,
        rlimits: limits.rlimits.to_rlimits(),
        cgroup_limits: limits.cgroup,
    };
    ask(ctx, |reply| RegistryMsg::Create {
        uid,
        request,
        reply,
    })
    .await?
}

async fn destroy(ctx: &Context, uid: u32, params: &[u8]) -> Result<DestroyResult, RequestError> {
    let p: SessionIdParams = parse_params(params)?;
    ask(ctx, |reply| RegistryMsg::Destroy {
        uid,
        session_id: p.session_id,
        reply,
    })
    .await??;
    Ok(DestroyResult { destroyed: true })
}

async fn list(ctx: &Context, uid: u32) -> Result<ListResult, RequestError> {
    let sessions = ask(ctx, |reply| RegistryMsg::List { uid, reply }).await?;
    let mut out = Vec::with_capacity(sessions.len());
    for session in sessions {
        // A session that ends meanwhile is simply not listed.
        if let Ok(d) = ractor::call_t!(
            session,
            |reply| SessionMsg::Describe { reply },
            DESCRIBE_TIMEOUT_MS
        ) {
            out.push(d.info);
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.created_ms_ago));
    Ok(ListResult { sessions: out })
}

async fn exec_run(
    ctx: &Context,
    uid: u32,
    params: &[u8],
) -> Result<crate::protocol::ExecResult, RequestError> {
    let p: ExecParams = parse_params(params)?;
    let limit = ctx.config.commands.max_stdin_bytes.as_u64();
    if let Some(stdin) = &p.stdin {
        if stdin.len() as u64 > limit {
            return Err(RequestError::StdinTooLarge {
                size: stdin.len() as u64,
                limit,
            });
        }
    }
    if p.command.contains('\0') || p.command.len() > MAX_ARG_BYTES {
        return Err(RequestError::InvalidRequest(format!(
            "param `command`: must hold no NUL byte and at most {MAX_ARG_BYTES} bytes (pass data through stdin)"
        )));
    }
    let request = ExecRequest {
        command: p.command,
        timeout: p
            .timeout_s
            .map(|s| seconds_param("timeout_s", s))
            .transpose()?,
        stdin: p.stdin.map(|b| b.into_vec()),
        env: env_param("env", p.env)?,
        keep_output: p.keep_output.unwrap_or_default(),
    };
    ask(ctx, |reply| RegistryMsg::Run {
        uid,
        session_id: p.session_id,
        request,
        reply,
    })
    .await?
}

async fn cancel(ctx: &Context, uid: u32, params: &[u8]) -> Result<CancelResult, RequestError> {
    let p: SessionIdParams = parse_params(params)?;
    let cancelled = ask(ctx, |reply| RegistryMsg::Cancel {
        uid,
        session_id: p.session_id,
        reply,
    })
    .await??;
    Ok(CancelResult { cancelled })
}

/// `debug.fault`: delivers an injected fault (feature `fault-injection` only).
#[cfg(feature = "fault-injection")]
async fn fault(
    ctx: &Context,
    uid: u32,
    params: &[u8],
) -> Result<crate::fault::FaultResult, RequestError> {
    use crate::fault::{FAIL_NEXT_SPAWN, Fault, FaultParams, FaultResult, FaultTarget};
    let p: FaultParams = parse_params(params)?;
    let fault = Fault {
        action: p.action,
        stall: std::time::Duration::from_millis(p.stall_ms.unwrap_or(1000)),
    };
    if p.target == FaultTarget::Spawn {
        FAIL_NEXT_SPAWN.store(true, std::sync::atomic::Ordering::SeqCst);
        return Ok(FaultResult { injected: 1 });
    }
    if p.target == FaultTarget::Supervisor {
        let root = ctx
            .supervisor()
            .ok_or_else(|| RequestError::Internal("no root supervisor".into()))?;
        let _ = root.cast(crate::actors::supervisor::SupervisorMsg::Fault(fault));
        return Ok(FaultResult { injected: 1 });
    }
    let session_id = p.session_id.unwrap_or_default();
    let injected = ask(ctx, |reply| RegistryMsg::Fault {
        uid,
        target: p.target,
        session_id,
        fault,
        reply,
    })
    .await??;
    Ok(FaultResult { injected })
}
