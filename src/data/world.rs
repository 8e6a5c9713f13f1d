//! A synthetic click stream with a known limit, for measuring scaling laws (`[data] format =
//! "synthetic"`). **Synthetic**: every number measured on it says so.
//!
//! Example `i` of stream `s` is a pure function of (teacher seed, `s`, `i`): one-pass training
//! never sees an example twice, any range is generated on demand without disk, and a run resumes
//! at any index. Streams: 0 trains, 1 validates, 2 tests (fixed held-out sets).
//!
//! Shaped like production logs: `fields` categorical fields with vocabularies log-spaced from
//! `vocab_min` to `vocab_max` and Zipf(`zipf`) popularity, the first `multi_hot_fields` of them bags
//! of 1..=`max_bag` values (sum-pooled), and `dense` log-normal counts (given to the model in log
//! space, standardized). Labels are Bernoulli draws from a hidden teacher:
//!
//! `logit = b + scale · (√w · main + √(1−w) · inter)`, with
//! * every value owning `channels` latent features, uniform on [−√3, √3] (unit variance,
//!   bounded), drawn from a hash of (seed, field, value, channel) — no tables;
//! * `main` = the normalized sum of each field's first channel (first-order effects);
//! * `inter` = Σ_j a_j φ_j over `terms` interaction terms, each of order 2..=`max_order`
//!   (uniform, so high orders carry a real share of the variance) over distinct participants
//!   (fields or dense features) and one channel each: φ_j = (Π_{f ∈ S_j} (1 + ρ·h_f[c_{j,f}]) − 1)
//!   scaled to unit variance. The factors are not centred: a product of zero-mean factors is
//!   parity-like (no lower-order projection, so gradient descent cannot find it; a pilot with
//!   ρ → ∞ left every model at the first-order LogLoss), while 1 + ρ·h gives each term
//!   lower-order components of decreasing weight, as real feature crosses have. Amplitudes decay
//!   as a power law |a_j| = (j+1)^−α, normalized to unit variance: a power-law spectrum is what
//!   lets a larger model keep capturing the next slice of the tail (Bahri et al. 2021; Maloney
//!   et al. 2022).
//!
//! `b` is set (by bisection on a sample) for `positive_rate`. Because the teacher's probabilities
//! are known, the **Bayes-optimal LogLoss** of an evaluation set is known: the LogLoss of the
//! teacher's own probabilities on it; models report their excess over it.

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use super::dataset::EncodedDataset;
use super::encoder::Encoder;
use crate::rng::{GAMMA, SplitMix64, mix};

/// `[data.world]`: the teacher and the stream sizes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorldConfig {
    /// The teacher's seed (vocabulary features, terms, amplitudes).
    pub seed: u64,
    pub fields: usize,
    /// The first this many fields are multi-hot bags of 1..=`max_bag` values.
    pub multi_hot_fields: usize,
    pub max_bag: usize,
    pub vocab_min: usize,
    pub vocab_max: usize,
    /// Zipf exponent of value popularity within a field.
    pub zipf: f64,
    pub dense: usize,
    /// Latent features per value.
    pub channels: usize,
    /// Interaction terms of the teacher.
    pub terms: usize,
    /// Amplitude decay |a_j| = (j+1)^−alpha.
    pub alpha: f64,
    /// Highest interaction order (≥ 2).
    pub max_order: usize,
    /// Spread ρ of an interaction factor 1 + ρ·h around 1 (smaller: stronger low-order parts).
    pub rho: f64,
    /// Share of the logit variance from first-order effects.
    pub main_share: f64,
    /// Standard deviation of the logit around its offset.
    pub logit_scale: f64,
    pub positive_rate: f64,
    /// Examples of the training stream (one pass = one epoch over them).
    pub train_examples: usize,
    pub valid_examples: usize,
    pub test_examples: usize,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            fields: 26,
            multi_hot_fields: 2,
            max_bag: 5,
            vocab_min: 10,
            vocab_max: 100_000,
            zipf: 1.1,
            dense: 8,
            channels: 8,
            terms: 2048,
            alpha: 0.75,
            max_order: 8,
            rho: 1.0,
            main_share: 0.3,
            logit_scale: 2.0,
            positive_rate: 0.25,
            train_examples: 1_000_000,
            valid_examples: 100_000,
            test_examples: 100_000,
        }
    }
}

