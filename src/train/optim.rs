//! Optimizers beyond burn's for the embedding rows (row-wise Adagrad, lazy Adam), and the
//! gradient norm of burn's path (see `adam.rs` for the dense Adam and clipping).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

use crate::model::SparseEmbedding;

/// Row-wise Adagrad (one accumulator per row, as in DLRM/TorchRec): for each touched row r with
/// gradient g_r ∈ R^d, `A_r += mean(g_r²)`, `w_r -= lr · g_r / (√A_r + ε)`. Only the rows a
/// batch touched are read or written; the table is updated in place.
///
/// A row may pack several embeddings (FM's vector and first-order weight, AFN+'s two halves):
/// then each segment of the row has its own accumulator, so a large gradient in one part does
/// not shrink the steps of the other.
pub struct RowWiseAdagrad {
    accumulator: Option<Tensor<2>>,
    /// `[d, S]`: column j → 1/width of its segment (averages g² per segment); None for one segment.
    to_segments: Option<Tensor<2>>,
    /// `[S, d]`: segment → its columns (spreads the per-segment scale back).
    from_segments: Option<Tensor<2>>,
    pub epsilon: f64,
    pub l2: f64,
}

impl RowWiseAdagrad {
    pub fn new(rows: usize, initial_accumulator: f64, epsilon: f64, l2: f64, device: &Device) -> Self {
        Self::with_segments(rows, &[1], initial_accumulator, epsilon, l2, device)
    }

    /// `segments`: the widths of the parts of a row that get their own accumulator.
    pub fn with_segments(rows: usize, segments: &[usize], initial_accumulator: f64, epsilon: f64, l2: f64, device: &Device) -> Self {
        let dev = device.clone().inner();
        let acc = Tensor::<2>::full([rows, segments.len()], initial_accumulator, &dev);
        let (to, from) = if segments.len() > 1 {
            let d: usize = segments.iter().sum();
            let s = segments.len();
            let (mut to, mut from) = (vec![0.0f32; d * s], vec![0.0f32; s * d]);
            let mut j0 = 0;
            for (k, &w) in segments.iter().enumerate() {
                for j in j0..j0 + w {
                    to[j * s + k] = 1.0 / w as f32;
                    from[k * d + j] = 1.0;
                }
                j0 += w;
            }
            let t = |v: Vec<f32>, shape: [usize; 2]| Tensor::<2>::from_data(burn::tensor::TensorData::new(v, shape), &dev);
            (Some(t(to, [d, s])), Some(t(from, [s, d])))
        } else {
            (None, None)
        };
        Self { accumulator: Some(acc), to_segments: to, from_segments: from, epsilon, l2 }
    }

    /// `[rows, segments]`.
    pub fn accumulator(&self) -> &Tensor<2> {
        self.accumulator.as_ref().expect("accumulator present between steps")
    }

    /// Applies one update. `rows` are the current values of the touched rows (`[U, d]`, used by
    /// L2), `grad` their gradient, `unique_rows` their (distinct) indices.
    pub fn step(
        &mut self,
        table: SparseEmbedding,
        unique_rows: Tensor<1, Int>,
        rows: Tensor<2>,
        grad: Tensor<2>,
        lr: f64,
    ) -> SparseEmbedding {
        let rows = rows.inner();
        let grad = if self.l2 > 0.0 { grad + rows.clone().mul_scalar(self.l2) } else { grad };
        let g2 = match &self.to_segments {
            Some(m) => grad.clone().powi_scalar(2).matmul(m.clone()),
            None => grad.clone().powi_scalar(2).mean_dim(1),
        };
        let acc = self.accumulator.take().expect("accumulator present between steps");
        let acc = acc.select_assign(0, unique_rows.clone(), g2, IndexingUpdateOp::Add);
        let acc_rows = acc.clone().select(0, unique_rows.clone());
        self.accumulator = Some(acc);
        let scale = acc_rows.sqrt().add_scalar(self.epsilon).recip().mul_scalar(-lr); // [U, S]
        let scale = match &self.from_segments {
            Some(m) => scale.matmul(m.clone()),
            None => scale,
        };
        table.add_rows(unique_rows, rows, grad * scale)
    }
}

