//! The experiment runner: trains a list of named points (configs), each in its own run directory
//! `<out>/points/<id>`, and survives being stopped. A finished point (its `result.json` exists) is
//! read back, not retrained; an interrupted one resumes from its newest checkpoint (so a crash
//! loses minutes, not the point); a point whose saved config differs from the one asked for is
//! an error naming it (its result would silently belong to another config). Sweeps (`wukong
//! scale`) run through it; searches and comparisons are meant to as well.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

use crate::config::ExperimentConfig;
use crate::train::{self, RunOptions, checkpoint};

/// One configuration to train.
#[derive(Debug, Clone)]
pub struct Point {
    /// Stable name: its run directory and its row in every table.
    pub id: String,
    /// The group it is plotted and fitted with (a model family).
    pub family: String,
    pub config: ExperimentConfig,
}

/// A finished point.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: String,
    pub family: String,
    pub dir: PathBuf,
    /// The run's `result.json`.
    pub result: serde_json::Value,
    /// Whether this invocation trained (or resumed) it, rather than finding it finished.
    pub trained_now: bool,
}

/// Where a point's run lives.
pub fn point_dir(out: &Path, id: &str) -> PathBuf {
    out.join("points").join(id)
}

/// The name of the lock files [`hold`] takes (ignored by git).
pub const LOCK_FILE: &str = ".wukong-lock";

/// An exclusive hold on an experiment directory (or one point of it) for as long as it lives.
/// Two processes training into one directory would interleave each other's checkpoints and
/// results (a second `wukong tune` started on a running search, a trial started by hand while
/// the search's child trains it). The operating system drops the lock when the process ends,
/// however it ends, so a killed run leaves nothing stale behind to clear.
#[derive(Debug)]
pub struct Hold {
    _file: std::fs::File,
}

/// Takes the lock file `path` (created if missing) for this process, or an error naming `what`,
/// the file and the process that holds it.
pub fn hold(path: &Path, what: &str) -> Result<Hold> {
    use std::io::{Read, Seek, Write};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // the holder's pid, for the message a second process prints
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id())?;
            Ok(Hold { _file: file })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = if pid.trim().is_empty() { "unknown".to_string() } else { pid.trim().to_string() };
            bail!(
                "{what} is in use by another process (pid {pid}; lock {}): wait for it to finish or stop it — two runs writing one directory would corrupt each other's checkpoints",
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// The process that holds the lock file `path` now, if one does — read without touching the
/// lock (taking it to test it, even for an instant, could make a starting trial fail). On Linux
/// from `/proc/locks` (the flock of that file's device and inode, and its owner's pid); `None`
/// where that is not available, or when nobody holds it. A finished run leaves its pid in the
/// file, so the file's contents alone cannot say this.
pub fn holder(path: &Path) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let dev = meta.dev();
        // the kernel prints a device as major:minor in hex (the glibc encoding of dev_t)
        let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
        let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        locks.lines().filter(|l| !l.contains("->")).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want).then(|| f[4].parse().ok()).flatten()
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Where an experiment directory stands, read from it without taking any lock (so it can be
/// asked while a search or sweep runs, from another shell): whether a process holds the
/// directory, and for each point (in `ids` order) its state — finished, pruned, running (the
/// process holding the point, or the directory's own process when it trains one point at a
/// time), started, pending — its evaluations so far, best `key` so far (higher is better when
/// `higher_better`) and time; then a rough time left from the finished points' mean duration.
pub fn status(out: &Path, ids: &[String], key: &str, higher_better: bool, slots: usize) -> Result<String> {
    let holder_now = holder(&out.join(LOCK_FILE));
    // first each point's facts, then its label: whether a started point is the one training in
    // the directory's own process depends on how many points were started
    let (mut points, mut finished, mut started, mut durations) = (Vec::new(), 0, 0, Vec::new());
    for id in ids {
        let dir = point_dir(out, id);
        let point_holder = holder(&out.join("points").join(format!("{id}{LOCK_FILE}")));
        // the evaluations so far (a torn last line of a running point is skipped)
        let evals: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get(key).is_some())
            .collect();
        let values = evals.iter().filter_map(|v| v[key].as_f64()).filter(|x| x.is_finite());
        let best = if higher_better { values.reduce(f64::max) } else { values.reduce(f64::min) };
        let label = match (state(&dir), point_holder) {
            (PointState::Finished, _) => {
                finished += 1;
                let text = std::fs::read_to_string(dir.join(checkpoint::RESULT)).with_context(|| format!("point {id}: no result.json"))?;
                let r: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("point {id}: unreadable result.json"))?;
                durations.extend(r["seconds"].as_f64());
                match r["stop_reason"].as_str().and_then(|s| s.strip_prefix(crate::train::prune::PRUNED_AT)) {
                    Some(at) => Some(format!("pruned at evaluation {}", at.split(':').next().unwrap_or(at))),
                    None => Some("finished".to_string()),
                }
            }
            (_, Some(pid)) => Some(format!("running (pid {pid})")),
            _ if dir.exists() => {
                started += 1;
                None
            }
            _ => Some("pending".to_string()),
        };
        let seconds = evals.last().and_then(|v| v["seconds"].as_f64());
        points.push((id, label, evals.len(), best, seconds));
    }
    // one point at a time trains in the directory's own process: its one started point is that one
    let in_holder = holder_now.is_some() && slots == 1 && started == 1;
    let started_label = if in_holder { "running (in the holder's process)" } else { "started" };
    let rows = points.into_iter().map(|(id, label, evals, best, seconds)| {
        format!(
            "| {id} | {} | {evals} | {} | {} |",
            label.as_deref().unwrap_or(started_label),
            best.map_or(String::new(), |b| format!("{b:.6}")),
            seconds.map_or(String::new(), |t| format!("{t:.0}"))
        )
    });
    let mut text = match holder_now {
        Some(pid) => format!("{} is running (pid {pid})", out.display()),
        None => format!("{} is not running", out.display()),
    };
    text.push_str(&format!(": {finished} of {} points finished", ids.len()));
    if !durations.is_empty() && finished < ids.len() {
        let mean = durations.iter().sum::<f64>() / durations.len() as f64;
        let left = (ids.len() - finished) as f64 * mean / slots.max(1) as f64;
        text.push_str(&format!(
            "; about {:.1} h left at the finished points' mean of {:.0} min each, {} at a time",
            left / 3600.0,
            mean / 60.0,
            slots.max(1)
        ));
    }
    text.push_str(&format!("\n\n| point | state | evaluations | best {key} so far | seconds |\n|---|---|---|---|---|\n"));
    for r in rows {
        text.push_str(&r);
        text.push('\n');
    }
    Ok(text)
}

