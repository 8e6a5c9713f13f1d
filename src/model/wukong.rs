//! Wukong (Zhang, Luo, Chen et al., ICML 2024): embedding layer → `l` Wukong layers
//! (FMB ∥ LCB, residual, LayerNorm) → top MLP → logit.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::embedding::SparseEmbedding;
use super::layers::{FmBlockSpec, FmKind, LayerParts, Mlp, WukongLayer, mlp_dims};
use super::{DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, dense_embeddings, dense_mlp, numeric_scale};
use super::{Pass, TableInit, TableStorage};
use crate::profile::{Phase, mark};

/// Every hyperparameter of the paper, plus regularization. TOML keys are these field names.
///
/// Plain serde rather than burn's `Config` derive: configs are user files, so unknown keys
/// (typos) must be refused and omitted keys need defaults, neither of which that derive does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WukongConfig {
    /// d: the global embedding dimension.
    pub embedding_dim: usize,
    /// l: number of Wukong layers.
    pub num_layers: usize,
    /// n_F: embeddings produced by each FM block.
    pub num_fmb: usize,
    /// n_L: embeddings produced by each linear compress block.
    pub num_lcb: usize,
    /// k: rank of the optimized FM projection.
    pub fm_rank: usize,
    /// `static`, `attentive` or `full`.
    pub fm_kind: FmKind,
    /// Attentive FM: embeddings kept by the linear compression that feeds the Y-MLP.
    pub attention_compress: usize,
    /// Attentive FM: hidden widths of the Y-MLP.
    pub attention_hidden: Vec<usize>,
    /// Hidden widths of each FMB's MLP (its output width is n_F·d).
    pub fmb_mlp: Vec<usize>,
    /// Hidden widths of the top MLP (its output is one logit).
    pub top_mlp: Vec<usize>,
    /// Dropout after hidden layers of the FMB and top MLPs.
    pub dropout: f64,
    /// Batch norm in the hidden layers of the FMB and top MLPs.
    pub batch_norm: bool,
    /// Standard deviation of the normal init of embedding rows.
    pub embedding_init_std: f64,
    /// Hidden widths of the dense-feature MLP (used when the data has dense features).
    pub dense_mlp: Vec<usize>,
    /// Embeddings the dense MLP produces (when the data has dense features).
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
    /// The paper's §3.2 small features: `{ position = width }` embeds those fields (positions in
    /// the model's field order: the data's fields, then the extra embeddings of `[data]
    /// embeddings`) with `width < d` values; they are concatenated and mapped by `group_mlp` to
    /// `group_embeddings` embeddings of width d, which enter the stack in their place. Their table
    /// rows keep d columns of which only the first `width` are read (and trained).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub field_dims: BTreeMap<String, usize>,
    /// Embeddings the grouped narrow fields become.
    #[serde(skip_serializing_if = "is_one")]
    pub group_embeddings: usize,
    /// Hidden widths of the grouping MLP (empty: one linear map).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub group_mlp: Vec<usize>,
    /// Ablations (the paper's Fig. 4): `"fmb"`, `"lcb"` and/or `"residual"` replace that part of
    /// every layer by zeros (the FMB's n_F or the LCB's n_L embeddings become zeros; without the
    /// residual, X' = LN(concat(FMB, LCB))). Their parameters and FLOPs are not built or counted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ablate: Vec<Ablation>,
}

/// A part of the Wukong layer that an ablation removes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Ablation {
    Fmb,
    Lcb,
    Residual,
}

impl Default for WukongConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 16,
            num_layers: 2,
            num_fmb: 16,
            num_lcb: 16,
            fm_rank: 8,
            fm_kind: FmKind::Static,
            attention_compress: 8,
            attention_hidden: vec![64],
            fmb_mlp: vec![256, 256],
            top_mlp: vec![256, 128],
            dropout: 0.0,
            batch_norm: false,
            embedding_init_std: 0.01,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
            field_dims: BTreeMap::new(),
            group_embeddings: 1,
            group_mlp: Vec::new(),
            ablate: Vec::new(),
        }
    }
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// Which model fields enter the stack as they are, and which are grouped with which width.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grouping {
    wide: Vec<usize>,
    narrow: Vec<(usize, usize)>,
}

