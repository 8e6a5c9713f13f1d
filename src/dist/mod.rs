//! Data-parallel training across processes: a small collective interface of our own, with one
//! engine behind it (MPI through the `mpi` crate, feature `mpi`), so that another engine (NCCL
//! for GPUs) can be added without touching the trainer.
//!
//! What the trainer needs of an engine is four collectives — a sum all-reduce, an all-gather of
//! variable-length vectors, a broadcast and a barrier — plus the rank and the world size. The
//! rules for what crosses them (which rows of a batch a rank trains on, how embedding-row
//! gradients merge) live here too, so the engine stays a thin wrapper.

#[cfg(feature = "mpi")]
pub mod mpi;

use anyhow::Result;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Collective operations over the ranks of one job. Every rank must call the same collectives in
/// the same order (they block until all ranks have called them).
pub trait Collective: std::fmt::Debug + Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place (every rank gets the same sum).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `send`, concatenated in rank order, and each rank's length.
    fn all_gather_f32(&self, send: &[f32]) -> Result<(Vec<f32>, Vec<usize>)>;
    fn all_gather_i64(&self, send: &[i64]) -> Result<(Vec<i64>, Vec<usize>)>;
    /// Personalised exchange: `send` holds consecutive blocks for ranks 0, 1, … of
    /// `send_counts[r]` values; returns what every rank sent to this one, in rank order, and
    /// how many values came from each.
    fn all_to_all_f32(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)>;
    fn all_to_all_i64(&self, send: &[i64], send_counts: &[usize]) -> Result<(Vec<i64>, Vec<usize>)>;
    /// Every rank's `send` concatenated in rank order, on rank `root` only (`None` elsewhere).
    fn gather_f32(&self, root: usize, send: &[f32]) -> Result<Option<(Vec<f32>, Vec<usize>)>>;
    /// Rank `root`'s bytes, on every rank.
    fn broadcast_bytes(&self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>>;
    fn barrier(&self) -> Result<()>;
    /// Bytes this rank has sent through the collectives so far (payload only).
    fn bytes_sent(&self) -> u64;
    /// Ends the whole job at once (no rank left waiting in a collective), after `message` was
    /// printed. Used when one rank fails.
    fn abort(&self, code: i32) -> !;
}

/// A shared handle to the job's collective engine.
pub type Comm = Arc<dyn Collective>;

/// How the embedding table is laid out over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingMode {
    /// Every rank holds the whole table; the touched rows' gradients are all-gathered, merged by
    /// row and applied identically on every rank.
    #[default]
    Replicated,
    /// Row-wise sharding (as TorchRec's): row r lives on rank r mod N; each step the ranks fetch
    /// the rows their examples use from the owners and send the gradients back (all-to-all), so a
    /// rank holds about 1/N of the table and of the optimizer state.
    Sharded,
}

/// The rows of a global batch of `len` examples that `rank` of `size` trains on: a contiguous
/// block, the first `len % size` ranks one row longer. With the same global batch and data order,
/// the union over ranks is exactly the single-process batch, whatever `size` is.
pub fn shard_range(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Rows of a `rows`-row table that `rank` of `size` holds when row r lives on rank r mod size.
pub fn shard_rows(rows: usize, rank: usize, size: usize) -> usize {
    rows.saturating_sub(rank).div_ceil(size)
}

/// Sums the gradients of rows that several ranks touched. `ids` and `grads` (`ids.len() × dim`)
/// are the all-gathered rows of every rank in rank order; returns the distinct ids (ascending)
/// and their summed gradients. The sum runs in rank order, so every rank computes the same bits.
pub fn merge_rows(ids: &[i64], grads: &[f32], dim: usize) -> (Vec<i64>, Vec<f32>) {
    debug_assert_eq!(ids.len() * dim, grads.len());
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| (ids[i], i)); // stable within an id: rank order
    let mut out_ids: Vec<i64> = Vec::with_capacity(ids.len());
    let mut out: Vec<f32> = Vec::with_capacity(grads.len());
    for i in order {
        let g = &grads[i * dim..(i + 1) * dim];
        if out_ids.last() == Some(&ids[i]) {
            let at = out.len() - dim;
            out[at..].iter_mut().zip(g).for_each(|(o, v)| *o += v);
        } else {
            out_ids.push(ids[i]);
            out.extend_from_slice(g);
        }
    }
    (out_ids, out)
}

/// Counts payload bytes for [`Collective::bytes_sent`].
#[derive(Debug, Default)]
pub struct ByteCounter(AtomicU64);

impl ByteCounter {
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The job's engine when the binary was started under an MPI launcher (`mpirun`, `srun`) and
/// built with the `mpi` feature; `None` for a single process (the trainer then runs exactly the
/// single-process path, so its numbers do not depend on how the binary was built).
pub fn from_launcher() -> Result<Option<Comm>> {
    #[cfg(feature = "mpi")]
    {
        if launched_by_mpi() {
            let comm = mpi::MpiCollective::init()?;
            if comm.size() > 1 {
                return Ok(Some(Arc::new(comm)));
            }
        }
    }
    #[cfg(not(feature = "mpi"))]
    {
        if launched_by_mpi() && launcher_size().is_some_and(|n| n > 1) {
            anyhow::bail!(
                "started by an MPI launcher with {} ranks, but this binary was built without MPI: rebuild with `cargo build --release --features mpi`",
                launcher_size().unwrap_or(0)
            );
        }
    }
    Ok(None)
}

/// Whether an MPI launcher started this process (Open MPI, MPICH/Hydra, Slurm's PMI/PMIx).
fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"].iter().any(|k| std::env::var_os(k).is_some())
}

#[cfg_attr(feature = "mpi", allow(dead_code))]
fn launcher_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"].iter().find_map(|k| std::env::var(k).ok()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_a_batch_in_order() {
        for len in [0, 1, 2, 5, 4096, 4097] {
            for size in 1..=5 {
                let parts: Vec<_> = (0..size).map(|r| shard_range(len, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let (lo, hi) = (parts.iter().map(|p| p.len()).min().unwrap(), parts.iter().map(|p| p.len()).max().unwrap());
                assert!(hi - lo <= 1, "len {len} size {size}: {parts:?}");
            }
        }
    }

    #[test]
    fn merging_sums_rows_touched_by_several_ranks() {
        // rank 0 touched rows 7 and 3, rank 1 rows 3 and 9 (dim 2)
        let ids = [7, 3, 3, 9];
        let grads = [1.0, 2.0, 10.0, 20.0, 0.5, 0.25, -1.0, -2.0];
        let (ids, g) = merge_rows(&ids, &grads, 2);
        assert_eq!(ids, vec![3, 7, 9]);
        assert_eq!(g, vec![10.5, 20.25, 1.0, 2.0, -1.0, -2.0]);
        let (ids, g) = merge_rows(&[], &[], 4);
        assert!(ids.is_empty() && g.is_empty());
    }
}
