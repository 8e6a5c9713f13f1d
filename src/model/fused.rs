//! Fused kernels for the CPU backend (Flex), registered as a burn backend extension with a
//! handwritten backward pass.
//!
//! LayerNorm is the one that matters: burn differentiates it as ~10 separate broadcast ops, each
//! a full pass over the activations with its own backward, which made a Wukong layer's
//! LayerNorm over `[4096, 32, 64]` cost ~0.4 s forward + backward (PyTorch's fused kernel: 18
//! ms). Here the forward is one pass per row (mean, variance, normalize, scale, shift) and the
//! backward one pass per row plus a reduction for γ and β. Other backends (GPU) keep burn's
//! LayerNorm; [`layer_norm`] picks.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::layers::Precision;

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// LayerNorm over the last axis: `(x − mean) / √(var + ε) · γ + β`.
    fn fused_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self>;
    /// LayerNorm of `a + b` (a residual connection), the sum computed inside the kernel.
    fn fused_add_layer_norm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
    /// `x · w` (`[m, k] · [k, n]`) with both operands rounded to bf16 and f32 accumulation (the
    /// result rounded to bf16), as f32: [`super::bf16`].
    fn bf16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Batched product `a_b · b_b` of `[B_a, m, k]` and `[B_b, k, n]` (`B_a`, `B_b` each 1 or
    /// B; a batch of 1 is shared by every example), in f32 or (`bf16`) on the CPU's bf16
    /// dot-product units: [`bmm`].
    fn fused_bmm(a: FloatTensor<Self>, b: FloatTensor<Self>, bf16: bool) -> FloatTensor<Self>;
    /// FM's `X (Xᵀ Y)` for `x` `[b, n, d]` and `y` `[1 or b, n, k]` in bf16, both products of an
    /// example at once: [`fm`].
    fn fused_fm(x: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self>;
    /// BatchNorm of `x` `[batch, channels, …]` with the batch's statistics: `(y, mean, biased
    /// variance)`, the statistics per channel and untracked ([`super::batch_norm`]).
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// One xDeepFM CIN layer: `h` `[b, H, d]`, `x0` `[b, m, d]`, `w` `[H·m, H']` → `[b, H', d]`
    /// without the outer-product tensor ([`super::cin`]).
    fn fused_cin(h: FloatTensor<Self>, x0: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// eˣ of every element on the widest vector unit ([`super::exp`]).
    fn fused_exp(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Rows per parallel task: large enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 256;

/// `t` itself (shared, not copied) when it is a contiguous f32 tensor, else one contiguous copy.
fn contiguous(t: &FlexTensor) -> FlexTensor {
    match t.as_slice::<f32>() {
        Some(_) if t.is_contiguous() => t.clone(),
        _ => t.to_contiguous(),
    }
}

/// The values of a tensor made by [`contiguous`], in row-major order.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Sum with eight independent accumulators, so that it vectorizes (a plain float sum is a
/// sequential dependency chain: the first version of these kernels spent a quarter of a Frappe
/// step in scalar adds).
#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Σ aᵢ·bᵢ, vectorized like [`lane_sum`].
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// An output buffer the kernels fill completely (no zeroing pass: these kernels are memory-bound).
fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit<f32> needs no initialization.
    unsafe { v.set_len(n) };
    v
}

/// # Safety
/// Every element of `v` has been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

/// Per-row statistics and output of the forward pass.
struct Normalized {
    y: FlexTensor,
    /// The normalized input `x` (the sum `a + b` for the residual form; else `None`: the caller
    /// keeps its input).
    sum: Option<FlexTensor>,
    /// `[rows, 2]`: mean and 1/√(var+ε) of each row.
    stats: FlexTensor,
}

/// Row length, 1/length and ε of a LayerNorm, by value (the kernels' loop invariants).
#[derive(Clone, Copy)]
struct LnConsts {
    d: usize,
    inv_d: f32,
    eps: f32,
}

/// One task's rows of the forward pass: outputs (`y`, the sum `a + b` when `xb` is given, the
/// row statistics) and inputs.
struct LnRows<'a> {
    y: &'a mut [MaybeUninit<f32>],
    sum: &'a mut [MaybeUninit<f32>],
    st: &'a mut [MaybeUninit<f32>],
    xa: &'a [f32],
    xb: Option<&'a [f32]>,
    gamma: &'a [f32],
    beta: &'a [f32],
}

#[inline(always)]
fn ln_forward_body(t: LnRows, k: LnConsts) {
    let LnConsts { d, inv_d, eps } = k;
    let LnRows { y, sum, st, xa, xb, gamma, beta } = t;
    for r in 0..y.len() / d {
        let row = r * d..(r + 1) * d;
        let x: &[f32] = match xb {
            Some(xb) => {
                let out = &mut sum[row.clone()];
                for ((o, p), q) in out.iter_mut().zip(&xa[row.clone()]).zip(&xb[row.clone()]) {
                    o.write(p + q);
                }
                // SAFETY: the row was just written in full.
                unsafe { std::slice::from_raw_parts(out.as_ptr() as *const f32, d) }
            }
            None => &xa[row.clone()],
        };
        let mean = lane_sum(x) * inv_d;
        let mut acc = [0.0f32; 8];
        let chunks = x.chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        for c in chunks {
            for l in 0..8 {
                acc[l] += (c[l] - mean) * (c[l] - mean);
            }
        }
        let s = 1.0 / ((acc.iter().sum::<f32>() + rest) * inv_d + eps).sqrt();
        st[2 * r].write(mean);
        st[2 * r + 1].write(s);
        for (((o, v), g), b) in y[row].iter_mut().zip(x).zip(gamma.iter()).zip(beta.iter()) {
            o.write((v - mean) * s * g + b);
        }
    }
}

/// One task's rows of the backward pass: dx written, dγ and dβ accumulated.
struct LnGradRows<'a> {
    dx: &'a mut [MaybeUninit<f32>],
    g: &'a [f32],
    x: &'a [f32],
    st: &'a [f32],
    gamma: &'a [f32],
    dgamma: &'a mut [f32],
    dbeta: &'a mut [f32],
    /// Scratch rows of length d.
    h: &'a mut [f32],
    xh: &'a mut [f32],
}

#[inline(always)]
fn ln_backward_body(t: LnGradRows, k: LnConsts) {
    let LnConsts { d, inv_d, .. } = k;
    let LnGradRows { dx, g, x, st, gamma, dgamma, dbeta, h, xh } = t;
    for (((dx, g), x), st) in dx.chunks_exact_mut(d).zip(g.chunks_exact(d)).zip(x.chunks_exact(d)).zip(st.chunks_exact(2)) {
        let (mean, s) = (st[0], st[1]);
        for ((((h, xh), (g, gm)), x), (dg, db)) in
            h.iter_mut().zip(xh.iter_mut()).zip(g.iter().zip(gamma.iter())).zip(x).zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
        {
            *xh = (x - mean) * s;
            *h = g * gm;
            *dg += g * *xh;
            *db += g;
        }
        let mean_h = lane_sum(h) * inv_d;
        let mean_hx = lane_dot(h, xh) * inv_d;
        for ((dx, h), xh) in dx.iter_mut().zip(h.iter()).zip(xh.iter()) {
            dx.write(s * (h - mean_h - xh * mean_hx));
        }
    }
}

// The LayerNorm loops run on the widest vector instructions the CPU has (`crate::simd`): on Zen 4
// the SSE2 forward was 11.2% of a Frappe f32 step, 8.0% with AVX-512.
impl crate::simd::Wide for (LnRows<'_>, LnConsts) {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        ln_forward_body(self.0, self.1)
    }
}

impl crate::simd::Wide for (LnGradRows<'_>, LnConsts) {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        ln_backward_body(self.0, self.1)
    }
}

