//! The workloads, one function each, and the run that sequences them: every figure is measured against a floor taken in the same run, through the client library, on daemons the run starts and stops.
//!
//! Ratios rather than absolute times: on shared machines absolute times drift
//! between runs while ratios drift less.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sessiond::client::Client;
use sessiond::protocol::{CreateParams, ExecParams, KeepOutput};

use crate::daemon::{BenchDaemon, rss_of};
use crate::error::BenchError;
use crate::report::Report;

/// How much work each workload does.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub exec_runs: usize,
    pub pings: usize,
    pub creates: usize,
    pub concurrency_secs: f64,
    pub idle_sessions: [usize; 2],
    pub drain_bytes: u64,
}

impl Scale {
    /// The full run (about 30 s).
    pub const FULL: Scale = Scale {
        exec_runs: 500,
        pings: 5000,
        creates: 300,
        concurrency_secs: 3.0,
        idle_sessions: [1000, 10_000],
        drain_bytes: 1 << 30,
    };
    /// A smoke run (seconds): every workload, tiny counts.
    pub const QUICK: Scale = Scale {
        exec_runs: 10,
        pings: 50,
        creates: 5,
        concurrency_secs: 0.3,
        idle_sessions: [10, 20],
        drain_bytes: 8 << 20,
    };
}

/// Runs every workload at `scale` against daemons started from `daemon`: cgroups off, then on.
pub async fn run(scale: Scale, daemon: &Path) -> Result<Report, BenchError> {
    let mut report = Report::new();
    for cgroups in [false, true] {
        let d = BenchDaemon::start(daemon, cgroups).await?;
        let c = d.client().await?;
        let mode = c.stats().await?.runtime.cgroups;
        // Taken right before the workloads it is the floor of: this
        // machine's speed drifts by up to a third over minutes (a floor of
        // 1.17 to 1.46 ms in five runs within ten minutes), so one floor for both
        // daemons made their ratios swing with the drift.
        let floor_p50 = floor(&mut report, &mode, scale).await?;
        let exec_p50 = sequential_exec(&mut report, &c, &mode, floor_p50, scale).await?;
        saving_exec(&mut report, &c, &mode, floor_p50, scale).await?;
        create_destroy(&mut report, &c, &mode, scale).await?;
        if !cgroups {
            heavy_state_exec(&mut report, &c, floor_p50, scale).await?;
            concurrency(&mut report, &d, scale).await?;
            spawn_vs_memory(&mut report, &d, &c, exec_p50, scale).await?;
            let ping_p50 = ping(&mut report, &d, &c, scale).await?;
            idle_sessions(&mut report, &d, &c, ping_p50, exec_p50, scale).await?;
        }
        drop(c);
        d.stop().await?;
        if !cgroups {
            // On a fresh daemon: the one above held 10 000 sessions and the
            // allocator's high-water mark of the earlier workloads.
            let d = BenchDaemon::start(daemon, false).await?;
            output_drain(&mut report, &d, scale).await?;
            d.stop().await?;
        }
    }
    Ok(report)
}

/// The floor: `bash -c true` spawned and waited for by tokio in this
/// process, before the workloads of the daemon with cgroups `mode`. Returns
/// its p50 (µs).
async fn floor(report: &mut Report, mode: &str, scale: Scale) -> Result<f64, BenchError> {
    let mut samples = Vec::new();
    for i in 0..scale.exec_runs + 20 {
        let took = floor_once().await?;
        // The first 20 are a warm-up.
        if i >= 20 {
            samples.push(took);
        }
    }
    let p50 = percentile(&sorted_us(samples), 0.5);
    let figure = format!("bash -c true p50 (before cgroups {mode})");
    report.info("floor", &figure, p50, "µs");
    Ok(p50)
}

/// One `bash -c true`, spawned and waited for by tokio in this process.
async fn floor_once() -> Result<Duration, BenchError> {
    let t = Instant::now();
    tokio::process::Command::new("/bin/bash")
        .args(["-c", "true"])
        .status()
        .await
        .map_err(|e| BenchError::io("run", "/bin/bash", e))?;
    Ok(t.elapsed())
}

