//! BatchNorm in training mode on the CPU backend: the batch statistics, the normalization and
//! its backward pass as a few passes over the activations, registered through
//! [`super::fused::FusedOps`] like the fused LayerNorm.
//!
//! burn's `batch_norm_train` (and its backward) views `[batch, channels, …]` as `[channels,
//! batch·…]` through `swap_dims` + `reshape`, which copies the activations into a transposed
//! buffer four times per layer and step (twice forward, twice backward), around some ten
//! broadcast passes. A `perf` profile of a FinalMLP trial of the Frappe Table-2 search
//! (batch-normed MLPs of [1024, 512, 256], batch 4096, one thread) had those transposing copies
//! at 18% of the process (`copy_2d_tiled` under `batch_norm_train` and its backward).
//!
//! Here the statistics are accumulated along the rows as they lie in memory: an input of shape
//! `[b, c, r…]` is `b` rows of `c·r` values, each position `j` of a row belongs to channel
//! `j / r`, and per-position sums over rows vectorize across positions (then the `r` positions
//! of a channel are added). Forward: one pass for the sums of x and x² (f64, so the variance
//! `E[x²] − mean²` keeps f32's precision for any mean the activations have), one pass for
//! `y = (x − mean)·s + β`. Backward: one pass for Σg and Σg·x̂, one for dx. Rows are split into fixed
//! chunks whose partial sums are added in chunk order, so the result does not depend on the
//! number of threads. Semantics are burn's: the biased variance normalizes and is returned for
//! the running statistics (which [`batch_norm`] updates as `BatchNorm::forward` does).

use burn::nn::BatchNorm;
use burn::tensor::Tensor;
use rayon::prelude::*;

/// Rows per parallel task (a Frappe MLP row is 256–1024 values).
const ROWS_PER_TASK: usize = 64;

/// `[b, c, r]` of an input whose shape is `[b, c, …]` (`r` the product of the trailing axes).
pub(crate) fn dims(shape: &[usize]) -> [usize; 3] {
    assert!(shape.len() >= 2, "batch norm: input of rank {} (needs [batch, channels, …])", shape.len());
    [shape[0], shape[1], shape[2..].iter().product()]
}

/// Per-position sums over the rows of one chunk, in f64.
struct Sums<'a> {
    x: &'a [f32],
    /// Row length `c·r`.
    width: usize,
    /// With `centre`, the second sum is of `g·(x − mean)` (the backward's) instead of x².
    g: Option<&'a [f32]>,
    centre: &'a [f32],
}

impl crate::simd::Wide for Sums<'_> {
    type Output = (Vec<f64>, Vec<f64>);
    #[inline(always)]
    fn run(self) -> Self::Output {
        let w = self.width;
        let (mut s1, mut s2) = (vec![0f64; w], vec![0f64; w]);
        match self.g {
            None => {
                for row in self.x.chunks_exact(w) {
                    for ((a, q), &v) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
                        let v = v as f64;
                        *a += v;
                        *q += v * v;
                    }
                }
            }
            Some(g) => {
                for (row, grow) in self.x.chunks_exact(w).zip(g.chunks_exact(w)) {
                    for (((a, q), (&v, &gv)), &m) in s1.iter_mut().zip(s2.iter_mut()).zip(row.iter().zip(grow)).zip(self.centre) {
                        let gv = gv as f64;
                        *a += gv;
                        *q += gv * (v as f64 - m as f64);
                    }
                }
            }
        }
        (s1, s2)
    }
}