/// LayerNorm of `a` (or of `a + b`) over the last axis: one read of the input(s), one write of
/// the output (and of the sum, which the backward pass needs).
fn ln_forward(a: &FlexTensor, b: Option<&FlexTensor>, gamma: &FlexTensor, beta: &FlexTensor, eps: f64) -> Normalized {
    assert_eq!(a.dtype(), DType::F32, "fused LayerNorm is f32-only");
    let shape = a.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let (a, gamma, beta, b) = (contiguous(a), contiguous(gamma), contiguous(beta), b.map(contiguous));
    let (xa, gs, bs, xb) = (f32s(&a), f32s(&gamma), f32s(&beta), b.as_ref().map(f32s));
    let rows = xa.len() / d;
    let inv_d = 1.0 / d as f32;
    let mut y = uninit(xa.len());
    let mut sum = uninit(if xb.is_some() { xa.len() } else { 0 });
    let mut stats = uninit(2 * rows);
    let chunk = d * ROWS_PER_TASK;
    let k = LnConsts { d, inv_d, eps: eps as f32 };
    let kernel = |y: &mut [MaybeUninit<f32>], sum: &mut [MaybeUninit<f32>], st: &mut [MaybeUninit<f32>], xa: &[f32], xb: Option<&[f32]>| {
        crate::simd::run((LnRows { y, sum, st, xa, xb, gamma: gs, beta: bs }, k))
    };
    match &xb {
        Some(xb) => y
            .par_chunks_mut(chunk)
            .zip(sum.par_chunks_mut(chunk))
            .zip(stats.par_chunks_mut(2 * ROWS_PER_TASK))
            .zip(xa.par_chunks(chunk).zip(xb.par_chunks(chunk)))
            .for_each(|(((y, sm), st), (xa, xb))| kernel(y, sm, st, xa, Some(xb))),
        None => y
            .par_chunks_mut(chunk)
            .zip(stats.par_chunks_mut(2 * ROWS_PER_TASK))
            .zip(xa.par_chunks(chunk))
            .for_each(|((y, st), xa)| kernel(y, &mut [], st, xa, None)),
    }
    // SAFETY: the kernels write every element of y, sum (when used) and stats.
    let (y, sum, stats) = unsafe { (assume_init(y), assume_init(sum), assume_init(stats)) };
    Normalized { y: tensor(y, shape.clone()), sum: xb.is_some().then(|| tensor(sum, shape)), stats: tensor(stats, Shape::new([rows, 2])) }
}

/// Backward: with `x̂ = (x − mean)·rstd` and `h = g·γ`,
/// `dx = rstd·(h − mean(h) − x̂·mean(h·x̂))`, `dγ = Σ g·x̂`, `dβ = Σ g`.
fn ln_backward(grad: &FlexTensor, x: &FlexTensor, stats: &FlexTensor, gamma: &FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let (grad, x, stats, gamma) = (contiguous(grad), contiguous(x), contiguous(stats), contiguous(gamma));
    let (gs, xs, st, gm) = (f32s(&grad), f32s(&x), f32s(&stats), f32s(&gamma));
    let inv_d = 1.0 / d as f32;
    let mut dx = uninit(gs.len());
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(gs.par_chunks(d * ROWS_PER_TASK))
        .zip(xs.par_chunks(d * ROWS_PER_TASK))
        .zip(st.par_chunks(2 * ROWS_PER_TASK))
        .map(|(((dx, g), x), st)| {
            let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
            let (mut h, mut xh) = (vec![0.0f32; d], vec![0.0f32; d]);
            let rows = LnGradRows { dx, g, x, st, gamma: gm, dgamma: &mut dgamma, dbeta: &mut dbeta, h: &mut h, xh: &mut xh };
            crate::simd::run((rows, LnConsts { d, inv_d, eps: 0.0 }));
            (dgamma, dbeta)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pg, pb) in partials {
        dgamma.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
        dbeta.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    // SAFETY: every row of dx was written.
    let dx = unsafe { assume_init(dx) };
    (tensor(dx, shape), tensor(dgamma, Shape::new([d])), tensor(dbeta, Shape::new([d])))
}

impl FusedOps for Flex {
    fn fused_layer_norm(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, epsilon: f64) -> FlexTensor {
        ln_forward(&x, None, &gamma, &beta, epsilon).y
    }
    fn fused_add_layer_norm(a: FlexTensor, b: FlexTensor, gamma: FlexTensor, beta: FlexTensor, epsilon: f64) -> FlexTensor {
        ln_forward(&a, Some(&b), &gamma, &beta, epsilon).y
    }
    fn bf16_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        bf16_forward(&x, &w).0
    }
    fn fused_bmm(a: FlexTensor, b: FlexTensor, bf16: bool) -> FlexTensor {
        batched_product(View3::of(&a), View3::of(&b), bf16)
    }
    fn fused_fm(x: FlexTensor, y: FlexTensor) -> FlexTensor {
        fm_forward(&x, &y).0
    }
    fn fused_batch_norm_train(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, epsilon: f64) -> (FlexTensor, FlexTensor, FlexTensor) {
        bn_forward(&x, &gamma, &beta, epsilon)
    }
    fn fused_cin(h: FlexTensor, x0: FlexTensor, w: FlexTensor) -> FlexTensor {
        cin_forward(&h, &x0, &w).0
    }
    fn fused_exp(x: FlexTensor) -> FlexTensor {
        exp_forward(x)
    }
}

/// eˣ in place when `x` is a whole contiguous buffer nobody else holds (a product's fresh
/// output: AFN+'s neurons are `[4096, 800, 64]`, 840 MB, on Frappe), else into a new one.
fn exp_forward(mut x: FlexTensor) -> FlexTensor {
    let numel = x.layout().shape().num_elements();
    if x.dtype() == DType::F32
        && x.is_contiguous()
        && x.layout().start_offset() == 0
        && let Some(values) = x.try_storage_mut::<f32>().filter(|v| v.len() == numel)
    {
        super::exp::exp_in_place(values);
        return x;
    }
    let shape = x.layout().shape().clone();
    let x = contiguous(&x);
    tensor(super::exp::exp(f32s(&x)), shape)
}

#[derive(Debug)]
struct ExpBackward;

impl Backward<Flex, 1> for ExpBackward {
    /// The output (eˣ is its own derivative).
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let y = ops.state;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let [px] = ops.parents;
        if let Some(node) = px {
            let shape = y.layout().shape().clone();
            grads.register::<Flex>(node.id, tensor(super::exp::exp_backward(f32s(&g), f32s(&y)), shape));
        }
    }
}

/// [`super::cin::forward`] on tensors: the output and the layer's sizes.
fn cin_forward(h: &FlexTensor, x0: &FlexTensor, w: &FlexTensor) -> (FlexTensor, super::cin::CinDims) {
    let (hs, xs, ws) = (h.layout().shape(), x0.layout().shape(), w.layout().shape());
    assert!(hs.num_dims() == 3 && xs.num_dims() == 3 && ws.num_dims() == 2, "fused CIN: [b, H, d], [b, m, d] and [H·m, H']");
    let n = super::cin::CinDims { b: hs[0], h: hs[1], m: xs[1], d: hs[2], o: ws[1] };
    assert!(xs[0] == n.b && xs[2] == n.d && ws[0] == n.h * n.m, "fused CIN: shapes {hs:?}, {xs:?}, {ws:?}");
    let (h, x0, w) = (contiguous(h), contiguous(x0), contiguous(w));
    let out = super::cin::forward(f32s(&h), f32s(&x0), f32s(&w), n);
    (tensor(out, Shape::new([n.b, n.o, n.d])), n)
}

#[derive(Debug)]
struct CinBackward;

