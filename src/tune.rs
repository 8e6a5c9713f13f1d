//! `wukong tune`: hyperparameter search over any config keys through the experiment runner
//! (resumable: trials are regenerated from the seed and finished ones read back), selection by
//! the validation metric only, then the best config re-run with several seeds and reported as
//! mean ± std of the test metrics. Random search explores; an optional second stage exploits:
//! `refine` more trials, each a copy of one of the `refine_top` best trials of the first stage
//! (by the validation metric) with about half its keys moved to a nearby value — a seeded
//! function of the first stage's results, so a restart draws the same trials again. The budget
//! is `trials + refine` for every model alike. A space file:
//! ```toml
//! name = "frappe-wukong"
//! base = "../frappe_wukong.toml"    # relative to this file
//! trials = 20                       # the budget (a grid larger than this is cut)
//! search = "random"                 # or "grid" (choices only)
//! seed = 1
//! metric = "auc"                    # validation metric: auc (higher) or logloss (lower)
//! seeds = [1, 2, 3]                 # final re-runs of the best trial
//! parallel = 2                      # trials at a time (each a process with its share of threads)
//! prune = "median"                  # stop trials below the median of finished ones ("none")
//! prune_grace_evals = 2             # … never during a trial's first evaluations
//! prune_min_trials = 3              # … nor before this many trials finished
//! refine = 8                        # then 8 trials near the best (after all the trials above)
//! refine_top = 3                    # … each a perturbed copy of one of the 3 best, in turn
//! [space]
//! "train.lr" = { loguniform = [1e-4, 1e-2] }
//! "model.dropout" = { uniform = [0.0, 0.3] }
//! "model.embedding_dim" = { choice = [16, 32, 64] }
//! "model.num_layers" = { int = [1, 4] }
//! ```

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{ExperimentConfig, Monitor};
use crate::experiment::{self, Finished, Point};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceFile {
    pub name: String,
    pub base: PathBuf,
    pub trials: usize,
    #[serde(default)]
    pub search: Search,
    #[serde(default = "one")]
    pub seed: u64,
    #[serde(default)]
    pub metric: Monitor,
    /// Seeds of the final re-runs of the best trial (empty: none).
    #[serde(default)]
    pub seeds: Vec<u64>,
    /// Trials (and seed re-runs) trained at the same time, each in its own process with an equal
    /// share of the threads (1: one after the other, in this process).
    #[serde(default = "one_usize")]
    pub parallel: usize,
    /// Early stopping of hopeless trials.
    #[serde(default)]
    pub prune: Prune,
    #[serde(default = "two")]
    pub prune_grace_evals: usize,
    #[serde(default = "three")]
    pub prune_min_trials: usize,
    /// Trials of the second stage (0: none), drawn near the first stage's best once it finished.
    #[serde(default)]
    pub refine: usize,
    /// How many of the first stage's best trials the second stage perturbs, in turn.
    #[serde(default = "three")]
    pub refine_top: usize,
    pub space: BTreeMap<String, Domain>,
}

fn one_usize() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}

/// How hopeless trials are stopped early.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Prune {
    #[default]
    None,
    /// The median stopping rule ([`crate::train::prune::MedianRule`]).
    Median,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Search {
    #[default]
    Random,
    Grid,
}

/// The values a key may take.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Domain {
    Choice(Vec<toml::Value>),
    Uniform([f64; 2]),
    Loguniform([f64; 2]),
    Int([i64; 2]),
}

impl Domain {
    fn check(&self, key: &str) -> Result<()> {
        match self {
            Domain::Choice(v) => ensure!(!v.is_empty(), "space.{key}: an empty choice"),
            Domain::Uniform([a, b]) => ensure!(a.is_finite() && b.is_finite() && a <= b, "space.{key}: uniform needs lo ≤ hi"),
            Domain::Loguniform([a, b]) => ensure!(*a > 0.0 && a <= b && b.is_finite(), "space.{key}: loguniform needs 0 < lo ≤ hi"),
            Domain::Int([a, b]) => ensure!(a <= b, "space.{key}: int needs lo ≤ hi"),
        }
        Ok(())
    }

