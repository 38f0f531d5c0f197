//! `sessiond-bench`: the load generator for sessiond. Starts real daemons (cgroups off, then on) from the `sessiond` binary, runs every workload, prints a table and writes `bench.json` and SVG plots (docs/benchmarks.md).

mod daemon;
mod error;
mod plot;
mod report;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::error::BenchError;
use crate::workloads::Scale;

/// Benchmark sessiond against the physical floor (starts its own daemons); prints a table, writes JSON and SVG plots.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A smoke run: every workload, tiny counts (seconds).
    #[arg(long)]
    quick: bool,
    /// Where bench.json and the plots go.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// The daemon binary to start [default: `sessiond` next to this binary, i.e. in the same target dir].
    #[arg(long)]
    daemon: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessiond-bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), BenchError> {
    let daemon = match cli.daemon {
        Some(path) => path,
        None => sibling_daemon()?,
    };
    // Checked before the floor workload, which takes a while.
    if let Err(source) = std::fs::metadata(&daemon) {
        return Err(BenchError::DaemonBinary {
            path: daemon,
            source,
        });
    }
    let scale = if cli.quick { Scale::QUICK } else { Scale::FULL };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    println!("daemon: {}", daemon.display());
    let report = runtime.block_on(workloads::run(scale, &daemon))?;
    report.write(&cli.out)?;
    println!("machine: {}\n\n{}", report.machine, report.table());
    println!(
        "wrote {}/bench.json, concurrency.svg, rss.svg",
        cli.out.display()
    );
    Ok(())
}

/// `sessiond` in the directory of this executable: cargo puts every binary of
/// the workspace in the same target dir (`target/release/`, `target/debug/`).
fn sibling_daemon() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::io("locate", "/proc/self/exe", e))?;
    Ok(exe.with_file_name("sessiond"))
}
