//! Building blocks shared by the models: MLP, linear compression along the embedding axis,
//! the factorization-machine block (FMB) and the Wukong interaction layer.

use burn::module::{Module, Param};
use burn::nn::{BatchNorm, BatchNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::Cell;

use crate::rng::splitmix64;

/// What one forward pass needs besides its inputs, handed down the model explicitly (never a
/// thread-local): the matrix-product precision and the dropout-mask stream, a counter that
/// every active dropout advances by the number of elements it masks.
#[derive(Debug)]
pub struct Pass {
    pub precision: Precision,
    dropout: Cell<u64>,
}

impl Pass {
    /// A pass in `precision` whose dropout masks start at stream position `dropout_stream`.
    pub fn new(precision: Precision, dropout_stream: u64) -> Self {
        Self { precision, dropout: Cell::new(dropout_stream) }
    }

    /// The stream position a run seeded with `seed` starts at.
    pub fn seeded(precision: Precision, seed: u64) -> Self {
        Self::new(precision, splitmix64(seed ^ 0x5EED_D80F))
    }

    /// An f32 pass (dropout is inactive outside autodiff anyway).
    pub fn f32() -> Self {
        Self::new(Precision::F32, 0)
    }

    /// The dropout stream position after the masks drawn so far (the trainer carries it from
    /// step to step and saves it in checkpoints).
    pub fn dropout_stream(&self) -> u64 {
        self.dropout.get()
    }

    /// Reserves `n` positions of the dropout stream; returns the first.
    fn take_dropout(&self, n: u64) -> u64 {
        let base = self.dropout.get();
        self.dropout.set(base.wrapping_add(n));
        base
    }
}

/// Inverted dropout, active only on autodiff (training) tensors, like burn's `Dropout`.
///
/// The keep-mask is drawn on the host from a counter-based hash (SplitMix64) rather than with
/// burn's per-element ChaCha sampler, which took ~16% of a Frappe training step on the CPU.
#[derive(Module, Debug)]
pub struct Dropout {
    pub prob: f64,
}

impl Dropout {
    pub fn new(prob: f64) -> Self {
        assert!((0.0..1.0).contains(&prob), "dropout probability must be in [0, 1), got {prob}");
        Self { prob }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, pass: &Pass) -> Tensor<D> {
        if self.prob == 0.0 || !x.device().is_autodiff() {
            return x;
        }
        let shape = x.shape();
        let n = shape.num_elements();
        let base = pass.take_dropout(n as u64);
        let keep = 1.0 - self.prob;
        let threshold = (keep * (1u64 << 32) as f64) as u64;
        let scale = (1.0 / keep) as f32;
        let mut mask = vec![0f32; n];
        // element i's draw depends on i alone, so chunks in parallel give the same mask; the
        // serial loop was 3.5–5.6% of a DCNv2, DLRM or MaskNet step (perf, one thread)
        mask.par_chunks_mut(MASK_CHUNK).enumerate().for_each(|(c, out)| {
            let first = base.wrapping_add((c * MASK_CHUNK) as u64);
            crate::simd::run(MaskChunk { out, first, threshold, scale })
        });
        let mask = Tensor::<D>::from_data(burn::tensor::TensorData::new(mask, shape), &x.device().inner());
        x * mask
    }
}

/// Dropout-mask elements per parallel task.
const MASK_CHUNK: usize = 1 << 15;

/// One chunk of a dropout mask: element `i` keeps (`scale`) when the top 32 bits of
/// `splitmix64(first + i)` fall below `threshold`, else 0.
struct MaskChunk<'a> {
    out: &'a mut [f32],
    first: u64,
    threshold: u64,
    scale: f32,
}

impl crate::simd::Wide for MaskChunk<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (i, o) in self.out.iter_mut().enumerate() {
            *o = if splitmix64(self.first.wrapping_add(i as u64)) >> 32 < self.threshold { self.scale } else { 0.0 };
        }
    }
}

