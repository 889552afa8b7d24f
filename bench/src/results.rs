//! The results directory a run leaves behind: `results/<UTC time>-<command>/`
//! with
//! - `results.jsonl`: the result lines, exactly as `--json` prints them;
//! - `results.csv`: the same lines, one column per field (the union of the
//!   lines' fields, in order of first appearance; absent fields empty);
//! - `machine.json`: cores, memory, CPU, kernel, the file system of the data
//!   directory and its fdatasync latency, measured before the run;
//! - `command.txt`: the command line;
//! - `throughput.svg`: each figure sampled once a second during the timed
//!   phase, one panel per figure (when the workload samples any);
//! - `latency.svg`: latency against percentile, one line per histogram the
//!   workload recorded (when it records any);
//! - `fanout-sweep.svg` (W5): storage writes per message, reads per delivery
//!   and the read:write ratio against the group size, log-log, one line per
//!   fan-out mode.
//!
//! Plots are drawn in Rust (plotters' SVG backend); nothing else is needed
//! to look at a run.

use crate::report::ResultLine;
use crate::sysinfo::Machine;
use crate::Result;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A figure sampled over the timed phase: (seconds since its start, value).
pub struct Series {
    pub name: &'static str,
    pub unit: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// What a run records besides its result lines.
#[derive(Default)]
pub struct Extras {
    pub series: Vec<Series>,
    /// Latency histograms in nanoseconds, by name.
    pub latencies: Vec<(&'static str, Histogram<u64>)>,
}

/// fdatasync of a 4 KiB write, measured on the data directory's file system.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SyncLatency {
    pub samples: usize,
    pub p50_us: f64,
    pub max_us: f64,
}

/// The machine facts of `machine.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub cores: usize,
    pub mem_bytes: u64,
    pub cpu: String,
    pub kernel: String,
    pub data_dir: PathBuf,
    pub file_system: String,
    pub fdatasync: Option<SyncLatency>,
}

impl Facts {
    /// Read the machine and measure fdatasync on `data_dir`'s file system
    /// (`samples` rounds of a 4 KiB write and `sync_data` on a scratch file).
    pub fn measure(machine: &Machine, data_dir: &Path, samples: usize) -> Facts {
        Facts {
            cores: machine.cores,
            mem_bytes: machine.mem_bytes,
            cpu: crate::sysinfo::cpu_model(),
            kernel: crate::sysinfo::kernel(),
            data_dir: data_dir.to_path_buf(),
            file_system: file_system_of(data_dir),
            fdatasync: fdatasync_latency(data_dir, samples).ok(),
        }
    }

    pub fn describe(&self) -> String {
        let sync = match self.fdatasync {
            Some(s) => format!(
                "fdatasync p50 {:.0} us, max {:.0} us ({} samples)",
                s.p50_us, s.max_us, s.samples
            ),
            None => "fdatasync not measured".into(),
        };
        format!(
            "data dir {} on {}: {sync}",
            self.data_dir.display(),
            self.file_system
        )
    }
}

/// The type of the file system holding `p`: the longest mount point in
/// `/proc/mounts` that is a prefix of its canonical path.
fn file_system_of(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fs) = (f.next()?, f.next()?, f.next()?);
            p.starts_with(at).then(|| (at.len(), fs.to_string()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, fs)| fs)
        .unwrap_or_else(|| "unknown".into())
}

fn fdatasync_latency(dir: &Path, samples: usize) -> Result<SyncLatency> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(".fdatasync-probe-{}", std::process::id()));
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut us = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        f.write_all(&block)?;
        let t = Instant::now();
        f.sync_data()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    us.sort_by(f64::total_cmp);
    Ok(SyncLatency {
        samples: us.len(),
        p50_us: us[us.len() / 2],
        max_us: us[us.len() - 1],
    })
}

