//! The `wukong` command line: train, eval, predict, flops, cache, gen-criteo.

/// A training step allocates and frees hundreds of large tensors; glibc's malloc unmapped them
/// on free and page-faulted them back in on the next step (a fifth of a step in `perf`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Keeps freed memory mapped: by default mimalloc purges it after 10 ms, and the next step's
/// tensors fault it back in, zeroing 2 MiB huge pages (17% of a Frappe step in `perf`, gone
/// with purging off; peak RSS 390 → 690 MiB on that config).
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15; // `mi_option_purge_delay` in mimalloc.h (v2 and v3; the crate builds v3)
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use wukong::config::ExperimentConfig;
use wukong::data::SplitData;
use wukong::data::pipeline;
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

/// Overrides of the config's data files.
#[derive(clap::Args)]
struct SplitPaths {
    #[arg(long)]
    train: Option<PathBuf>,
    #[arg(long)]
    valid: Option<PathBuf>,
    #[arg(long)]
    test: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Training and scoring speed on generated data of each config's shape, ours beside the
    /// PyTorch reference (eager and torch.compile) run in the same invocation; prints a table.
    Bench {
        /// Bench configs (benchmarks/configs/*.toml).
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Timed steps (default: the config's, at least 20 there).
        #[arg(long)]
        steps: Option<usize>,
        #[arg(long)]
        warmup: Option<usize>,
        /// Training (and scoring) batch size for every config (default: each config's).
        #[arg(long)]
        batch_size: Option<usize>,
        /// MLP matrix-product precision for both sides: f32 or bf16 (PyTorch: autocast).
        #[arg(long, value_parser = parse_precision)]
        precision: Option<wukong::model::layers::Precision>,
        /// Our embedding-table storage: f32, f16 or bf16 (the PyTorch reference keeps f32).
        #[arg(long, value_parser = parse_storage)]
        emb_storage: Option<wukong::model::TableStorage>,
        /// Device for our side: cpu, vulkan[:N], cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Python interpreter for the PyTorch reference.
        #[arg(long, default_value = "python3")]
        python: String,
        /// The reference script.
        #[arg(long, default_value = "benchmarks/torch_ref.py")]
        reference: PathBuf,
        /// Skip the PyTorch reference entirely.
        #[arg(long)]
        no_reference: bool,
        /// Skip the torch.compile column (compilation takes minutes on 2 cores).
        #[arg(long)]
        no_compile: bool,
        /// Skip the matrix-multiply peak measurement.
        #[arg(long)]
        no_peak: bool,
        /// Synchronize the device at every phase boundary (GPU phase shares; slows the step).
        #[arg(long)]
        sync_phases: bool,
        /// Where generated data and spec.json files go.
        #[arg(long, default_value = "target/bench-work")]
        work_dir: PathBuf,
        /// Also write the markdown report here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Trains a few steps of a bench config's model on two devices from the same parameters, batches
    /// and dropout masks, and compares losses and final parameters (CPU vs GPU check).
    Equivalence {
        /// A bench config (benchmarks/configs/*.toml).
        config: PathBuf,
        #[arg(long, default_value = "cpu")]
        reference: String,
        #[arg(long)]
        device: String,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Largest allowed |loss difference| and relative parameter difference.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
        /// Training batch size (default: the config's).
        #[arg(long)]
        batch_size: Option<usize>,
    },
    /// (Used by `bench`.) Measures our side on one prepared work directory, or the matmul peak.
    #[command(hide = true)]
    BenchRun {
        dir: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        sync_phases: bool,
        #[arg(long)]
        matmul: bool,
    },
    /// Train a model from an experiment config (or continue a run with --resume); prints
    /// validation metrics per evaluation and the final test metrics.
    Train {
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Continue the run in this directory from its newest valid checkpoint (its saved config
        /// is used; give no --config or overrides).
        #[arg(long, conflicts_with_all = ["config", "epochs", "batch_size", "lr", "emb_lr", "seed", "precision", "emb_storage"])]
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
    },
    /// Pictures of finished runs: learning curves, ROC, reliability diagram (PNG) and an HTML
    /// page with them and each run's config, environment and metrics. Several runs overlay.
    Report {
        /// Run directories.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where the PNGs and report.html go (default: <first run>/report).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Labelled file scored for ROC and reliability (default: each run's test split).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// AUC and LogLoss of a trained run on a labelled file (default: the run's test split).
    Eval {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Click probabilities for a file, one per line.
    Predict {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        data: Option<PathBuf>,
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
    /// Encode a config's splits into its binary cache (`data.cache_dir`) and report throughput.
    Cache {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        paths: SplitPaths,
        /// Overrides data.cache_dir.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheFlags,
        /// Also time full passes over the cached training split (epoch read throughput).
        #[arg(long, default_value_t = 0)]
        read_passes: usize,
    },
    /// Train several configs (and/or read finished runs) and write a Table-2-style comparison.
    Compare {
        /// Experiment configs to train, in table order.
        #[arg(long)]
        config: Vec<PathBuf>,
        /// Finished run directories to include (after the trained ones).
        #[arg(long)]
        run: Vec<PathBuf>,
        /// Also write the table to this markdown file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where new run directories are created.
        #[arg(long, default_value = "runs")]
        runs_dir: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Write a synthetic Criteo-format TSV (label, I1–I13, C1–C26) with a learnable signal.
    GenCriteo {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Largest categorical vocabulary.
        #[arg(long, default_value_t = 100_000)]
        max_vocab: u64,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Loads a run directory and encodes `data` (default: the run's test split) with its saved
/// encoder (unseen values → OOV or their hash bucket).
fn load_run_and_data(run: &Path, data: Option<PathBuf>, device: &str) -> Result<(Device, checkpoint::LoadedRun, SplitData)> {
    let dev = wukong::runtime::parse_device(device)?;
    let loaded = checkpoint::load_run(run, &dev)?;
    let split = loaded.encode(data)?;
    Ok((dev, loaded, split))
}

/// How stale data caches are treated (default: rebuilt, with a line saying why).
#[derive(clap::Args, Debug, Clone, Copy)]
struct CacheFlags {
    /// Rebuild every data cache, current or not.
    #[arg(long, conflicts_with = "no_rebuild_cache")]
    rebuild_cache: bool,
    /// Refuse a stale data cache instead of rebuilding it.
    #[arg(long)]
    no_rebuild_cache: bool,
}

impl CacheFlags {
    fn policy(self) -> wukong::data::CachePolicy {
        use wukong::data::CachePolicy::*;
        match (self.rebuild_cache, self.no_rebuild_cache) {
            (true, _) => RebuildAll,
            (_, true) => RefuseStale,
            _ => RebuildStale,
        }
    }
}

fn apply_paths(cfg: &mut ExperimentConfig, paths: SplitPaths) {
    if let Some(p) = paths.train {
        cfg.data.train = p
    }
    if let Some(p) = paths.valid {
        cfg.data.valid = Some(p)
    }
    if let Some(p) = paths.test {
        cfg.data.test = Some(p)
    }
}

fn run() -> Result<()> {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Before any thread pool exists; burn's CPU backend uses rayon's global pool.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    match cli.command {
        Command::Train { config, resume, paths, epochs, batch_size, lr, emb_lr, seed, precision, emb_storage, out, device, cache } => {
            let opts = RunOptions { device, out_dir: out, verbose: true, cache: cache.policy(), faults: checkpoint::Faults::from_env()? };
            let outcome = match (resume, config) {
                (Some(dir), _) => {
                    anyhow::ensure!(
                        paths.train.is_none() && paths.valid.is_none() && paths.test.is_none(),
                        "--resume uses the run's saved config: give no --train/--valid/--test"
                    );
                    train::resume(&dir, &opts)?
                }
                (None, Some(config)) => {
                    let mut cfg = ExperimentConfig::load(&config)?;
                    apply_paths(&mut cfg, paths);
                    if let Some(x) = epochs {
                        cfg.train.epochs = x
                    }
                    if let Some(x) = batch_size {
                        cfg.train.batch_size = x
                    }
                    if let Some(x) = lr {
                        cfg.train.lr = x
                    }
                    if let Some(x) = emb_lr {
                        cfg.train.emb_lr = x
                    }
                    if let Some(x) = seed {
                        cfg.train.seed = x
                    }
                    if let Some(x) = precision {
                        cfg.train.precision = x
                    }
                    if let Some(x) = emb_storage {
                        cfg.train.emb_storage = x
                    }
                    cfg.validate().with_context(|| format!("invalid config {} (with the command-line overrides)", config.display()))?;
                    train::train(&cfg, &opts)?
                }
                (None, None) => anyhow::bail!("give --config or --resume"),
            };
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
        }
        Command::Report { runs, out, data, device } => {
            let views = runs.iter().map(|r| wukong::report::RunView::load(r, data.clone(), &device)).collect::<Result<Vec<_>>>()?;
            let out = out.unwrap_or_else(|| runs[0].join("report"));
            for path in wukong::report::write(&views, &out)? {
                println!("wrote {}", path.display());
            }
        }
        Command::Eval { run, data, device } => {
            let (dev, loaded, enc) = load_run_and_data(&run, data, &device)?;
            let m = train::evaluate(&loaded.model, &enc, &loaded.encoder, loaded.config.train.eval_batch_size, &dev)?;
            println!("AUC {:.6} LogLoss {:.6} ({} examples)", m.auc, m.logloss, m.count);
        }
        Command::Predict { run, data, out, device } => {
            let (dev, loaded, enc) = load_run_and_data(&run, data, &device)?;
            let logits = train::predict_logits(&loaded.model, &enc, &loaded.encoder, loaded.config.train.eval_batch_size, &dev)?;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => {
                    Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?))
                }
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            for z in logits {
                writeln!(w, "{:.7}", 1.0 / (1.0 + (-z as f64).exp()))?;
            }
            w.flush()?;
        }
        Command::Flops { config } => {
            let cfg = ExperimentConfig::load(&config)?;
            let train_src = &pipeline::split_sources(&cfg.data)[0];
            let (fields, dense, rows) = match pipeline::fit_in_memory(&cfg.data, train_src) {
                Ok((enc, _, _)) => (enc.num_fields(), enc.num_dense(), Some(enc.total_rows())),
                Err(e) => {
                    eprintln!("note: {e:#}; counting without the vocabulary");
                    (cfg.data.num_fields.context("data.num_fields is needed when the training file is not readable")?, 0, None)
                }
            };
            println!("{}", wukong::flops::report(&cfg.model, fields, dense, rows));
        }
        Command::Cache { config, paths, cache_dir, cache, read_passes } => {
            let mut cfg = ExperimentConfig::load(&config)?;
            apply_paths(&mut cfg, paths);
            if let Some(d) = cache_dir {
                cfg.data.cache_dir = Some(d)
            }
            cfg.data.stream = true; // build the caches; the timing below reads them back
            cfg.validate()?;
            let prepared = wukong::data::prepare(&cfg.data, cache.policy())?;
            println!(
                "{:<6} {:>10} {:>8} {:>10} {:>9} {:>10} {:>11} {:>9}",
                "split", "rows", "skipped", "oov", "MB", "seconds", "MB/s", "rows/s"
            );
            for (name, _, l) in &prepared.splits {
                let mb = l.bytes as f64 / 1e6;
                println!(
                    "{name:<6} {:>10} {:>8} {:>10} {:>9.1} {:>10.3} {:>11.1} {:>9.0}{}",
                    l.rows,
                    l.skipped,
                    l.oov,
                    mb,
                    l.seconds,
                    mb / l.seconds,
                    l.rows as f64 / l.seconds,
                    if l.from_cache { "  (already cached)" } else { "" }
                );
            }
            if read_passes > 0 {
                let (_, train_split, _) = &prepared.splits[0];
                let loader = wukong::data::BatchLoader::from_split(
                    train_split.clone(),
                    prepared.encoder.total_rows(),
                    cfg.train.batch_size,
                    cfg.data.chunk_rows,
                    cfg.data.shuffle_chunks,
                );
                for pass in 1..=read_passes {
                    let t = std::time::Instant::now();
                    let mut rows = 0usize;
                    for b in loader.epoch(Some(pass as u64)) {
                        rows += b?.size;
                    }
                    let secs = t.elapsed().as_secs_f64();
                    println!(
                        "epoch read {pass}: {rows} rows in {secs:.3}s = {:.0} rows/s (shuffled batches of {} from the cache)",
                        rows as f64 / secs,
                        cfg.train.batch_size
                    );
                }
            }
        }
        Command::Compare { config, run, out, runs_dir, device } => {
            let mut dirs = Vec::new();
            for path in &config {
                let cfg = ExperimentConfig::load(path)?;
                println!("== training {} ({})", cfg.name, path.display());
                let outcome = train::train(
                    &cfg,
                    &RunOptions { device: device.clone(), out_dir: runs_dir.clone(), verbose: true, ..Default::default() },
                )?;
                dirs.push(outcome.run_dir);
            }
            dirs.extend(run);
            anyhow::ensure!(!dirs.is_empty(), "give --config and/or --run");
            let rows = dirs.iter().map(|d| wukong::compare::read_run(d)).collect::<Result<Vec<_>>>()?;
            let table = wukong::compare::table(&rows);
            print!("{table}");
            if let Some(p) = out {
                wukong::runtime::write_atomic(&p, table.as_bytes())?;
                println!("table written to {}", p.display());
            }
        }
        Command::Bench {
            configs,
            steps,
            warmup,
            batch_size,
            precision,
            emb_storage,
            device,
            python,
            reference,
            no_reference,
            no_compile,
            no_peak,
            sync_phases,
            work_dir,
            out,
        } => {
            run_bench(BenchArgs {
                configs,
                steps,
                warmup,
                batch_size,
                precision,
                emb_storage,
                device,
                python,
                reference,
                no_reference,
                no_compile,
                no_peak,
                sync_phases,
                work_dir,
                out,
            })?;
        }
        Command::Equivalence { config, reference, device, steps, tolerance, batch_size } => {
            let mut spec = wukong::bench::Spec::load(&config, Some(steps), Some(0))?;
            if let Some(b) = batch_size {
                spec.batch_size = b;
            }
            spec.examples = spec.batch_size * steps;
            let data = wukong::bench::generate(&spec, spec.train.seed);
            let r = wukong::bench::equivalence(&spec, data, &reference, &device, steps, tolerance)?;
            for (i, (a, b)) in r.losses_a.iter().zip(&r.losses_b).enumerate() {
                println!("step {:>3}: loss {reference} {a:.7}  {device} {b:.7}  |diff| {:.2e}", i + 1, (a - b).abs());
            }
            println!(
                "max |loss diff| {:.3e}, max relative parameter diff {:.3e} (tolerance {:.1e}): {}",
                r.max_loss_diff,
                r.max_param_rel_diff,
                r.tolerance,
                if r.passed { "PASS" } else { "FAIL" }
            );
            println!("BENCH_RESULT {}", serde_json::to_string(&r)?);
            anyhow::ensure!(r.passed, "{device} does not match {reference} within {tolerance}");
        }
        Command::BenchRun { dir, device, sync_phases, matmul } => {
            let m = if matmul {
                let g = wukong::bench::matmul_gflops(&device, 4096, 2048, 2048, 10)?;
                serde_json::json!({ "gflops": g })
            } else {
                let dir = dir.context("bench-run needs a work directory")?;
                let (spec, data) = wukong::bench::read_work_dir(&dir)?;
                serde_json::to_value(wukong::bench::measure_ours(&spec, data, &device, sync_phases)?)?
            };
            println!("BENCH_RESULT {m}");
        }
        Command::GenCriteo { out, rows, seed, max_vocab } => {
            wukong::data::synth::write_criteo(&out, rows, seed, max_vocab)?;
            println!("wrote {rows} rows to {}", out.display());
        }
    }
    Ok(())
}

fn parse_precision(s: &str) -> std::result::Result<wukong::model::layers::Precision, String> {
    match s {
        "f32" => Ok(wukong::model::layers::Precision::F32),
        "bf16" => Ok(wukong::model::layers::Precision::Bf16),
        other => Err(format!("unknown precision {other:?} (expected f32 or bf16)")),
    }
}

fn parse_storage(s: &str) -> std::result::Result<wukong::model::TableStorage, String> {
    match s {
        "f32" => Ok(wukong::model::TableStorage::F32),
        "f16" => Ok(wukong::model::TableStorage::F16),
        "bf16" => Ok(wukong::model::TableStorage::Bf16),
        other => Err(format!("unknown table storage {other:?} (expected f32, f16 or bf16)")),
    }
}

struct BenchArgs {
    configs: Vec<PathBuf>,
    steps: Option<usize>,
    warmup: Option<usize>,
    batch_size: Option<usize>,
    precision: Option<wukong::model::layers::Precision>,
    emb_storage: Option<wukong::model::TableStorage>,
    device: String,
    python: String,
    reference: PathBuf,
    no_reference: bool,
    no_compile: bool,
    no_peak: bool,
    sync_phases: bool,
    work_dir: PathBuf,
    out: Option<PathBuf>,
}

/// Runs a measuring child process; its stderr streams through, stdout is searched for the result.
fn bench_child(program: &Path, args: &[String]) -> std::result::Result<String, String> {
    eprintln!("$ {} {}", program.display(), args.join(" "));
    let out = std::process::Command::new(program)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        return Err(format!("{} exited with {}: {last}", program.display(), out.status));
    }
    Ok(stdout)
}

fn run_bench(a: BenchArgs) -> Result<()> {
    use wukong::bench;
    let exe = std::env::current_exe()?;
    let threads = wukong::runtime::cpu_threads();
    let python = PathBuf::from(&a.python);
    let script = a.reference.display().to_string();
    let torch_ok = !a.no_reference && a.reference.exists();
    let mut results = Vec::new();
    for path in &a.configs {
        let mut spec = bench::Spec::load(path, a.steps, a.warmup)?;
        if let Some(b) = a.batch_size {
            spec.set_batch_size(b);
        }
        if let Some(p) = a.precision {
            spec.train.precision = p;
        }
        if let Some(s) = a.emb_storage {
            spec.train.emb_storage = s;
        }
        let dir = a
            .work_dir
            .join(format!("{}-b{}-{:?}-{:?}", spec.name, spec.batch_size, spec.train.precision, spec.train.emb_storage).to_lowercase());
        eprintln!("== {}: generating {} examples ({} fields, {} table rows)", spec.name, spec.examples, spec.vocab.len(), spec.table_rows);
        let data = bench::generate(&spec, spec.train.seed);
        bench::write_work_dir(&dir, &spec, &data)?;
        drop(data);
        let d = dir.display().to_string();
        let mut ours_args =
            vec!["--threads".to_string(), threads.to_string(), "bench-run".into(), d.clone(), "--device".into(), a.device.clone()];
        if a.sync_phases {
            ours_args.push("--sync-phases".into());
        }
        let ours = bench_child(&exe, &ours_args).and_then(|o| bench::parse_result(&o).map_err(|e| e.to_string()));
        let torch = |mode: &str| -> std::result::Result<bench::Measurement, String> {
            if !torch_ok {
                return Err(if a.no_reference { "--no-reference".into() } else { format!("{} not found", a.reference.display()) });
            }
            let args = vec![
                script.clone(),
                d.clone(),
                "--threads".into(),
                threads.to_string(),
                "--mode".into(),
                mode.into(),
                "--device".into(),
                a.device.clone(),
            ];
            bench_child(&python, &args).and_then(|o| bench::parse_result(&o).map_err(|e| e.to_string()))
        };
        let eager = torch("eager");
        let compiled = if a.no_compile { Err("--no-compile".to_string()) } else { torch("compile") };
        for (name, m) in [("ours", &ours), ("eager", &eager), ("compile", &compiled)] {
            match m {
                Ok(m) => eprintln!("   {name}: median {:.1} ms/step, loss {:.4} → {:.4}", m.median_ms(), m.first_loss, m.last_loss),
                Err(e) => eprintln!("   {name}: {e}"),
            }
        }
        results.push(bench::ConfigResult { spec, ours, eager, compiled });
    }
    let mut peaks = Vec::new();
    if !a.no_peak {
        let gflops = |o: std::result::Result<String, String>| {
            o.and_then(|o| {
                let v: serde_json::Value = bench::parse_result(&o).map_err(|e| e.to_string())?;
                v["gflops"].as_f64().ok_or_else(|| "no gflops".to_string())
            })
        };
        let ours = gflops(bench_child(
            &exe,
            &["--threads".into(), threads.to_string(), "bench-run".into(), "--matmul".into(), "--device".into(), a.device.clone()],
        ));
        peaks.push(("burn 0.22.1 Flex (ours)".to_string(), ours));
        if torch_ok {
            let t = gflops(bench_child(
                &python,
                &[script.clone(), "--matmul".into(), "--threads".into(), threads.to_string(), "--device".into(), a.device.clone()],
            ));
            peaks.push(("PyTorch".to_string(), t));
        }
    }
    let header = format!(
        "Device {}, {threads} threads for both sides; {} timed steps after {} warm-up; ratio < 1 means ours is faster. Training GFLOP/s counts 3 × the analytic forward FLOPs.\n",
        a.device,
        results.first().map(|r| r.spec.steps).unwrap_or(0),
        results.first().map(|r| r.spec.warmup).unwrap_or(0),
    );
    let table = bench::report(&results, &peaks, &header);
    println!("{table}");
    if let Some(p) = a.out {
        wukong::runtime::write_atomic(&p, table.as_bytes())?;
        eprintln!("report written to {}", p.display());
    }
    Ok(())
}