    fn sample(&self, rng: &mut SplitMix64) -> toml::Value {
        match self {
            Domain::Choice(v) => v[(rng.next_u64() % v.len() as u64) as usize].clone(),
            Domain::Uniform([a, b]) => toml::Value::Float(a + (b - a) * rng.unit()),
            Domain::Loguniform([a, b]) => toml::Value::Float((a.ln() + (b.ln() - a.ln()) * rng.unit()).exp()),
            Domain::Int([a, b]) => toml::Value::Integer(a + (rng.next_u64() % (b - a + 1) as u64) as i64),
        }
    }

    /// A value near `v` (a first-stage trial's): a step of up to a quarter of the range (on the
    /// log scale for log-uniform), clamped to it; an integer ±1; another choice. `v` as drawn by
    /// [`Domain::sample`] (a value of another type is resampled).
    fn perturb(&self, v: &toml::Value, rng: &mut SplitMix64) -> toml::Value {
        let step = |rng: &mut SplitMix64| 0.25 * (2.0 * rng.unit() - 1.0);
        match (self, v) {
            (Domain::Choice(c), _) if c.len() > 1 => {
                let others: Vec<&toml::Value> = c.iter().filter(|x| *x != v).collect();
                others[(rng.next_u64() % others.len() as u64) as usize].clone()
            }
            (Domain::Choice(_), _) => v.clone(),
            (Domain::Uniform([a, b]), toml::Value::Float(x)) => toml::Value::Float((x + step(rng) * (b - a)).clamp(*a, *b)),
            (Domain::Loguniform([a, b]), toml::Value::Float(x)) if *x > 0.0 => {
                toml::Value::Float((x.ln() + step(rng) * (b.ln() - a.ln())).clamp(a.ln(), b.ln()).exp().clamp(*a, *b))
            }
            (Domain::Int([a, b]), toml::Value::Integer(x)) => {
                let up = rng.next_u64().is_multiple_of(2);
                let y = if (up && x < b) || x <= a { x + 1 } else { x - 1 };
                toml::Value::Integer(y.clamp(*a, *b))
            }
            _ => self.sample(rng),
        }
    }

    /// Grid values (choices, or every integer of a small range).
    fn grid(&self, key: &str) -> Result<Vec<toml::Value>> {
        match self {
            Domain::Choice(v) => Ok(v.clone()),
            Domain::Int([a, b]) if b - a < 1000 => Ok((*a..=*b).map(toml::Value::Integer).collect()),
            _ => bail!("space.{key}: a grid needs choice or a small int range"),
        }
    }
}

