//! `wukong compare`: train several configs (and/or read finished runs) into a Table-2-style table.

use anyhow::Result;
use std::path::PathBuf;

use wukong::config::ExperimentConfig;
use wukong::experiment::{self, Point};
use wukong::train::RunOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment configs to train, in table order.
    #[arg(long)]
    config: Vec<PathBuf>,
    /// Finished run directories to include (after the trained ones).
    #[arg(long)]
    run: Vec<PathBuf>,
    /// Finished searches (`wukong tune … --out DIR`): one row each, mean ± std over the seed
    /// re-runs of the best config (a table of its own, after the runs' table).
    #[arg(long)]
    tuned: Vec<PathBuf>,
    /// Also write the table to this markdown file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the trained configs' runs live (`<dir>/points/<config file stem>`): a second
    /// invocation reads finished ones back and resumes an interrupted one.
    #[arg(long, default_value = "runs/compare")]
    runs_dir: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let mut points = Vec::new();
    for path in &a.config {
        let config = ExperimentConfig::load(path)?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| config.name.clone());
        let id = if points.iter().any(|p: &Point| p.id == stem) { format!("{stem}-{}", points.len() + 1) } else { stem };
        points.push(Point { id, family: config.model.name().to_string(), config });
    }
    let opts = RunOptions { device: a.device.clone(), out_dir: a.runs_dir.clone(), verbose: true, ..Default::default() };
    let mut dirs: Vec<PathBuf> = experiment::run_all(&points, &a.runs_dir, &opts, |_| Ok(()))?.into_iter().map(|f| f.dir).collect();
    dirs.extend(a.run);
    anyhow::ensure!(!dirs.is_empty() || !a.tuned.is_empty(), "give --config, --run and/or --tuned");
    let rows = dirs.iter().map(|d| wukong::compare::read_run(d)).collect::<Result<Vec<_>>>()?;
    let tuned = a.tuned.iter().map(|d| wukong::compare::read_tuned(d)).collect::<Result<Vec<_>>>()?;
    let mut table = String::new();
    if !rows.is_empty() {
        table += &wukong::compare::table(&rows);
    }
    if !tuned.is_empty() {
        table += if rows.is_empty() { "" } else { "\n" };
        table += &wukong::compare::tuned_table(&tuned);
    }
    print!("{table}");
    if let Some(p) = a.out {
        wukong::runtime::write_atomic(&p, table.as_bytes())?;
        println!("table written to {}", p.display());
    }
    Ok(())
}