impl Backward<Flex, 3> for CinBackward {
    /// h, x0, W (shared, not copied) and the sizes.
    type State = (FlexTensor, FlexTensor, FlexTensor, super::cin::CinDims);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (h, x0, w, n) = ops.state;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let (h, x0, w) = (contiguous(&h), contiguous(&x0), contiguous(&w));
        let (dh, dx0, dw) = super::cin::backward(f32s(&g), f32s(&h), f32s(&x0), f32s(&w), n);
        let [ph, px, pw] = ops.parents;
        let grads_of = [(ph, dh, vec![n.b, n.h, n.d]), (px, dx0, vec![n.b, n.m, n.d]), (pw, dw, vec![n.h * n.m, n.o])];
        for (parent, grad, shape) in grads_of {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, tensor(grad, Shape::from(shape)));
            }
        }
    }
}

/// [`super::batch_norm::forward`] on tensors: `(y, mean, var)`.
fn bn_forward(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, eps: f64) -> (FlexTensor, FlexTensor, FlexTensor) {
    assert_eq!(x.dtype(), DType::F32, "fused BatchNorm is f32-only");
    let shape = x.layout().shape().clone();
    let dims = super::batch_norm::dims(shape.as_slice());
    let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
    let (y, mean, var) = super::batch_norm::forward(f32s(&x), dims, f32s(&gamma), f32s(&beta), eps);
    let c = Shape::new([dims[1]]);
    (tensor(y, shape), tensor(mean, c.clone()), tensor(var, c))
}

/// The input, γ, the batch's mean and variance, ε.
type BnState = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f64);

#[derive(Debug)]
struct BatchNormBackward;

impl Backward<Flex, 3> for BatchNormBackward {
    type State = BnState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (x, gamma, mean, var, eps) = ops.state;
        let g = contiguous(&grads.consume::<Flex>(&ops.node));
        let shape = x.layout().shape().clone();
        let dims = super::batch_norm::dims(shape.as_slice());
        let x = contiguous(&x);
        let (dx, dgamma, dbeta) =
            super::batch_norm::backward(f32s(&g), f32s(&x), dims, f32s(&mean), f32s(&var), f32s(&contiguous(&gamma)), eps);
        let c = Shape::new([dims[1]]);
        let [px, pg, pb] = ops.parents;
        for (parent, grad) in [(px, tensor(dx, shape)), (pg, tensor(dgamma, c.clone())), (pb, tensor(dbeta, c))] {
            if let Some(n) = parent {
                grads.register::<Flex>(n.id, grad);
            }
        }
    }
}

/// A strided `[batch, rows, cols]` f32 view of a tensor's storage: element `(e, i, j)` at
/// `data[offset + e·batch_stride + i·row_stride + j·col_stride]`; a batch of 1 has stride 0,
/// so the one matrix serves every example.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View3<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) offset: usize,
    pub(crate) batch: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) batch_stride: isize,
    pub(crate) row_stride: isize,
    pub(crate) col_stride: isize,
}

impl<'a> View3<'a> {
    fn of(t: &'a FlexTensor) -> Self {
        let (shape, strides) = (t.layout().shape(), t.layout().strides());
        assert_eq!(shape.num_dims(), 3, "fused_bmm: a 3-D tensor");
        let batch = shape[0];
        Self {
            data: t.storage::<f32>(),
            offset: t.layout().start_offset(),
            batch,
            rows: shape[1],
            cols: shape[2],
            batch_stride: if batch == 1 { 0 } else { strides[0] },
            row_stride: strides[1],
            col_stride: strides[2],
        }
    }

    /// Whether this is the per-example transpose of a contiguous `[batch, cols, rows]` tensor
    /// (its axes 1 and 2 swapped), with more than one example.
    fn is_swapped(&self) -> bool {
        self.batch > 1
            && self.rows > 1
            && self.cols > 1
            && self.row_stride == 1
            && self.col_stride == self.rows as isize
            && self.batch_stride == (self.rows * self.cols) as isize
    }

    /// The per-example transposes (no copy).
    pub(crate) fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    pub(crate) fn matrix(&self, e: usize) -> *const f32 {
        // SAFETY: the offset stays inside the storage for every valid example index (the
        // layout's own invariant); an out-of-range pointer is never formed for e < batch.
        unsafe { self.data.as_ptr().offset(self.offset as isize + e as isize * self.batch_stride) }
    }
}

/// `out = a · b` for one example (`acc`: add to `out` instead of overwriting it), row-major
/// `out` of `a.rows × b.cols`.
fn gemm_one(a: &View3, b: &View3, e: usize, out: &mut [f32], acc: bool, parallelism: gemm::Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert_eq!(out.len(), m * n);
    // SAFETY: both views describe valid strided matrices inside their storage; `out` is a
    // dense m × n row-major buffer. gemm computes dst = α·dst + β·(lhs · rhs).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.matrix(e),
            a.col_stride,
            a.row_stride,
            b.matrix(e),
            b.col_stride,
            b.row_stride,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `[batch, a.rows, b.cols]` = `a_e · b_e` for every example, written into a fresh buffer that is
/// never zero-filled or copied (burn-flex's batched matmul allocates its output by zero-filling a
/// byte vector and copying it into an aligned one: 14% of a bf16 Criteo step went to that).
/// Examples run in parallel, one gemm each; a single product lets gemm parallelize itself.
/// `bf16`: [`super::amx::batched_dot`] instead.
fn batched_product(a: View3, b: View3, bf16: bool) -> FlexTensor {
    assert_eq!(a.cols, b.rows, "fused_bmm: [{}, {}] · [{}, {}]", a.rows, a.cols, b.rows, b.cols);
    assert!(a.batch == b.batch || a.batch == 1 || b.batch == 1, "fused_bmm: batches {} and {}", a.batch, b.batch);
    let (batch, m, n) = (a.batch.max(b.batch), a.rows, b.cols);
    if bf16 {
        return tensor(super::amx::batched_dot(a, b, false), Shape::new([batch, m, n]));
    }
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    if batch * m * n > 0 {
        // SAFETY: gemm writes every element of each m × n output without reading it (`acc` false).
        unsafe { out.set_len(batch * m * n) };
        if batch == 1 {
            gemm_one(&a, &b, 0, &mut out, false, gemm::Parallelism::Rayon(0));
        } else {
            out.par_chunks_mut(m * n).enumerate().for_each(|(e, o)| gemm_one(&a, &b, e, o, false, gemm::Parallelism::None));
        }
    }
    tensor(out, Shape::new([batch, m, n]))
}

/// `Σ_e a_e · b_e` (`[1, a.rows, b.cols]`): the gradient of an operand shared by every example.
fn summed_product(a: View3, b: View3, bf16: bool) -> FlexTensor {
    let (batch, m, n) = (a.batch.max(b.batch), a.rows, b.cols);
    if bf16 {
        return tensor(super::amx::batched_dot(a, b, true), Shape::new([1, m, n]));
    }
    let chunk = batch.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let sum = (0..batch)
        .step_by(chunk)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let mut acc = vec![0f32; m * n];
            for e in start..(start + chunk).min(batch) {
                gemm_one(&a, &b, e, &mut acc, e > start, gemm::Parallelism::None);
            }
            acc
        })
        .reduce_with(|mut x, y| {
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
            x
        })
        .unwrap_or_else(|| vec![0f32; m * n]);
    tensor(sum, Shape::new([1, m, n]))
}

/// [`super::amx::fm_forward`] as tensors: the output `[b, n, k]` and `Z = Xᵀ Y` `[b, d, k]`.
fn fm_forward(x: &FlexTensor, y: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let (vx, vy) = (View3::of(x), View3::of(y));
    let (b, n, d, k) = (vx.batch, vx.rows, vx.cols, vy.cols);
    let (out, z) = super::amx::fm_forward(vx, vy);
    (tensor(out, Shape::new([b, n, k])), tensor(z, Shape::new([b, d, k])))
}

#[derive(Debug)]
struct FmBackward;

