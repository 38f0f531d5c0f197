//! Spawn cost of the daemon's spawn path (clone with CLONE_VM|CLONE_VFORK, limits set in the child)
//! with the process idle and then holding 1 GiB of touched memory:
//! `cargo run --release --example spawn_vs_memory`. A fork()-based path would slow down ~60×.

use std::ffi::CString;
use std::sync::Arc;
use std::time::Instant;

use sessiond::limits::{RlimitsConfig, SessionRlimits};
use sessiond::process::ProcessTable;
use sessiond::process::spawn::{SpawnRequest, spawn};

fn p50_us(table: &Arc<ProcessTable>, n: usize) -> u128 {
    let program = CString::new("/bin/true").unwrap();
    let argv = [program.clone()];
    let envp: [CString; 0] = [];
    let cwd = CString::new("/").unwrap();
    let rlimits = SessionRlimits::from(&RlimitsConfig::default()).to_rlimits();
    let oom = CString::new("1000").unwrap();
    // The state fds a command gets; /dev/null stands in for the memfds here.
    let null = std::fs::File::open("/dev/null").unwrap();
    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut samples: Vec<u128> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let request = SpawnRequest {
                program: &program,
                argv: &argv,
                envp: &envp,
                cwd: &cwd,
                with_stdin: false,
                rlimits: &rlimits,
                oom_score_adj: Some(&oom),
                credentials: None,
                cgroup_procs: &[],
                state_fds: [(null_fd, 62), (null_fd, 63)],
            };
            let (mut child, _pipes) = spawn(table, 1, &request).expect("spawn");
            let elapsed = t.elapsed().as_micros();
            rt.block_on(child.wait()).expect("wait");
            elapsed
        })
        .collect();
    samples.sort_unstable();
    samples[n / 2]
}

fn main() {
    let table = Arc::new(ProcessTable::default());
    let idle = p50_us(&table, 300);
    let ballast: Vec<u8> = vec![1; 1 << 30];
    let loaded = p50_us(&table, 300);
    println!(
        "spawn p50: {idle} us idle, {loaded} us with +1 GiB resident ({} bytes)",
        ballast
            .iter()
            .step_by(4096)
            .map(|b| *b as usize)
            .sum::<usize>()
            * 4096
    );
}