/// `exec.run true` in one session, back to back, against the floor. Returns its p50 (µs).
async fn sequential_exec(
    report: &mut Report,
    c: &Client,
    mode: &str,
    floor_p50: f64,
    scale: Scale,
) -> Result<f64, BenchError> {
    let workload = format!("exec.run true, sequential (cgroups {mode})");
    let (lat, floors) = alternating_with_floor(c, "true", scale.exec_runs).await?;
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let floor_here = percentile(&floors, 0.5);
    // A cgroup per command costs a leaf in every hierarchy: a looser goal.
    let goal = if mode == "off" { 1.25 } else { 1.5 };
    report.info(&workload, "p50", p50, "µs");
    report.info(&workload, "p99", p99, "µs");
    report.info(&workload, "floor p50 (its own blocks)", floor_here, "µs");
    report.info(&workload, "p50 / floor p50", p50 / floor_p50, "×");
    report.goal(
        &workload,
        "p50 / floor p50, alternating blocks",
        p50 / floor_here,
        "×",
        &format!("≤ {goal}"),
        p50 / floor_here <= goal,
    );
    Ok(p50)
}

/// Runs of `bash -c true` and of `command` (back to back in a session of
/// its own) are measured in alternating blocks of [`BLOCK`], `n` of each:
/// the machine's speed drifts by up to a third over minutes here, and each
/// half of the ratio then sees the same machine. Back to back within a
/// block, so what a command leaves to the daemon's background (its leaf's
/// removal, the next leaf) still weighs on the next command, as in any
/// sequence of commands. Returns both sorted latencies (µs).
async fn alternating_with_floor(
    c: &Client,
    command: &str,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    const BLOCK: usize = 50;
    let s = c.create_session(CreateParams::default()).await?;
    for _ in 0..10.min(n) {
        floor_once().await?;
        c.run(&s, command).await?;
    }
    let (mut runs, mut floors) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while runs.len() < n {
        let block = BLOCK.min(n - runs.len());
        for _ in 0..block {
            floors.push(floor_once().await?);
        }
        for _ in 0..block {
            let t = Instant::now();
            c.run(&s, command).await?;
            runs.push(t.elapsed());
        }
    }
    c.destroy_session(&s).await?;
    Ok((sorted_us(runs), sorted_us(floors)))
}

/// `command` run back to back `n` times in a session of its own: sorted
/// latencies (µs).
async fn in_fresh_session(c: &Client, command: &str, n: usize) -> Result<Vec<f64>, BenchError> {
    let s = c.create_session(CreateParams::default()).await?;
    let lat = sorted_us(time_execs(c, &s, command, n).await?);
    c.destroy_session(&s).await?;
    Ok(lat)
}

/// A command bash cannot tell from its text to keep the state (a builtin
/// that may change it), so the state is saved after it: the full path.
const SAVING_COMMAND: &str = "cd .";

/// `exec.run cd .` in one session, back to back, against the floor: what a
/// command costs whose state must be saved (`true` is a plain command, for
/// which the save is skipped).
async fn saving_exec(
    report: &mut Report,
    c: &Client,
    mode: &str,
    floor_p50: f64,
    scale: Scale,
) -> Result<(), BenchError> {
    let workload =
        format!("exec.run `{SAVING_COMMAND}` (state saved), sequential (cgroups {mode})");
    let lat = in_fresh_session(c, SAVING_COMMAND, scale.exec_runs).await?;
    let p50 = percentile(&lat, 0.5);
    report.info(&workload, "p50", p50, "µs");
    report.info(&workload, "p50 / floor p50", p50 / floor_p50, "×");
    Ok(())
}

/// What sourcing nvm.sh leaves in a shell, roughly: 2 000 variables and 300 functions.
const HEAVY_STATE: &str = "for i in $(seq 1 2000); do eval \"v_$i='value number $i with some text'\"; done; \
     for i in $(seq 1 300); do eval \"f_$i() { local a=\\$1; echo \\\"fn $i \\$a\\\"; if [ -n \\\"\\$a\\\" ]; then return 1; fi; }\"; done";