/// Sets `section.key` (e.g. `train.lr`, `model.dropout`, `data.world.vocab_max`) in a config table.
fn set(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().context("empty key")?;
    ensure!(!parts.is_empty(), "space key {key:?} needs its section (train.…, model.…, data.…)");
    let mut t = table;
    for p in parts {
        t = t
            .entry(p)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("{key}: {p} is not a table"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

/// One trial's settings, in key order.
pub type Settings = BTreeMap<String, toml::Value>;

/// The space file, the first stage's trials' settings (deterministic from the seed) and their
/// points; the second stage's are [`refined`] from their results.
pub fn trials(path: &Path) -> Result<(SpaceFile, Vec<(Settings, Point)>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let space: SpaceFile = toml::from_str(&text).with_context(|| format!("invalid space {}", path.display()))?;
    ensure!(space.trials > 0, "trials must be positive");
    ensure!(space.parallel > 0, "parallel must be positive");
    ensure!(space.refine == 0 || space.refine_top > 0, "refine_top must be positive when refine is");
    ensure!(!space.space.is_empty(), "the space is empty");
    for (k, d) in &space.space {
        d.check(k)?;
    }
    let settings: Vec<Settings> = match space.search {
        Search::Random => {
            let mut rng = SplitMix64(crate::rng::mix(space.seed ^ 0x7E5E_A4C4));
            (0..space.trials).map(|_| space.space.iter().map(|(k, d)| (k.clone(), d.sample(&mut rng))).collect()).collect()
        }
        Search::Grid => {
            let mut grid: Vec<Settings> = vec![Settings::new()];
            for (k, d) in &space.space {
                let values = d.grid(k)?;
                grid = grid
                    .into_iter()
                    .flat_map(|s| values.iter().map(move |v| (s.clone(), v.clone())))
                    .map(|(mut s, v)| {
                        s.insert(k.clone(), v);
                        s
                    })
                    .collect();
            }
            if grid.len() > space.trials {
                tracing::warn!("the grid has {} points; the budget runs the first {}", grid.len(), space.trials);
                grid.truncate(space.trials);
            }
            grid
        }
    };
    let base = base_table(path, &space)?;
    let out = settings.into_iter().enumerate().map(|(i, s)| trial(&space, &base, i, s)).collect::<Result<_>>()?;
    Ok((space, out))
}

/// The base config the space's values are set into.
fn base_table(path: &Path, space: &SpaceFile) -> Result<toml::Table> {
    let base_path = path.parent().unwrap_or(Path::new(".")).join(&space.base);
    toml::from_str(&std::fs::read_to_string(&base_path).with_context(|| format!("cannot read {}", base_path.display()))?)
        .with_context(|| format!("invalid base config {}", base_path.display()))
}

/// The trial with 0-based index `i` (id `trial-<i+1>`) and its settings.
fn trial(space: &SpaceFile, base: &toml::Table, i: usize, s: Settings) -> Result<(Settings, Point)> {
    let id = trial_id(i);
    let mut table = base.clone();
    for (k, v) in &s {
        set(&mut table, k, v.clone())?;
    }
    table.insert("name".into(), toml::Value::String(format!("{}-{id}", space.name)));
    let config = ExperimentConfig::parse(&toml::to_string(&table)?).with_context(|| format!("{id} ({})", describe(&s)))?;
    Ok((s, Point { id, family: "trial".into(), config }))
}

fn trial_id(i: usize) -> String {
    format!("trial-{:03}", i + 1)
}

/// The ids of the second stage's trials (known before their settings are).
fn refine_ids(space: &SpaceFile, first: usize) -> Vec<String> {
    (first..first + space.refine).map(trial_id).collect()
}

/// The second stage's trials: each a copy of one of the first stage's `refine_top` best (by the
/// validation metric; every first-stage trial must have finished) with each key moved to a
/// nearby value with probability ½ (at least one key, and never a copy of a trial already
/// drawn). A seeded function of the first stage's results: the same on every restart.
pub fn refined(path: &Path, space: &SpaceFile, first: &[(Settings, Point)], out: &Path) -> Result<Vec<(Settings, Point)>> {
    if space.refine == 0 {
        return Ok(Vec::new());
    }
    let mut done = Vec::with_capacity(first.len());
    for (s, p) in first {
        let f = experiment::run_point_finished(p, out)
            .with_context(|| format!("the refinement stage needs the first stage's {} trials finished", first.len()))?;
        done.push((s, f));
    }
    let parents: Vec<&Settings> =
        ranked(space.metric, &done, |d| &d.1.result).into_iter().take(space.refine_top).map(|(s, _)| *s).collect();
    let mut seen: Vec<Settings> = first.iter().map(|(s, _)| s.clone()).collect();
    let mut rng = SplitMix64(crate::rng::mix(space.seed ^ 0x2EF1_4E5E));
    let base = base_table(path, space)?;
    let keys: Vec<&String> = space.space.keys().collect();
    let mut out_trials = Vec::with_capacity(space.refine);
    for j in 0..space.refine {
        let parent = parents[j % parents.len()];
        let mut child = parent.clone();
        // a few draws for a new setting (a space of few choices may have none left: then the last)
        for _ in 0..64 {
            child = parent.clone();
            let forced = keys[(rng.next_u64() % keys.len() as u64) as usize];
            for (k, d) in &space.space {
                if k == forced || rng.unit() < 0.5 {
                    let moved = d.perturb(&parent[k], &mut rng);
                    child.insert(k.clone(), moved);
                }
            }
            if !seen.contains(&child) {
                break;
            }
        }
        seen.push(child.clone());
        out_trials.push(trial(space, &base, first.len() + j, child)?);
    }
    Ok(out_trials)
}

fn describe(s: &Settings) -> String {
    s.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
}

fn metric_of(r: &serde_json::Value, key: &str) -> f64 {
    r[key].as_f64().unwrap_or(f64::NAN)
}

/// `items` best first by the space's validation metric (NaN last; ties keep their order): the
/// one ordering of the leaderboard, the best trial and the second stage's parents.
fn ranked<T>(metric: Monitor, items: &[T], result: impl Fn(&T) -> &serde_json::Value) -> Vec<&T> {
    let key = metric.key();
    let score = |t: &T| {
        let x = metric_of(result(t), key);
        if metric == Monitor::Auc { -x } else { x }
    };
    let mut order: Vec<&T> = items.iter().collect();
    order.sort_by(|a, b| {
        let (a, b) = (score(a), score(b));
        a.partial_cmp(&b).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
    });
    order
}

/// The outcome: leaderboard rows (best first) and the seeds' summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub best: String,
    pub best_settings: BTreeMap<String, String>,
    pub seeds: Vec<u64>,
    pub test_auc_mean: Option<f64>,
    pub test_auc_std: Option<f64>,
    pub test_logloss_mean: Option<f64>,
    pub test_logloss_std: Option<f64>,
}

/// Mean and sample standard deviation (None when empty or any value is not finite).
pub fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    Some((m, var.sqrt()))
}

/// Markdown and CSV leaderboards of the finished trials, best first by the validation metric.
pub fn leaderboard(space: &SpaceFile, trials: &[(Settings, Finished)]) -> Result<(String, String)> {
    let key = space.metric.key();
    let order = ranked(space.metric, trials, |t| &t.1.result);
    let keys: Vec<&String> = space.space.keys().collect();
    let mut md = format!("# Tuning `{}` — {} trials, selected by validation {}\n\n| rank | trial |", space.name, trials.len(), key);
    for k in &keys {
        md.push_str(&format!(" {k} |"));
    }
    md.push_str(" valid AUC | valid LogLoss | test AUC | test LogLoss | calibrated test LogLoss | seconds | pruned at | best epoch | epochs run | at cap, improving |\n|---|---|");
    md.push_str(&"---|".repeat(keys.len() + 10));
    md.push('\n');
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["rank".to_string(), "trial".to_string()];
    header.extend(keys.iter().map(|k| k.to_string()));
    header.extend(
        [
            "valid_auc",
            "valid_logloss",
            "test_auc",
            "test_logloss",
            "calibrated_test_logloss",
            "seconds",
            "pruned_at",
            "best_epoch",
            "epochs_run",
            "at_cap_improving",
        ]
        .map(String::from),
    );
    w.write_record(&header)?;
    for (rank, (s, f)) in order.into_iter().enumerate() {
        let r = &f.result;
        let nums = ["valid_auc", "valid_logloss", "test_auc", "test_logloss"].map(|k| metric_of(r, k));
        let mut rec = vec![(rank + 1).to_string(), f.id.clone()];
        rec.extend(keys.iter().map(|k| s[*k].to_string()));
        rec.extend(nums.iter().map(|x| format!("{x:.6}")));
        // Platt-calibrated on validation (empty for runs from before it existed)
        rec.push(r["calibrated"]["test_logloss"].as_f64().map_or(String::new(), |x| format!("{x:.6}")));
        rec.push(format!("{:.1}", metric_of(r, "seconds")));
        // the evaluation at which the median rule stopped the trial (empty: it was not pruned)
        let pruned = r["stop_reason"].as_str().and_then(|s| s.strip_prefix(crate::train::prune::PRUNED_AT));
        rec.push(pruned.and_then(|s| s.split(':').next()).unwrap_or("").to_string());
        // a trial the epoch cap cut while it still improved: the budget, not the config, ended it
        rec.extend(["best_epoch", "epochs_run"].map(|k| r[k].as_u64().map_or(String::new(), |n| n.to_string())));
        rec.push(if crate::train::capped_while_improving(r) { "yes" } else { "" }.to_string());
        md.push_str(&format!("| {} |\n", rec.join(" | ")));
        w.write_record(&rec)?;
    }
    Ok((md, String::from_utf8(w.into_inner()?)?))
}

/// Starts one trial or seed re-run (`--only ID`) as a child process with `threads` threads;
/// given by the CLI, which knows its own executable.
pub type Launch<'a> = &'a dyn Fn(&str, usize) -> std::process::Command;

/// The options a trial trains with: the median rule reads the other trials' run directories
/// (its own has no `result.json` while it runs, so listing every trial is the same).
fn trial_options(space: &SpaceFile, out: &Path, points: &[Point], opts: &crate::train::RunOptions) -> crate::train::RunOptions {
    let median_rule = (space.prune == Prune::Median).then(|| crate::train::prune::MedianRule {
        peers: points.iter().map(|p| experiment::point_dir(out, &p.id)).collect(),
        grace_evals: space.prune_grace_evals,
        min_peers: space.prune_min_trials,
    });
    crate::train::RunOptions { median_rule, ..opts.clone() }
}

/// Trains the unfinished `points` in child processes, `slots` at a time, each with its share of
/// the threads; stops starting new ones at the first failure and reports it once the running
/// ones ended.
fn run_children(points: &[Point], out: &Path, slots: usize, launch: Launch, after: &dyn Fn() -> Result<()>) -> Result<()> {
    let pending: Vec<&Point> =
        points.iter().filter(|p| experiment::state(&experiment::point_dir(out, &p.id)) != experiment::PointState::Finished).collect();
    if pending.is_empty() {
        return Ok(());
    }
    let total = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let slots = slots.min(pending.len());
    let threads = (total / slots).max(1);
    tracing::info!("{} to train, {slots} at a time with {threads} thread(s) each", pending.len());
    let mut queue = pending.into_iter();
    let mut running: Vec<(String, std::process::Child)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    loop {
        while failed.is_empty() && running.len() < slots {
            let Some(p) = queue.next() else { break };
            let child = launch(&p.id, threads).spawn().with_context(|| format!("cannot start the process of {}", p.id))?;
            running.push((p.id.clone(), child));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut still = Vec::with_capacity(running.len());
        for (id, mut child) in running {
            match child.try_wait().with_context(|| format!("waiting for {id}"))? {
                Some(status) if status.success() => {
                    tracing::info!("{id} finished");
                    // the leaderboard grows as trials end, not only when the last one does
                    after()?;
                }
                Some(status) => failed.push(format!("{id} ({status})")),
                None => still.push((id, child)),
            }
        }
        running = still;
    }
    ensure!(failed.is_empty(), "failed: {} (their output is above; the same command continues the search)", failed.join(", "));
    Ok(())
}

/// Rewrites `leaderboard.md` and `leaderboard.csv` from the trials finished so far.
/// Reads the results back from disk each time: with parallel trials they were written by child
/// processes (a few small files per trial; a search has tens of trials).
fn write_leaderboard(space: &SpaceFile, trials: &[(Settings, Point)], out: &Path) -> Result<()> {
    let mut pairs: Vec<(Settings, Finished)> = Vec::new();
    for (s, p) in trials {
        if experiment::state(&experiment::point_dir(out, &p.id)) == experiment::PointState::Finished {
            pairs.push((s.clone(), experiment::run_point_finished(p, out)?));
        }
    }
    let (md, csv) = leaderboard(space, &pairs)?;
    crate::runtime::write_atomic(&out.join("leaderboard.md"), md.as_bytes())?;
    crate::runtime::write_atomic(&out.join("leaderboard.csv"), csv.as_bytes())
}

/// Where a search stands (see [`experiment::status`]): its trials (the second stage's by id
/// until the first stage has finished), then the seed re-runs of the best trial finished so far
/// (the final best's once every trial has finished; `best-tbd-…` before any has).
pub fn status(path: &Path, out: &Path) -> Result<String> {
    let (space, first) = trials(path)?;
    let finished = |p: &Point| experiment::state(&experiment::point_dir(out, &p.id)) == experiment::PointState::Finished;
    // the second stage is drawn once the first has finished; its ids are known before
    let second = if first.iter().all(|(_, p)| finished(p)) { refined(path, &space, &first, out)? } else { Vec::new() };
    let done: Vec<Finished> = first
        .iter()
        .chain(&second)
        .filter(|(_, p)| finished(p))
        .map(|(_, p)| experiment::run_point_finished(p, out))
        .collect::<Result<_>>()?;
    let best = if done.is_empty() { "tbd".to_string() } else { best_of(&space, &done)?.id.clone() };
    let mut ids: Vec<String> = first.iter().map(|(_, p)| p.id.clone()).collect();
    ids.extend(refine_ids(&space, first.len()));
    ids.extend(space.seeds.iter().map(|&s| seed_point_id(&best, s)));
    experiment::status(out, &ids, space.metric.key(), space.metric == Monitor::Auc, space.parallel)
}

/// The best finished trial by the validation metric.
fn best_of<'a>(space: &SpaceFile, done: &'a [Finished]) -> Result<&'a Finished> {
    ranked(space.metric, done, |f| &f.result).first().copied().context("no trial finished")
}

