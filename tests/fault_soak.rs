//! The chaos soak: N concurrent clients run a seeded random mix of every fault
//! scenario plus normal work against one daemon, while a checker verifies the
//! invariants continuously.
//!
//! `SESSIOND_SOAK_SECS` (default 60), `SESSIOND_SOAK_CLIENTS` (default 6) and
//! `SESSIOND_SOAK_SEED` (default: from the clock) shape a run; the seed is
//! printed first, so a failure's sequence of operations can be replayed (each
//! client draws its operations from its own RNG, seeded from the run's seed;
//! the interleaving of clients is the scheduler's).
//!
//! Scenarios that touch the whole daemon (a registry or supervisor failure, a
//! failed spawn, SIGKILL or SIGTERM and a restart, and the full stats audit)
//! and those that wait on daemon-wide counters (a streaming non-reader, one
//! uid at its connection share) run alone: they take the world's write lock; everything else takes it to
//! read. A new failure mode is a function in `support/scenarios.rs` and an
//! entry in `OPS`.

mod support;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sessiond::client::Client;
use sessiond::fault::FaultAction;
use sessiond::protocol::StatsResult;
use support::scenarios::{self as sc};
use support::{Invariants, TestDaemon};
use tokio::sync::RwLock;

/// The daemon's config for the soak: room for every client's sessions,
/// commands and connection bursts at once, a small unsent budget so a
/// non-reader is cut quickly, a short partial-frame deadline. Every client
/// is the same uid (root), whose share of the connections is all they need;
/// uid 65534 may connect too, into the room left beyond that share.
fn config(clients: usize) -> String {
    format!(
        r#"
[server]
max_unsent_bytes = "1 MiB"
request_read_timeout = "{read_timeout_ms}ms"
shutdown_grace = "2s"
socket_mode = 0o666
allowed_uids = [0, 65534]
max_connections = {connections}
max_connections_per_client = {share}
[sessions]
max_sessions = 256
max_sessions_per_client = 256
[commands]
max_concurrent = 128
max_output_bytes = "1 MiB"
kill_grace = "{grace_s}s"
[rlimits]
nofile = 2048
[cgroups]
cpu_max_cores = 0.5
"#,
        connections = share(clients) + 16,
        share = share(clients),
        read_timeout_ms = READ_TIMEOUT.as_millis(),
        grace_s = KILL_GRACE.as_secs(),
    )
}

/// Root's share of the connections: each client's own, a burst, and the raw
/// ones of `unread_error_answers` and a few others.
fn share(clients: usize) -> usize {
    64 + clients * (BURST as usize + UNREAD_CONNS + 4)
}
/// The daemon's `request_read_timeout`: a stalled partial frame's deadline.
const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections one `connection_burst` opens at once.
const BURST: u64 = 20;
const OUTPUT_CAP: usize = 1 << 20;
const UNSENT_BUDGET: u64 = 1 << 20;
/// What a streaming non-reader's command writes (past the cap: truncated).
const STREAM_FLOOD: u64 = 64 << 20;
/// The daemon's `kill_grace`: long, so a kill that waited it out (instead of
/// ending once the group's live processes are gone) is told from one that
/// did not by a bound no load reaches (at 2 s, a load of 19 on 2 cores once
/// put 1.4 s between a command's death and its answer).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Connections of one `unread_error_answers`, and the env key each of their
/// seven requests carries.
const UNREAD_CONNS: usize = 8;
const UNREAD_KEY: usize = 512 << 10;
/// Commands one `flood_many` runs at once.
const FLOODS: usize = 8;
/// Results one `many_retained` makes, of this size, in a session that
/// retains 16 (the default `retain_per_session`).
const RETAINED: (usize, u64, usize) = (20, 64 << 10, 16);
/// No single operation may take longer; a hang is a failure.
const OP_DEADLINE: Duration = Duration::from_secs(90);

/// What an operation needs to run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Runs beside others (takes the world to read).
    Shared,
    /// Runs alone (takes the world to write).
    Alone,
}