/// `exec.run true` (restored, not saved) and `exec.run cd .` (restored and
/// saved) in a session carrying a heavy terminal state, against the floor. SWE-ReX, which keeps
/// a bash per session, takes 118 ms for `true` on this kind of machine.
async fn heavy_state_exec(
    report: &mut Report,
    c: &Client,
    floor_p50: f64,
    scale: Scale,
) -> Result<(), BenchError> {
    let workload = "exec.run true, 2 000 variables + 300 functions carried";
    let s = c.create_session(CreateParams::default()).await?;
    let setup = c.run(&s, HEAVY_STATE).await?;
    if setup.exit_code != Some(0) || setup.state_error.is_some() {
        return Err(BenchError::Daemon(format!(
            "the heavy state was not set up: {setup:?}"
        )));
    }
    let lat = sorted_us(time_execs(c, &s, "true", scale.exec_runs).await?);
    let saving = sorted_us(time_execs(c, &s, SAVING_COMMAND, scale.exec_runs).await?);
    let functions = c.run(&s, "declare -F | wc -l").await?;
    c.destroy_session(&s).await?;
    if String::from_utf8_lossy(&functions.stdout)
        .trim()
        .parse::<u32>()
        .unwrap_or(0)
        < 300
    {
        return Err(BenchError::Daemon("the functions were not carried".into()));
    }
    let p50 = percentile(&lat, 0.5);
    report.info(workload, "p50", p50, "µs");
    report.info(workload, "p50 / floor p50", p50 / floor_p50, "×");
    let workload = format!(
        "exec.run `{SAVING_COMMAND}` (state saved), 2 000 variables + 300 functions carried"
    );
    let p50 = percentile(&saving, 0.5);
    report.info(&workload, "p50", p50, "µs");
    report.info(&workload, "p50 / floor p50", p50 / floor_p50, "×");
    Ok(())
}

/// `session.create` then `session.destroy`, back to back.
async fn create_destroy(
    report: &mut Report,
    c: &Client,
    mode: &str,
    scale: Scale,
) -> Result<(), BenchError> {
    let workload = format!("session.create + destroy (cgroups {mode})");
    let mut samples = Vec::new();
    for _ in 0..scale.creates {
        let t = Instant::now();
        let id = c.create_session(CreateParams::default()).await?;
        c.destroy_session(&id).await?;
        samples.push(t.elapsed());
    }
    let samples = sorted_us(samples);
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    let goal = if mode == "off" { 200.0 } else { 1000.0 };
    report.goal(
        &workload,
        "p50",
        p50,
        "µs",
        &format!("≤ {goal} µs"),
        p50 <= goal,
    );
    report.info(&workload, "p99", p99, "µs");
    Ok(())
}

/// 1, 2, 4, 8, 16 sessions on a connection each, running `true` back to back: throughput must not collapse.
async fn concurrency(report: &mut Report, d: &BenchDaemon, scale: Scale) -> Result<(), BenchError> {
    let workload = "exec.run true, concurrent";
    let mut peak = 0.0f64;
    for k in [1usize, 2, 4, 8, 16] {
        let (rate, mean) = throughput(d, k, scale.concurrency_secs).await?;
        peak = peak.max(rate);
        report.concurrency.push((k, rate, mean));
        // The goal is read off the plot, not checked per row.
        report.note(
            workload,
            &format!("{k} sessions"),
            rate,
            "cmds/s",
            "scales until cores are busy",
        );
    }
    let last = report.concurrency.last().map_or(0.0, |c| c.1);
    report.goal(
        workload,
        "16 sessions / peak",
        last / peak,
        "×",
        "no collapse (≥ 0.8)",
        last / peak >= 0.8,
    );
    Ok(())
}

/// `exec.run` p50 while 16 commands hold 4 MiB of captured output each in the daemon, against `idle_p50`.
async fn spawn_vs_memory(
    report: &mut Report,
    d: &BenchDaemon,
    c: &Client,
    idle_p50: f64,
    scale: Scale,
) -> Result<(), BenchError> {
    let workload = "spawn cost vs daemon memory";
    let holders = hold_output(d, 16).await?;
    let s = c.create_session(CreateParams::default()).await?;
    let loaded = sorted_us(time_execs(c, &s, "true", scale.exec_runs.min(200)).await?);
    let rss_loaded = d.rss();
    c.destroy_session(&s).await?;
    let ratio = percentile(&loaded, 0.5) / idle_p50;
    report.goal(
        workload,
        "p50 loaded / idle",
        ratio,
        "×",
        "within 10% (≤ 1.10)",
        ratio <= 1.10,
    );
    report.info(
        workload,
        "daemon RSS while loaded",
        rss_loaded as f64 / 1048576.0,
        "MiB",
    );
    for h in holders {
        let _ = h.await;
    }
    Ok(())
}

