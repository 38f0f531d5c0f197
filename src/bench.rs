//! `sessiond bench`: a load generator that measures the daemon against the physical floor in one run (table, JSON, SVG plots).
//!
//! Every figure is a ratio against a floor measured in the same run, because
//! absolute times drift on shared machines while ratios hold. The bench starts
//! its own daemons (cgroups off and on) on sockets in a temp dir, from the
//! same binary, and talks to them through [`crate::client::Client`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Client;
use crate::protocol::{CreateParams, ExecParams, KeepOutput};

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
    /// The full run (a few minutes).
    pub const FULL: Scale = Scale {
        exec_runs: 500,
        pings: 5000,
        creates: 300,
        concurrency_secs: 3.0,
        idle_sessions: [1000, 10_000],
        drain_bytes: 1 << 30,
    };
    /// A smoke run (seconds), for the test suite: every workload, tiny counts.
    pub const QUICK: Scale = Scale {
        exec_runs: 10,
        pings: 50,
        creates: 5,
        concurrency_secs: 0.3,
        idle_sessions: [10, 20],
        drain_bytes: 8 << 20,
    };
}

/// One measured figure, its goal, and whether it met it.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub workload: String,
    pub figure: String,
    pub value: f64,
    pub unit: String,
    pub goal: String,
    pub met: Option<bool>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub machine: String,
    pub figures: Vec<Figure>,
    /// (concurrency, commands/s, mean latency µs) with cgroups off.
    pub concurrency: Vec<(usize, f64, f64)>,
    /// (idle sessions, daemon RSS bytes).
    pub rss_by_sessions: Vec<(usize, u64)>,
}

impl Report {
    fn add(
        &mut self,
        workload: &str,
        figure: &str,
        value: f64,
        unit: &str,
        goal: &str,
        met: Option<bool>,
    ) {
        self.figures.push(Figure {
            workload: workload.into(),
            figure: figure.into(),
            value,
            unit: unit.into(),
            goal: goal.into(),
            met,
        });
    }

    /// The table printed at the end of a run (markdown).
    pub fn table(&self) -> String {
        let mut out =
            String::from("| workload | figure | value | goal | met |\n|---|---|---|---|---|\n");
        for f in &self.figures {
            let met = match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            out.push_str(&format!(
                "| {} | {} | {:.2} {} | {} | {} |\n",
                f.workload, f.figure, f.value, f.unit, f.goal, met
            ));
        }
        out
    }
}

/// A daemon started by the bench, stopped (SIGTERM) on drop.
struct BenchDaemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile_lite::TempDir,
}

/// A minimal temp dir (the bench ships in the binary; `tempfile` is a dev-dependency).
mod tempfile_lite {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let dir = std::env::temp_dir()
                .join(format!("sessiond-bench-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir(&dir)?;
            Ok(TempDir(dir))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl BenchDaemon {
    fn start(cgroups: bool, extra: &str) -> std::io::Result<BenchDaemon> {
        let dir = tempfile_lite::TempDir::new()?;
        let socket = dir.path().join("bench.sock");
        let mode = if cgroups { "auto" } else { "off" };
        let config = format!(
            "[server]\nsocket = \"{}\"\nmax_connections = 1024\n\
             [sessions]\nmax_sessions = 20000\nmax_sessions_per_client = 20000\ndefault_cwd = \"{}\"\n\
             [commands]\nmax_concurrent = 64\nmax_per_session = 1\n\
             [rate_limit]\nrequests_per_second = 0\n\
             [cgroups]\nmode = \"{mode}\"\nparent = \"sessiond-bench-{}\"\n{extra}",
            socket.display(),
            dir.path().display(),
            std::process::id(),
        );
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the bench daemon did not start"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(BenchDaemon {
            child,
            socket,
            _dir: dir,
        })
    }

    fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/statm", self.child.id()))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            * 4096
    }