impl WukongConfig {
    /// Embeddings entering the stack: one per categorical field (narrow fields replaced by their
    /// group's embeddings) plus the dense embeddings.
    pub fn n0(&self, shape: &DataShape) -> usize {
        let g = self.grouping(shape);
        let grouped = if g.narrow.is_empty() { 0 } else { self.group_embeddings };
        super::num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings) - g.narrow.len() + grouped
    }

    /// `field_dims` resolved against the data (positions checked by `check_shape`; here any
    /// position outside the data is ignored).
    fn grouping(&self, shape: &DataShape) -> Grouping {
        let narrow: Vec<(usize, usize)> =
            self.field_dims.iter().filter_map(|(k, &w)| k.parse::<usize>().ok().filter(|&f| f < shape.fields).map(|f| (f, w))).collect();
        let wide = (0..shape.fields).filter(|f| !narrow.iter().any(|&(n, _)| n == *f)).collect();
        Grouping { wide, narrow }
    }

    /// Width of the concatenated narrow embeddings.
    fn group_width(&self, shape: &DataShape) -> usize {
        self.grouping(shape).narrow.iter().map(|&(_, w)| w).sum()
    }

    /// Embedding count after layer `i` (0-based) and the spec of its FM block.
    pub fn layer_specs(&self, shape: &DataShape) -> Vec<FmBlockSpec> {
        let mut n = self.n0(shape);
        (0..self.num_layers)
            .map(|_| {
                let s = FmBlockSpec {
                    kind: self.fm_kind,
                    n_in: n,
                    n_out: self.num_fmb,
                    dim: self.embedding_dim,
                    rank: self.fm_rank,
                    attention_compress: self.attention_compress,
                    attention_hidden: self.attention_hidden.clone(),
                    mlp_hidden: self.fmb_mlp.clone(),
                    dropout: self.dropout,
                    batch_norm: self.batch_norm,
                };
                n = self.num_fmb + self.num_lcb;
                s
            })
            .collect()
    }

    /// Embeddings leaving the stack.
    pub fn n_last(&self, shape: &DataShape) -> usize {
        if self.num_layers == 0 { self.n0(shape) } else { self.num_fmb + self.num_lcb }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("embedding_dim", self.embedding_dim),
            ("num_fmb", self.num_fmb),
            ("num_lcb", self.num_lcb),
            ("fm_rank", self.fm_rank),
            ("num_dense_embeddings", self.num_dense_embeddings),
        ];
        for (name, v) in positive {
            anyhow::ensure!(v > 0, "model.{name} must be positive");
        }
        anyhow::ensure!((0.0..1.0).contains(&self.dropout), "model.dropout must be in [0, 1)");
        anyhow::ensure!(
            self.fm_kind != FmKind::Attentive || self.attention_compress > 0,
            "model.attention_compress must be positive for the attentive FM"
        );
        anyhow::ensure!(self.group_embeddings > 0, "model.group_embeddings must be positive");
        for (key, &w) in &self.field_dims {
            anyhow::ensure!(key.parse::<usize>().is_ok(), "model.field_dims: key {key:?} is not a field position (0, 1, …)");
            anyhow::ensure!(
                (1..self.embedding_dim).contains(&w),
                "model.field_dims.{key} = {w}: a narrow field's width must be between 1 and embedding_dim − 1 ({})",
                self.embedding_dim - 1
            );
        }
        Ok(())
    }

    /// Field positions in `field_dims` must exist in the data.
    pub fn check_shape(&self, shape: &DataShape) -> anyhow::Result<()> {
        for key in self.field_dims.keys() {
            let f: usize = key.parse()?;
            anyhow::ensure!(
                f < shape.fields,
                "model.field_dims.{key}: the data has {} categorical fields (extra embeddings included), positions 0..{}",
                shape.fields,
                shape.fields
            );
        }
        Ok(())
    }

    /// The model with an f32 embedding table.
    pub fn init(&self, shape: &DataShape, device: &Device) -> Wukong {
        self.init_in(shape, TableStorage::F32, device)
    }

    /// The model with its embedding table stored as `storage`.
    pub fn init_in(&self, shape: &DataShape, storage: impl Into<TableInit>, device: &Device) -> Wukong {
        let d = self.embedding_dim;
        let ablated = |a| self.ablate.contains(&a);
        let parts = LayerParts { fmb: !ablated(Ablation::Fmb), lcb: !ablated(Ablation::Lcb), residual: !ablated(Ablation::Residual) };
        let layers = self.layer_specs(shape).iter().map(|s| WukongLayer::with_parts(s, self.num_lcb, parts, device)).collect();
        let g = self.grouping(shape);
        Wukong {
            embedding: SparseEmbedding::new_in(shape.table_rows, d, self.embedding_init_std, storage, device),
            group: (!g.narrow.is_empty())
                .then(|| Mlp::new(self.group_width(shape), &self.group_mlp, self.group_embeddings * d, 0.0, device)),
            wide_fields: g.wide,
            narrow_fields: g.narrow.iter().map(|&(f, _)| f).collect(),
            narrow_widths: g.narrow.iter().map(|&(_, w)| w).collect(),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d, device),
            layers,
            top: Mlp::with_batch_norm(self.n_last(shape) * d, &self.top_mlp, 1, self.dropout, self.batch_norm, device),
        }
    }

    /// Multiply-adds ×2 of every matrix product in one forward pass for one example (the
    /// usual FLOP convention); element-wise work (LayerNorm, activations) is not counted.
    pub fn forward_flops(&self, shape: &DataShape) -> u64 {
        let d = self.embedding_dim as u64;
        let mlp = |dims: Vec<(usize, usize)>| dims.iter().map(|&(a, b)| 2 * (a * b) as u64).sum::<u64>();
        let mut total = 0u64;
        total += super::dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, self.embedding_dim);
        if self.group_width(shape) > 0 {
            total += mlp(mlp_dims(self.group_width(shape), &self.group_mlp, self.group_embeddings * self.embedding_dim));
        }
        for s in self.layer_specs(shape) {
            let (n, k) = (s.n_in as u64, s.rank as u64);
            let keep = |a| !self.ablate.contains(&a);
            if keep(Ablation::Fmb) {
                total += match s.kind {
                    FmKind::Static => 4 * n * k * d,
                    FmKind::Attentive => {
                        let c = s.attention_compress as u64;
                        2 * n * c * d + mlp(mlp_dims(s.attention_compress * s.dim, &s.attention_hidden, s.n_in * s.rank)) + 4 * n * k * d
                    }
                    FmKind::Full => 2 * n * n * d,
                };
                total += mlp(mlp_dims(s.fm_width(), &s.mlp_hidden, s.n_out * s.dim));
            }
            let n_out = (self.num_fmb + self.num_lcb) as u64;
            if keep(Ablation::Lcb) {
                total += 2 * n * self.num_lcb as u64 * d; // LCB
            }
            if n != n_out && keep(Ablation::Residual) {
                total += 2 * n * n_out * d; // residual projection
            }
        }
        total + mlp(mlp_dims(self.n_last(shape) * self.embedding_dim, &self.top_mlp, 1))
    }
}

