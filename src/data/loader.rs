//! Batching: seeded per-epoch shuffling, the batch's unique embedding rows (so that autodiff
//! and the sparse optimizer only see those), and a background thread that prepares the next
//! batches while the current one trains.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::cache::CacheReader;
use super::dataset::EncodedDataset;
use super::encoder::ExtraEmbeddings;
use super::pipeline::SplitData;

/// One batch, ready to become tensors.
#[derive(Debug, Clone, Default)]
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
    /// The encoded rows end at `encoded_rows`; the extra embeddings' blocks follow.
    encoded_rows: usize,
    extra: Arc<ExtraEmbeddings>,
}

impl BatchBuilder {
    fn new(total_rows: usize, extra: Arc<ExtraEmbeddings>) -> Self {
        let rows = total_rows + extra.rows();
        Self { stamp: vec![0; rows], slot: vec![0; rows], batch_mark: 0, encoded_rows: total_rows, extra }
    }

    /// The example's position in the batch's `unique_rows`, adding the row when new.
    fn unique(&mut self, r: usize, mark: u32, unique_rows: &mut Vec<i64>) -> i64 {
        if self.stamp[r] != mark {
            self.stamp[r] = mark;
            self.slot[r] = unique_rows.len() as u32;
            unique_rows.push(r as i64);
        }
        self.slot[r] as i64
    }

    /// Errors (instead of indexing out of bounds) when a row id is outside the table: a cache
    /// corrupted on disk must stop the run with a message, not panic in the loader thread.
    fn build(&mut self, data: &EncodedDataset, idx: &[usize]) -> Result<Batch> {
        let nf = data.num_slots;
        self.batch_mark = self.batch_mark.wrapping_add(1);
        if self.batch_mark == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.batch_mark = 1;
        }
        let mark = self.batch_mark;
        let extra = Arc::clone(&self.extra); // (`self` is borrowed mutably below)
        let slots = nf + extra.slots();
        let mut unique_rows = Vec::with_capacity(idx.len() * slots / 2);
        let mut inverse = Vec::with_capacity(idx.len() * slots);
        let mut labels = Vec::with_capacity(idx.len());
        let mut values = Vec::with_capacity(idx.len() * slots);
        let nd = data.num_dense;
        let mut dense = Vec::with_capacity(idx.len() * nd);
        for &i in idx {
            labels.push(data.labels[i]);
            dense.extend_from_slice(&data.dense[i * nd..(i + 1) * nd]);
            for f in 0..nf {
                let r = data.rows[i * nf + f] as usize;
                if r >= self.encoded_rows {
                    bail!(
                        "example {i}, slot {f}: embedding row {r} is outside the table ({} rows); the encoded data does not belong to this encoder or is corrupted",
                        self.encoded_rows
                    );
                }
                inverse.push(self.unique(r, mark, &mut unique_rows));
                values.push(data.values[i * nf + f]);
            }
            if !extra.is_empty() {
                let (rows, vals) = (&data.rows[i * nf..(i + 1) * nf], &data.values[i * nf..(i + 1) * nf]);
                extra
                    .for_example(rows, vals, |r, v| {
                        inverse.push(self.unique(r as usize, mark, &mut unique_rows));
                        values.push(v);
                    })
                    .map_err(|e| anyhow::anyhow!("example {i}: {e}; the encoded data does not belong to this encoder or is corrupted"))?;
            }
        }
        let values = if values.iter().all(|&v| v == 1.0) { None } else { Some(values) };
        let dense = (nd > 0).then_some(dense);
        Ok(Batch { size: idx.len(), labels, unique_rows, inverse, values, dense })
    }
}

/// Iterates over a split in batches, preparing them on a background thread: from memory, or
/// streamed from its cache in chunks (memory bounded by `shuffle_chunks × chunk_rows` rows).
pub struct BatchLoader {
    data: SplitData,
    total_rows: usize,
    extra: Arc<ExtraEmbeddings>,
    batch_size: usize,
    chunk_rows: usize,
    shuffle_chunks: usize,
    fail_at: Option<usize>,
    /// `(rank, size)`: build only this rank's rows of every batch (data-parallel training).
    shard: Option<(usize, usize)>,
}

/// The batches of one epoch, in order. A read error in the loader thread arrives as an `Err`
/// item (and ends the epoch), so the consumer can stop the run instead of training on less.
pub struct Epoch {
    rx: Receiver<Result<Batch>>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        self.rx.recv().ok()
    }
}

impl BatchLoader {
    pub fn new(data: Arc<EncodedDataset>, total_rows: usize, batch_size: usize) -> Self {
        Self::from_split(SplitData::Memory(data), total_rows, batch_size, 65_536, 4)
    }