impl Backward<Flex, 2> for FmBackward {
    /// X and Y (shared, not copied) and the forward's `Z = Xᵀ Y`.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (x, y, z) = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let (vx, vy, vg) = (View3::of(&x), View3::of(&y), View3::of(&g));
        let (dx, dy) = super::amx::fm_backward(vx, vy, f32s(&z), vg);
        let [px, py] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, tensor(dx, x.layout().shape().clone()));
        }
        if let Some(node) = py {
            grads.register::<Flex>(node.id, tensor(dy, y.layout().shape().clone()));
        }
    }
}

#[derive(Debug)]
struct BmmBackward;

impl Backward<Flex, 2> for BmmBackward {
    /// The operands (shared, not copied) and whether the products run in bf16.
    type State = (FlexTensor, FlexTensor, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (a, b, bf16) = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let (va, vb, vg) = (View3::of(&a), View3::of(&b), View3::of(&g));
        let [pa, pb] = ops.parents;
        if let Some(node) = pa {
            // dA_e = dC_e · B_eᵀ (summed over the examples when A is shared). An operand that is
            // a swapped-axes view of a contiguous tensor (FM's Xᵀ) gets its gradient in the
            // same memory order, as (B_e · dC_eᵀ)ᵀ: the swap's backward then hands a contiguous
            // gradient to the sum with the tensor's other uses (a strided add cost 10% of the
            // FM block's products).
            let da = if va.batch == 1 && vg.batch > 1 {
                summed_product(vg, vb.t(), bf16)
            } else if va.is_swapped() {
                batched_product(vb, vg.t(), bf16).transpose(1, 2)
            } else {
                batched_product(vg, vb.t(), bf16)
            };
            grads.register::<Flex>(node.id, da);
        }
        if let Some(node) = pb {
            // dB_e = A_eᵀ · dC_e (summed over the examples when B is shared; in B's memory order
            // when B is a swapped-axes view, as above)
            let db = if vb.batch == 1 && vg.batch > 1 {
                summed_product(va.t(), vg, bf16)
            } else if vb.is_swapped() {
                batched_product(vg.t(), va, bf16).transpose(1, 2)
            } else {
                batched_product(va.t(), vg, bf16)
            };
            grads.register::<Flex>(node.id, db);
        }
    }
}

/// What the backward products need, and `[m, k, n]`. On AMX the f32 operands themselves (shared,
/// not copied): the kernel rounds them to bf16 as it packs, which costs less than keeping rounded
/// copies (a separate rounding pass over every operand was 5% of a bf16 table5 step there). On
/// gemmkit's path the operands rounded once in the forward pass (half the bytes of f32), as
/// gemmkit multiplies bf16 storage.
#[derive(Clone)]
enum Bf16Operands {
    F32(FlexTensor, FlexTensor),
    /// X, and W's packing in both orientations (`super::packed`): dX reads `Wᵀ`'s packing.
    Packed(FlexTensor, std::sync::Arc<super::amx::PackedWeight>),
    Rounded(Vec<gemmkit::bf16>, Vec<gemmkit::bf16>),
}

impl std::fmt::Debug for Bf16Operands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bf16Operands::F32(..) => "F32",
            Bf16Operands::Packed(..) => "Packed",
            Bf16Operands::Rounded(..) => "Rounded",
        })
    }
}

type Bf16State = (Bf16Operands, [usize; 3]);

fn bf16_forward(x: &FlexTensor, w: &FlexTensor) -> (FlexTensor, Bf16State) {
    use super::bf16::{Bf16Kernel, Operand, gemmkit_product, product, to_bf16};
    let (xs, ws) = (x.layout().shape().clone(), w.layout().shape().clone());
    let ([m, k], [k2, n]) = ([xs[0], xs[1]], [ws[0], ws[1]]);
    assert_eq!(k, k2, "bf16_matmul: [{m}, {k}] · [{k2}, {n}]");
    let (y, operands) = if matches!(Bf16Kernel::chosen(), Bf16Kernel::Amx | Bf16Kernel::Avx512) {
        let x = contiguous(x);
        if let Some(packed) = super::packed::lookup_or_pack(w, [k, n]) {
            (super::amx::weight_product(Operand::new(f32s(&x), m, k), &packed, false), Bf16Operands::Packed(x, packed))
        } else {
            let w = contiguous(w);
            (product(Operand::new(f32s(&x), m, k), Operand::new(f32s(&w), k, n)), Bf16Operands::F32(x, w))
        }
    } else {
        let (xb, wb) = (to_bf16(f32s(&contiguous(x))), to_bf16(f32s(&contiguous(w))));
        (gemmkit_product(Operand::new(&xb, m, k), Operand::new(&wb, k, n)), Bf16Operands::Rounded(xb, wb))
    };
    (tensor(y, Shape::new([m, n])), (operands, [m, k, n]))
}

#[derive(Debug)]
struct Bf16MatmulBackward;

impl Backward<Flex, 2> for Bf16MatmulBackward {
    type State = Bf16State;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        use super::bf16::{Operand, gemmkit_product, product, to_bf16};
        let (operands, [m, k, n]) = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let [px, pw] = ops.parents;
        // dX = dY · Wᵀ, dW = Xᵀ · dY
        let (dx, dw) = match operands {
            Bf16Operands::F32(x, w) => {
                let g = contiguous(&g);
                let dx = px.as_ref().map(|_| product(Operand::new(f32s(&g), m, n), Operand::transpose_of(f32s(&w), k, n)));
                let dw = pw.as_ref().map(|_| product(Operand::transpose_of(f32s(&x), m, k), Operand::new(f32s(&g), m, n)));
                (dx, dw)
            }
            Bf16Operands::Packed(x, w) => {
                let g = contiguous(&g);
                let dx = px.as_ref().map(|_| super::amx::weight_product(Operand::new(f32s(&g), m, n), &w, true));
                let dw = pw.as_ref().map(|_| product(Operand::transpose_of(f32s(&x), m, k), Operand::new(f32s(&g), m, n)));
                (dx, dw)
            }
            Bf16Operands::Rounded(xb, wb) => {
                let g = to_bf16(f32s(&contiguous(&g)));
                let dx = px.as_ref().map(|_| gemmkit_product(Operand::new(&g, m, n), Operand::transpose_of(&wb, k, n)));
                let dw = pw.as_ref().map(|_| gemmkit_product(Operand::transpose_of(&xb, m, k), Operand::new(&g, m, n)));
                (dx, dw)
            }
        };
        if let (Some(node), Some(dx)) = (px, dx) {
            grads.register::<Flex>(node.id, tensor(dx, Shape::new([m, k])));
        }
        if let (Some(node), Some(dw)) = (pw, dw) {
            grads.register::<Flex>(node.id, tensor(dw, Shape::new([k, n])));
        }
    }
}

