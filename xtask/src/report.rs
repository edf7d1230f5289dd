//! The benchmark report: target/bench/report.md (a table of every number in results.json with
//! its baseline and ratio where one exists) and SVG plots drawn here (no plotting dependency):
//! the ratios against their baselines, and one plot per raw sample file in
//! target/bench/samples/ (a histogram for `values`, a line for a `timeline`).
//!
//! Sample file format (what benchmark programs write, or print in the VM as one
//! `bench-samples: <json>` line which xtask stores): `{"name": "agent_rekey_ms", "unit": "ms",
//! "values": [..]}` or `{"name": ..., "unit": ..., "timeline": [[t_seconds, value], ..]}`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// One raw sample file.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub name: String,
    pub unit: String,
    pub data: SampleData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SampleData {
    Values(Vec<f64>),
    Timeline(Vec<(f64, f64)>),
}

/// A file name safe for `name` (letters, digits, `_`, `-`, `.`).
pub fn safe_name(name: &str) -> Result<String> {
    if name.is_empty()
        || name.len() > 100
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        bail!("sample name {name:?} must be 1-100 of [A-Za-z0-9_.-], not starting with '.'");
    }
    Ok(name.to_owned())
}

pub fn parse_samples(text: &str) -> Result<Samples> {
    let v: Value = serde_json::from_str(text).context("sample file is not JSON")?;
    let name = v["name"]
        .as_str()
        .context("sample file lacks a string \"name\"")?;
    let name = safe_name(name)?;
    let unit = v["unit"].as_str().unwrap_or("").to_owned();
    let num = |x: &Value| {
        x.as_f64()
            .with_context(|| format!("{name}: {x} is not a number"))
    };
    let data = if let Some(vals) = v["values"].as_array() {
        SampleData::Values(vals.iter().map(num).collect::<Result<_>>()?)
    } else if let Some(tl) = v["timeline"].as_array() {
        SampleData::Timeline(
            tl.iter()
                .map(|p| match p.as_array().map(Vec::as_slice) {
                    Some([t, y]) => Ok((num(t)?, num(y)?)),
                    _ => bail!("{name}: timeline point {p} is not [t, value]"),
                })
                .collect::<Result<_>>()?,
        )
    } else {
        bail!("{name}: sample file has neither \"values\" nor \"timeline\"");
    };
    Ok(Samples { name, unit, data })
}

/// Stores a sample object (from a `bench-samples:` line) as samples/<name>.json.
pub fn store_samples(dir: &Path, json: &str) -> Result<String> {
    let s = parse_samples(json)?;
    fs::create_dir_all(dir)?;
    fs::write(dir.join(format!("{}.json", s.name)), json.trim())?;
    Ok(s.name)
}

/// Baselines that the naming rule below cannot find (docs/testing.md names them).
const EXPLICIT_BASELINES: &[(&str, &str)] = &[
    // The agent's whole rollover against the kernel-layer switch alone.
    ("agent.rekey_ms_p50", "macsec.rollover_ms_p50"),
    ("agent.rekey_ms_p99", "macsec.rollover_ms_p50"),
    // Our netlink layer against `ip macsec`.
    ("macsec.rollover_ms_p50", "macsec.ip_cli_rollover_ms_p50"),
    // Under 16 concurrent requests against one at a time.
    ("kme.enc_dec_p99_ms_c16", "kme.enc_dec_p99_ms"),
    ("kme.keys_per_s_c16", "kme.keys_per_s_c1"),
    // The eBPF programs with their log records enabled against the same paths without (the
    // agent's default): what aya-log costs where.
    ("xdp.macsec_log_debug_ns_per_pkt", "xdp.macsec_ns_per_pkt"),
    ("tc.macsec_log_debug_ns_per_pkt", "tc.macsec_ns_per_pkt"),
    (
        "xdp.macsec_malformed_log_debug_ns_per_pkt",
        "xdp.macsec_malformed_ns_per_pkt",
    ),
    (
        "xdp.lldp_rate_limited_log_debug_ns_per_pkt",
        "xdp.lldp_rate_limited_ns_per_pkt",
    ),
    ("xdp.verified_insns_log_debug", "xdp.verified_insns"),
    ("xdp.xlated_insns_log_debug", "xdp.xlated_insns"),
    ("tc.verified_insns_log_debug", "tc.verified_insns"),
    ("tc.xlated_insns_log_debug", "tc.xlated_insns"),
];

