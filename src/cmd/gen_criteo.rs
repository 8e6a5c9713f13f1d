//! `wukong gen-criteo`: a synthetic Criteo-format TSV with a learnable signal.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest categorical vocabulary.
    #[arg(long, default_value_t = 100_000)]
    max_vocab: u64,
}

pub fn run(a: Args) -> Result<()> {
    wukong::data::synth::write_criteo(&a.out, a.rows, a.seed, a.max_vocab)?;
    println!("wrote {} rows to {}", a.rows, a.out.display());
    Ok(())
}