/// Per-channel totals of the per-position sums over all rows: chunks in parallel, added in order.
fn channel_sums(x: &[f32], g: Option<&[f32]>, centre: &[f32], [_, c, r]: [usize; 3]) -> (Vec<f64>, Vec<f64>) {
    let width = c * r;
    let chunk = width * ROWS_PER_TASK;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = match g {
        None => x.par_chunks(chunk).map(|x| crate::simd::run(Sums { x, width, g: None, centre })).collect(),
        Some(g) => {
            x.par_chunks(chunk).zip(g.par_chunks(chunk)).map(|(x, g)| crate::simd::run(Sums { x, width, g: Some(g), centre })).collect()
        }
    };
    let (mut s1, mut s2) = (vec![0f64; c], vec![0f64; c]);
    for (p1, p2) in partials {
        for j in 0..width {
            s1[j / r] += p1[j];
            s2[j / r] += p2[j];
        }
    }
    (s1, s2)
}

/// `out = (x − m)·a + b` per position of a row (`m`, `a`, `b` one row long): the forward's
/// normalization (centred first: `x·a + (b − m·a)` cancels digits when the mean is large).
struct Affine<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    m: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
}

impl crate::simd::Wide for Affine<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let w = self.a.len();
        for (o, x) in self.out.chunks_exact_mut(w).zip(self.x.chunks_exact(w)) {
            for ((((o, &x), &m), &a), &b) in o.iter_mut().zip(x).zip(self.m).zip(self.a).zip(self.b) {
                *o = (x - m) * a + b;
            }
        }
    }
}

/// `dx = a·(g − cb − (x − m)·cg)` per position (the backward's second pass).
struct InputGrad<'a> {
    dx: &'a mut [f32],
    g: &'a [f32],
    x: &'a [f32],
    /// γ·rstd, mean, rstd·Σ(g·x̂)/N, Σg/N per position.
    a: &'a [f32],
    m: &'a [f32],
    cg: &'a [f32],
    cb: &'a [f32],
}

impl crate::simd::Wide for InputGrad<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let w = self.a.len();
        for ((dx, g), x) in self.dx.chunks_exact_mut(w).zip(self.g.chunks_exact(w)).zip(self.x.chunks_exact(w)) {
            for j in 0..w {
                dx[j] = self.a[j] * (g[j] - self.cb[j] - (x[j] - self.m[j]) * self.cg[j]);
            }
        }
    }
}

/// A per-channel vector repeated over a row (`r` copies of each channel's value).
fn per_position(v: impl Iterator<Item = f32>, r: usize) -> Vec<f32> {
    v.flat_map(|a| std::iter::repeat_n(a, r)).collect()
}

/// Training-mode BatchNorm of `x` (`[b, c, r]` row-major): `(y, mean, var)`, var biased.
pub(crate) fn forward(x: &[f32], dims @ [b, c, r]: [usize; 3], gamma: &[f32], beta: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), b * c * r, "batch norm: {} values for {b} × {c} × {r}", x.len());
    assert!(gamma.len() == c && beta.len() == c, "batch norm: γ and β need {c} values");
    let n = (b * r) as f64;
    let (s1, s2) = channel_sums(x, None, &[], dims);
    let mean: Vec<f64> = s1.iter().map(|s| s / n).collect();
    let var: Vec<f64> = s2.iter().zip(&mean).map(|(q, m)| (q / n - m * m).max(0.0)).collect();
    let scale: Vec<f64> = var.iter().zip(gamma).map(|(v, &g)| g as f64 / (v + eps).sqrt()).collect();
    let a = per_position(scale.iter().map(|&s| s as f32), r);
    let m = per_position(mean.iter().map(|&m| m as f32), r);
    let t = per_position(beta.iter().copied(), r);
    let mut y = vec![0f32; x.len()];
    let chunk = c * r * ROWS_PER_TASK;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(out, x)| crate::simd::run(Affine { out, x, m: &m, a: &a, b: &t }));
    (y, mean.iter().map(|&m| m as f32).collect(), var.iter().map(|&v| v as f32).collect())
}

