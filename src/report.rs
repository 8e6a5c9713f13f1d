//! `wukong report RUN_DIR…`: pictures of runs. Learning curves (validation AUC and LogLoss, train
//! LogLoss, per evaluation, against examples seen), the ROC curve and a reliability diagram
//! (predicted against observed click rate) on each run's test split, several runs overlaid on
//! one plot; and a self-contained HTML page with the pictures (embedded), each run's metrics,
//! config and environment.

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

use crate::train::checkpoint;

/// The bundled font (DejaVu Sans, `assets/fonts`, Bitstream Vera licence): text renders the same
/// on every machine, with no system font library.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TTF (checked by the report test); a failure would only mean no text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// What a report needs from one finished run.
pub struct RunView {
    pub dir: PathBuf,
    pub label: String,
    pub config: String,
    pub env: serde_json::Value,
    pub result: serde_json::Value,
    /// `metrics.jsonl`, one object per evaluation.
    pub evals: Vec<serde_json::Value>,
    /// (probability, label) on the scored split; empty when it could not be scored.
    pub scores: Vec<(f64, bool)>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

impl RunView {
    /// Reads a finished run directory and scores `data` (default: its test split) with its best
    /// weights.
    pub fn load(dir: &Path, data: Option<PathBuf>, device: &str) -> Result<Self> {
        let config =
            std::fs::read_to_string(dir.join(checkpoint::CONFIG)).with_context(|| format!("{} is not a run directory", dir.display()))?;
        let result = read_json(&dir.join(checkpoint::RESULT)).context("did the run finish?")?;
        let env = read_json(&dir.join(checkpoint::ENV)).unwrap_or(serde_json::Value::Null);
        let metrics = dir.join(checkpoint::METRICS);
        let text = std::fs::read_to_string(&metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
        let evals = text
            .lines()
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: malformed line", metrics.display(), i + 1)))
            .collect::<Result<Vec<serde_json::Value>>>()?;
        let dev = crate::runtime::parse_device(device)?;
        let loaded = checkpoint::load_run(dir, &dev)?;
        let label = format!("{} ({})", loaded.config.name, loaded.config.model.name());
        let scores = match loaded.encode(data) {
            Ok(split) => {
                let crate::data::SplitData::Memory(d) = &split else { bail!("scoring needs the split in memory") };
                let logits = loaded.predict_logits(&split, &dev)?;
                logits.iter().zip(&d.labels).map(|(&z, &y)| (1.0 / (1.0 + (-z as f64).exp()), y >= 0.5)).collect()
            }
            Err(e) => {
                tracing::warn!("{}: no ROC or reliability diagram ({e:#})", dir.display());
                Vec::new()
            }
        };
        Ok(Self { dir: dir.to_path_buf(), label, config, env, result, evals, scores })
    }
}

/// ROC curve points (FPR, TPR), at most ~`max_points` of them, from (0,0) to (1,1).
pub fn roc_points(scores: &[(f64, bool)], max_points: usize) -> Vec<(f64, f64)> {
    let mut s: Vec<(f64, bool)> = scores.to_vec();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pos = s.iter().filter(|x| x.1).count().max(1) as f64;
    let neg = s.iter().filter(|x| !x.1).count().max(1) as f64;
    let every = (s.len() / max_points.max(1)).max(1);
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut out = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < s.len() {
        // ties move together (a diagonal segment), as the exact AUC counts them
        let mut j = i;
        while j < s.len() && s[j].0 == s[i].0 {
            if s[j].1 {
                tp += 1.0
            } else {
                fp += 1.0
            }
            j += 1;
        }
        if j == s.len() || (j / every) != (i / every) {
            out.push((fp / neg, tp / pos));
        }
        i = j;
    }
    out
}

pub(crate) fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    C[i % C.len()]
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub(crate) fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-4);
    (lo - pad, hi + pad)
}

fn series(run: &RunView, key: &str) -> Vec<(f64, f64)> {
    run.evals.iter().filter_map(|e| Some((e["examples"].as_f64().or_else(|| e["step"].as_f64())?, e[key].as_f64()?))).collect()
}

/// Validation AUC (left) and LogLoss (right, train in a light line) against examples seen.
fn draw_curves(runs: &[RunView], path: &Path) -> DrawResult<()> {
    let root = BitMapBackend::new(path, (1200, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let x_max = runs.iter().flat_map(|r| series(r, "valid_auc")).map(|p| p.0).fold(1.0, f64::max);
    for (panel, (title, keys)) in panels
        .iter()
        .zip([("validation AUC", vec!["valid_auc"]), ("LogLoss (validation bold, train light)", vec!["valid_logloss", "train_logloss"])])
    {
        let all: Vec<f64> = runs.iter().flat_map(|r| keys.iter().flat_map(move |k| series(r, k))).map(|p| p.1).collect();
        let (lo, hi) = range(all.into_iter());
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max * 1.02, lo..hi)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("examples seen")
            .x_label_formatter(&|x| format!("{:.2e}", x))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()?;
        for (i, run) in runs.iter().enumerate() {
            let c = color(i);
            for (k, key) in keys.iter().enumerate() {
                let pts = series(run, key);
                if k == 0 {
                    chart
                        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                        .label(run.label.clone())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
                } else {
                    chart.draw_series(LineSeries::new(pts, c.mix(0.4).stroke_width(1)))?;
                }
            }
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 14)).draw()?;
    }
    root.present()?;
    Ok(())
}