/// LayerNorm over each embedding of `[b, n, d]` with its own gain and bias per position
/// (`n` separate `LayerNorm(d)`s, as FuxiCTR's MaskNet normalises each field). Gain `[n, d]`
/// starts at 1, bias at 0; ε = 1e-5 as burn's and PyTorch's.
#[derive(Module, Debug)]
pub struct FieldLayerNorm {
    pub gamma: Param<Tensor<2>>,
    pub beta: Param<Tensor<2>>,
}

impl FieldLayerNorm {
    pub fn new(n: usize, d: usize, device: &Device) -> Self {
        Self { gamma: Param::from_tensor(Tensor::<2>::ones([n, d], device)), beta: Param::from_tensor(Tensor::<2>::zeros([n, d], device)) }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(2);
        let normed = centered / var.add_scalar(1e-5).sqrt();
        normed * self.gamma.val().unsqueeze_dim::<3>(0) + self.beta.val().unsqueeze_dim::<3>(0)
    }
}

/// Precision of the matrix products: the MLPs' (the bulk of the FLOPs) and, on CPUs with
/// AVX512-BF16, the interaction layers' batched products ([`super::fused::bmm`]). Parameters,
/// their gradients, the optimizer state, the loss and metrics stay f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// Inputs and weights rounded to bf16 for the product, accumulated in f32 and returned as f32
    /// (mixed precision with f32 master weights): pays on GPUs with bf16 units and, through
    /// [`super::bf16`], on CPUs with AVX512-BF16.
    Bf16,
}

/// `x W + b` in the pass's matmul precision (burn's `Linear::forward` computes the same,
/// `x.matmul(W) + b`; the product here is our op's).
pub fn linear(layer: &Linear, x: Tensor<2>, pass: &Pass) -> Tensor<2> {
    project(layer, x, pass.precision)
}

/// `layer.forward(x)` in f32 for `x` `[…, d_in]`: the same values as burn's `Linear::forward`,
/// whose product copies its output once more.
pub fn linear_f32<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    project(layer, x, Precision::F32)
}

