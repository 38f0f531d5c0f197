//! session.create / list / destroy, admission limits and idle expiry against the real daemon.

mod support;

use std::time::Duration;

use sessiond::client::ClientError;
use sessiond::protocol::{CreateParams, SessionLimits};
use support::{TestDaemon, wait_until_async};

fn limit_of(e: &ClientError) -> Option<u64> {
    match e {
        ClientError::Server(w) => w.limit,
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_list_destroy() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let a = c.create_session(CreateParams::default()).await.unwrap();
    let b = c
        .create_session(CreateParams {
            cwd: Some("/tmp".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(a.starts_with("s-") && a != b);
    let list = c.list_sessions().await.unwrap().sessions;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].session_id, a, "oldest first");
    assert_eq!(list[0].cwd, d.work_dir().to_string_lossy());
    assert_eq!(list[1].cwd, "/tmp");
    assert!(!list[0].busy);

    assert!(c.destroy_session(&a).await.unwrap().destroyed);
    let e = c.destroy_session(&a).await.unwrap_err();
    assert_eq!(e.code(), Some("SESSION_NOT_FOUND"));
    let e = c.run(&a, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SESSION_NOT_FOUND"));
    let e = c.cancel("s-unknown").await.unwrap_err();
    assert_eq!(e.code(), Some("SESSION_NOT_FOUND"));
    assert_eq!(c.list_sessions().await.unwrap().sessions.len(), 1);

    let stats = c.stats().await.unwrap().sessions;
    assert_eq!(
        (stats.active, stats.created_total, stats.destroyed_total),
        (1, 2, 1)
    );
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn session_caps_refuse_with_their_limit_and_change_nothing() {
    let d = TestDaemon::start("[sessions]\nmax_sessions = 3\nmax_sessions_per_client = 2\n");
    let c1 = d.client().await;
    let c2 = d.client().await;
    // Per client (uid), counted across connections.
    c1.create_session(CreateParams::default()).await.unwrap();
    c2.create_session(CreateParams::default()).await.unwrap();
    let e = c1
        .create_session(CreateParams::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("CLIENT_SESSION_LIMIT"));
    assert_eq!(limit_of(&e), Some(2));
    let stats = c1.stats().await.unwrap().sessions;
    assert_eq!((stats.active, stats.rejected_total), (2, 1));
    d.stop();

    let d = TestDaemon::start("[sessions]\nmax_sessions = 2\n");
    let c = d.client().await;
    c.create_session(CreateParams::default()).await.unwrap();
    c.create_session(CreateParams::default()).await.unwrap();
    let e = c.create_session(CreateParams::default()).await.unwrap_err();
    assert_eq!(e.code(), Some("TOO_MANY_SESSIONS"));
    assert_eq!(limit_of(&e), Some(2));
    assert_eq!(c.list_sessions().await.unwrap().sessions.len(), 2);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_create_params_are_invalid_and_named() {
    let d = TestDaemon::start("[commands]\nmax_timeout = \"60s\"\n");
    let c = d.client().await;
    for (params, needle) in [
        (
            CreateParams {
                cwd: Some("relative".into()),
                ..Default::default()
            },
            "cwd",
        ),
        (
            CreateParams {
                cwd: Some("/no/such/dir".into()),
                ..Default::default()
            },
            "cwd",
        ),
        (
            CreateParams {
                env: Some([("A=B".to_string(), "x".to_string())].into()),
                ..Default::default()
            },
            "env",
        ),
        (
            CreateParams {
                limits: Some(SessionLimits {
                    timeout_s: Some(61.0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.timeout_s",
        ),
        (
            CreateParams {
                limits: Some(SessionLimits {
                    memory_max_bytes: Some(1 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "limits.memory_max_bytes",
        ),
    ] {
        let e = c.create_session(params).await.unwrap_err();
        assert_eq!(e.code(), Some("INVALID_REQUEST"), "{e}");
        assert!(e.to_string().contains(needle), "{e} should name {needle}");
    }
    assert_eq!(c.stats().await.unwrap().sessions.active, 0);
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_timeout_limit_is_its_default_and_maximum() {
    let d = TestDaemon::start("");
    let c = d.client().await;
    let s = c
        .create_session(CreateParams {
            limits: Some(SessionLimits {
                timeout_s: Some(0.3),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = c.run(&s, "sleep 30").await.unwrap();
    assert!(r.timed_out, "the session's timeout is the default");
    let e = c
        .exec(sessiond::protocol::ExecParams {
            session_id: s.clone(),
            command: "true".into(),
            timeout_s: Some(1.0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("INVALID_REQUEST"));
    drop(c);
    d.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sessions_expire_and_their_processes_die() {
    let d = TestDaemon::start("[sessions]\nidle_timeout = \"1s\"\n");
    let c = std::sync::Arc::new(d.client().await);
    let keep = c.create_session(CreateParams::default()).await.unwrap();
    // A running command is activity: this session outlives its idle timeout.
    let busy = support::spawn_run(&c, &keep, "sleep 3; echo alive");
    support::wait_running(&c, 1).await;
    let s = c.create_session(CreateParams::default()).await.unwrap();
    let r = c.run(&s, "sleep 300 & echo $!").await.unwrap();
    let pid = support::printed_pid(&r);
    wait_until_async(
        "the idle session expires",
        Duration::from_secs(10),
        || async { c.stats().await.unwrap().sessions.expired_total == 1 },
    )
    .await;
    let e = c.run(&s, "true").await.unwrap_err();
    assert_eq!(e.code(), Some("SESSION_NOT_FOUND"));
    support::wait_dead(pid, "the expired session's background child dies");
    let r = busy.await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "alive\n");
    let ids: Vec<_> = c
        .list_sessions()
        .await
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(ids, vec![keep]);
    drop(c);
    d.stop();
}
