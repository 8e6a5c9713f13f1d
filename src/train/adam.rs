//! Adam for the dense parameters, with global-norm gradient clipping folded in.
//!
//! burn's Adam runs about fifteen element-wise tensor ops per parameter and step (weight decay,
//! two moments, bias correction, the update, the subtraction), each a full pass over a buffer the
//! size of the parameter and most of them a fresh allocation; the clipping before it adds three
//! more (square, sum, scale). On the Table-5 shape (150M dense parameters) that was 15% of a
//! step against PyTorch's fused Adam at 4%. On the CPU backend this module does the whole
//! update in one pass per parameter (read θ, g, m, v; write θ, m, v — in place when the buffers
//! are not shared) plus one read of g for the norm. Other backends keep burn's Adam.
//!
//! The arithmetic is burn's, operation for operation in f32 (so the two paths agree to rounding),
//! and the state is saved in burn's optimizer record format (`{id}.momentum.moment_1`, …): a
//! checkpoint written by either path resumes on the other.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, backend_extension};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, decay::WeightDecayConfig};
use burn::tensor::{DType, Device, Shape, Tensor, TensorData};
use rayon::prelude::*;

use crate::config::TrainConfig;

#[backend_extension(Flex)]
pub trait FusedAdamOps: Backend {
    /// One Adam step on a flat parameter: `h` = [lr, β₁, β₂, ε, weight decay, step number t (1-based),
    /// gradient scale]. Returns (θ, m, v).
    fn fused_adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        h: [f64; 7],
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Σ x² as a one-element tensor.
    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Elements per parallel task: large enough to amortize scheduling (the kernel is memory-bound).
const CHUNK: usize = 1 << 15;

// Buffers the fused step had to copy (a view, or shared with another owner); tests check that
// parameters and moments are updated in place. Per thread: the kernels run on the caller's
// thread, so a test's count is its own.
thread_local! {
    static COPIES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The tensor as a contiguous f32 buffer of exactly its elements, uniquely owned when `unique`
/// (a copy only when it is a view or, for `unique`, has another owner).
fn owned_contiguous(t: FlexTensor, unique: bool) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fused Adam is f32-only");
    let n = t.layout().shape().num_elements();
    if t.is_contiguous() && t.bytes().len() == n * 4 && (!unique || t.is_unique()) {
        t
    } else {
        COPIES.with(|c| c.set(c.get() + 1));
        // `to_contiguous` may hand back the same shared buffer; a fresh one is built from data.
        let shape = t.layout().shape().clone();
        let data = t.to_contiguous().into_data();
        FlexTensor::from_data(TensorData::new(data.try_into_vec::<f32>().expect("f32 tensor"), shape))
    }
}

/// Bias corrections exactly as burn computes them (in f32): the step is
/// `θ -= lr · (m · c₁) / (√v + ε · c₂)` with `c₂ = √(1 − β₂ᵗ)`, `c₁ = c₂ / (1 − β₁ᵗ)`.
fn corrections(beta_1: f32, beta_2: f32, epsilon: f32, time: i32) -> (f32, f32) {
    let bc2_sqrt = (1.0 - beta_2.powi(time)).sqrt();
    (bc2_sqrt / (1.0 - beta_1.powi(time)), epsilon * bc2_sqrt)
}

impl FusedAdamOps for Flex {
    fn fused_adam_step(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        h: [f64; 7],
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let [lr, b1, b2, eps, wd, time, scale] = h;
        let (lr, b1, b2, wd, scale) = (lr as f32, b1 as f32, b2 as f32, wd as f32, scale as f32);
        let (c1, eps_hat) = corrections(b1, b2, eps as f32, time as i32);
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        let shape = param.layout().shape().clone();
        // a bf16 packing of θ (a weight of the bf16 products) is taken out before θ is written
        // in place, and re-made from the updated rows while they are in cache
        let mut packed = crate::model::packed::take(&param).filter(|w| w.shape().iter().product::<usize>() == shape.num_elements());
        let grad = owned_contiguous(grad, false);
        let (mut p, mut m, mut v) = (owned_contiguous(param, true), owned_contiguous(moment_1, true), owned_contiguous(moment_2, true));
        {
            let g = grad.storage::<f32>();
            let (ps, ms, vs) = (p.storage_mut::<f32>(), m.storage_mut::<f32>(), v.storage_mut::<f32>());
            assert!(g.len() == ps.len() && ms.len() == ps.len() && vs.len() == ps.len(), "fused Adam: buffers of unequal size");
            let k = Consts { lr, b1, b2, f1, f2, c1, eps_hat, wd, scale };
            // with a packing: bands of whole rows of θ ([k, n]), each packed right after its update
            let chunk = packed.as_ref().map_or(CHUNK, |w| crate::model::amx::BAND * w.shape()[1].max(1));
            let bands = packed.as_mut().map(|w| w.bands());
            ps.par_chunks_mut(chunk)
                .zip(ms.par_chunks_mut(chunk))
                .zip(vs.par_chunks_mut(chunk))
                .zip(g.par_chunks(chunk))
                .enumerate()
                .for_each(|(b, (((p, m), v), g))| {
                    adam_chunk(p, m, v, g, k);
                    if let Some(bands) = &bands {
                        bands.pack(b, p);
                    }
                });
        }
        let p = p.reshape(shape.clone());
        if let Some(w) = packed {
            crate::model::packed::insert(&p, w);
        }
        (p, m.reshape(shape.clone()), v.reshape(shape))
    }