/// `x W + b` for `x` `[…, d_in]`, the leading axes flattened into the rows of one product
/// ([`super::fused::matmul`] in f32, [`super::fused::bf16_matmul`] in bf16).
fn project<const D: usize>(layer: &Linear, x: Tensor<D>, precision: Precision) -> Tensor<D> {
    let mut dims = x.dims();
    let k = dims[D - 1];
    let rows = x.reshape([dims.iter().product::<usize>() / k.max(1), k]);
    let y = match precision {
        Precision::F32 => super::fused::matmul(rows, layer.weight.val()),
        Precision::Bf16 => super::fused::bf16_matmul(rows, layer.weight.val()),
    };
    let y = match &layer.bias {
        Some(b) => y + b.val().unsqueeze::<2>(),
        None => y,
    };
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// `d_in → hidden… → d_out`: each hidden layer is Linear → (BatchNorm) → ReLU → dropout; the
/// output layer is linear.
#[derive(Module, Debug)]
pub struct Mlp {
    pub hidden: Vec<Linear>,
    /// One per hidden layer when batch norm is on, else empty.
    pub norms: Vec<BatchNorm>,
    pub output: Linear,
    pub dropout: Dropout,
}

impl Mlp {
    pub fn new(d_in: usize, hidden: &[usize], d_out: usize, dropout: f64, device: &Device) -> Self {
        Self::with_batch_norm(d_in, hidden, d_out, dropout, false, device)
    }

    pub fn with_batch_norm(d_in: usize, hidden: &[usize], d_out: usize, dropout: f64, batch_norm: bool, device: &Device) -> Self {
        let mut layers = Vec::with_capacity(hidden.len());
        let mut d = d_in;
        for &h in hidden {
            layers.push(LinearConfig::new(d, h).init(device));
            d = h;
        }
        let norms = if batch_norm { hidden.iter().map(|&h| BatchNormConfig::new(h).init(device)).collect() } else { Vec::new() };
        Self { hidden: layers, norms, output: LinearConfig::new(d, d_out).init(device), dropout: Dropout::new(dropout) }
    }

    /// Input `[b, d_in]` (batch norm normalizes over the batch axis).
    pub fn forward(&self, mut x: Tensor<2>, pass: &Pass) -> Tensor<2> {
        for (i, layer) in self.hidden.iter().enumerate() {
            x = linear(layer, x, pass);
            if let Some(bn) = self.norms.get(i) {
                x = super::batch_norm::batch_norm(bn, x);
            }
            x = self.dropout.forward(relu(x), pass);
        }
        linear(&self.output, x, pass)
    }
}

/// Hidden layers only (no output layer): each is Linear → (BatchNorm) → ReLU → dropout, so the
/// output is the last hidden activation (FuxiCTR's `MLP_Block` with `output_dim=None`).
#[derive(Module, Debug)]
pub struct HiddenLayers {
    pub layers: Vec<Linear>,
    pub norms: Vec<BatchNorm>,
    pub dropout: Dropout,
}

impl HiddenLayers {
    pub fn new(d_in: usize, hidden: &[usize], dropout: f64, batch_norm: bool, device: &Device) -> Self {
        let mut d = d_in;
        let layers = hidden
            .iter()
            .map(|&h| {
                let l = LinearConfig::new(d, h).init(device);
                d = h;
                l
            })
            .collect();
        let norms = if batch_norm { hidden.iter().map(|&h| BatchNormConfig::new(h).init(device)).collect() } else { Vec::new() };
        Self { layers, norms, dropout: Dropout::new(dropout) }
    }

    pub fn forward(&self, mut x: Tensor<2>, pass: &Pass) -> Tensor<2> {
        for (i, layer) in self.layers.iter().enumerate() {
            x = linear(layer, x, pass);
            if let Some(bn) = self.norms.get(i) {
                x = super::batch_norm::batch_norm(bn, x);
            }
            x = self.dropout.forward(relu(x), pass);
        }
        x
    }
}

/// Dimensions of an MLP, for FLOP and parameter counts.
pub fn mlp_dims(d_in: usize, hidden: &[usize], d_out: usize) -> Vec<(usize, usize)> {
    let mut dims = Vec::new();
    let mut d = d_in;
    for &h in hidden {
        dims.push((d, h));
        d = h;
    }
    dims.push((d, d_out));
    dims
}

/// `X ↦ W X`: mixes `n_in` embeddings into `n_out` embeddings, each a linear combination of the
/// inputs, so the interaction order does not increase. Weight `[n_in, n_out]`.
#[derive(Module, Debug)]
pub struct LinearCompress {
    pub weight: Param<Tensor<2>>,
}

impl LinearCompress {
    pub fn new(n_in: usize, n_out: usize, device: &Device) -> Self {
        // Same scale as a Linear layer's default init (Kaiming-uniform, fan-in n_in).
        let bound = 1.0 / (n_in as f64).sqrt();
        let w = Tensor::<2>::random([n_in, n_out], Distribution::Uniform(-bound, bound), device);
        Self { weight: Param::from_tensor(w) }
    }

    /// `[b, n_in, d] → [b, n_out, d]`, the products in `precision` ([`super::fused::bmm`]).
    pub fn forward(&self, x: Tensor<3>, precision: Precision) -> Tensor<3> {
        // Wᵀ X per example: the output comes out contiguous (X W on the transposed input
        // left a strided view that made every later add and copy slower).
        super::fused::bmm(self.weight.val().transpose().unsqueeze_dim::<3>(0), x, precision)
    }
}

/// How the FM block forms pairwise interactions (paper §3.4 and §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FmKind {
    /// Optimized FM `X (Xᵀ Y)` with a learned static `Y ∈ R^{n×k}`.
    #[default]
    Static,
    /// Optimized FM whose `Y` is produced per example by an MLP from the linearly compressed
    /// input (paper §3.6).
    Attentive,
    /// Plain `X Xᵀ` (n² outputs; no rank reduction).
    Full,
}

