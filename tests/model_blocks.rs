//! Shape and semantics of every block, and finite-difference gradient checks.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use wukong::model::Pass;
use wukong::model::Precision::F32;
use wukong::model::layers::{FmBlock, FmBlockSpec, FmKind, LinearCompress, WukongLayer};
use wukong::model::{DataShape, ModelConfig, WukongConfig};

mod common;

/// The device, seeded, with this test's turn at the process-wide generator: every run draws the
/// same weights and inputs (a finite-difference check at a random point could otherwise land on
/// a ReLU kink in one run out of many).
fn dev() -> (std::sync::MutexGuard<'static, ()>, Device) {
    let turn = common::serial();
    let d = Device::flex();
    d.seed(7);
    (turn, d)
}

fn spec(kind: FmKind, n_in: usize, n_out: usize) -> FmBlockSpec {
    FmBlockSpec {
        kind,
        n_in,
        n_out,
        dim: 4,
        rank: 3,
        attention_compress: 2,
        attention_hidden: vec![8],
        mlp_hidden: vec![16],
        dropout: 0.0,
        batch_norm: false,
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn optimized_fm_equals_x_xt_y() {
    let (_turn, device) = dev();
    let block = FmBlock::new(&spec(FmKind::Static, 5, 2), &device);
    let x = Tensor::<3>::random([3, 5, 4], Distribution::Normal(0.0, 1.0), &device);
    let y = block.projection.as_ref().unwrap().val();
    // reference: (X Xᵀ) Y, computed example by example on the host
    let xs = to_vec(x.clone());
    let ys = to_vec(y);
    let got = to_vec(block.interactions(x, &Pass::f32()));
    let (b, n, d, k) = (3, 5, 4, 3);
    let mut want = vec![0f32; b * n * k];
    for e in 0..b {
        for i in 0..n {
            for c in 0..k {
                let mut s = 0.0;
                for j in 0..n {
                    let dot: f32 = (0..d).map(|t| xs[e * n * d + i * d + t] * xs[e * n * d + j * d + t]).sum();
                    s += dot * ys[j * k + c];
                }
                want[e * n * k + i * k + c] = s;
            }
        }
    }
    assert!(max_abs_diff(&got, &want) < 1e-4, "optimized FM differs from (X Xᵀ) Y");
}

#[test]
fn full_fm_is_x_xt_and_attentive_fm_uses_a_per_example_projection() {
    let (_turn, device) = dev();
    let x = Tensor::<3>::random([2, 5, 4], Distribution::Normal(0.0, 1.0), &device);
    let full = FmBlock::new(&spec(FmKind::Full, 5, 2), &device);
    let got = to_vec(full.interactions(x.clone(), &Pass::f32()));
    let want = to_vec(x.clone().matmul(x.clone().swap_dims(1, 2)));
    assert!(max_abs_diff(&got, &want) < 1e-5);

    let att = FmBlock::new(&spec(FmKind::Attentive, 5, 2), &device);
    let a = att.attentive.as_ref().unwrap();
    // Y(X) from the compressed input, then X (Xᵀ Y(X)) = (X Xᵀ) Y(X)
    let c = a.compress.forward(x.clone(), F32).reshape([2, 2 * 4]);
    let y = a.mlp.forward(c, &Pass::f32()).reshape([2, 5, 3]);
    let want = to_vec(x.clone().matmul(x.clone().swap_dims(1, 2)).matmul(y));
    assert!(max_abs_diff(&to_vec(att.interactions(x, &Pass::f32())), &want) < 1e-4);
}

#[test]
fn block_shapes() {
    let (_turn, device) = dev();
    let x = Tensor::<3>::random([3, 7, 4], Distribution::Normal(0.0, 1.0), &device);
    for kind in [FmKind::Static, FmKind::Attentive, FmKind::Full] {
        let block = FmBlock::new(&spec(kind, 7, 6), &device);
        let k = if kind == FmKind::Full { 7 } else { 3 };
        assert_eq!(block.interactions(x.clone(), &Pass::f32()).dims(), [3, 7, k]);
        assert_eq!(block.forward(x.clone(), &Pass::f32()).dims(), [3, 6, 4], "{kind:?}");
    }
    assert_eq!(LinearCompress::new(7, 2, &device).forward(x.clone(), F32).dims(), [3, 2, 4]);
    let layer = WukongLayer::new(&spec(FmKind::Static, 7, 6), 5, &device);
    assert_eq!(layer.forward(x, &Pass::f32()).dims(), [3, 11, 4]);
}

#[test]
fn residual_projection_exactly_when_counts_differ() {
    let (_turn, device) = dev();
    let same = WukongLayer::new(&spec(FmKind::Static, 8, 5), 3, &device);
    assert!(same.residual.is_none(), "8 in, 5+3 out: identity residual");
    let differ = WukongLayer::new(&spec(FmKind::Static, 8, 5), 4, &device);
    let proj = differ.residual.as_ref().expect("8 in, 5+4 out: projected residual");
    assert_eq!(proj.weight.dims(), [8, 9]);

    // and the identity residual really is X: with FMB and LCB zeroed, output = LN(X)
    let x = Tensor::<3>::random([2, 8, 4], Distribution::Normal(0.0, 1.0), &device);
    let zero_lcb = LinearCompress { weight: burn::module::Param::from_tensor(Tensor::zeros([8, 3], &device)) };
    let mut layer = same;
    layer.lcb = Some(zero_lcb);
    let fmb = layer.fmb.as_mut().unwrap();
    fmb.mlp.output.weight = burn::module::Param::from_tensor(Tensor::zeros([16, 5 * 4], &device));
    fmb.mlp.output.bias = Some(burn::module::Param::from_tensor(Tensor::zeros([5 * 4], &device)));
    let got = to_vec(layer.forward(x.clone(), &Pass::f32()));
    // LN over d of [0 (fmb) ; 0 (lcb)] + X = LN(X)
    let want = to_vec(layer.norm.forward(x));
    assert!(max_abs_diff(&got, &want) < 1e-5);
}

#[test]
fn lcb_is_linear_so_it_keeps_the_interaction_order() {
    // LCB(a·X1 + X2) = a·LCB(X1) + LCB(X2): a linear map adds no product of embeddings.
    let (_turn, device) = dev();
    let lcb = LinearCompress::new(6, 4, &device);
    let x1 = Tensor::<3>::random([2, 6, 4], Distribution::Normal(0.0, 1.0), &device);
    let x2 = Tensor::<3>::random([2, 6, 4], Distribution::Normal(0.0, 1.0), &device);
    let lhs = to_vec(lcb.forward(x1.clone().mul_scalar(2.5) + x2.clone(), F32));
    let rhs = to_vec(lcb.forward(x1, F32).mul_scalar(2.5) + lcb.forward(x2, F32));
    assert!(max_abs_diff(&lhs, &rhs) < 1e-5);
    // whereas the FM block's interactions are quadratic: FM(2X) = 4 FM(X)
    let fm = FmBlock::new(&spec(FmKind::Static, 6, 2), &device);
    let x = Tensor::<3>::random([2, 6, 4], Distribution::Normal(0.0, 1.0), &device);
    let a = to_vec(fm.interactions(x.clone().mul_scalar(2.0), &Pass::f32()));
    let b = to_vec(fm.interactions(x, &Pass::f32()).mul_scalar(4.0));
    assert!(max_abs_diff(&a, &b) < 1e-4);
}

/// Central finite differences of `f` at `x` (host vectors), compared with `grad`.
fn check_gradient(x: &[f32], grad: &[f32], f: impl Fn(&[f32]) -> f64, entries: &[usize]) {
    let h = 1e-2f32;
    for &i in entries {
        let mut xp = x.to_vec();
        let mut xm = x.to_vec();
        xp[i] += h;
        xm[i] -= h;
        let numeric = (f(&xp) - f(&xm)) / (2.0 * h as f64);
        let analytic = grad[i] as f64;
        let tol = 2e-2 * numeric.abs().max(analytic.abs()) + 2e-3;
        assert!((numeric - analytic).abs() < tol, "entry {i}: finite difference {numeric} vs autodiff {analytic}");
    }
}

#[test]
fn interaction_layer_gradient_matches_finite_differences() {
    let (_turn, device) = dev();
    let ad = device.clone().autodiff();
    let layer = WukongLayer::new(&spec(FmKind::Static, 5, 3), 4, &ad);
    let shape = [2, 5, 4];
    let x0 = to_vec(Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device));
    let w = to_vec(Tensor::<3>::random([2, 7, 4], Distribution::Normal(0.0, 1.0), &device));
    let weights = Tensor::<3>::from_data(TensorData::new(w.clone(), [2, 7, 4]), &ad);

    let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), &ad).require_grad();
    let loss = (layer.forward(x.clone(), &Pass::f32()) * weights.clone()).sum();
    let grads = loss.backward();
    let g = to_vec(x.grad(&grads).unwrap());

    let plain = layer.valid();
    let wt = Tensor::<3>::from_data(TensorData::new(w, [2, 7, 4]), &device);
    let f = |xs: &[f32]| {
        let x = Tensor::<3>::from_data(TensorData::new(xs.to_vec(), shape), &device);
        (plain.forward(x, &Pass::f32()) * wt.clone()).sum().into_scalar::<f32>() as f64
    };
    check_gradient(&x0, &g, f, &[0, 3, 7, 12, 19, 22, 31, 39]);
}