    fn fused_sum_squares(x: FlexTensor) -> FlexTensor {
        let x = owned_contiguous(x, false);
        let s: f64 = x.storage::<f32>().par_chunks(CHUNK).map(|c| sum_squares(c) as f64).sum();
        FlexTensor::from_data(TensorData::new(vec![s as f32], [1]))
    }
}

/// The scalars of one step, by value (captured by reference they were reloaded from memory in
/// every iteration).
#[derive(Clone, Copy)]
struct Consts {
    lr: f32,
    b1: f32,
    b2: f32,
    f1: f32,
    f2: f32,
    c1: f32,
    eps_hat: f32,
    wd: f32,
    scale: f32,
}

/// One chunk of the Adam step, in burn's operation order. The slices are cut to one length so
/// that the loop has no bounds checks and vectorizes; no mul+add is contracted into an FMA
/// (LLVM does not without fast-math), so every lane rounds exactly as the scalar code.
#[inline(always)]
fn adam_body<const WD: bool>(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: Consts) {
    let n = p.len();
    let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
    for i in 0..n {
        // burn: g' = wd·θ + g (L2 into the gradient), after the global clipping.
        let gi = if WD { p[i] * k.wd + g[i] * k.scale } else { g[i] * k.scale };
        let mi = m[i] * k.b1 + gi * k.f1;
        let vi = v[i] * k.b2 + (gi * gi) * k.f2;
        m[i] = mi;
        v[i] = vi;
        p[i] -= (mi * k.c1) / (vi.sqrt() + k.eps_hat) * k.lr;
    }
}

#[inline(always)]
fn adam_portable(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: Consts) {
    if k.wd != 0.0 { adam_body::<true>(p, m, v, g, k) } else { adam_body::<false>(p, m, v, g, k) }
}

/// One chunk of the step, on the widest vector instructions the CPU has (`crate::simd`; it used
/// AVX2 at most before: the step is memory-bound, and on Zen 4 AVX-512 and AVX2 ran it in the same
/// 26–29 ms for 50M parameters in alternating runs of `fused_adam_throughput`).
struct AdamChunk<'a> {
    p: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    g: &'a [f32],
    k: Consts,
}

impl crate::simd::Wide for AdamChunk<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        adam_portable(self.p, self.m, self.v, self.g, self.k)
    }
}

fn adam_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: Consts) {
    crate::simd::run(AdamChunk { p, m, v, g, k })
}

/// Σ x² of one chunk, on the widest vector instructions the CPU has (as [`AdamChunk`]).
struct ChunkSquares<'a>(&'a [f32]);