/// Lazy Adam over embedding rows (PyTorch's `SparseAdam`, TensorFlow's `LazyAdam`): per-value
/// first and second moments, updated only for the rows a batch touched; bias correction uses
/// the global step count. Its state is two table-sized f32 tensors (row-wise Adagrad's is one
/// value per row); unlike Adagrad's accumulator it forgets old gradients. It is the optimizer the
/// BARS/FuxiCTR baseline settings were tuned with (there applied densely).
pub struct SparseAdam {
    moments: Option<(Tensor<2>, Tensor<2>)>,
    step: i32,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub l2: f64,
}

impl SparseAdam {
    pub fn new(rows: usize, dim: usize, beta1: f64, beta2: f64, epsilon: f64, l2: f64, device: &Device) -> Self {
        let dev = device.clone().inner();
        let zeros = || Tensor::<2>::zeros([rows, dim], &dev);
        Self { moments: Some((zeros(), zeros())), step: 0, beta1, beta2, epsilon, l2 }
    }

    /// `[rows, d]` first and second moments.
    pub fn moments(&self) -> &(Tensor<2>, Tensor<2>) {
        self.moments.as_ref().expect("moments present between steps")
    }

    /// Same contract as [`RowWiseAdagrad::step`].
    pub fn step(
        &mut self,
        table: SparseEmbedding,
        unique_rows: Tensor<1, Int>,
        rows: Tensor<2>,
        grad: Tensor<2>,
        lr: f64,
    ) -> SparseEmbedding {
        self.step += 1;
        let rows = rows.inner();
        let grad = if self.l2 > 0.0 { grad + rows.clone().mul_scalar(self.l2) } else { grad };
        let (m, v) = self.moments.take().expect("moments present between steps");
        let m_rows = m.clone().select(0, unique_rows.clone()).mul_scalar(self.beta1) + grad.clone().mul_scalar(1.0 - self.beta1);
        let v_rows = v.clone().select(0, unique_rows.clone()).mul_scalar(self.beta2) + grad.powi_scalar(2).mul_scalar(1.0 - self.beta2);
        let m = m.select_assign(0, unique_rows.clone(), m_rows.clone(), IndexingUpdateOp::Assign);
        let v = v.select_assign(0, unique_rows.clone(), v_rows.clone(), IndexingUpdateOp::Assign);
        self.moments = Some((m, v));
        let step_size = lr * (1.0 - self.beta2.powi(self.step)).sqrt() / (1.0 - self.beta1.powi(self.step));
        let delta = m_rows.div(v_rows.sqrt().add_scalar(self.epsilon)).mul_scalar(-step_size);
        table.add_rows(unique_rows, rows, delta)
    }
}

pub use crate::config::EmbOptimizerKind;

// One per run: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum SparseOptimizer {
    RowWiseAdagrad(RowWiseAdagrad),
    Adam(SparseAdam),
}

impl SparseOptimizer {
    pub fn new(t: &crate::config::TrainConfig, rows: usize, segments: &[usize], device: &Device) -> Self {
        match t.emb_optimizer {
            EmbOptimizerKind::RowwiseAdagrad => Self::RowWiseAdagrad(RowWiseAdagrad::with_segments(
                rows,
                segments,
                t.emb_initial_accumulator,
                t.emb_epsilon,
                t.emb_l2,
                device,
            )),
            EmbOptimizerKind::Adam => {
                Self::Adam(SparseAdam::new(rows, segments.iter().sum(), t.adam_beta1, t.adam_beta2, t.emb_epsilon, t.emb_l2, device))
            }
        }
    }