/// One operation a soak client can draw.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    NormalWork,
    SessionChurn,
    CancelRunning,
    CpuSpin,
    FloodBothStreams,
    YesTail,
    ThousandFiles,
    DaemonizingChild,
    TermIgnorer,
    EarlyStdoutClose,
    MemoryHog,
    ForkBomb,
    GarbageBytes,
    HugeLengthPrefix,
    TruncatedFrames,
    StalledPartialFrame,
    DisconnectMidExec,
    ConnectionBurst,
    NeverReads,
    StreamAndRead,
    StreamNeverReads,
    StartWriteCancel,
    Reattach,
    CommandPanic,
    CommandPanicWithReaders,
    CommandError,
    SessionPanic,
    SessionError,
    SessionStall,
    UnreadErrorAnswers,
    HugeParams,
    FloodMany,
    BackgroundWriters,
    TimeoutOnTime,
    PipelinedRunCancel,
    RefusedWriterReadsError,
    ManyRetained,
    ConnectionShare,
    RegistryPanic,
    RegistryError,
    SpawnFailure,
    SupervisorPanic,
    SigkillRestart,
    SigtermRestart,
    Audit,
}

impl Op {
    /// Its name in the report.
    fn name(self) -> &'static str {
        match self {
            Op::NormalWork => "normal_work",
            Op::SessionChurn => "session_churn",
            Op::CancelRunning => "cancel_running",
            Op::CpuSpin => "cpu_spin",
            Op::FloodBothStreams => "flood_both_streams",
            Op::YesTail => "yes_tail",
            Op::ThousandFiles => "thousand_files",
            Op::DaemonizingChild => "daemonizing_child",
            Op::TermIgnorer => "term_ignorer",
            Op::EarlyStdoutClose => "early_stdout_close",
            Op::MemoryHog => "memory_hog",
            Op::ForkBomb => "fork_bomb",
            Op::GarbageBytes => "garbage_bytes",
            Op::HugeLengthPrefix => "huge_length_prefix",
            Op::TruncatedFrames => "truncated_frames",
            Op::StalledPartialFrame => "stalled_partial_frame",
            Op::DisconnectMidExec => "disconnect_mid_exec",
            Op::ConnectionBurst => "connection_burst",
            Op::NeverReads => "never_reads",
            Op::StreamAndRead => "stream_and_read",
            Op::StreamNeverReads => "stream_never_reads",
            Op::StartWriteCancel => "start_write_cancel",
            Op::Reattach => "reattach",
            Op::CommandPanic => "command_panic",
            Op::CommandPanicWithReaders => "command_panic_readers",
            Op::CommandError => "command_error",
            Op::SessionPanic => "session_panic",
            Op::SessionError => "session_error",
            Op::SessionStall => "session_stall",
            Op::UnreadErrorAnswers => "unread_error_answers",
            Op::HugeParams => "huge_params",
            Op::FloodMany => "flood_many",
            Op::BackgroundWriters => "background_writers",
            Op::TimeoutOnTime => "timeout_on_time",
            Op::PipelinedRunCancel => "pipelined_run_cancel",
            Op::RefusedWriterReadsError => "refused_writer_reads",
            Op::ManyRetained => "many_retained",
            Op::ConnectionShare => "connection_share",
            Op::RegistryPanic => "registry_panic",
            Op::RegistryError => "registry_error",
            Op::SpawnFailure => "spawn_failure",
            Op::SupervisorPanic => "supervisor_panic",
            Op::SigkillRestart => "sigkill_restart",
            Op::SigtermRestart => "sigterm_restart",
            Op::Audit => "audit",
        }
    }

    /// Whether it injects a fault (everything but normal work and the audit).
    fn is_fault(self) -> bool {
        !matches!(
            self,
            Op::NormalWork
                | Op::SessionChurn
                | Op::CancelRunning
                | Op::StreamAndRead
                | Op::StartWriteCancel
                | Op::Audit
        )
    }
}

/// What an operation needs of the host.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    Nothing,
    Cgroups,
    /// Root: it connects as another uid.
    Root,
}