impl WorldConfig {
    pub fn validate(&self) -> Result<()> {
        use crate::config::check::{above, int, num, prob};
        int("data.world.fields", self.fields, 1, 10_000)?;
        int("data.world.multi_hot_fields", self.multi_hot_fields, 0, self.fields)?;
        int("data.world.max_bag", self.max_bag, 1, 1000)?;
        int("data.world.vocab_min", self.vocab_min, 1, 100_000_000)?;
        int("data.world.vocab_max", self.vocab_max, self.vocab_min, 100_000_000)?;
        num("data.world.zipf", self.zipf, 0.0, 10.0)?;
        int("data.world.dense", self.dense, 0, 10_000)?;
        int("data.world.channels", self.channels, 1, 1024)?;
        int("data.world.terms", self.terms, 0, 10_000_000)?;
        num("data.world.alpha", self.alpha, 0.0, 10.0)?;
        int("data.world.max_order", self.max_order, 2, 64)?;
        ensure!(self.max_order <= self.fields + self.dense, "data.world.max_order exceeds the participants (fields + dense)");
        above("data.world.rho", self.rho, 0.0, 100.0)?;
        prob("data.world.main_share", self.main_share)?;
        above("data.world.logit_scale", self.logit_scale, 0.0, 100.0)?;
        above("data.world.positive_rate", self.positive_rate, 0.0, 1.0)?;
        ensure!(self.positive_rate < 1.0, "data.world.positive_rate must be below 1");
        int("data.world.train_examples", self.train_examples, 1, 1 << 40)?;
        int("data.world.valid_examples", self.valid_examples, 1, 1 << 32)?;
        int("data.world.test_examples", self.test_examples, 0, 1 << 32)?;
        Ok(())
    }
}

/// The stream of each split.
pub const TRAIN_STREAM: u64 = 0;
pub const VALID_STREAM: u64 = 1;
pub const TEST_STREAM: u64 = 2;

/// One interaction term: its amplitude and (participant, channel) factors.
#[derive(Debug, Clone)]
struct Term {
    /// a_j divided by the standard deviation of the term's product.
    amplitude: f64,
    factors: Vec<(u32, u32)>,
}

/// The built teacher.
#[derive(Debug, Clone)]
pub struct World {
    pub cfg: WorldConfig,
    vocab: Vec<usize>,
    /// Per field, the hash key its values' features derive from.
    field_keys: Vec<u64>,
    terms: Vec<Term>,
    /// Normalizers of the main and interaction parts.
    main_norm: f64,
    inter_norm: f64,
    /// The logit offset that gives `positive_rate`.
    pub offset: f64,
    /// Per dense feature and channel, the phase of its bounded feature `√2·sin(z + phase)`.
    dense_phase: Vec<f64>,
}

/// √3: a uniform on [−√3, √3] has unit variance.
const SQRT3: f64 = 1.732_050_807_568_877_2;

