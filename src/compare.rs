//! `wukong compare`: trains several configs on one dataset (or reads finished run directories)
//! and writes a table in the shape of the paper's Table 2, each row naming its run directory.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::ExperimentConfig;
use crate::train::checkpoint;

#[derive(Debug, Clone)]
pub struct Row {
    pub run_dir: PathBuf,
    pub config: ExperimentConfig,
    pub valid_auc: f64,
    pub test_auc: Option<f64>,
    pub test_logloss: Option<f64>,
    /// The test LogLoss of the selected checkpoint calibrated on validation (Platt scaling;
    /// runs from before it existed have none).
    pub calibrated_test_logloss: Option<f64>,
    pub dense_params: u64,
    pub embedding_params: u64,
    pub forward_flops: u64,
    /// Mean training seconds per epoch (evaluation excluded).
    pub seconds_per_epoch: f64,
    pub best_epoch: u64,
    pub epochs_run: u64,
}

fn field<T: serde::de::DeserializeOwned>(v: &serde_json::Value, key: &str, file: &Path) -> Result<T> {
    serde_json::from_value(v.get(key).cloned().unwrap_or(serde_json::Value::Null))
        .with_context(|| format!("{}: field {key:?} missing or malformed", file.display()))
}

/// Reads a finished run directory.
pub fn read_run(dir: &Path) -> Result<Row> {
    let config = checkpoint::saved_config(dir)?;
    let rpath = dir.join(checkpoint::RESULT);
    let text = std::fs::read_to_string(&rpath).with_context(|| format!("cannot read {} (did the run finish?)", rpath.display()))?;
    let r: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", rpath.display()))?;
    let mpath = dir.join(checkpoint::METRICS);
    let lines = std::fs::read_to_string(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?;
    // Seconds per epoch: the end-of-epoch evaluations' `epoch_seconds` (runs from before
    // intra-epoch evaluation wrote `train_seconds` on every line).
    let mut secs = Vec::new();
    for (i, l) in lines.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("{}:{}: malformed line", mpath.display(), i + 1))?;
        if let Some(s) = v["epoch_seconds"].as_f64().or_else(|| v["train_seconds"].as_f64()) {
            secs.push(s);
        }
    }
    Ok(Row {
        run_dir: dir.to_path_buf(),
        config,
        valid_auc: field(&r, "valid_auc", &rpath)?,
        test_auc: field(&r, "test_auc", &rpath)?,
        test_logloss: field(&r, "test_logloss", &rpath)?,
        calibrated_test_logloss: r["calibrated"]["test_logloss"].as_f64(),
        dense_params: field(&r, "dense_params", &rpath)?,
        embedding_params: field(&r, "embedding_params", &rpath)?,
        forward_flops: field(&r, "forward_flops_per_example", &rpath)?,
        seconds_per_epoch: secs.iter().sum::<f64>() / secs.len().max(1) as f64,
        best_epoch: field(&r, "best_epoch", &rpath)?,
        epochs_run: field(&r, "epochs_run", &rpath)?,
    })
}

/// A finished `wukong tune`: its best config re-run with each seed.
#[derive(Debug, Clone)]
pub struct Tuned {
    pub dir: PathBuf,
    /// The search's name (its space file's `name`).
    pub name: String,
    pub trials: usize,
    pub best: String,
    /// The seed re-runs, in the space's seed order.
    pub seeds: Vec<Row>,
}

/// Reads a finished search directory (`wukong tune … --out DIR`).
pub fn read_tuned(dir: &Path) -> Result<Tuned> {
    let spath = dir.join("summary.json");
    let text = std::fs::read_to_string(&spath).with_context(|| format!("cannot read {} (has the search finished?)", spath.display()))?;
    let s: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", spath.display()))?;
    let seeds: Vec<u64> = field(&s, "seeds", &spath)?;
    anyhow::ensure!(!seeds.is_empty(), "{}: the search re-ran its best config with no seed", spath.display());
    let best: String = field(&s, "best", &spath)?;
    let rows = seeds
        .iter()
        .map(|&seed| read_run(&crate::experiment::point_dir(dir, &crate::tune::seed_point_id(&best, seed))))
        .collect::<Result<Vec<_>>>()?;
    let points = std::fs::read_dir(dir.join("points")).with_context(|| format!("cannot list {}/points", dir.display()))?;
    // the trials' run directories (not the lock files a parallel search's children leave beside them)
    let trials = points
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("trial-") && e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    let name = rows[0].config.name.trim_end_matches(&format!("-best-seed{}", seeds[0])).to_string();
    Ok(Tuned { dir: dir.to_path_buf(), name, trials, best, seeds: rows })
}