    pub fn step(
        &mut self,
        table: SparseEmbedding,
        unique_rows: Tensor<1, Int>,
        rows: Tensor<2>,
        grad: Tensor<2>,
        lr: f64,
    ) -> SparseEmbedding {
        match self {
            Self::RowWiseAdagrad(o) => o.step(table, unique_rows, rows, grad, lr),
            Self::Adam(o) => o.step(table, unique_rows, rows, grad, lr),
        }
    }

    /// The optimizer's state for a checkpoint: a small JSON description and the raw f32 values
    /// (little-endian) of its tensors, in order.
    pub fn save_state(&self) -> anyhow::Result<(serde_json::Value, Vec<u8>)> {
        let mut bytes = Vec::new();
        let meta = match self {
            Self::RowWiseAdagrad(o) => {
                let shape = put_f32(o.accumulator(), &mut bytes)?;
                serde_json::json!({ "kind": "rowwise_adagrad", "shapes": [shape] })
            }
            Self::Adam(o) => {
                let (m, v) = o.moments();
                let shapes = [put_f32(m, &mut bytes)?, put_f32(v, &mut bytes)?];
                serde_json::json!({ "kind": "adam", "shapes": shapes, "step": o.step })
            }
        };
        Ok((meta, bytes))
    }

    /// Restores [`Self::save_state`]'s output into an optimizer built for the same table.
    pub fn load_state(&mut self, meta: &serde_json::Value, bytes: &[u8]) -> anyhow::Result<()> {
        let shapes: Vec<[usize; 2]> = serde_json::from_value(meta["shapes"].clone())?;
        let kind = meta["kind"].as_str().unwrap_or("");
        let mut at = 0;
        let mut take = |like: &Tensor<2>, i: usize| -> anyhow::Result<Tensor<2>> {
            let shape = *shapes.get(i).ok_or_else(|| anyhow::anyhow!("embedding optimizer state: tensor {i} missing"))?;
            anyhow::ensure!(shape == like.dims(), "embedding optimizer state has shape {shape:?}, the table needs {:?}", like.dims());
            let n = 4 * shape[0] * shape[1];
            anyhow::ensure!(at + n <= bytes.len(), "embedding optimizer state is truncated");
            let values: Vec<f32> = bytes[at..at + n].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            at += n;
            Ok(Tensor::<2>::from_data(burn::tensor::TensorData::new(values, shape), &like.device()))
        };
        match self {
            Self::RowWiseAdagrad(o) => {
                anyhow::ensure!(
                    kind == "rowwise_adagrad",
                    "the checkpoint's embedding optimizer is {kind:?}, the config's is rowwise_adagrad"
                );
                let acc = take(o.accumulator(), 0)?;
                o.accumulator = Some(acc);
            }
            Self::Adam(o) => {
                anyhow::ensure!(kind == "adam", "the checkpoint's embedding optimizer is {kind:?}, the config's is adam");
                let (m, v) = o.moments();
                let (m, v) = (take(m, 0)?, take(v, 1)?);
                o.moments = Some((m, v));
                o.step = meta["step"].as_i64().ok_or_else(|| anyhow::anyhow!("embedding optimizer state: no step"))? as i32;
            }
        }
        Ok(())
    }
}

/// Appends a tensor's values as f32 little-endian; returns its shape.
fn put_f32(t: &Tensor<2>, out: &mut Vec<u8>) -> anyhow::Result<[usize; 2]> {
    let values = t.clone().into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(t.dims())
}

/// Sums the squared dense gradients of a module.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// Multiplies every gradient of a module by `factor`.
pub(crate) struct Scale<'a> {
    pub grads: &'a mut GradientsParams,
    pub factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Global L2 norm of the module's gradients.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut v = SquaredNorm { grads, total: None };
    module.visit(&mut v);
    v.total.map(|t| t.into_scalar::<f32>() as f64).unwrap_or(0.0).sqrt()
}