impl ModelSpec for WukongConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim
    }
    fn validate(&self) -> anyhow::Result<()> {
        WukongConfig::validate(self)
    }
    fn check_shape(&self, shape: &DataShape) -> anyhow::Result<()> {
        WukongConfig::check_shape(self, shape)
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        Model::Wukong(self.init_in(shape, storage, device))
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        WukongConfig::forward_flops(self, shape)
    }
}

#[derive(Module, Debug)]
pub struct Wukong {
    pub embedding: SparseEmbedding,
    /// `field_dims`: the MLP mapping the concatenated narrow embeddings to `group_embeddings`.
    pub group: Option<Mlp>,
    /// Fields entering the stack as they are, and the narrow ones with their widths.
    pub wide_fields: Vec<usize>,
    pub narrow_fields: Vec<usize>,
    pub narrow_widths: Vec<usize>,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    pub layers: Vec<WukongLayer>,
    pub top: Mlp,
}

impl Wukong {
    /// Logits `[b]` from the embedded categorical input `[b, fields, d]` and the dense features
    /// `[b, num_dense]`; either may be absent (all-dense or all-categorical data), not both.
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let d = self.embedding.dim();
        let sparse = sparse.map(|x| self.group_fields(x, pass));
        let mut x = cat_fields(sparse, dense_embeddings(&self.dense, &self.numeric, dense, d, pass));
        mark(Phase::Embedding);
        let b = x.dims()[0];
        for layer in &self.layers {
            x = layer.forward(x, pass);
        }
        mark(Phase::Interaction);
        let n = x.dims()[1];
        let logits = self.top.forward(x.reshape([b, n * d]), pass).reshape([b]);
        mark(Phase::Mlp);
        logits
    }

    /// §3.2: the wide fields as they are, then the narrow fields' first `width` columns
    /// concatenated and mapped by the group MLP to `group_embeddings` embeddings.
    fn group_fields(&self, x: Tensor<3>, pass: &Pass) -> Tensor<3> {
        let Some(group) = &self.group else { return x };
        let [b, _, d] = x.dims();
        let parts: Vec<Tensor<2>> = self
            .narrow_fields
            .iter()
            .zip(&self.narrow_widths)
            .map(|(&f, &w)| x.clone().slice([0..b, f..f + 1, 0..w]).reshape([b, w]))
            .collect();
        let g = group.forward(Tensor::cat(parts, 1), pass);
        let g = g.clone().reshape([b, g.dims()[1] / d, d]);
        if self.wide_fields.is_empty() {
            return g;
        }
        let idx = burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(self.wide_fields.iter().map(|&f| f as i64).collect::<Vec<_>>(), [self.wide_fields.len()]),
            &x.device(),
        );
        Tensor::cat(vec![x.select(1, idx), g], 1)
    }
}