/// Gradients of [`forward`] for the output's gradient `g`: `(dx, dγ, dβ)`. With `x̂ = (x − μ)·rstd`:
/// `dβ = Σg`, `dγ = Σg·x̂`, `dx = γ·rstd·(g − dβ/N − x̂·dγ/N)` (sums over the N = b·r values of a
/// channel).
pub(crate) fn backward(
    g: &[f32],
    x: &[f32],
    dims @ [b, c, r]: [usize; 3],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(g.len() == b * c * r && x.len() == g.len(), "batch norm backward: {} and {} values for {b} × {c} × {r}", g.len(), x.len());
    let n = (b * r) as f64;
    let rstd: Vec<f64> = var.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt()).collect();
    let m = per_position(mean.iter().copied(), r);
    // Σg and Σg·(x − μ); dγ = rstd·Σg·(x − μ)
    let (sg, sgc) = channel_sums(x, Some(g), &m, dims);
    let dgamma: Vec<f64> = sgc.iter().zip(&rstd).map(|(s, q)| s * q).collect();
    let a = per_position(gamma.iter().zip(&rstd).map(|(&ga, q)| (ga as f64 * q) as f32), r);
    let cg = per_position(dgamma.iter().zip(&rstd).map(|(dg, q)| (dg * q / n) as f32), r);
    let cb = per_position(sg.iter().map(|s| (s / n) as f32), r);
    let mut dx = vec![0f32; x.len()];
    let chunk = c * r * ROWS_PER_TASK;
    dx.par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk).zip(x.par_chunks(chunk)))
        .for_each(|(dx, (g, x))| crate::simd::run(InputGrad { dx, g, x, a: &a, m: &m, cg: &cg, cb: &cb }));
    (dx, dgamma.iter().map(|&v| v as f32).collect(), sg.iter().map(|&v| v as f32).collect())
}

