//! `wukong serve` (a run over HTTP) and `wukong loadtest` (load against a server).

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use wukong::serve::http::{ServeConfig, serve_forever};
use wukong::serve::loadtest;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The run directory to serve (its model.bpk, encoder.json, config.toml).
    #[arg(long)]
    run: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Rows per forward pass: concurrent requests are coalesced up to this.
    #[arg(long, default_value_t = 1024)]
    max_batch: usize,
    /// Microseconds the oldest queued request waits for others to join its batch (0: an idle
    /// scoring thread takes what is queued at once; requests arriving meanwhile form the next batch).
    #[arg(long, default_value_t = 0)]
    max_wait_us: u64,
    /// Scoring threads (each runs whole forward passes; --threads sets the compute threads).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Rows that may wait; a request beyond it gets 503 with Retry-After.
    #[arg(long, default_value_t = 16_384)]
    queue_rows: usize,
    /// Rows per request (413 beyond).
    #[arg(long, default_value_t = 4096)]
    max_rows: usize,
    /// Request body bytes (413 beyond).
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Seconds a client has to send its request headers, and again its body (408).
    #[arg(long, default_value_t = 10.0)]
    read_timeout_s: f64,
    /// On SIGTERM/Ctrl-C, seconds open connections get to finish before the server exits anyway.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout_s: f64,
    /// Threads of the async HTTP runtime (parsing, encoding, responses).
    #[arg(long, default_value_t = 1)]
    http_threads: usize,
    /// Serve calibrated probabilities: the run's Platt scaling (result.json `calibrated`, fitted
    /// on its validation split) applied to every score; the ranking is the same.
    #[arg(long)]
    calibrated: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let device = wukong::runtime::parse_device(&a.device)?;
    let cfg = ServeConfig {
        max_batch: a.max_batch.max(1),
        max_wait: Duration::from_micros(a.max_wait_us),
        workers: a.workers.max(1),
        queue_rows: a.queue_rows.max(1),
        max_rows: a.max_rows.max(1),
        max_body_bytes: a.max_body_bytes,
        header_timeout: Duration::from_secs_f64(a.read_timeout_s),
        body_timeout: Duration::from_secs_f64(a.read_timeout_s),
        drain_timeout: Duration::from_secs_f64(a.drain_timeout_s),
        calibrated: a.calibrated,
        ..ServeConfig::default()
    };
    serve_forever(a.run, a.addr, cfg, device, a.http_threads)
}

#[derive(clap::Args)]
pub struct LoadtestArgs {
    /// The server's score endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1/score")]
    url: String,
    /// A run directory: requests are built from rows of its test file (or --data) by its schema.
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    data: Option<PathBuf>,
    /// Rows per request (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    rows: Vec<usize>,
    /// Concurrent clients (comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Seconds measured per cell (after --warmup).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// The server's name in the table.
    #[arg(long, default_value = "wukong serve")]
    name: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Write the request rows (JSON lines, one row object each) here and exit: example requests
    /// for other clients.
    #[arg(long)]
    write_rows: Option<PathBuf>,
}

pub fn loadtest(a: LoadtestArgs) -> Result<()> {
    let cfg = wukong::train::checkpoint::saved_config(&a.run)?;
    let encoder = wukong::data::Encoder::load(&a.run.join(wukong::train::checkpoint::ENCODER))?;
    let path = match a.data {
        Some(p) => p,
        None => wukong::data::pipeline::split_sources(&cfg.data)
            .into_iter()
            .find(|s| s.name == "test")
            .map(|s| s.path)
            .context("the run has no test file: give --data")?,
    };
    let rows = loadtest::json_rows(&cfg.data, &encoder.field_names(), &path, 20_000)?;
    if let Some(p) = a.write_rows {
        let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {} rows to {}", rows.len(), p.display());
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.client_threads.max(1)).enable_all().build()?;
    let mut results = Vec::new();
    println!("{}", wukong::runtime::cpu_line());
    for &r in &a.rows {
        let bodies = loadtest::bodies(&rows, r, (rows.len() / r).clamp(1, 512));
        for &c in &a.concurrency {
            let res =
                rt.block_on(loadtest::run(&a.url, &bodies, r, c, Duration::from_secs_f64(a.warmup), Duration::from_secs_f64(a.seconds)))?;
            eprintln!("{} rows × {} clients: {:.0} rows/s, p99 {:.3} ms, {} errors", r, c, res.rows_per_s, res.p99_ms, res.errors);
            results.push(res);
        }
    }
    print!("{}", loadtest::table(&a.name, &results));
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_string_pretty(&results)?).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
