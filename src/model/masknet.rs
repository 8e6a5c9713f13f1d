//! MaskNet (Wang et al., DLP-KDD 2021), as FuxiCTR builds it. A MaskBlock multiplies a hidden
//! representation element-wise by an instance-guided mask computed from the flattened raw
//! embeddings (`Linear → ReLU → Linear`, ⌊width × reduction_ratio⌋ units inside, width = the
//! masked vector's), then applies `Linear (no bias) → LayerNorm → ReLU → dropout`. The first
//! hidden representation is the embeddings, each field layer-normed on its own (`emb_layernorm`).
//! Serial: blocks in a chain, each masking the previous output, then a linear logit; parallel:
//! blocks side by side on the normed embeddings, concatenated into an MLP.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::{Dropout, FieldLayerNorm, Mlp};
use super::simple::flatten;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, TableInit};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum MaskNetType {
    Serial,
    #[default]
    Parallel,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaskNetConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub model_type: MaskNetType,
    /// Serial: the output width of each block in the chain.
    pub block_hidden_units: Vec<usize>,
    /// Parallel: number of blocks and their output width.
    pub parallel_num_blocks: usize,
    pub parallel_block_dim: usize,
    /// Parallel: the MLP over the concatenated block outputs.
    pub dnn_hidden_units: Vec<usize>,
    pub reduction_ratio: f64,
    /// The instance-guided mask (the model's interaction). `false` multiplies by nothing: each
    /// block is then a LayerNorm'd hidden layer, the model an MLP (the interaction switch of
    /// the MovieLens 100K third pass, RESULTS.md).
    pub use_mask: bool,
    pub emb_layernorm: bool,
    pub net_layernorm: bool,
    /// Dropout after every MaskBlock and in the parallel MLP's hidden layers.
    pub dropout: f64,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for MaskNetConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            model_type: MaskNetType::Parallel,
            block_hidden_units: vec![64, 64, 64],
            parallel_num_blocks: 1,
            parallel_block_dim: 64,
            dnn_hidden_units: vec![400, 400, 400],
            reduction_ratio: 1.0,
            use_mask: true,
            emb_layernorm: true,
            net_layernorm: true,
            dropout: 0.0,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

#[derive(Module, Debug)]
pub struct MaskBlock {
    /// Absent with `use_mask = false`.
    pub mask_hidden: Option<Linear>,
    pub mask_out: Option<Linear>,
    pub hidden: Linear,
    pub norm: Option<LayerNorm>,
    pub dropout: Dropout,
}

/// Units inside a block's mask MLP: ⌊width of the masked vector × ratio⌋ (at least one).
fn mask_units(d_in: usize, ratio: f64) -> usize {
    ((d_in as f64 * ratio).floor() as usize).max(1)
}

impl MaskBlock {
    fn new(emb: usize, d_in: usize, d_out: usize, c: &MaskNetConfig, device: &Device) -> Self {
        let mid = mask_units(d_in, c.reduction_ratio);
        Self {
            mask_hidden: c.use_mask.then(|| LinearConfig::new(emb, mid).init(device)),
            mask_out: c.use_mask.then(|| LinearConfig::new(mid, d_in).init(device)),
            hidden: LinearConfig::new(d_in, d_out).with_bias(false).init(device),
            norm: c.net_layernorm.then(|| LayerNormConfig::new(d_out).init(device)),
            dropout: Dropout::new(c.dropout),
        }
    }

    fn flops(emb: usize, d_in: usize, d_out: usize, c: &MaskNetConfig) -> u64 {
        let mask = if c.use_mask { mask_units(d_in, c.reduction_ratio) * (emb + d_in) } else { 0 };
        2 * (mask + d_in * d_out) as u64
    }

    /// `emb` guides the mask; `h` is what gets masked.
    fn forward(&self, emb: Tensor<2>, h: Tensor<2>, pass: &Pass) -> Tensor<2> {
        let masked = match (&self.mask_hidden, &self.mask_out) {
            (Some(hidden), Some(out)) => super::layers::linear_f32(out, relu(super::layers::linear_f32(hidden, emb))) * h,
            _ => h,
        };
        let out = super::layers::linear_f32(&self.hidden, masked);
        let out = relu(match &self.norm {
            Some(ln) => super::fused::layer_norm(ln, out),
            None => out,
        });
        self.dropout.forward(out, pass)
    }
}

#[derive(Module, Debug)]
pub struct MaskNet {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    /// One LayerNorm per field (and dense embedding).
    pub emb_norm: Option<FieldLayerNorm>,
    pub blocks: Vec<MaskBlock>,
    pub serial: bool,
    /// Serial: a linear layer to the logit; parallel: the MLP over the block outputs.
    pub head: Mlp,
}

impl ModelSpec for MaskNetConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim
    }
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.reduction_ratio > 0.0, "model.reduction_ratio must be positive");
        match self.model_type {
            MaskNetType::Serial => anyhow::ensure!(!self.block_hidden_units.is_empty(), "serial MaskNet needs model.block_hidden_units"),
            MaskNetType::Parallel => anyhow::ensure!(
                self.parallel_num_blocks > 0 && self.parallel_block_dim > 0,
                "parallel MaskNet needs model.parallel_num_blocks > 0 and model.parallel_block_dim > 0"
            ),
        }
        check_common(self.embedding_dim, self.num_dense_embeddings, &[("dropout", self.dropout)])
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let d = self.embedding_dim;
        let emb = num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) * d;
        let (blocks, head) = match self.model_type {
            MaskNetType::Serial => {
                let mut d_in = emb;
                let blocks = self
                    .block_hidden_units
                    .iter()
                    .map(|&h| {
                        let b = MaskBlock::new(emb, d_in, h, self, device);
                        d_in = h;
                        b
                    })
                    .collect();
                (blocks, Mlp::new(d_in, &[], 1, 0.0, device))
            }
            MaskNetType::Parallel => {
                let blocks =
                    (0..self.parallel_num_blocks).map(|_| MaskBlock::new(emb, emb, self.parallel_block_dim, self, device)).collect();
                (blocks, Mlp::new(self.parallel_num_blocks * self.parallel_block_dim, &self.dnn_hidden_units, 1, self.dropout, device))
            }
        };
        Model::MaskNet(MaskNet {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d, device),
            emb_norm: self
                .emb_layernorm
                .then(|| FieldLayerNorm::new(num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings), d, device)),
            blocks,
            serial: self.model_type == MaskNetType::Serial,
            head,
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let emb = num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) * self.embedding_dim;
        dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.embedding_dim)
            + match self.model_type {
                MaskNetType::Serial => {
                    let mut d_in = emb;
                    let mut t = 0;
                    for &h in &self.block_hidden_units {
                        t += MaskBlock::flops(emb, d_in, h, self);
                        d_in = h;
                    }
                    t + 2 * d_in as u64
                }
                MaskNetType::Parallel => {
                    self.parallel_num_blocks as u64 * MaskBlock::flops(emb, emb, self.parallel_block_dim, self)
                        + mlp_flops(self.parallel_num_blocks * self.parallel_block_dim, &self.dnn_hidden_units, 1)
                }
            }
    }
}

impl MaskNet {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let x = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, self.embedding.dim(), pass));
        let normed = flatten(match &self.emb_norm {
            Some(ln) => ln.forward(x.clone()),
            None => x.clone(),
        });
        let emb = flatten(x);
        let b = emb.dims()[0];
        let out = if self.serial {
            let mut h = normed;
            for block in &self.blocks {
                h = block.forward(emb.clone(), h, pass);
            }
            h
        } else {
            Tensor::cat(self.blocks.iter().map(|block| block.forward(emb.clone(), normed.clone(), pass)).collect(), 1)
        };
        self.head.forward(out, pass).reshape([b])
    }
}
