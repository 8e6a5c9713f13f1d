//! The `wukong` command line: train, eval, predict, serve, flops, cache, scale, tune, ….

/// A training step allocates and frees hundreds of large tensors; glibc's malloc unmapped them
/// on free and page-faulted them back in on the next step (a fifth of a step in `perf`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Keeps freed memory mapped (for `purge_delay_ms`; -1 = for good): by default mimalloc purges it after 10 ms, and the next step's
/// tensors fault it back in, zeroing 2 MiB huge pages (17% of a Frappe step in `perf`, gone
/// with purging off; peak RSS 390 → 690 MiB on that config).
fn keep_freed_memory(purge_delay_ms: std::ffi::c_long) {
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15; // `mi_option_purge_delay` in mimalloc.h (v2 and v3; the crate builds v3)
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, purge_delay_ms) };
}

mod cmd;

use clap::{Parser, Subcommand};

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
    Bench(cmd::bench::Args),
    Equivalence(cmd::bench::EquivalenceArgs),
    #[command(hide = true)]
    BenchRun(cmd::bench::RunArgs),
    /// Data-parallel speed (feature `mpi`): one process against `mpirun -n R` on generated data
    /// of each bench config's shape; ms/step, examples/s, bytes sent, communication share.
    BenchDp(cmd::bench::DpArgs),
    /// Train a model from an experiment config (or continue a run with --resume); prints
    /// validation metrics per evaluation and the final test metrics.
    Train(cmd::train::Args),
    /// Pictures of finished runs: learning curves, ROC, reliability diagram (PNG) and an HTML
    /// page with them and each run's config, environment and metrics. Several runs overlay.
    Report(cmd::report::Args),
    /// AUC and LogLoss of a trained run on a labelled file (default: the run's test split).
    Eval(cmd::eval::EvalArgs),
    /// Click probabilities for a file (labelled or not), one output row per input row; ids and
    /// other columns copied through; plain, CSV, TSV or JSON lines.
    Predict(cmd::eval::PredictArgs),
    /// Serve a run over HTTP: POST /v1/score, /healthz, /v1/model, /metrics, /openapi.json,
    /// POST /admin/reload (or SIGHUP); micro-batching, bounded queue (503), graceful shutdown.
    Serve(cmd::serve::ServeArgs),
    /// Load a scoring server: rows per request × concurrent clients for a fixed time; QPS,
    /// rows/s, latency percentiles, errors.
    Loadtest(cmd::serve::LoadtestArgs),
    /// Parameter count and analytic FLOPs per example of a config.
    Flops(cmd::flops::Args),
    /// Encode a config's splits into its binary cache (`data.cache_dir`) and report throughput.
    Cache(cmd::cache::Args),
    /// Train several configs (and/or read finished runs) and write a Table-2-style comparison.
    Compare(cmd::compare::Args),
    /// Sweep model families over compute (resumable): per point GFLOP/example, parameters,
    /// PF-days, LogLoss, excess over the Bayes limit (synthetic data), relative LogLoss; a power
    /// law fitted per family; markdown/CSV tables and PNG plots.
    Scale(cmd::scale::Args),
    /// Hyperparameter search over any config keys (random or grid, a trial budget, resumable),
    /// selected by the validation metric; the best config re-run with several seeds (mean ± std
    /// of the test metrics); leaderboard.md/.csv and summary.json.
    Tune(cmd::tune::Args),
    /// Write a split of a config's synthetic stream (`format = "synthetic"`) as a TSV file, for
    /// other tools (readable back with `format = "tsv"`).
    GenWorld(cmd::gen_world::Args),
    /// Write a synthetic Criteo-format TSV (label, I1–I13, C1–C26) with a learnable signal.
    GenCriteo(cmd::gen_criteo::Args),
}

fn main() {
    wukong::log::init();
    let cli = Cli::parse();
    // A server runs for weeks with varying request sizes: there, memory unused for a second goes
    // back to the system (resident memory otherwise only grows, to the high-water mark), while
    // back-to-back batches still reuse it (mimalloc's default 10 ms cost 30% of the rows/s of
    // 256-row requests in `benchmarks/serve_bench.sh`).
    keep_freed_memory(if matches!(cli.command, Command::Serve(_)) { 1000 } else { -1 });
    if let Some(n) = cli.threads {
        // Before any thread pool exists; burn's CPU backend uses rayon's global pool.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let result = match cli.command {
        Command::Bench(a) => cmd::bench::run(a),
        Command::Equivalence(a) => cmd::bench::equivalence(a),
        Command::BenchRun(a) => cmd::bench::bench_run(a),
        Command::BenchDp(a) => cmd::bench::dp(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Eval(a) => cmd::eval::eval(a),
        Command::Predict(a) => cmd::eval::predict(a),
        Command::Serve(a) => cmd::serve::serve(a),
        Command::Loadtest(a) => cmd::serve::loadtest(a),
        Command::Flops(a) => cmd::flops::run(a),
        Command::Cache(a) => cmd::cache::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Scale(a) => cmd::scale::run(a),
        Command::GenCriteo(a) => cmd::gen_criteo::run(a),
        Command::GenWorld(a) => cmd::gen_world::run(a),
        Command::Tune(a) => cmd::tune::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