/// Every operation of the soak: kind, weight (per mille, roughly), what it needs.
/// The operations that end an epoch (supervisor, SIGKILL, SIGTERM) are rare,
/// so most of the run is concurrent work.
const OPS: &[(Op, Kind, u32, Needs)] = &[
    (Op::NormalWork, Kind::Shared, 400, Needs::Nothing),
    (Op::SessionChurn, Kind::Shared, 80, Needs::Nothing),
    (Op::CancelRunning, Kind::Shared, 40, Needs::Nothing),
    (Op::CpuSpin, Kind::Shared, 30, Needs::Nothing),
    (Op::FloodBothStreams, Kind::Shared, 20, Needs::Nothing),
    (Op::YesTail, Kind::Shared, 30, Needs::Nothing),
    (Op::ThousandFiles, Kind::Shared, 20, Needs::Nothing),
    (Op::DaemonizingChild, Kind::Shared, 30, Needs::Nothing),
    (Op::TermIgnorer, Kind::Shared, 30, Needs::Nothing),
    (Op::EarlyStdoutClose, Kind::Shared, 30, Needs::Nothing),
    (Op::MemoryHog, Kind::Shared, 20, Needs::Cgroups),
    (Op::ForkBomb, Kind::Shared, 20, Needs::Cgroups),
    (Op::GarbageBytes, Kind::Shared, 30, Needs::Nothing),
    (Op::HugeLengthPrefix, Kind::Shared, 30, Needs::Nothing),
    (Op::TruncatedFrames, Kind::Shared, 30, Needs::Nothing),
    (Op::StalledPartialFrame, Kind::Shared, 20, Needs::Nothing),
    (Op::DisconnectMidExec, Kind::Shared, 30, Needs::Nothing),
    (Op::ConnectionBurst, Kind::Shared, 20, Needs::Nothing),
    (Op::NeverReads, Kind::Shared, 10, Needs::Nothing),
    (Op::StreamAndRead, Kind::Shared, 40, Needs::Nothing),
    // Alone: it waits for the daemon's decision through counters (answered
    // exec.runs, dropped readers) that other operations would move too.
    (Op::StreamNeverReads, Kind::Alone, 10, Needs::Nothing),
    (Op::StartWriteCancel, Kind::Shared, 40, Needs::Nothing),
    (Op::Reattach, Kind::Shared, 30, Needs::Nothing),
    (Op::CommandPanic, Kind::Shared, 20, Needs::Nothing),
    (
        Op::CommandPanicWithReaders,
        Kind::Shared,
        10,
        Needs::Nothing,
    ),
    (Op::CommandError, Kind::Shared, 20, Needs::Nothing),
    (Op::SessionPanic, Kind::Shared, 20, Needs::Nothing),
    (Op::SessionError, Kind::Shared, 10, Needs::Nothing),
    (Op::SessionStall, Kind::Shared, 20, Needs::Nothing),
    (Op::UnreadErrorAnswers, Kind::Shared, 15, Needs::Nothing),
    (Op::HugeParams, Kind::Shared, 20, Needs::Nothing),
    (Op::FloodMany, Kind::Shared, 10, Needs::Nothing),
    (Op::BackgroundWriters, Kind::Shared, 20, Needs::Nothing),
    (Op::TimeoutOnTime, Kind::Shared, 20, Needs::Nothing),
    (Op::PipelinedRunCancel, Kind::Shared, 20, Needs::Nothing),
    (
        Op::RefusedWriterReadsError,
        Kind::Shared,
        20,
        Needs::Nothing,
    ),
    (Op::ManyRetained, Kind::Shared, 10, Needs::Nothing),
    (Op::RegistryPanic, Kind::Alone, 5, Needs::Nothing),
    (Op::RegistryError, Kind::Alone, 5, Needs::Nothing),
    (Op::SpawnFailure, Kind::Alone, 5, Needs::Nothing),
    (Op::SupervisorPanic, Kind::Alone, 2, Needs::Nothing),
    (Op::SigkillRestart, Kind::Alone, 2, Needs::Nothing),
    (Op::SigtermRestart, Kind::Alone, 2, Needs::Nothing),
    (Op::ConnectionShare, Kind::Alone, 3, Needs::Root),
    (Op::Audit, Kind::Alone, 10, Needs::Nothing),
];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

