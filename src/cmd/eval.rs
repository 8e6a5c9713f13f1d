//! `wukong eval` (metrics of a run on a labelled file) and `wukong predict` (probabilities).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

use super::load_run_and_data;

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
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output file (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let (dev, loaded, enc) = load_run_and_data(&a.run, a.data, &a.device)?;
    let logits = loaded.predict_logits(&enc, &dev)?;
    let mut w: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for z in logits {
        writeln!(w, "{:.7}", 1.0 / (1.0 + (-z as f64).exp()))?;
    }
    w.flush()?;
    Ok(())
}