/// What to do with a point, from its directory.
#[derive(Debug, PartialEq, Eq)]
pub enum PointState {
    New,
    /// Started, with checkpoints to resume from.
    Interrupted,
    Finished,
}

pub fn state(dir: &Path) -> PointState {
    if dir.join(checkpoint::RESULT).exists() {
        PointState::Finished
    } else if dir.join(checkpoint::CONFIG).exists() && dir.join("checkpoints").is_dir() {
        PointState::Interrupted
    } else {
        PointState::New
    }
}

/// Trains (or resumes, or reads) one point.
pub fn run_point(p: &Point, out: &Path, opts: &RunOptions) -> Result<Finished> {
    let dir = point_dir(out, &p.id);
    let st = state(&dir);
    if st != PointState::New {
        let saved =
            std::fs::read_to_string(dir.join(checkpoint::CONFIG)).with_context(|| format!("point {}: cannot read its config", p.id))?;
        let saved: ExperimentConfig = toml::from_str(&saved).with_context(|| format!("point {}: its saved config is unreadable", p.id))?;
        if saved != p.config {
            bail!(
                "point {}: {} holds a run of another config (the sweep changed since it ran); remove that directory or use another output directory",
                p.id,
                dir.display()
            );
        }
    }
    let trained_now = match st {
        PointState::Finished => false,
        PointState::Interrupted => {
            tracing::info!("point {}: resuming {}", p.id, dir.display());
            train::resume(&dir, opts).with_context(|| format!("point {}", p.id))?;
            true
        }
        PointState::New => {
            if dir.exists() {
                // created but stopped before its first checkpoint: nothing to keep
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            }
            let opts = RunOptions { run_dir: Some(dir.clone()), ..opts.clone() };
            train::train(&p.config, &opts).with_context(|| format!("point {}", p.id))?;
            true
        }
    };
    read_finished(p, dir, trained_now)
}

/// A point that must already be finished, read back (an error names it otherwise).
pub fn run_point_finished(p: &Point, out: &Path) -> Result<Finished> {
    let dir = point_dir(out, &p.id);
    anyhow::ensure!(state(&dir) == PointState::Finished, "point {} has not finished", p.id);
    read_finished(p, dir, false)
}

/// A finished point's `result.json`.
fn read_finished(p: &Point, dir: PathBuf, trained_now: bool) -> Result<Finished> {
    let text = std::fs::read_to_string(dir.join(checkpoint::RESULT)).with_context(|| format!("point {}: no result.json", p.id))?;
    let result = serde_json::from_str(&text).with_context(|| format!("point {}: unreadable result.json", p.id))?;
    Ok(Finished { id: p.id.clone(), family: p.family.clone(), dir, result, trained_now })
}

/// Runs every point in order; `after` sees each finished one (to rewrite tables as it goes).
pub fn run_all(points: &[Point], out: &Path, opts: &RunOptions, mut after: impl FnMut(&[Finished]) -> Result<()>) -> Result<Vec<Finished>> {
    let mut seen = std::collections::HashSet::new();
    for p in points {
        anyhow::ensure!(seen.insert(&p.id), "two points are named {}", p.id);
    }
    let mut done = Vec::with_capacity(points.len());
    for (i, p) in points.iter().enumerate() {
        let st = state(&point_dir(out, &p.id));
        tracing::info!(
            "== point {}/{}: {} ({})",
            i + 1,
            points.len(),
            p.id,
            match st {
                PointState::Finished => "finished, read back",
                PointState::Interrupted => "interrupted, resuming",
                PointState::New => "training",
            }
        );
        done.push(run_point(p, out, opts)?);
        after(&done)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_refused_to_a_second_holder_until_released() {
        let dir = std::env::temp_dir().join(format!("wukong-hold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lock = dir.join("search").join(LOCK_FILE);
        let first = hold(&lock, "search dir").expect("the first hold");
        // a second open file description conflicts like another process would
        let err = hold(&lock, "search dir").expect_err("held already").to_string();
        assert!(err.contains("search dir is in use by another process"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        #[cfg(target_os = "linux")]
        assert_eq!(holder(&lock), Some(std::process::id()), "the holder is read from /proc/locks");
        drop(first);
        assert_eq!(holder(&lock), None, "released: nobody holds it, though the file still names the pid");
        let again = hold(&lock, "search dir").expect("released when dropped");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
