//! FinalMLP (Mao et al., AAAI 2023): two MLP streams over the flattened embeddings, each behind
//! its own feature-selection gate `2·σ(MLP(context))`, fused by multi-head bilinear aggregation:
//! `w₁ᵀh₁ + w₂ᵀh₂ + Σ_heads h₁ₕᵀ W_h h₂ₕ + b`.
//!
//! A gate's context is, as in the paper and FuxiCTR, the gate's *own* embeddings of the fields
//! listed in `fs1_context`/`fs2_context` (by position), or a learned vector starting at zero
//! when the list is empty (every gate then starts at 2·σ(MLP(0))). The own embeddings live in
//! the same table row as the field's main embedding: a row is `[main | gate-1 context | gate-2
//! context]` (the context parts only for gates with context fields), each part with its own
//! row-wise Adagrad accumulator; rows of fields no gate reads never receive a gradient there.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::embedding::SparseEmbedding;
use super::layers::{HiddenLayers, Mlp};
use super::simple::flatten;
use super::{
    DataShape, Model, ModelSpec, NumericEmbedding, cat_fields, check_common, dense_embeddings, dense_mlp, dense_mlp_flops, mlp_flops,
    num_inputs, numeric_scale,
};
use super::{Pass, TableInit};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FinalMlpConfig {
    pub embedding_dim: usize,
    pub embedding_init_std: f64,
    pub mlp1_hidden_units: Vec<usize>,
    pub mlp2_hidden_units: Vec<usize>,
    pub mlp1_dropout: f64,
    pub mlp2_dropout: f64,
    pub mlp1_batch_norm: bool,
    pub mlp2_batch_norm: bool,
    /// Feature selection gates in front of the two streams.
    pub use_fs: bool,
    pub fs_hidden_units: Vec<usize>,
    /// Fields (0-based positions in the schema) whose embeddings drive each gate.
    pub fs1_context: Vec<usize>,
    pub fs2_context: Vec<usize>,
    pub num_heads: usize,
    /// The streams' multi-head bilinear term (the model's stream-level interaction). `false`
    /// keeps only the linear terms w₁ᵀh₁ + w₂ᵀh₂ + b: an ensemble of two MLPs (the interaction
    /// switch of the MovieLens 100K third pass, RESULTS.md).
    pub bilinear_fusion: bool,
    pub dense_mlp: Vec<usize>,
    pub num_dense_embeddings: usize,
    /// Dense features as embeddings: `"mlp"` (an MLP into `num_dense_embeddings`, the paper's) or
    /// `"per_feature"` (`x_i · v_i`, one per feature, FuxiCTR's default).
    pub numeric_embedding: NumericEmbedding,
}

impl Default for FinalMlpConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 10,
            embedding_init_std: 0.0001,
            mlp1_hidden_units: vec![400, 400, 400],
            mlp2_hidden_units: vec![400, 400, 400],
            mlp1_dropout: 0.0,
            mlp2_dropout: 0.0,
            mlp1_batch_norm: false,
            mlp2_batch_norm: false,
            use_fs: true,
            fs_hidden_units: vec![64],
            fs1_context: vec![],
            fs2_context: vec![],
            num_heads: 1,
            bilinear_fusion: true,
            dense_mlp: vec![64],
            num_dense_embeddings: 1,
            numeric_embedding: NumericEmbedding::Mlp,
        }
    }
}

/// `2·σ(MLP(c))`: one gate value per input element; `c` is the gate's own embeddings of the
/// context fields (part `part` of the table rows), or a learned vector when there are none.
#[derive(Module, Debug)]
pub struct Gate {
    pub context: Option<Param<Tensor<2>>>,
    pub fields: Vec<usize>,
    pub part: usize,
    pub mlp: Mlp,
}