/// `results/<UTC time>-<command>` under `root`, created.
pub fn new_dir(root: &Path, command: &str) -> Result<PathBuf> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp: String = now.chars().filter(|c| *c != ':' && *c != '-').collect();
    let mut dir = root.join(format!("{stamp}-{command}"));
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = root.join(format!("{stamp}-{command}-{n}"));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Write the results directory; returns its path.
pub fn write(
    root: &Path,
    command: &str,
    lines: &[ResultLine],
    facts: &Facts,
    extras: &Extras,
) -> Result<PathBuf> {
    let dir = new_dir(root, command)?;
    let args: Vec<String> = std::env::args().collect();
    std::fs::write(dir.join("command.txt"), args.join(" ") + "\n")?;
    std::fs::write(
        dir.join("machine.json"),
        serde_json::to_string_pretty(facts)? + "\n",
    )?;
    let values: Vec<serde_json::Value> = lines
        .iter()
        .map(serde_json::to_value)
        .collect::<std::result::Result<_, _>>()?;
    let mut jsonl = String::new();
    for v in &values {
        jsonl.push_str(&v.to_string());
        jsonl.push('\n');
    }
    std::fs::write(dir.join("results.jsonl"), jsonl)?;
    std::fs::write(dir.join("results.csv"), csv(&values))?;
    // A timed phase shorter than a second has no samples: no plot.
    let series: Vec<&Series> = extras
        .series
        .iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    if !series.is_empty() {
        plot_series(&dir.join("throughput.svg"), &series)?;
    }
    if !extras.latencies.is_empty() {
        plot_latency(&dir.join("latency.svg"), &extras.latencies)?;
    }
    if values.iter().any(|v| v["workload"] == "fanout-sweep") {
        plot_fanout_sweep(&dir.join("fanout-sweep.svg"), &values)?;
    }
    Ok(dir)
}

/// One CSV row per JSON object; the columns are the union of their keys.
pub fn csv(rows: &[serde_json::Value]) -> String {
    let mut cols: Vec<&str> = Vec::new();
    for r in rows {
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if !cols.contains(&k.as_str()) {
                    cols.push(k);
                }
            }
        }
    }
    let mut out = cols.join(",");
    out.push('\n');
    for r in rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match r.get(*c) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => quote(s),
                Some(v @ (serde_json::Value::Array(_) | serde_json::Value::Object(_))) => {
                    quote(&v.to_string())
                }
                Some(v) => v.to_string(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// RFC 4180 quoting where needed.
fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn plot_err(e: impl std::fmt::Display) -> crate::BoxError {
    format!("drawing a plot: {e}").into()
}

/// One panel per series, stacked.
fn plot_series(path: &Path, series: &[&Series]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 260 * series.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    for (area, s) in root.split_evenly((series.len(), 1)).iter().zip(series) {
        let xmax = s.points.iter().map(|p| p.0).fold(1.0, f64::max);
        let ymax = s.points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} ({})", s.name, s.unit), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds into the timed phase")
            .y_desc(s.unit)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), &BLUE))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The percentiles plotted, as "nines" (x = -log10(1 - q)).
const QUANTILES: [f64; 9] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999];

