//! `wukong eval` (metrics of a run on a labelled file) and `wukong predict` (probabilities).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

use super::load_run_and_data;
use wukong::serve::Scorer;
use wukong::serve::predict::{OutFormat, PredictOptions, predict_file};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let (dev, loaded, enc) = load_run_and_data(&a.run, a.data, &a.device)?;
    let m = loaded.evaluate(&enc, &dev)?;
    println!("AUC {:.6} LogLoss {:.6} ({} examples)", m.auc, m.logloss, m.count);
    Ok(())
}

#[derive(clap::Args)]
pub struct PredictArgs {
    #[arg(long)]
    run: PathBuf,
    /// The file to score (default: the run's test split). The label column may be absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output file (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output format (default: from the --out extension .csv/.tsv/.jsonl, else plain: one
    /// probability per line).
    #[arg(long, value_enum)]
    format: Option<OutFormat>,
    /// A column copied to the output before the score (an id); repeatable.
    #[arg(long = "id-column")]
    id_columns: Vec<String>,
    /// Further columns copied to the output (after the ids); repeatable.
    #[arg(long)]
    keep: Vec<String>,
    /// The file has no label column and no header (Criteo test files; CSV/TSV with data.columns).
    #[arg(long)]
    unlabeled: bool,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 4096)]
    batch_rows: usize,
    /// What a row that cannot be scored does (default: the run's data.bad_lines): `error` stops
    /// with its file:line and field; `skip` writes an output line naming the row and why.
    #[arg(long, value_parser = parse_bad_lines)]
    bad_lines: Option<wukong::data::BadLines>,
    /// Calibrated probabilities: the run's Platt scaling (result.json `calibrated`, fitted on its
    /// validation split) applied to every score; the ranking is the same.
    #[arg(long)]
    calibrated: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let dev = wukong::runtime::parse_device(&a.device)?;
    let scorer = Scorer::load_with(&a.run, &dev, a.calibrated)?;
    let format = a.format.unwrap_or_else(|| OutFormat::from_path(a.out.as_deref()));
    let keep: Vec<String> = a.id_columns.into_iter().chain(a.keep).collect();
    let mut opts = PredictOptions { unlabeled: a.unlabeled, keep, format, batch_rows: a.batch_rows, part: None, bad_lines: a.bad_lines };
    let mut w: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let log = match &a.data {
        Some(path) => predict_file(&scorer, path, &opts, &mut w)?,
        None => {
            let test = wukong::data::pipeline::split_sources(&scorer.run.config.data)
                .into_iter()
                .find(|s| s.name == "test")
                .context("the run's config has no test split: give --data")?;
            opts.part = test.part;
            predict_file(&scorer, &test.path, &opts, &mut w)?
        }
    };
    w.flush()?;
    eprintln!(
        "{} rows: {} scored, {} skipped (reported in the output){}",
        log.rows,
        log.scored,
        log.skipped,
        if log.labelled { "" } else { "; no label column" }
    );
    Ok(())
}

fn parse_bad_lines(s: &str) -> std::result::Result<wukong::data::BadLines, String> {
    match s {
        "error" => Ok(wukong::data::BadLines::Error),
        "skip" => Ok(wukong::data::BadLines::Skip),
        other => Err(format!("expected error or skip, got {other:?}")),
    }
}
