//! `wukong scale`: a sweep of model families over compute, run through the experiment runner
//! (resumable), summarised per point (GFLOP/example, parameters, PF-days, LogLoss, excess over
//! the Bayes limit on synthetic data, relative LogLoss against a reference point), fitted with a
//! power law plus a constant per family (`y = a + b·x^c`, the paper's Fig. 1 form) and plotted.
//!
//! A sweep file:
//! ```toml
//! name = "synthetic"
//! base = "configs/scale/synthetic_base.toml" # [data] and [train] of every point (its [model] is replaced)
//! reference = "dlrm-1"                        # relative LogLoss is against this point
//! [[family]]
//! name = "wukong"
//! model = { name = "wukong", embedding_dim = 16 } # keys every point of the family shares
//! grow = { num_layers = [1, 2, 3], num_fmb = [4, 8, 16] } # point i takes the i-th value of each list
//! ```

use anyhow::{Context, Result, bail, ensure};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::config::ExperimentConfig;
use crate::experiment::{self, Finished, Point};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    pub name: String,
    /// The experiment config every point starts from (relative to the sweep file).
    pub base: PathBuf,
    /// The point relative LogLoss is measured against (default: the first point).
    pub reference: Option<String>,
    /// Only these families (default: all).
    #[serde(default)]
    pub only: Vec<String>,
    /// Training order: `compute` (default: cheapest point first, so a stopped sweep has the
    /// small end of every family) or `file`.
    #[serde(default)]
    pub order: Order,
    /// Second mode: every point gets the same training compute instead of the same examples —
    /// a point of F training FLOPs/example trains on `budget_pf_days · 8.64e19 / F` examples of
    /// the stream (synthetic data only: a file has the examples it has).
    pub budget_pf_days: Option<f64>,
    #[serde(rename = "family")]
    pub families: Vec<Family>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Compute,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub name: String,
    /// The `[model]` keys every point of the family shares.
    pub model: toml::Table,
    /// Keys grown together: point i takes the i-th value of every list (all of one length).
    #[serde(default)]
    pub grow: toml::Table,
    /// `[train]` keys of this family (e.g. a learning rate), over the base config's.
    #[serde(default)]
    pub train: toml::Table,
}

/// The sweep's points, in file order: `<family>-<i>` (1-based).
pub fn points(path: &Path) -> Result<(SweepFile, Vec<Point>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read sweep {}", path.display()))?;
    let sweep: SweepFile = toml::from_str(&text).with_context(|| format!("invalid sweep {}", path.display()))?;
    let base_path = path.parent().unwrap_or(Path::new(".")).join(&sweep.base);
    let base_text =
        std::fs::read_to_string(&base_path).with_context(|| format!("cannot read the sweep's base config {}", base_path.display()))?;
    let base: toml::Table = toml::from_str(&base_text).with_context(|| format!("invalid base config {}", base_path.display()))?;
    let mut out = Vec::new();
    for fam in &sweep.families {
        if !sweep.only.is_empty() && !sweep.only.contains(&fam.name) {
            continue;
        }
        let lens: Vec<usize> = fam
            .grow
            .iter()
            .map(|(k, v)| v.as_array().map(|a| a.len()).with_context(|| format!("family {}: grow.{k} must be a list", fam.name)))
            .collect::<Result<_>>()?;
        let n = lens.first().copied().unwrap_or(1);
        ensure!(lens.iter().all(|&l| l == n) && n > 0, "family {}: every grow list must have the same, non-zero length", fam.name);
        for i in 0..n {
            let mut model = fam.model.clone();
            for (k, v) in &fam.grow {
                model.insert(k.clone(), v.as_array().expect("checked")[i].clone());
            }
            let mut table = base.clone();
            table.insert("model".into(), toml::Value::Table(model));
            if !fam.train.is_empty() {
                let train = table.entry("train").or_insert_with(|| toml::Value::Table(Default::default()));
                let train = train.as_table_mut().context("the base config's [train] is not a table")?;
                for (k, v) in &fam.train {
                    train.insert(k.clone(), v.clone());
                }
            }
            let id = format!("{}-{}", fam.name, i + 1);
            table.insert("name".into(), toml::Value::String(format!("{}-{id}", sweep.name)));
            let mut config = ExperimentConfig::parse(&toml::to_string(&table)?).with_context(|| format!("sweep point {id}"))?;
            if let Some(budget) = sweep.budget_pf_days {
                ensure!(budget > 0.0 && budget.is_finite(), "budget_pf_days must be positive");
                ensure!(
                    config.data.format == crate::data::schema::Format::Synthetic,
                    "budget_pf_days needs synthetic data (a file has a fixed size)"
                );
                let (shape, _) = data_shape(&config.data)?;
                let train_flops = 3.0 * config.model.forward_flops(&shape).max(1) as f64;
                let mut world = config.data.world();
                world.train_examples = ((budget * 1e15 * 86_400.0 / train_flops) as usize).max(config.train.batch_size);
                config.data.world = Some(world);
                config.validate().with_context(|| format!("sweep point {id} under the compute budget"))?;
            }
            out.push(Point { id, family: fam.name.clone(), config });
        }
    }
    ensure!(!out.is_empty(), "the sweep has no points");
    if let Some(r) = &sweep.reference {
        ensure!(out.iter().any(|p| &p.id == r), "reference point {r:?} is not in the sweep (points: {})", ids(&out));
    }
    Ok((sweep, out))
}

