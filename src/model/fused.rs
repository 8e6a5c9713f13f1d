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

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// LayerNorm over the last axis: `(x − mean) / √(var + ε) · γ + β`.
    fn fused_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self>;
}

/// Rows per parallel task: large enough to amortize scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 256;

/// The tensor's values in row-major order: borrowed when already contiguous, else one copy.
enum Values<'a> {
    Borrowed(&'a [f32]),
    Owned(FlexTensor),
}

impl std::ops::Deref for Values<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Values::Borrowed(s) => s,
            Values::Owned(t) => t.as_slice::<f32>().expect("contiguous f32 tensor"),
        }
    }
}

fn f32_vec(t: &FlexTensor) -> Values<'_> {
    match t.as_slice::<f32>() {
        Some(s) if t.is_contiguous() => Values::Borrowed(s),
        _ => Values::Owned(t.to_contiguous()),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Sum with eight independent accumulators, so that it vectorizes (a plain float sum is a
/// sequential dependency chain: the first version of these kernels spent a quarter of a Frappe
/// step in scalar adds).
#[inline]
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
#[inline]
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

/// Forward: returns `(y, x̂, rstd)` with x̂ the normalized input and rstd `1/√(var+ε)` per row.
fn ln_forward(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, eps: f64) -> (FlexTensor, FlexTensor, FlexTensor) {
    assert_eq!(x.dtype(), DType::F32, "fused LayerNorm is f32-only");
    let shape = x.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let (xs, gs, bs) = (f32_vec(x), f32_vec(gamma), f32_vec(beta));
    let rows = xs.len() / d;
    let mut y = vec![0.0f32; xs.len()];
    let mut xhat = vec![0.0f32; xs.len()];
    let mut rstd = vec![0.0f32; rows];
    let inv_d = 1.0 / d as f32;
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(xhat.par_chunks_mut(d * ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(xs.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(((y, xh), rs), xs)| {
            for (((y, xh), xs), r) in y.chunks_exact_mut(d).zip(xh.chunks_exact_mut(d)).zip(xs.chunks_exact(d)).zip(rs.iter_mut()) {
                let mean = lane_sum(xs) * inv_d;
                for (h, v) in xh.iter_mut().zip(xs) {
                    *h = v - mean;
                }
                let s = 1.0 / (lane_dot(xh, xh) * inv_d + eps as f32).sqrt();
                *r = s;
                for (((y, h), g), b) in y.iter_mut().zip(xh.iter_mut()).zip(gs.iter()).zip(bs.iter()) {
                    *h *= s;
                    *y = *h * g + b;
                }
            }
        });
    (tensor(y, shape.clone()), tensor(xhat, shape), tensor(rstd, Shape::new([rows])))
}

/// Backward: `dx = rstd·(h − mean(h) − x̂·mean(h·x̂))` with `h = g·γ`; `dγ = Σ g·x̂`, `dβ = Σ g`.
fn ln_backward(grad: &FlexTensor, xhat: &FlexTensor, rstd: &FlexTensor, gamma: &FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = xhat.layout().shape().clone();
    let d = shape[shape.num_dims() - 1];
    let (gs, xh, rs, gm) = (f32_vec(grad), f32_vec(xhat), f32_vec(rstd), f32_vec(gamma));
    let inv_d = 1.0 / d as f32;
    let mut dx = vec![0.0f32; gs.len()];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(gs.par_chunks(d * ROWS_PER_TASK))
        .zip(xh.par_chunks(d * ROWS_PER_TASK))
        .zip(rs.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, g), xh), rs)| {
            let (mut dgamma, mut dbeta, mut h) = (vec![0.0f32; d], vec![0.0f32; d], vec![0.0f32; d]);
            for (((dx, g), xh), s) in dx.chunks_exact_mut(d).zip(g.chunks_exact(d)).zip(xh.chunks_exact(d)).zip(rs) {
                for (((h, g), gm), db) in h.iter_mut().zip(g).zip(gm.iter()).zip(dbeta.iter_mut()) {
                    *h = g * gm;
                    *db += g;
                }
                for ((dg, g), x) in dgamma.iter_mut().zip(g).zip(xh) {
                    *dg += g * x;
                }
                let mean_h = lane_sum(&h) * inv_d;
                let mean_hx = lane_dot(&h, xh) * inv_d;
                for ((dx, h), x) in dx.iter_mut().zip(&h).zip(xh) {
                    *dx = s * (h - mean_h - x * mean_hx);
                }
            }
            (dgamma, dbeta)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (pg, pb) in partials {
        dgamma.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
        dbeta.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    (tensor(dx, shape), tensor(dgamma, Shape::new([d])), tensor(dbeta, Shape::new([d])))
}

impl FusedOps for Flex {
    fn fused_layer_norm(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, epsilon: f64) -> FlexTensor {
        ln_forward(&x, &gamma, &beta, epsilon).0
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    /// x̂, rstd, γ.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (xhat, rstd, gamma) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, dgamma, dbeta) = ln_backward(&grad, &xhat, &rstd, &gamma);
        let [px, pg, pb] = ops.parents;
        if let Some(n) = px {
            grads.register::<Flex>(n.id, dx);
        }
        if let Some(n) = pg {
            grads.register::<Flex>(n.id, dgamma);
        }
        if let Some(n) = pb {
            grads.register::<Flex>(n.id, dbeta);
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_layer_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, beta: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let (y, xhat, rstd) = ln_forward(x.primitive(), gamma.primitive(), beta.primitive(), epsilon);
        let gamma_value = gamma.primitive().clone();
        match LayerNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((xhat, rstd, gamma_value), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// Whether [`layer_norm`] takes the fused kernel for this input.
pub fn fusable<const D: usize>(norm: &burn::nn::LayerNorm, x: &Tensor<D>) -> bool {
    x.device().inner() == burn::tensor::Device::flex() && x.dtype() == DType::F32 && norm.beta.is_some()
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
    let beta = norm.beta.as_ref().expect("checked above").val();
    let out = <burn::backend::Dispatch as FusedOps>::fused_layer_norm(x.into_dispatch(), gamma.into_dispatch(), beta.into_dispatch(), LAYER_NORM_EPSILON);
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
        let g2 = (reference * w).sum().backward();
        assert!(max_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap()) < 1e-4);
        let gamma = norm.gamma.val();
        assert!(max_diff(gamma.grad(&g1).unwrap(), gamma.grad(&g2).unwrap()) < 1e-3);
        let beta = norm.beta.as_ref().unwrap().val();
        assert!(max_diff(beta.grad(&g1).unwrap(), beta.grad(&g2).unwrap()) < 1e-3);

        // Inference (no autodiff) takes the plain Flex implementation.
        let xi = x.inner();
        let normi = norm.valid();
        assert!(fusable(&normi, &xi));
        assert!(max_diff(layer_norm(&normi, xi.clone()), normi.forward(xi)) < 1e-5);
    }
}