/// Produces the attentive projection `Y(X) = reshape(MLP(flatten(W_c X)))`.
#[derive(Module, Debug)]
pub struct AttentiveProjection {
    pub compress: LinearCompress,
    pub mlp: Mlp,
}

/// FMB = reshape(MLP(LN(flatten(FM(X))))): `[b, n, d] → [b, n_out, d]`.
#[derive(Module, Debug)]
pub struct FmBlock {
    pub projection: Option<Param<Tensor<2>>>,
    pub attentive: Option<AttentiveProjection>,
    pub norm: LayerNorm,
    pub mlp: Mlp,
    n_in: usize,
    n_out: usize,
    dim: usize,
    rank: usize,
}

/// Hyperparameters of one FM block.
#[derive(Debug, Clone)]
pub struct FmBlockSpec {
    pub kind: FmKind,
    pub n_in: usize,
    pub n_out: usize,
    pub dim: usize,
    pub rank: usize,
    /// Embeddings kept by the attentive projection's compression.
    pub attention_compress: usize,
    pub attention_hidden: Vec<usize>,
    pub mlp_hidden: Vec<usize>,
    pub dropout: f64,
    pub batch_norm: bool,
}

impl FmBlockSpec {
    /// Width of the flattened FM output.
    pub fn fm_width(&self) -> usize {
        match self.kind {
            FmKind::Full => self.n_in * self.n_in,
            _ => self.n_in * self.rank,
        }
    }
}

impl FmBlock {
    pub fn new(s: &FmBlockSpec, device: &Device) -> Self {
        let projection = (s.kind == FmKind::Static).then(|| {
            let bound = 1.0 / (s.n_in as f64).sqrt();
            let y = Tensor::<2>::random([s.n_in, s.rank], Distribution::Uniform(-bound, bound), device);
            Param::from_tensor(y)
        });
        let attentive = (s.kind == FmKind::Attentive).then(|| AttentiveProjection {
            compress: LinearCompress::new(s.n_in, s.attention_compress, device),
            mlp: Mlp::new(s.attention_compress * s.dim, &s.attention_hidden, s.n_in * s.rank, 0.0, device),
        });
        let width = s.fm_width();
        Self {
            projection,
            attentive,
            norm: LayerNormConfig::new(width).init(device),
            mlp: Mlp::with_batch_norm(width, &s.mlp_hidden, s.n_out * s.dim, s.dropout, s.batch_norm, device),
            n_in: s.n_in,
            n_out: s.n_out,
            dim: s.dim,
            rank: s.rank,
        }
    }

    /// The FM interaction matrix before flattening: `[b, n, k]` (or `[b, n, n]` for `Full`).
    pub fn interactions(&self, x: Tensor<3>, pass: &Pass) -> Tensor<3> {
        let [b, n, d] = x.dims();
        if let Some(y) = &self.projection {
            // X (Xᵀ Y): O(n k d) instead of O(n² d).
            super::fused::fm(x, y.val().unsqueeze_dim::<3>(0), pass.precision)
        } else if let Some(att) = &self.attentive {
            let c = att.compress.forward(x.clone(), pass.precision); // [b, c, d]
            let c = c.reshape([b, att.compress.weight.dims()[1] * d]);
            let y = att.mlp.forward(c, pass).reshape([b, n, self.rank]);
            super::fused::fm(x, y, pass.precision)
        } else {
            let xt = x.clone().swap_dims(1, 2); // [b, d, n]
            super::fused::bmm(x, xt, pass.precision)
        }
    }

    pub fn forward(&self, x: Tensor<3>, pass: &Pass) -> Tensor<3> {
        let b = x.dims()[0];
        debug_assert_eq!(x.dims()[1], self.n_in);
        let fm = self.interactions(x, pass);
        let width = fm.dims()[1] * fm.dims()[2];
        let h = self.mlp.forward(super::fused::layer_norm(&self.norm, fm.reshape([b, width])), pass);
        h.reshape([b, self.n_out, self.dim])
    }
}

/// Which parts of a Wukong layer exist (all, unless ablated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParts {
    pub fmb: bool,
    pub lcb: bool,
    pub residual: bool,
}

