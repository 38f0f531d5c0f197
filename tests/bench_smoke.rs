//! A tiny run of `sessiond bench` so the benchmark cannot rot: every workload runs, the JSON and plots are written. No timing assertions.

use std::process::Command;

#[test]
fn the_benchmark_runs_every_workload() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sessiond"))
        .args(["bench", "--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
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
    assert_eq!(report["concurrency"].as_array().unwrap().len(), 5);
    for plot in ["concurrency.svg", "rss.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
    // The bench's daemons left nothing behind.
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("| floor |"), "{stdout}");
    let left = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .flat_map(|h| std::fs::read_dir(h.path()).into_iter().flatten().flatten())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("sessiond-bench-")
                })
                .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "bench cgroups left behind");
}
