//! `session.create`: params → a validated [`CreateRequest`] (cwd, env, limits that may only tighten) → the registry, which admits it and starts a SessionActor.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Pending, cast, env_param};
use crate::actors::registry::{CreateRequest, RegistryMsg};
use crate::cgroup::{CgroupLimits, MIN_CPU_CORES, MIN_MEMORY_BYTES, MIN_PIDS};
use crate::config::Config;
use crate::limits::{Limit, SessionRlimits};
use crate::process::shell::MAX_ARG_BYTES;
use crate::protocol::{
    CreateParams, CreateResult, RequestError, SessionLimits, parse_params, quote, seconds_param,
};
use crate::server::Daemon;

/// Checks every param (the cwd's stat included) and sends the request to
/// the registry before returning, so a request sent after it on the same
/// connection reaches its actor after it.
pub(super) async fn dispatch(
    daemon: &Daemon,
    uid: u32,
    params: &[u8],
) -> Result<Pending<CreateResult>, RequestError> {
    let request = parse(&daemon.ctx.live(), daemon.ctx.cgroups.is_some(), params).await?;
    let reply = cast(daemon, |reply| RegistryMsg::Create {
        uid,
        request,
        reply,
    })?;
    Ok(Box::pin(async move { reply.await? }))
}

/// Every param check of `session.create`.
async fn parse(
    config: &Config,
    cgroups_on: bool,
    params: &[u8],
) -> Result<CreateRequest, RequestError> {
    let p: CreateParams = parse_params(params)?;
    let cwd = match p.cwd {
        None => None,
        Some(cwd) => {
            let path = PathBuf::from(&cwd);
            // Under uid-per-session, whether the session's uid may enter it is
            // checked by the session's setup: the uid is not known before.
            if !path.is_absolute() || !is_dir(&path, &cwd).await? {
                return Err(RequestError::InvalidRequest(format!(
                    "param `cwd`: {} is not an absolute path to an existing directory",
                    quote(&cwd)
                )));
            }
            Some(path)
        }
    };
    let limits = resolve_limits(config, cgroups_on, p.limits.as_ref())?;
    if let Some(init) = &p.init {
        if init.contains('\0') || init.len() > MAX_ARG_BYTES {
            return Err(RequestError::InvalidRequest(format!(
                "param `init`: must hold no NUL byte and at most {MAX_ARG_BYTES} bytes"
            )));
        }
    }
    Ok(CreateRequest {
        cwd,
        env: env_param("env", p.env)?,
        timeout: limits.timeout,
        rlimits: limits.rlimits.to_rlimits(),
        cgroup_limits: limits.cgroup,
        init: p.init,
    })
}

/// At most this many `session.create` cwd checks whose stat has not
/// returned yet, daemon-wide: a stat stuck on a mount that does not answer
/// keeps its blocking-pool thread until the mount does, and clients must not
/// be able to take the pool (which spawns every command) with them.
const MAX_CWD_CHECKS: usize = 16;

/// One permit per cwd check in progress, held until its stat returns.
static CWD_CHECKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CWD_CHECKS);

/// Whether `path` is a directory: a stat off the async workers (a path on a
/// stalled mount can block), which holds the connection's next frame at
/// most `timing::CWD_CHECK`; refused when it did not answer by then, or when
/// [`MAX_CWD_CHECKS`] earlier ones still have not.
async fn is_dir(path: &Path, cwd: &str) -> Result<bool, RequestError> {
    let stuck =
        |why: String| RequestError::InvalidRequest(format!("param `cwd`: {} {why}", quote(cwd)));
    let permit = CWD_CHECKS.try_acquire().map_err(|_| {
        stuck(format!(
            "cannot be checked now: {MAX_CWD_CHECKS} earlier checks wait on a filesystem that does not answer"
        ))
    })?;
    let probe = path.to_path_buf();
    let check = tokio::task::spawn_blocking(move || {
        let _held_until_the_stat_returns = permit;
        probe.is_dir()
    });
    match tokio::time::timeout(crate::timing::CWD_CHECK, check).await {
        Ok(done) => Ok(done.unwrap_or(false)),
        Err(_) => Err(stuck(format!(
            "did not answer within {} s (a mount that does not answer?)",
            crate::timing::CWD_CHECK.as_secs()
        ))),
    }
}