impl LayerParts {
    pub const ALL: Self = Self { fmb: true, lcb: true, residual: true };
}

/// One Wukong layer: `X' = LN(concat(FMB(X), LCB(X)) + residual(X))`, the residual projected
/// by a [`LinearCompress`] exactly when `n_in ≠ n_F + n_L`. An ablated block is absent and its
/// embeddings are zeros; an ablated residual is not added.
#[derive(Module, Debug)]
pub struct WukongLayer {
    pub fmb: Option<FmBlock>,
    pub lcb: Option<LinearCompress>,
    pub residual: Option<LinearCompress>,
    pub norm: LayerNorm,
    /// Embeddings of each block (kept for the zeros of an ablated one).
    n_fmb: usize,
    n_lcb: usize,
    /// Whether the residual is added at all.
    add_residual: bool,
}

impl WukongLayer {
    pub fn new(fm: &FmBlockSpec, n_lcb: usize, device: &Device) -> Self {
        Self::with_parts(fm, n_lcb, LayerParts::ALL, device)
    }

    pub fn with_parts(fm: &FmBlockSpec, n_lcb: usize, parts: LayerParts, device: &Device) -> Self {
        let n_out = fm.n_out + n_lcb;
        Self {
            fmb: parts.fmb.then(|| FmBlock::new(fm, device)),
            lcb: parts.lcb.then(|| LinearCompress::new(fm.n_in, n_lcb, device)),
            residual: (parts.residual && fm.n_in != n_out).then(|| LinearCompress::new(fm.n_in, n_out, device)),
            norm: LayerNormConfig::new(fm.dim).init(device),
            n_fmb: fm.n_out,
            n_lcb,
            add_residual: parts.residual,
        }
    }

    pub fn forward(&self, x: Tensor<3>, pass: &Pass) -> Tensor<3> {
        let [b, _, d] = x.dims();
        let zeros = |n: usize| Tensor::<3>::zeros([b, n, d], &x.device());
        let f = match &self.fmb {
            Some(fmb) => fmb.forward(x.clone(), pass),
            None => zeros(self.n_fmb),
        };
        let l = match &self.lcb {
            Some(lcb) => lcb.forward(x.clone(), pass.precision),
            None => zeros(self.n_lcb),
        };
        let out = Tensor::cat(vec![f, l], 1);
        if !self.add_residual {
            return super::fused::layer_norm(&self.norm, out);
        }
        let res = match &self.residual {
            Some(proj) => proj.forward(x, pass.precision),
            None => x,
        };
        super::fused::add_layer_norm(&self.norm, out, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Linear layer through our product gives burn's `Linear::forward` values and gradients
    /// bit for bit (the same gemm), on shapes below and above gemm's threshold for threads.
    #[test]
    fn linear_through_our_product_is_burns_bit_for_bit() {
        let dev = Device::flex().autodiff();
        for (m, k, n) in [(1, 3, 2), (37, 80, 256), (300, 129, 65), (512, 512, 300)] {
            let layer = LinearConfig::new(k, n).init(&dev);
            let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &dev).require_grad();
            let w = Tensor::<2>::random([m, n], Distribution::Normal(0.0, 1.0), &dev);
            let run = |ours: bool| {
                let y = if ours { linear(&layer, x.clone(), &Pass::f32()) } else { layer.forward(x.clone()) };
                let grads = (y.clone() * w.clone()).sum().backward();
                let v = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
                let b = layer.bias.as_ref().unwrap().val().grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
                (v(y.inner()), v(x.grad(&grads).unwrap()), v(layer.weight.val().grad(&grads).unwrap()), b)
            };
            assert!(run(true) == run(false), "{m}×{k}×{n}: values or gradients differ from burn's Linear");
        }
        // [b, fields, d] inputs (AutoInt's projections), the fields flattened into rows: burn
        // runs one product per example, ours one over all rows (the same sums in another
        // order, so equal within rounding rather than bit for bit)
        let layer = LinearConfig::new(16, 24).init(&dev);
        let x = Tensor::<3>::random([50, 7, 16], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let (ours, theirs) = (linear_f32(&layer, x.clone()), layer.forward(x.clone()));
        assert_eq!(ours.dims(), [50, 7, 24]);
        let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
            assert_eq!(a.len(), b.len());
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-5 * q.abs().max(1.0), "3-D {what}: {p} vs {q}");
            }
        };
        let v = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        close(v(ours.clone().inner()), v(theirs.clone().inner()), "y");
        let (go, gt) = ((ours * 1.5).sum().backward(), (theirs * 1.5).sum().backward());
        close(v(x.grad(&go).unwrap()), v(x.grad(&gt).unwrap()), "dx");
        let dw = |g| layer.weight.val().grad(g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        close(dw(&go), dw(&gt), "dW");
    }

