//! The MPI engine behind [`super::Collective`] (rsmpi over the system's Open MPI or MPICH).
//!
//! MPI's default error handler is fatal: a collective that fails (a peer died, the network
//! broke) ends the job through the launcher, which names the rank that failed; nothing here can
//! hang on a dead peer longer than the launcher takes to notice it.

use anyhow::{Result, ensure};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use super::{ByteCounter, Collective};

pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    sent: ByteCounter,
    /// Finalizes MPI when dropped; kept last so the communicator goes first.
    _universe: Universe,
}

// SAFETY: MPI is initialised with the default (single-thread) level and the trainer calls the
// collectives from one thread only; the handle is shared behind an `Arc` for ownership, not for
// concurrent use.
unsafe impl Send for MpiCollective {}
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiCollective(rank {} of {})", self.rank, self.size)
    }
}

impl MpiCollective {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was initialised already in this process"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self { world, rank, size, sent: ByteCounter::default(), _universe: universe })
    }

    /// Counts and displacements of a variable-length all-gather, from each rank's length.
    fn gather_counts(&self, n: usize) -> Result<(Vec<i32>, Vec<i32>, usize)> {
        ensure!(n <= i32::MAX as usize, "an all-gather of {n} values exceeds MPI's 32-bit counts");
        let mut counts = vec![0i32; self.size];
        self.world.all_gather_into(&(n as i32), &mut counts[..]);
        self.sent.add(4);
        let mut displs = Vec::with_capacity(self.size);
        let mut total = 0usize;
        for &c in &counts {
            ensure!(total <= i32::MAX as usize, "an all-gather of more than 2^31 values exceeds MPI's 32-bit displacements");
            displs.push(total as i32);
            total += c as usize;
        }
        Ok((counts, displs, total))
    }

    fn all_gather<T: Equivalence + Default + Clone>(&self, send: &[T]) -> Result<(Vec<T>, Vec<usize>)> {
        let (counts, displs, total) = self.gather_counts(send.len())?;
        let mut out = vec![T::default(); total];
        {
            let mut part = PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(send, &mut part);
        }
        self.sent.add(std::mem::size_of_val(send));
        Ok((out, counts.iter().map(|&c| c as usize).collect()))
    }
}

impl MpiCollective {
    fn all_to_all<T: Equivalence + Default + Clone>(&self, send: &[T], send_counts: &[usize]) -> Result<(Vec<T>, Vec<usize>)> {
        ensure!(send_counts.len() == self.size, "all-to-all: {} send counts for {} ranks", send_counts.len(), self.size);
        ensure!(send_counts.iter().sum::<usize>() == send.len(), "all-to-all: the send counts do not add up to the buffer");
        ensure!(send.len() <= i32::MAX as usize, "an all-to-all of {} values exceeds MPI's 32-bit counts", send.len());
        let sc: Vec<i32> = send_counts.iter().map(|&c| c as i32).collect();
        let mut rc = vec![0i32; self.size];
        self.world.all_to_all_into(&sc[..], &mut rc[..]);
        let displs = |counts: &[i32]| -> Result<Vec<i32>> {
            let mut out = Vec::with_capacity(counts.len());
            let mut total = 0i64;
            for &c in counts {
                ensure!(total <= i32::MAX as i64, "an all-to-all of more than 2^31 values exceeds MPI's 32-bit displacements");
                out.push(total as i32);
                total += c as i64;
            }
            Ok(out)
        };
        let (sd, rd) = (displs(&sc)?, displs(&rc)?);
        let total: usize = rc.iter().map(|&c| c as usize).sum();
        let mut out = vec![T::default(); total];
        {
            let part = mpi::datatype::Partition::new(send, &sc[..], &sd[..]);
            let mut recv = PartitionMut::new(&mut out[..], &rc[..], &rd[..]);
            self.world.all_to_all_varcount_into(&part, &mut recv);
        }
        let own = send_counts[self.rank];
        self.sent.add(4 * self.size + std::mem::size_of::<T>() * (send.len() - own));
        Ok((out, rc.iter().map(|&c| c as usize).collect()))
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        self.sent.add(std::mem::size_of_val(buf));
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        self.sent.add(std::mem::size_of_val(buf));
        Ok(())
    }

    fn all_gather_f32(&self, send: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
        self.all_gather(send)
    }

    fn all_gather_i64(&self, send: &[i64]) -> Result<(Vec<i64>, Vec<usize>)> {
        self.all_gather(send)
    }

    fn all_to_all_f32(&self, send: &[f32], send_counts: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        self.all_to_all(send, send_counts)
    }

    fn all_to_all_i64(&self, send: &[i64], send_counts: &[usize]) -> Result<(Vec<i64>, Vec<usize>)> {
        self.all_to_all(send, send_counts)
    }

    fn gather_f32(&self, root: usize, send: &[f32]) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let (counts, displs, total) = self.gather_counts(send.len())?;
        let proc = self.world.process_at_rank(root as i32);
        self.sent.add(std::mem::size_of_val(send));
        if self.rank != root {
            proc.gather_varcount_into(send);
            return Ok(None);
        }
        let mut out = vec![0f32; total];
        {
            let mut part = PartitionMut::new(&mut out[..], &counts[..], &displs[..]);
            proc.gather_varcount_into_root(send, &mut part);
        }
        Ok(Some((out, counts.iter().map(|&c| c as usize).collect())))
    }

    fn broadcast_bytes(&self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let proc = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        proc.broadcast_into(&mut len);
        let mut buf = if self.rank == root { bytes } else { vec![0u8; len as usize] };
        proc.broadcast_into(&mut buf[..]);
        if self.rank == root {
            self.sent.add(8 + buf.len());
        }
        Ok(buf)
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.get()
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
