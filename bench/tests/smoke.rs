//! A tiny run of `sessiond-bench --quick` against the real daemon, so the benchmark cannot rot: every workload runs, the JSON and plots are written, the daemons exit cleanly and leave nothing behind. No timing assertions.
//!
//! The daemon is the `sessiond` binary next to the bench binary in the target
//! dir; `cargo test --workspace` builds it (the root package's tests need it).

use std::path::PathBuf;
use std::process::Command;

/// The `sessiond` binary the bench starts by default (its sibling).
fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sessiond-bench")).with_file_name("sessiond")
}

#[test]
fn the_benchmark_runs_every_workload() {
    let daemon = daemon_binary();
    assert!(
        daemon.exists(),
        "{} missing: run `cargo test --workspace` (or `cargo build -p sessiond` first)",
        daemon.display()
    );
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sessiond-bench"))
        .args(["--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    // The bench itself fails when a daemon does not exit 0 within 30 s of
    // SIGTERM or leaves its socket, a command's process or a cgroup behind.
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("bench.json")).unwrap()).unwrap();
    let workloads: Vec<String> = report["figures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["workload"].as_str().unwrap().to_string())
        .collect();
    for expected in [
        "floor",
        "exec.run true, sequential (cgroups off)",
        "exec.run `cd .` (state saved), sequential (cgroups off)",
        "exec.run `cd .` (state saved), 2 000 variables + 300 functions carried",
        "session.create + destroy (cgroups off)",
        "exec.run true, concurrent",
        "spawn cost vs daemon memory",
        "system.ping sequential",
        "system.ping pipelined",
        "idle sessions",
        "flat scaling",
        "output drain",
    ] {
        assert!(
            workloads.iter().any(|w| w == expected),
            "missing {expected}: {workloads:?}"
        );
    }
    // Both daemons ran it, five figures each (p50, p99, its floor, the ratio
    // to the run's floor and to its own; the second daemon has cgroups on
    // where the machine has them, so its label may say either).
    let sequential = workloads
        .iter()
        .filter(|w| w.starts_with("exec.run true, sequential (cgroups "))
        .count();
    assert_eq!(sequential, 10, "{workloads:?}");
    assert_eq!(report["concurrency"].as_array().unwrap().len(), 5);
    for plot in ["concurrency.svg", "rss.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("| floor |"), "{stdout}");
    assert!(
        stdout.contains(&format!("daemon: {}", daemon.display())),
        "{stdout}"
    );
}
