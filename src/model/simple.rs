//! Sanity baselines: logistic regression, factorization machine (Rendle 2010) and a plain DNN
//! over the concatenated field embeddings.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::Mlp;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, TableInit};

fn zero_bias(device: &Device) -> Param<Tensor<1>> {
    Param::from_tensor(Tensor::<1>::zeros([1], device))
}

/// Logistic regression: a learned weight per feature value (a 1-wide embedding row) plus a
/// linear map of the dense features.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LrConfig {
    pub embedding_init_std: f64,
}

impl Default for LrConfig {
    fn default() -> Self {
        Self { embedding_init_std: 0.0001 }
    }
}

#[derive(Module, Debug)]
pub struct Lr {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    pub bias: Param<Tensor<1>>,
}

impl ModelSpec for LrConfig {
    fn table_dim(&self) -> usize {
        1
    }
    fn validate(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        Model::Lr(Lr {
            embedding: SparseEmbedding::new_in(shape.table_rows, 1, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, NumericEmbedding::Mlp, &[], 1, 1, device),
            bias: zero_bias(device),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        2 * shape.dense as u64
    }
}

impl Lr {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x = cat_fields(sparse, dense_embeddings(&self.dense, &None, dense, 1, pass));
        let [b, n, _] = x.dims();
        x.reshape([b, n]).sum_dim(1).reshape([b]) + self.bias.val()
    }
}

/// Factorization machine: bias + Σ wᵢ + Σ_{i<j} ⟨vᵢ, vⱼ⟩, the pairwise term in O(n·d) as
/// ½ Σ_k ((Σᵢ v_ik)² − Σᵢ v_ik²). Each table row holds vᵢ (d values) and wᵢ (the last column).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FmConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for FmConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            dense_mlp: vec![],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

#[derive(Module, Debug)]
pub struct Fm {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    pub bias: Param<Tensor<1>>,
}

impl ModelSpec for FmConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim + 1
    }
    fn table_segments(&self) -> Vec<usize> {
        vec![self.embedding_dim, 1]
    }
    fn validate(&self) -> anyhow::Result<()> {
        check_common(self.embedding_dim, self.num_dense_embeddings, &[])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let w = self.table_dim();
        Model::Fm(Fm {
            embedding: SparseEmbedding::new_in(shape.table_rows, w, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, w, device),
            numeric: numeric_scale(shape, self.numeric_embedding, w, device),
            bias: zero_bias(device),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let n = num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) as u64;
        dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.table_dim())
            + 3 * n * self.embedding_dim as u64
    }
}

/// `bias + Σ w + ½ Σ_k ((Σᵢ v_ik)² − Σᵢ v_ik²)` of `[b, n, d + 1]` rows (w in the last column).
pub fn fm_logit(x: Tensor<3>) -> Tensor<1> {
    let [b, n, w] = x.dims();
    let d = w - 1;
    let first = x.clone().narrow(2, d, 1).reshape([b, n]).sum_dim(1).reshape([b]);
    let v = x.narrow(2, 0, d);
    let sum = v.clone().sum_dim(1).reshape([b, d]);
    let pairwise = (sum.clone() * sum - v.powi_scalar(2).sum_dim(1).reshape([b, d])).sum_dim(1).reshape([b]).mul_scalar(0.5);
    first + pairwise
}

impl Fm {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass));
        fm_logit(x) + self.bias.val()
    }
}

/// An MLP over the concatenated field embeddings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnnConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub hidden_units: Vec<usize>,
    pub dropout: f64,
    pub batch_norm: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for DnnConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            hidden_units: vec![400, 400, 400],
            dropout: 0.0,
            batch_norm: false,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

#[derive(Module, Debug)]
pub struct Dnn {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    pub mlp: Mlp,
}

impl ModelSpec for DnnConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim
    }
    fn validate(&self) -> anyhow::Result<()> {
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("dropout", self.dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let (d, n) = (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings));
        Model::Dnn(Dnn {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d, device),
            mlp: Mlp::with_batch_norm(n * d, &self.hidden_units, 1, self.dropout, self.batch_norm, device),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let (d, n) = (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings));
        dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d)
            + mlp_flops(n * d, &self.hidden_units, 1)
    }
}

/// `[b, n, d] → [b, n·d]`.
pub fn flatten(x: Tensor<3>) -> Tensor<2> {
    let [b, n, d] = x.dims();
    x.reshape([b, n * d])
}

impl Dnn {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass));
        let b = x.dims()[0];
        self.mlp.forward(flatten(x), pass).reshape([b])
    }
}