fn ids(points: &[Point]) -> String {
    points.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", ")
}

/// One finished point, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub family: String,
    pub model: String,
    /// Training FLOPs per example (3 × the analytic forward count), in GFLOP.
    pub gflop_per_example: f64,
    pub dense_params: u64,
    pub embedding_params: u64,
    pub examples: u64,
    /// Training compute of the run: GFLOP/example × examples, in PF-days.
    pub pf_days: f64,
    pub seconds: f64,
    pub valid_logloss: f64,
    pub test_logloss: Option<f64>,
    pub test_auc: Option<f64>,
    /// The LogLoss the table ranks by: test when there is a test split, else validation.
    pub logloss: f64,
    /// Bayes-optimal LogLoss of that split (synthetic data only) and the excess over it.
    pub bayes: Option<f64>,
    pub excess: Option<f64>,
    /// 100 × (logloss − reference) / reference.
    pub relative_pct: f64,
    pub guard_rollbacks: u64,
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

pub fn rows(done: &[Finished], reference: Option<&str>) -> Vec<Row> {
    let mut rows: Vec<Row> = done
        .iter()
        .map(|d| {
            let r = &d.result;
            let test = r["test_logloss"].as_f64();
            let logloss = test.unwrap_or(f(r, "valid_logloss"));
            let split = if test.is_some() { "test" } else { "valid" };
            let bayes = r["bayes_logloss"][split].as_f64();
            let fwd = f(r, "forward_flops_per_example");
            let examples = r["examples"].as_u64().unwrap_or(0);
            let model = std::fs::read_to_string(d.dir.join(crate::train::checkpoint::CONFIG))
                .ok()
                .and_then(|t| toml::from_str::<ExperimentConfig>(&t).ok())
                .map(|c| c.model.name().to_string())
                .unwrap_or_default();
            Row {
                id: d.id.clone(),
                family: d.family.clone(),
                model,
                gflop_per_example: 3.0 * fwd / 1e9,
                dense_params: r["dense_params"].as_u64().unwrap_or(0),
                embedding_params: r["embedding_params"].as_u64().unwrap_or(0),
                examples,
                pf_days: 3.0 * fwd * examples as f64 / 1e15 / 86_400.0,
                seconds: f(r, "seconds"),
                valid_logloss: f(r, "valid_logloss"),
                test_logloss: test,
                test_auc: r["test_auc"].as_f64(),
                logloss,
                bayes,
                excess: bayes.map(|b| logloss - b),
                relative_pct: f64::NAN,
                guard_rollbacks: r["guard_rollbacks"].as_u64().unwrap_or(0),
            }
        })
        .collect();
    let base = reference.and_then(|id| rows.iter().find(|r| r.id == id)).or(rows.first()).map(|r| r.logloss);
    if let Some(b) = base {
        for r in &mut rows {
            r.relative_pct = 100.0 * (r.logloss - b) / b;
        }
    }
    rows
}

/// `y = a + b·x^c`, with its fit quality.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PowerLaw {
    pub a: f64,
    pub b: f64,
    pub c: f64,
    pub r2: f64,
}

impl PowerLaw {
    pub fn at(&self, x: f64) -> f64 {
        self.a + self.b * x.powf(self.c)
    }
}

