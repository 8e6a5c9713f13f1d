//! Weight averaging (`train.average_from_epoch`): a running mean of the model's weights over the
//! evaluations from the end of a given epoch on — stochastic weight averaging (Izmailov et al.,
//! 2018) taken at evaluation points. Training goes on from the raw weights; what is evaluated,
//! selected and saved as the best weights is the mean. Every float parameter takes part, the
//! embedding table included (a half-precision table is averaged in f32 and rounded back when the
//! averaged model is built), so the mean costs one f32 copy of the whole model in memory and in
//! each checkpoint.

use anyhow::{Result, ensure};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor, TensorData};

use crate::model::Model;

/// The running mean of the weights seen so far (every float parameter in visiting order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightAverage {
    mean: Vec<f32>,
    count: u64,
}

impl WeightAverage {
    /// How many snapshots the mean holds.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Folds `model`'s present weights into the mean (incremental: mean += (w − mean) / n).
    pub fn add(&mut self, model: &Model) -> Result<()> {
        let w = flatten(model)?;
        if self.count == 0 {
            self.mean = w;
        } else {
            ensure!(w.len() == self.mean.len(), "the model has {} weights, the running mean {}", w.len(), self.mean.len());
            let n = (self.count + 1) as f32;
            for (m, x) in self.mean.iter_mut().zip(&w) {
                *m += (x - *m) / n;
            }
        }
        self.count += 1;
        Ok(())
    }

    /// `model` with its weights replaced by the mean (same parameter ids, shapes and dtypes).
    pub fn apply(&self, model: Model) -> Result<Model> {
        ensure!(self.count > 0, "the weight average holds no snapshot yet");
        let mut m = Assign { values: &self.mean, at: 0 };
        let out = model.map(&mut m);
        ensure!(m.at == self.mean.len(), "the running mean has {} weights, the model {}", self.mean.len(), m.at);
        Ok(out)
    }

    /// Checkpoint bytes: the count (u64 LE) and the mean (f32 LE).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 4 * self.mean.len());
        b.extend_from_slice(&self.count.to_le_bytes());
        for v in &self.mean {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        ensure!(b.len() >= 8 && (b.len() - 8).is_multiple_of(4), "a weight-average section of {} bytes", b.len());
        let count = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let mean = b[8..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(Self { mean, count })
    }
}

/// Every float parameter's values in f32, in visiting order.
fn flatten(model: &Model) -> Result<Vec<f32>> {
    struct Flatten {
        buf: Vec<f32>,
        error: Option<String>,
    }
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            match param.val().into_data().convert::<f32>().try_into_vec::<f32>() {
                Ok(v) => self.buf.extend_from_slice(&v),
                Err(e) => self.error = Some(format!("{e:?}")),
            }
        }
    }
    let mut f = Flatten { buf: Vec::new(), error: None };
    model.visit(&mut f);
    match f.error {
        Some(e) => anyhow::bail!("reading the weights to average: {e}"),
        None => Ok(f.buf),
    }
}

/// Writes consecutive slices of `values` into the parameters, in visiting order.
struct Assign<'a> {
    values: &'a [f32],
    at: usize,
}

impl ModuleMapper for Assign<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        if self.at + n > self.values.len() {
            self.at += n; // reported by `apply`
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let (dtype, require_grad, device) = (tensor.dtype(), tensor.is_require_grad(), tensor.device());
        let data = TensorData::new(self.values[self.at..self.at + n].to_vec(), shape);
        self.at += n;
        let mut t = Tensor::<D>::from_data(data, &device);
        if dtype != DType::F32 {
            t = t.cast(dtype);
        }
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DataShape, ModelConfig, TableStorage};

    fn model(seed: u64, storage: TableStorage) -> Model {
        let device = crate::runtime::parse_device("cpu").unwrap();
        device.seed(seed);
        let cfg: ModelConfig = toml::from_str(
            "name = \"wukong\"\nembedding_dim = 4\nnum_layers = 1\nnum_fmb = 2\nnum_lcb = 2\nfm_rank = 2\nfmb_mlp = [8]\ntop_mlp = [8]",
        )
        .unwrap();
        cfg.init_with_storage(&DataShape { fields: 3, dense: 0, table_rows: 10 }, storage, &device)
    }

    #[test]
    fn the_average_of_snapshots_is_their_elementwise_mean_table_included() {
        for storage in [TableStorage::F32, TableStorage::F16] {
            let models = [model(1, storage), model(2, storage), model(3, storage)];
            let weights: Vec<Vec<f32>> = models.iter().map(|m| flatten(m).unwrap()).collect();
            assert_ne!(weights[0], weights[1], "different seeds give different weights");
            let mut avg = WeightAverage::default();
            for m in &models {
                avg.add(m).unwrap();
            }
            assert_eq!(avg.count(), 3);
            let averaged = avg.apply(models[0].clone()).unwrap();
            let got = flatten(&averaged).unwrap();
            let tol = if storage == TableStorage::F32 { 1e-6 } else { 2e-3 };
            for (i, g) in got.iter().enumerate() {
                let want = (weights[0][i] + weights[1][i] + weights[2][i]) / 3.0;
                assert!((g - want).abs() <= tol * want.abs().max(1.0), "{storage:?} weight {i}: {g} vs the mean {want}");
            }
            // the table keeps its storage and the model its parameter ids (the optimizer's keys)
            assert_eq!(averaged.embedding().storage(), storage);
            assert_eq!(averaged.embedding().rows(), 10);
            assert_eq!(got.len(), weights[0].len());
            let back = WeightAverage::from_bytes(&avg.to_bytes()).unwrap();
            assert_eq!(back, avg, "checkpoint bytes round-trip");
        }
    }

    #[test]
    fn one_snapshot_is_the_model_itself_and_a_mismatch_is_an_error() {
        let m = model(7, TableStorage::F32);
        let mut avg = WeightAverage::default();
        assert!(avg.apply(m.clone()).is_err(), "no snapshot yet");
        avg.add(&m).unwrap();
        assert_eq!(flatten(&avg.apply(m.clone()).unwrap()).unwrap(), flatten(&m).unwrap());
        let device = crate::runtime::parse_device("cpu").unwrap();
        let other: ModelConfig = toml::from_str("name = \"dlrm\"\nembedding_dim = 4\ntop_mlp_units = [8]").unwrap();
        let other = other.init(&DataShape { fields: 3, dense: 0, table_rows: 10 }, &device);
        assert!(avg.add(&other).is_err() || avg.apply(other).is_err(), "another model's weights do not fit");
        assert!(WeightAverage::from_bytes(&[1, 2, 3]).is_err());
    }
}