fn unit(z: u64) -> f64 {
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Rank of a bounded power law over `v` ranks (0 the most popular), by inverse CDF.
pub fn power_law_rank(u: f64, v: usize, s: f64) -> usize {
    let top = (v + 1) as f64;
    let x = if s == 0.0 {
        1.0 + u * v as f64
    } else if (s - 1.0).abs() < 1e-9 {
        top.powf(u)
    } else {
        (1.0 + u * (top.powf(1.0 - s) - 1.0)).powf(1.0 / (1.0 - s))
    };
    (x as usize).saturating_sub(1).min(v - 1)
}

impl World {
    pub fn new(cfg: &WorldConfig) -> Result<Self> {
        cfg.validate()?;
        let f = cfg.fields;
        let vocab: Vec<usize> = (0..f)
            .map(|i| {
                let t = if f == 1 { 1.0 } else { i as f64 / (f - 1) as f64 };
                ((cfg.vocab_min as f64) * (cfg.vocab_max as f64 / cfg.vocab_min as f64).powf(t)).round() as usize
            })
            .collect();
        let field_keys = (0..f as u64).map(|i| mix(mix(cfg.seed ^ 0xF1E1_D000) ^ i)).collect();
        let mut rng = SplitMix64(mix(cfg.seed ^ 0x7E4A_5000));
        let participants = (f + cfg.dense) as u32;
        let mut terms = Vec::with_capacity(cfg.terms);
        for j in 0..cfg.terms {
            let order = 2 + (rng.next_u64() % (cfg.max_order - 1) as u64) as usize;
            let mut factors: Vec<(u32, u32)> = Vec::with_capacity(order);
            while factors.len() < order {
                let p = (rng.next_u64() % participants as u64) as u32;
                if factors.iter().all(|&(q, _)| q != p) {
                    factors.push((p, (rng.next_u64() % cfg.channels as u64) as u32));
                }
            }
            factors.sort_unstable();
            let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            // Var Π(1 + ρh) = (1 + ρ²)^o − 1 for independent unit-variance h
            let std = ((1.0 + cfg.rho * cfg.rho).powi(order as i32) - 1.0).sqrt();
            terms.push(Term { amplitude: sign * ((j + 1) as f64).powf(-cfg.alpha) / std, factors });
        }
        let inter_var: f64 = (0..cfg.terms).map(|j| ((j + 1) as f64).powf(-2.0 * cfg.alpha)).sum();
        let mut world = Self {
            cfg: cfg.clone(),
            vocab,
            field_keys,
            terms,
            main_norm: 1.0 / (f as f64).sqrt(),
            inter_norm: if inter_var > 0.0 { 1.0 / inter_var.sqrt() } else { 0.0 },
            offset: 0.0,
            dense_phase: (0..cfg.dense * cfg.channels)
                .map(|i| unit(mix(cfg.seed ^ (((i / cfg.channels) as u64) << 20) ^ (i % cfg.channels) as u64)) * std::f64::consts::TAU)
                .collect(),
        };
        world.offset = world.calibrate_offset();
        Ok(world)
    }

    /// Vocabulary size of each categorical field.
    pub fn vocab(&self) -> &[usize] {
        &self.vocab
    }

    /// Embedding slots per field (bags take `max_bag` slots).
    pub fn widths(&self) -> Vec<usize> {
        (0..self.cfg.fields).map(|f| if f < self.cfg.multi_hot_fields { self.cfg.max_bag } else { 1 }).collect()
    }

    /// The encoder a model trains with: field `f`'s value `v` is table row `offset_f + 1 + v`.
    pub fn encoder(&self) -> Encoder {
        let fields = self.widths().into_iter().zip(&self.vocab).enumerate().map(|(f, (w, &v))| (format!("c{f}"), w, v)).collect();
        Encoder::fixed(fields, (0..self.cfg.dense).map(|k| format!("d{k}")).collect())
    }

    /// Feature `c` of value `v` of field `f`, uniform on [−√3, √3].
    fn feature(&self, f: usize, v: usize, c: usize) -> f64 {
        let key = mix(self.field_keys[f] ^ v as u64);
        (unit(mix(key.wrapping_add((c as u64 + 1).wrapping_mul(GAMMA)))) * 2.0 - 1.0) * SQRT3
    }

    /// The centred, scaled logit of one example from its participants' features `h`
    /// (`[participants × channels]`).
    fn raw_logit(&self, h: &[f64]) -> f64 {
        let (ch, rho) = (self.cfg.channels, self.cfg.rho);
        let main: f64 = (0..self.cfg.fields).map(|f| h[f * ch]).sum::<f64>() * self.main_norm;
        let inter: f64 = self
            .terms
            .iter()
            .map(|t| t.amplitude * (t.factors.iter().map(|&(p, c)| 1.0 + rho * h[p as usize * ch + c as usize]).product::<f64>() - 1.0))
            .sum::<f64>()
            * self.inter_norm;
        self.cfg.logit_scale * (self.cfg.main_share.sqrt() * main + (1.0 - self.cfg.main_share).sqrt() * inter)
    }

    /// Draws example `i` of stream `s` into `out` and returns the teacher's logit (before the
    /// offset); the label is drawn after, from the final probability.
    fn draw(&self, s: u64, i: u64, out: &mut EncodedDataset, offsets: &[u32], h: &mut Vec<f64>) -> (f64, SplitMix64) {
        let cfg = &self.cfg;
        let ch = cfg.channels;
        h.clear();
        h.resize((cfg.fields + cfg.dense) * ch, 0.0);
        let mut rng = SplitMix64(mix(mix(cfg.seed ^ mix(s.wrapping_add(0x57EA))) ^ i));
        for f in 0..cfg.fields {
            let v = self.vocab[f];
            let bag = if f < cfg.multi_hot_fields { 1 + (rng.next_u64() % cfg.max_bag as u64) as usize } else { 1 };
            let width = if f < cfg.multi_hot_fields { cfg.max_bag } else { 1 };
            for k in 0..width {
                if k < bag {
                    let value = power_law_rank(rng.unit(), v, cfg.zipf);
                    out.rows.push(offsets[f] + 1 + value as u32);
                    out.values.push(1.0);
                    for c in 0..ch {
                        h[f * ch + c] += self.feature(f, value, c) / bag as f64;
                    }
                } else {
                    out.rows.push(offsets[f]); // padding: the OOV row with weight 0
                    out.values.push(0.0);
                }
            }
        }
        for k in 0..cfg.dense {
            // a log-normal count, given to the model (and the teacher) standardized in log space
            let z = rng.normal().clamp(-4.0, 4.0);
            out.dense.push(z as f32);
            for c in 0..ch {
                // each channel of a dense feature is a fixed bounded function of it
                h[(cfg.fields + k) * ch + c] = (z + self.dense_phase[k * ch + c]).sin() * std::f64::consts::SQRT_2;
            }
        }
        (self.raw_logit(h), rng)
    }

    fn table_offsets(&self) -> Vec<u32> {
        let mut acc = 0u32;
        self.vocab
            .iter()
            .map(|&v| {
                let o = acc;
                acc += 1 + v as u32;
                o
            })
            .collect()
    }

    /// Examples `start .. start + n` of stream `s`, with the teacher's click probabilities.
    pub fn generate(&self, s: u64, start: u64, n: usize) -> (EncodedDataset, Vec<f64>) {
        let slots: usize = self.widths().iter().sum();
        let mut out = EncodedDataset::new(slots, self.cfg.dense);
        out.labels.reserve(n);
        out.rows.reserve(n * slots);
        out.values.reserve(n * slots);
        out.dense.reserve(n * self.cfg.dense);
        let offsets = self.table_offsets();
        let mut h = Vec::new();
        let mut probs = Vec::with_capacity(n);
        for i in start..start + n as u64 {
            let (z, mut rng) = self.draw(s, i, &mut out, &offsets, &mut h);
            let p = 1.0 / (1.0 + (-(z + self.offset)).exp());
            out.labels.push(if rng.unit() < p { 1.0 } else { 0.0 });
            probs.push(p);
        }
        (out, probs)
    }

    /// The offset whose mean probability over a sample of the training stream is `positive_rate`.
    fn calibrate_offset(&self) -> f64 {
        const SAMPLE: u64 = 20_000;
        let offsets = self.table_offsets();
        let mut scratch = EncodedDataset::new(self.widths().iter().sum(), self.cfg.dense);
        let mut h = Vec::new();
        let logits: Vec<f64> = (0..SAMPLE)
            .map(|i| {
                scratch.rows.clear();
                scratch.values.clear();
                scratch.dense.clear();
                self.draw(u64::MAX, i, &mut scratch, &offsets, &mut h).0
            })
            .collect();
        let rate = |b: f64| logits.iter().map(|z| 1.0 / (1.0 + (-(z + b)).exp())).sum::<f64>() / logits.len() as f64;
        let (mut lo, mut hi) = (-50.0, 50.0);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if rate(mid) < self.cfg.positive_rate { lo = mid } else { hi = mid }
        }
        0.5 * (lo + hi)
    }
}

