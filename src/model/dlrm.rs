//! DLRM (Naumov et al., 2019): a bottom MLP turns the dense features into one embedding; the dot
//! interaction takes the inner product of every pair of embeddings (i < j); the top MLP reads
//! those products (and the dense embedding) and gives the logit. `interaction = "cat"` feeds the
//! concatenated embeddings instead.

use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::Mlp;
use super::simple::flatten;
use super::{DataShape, Model, ModelSpec, check_common, mlp_flops};
use super::{Pass, TableInit};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interaction {
    #[default]
    Dot,
    Cat,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DlrmConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub bottom_mlp_units: Vec<usize>,
    pub top_mlp_units: Vec<usize>,
    pub interaction: Interaction,
    pub dropout: f64,
    pub batch_norm: bool,
}

impl Default for DlrmConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            bottom_mlp_units: vec![64, 64, 64],
            top_mlp_units: vec![64, 64, 64],
            interaction: Interaction::Dot,
            dropout: 0.0,
            batch_norm: false,
        }
    }
}

#[derive(Module, Debug)]
pub struct Dlrm {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    pub top: Mlp,
    pub dot: bool,
}

impl DlrmConfig {
    fn n(&self, shape: &DataShape) -> usize {
        shape.fields + (shape.dense > 0) as usize
    }
    fn top_in(&self, shape: &DataShape) -> usize {
        let (n, d) = (self.n(shape), self.embedding_dim);
        match self.interaction {
            Interaction::Dot => n * (n - 1) / 2 + if shape.dense > 0 { d } else { 0 },
            Interaction::Cat => n * d,
        }
    }
}

impl ModelSpec for DlrmConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim
    }
    fn validate(&self) -> anyhow::Result<()> {
        check_common(self.embedding_dim, 1, &[("dropout", self.dropout)]) // one bottom-MLP embedding
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let d = self.embedding_dim;
        Model::Dlrm(Dlrm {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            dense: (shape.dense > 0).then(|| Mlp::with_batch_norm(shape.dense, &self.bottom_mlp_units, d, 0.0, self.batch_norm, device)),
            top: Mlp::with_batch_norm(self.top_in(shape), &self.top_mlp_units, 1, self.dropout, self.batch_norm, device),
            dot: self.interaction == Interaction::Dot,
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let (n, d) = (self.n(shape) as u64, self.embedding_dim as u64);
        let bottom = if shape.dense > 0 { mlp_flops(shape.dense, &self.bottom_mlp_units, self.embedding_dim) } else { 0 };
        let dots = if self.interaction == Interaction::Dot { 2 * n * n * d } else { 0 };
        bottom + dots + mlp_flops(self.top_in(shape), &self.top_mlp_units, 1)
    }
}

/// Positions `i·n + j` of the strictly upper triangle (i < j) of an `n × n` matrix.
pub fn upper_pairs(n: usize, device: &Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i * n + j) as i64)).collect();
    let len = idx.len();
    Tensor::<1, Int>::from_data(TensorData::new(idx, [len]), device)
}

impl Dlrm {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let bottom = match (&self.dense, dense) {
            (Some(mlp), Some(v)) => Some(relu(mlp.forward(v, pass))),
            _ => None,
        };
        let x = super::cat_fields(sparse, bottom.clone().map(|e| e.unsqueeze_dim::<3>(1)));
        let [b, n, _] = x.dims();
        let top_in = if self.dot {
            let pairs = upper_pairs(n, &x.device());
            let gram = x.clone().matmul(x.swap_dims(1, 2)).reshape([b, n * n]);
            let dots = gram.select(1, pairs);
            match bottom {
                Some(e) => Tensor::cat(vec![dots, e], 1),
                None => dots,
            }
        } else {
            flatten(x)
        };
        self.top.forward(top_in, pass).reshape([b])
    }
}
