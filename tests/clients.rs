//! Per-client controls against the real daemon: identity and ownership across uids, rate limits, non-reading clients (connection admission is in lifecycle.rs, a stalled partial frame in fault_clients.rs).

mod support;

use std::time::Duration;

use sessiond::client::ClientError;
use sessiond::protocol::CreateParams;
use support::{TestDaemon, as_nobody, get, open_to_everyone, request, wait_until};

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (connects as another uid)"]
async fn another_uid_cannot_see_or_touch_root_sessions() {
    assert!(nix::unistd::getuid().is_root(), "needs root");
    let d = TestDaemon::start("[server]\nsocket_mode = 0o666\nallowed_uids = [0, 65534]\n");
    open_to_everyone(&d);
    let c = d.client().await;
    let root_session = c.create_session(CreateParams::default()).await.unwrap();

    let o = as_nobody(&d, &["session", "list"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "",
        "nobody sees none of root's sessions"
    );
    for args in [
        vec!["session", "destroy", root_session.as_str()],
        vec!["run", "--session", root_session.as_str(), "--", "id"],
    ] {
        let o = as_nobody(&d, &args);
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("SESSION_NOT_FOUND"),
            "{o:?}"
        );
    }
    // nobody's own session works and is its own.
    let o = as_nobody(&d, &["session", "create"]);
    assert!(o.status.success(), "{o:?}");
    let theirs = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let ids: Vec<String> = c
        .list_sessions()
        .await
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(
        ids,
        vec![root_session.clone()],
        "root does not see nobody's session either"
    );
    assert_eq!(
        c.destroy_session(&theirs).await.unwrap_err().code(),
        Some("SESSION_NOT_FOUND")
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_over_the_rate_is_refused_with_a_usable_retry_after() {
    let d = TestDaemon::start("[rate_limit]\nrequests_per_second = 5\nburst = 5\n");
    let c = d.client().await;
    let mut refused = None;
    for _ in 0..20 {
        match c.list_sessions().await {
            Ok(_) => {}
            Err(ClientError::Server(e)) if e.code == "RATE_LIMITED" => {
                refused = Some(e);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let refused = refused.expect("a burst of 20 over a burst of 5 is refused");
    let retry = refused.retry_after_ms.expect("retry_after_ms is set");
    assert!(
        (1..=1000).contains(&retry),
        "at 5/s the next token is at most 200 ms away: {retry}"
    );
    // Health checks are exempt.
    for _ in 0..50 {
        c.ping().await.unwrap();
    }
    // Waiting the advised time is enough.
    tokio::time::sleep(Duration::from_millis(retry)).await;
    c.list_sessions().await.unwrap();
    // The refusal was counted (stats is rate limited too: wait for the next token).
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(c.stats().await.unwrap().clients.rate_limited_total >= 1);
    drop(c);
    d.stop();
}

#[test]
fn a_client_that_never_reads_is_dropped_and_memory_stays_bounded() {
    // No finished command is retained for `exec.read` here: what is measured
    // is that unread answers are not kept.
    let d = TestDaemon::start(
        "[server]\nmax_unsent_bytes = \"4 MiB\"\n[commands]\nmax_concurrent = 32\nmax_per_session = 4\nretain_per_session = 0\n",
    );
    let rss = || support::rss_of(d.pid());
    let mut setup = d.raw();
    let sessions: Vec<String> = (0..8).map(|i| setup.create_session(100 + i)).collect();
    let before = rss();
    // 32 answers of 1 MiB each = 32 MiB of answers, none of them ever read.
    let mut greedy = d.raw();
    for (i, s) in (0..32).zip(sessions.iter().cycle()) {
        if !greedy.try_send(&request(
            i,
            "exec.run",
            vec![
                ("session_id", s.as_str().into()),
                ("command", "head -c 1048576 /dev/zero".into()),
            ],
        )) {
            break;
        }
    }
    // The daemon drops the connection once its unread answers pass the budget...
    let mut stats_conn = d.raw();
    wait_until(
        "the non-reading client is dropped",
        Duration::from_secs(30),
        || {
            stats_conn.send(&request(1, "system.stats", vec![]));
            let r = stats_conn.read().unwrap();
            get(get(get(&r, "result"), "clients"), "connections").as_u64() == Some(2)
        },
    );
    // ...its commands ran to their end (nothing of anyone was killed)...
    wait_until(
        "the dropped client's commands finish",
        Duration::from_secs(30),
        || {
            stats_conn.send(&request(2, "system.stats", vec![]));
            let r = stats_conn.read().unwrap();
            get(get(get(&r, "result"), "commands"), "running").as_u64() == Some(0)
        },
    );
    // ...and the daemon did not keep the 32 MiB.
    let after = rss();
    assert!(
        after < before + 24 * 1024 * 1024,
        "RSS grew from {before} to {after} bytes for 32 MiB of unread answers"
    );
    // Everyone else is still served.
    setup.send(&request(9, "system.ping", vec![]));
    assert!(setup.read().is_some());
    drop((greedy, setup, stats_conn));
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_every_answer_is_never_taken_for_a_slow_reader() {
    // Answers as large as the budget, each followed at once by a small
    // request: the small answer must not count the big one, which the client
    // has already read to its end (the chaos soak once saw such a client dropped).
    let d = TestDaemon::start(
        "[server]\nmax_unsent_bytes = \"64 KiB\"\n[commands]\nmax_output_bytes = \"64 KiB\"\n",
    );
    let c = d.client().await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    for round in 0..300 {
        let r = c.run(&s, "head -c 65536 /dev/zero").await;
        assert_eq!(r.map(|r| r.stdout.len()).ok(), Some(65536), "round {round}");
        c.ping()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
    assert_eq!(
        c.stats().await.unwrap().clients.slow_readers_dropped_total,
        0
    );
    drop(c);
    d.stop();
}