impl crate::simd::Wide for ChunkSquares<'_> {
    type Output = f32;
    #[inline(always)]
    fn run(self) -> f32 {
        lane_sum_squares(self.0)
    }
}

fn sum_squares(xs: &[f32]) -> f32 {
    crate::simd::run(ChunkSquares(xs))
}

/// Σ x² with eight independent accumulators (vectorizes; a single one is a dependency chain).
#[inline(always)]
fn lane_sum_squares(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Adam's hyperparameters (burn's `AdamConfig` keeps its fields private).
#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

impl AdamHyper {
    pub fn of(t: &TrainConfig) -> Self {
        Self {
            beta_1: t.adam_beta1 as f32,
            beta_2: t.adam_beta2 as f32,
            epsilon: t.adam_epsilon as f32,
            weight_decay: t.weight_decay as f32,
        }
    }

    fn burn(&self) -> ModuleOptimizer {
        AdamConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay((self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay)))
            .init()
    }
}

/// One parameter's Adam state: steps taken and the two moments (inner-device tensors, the
/// parameter's shape).
struct Moments {
    time: usize,
    m: Tensor<1>,
    v: Tensor<1>,
    shape: Shape,
    path: String,
}

/// Adam over a module's dense parameters with global-norm clipping: fused on the CPU backend,
/// burn's `Adam` elsewhere (same arithmetic, same checkpoint format).
pub struct DenseAdam(Path);

enum Path {
    Fused { hyper: AdamHyper, states: HashMap<ParamId, Moments> },
    Burn { optimizer: ModuleOptimizer },
}

impl DenseAdam {
    /// The fused path on the CPU backend (unless `WUKONG_FUSED=0`), burn's elsewhere.
    pub fn new(hyper: AdamHyper, device: &Device) -> Self {
        if crate::model::fused::fused_enabled() && device.clone().inner() == Device::flex() {
            Self::fused(hyper)
        } else {
            Self::burn(hyper)
        }
    }

    pub fn fused(hyper: AdamHyper) -> Self {
        Self(Path::Fused { hyper, states: HashMap::new() })
    }

    pub fn burn(hyper: AdamHyper) -> Self {
        Self(Path::Burn { optimizer: hyper.burn() })
    }

    /// The global L2 norm of the gradients of `module`'s parameters.
    pub fn grad_norm<M: Module>(&self, module: &M, grads: &GradientsParams) -> f64 {
        match &self.0 {
            Path::Fused { .. } => {
                let mut v = SumSquares { grads, total: 0.0 };
                module.visit(&mut v);
                v.total.sqrt()
            }
            Path::Burn { .. } => super::optim::grad_norm(module, grads),
        }
    }

