//! `wukong bench` (speed beside the PyTorch reference), `wukong equivalence` (CPU vs GPU) and
//! the hidden `bench-run` that measures our side in a child process.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use super::{parse_precision, parse_storage};
use wukong::bench;

/// Training and scoring speed on generated data of each config's shape, ours beside the
/// PyTorch reference (eager and torch.compile) run in the same invocation; prints a table.
#[derive(clap::Args)]
pub struct Args {
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
    /// Also measure ours with burn's unfused Adam (an extra row: the fused optimizer's A/B).
    #[arg(long)]
    burn_adam: bool,
    /// Synchronize the device at every phase boundary (GPU phase shares; slows the step).
    #[arg(long)]
    sync_phases: bool,
    /// Where generated data and spec.json files go.
    #[arg(long, default_value = "target/bench-work")]
    work_dir: PathBuf,
    /// Also write the markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Trains a few steps of a bench config's model on two devices from the same parameters, batches
/// and dropout masks, and compares losses and final parameters (CPU vs GPU check).
#[derive(clap::Args)]
pub struct EquivalenceArgs {
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
}

/// (Used by `bench`.) Measures our side on one prepared work directory, or the matmul peak.
#[derive(clap::Args)]
pub struct RunArgs {
    dir: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    sync_phases: bool,
    #[arg(long)]
    matmul: bool,
    /// With --matmul: the operands' precision.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    precision: wukong::model::layers::Precision,
    #[arg(long)]
    burn_adam: bool,
    /// Under mpirun: replicated or sharded embedding table.
    #[arg(long, default_value = "replicated", value_parser = parse_embeddings)]
    embeddings: wukong::dist::EmbeddingMode,
}

fn parse_embeddings(s: &str) -> Result<wukong::dist::EmbeddingMode> {
    match s {
        "replicated" => Ok(wukong::dist::EmbeddingMode::Replicated),
        "sharded" => Ok(wukong::dist::EmbeddingMode::Sharded),
        other => anyhow::bail!("--embeddings {other:?}: expected replicated or sharded"),
    }
}

pub fn equivalence(a: EquivalenceArgs) -> Result<()> {
    let mut spec = bench::Spec::load(&a.config, Some(a.steps), Some(0))?;
    if let Some(b) = a.batch_size {
        spec.batch_size = b;
    }
    spec.examples = spec.batch_size * a.steps;
    let data = bench::generate(&spec, spec.train.seed);
    let r = bench::equivalence(&spec, data, &a.reference, &a.device, a.steps, a.tolerance)?;
    for (i, (x, y)) in r.losses_a.iter().zip(&r.losses_b).enumerate() {
        println!("step {:>3}: loss {} {x:.7}  {} {y:.7}  |diff| {:.2e}", i + 1, a.reference, a.device, (x - y).abs());
    }
    println!(
        "max |loss diff| {:.3e}, max relative parameter diff {:.3e}{} (tolerance {:.1e}): {}",
        r.max_loss_diff,
        r.max_param_rel_diff,
        if r.worst_param.is_empty() { String::new() } else { format!(" at {} (norm {:.3e})", r.worst_param, r.worst_param_norm) },
        r.tolerance,
        if r.passed { "PASS" } else { "FAIL" }
    );
    println!("BENCH_RESULT {}", serde_json::to_string(&r)?);
    anyhow::ensure!(r.passed, "{} does not match {} within {}", a.device, a.reference, a.tolerance);
    Ok(())
}

pub fn bench_run(a: RunArgs) -> Result<()> {
    let m = if a.matmul {
        let g = bench::matmul_gflops(&a.device, 4096, 2048, 2048, 10, a.precision)?;
        serde_json::json!({ "gflops": g })
    } else {
        let dir = a.dir.context("bench-run needs a work directory")?;
        let (spec, data) = bench::read_work_dir(&dir)?;
        // under mpirun (feature `mpi`): one rank of a data-parallel measurement
        let comm = wukong::dist::from_launcher()?;
        let rank = comm.as_ref().map_or(0, |c| c.rank());
        let m = serde_json::to_value(bench::measure_ours(&spec, data, &a.device, a.sync_phases, a.burn_adam, comm, a.embeddings)?)?;
        if rank != 0 {
            return Ok(());
        }
        m
    };
    println!("BENCH_RESULT {m}");
    Ok(())
}

/// Data-parallel speed on generated data of each bench config's shape: one process with all
/// threads against `mpirun -n R` ranks splitting the threads, in the same invocation (feature
/// `mpi`, `mpirun` on the PATH); prints ms/step, examples/s, bytes sent per rank and step, and the
/// share of the step spent in the collectives.
#[derive(clap::Args)]
pub struct DpArgs {
    /// Bench configs (benchmarks/configs/*.toml).
    #[arg(required = true)]
    configs: Vec<PathBuf>,
    /// Rank counts to compare against one process.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    ranks: Vec<usize>,
    /// Embedding modes to measure at each rank count.
    #[arg(long, value_delimiter = ',', default_value = "replicated,sharded", value_parser = parse_embeddings)]
    embeddings: Vec<wukong::dist::EmbeddingMode>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Extra arguments for mpirun (e.g. "--mca btl tcp,self" to force TCP, or a hostfile).
    #[arg(long, allow_hyphen_values = true)]
    mpirun_args: Option<String>,
    #[arg(long, default_value = "target/bench-work")]
    work_dir: PathBuf,
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn dp(a: DpArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let threads = wukong::runtime::cpu_threads();
    let mut rows = Vec::new();
    for path in &a.configs {
        let mut spec = bench::Spec::load(path, a.steps, a.warmup)?;
        if let Some(b) = a.batch_size {
            spec.set_batch_size(b);
        }
        let dir = a.work_dir.join(format!("{}-b{}-dp", spec.name, spec.batch_size).to_lowercase());
        let data = bench::generate(&spec, spec.train.seed);
        bench::write_work_dir(&dir, &spec, &data)?;
        drop(data);
        let d = dir.display().to_string();
        let one = child(&exe, &["--threads".into(), threads.to_string(), "bench-run".into(), d.clone()])
            .and_then(|o| bench::parse_result::<bench::Measurement>(&o).map_err(|e| e.to_string()));
        let mut measured = vec![(1, threads, "–".to_string(), one)];
        for (r, mode) in a.ranks.iter().flat_map(|&r| a.embeddings.iter().map(move |&m| (r, m))) {
            let per = (threads / r).max(1);
            let mut args: Vec<String> = vec!["-n".into(), r.to_string(), "--oversubscribe".into(), "--bind-to".into(), "none".into()];
            if let Some(extra) = &a.mpirun_args {
                args.extend(extra.split_whitespace().map(String::from));
            }
            let mode_name = format!("{mode:?}").to_lowercase();
            args.extend([exe.display().to_string(), "--threads".into(), per.to_string(), "bench-run".into(), d.clone()]);
            args.extend(["--embeddings".to_string(), mode_name.clone()]);
            let m =
                child(Path::new("mpirun"), &args).and_then(|o| bench::parse_result::<bench::Measurement>(&o).map_err(|e| e.to_string()));
            measured.push((r, per, mode_name, m));
        }
        rows.push((spec, measured));
    }
    let table = bench::report_dp(&rows, &wukong::runtime::cpu_line());
    println!("{table}");
    if let Some(p) = a.out {
        wukong::runtime::write_atomic(&p, table.as_bytes())?;
    }
    Ok(())
}

/// Runs a measuring child process; its stderr streams through, stdout is searched for the result.
fn child(program: &Path, args: &[String]) -> std::result::Result<String, String> {
    tracing::info!("$ {} {}", program.display(), args.join(" "));
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

pub fn run(a: Args) -> Result<()> {
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
        tracing::info!(
            "== {}: generating {} examples ({} fields, {} table rows)",
            spec.name,
            spec.examples,
            spec.vocab.len(),
            spec.table_rows
        );
        let data = bench::generate(&spec, spec.train.seed);
        bench::write_work_dir(&dir, &spec, &data)?;
        drop(data);
        let d = dir.display().to_string();
        let mut ours_args =
            vec!["--threads".to_string(), threads.to_string(), "bench-run".into(), d.clone(), "--device".into(), a.device.clone()];
        if a.sync_phases {
            ours_args.push("--sync-phases".into());
        }
        let ours = child(&exe, &ours_args).and_then(|o| bench::parse_result(&o).map_err(|e| e.to_string()));
        let ours_burn_adam = a.burn_adam.then(|| {
            let args: Vec<String> = ours_args.iter().cloned().chain(["--burn-adam".to_string()]).collect();
            child(&exe, &args).and_then(|o| bench::parse_result(&o).map_err(|e| e.to_string()))
        });
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
            child(&python, &args).and_then(|o| bench::parse_result(&o).map_err(|e| e.to_string()))
        };
        let eager = torch("eager");
        let compiled = if a.no_compile { Err("--no-compile".to_string()) } else { torch("compile") };
        for (name, m) in [("ours", &ours), ("eager", &eager), ("compile", &compiled)] {
            match m {
                Ok(m) => tracing::info!("   {name}: median {:.1} ms/step, loss {:.4} → {:.4}", m.median_ms(), m.first_loss, m.last_loss),
                Err(e) => tracing::warn!("   {name}: {e}"),
            }
        }
        results.push(bench::ConfigResult { spec, ours, eager, compiled, ours_burn_adam });
    }
    let mut peaks = Vec::new();
    if !a.no_peak {
        let gflops = |o: std::result::Result<String, String>| {
            o.and_then(|o| {
                let v: serde_json::Value = bench::parse_result(&o).map_err(|e| e.to_string())?;
                v["gflops"].as_f64().ok_or_else(|| "no gflops".to_string())
            })
        };
        // Both precisions: f32, and bf16 operands (where a CPU has bf16 units, PyTorch's product
        // runs on them; ours converts).
        for precision in ["f32", "bf16"] {
            let ours = gflops(child(
                &exe,
                &[
                    "--threads".into(),
                    threads.to_string(),
                    "bench-run".into(),
                    "--matmul".into(),
                    "--precision".into(),
                    precision.into(),
                    "--device".into(),
                    a.device.clone(),
                ],
            ));
            peaks.push((format!("burn 0.22.1 {} (ours), {precision}", bench::backend_name(&a.device)), ours));
            if torch_ok && precision == "bf16" && a.device == "cpu" && !wukong::runtime::cpu_has_bf16_units() {
                // PyTorch's bf16 product without bf16 units is a single-threaded fallback that
                // takes minutes at this size.
                peaks.push(("PyTorch, bf16".to_string(), Err("skipped: this CPU has no bf16 units".to_string())));
            } else if torch_ok {
                let t = gflops(child(
                    &python,
                    &[
                        script.clone(),
                        "--matmul".into(),
                        "--precision".into(),
                        precision.into(),
                        "--threads".into(),
                        threads.to_string(),
                        "--device".into(),
                        a.device.clone(),
                    ],
                ));
                peaks.push((format!("PyTorch, {precision}"), t));
            }
        }
    }
    let header = format!(
        "{}; {}\n\nDevice {}, {threads} threads for both sides; {} timed steps after {} warm-up; ratio < 1 means ours is faster. Training GFLOP/s counts 3 × the analytic forward FLOPs.\n",
        wukong::runtime::cpu_line(),
        wukong::model::bf16::Bf16Kernel::chosen().describe(),
        a.device,
        results.first().map(|r| r.spec.steps).unwrap_or(0),
        results.first().map(|r| r.spec.warmup).unwrap_or(0),
    );
    let table = bench::report(&results, &peaks, &header, &a.device);
    println!("{table}");
    if let Some(p) = a.out {
        wukong::runtime::write_atomic(&p, table.as_bytes())?;
        tracing::info!("report written to {}", p.display());
    }
    Ok(())
}
