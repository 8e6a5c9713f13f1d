//! `wukong tune`: hyperparameter search (resumable), leaderboard, best config re-run with seeds.

use anyhow::Result;
use std::path::PathBuf;

use wukong::train::{RunOptions, checkpoint};

#[derive(clap::Args)]
pub struct Args {
    /// The search space file.
    space: PathBuf,
    /// Trials, leaderboard and summary go here; the same directory again continues the search.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let opts = RunOptions {
        device: a.device,
        out_dir: a.out.clone(),
        verbose: true,
        faults: checkpoint::Faults::from_env()?,
        ..Default::default()
    };
    let s = wukong::tune::run(&a.space, &a.out, &opts)?;
    println!("best trial {} ({})", s.best, s.best_settings.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", "));
    if let (Some(m), Some(sd), Some(l), Some(lsd)) = (s.test_auc_mean, s.test_auc_std, s.test_logloss_mean, s.test_logloss_std) {
        println!("seeds {:?}: test AUC {m:.6} ± {sd:.6}, LogLoss {l:.6} ± {lsd:.6}", s.seeds);
    }
    println!("leaderboard: {}", a.out.join("leaderboard.md").display());
    Ok(())
}
