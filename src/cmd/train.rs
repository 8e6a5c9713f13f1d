//! `wukong train`: a run from a config (with command-line overrides), or `--resume RUN_DIR`.

use anyhow::{Context, Result};
use std::path::PathBuf;

use super::{CacheFlags, SplitPaths, parse_precision, parse_storage};
use wukong::config::ExperimentConfig;
use wukong::train::{self, RunOptions, checkpoint};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its newest valid checkpoint (its saved config
    /// is used; give no --config or overrides except --epochs, which extends the run to that
    /// many epochs when it reached its cap still improving).
    #[arg(long, conflicts_with_all = ["config", "batch_size", "lr", "emb_lr", "seed", "precision", "emb_storage"])]
    resume: Option<PathBuf>,
    #[command(flatten)]
    paths: SplitPaths,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Adam learning rate (dense parameters).
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of the embedding-row optimizer.
    #[arg(long)]
    emb_lr: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// MLP matrix-product precision: f32 or bf16 (mixed precision).
    #[arg(long, value_parser = parse_precision)]
    precision: Option<wukong::model::layers::Precision>,
    /// Embedding-table storage: f32, f16 or bf16 (stochastic rounding on update).
    #[arg(long, value_parser = parse_storage)]
    emb_storage: Option<wukong::model::TableStorage>,
    /// Where run directories are created.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// cpu, vulkan[:N] or cuda[:N] (GPU ones need the matching cargo feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    cache: CacheFlags,
}

pub fn run(a: Args) -> Result<()> {
    // Under `mpirun -n N` / `srun` (with the `mpi` feature): one rank of a data-parallel job.
    let comm = wukong::dist::from_launcher()?;
    let opts = RunOptions {
        device: a.device.clone(),
        out_dir: a.out.clone(),
        verbose: true,
        cache: a.cache.policy(),
        faults: checkpoint::Faults::from_env()?,
        run_dir: None,
        comm: comm.clone(),
        median_rule: None,
    };
    match (train_or_resume(a, &opts), comm) {
        // A rank that fails ends the whole job at once: its peers would otherwise wait in their
        // next collective for it.
        (Err(e), Some(c)) => {
            eprintln!("error on rank {} of {}: {e:#}", c.rank(), c.size());
            c.abort(1)
        }
        (result, _) => result,
    }
}

fn train_or_resume(a: Args, opts: &RunOptions) -> Result<()> {
    let opts = opts.clone();
    let writer = opts.comm.as_ref().is_none_or(|c| c.rank() == 0);
    let outcome = match (a.resume, a.config) {
        (Some(dir), _) => {
            anyhow::ensure!(a.paths.is_empty(), "--resume uses the run's saved config: give no --train/--valid/--test");
            match a.epochs {
                Some(n) => train::extend(&dir, n, &opts)?,
                None => train::resume(&dir, &opts)?,
            }
        }
        (None, Some(config)) => {
            let mut cfg = ExperimentConfig::load(&config)?;
            a.paths.apply(&mut cfg);
            let t = &mut cfg.train;
            t.epochs = a.epochs.unwrap_or(t.epochs);
            t.batch_size = a.batch_size.unwrap_or(t.batch_size);
            t.lr = a.lr.unwrap_or(t.lr);
            t.emb_lr = a.emb_lr.unwrap_or(t.emb_lr);
            t.seed = a.seed.unwrap_or(t.seed);
            t.precision = a.precision.unwrap_or(t.precision);
            t.emb_storage = a.emb_storage.unwrap_or(t.emb_storage);
            cfg.validate().with_context(|| format!("invalid config {} (with the command-line overrides)", config.display()))?;
            train::train(&cfg, &opts)?
        }
        (None, None) => anyhow::bail!("give --config or --resume"),
    };
    if !writer {
        return Ok(());
    }
    println!("run directory: {}", outcome.run_dir.display());
    println!(
        "best epoch {} of {}: valid AUC {:.6} LogLoss {:.6} ({:.1}s)",
        outcome.best_epoch, outcome.epochs_run, outcome.valid.auc, outcome.valid.logloss, outcome.seconds
    );
    if !outcome.guard_events.is_empty() {
        println!("loss-explosion guard: {} rollback(s) (details in result.json)", outcome.guard_events.len());
    }
    match outcome.test {
        Some(m) => println!("test AUC {:.6} LogLoss {:.6} ({} examples)", m.auc, m.logloss, m.count),
        None => println!("no test split configured"),
    }
    Ok(())
}
