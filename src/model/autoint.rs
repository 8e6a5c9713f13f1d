//! AutoInt+ (Song et al., CIKM 2019), as FuxiCTR builds it: stacked multi-head self-attention
//! over the field embeddings (each layer: heads of dropout(softmax(Q Kᵀ)) V, concatenated, plus
//! the residual — projected only when the width changes — then LayerNorm, then ReLU), flattened
//! into a logit, plus a DNN over the embeddings whose logit is added ("+").

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::{Dropout, Mlp};
use super::simple::flatten;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, TableInit};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AutoIntConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub attention_layers: usize,
    pub num_heads: usize,
    /// Width of each layer's output per field (all heads together).
    pub attention_dim: usize,
    pub use_residual: bool,
    /// Divide scores by √(head width).
    pub use_scale: bool,
    pub layer_norm: bool,
    /// The "+" DNN (empty = plain AutoInt).
    pub dnn_hidden_units: Vec<usize>,
    /// Dropout on the attention weights and in the DNN's hidden layers.
    pub dropout: f64,
    pub batch_norm: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for AutoIntConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            attention_layers: 2,
            num_heads: 2,
            attention_dim: 40,
            use_residual: true,
            use_scale: false,
            layer_norm: false,
            dnn_hidden_units: vec![400, 400, 400],
            dropout: 0.0,
            batch_norm: false,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub residual: Option<Linear>,
    pub norm: Option<LayerNorm>,
    pub dropout: Dropout,
    pub heads: usize,
    pub scale: bool,
    /// Identity residual (the width does not change and `use_residual`).
    pub identity: bool,
}

impl SelfAttention {
    fn new(d_in: usize, c: &AutoIntConfig, device: &Device) -> Self {
        let lin = || LinearConfig::new(d_in, c.attention_dim).with_bias(false).init(device);
        let project = c.use_residual && d_in != c.attention_dim;
        Self {
            query: lin(),
            key: lin(),
            value: lin(),
            residual: project.then(lin),
            norm: c.layer_norm.then(|| LayerNormConfig::new(c.attention_dim).init(device)),
            dropout: Dropout::new(c.dropout),
            heads: c.num_heads,
            scale: c.use_scale,
            identity: c.use_residual && !project,
        }
    }

    /// `[b, n, d_in] → [b, n, attention_dim]`.
    pub fn forward(&self, x: Tensor<3>, pass: &Pass) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let split = |t: Tensor<3>| {
            let a = t.dims()[2];
            t.reshape([b, n, self.heads, a / self.heads]).swap_dims(1, 2) // [b, h, n, a/h]
        };
        let (q, k, v) = (
            split(super::layers::linear_f32(&self.query, x.clone())),
            split(super::layers::linear_f32(&self.key, x.clone())),
            split(super::layers::linear_f32(&self.value, x.clone())),
        );
        let dk = q.dims()[3];
        let mut scores = q.matmul(k.swap_dims(2, 3));
        if self.scale {
            scores = scores.div_scalar((dk as f64).sqrt());
        }
        let weights = self.dropout.forward(softmax(scores, 3), pass);
        let out = weights.matmul(v).swap_dims(1, 2).reshape([b, n, self.heads * dk]);
        let out = match &self.residual {
            Some(r) => out + super::layers::linear_f32(r, x),
            None if self.identity => out + x,
            None => out,
        };
        relu(match &self.norm {
            Some(ln) => super::fused::layer_norm(ln, out),
            None => out,
        })
    }
}

#[derive(Module, Debug)]
pub struct AutoInt {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    pub attention: Vec<SelfAttention>,
    pub attention_out: Linear,
    pub dnn: Option<Mlp>,
}

impl ModelSpec for AutoIntConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim
    }
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.num_heads > 0 && self.attention_dim > 0 && self.attention_dim.is_multiple_of(self.num_heads),
            "model.attention_dim = {} must be a positive multiple of model.num_heads = {}",
            self.attention_dim,
            self.num_heads
        );
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("dropout", self.dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let (d, n) = (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings));
        let attention =
            (0..self.attention_layers).map(|i| SelfAttention::new(if i == 0 { d } else { self.attention_dim }, self, device)).collect();
        let width = if self.attention_layers == 0 { d } else { self.attention_dim };
        Model::AutoInt(AutoInt {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d, device),
            attention,
            attention_out: LinearConfig::new(n * width, 1).init(device),
            dnn: (!self.dnn_hidden_units.is_empty())
                .then(|| Mlp::with_batch_norm(n * d, &self.dnn_hidden_units, 1, self.dropout, self.batch_norm, device)),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let (d, n, a) = (
            self.embedding_dim as u64,
            num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) as u64,
            self.attention_dim as u64,
        );
        let mut total = dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.embedding_dim);
        let mut d_in = d;
        for _ in 0..self.attention_layers {
            let projections = if self.use_residual && d_in != a { 4 } else { 3 };
            total += projections * 2 * n * d_in * a + 2 * 2 * n * n * a; // Q,K,V(,res); QKᵀ and ·V
            d_in = a;
        }
        total += 2 * n * d_in;
        if !self.dnn_hidden_units.is_empty() {
            total += mlp_flops((n * d) as usize, &self.dnn_hidden_units, 1);
        }
        total
    }
}

impl AutoInt {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x0 = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass));
        let b = x0.dims()[0];
        let mut x = x0.clone();
        for layer in &self.attention {
            x = layer.forward(x, pass);
        }
        let mut logit = super::layers::linear_f32(&self.attention_out, flatten(x));
        if let Some(dnn) = &self.dnn {
            logit = logit + dnn.forward(flatten(x0), pass);
        }
        logit.reshape([b])
    }
}
