//! Exact AUC (ties get the average rank, i.e. count one half) and LogLoss over a whole split.
//!
//! Scores are accumulated as they are produced (one `(logit, label)` pair per example, no
//! second copy); LogLoss is summed on the fly from logits in f64, which is exact for saturated
//! predictions where `log(sigmoid)` in f32 would underflow.

use anyhow::{Result, bail};

#[derive(Debug, Default, Clone)]
pub struct MetricAccumulator {
    pairs: Vec<(f32, bool)>,
    logloss_sum: f64,
    positives: u64,
    /// Scores that are NaN or ±∞ (a diverged model): the metrics refuse them.
    non_finite: u64,
}

/// `-[y log σ(z) + (1-y) log(1-σ(z))]` computed stably from the logit.
pub fn bce_from_logit(z: f64, y: bool) -> f64 {
    // softplus(z) - y z, with softplus(z) = max(z, 0) + ln(1 + e^{-|z|})
    let sp = z.max(0.0) + (-z.abs()).exp().ln_1p();
    if y { sp - z } else { sp }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub auc: f64,
    pub logloss: f64,
    pub count: u64,
}

impl MetricAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, logit: f32, label: f32) {
        let y = label >= 0.5;
        self.non_finite += !logit.is_finite() as u64;
        self.logloss_sum += bce_from_logit(logit as f64, y);
        self.positives += y as u64;
        self.pairs.push((logit, y));
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    fn check_finite(&self) -> Result<()> {
        if self.non_finite > 0 {
            bail!("{} of {} scores are not finite (NaN or infinite): the model has diverged", self.non_finite, self.pairs.len());
        }
        Ok(())
    }

    pub fn logloss(&self) -> Result<f64> {
        if self.pairs.is_empty() {
            bail!("LogLoss of an empty split is undefined");
        }
        self.check_finite()?;
        Ok(self.logloss_sum / self.pairs.len() as f64)
    }

    /// Exact ROC AUC = P(score⁺ > score⁻) + ½ P(score⁺ = score⁻). A split with one class only
    /// has no AUC: that is an error, not a made-up 0.5.
    pub fn auc(&mut self) -> Result<f64> {
        let n = self.pairs.len() as u64;
        let (pos, neg) = (self.positives, n - self.positives);
        if pos == 0 || neg == 0 {
            bail!("AUC is undefined: the split has {pos} positives and {neg} negatives (one class only)");
        }
        // NaN compares unequal to itself: the tie loop below would never advance.
        self.check_finite()?;
        self.pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        // Sum of positive ranks (1-based), ties receiving their average rank.
        let mut rank_sum = 0.0f64;
        let mut i = 0;
        while i < self.pairs.len() {
            let mut j = i;
            let mut pos_in_tie = 0u64;
            while j < self.pairs.len() && self.pairs[j].0 == self.pairs[i].0 {
                pos_in_tie += self.pairs[j].1 as u64;
                j += 1;
            }
            let avg_rank = (i + 1 + j) as f64 / 2.0;
            rank_sum += avg_rank * pos_in_tie as f64;
            i = j;
        }
        let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
        Ok(u / (pos as f64 * neg as f64))
    }

    pub fn finish(mut self) -> Result<Metrics> {
        Ok(Metrics { auc: self.auc()?, logloss: self.logloss()?, count: self.pairs.len() as u64 })
    }
}

/// Maps logits in place by a Platt scaling `(a, b)` from [`platt`]: z ↦ a·z + b (still a logit).
pub fn apply_platt((a, b): (f64, f64), logits: &mut [f32]) {
    for z in logits {
        *z = (a * *z as f64 + b) as f32;
    }
}