/// Least squares for a fixed exponent: (a, b, sse).
fn linear_given_c(xs: &[f64], ys: &[f64], c: f64) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let t: Vec<f64> = xs.iter().map(|x| x.powf(c)).collect();
    let (st, sy) = (t.iter().sum::<f64>(), ys.iter().sum::<f64>());
    let stt = t.iter().map(|v| v * v).sum::<f64>();
    let sty = t.iter().zip(ys).map(|(a, b)| a * b).sum::<f64>();
    let det = n * stt - st * st;
    if det.abs() < 1e-300 {
        return (sy / n, 0.0, ys.iter().map(|y| (y - sy / n).powi(2)).sum());
    }
    let b = (n * sty - st * sy) / det;
    let a = (sy - b * st) / n;
    let sse = t.iter().zip(ys).map(|(t, y)| (y - a - b * t).powi(2)).sum();
    (a, b, sse)
}

/// Fits `y = a + b·x^c` (x > 0, at least 4 points: three parameters through three points is an
/// interpolation, not evidence of a law): for each exponent the constant and scale are
/// a linear least-squares problem, so the search is one-dimensional over c (a grid, then golden
/// sections around the best cell). Exact on noiseless points of such a law.
pub fn fit_power_law(xs: &[f64], ys: &[f64]) -> Option<PowerLaw> {
    if xs.len() < 4 || xs.len() != ys.len() || xs.iter().any(|&x| x.is_nan() || x <= 0.0) || ys.iter().any(|y| !y.is_finite()) {
        return None;
    }
    // work in x / geometric mean so x^c stays well scaled
    let g = (xs.iter().map(|x| x.ln()).sum::<f64>() / xs.len() as f64).exp();
    let u: Vec<f64> = xs.iter().map(|x| x / g).collect();
    let sse = |c: f64| linear_given_c(&u, ys, c).2;
    let grid: Vec<f64> = (-400..=400).map(|i| i as f64 * 0.01).filter(|c| c.abs() > 1e-9).collect();
    let (mut best, mut best_sse) = (grid[0], f64::INFINITY);
    for &c in &grid {
        let s = sse(c);
        if s < best_sse {
            (best, best_sse) = (c, s);
        }
    }
    let (mut lo, mut hi) = (best - 0.01, best + 0.01);
    let phi = 0.5 * (5f64.sqrt() - 1.0);
    for _ in 0..100 {
        let (m1, m2) = (hi - phi * (hi - lo), lo + phi * (hi - lo));
        if sse(m1) < sse(m2) { hi = m2 } else { lo = m1 }
    }
    let c = 0.5 * (lo + hi);
    let (a, b_u, s) = linear_given_c(&u, ys, c);
    let mean = ys.iter().sum::<f64>() / ys.len() as f64;
    let sst: f64 = ys.iter().map(|y| (y - mean).powi(2)).sum();
    // y = a + b_u (x/g)^c = a + (b_u g^−c) x^c
    Some(PowerLaw { a, b: b_u * g.powf(-c), c, r2: if sst > 0.0 { 1.0 - s / sst } else { 1.0 } })
}

/// Per family: the fit of LogLoss against training GFLOP/example and the predicted change per 4×
/// compute at the family's largest point (in LogLoss and in %).
#[derive(Debug, Clone, Serialize)]
pub struct FamilyFit {
    pub family: String,
    pub points: usize,
    pub fit: Option<PowerLaw>,
    pub gain_per_4x: Option<f64>,
    pub gain_per_4x_pct: Option<f64>,
    /// The measured local slope: least squares of LogLoss on log₄(GFLOP) over the family's three
    /// largest points (LogLoss per 4× compute, and in % of the largest point's LogLoss). Unlike
    /// the fit, which the early steep steps dominate, it says what the last decade bought.
    #[serde(default)]
    pub tail_per_4x: Option<f64>,
    #[serde(default)]
    pub tail_per_4x_pct: Option<f64>,
}

