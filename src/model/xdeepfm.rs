//! xDeepFM (Lian et al., KDD 2018): a Compressed Interaction Network (each layer: the outer
//! product of its input feature maps with the field embeddings along the field axes, compressed
//! by a 1×1 convolution, i.e. a linear map of the `H·m` products to `H'` maps; every layer's maps
//! are sum-pooled over the embedding dimension into the output), plus a DNN, plus a linear part
//! (the last column of each table row is the feature's first-order weight). Logits are added.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::{LinearCompress, Mlp};
use super::simple::flatten;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, TableInit};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct XDeepFmConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub cin_hidden_units: Vec<usize>,
    pub dnn_hidden_units: Vec<usize>,
    pub dropout: f64,
    pub batch_norm: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for XDeepFmConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            cin_hidden_units: vec![16, 16],
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
pub struct XDeepFm {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    pub cin: Vec<LinearCompress>,
    /// Absent with an empty CIN.
    pub cin_out: Option<Linear>,
    pub dnn: Option<Mlp>,
    pub bias: Param<Tensor<1>>,
}

impl ModelSpec for XDeepFmConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim + 1
    }
    fn table_segments(&self) -> Vec<usize> {
        vec![self.embedding_dim, 1]
    }
    fn validate(&self) -> anyhow::Result<()> {
        // An empty CIN is allowed (the interaction switch of the MovieLens 100K third pass,
        // RESULTS.md): the model is then the linear part plus the DNN.
        anyhow::ensure!(self.cin_hidden_units.iter().all(|&h| h > 0), "model.cin_hidden_units needs positive widths");
        anyhow::ensure!(
            !self.cin_hidden_units.is_empty() || !self.dnn_hidden_units.is_empty(),
            "model.cin_hidden_units = [] needs model.dnn_hidden_units (nothing would model interactions)"
        );
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("dropout", self.dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let (d, m) = (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings));
        let mut h = m;
        let cin = self
            .cin_hidden_units
            .iter()
            .map(|&next| {
                let layer = LinearCompress::new(h * m, next, device);
                h = next;
                layer
            })
            .collect();
        Model::XDeepFm(XDeepFm {
            embedding: SparseEmbedding::new_in(shape.table_rows, d + 1, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d + 1, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d + 1, device),
            cin,
            cin_out: (!self.cin_hidden_units.is_empty()).then(|| LinearConfig::new(self.cin_hidden_units.iter().sum(), 1).init(device)),
            dnn: (!self.dnn_hidden_units.is_empty())
                .then(|| Mlp::with_batch_norm(m * d, &self.dnn_hidden_units, 1, self.dropout, self.batch_norm, device)),
            bias: Param::from_tensor(Tensor::<1>::zeros([1], device)),
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let (d, m) = (self.embedding_dim as u64, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) as u64);
        let mut total = dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.table_dim());
        let mut h = m;
        for &next in &self.cin_hidden_units {
            total += h * m * d + 2 * h * m * next as u64 * d; // outer products, 1×1 convolution
            h = next as u64;
        }
        total += 2 * self.cin_hidden_units.iter().sum::<usize>() as u64;
        if !self.dnn_hidden_units.is_empty() {
            total += mlp_flops((m * d) as usize, &self.dnn_hidden_units, 1);
        }
        total
    }
}

impl XDeepFm {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass));
        let [b, m, w] = x.dims();
        let d = w - 1;
        let linear = x.clone().narrow(2, d, 1).reshape([b, m]).sum_dim(1).reshape([b]);
        let x0 = x.narrow(2, 0, d);
        let mut h = x0.clone();
        let mut pooled = Vec::with_capacity(self.cin.len());
        for layer in &self.cin {
            h = super::fused::cin(h, x0.clone(), layer.weight.val(), pass.precision); // [b, H', d]
            pooled.push(h.clone().sum_dim(2).reshape([b, h.dims()[1]]));
        }
        // the CIN's logit first: the order of the sums the model had before the CIN could be off
        let mut logit = match &self.cin_out {
            Some(cin_out) => super::layers::linear_f32(cin_out, Tensor::cat(pooled, 1)).reshape([b]) + linear + self.bias.val(),
            None => linear + self.bias.val(),
        };
        if let Some(dnn) = &self.dnn {
            logit = logit + dnn.forward(flatten(x0), pass).reshape([b]);
        }
        logit
    }
}