#[test]
fn whole_model_forward_shape_and_flops_are_consistent() {
    let (_turn, device) = dev();
    let cfg = WukongConfig {
        embedding_dim: 4,
        num_layers: 3,
        num_fmb: 3,
        num_lcb: 2,
        fm_rank: 2,
        fmb_mlp: vec![8],
        top_mlp: vec![8],
        ..Default::default()
    };
    let shape = DataShape { fields: 6, dense: 0, table_rows: 20 };
    let m = cfg.init(&shape, &device);
    let x = Tensor::<3>::random([5, 6, 4], Distribution::Normal(0.0, 1.0), &device);
    assert_eq!(m.forward(Some(x), None, &Pass::f32()).dims(), [5]);
    // 3 layers: the first projects 6 → 5 embeddings, the next two keep 5 → identity residual
    assert!(m.layers[0].residual.is_some() && m.layers[1].residual.is_none() && m.layers[2].residual.is_none());
    // hand count for layer 1 (n=6, k=2, d=4): FM 4·6·2·4=192; MLP 2·(12·8 + 8·12)=384; LCB 2·6·2·4=96; residual 2·6·5·4=240
    // layers 2,3 (n=5): FM 160; MLP 2·(10·8+8·12)=352; LCB 80 → 592 each; top: 2·(20·8 + 8·1) = 336
    assert_eq!(ModelConfig::Wukong(cfg).forward_flops(&shape), 192 + 384 + 96 + 240 + 2 * 592 + 336);
}

