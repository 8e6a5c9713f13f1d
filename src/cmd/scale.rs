//! `wukong scale`: a sweep of model families over compute (resumable), its table, fits and plots.

use anyhow::Result;
use std::path::PathBuf;

use wukong::train::{RunOptions, checkpoint};

#[derive(clap::Args)]
pub struct Args {
    /// The sweep file (configs/scale/*.toml).
    sweep: PathBuf,
    /// Where the points' runs, the table and the plots go; a second invocation with the same
    /// directory continues the sweep (finished points are read back, an interrupted one resumes).
    #[arg(long, required_unless_present = "plan")]
    out: Option<PathBuf>,
    /// Print each point's FLOPs, parameters and compute per pass, and train nothing.
    #[arg(long)]
    plan: bool,
    /// Only write the table, fits and plots from the finished points (train nothing).
    #[arg(long)]
    report_only: bool,
    /// Print where the sweep in --out stands (running or not; each point's state, evaluations
    /// and best validation metric so far) and exit; takes no lock, so it works while it runs.
    #[arg(long)]
    status: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    if a.plan {
        print!("{}", wukong::scale::plan(&a.sweep)?);
        return Ok(());
    }
    let out = a.out.expect("clap requires --out without --plan");
    if a.status {
        let (_, points) = wukong::scale::points(&a.sweep)?;
        let ids: Vec<String> = points.iter().map(|p| p.id.clone()).collect();
        // the sweep's points share one monitored metric (its base config's)
        let monitor = points.first().map_or(wukong::config::Monitor::Auc, |p| p.config.train.monitor);
        print!("{}", wukong::experiment::status(&out, &ids, monitor.key(), monitor == wukong::config::Monitor::Auc, 1)?);
        return Ok(());
    }
    let opts =
        RunOptions { device: a.device, out_dir: out.clone(), verbose: true, faults: checkpoint::Faults::from_env()?, ..Default::default() };
    let written = if a.report_only {
        let (sweep, points) = wukong::scale::points(&a.sweep)?;
        let done: Vec<_> = points
            .iter()
            .filter(|p| wukong::experiment::state(&wukong::experiment::point_dir(&out, &p.id)) == wukong::experiment::PointState::Finished)
            .map(|p| wukong::experiment::run_point(p, &out, &opts))
            .collect::<Result<_>>()?;
        anyhow::ensure!(!done.is_empty(), "no finished points in {}", out.display());
        wukong::scale::write_report(&sweep, &done, &out)?
    } else {
        wukong::scale::run(&a.sweep, &out, &opts)?
    };
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
