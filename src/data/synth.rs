//! A generator of Criteo-format click logs with a learnable signal, for tests, benchmarks and
//! trying configs before real data is at hand. Lines are `label \t I1..I13 \t C1..C26`: counts
//! (some empty = missing, some negative in I2 like the real I2), and 8-hex-digit categorical
//! values drawn with a skewed (Zipf-like) popularity; the label is a Bernoulli draw from a logistic
//! model with per-value effects and one pairwise interaction, so a model can beat chance.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

use crate::rng::{SplitMix64 as Rng, mix};

/// A value effect in about [-1, 1], fixed by (field, value).
fn effect(field: u64, value: u64) -> f64 {
    (mix(field.wrapping_mul(1_000_003) ^ value) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Vocabulary size of categorical field `f` (0-based): from tens to `max_vocab`.
pub fn vocab_size(f: usize, max_vocab: u64) -> u64 {
    [8, 50, 300, 2_000, 20_000, max_vocab][f % 6].min(max_vocab).max(2)
}

/// Writes `rows` lines of synthetic Criteo data to `path` (gzip when the name ends in `.gz`).
pub fn write_criteo(path: &Path, rows: usize, seed: u64, max_vocab: u64) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w: Box<dyn Write> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast()))
    } else {
        Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
    };
    let mut rng = Rng(seed);
    let mut line = String::with_capacity(512);
    for _ in 0..rows {
        line.clear();
        let mut logit = -1.2;
        let mut ints = [0i64; 13];
        let mut present = [true; 13];
        for (j, x) in ints.iter_mut().enumerate() {
            present[j] = rng.unit() > 0.1 + 0.03 * j as f64;
            let u = rng.unit();
            *x = (u.powi(4) * 10f64.powi(1 + (j % 4) as i32)) as i64 - if j == 1 { 3 } else { 0 };
            if present[j] && j < 3 {
                logit += 0.4 * ((*x).max(0) as f64).ln_1p() / 4.0 * if j == 0 { 1.0 } else { -1.0 };
            }
        }
        let mut cats = [0u64; 26];
        for (f, c) in cats.iter_mut().enumerate() {
            let v = vocab_size(f, max_vocab);
            *c = (rng.unit().powi(3) * v as f64) as u64;
            if f < 12 {
                logit += 0.8 * effect(f as u64, *c);
            }
        }
        logit += 1.2 * effect(99, cats[0] * 7919 + cats[1]); // a pairwise interaction
        let p = 1.0 / (1.0 + (-logit).exp());
        let label = (rng.unit() < p) as u8;
        line.push_str(if label == 1 { "1" } else { "0" });
        for j in 0..13 {
            line.push('\t');
            if present[j] {
                line.push_str(&ints[j].to_string());
            }
        }
        for (f, &c) in cats.iter().enumerate() {
            line.push('\t');
            if f < 20 || rng.unit() > 0.3 {
                line.push_str(&format!("{:08x}", mix((f as u64) << 40 ^ c) as u32));
            }
        }
        line.push('\n');
        w.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    w.flush()?;
    Ok(())
}