/// Latency (ms, log scale) against percentile (nines), one line per
/// histogram.
fn plot_latency(path: &Path, hists: &[(&'static str, Histogram<u64>)]) -> Result<()> {
    let nines = |q: f64| -(1.0 - q).log10();
    let curves: Vec<(&str, Vec<(f64, f64)>)> = hists
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| {
            let pts = QUANTILES
                .iter()
                .map(|&q| (nines(q), (h.value_at_quantile(q) as f64 / 1e6).max(1e-3)))
                .collect();
            (*name, pts)
        })
        .collect();
    let ymax = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1e-3, f64::max)
        * 2.0;
    let ymin = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(f64::MAX, f64::min)
        .min(ymax / 10.0)
        / 2.0;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency by percentile", ("sans-serif", 18))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(nines(0.5)..nines(0.9999), (ymin..ymax).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_labels(8)
        .x_label_formatter(&|x| {
            // Label the nines only: 90 %, 99 %, 99.9 %, 99.99 %.
            if (x - x.round()).abs() < 1e-6 && *x >= 1.0 {
                format!("{}%", 100.0 * (1.0 - 10f64.powf(-x.round())))
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(plot_err)?;
    let lines: Vec<(&str, Vec<(f64, f64)>)> = curves.iter().map(|(n, p)| (*n, p.clone())).collect();
    draw_lines(&mut chart, &lines, false)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draw one coloured line per `(name, points)` (with dot markers if
/// `markers`) and the legend naming them: every multi-line plot here.
pub fn draw_lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: &[(&str, Vec<(f64, f64)>)],
    markers: bool,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in lines.iter().enumerate() {
        let c = colors[i % colors.len()];
        if markers {
            chart
                .draw_series(PointSeries::of_element(pts.clone(), 3, c, &|p, s, st| {
                    Circle::new(p, s, st.filled())
                }))
                .map_err(plot_err)?;
        }
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c))
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// W5's panels: (JSON field, title).
const SWEEP_PANELS: [(&str, &str); 3] = [
    ("storage_writes_per_message", "storage writes per message"),
    ("reads_per_delivery", "reads per delivery"),
    ("read_write_ratio", "read:write ratio (per message)"),
];

/// W5: each panel's figure against `group_size`, log-log, one line per
/// `fanout_mode`.
fn plot_fanout_sweep(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let mut modes: Vec<&str> = Vec::new();
    for l in lines {
        if let Some(m) = l["fanout_mode"].as_str() {
            if l["workload"] == "fanout-sweep" && !modes.contains(&m) {
                modes.push(m);
            }
        }
    }
    let points = |mode: &str, field: &str| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = lines
            .iter()
            .filter(|l| l["workload"] == "fanout-sweep" && l["fanout_mode"] == mode)
            .filter_map(|l| Some((l["group_size"].as_f64()?, l[field].as_f64()?)))
            .filter(|(x, y)| *x > 0.0 && *y > 0.0)
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let root = SVGBackend::new(path, (1350, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    for (area, (field, title)) in root.split_evenly((1, 3)).iter().zip(SWEEP_PANELS) {
        let all: Vec<(f64, f64)> = modes.iter().flat_map(|m| points(m, field)).collect();
        if all.is_empty() {
            continue;
        }
        let (x0, x1) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (y0, y1) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (x0 / 1.5..x1 * 1.5).log_scale(),
                (y0 / 2.0..y1 * 2.0).log_scale(),
            )
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("group size (members)")
            .draw()
            .map_err(plot_err)?;
        let lines: Vec<(&str, Vec<(f64, f64)>)> =
            modes.iter().map(|m| (*m, points(m, field))).collect();
        draw_lines(&mut chart, &lines, true)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_the_union_of_fields_and_quotes_what_needs_it() {
        let rows = vec![
            serde_json::json!({"workload": "im", "ops": 3, "label": "a,b"}),
            serde_json::json!({"workload": "fanout", "p99_us": 1.5, "v": [1, 2]}),
        ];
        assert_eq!(
            csv(&rows),
            "label,ops,workload,p99_us,v\n\"a,b\",3,im,,\n,,fanout,1.5,\"[1,2]\"\n"
        );
    }

    #[test]
    fn the_directory_holds_every_file_and_plots_are_svg() {
        let root = tempfile::tempdir().unwrap();
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for v in 1..10_000u64 {
            h.record(v * 1_000).unwrap();
        }
        let extras = Extras {
            series: vec![Series {
                name: "messages",
                unit: "messages/s",
                points: vec![(1.0, 10.0), (2.0, 12.0)],
            }],
            latencies: vec![("send", h)],
        };
        let facts = Facts::measure(&Machine::detect(), root.path(), 3);
        assert_eq!(facts.fdatasync.unwrap().samples, 3);
        let line = ResultLine {
            workload: "im".into(),
            ops: 1,
            ..Default::default()
        };
        let dir = write(root.path(), "im", &[line], &facts, &extras).unwrap();
        for f in [
            "command.txt",
            "machine.json",
            "results.jsonl",
            "results.csv",
            "throughput.svg",
            "latency.svg",
        ] {
            let body = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(!body.is_empty(), "{f} is empty");
            if f.ends_with(".svg") {
                assert!(body.contains("<svg"), "{f}");
                assert!(body.contains("<polyline"), "{f} has no line");
            }
        }
        let jsonl = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
        assert_eq!(v["workload"], "im");
        // A second run in the same second gets its own directory.
        let again = write(root.path(), "im", &[], &facts, &Extras::default()).unwrap();
        assert_ne!(dir, again);
    }
}
