//! `system.ping` and `system.stats`: answered inline on the connection's task from shared state, never through an actor.

use crate::context::Context;
use crate::protocol::{
    ClientStats, CommandStats, FEATURES, HistogramStats, PROTOCOL_VERSION, PingResult,
    RuntimeStats, SessionStats, StatsResult,
};
use crate::stats::{BUCKETS_S, Histogram, REQUEST_METHODS, Stats, rss_bytes};

pub(super) fn ping(ctx: &Context) -> PingResult {
    PingResult {
        pong: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        uptime_ms: ctx.uptime_ms(),
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
    }
}

pub(crate) fn stats(ctx: &Context) -> StatsResult {
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
            pids_limit_hits_total: ctx
                .cgroups
                .as_ref()
                .map_or(0, |c| c.pids_limit_hits_total()),
            idle_timed_out_total: g(&s.commands_idle_timed_out),
            background_pipes_closed_total: ctx.processes.background().closed_total(),
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
            isolation: ctx.config.commands.isolation.name().to_string(),
            run_as_user: !ctx.config.commands.run_as_user.is_empty(),
            memory_budget_bytes: ctx.budget.limit(),
            memory_used_bytes: ctx.budget.used(),
            overloaded_total: g(&s.overloaded),
        },
        latency: latency(s),
    }
}

/// Every latency histogram (every method, called or not, so the series exist from the start).
fn latency(s: &Stats) -> Vec<HistogramStats> {
    let one = |name: &str, method: Option<&str>, h: &Histogram| {
        let (cumulative, count, sum_s) = h.snapshot();
        HistogramStats {
            name: name.to_string(),
            method: method.map(str::to_string),
            le: BUCKETS_S.to_vec(),
            cumulative,
            count,
            sum_s,
        }
    };
    let mut out: Vec<HistogramStats> = REQUEST_METHODS
        .iter()
        .zip(&s.request_seconds)
        .map(|(m, h)| one("request_duration_seconds", Some(m), h))
        .collect();
    out.push(one("command_duration_seconds", None, &s.command_seconds));
    out
}