/// Counters the daemon must agree with, counted by the clients since the epoch began.
#[derive(Default)]
struct Expected {
    actor_failures: AtomicU64,
    timed_out: AtomicU64,
    output_truncated: AtomicU64,
    stalled: AtomicU64,
    spawn_failed: AtomicU64,
    oom_killed: AtomicU64,
    slow_readers: AtomicU64,
    bad_frames_at_least: AtomicU64,
}

/// The daemon under test and what is known about it. One epoch is one
/// daemon process with one actor tree; a supervisor failure or a restart
/// starts the next, and every client reconnects and recreates its session.
struct World {
    d: TestDaemon,
    epoch: u64,
    checker: Client,
    inv: Invariants,
    /// Stats when the epoch began; `expected` counts from there.
    base: StatsResult,
    expected: Expected,
    /// Each client's long-lived session in this epoch.
    homes: Mutex<HashSet<String>>,
    /// Clients' connections open to this daemon process (each holds one of its
    /// fds). A supervisor failure keeps them; a restart ends them.
    connections: AtomicU64,
    /// Which daemon process this is (one more after each restart).
    process: u64,
    /// Requests served by daemons of earlier epochs.
    requests_before: u64,
}

impl World {
    /// After a supervisor failure (`restarted` false: same process, the
    /// clients' connections stay open) or a restart (a new process).
    async fn begin_epoch(&mut self, restarted: bool) {
        self.epoch += 1;
        if restarted {
            self.process += 1;
            self.connections.store(0, Ordering::SeqCst);
        }
        self.checker = self.d.client().await;
        self.inv = Invariants::baseline(&self.d, &self.checker).await;
        // The clients' connections are open at this baseline; the audit counts them apart.
        self.inv
            .discount_connections(self.connections.load(Ordering::SeqCst) as usize);
        self.base = self.checker.stats().await.unwrap();
        self.expected = Expected::default();
        self.homes.lock().unwrap().clear();
    }

    fn live_sessions(&self) -> u64 {
        self.homes.lock().unwrap().len() as u64 + 1
    }

    /// Everything the daemon says agrees with what the clients did, and nothing leaked.
    async fn audit(&self) {
        let now = self.checker.stats().await.unwrap();
        let delta = |f: fn(&StatsResult) -> u64| f(&now) - f(&self.base);
        let e = &self.expected;
        let want = |a: &AtomicU64| a.load(Ordering::SeqCst);
        type Counter = fn(&StatsResult) -> u64;
        let exact: [(&str, Counter, &AtomicU64); 7] = [
            (
                "actor_failures_total",
                |s| s.runtime.actor_failures_total,
                &e.actor_failures,
            ),
            (
                "timed_out_total",
                |s| s.commands.timed_out_total,
                &e.timed_out,
            ),
            (
                "output_truncated_total",
                |s| s.commands.output_truncated_total,
                &e.output_truncated,
            ),
            ("stalled_total", |s| s.clients.stalled_total, &e.stalled),
            (
                "spawn_failed_total",
                |s| s.commands.spawn_failed_total,
                &e.spawn_failed,
            ),
            (
                "oom_killed_total",
                |s| s.commands.oom_killed_total,
                &e.oom_killed,
            ),
            (
                "slow_readers_dropped_total",
                |s| s.clients.slow_readers_dropped_total,
                &e.slow_readers,
            ),
        ];
        for (name, counter, expected) in exact {
            assert_eq!(
                delta(counter),
                want(expected),
                "{name}: the daemon's count against the clients'"
            );
        }
        assert!(
            delta(|s| s.clients.bad_frames_total) >= want(&e.bad_frames_at_least),
            "bad_frames_total"
        );
        self.inv
            .check_quiescent(
                &self.d,
                &self.checker,
                self.live_sessions(),
                self.connections.load(Ordering::SeqCst) as usize,
            )
            .await;
    }

    async fn requests_so_far(&self) -> u64 {
        self.requests_before + self.checker.stats().await.unwrap().clients.requests_total
    }
}