/// The baseline key of `key` in `all`, if any: an [`EXPLICIT_BASELINES`] entry, or `<key>_baseline`, or within the same area a
/// `baseline_<suffix>` key whose suffix ends `key` (`xdp.baseline_ns_per_pkt` for
/// `xdp.macsec_ns_per_pkt`).
pub fn baseline_of<'a>(key: &str, all: &'a BTreeMap<String, Value>) -> Option<&'a str> {
    if let Some((_, b)) = EXPLICIT_BASELINES.iter().find(|(k, _)| *k == key) {
        if let Some((k, _)) = all.get_key_value(*b) {
            return Some(k);
        }
    }
    if key.contains("baseline") || key.contains("ratio") || key.contains("over_baseline") {
        return None;
    }
    let direct = format!("{key}_baseline");
    if let Some((k, _)) = all.get_key_value(&direct) {
        return Some(k);
    }
    let (area, name) = key.split_once('.')?;
    all.keys()
        .filter_map(|k| {
            let (a, n) = k.split_once('.')?;
            let suffix = n.strip_prefix("baseline_")?;
            (a == area && name.ends_with(suffix) && name != n).then_some(k.as_str())
        })
        .max_by_key(|k| k.len())
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Two decimals, or three significant digits in exponent form for small ratios (0.00 would hide
/// a 2000-fold speed-up).
fn fmt_ratio(r: f64) -> String {
    if r.abs() >= 0.01 || r == 0.0 {
        format!("{r:.2}")
    } else {
        format!("{r:.2e}")
    }
}

/// Renders report.md's text (plots are referenced relative to the report).
pub fn render_markdown(
    results: &BTreeMap<String, Value>,
    plots: &[(String, String)],
    errors: &[(String, String)],
) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Benchmark report\n");
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench` from `target/bench/results.json`. Ratios are against a \
         baseline measured in the same run (speed targets are judged on ratios, never on absolute \
         times: the VM is emulated).\n"
    );
    if !errors.is_empty() {
        let _ = writeln!(o, "## Failed or missing areas\n");
        for (area, e) in errors {
            let _ = writeln!(o, "- **{area}**: {e}");
        }
        o.push('\n');
    }
    let mut areas: BTreeMap<&str, Vec<(&String, &Value)>> = BTreeMap::new();
    // `bench.<area>.error` entries are listed above, not as numbers.
    for (k, v) in results.iter().filter(|(k, _)| !k.starts_with("bench.")) {
        let area = k.split_once('.').map_or(k.as_str(), |(a, _)| a);
        areas.entry(area).or_default().push((k, v));
    }
    for (area, rows) in areas {
        let _ = writeln!(o, "## {area}\n");
        let _ = writeln!(o, "| metric | value | baseline | ratio |");
        let _ = writeln!(o, "|---|---:|---:|---:|");
        for (k, v) in rows {
            let (val, base, ratio) = match v.as_f64() {
                Some(x) => {
                    match baseline_of(k, results).and_then(|b| Some((b, results[b].as_f64()?))) {
                        Some((bk, b)) if b != 0.0 => (
                            fmt_num(x),
                            format!("{} (`{bk}`)", fmt_num(b)),
                            fmt_ratio(x / b),
                        ),
                        _ => (fmt_num(x), String::new(), String::new()),
                    }
                }
                None => (
                    v.to_string().trim_matches('"').to_owned(),
                    String::new(),
                    String::new(),
                ),
            };
            let _ = writeln!(o, "| `{k}` | {val} | {base} | {ratio} |");
        }
        o.push('\n');
    }
    if !plots.is_empty() {
        let _ = writeln!(o, "## Plots\n");
        for (title, file) in plots {
            let _ = writeln!(o, "### {title}\n\n![{title}]({file})\n");
        }
    }
    o
}

// ---------------- SVG ----------------

const W: f64 = 640.0;
const H: f64 = 360.0;
const ML: f64 = 70.0;
const MR: f64 = 20.0;
const MT: f64 = 40.0;
const MB: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn svg_open(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        esc(title)
    )
}

/// Axes with 5 ticks on each; returns the plot's transform closures' parameters.
fn axes(o: &mut String, x: (f64, f64), y: (f64, f64), xlabel: &str, ylabel: &str) {
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    let _ = writeln!(
        o,
        "<line x1=\"{ML}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        MT + ph,
        ML + pw,
        MT + ph
    );
    let _ = writeln!(
        o,
        "<line x1=\"{ML}\" y1=\"{MT}\" x2=\"{ML}\" y2=\"{}\" stroke=\"black\"/>",
        MT + ph
    );
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let xv = x.0 + f * (x.1 - x.0);
        let px = ML + f * pw;
        let _ = writeln!(
            o,
            "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"black\"/><text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            MT + ph,
            MT + ph + 5.0,
            MT + ph + 18.0,
            fmt_num(xv)
        );
        let yv = y.0 + f * (y.1 - y.0);
        let py = MT + ph - f * ph;
        let _ = writeln!(
            o,
            "<line x1=\"{}\" y1=\"{py:.1}\" x2=\"{ML}\" y2=\"{py:.1}\" stroke=\"black\"/><line x1=\"{ML}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            ML - 5.0,
            ML + pw,
            ML - 8.0,
            py + 4.0,
            fmt_num(yv)
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        ML + pw / 2.0,
        H - 10.0,
        esc(xlabel)
    );
    let _ = writeln!(
        o,
        "<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>",
        MT + ph / 2.0,
        MT + ph / 2.0,
        esc(ylabel)
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// A histogram of `values` (20 bins) with p50 and p99 marked.
pub fn histogram_svg(title: &str, unit: &str, values: &[f64]) -> String {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let mut o = svg_open(&format!("{title} (n = {})", v.len()));
    if v.is_empty() {
        o.push_str("<text x=\"320\" y=\"180\" text-anchor=\"middle\">no samples</text>\n</svg>\n");
        return o;
    }
    let (lo, hi) = (v[0], v[v.len() - 1]);
    let span = if hi > lo { hi - lo } else { 1.0 };
    const BINS: usize = 20;
    let mut counts = [0usize; BINS];
    for x in &v {
        let b = (((x - lo) / span) * BINS as f64).floor() as usize;
        counts[b.min(BINS - 1)] += 1;
    }
    let max = *counts.iter().max().unwrap_or(&1) as f64;
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    axes(&mut o, (lo, lo + span), (0.0, max), unit, "count");
    for (i, c) in counts.iter().enumerate() {
        let h = *c as f64 / max * ph;
        let _ = writeln!(
            o,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#4a7fb5\"/>",
            ML + i as f64 * pw / BINS as f64 + 1.0,
            MT + ph - h,
            pw / BINS as f64 - 2.0
        );
    }
    for (label, p, color) in [("p50", 0.5, "#2a2"), ("p99", 0.99, "#c22")] {
        let x = percentile(&v, p);
        let px = ML + (x - lo) / span * pw;
        let _ = writeln!(
            o,
            "<line x1=\"{px:.1}\" y1=\"{MT}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{}\" fill=\"{color}\">{label} {} {}</text>",
            MT + ph,
            px + 3.0,
            MT + 12.0 + if p > 0.9 { 14.0 } else { 0.0 },
            fmt_num(x),
            esc(unit)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// A line through `points` (t, value).
pub fn timeline_svg(title: &str, unit: &str, points: &[(f64, f64)]) -> String {
    let mut o = svg_open(title);
    let p: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|(t, y)| t.is_finite() && y.is_finite())
        .collect();
    if p.is_empty() {
        o.push_str("<text x=\"320\" y=\"180\" text-anchor=\"middle\">no samples</text>\n</svg>\n");
        return o;
    }
    let (t0, t1) = p.iter().fold((f64::MAX, f64::MIN), |(a, b), (t, _)| {
        (a.min(*t), b.max(*t))
    });
    let (y0, y1) = p
        .iter()
        .fold((0.0f64, f64::MIN), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
    let (tspan, yspan) = ((t1 - t0).max(1e-9), (y1 - y0).max(1e-9));
    let (pw, ph) = (W - ML - MR, H - MT - MB);
    axes(&mut o, (t0, t0 + tspan), (y0, y0 + yspan), "time (s)", unit);
    let pts: Vec<String> = p
        .iter()
        .map(|(t, y)| {
            format!(
                "{:.1},{:.1}",
                ML + (t - t0) / tspan * pw,
                MT + ph - (y - y0) / yspan * ph
            )
        })
        .collect();
    let _ = writeln!(
        o,
        "<polyline fill=\"none\" stroke=\"#4a7fb5\" stroke-width=\"1.5\" points=\"{}\"/>",
        pts.join(" ")
    );
    o.push_str("</svg>\n");
    o
}

/// Horizontal bars: each metric's ratio to its baseline, with a line at 1.
pub fn ratios_svg(rows: &[(String, f64)]) -> String {
    let h = MT + 24.0 * rows.len().max(1) as f64 + 30.0;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Ratio to the baseline measured in the same run</text>\n",
        W / 2.0
    );
    let left = 290.0;
    let pw = W - left - 60.0;
    let max = rows.iter().map(|(_, r)| *r).fold(1.0f64, f64::max);
    let px1 = left + pw / max;
    for (i, (k, r)) in rows.iter().enumerate() {
        let y = MT + 24.0 * i as f64;
        let w = (r / max * pw).max(0.5);
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"16\" fill=\"#4a7fb5\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            left - 6.0,
            y + 12.0,
            esc(k),
            left + w + 4.0,
            y + 12.0,
            fmt_ratio(*r)
        );
    }
    let _ = writeln!(
        o,
        "<line x1=\"{px1:.1}\" y1=\"{MT}\" x2=\"{px1:.1}\" y2=\"{:.1}\" stroke=\"#c22\" stroke-dasharray=\"4 3\"/><text x=\"{px1:.1}\" y=\"{:.1}\" fill=\"#c22\" text-anchor=\"middle\">1.0</text>",
        h - 25.0,
        h - 10.0
    );
    o.push_str("</svg>\n");
    o
}

/// Writes report.md and plots/*.svg into `bench_dir` from results.json and samples/.
/// Returns the report's path.
pub fn write_report(bench_dir: &Path, errors: &[(String, String)]) -> Result<std::path::PathBuf> {
    let results: BTreeMap<String, Value> = match fs::read_to_string(bench_dir.join("results.json"))
    {
        Ok(s) => serde_json::from_str(&s).context("results.json is not a flat JSON object")?,
        Err(_) => BTreeMap::new(),
    };
    let plots_dir = bench_dir.join("plots");
    fs::create_dir_all(&plots_dir)?;
    let mut plots = Vec::new();
    let ratios: Vec<(String, f64)> = results
        .iter()
        .filter_map(|(k, v)| {
            let b = baseline_of(k, &results)?;
            let (x, y) = (v.as_f64()?, results[b].as_f64()?);
            (y != 0.0).then(|| (k.clone(), x / y))
        })
        .collect();
    if !ratios.is_empty() {
        fs::write(plots_dir.join("ratios.svg"), ratios_svg(&ratios))?;
        plots.push((
            "Ratios to baselines".to_owned(),
            "plots/ratios.svg".to_owned(),
        ));
    }
    let mut sample_files: Vec<_> = fs::read_dir(bench_dir.join("samples"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_else(|_| Vec::new());
    sample_files.sort();
    let mut errors = errors.to_vec();
    for p in sample_files
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
    {
        let parsed = fs::read_to_string(p)
            .map_err(anyhow::Error::from)
            .and_then(|t| parse_samples(&t));
        let s = match parsed {
            Ok(s) => s,
            Err(e) => {
                errors.push((p.display().to_string(), format!("{e:#}")));
                continue;
            }
        };
        let (svg, title) = match &s.data {
            SampleData::Values(v) => (
                histogram_svg(&s.name, &s.unit, v),
                format!("{} distribution", s.name),
            ),
            SampleData::Timeline(t) => (
                timeline_svg(&s.name, &s.unit, t),
                format!("{} over time", s.name),
            ),
        };
        let file = format!("plots/{}.svg", s.name);
        fs::write(bench_dir.join(&file), svg)?;
        plots.push((title, file));
    }
    let md = render_markdown(&results, &plots, &errors);
    let path = bench_dir.join("report.md");
    fs::write(&path, md)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> BTreeMap<String, Value> {
        serde_json::from_str(
            r#"{"xdp.macsec_ns_per_pkt": 53.0, "xdp.baseline_ns_per_pkt": 33.0,
                "xdp.macsec_over_baseline_ns": 20.0,
                "agent.cpu_idle_pct": 80.0, "agent.cpu_idle_pct_baseline": 100.0,
                "kme.enc_keys_ratio": 0.5, "macsec.cipher": "gcm-aes-256"}"#,
        )
        .unwrap()
    }

    #[test]
    fn baselines_are_found_by_name() {
        let r = results();
        assert_eq!(
            baseline_of("xdp.macsec_ns_per_pkt", &r),
            Some("xdp.baseline_ns_per_pkt")
        );
        assert_eq!(
            baseline_of("agent.cpu_idle_pct", &r),
            Some("agent.cpu_idle_pct_baseline")
        );
        assert_eq!(baseline_of("xdp.baseline_ns_per_pkt", &r), None);
        assert_eq!(baseline_of("xdp.macsec_over_baseline_ns", &r), None);
        assert_eq!(baseline_of("kme.enc_keys_ratio", &r), None);
        let mut r = r;
        r.insert("agent.rekey_ms_p50".into(), 40.0.into());
        assert_eq!(
            baseline_of("agent.rekey_ms_p50", &r),
            None,
            "baseline absent"
        );
        r.insert("macsec.rollover_ms_p50".into(), 10.0.into());
        assert_eq!(
            baseline_of("agent.rekey_ms_p50", &r),
            Some("macsec.rollover_ms_p50")
        );
    }

    #[test]
    fn markdown_lists_every_metric_with_ratio_and_errors() {
        let r = results();
        let md = render_markdown(
            &r,
            &[("Ratios".into(), "plots/ratios.svg".into())],
            &[("macsec".into(), "VM benchmark exited with status 1".into())],
        );
        for k in r.keys() {
            assert!(md.contains(&format!("`{k}`")), "{k} missing:\n{md}");
        }
        assert!(
            md.contains("| `xdp.macsec_ns_per_pkt` | 53 | 33 (`xdp.baseline_ns_per_pkt`) | 1.61 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| `agent.cpu_idle_pct` | 80 | 100 (`agent.cpu_idle_pct_baseline`) | 0.80 |"
            ),
            "{md}"
        );
        assert!(md.contains("| `macsec.cipher` | gcm-aes-256 |"), "{md}");
        assert_eq!(fmt_ratio(2.149 / 4086.5), "5.26e-4");
        assert!(
            md.contains("- **macsec**: VM benchmark exited with status 1"),
            "{md}"
        );
        assert!(md.contains("![Ratios](plots/ratios.svg)"), "{md}");
    }

    /// Well-formed SVG (every element closed) with the data in it.
    fn check_svg(svg: &str) {
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.trim_end().ends_with("</svg>"));
        let opens = svg.matches("<svg").count();
        assert_eq!(opens, 1);
        // Each non-self-closing text element is closed.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn histogram_counts_every_sample_and_marks_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let svg = histogram_svg("rekey <ms>", "ms", &v);
        check_svg(&svg);
        assert!(svg.contains("rekey &lt;ms&gt; (n = 100)"), "{svg}");
        assert_eq!(svg.matches("<rect x=").count(), 20, "20 bins");
        assert!(svg.contains("p50 51 ms"), "{svg}");
        assert!(svg.contains("p99 99 ms"), "{svg}");
        // All bins equally full: every bar has the full height.
        let full = svg.matches("height=\"270.0\"").count();
        assert_eq!(full, 20, "{svg}");
        check_svg(&histogram_svg("empty", "ms", &[]));
    }

    #[test]
    fn timeline_and_ratio_plots() {
        let svg = timeline_svg(
            "rollovers",
            "count",
            &[(0.0, 0.0), (10.0, 5.0), (20.0, 10.0)],
        );
        check_svg(&svg);
        // First point bottom-left of the plot area, last top-right.
        assert!(
            svg.contains(&format!("points=\"{ML:.1},{:.1} ", H - MB)),
            "{svg}"
        );
        assert!(svg.contains(&format!(" {:.1},{MT:.1}\"", W - MR)), "{svg}");
        let svg = ratios_svg(&[("a.x".into(), 2.0), ("a.y".into(), 0.5)]);
        check_svg(&svg);
        assert!(svg.contains(">2.00<") && svg.contains(">0.50<"), "{svg}");
    }

    #[test]
    fn sample_files_parse_or_say_why_not() {
        let s = parse_samples(r#"{"name":"agent_rekey_ms","unit":"ms","values":[1,2.5]}"#).unwrap();
        assert_eq!(s.data, SampleData::Values(vec![1.0, 2.5]));
        let t = parse_samples(r#"{"name":"t","unit":"","timeline":[[0,1],[1,2]]}"#).unwrap();
        assert_eq!(t.data, SampleData::Timeline(vec![(0.0, 1.0), (1.0, 2.0)]));
        for (bad, why) in [
            (r#"{"unit":"ms","values":[]}"#, "name"),
            (r#"{"name":"../x","values":[]}"#, "must be"),
            (r#"{"name":"x","values":["a"]}"#, "not a number"),
            (r#"{"name":"x","timeline":[[1]]}"#, "not [t, value]"),
            (r#"{"name":"x"}"#, "neither"),
        ] {
            let e = format!("{:#}", parse_samples(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn report_is_written_from_files() {
        let dir = std::env::temp_dir().join(format!("qkd-report-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("samples")).unwrap();
        fs::write(
            dir.join("results.json"),
            serde_json::to_string(&results()).unwrap(),
        )
        .unwrap();
        store_samples(
            &dir.join("samples"),
            r#"{"name":"agent_rekey_ms","unit":"ms","values":[3,4,5]}"#,
        )
        .unwrap();
        fs::write(dir.join("samples/broken.json"), "{").unwrap();
        let p = write_report(&dir, &[]).unwrap();
        let md = fs::read_to_string(p).unwrap();
        assert!(
            md.contains("![agent_rekey_ms distribution](plots/agent_rekey_ms.svg)"),
            "{md}"
        );
        assert!(
            md.contains("broken.json"),
            "a bad sample file is reported:\n{md}"
        );
        assert!(dir.join("plots/ratios.svg").is_file());
        assert!(fs::read_to_string(dir.join("plots/agent_rekey_ms.svg"))
            .unwrap()
            .contains("n = 3"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
