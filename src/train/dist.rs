//! The trainer's side of data parallelism (see [`crate::dist`]): one flat buffer of dense
//! gradients all-reduced per step, the touched embedding rows' gradients all-gathered and merged,
//! and a check that the replicas stay equal.
//!
//! Every rank trains on its rows of the same global batch ([`crate::dist::shard_range`]) and
//! backpropagates the *sum* of its examples' losses; the all-reduced sums divided by the global
//! batch size are the single-process mean gradients, so N ranks take the steps one process
//! would, up to the order of float additions.

use anyhow::{Result, ensure};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::dist::{Collective, Comm, EmbeddingMode};
use crate::model::Model;

/// A stepper's place in a data-parallel job.
#[derive(Debug, Clone)]
pub struct DataParallel {
    pub comm: Comm,
    pub embeddings: EmbeddingMode,
}

impl DataParallel {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Fails (on every rank, with the ranks named) when the replicas' weights differ: every rank
    /// applies the same update to the same weights, so a difference means a broken reduction or
    /// a nondeterministic kernel, and training on would silently average different models.
    pub fn check_replicas(&self, model: &Model, step: u64) -> Result<()> {
        let mine = match self.embeddings {
            EmbeddingMode::Replicated => i64::from(crc32fast::hash(crate::train::checkpoint::weights_digest(model)?.as_bytes())),
            // each rank holds its own part of the table: only the dense weights are replicas
            EmbeddingMode::Sharded => i64::from(dense_digest(model)),
        };
        let (all, _) = self.comm.all_gather_i64(&[mine])?;
        let differing: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
        ensure!(
            differing.is_empty(),
            "replicas diverged at step {step}: the weights of rank(s) {differing:?} differ from rank 0's (weight checksums {all:?})"
        );
        Ok(())
    }
}

/// One lookup of a row-sharded table: which of this rank's rows went to which owner, and which
/// rows the other ranks asked this rank for (so their gradients can come back the same way).
#[derive(Debug, Default)]
pub struct RowExchange {
    /// Positions in this rank's unique-row list, grouped by owner (rank order).
    order: Vec<usize>,
    send_counts: Vec<usize>,
    /// Local indices of the rows others asked for, in the order received, and counts per rank.
    served: Vec<i64>,
    served_counts: Vec<usize>,
}

impl RowExchange {
    /// Fetches the values of `unique_rows` (global ids) from their owners: returns `[U × dim]`
    /// f32 values in the order of `unique_rows`. Every rank must call it, with an empty list if
    /// it has no rows this round.
    pub fn fetch(comm: &dyn Collective, model: &Model, unique_rows: &[i64], device: &Device) -> Result<(Vec<f32>, Self)> {
        let n = comm.size();
        let dim = model.embedding().dim();
        let mut order: Vec<usize> = (0..unique_rows.len()).collect();
        order.sort_by_key(|&i| (unique_rows[i] as usize % n, i));
        let mut send_counts = vec![0usize; n];
        let ids: Vec<i64> = order
            .iter()
            .map(|&i| {
                send_counts[unique_rows[i] as usize % n] += 1;
                unique_rows[i]
            })
            .collect();
        let (asked, served_counts) = comm.all_to_all_i64(&ids, &send_counts)?;
        let local_rows = model.embedding().rows() as i64;
        let served: Vec<i64> = asked.iter().map(|&r| r / n as i64).collect();
        if let Some(bad) = served.iter().find(|&&r| r < 0 || r >= local_rows) {
            anyhow::bail!("a rank asked for local row {bad} of a shard of {local_rows} rows");
        }
        let values = if served.is_empty() {
            Vec::new()
        } else {
            let idx = Tensor::<1, Int>::from_data(TensorData::new(served.clone(), [served.len()]), device);
            model.embedding().current_rows(idx).into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?
        };
        let back_counts: Vec<usize> = served_counts.iter().map(|c| c * dim).collect();
        let (got, _) = comm.all_to_all_f32(&values, &back_counts)?;
        let mut rows = vec![0f32; unique_rows.len() * dim];
        for (k, &i) in order.iter().enumerate() {
            rows[i * dim..(i + 1) * dim].copy_from_slice(&got[k * dim..(k + 1) * dim]);
        }
        Ok((rows, Self { order, send_counts, served, served_counts }))
    }

    /// Sends the gradients of the fetched rows (`[U × dim]`, in the order of the fetch) back to
    /// their owners; returns this rank's local rows that received gradients (ascending) and their
    /// gradients summed over the ranks that used them.
    pub fn return_gradients(self, comm: &dyn Collective, grads: &[f32], dim: usize) -> Result<(Vec<i64>, Vec<f32>)> {
        let mut send = Vec::with_capacity(grads.len());
        for &i in &self.order {
            send.extend_from_slice(&grads[i * dim..(i + 1) * dim]);
        }
        let counts: Vec<usize> = self.send_counts.iter().map(|c| c * dim).collect();
        let (got, got_counts) = comm.all_to_all_f32(&send, &counts)?;
        let expected: Vec<usize> = self.served_counts.iter().map(|c| c * dim).collect();
        ensure!(got_counts == expected, "row gradients came back in other counts than the rows went out");
        Ok(crate::dist::merge_rows(&self.served, &got, dim))
    }
}

