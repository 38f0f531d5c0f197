//! Measures `exec.run` latency of a trivial command against a running daemon:
//! `cargo run --release --example exec_latency -- SOCKET [N] [COMMAND]`.
//! Prints p50/p90/p99 in microseconds (a quick probe; the benchmark suite is separate).

use std::time::Instant;

use sessiond::client::Client;
use sessiond::protocol::CreateParams;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .expect("usage: exec_latency SOCKET [N] [COMMAND]");
    let n: usize = args.next().map(|s| s.parse().expect("N")).unwrap_or(500);
    let command = args.next().unwrap_or_else(|| "true".into());
    let client = Client::connect(&socket).await.expect("connect");
    let session = client
        .create_session(CreateParams::default())
        .await
        .expect("session");
    for _ in 0..20 {
        client.run(&session, &command).await.expect("warm-up");
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.run(&session, &command).await.expect("run");
        samples.push(t.elapsed().as_micros() as u64);
    }
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    println!(
        "exec.run `{command}` n={n}: p50 {} us, p90 {} us, p99 {} us",
        q(0.5),
        q(0.9),
        q(0.99)
    );
    client.destroy_session(&session).await.expect("destroy");
}
