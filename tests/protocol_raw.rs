//! The wire protocol spoken with raw frames: every method, malformed input, oversized frames, pipelining by id.

mod support;

use rmpv::Value;
use support::{TestDaemon, error_code, get, request};

fn ping(id: u64) -> Value {
    request(id, "system.ping", vec![])
}

#[test]
fn every_method_answers_by_id_over_raw_frames() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    conn.send(&ping(1));
    let r = conn.read().unwrap();
    assert_eq!(get(&r, "id").as_u64(), Some(1));
    let result = get(&r, "result");
    assert_eq!(get(result, "pong").as_bool(), Some(true));
    assert_eq!(get(result, "protocol").as_u64(), Some(2));
    let features: Vec<&str> = get(result, "features")
        .as_array()
        .expect("features is a list")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    for f in ["stream", "start", "idle-timeout"] {
        assert!(features.contains(&f), "{f} missing from {features:?}");
    }
    assert_eq!(
        get(result, "version").as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );

    let sid = conn.create_session(2);

    // stdin as str is accepted; stdout comes back as bin.
    conn.send(&request(
        3,
        "exec.run",
        vec![
            ("session_id", sid.as_str().into()),
            ("command", "cat; echo; echo err >&2".into()),
            ("stdin", "hello".into()),
            ("timeout_s", 5.into()),
        ],
    ));
    let r = conn.read().unwrap();
    assert_eq!(get(&r, "id").as_u64(), Some(3));
    let result = get(&r, "result");
    assert!(matches!(get(result, "stdout"), Value::Binary(b) if b == b"hello\n"));
    assert!(matches!(get(result, "stderr"), Value::Binary(b) if b == b"err\n"));
    assert_eq!(get(result, "exit_code").as_i64(), Some(0));
    assert!(get(result, "signal").is_nil() && get(result, "killed_by").is_nil());
    for key in [
        "duration_ms",
        "cpu_ms",
        "max_rss_bytes",
        "stdout_total_bytes",
        "stderr_total_bytes",
    ] {
        assert!(get(result, key).as_u64().is_some(), "{key} is a uint");
    }
    assert!(get(result, "cwd").as_str().is_some());

    conn.send(&request(4, "session.list", vec![]));
    let r = conn.read().unwrap();
    let sessions = get(get(&r, "result"), "sessions")
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(sessions.len(), 1);
    for key in ["session_id", "created_ms_ago", "idle_ms", "busy", "cwd"] {
        assert!(!get(&sessions[0], key).is_nil(), "{key} listed");
    }

    conn.send(&request(
        5,
        "exec.cancel",
        vec![("session_id", sid.as_str().into())],
    ));
    let r = conn.read().unwrap();
    assert_eq!(get(get(&r, "result"), "cancelled").as_bool(), Some(false));

    conn.send(&request(6, "system.stats", vec![]));
    let r = conn.read().unwrap();
    let stats = get(&r, "result");
    for (section, keys) in [
        (
            "sessions",
            &[
                "active",
                "max",
                "created_total",
                "destroyed_total",
                "expired_total",
                "rejected_total",
            ][..],
        ),
        (
            "commands",
            &[
                "running",
                "max",
                "started_total",
                "completed_total",
                "timed_out_total",
                "killed_total",
                "rejected_busy_total",
                "rejected_capacity_total",
                "output_truncated_total",
                "oom_killed_total",
                "spawn_failed_total",
            ][..],
        ),
        (
            "clients",
            &["connections", "rate_limited_total", "bad_frames_total"][..],
        ),
        (
            "runtime",
            &[
                "pid",
                "uptime_ms",
                "rss_bytes",
                "actor_failures_total",
                "zombies_reaped_total",
            ][..],
        ),
    ] {
        for key in keys {
            assert!(
                get(get(stats, section), key).as_u64().is_some(),
                "{section}.{key}"
            );
        }
    }
    let cgroups = get(get(stats, "runtime"), "cgroups")
        .as_str()
        .unwrap()
        .to_string();
    assert!(["off", "v1", "v2"].contains(&cgroups.as_str()), "{cgroups}");
    assert_eq!(
        get(get(stats, "runtime"), "draining").as_bool(),
        Some(false)
    );

    conn.send(&request(
        7,
        "session.destroy",
        vec![("session_id", sid.as_str().into())],
    ));
    let r = conn.read().unwrap();
    assert_eq!(get(get(&r, "result"), "destroyed").as_bool(), Some(true));
    drop(conn);
    d.stop();
}

#[test]
fn pipelined_requests_are_answered_by_id_in_any_order() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();
    let sid = conn.create_session(10);
    // A slow exec first, then pings on the same connection without waiting.
    conn.send(&request(
        11,
        "exec.run",
        vec![
            ("session_id", sid.as_str().into()),
            ("command", "sleep 1; echo slept".into()),
        ],
    ));
    for id in 12..=19 {
        conn.send(&ping(id));
    }
    let mut seen = Vec::new();
    while seen.len() < 9 {
        let r = conn.read().unwrap();
        seen.push(get(&r, "id").as_u64().unwrap());
    }
    // Every ping came back while the exec sent before them was still running.
    assert_eq!(seen, (12..=19).chain([11]).collect::<Vec<_>>());
    drop(conn);
    d.stop();
}

