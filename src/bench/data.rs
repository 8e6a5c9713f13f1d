//! The benchmark's data: examples of a config's shape drawn from a seeded generator (power-law
//! value popularity per field, so both sides and every run see the same data), written to and
//! read from a work directory of little-endian column files that the PyTorch reference reads too.

use anyhow::{Context, Result};
use std::path::Path;

use super::Spec;
use crate::data::EncodedDataset;
use crate::data::world::power_law_rank;
use crate::rng::SplitMix64 as Rng;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Generates the spec's data: global table rows `[examples, fields]` (each field's hot rows
/// scattered over its block by a fixed stride, as hashing would), labels, dense features.
pub fn generate(spec: &Spec, seed: u64) -> EncodedDataset {
    let fields = spec.vocab.len();
    let mut offsets = Vec::with_capacity(fields);
    let mut acc = 0usize;
    for &v in &spec.vocab {
        offsets.push(acc);
        acc += v;
    }
    // A stride coprime with the block size permutes ranks over the block.
    let strides: Vec<usize> = spec
        .vocab
        .iter()
        .map(|&v| (0..).map(|i| 2_654_435_761usize + 2 * i).find(|&p| gcd(p % v.max(1), v) == 1 || v == 1).unwrap())
        .collect();
    let mut rng = Rng(seed);
    let n = spec.examples;
    let mut data = EncodedDataset::new(fields, spec.dense);
    data.labels.reserve(n);
    data.rows.reserve(n * fields);
    for _ in 0..n {
        data.labels.push(if rng.unit() < spec.positive_rate { 1.0 } else { 0.0 });
        for f in 0..fields {
            let v = spec.vocab[f];
            let r = power_law_rank(rng.unit(), v, spec.zipf);
            data.rows.push((offsets[f] + (r * strides[f]) % v) as u32);
        }
        for _ in 0..spec.dense {
            data.dense.push(rng.normal() as f32);
        }
    }
    data.values = vec![1.0; n * fields];
    data
}

/// Writes `spec.json`, `rows.u32`, `labels.f32`, `dense.f32` into `dir`.
pub fn write_work_dir(dir: &Path, spec: &Spec, data: &EncodedDataset) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("spec.json"), serde_json::to_string_pretty(spec)?)?;
    std::fs::write(dir.join("rows.u32"), data.rows.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())?;
    std::fs::write(dir.join("labels.f32"), data.labels.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())?;
    std::fs::write(dir.join("dense.f32"), data.dense.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())?;
    Ok(())
}

/// Reads what [`write_work_dir`] wrote.
pub fn read_work_dir(dir: &Path) -> Result<(Spec, EncodedDataset)> {
    let spec: Spec =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).with_context(|| format!("cannot read {}/spec.json", dir.display()))?)?;
    let read = |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("cannot read {}/{name}", dir.display()));
    let words = |b: Vec<u8>| b.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect::<Vec<_>>();
    let fields = spec.vocab.len();
    let mut data = EncodedDataset::new(fields, spec.dense);
    data.rows = words(read("rows.u32")?).into_iter().map(u32::from_le_bytes).collect();
    data.labels = words(read("labels.f32")?).into_iter().map(f32::from_le_bytes).collect();
    data.dense = words(read("dense.f32")?).into_iter().map(f32::from_le_bytes).collect();
    data.values = vec![1.0; data.rows.len()];
    anyhow::ensure!(
        data.labels.len() == spec.examples && data.rows.len() == spec.examples * fields && data.dense.len() == spec.examples * spec.dense,
        "{}: data files do not match spec.json",
        dir.display()
    );
    Ok((spec, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_law_ranks_stay_in_range_and_favour_the_head() {
        let mut rng = Rng(7);
        let v = 1000;
        let mut head = 0;
        for _ in 0..10_000 {
            let r = power_law_rank(rng.unit(), v, 1.1);
            assert!(r < v);
            head += usize::from(r < 10);
        }
        // P(rank < 10) under a 1.1 power law over 1000 ranks is about 0.5; uniform would be 0.01.
        assert!(head > 3000, "{head}");
        assert_eq!(power_law_rank(0.0, 5, 0.0), 0);
        assert_eq!(power_law_rank(0.999_999, 5, 0.0), 4);
        assert_eq!(power_law_rank(0.5, 1, 2.0), 0);
    }
}
