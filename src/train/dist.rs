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
use burn::tensor::{Device, Tensor, TensorData};

use crate::dist::{Comm, EmbeddingMode};
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
        let digest = crate::train::checkpoint::weights_digest(model)?;
        let mine = i64::from(crc32fast::hash(digest.as_bytes()));
        let (all, _) = self.comm.all_gather_i64(&[mine])?;
        let differing: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
        ensure!(
            differing.is_empty(),
            "replicas diverged at step {step}: the weights of rank(s) {differing:?} differ from rank 0's (weight checksums {all:?})"
        );
        Ok(())
    }
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