/// ROC curves (with AUC in the legend) and the reliability diagram, side by side.
fn draw_roc_and_reliability(runs: &[RunView], path: &Path) -> DrawResult<()> {
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let mut roc = ChartBuilder::on(&panels[0])
        .caption("ROC (test split)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    roc.configure_mesh().light_line_style(WHITE).x_desc("false positive rate").y_desc("true positive rate").draw()?;
    roc.draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
    for (i, run) in runs.iter().enumerate().filter(|(_, r)| !r.scores.is_empty()) {
        let c = color(i);
        let auc = run.result["test_auc"].as_f64().map(|a| format!(" AUC {a:.4}")).unwrap_or_default();
        roc.draw_series(LineSeries::new(roc_points(&run.scores, 600), c.stroke_width(2)))?
            .label(format!("{}{auc}", run.label))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    roc.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    let mut rel = ChartBuilder::on(&panels[1])
        .caption("reliability (10 equal-count bins)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    rel.configure_mesh().light_line_style(WHITE).x_desc("mean predicted probability").y_desc("observed positive rate").draw()?;
    rel.draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
    for (i, run) in runs.iter().enumerate().filter(|(_, r)| !r.scores.is_empty()) {
        let c = color(i);
        let pts: Vec<(f64, f64)> = crate::metrics::reliability(&run.scores, 10).iter().map(|&(p, o, _)| (p, o)).collect();
        rel.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(run.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        rel.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    rel.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn num(v: &serde_json::Value, digits: usize) -> String {
    v.as_f64().map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "–".into())
}

fn html(runs: &[RunView], pictures: &[(&str, &Path)]) -> Result<String> {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>wukong report</title><style>body{font-family:sans-serif;max-width:1240px;margin:2em auto;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}img{max-width:100%}</style></head><body>\n<h1>wukong report</h1>\n",
    );
    h.push_str("<table><tr><th>run</th><th>test AUC</th><th>test LogLoss</th><th>valid AUC</th><th>valid LogLoss</th><th>best epoch / step</th><th>steps</th><th>seconds</th><th>guard rollbacks</th><th>git commit</th></tr>\n");
    for r in runs {
        let res = &r.result;
        h.push_str(&format!(
            "<tr><td style=\"text-align:left\">{}<br><small>{}</small></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&r.label),
            escape(&r.dir.display().to_string()),
            num(&res["test_auc"], 6),
            num(&res["test_logloss"], 6),
            num(&res["valid_auc"], 6),
            num(&res["valid_logloss"], 6),
            res["best_epoch"],
            res["best_step"],
            res["steps"],
            num(&res["seconds"], 1),
            res["guard_rollbacks"],
            escape(r.env["git_commit"].as_str().unwrap_or("unknown")),
        ));
    }
    h.push_str("</table>\n");
    for (title, path) in pictures {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        h.push_str(&format!(
            "<h2>{title}</h2><img alt=\"{title}\" src=\"data:image/png;base64,{}\">\n",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ));
    }
    for r in runs {
        h.push_str(&format!("<h2>{}</h2><h3>config</h3><pre>{}</pre>", escape(&r.label), escape(&r.config)));
        h.push_str(&format!("<h3>environment</h3><pre>{}</pre>", escape(&serde_json::to_string_pretty(&r.env)?)));
        h.push_str(&format!("<h3>result</h3><pre>{}</pre>", escape(&serde_json::to_string_pretty(&r.result)?)));
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// Writes `curves.png`, `roc_reliability.png` and `report.html` into `out`; returns their paths.
pub fn write(runs: &[RunView], out: &Path) -> Result<Vec<PathBuf>> {
    anyhow::ensure!(!runs.is_empty(), "no run to report");
    register_font();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let curves = out.join("curves.png");
    draw_curves(runs, &curves).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", curves.display()))?;
    let roc = out.join("roc_reliability.png");
    draw_roc_and_reliability(runs, &roc).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", roc.display()))?;
    let page = out.join("report.html");
    let text = html(runs, &[("Learning curves", &curves), ("ROC and reliability", &roc)])?;
    crate::runtime::write_atomic(&page, text.as_bytes())?;
    Ok(vec![curves, roc, page])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_and_reliability_by_hand() {
        // perfect ranking: the ROC goes up to (0, 1) first
        let s = [(0.9, true), (0.8, true), (0.3, false), (0.1, false)];
        let roc = roc_points(&s, 100);
        assert_eq!(roc.first(), Some(&(0.0, 0.0)));
        assert!(roc.contains(&(0.0, 1.0)));
        assert_eq!(roc.last(), Some(&(1.0, 1.0)));
        // ties form one diagonal step
        let tied = [(0.5, true), (0.5, false)];
        assert_eq!(roc_points(&tied, 100), vec![(0.0, 0.0), (1.0, 1.0)]);
        // two bins of two: mean predictions and observed rates
        let rel = crate::metrics::reliability(&s, 2);
        assert_eq!(rel.len(), 2);
        assert!((rel[0].0 - 0.2).abs() < 1e-12 && rel[0].1 == 0.0 && rel[0].2 == 2);
        assert!((rel[1].0 - 0.85).abs() < 1e-12 && rel[1].1 == 1.0);
    }
}