#[test]
fn malformed_frames_get_invalid_request_and_the_connection_stays_open() {
    let d = TestDaemon::start("");
    let mut conn = d.raw();

    // Garbage bytes inside a frame: not MessagePack.
    conn.write_frame(&[0xc1, 0xff, 0x00]);
    let r = conn.read().unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"));
    assert!(get(&r, "id").is_nil());

    // Valid MessagePack that is not a map.
    let mut body = Vec::new();
    rmpv::encode::write_value(&mut body, &Value::from("just a string")).unwrap();
    conn.write_frame(&body);
    assert_eq!(
        error_code(&conn.read().unwrap()).as_deref(),
        Some("INVALID_REQUEST")
    );

    // An id of another type.
    conn.send(&request("seven", "system.ping", vec![]));
    let r = conn.read().unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"));
    assert!(get(&r, "id").is_nil());

    // A readable id but no method: the id comes back.
    conn.send(&Value::Map(vec![("id".into(), 41.into())]));
    let r = conn.read().unwrap();
    assert_eq!(get(&r, "id").as_u64(), Some(41));
    assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"));

    // Unknown method.
    conn.send(&request(42, "system.reboot", vec![]));
    let r = conn.read().unwrap();
    assert_eq!(get(&r, "id").as_u64(), Some(42));
    assert_eq!(error_code(&r).as_deref(), Some("UNKNOWN_METHOD"));

    // A param of the wrong type is named.
    conn.send(&request(
        43,
        "exec.run",
        vec![("session_id", 5.into()), ("command", "true".into())],
    ));
    let r = conn.read().unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"));
    let message = get(get(&r, "error"), "message")
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("session_id"), "{message}");

    // A missing required param is named too.
    conn.send(&request(44, "session.destroy", vec![]));
    let r = conn.read().unwrap();
    assert!(
        get(get(&r, "error"), "message")
            .as_str()
            .unwrap()
            .contains("session_id")
    );

    // Still served.
    conn.send(&ping(45));
    assert_eq!(get(&conn.read().unwrap(), "id").as_u64(), Some(45));

    conn.send(&request(46, "system.stats", vec![]));
    let stats = conn.read().unwrap();
    // Four frames were unusable as requests; the unknown method and bad params were requests.
    let clients = get(get(&stats, "result"), "clients");
    assert_eq!(get(clients, "bad_frames_total").as_u64(), Some(4));
    assert!(get(clients, "errors_total").as_u64().unwrap() >= 3);
    drop(conn);
    d.stop();
}

#[test]
fn an_oversized_frame_is_refused_with_its_limit_then_closed() {
    let d = TestDaemon::start("[server]\nmax_request_bytes = \"4 KiB\"\n");
    let mut conn = d.raw();
    // A huge length prefix: refused from the prefix alone, nothing of that size allocated.
    conn.write_bytes(&0xffff_fff0u32.to_be_bytes());
    let r = conn.read().unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("FRAME_TOO_LARGE"));
    assert!(get(&r, "id").is_nil());
    assert_eq!(get(get(&r, "error"), "limit").as_u64(), Some(4096));
    assert!(
        conn.is_closed(),
        "the connection is closed after FRAME_TOO_LARGE"
    );

    // Just over the limit, with a real body.
    let mut conn = d.raw();
    conn.write_frame(&vec![0u8; 4097]);
    assert_eq!(
        error_code(&conn.read().unwrap()).as_deref(),
        Some("FRAME_TOO_LARGE")
    );

    // Others are served as before.
    let mut other = d.raw();
    other.send(&ping(1));
    assert_eq!(get(&other.read().unwrap(), "id").as_u64(), Some(1));
    drop((conn, other));
    d.stop();
}

#[test]
fn refusals_carry_named_codes_over_the_wire() {
    let d = TestDaemon::start("[commands]\nmax_stdin_bytes = 8\n");
    let mut conn = d.raw();
    let sid = conn.create_session(1);
    conn.send(&request(
        2,
        "exec.run",
        vec![
            ("session_id", sid.as_str().into()),
            ("command", "cat".into()),
            ("stdin", Value::Binary(vec![1; 9])),
        ],
    ));
    let r = conn.read().unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("STDIN_TOO_LARGE"));
    assert_eq!(get(get(&r, "error"), "limit").as_u64(), Some(8));
    conn.send(&request(
        3,
        "exec.run",
        vec![("session_id", "s-nope".into()), ("command", "true".into())],
    ));
    assert_eq!(
        error_code(&conn.read().unwrap()).as_deref(),
        Some("SESSION_NOT_FOUND")
    );
    conn.send(&request(
        4,
        "exec.run",
        vec![
            ("session_id", sid.as_str().into()),
            ("command", "true".into()),
            ("keep_output", "middle".into()),
        ],
    ));
    let r = conn.read().unwrap();
    assert_eq!(error_code(&r).as_deref(), Some("INVALID_REQUEST"));
    assert!(
        get(get(&r, "error"), "message")
            .as_str()
            .unwrap()
            .contains("keep_output")
    );
    drop(conn);
    d.stop();
}
