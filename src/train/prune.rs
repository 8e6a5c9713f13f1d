//! The median stopping rule for searches (Golovin et al., "Google Vizier", KDD 2017): a trial
//! stops at an evaluation when its best validation score so far is worse than the median of the
//! best scores that the finished trials had reached by the same evaluation. A trial that
//! finished with fewer evaluations counts with its final best. It never applies during the
//! first `grace_evals` evaluations or before `min_peers` trials have finished, so a search run
//! in order is deterministic (which trials are finished is fixed); with trials in parallel it
//! depends on which finished first.

use anyhow::{Context, Result};
use std::path::PathBuf;

use super::checkpoint;
use crate::config::Monitor;

#[derive(Debug, Clone, PartialEq)]
pub struct MedianRule {
    /// Run directories of the other trials (only the finished ones, with `result.json`, count).
    pub peers: Vec<PathBuf>,
    /// Evaluations every trial gets before the rule applies.
    pub grace_evals: usize,
    /// Finished trials needed before the rule applies.
    pub min_peers: usize,
}

/// How a pruned trial's `stop_reason` begins (the evaluation number follows); the leaderboard
/// reads it back.
pub const PRUNED_AT: &str = "pruned by the median rule at evaluation ";

/// The monitored score (higher is better) of one `metrics.jsonl` line.
fn score(monitor: Monitor, line: &serde_json::Value) -> Option<f64> {
    let value = |key: &str| line[key].as_f64().unwrap_or(f64::NAN);
    let m = crate::metrics::Metrics { auc: value("valid_auc"), logloss: value("valid_logloss"), count: 0 };
    Some(monitor.score(&m)).filter(|v| v.is_finite())
}

impl MedianRule {
    /// The best score (higher is better) each finished peer had after `evals` evaluations.
    fn peer_bests(&self, monitor: Monitor, evals: usize) -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for dir in &self.peers {
            if !dir.join(checkpoint::RESULT).exists() {
                continue;
            }
            let path = dir.join(checkpoint::METRICS);
            let text = std::fs::read_to_string(&path).with_context(|| format!("median rule: cannot read {}", path.display()))?;
            let best = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(evals)
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|l| score(monitor, &l))
                .fold(f64::NEG_INFINITY, f64::max);
            if best.is_finite() {
                out.push(best);
            }
        }
        Ok(out)
    }

    /// Why a trial whose best score after `evals` evaluations is `best` should stop (None: go on).
    pub fn check(&self, monitor: Monitor, evals: usize, best: f64) -> Result<Option<String>> {
        if evals <= self.grace_evals {
            return Ok(None);
        }
        let mut peers = self.peer_bests(monitor, evals)?;
        if peers.len() < self.min_peers.max(1) {
            return Ok(None);
        }
        peers.sort_by(|a, b| a.total_cmp(b));
        let n = peers.len();
        let median = if n % 2 == 1 { peers[n / 2] } else { 0.5 * (peers[n / 2 - 1] + peers[n / 2]) };
        let shown = |v: f64| if monitor == Monitor::Logloss { -v } else { v };
        Ok((best < median).then(|| {
            format!(
                "{PRUNED_AT}{evals}: best validation {monitor:?} {:.6} is worse than the median {:.6} of {n} finished trials",
                shown(best),
                shown(median)
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished peer whose evaluations had these validation AUCs.
    fn peer(root: &std::path::Path, name: &str, aucs: &[f64], finished: bool) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = aucs.iter().map(|a| format!("{{\"valid_auc\": {a}, \"valid_logloss\": {}}}\n", 1.0 - a)).collect();
        std::fs::write(dir.join(checkpoint::METRICS), lines).unwrap();
        if finished {
            std::fs::write(dir.join(checkpoint::RESULT), "{}").unwrap();
        }
        dir
    }

    #[test]
    fn stops_below_the_median_of_finished_trials_at_the_same_evaluation() {
        let root = std::env::temp_dir().join(format!("wukong-median-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let peers = vec![
            peer(&root, "a", &[0.70, 0.80, 0.85], true),
            peer(&root, "b", &[0.60, 0.75, 0.70], true), // best so far counts, not the last value
            peer(&root, "c", &[0.65], true),             // stopped early: its final best counts
            peer(&root, "d", &[0.99, 0.99, 0.99], false), // still running: ignored
        ];
        let rule = MedianRule { peers, grace_evals: 1, min_peers: 3 };
        // within the grace period: never
        assert_eq!(rule.check(Monitor::Auc, 1, 0.1).unwrap(), None);
        // evaluation 2: peers' bests 0.80, 0.75, 0.65 → median 0.75
        assert!(rule.check(Monitor::Auc, 2, 0.7499).unwrap().unwrap().contains("median 0.750000 of 3 finished trials"));
        assert_eq!(rule.check(Monitor::Auc, 2, 0.75).unwrap(), None, "equal to the median goes on");
        // evaluation 3: bests 0.85, 0.75, 0.65 → median 0.75 still
        assert!(rule.check(Monitor::Auc, 3, 0.74).unwrap().is_some());
        // LogLoss: lower is better (scores are negated): peers' best loglosses 0.20, 0.25, 0.35
        assert!(rule.check(Monitor::Logloss, 2, -0.26).unwrap().unwrap().contains("median 0.250000"));
        assert_eq!(rule.check(Monitor::Logloss, 2, -0.24).unwrap(), None);
        // too few finished peers
        let few = MedianRule { min_peers: 4, ..rule };
        assert_eq!(few.check(Monitor::Auc, 3, 0.0).unwrap(), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