impl Gate {
    fn new(d: usize, fields: &[usize], part: usize, hidden: &[usize], width: usize, device: &Device) -> Self {
        let context = fields.is_empty().then(|| Param::from_tensor(Tensor::<2>::zeros([1, d], device)));
        let d_in = if fields.is_empty() { d } else { fields.len() * d };
        Self { context, fields: fields.to_vec(), part, mlp: Mlp::new(d_in, hidden, width, 0.0, device) }
    }
    /// `x`: the flattened inputs `[b, n·d]`; `rows`: the looked-up table rows `[b, fields, k·d]`.
    fn forward(&self, x: Tensor<2>, rows: Option<&Tensor<3>>, d: usize, pass: &Pass) -> Tensor<2> {
        let c = match (&self.context, rows) {
            (Some(c), _) => c.val(),
            (None, Some(rows)) => {
                let b = rows.dims()[0];
                let own = rows.clone().narrow(2, self.part * d, d);
                let parts = self.fields.iter().map(|&f| own.clone().narrow(1, f, 1).reshape([b, d])).collect();
                Tensor::cat(parts, 1)
            }
            (None, None) => unreachable!("context fields are checked against the data's categorical fields"),
        };
        x * sigmoid(self.mlp.forward(c, pass)).mul_scalar(2.0)
    }
}

#[derive(Module, Debug)]
pub struct FinalMlp {
    pub embedding: SparseEmbedding,
    pub dense: Option<Mlp>,
    /// `numeric_embedding = "per_feature"`: one vector per dense feature, `[num_dense, width]`.
    pub numeric: Option<Param<Tensor<2>>>,
    pub gate1: Option<Gate>,
    pub gate2: Option<Gate>,
    pub mlp1: HiddenLayers,
    pub mlp2: HiddenLayers,
    pub w1: Linear,
    pub w2: Linear,
    /// `[heads, h₁/heads, h₂/heads]`; absent with `bilinear_fusion = false`.
    pub bilinear: Option<Param<Tensor<3>>>,
    pub embedding_dim: usize,
}

impl FinalMlpConfig {
    /// Table-row parts of the gates with context fields (1 and/or 2; part 0 is the main embedding).
    fn context_parts(&self) -> (usize, usize) {
        let has = |fields: &[usize]| self.use_fs && !fields.is_empty();
        let one = if has(&self.fs1_context) { 1 } else { 0 };
        (one, if has(&self.fs2_context) { one + 1 } else { 0 })
    }
    /// Parts of a table row: the main embedding and the context parts (the last is the largest).
    fn parts(&self) -> usize {
        let (one, two) = self.context_parts();
        1 + one.max(two)
    }
}

