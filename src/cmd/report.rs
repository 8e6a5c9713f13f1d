//! `wukong report`: pictures of finished runs.

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
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
}

pub fn run(a: Args) -> Result<()> {
    let views = a.runs.iter().map(|r| wukong::report::RunView::load(r, a.data.clone(), &a.device)).collect::<Result<Vec<_>>>()?;
    let out = a.out.unwrap_or_else(|| a.runs[0].join("report"));
    for path in wukong::report::write(&views, &out)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