/// Slope of `ys` against log₄(`xs`) over the three largest `xs` (None with fewer than 3 points
/// or one compute value).
pub fn tail_slope_per_4x(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let mut pts: Vec<(f64, f64)> =
        xs.iter().zip(ys).filter(|(x, y)| **x > 0.0 && y.is_finite()).map(|(x, y)| (x.ln() / 4f64.ln(), *y)).collect();
    if pts.len() < 3 {
        return None;
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let tail = &pts[pts.len() - 3..];
    let mx = tail.iter().map(|p| p.0).sum::<f64>() / 3.0;
    let my = tail.iter().map(|p| p.1).sum::<f64>() / 3.0;
    let sxx: f64 = tail.iter().map(|p| (p.0 - mx).powi(2)).sum();
    (sxx > 1e-12).then(|| tail.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx)
}

pub fn fits(rows: &[Row]) -> Vec<FamilyFit> {
    let mut families: Vec<&str> = Vec::new();
    for r in rows {
        if !families.contains(&r.family.as_str()) {
            families.push(&r.family);
        }
    }
    families
        .into_iter()
        .map(|fam| {
            let pts: Vec<&Row> = rows.iter().filter(|r| r.family == fam).collect();
            let xs: Vec<f64> = pts.iter().map(|r| r.gflop_per_example).collect();
            let ys: Vec<f64> = pts.iter().map(|r| r.logloss).collect();
            let fit = fit_power_law(&xs, &ys);
            let top = xs.iter().cloned().fold(f64::NAN, f64::max);
            let gain = fit.map(|p| p.at(4.0 * top) - p.at(top));
            let tail = tail_slope_per_4x(&xs, &ys);
            let top_y = pts.iter().max_by(|a, b| a.gflop_per_example.total_cmp(&b.gflop_per_example)).map(|r| r.logloss);
            FamilyFit {
                tail_per_4x: tail,
                tail_per_4x_pct: tail.zip(top_y).map(|(t, y)| 100.0 * t / y),
                family: fam.to_string(),
                points: pts.len(),
                fit,
                gain_per_4x: gain,
                gain_per_4x_pct: gain.zip(fit).map(|(g, p)| 100.0 * g / p.at(top)),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "–".into())
}

/// The markdown table of points and fits.
pub fn markdown(sweep: &str, rows: &[Row], fits: &[FamilyFit], reference: &str, synthetic: bool) -> String {
    let mut s = format!("# Scaling sweep `{sweep}`\n\n");
    if synthetic {
        s.push_str("Data: the **synthetic** stream (`format = \"synthetic\"`); Bayes = the LogLoss of the teacher's own probabilities on the same split.\n\n");
    }
    s.push_str(&format!(
        "LogLoss on the test split (validation when there is none); relative LogLoss against `{reference}`; GFLOP/example counts training (3 × forward).\n\n"
    ));
    s.push_str("| point | model | GFLOP/ex | dense params | emb params | examples | PF-days | LogLoss | AUC | excess over Bayes | relative % | seconds | rollbacks |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.3e} | {} | {} | {} | {:.3e} | {:.6} | {} | {} | {:+.3} | {:.0} | {} |\n",
            r.id,
            r.model,
            r.gflop_per_example,
            r.dense_params,
            r.embedding_params,
            r.examples,
            r.pf_days,
            r.logloss,
            opt(r.test_auc, 6),
            opt(r.excess, 6),
            r.relative_pct,
            r.seconds,
            r.guard_rollbacks
        ));
    }
    s.push_str("\n| family | points | fit LogLoss = a + b·GFLOP^c | R² | Δ LogLoss per 4× compute (fit, at the largest point) | Δ per 4× measured (last 3 points) |\n|---|---|---|---|---|---|\n");
    for f in fits {
        let tail = match (f.tail_per_4x, f.tail_per_4x_pct) {
            (Some(t), Some(p)) => format!("{t:+.6} ({p:+.3}%)"),
            _ => "–".into(),
        };
        match f.fit {
            Some(p) => s.push_str(&format!(
                "| {} | {} | {:.6} + {:.4e}·x^{:.4} | {:.4} | {:+.6} ({:+.3}%) | {tail} |\n",
                f.family,
                f.points,
                p.a,
                p.b,
                p.c,
                p.r2,
                f.gain_per_4x.unwrap_or(f64::NAN),
                f.gain_per_4x_pct.unwrap_or(f64::NAN)
            )),
            None => s.push_str(&format!("| {} | {} | (no fit: fewer than 4 points) | – | – | {tail} |\n", f.family, f.points)),
        }
    }
    s
}

pub fn csv(rows: &[Row]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// LogLoss against training GFLOP/example (log axis) per family, each with its fitted curve; the
/// Bayes limit as a dashed line when known.
fn draw_compute(rows: &[Row], fits: &[FamilyFit], path: &Path, x_of: impl Fn(&Row) -> f64, x_desc: &str) -> DrawResult<()> {
    crate::report::register_font();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    // A family whose points all sit far left of the rest (LR: ~no FLOPs) would squeeze the
    // axis: it is drawn as a horizontal reference line instead.
    let top = rows.iter().map(&x_of).fold(0.0, f64::max);
    let is_reference = |fam: &str| rows.iter().filter(|r| r.family == fam).all(|r| x_of(r) < 1e-3 * top);
    let xs: Vec<f64> = rows.iter().filter(|r| !is_reference(&r.family)).map(&x_of).filter(|x| *x > 0.0).collect();
    let (xlo, xhi) = (xs.iter().cloned().fold(f64::INFINITY, f64::min) / 1.5, xs.iter().cloned().fold(0.0, f64::max) * 1.5);
    // the y range follows the models; the Bayes limit is drawn when near, else named in the caption
    let bayes = rows.iter().filter_map(|r| r.bayes).next();
    let (mut lo, mut hi) = crate::report::range(rows.iter().map(|r| r.logloss));
    let span = (hi - lo).max(1e-4);
    let bayes_in = bayes.filter(|b| *b >= lo - 0.5 * span);
    if let Some(b) = bayes_in {
        lo = lo.min(b);
    }
    (lo, hi) = (lo - 0.05 * span, hi + 0.05 * span);
    let caption = match (bayes, bayes_in) {
        (Some(b), None) => format!("test LogLoss against compute (Bayes limit {b:.4}, below the axis)"),
        _ => "test LogLoss against compute".to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((xlo..xhi).log_scale(), lo..hi)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x_desc)
        .y_desc("LogLoss")
        .x_label_formatter(&|x| format!("{x:.1e}"))
        .y_label_formatter(&|y| format!("{y:.4}"))
        .draw()?;
    if let Some(b) = bayes_in {
        chart
            .draw_series(LineSeries::new(vec![(xlo, b), (xhi, b)], BLACK.mix(0.6).stroke_width(1)))?
            .label(format!("Bayes limit {b:.4}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
    }
    for (i, fam) in fits.iter().enumerate() {
        let c = crate::report::color(i);
        let pts: Vec<(f64, f64)> = rows.iter().filter(|r| r.family == fam.family).map(|r| (x_of(r), r.logloss)).collect();
        if is_reference(&fam.family) {
            let y = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            if (lo..hi).contains(&y) {
                chart
                    .draw_series(LineSeries::new(vec![(xlo, y), (xhi, y)], c.stroke_width(1)))?
                    .label(format!("{} (≈0 FLOPs) {y:.4}", fam.family))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1)));
            }
            continue;
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?
            .label(fam.family.clone())
            .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
        if let Some(p) = fam.fit.filter(|_| x_desc.starts_with("training GFLOP")) {
            let (a, b) = pts.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let curve: Vec<(f64, f64)> = (0..=60)
                .map(|k| a * (4.0 * b / a).powf(k as f64 / 60.0))
                .map(|x| (x, p.at(x)))
                .filter(|(_, y)| (lo..hi).contains(y))
                .collect();
            chart.draw_series(LineSeries::new(curve, c.stroke_width(2)))?;
        } else {
            chart.draw_series(LineSeries::new(pts, c.mix(0.5).stroke_width(1)))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Relative LogLoss (%) of every point against the reference, one horizontal bar per point in
/// the table's order: the picture of an ablation or component sweep (one point per family, the
/// paper's Fig. 4 and 5), where a compute axis says little.
fn draw_relative(rows: &[Row], reference: &str, path: &Path) -> DrawResult<()> {
    crate::report::register_font();
    let n = rows.len();
    let root = BitMapBackend::new(path, (900, (120 + 34 * n) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (lo, hi) = rows.iter().fold((0.0f64, 0.0f64), |(a, b), r| (a.min(r.relative_pct), b.max(r.relative_pct)));
    let span = (hi - lo).max(0.05);
    // room on the right for the labels (point, change, LogLoss) beside each bar
    let (x0, x1) = (lo - 0.1 * span, hi + 0.8 * span);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("test LogLoss relative to {reference} (%; lower is better)"), ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(10)
        .build_cartesian_2d(x0..x1, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("relative LogLoss (%)")
        .x_label_formatter(&|x| format!("{x:+.2}"))
        .draw()?;
    for (k, r) in rows.iter().enumerate() {
        let y = (n - 1 - k) as f64;
        let c = if r.relative_pct > 0.0 { RED.mix(0.7) } else { BLUE.mix(0.7) };
        chart.draw_series(std::iter::once(Rectangle::new([(0.0, y + 0.15), (r.relative_pct, y + 0.85)], c.filled())))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{}  {:+.3}%  ({:.6})", r.id, r.relative_pct, r.logloss),
            (r.relative_pct.max(0.0) + 0.02 * span, y + 0.7),
            ("sans-serif", 13),
        )))?;
    }
    chart.draw_series(LineSeries::new(vec![(0.0, 0.0), (0.0, n as f64)], BLACK.stroke_width(1)))?;
    root.present()?;
    Ok(())
}

/// Validation LogLoss against examples seen (from each run's intra-epoch evaluations), one curve
/// per point of `family`.
fn draw_examples(done: &[Finished], family: &str, bayes: Option<f64>, path: &Path) -> DrawResult<()> {
    crate::report::register_font();
    let curves: Vec<(String, Vec<(f64, f64)>)> = done
        .iter()
        .filter(|d| d.family == family)
        .map(|d| {
            let text = std::fs::read_to_string(d.dir.join(crate::train::checkpoint::METRICS)).unwrap_or_default();
            let pts = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| Some((v["examples"].as_f64()?, v["valid_logloss"].as_f64()?)))
                .filter(|p| p.0 > 0.0)
                .collect();
            (d.id.clone(), pts)
        })
        .filter(|(_, p): &(String, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if curves.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = || curves.iter().flat_map(|(_, p)| p.iter());
    let (xlo, xhi) = all().fold((f64::INFINITY, 0.0f64), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut lo, mut hi) = crate::report::range(all().map(|p| p.1).chain(bayes));
    let pad = 0.05 * (hi - lo).max(1e-4);
    (lo, hi) = (lo - pad, hi + pad);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{family}: validation LogLoss against examples seen"), ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((xlo / 1.2..xhi * 1.2).log_scale(), lo..hi)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("examples seen")
        .y_desc("LogLoss")
        .x_label_formatter(&|x| format!("{x:.1e}"))
        .y_label_formatter(&|y| format!("{y:.4}"))
        .draw()?;
    if let Some(b) = bayes {
        chart
            .draw_series(LineSeries::new(vec![(xlo / 1.2, b), (xhi * 1.2, b)], BLACK.mix(0.6)))?
            .label(format!("Bayes limit {b:.4}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
    }
    for (i, (id, pts)) in curves.iter().enumerate() {
        let c = crate::report::color(i);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(id.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `scale.md`, `scale.csv`, `fits.json` and the PNGs into `out`; returns the paths.
pub fn write_report(sweep: &SweepFile, done: &[Finished], out: &Path) -> Result<Vec<PathBuf>> {
    let reference = sweep.reference.clone().or_else(|| done.first().map(|d| d.id.clone())).unwrap_or_default();
    let mut rows = rows(done, Some(&reference));
    // grouped by family (in the sweep file's order), cheapest first
    let family_index = |f: &str| sweep.families.iter().position(|x| x.name == f).unwrap_or(usize::MAX);
    rows.sort_by(|a, b| family_index(&a.family).cmp(&family_index(&b.family)).then(a.gflop_per_example.total_cmp(&b.gflop_per_example)));
    let fits = fits(&rows);
    let synthetic = rows.iter().any(|r| r.bayes.is_some());
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = out.join(name);
        crate::runtime::write_atomic(&p, bytes)?;
        written.push(p);
        Ok(())
    };
    put("scale.md", markdown(&sweep.name, &rows, &fits, &reference, synthetic).as_bytes())?;
    put("scale.csv", csv(&rows)?.as_bytes())?;
    put("fits.json", serde_json::to_string_pretty(&fits)?.as_bytes())?;
    let draw = |name: &str, r: DrawResult<()>| -> Result<PathBuf> {
        r.map_err(|e| anyhow::anyhow!("drawing {name}: {e}"))?;
        Ok(out.join(name))
    };
    written.push(draw(
        "scale_compute.png",
        draw_compute(&rows, &fits, &out.join("scale_compute.png"), |r| r.gflop_per_example, "training GFLOP/example"),
    )?);
    written.push(draw(
        "scale_params.png",
        draw_compute(&rows, &fits, &out.join("scale_params.png"), |r| r.dense_params as f64, "dense parameters"),
    )?);
    if fits.len() > 1 && fits.iter().all(|f| f.points == 1) {
        written.push(draw("scale_relative.png", draw_relative(&rows, &reference, &out.join("scale_relative.png")))?);
    }
    let bayes = rows.iter().find_map(|r| r.bayes);
    for fam in fits.iter().map(|f| f.family.clone()) {
        let name = format!("scale_examples_{fam}.png");
        let p = out.join(&name);
        draw(&name, draw_examples(done, &fam, bayes, &p))?;
        if p.exists() {
            written.push(p);
        }
    }
    Ok(written)
}

/// The model-facing shape of a config's data and the examples of one training pass.
fn data_shape(data: &crate::data::DataConfig) -> Result<(crate::model::DataShape, usize)> {
    if data.format == crate::data::schema::Format::Synthetic {
        let w = data.world();
        let enc = crate::data::world::World::new(&w)?.encoder().with_embeddings(&data.embeddings)?;
        return Ok((crate::model::DataShape::of(&enc), w.train_examples));
    }
    let src = &crate::data::pipeline::split_sources(data)[0];
    let (enc, d, _) = crate::data::pipeline::fit_in_memory(data, src)?;
    Ok((crate::model::DataShape::of(&enc.with_embeddings(&data.embeddings)?), d.len()))
}

/// The points in training order (see [`Order`]).
pub fn in_order(sweep: &SweepFile, mut points: Vec<Point>) -> Result<Vec<Point>> {
    if sweep.order == Order::Compute && !points.is_empty() {
        let (shape, _) = data_shape(&points[0].config.data)?;
        points.sort_by_key(|p| p.config.model.forward_flops(&shape)); // stable: file order among equals
    }
    Ok(points)
}

/// The sweep's plan, without training: per point the forward MFLOP/example, training
/// GFLOP/example, dense parameters, examples per pass and the compute of one pass in PF-days
/// (what a preset costs before it is run, here or on a cluster).
pub fn plan(path: &Path) -> Result<String> {
    let (sweep, points) = points(path)?;
    let mut s = format!(
        "# Plan of sweep `{}`\n\n| point | model | forward MFLOP/ex | training GFLOP/ex | dense params | examples/pass | PF-days/pass |\n|---|---|---|---|---|---|---|\n",
        sweep.name
    );
    let mut total = 0.0;
    for p in &points {
        let (shape, examples) = data_shape(&p.config.data)?;
        let fwd = p.config.model.forward_flops(&shape) as f64;
        let device = burn::tensor::Device::flex();
        let model = p.config.model.init(&shape, &device);
        let (_, dense) = model.param_counts();
        let pf = 3.0 * fwd * examples as f64 / 1e15 / 86_400.0;
        total += pf;
        s.push_str(&format!(
            "| {} | {} | {:.4} | {:.3e} | {} | {} | {:.3e} |\n",
            p.id,
            p.config.model.name(),
            fwd / 1e6,
            3.0 * fwd / 1e9,
            dense,
            examples,
            pf
        ));
    }
    s.push_str(&format!("\nTotal: {total:.3e} PF-days for one pass of every point.\n"));
    Ok(s)
}

/// Runs (or continues) a sweep and writes its report after every point.
pub fn run(path: &Path, out: &Path, opts: &crate::train::RunOptions) -> Result<Vec<PathBuf>> {
    let (sweep, points) = points(path)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let _hold = experiment::hold(&out.join(experiment::LOCK_FILE), &format!("sweep directory {}", out.display()))?;
    if out.join("sweep.toml").exists() {
        let before = std::fs::read_to_string(out.join("sweep.toml"))?;
        if before != std::fs::read_to_string(path)? {
            tracing::warn!(
                "{} differs from the sweep this directory started with; finished points whose config changed are refused",
                path.display()
            );
        }
    }
    crate::runtime::write_atomic(&out.join("sweep.toml"), &std::fs::read(path)?)?;
    let points = in_order(&sweep, points)?;
    let done = experiment::run_all(&points, out, opts, |done| write_report(&sweep, done, out).map(|_| ()))?;
    if done.is_empty() {
        bail!("no points ran");
    }
    write_report(&sweep, &done, out)
}