#[test]
fn dense_features_become_extra_embeddings() {
    let (_turn, device) = dev();
    let cfg = WukongConfig {
        embedding_dim: 4,
        num_layers: 1,
        num_fmb: 3,
        num_lcb: 2,
        fm_rank: 2,
        num_dense_embeddings: 2,
        dense_mlp: vec![8],
        fmb_mlp: vec![8],
        top_mlp: vec![8],
        ..Default::default()
    };
    let shape = DataShape { fields: 6, dense: 3, table_rows: 20 };
    assert_eq!(cfg.n0(&shape), 8);
    let m = cfg.init(&shape, &device);
    let x = Tensor::<3>::random([5, 6, 4], Distribution::Normal(0.0, 1.0), &device);
    let dense = Tensor::<2>::random([5, 3], Distribution::Normal(0.0, 1.0), &device);
    assert_eq!(m.forward(Some(x), Some(dense.clone()), &Pass::f32()).dims(), [5]);
    assert_eq!(m.layers[0].fmb.as_ref().unwrap().projection.as_ref().unwrap().dims(), [8, 2]);
    // all-dense data (no categorical field): the dense embeddings alone enter the stack
    let only = DataShape { fields: 0, dense: 3, table_rows: 1 };
    assert_eq!(cfg.n0(&only), 2);
    let m = cfg.init(&only, &device);
    assert_eq!(m.forward(None, Some(dense), &Pass::f32()).dims(), [5]);
    assert_eq!(m.layers[0].fmb.as_ref().unwrap().projection.as_ref().unwrap().dims(), [2, 2]);
}