/// Platt scaling: the `(a, b)` that minimise the mean LogLoss of σ(a·z + b) over pairs of logit
/// `z` and label (≥ 0.5 is positive) — fitted on a validation split, it turns an AUC-selected
/// model's over- or under-confident scores into probabilities without changing their order (so
/// AUC is unchanged) as long as `a > 0`. Newton's method on the two parameters (the loss is
/// convex in them) from the identity (1, 0), each step halved until the loss falls. `None` when
/// there is nothing to fit (no pairs, one class only, non-finite scores) or the fit would reverse
/// the order (`a ≤ 0`).
pub fn platt(logits: &[f32], labels: &[f32]) -> Option<(f64, f64)> {
    let n = logits.len().min(labels.len());
    let positives = labels[..n].iter().filter(|&&y| y >= 0.5).count();
    if n == 0 || positives == 0 || positives == n || logits[..n].iter().any(|z| !z.is_finite()) {
        return None;
    }
    let loss = |a: f64, b: f64| -> f64 {
        logits[..n].iter().zip(&labels[..n]).map(|(&z, &y)| bce_from_logit(a * z as f64 + b, y >= 0.5)).sum::<f64>() / n as f64
    };
    let (mut a, mut b) = (1.0f64, 0.0f64);
    let mut current = loss(a, b);
    for _ in 0..100 {
        // gradient and Hessian of the mean loss in (a, b)
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (&z, &y) in logits[..n].iter().zip(&labels[..n]) {
            let z = z as f64;
            let p = 1.0 / (1.0 + (-(a * z + b)).exp());
            let r = p - if y >= 0.5 { 1.0 } else { 0.0 };
            let w = (p * (1.0 - p)).max(1e-12);
            ga += r * z;
            gb += r;
            haa += w * z * z;
            hab += w * z;
            hbb += w;
        }
        let det = haa * hbb - hab * hab;
        if !(det.is_finite() && det > 0.0) {
            break;
        }
        let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
        let mut t = 1.0;
        let mut improved = false;
        while t > 1e-6 {
            let (na, nb) = (a - t * da, b - t * db);
            let l = loss(na, nb);
            if l.is_finite() && l <= current {
                (a, b, current, improved) = (na, nb, l, true);
                break;
            }
            t *= 0.5;
        }
        if !improved || (t * da).abs().max((t * db).abs()) < 1e-9 {
            break;
        }
    }
    (a > 0.0 && a.is_finite() && b.is_finite()).then_some((a, b))
}

