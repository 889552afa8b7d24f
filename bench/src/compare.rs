//! `compare`: one workload on several targets back to back, in one process
//! run, with the same seed and flags, on one machine (figures from
//! different machines never meet in one table: a comparison is only ever
//! made inside one run). Prints each figure with its ratio to the first
//! target and writes `results/<UTC time>-compare-<workload>/`:
//! `results.jsonl` (every line, tagged with its sweep point), `compare.csv`
//! (figure, point, target, value, ratio), `machine.json`, `command.txt`,
//! and with `--sweep` a `sweep.svg` (each figure against the swept value,
//! one line per target).

use crate::{results, sysinfo, Cli, Target};
use clap::{Args, CommandFactory, FromArgMatches, ValueEnum};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Targets in order; the first is the reference of every ratio.
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    pub targets: Vec<Target>,
    /// Sweep one numeric flag of the workload: `name=v1,v2,...` (e.g.
    /// `batch=1,16,64`): one comparison per value.
    #[arg(long, value_name = "FLAG=V1,V2,...")]
    pub sweep: Option<String>,
    /// Where the results directory goes.
    #[arg(long, value_name = "DIR", default_value = "results")]
    pub results: PathBuf,
    /// The workload and its flags, e.g. `append --batch 64` (not
    /// `--target`: that is `--targets`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub workload: Vec<String>,
}

/// The figures compared, by JSON field, and whether lower is better.
const FIGURES: &[(&str, bool)] = &[
    ("ops_per_sec", false),
    ("messages_per_sec", false),
    ("deliveries_per_sec", false),
    ("sync_ops_per_sec", false),
    ("p50_us", true),
    ("p99_us", true),
    ("p999_us", true),
    ("cpu_us_per_message", true),
    ("cpu_us_per_delivery", true),
    ("cpu_us_per_sync", true),
    ("process_cpu_us_per_message", true),
    ("bytes_per_delivery", true),
    ("fsyncs_per_message", true),
    ("write_amplification", true),
    // Not peak RSS: in one process, an in-process target's peak includes
    // every earlier run's.
];

/// One run's lines: at sweep point `point` (the swept value), on `target`.
struct Run {
    point: Option<String>,
    target: Target,
    lines: Vec<serde_json::Value>,
}

