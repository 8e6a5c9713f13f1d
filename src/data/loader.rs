//! Batching: seeded per-epoch shuffling, the batch's unique embedding rows (so that autodiff
//! and the sparse optimizer only see those), and a background thread that prepares the next
//! batches while the current one trains.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

/// Encoded rows: `rows[i * num_fields + f]` is the table row of field `f` of example `i`.
#[derive(Debug, Clone, Default)]
pub struct EncodedDataset {
    pub num_fields: usize,
    pub labels: Vec<f32>,
    pub rows: Vec<u32>,
    pub values: Vec<f32>,
}

impl EncodedDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// One batch, ready to become tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    pub size: usize,
    pub labels: Vec<f32>,
    /// Distinct table rows touched by the batch.
    pub unique_rows: Vec<i64>,
    /// For every (example, field) slot, its position in `unique_rows`.
    pub inverse: Vec<i64>,
    /// Feature values per slot; `None` when all are 1 (one-hot data), which skips a multiply.
    pub values: Option<Vec<f32>>,
}

/// Builds batches from an index order; `stamp` is a scratch array for O(batch) de-duplication.
struct BatchBuilder {
    stamp: Vec<u32>,
    slot: Vec<u32>,
    batch_mark: u32,
}

impl BatchBuilder {
    fn new(total_rows: usize) -> Self {
        Self { stamp: vec![0; total_rows], slot: vec![0; total_rows], batch_mark: 0 }
    }

    fn build(&mut self, data: &EncodedDataset, idx: &[usize]) -> Batch {
        let nf = data.num_fields;
        self.batch_mark = self.batch_mark.wrapping_add(1);
        if self.batch_mark == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.batch_mark = 1;
        }
        let mark = self.batch_mark;
        let mut unique_rows = Vec::with_capacity(idx.len() * nf / 2);
        let mut inverse = Vec::with_capacity(idx.len() * nf);
        let mut labels = Vec::with_capacity(idx.len());
        let mut values = Vec::with_capacity(idx.len() * nf);
        for &i in idx {
            labels.push(data.labels[i]);
            for f in 0..nf {
                let r = data.rows[i * nf + f] as usize;
                if self.stamp[r] != mark {
                    self.stamp[r] = mark;
                    self.slot[r] = unique_rows.len() as u32;
                    unique_rows.push(r as i64);
                }
                inverse.push(self.slot[r] as i64);
                values.push(data.values[i * nf + f]);
            }
        }
        let values = if values.iter().all(|&v| v == 1.0) { None } else { Some(values) };
        Batch { size: idx.len(), labels, unique_rows, inverse, values }
    }
}

/// Iterates over a dataset in batches, preparing them on a background thread.
pub struct BatchLoader {
    data: Arc<EncodedDataset>,
    total_rows: usize,
    batch_size: usize,
}

impl BatchLoader {
    pub fn new(data: Arc<EncodedDataset>, total_rows: usize, batch_size: usize) -> Self {
        assert!(batch_size > 0, "batch size must be positive");
        Self { data, total_rows, batch_size }
    }

    pub fn num_batches(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    /// Batches of one epoch. `shuffle_seed = Some(s)` shuffles with a generator seeded by `s`
    /// (the trainer passes seed + epoch, so every epoch differs and every run repeats).
    pub fn epoch(&self, shuffle_seed: Option<u64>) -> Receiver<Batch> {
        let (tx, rx) = sync_channel(4);
        let data = Arc::clone(&self.data);
        let (total_rows, batch_size) = (self.total_rows, self.batch_size);
        std::thread::spawn(move || {
            let mut order: Vec<usize> = (0..data.len()).collect();
            if let Some(seed) = shuffle_seed {
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            }
            let mut builder = BatchBuilder::new(total_rows);
            for chunk in order.chunks(batch_size) {
                if tx.send(builder.build(&data, chunk)).is_err() {
                    break; // the consumer stopped early
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> EncodedDataset {
        EncodedDataset {
            num_fields: 2,
            labels: vec![1.0, 0.0, 1.0],
            rows: vec![0, 3, 1, 3, 0, 4],
            values: vec![1.0; 6],
        }
    }

    #[test]
    fn unique_rows_and_inverse_reconstruct_the_batch() {
        let data = toy();
        let b = BatchBuilder::new(5).build(&data, &[0, 1, 2]);
        assert_eq!(b.unique_rows, vec![0, 3, 1, 4]);
        let back: Vec<u32> = b.inverse.iter().map(|&j| b.unique_rows[j as usize] as u32).collect();
        assert_eq!(back, data.rows);
        assert!(b.values.is_none());
    }

    #[test]
    fn shuffling_is_seeded_and_covers_every_example() {
        let data = Arc::new(EncodedDataset {
            num_fields: 1,
            labels: (0..100).map(|i| i as f32).collect(),
            rows: (0..100).collect(),
            values: vec![1.0; 100],
        });
        let loader = BatchLoader::new(data, 100, 7);
        let collect = |s| loader.epoch(Some(s)).iter().flat_map(|b| b.labels).collect::<Vec<_>>();
        let (a, b, c) = (collect(1), collect(1), collect(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, (0..100).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(loader.num_batches(), 15);
    }
}
