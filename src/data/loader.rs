//! Batching: seeded per-epoch shuffling, the batch's unique embedding rows (so that autodiff
//! and the sparse optimizer only see those), and a background thread that prepares the next
//! batches while the current one trains.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::cache::CacheReader;
use super::encoder::EncodedDataset;
use super::pipeline::SplitData;

/// One batch, ready to become tensors.
#[derive(Debug, Clone)]
pub struct Batch {
    pub size: usize,
    pub labels: Vec<f32>,
    /// Distinct table rows touched by the batch.
    pub unique_rows: Vec<i64>,
    /// For every (example, slot), its position in `unique_rows`.
    pub inverse: Vec<i64>,
    /// Weight per slot; `None` when all are 1 (one-hot data), which skips a multiply.
    pub values: Option<Vec<f32>>,
    /// Dense features `[size, num_dense]`; `None` when the data has none.
    pub dense: Option<Vec<f32>>,
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
        let nf = data.num_slots;
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
        let nd = data.num_dense;
        let mut dense = Vec::with_capacity(idx.len() * nd);
        for &i in idx {
            labels.push(data.labels[i]);
            dense.extend_from_slice(&data.dense[i * nd..(i + 1) * nd]);
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
        let dense = (nd > 0).then_some(dense);
        Batch { size: idx.len(), labels, unique_rows, inverse, values, dense }
    }
}

/// Iterates over a split in batches, preparing them on a background thread: from memory, or
/// streamed from its cache in chunks (memory bounded by `shuffle_chunks × chunk_rows` rows).
pub struct BatchLoader {
    data: SplitData,
    total_rows: usize,
    batch_size: usize,
    chunk_rows: usize,
    shuffle_chunks: usize,
}

impl BatchLoader {
    pub fn new(data: Arc<EncodedDataset>, total_rows: usize, batch_size: usize) -> Self {
        Self::from_split(SplitData::Memory(data), total_rows, batch_size, 65_536, 4)
    }

    pub fn from_split(data: SplitData, total_rows: usize, batch_size: usize, chunk_rows: usize, shuffle_chunks: usize) -> Self {
        assert!(batch_size > 0 && chunk_rows > 0 && shuffle_chunks > 0, "batch and chunk sizes must be positive");
        Self { data, total_rows, batch_size, chunk_rows, shuffle_chunks }
    }

    pub fn num_batches(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    /// Batches of one epoch. `shuffle_seed = Some(s)` shuffles with a generator seeded by `s`
    /// (the trainer passes seed + epoch, so every epoch differs and every run repeats). Read
    /// errors of a streamed cache end the epoch early with a message; the caller sees fewer batches.
    pub fn epoch(&self, shuffle_seed: Option<u64>) -> Receiver<Batch> {
        let (tx, rx) = sync_channel(4);
        let (total_rows, batch_size) = (self.total_rows, self.batch_size);
        match &self.data {
            SplitData::Memory(data) => {
                let data = Arc::clone(data);
                std::thread::spawn(move || {
                    let mut order: Vec<usize> = (0..data.len()).collect();
                    if let Some(seed) = shuffle_seed {
                        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
                    }
                    send_batches(&data, &order, batch_size, &mut BatchBuilder::new(total_rows), &tx);
                });
            }
            SplitData::Stream(cache) => {
                let cache = cache.clone();
                let (chunk_rows, group) = (self.chunk_rows, self.shuffle_chunks);
                std::thread::spawn(move || {
                    if let Err(e) = stream_epoch(&cache, shuffle_seed, chunk_rows, group, batch_size, total_rows, &tx) {
                        eprintln!("error: streaming {}: {e:#}", cache.dir.display());
                    }
                });
            }
        }
        rx
    }
}

/// Sends the batches of `order`; false when the consumer stopped early.
fn send_batches(data: &EncodedDataset, order: &[usize], batch_size: usize, builder: &mut BatchBuilder, tx: &SyncSender<Batch>) -> bool {
    order.chunks(batch_size).all(|chunk| tx.send(builder.build(data, chunk)).is_ok())
}

/// One streamed epoch: chunks in a seeded random order, `group` chunks at a time shuffled
/// together; rows that do not fill a batch carry over to the next group.
fn stream_epoch(cache: &CacheReader, seed: Option<u64>, chunk_rows: usize, group: usize, batch_size: usize, total_rows: usize, tx: &SyncSender<Batch>) -> anyhow::Result<()> {
    let mut chunks: Vec<usize> = (0..cache.len().div_ceil(chunk_rows)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.unwrap_or(0));
    if seed.is_some() {
        chunks.shuffle(&mut rng);
    }
    let (slots, dense) = (cache.header.num_slots, cache.header.num_dense);
    let mut builder = BatchBuilder::new(total_rows);
    let mut buf = Vec::new();
    let mut pool = EncodedDataset::new(slots, dense);
    let groups: Vec<&[usize]> = chunks.chunks(group).collect();
    for (g, ids) in groups.iter().enumerate() {
        for &c in *ids {
            let part = cache.read(c * chunk_rows, chunk_rows, &mut buf)?;
            for i in 0..part.len() {
                pool.push_from(&part, i);
            }
        }
        let mut order: Vec<usize> = (0..pool.len()).collect();
        if seed.is_some() {
            order.shuffle(&mut rng);
        }
        let last = g + 1 == groups.len();
        let full = if last { order.len() } else { order.len() / batch_size * batch_size };
        if !send_batches(&pool, &order[..full], batch_size, &mut builder, tx) {
            return Ok(());
        }
        let mut rest = EncodedDataset::new(slots, dense);
        for &i in &order[full..] {
            rest.push_from(&pool, i);
        }
        pool = rest;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> EncodedDataset {
        EncodedDataset {
            num_slots: 2,
            num_dense: 0,
            labels: vec![1.0, 0.0, 1.0],
            rows: vec![0, 3, 1, 3, 0, 4],
            values: vec![1.0; 6],
            dense: vec![],
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
            num_slots: 1,
            num_dense: 0,
            labels: (0..100).map(|i| i as f32).collect(),
            rows: (0..100).collect(),
            values: vec![1.0; 100],
            dense: vec![],
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