/// The point (run directory under `<out>/points`) of trial `best`'s re-run with seed `s`: named
/// after the trial, so a second stage that finds a new best re-runs it beside the old one's.
pub fn seed_point_id(best: &str, s: u64) -> String {
    format!("best-{best}-seed{s}")
}

/// The seed re-runs of the best trial.
fn seed_points(space: &SpaceFile, best: &Point) -> Vec<Point> {
    space
        .seeds
        .iter()
        .map(|&s| {
            let mut config = best.config.clone();
            config.train.seed = s;
            config.name = format!("{}-best-seed{s}", space.name);
            Point { id: seed_point_id(&best.id, s), family: "best".into(), config }
        })
        .collect()
}

/// Trains only the trial or seed re-run `id` (the child process of a parallel search). A
/// second-stage trial needs the first stage finished, a seed re-run every trial (the best one is
/// read back from their results).
pub fn run_only(path: &Path, out: &Path, opts: &crate::train::RunOptions, id: &str) -> Result<()> {
    let (space, first) = trials(path)?;
    // the parent search holds the directory; a child holds its one point
    let _hold =
        experiment::hold(&out.join("points").join(format!("{id}{}", experiment::LOCK_FILE)), &format!("point {id} of {}", out.display()))?;
    let mut points: Vec<Point> = first.iter().map(|(_, p)| p.clone()).collect();
    if !points.iter().any(|p| p.id == id) {
        points.extend(refined(path, &space, &first, out)?.into_iter().map(|(_, p)| p));
    }
    if let Some(p) = points.iter().find(|p| p.id == id) {
        experiment::run_point(p, out, &trial_options(&space, out, &points, opts))?;
        return Ok(());
    }
    let done: Vec<Finished> = points.iter().map(|p| experiment::run_point_finished(p, out)).collect::<Result<_>>()?;
    let best = best_of(&space, &done)?;
    let best_point = &points.iter().find(|p| p.id == best.id).expect("a trial");
    let seeds = seed_points(&space, best_point);
    let p = seeds.iter().find(|p| p.id == id).with_context(|| format!("{id} is neither a trial nor a seed re-run of this search"))?;
    experiment::run_point(p, out, opts)?;
    Ok(())
}

