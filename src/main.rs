//! The `wukong` command line: train, eval, predict, flops.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use wukong::config::ExperimentConfig;
use wukong::data::EncodedDataset;
use wukong::train::{self, RunOptions, checkpoint};

#[derive(Parser)]
#[command(name = "wukong", version, about = "Train, evaluate and serve Wukong CTR models")]
struct Cli {
    /// CPU worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from an experiment config; prints per-epoch validation and final test metrics.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        train: Option<PathBuf>,
        #[arg(long)]
        valid: Option<PathBuf>,
        #[arg(long)]
        test: Option<PathBuf>,
        #[arg(long)]
        epochs: Option<usize>,
        #[arg(long)]
        batch_size: Option<usize>,
        /// Adam learning rate (dense parameters).
        #[arg(long)]
        lr: Option<f64>,
        /// Row-wise Adagrad learning rate (embedding rows).
        #[arg(long)]
        emb_lr: Option<f64>,
        #[arg(long)]
        seed: Option<u64>,
        /// Where run directories are created.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// cpu, vulkan[:N] or cuda[:N] (GPU ones need the matching cargo feature).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// AUC and LogLoss of a trained run on a labelled file.
    Eval {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Click probabilities for a file, one per line.
    Predict {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Parameter count and analytic FLOPs per example of a config.
    Flops {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Loads a run directory and encodes `data` with its saved encoder (unseen values → OOV).
fn load_run_and_data(run: &Path, data: &Path, device: &str) -> Result<(Device, checkpoint::LoadedRun, Arc<EncodedDataset>)> {
    let dev = wukong::runtime::parse_device(device)?;
    let loaded = checkpoint::load_run(run, &dev)?;
    let raw = train::read_split(data, &loaded.config)?;
    let (enc, oov) = train::encode(&raw, &loaded.encoder)?;
    eprintln!("{}: {} rows, {} skipped, {oov} values out of vocabulary", data.display(), raw.len(), raw.skipped);
    Ok((dev, loaded, Arc::new(enc)))
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Before any thread pool exists; burn's CPU backend uses rayon's global pool.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    match cli.command {
        Command::Train { config, train, valid, test, epochs, batch_size, lr, emb_lr, seed, out, device } => {
            let mut cfg = ExperimentConfig::load(&config)?;
            if let Some(p) = train { cfg.data.train = p }
            if let Some(p) = valid { cfg.data.valid = p }
            if let Some(p) = test { cfg.data.test = Some(p) }
            if let Some(x) = epochs { cfg.train.epochs = x }
            if let Some(x) = batch_size { cfg.train.batch_size = x }
            if let Some(x) = lr { cfg.train.lr = x }
            if let Some(x) = emb_lr { cfg.train.emb_lr = x }
            if let Some(x) = seed { cfg.train.seed = x }
            cfg.validate()?;
            let outcome = train::train(&cfg, &RunOptions { device, out_dir: out, verbose: true })?;
            println!("run directory: {}", outcome.run_dir.display());
            println!(
                "best epoch {} of {}: valid AUC {:.6} LogLoss {:.6} ({:.1}s)",
                outcome.best_epoch, outcome.epochs_run, outcome.valid.auc, outcome.valid.logloss, outcome.seconds
            );
            match outcome.test {
                Some(m) => println!("test AUC {:.6} LogLoss {:.6} ({} examples)", m.auc, m.logloss, m.count),
                None => println!("no test split configured"),
            }
        }
        Command::Eval { run, data, device } => {
            let (dev, loaded, enc) = load_run_and_data(&run, &data, &device)?;
            let m = train::evaluate(&loaded.model, enc, loaded.encoder.total_rows(), loaded.config.train.eval_batch_size, &dev)?;
            println!("AUC {:.6} LogLoss {:.6} ({} examples)", m.auc, m.logloss, m.count);
        }
        Command::Predict { run, data, out, device } => {
            let (dev, loaded, enc) = load_run_and_data(&run, &data, &device)?;
            let logits = train::predict_logits(&loaded.model, enc, loaded.encoder.total_rows(), loaded.config.train.eval_batch_size, &dev)?;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            for z in logits {
                writeln!(w, "{:.7}", 1.0 / (1.0 + (-z as f64).exp()))?;
            }
            w.flush()?;
        }
        Command::Flops { config } => {
            let cfg = ExperimentConfig::load(&config)?;
            let (fields, rows) = match train::read_split(&cfg.data.train, &cfg) {
                Ok(raw) => {
                    let enc = wukong::data::Encoder::fit(&raw, &cfg.data.field_names, cfg.data.min_count)?;
                    (enc.num_fields(), Some(enc.total_rows()))
                }
                Err(e) => {
                    eprintln!("note: {e:#}; counting without the vocabulary");
                    (cfg.data.num_fields.context("data.num_fields is needed when the training file is not readable")?, None)
                }
            };
            println!("{}", wukong::flops::report(&cfg.model, fields, rows));
        }
    }
    Ok(())
}