/// What the soak did, for the report.
#[derive(Default)]
struct Tally {
    ops: Mutex<HashMap<Op, u64>>,
    checks: AtomicU64,
    /// The last operations started, newest last (bounded: `RECENT`).
    recent: Mutex<VecDeque<String>>,
}
const RECENT: usize = 32;

impl Tally {
    fn started(&self, worker: usize, n: u64, op: &str, started: Instant) {
        let mut recent = self.recent.lock().unwrap();
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(format!(
            "{:>8.3}s  client {worker} op #{n}: {op}",
            started.elapsed().as_secs_f64()
        ));
    }

    fn done(&self, op: Op) {
        *self.ops.lock().unwrap().entry(op).or_default() += 1;
    }
}

/// One client's operation in a shared epoch.
async fn shared_op(op: Op, w: &World, c: &Arc<Client>, home: &str, n: u64, garbage_seed: u64) {
    let e = &w.expected;
    let socket = w.d.socket.clone();
    let work = w.d.work_dir();
    match op {
        Op::NormalWork => sc::normal_work(c, home, n).await,
        Op::SessionChurn => {
            let s = sc::session(c, None).await;
            sc::normal_work(c, &s, n).await;
            c.destroy_session(&s).await.unwrap();
        }
        Op::CancelRunning => sc::cancel_running(c).await,
        Op::CpuSpin => {
            sc::cpu_spin(c).await;
            e.timed_out.fetch_add(1, Ordering::SeqCst);
        }
        Op::FloodBothStreams => {
            sc::flood_both_streams(c, OUTPUT_CAP).await;
            e.output_truncated.fetch_add(1, Ordering::SeqCst);
        }
        Op::YesTail => {
            e.timed_out.fetch_add(1, Ordering::SeqCst);
            if sc::yes_tail(c, OUTPUT_CAP).await {
                e.output_truncated.fetch_add(1, Ordering::SeqCst);
            }
        }
        Op::ThousandFiles => sc::thousand_files(c).await,
        Op::DaemonizingChild => sc::daemonizing_child(c).await,
        Op::TermIgnorer => {
            sc::term_ignorer(c).await;
            e.timed_out.fetch_add(1, Ordering::SeqCst);
        }
        Op::EarlyStdoutClose => sc::early_stdout_close(c).await,
        Op::MemoryHog => {
            sc::memory_hog(c).await;
            e.oom_killed.fetch_add(1, Ordering::SeqCst);
        }
        Op::ForkBomb => {
            sc::fork_bomb(c).await;
            e.timed_out.fetch_add(1, Ordering::SeqCst);
        }
        Op::GarbageBytes => {
            let mut rng = StdRng::seed_from_u64(garbage_seed);
            let garbage: Vec<u8> = (0..rng.random_range(1..4096))
                .map(|_| rng.random())
                .collect();
            support::blocking(move || sc::garbage_bytes(&socket, &garbage)).await;
            e.bad_frames_at_least.fetch_add(1, Ordering::SeqCst);
        }
        Op::HugeLengthPrefix => {
            support::blocking(move || sc::huge_length_prefix(&socket)).await;
            e.bad_frames_at_least.fetch_add(1, Ordering::SeqCst);
        }
        Op::TruncatedFrames => support::blocking(move || sc::truncated_frames(&socket)).await,
        Op::DisconnectMidExec => sc::disconnect_mid_exec(c, &socket, &work).await,
        Op::ConnectionBurst => {
            support::blocking(move || sc::connection_burst(&socket, BURST)).await
        }
        Op::NeverReads => {
            sc::never_reads(c, &socket, UNSENT_BUDGET).await;
            e.slow_readers.fetch_add(1, Ordering::SeqCst);
        }
        Op::StreamAndRead => sc::stream_and_read(c).await,
        Op::StartWriteCancel => sc::start_write_cancel(c).await,
        Op::Reattach => sc::reattach(c, &socket).await,
        Op::CommandPanicWithReaders => {
            sc::command_panic_with_readers(c, &socket, &work).await;
            e.actor_failures.fetch_add(2, Ordering::SeqCst);
        }
        Op::CommandPanic | Op::CommandError | Op::SessionPanic | Op::SessionError => {
            let action = if matches!(op, Op::CommandPanic | Op::SessionPanic) {
                FaultAction::Panic
            } else {
                FaultAction::Error
            };
            if matches!(op, Op::CommandPanic | Op::CommandError) {
                sc::command_actor_fault(c, &work, action).await;
            } else {
                sc::session_actor_fault(c, &work, action).await;
            }
            e.actor_failures.fetch_add(1, Ordering::SeqCst);
        }
        Op::SessionStall => sc::session_stall(c).await,
        Op::UnreadErrorAnswers => {
            let daemon = (w.d.pid(), w.inv.rss_bound);
            support::blocking(move || {
                sc::unread_error_answers(&socket, daemon, UNREAD_CONNS, UNREAD_KEY)
            })
            .await
        }
        Op::HugeParams => support::blocking(move || sc::huge_and_ill_typed_params(&socket)).await,
        Op::FloodMany => {
            sc::flood_many(&socket, FLOODS, OUTPUT_CAP, (w.d.pid(), w.inv.rss_bound)).await;
            e.output_truncated
                .fetch_add(FLOODS as u64, Ordering::SeqCst);
        }
        Op::BackgroundWriters => {
            if sc::background_writers(c, &work).await {
                e.output_truncated.fetch_add(1, Ordering::SeqCst);
            }
        }
        Op::TimeoutOnTime => {
            sc::timeout_on_time(c, &work, KILL_GRACE).await;
            e.timed_out.fetch_add(1, Ordering::SeqCst);
        }
        Op::PipelinedRunCancel => {
            support::blocking(move || sc::pipelined_run_then_cancel(&socket)).await
        }
        Op::RefusedWriterReadsError => {
            support::blocking(move || sc::refused_writer_reads_error(&socket)).await;
            e.bad_frames_at_least.fetch_add(1, Ordering::SeqCst);
        }
        Op::ManyRetained => {
            let (n, bytes, retained) = RETAINED;
            sc::many_retained(c, n, bytes, retained).await
        }
        Op::StalledPartialFrame => {
            support::blocking(move || sc::stalled_partial_frame(&socket, READ_TIMEOUT)).await;
            e.stalled.fetch_add(1, Ordering::SeqCst);
        }
        other => unreachable!("{} is not a shared operation", other.name()),
    }
}

