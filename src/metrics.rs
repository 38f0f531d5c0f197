//! Beside the data path: `system.stats` in the Prometheus text format, served on the optional `[metrics] listen` HTTP listener and printed by `sessiond stats --format prometheus`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::protocol::StatsResult;

/// Largest request head a scraper may send; a GET for /metrics is far smaller.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A scrape must send its request, and take the answer, within this.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; more connections are closed unanswered.
const MAX_SCRAPES: usize = 8;

/// `stats` in the Prometheus text exposition format (version 0.0.4).
pub fn render(stats: &StatsResult) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP sessiond_{name} {help}");
        let _ = writeln!(out, "# TYPE sessiond_{name} {kind}");
        let _ = writeln!(out, "sessiond_{name} {}", number(value));
    };
    let s = &stats.sessions;
    metric(
        "sessions_active",
        "gauge",
        "Live sessions.",
        s.active as f64,
    );
    metric(
        "sessions_max",
        "gauge",
        "Live sessions allowed at once (sessions.max_sessions).",
        s.max as f64,
    );
    metric(
        "sessions_created_total",
        "counter",
        "Sessions created.",
        s.created_total as f64,
    );
    metric(
        "sessions_destroyed_total",
        "counter",
        "Sessions destroyed, by a client or at expiry.",
        s.destroyed_total as f64,
    );
    metric(
        "sessions_expired_total",
        "counter",
        "Sessions destroyed after idle_timeout.",
        s.expired_total as f64,
    );
    metric(
        "sessions_rejected_total",
        "counter",
        "session.create requests refused (limits, draining).",
        s.rejected_total as f64,
    );
    let c = &stats.commands;
    metric(
        "commands_running",
        "gauge",
        "Commands running now.",
        c.running as f64,
    );
    metric(
        "commands_max",
        "gauge",
        "Commands allowed to run at once (commands.max_concurrent).",
        c.max as f64,
    );
    metric(
        "commands_started_total",
        "counter",
        "Commands started.",
        c.started_total as f64,
    );
    metric(
        "commands_completed_total",
        "counter",
        "Commands that ran to an end (exited, or killed by a limit).",
        c.completed_total as f64,
    );
    metric(
        "commands_timed_out_total",
        "counter",
        "Commands killed at their timeout.",
        c.timed_out_total as f64,
    );
    metric(
        "commands_idle_timed_out_total",
        "counter",
        "Commands killed for writing nothing for idle_timeout_s.",
        c.idle_timed_out_total as f64,
    );
    metric(
        "commands_background_pipes_closed_total",
        "counter",
        "Pipes of background writers closed because their session kept sessions.max_background_pipes open.",
        c.background_pipes_closed_total as f64,
    );
    metric(
        "commands_killed_total",
        "counter",
        "Commands killed by the daemon, for any reason.",
        c.killed_total as f64,
    );
    metric(
        "commands_rejected_busy_total",
        "counter",
        "Commands refused with SESSION_BUSY.",
        c.rejected_busy_total as f64,
    );
    metric(
        "commands_rejected_capacity_total",
        "counter",
        "Commands refused with TOO_MANY_COMMANDS.",
        c.rejected_capacity_total as f64,
    );
    metric(
        "commands_output_truncated_total",
        "counter",
        "Commands whose output went over max_output_bytes.",
        c.output_truncated_total as f64,
    );
    metric(
        "commands_oom_killed_total",
        "counter",
        "Commands killed by their session's memory limit.",
        c.oom_killed_total as f64,
    );
    metric(
        "commands_pids_limit_hits_total",
        "counter",
        "Forks refused by sessions' pids limits.",
        c.pids_limit_hits_total as f64,
    );
    metric(
        "commands_spawn_failed_total",
        "counter",
        "Commands that could not be started.",
        c.spawn_failed_total as f64,
    );
    let k = &stats.clients;
    metric(
        "connections",
        "gauge",
        "Open client connections.",
        k.connections as f64,
    );
    metric(
        "connections_total",
        "counter",
        "Client connections accepted.",
        k.connections_total as f64,
    );
    metric(
        "connections_refused_total",
        "counter",
        "Client connections refused (uid not allowed, too many).",
        k.connections_refused_total as f64,
    );
    metric(
        "rate_limited_total",
        "counter",
        "Requests refused with RATE_LIMITED.",
        k.rate_limited_total as f64,
    );
    metric(
        "bad_frames_total",
        "counter",
        "Frames that could not be decoded or were too large.",
        k.bad_frames_total as f64,
    );
    metric(
        "stalled_connections_total",
        "counter",
        "Connections closed for a partial frame older than request_read_timeout.",
        k.stalled_total as f64,
    );
    metric(
        "slow_readers_dropped_total",
        "counter",
        "Connections dropped for unread answers over max_unsent_bytes.",
        k.slow_readers_dropped_total as f64,
    );
    metric(
        "requests_total",
        "counter",
        "Requests received.",
        k.requests_total as f64,
    );
    metric(
        "request_errors_total",
        "counter",
        "Requests answered with an error.",
        k.errors_total as f64,
    );
    let r = &stats.runtime;
    metric(
        "uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        r.uptime_ms as f64 / 1000.0,
    );
    metric(
        "resident_memory_bytes",
        "gauge",
        "Resident set size of the daemon.",
        r.rss_bytes as f64,
    );
    metric(
        "actor_failures_total",
        "counter",
        "Actors that panicked or failed.",
        r.actor_failures_total as f64,
    );
    metric(
        "zombies_reaped_total",
        "counter",
        "Orphaned zombies reaped as a subreaper.",
        r.zombies_reaped_total as f64,
    );
    metric(
        "cgroups_recovered_total",
        "counter",
        "Stale session cgroups of an earlier daemon removed at start.",
        r.cgroups_recovered_total as f64,
    );
    metric(
        "draining",
        "gauge",
        "1 while the daemon drains after SIGTERM.",
        f64::from(u8::from(r.draining)),
    );
    metric(
        "oom_score_adj",
        "gauge",
        "The daemon's own oom_score_adj.",
        r.oom_score_adj as f64,
    );
    metric(
        "commands_oom_score_adj",
        "gauge",
        "The oom_score_adj every command starts with.",
        r.commands_oom_score_adj as f64,
    );
    metric(
        "subreaper",
        "gauge",
        "1 when the daemon is a child subreaper.",
        f64::from(u8::from(r.subreaper)),
    );
    metric(
        "run_as_user",
        "gauge",
        "1 when commands of shared sessions run as the configured run_as_user.",
        f64::from(u8::from(r.run_as_user)),
    );
    metric(
        "memory_budget_bytes",
        "gauge",
        "server.memory_budget in force.",
        r.memory_budget_bytes as f64,
    );
    metric(
        "memory_used_bytes",
        "gauge",
        "Bytes held for clients, charged to the memory budget.",
        r.memory_used_bytes as f64,
    );
    metric(
        "overloaded_total",
        "counter",
        "Requests and frames refused with OVERLOADED.",
        r.overloaded_total as f64,
    );
    // A mode is a label on a gauge that is always 1.
    for (name, help, mode) in [
        ("isolation_mode", "Isolation between sessions", &r.isolation),
        ("cgroups_mode", "Cgroup mode in use", &r.cgroups),
    ] {
        let _ = writeln!(
            out,
            "# HELP sessiond_{name} {help} (the label), always 1.\n# TYPE sessiond_{name} gauge\nsessiond_{name}{{mode=\"{}\"}} 1",
            label(mode)
        );
    }

    let mut typed = std::collections::BTreeSet::new();
    for h in &stats.latency {
        let name = format!("sessiond_{}", h.name);
        if typed.insert(name.clone()) {
            let help = match h.name.as_str() {
                "request_duration_seconds" => {
                    "Time from a request's arrival to its answer, by method."
                }
                "command_duration_seconds" => "Wall time of commands, from start to end.",
                _ => "Latency.",
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} histogram");
        }
        let labels = h
            .method
            .as_deref()
            .map(|m| format!("method=\"{}\"", label(m)))
            .unwrap_or_default();
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in h.le.iter().zip(&h.cumulative) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {n}",
                number(*le)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", number(h.sum_s));
        let _ = writeln!(out, "{name}_count{braces} {}", h.count);
    }
    out
}

/// A sample value as Prometheus writes it (integers without a fraction).
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` until the task is dropped: HTTP/1.1,
/// one request per connection, at most [`MAX_REQUEST_BYTES`] of request
/// head, [`SCRAPE_TIMEOUT`] per scrape, [`MAX_SCRAPES`] at once.
pub(crate) async fn serve(
    listener: TcpListener,
    stats: Arc<dyn Fn() -> StatsResult + Send + Sync>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(crate::timing::ACCEPT_BACKOFF).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed unanswered
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, scrape(stream, &*stats)).await;
            drop(slot);
        });
    }
}

/// Answers one HTTP request on `stream`, then closes it.
async fn scrape(
    mut stream: TcpStream,
    stats: &(dyn Fn() -> StatsResult + Send + Sync),
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
            )
            .await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => {
            let body = render(&stats());
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
            )
            .await
        }
        (b"GET", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"only /metrics here\n",
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