impl World {
    /// Writes examples `start .. start + n` of stream `s` as a tab-separated file with a header
    /// (`label`, `d0…` dense values in log space, `c0…` value ids; a bag's ids joined by `|`),
    /// readable by other tools and by `format = "tsv"` (fields `c*` categorical, the bags
    /// `multi_hot` with separator `|`, `d*` numeric). Gzip when the name ends in `.gz`.
    pub fn write_tsv(&self, s: u64, start: u64, n: usize, path: &std::path::Path) -> Result<()> {
        use anyhow::Context;
        use std::io::Write;
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w: Box<dyn Write> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast()))
        } else {
            Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
        };
        let cfg = &self.cfg;
        let mut header = vec!["label".to_string()];
        header.extend((0..cfg.dense).map(|k| format!("d{k}")));
        header.extend((0..cfg.fields).map(|f| format!("c{f}")));
        writeln!(w, "{}", header.join("\t"))?;
        let offsets = self.table_offsets();
        let widths = self.widths();
        const CHUNK: usize = 65_536;
        let mut line = String::new();
        for c in (0..n).step_by(CHUNK) {
            let (d, _) = self.generate(s, start + c as u64, CHUNK.min(n - c));
            for i in 0..d.len() {
                line.clear();
                line.push_str(if d.labels[i] >= 0.5 { "1" } else { "0" });
                for k in 0..cfg.dense {
                    line.push_str(&format!("\t{}", d.dense[i * cfg.dense + k]));
                }
                let mut slot = i * d.num_slots;
                for (f, &width) in widths.iter().enumerate() {
                    line.push('\t');
                    let ids: Vec<String> =
                        (slot..slot + width).filter(|&j| d.values[j] != 0.0).map(|j| (d.rows[j] - offsets[f] - 1).to_string()).collect();
                    line.push_str(&ids.join("|"));
                    slot += width;
                }
                line.push('\n');
                w.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        w.flush()?;
        Ok(())
    }
}

/// LogLoss of probabilities `p` on labels `y` (the Bayes-optimal LogLoss when `p` is the teacher's).
pub fn logloss(p: &[f64], y: &[f32]) -> f64 {
    let eps = 1e-15;
    let sum: f64 = p.iter().zip(y).map(|(&p, &y)| if y >= 0.5 { -(p.max(eps)).ln() } else { -((1.0 - p).max(eps)).ln() }).sum();
    sum / p.len().max(1) as f64
}

/// Mean binary entropy of `p`: the expected LogLoss of the teacher over label draws.
pub fn mean_entropy(p: &[f64]) -> f64 {
    let h = |p: f64| if p <= 0.0 || p >= 1.0 { 0.0 } else { -(p * p.ln() + (1.0 - p) * (1.0 - p).ln()) };
    p.iter().map(|&p| h(p)).sum::<f64>() / p.len().max(1) as f64
}