/// An operation that runs alone. Returns true when it began a new epoch.
async fn alone_op(op: Op, w: &mut World) -> bool {
    match op {
        Op::Audit => w.audit().await,
        Op::RegistryPanic | Op::RegistryError => {
            let action = if op == Op::RegistryPanic {
                FaultAction::Panic
            } else {
                FaultAction::Error
            };
            sc::registry_fault(&w.checker, action, w.live_sessions() as usize).await;
            w.expected.actor_failures.fetch_add(1, Ordering::SeqCst);
        }
        Op::StreamNeverReads => {
            let budgets = sc::StreamBudgets {
                unsent: UNSENT_BUDGET,
                output_cap: OUTPUT_CAP as u64,
            };
            let daemon = (w.d.pid(), w.inv.rss_bound);
            let (socket, work) = (w.d.socket.clone(), w.d.work_dir());
            let e = &w.expected;
            if sc::stream_never_reads(&w.checker, &socket, &work, daemon, STREAM_FLOOD, budgets)
                .await
            {
                e.slow_readers.fetch_add(1, Ordering::SeqCst);
            }
            e.output_truncated.fetch_add(1, Ordering::SeqCst);
        }
        Op::ConnectionShare => {
            let share = share(CLIENTS.load(Ordering::SeqCst) as usize) as u64;
            // How many refusals it met does not matter: the soak checks no
            // refusal counter.
            tokio::task::block_in_place(|| sc::connection_share(&w.d, share));
        }
        Op::SpawnFailure => {
            sc::spawn_failure(&w.checker).await;
            w.expected.spawn_failed.fetch_add(1, Ordering::SeqCst);
        }
        Op::SupervisorPanic => {
            w.audit().await;
            sc::supervisor_fault(&w.checker).await;
            w.begin_epoch(false).await;
            return true;
        }
        Op::SigkillRestart | Op::SigtermRestart => {
            w.audit().await;
            let live = w.live_sessions();
            w.requests_before = w.requests_so_far().await;
            let cgroups = w.base.runtime.cgroups != "off";
            tokio::task::block_in_place(|| {
                if op == Op::SigkillRestart {
                    w.d.crash_and_restart();
                } else {
                    w.d.stop_and_restart();
                }
            });
            w.begin_epoch(true).await;
            if op == Op::SigkillRestart && cgroups {
                assert_eq!(
                    w.base.runtime.cgroups_recovered_total, live,
                    "the dead daemon's session cgroups are recovered"
                );
            }
            return true;
        }
        other => unreachable!("{} is not an operation that runs alone", other.name()),
    }
    false
}