/// State of both backward passes: the normalized input, its row statistics, γ.
type LnState = (FlexTensor, FlexTensor, FlexTensor);

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LnState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (x, stats, gamma) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, dgamma, dbeta) = ln_backward(&grad, &x, &stats, &gamma);
        let [px, pg, pb] = ops.parents;
        for (parent, g) in [(px, dx), (pg, dgamma), (pb, dbeta)] {
            if let Some(n) = parent {
                grads.register::<Flex>(n.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct AddLayerNormBackward;

impl Backward<Flex, 4> for AddLayerNormBackward {
    type State = LnState;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (x, stats, gamma) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, dgamma, dbeta) = ln_backward(&grad, &x, &stats, &gamma);
        let [pa, pb, pg, pbeta] = ops.parents;
        // Both summands receive dx (the sum's gradient).
        if let Some(n) = pa {
            grads.register::<Flex>(n.id, dx.clone());
        }
        for (parent, g) in [(pb, dx), (pg, dgamma), (pbeta, dbeta)] {
            if let Some(n) = parent {
                grads.register::<Flex>(n.id, g);
            }
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_bmm(a: FloatTensor<Self>, b: FloatTensor<Self>, bf16: bool) -> FloatTensor<Self> {
        let y = <Flex as FusedOps>::fused_bmm(a.primitive().clone(), b.primitive().clone(), bf16);
        let state = (a.primitive().clone(), b.primitive().clone(), bf16);
        match BmmBackward.prepare::<C>([a.node(), b.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_fm(x: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        let (out, z) = fm_forward(x.primitive(), y.primitive());
        let state = (x.primitive().clone(), y.primitive().clone(), z);
        match FmBackward.prepare::<C>([x.node(), y.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (y, mean, var) = bn_forward(x.primitive(), gamma.primitive(), beta.primitive(), epsilon);
        let state = (x.primitive().clone(), gamma.primitive().clone(), mean.clone(), var.clone(), epsilon);
        let y = match BatchNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, <Self as burn::backend::AutodiffBackend>::from_inner(mean), <Self as burn::backend::AutodiffBackend>::from_inner(var))
    }

    fn fused_exp(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // the input's values are not needed again (the backward reads the output): hand its
        // buffer to the kernel, which overwrites it where nobody else holds it
        let (input, node) = x.into_parts();
        let y = exp_forward(input);
        match ExpBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_cin(h: FloatTensor<Self>, x0: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (out, n) = cin_forward(h.primitive(), x0.primitive(), w.primitive());
        let state = (h.primitive().clone(), x0.primitive().clone(), w.primitive().clone(), n);
        match CinBackward.prepare::<C>([h.node(), x0.node(), w.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn bf16_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (y, state) = bf16_forward(x.primitive(), w.primitive());
        match Bf16MatmulBackward.prepare::<C>([x.node(), w.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let n = ln_forward(x.primitive(), None, gamma.primitive(), beta.primitive(), epsilon);
        let (input, gamma_value) = (x.primitive().clone(), gamma.primitive().clone());
        match LayerNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((input, n.stats, gamma_value), n.y),
            OpsKind::UnTracked(prep) => prep.finish(n.y),
        }
    }

    fn fused_add_layer_norm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let n = ln_forward(a.primitive(), Some(b.primitive()), gamma.primitive(), beta.primitive(), epsilon);
        let gamma_value = gamma.primitive().clone();
        let sum = n.sum.expect("the residual form returns the sum");
        match AddLayerNormBackward.prepare::<C>([a.node(), b.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((sum, n.stats, gamma_value), n.y),
            OpsKind::UnTracked(prep) => prep.finish(n.y),
        }
    }
}

/// `WUKONG_FUSED=0` turns the fused kernels off (burn's own ops everywhere), for A/B timing and
/// for ruling them out when debugging.
pub(crate) fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("WUKONG_FUSED").map(|v| v != "0").unwrap_or(true))
}

/// `x · w` (`[m, k] · [k, n]`) in bf16 with f32 accumulation, as f32: the bf16 kernel
/// ([`super::bf16`]) where [`super::bf16::Bf16Kernel::chosen`] picks it and both operands are f32
/// on the CPU backend, else the portable path (operands cast to bf16, burn's product).
pub fn bf16_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if super::bf16::Bf16Kernel::chosen().is_kernel() && fused_enabled() && flex_f32(&x) && flex_f32(&w) {
        bf16_matmul_kernel(x, w)
    } else {
        x.cast(DType::BF16).matmul(w.cast(DType::BF16)).cast(DType::F32)
    }
}

/// [`bf16_matmul`] always through the bf16 kernel (f32 operands on the CPU backend).
pub fn bf16_matmul_kernel(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::bf16_matmul(x.into_dispatch(), w.into_dispatch()))
}

/// `a_e · b_e` per example for `[B_a, m, k]` and `[B_b, k, n]`, where `B_a` and `B_b` are each B or
/// 1 (one matrix shared by every example): the interaction products (FM's `Xᵀ Y` and `X (Xᵀ Y)`,
/// the LCB's `Wᵀ X`). On the CPU backend our own op: in f32 it calls the same `gemm` crate as
/// burn but writes its outputs (and gradients) straight into fresh buffers; in bf16 on a CPU with
/// AVX512-BF16 (the `amx` or `avx512` bf16 kernel chosen) the small products run on
/// `vdpbf16ps` ([`super::amx::batched_dot`]), forward and backward, like autocast's bf16 `bmm`
/// (elsewhere they stay f32). Other backends: burn's `matmul`.
pub fn bmm(a: Tensor<3>, b: Tensor<3>, precision: Precision) -> Tensor<3> {
    let [ba, bb] = [a.dims()[0], b.dims()[0]];
    if fused_enabled() && flex_f32(&a) && flex_f32(&b) && (ba == bb || ba == 1 || bb == 1) {
        let bf16 = batched_bf16(precision);
        Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_bmm(a.into_dispatch(), b.into_dispatch(), bf16))
    } else {
        a.matmul(b)
    }
}

/// `x · w` (`[m, k] · [k, n]`) in f32: on the CPU backend through [`bmm`]'s op as one product
/// (gemm, like burn's `matmul`, but its output and both gradients written straight into fresh
/// buffers: burn-flex allocates every product's output by zero-filling a byte vector and copying
/// it into an aligned one, which made a Linear layer's forward + backward 3–34% slower across the
/// MLP shapes of `examples/opbench.rs`); burn's `matmul` elsewhere.
pub fn matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if fused_enabled() && flex_f32(&x) && flex_f32(&w) {
        bmm(x.unsqueeze_dim::<3>(0), w.unsqueeze_dim::<3>(0), Precision::F32).squeeze_dim::<2>(0)
    } else {
        x.matmul(w)
    }
}

/// eˣ of every element: on the CPU backend (f32) one vectorized pass ([`super::exp`], within
/// 2 ulp), elsewhere burn's `exp`.
pub fn exp<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if fused_enabled() && flex_f32(&x) {
        Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_exp(x.into_dispatch()))
    } else {
        x.exp()
    }
}

/// One xDeepFM CIN layer, `out[e, o, t] = Σ_{i,j} w[i·m + j, o]·h[e, i, t]·x0[e, j, t]` for `h`
/// `[b, H, d]`, `x0` `[b, m, d]`, `w` `[H·m, H']`: in f32 on the CPU backend one op that never
/// builds the `[b, H·m, d]` outer products ([`super::cin`]); elsewhere (and in bf16, whose
/// products run on [`bmm`]'s kernel) the outer products and a `Wᵀ z` product.
pub fn cin(h: Tensor<3>, x0: Tensor<3>, w: Tensor<2>, precision: Precision) -> Tensor<3> {
    if fused_enabled() && precision == Precision::F32 && flex_f32(&h) && flex_f32(&x0) && flex_f32(&w) {
        return Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_cin(
            h.into_dispatch(),
            x0.into_dispatch(),
            w.into_dispatch(),
        ));
    }
    let ([b, hm, d], m) = (h.dims(), x0.dims()[1]);
    let z = h.unsqueeze_dim::<4>(2) * x0.unsqueeze_dim::<4>(1); // [b, H, m, d]
    bmm(w.transpose().unsqueeze_dim::<3>(0), z.reshape([b, hm * m, d]), precision)
}

/// Whether the interaction products run on the batched bf16 kernel: `--precision bf16` with the
/// `amx` or `avx512` bf16 path on a CPU with AVX512-BF16.
fn batched_bf16(precision: Precision) -> bool {
    use super::bf16::Bf16Kernel;
    precision == Precision::Bf16 && matches!(Bf16Kernel::chosen(), Bf16Kernel::Amx | Bf16Kernel::Avx512) && super::amx::batched_available()
}

/// FM's optimized interaction `X (Xᵀ Y)` for `x` `[b, n, d]` and `y` `[1, n, k]` (static, shared)
/// or `[b, n, k]` (attentive, per example). Where the interaction products run in bf16
/// ([`bmm`]) one op does both products of an example while its X is in cache, and in the
/// backward `Xᵀ G`, `[G | Y]·[Z | dZ]ᵀ` (dX in one product) and `X dZ` the same way
/// ([`super::amx::fm_forward`]): the block as separate `bmm`s streamed X or a tensor of its size
/// through memory six times. Elsewhere the two [`bmm`]s.
pub fn fm(x: Tensor<3>, y: Tensor<3>, precision: Precision) -> Tensor<3> {
    let [b, n, _] = x.dims();
    let [by, ny, _] = y.dims();
    if fused_enabled() && batched_bf16(precision) && flex_f32(&x) && flex_f32(&y) && n == ny && (by == 1 || by == b) {
        Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::fused_fm(x.into_dispatch(), y.into_dispatch()))
    } else {
        let xty = bmm(x.clone().swap_dims(1, 2), y, precision); // [b, d, k]
        bmm(x, xty, precision)
    }
}

/// Training-mode BatchNorm through the fused op: `(y, mean, biased variance)`, the statistics
/// detached. The caller checked that `x` is f32 on the CPU backend ([`super::batch_norm::batch_norm`]).
pub(crate) fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    let (y, mean, var) = <burn::backend::Dispatch as FusedOps>::fused_batch_norm_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    (Tensor::from_dispatch(y), Tensor::from_dispatch(mean), Tensor::from_dispatch(var))
}