    /// One step: gradients scaled by `max_norm / norm` when `norm` (from [`Self::grad_norm`])
    /// exceeds `max_norm > 0`, then Adam at learning rate `lr`.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, mut grads: GradientsParams, norm: f64, max_norm: f64) -> M {
        let scale = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        match &mut self.0 {
            Path::Fused { hyper, states } => {
                module.map(&mut FusedStep { hyper: *hyper, states, grads: &mut grads, lr, scale, path: Vec::new() })
            }
            Path::Burn { optimizer } => {
                if scale != 1.0 {
                    module.visit(&mut super::optim::Scale { grads: &mut grads, factor: scale });
                }
                optimizer.step(lr, module, grads)
            }
        }
    }

    /// The state as a burn optimizer record (burnpack bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match &self.0 {
            Path::Burn { optimizer } => {
                Ok(optimizer.to_record().into_bytes().map_err(|e| anyhow::anyhow!("cannot serialize the Adam state: {e}"))?.to_vec())
            }
            Path::Fused { states, .. } => {
                let mut ids: Vec<&ParamId> = states.keys().collect();
                ids.sort_by_key(|id| id.val());
                let mut tensors = Vec::new();
                let mut scalars = Vec::new();
                let mut paths = Vec::new();
                for id in ids {
                    let s = &states[id];
                    let prefix = id.val().to_string();
                    for (leaf, t) in [("momentum.moment_1", &s.m), ("momentum.moment_2", &s.v)] {
                        let data = t.clone().into_data();
                        let bytes = burn::tensor::Bytes::from_bytes_vec(data.as_bytes().to_vec());
                        tensors.push(burn_pack::Tensor::new(
                            format!("{prefix}.{leaf}"),
                            DType::F32,
                            s.shape.clone(),
                            Some(id.val()),
                            bytes,
                        ));
                    }
                    scalars.push((format!("{prefix}.momentum.time"), burn_pack::Scalar::from(s.time)));
                    scalars.push((format!("{prefix}.__rank"), burn_pack::Scalar::from(s.shape.num_dims())));
                    paths.push((prefix, s.path.clone()));
                }
                let mut w = burn_pack::Writer::new(tensors);
                for (k, v) in scalars {
                    w = w.with_scalar(&k, v);
                }
                for (k, v) in paths {
                    w = w.with_metadata(&k, &v);
                }
                Ok(w.into_bytes().map_err(|e| anyhow::anyhow!("cannot serialize the Adam state: {e}"))?.to_vec())
            }
        }
    }

    /// Restores what [`Self::to_bytes`] wrote (either path's).
    pub fn load_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        match &mut self.0 {
            Path::Burn { optimizer } => {
                let record = burn::optim::OptimizerRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                    .map_err(|e| anyhow::anyhow!("cannot read the checkpoint's Adam state: {e}"))?;
                *optimizer = optimizer.clone().load_record(record);
                Ok(())
            }
            Path::Fused { states, .. } => {
                *states = read_states(bytes)?;
                Ok(())
            }
        }
    }
}

/// Parses a burn Adam record into per-parameter moments.
fn read_states(bytes: Vec<u8>) -> Result<HashMap<ParamId, Moments>> {
    let bad = |e: burn_pack::Error| anyhow::anyhow!("cannot read the checkpoint's Adam state: {e}");
    let reader = burn_pack::Reader::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes)).map_err(bad)?;
    let scalars = reader.scalars().clone();
    let paths = reader.metadata().clone();
    let mut parts: HashMap<u64, (Option<burn_pack::Tensor>, Option<burn_pack::Tensor>)> = HashMap::new();
    for t in reader.into_tensors().map_err(bad)? {
        let Some(id) = t.param_id else { continue };
        let slot = parts.entry(id).or_default();
        if t.name.ends_with(".momentum.moment_1") {
            slot.0 = Some(t);
        } else if t.name.ends_with(".momentum.moment_2") {
            slot.1 = Some(t);
        } else if t.name.ends_with(".momentum.max_moment_2") {
            bail!("the checkpoint's Adam state is AMSGrad's ({}), which this trainer does not use", t.name);
        }
    }
    let mut states = HashMap::new();
    for (id, (m, v)) in parts {
        let (Some(m), Some(v)) = (m, v) else { bail!("the checkpoint's Adam state for parameter {id} lacks a moment") };
        let time = scalars
            .get(&format!("{id}.momentum.time"))
            .and_then(|s| u64::try_from(*s).ok())
            .with_context(|| format!("the checkpoint's Adam state for parameter {id} has no step count"))?;
        let to_tensor = |t: burn_pack::Tensor| -> Result<(Tensor<1>, Shape)> {
            let (_, dtype, shape, _, bytes) = t.into_parts().map_err(bad)?;
            if dtype != DType::F32 {
                bail!("the checkpoint's Adam state for parameter {id} is {dtype:?}, not f32");
            }
            let n = shape.num_elements();
            let data = TensorData::from_bytes(bytes, [n], dtype);
            Ok((Tensor::<1>::from_data(data, &Device::flex()), shape))
        };
        let (m, shape) = to_tensor(m)?;
        let (v, shape_v) = to_tensor(v)?;
        if shape != shape_v {
            bail!("the checkpoint's Adam moments for parameter {id} differ in shape");
        }
        let path = paths.get(&id.to_string()).cloned().unwrap_or_default();
        states.insert(ParamId::from(id), Moments { time: time as usize, m, v, shape, path });
    }
    Ok(states)
}