fn target_name(t: Target) -> String {
    t.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// `name=v1,v2` into the flag and its values (each must be a number).
fn parse_sweep(s: &str) -> crate::Result<(String, Vec<String>)> {
    let (name, values) = s
        .split_once('=')
        .ok_or_else(|| format!("--sweep {s:?}: expected FLAG=V1,V2,..."))?;
    let name = name.trim_start_matches("--").to_string();
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
    if values.is_empty() || values.iter().any(|v| v.parse::<f64>().is_err()) {
        return Err(format!("--sweep {s:?}: the values must be numbers").into());
    }
    Ok((name, values))
}

/// The workload's command line for one point and target.
fn args_for(
    workload: &[String],
    target: Target,
    sweep: Option<(&str, &str)>,
) -> crate::Result<Vec<String>> {
    if workload
        .iter()
        .any(|a| a == "--target" || a.starts_with("--target="))
    {
        return Err("compare: give the targets with --targets, not the workload's --target".into());
    }
    if workload
        .iter()
        .any(|a| a == "--dir" || a.starts_with("--dir="))
    {
        // One directory would be shared by every target and point: a later
        // run would find the earlier one's data (and `read` skip its load).
        return Err(
            "compare: --dir is not allowed; each run gets a fresh temporary directory".into(),
        );
    }
    let mut args = vec!["timeline-bench".to_string()];
    args.extend(workload.iter().cloned());
    args.extend(["--target".to_string(), target_name(target)]);
    if let Some((name, v)) = sweep {
        let flag = format!("--{name}");
        if workload
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        {
            return Err(
                format!("compare: {flag} is swept; leave it out of the workload's flags").into(),
            );
        }
        args.extend([flag, v.to_string()]);
    }
    Ok(args)
}

/// Run every point on every target; returns the total verification errors.
pub fn run(c: &CompareArgs) -> crate::Result<u64> {
    let sweep = c.sweep.as_deref().map(parse_sweep).transpose()?;
    let points: Vec<Option<String>> = match &sweep {
        Some((_, vs)) => vs.iter().cloned().map(Some).collect(),
        None => vec![None],
    };
    let machine = sysinfo::Machine::detect();
    let facts = results::Facts::measure(&machine, &std::env::temp_dir(), 20);
    eprintln!("{}", facts.describe());
    let mut runs = Vec::new();
    let mut errors = 0;
    for point in &points {
        for &target in &c.targets {
            let sw = sweep
                .as_ref()
                .zip(point.as_deref())
                .map(|((n, _), v)| (n.as_str(), v));
            let args = args_for(&c.workload, target, sw)?;
            eprintln!("compare: {}", args[1..].join(" "));
            let m = Cli::command().try_get_matches_from(&args)?;
            if let Some(e) = crate::inapplicable(&m) {
                return Err(e.into());
            }
            let cli = Cli::from_arg_matches(&m)?;
            if matches!(cli.cmd, crate::Cmd::Compare(_)) {
                return Err("compare cannot compare compare".into());
            }
            let (rep, e) = crate::execute(&cli.cmd, false)
                .map_err(|e| format!("{} on {}: {e}", args[1], target_name(target)))?;
            errors += e;
            let lines = rep
                .lines()
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            runs.push(Run {
                point: point.clone(),
                target,
                lines,
            });
        }
    }
    let table = ratio_table(&runs, &c.targets);
    let text = render(&table, sweep.as_ref().map(|(n, _)| n.as_str()));
    timeline_client::outln!("{}", text.trim_end_matches('\n'));
    let dir = write(c, &runs, &table, &facts, sweep.as_ref())?;
    eprintln!("results: {}", dir.display());
    Ok(errors)
}

/// One cell of the comparison: a figure of line `line` at `point` on
/// `target`, with its ratio to the first target's.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub point: Option<String>,
    pub line: String,
    pub figure: &'static str,
    pub target: String,
    pub value: f64,
    pub ratio: Option<f64>,
}

fn label(v: &serde_json::Value) -> String {
    let mut l = v["workload"].as_str().unwrap_or("?").to_string();
    for k in ["phase", "direction", "fanout_mode"] {
        if let Some(p) = v[k].as_str() {
            l.push(' ');
            l.push_str(p);
        }
    }
    l
}

/// The cells of every figure present in the reference target's lines.
/// Lines are matched by position (a workload prints the same lines on
/// every target).
fn ratio_table(runs: &[Run], targets: &[Target]) -> Vec<Cell> {
    let mut cells = Vec::new();
    let mut points: Vec<&Option<String>> = Vec::new();
    for r in runs {
        if !points.contains(&&r.point) {
            points.push(&r.point);
        }
    }
    for point in points {
        let at: Vec<&Run> = runs.iter().filter(|r| &r.point == point).collect();
        let Some(reference) = at.iter().find(|r| Some(&r.target) == targets.first()) else {
            continue;
        };
        for base in &reference.lines {
            let name = label(base);
            for &(figure, _) in FIGURES {
                let Some(b) = base[figure].as_f64() else {
                    continue;
                };
                for r in &at {
                    // The same line (workload, phase, direction, mode) of
                    // this target, never one at the same position.
                    let Some(line) = r.lines.iter().find(|l| label(l) == name) else {
                        continue;
                    };
                    let Some(v) = line[figure].as_f64() else {
                        continue;
                    };
                    // CPU figures divide only when both measure the same
                    // thing (server process, storage threads, whole process).
                    // `process_cpu_*` is the whole process's on both sides.
                    let comparable =
                        !figure.starts_with("cpu_") || line["cpu_basis"] == base["cpu_basis"];
                    cells.push(Cell {
                        point: point.clone(),
                        line: name.clone(),
                        figure,
                        target: target_name(r.target),
                        value: v,
                        ratio: (b != 0.0 && comparable).then(|| v / b),
                    });
                }
            }
        }
    }
    cells
}