    /// The mask built in parallel chunks (on the widest instruction set) is element for element
    /// the serial definition — `splitmix64(base + i)` against the threshold — across chunk
    /// boundaries, for two masks drawn one after the other from the pass's stream; and every
    /// instruction set's chunk loop gives the same mask.
    #[test]
    fn dropout_masks_are_the_serial_definition_in_parallel_and_on_every_instruction_set() {
        let dev = Device::flex().autodiff();
        let pass = Pass::seeded(Precision::F32, 77);
        let drop = Dropout::new(0.3);
        let (rows, cols) = (3, MASK_CHUNK / 2 + 17); // 1.5 chunks and a ragged end
        let ones = Tensor::<2>::ones([rows, cols], &dev);
        let keep = 0.7f64;
        let threshold = (keep * (1u64 << 32) as f64) as u64;
        let scale = (1.0 / keep) as f32;
        let mut base = pass.dropout_stream();
        for draw in 0..2 {
            let got = drop.forward(ones.clone(), &pass).into_data().try_to_vec::<f32>().unwrap();
            for (i, &g) in got.iter().enumerate() {
                let want = if splitmix64(base.wrapping_add(i as u64)) >> 32 < threshold { scale } else { 0.0 };
                assert_eq!(g, want, "draw {draw}, element {i}");
            }
            base = base.wrapping_add((rows * cols) as u64);
        }
        let serial = {
            let mut out = vec![0f32; 5000];
            crate::simd::run_on(crate::simd::Isa::Baseline, MaskChunk { out: &mut out, first: 9, threshold, scale }).unwrap();
            out
        };
        for isa in [crate::simd::Isa::Avx2, crate::simd::Isa::Avx512] {
            let mut out = vec![0f32; 5000];
            if crate::simd::run_on(isa, MaskChunk { out: &mut out, first: 9, threshold, scale }).is_some() {
                assert_eq!(out, serial, "{isa:?}");
            }
        }
    }

    #[test]
    fn bf16_products_stay_close_to_f32_and_keep_gradients() {
        let dev = Device::flex().autodiff();
        dev.seed(9);
        let mlp = Mlp::new(64, &[128, 64], 8, 0.0, &dev);
        let x = Tensor::<2>::random([256, 64], Distribution::Normal(0.0, 1.0), &dev).require_grad();
        let full = mlp.forward(x.clone(), &Pass::f32());
        let half = mlp.forward(x.clone(), &Pass::new(Precision::Bf16, 0));
        assert_eq!(half.dtype(), burn::tensor::DType::F32);
        let scale = full.clone().abs().max().into_scalar::<f32>();
        let diff = (full.clone() - half.clone()).abs().max().into_scalar::<f32>();
        // bf16 keeps 8 mantissa bits: ~0.4% per rounding, a few roundings deep.
        assert!(diff / scale < 0.03, "bf16 differs by {diff} at scale {scale}");
        assert!(diff > 0.0, "the bf16 path must actually round");
        let g = half.sum().backward();
        let gw = mlp.hidden[0].weight.val().grad(&g).expect("weights get gradients through the casts");
        assert_eq!(gw.dtype(), burn::tensor::DType::F32);
        assert!(gw.abs().sum().into_scalar::<f32>() > 0.0);
    }
}
