//! `wukong cache`: encode a config's splits into its binary cache and report throughput.

use anyhow::Result;
use std::path::PathBuf;

use super::{CacheFlags, SplitPaths};
use wukong::config::ExperimentConfig;

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = ExperimentConfig::load(&a.config)?;
    a.paths.apply(&mut cfg);
    if let Some(d) = a.cache_dir {
        cfg.data.cache_dir = Some(d)
    }
    cfg.data.stream = true; // build the caches; the timing below reads them back
    cfg.validate()?;
    let prepared = wukong::data::prepare(&cfg.data, a.cache.policy())?;
    println!("{:<6} {:>10} {:>8} {:>10} {:>9} {:>10} {:>11} {:>9}", "split", "rows", "skipped", "oov", "MB", "seconds", "MB/s", "rows/s");
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
    if a.read_passes > 0 {
        let (_, train_split, _) = &prepared.splits[0];
        let loader = wukong::data::BatchLoader::from_split(
            train_split.clone(),
            prepared.encoder.total_rows(),
            cfg.train.batch_size,
            cfg.data.chunk_rows,
            cfg.data.shuffle_chunks,
        );
        for pass in 1..=a.read_passes {
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
    Ok(())
}