#[test]
fn dropout_keeps_the_expected_fraction_scaled_and_is_off_in_inference() {
    use wukong::model::layers::{Dropout, Precision};
    let (_turn, device) = dev();
    let ad = device.clone().autodiff();
    let pass = Pass::seeded(Precision::F32, 1);
    let d = Dropout::new(0.25);
    let x = Tensor::<2>::ones([200, 500], &ad);
    let start = pass.dropout_stream();
    let y = to_vec(d.forward(x, &pass).inner());
    assert_eq!(pass.dropout_stream(), start.wrapping_add(200 * 500), "the stream advances by the masked elements");
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    // inference tensors pass through untouched and draw nothing
    let x = Tensor::<2>::ones([4, 4], &device);
    let before = pass.dropout_stream();
    assert_eq!(to_vec(d.forward(x, &pass)), vec![1.0; 16]);
    assert_eq!(pass.dropout_stream(), before);
    // a fresh seed gives a fresh mask, the same seed the same one; passes are independent
    let mask = |seed: u64| to_vec(d.forward(Tensor::<2>::ones([20, 20], &ad), &Pass::seeded(Precision::F32, seed)).inner());
    let (a, b, c) = (mask(1), mask(1), mask(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// The ablation switches zero exactly their part: an ablated FMB or LCB contributes zeros (and
/// has no parameters or FLOPs), an ablated residual is not added.
#[test]
fn ablations_zero_exactly_what_they_say() {
    use wukong::model::layers::LayerParts;
    use wukong::model::wukong::Ablation;
    let (_turn, device) = dev();
    let s = spec(FmKind::Static, 8, 5);
    let full = WukongLayer::new(&s, 3, &device);
    let x = Tensor::<3>::random([2, 8, 4], Distribution::Normal(0.0, 1.0), &device);
    let pass = Pass::f32();
    let fmb = full.fmb.as_ref().unwrap().forward(x.clone(), &pass);
    let lcb = full.lcb.as_ref().unwrap().forward(x.clone(), pass.precision);
    let zeros = |n: usize| Tensor::<3>::zeros([2, n, 4], &device);
    let cases = [
        (LayerParts { fmb: false, ..LayerParts::ALL }, Tensor::cat(vec![zeros(5), lcb.clone()], 1) + x.clone()),
        (LayerParts { lcb: false, ..LayerParts::ALL }, Tensor::cat(vec![fmb.clone(), zeros(3)], 1) + x.clone()),
        (LayerParts { residual: false, ..LayerParts::ALL }, Tensor::cat(vec![fmb.clone(), lcb.clone()], 1)),
        (LayerParts { fmb: false, lcb: false, residual: true }, Tensor::cat(vec![zeros(5), zeros(3)], 1) + x.clone()),
    ];
    for (parts, pre_norm) in cases {
        // the same weights as `full` for the parts that remain
        let mut layer = WukongLayer::with_parts(&s, 3, parts, &device);
        if parts.fmb {
            layer.fmb = full.fmb.clone();
        }
        if parts.lcb {
            layer.lcb = full.lcb.clone();
        }
        layer.norm = full.norm.clone();
        assert_eq!(layer.fmb.is_some(), parts.fmb);
        assert_eq!(layer.lcb.is_some(), parts.lcb);
        let got = to_vec(layer.forward(x.clone(), &pass));
        let want = to_vec(full.norm.forward(pre_norm));
        assert!(max_abs_diff(&got, &want) < 1e-5, "{parts:?}");
    }
    // the whole model: parameters and FLOPs drop by exactly the ablated blocks
    let shape = DataShape { fields: 6, dense: 0, table_rows: 20 };
    let base = WukongConfig {
        embedding_dim: 4,
        num_layers: 2,
        num_fmb: 3,
        num_lcb: 2,
        fm_rank: 2,
        fmb_mlp: vec![8],
        top_mlp: vec![8],
        ..Default::default()
    };
    let no_fmb = WukongConfig { ablate: vec![Ablation::Fmb], ..base.clone() };
    let (a, b) = (base.init(&shape, &device), no_fmb.init(&shape, &device));
    let fmb_params: usize = a.layers.iter().map(|l| l.fmb.as_ref().unwrap().num_params()).sum();
    assert_eq!(a.num_params() - b.num_params(), fmb_params);
    let fmb_flops: u64 =
        base.layer_specs(&shape).iter().map(|s| 4 * (s.n_in * s.rank * 4) as u64 + 2 * (s.fm_width() * 8 + 8 * s.n_out * 4) as u64).sum();
    assert_eq!(ModelConfig::Wukong(base).forward_flops(&shape) - ModelConfig::Wukong(no_fmb.clone()).forward_flops(&shape), fmb_flops);
    let text = toml::to_string(&ModelConfig::Wukong(no_fmb)).unwrap();
    assert!(text.contains("ablate = [\"fmb\"]"), "{text}");
    assert!(toml::from_str::<ModelConfig>("name = \"wukong\"\nablate = [\"attention\"]").is_err());
}