/// Whether [`layer_norm`] takes the fused kernel for this input.
pub fn fusable<const D: usize>(norm: &burn::nn::LayerNorm, x: &Tensor<D>) -> bool {
    fused_enabled() && flex_f32(x) && norm.beta.is_some()
}

/// Whether `t` is an f32 tensor on the CPU backend (Flex), the only kind our kernels take.
pub(crate) fn flex_f32<const D: usize>(t: &Tensor<D>) -> bool {
    t.device().inner() == burn::tensor::Device::flex() && t.dtype() == DType::F32
}

/// The ε of every LayerNorm our models build (`LayerNormConfig`'s default; burn keeps the
/// field private, so the fused path cannot read it from the module).
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// LayerNorm of `x` over its last axis with burn's `LayerNorm` parameters (built with the
/// default ε): the fused kernel on the CPU backend (f32), burn's own implementation elsewhere.
pub fn layer_norm<const D: usize>(norm: &burn::nn::LayerNorm, x: Tensor<D>) -> Tensor<D> {
    if !fusable(norm, &x) {
        return norm.forward(x);
    }
    let gamma = norm.gamma.val();
    let beta = norm.beta.as_ref().expect("checked by fusable").val();
    let out = <burn::backend::Dispatch as FusedOps>::fused_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        LAYER_NORM_EPSILON,
    );
    Tensor::from_dispatch(out)
}