/// `system.ping`: sequential round trips, then pipelined on 1 and on 8 connections. Returns the sequential p50 (µs).
async fn ping(
    report: &mut Report,
    d: &BenchDaemon,
    c: &Client,
    scale: Scale,
) -> Result<f64, BenchError> {
    let pings = sorted_us(time_pings(c, scale.pings).await?);
    let (p50, p99) = (percentile(&pings, 0.5), percentile(&pings, 0.99));
    report.info("system.ping sequential", "p50", p50, "µs");
    report.goal(
        "system.ping sequential",
        "p99",
        p99,
        "µs",
        "≤ 100 µs",
        p99 <= 100.0,
    );
    for conns in [1usize, 8] {
        let rate = pipelined_pings(d, conns, scale.pings * 4).await?;
        report.goal(
            "system.ping pipelined",
            &format!("{conns} connection(s)"),
            rate,
            "req/s",
            "≥ 50 000 req/s",
            rate >= 50_000.0,
        );
    }
    Ok(p50)
}

/// Daemon RSS per idle session at two counts, then ping and exec.run p50 with
/// the larger count against the same with one session (flat scaling).
async fn idle_sessions(
    report: &mut Report,
    d: &BenchDaemon,
    c: &Client,
    ping_1: f64,
    exec_1: f64,
    scale: Scale,
) -> Result<(), BenchError> {
    let base_rss = d.rss();
    report.rss_by_sessions.push((0, base_rss));
    let mut ids = Vec::new();
    for target in scale.idle_sessions {
        while ids.len() < target {
            ids.push(c.create_session(CreateParams::default()).await?);
        }
        // Let the allocator settle before reading RSS.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = d.rss();
        report.rss_by_sessions.push((target, rss));
        let per = rss.saturating_sub(base_rss) as f64 / target as f64 / 1024.0;
        report.goal(
            "idle sessions",
            &format!("RSS per session at {target}"),
            per,
            "KiB",
            "≤ 16 KiB",
            per <= 16.0,
        );
    }
    let ping_n = percentile(&sorted_us(time_pings(c, scale.pings).await?), 0.5);
    let exec_n = percentile(
        &sorted_us(time_execs(c, &ids[0], "true", scale.exec_runs.min(200)).await?),
        0.5,
    );
    let n = scale.idle_sessions[1];
    report.goal(
        "flat scaling",
        &format!("ping p50 with {n} sessions / with 1"),
        ping_n / ping_1,
        "×",
        "≤ 1.2",
        ping_n / ping_1 <= 1.2,
    );
    report.goal(
        "flat scaling",
        &format!("exec.run p50 with {n} sessions / with 1"),
        exec_n / exec_1,
        "×",
        "≤ 1.2",
        exec_n / exec_1 <= 1.2,
    );
    // The sessions go with the daemon.
    Ok(())
}

/// `head -c N /dev/zero` under the 4 MiB cap (all read and counted) against
/// the same piped into `cat` directly; the daemon's RSS is sampled throughout.
async fn output_drain(
    report: &mut Report,
    d: &BenchDaemon,
    scale: Scale,
) -> Result<(), BenchError> {
    let workload = "output drain";
    let c = d.client().await?;
    let bytes = scale.drain_bytes;
    let t = Instant::now();
    tokio::process::Command::new("/bin/sh")
        .args([
            "-c",
            &format!("head -c {bytes} /dev/zero | cat > /dev/null"),
        ])
        .status()
        .await
        .map_err(|e| BenchError::io("run", "/bin/sh", e))?;
    let cat = t.elapsed();
    let s = c.create_session(CreateParams::default()).await?;
    let sampler = RssSampler::start(d.pid());
    let t = Instant::now();
    let r = c
        .exec(ExecParams {
            session_id: s.clone(),
            command: format!("head -c {bytes} /dev/zero"),
            timeout_s: Some(600.0),
            keep_output: Some(KeepOutput::Head),
            ..Default::default()
        })
        .await?;
    let drain = t.elapsed();
    let peak_rss = sampler.stop().await;
    c.destroy_session(&s).await?;
    if r.stdout_total_bytes != bytes {
        return Err(BenchError::Workload {
            workload,
            message: format!("{} of {bytes} bytes counted", r.stdout_total_bytes),
        });
    }
    let ratio = drain.as_secs_f64() / cat.as_secs_f64();
    report.goal(
        workload,
        &format!("{} MiB under a 4 MiB cap / cat", bytes >> 20),
        ratio,
        "×",
        "≤ 1.5",
        ratio <= 1.5,
    );
    report.goal(
        workload,
        "daemon peak RSS",
        peak_rss as f64 / 1048576.0,
        "MiB",
        "< 64 MiB",
        peak_rss < 64 << 20,
    );
    Ok(())
}