    async fn client(&self) -> Result<Client, String> {
        Client::connect(&self.socket)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
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

/// Runs every workload at `scale`; writes `bench.json` and SVG plots into `out`.
pub async fn run(scale: Scale, out: &Path) -> Result<Report, String> {
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let mut report = Report {
        machine: machine_description(),
        ..Default::default()
    };

    // Floor: spawn + wait of the same shell command, straight from tokio.
    let mut floor = Vec::new();
    for i in 0..scale.exec_runs + 20 {
        let t = Instant::now();
        tokio::process::Command::new("/bin/bash")
            .args(["-c", "true"])
            .status()
            .await
            .map_err(|e| e.to_string())?;
        if i >= 20 {
            floor.push(t.elapsed());
        }
    }
    let floor = sorted_us(floor);
    let floor_p50 = percentile(&floor, 0.5);
    report.add("floor", "bash -c true p50", floor_p50, "µs", "—", None);

    for cgroups in [false, true] {
        let daemon = BenchDaemon::start(cgroups, "").map_err(|e| e.to_string())?;
        let c = daemon.client().await?;
        let mode = c.stats().await.map_err(|e| e.to_string())?.runtime.cgroups;
        let label = format!("cgroups {mode}");
        // exec.run of `true`, sequential.
        let s = c
            .create_session(CreateParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let lat = sorted_us(time_execs(&c, &s, "true", scale.exec_runs).await?);
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        let goal_ratio = if mode == "off" { 1.25 } else { 1.5 };
        report.add(
            &format!("exec.run true, sequential ({label})"),
            "p50",
            p50,
            "µs",
            "",
            None,
        );
        report.add(
            &format!("exec.run true, sequential ({label})"),
            "p99",
            p99,
            "µs",
            "",
            None,
        );
        report.add(
            &format!("exec.run true, sequential ({label})"),
            "p50 / floor p50",
            p50 / floor_p50,
            "×",
            &format!("≤ {goal_ratio}"),
            Some(p50 / floor_p50 <= goal_ratio),
        );
        // session.create + destroy.
        let mut cd = Vec::new();
        for _ in 0..scale.creates {
            let t = Instant::now();
            let id = c
                .create_session(CreateParams::default())
                .await
                .map_err(|e| e.to_string())?;
            c.destroy_session(&id).await.map_err(|e| e.to_string())?;
            cd.push(t.elapsed());
        }
        let cd = sorted_us(cd);
        let goal = if mode == "off" { 200.0 } else { 1000.0 };
        report.add(
            &format!("session.create + destroy ({label})"),
            "p50",
            percentile(&cd, 0.5),
            "µs",
            &format!("≤ {goal} µs"),
            Some(percentile(&cd, 0.5) <= goal),
        );
        report.add(
            &format!("session.create + destroy ({label})"),
            "p99",
            percentile(&cd, 0.99),
            "µs",
            "",
            None,
        );
        c.destroy_session(&s).await.map_err(|e| e.to_string())?;
        if cgroups {
            break;
        }

        // Concurrency 1/2/4/8/16 sessions (cgroups off).
        let mut peak = 0.0f64;
        for k in [1usize, 2, 4, 8, 16] {
            let (rate, mean) = throughput(&daemon, k, scale.concurrency_secs).await?;
            peak = peak.max(rate);
            report.concurrency.push((k, rate, mean));
            report.add(
                "exec.run true, concurrent",
                &format!("{k} sessions"),
                rate,
                "cmds/s",
                "scales until cores are busy",
                None,
            );
        }
        let last = report.concurrency.last().map_or(0.0, |c| c.1);
        report.add(
            "exec.run true, concurrent",
            "16 sessions / peak",
            last / peak,
            "×",
            "no collapse (≥ 0.8)",
            Some(last / peak >= 0.8),
        );

        // Spawn cost vs daemon memory: 16 commands holding 4 MiB of output each.
        let idle = percentile(&lat, 0.5);
        let holders = hold_output(&daemon, 16).await?;
        let s2 = c
            .create_session(CreateParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let loaded = sorted_us(time_execs(&c, &s2, "true", scale.exec_runs.min(200)).await?);
        let rss_loaded = daemon.rss();
        let ratio = percentile(&loaded, 0.5) / idle;
        report.add(
            "spawn cost vs daemon memory",
            "p50 loaded / idle",
            ratio,
            "×",
            "within 10% (≤ 1.10)",
            Some(ratio <= 1.10),
        );
        report.add(
            "spawn cost vs daemon memory",
            "daemon RSS while loaded",
            rss_loaded as f64 / 1048576.0,
            "MiB",
            "—",
            None,
        );
        for h in holders {
            let _ = h.await;
        }

        // system.ping: sequential, then pipelined on 1 and 8 connections.
        let mut pings = Vec::new();
        for _ in 0..scale.pings {
            let t = Instant::now();
            c.ping().await.map_err(|e| e.to_string())?;
            pings.push(t.elapsed());
        }
        let pings = sorted_us(pings);
        report.add(
            "system.ping sequential",
            "p50",
            percentile(&pings, 0.5),
            "µs",
            "—",
            None,
        );
        report.add(
            "system.ping sequential",
            "p99",
            percentile(&pings, 0.99),
            "µs",
            "≤ 100 µs",
            Some(percentile(&pings, 0.99) <= 100.0),
        );
        for conns in [1usize, 8] {
            let rate = pipelined_pings(&daemon, conns, scale.pings * 4).await?;
            report.add(
                "system.ping pipelined",
                &format!("{conns} connection(s)"),
                rate,
                "req/s",
                "≥ 50 000 req/s",
                Some(rate >= 50_000.0),
            );
        }

        // Idle sessions: RSS per session, and flat scaling of ping / exec.
        let ping_1 = percentile(&pings, 0.5);
        let exec_1 = idle;
        let base_rss = daemon.rss();
        report.rss_by_sessions.push((0, base_rss));
        let mut created = 0usize;
        let mut ids = Vec::new();
        for target in scale.idle_sessions {
            while created < target {
                ids.push(
                    c.create_session(CreateParams::default())
                        .await
                        .map_err(|e| e.to_string())?,
                );
                created += 1;
            }
            // Let the allocator settle before reading RSS.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let rss = daemon.rss();
            report.rss_by_sessions.push((target, rss));
            let per = (rss.saturating_sub(base_rss)) as f64 / target as f64 / 1024.0;
            report.add(
                "idle sessions",
                &format!("RSS per session at {target}"),
                per,
                "KiB",
                "≤ 16 KiB",
                Some(per <= 16.0),
            );
        }
        let mut pings_n = Vec::new();
        for _ in 0..scale.pings {
            let t = Instant::now();
            c.ping().await.map_err(|e| e.to_string())?;
            pings_n.push(t.elapsed());
        }
        let ping_n = percentile(&sorted_us(pings_n), 0.5);
        let exec_n = percentile(
            &sorted_us(time_execs(&c, &ids[0], "true", scale.exec_runs.min(200)).await?),
            0.5,
        );
        let n = scale.idle_sessions[1];
        report.add(
            "flat scaling",
            &format!("ping p50 with {n} sessions / with 1"),
            ping_n / ping_1,
            "×",
            "≤ 1.2",
            Some(ping_n / ping_1 <= 1.2),
        );
        report.add(
            "flat scaling",
            &format!("exec.run p50 with {n} sessions / with 1"),
            exec_n / exec_1,
            "×",
            "≤ 1.2",
            Some(exec_n / exec_1 <= 1.2),
        );
        drop(ids);

        // Output drain: N bytes under a 4 MiB cap vs cat of the same bytes, on a
        // fresh daemon (the one above holds 10 000 sessions and the allocator's
        // high-water mark of the earlier workloads).
        drop(c);
        drop(daemon);
        let daemon = BenchDaemon::start(false, "").map_err(|e| e.to_string())?;
        let c = daemon.client().await?;
        let bytes = scale.drain_bytes;
        let t = Instant::now();
        tokio::process::Command::new("/bin/sh")
            .args([
                "-c",
                &format!("head -c {bytes} /dev/zero | cat > /dev/null"),
            ])
            .status()
            .await
            .map_err(|e| e.to_string())?;
        let cat = t.elapsed();
        let s3 = c
            .create_session(CreateParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let sampler = sample_rss(daemon.child.id());
        let t = Instant::now();
        let r = c
            .exec(ExecParams {
                session_id: s3,
                command: format!("head -c {bytes} /dev/zero"),
                timeout_s: Some(600.0),
                keep_output: Some(KeepOutput::Head),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let drain = t.elapsed();
        let peak_rss = sampler.stop().await;
        if r.stdout_total_bytes != bytes {
            return Err(format!(
                "drain: {} of {bytes} bytes counted",
                r.stdout_total_bytes
            ));
        }
        let ratio = drain.as_secs_f64() / cat.as_secs_f64();
        report.add(
            "output drain",
            &format!("{} MiB under a 4 MiB cap / cat", bytes >> 20),
            ratio,
            "×",
            "≤ 1.5",
            Some(ratio <= 1.5),
        );
        report.add(
            "output drain",
            "daemon peak RSS",
            peak_rss as f64 / 1048576.0,
            "MiB",
            "< 64 MiB",
            Some(peak_rss < 64 << 20),
        );
    }

    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(out.join("concurrency.svg"), concurrency_svg(&report))
        .map_err(|e| e.to_string())?;
    std::fs::write(out.join("rss.svg"), rss_svg(&report)).map_err(|e| e.to_string())?;
    Ok(report)
}

async fn time_execs(
    c: &Client,
    session: &str,
    command: &str,
    n: usize,
) -> Result<Vec<Duration>, String> {
    for _ in 0..10.min(n) {
        c.run(session, command).await.map_err(|e| e.to_string())?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.run(session, command).await.map_err(|e| e.to_string())?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// `k` sessions, one connection each, running `true` back to back for `secs`: (commands/s, mean latency µs).
async fn throughput(daemon: &BenchDaemon, k: usize, secs: f64) -> Result<(f64, f64), String> {
    let mut tasks = Vec::new();
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    for _ in 0..k {
        let c = daemon.client().await?;
        let s = c
            .create_session(CreateParams::default())
            .await
            .map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let (mut n, mut total) = (0u64, Duration::ZERO);
            while Instant::now() < end {
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
        let (a, b) = t.await.map_err(|e| e.to_string())?;
        n += a;
        total += b;
    }
    Ok((n as f64 / secs, total.as_secs_f64() * 1e6 / n.max(1) as f64))
}

/// Starts `n` commands that each write 4 MiB and then sleep, so the daemon holds their output.
async fn hold_output(
    daemon: &BenchDaemon,
    n: usize,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let c = Arc::new(daemon.client().await?);
    let mut out = Vec::new();
    for _ in 0..n {
        let s = c
            .create_session(CreateParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let c = c.clone();
        out.push(tokio::spawn(async move {
            let _ = c.run(&s, "head -c 4194304 /dev/zero; sleep 3").await;
            let _ = c.destroy_session(&s).await;
        }));
    }
    // Wait until they run and have written their output.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(out)
}

/// `total` pings pipelined over `conns` connections: requests per second.
async fn pipelined_pings(daemon: &BenchDaemon, conns: usize, total: usize) -> Result<f64, String> {
    let mut clients = Vec::new();
    for _ in 0..conns {
        clients.push(Arc::new(daemon.client().await?));
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
        ok += task.await.map_err(|e| e.to_string())?;
    }
    Ok(ok as f64 / t.elapsed().as_secs_f64())
}

/// Samples a process's RSS every 10 ms until stopped; returns the peak.
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

fn sample_rss(pid: u32) -> RssSampler {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap_or(0)
                * 4096;
            peak = peak.max(rss);
            tokio::select! {
                _ = &mut stopped => return peak,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    });
    RssSampler { stop, task }
}

impl RssSampler {
    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{cpus} CPUs, Linux {}, {}",
        kernel.trim(),
        mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    )
}

/// A line chart as SVG: `series` of (x, y) points with a name each.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let x_max = xs.fold(1e-9, f64::max);
    let y_max = ys.fold(1e-9, f64::max) * 1.1;
    let px = |x: f64| m + x / x_max * (w - 2.0 * m);
    let py = |y: f64| h - m - y / y_max * (h - 2.0 * m);
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{y_label}</text>\n",
        w / 2.0,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n",
            m - 6.0,
            py(y) + 4.0,
            y
        ));
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for (x, y) in points {
            svg.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>\n",
                px(*x),
                py(*y),
                px(*x),
                h - m + 16.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
            w - m - 150.0,
            m + 16.0 * i as f64
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn concurrency_svg(r: &Report) -> String {
    let rate: Vec<(f64, f64)> = r.concurrency.iter().map(|c| (c.0 as f64, c.1)).collect();
    let lat: Vec<(f64, f64)> = r.concurrency.iter().map(|c| (c.0 as f64, c.2)).collect();
    let mut svg = line_chart(
        "exec.run `true`: throughput vs concurrent sessions",
        "sessions",
        "commands per second",
        &[("cmds/s", rate)],
    );
    svg.push_str(&line_chart(
        "exec.run `true`: mean latency vs concurrent sessions",
        "sessions",
        "mean latency (µs)",
        &[("latency µs", lat)],
    ));
    // Two charts stacked in one file: wrap them.
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"800\">\n<g>{}</g>\n<g transform=\"translate(0 400)\">{}</g>\n</svg>\n",
        strip_outer(&svg, 0),
        strip_outer(&svg, 1)
    )
}

fn strip_outer(svg: &str, index: usize) -> String {
    svg.split("</svg>")
        .nth(index)
        .map(|s| s.replacen("<svg", "<svg x=\"0\" y=\"0\"", 1) + "</svg>")
        .unwrap_or_default()
}

fn rss_svg(r: &Report) -> String {
    let points: Vec<(f64, f64)> = r
        .rss_by_sessions
        .iter()
        .map(|(n, rss)| (*n as f64, *rss as f64 / 1048576.0))
        .collect();
    line_chart(
        "daemon RSS vs idle sessions",
        "idle sessions",
        "RSS (MiB)",
        &[("RSS MiB", points)],
    )
}
