//! Per-field vocabulary fit on the training split only.
//!
//! Each field gets its own block of rows in one concatenated embedding table: row
//! `offsets[f]` is the field's out-of-vocabulary (OOV) row, rows `offsets[f] + 1 ..` are the
//! raw ids seen at least `min_count` times in training, in order of first appearance. A value
//! never seen in training therefore maps to OOV, never to a crash or to another field's row.

use super::RawDataset;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Encoder {
    pub field_names: Vec<String>,
    pub min_count: u32,
    /// Raw ids per field, in index order (local index = position + 1).
    pub vocab: Vec<Vec<u64>>,
    #[serde(skip)]
    lookup: Vec<HashMap<u64, u32>>,
}

impl Encoder {
    /// Fits the vocabularies on `train`.
    pub fn fit(train: &RawDataset, field_names: &[String], min_count: u32) -> Result<Self> {
        let nf = train.num_fields;
        if !field_names.is_empty() && field_names.len() != nf {
            bail!("{} field names given but the data has {nf} fields", field_names.len());
        }
        let names = if field_names.is_empty() {
            (0..nf).map(|f| format!("f{f}")).collect()
        } else {
            field_names.to_vec()
        };
        let mut counts: Vec<HashMap<u64, (u32, usize)>> = vec![HashMap::new(); nf];
        for (i, &id) in train.ids.iter().enumerate() {
            let c = counts[i % nf].entry(id).or_insert((0, i));
            c.0 += 1;
        }
        let vocab = counts
            .into_iter()
            .map(|m| {
                let mut kept: Vec<(u64, usize)> =
                    m.into_iter().filter(|(_, (c, _))| *c >= min_count.max(1)).map(|(id, (_, first))| (id, first)).collect();
                kept.sort_by_key(|&(_, first)| first);
                kept.into_iter().map(|(id, _)| id).collect()
            })
            .collect();
        Ok(Self::from_vocab(names, min_count, vocab))
    }

    fn from_vocab(field_names: Vec<String>, min_count: u32, vocab: Vec<Vec<u64>>) -> Self {
        let lookup = vocab
            .iter()
            .map(|ids| ids.iter().enumerate().map(|(i, &id)| (id, i as u32 + 1)).collect())
            .collect();
        Self { field_names, min_count, vocab, lookup }
    }

    pub fn num_fields(&self) -> usize {
        self.vocab.len()
    }

    /// Rows per field, OOV row included.
    pub fn field_sizes(&self) -> Vec<usize> {
        self.vocab.iter().map(|v| v.len() + 1).collect()
    }

    /// First table row of each field.
    pub fn offsets(&self) -> Vec<u32> {
        let mut acc = 0u32;
        self.field_sizes()
            .iter()
            .map(|&s| {
                let o = acc;
                acc += s as u32;
                o
            })
            .collect()
    }

    pub fn total_rows(&self) -> usize {
        self.field_sizes().iter().sum()
    }

    /// Table row of every (row, field) slot; also returns how many slots fell to OOV.
    pub fn encode(&self, data: &RawDataset) -> Result<(Vec<u32>, usize)> {
        let nf = self.num_fields();
        if data.num_fields != nf {
            bail!("data has {} fields, the encoder was fit on {nf}", data.num_fields);
        }
        let offsets = self.offsets();
        let mut oov = 0;
        let rows = data
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let f = i % nf;
                let local = self.lookup[f].get(id).copied().unwrap_or_else(|| {
                    oov += 1;
                    0
                });
                offsets[f] + local
            })
            .collect();
        Ok((rows, oov))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::runtime::write_atomic(path, serde_json::to_string(self)?.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read encoder {}", path.display()))?;
        let e: Encoder = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid encoder file", path.display()))?;
        Ok(Self::from_vocab(e.field_names, e.min_count, e.vocab))
    }
}