/// Trains (or reads back) the trials `stage`, in child processes when given a launcher; the
/// leaderboard (of every trial in `all` finished so far) is rewritten as each one ends.
fn run_stage(
    space: &SpaceFile,
    stage: &[(Settings, Point)],
    all: &[(Settings, Point)],
    out: &Path,
    opts: &crate::train::RunOptions,
    children: Option<Launch>,
) -> Result<Vec<Finished>> {
    let points: Vec<Point> = stage.iter().map(|(_, p)| p.clone()).collect();
    let peers: Vec<Point> = all.iter().map(|(_, p)| p.clone()).collect();
    let write = || write_leaderboard(space, all, out);
    if let Some(launch) = children {
        run_children(&points, out, space.parallel, launch, &write)?;
    }
    experiment::run_all(&points, out, &trial_options(space, out, &peers, opts), |_| write())
}

/// Runs (or continues) the search, then the seeds of the best trial; writes `leaderboard.md`,
/// `leaderboard.csv` and `summary.json` into `out` after every trial. With `parallel > 1` in
/// the space and a `launch`er, trials and seed re-runs train in child processes.
pub fn run(path: &Path, out: &Path, opts: &crate::train::RunOptions, launch: Option<Launch>) -> Result<Summary> {
    let (space, first) = trials(path)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let _hold = experiment::hold(&out.join(experiment::LOCK_FILE), &format!("search directory {}", out.display()))?;
    let children = launch.filter(|_| space.parallel > 1);
    // the first stage, then the second (drawn from the first's results), each through the runner
    let mut done = run_stage(&space, &first, &first, out, opts, children)?;
    let second = refined(path, &space, &first, out)?;
    let trials = [first, second].concat();
    done.extend(run_stage(&space, &trials[done.len()..], &trials, out, opts, children)?);
    let best = best_of(&space, &done)?;
    let best_trial = trials.iter().find(|(_, p)| p.id == best.id).expect("a trial");
    if crate::train::capped_while_improving(&best.result) {
        tracing::warn!(
            "the best trial, {}, stopped at its epoch cap with its best evaluation in its last epoch: more epochs may pay (`wukong train --resume {} --epochs N` continues it; the other trials had the same cap)",
            best.id,
            experiment::point_dir(out, &best.id).display()
        );
    }
    // the best config with each seed (its trial seed included if listed: a separate run anyway)
    let seed_points = seed_points(&space, &best_trial.1);
    if let Some(launch) = children {
        run_children(&seed_points, out, space.parallel, launch, &|| Ok(()))?;
    }
    let seeded = experiment::run_all(&seed_points, out, opts, |_| Ok(()))?;
    let col = |k: &str| seeded.iter().map(|f| metric_of(&f.result, k)).collect::<Vec<_>>();
    let (auc, ll) = (mean_std(&col("test_auc")), mean_std(&col("test_logloss")));
    let summary = Summary {
        best: best.id.clone(),
        best_settings: best_trial.0.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        seeds: space.seeds.clone(),
        test_auc_mean: auc.map(|x| x.0),
        test_auc_std: auc.map(|x| x.1),
        test_logloss_mean: ll.map(|x| x.0),
        test_logloss_std: ll.map(|x| x.1),
    };
    crate::runtime::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_puts_the_better_validation_metric_first_nan_last_and_keeps_ties_in_order() {
        let r = |id: &str, auc: f64, ll: f64| (id.to_string(), serde_json::json!({ "valid_auc": auc, "valid_logloss": ll }));
        let items = [r("a", 0.90, 0.30), r("b", f64::NAN, f64::NAN), r("c", 0.95, 0.40), r("d", 0.90, 0.20)];
        let ids = |m| ranked(m, &items, |t| &t.1).iter().map(|t| t.0.as_str()).collect::<Vec<_>>();
        // serde_json writes NaN as null: read back as NaN, ranked last under either metric
        assert_eq!(ids(Monitor::Auc), ["c", "a", "d", "b"]);
        assert_eq!(ids(Monitor::Logloss), ["d", "a", "c", "b"]);
    }
}