/// Puts a row-sharded model back together on rank 0: every rank passes its model (the same
/// dense weights, its own rows); rank 0 gets the whole model, with global row r taken from row
/// r / N of rank r mod N; the others get `None`. Rank 0 needs memory for the whole table.
pub fn assemble_sharded(comm: &dyn Collective, model: Model, total_rows: usize, device: &Device) -> Result<Option<Model>> {
    let (dim, storage) = (model.embedding().dim(), model.embedding().storage());
    let mine = model.embedding().values_f32()?;
    let Some((all, counts)) = comm.gather_f32(0, &mine)? else { return Ok(None) };
    drop(mine);
    let n = comm.size();
    let mut starts = Vec::with_capacity(n);
    let mut at = 0;
    for c in &counts {
        starts.push(at);
        at += c;
    }
    ensure!(counts.iter().sum::<usize>() == total_rows * dim, "the shards hold {} values, the table {}", at, total_rows * dim);
    let mut full = vec![0f32; total_rows * dim];
    for r in 0..total_rows {
        let src = starts[r % n] + (r / n) * dim;
        full[r * dim..(r + 1) * dim].copy_from_slice(&all[src..src + dim]);
    }
    drop(all);
    let table = crate::model::SparseEmbedding::from_values(full, total_rows, dim, storage, device);
    Ok(Some(model.map_embedding(|_| table)))
}

/// CRC-32 of the values of every parameter that requires a gradient (the dense ones).
fn dense_digest(model: &Model) -> u32 {
    struct Digest(crc32fast::Hasher);
    impl ModuleVisitor for Digest {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0.update(param.val().into_data().as_bytes());
            }
        }
    }
    let mut d = Digest(crc32fast::Hasher::new());
    model.visit(&mut d);
    d.0.finalize()
}

/// Copies the dense gradients of `model` (parameters that require a gradient, in visiting order)
/// into one buffer; a parameter without a gradient on this rank (an empty share of the batch)
/// contributes zeros, so every rank's buffer has the same layout.
pub fn flatten(model: &Model, grads: Option<&GradientsParams>) -> Result<Vec<f32>> {
    struct Flatten<'a> {
        grads: Option<&'a GradientsParams>,
        buf: Vec<f32>,
        error: Option<String>,
    }
    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let n = param.shape().num_elements();
            match self.grads.and_then(|g| g.get::<D>(param.id)) {
                Some(g) => match g.into_data().convert::<f32>().try_into_vec::<f32>() {
                    Ok(v) if v.len() == n => self.buf.extend_from_slice(&v),
                    Ok(v) => self.error = Some(format!("gradient of {} values for a parameter of {n}", v.len())),
                    Err(e) => self.error = Some(format!("{e:?}")),
                },
                None => self.buf.resize(self.buf.len() + n, 0.0),
            }
        }
    }
    let mut f = Flatten { grads, buf: Vec::new(), error: None };
    model.visit(&mut f);
    match f.error {
        Some(e) => anyhow::bail!("flattening the dense gradients: {e}"),
        None => Ok(f.buf),
    }
}

/// The inverse of [`flatten`]: gradients of every parameter that requires one, from `buf`
/// multiplied by `scale`, on `device` (the non-autodiff device the optimizer works on).
pub fn unflatten(model: &Model, buf: &[f32], scale: f32, device: &Device) -> Result<GradientsParams> {
    struct Unflatten<'a> {
        buf: &'a [f32],
        at: usize,
        scale: f32,
        device: Device,
        grads: GradientsParams,
    }
    impl ModuleVisitor for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let shape = param.shape();
            let n = shape.num_elements();
            let end = (self.at + n).min(self.buf.len());
            let mut v: Vec<f32> = self.buf[self.at.min(end)..end].iter().map(|g| g * self.scale).collect();
            v.resize(n, 0.0); // only when the buffer is short, which the caller reports
            self.at += n;
            self.grads.register(param.id, Tensor::<D>::from_data(TensorData::new(v, shape), &self.device));
        }
    }
    let mut u = Unflatten { buf, at: 0, scale, device: device.clone(), grads: GradientsParams::new() };
    model.visit(&mut u);
    ensure!(u.at == buf.len(), "the all-reduced gradient buffer has {} values, the model's parameters {}", buf.len(), u.at);
    Ok(u.grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn flatten_then_unflatten_gives_the_gradients_back() {
        let device = crate::runtime::parse_device("cpu").unwrap();
        let ad = device.clone().autodiff();
        let cfg: ModelConfig = toml::from_str("name = \"dlrm\"\nembedding_dim = 4\ntop_mlp_units = [8]").unwrap();
        let shape = crate::model::DataShape { fields: 3, dense: 2, table_rows: 10 };
        let model = cfg.init(&shape, &ad);
        let empty = flatten(&model, None).unwrap();
        let (_, dense_params) = model.param_counts();
        assert_eq!(empty.len(), dense_params, "one value per dense parameter, the table excluded");
        assert!(empty.iter().all(|&v| v == 0.0));
        let ramp: Vec<f32> = (0..empty.len()).map(|i| i as f32).collect();
        let grads = unflatten(&model, &ramp, 0.5, &device).unwrap();
        let back = flatten(&model, Some(&grads)).unwrap();
        assert_eq!(back, ramp.iter().map(|v| v * 0.5).collect::<Vec<_>>());
        assert!(unflatten(&model, &ramp[1..], 1.0, &device).is_err(), "a short buffer is an error");
    }
}