    /// Sizes of zero are raised to one (config validation refuses them before this point; the
    /// loader itself must never divide by zero or spin).
    pub fn from_split(data: SplitData, total_rows: usize, batch_size: usize, chunk_rows: usize, shuffle_chunks: usize) -> Self {
        Self {
            data,
            total_rows,
            extra: Arc::default(),
            batch_size: batch_size.max(1),
            chunk_rows: chunk_rows.max(1),
            shuffle_chunks: shuffle_chunks.max(1),
            fail_at: None,
            shard: None,
        }
    }

    /// Data parallelism: every batch keeps only the rows [`crate::dist::shard_range`] gives
    /// `rank` of `size` (the global batch, its order and the batch count stay those of one
    /// process; a rank's part of a short last batch may be empty).
    pub fn sharded(mut self, rank: usize, size: usize) -> Self {
        self.shard = (size > 1).then_some((rank, size));
        self
    }

    /// Batches also carry the extra embeddings of fields with several (`[data] embeddings`;
    /// [`crate::data::Encoder::extra_embeddings`]).
    pub fn with_extra(mut self, extra: ExtraEmbeddings) -> Self {
        self.extra = Arc::new(extra);
        self
    }

    /// Fault injection for tests: the loader thread reports a read error instead of batch `n`.
    pub fn fail_at_batch(mut self, n: Option<usize>) -> Self {
        self.fail_at = n;
        self
    }

