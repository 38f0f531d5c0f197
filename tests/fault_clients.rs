//! Fault scenarios: hostile clients. Garbage, a huge length prefix, truncated
//! frames, a stalled partial frame, a hang-up mid-exec, 200 connections at
//! once, a client that never reads (its answers or its stream), a client that
//! hangs up mid-stream and re-attaches: each costs only its own connection;
//! the invariants and the counters say so.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sessiond::protocol::StatsResult;
use support::scenarios::{self as sc};
use support::{Invariants, TestDaemon};

#[tokio::test(flavor = "multi_thread")]
async fn hostile_clients_cost_only_their_own_connection() {
    let d = TestDaemon::start(
        // One uid opens the 200: its share is the whole.
        "[server]\nmax_connections_per_client = 256\nmax_unsent_bytes = \"1 MiB\"\nrequest_read_timeout = \"500ms\"\n[commands]\nmax_output_bytes = \"4 MiB\"\n",
    );
    let c = Arc::new(d.client().await);
    let inv = Invariants::baseline(&d, &c).await;
    let before = c.stats().await.unwrap();
    let socket = d.socket.clone();

    // Bytes of every value, in an order no encoder would write.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let s = socket.clone();
    support::blocking(move || sc::garbage_bytes(&s, &garbage)).await;
    inv.check_live(&d, &c).await;
    let s = socket.clone();
    support::blocking(move || sc::huge_length_prefix(&s)).await;
    let s = socket.clone();
    support::blocking(move || sc::stalled_partial_frame(&s, Duration::from_millis(500))).await;
    let s = socket.clone();
    support::blocking(move || sc::truncated_frames(&s)).await;
    inv.check_live(&d, &c).await;
    sc::disconnect_mid_exec(&c, &socket, &d.work_dir()).await;
    inv.check_live(&d, &c).await;
    let s = socket.clone();
    support::blocking(move || sc::connection_burst(&s, 200)).await;
    inv.check_live(&d, &c).await;
    sc::never_reads(&c, &socket, 1 << 20).await;
    inv.check_live(&d, &c).await;
    // A 4 MiB result cannot queue behind the unread events in a 1 MiB budget.
    let budgets = sc::StreamBudgets {
        unsent: 1 << 20,
        output_cap: 4 << 20,
    };
    let daemon = (d.pid(), inv.rss_bound);
    let dropped =
        sc::stream_never_reads(&c, &socket, &d.work_dir(), daemon, 256 << 20, budgets).await;
    assert!(dropped);
    inv.check_live(&d, &c).await;
    sc::reattach(&c, &socket).await;
    inv.check_after(&d, &c).await;

    let after = c.stats().await.unwrap();
    let delta = |f: fn(&StatsResult) -> u64| f(&after) - f(&before);
    // The garbage frame and the huge prefix at least; the raw garbage may add more.
    assert!(delta(|s| s.clients.bad_frames_total) >= 2);
    // The non-reader of answers and the non-reader of a stream.
    assert_eq!(delta(|s| s.clients.slow_readers_dropped_total), 2);
    assert_eq!(delta(|s| s.clients.stalled_total), 1);
    assert!(delta(|s| s.clients.connections_total) >= 200 + 6);
    assert_eq!(
        after.clients.connections, 1,
        "only the test's own connection is left"
    );
    assert_eq!(delta(|s| s.runtime.actor_failures_total), 0);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_clients_that_fall_behind_cost_only_their_events() {
    // The default budgets: a result always fits behind the unread events.
    let d = TestDaemon::start("");
    let c = Arc::new(d.client().await);
    let inv = Invariants::baseline(&d, &c).await;
    let before = c.stats().await.unwrap();
    let socket = d.socket.clone();
    let budgets = sc::StreamBudgets {
        unsent: 64 << 20,
        output_cap: 4 << 20,
    };
    let daemon = (d.pid(), inv.rss_bound);
    let dropped =
        sc::stream_never_reads(&c, &socket, &d.work_dir(), daemon, 256 << 20, budgets).await;
    assert!(!dropped);
    inv.check_live(&d, &c).await;
    sc::stream_reads_late(&c, &socket, &d.work_dir(), 32 << 20, budgets).await;
    inv.check_live(&d, &c).await;
    sc::stream_and_read(&c).await;
    sc::start_write_cancel(&c).await;
    sc::reattach(&c, &socket).await;
    inv.check_after(&d, &c).await;

    let after = c.stats().await.unwrap();
    let delta = |f: fn(&StatsResult) -> u64| f(&after) - f(&before);
    assert_eq!(delta(|s| s.clients.slow_readers_dropped_total), 0);
    // The two floods past the cap.
    assert_eq!(delta(|s| s.commands.output_truncated_total), 2);
    assert_eq!(delta(|s| s.runtime.actor_failures_total), 0);
    drop(c);
    d.stop();
}
