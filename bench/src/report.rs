//! The bench's report: every figure with its goal, the markdown table printed at the end, and the files written (`bench.json` and the SVG plots).

use std::path::Path;

use serde::Serialize;

use crate::error::BenchError;
use crate::plot;

/// One measured figure, its goal, and whether it met it.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub workload: String,
    pub figure: String,
    pub value: f64,
    pub unit: String,
    pub goal: String,
    pub met: Option<bool>,
}

/// Everything a run produced (serialised as `bench.json`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub machine: String,
    pub figures: Vec<Figure>,
    /// (concurrency, commands/s, mean latency µs) with cgroups off.
    pub concurrency: Vec<(usize, f64, f64)>,
    /// (idle sessions, daemon RSS bytes).
    pub rss_by_sessions: Vec<(usize, u64)>,
}

impl Report {
    /// A report for this machine, with no figures yet.
    pub fn new() -> Report {
        Report {
            machine: machine_description(),
            ..Default::default()
        }
    }

    /// Records a figure without a goal.
    pub fn info(&mut self, workload: &str, figure: &str, value: f64, unit: &str) {
        self.push(workload, figure, value, unit, "—", None);
    }

    /// Records a figure with a goal that is read, not checked (e.g. off a plot).
    pub fn note(&mut self, workload: &str, figure: &str, value: f64, unit: &str, goal: &str) {
        self.push(workload, figure, value, unit, goal, None);
    }

    /// Records a figure against its goal (`goal` says it; `met` is whether it held).
    pub fn goal(
        &mut self,
        workload: &str,
        figure: &str,
        value: f64,
        unit: &str,
        goal: &str,
        met: bool,
    ) {
        self.push(workload, figure, value, unit, goal, Some(met));
    }

    fn push(
        &mut self,
        workload: &str,
        figure: &str,
        value: f64,
        unit: &str,
        goal: &str,
        met: Option<bool>,
    ) {
        self.figures.push(Figure {
            workload: workload.into(),
            figure: figure.into(),
            value,
            unit: unit.into(),
            goal: goal.into(),
            met,
        });
    }

    /// The table printed at the end of a run (markdown).
    pub fn table(&self) -> String {
        let mut out =
            String::from("| workload | figure | value | goal | met |\n|---|---|---|---|---|\n");
        for f in &self.figures {
            let met = match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            out.push_str(&format!(
                "| {} | {} | {:.2} {} | {} | {} |\n",
                f.workload, f.figure, f.value, f.unit, f.goal, met
            ));
        }
        out
    }

    /// Writes `bench.json`, `concurrency.svg` and `rss.svg` into `out` (created if missing).
    pub fn write(&self, out: &Path) -> Result<(), BenchError> {
        std::fs::create_dir_all(out).map_err(|e| BenchError::io("create", out, e))?;
        let json = serde_json::to_string_pretty(self).expect("a report serialises");
        for (name, text) in [
            ("bench.json", json),
            ("concurrency.svg", plot::concurrency_svg(&self.concurrency)),
            ("rss.svg", plot::rss_svg(&self.rss_by_sessions)),
        ] {
            let path = out.join(name);
            std::fs::write(&path, text).map_err(|e| BenchError::io("write", &path, e))?;
        }
        Ok(())
    }
}

fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{cpus} CPUs, Linux {}, {}",
        kernel.trim(),
        mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    )
}
