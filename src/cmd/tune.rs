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
    /// Print where the search in --out stands (running or not; each trial's state, evaluations
    /// and best validation metric so far) and exit; takes no lock, so it works while it runs.
    #[arg(long)]
    status: bool,
    /// Train only this trial or seed re-run (the child processes of a parallel search).
    #[arg(long, hide = true)]
    only: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    if a.status {
        print!("{}", wukong::tune::status(&a.space, &a.out)?);
        return Ok(());
    }
    let opts = RunOptions {
        device: a.device.clone(),
        out_dir: a.out.clone(),
        verbose: true,
        faults: checkpoint::Faults::from_env()?,
        ..Default::default()
    };
    if let Some(id) = &a.only {
        return wukong::tune::run_only(&a.space, &a.out, &RunOptions { verbose: false, ..opts }, id);
    }
    let exe = wukong::runtime::own_executable()?;
    let launch = |id: &str, threads: usize| {
        let mut c = std::process::Command::new(&exe);
        // started through /proc/self/exe (so a replaced binary cannot mix versions), but shown in
        // `ps` and found by `pgrep` under the name the user started: its own argv[0]
        #[cfg(unix)]
        if let Some(name) = std::env::args_os().next() {
            std::os::unix::process::CommandExt::arg0(&mut c, name);
        }
        c.arg("--threads").arg(threads.to_string()).arg("tune").arg(&a.space).arg("--out").arg(&a.out);
        c.arg("--device").arg(&a.device).arg("--only").arg(id);
        c
    };
    let s = wukong::tune::run(&a.space, &a.out, &opts, Some(&launch))?;
    println!("best trial {} ({})", s.best, s.best_settings.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", "));
    if let (Some(m), Some(sd), Some(l), Some(lsd)) = (s.test_auc_mean, s.test_auc_std, s.test_logloss_mean, s.test_logloss_std) {
        println!("seeds {:?}: test AUC {m:.6} ± {sd:.6}, LogLoss {l:.6} ± {lsd:.6}", s.seeds);
    }
    println!("leaderboard: {}", a.out.join("leaderboard.md").display());
    Ok(())
}