/// Σ g² over the parameters that have a gradient (f64 across parameters).
struct SumSquares<'a> {
    grads: &'a GradientsParams,
    total: f64,
}

impl burn::module::ModuleVisitor for SumSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let n = g.shape().num_elements();
            let s = <burn::backend::Dispatch as FusedAdamOps>::fused_sum_squares(g.reshape([n]).into_dispatch());
            self.total += Tensor::<1>::from_dispatch(s).into_scalar::<f32>() as f64;
        }
    }
}

struct FusedStep<'a> {
    hyper: AdamHyper,
    states: &'a mut HashMap<ParamId, Moments>,
    grads: &'a mut GradientsParams,
    lr: f64,
    scale: f64,
    path: Vec<String>,
}

impl ModuleMapper for FusedStep<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let inner = tensor.inner();
        let shape = inner.shape();
        let n = shape.num_elements();
        let device = inner.device();
        let state = self.states.remove(&id);
        let (time, m, v) = match state {
            Some(s) if s.shape == shape => (s.time, s.m, s.v),
            _ => (0, Tensor::<1>::zeros([n], &device), Tensor::<1>::zeros([n], &device)),
        };
        let h = self.hyper;
        let t = time + 1;
        let (p, m, v) = <burn::backend::Dispatch as FusedAdamOps>::fused_adam_step(
            inner.reshape([n]).into_dispatch(),
            grad.reshape([n]).into_dispatch(),
            m.into_dispatch(),
            v.into_dispatch(),
            [self.lr, h.beta_1 as f64, h.beta_2 as f64, h.epsilon as f64, h.weight_decay as f64, t as f64, self.scale],
        );
        let (m, v) = (Tensor::<1>::from_dispatch(m), Tensor::<1>::from_dispatch(v));
        self.states.insert(id, Moments { time: t, m, v, shape: shape.clone(), path: self.path.join(".") });
        let p: Tensor<D> = Tensor::<1>::from_dispatch(p).reshape(shape);
        let mut p = Tensor::from_inner(p);
        if require_grad {
            p = p.require_grad();
        }
        Param::from_mapped_value(id, p, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::Distribution;

    #[derive(burn::module::Module, Debug)]
    struct Net {
        a: Linear,
        b: Linear,
    }

    fn net(device: &Device) -> Net {
        // Odd sizes: not multiples of the vector width or the chunk.
        Net { a: LinearConfig::new(37, 19).init(device), b: LinearConfig::new(19, 1).init(device) }
    }

    fn grads(net: &Net, x: &Tensor<2>) -> GradientsParams {
        let y = net.b.forward(net.a.forward(x.clone()).tanh());
        let loss = (y.clone() * y).mean();
        GradientsParams::from_grads(loss.backward(), net)
    }

    fn max_param_diff(a: &Net, b: &Net) -> f32 {
        [
            (a.a.weight.val() - b.a.weight.val()).abs().max().into_scalar::<f32>(),
            (a.a.bias.as_ref().unwrap().val() - b.a.bias.as_ref().unwrap().val()).abs().max().into_scalar::<f32>(),
            (a.b.weight.val() - b.b.weight.val()).abs().max().into_scalar::<f32>(),
        ]
        .into_iter()
        .fold(0.0, f32::max)
    }

    /// Steps both optimizers on the same model and batches; returns the models.
    fn run(hyper: AdamHyper, steps: usize, max_norm: f64, fused: &mut DenseAdam, burn: &mut DenseAdam) -> (Net, Net) {
        let device = Device::flex().autodiff();
        device.seed(7);
        let start = net(&device);
        let (mut nf, mut nb) = (start.clone(), start);
        let _ = hyper;
        for s in 0..steps {
            let x = Tensor::<2>::random([23, 37], Distribution::Normal(0.0, 3.0), &device);
            let lr = 0.01 * (1.0 + s as f64);
            let gf = grads(&nf, &x);
            let norm_f = fused.grad_norm(&nf, &gf);
            nf = fused.step(lr, nf, gf, norm_f, max_norm);
            let gb = grads(&nb, &x);
            let norm_b = burn.grad_norm(&nb, &gb);
            assert!((norm_f - norm_b).abs() <= 1e-5 * norm_b.max(1.0), "step {s}: norm {norm_f} vs {norm_b}");
            nb = burn.step(lr, nb, gb, norm_b, max_norm);
        }
        (nf, nb)
    }

    #[test]
    fn fused_adam_equals_burns_adam() {
        for (wd, max_norm) in [(0.0, 0.0), (0.01, 0.0), (0.0, 0.05), (0.001, 0.5)] {
            let hyper = AdamHyper { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: wd };
            let (mut f, mut b) = (DenseAdam::fused(hyper), DenseAdam::burn(hyper));
            let (nf, nb) = run(hyper, 6, max_norm, &mut f, &mut b);
            let d = max_param_diff(&nf, &nb);
            assert!(d < 1e-6, "wd {wd} clip {max_norm}: parameters differ by {d}");
            // And the update is not a no-op.
            let moved = max_param_diff(&nf, &net(&Device::flex().autodiff()));
            assert!(moved > 1e-3, "{moved}");
        }
    }

    #[test]
    fn the_state_round_trips_between_the_fused_and_burn_paths() {
        let hyper = AdamHyper { beta_1: 0.8, beta_2: 0.99, epsilon: 1e-7, weight_decay: 0.0 };
        let (mut f, mut b) = (DenseAdam::fused(hyper), DenseAdam::burn(hyper));
        let (nf, nb) = run(hyper, 3, 0.0, &mut f, &mut b);
        // Swap the states across paths and continue: the results stay equal.
        let (mut f2, mut b2) = (DenseAdam::fused(hyper), DenseAdam::burn(hyper));
        f2.load_bytes(b.to_bytes().unwrap()).unwrap();
        b2.load_bytes(f.to_bytes().unwrap()).unwrap();
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::random([23, 37], Distribution::Normal(0.0, 3.0), &device);
        let step = |opt: &mut DenseAdam, n: Net| {
            let g = grads(&n, &x);
            let norm = opt.grad_norm(&n, &g);
            opt.step(0.05, n, g, norm, 0.0)
        };
        let outs = [step(&mut f, nf.clone()), step(&mut b, nb.clone()), step(&mut f2, nf.clone()), step(&mut b2, nb)];
        for o in &outs[1..] {
            let d = max_param_diff(&outs[0], o);
            assert!(d < 1e-6, "{d}");
        }
        // A fresh optimizer (no state) takes a different step: the state mattered.
        let d = max_param_diff(&outs[0], &step(&mut DenseAdam::fused(hyper), nf));
        assert!(d > 1e-4, "{d}");
    }

    #[test]
    fn parameters_and_moments_are_updated_in_place() {
        let hyper = AdamHyper { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0 };
        let mut f = DenseAdam::fused(hyper);
        let device = Device::flex().autodiff();
        let mut n = net(&device);
        let x = Tensor::<2>::random([23, 37], Distribution::Default, &device);
        for step in 0..3 {
            let g = grads(&n, &x);
            let norm = f.grad_norm(&n, &g);
            let before = COPIES.with(|c| c.get());
            n = f.step(0.01, n, g, norm, 1.0);
            let copies = COPIES.with(|c| c.get()) - before;
            assert_eq!(copies, 0, "step {step}: {copies} buffers copied");
        }
    }

    /// A weight with a bf16 packing (`--precision bf16` on a packed kernel) is still updated in
    /// place, to exactly the values of a step without one, and its packing is re-made from the
    /// updated rows: the packing found afterwards is that of the new values, bit for bit (shapes
    /// off the band and tile sizes; the last band partial).
    #[test]
    fn a_packed_weight_is_repacked_with_its_update_in_place() {
        use crate::model::{amx, bf16::Operand, packed};
        let (k, n) = (70, 45);
        let values = |seed: u64, len: usize| -> Vec<f32> {
            (0..len).map(|i| ((crate::rng::splitmix64(seed ^ i as u64) % 2001) as f32 - 1000.0) / 500.0).collect()
        };
        let flat = |v: Vec<f32>| FlexTensor::from_data(TensorData::new(v, [k * n]));
        let w = FlexTensor::from_data(TensorData::new(values(1, k * n), [k, n]));
        if packed::lookup_or_pack(&w, [k, n]).is_none() {
            eprintln!("no packed bf16 kernel here (AMX or AVX512-BF16): nothing to re-pack");
            return;
        }
        let param = w.reshape(Shape::new([k * n]));
        drop(w);
        let h = [0.01, 0.9, 0.999, 1e-8, 0.0, 3.0, 0.5];
        let before = COPIES.with(|c| c.get());
        let (p, _, _) = Flex::fused_adam_step(
            param,
            flat(values(2, k * n)),
            flat(values(3, k * n)),
            flat(values(4, k * n).iter().map(|v| v.abs()).collect()),
            h,
        );
        assert_eq!(COPIES.with(|c| c.get()) - before, 0, "a buffer was copied");
        let (want, _, _) = Flex::fused_adam_step(
            flat(values(1, k * n)),
            flat(values(2, k * n)),
            flat(values(3, k * n)),
            flat(values(4, k * n).iter().map(|v| v.abs()).collect()),
            h,
        );
        assert!(p.storage::<f32>() == want.storage::<f32>(), "the update differs from the step without a packing");
        assert!(p.storage::<f32>() != &values(1, k * n)[..], "the step did not move θ");
        let w = p.reshape(Shape::new([k, n]));
        let repacked = packed::find(&w, [k, n]).expect("the step re-made the packing");
        let amx_tiles = crate::model::bf16::Bf16Kernel::chosen() == crate::model::bf16::Bf16Kernel::Amx;
        let per_product = if amx_tiles { amx::product } else { amx::dot_product };
        let (x, g, wv) = (values(5, 9 * k), values(6, 9 * n), w.storage::<f32>());
        assert!(
            amx::weight_product(Operand::new(&x, 9, k), &repacked, false) == per_product(Operand::new(&x, 9, k), Operand::new(wv, k, n))
        );
        assert!(
            amx::weight_product(Operand::new(&g, 9, n), &repacked, true)
                == per_product(Operand::new(&g, 9, n), Operand::transpose_of(wv, k, n))
        );
    }

    /// The step's and the norm's loops give the same bits on every instruction set the CPU offers
    /// (odd lengths: vector bodies and scalar tails), with and without weight decay.
    #[test]
    fn adam_loops_give_the_same_bits_on_every_instruction_set() {
        use crate::simd::{Isa, run_on};
        let values = |seed: u64, n: usize| -> Vec<f32> {
            (0..n).map(|i| ((crate::rng::splitmix64(seed ^ i as u64) % 2001) as f32 - 1000.0) / 300.0).collect()
        };
        for (n, wd) in [(1usize, 0.0f32), (37, 0.01), (1000, 0.0)] {
            let k = Consts { lr: 0.01, b1: 0.9, b2: 0.999, f1: 0.1, f2: 0.001, c1: 1.3, eps_hat: 1e-8, wd, scale: 0.7 };
            let mut results = Vec::new();
            for isa in [Isa::Baseline, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()) {
                let (mut p, mut m, mut v, g) =
                    (values(1, n), values(2, n), values(3, n).iter().map(|x| x.abs()).collect::<Vec<_>>(), values(4, n));
                run_on(isa, AdamChunk { p: &mut p, m: &mut m, v: &mut v, g: &g, k });
                let squares = run_on(isa, ChunkSquares(&g)).unwrap();
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                results.push((isa, [bits(&p), bits(&m), bits(&v), vec![squares.to_bits()]]));
            }
            for (isa, r) in &results[1..] {
                assert!(r == &results[0].1, "n {n}: {isa:?} differs from the baseline");
            }
        }
    }

    /// Memory throughput of the fused step on a large buffer (`cargo test --release -- --ignored
    /// fused_adam_throughput --nocapture`): it reads θ, g, m, v and writes θ, m, v.
    #[test]
    #[ignore]
    fn fused_adam_throughput() {
        let n = 50_000_000;
        let dev = Device::flex();
        let t = |v: f32| Tensor::<1>::full([n], v, &dev).into_dispatch();
        let (mut p, mut m, mut v) = (t(0.5), t(0.0), t(0.0));
        let g = Tensor::<1>::random([n], Distribution::Default, &dev);
        for i in 0..5 {
            let start = std::time::Instant::now();
            let out = <burn::backend::Dispatch as FusedAdamOps>::fused_adam_step(
                p,
                g.clone().into_dispatch(),
                m,
                v,
                [1e-3, 0.9, 0.999, 1e-8, 0.0, (i + 1) as f64, 1.0],
            );
            let s = start.elapsed().as_secs_f64();
            (p, m, v) = out;
            eprintln!("{n} params: {:.1} ms, {:.1} GB/s (7 × 4 bytes per parameter)", s * 1e3, 28.0 * n as f64 / s / 1e9);
        }
        let start = std::time::Instant::now();
        let _ = Tensor::<1>::from_dispatch(<burn::backend::Dispatch as FusedAdamOps>::fused_sum_squares(g.into_dispatch()))
            .into_scalar::<f32>();
        eprintln!("sum of squares: {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    }

    #[test]
    fn a_broken_record_is_an_error_not_a_panic() {
        let mut f = DenseAdam::fused(AdamHyper { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0 });
        assert!(f.load_bytes(b"not a record".to_vec()).is_err());
    }

    /// A record for parameter 7 with the given moment names, dtype and step count (`None`: no
    /// `time` scalar), written as `to_bytes` writes one.
    fn record(leaves: &[&str], dtype: DType, time: Option<usize>) -> Vec<u8> {
        let width = dtype.size();
        let tensors = leaves
            .iter()
            .map(|leaf| {
                let bytes = burn::tensor::Bytes::from_bytes_vec(vec![0u8; 3 * width]);
                burn_pack::Tensor::new(format!("7.momentum.{leaf}"), dtype, Shape::new([3]), Some(7), bytes)
            })
            .collect();
        let mut w = burn_pack::Writer::new(tensors).with_scalar("7.__rank", burn_pack::Scalar::from(1usize));
        if let Some(t) = time {
            w = w.with_scalar("7.momentum.time", burn_pack::Scalar::from(t));
        }
        w.into_bytes().unwrap().to_vec()
    }

    #[test]
    fn every_unusable_adam_state_is_refused_with_its_reason() {
        let hyper = AdamHyper { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0 };
        let load = |bytes: Vec<u8>| DenseAdam::fused(hyper).load_bytes(bytes).map(|_| ()).map_err(|e| format!("{e:#}"));
        // the well-formed record is read, so the failures below are each about their one defect
        assert_eq!(load(record(&["moment_1", "moment_2"], DType::F32, Some(4))), Ok(()));
        let cases: [(Vec<u8>, &str); 4] = [
            (record(&["moment_1"], DType::F32, Some(4)), "lacks a moment"),
            (record(&["moment_1", "moment_2"], DType::F32, None), "has no step count"),
            (record(&["moment_1", "moment_2"], DType::F16, Some(4)), "not f32"),
            (record(&["moment_1", "moment_2", "max_moment_2"], DType::F32, Some(4)), "AMSGrad"),
        ];
        for (bytes, reason) in cases {
            let err = load(bytes).expect_err(reason);
            assert!(err.contains(reason), "expected {reason:?} in {err:?}");
        }
    }

    #[test]
    fn sum_squares_matches_on_odd_lengths() {
        for n in [1usize, 7, 8, 9, CHUNK + 3] {
            let x: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.25).collect();
            let want: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
            let t = Tensor::<1>::from_data(TensorData::new(x, [n]), &Device::flex());
            let got = Tensor::<1>::from_dispatch(<burn::backend::Dispatch as FusedAdamOps>::fused_sum_squares(t.into_dispatch()))
                .into_scalar::<f32>();
            assert!((got as f64 - want).abs() <= 1e-5 * want.max(1.0), "n {n}: {got} vs {want}");
        }
    }
}