/// `n` round trips of `exec.run command` in `session`, after up to 10 warm-up runs.
async fn time_execs(
    c: &Client,
    session: &str,
    command: &str,
    n: usize,
) -> Result<Vec<Duration>, BenchError> {
    for _ in 0..10.min(n) {
        c.run(session, command).await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.run(session, command).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// `n` sequential `system.ping` round trips.
async fn time_pings(c: &Client, n: usize) -> Result<Vec<Duration>, BenchError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.ping().await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// `k` sessions, one connection each, running `true` back to back for `secs`: (commands/s, mean latency µs).
async fn throughput(d: &BenchDaemon, k: usize, secs: f64) -> Result<(f64, f64), BenchError> {
    let mut tasks = Vec::new();
    // Every task starts at the same instant, after all have connected.
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    for _ in 0..k {
        let c = d.client().await?;
        let s = c.create_session(CreateParams::default()).await?;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let (mut n, mut total) = (0u64, Duration::ZERO);
            while tokio::time::Instant::now() < end {
                let t = Instant::now();
                if c.run(&s, "true").await.is_err() {
                    break;
                }
                total += t.elapsed();
                n += 1;
            }
            let _ = c.destroy_session(&s).await;
            (n, total)
        }));
    }
    let (mut n, mut total) = (0u64, Duration::ZERO);
    for t in tasks {
        let (a, b) = t.await.expect("a throughput task panicked");
        n += a;
        total += b;
    }
    Ok((n as f64 / secs, total.as_secs_f64() * 1e6 / n.max(1) as f64))
}

/// Starts `n` commands that each write 4 MiB and then sleep 3 s, and returns
/// once every one of them is in its `sleep`: its output is then in the daemon.
async fn hold_output(
    d: &BenchDaemon,
    n: usize,
) -> Result<Vec<tokio::task::JoinHandle<()>>, BenchError> {
    let c = Arc::new(d.client().await?);
    let mut out = Vec::new();
    for _ in 0..n {
        let s = c.create_session(CreateParams::default()).await?;
        let c = c.clone();
        out.push(tokio::spawn(async move {
            let _ = c.run(&s, "head -c 4194304 /dev/zero; sleep 3").await;
            let _ = c.destroy_session(&s).await;
        }));
    }
    // `head` has exited once its shell runs `sleep`, so the daemon has read all
    // but at most a pipe buffer of its output.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while d.commands_named("sleep") < n {
        if tokio::time::Instant::now() > deadline {
            return Err(BenchError::Workload {
                workload: "spawn cost vs daemon memory",
                message: format!("{n} output holders not all in `sleep` after 10 s"),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(out)
}

/// `total` pings pipelined over `conns` connections: requests per second.
async fn pipelined_pings(d: &BenchDaemon, conns: usize, total: usize) -> Result<f64, BenchError> {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(d.client().await?);
    }
    let per = total / conns;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            let calls = (0..per).map(|_| c.ping());
            futures::future::join_all(calls)
                .await
                .into_iter()
                .filter(|r| r.is_ok())
                .count()
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await.expect("a ping task panicked");
    }
    Ok(ok as f64 / t.elapsed().as_secs_f64())
}

/// Samples a process's RSS every 10 ms until stopped; returns the peak.
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            loop {
                peak = peak.max(rss_of(pid));
                tokio::select! {
                    _ = &mut stopped => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        });
        RssSampler { stop, task }
    }

    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted_us(samples: Vec<Duration>) -> Vec<f64> {
    let mut v: Vec<f64> = samples.into_iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}
