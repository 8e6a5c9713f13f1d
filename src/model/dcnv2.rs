//! DCN-V2 (Wang et al., WWW 2021): a cross network `x_{l+1} = x₀ ⊙ (W x_l + b) + x_l` over the
//! flattened embeddings, full-rank W or low-rank `W = U V` (`low_rank > 0`), combined with a DNN
//! in parallel (logits added, i.e. one linear layer over both outputs), stacked (the DNN reads
//! the cross output) or alone.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::Mlp;
use super::simple::flatten;
use super::{DataShape, Model, ModelSpec, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops, num_inputs};
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
    /// 0 = full-rank cross weights, r > 0 = `U V` with inner rank r.
    pub low_rank: usize,
    pub dnn_hidden_units: Vec<usize>,
    pub dropout: f64,
    pub batch_norm: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
}

impl Default for Dcnv2Config {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            model_structure: Structure::Parallel,
            num_cross_layers: 3,
            low_rank: 0,
            dnn_hidden_units: vec![400, 400, 400],
            dropout: 0.0,
            batch_norm: false,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
        }
    }
}

/// One cross layer: full `W` (`v` absent) or `U(V x)`.
#[derive(Module, Debug)]
pub struct CrossLayer {
    pub v: Option<Linear>,
    pub u: Linear,
}

impl CrossLayer {
    fn new(dim: usize, rank: usize, device: &Device) -> Self {
        if rank == 0 {
            Self { v: None, u: LinearConfig::new(dim, dim).init(device) }
        } else {
            Self { v: Some(LinearConfig::new(dim, rank).with_bias(false).init(device)), u: LinearConfig::new(rank, dim).init(device) }
        }
    }

    pub fn forward(&self, x0: Tensor<2>, x: Tensor<2>) -> Tensor<2> {
        let h = match &self.v {
            Some(v) => self.u.forward(v.forward(x.clone())),
            None => self.u.forward(x.clone()),
        };
        x0 * h + x
    }
}

#[derive(Module, Debug)]
pub struct Dcnv2 {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    pub cross: Vec<CrossLayer>,
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
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("dropout", self.dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let d = self.embedding_dim;
        let dim = num_inputs(shape, self.num_dense_embeddings) * d;
        let with_dnn = self.model_structure != Structure::CrossnetOnly;
        Model::Dcnv2(Dcnv2 {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, &self.dense_mlp, self.num_dense_embeddings, d, device),
            cross: (0..self.num_cross_layers).map(|_| CrossLayer::new(dim, self.low_rank, device)).collect(),
            cross_out: (self.model_structure != Structure::Stacked).then(|| LinearConfig::new(dim, 1).init(device)),
            dnn: with_dnn.then(|| Mlp::with_batch_norm(dim, &self.dnn_hidden_units, 1, self.dropout, self.batch_norm, device)),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let dim = (num_inputs(shape, self.num_dense_embeddings) * self.embedding_dim) as u64;
        let per_cross = if self.low_rank == 0 { 2 * dim * dim } else { 4 * dim * self.low_rank as u64 };
        let dnn = if self.model_structure == Structure::CrossnetOnly { 0 } else { mlp_flops(dim as usize, &self.dnn_hidden_units, 1) };
        let out = if self.model_structure == Structure::Stacked { 0 } else { 2 * dim };
        dense_mlp_flops(shape, &self.dense_mlp, self.num_dense_embeddings, self.embedding_dim)
            + self.num_cross_layers as u64 * per_cross
            + dnn
            + out
    }
}

impl Dcnv2 {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x0 = flatten(cat_fields(sparse, dense_embeddings(&self.dense, dense, self.embedding.dim(), pass)));
        let b = x0.dims()[0];
        let mut x = x0.clone();
        for layer in &self.cross {
            x = layer.forward(x0.clone(), x);
        }
        let logit = match (&self.cross_out, &self.dnn) {
            (Some(out), Some(dnn)) => out.forward(x) + dnn.forward(x0, pass), // parallel
            (None, Some(dnn)) => dnn.forward(x, pass),                        // stacked
            (Some(out), None) => out.forward(x),                              // cross network only
            (None, None) => unreachable!("built with a cross output or a DNN"),
        };
        logit.reshape([b])
    }
}