impl ModelSpec for FinalMlpConfig {
    fn table_dim(&self) -> usize {
        self.embedding_dim * self.parts()
    }
    fn table_segments(&self) -> Vec<usize> {
        vec![self.embedding_dim; self.parts()]
    }
    fn validate(&self) -> anyhow::Result<()> {
        let (o1, o2) = (self.mlp1_hidden_units.last().copied().unwrap_or(0), self.mlp2_hidden_units.last().copied().unwrap_or(0));
        anyhow::ensure!(o1 > 0 && o2 > 0, "model.mlp1_hidden_units and mlp2_hidden_units need at least one layer");
        anyhow::ensure!(
            self.num_heads > 0 && o1 % self.num_heads == 0 && o2 % self.num_heads == 0,
            "the streams' output widths must be multiples of num_heads"
        );
        check_common(
            self.embedding_dim,
            self.num_dense_embeddings,
            &[("mlp1_dropout", self.mlp1_dropout), ("mlp2_dropout", self.mlp2_dropout)],
        )
    }
    fn check_shape(&self, shape: &DataShape) -> anyhow::Result<()> {
        let bad: Vec<usize> = self.fs1_context.iter().chain(&self.fs2_context).copied().filter(|&f| f >= shape.fields).collect();
        anyhow::ensure!(
            bad.is_empty(),
            "model.fs1_context/fs2_context name field positions {bad:?}, but the data has {} categorical fields",
            shape.fields
        );
        Ok(())
    }
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model {
        let (d, n) = (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings));
        let (o1, o2, h) = (*self.mlp1_hidden_units.last().unwrap(), *self.mlp2_hidden_units.last().unwrap(), self.num_heads);
        let bound = 1.0 / ((o1 / h) as f64).sqrt();
        let (part1, part2) = self.context_parts();
        Model::FinalMlp(FinalMlp {
            embedding: SparseEmbedding::new_in(shape.table_rows, self.table_dim(), self.embedding_init_std, storage, device),
            dense: dense_mlp(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d, device),
            numeric: numeric_scale(shape, self.numeric_embedding, d, device),
            gate1: self.use_fs.then(|| Gate::new(d, &self.fs1_context, part1, &self.fs_hidden_units, n * d, device)),
            gate2: self.use_fs.then(|| Gate::new(d, &self.fs2_context, part2, &self.fs_hidden_units, n * d, device)),
            mlp1: HiddenLayers::new(n * d, &self.mlp1_hidden_units, self.mlp1_dropout, self.mlp1_batch_norm, device),
            mlp2: HiddenLayers::new(n * d, &self.mlp2_hidden_units, self.mlp2_dropout, self.mlp2_batch_norm, device),
            w1: LinearConfig::new(o1, 1).init(device),
            w2: LinearConfig::new(o2, 1).with_bias(false).init(device),
            bilinear: self
                .bilinear_fusion
                .then(|| Param::from_tensor(Tensor::<3>::random([h, o1 / h, o2 / h], Distribution::Uniform(-bound, bound), device))),
            embedding_dim: d,
        })
    }
    fn forward_flops(&self, shape: &DataShape) -> u64 {
        let (d, n) = (self.embedding_dim, num_inputs(shape, self.numeric_embedding, self.num_dense_embeddings));
        let (o1, o2) = (*self.mlp1_hidden_units.last().unwrap() as u64, *self.mlp2_hidden_units.last().unwrap() as u64);
        let split = |h: &[usize]| (h[..h.len() - 1].to_vec(), h[h.len() - 1]);
        let ((h1, l1), (h2, l2)) = (split(&self.mlp1_hidden_units), split(&self.mlp2_hidden_units));
        // A gate without context fields reads no input: computed once per batch, not per example.
        let gate = |fields: &[usize]| {
            if self.use_fs && !fields.is_empty() { mlp_flops(fields.len() * d, &self.fs_hidden_units, n * d) } else { 0 }
        };
        dense_mlp_flops(shape, self.numeric_embedding, &self.dense_mlp, self.num_dense_embeddings, d)
            + gate(&self.fs1_context)
            + gate(&self.fs2_context)
            + mlp_flops(n * d, &h1, l1)
            + mlp_flops(n * d, &h2, l2)
            + 2 * (o1 + o2)
            + if self.bilinear_fusion { 2 * o1 * o2 / self.num_heads as u64 } else { 0 }
    }
}

impl FinalMlp {
    pub fn forward(&self, sparse: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
        let d = self.embedding_dim;
        let main = sparse.as_ref().map(|rows| rows.clone().narrow(2, 0, d));
        let x = flatten(cat_fields(main, dense_embeddings(&self.dense, &self.numeric, dense, d, pass)));
        let b = x.dims()[0];
        let gated = |g: &Option<Gate>, x: Tensor<2>| match g {
            Some(g) => g.forward(x, sparse.as_ref(), d, pass),
            None => x,
        };
        let h1 = self.mlp1.forward(gated(&self.gate1, x.clone()), pass);
        let h2 = self.mlp2.forward(gated(&self.gate2, x), pass);
        let linear = (super::layers::linear_f32(&self.w1, h1.clone()) + super::layers::linear_f32(&self.w2, h2.clone())).reshape([b]);
        let Some(bilinear) = &self.bilinear else { return linear };
        let [h, a, c] = bilinear.dims();
        let x1 = h1.reshape([b, h, 1, a]).swap_dims(0, 1); // [h, b, 1, a]
        let w = bilinear.val().unsqueeze_dim::<4>(1); // [h, 1, a, c]
        let x1w = x1.matmul(w).reshape([h, b, c]).swap_dims(0, 1); // [b, h, c]
        let pair = (x1w * h2.reshape([b, h, c])).sum_dim(2).sum_dim(1).reshape([b]);
        linear + pair
    }
}