fn mean_pm_std(v: &[f64]) -> String {
    match crate::tune::mean_std(v) {
        Some((m, sd)) => format!("{m:.6} ± {sd:.6}"),
        None => "–".into(),
    }
}

/// Where a row stands against the best row of its table: its rank by mean test AUC, and its
/// gap to the best mean, also in units of the larger of the two rows' stds (≤ 1: within one std
/// of the best, the bar for "best").
fn standing(auc: &[Option<(f64, f64)>], i: usize) -> (String, String) {
    let Some((m, sd)) = auc[i] else { return ("–".into(), "–".into()) };
    let rank = 1 + auc.iter().flatten().filter(|(o, _)| *o > m).count();
    let best = auc.iter().flatten().copied().fold(None::<(f64, f64)>, |b, r| if b.is_none_or(|b| r.0 > b.0) { Some(r) } else { b });
    let (bm, bsd) = best.expect("this row has a mean");
    if bm <= m {
        return (rank.to_string(), "best".into());
    }
    let unit = sd.max(bsd);
    let stds = if unit > 0.0 { format!("{:.2} std", (bm - m) / unit) } else { "no std".into() };
    (rank.to_string(), format!("−{:.6} ({stds})", bm - m))
}

/// The paper's Table 2 from tuned searches: mean ± std over the seeds of each best config, with
/// each row's rank and gap to the best (see [`standing`]).
pub fn tuned_table(rows: &[Tuned]) -> String {
    let mut s = String::new();
    s.push_str("| search | model | test AUC (mean ± std) | rank | behind the best (in stds) | test LogLoss (mean ± std) | calibrated test LogLoss (mean ± std) | seeds | trials (best) | #params (dense + embedding) | MFLOP/example | train s/epoch | search directory |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let test_auc = |t: &Tuned| -> Vec<f64> { t.seeds.iter().map(|r| r.test_auc.unwrap_or(f64::NAN)).collect() };
    let auc_stats: Vec<Option<(f64, f64)>> = rows.iter().map(|t| crate::tune::mean_std(&test_auc(t))).collect();
    for (i, t) in rows.iter().enumerate() {
        let ll: Vec<f64> = t.seeds.iter().map(|r| r.test_logloss.unwrap_or(f64::NAN)).collect();
        let cal: Vec<f64> = t.seeds.iter().map(|r| r.calibrated_test_logloss.unwrap_or(f64::NAN)).collect();
        let first = &t.seeds[0];
        let secs = t.seeds.iter().map(|r| r.seconds_per_epoch).sum::<f64>() / t.seeds.len() as f64;
        let (rank, behind) = standing(&auc_stats, i);
        writeln!(
            s,
            "| {} | {} | {} | {rank} | {behind} | {} | {} | {} | {} ({}) | {} ({} + {}) | {:.3} | {:.1} | `{}` |",
            t.name,
            first.config.model.name(),
            mean_pm_std(&test_auc(t)),
            mean_pm_std(&ll),
            mean_pm_std(&cal),
            t.seeds.len(),
            t.trials,
            t.best,
            first.dense_params + first.embedding_params,
            first.dense_params,
            first.embedding_params,
            first.forward_flops as f64 / 1e6,
            secs,
            t.dir.display()
        )
        .unwrap();
    }
    s.push_str("\nBehind the best: the best mean test AUC minus the row's, and that gap over the larger of the two rows' stds (≤ 1: within one std of the best).\n");
    s
}

fn opt(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.6}"))
}

/// The markdown table (rows in the given order).
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| model | config | test AUC | reference AUC | Δ AUC | test LogLoss | calibrated test LogLoss | valid AUC | #params (dense + embedding) | MFLOP/example | train s/epoch | best epoch / run | run directory |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let reference = r.config.reference.as_ref();
        let delta = match (r.test_auc, reference) {
            (Some(t), Some(rf)) => format!("{:+.4}", t - rf.test_auc),
            _ => "–".into(),
        };
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.6} | {} ({} + {}) | {:.3} | {:.1} | {} / {} | `{}` |",
            r.config.model.name(),
            r.config.name,
            opt(r.test_auc),
            reference.map_or("–".into(), |rf| format!("{:.4} ({})", rf.test_auc, rf.source)),
            delta,
            opt(r.test_logloss),
            opt(r.calibrated_test_logloss),
            r.valid_auc,
            r.dense_params + r.embedding_params,
            r.dense_params,
            r.embedding_params,
            r.forward_flops as f64 / 1e6,
            r.seconds_per_epoch,
            r.best_epoch,
            r.epochs_run,
            r.run_dir.display()
        )
        .unwrap();
    }
    s
}