/// Reliability diagram: `bins` groups of equal size by predicted probability; each gives (mean
/// predicted, observed positive rate, count).
pub fn reliability(scores: &[(f64, bool)], bins: usize) -> Vec<(f64, f64, usize)> {
    let mut s: Vec<(f64, bool)> = scores.to_vec();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = s.len();
    (0..bins)
        .filter_map(|b| {
            let (lo, hi) = (b * n / bins, (b + 1) * n / bins);
            (hi > lo).then(|| {
                let part = &s[lo..hi];
                let mean = part.iter().map(|x| x.0).sum::<f64>() / part.len() as f64;
                let rate = part.iter().filter(|x| x.1).count() as f64 / part.len() as f64;
                (mean, rate, part.len())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(pairs: &[(f32, f32)]) -> MetricAccumulator {
        let mut a = MetricAccumulator::new();
        for &(s, y) in pairs {
            a.push(s, y);
        }
        a
    }

    #[test]
    fn platt_scaling_by_hand_and_on_samples() {
        // logit +1: 3 of 4 positive, logit -1: 1 of 4 — σ(a·1 + b) = 3/4 and σ(-a + b) = 1/4 fit
        // exactly: a = ln 3, b = 0
        let z = [1.0f32, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0];
        let y = [1.0f32, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let (a, b) = platt(&z, &y).unwrap();
        assert!((a - 3f64.ln()).abs() < 1e-6 && b.abs() < 1e-6, "{a} {b}");
        // 3 of 4 at +1, 2 of 4 at -1: a = b = ln(3) / 2
        let y2 = [1.0f32, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let (a, b) = platt(&z, &y2).unwrap();
        assert!((a - 3f64.ln() / 2.0).abs() < 1e-6 && (b - 3f64.ln() / 2.0).abs() < 1e-6, "{a} {b}");
        // labels drawn from σ(0.5 z - 1) but scored 3× over-confident: the fit undoes it
        let mut rng = crate::rng::SplitMix64(7);
        let (mut zs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..40_000 {
            let t = -4.0 + 8.0 * rng.unit();
            ys.push(if rng.unit() < 1.0 / (1.0 + (-(0.5 * t - 1.0)).exp()) { 1.0 } else { 0.0 });
            zs.push((3.0 * t) as f32);
        }
        let (a, b) = platt(&zs, &ys).unwrap();
        assert!((a - 0.5 / 3.0).abs() < 0.01 && (b + 1.0).abs() < 0.05, "{a} {b}");
        let mean =
            |a: f64, b: f64| zs.iter().zip(&ys).map(|(&z, &y)| bce_from_logit(a * z as f64 + b, y >= 0.5)).sum::<f64>() / zs.len() as f64;
        assert!(mean(a, b) < mean(1.0, 0.0) - 0.1, "{} vs {}", mean(a, b), mean(1.0, 0.0));
        // at the optimum the loss is flat in both directions
        for (da, db) in [(1e-3, 0.0), (-1e-3, 0.0), (0.0, 1e-3), (0.0, -1e-3)] {
            assert!(mean(a + da, b + db) >= mean(a, b) - 1e-12);
        }
        // nothing to fit
        assert_eq!(platt(&[], &[]), None);
        assert_eq!(platt(&[0.5, -0.5], &[1.0, 1.0]), None, "one class");
        assert_eq!(platt(&[f32::NAN, 0.5], &[1.0, 0.0]), None);
        // scores in reverse order would need a < 0: refused
        assert_eq!(platt(&[2.0, 1.0, -1.0, -2.0], &[0.0, 0.0, 1.0, 1.0]), None);
    }

    #[test]
    fn auc_by_hand() {
        // positives at 0.8, 0.4; negatives at 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) → 3/4
        let mut a = acc(&[(0.8, 1.0), (0.6, 0.0), (0.4, 1.0), (0.2, 0.0)]);
        assert!((a.auc().unwrap() - 0.75).abs() < 1e-12);
    }

    #[test]
    fn auc_ties_count_half() {
        // one positive and one negative tied at 0.5, one negative below: (0.5 = 0.5 → ½, 0.5 > 0.1 → 1) → 0.75
        let mut a = acc(&[(0.5, 1.0), (0.5, 0.0), (0.1, 0.0)]);
        assert!((a.auc().unwrap() - 0.75).abs() < 1e-12);
        // all scores equal → 0.5 exactly
        let mut b = acc(&[(0.3, 1.0), (0.3, 0.0), (0.3, 1.0), (0.3, 0.0)]);
        assert_eq!(b.auc().unwrap(), 0.5);
    }

    #[test]
    fn auc_perfect_and_reversed() {
        assert_eq!(acc(&[(2.0, 1.0), (1.0, 0.0), (3.0, 1.0)]).auc().unwrap(), 1.0);
        assert_eq!(acc(&[(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)]).auc().unwrap(), 0.0);
    }

    #[test]
    fn single_class_is_an_error() {
        let err = acc(&[(0.1, 1.0), (0.7, 1.0)]).auc().unwrap_err().to_string();
        assert!(err.contains("one class"), "{err}");
        assert!(MetricAccumulator::new().logloss().is_err());
    }

    #[test]
    fn non_finite_scores_are_an_error_not_a_hang() {
        let mut a = acc(&[(f32::NAN, 1.0), (0.2, 0.0), (f32::NAN, 0.0), (f32::INFINITY, 1.0)]);
        let err = a.auc().unwrap_err().to_string();
        assert!(err.contains("3 of 4 scores are not finite"), "{err}");
        assert!(a.logloss().is_err());
        assert!(a.finish().is_err());
    }

    #[test]
    fn signed_zeros_tie() {
        // -0.0 and 0.0 are the same score (total_cmp orders them, == ties them)
        let mut a = acc(&[(-0.0, 1.0), (0.0, 0.0)]);
        assert_eq!(a.auc().unwrap(), 0.5);
    }

    #[test]
    fn logloss_by_hand() {
        // logit 0 → p = 0.5 → ln 2 either label; logit ln 3 → p = 0.75: y=1 → -ln .75, y=0 → -ln .25
        let a = acc(&[(0.0, 1.0), (0.0, 0.0), (3f32.ln(), 1.0), (3f32.ln(), 0.0)]);
        let expected = (2.0 * 2f64.ln() - 0.75f64.ln() - 0.25f64.ln()) / 4.0;
        assert!((a.logloss().unwrap() - expected).abs() < 1e-7);
        // saturated logits stay finite and exact
        assert!((bce_from_logit(-100.0, true) - 100.0).abs() < 1e-9);
        assert!(bce_from_logit(100.0, true) < 1e-40);
    }
}
