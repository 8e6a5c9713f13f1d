//! `wukong compare`: train several configs (and/or read finished runs) into a Table-2-style table.

use anyhow::Result;
use std::path::PathBuf;

use wukong::config::ExperimentConfig;
use wukong::train::{self, RunOptions};

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args) -> Result<()> {
    let mut dirs = Vec::new();
    for path in &a.config {
        let cfg = ExperimentConfig::load(path)?;
        println!("== training {} ({})", cfg.name, path.display());
        let opts = RunOptions { device: a.device.clone(), out_dir: a.runs_dir.clone(), verbose: true, ..Default::default() };
        dirs.push(train::train(&cfg, &opts)?.run_dir);
    }
    dirs.extend(a.run);
    anyhow::ensure!(!dirs.is_empty(), "give --config and/or --run");
    let rows = dirs.iter().map(|d| wukong::compare::read_run(d)).collect::<Result<Vec<_>>>()?;
    let table = wukong::compare::table(&rows);
    print!("{table}");
    if let Some(p) = a.out {
        wukong::runtime::write_atomic(&p, table.as_bytes())?;
        println!("table written to {}", p.display());
    }
    Ok(())
}
