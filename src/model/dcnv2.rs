//! DCN-V2 (Wang et al., WWW 2021): a cross network over the flattened embeddings, combined with a
//! DNN in parallel (logits added, i.e. one linear layer over both outputs), stacked (the DNN reads
//! the cross output) or alone. Full rank (`low_rank = 0`): `x_{l+1} = x₀ ⊙ (W x_l + b) + x_l`.
//! Low rank (`low_rank = r > 0`): the paper's mixture of low-rank experts (CrossNetMix, as the
//! authors' and FuxiCTR's code): `x_{l+1} = Σ_e softmax(G x_l)_e · x₀ ⊙ (U_e tanh(C_e tanh(V_eᵀ
//! x_l)) + b) + x_l` with `num_experts` experts.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{softmax, tanh};
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::Mlp;
use super::simple::flatten;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, TableInit};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    #[default]
    Parallel,
    Stacked,
    CrossnetOnly,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Dcnv2Config {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub model_structure: Structure,
    pub num_cross_layers: usize,
    /// 0 = full-rank cross weights, r > 0 = a mixture of `num_experts` rank-r experts.
    pub low_rank: usize,
    /// Experts of the low-rank mixture.
    pub num_experts: usize,
    pub dnn_hidden_units: Vec<usize>,
    pub dropout: f64,
    pub batch_norm: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for Dcnv2Config {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            model_structure: Structure::Parallel,
            num_cross_layers: 3,
            low_rank: 0,
            num_experts: 4,
            dnn_hidden_units: vec![400, 400, 400],
            dropout: 0.0,
            batch_norm: false,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

/// One full-rank cross layer: `x₀ ⊙ (W x + b) + x`.
#[derive(Module, Debug)]
pub struct CrossLayer {
    pub u: Linear,
}

impl CrossLayer {
    pub fn forward(&self, x0: Tensor<2>, x: Tensor<2>) -> Tensor<2> {
        x0 * super::layers::linear_f32(&self.u, x.clone()) + x
    }
}

/// One layer of the mixture of low-rank experts. With `E` experts of rank `r` over width `D`:
/// `v` `[D, E·r]` (expert e's Vₑ in columns e·r…), `c` `[E, r, r]` and `u` `[E, r, D]` act on
/// row vectors (`h ↦ h cₑ`, `h ↦ h uₑ`), `gate` `[D, E]` (no bias), `bias` `[D]`.
#[derive(Module, Debug)]
pub struct CrossMixLayer {
    pub v: Param<Tensor<2>>,
    pub c: Param<Tensor<3>>,
    pub u: Param<Tensor<3>>,
    pub gate: Linear,
    pub bias: Param<Tensor<1>>,
}

impl CrossMixLayer {
    fn new(dim: usize, rank: usize, experts: usize, device: &Device) -> Self {
        // Glorot-normal per expert matrix (fan-in + fan-out of that matrix)
        let normal = |fan: usize| Distribution::Normal(0.0, (2.0 / fan as f64).sqrt());
        Self {
            v: Param::from_tensor(Tensor::<2>::random([dim, experts * rank], normal(dim + rank), device)),
            c: Param::from_tensor(Tensor::<3>::random([experts, rank, rank], normal(2 * rank), device)),
            u: Param::from_tensor(Tensor::<3>::random([experts, rank, dim], normal(dim + rank), device)),
            gate: LinearConfig::new(dim, experts).with_bias(false).init(device),
            bias: Param::from_tensor(Tensor::<1>::zeros([dim], device)),
        }
    }

    fn flops(dim: u64, rank: u64, experts: u64) -> u64 {
        2 * dim * experts + experts * 2 * (dim * rank + rank * rank + rank * dim)
    }

    pub fn forward(&self, x0: Tensor<2>, x: Tensor<2>) -> Tensor<2> {
        let [b, dim] = x.dims();
        let [e, r, _] = self.c.dims();
        let gates = softmax(super::layers::linear_f32(&self.gate, x.clone()), 1); // [b, E]
        let h = tanh(super::fused::matmul(x.clone(), self.v.val())).reshape([b, e, r]).swap_dims(0, 1); // [E, b, r]
        let h = tanh(h.matmul(self.c.val())); // [E, b, r]
        let experts = (h.matmul(self.u.val()) + self.bias.val().reshape([1, 1, dim])) * x0.unsqueeze_dim::<3>(0); // [E, b, D]
        let mixed = (experts * gates.swap_dims(0, 1).reshape([e, b, 1])).sum_dim(0).reshape([b, dim]);
        mixed + x
    }
}

#[derive(Module, Debug)]
pub struct Dcnv2 {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    /// Full-rank cross layers (empty in low-rank mode).
    pub cross: Vec<CrossLayer>,
    /// Mixture-of-experts cross layers (empty in full-rank mode).
    pub cross_mix: Vec<CrossMixLayer>,
    /// Parallel: the cross output's own linear logit; crossnet only: the output layer.
    pub cross_out: Option<Linear>,
    /// The DNN (its output layer gives a logit): reads x₀ (parallel) or the cross output (stacked).
    pub dnn: Option<Mlp>,
}

impl ModelSpec for Dcnv2Config {
    fn table_dim(&self) -> usize {
        self.embedding_dim
    }
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.low_rank == 0 || self.num_experts > 0, "model.num_experts must be positive with low_rank > 0");
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("dropout", self.dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let d = self.embedding_dim;
        let dim = num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) * d;
        let with_dnn = self.model_structure != Structure::CrossnetOnly;
        Model::Dcnv2(Dcnv2 {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d, device),
            cross: (0..if self.low_rank == 0 { self.num_cross_layers } else { 0 })
                .map(|_| CrossLayer { u: LinearConfig::new(dim, dim).init(device) })
                .collect(),
            cross_mix: (0..if self.low_rank > 0 { self.num_cross_layers } else { 0 })
                .map(|_| CrossMixLayer::new(dim, self.low_rank, self.num_experts, device))
                .collect(),
            cross_out: (self.model_structure != Structure::Stacked).then(|| LinearConfig::new(dim, 1).init(device)),
            dnn: with_dnn.then(|| Mlp::with_batch_norm(dim, &self.dnn_hidden_units, 1, self.dropout, self.batch_norm, device)),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let dim = (num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) * self.embedding_dim) as u64;
        let per_cross =
            if self.low_rank == 0 { 2 * dim * dim } else { CrossMixLayer::flops(dim, self.low_rank as u64, self.num_experts as u64) };
        let dnn = if self.model_structure == Structure::CrossnetOnly { 0 } else { mlp_flops(dim as usize, &self.dnn_hidden_units, 1) };
        let out = if self.model_structure == Structure::Stacked { 0 } else { 2 * dim };
        dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.embedding_dim)
            + self.num_cross_layers as u64 * per_cross
            + dnn
            + out
    }
}

impl Dcnv2 {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x0 = flatten(cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass)));
        let b = x0.dims()[0];
        let mut x = x0.clone();
        for layer in &self.cross {
            x = layer.forward(x0.clone(), x);
        }
        for layer in &self.cross_mix {
            x = layer.forward(x0.clone(), x);
        }
        let logit = match (&self.cross_out, &self.dnn) {
            (Some(out), Some(dnn)) => super::layers::linear_f32(out, x) + dnn.forward(x0, pass), // parallel
            (None, Some(dnn)) => dnn.forward(x, pass),                                           // stacked
            (Some(out), None) => super::layers::linear_f32(out, x),                              // cross network only
            (None, None) => unreachable!("built with a cross output or a DNN"),
        };
        logit.reshape([b])
    }
}