    /// Batches per epoch: ⌈rows / batch_size⌉, in memory and streamed (a streamed epoch sends
    /// full batches until its last group, which ends with the one partial batch).
    pub fn num_batches(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    /// Batches of one epoch. `shuffle_seed = Some(s)` shuffles with a generator seeded by `s`
    /// (the trainer passes seed + epoch, so every epoch differs and every run repeats).
    pub fn epoch(&self, shuffle_seed: Option<u64>) -> Epoch {
        self.epoch_from(shuffle_seed, 0)
    }

    /// The same epoch without its first `skip` batches (resuming inside an epoch): the order is
    /// regenerated from the seed and the skipped batches are not built (a streamed epoch still
    /// reads their chunks, since they decide which rows carry over to later groups).
    pub fn epoch_from(&self, shuffle_seed: Option<u64>, skip: usize) -> Epoch {
        let (tx, rx) = sync_channel(4);
        let mut sink = Sink {
            tx,
            next: 0,
            skip,
            fail_at: self.fail_at,
            shard: self.shard,
            builder: BatchBuilder::new(self.total_rows, Arc::clone(&self.extra)),
        };
        let batch_size = self.batch_size;
        match &self.data {
            SplitData::Memory(data) => {
                let data = Arc::clone(data);
                std::thread::spawn(move || {
                    let mut order: Vec<usize> = (0..data.len()).collect();
                    if let Some(seed) = shuffle_seed {
                        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
                    }
                    if let Err(e) = sink.send_all(&data, &order, batch_size) {
                        sink.tx.send(Err(e)).ok();
                    }
                });
            }
            SplitData::Generated { world, stream, rows } => {
                let (world, stream, rows) = (Arc::clone(world), *stream, *rows);
                // whole batches per chunk, so no batch spans two chunks; iid examples need no shuffle
                let chunk = batch_size * (self.chunk_rows / batch_size).max(1);
                std::thread::spawn(move || {
                    sink.next = skip;
                    let mut start = (skip * batch_size).min(rows);
                    while start < rows {
                        let n = chunk.min(rows - start);
                        let (part, _) = world.generate(stream, start as u64, n);
                        match sink.send_all(&part, &(0..n).collect::<Vec<_>>(), batch_size) {
                            Ok(true) => {}
                            Ok(false) => return,
                            Err(e) => {
                                sink.tx.send(Err(e)).ok();
                                return;
                            }
                        }
                        start += n;
                    }
                });
            }
            SplitData::Stream(cache) => {
                let cache = cache.clone();
                let (chunk_rows, group) = (self.chunk_rows, self.shuffle_chunks);
                std::thread::spawn(move || {
                    if let Err(e) = stream_epoch(&cache, shuffle_seed, chunk_rows, group, batch_size, &mut sink) {
                        sink.tx.send(Err(e.context(format!("streaming {}", cache.dir.display())))).ok();
                    }
                });
            }
        }
        Epoch { rx }
    }
}

/// The sending end of an epoch: numbers batches, skips the first `skip` without building them.
struct Sink {
    tx: SyncSender<Result<Batch>>,
    next: usize,
    skip: usize,
    fail_at: Option<usize>,
    shard: Option<(usize, usize)>,
    builder: BatchBuilder,
}

impl Sink {
    /// Sends the batches of `order`; Ok(false) when the consumer stopped early.
    fn send_all(&mut self, data: &EncodedDataset, order: &[usize], batch_size: usize) -> Result<bool> {
        for chunk in order.chunks(batch_size) {
            let i = self.next;
            self.next += 1;
            if i < self.skip {
                continue;
            }
            if self.fail_at == Some(i) {
                bail!("injected read error at batch {i} (fault injection)");
            }
            let rows = match self.shard {
                Some((rank, size)) => &chunk[crate::dist::shard_range(chunk.len(), rank, size)],
                None => chunk,
            };
            if self.tx.send(Ok(self.builder.build(data, rows)?)).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One streamed epoch: chunks in a seeded random order, `group` chunks at a time shuffled
/// together; rows that do not fill a batch carry over to the next group.
fn stream_epoch(cache: &CacheReader, seed: Option<u64>, chunk_rows: usize, group: usize, batch_size: usize, sink: &mut Sink) -> Result<()> {
    let mut chunks: Vec<usize> = (0..cache.len().div_ceil(chunk_rows)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.unwrap_or(0));
    if seed.is_some() {
        chunks.shuffle(&mut rng);
    }
    let (slots, dense) = (cache.header.num_slots, cache.header.num_dense);
    let mut pool = EncodedDataset::new(slots, dense);
    let groups: Vec<&[usize]> = chunks.chunks(group).collect();
    for (g, ids) in groups.iter().enumerate() {
        for &c in *ids {
            let part = cache.read(c * chunk_rows, chunk_rows)?;
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
        if !sink.send_all(&pool, &order[..full], batch_size)? {
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

/// One batch of all of `data`'s rows, in order, de-duplicated through a hash map: for scoring a
/// few rows against a large table, where the loader's `stamp` arrays (one entry per table row)
/// would cost more than the batch.
pub fn batch_of(data: &EncodedDataset, total_rows: usize, extra: &ExtraEmbeddings) -> Result<Batch> {
    let (n, nf) = (data.len(), data.num_slots);
    let slots = nf + extra.slots();
    let mut slot_of = std::collections::HashMap::with_capacity(n * slots);
    let mut unique_rows = Vec::with_capacity(n * slots);
    let mut inverse = Vec::with_capacity(n * slots);
    let mut values = Vec::with_capacity(n * slots);
    let mut add = |r: u32, v: f32| {
        let s = *slot_of.entry(r).or_insert_with(|| {
            unique_rows.push(r as i64);
            unique_rows.len() as i64 - 1
        });
        inverse.push(s);
        values.push(v);
    };
    for i in 0..n {
        let (rows, vals) = (&data.rows[i * nf..(i + 1) * nf], &data.values[i * nf..(i + 1) * nf]);
        for (f, (&r, &v)) in rows.iter().zip(vals).enumerate() {
            if r as usize >= total_rows {
                bail!("example {i}, slot {f}: embedding row {r} is outside the table ({total_rows} rows)");
            }
            add(r, v);
        }
        extra.for_example(rows, vals, &mut add).map_err(|e| anyhow::anyhow!("example {i}: {e}"))?;
    }
    let values = (!values.iter().all(|&v| v == 1.0)).then_some(values);
    let dense = (data.num_dense > 0).then(|| data.dense.clone());
    Ok(Batch { size: n, labels: data.labels.clone(), unique_rows, inverse, values, dense })
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
        let b = BatchBuilder::new(5, Arc::default()).build(&data, &[0, 1, 2]).unwrap();
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
        let collect = |s| loader.epoch(Some(s)).flat_map(|b| b.unwrap().labels).collect::<Vec<_>>();
        let (a, b, c) = (collect(1), collect(1), collect(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, (0..100).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(loader.num_batches(), 15);
        // resuming after k batches yields exactly the rest of the same epoch
        let tail = loader.epoch_from(Some(1), 4).flat_map(|b| b.unwrap().labels).collect::<Vec<_>>();
        assert_eq!(tail, a[4 * 7..]);
    }

    #[test]
    fn row_outside_the_table_is_an_error_not_a_panic() {
        let data = toy();
        let err = BatchBuilder::new(4, Arc::default()).build(&data, &[0, 1, 2]).unwrap_err().to_string();
        assert!(err.contains("row 4 is outside the table"), "{err}");
    }

    #[test]
    fn a_loader_error_arrives_as_an_item() {
        let loader = BatchLoader::new(Arc::new(toy()), 5, 1).fail_at_batch(Some(1));
        let items: Vec<_> = loader.epoch(None).collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert!(items[1].as_ref().unwrap_err().to_string().contains("injected read error"));
    }
}
