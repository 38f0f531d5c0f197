//! Measures `exec.run true` p50 against a running daemon with an empty and a heavy terminal state (2 000 variables + 300 functions), and the bash floor (`bash -c true`) in the same run.
//!
//! `cargo run --release --example terminal_state_bench -- SOCKET [N]`

use std::time::Instant;

use sessiond::client::Client;
use sessiond::protocol::CreateParams;

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = &args[1];
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200);
    let floor = p50((0..n)
        .map(|_| {
            let t = Instant::now();
            std::process::Command::new("/bin/bash")
                .args(["-c", "true"])
                .status()
                .unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect());
    let c = Client::connect(socket).await.unwrap();
    let mut rows = Vec::new();
    for (name, setup) in [
        ("empty", String::new()),
        (
            "heavy (2000 vars + 300 functions)",
            "for i in $(seq 1 2000); do eval \"v_$i='value number $i with some text'\"; done; for i in $(seq 1 300); do eval \"f_$i() { local a=\\$1; echo \\\"fn $i \\$a\\\"; if [ -n \\\"\\$a\\\" ]; then return 1; fi; }\"; done".to_string(),
        ),
    ] {
        let s = c.create_session(CreateParams::default()).await.unwrap();
        if !setup.is_empty() {
            let r = c.run(&s, &setup).await.unwrap();
            assert_eq!(r.state_error, None);
        }
        let mut v = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            c.run(&s, "true").await.unwrap();
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let check = c.run(&s, "declare -F | wc -l").await.unwrap();
        rows.push((name, p50(v), String::from_utf8_lossy(&check.stdout).trim().to_string()));
        c.destroy_session(&s).await.unwrap();
    }
    println!("bash floor (bash -c true): p50 {floor:.2} ms");
    for (name, p, fns) in rows {
        println!(
            "exec.run true, {name} state: p50 {p:.2} ms = {:.2}x floor (functions: {fns})",
            p / floor
        );
    }
}
