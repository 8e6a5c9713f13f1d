//! Encoded rows in memory: what the loader batches and the cache stores.

/// Encoded rows (row-major): `rows[i * num_slots + s]` is the table row of slot `s` of example
/// `i`, `values` its weight; `dense[i * num_dense + j]` the dense features.
#[derive(Debug, Clone, Default)]
pub struct EncodedDataset {
    pub num_slots: usize,
    pub num_dense: usize,
    pub labels: Vec<f32>,
    pub rows: Vec<u32>,
    pub values: Vec<f32>,
    pub dense: Vec<f32>,
}

impl EncodedDataset {
    pub fn new(num_slots: usize, num_dense: usize) -> Self {
        Self { num_slots, num_dense, ..Default::default() }
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn clear(&mut self) {
        self.labels.clear();
        self.rows.clear();
        self.values.clear();
        self.dense.clear();
    }
    pub fn positive_rate(&self) -> f64 {
        self.labels.iter().map(|&y| y as f64).sum::<f64>() / self.len().max(1) as f64
    }
    /// Appends all of `other`.
    pub fn append(&mut self, other: &EncodedDataset) {
        self.labels.extend_from_slice(&other.labels);
        self.rows.extend_from_slice(&other.rows);
        self.values.extend_from_slice(&other.values);
        self.dense.extend_from_slice(&other.dense);
    }
    /// A copy of examples `range` (a rank's part of a split in a data-parallel job).
    pub fn slice(&self, range: std::ops::Range<usize>) -> EncodedDataset {
        let (s, d) = (self.num_slots, self.num_dense);
        EncodedDataset {
            num_slots: s,
            num_dense: d,
            labels: self.labels[range.clone()].to_vec(),
            rows: self.rows[range.start * s..range.end * s].to_vec(),
            values: self.values[range.start * s..range.end * s].to_vec(),
            dense: self.dense[range.start * d..range.end * d].to_vec(),
        }
    }
    /// Appends example `i` of `other`.
    pub fn push_from(&mut self, other: &EncodedDataset, i: usize) {
        let (s, d) = (self.num_slots, self.num_dense);
        self.labels.push(other.labels[i]);
        self.rows.extend_from_slice(&other.rows[i * s..(i + 1) * s]);
        self.values.extend_from_slice(&other.values[i * s..(i + 1) * s]);
        self.dense.extend_from_slice(&other.dense[i * d..(i + 1) * d]);
    }
}