struct Run {
    world: RwLock<World>,
    tally: Tally,
    start: Instant,
    end: Instant,
    cgroups: bool,
    root: bool,
}

impl Run {
    /// Whether this host can run an operation that needs `needs`.
    fn can(&self, needs: Needs) -> bool {
        match needs {
            Needs::Nothing => true,
            Needs::Cgroups => self.cgroups,
            Needs::Root => self.root,
        }
    }
}

/// The run's number of clients (the connection share depends on it).
static CLIENTS: AtomicU64 = AtomicU64::new(0);

/// One client: draws operations from its RNG until the end.
async fn client(run: Arc<Run>, worker: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ops: Vec<_> = OPS.iter().filter(|o| run.can(o.3)).collect();
    let total: u32 = ops.iter().map(|o| o.2).sum();
    // (epoch, daemon process, connection, home session)
    let mut conn: Option<(u64, u64, Arc<Client>, String)> = None;
    let mut n = 0u64;
    while Instant::now() < run.end {
        n += 1;
        let mut pick = rng.random_range(0..total);
        let &&(op, kind, _, _) = ops
            .iter()
            .find(|o| {
                let hit = pick < o.2;
                pick = pick.saturating_sub(o.2);
                hit
            })
            .unwrap();
        let garbage_seed = rng.random();
        run.tally.started(worker, n, op.name(), run.start);
        let work = async {
            if kind == Kind::Alone {
                let mut w = run.world.write().await;
                alone_op(op, &mut w).await;
                return;
            }
            let w = run.world.read().await;
            if conn.as_ref().is_none_or(|(epoch, ..)| *epoch != w.epoch) {
                // A connection to this same process is replaced, not added.
                let replaced = conn
                    .take()
                    .is_some_and(|(_, process, ..)| process == w.process);
                let c = Arc::new(w.d.client().await);
                if !replaced {
                    w.connections.fetch_add(1, Ordering::SeqCst);
                }
                let home = sc::session(&c, None).await;
                w.homes.lock().unwrap().insert(home.clone());
                conn = Some((w.epoch, w.process, c, home));
            }
            let (_, _, c, home) = conn.as_ref().unwrap();
            shared_op(op, &w, c, home, n, garbage_seed).await;
        };
        tokio::time::timeout(OP_DEADLINE, work)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "client {worker} op #{n} {} took over {OP_DEADLINE:?}",
                    op.name()
                )
            });
        run.tally.done(op);
    }
    // Leave: the home session goes, then the connection.
    let w = run.world.read().await;
    if let Some((epoch, process, c, home)) = conn {
        if epoch == w.epoch {
            c.destroy_session(&home).await.unwrap();
            w.homes.lock().unwrap().remove(&home);
        }
        drop(c);
        if process == w.process {
            w.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The continuous invariant check: ping bound, the control session, RSS.
async fn checker(run: Arc<Run>) {
    while Instant::now() < run.end {
        {
            let w = run.world.read().await;
            support::within(
                Duration::from_secs(30),
                "the live invariant check",
                w.inv.check_live(&w.d, &w.checker),
            )
            .await;
        }
        run.tally.checks.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints what a failing run needs for its replay and diagnosis.
fn failure_report(run: &Run, seed: u64, log: &PathBuf, what: &str) {
    let recent = run.tally.recent.lock().unwrap();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    eprintln!(
        "\n=== soak failure ===\nseed: {seed}   replay: SESSIOND_SOAK_SEED={seed} cargo test --test fault_soak -- --nocapture\n\
         after: {:.1} s\nfailure: {what}\nlast operations started (newest last):\n  {}\n\
         daemon log, last {} lines:\n  {}\n=== end of report ===",
        run.start.elapsed().as_secs_f64(),
        recent.iter().cloned().collect::<Vec<_>>().join("\n  "),
        tail.len(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_keeps_every_invariant() {
    let secs = env_u64("SESSIOND_SOAK_SECS", 60);
    let clients = env_u64("SESSIOND_SOAK_CLIENTS", 6) as usize;
    let seed = env_u64(
        "SESSIOND_SOAK_SEED",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!(
        "soak seed: {seed} ({secs} s, {clients} clients; replay with SESSIOND_SOAK_SEED={seed})"
    );

    CLIENTS.store(clients as u64, Ordering::SeqCst);
    let d = TestDaemon::start(&config(clients));
    let root = nix::unistd::geteuid().is_root();
    if root {
        // So uid 65534 reaches the socket (`connection_share`).
        support::open_to_everyone(&d);
    } else {
        eprintln!("note: not root here; the connection-share operation is left out");
    }
    let log = d.stderr_path.clone();
    let checker_client = d.client().await;
    let inv = Invariants::baseline(&d, &checker_client).await;
    let base = checker_client.stats().await.unwrap();
    let cgroups = base.runtime.cgroups != "off";
    if !cgroups {
        eprintln!(
            "note: cgroups are off here; the memory-hog and fork-bomb operations are left out"
        );
    }
    let start = Instant::now();
    let run = Arc::new(Run {
        world: RwLock::new(World {
            d,
            epoch: 1,
            checker: checker_client,
            inv,
            base,
            expected: Expected::default(),
            homes: Mutex::default(),
            connections: AtomicU64::new(0),
            process: 1,
            requests_before: 0,
        }),
        tally: Tally::default(),
        start,
        end: start + Duration::from_secs(secs),
        cgroups,
        root,
    });

    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..clients {
        let worker_seed = StdRng::seed_from_u64(seed ^ worker as u64).random();
        tasks.spawn(client(run.clone(), worker, worker_seed));
    }
    tasks.spawn(checker(run.clone()));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tasks.abort_all();
            let what = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            failure_report(&run, seed, &log, &what);
            panic!("soak failed (seed {seed}): {what}");
        }
    }

    // Every client has left: the final audit, then a clean stop.
    let run = Arc::into_inner(run).expect("every task ended");
    let skipped: Vec<_> = OPS.iter().filter(|o| !run.can(o.3)).collect();
    let w = run.world.into_inner();
    support::within(Duration::from_secs(60), "the final audit", w.audit()).await;
    let requests = w.requests_so_far().await;
    let ops = run.tally.ops.into_inner().unwrap();
    let total_ops: u64 = ops.values().sum();
    let faults: u64 = ops
        .iter()
        .filter(|(op, _)| op.is_fault())
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "soak passed: seed {seed}, {:.0} s, {clients} clients, {} epochs, {requests} requests, \
         {total_ops} operations, {faults} faults injected, {} live invariant checks",
        start.elapsed().as_secs_f64(),
        w.epoch,
        run.tally.checks.load(Ordering::Relaxed)
    );
    // By name, as the report always listed them; then what this host could not run.
    let mut counts: Vec<_> = ops.iter().map(|(op, n)| (op.name(), *n)).collect();
    counts.sort();
    for (op, n) in counts {
        eprintln!("  {op:<22} {n}");
    }
    for (op, _, _, needs) in skipped {
        eprintln!("  {:<22} skipped: needs {needs:?}", op.name());
    }
    assert!(total_ops > 0 && faults > 0, "the soak did something");
    drop(w.checker);
    w.d.stop();
}