/// The table as text: one row per (point, line, figure), one column per target.
pub fn render(cells: &[Cell], sweep: Option<&str>) -> String {
    let mut targets: Vec<&str> = Vec::new();
    for c in cells {
        if !targets.contains(&c.target.as_str()) {
            targets.push(&c.target);
        }
    }
    let mut out = String::new();
    let mut rows: Vec<(&Option<String>, &str, &str)> = Vec::new();
    for c in cells {
        let k = (&c.point, c.line.as_str(), c.figure);
        if !rows.contains(&k) {
            rows.push(k);
        }
    }
    let head: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    out.push_str(&format!(
        "{:<28} {}\n",
        match sweep {
            Some(n) => format!("{n} / line / figure"),
            None => "line / figure".into(),
        },
        head.iter().map(|h| format!("{h:>24}")).collect::<String>()
    ));
    for (point, line, figure) in rows {
        let name = match point {
            Some(p) => format!("{p} {line} {figure}"),
            None => format!("{line} {figure}"),
        };
        let mut row = format!("{name:<28} ");
        for t in &targets {
            let cell = cells.iter().find(|c| {
                &c.point == point && c.line == line && c.figure == figure && c.target == *t
            });
            let s = match cell {
                Some(c) => match c.ratio {
                    Some(r) if c.target != targets[0] => format!("{} ({r:.2}x)", num(c.value)),
                    _ => num(c.value),
                },
                None => "-".into(),
            };
            row.push_str(&format!("{s:>24}"));
        }
        out.push_str(row.trim_end());
        out.push('\n');
    }
    out
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn write(
    c: &CompareArgs,
    runs: &[Run],
    cells: &[Cell],
    facts: &results::Facts,
    sweep: Option<&(String, Vec<String>)>,
) -> crate::Result<PathBuf> {
    let workload = c.workload.first().map(String::as_str).unwrap_or("?");
    let dir = results::new_dir(&c.results, &format!("compare-{workload}"))?;
    let args: Vec<String> = std::env::args().collect();
    std::fs::write(dir.join("command.txt"), args.join(" ") + "\n")?;
    std::fs::write(
        dir.join("machine.json"),
        serde_json::to_string_pretty(facts)? + "\n",
    )?;
    let mut jsonl = String::new();
    for r in runs {
        for l in &r.lines {
            let mut l = l.clone();
            if let (Some((name, _)), Some(p)) = (sweep, &r.point) {
                l["sweep_flag"] = serde_json::json!(name);
                l["sweep_value"] = serde_json::json!(p);
            }
            jsonl.push_str(&l.to_string());
            jsonl.push('\n');
        }
    }
    std::fs::write(dir.join("results.jsonl"), jsonl)?;
    let rows: Vec<serde_json::Value> = cells
        .iter()
        .map(|c| {
            serde_json::json!({
                "sweep_value": c.point, "line": c.line, "figure": c.figure,
                "target": c.target, "value": c.value, "ratio": c.ratio,
            })
        })
        .collect();
    std::fs::write(dir.join("compare.csv"), results::csv(&rows))?;
    std::fs::write(
        dir.join("compare.txt"),
        render(cells, sweep.map(|(n, _)| n.as_str())),
    )?;
    if let Some((name, _)) = sweep {
        plot_sweep(&dir.join("sweep.svg"), name, cells)?;
    }
    Ok(dir)
}

/// One panel per (line, figure) of the first line's figures: value against
/// the swept flag, one line per target.
fn plot_sweep(path: &Path, flag: &str, cells: &[Cell]) -> crate::Result<()> {
    let err = |e: &dyn std::fmt::Display| -> crate::BoxError {
        format!("drawing {}: {e}", path.display()).into()
    };
    let mut panels: Vec<(&str, &str)> = Vec::new();
    for c in cells {
        if !panels.contains(&(c.line.as_str(), c.figure)) {
            panels.push((&c.line, c.figure));
        }
    }
    let mut targets: Vec<&str> = Vec::new();
    for c in cells {
        if !targets.contains(&c.target.as_str()) {
            targets.push(&c.target);
        }
    }
    let root = SVGBackend::new(path, (900, 260 * panels.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, (line, figure)) in root
        .split_evenly((panels.len().max(1), 1))
        .iter()
        .zip(&panels)
    {
        let pts = |t: &str| -> Vec<(f64, f64)> {
            cells
                .iter()
                .filter(|c| c.line == *line && c.figure == *figure && c.target == t)
                .filter_map(|c| Some((c.point.as_ref()?.parse().ok()?, c.value)))
                .collect()
        };
        let all: Vec<(f64, f64)> = targets.iter().flat_map(|t| pts(t)).collect();
        let (x0, x1) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1 + 1e-9;
        let (x0, x1) = if x0 < x1 {
            (x0, x1)
        } else {
            (x0 - 1.0, x0 + 1.0)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{line}: {figure}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, 0f64..ymax)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(format!("--{flag}"))
            .y_desc(*figure)
            .y_label_formatter(&|v| num(*v))
            .draw()
            .map_err(|e| err(&e))?;
        let lines: Vec<(&str, Vec<(f64, f64)>)> = targets.iter().map(|t| (*t, pts(t))).collect();
        results::draw_lines(&mut chart, &lines, true)?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(point: Option<&str>, target: Target, ops: f64, p99: f64) -> Run {
        Run {
            point: point.map(String::from),
            target,
            lines: vec![
                serde_json::json!({"workload": "append", "ops_per_sec": ops, "p99_us": p99}),
            ],
        }
    }

    #[test]
    fn ratios_are_to_the_first_target_at_each_point() {
        let runs = vec![
            run(Some("1"), Target::Engine, 100.0, 10.0),
            run(Some("1"), Target::Redis, 25.0, 40.0),
            run(Some("64"), Target::Engine, 400.0, 20.0),
            run(Some("64"), Target::Redis, 40.0, 20.0),
        ];
        let cells = ratio_table(&runs, &[Target::Engine, Target::Redis]);
        let get = |p: &str, f: &str, t: &str| {
            cells
                .iter()
                .find(|c| c.point.as_deref() == Some(p) && c.figure == f && c.target == t)
                .unwrap()
                .ratio
                .unwrap()
        };
        assert_eq!(get("1", "ops_per_sec", "redis"), 0.25);
        assert_eq!(get("1", "p99_us", "redis"), 4.0);
        assert_eq!(get("64", "ops_per_sec", "redis"), 0.1);
        assert_eq!(get("64", "ops_per_sec", "engine"), 1.0);
        let text = render(&cells, Some("batch"));
        assert!(
            text.contains("(0.25x)") && text.contains("(0.10x)"),
            "{text}"
        );
    }

    #[test]
    fn sweep_and_target_flags_are_checked() {
        assert!(parse_sweep("batch=1,16,64").is_ok());
        assert!(parse_sweep("batch=1,x").is_err());
        assert!(parse_sweep("batch").is_err());
        let w = vec!["append".to_string(), "--batch".into(), "4".into()];
        assert!(args_for(&w, Target::Engine, Some(("batch", "8"))).is_err());
        let w2 = vec!["append".to_string(), "--target".into(), "redis".into()];
        assert!(args_for(&w2, Target::Engine, None).is_err());
        let a = args_for(&w[..1], Target::Redis, Some(("batch", "8"))).unwrap();
        assert_eq!(
            a,
            [
                "timeline-bench",
                "append",
                "--target",
                "redis",
                "--batch",
                "8"
            ]
        );
    }
}