/// Everything a session's `limits` resolve to.
#[derive(Debug, Clone, Copy)]
struct ResolvedLimits {
    /// The session's default and maximum command timeout, when it set one.
    timeout: Option<Duration>,
    rlimits: SessionRlimits,
    cgroup: CgroupLimits,
}

/// Decides a `session.create`'s `limits`: each may only tighten the
/// configuration; a value that would loosen one, or is below the least
/// that still works, is `INVALID_REQUEST` naming it. cgroup limits on a daemon running without cgroups are refused too,
/// rather than accepted and not enforced.
fn resolve_limits(
    config: &Config,
    cgroups_on: bool,
    limits: Option<&SessionLimits>,
) -> Result<ResolvedLimits, RequestError> {
    let mut resolved = ResolvedLimits {
        timeout: None,
        rlimits: SessionRlimits::from(&config.rlimits),
        cgroup: CgroupLimits::from_config(&config.cgroups),
    };
    let Some(limits) = limits else {
        return Ok(resolved);
    };
    let below = |name: &str, asked: String, min: &str| {
        RequestError::InvalidRequest(format!(
            "param `limits.{name}`: {asked} is below the minimum of {min}"
        ))
    };
    let loosen = |name: &str, asked: String, configured: String| {
        RequestError::InvalidRequest(format!(
            "param `limits.{name}`: {asked} would loosen the configured limit ({configured}); limits may only tighten"
        ))
    };
    let wants_cgroup = limits.memory_max_bytes.is_some()
        || limits.cpu_max_cores.is_some()
        || limits.pids_max.is_some();
    if wants_cgroup && !cgroups_on {
        let name = if limits.memory_max_bytes.is_some() {
            "memory_max_bytes"
        } else if limits.cpu_max_cores.is_some() {
            "cpu_max_cores"
        } else {
            "pids_max"
        };
        return Err(RequestError::InvalidRequest(format!(
            "param `limits.{name}`: cgroups are off on this daemon, so it cannot be enforced"
        )));
    }
    let c = &mut resolved.cgroup;
    if let Some(v) = limits.memory_max_bytes {
        if v < MIN_MEMORY_BYTES {
            return Err(below("memory_max_bytes", v.to_string(), "4 MiB"));
        }
        if v > c.memory_max {
            return Err(loosen(
                "memory_max_bytes",
                v.to_string(),
                c.memory_max.to_string(),
            ));
        }
        c.memory_max = v;
    }
    if let Some(v) = limits.cpu_max_cores {
        if !v.is_finite() || v < MIN_CPU_CORES {
            return Err(below("cpu_max_cores", v.to_string(), "0.01"));
        }
        if v > c.cpu_max_cores {
            return Err(loosen(
                "cpu_max_cores",
                v.to_string(),
                c.cpu_max_cores.to_string(),
            ));
        }
        c.cpu_max_cores = v;
    }
    if let Some(v) = limits.pids_max {
        if v < MIN_PIDS {
            return Err(below("pids_max", v.to_string(), &MIN_PIDS.to_string()));
        }
        if v > c.pids_max {
            return Err(loosen("pids_max", v.to_string(), c.pids_max.to_string()));
        }
        c.pids_max = v;
    }
    if let Some(secs) = limits.timeout_s {
        let timeout = seconds_param("limits.timeout_s", secs)?;
        let max = config.commands.max_timeout;
        if timeout > max {
            return Err(loosen(
                "timeout_s",
                format!("{secs}s"),
                format!("max_timeout {}s", max.as_secs_f64()),
            ));
        }
        resolved.timeout = Some(timeout);
    }
    resolved.rlimits = tighten_rlimits(resolved.rlimits, limits)?;
    Ok(resolved)
}

