//! `wukong gen-world`: a split of a config's synthetic stream written as a TSV file.

use anyhow::{Context, Result};
use std::path::PathBuf;

use wukong::config::ExperimentConfig;
use wukong::data::world::{self, World};

#[derive(clap::Args)]
pub struct Args {
    /// An experiment config with `format = "synthetic"` (its `[data.world]` is the teacher).
    #[arg(long)]
    config: PathBuf,
    /// train, valid or test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Examples (default: the split's size in the config).
    #[arg(long)]
    rows: Option<usize>,
    /// Output file (`.gz` compresses).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = ExperimentConfig::load(&a.config)?;
    anyhow::ensure!(
        cfg.data.format == wukong::data::schema::Format::Synthetic,
        "{} has no synthetic data (format = \"synthetic\")",
        a.config.display()
    );
    let w = cfg.data.world();
    let (stream, size) = match a.split.as_str() {
        "train" => (world::TRAIN_STREAM, w.train_examples),
        "valid" => (world::VALID_STREAM, w.valid_examples),
        "test" => (world::TEST_STREAM, w.test_examples),
        other => anyhow::bail!("unknown split {other:?} (train, valid or test)"),
    };
    let rows = a.rows.unwrap_or(size);
    World::new(&w)?.write_tsv(stream, 0, rows, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {rows} {} examples to {} (synthetic)", a.split, a.out.display());
    Ok(())
}
