//! AFN+ (Cheng et al., AAAI 2020): a logarithmic transformation layer learns arbitrary-order
//! feature interactions: each log neuron is `exp(Σᵢ wᵢ ln eᵢ)` (element-wise over the embedding
//! dimension), i.e. `Πᵢ eᵢ^wᵢ`. Embeddings can be zero or negative, so, as the paper does, their
//! absolute values are clamped to a small positive number before the log. Batch norm follows
//! the log and the exp. The log neurons feed an MLP; AFN+ adds a DNN on a *separate* set of
//! embeddings (here the second half of each table row) and combines both logits linearly.

use burn::module::{Module, Param};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::{LinearCompress, Mlp};
use super::simple::flatten;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, Precision, TableInit};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AfnConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub logarithmic_neurons: usize,
    pub afn_hidden_units: Vec<usize>,
    pub afn_dropout: f64,
    /// AFN+ (true) or plain AFN.
    pub ensemble_dnn: bool,
    /// The AFN part (the model's interaction: logarithmic neurons). `false` leaves the ensemble's
    /// DNN alone on a one-part table (the interaction switch of the MovieLens 100K third pass,
    /// RESULTS.md); it needs `ensemble_dnn`.
    pub use_afn: bool,
    pub dnn_hidden_units: Vec<usize>,
    pub dnn_dropout: f64,
    pub batch_norm: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for AfnConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            logarithmic_neurons: 800,
            afn_hidden_units: vec![400, 400, 400],
            afn_dropout: 0.0,
            ensemble_dnn: true,
            use_afn: true,
            dnn_hidden_units: vec![400, 400, 400],
            dnn_dropout: 0.0,
            batch_norm: true,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

#[derive(Module, Debug)]
pub struct Afn {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    /// The AFN part (logarithmic neurons and their MLP); absent with `use_afn = false`.
    pub log_norm: Option<BatchNorm>,
    pub log_neurons: Option<LinearCompress>,
    pub exp_norm: Option<BatchNorm>,
    pub afn_mlp: Option<Mlp>,
    pub dnn: Option<Mlp>,
    /// Combines the AFN and DNN logits (AFN+ only).
    pub combine: Option<Linear>,
    pub embedding_dim: usize,
}

impl AfnConfig {
    /// Parts of a table row: the AFN's and the DNN's embeddings when both run, else one.
    fn parts(&self) -> usize {
        if self.ensemble_dnn && self.use_afn { 2 } else { 1 }
    }
}

impl ModelSpec for AfnConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim * self.parts()
    }
    fn table_segments(&self) -> Vec<usize> {
        vec![self.embedding_dim; self.parts()]
    }
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.logarithmic_neurons > 0, "model.logarithmic_neurons must be positive");
        anyhow::ensure!(
            self.use_afn || (self.ensemble_dnn && !self.dnn_hidden_units.is_empty()),
            "model.use_afn = false leaves only the DNN: it needs model.ensemble_dnn = true and model.dnn_hidden_units"
        );
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("afn_dropout", self.afn_dropout), ("dnn_dropout", self.dnn_dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let (d, n, l) =
            (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings), self.logarithmic_neurons);
        Model::Afn(Afn {
            embedding: SparseEmbedding::new_in(shape.table_rows, self.table_dim(), self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.table_dim(), device),
            numeric: numeric_scale(shape, self.numeric_embedding, self.table_dim(), device),
            log_norm: self.use_afn.then(|| BatchNormConfig::new(n).init(device)),
            log_neurons: self.use_afn.then(|| LinearCompress::new(n, l, device)),
            exp_norm: self.use_afn.then(|| BatchNormConfig::new(l).init(device)),
            afn_mlp: self
                .use_afn
                .then(|| Mlp::with_batch_norm(l * d, &self.afn_hidden_units, 1, self.afn_dropout, self.batch_norm, device)),
            dnn: self
                .ensemble_dnn
                .then(|| Mlp::with_batch_norm(n * d, &self.dnn_hidden_units, 1, self.dnn_dropout, self.batch_norm, device)),
            combine: (self.ensemble_dnn && self.use_afn).then(|| LinearConfig::new(2, 1).init(device)),
            embedding_dim: d,
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let (d, n, l) =
            (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings), self.logarithmic_neurons);
        let mut total = dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.table_dim());
        if self.use_afn {
            total += 2 * (n * l * d) as u64 + mlp_flops(l * d, &self.afn_hidden_units, 1);
        }
        if self.ensemble_dnn {
            total += mlp_flops(n * d, &self.dnn_hidden_units, 1);
        }
        total
    }
}

impl Afn {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass));
        let [b, _, _] = x.dims();
        let d = self.embedding_dim;
        let (Some(log_norm), Some(log_neurons), Some(exp_norm), Some(afn_mlp)) =
            (&self.log_norm, &self.log_neurons, &self.exp_norm, &self.afn_mlp)
        else {
            // `use_afn = false`: the DNN alone, on the table's only part
            let dnn = self.dnn.as_ref().expect("validated: use_afn = false needs the ensemble DNN");
            return dnn.forward(flatten(x), pass).reshape([b]);
        };
        let e = x.clone().narrow(2, 0, d);
        let log = super::batch_norm::batch_norm(log_norm, e.abs().clamp_min(1e-7).log()); // [b, n, d]
        // f32 even under bf16: exp() turns the product's bf16 rounding (relative 2⁻⁹ of a sum of
        // logarithms) into that much relative error of every logarithmic neuron
        let y = super::batch_norm::batch_norm(exp_norm, super::fused::exp(log_neurons.forward(log, Precision::F32))); // [b, L, d]
        let afn = afn_mlp.forward(flatten(y), pass);
        let logit = match (&self.dnn, &self.combine) {
            (Some(dnn), Some(combine)) => {
                let second = dnn.forward(flatten(x.narrow(2, d, d)), pass);
                super::layers::linear_f32(combine, Tensor::cat(vec![afn, second], 1))
            }
            _ => afn,
        };
        logit.reshape([b])
    }
}