/// Applies a session's rlimit params, which may only tighten: a value above
/// the configured one is `INVALID_REQUEST` naming the param.
fn tighten_rlimits(
    base: SessionRlimits,
    limits: &SessionLimits,
) -> Result<SessionRlimits, RequestError> {
    let tighten = |name: &str, current: Limit, asked: Option<u64>| match asked {
        None => Ok(current),
        Some(0) => Err(RequestError::InvalidRequest(format!(
            "param `limits.{name}`: 0 is below the minimum of 1 (0 would leave the session unable to run anything)"
        ))),
        Some(v) if Limit::Value(v).within(current) => Ok(Limit::Value(v)),
        Some(v) => Err(RequestError::InvalidRequest(format!(
            "param `limits.{name}`: {v} would loosen the configured limit ({current}); limits may only tighten"
        ))),
    };
    Ok(SessionRlimits {
        cpu: tighten("rlimit_cpu_s", base.cpu, limits.rlimit_cpu_s)?,
        address_space: tighten(
            "rlimit_as_bytes",
            base.address_space,
            limits.rlimit_as_bytes,
        )?,
        nproc: tighten("rlimit_nproc", base.nproc, limits.rlimit_nproc)?,
        nofile: tighten("rlimit_nofile", base.nofile, limits.rlimit_nofile)?,
        core: base.core,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RlimitsConfig;

    #[test]
    fn sessions_may_only_tighten() {
        let base = SessionRlimits::from(&RlimitsConfig::default());
        let tighter = tighten_rlimits(
            base,
            &SessionLimits {
                rlimit_nofile: Some(64),
                rlimit_cpu_s: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (tighter.nofile, tighter.cpu),
            (Limit::Value(64), Limit::Value(10))
        );
        let err = tighten_rlimits(
            base,
            &SessionLimits {
                rlimit_nofile: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("limits.rlimit_nofile"), "{err}");
        let unlimited = SessionRlimits {
            nproc: Limit::Unlimited,
            ..base
        };
        assert!(
            tighten_rlimits(
                unlimited,
                &SessionLimits {
                    rlimit_nproc: Some(5),
                    ..Default::default()
                }
            )
            .is_ok()
        );
    }

    /// Issue 14, "`timeout_s: 1e-9`": a limit under its floor says so, not "would loosen".
    #[test]
    fn limits_below_their_minimum_say_so() {
        let config = Config::default();
        for (limits, name) in [
            (
                SessionLimits {
                    memory_max_bytes: Some(1),
                    ..Default::default()
                },
                "limits.memory_max_bytes",
            ),
            (
                SessionLimits {
                    pids_max: Some(1),
                    ..Default::default()
                },
                "limits.pids_max",
            ),
            (
                SessionLimits {
                    cpu_max_cores: Some(0.0),
                    ..Default::default()
                },
                "limits.cpu_max_cores",
            ),
            (
                SessionLimits {
                    timeout_s: Some(1e-9),
                    ..Default::default()
                },
                "limits.timeout_s",
            ),
            (
                SessionLimits {
                    rlimit_nofile: Some(0),
                    ..Default::default()
                },
                "limits.rlimit_nofile",
            ),
        ] {
            let err = resolve_limits(&config, true, Some(&limits))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(name) && err.contains("below the minimum of"),
                "{err}"
            );
            assert!(!err.contains("loosen"), "{err}");
        }
    }

    #[test]
    fn cgroup_limits_are_refused_when_cgroups_are_off() {
        let limits = SessionLimits {
            pids_max: Some(64),
            ..Default::default()
        };
        let err = resolve_limits(&Config::default(), false, Some(&limits)).unwrap_err();
        assert!(err.to_string().contains("limits.pids_max"), "{err}");
        assert!(resolve_limits(&Config::default(), true, Some(&limits)).is_ok());
    }
}