/// `norm.forward(x)` with the training path's statistics and normalization fused on the CPU
/// backend (f32 on Flex, autodiff, the layer training): the same running-statistics update as
/// burn's `BatchNorm::forward_train`. Elsewhere (inference, other backends, `WUKONG_FUSED=0`)
/// burn's own `forward`.
pub fn batch_norm<const D: usize>(norm: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if !(super::fused::fused_enabled() && super::fused::flex_f32(&x) && device.is_autodiff() && norm.training.is_enabled()) {
        return norm.forward(x);
    }
    let [channels] = norm.gamma.shape().dims();
    assert_eq!(x.dims()[1], channels, "batch norm: input's axis 1 is {}, the layer has {channels} channels", x.dims()[1]);
    let (y, mean, var) = super::fused::batch_norm_train(x, norm.gamma.val(), norm.beta.val(), norm.epsilon);
    let momentum = norm.momentum;
    let running_mean = norm.running_mean.value_sync().to_device(&device);
    let running_var = norm.running_var.value_sync().to_device(&device);
    norm.running_mean.update(running_mean.mul_scalar(1.0 - momentum).add(mean.mul_scalar(momentum)).detach());
    norm.running_var.update(running_var.mul_scalar(1.0 - momentum).add(var.mul_scalar(momentum)).detach());
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// One step of a layer, fused or burn's: the output, the input's and parameters' gradients
    /// (for a loss that weights every output differently), and the running statistics after.
    fn step<const D: usize>(norm: &BatchNorm, x: Tensor<D>, weights: Tensor<D>, fused: bool) -> Vec<Vec<f32>> {
        let x = x.require_grad();
        let y = if fused { batch_norm(norm, x.clone()) } else { norm.forward(x.clone()) };
        let grads = (y.clone() * weights).sum().backward();
        let v = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
        let flat = |t: Tensor<D>| t.into_data().try_to_vec::<f32>().unwrap();
        vec![
            flat(y.inner()),
            flat(x.grad(&grads).unwrap()),
            v(norm.gamma.val().grad(&grads).unwrap()),
            v(norm.beta.val().grad(&grads).unwrap()),
            v(norm.running_mean.value_sync()),
            v(norm.running_var.value_sync()),
        ]
    }

    fn compare<const D: usize>(shape: [usize; D], offset: f64, what: &str) {
        let dev = Device::flex().autodiff();
        dev.seed(11);
        let c = shape[1];
        // γ and β away from 1 and 0, so that their use is checked; two layers with the same
        // values (a clone would share its running statistics)
        let gamma = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), &dev);
        let beta = Tensor::<1>::random([c], Distribution::Uniform(-0.5, 0.5), &dev);
        let layer = || BatchNorm {
            gamma: burn::module::Param::from_tensor(gamma.clone()),
            beta: burn::module::Param::from_tensor(beta.clone()),
            ..BatchNormConfig::new(c).init(&dev)
        };
        let x = Tensor::<D>::random(shape, Distribution::Normal(offset, 2.0), &dev);
        let w = Tensor::<D>::random(shape, Distribution::Uniform(-1.0, 1.0), &dev);
        let reference = step(&layer(), x.clone(), w.clone(), false);
        let fused = step(&layer(), x, w, true);
        let names = ["y", "dx", "dγ", "dβ", "running mean", "running var"];
        for ((name, a), b) in names.iter().zip(&reference).zip(&fused) {
            assert_eq!(a.len(), b.len(), "{what}: {name}");
            let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= 2e-5 * scale, "{what}: {name}[{i}]: burn {p} vs fused {q}");
            }
        }
    }

    /// Values, gradients of x, γ and β, and the running statistics equal burn's BatchNorm's
    /// (which computes them from transposed copies), for 2-D inputs (MLPs) and 3-D (AFN's
    /// `[b, fields, d]`), edge sizes (one row; more rows than a task; channels no multiple of a
    /// vector) and means away from zero.
    #[test]
    fn fused_batch_norm_equals_burns_forward_backward_and_running_statistics() {
        compare([37, 5], 0.0, "[37, 5]");
        compare([300, 129], 0.3, "[300, 129]");
        compare([2, 17], -1.0, "[2, 17]");
        compare([130, 7, 9], 0.0, "[130, 7, 9]");
        compare([65, 3, 1], 1.0, "[65, 3, 1]");
    }

    /// Far from zero mean (activations after a bias drift), the f64 sums keep the statistics
    /// exact where a float32 mean loses digits, and y is centred before it is scaled: against an
    /// f64 reference within 5e-5 (at 1000 an f32 mean is itself rounded by 3e-5).
    #[test]
    fn fused_batch_norm_keeps_its_precision_at_a_large_mean() {
        let (b, c) = (256, 33);
        let x: Vec<f32> = (0..b * c).map(|i| 1000.0 + (crate::rng::splitmix64(i as u64) % 4001) as f32 / 1000.0 - 2.0).collect();
        let (gamma, beta) = (vec![1.0f32; c], vec![0.0f32; c]);
        let (y, mean, var) = forward(&x, [b, c, 1], &gamma, &beta, 1e-5);
        for ch in 0..c {
            let col: Vec<f64> = (0..b).map(|r| x[r * c + ch] as f64).collect();
            let m = col.iter().sum::<f64>() / b as f64;
            let v = col.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / b as f64;
            assert!((mean[ch] as f64 - m).abs() <= 1e-4 && (var[ch] as f64 - v).abs() <= 1e-5 * v, "channel {ch}: statistics");
            for r in 0..b {
                let want = (col[r] - m) / (v + 1e-5).sqrt();
                assert!((y[r * c + ch] as f64 - want).abs() <= 5e-5, "y[{r}, {ch}]: {} vs {want}", y[r * c + ch]);
            }
        }
    }

    /// The training step's gradient is the derivative: central differences of a weighted sum
    /// of outputs against the fused backward, for x and γ.
    #[test]
    fn fused_batch_norm_gradients_match_finite_differences() {
        let (b, c) = (6, 3);
        let x: Vec<f32> = (0..b * c).map(|i| ((i * 7919) % 23) as f32 / 5.0 - 2.0).collect();
        let gamma = [0.7f32, 1.3, -0.4];
        let beta = [0.1f32, -0.2, 0.3];
        let w: Vec<f32> = (0..b * c).map(|i| ((i * 104_729) % 11) as f32 / 10.0 - 0.5).collect();
        let eps = 1e-5;
        let loss = |x: &[f32], gamma: &[f32]| -> f64 {
            let (y, _, _) = forward(x, [b, c, 1], gamma, &beta, eps);
            y.iter().zip(&w).map(|(y, w)| (y * w) as f64).sum()
        };
        let (_, mean, var) = forward(&x, [b, c, 1], &gamma, &beta, eps);
        let (dx, dgamma, dbeta) = backward(&w, &x, [b, c, 1], &mean, &var, &gamma, eps);
        let h = 1e-2f32;
        for i in 0..b * c {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up, &gamma) - loss(&down, &gamma)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3, "dx[{i}]: {} vs {fd}", dx[i]);
        }
        for k in 0..c {
            let (mut up, mut down) = (gamma, gamma);
            up[k] += h;
            down[k] -= h;
            let fd = (loss(&x, &up) - loss(&x, &down)) / (2.0 * h as f64);
            assert!((fd - dgamma[k] as f64).abs() < 2e-3, "dγ[{k}]: {} vs {fd}", dgamma[k]);
            let want: f32 = (0..b).map(|r| w[r * c + k]).sum();
            assert!((dbeta[k] - want).abs() < 1e-5, "dβ[{k}]");
        }
    }

    /// The sums do not depend on how many threads split the rows (fixed chunks, added in order),
    /// and every instruction set gives the same bits.
    #[test]
    fn fused_batch_norm_is_the_same_on_any_thread_count_and_instruction_set() {
        let (b, c) = (1000, 67);
        let x: Vec<f32> = (0..b * c).map(|i| (crate::rng::splitmix64(i as u64) % 10_007) as f32 / 1000.0 - 5.0).collect();
        let gamma = vec![1.1f32; c];
        let beta = vec![0.2f32; c];
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let a = one.install(|| forward(&x, [b, c, 1], &gamma, &beta, 1e-5));
        let b3 = three.install(|| forward(&x, [b, c, 1], &gamma, &beta, 1e-5));
        assert!(a.0 == b3.0 && a.1 == b3.1 && a.2 == b3.2, "forward differs between 1 and 3 threads");
        let width = c;
        let rows = &x[..width * 10];
        let want = crate::simd::run_on(crate::simd::Isa::Baseline, Sums { x: rows, width, g: None, centre: &[] }).unwrap();
        for isa in [crate::simd::Isa::Avx2, crate::simd::Isa::Avx512] {
            if let Some(got) = crate::simd::run_on(isa, Sums { x: rows, width, g: None, centre: &[] }) {
                assert!(got == want, "{isa:?}: sums differ from the baseline's");
            }
        }
    }

    /// A layer not training (its flag off, or a device without autodiff) takes burn's inference
    /// path: the running statistics normalize, and are left as they were.
    #[test]
    fn a_batch_norm_not_training_uses_and_keeps_the_running_statistics() {
        let dev = Device::flex().autodiff();
        let x = Tensor::<2>::random([8, 4], Distribution::Normal(3.0, 1.0), &dev);
        let mut frozen = BatchNormConfig::new(4).init(&dev);
        frozen.training = burn::module::Param::from_bool(false);
        let inference = BatchNormConfig::new(4).init(&dev.clone().inner());
        for (what, norm, x) in [("flag off", frozen, x.clone()), ("no autodiff", inference, x.clone().inner())] {
            let y = batch_norm(&norm, x.clone());
            // fresh running statistics (mean 0, var 1): y = x / √(1 + ε)
            let want = x.clone().div_scalar((1.0f64 + 1e-5).sqrt());
            assert!(max_diff(y, want) < 1e-5, "{what}: not normalized by the running statistics");
            assert_eq!(norm.running_mean.value().into_data().try_to_vec::<f32>().unwrap(), vec![0.0; 4], "{what}: running mean moved");
        }
    }
}