/// `LayerNorm(a + b)` (a residual connection), the sum fused into the kernel on the CPU backend.
pub fn add_layer_norm<const D: usize>(norm: &burn::nn::LayerNorm, a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if !fusable(norm, &a) || a.dims() != b.dims() {
        return layer_norm(norm, a + b);
    }
    let gamma = norm.gamma.val();
    let beta = norm.beta.as_ref().expect("checked by fusable").val();
    let out = <burn::backend::Dispatch as FusedOps>::fused_add_layer_norm(
        a.into_dispatch(),
        b.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        LAYER_NORM_EPSILON,
    );
    Tensor::from_dispatch(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{Module, Param};
    use burn::nn::LayerNormConfig;
    use burn::tensor::{Device, Distribution};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// The batched product against burn's `matmul`: values and both gradients, per-example
    /// operands, an operand shared by every example on either side (its gradient summed over the
    /// examples), strided views (a transposed weight, swapped axes) as the models pass them, a
    /// single example, and inference without autodiff.
    #[test]
    fn bmm_matches_burn_matmul_with_gradients_and_shared_operands() {
        let dev = Device::flex().autodiff();
        dev.seed(3);
        let random = |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        // (a, b) builders: per-example both; shared A as a transposed 2-D weight (LCB);
        // shared B with A a swapped-axes view (FM's Xᵀ Y); one example
        type Case = (&'static str, Tensor<3>, Tensor<3>, Box<dyn Fn(Tensor<3>) -> Tensor<3>>, Box<dyn Fn(Tensor<3>) -> Tensor<3>>);
        let id = || Box::new(|t: Tensor<3>| t) as Box<dyn Fn(Tensor<3>) -> Tensor<3>>;
        let cases: Vec<Case> = vec![
            ("per example", random([5, 7, 3]), random([5, 3, 4]), id(), id()),
            ("shared A (transposed weight)", random([1, 6, 7]), random([5, 6, 9]), Box::new(|t: Tensor<3>| t.swap_dims(1, 2)), id()),
            ("shared B, A swapped axes", random([5, 6, 8]), random([1, 6, 3]), Box::new(|t: Tensor<3>| t.swap_dims(1, 2)), id()),
            ("one example", random([1, 33, 17]), random([1, 17, 20]), id(), id()),
            // both operands swapped-axes views: gradients computed in their memory order
            (
                "per example, both swapped",
                random([5, 7, 3]),
                random([5, 4, 7]),
                Box::new(|t: Tensor<3>| t.swap_dims(1, 2)),
                Box::new(|t: Tensor<3>| t.swap_dims(1, 2)),
            ),
        ];
        // bf16 (the batched AVX512-BF16 kernel where the CPU has it, else f32 again): within
        // bf16 rounding of f32 — 2⁻⁸ relative per operand and per result, on sums of ≤ 17 unit
        // normal products (a wrong operand or transpose is off by O(1))
        for precision in [Precision::F32, Precision::Bf16] {
            for (name, a, b, view_a, view_b) in cases.iter() {
                let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                let ours = bmm(view_a(a.clone()), view_b(b.clone()), precision);
                let theirs = view_a(a.clone()).matmul(view_b(b.clone()));
                let tol = |t: &Tensor<3>| match precision {
                    Precision::F32 => 1e-4,
                    Precision::Bf16 => 0.02 * (1.0 + t.clone().abs().max().into_scalar::<f32>()),
                };
                assert_eq!(ours.dims(), theirs.dims(), "{name}");
                assert!(max_diff(ours.clone(), theirs.clone()) < tol(&theirs), "{name} {precision:?}: values");
                // a weighted sum, so every output element has its own gradient
                let weights = Tensor::<3>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &dev);
                let (g_ours, g_theirs) = ((ours * weights.clone()).sum().backward(), (theirs * weights).sum().backward());
                for (which, t) in [("a", &a), ("b", &b)] {
                    let (x, y) = (t.grad(&g_ours).expect("ours has a gradient"), t.grad(&g_theirs).expect("burn has a gradient"));
                    assert_eq!(x.dims(), y.dims(), "{name}: d{which} shape");
                    let y = Tensor::<3>::from_inner(y);
                    assert!(max_diff(Tensor::from_inner(x), y.clone()) < tol(&y), "{name} {precision:?}: d{which}");
                }
            }
        }
        // inference (no autodiff): the same values
        let plain = Device::flex();
        let (a, b) =
            (Tensor::<3>::random([4, 5, 6], Distribution::Default, &plain), Tensor::<3>::random([1, 6, 2], Distribution::Default, &plain));
        assert!(max_diff(bmm(a.clone(), b.clone(), Precision::F32), a.matmul(b)) < 1e-5);
    }

    /// The fused CIN layer against burn's own ops (outer products, reshape, `Wᵀ z`): values and
    /// the gradients of h, x0 and W, on odd shapes, across the chunk and group sizes, and for a
    /// first layer (h is x0 itself: both gradients reach one tensor).
    #[test]
    fn cin_matches_burn_ops_with_gradients() {
        let dev = Device::flex().autodiff();
        dev.seed(11);
        let random = |shape: Vec<usize>| Tensor::<3>::random(shape.clone(), Distribution::Normal(0.0, 1.0), &dev);
        for (b, hh, m, d, o, first) in
            [(1, 1, 1, 1, 1, false), (5, 3, 4, 7, 2, false), (40, 6, 6, 10, 8, true), (300, 4, 5, 3, 3, false), (3, 12, 12, 16, 64, true)]
        {
            let x0 = random(vec![b, m, d]).require_grad();
            let h = if first { x0.clone() } else { random(vec![b, hh, d]).require_grad() };
            let hh = h.dims()[1];
            let w = Tensor::<2>::random([hh * m, o], Distribution::Normal(0.0, 1.0), &dev).require_grad();
            let ours = cin(h.clone(), x0.clone(), w.clone(), Precision::F32);
            let z = h.clone().unsqueeze_dim::<4>(2) * x0.clone().unsqueeze_dim::<4>(1);
            let theirs = w.clone().transpose().unsqueeze_dim::<3>(0).matmul(z.reshape([b, hh * m, d]));
            assert_eq!(ours.dims(), theirs.dims());
            let scale = 1.0 + theirs.clone().abs().max().into_scalar::<f32>();
            assert!(max_diff(ours.clone(), theirs.clone()) < 1e-5 * scale, "values b={b} H={hh} m={m} d={d} H'={o}");
            let weights = Tensor::<3>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &dev);
            let (g_ours, g_theirs) = ((ours * weights.clone()).sum().backward(), (theirs * weights).sum().backward());
            let grad3 = |t: &Tensor<3>, g| Tensor::<3>::from_inner(t.grad(g).expect("a gradient"));
            let mut pairs = vec![("x0", grad3(&x0, &g_ours), grad3(&x0, &g_theirs))];
            if !first {
                pairs.push(("h", grad3(&h, &g_ours), grad3(&h, &g_theirs)));
            }
            for (which, x, y) in pairs {
                let tol = 1e-5 * (1.0 + y.clone().abs().max().into_scalar::<f32>()) * (hh * m) as f32;
                assert!(max_diff(x, y) < tol, "d{which} b={b} H={hh} m={m} d={d} H'={o}");
            }
            let (x, y) = (Tensor::<2>::from_inner(w.grad(&g_ours).unwrap()), Tensor::<2>::from_inner(w.grad(&g_theirs).unwrap()));
            let tol = 1e-5 * (1.0 + y.clone().abs().max().into_scalar::<f32>()) * (b * d) as f32;
            assert!(max_diff(x, y) < tol, "dW b={b} H={hh} m={m} d={d} H'={o}");
        }
        // inference (no autodiff): the same values as the ops
        let plain = Device::flex();
        let (h, x0) =
            (Tensor::<3>::random([4, 3, 5], Distribution::Default, &plain), Tensor::<3>::random([4, 2, 5], Distribution::Default, &plain));
        let w = Tensor::<2>::random([6, 7], Distribution::Default, &plain);
        let z = h.clone().unsqueeze_dim::<4>(2) * x0.clone().unsqueeze_dim::<4>(1);
        let theirs = w.clone().transpose().unsqueeze_dim::<3>(0).matmul(z.reshape([4, 6, 5]));
        assert!(max_diff(cin(h, x0, w, Precision::F32), theirs) < 1e-5);
    }

    /// The vectorized exp against burn's (libm's `expf`): values within 2 ulp, the gradient of a
    /// weighted sum, a strided input, and inference without autodiff.
    #[test]
    fn exp_matches_burn_with_its_gradient() {
        let dev = Device::flex().autodiff();
        dev.seed(13);
        let x = Tensor::<3>::random([7, 33, 5], Distribution::Normal(0.0, 3.0), &dev).require_grad();
        let (ours, theirs) = (exp(x.clone().swap_dims(1, 2)), x.clone().swap_dims(1, 2).exp());
        let rel = |a: Tensor<3>, b: Tensor<3>| ((a - b.clone()).abs() / b.abs()).max().into_scalar::<f32>();
        assert!(rel(ours.clone(), theirs.clone()) < 3e-7, "values");
        let w = Tensor::<3>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &dev);
        let (go, gt) = ((ours * w.clone()).sum().backward(), (theirs * w).sum().backward());
        let (a, b) = (Tensor::<3>::from_inner(x.grad(&go).unwrap()), Tensor::<3>::from_inner(x.grad(&gt).unwrap()));
        assert!(max_diff(a, b.clone()) <= 3e-7 * (1.0 + b.abs().max().into_scalar::<f32>()), "gradient");
        // a fresh contiguous input nobody else holds (a product's output): overwritten in place
        let (ours, theirs) = (exp(x.clone().mul_scalar(0.5)), x.clone().mul_scalar(0.5).exp());
        assert!(rel(ours.clone(), theirs.clone()) < 3e-7, "values in place");
        let w = Tensor::<3>::random(ours.dims(), Distribution::Normal(0.0, 1.0), &dev);
        let (go, gt) = ((ours * w.clone()).sum().backward(), (theirs * w).sum().backward());
        let (a, b) = (Tensor::<3>::from_inner(x.grad(&go).unwrap()), Tensor::<3>::from_inner(x.grad(&gt).unwrap()));
        assert!(max_diff(a, b.clone()) <= 3e-7 * (1.0 + b.abs().max().into_scalar::<f32>()), "gradient in place");
        // a shared input is left as it was
        let plain = Tensor::<2>::random([3, 4], Distribution::Default, &Device::flex());
        let before = plain.clone().into_data();
        assert!(max_diff(exp(plain.clone()), plain.clone().exp()) < 1e-6);
        assert_eq!(plain.into_data(), before);
    }

    /// FM's `X (Xᵀ Y)` through [`fm`] in bf16 (one fused op per example where the CPU has
    /// AVX512-BF16, else the two products) against burn's f32 products: values and the
    /// gradients of X and Y within bf16 rounding, for a shared (static) Y and a per-example
    /// (attentive) one, on odd shapes and the table5 block's.
    #[test]
    fn fm_in_bf16_matches_f32_within_bf16_tolerance() {
        let dev = Device::flex().autodiff();
        dev.seed(5);
        let random = |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        // 40 examples: several per task, so per-task sums of a shared Y's gradient are exercised
        for (b, n, d, k) in [(3, 5, 7, 3), (4, 13, 33, 5), (2, 64, 128, 24), (1, 9, 16, 17), (40, 6, 10, 4)] {
            for by in [1, b] {
                let (x, y) = (random([b, n, d]).require_grad(), random([by, n, k]).require_grad());
                let ours = fm(x.clone(), y.clone(), Precision::Bf16);
                let theirs = x.clone().matmul(x.clone().swap_dims(1, 2).matmul(y.clone()));
                let tol = |t: &Tensor<3>| 0.03 * (1.0 + t.clone().abs().max().into_scalar::<f32>());
                let name = format!("b {b}, n {n}, d {d}, k {k}, Y batch {by}");
                assert_eq!(ours.dims(), [b, n, k], "{name}");
                assert!(max_diff(ours.clone(), theirs.clone()) < tol(&theirs), "{name}: values");
                let weights = Tensor::<3>::random([b, n, k], Distribution::Normal(0.0, 1.0), &dev);
                let (g_ours, g_theirs) = ((ours * weights.clone()).sum().backward(), (theirs * weights).sum().backward());
                for (which, t) in [("x", &x), ("y", &y)] {
                    let (p, q) = (t.grad(&g_ours).expect("ours has a gradient"), t.grad(&g_theirs).expect("burn has a gradient"));
                    assert_eq!(p.dims(), q.dims(), "{name}: d{which} shape");
                    let q = Tensor::<3>::from_inner(q);
                    assert!(max_diff(Tensor::from_inner(p), q.clone()) < tol(&q), "{name}: d{which}");
                }
            }
        }
    }

    /// The bf16 kernel this CPU chooses (AMX, the AVX512-BF16 register kernel, or gemmkit — its
    /// widening fallback on CPUs without bf16 units) against the portable bf16 path and against f32: values and both gradients, on
    /// edge shapes (one row, k = 1, odd sizes), through autodiff and in inference.
    #[test]
    fn bf16_matmul_matches_the_portable_path_and_f32_within_bf16_tolerance() {
        let dev = Device::flex().autodiff();
        dev.seed(5);
        for &(m, k, n) in &[(1, 1, 1), (1, 9, 5), (7, 1, 3), (13, 33, 17), (65, 130, 31)] {
            let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), &dev).require_grad();
            let w = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 0.5), &dev).require_grad();
            let up = Tensor::<2>::random([m, n], Distribution::Default, &dev);
            let kernel = bf16_matmul_kernel(x.clone(), w.clone());
            let portable = x.clone().cast(DType::BF16).matmul(w.clone().cast(DType::BF16)).cast(DType::F32);
            let exact = x.clone().matmul(w.clone());
            let scale = exact.clone().abs().max().into_scalar::<f32>().max(1e-3);
            // same rounded operands, f32 accumulation, one bf16 rounding of C on both paths
            let d = max_diff(kernel.clone().inner(), portable.clone().inner());
            assert!(d <= scale * 2f32.powi(-7), "{m}×{k}×{n}: kernel vs portable {d} (scale {scale})");
            let d = max_diff(kernel.clone().inner(), exact.clone().inner());
            assert!(d <= scale * 0.02, "{m}×{k}×{n}: kernel vs f32 {d} (scale {scale})");
            assert!(m * k * n < 1000 || d > 0.0, "{m}×{k}×{n}: the kernel must actually round");
            let g1 = (kernel * up.clone()).sum().backward();
            let g2 = (exact * up.clone()).sum().backward();
            for (name, t) in [("dX", &x), ("dW", &w)] {
                let (a, b) = (t.grad(&g1).expect("a gradient"), t.grad(&g2).unwrap());
                let gscale = b.clone().abs().max().into_scalar::<f32>().max(1e-3);
                let d = max_diff(a, b);
                assert!(d <= gscale * 0.02, "{m}×{k}×{n} {name}: {d} (scale {gscale})");
            }
        }
        // inference: the plain Flex implementation of the op
        let x = Tensor::<2>::random([3, 5], Distribution::Default, &Device::flex());
        let w = Tensor::<2>::random([5, 2], Distribution::Default, &Device::flex());
        let y = bf16_matmul_kernel(x.clone(), w.clone());
        assert!(max_diff(y, x.matmul(w)) < 0.02);
    }

    /// The LayerNorm loops give the same bits on every instruction set the CPU offers (baseline,
    /// AVX2, AVX-512): forward with and without the residual sum, backward with its dγ, dβ.
    #[test]
    fn layer_norm_loops_give_the_same_bits_on_every_instruction_set() {
        use crate::simd::{Isa, run_on};
        let paths: Vec<Isa> = [Isa::Baseline, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()).collect();
        let values = |len: usize, seed: u64| -> Vec<f32> {
            (0..len).map(|i| (crate::rng::splitmix64(seed ^ i as u64) % 4001) as f32 / 1000.0 - 2.0).collect()
        };
        for d in [1usize, 7, 16, 64, 131] {
            let rows = 5;
            let (xa, xb, gamma, beta, g) = (values(rows * d, 1), values(rows * d, 2), values(d, 3), values(d, 4), values(rows * d, 5));
            let k = LnConsts { d, inv_d: 1.0 / d as f32, eps: 1e-5 };
            let mut results = Vec::new();
            for &isa in &paths {
                let (mut y, mut sum, mut st) = (uninit(rows * d), uninit(rows * d), uninit(2 * rows));
                run_on(isa, (LnRows { y: &mut y, sum: &mut sum, st: &mut st, xa: &xa, xb: Some(&xb), gamma: &gamma, beta: &beta }, k));
                let (y, sum, st) = unsafe { (assume_init(y), assume_init(sum), assume_init(st)) };
                let (mut y1, mut st1) = (uninit(rows * d), uninit(2 * rows));
                run_on(isa, (LnRows { y: &mut y1, sum: &mut [], st: &mut st1, xa: &xa, xb: None, gamma: &gamma, beta: &beta }, k));
                let (y1, st1) = unsafe { (assume_init(y1), assume_init(st1)) };
                let (mut dx, mut dgamma, mut dbeta, mut h, mut xh) =
                    (uninit(rows * d), vec![0.0; d], vec![0.0; d], vec![0.0; d], vec![0.0; d]);
                run_on(
                    isa,
                    (
                        LnGradRows {
                            dx: &mut dx,
                            g: &g,
                            x: &sum,
                            st: &st,
                            gamma: &gamma,
                            dgamma: &mut dgamma,
                            dbeta: &mut dbeta,
                            h: &mut h,
                            xh: &mut xh,
                        },
                        k,
                    ),
                );
                let dx = unsafe { assume_init(dx) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                results.push((isa, [bits(&y), bits(&sum), bits(&st), bits(&y1), bits(&st1), bits(&dx), bits(&dgamma), bits(&dbeta)]));
            }
            for (isa, r) in &results[1..] {
                assert!(r == &results[0].1, "d {d}: {isa:?} differs from the baseline");
            }
        }
    }

    #[test]
    fn fused_layer_norm_matches_burn_forward_and_gradients() {
        let dev = Device::flex().autodiff();
        dev.seed(3);
        let mut norm = LayerNormConfig::new(24).init(&dev);
        // Non-trivial γ and β so their gradients and effect are checked.
        norm.gamma = Param::from_tensor(Tensor::random([24], Distribution::Normal(1.0, 0.5), &dev));
        norm.beta = Some(Param::from_tensor(Tensor::random([24], Distribution::Normal(0.0, 0.5), &dev)));
        let x = Tensor::<3>::random([300, 5, 24], Distribution::Normal(1.0, 3.0), &dev).require_grad();
        let w = Tensor::<3>::random([300, 5, 24], Distribution::Default, &dev);

        assert!(fusable(&norm, &x), "the test must exercise the fused kernel");
        let fused = layer_norm(&norm, x.clone());
        let reference = norm.forward(x.clone());
        assert!(max_diff(fused.clone().inner(), reference.clone().inner()) < 1e-5);

        let g1 = (fused * w.clone()).sum().backward();
        let g2 = (reference * w.clone()).sum().backward();
        assert!(max_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()) < 1e-4);
        let gamma = norm.gamma.val();
        assert!(max_diff(gamma.grad(&g1).unwrap(), gamma.grad(&g2).unwrap()) < 1e-3);
        let beta = norm.beta.as_ref().unwrap().val();
        assert!(max_diff(beta.grad(&g1).unwrap(), beta.grad(&g2).unwrap()) < 1e-3);

        // The residual form: LayerNorm(a + b), gradients to both summands.
        let a = Tensor::<3>::random([300, 5, 24], Distribution::Normal(0.5, 2.0), &dev).require_grad();
        let fused = add_layer_norm(&norm, a.clone(), x.clone());
        let reference = norm.forward(a.clone() + x.clone());
        assert!(max_diff(fused.clone().inner(), reference.clone().inner()) < 1e-5);
        let g1 = (fused * w.clone()).sum().backward();
        let g2 = (reference * w.clone()).sum().backward();
        assert!(max_diff(a.grad(&g1).unwrap(), a.grad(&g2).unwrap()) < 1e-4);
        assert!(max_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()) < 1e-4);
        assert!(max_diff(gamma.grad(&g1).unwrap(), gamma.grad(&g2).unwrap()) < 1e-3);
        assert!(max_diff(beta.grad(&g1).unwrap(), beta.grad(&g2).unwrap()) < 1e-3);

        // Inference (no autodiff) takes the plain Flex implementation.
        let xi = x.inner();
        let normi = norm.valid();
        assert!(fusable(&normi, &xi));
        assert!(max_diff(layer_norm(&normi, xi.clone()), normi.forward(xi)) < 1e-5);
    }
}
