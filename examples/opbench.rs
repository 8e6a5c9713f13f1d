//! Micro-benchmark of single operations (forward + backward) on the CPU backend, to see where a
//! training step's time goes: `cargo run --release --example opbench`.
use burn::module::Module;
use burn::nn::{LayerNormConfig, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;

fn time<F: FnMut()>(name: &str, reps: usize, mut f: F) {
    f();
    let mut v = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    println!("{name:<48} {:>8.2} ms", v[v.len() / 2]);
}

fn main() {
    let dev = Device::flex().autodiff();
    let b = 4096;
    for (i, o) in [(80usize, 256usize), (256, 256), (256, 1024), (2048, 256), (936, 2048), (2048, 2048)] {
        let lin = LinearConfig::new(i, o).init(&dev);
        let x = Tensor::<2>::random([b, i], Distribution::Default, &dev).require_grad();
        time(&format!("linear fwd {b}x{i} -> {o}"), 5, || {
            let _ = lin.forward(x.clone()).into_data();
        });
        time(&format!("linear fwd+bwd {b}x{i} -> {o}"), 5, || {
            let y = lin.forward(x.clone()).sum();
            let _ = y.backward();
        });
        time(&format!("linear (ours) fwd+bwd {b}x{i} -> {o}"), 5, || {
            let _ = wukong::model::layers::linear_f32(&lin, x.clone()).sum().backward();
        });
    }
    let ln = LayerNormConfig::new(64).init(&dev);
    let x = Tensor::<3>::random([b, 32, 64], Distribution::Default, &dev).require_grad();
    time("layernorm fwd [4096,32,64]", 5, || {
        let _ = ln.forward(x.clone()).into_data();
    });
    time("layernorm fwd+bwd [4096,32,64]", 5, || {
        let _ = ln.forward(x.clone()).sum().backward();
    });
    time("fused layernorm fwd+bwd [4096,32,64]", 5, || {
        let _ = wukong::model::fused::layer_norm(&ln, x.clone()).sum().backward();
    });
    let d = 64;
    let c = Tensor::<2>::eye(d, &dev.clone().inner()).sub_scalar(1.0 / d as f64);
    let m = Tensor::<2>::full([d, d], 1.0 / d as f64, &dev.clone().inner());
    let (c, m) = (c.autodiff(), m.autodiff());
    let gamma = Tensor::<1>::ones([d], &dev).require_grad();
    let beta = Tensor::<1>::zeros([d], &dev).require_grad();
    let lnm = |x: Tensor<3>| {
        let [b, n, d] = x.dims();
        let x2 = x.reshape([b * n, d]);
        let cen = x2.matmul(c.clone());
        let var = (cen.clone() * cen.clone()).matmul(m.clone());
        let y = cen * var.add_scalar(1e-5).sqrt().recip();
        (y * gamma.clone().unsqueeze::<2>() + beta.clone().unsqueeze::<2>()).reshape([b, n, d])
    };
    time("matmul-LN fwd+bwd [4096,32,64]", 5, || {
        let _ = lnm(x.clone()).sum().backward();
    });
    time("matmul-LN fwd [4096,32,64]", 5, || {
        let _ = lnm(x.clone()).into_data();
    });
    let lnr = |x: Tensor<3>| {
        let mean = x.clone().mean_dim(2);
        let cen = x - mean;
        let var = (cen.clone() * cen.clone()).mean_dim(2);
        let y = cen * var.add_scalar(1e-5).sqrt().recip();
        y * gamma.clone().unsqueeze::<3>() + beta.clone().unsqueeze::<3>()
    };
    time("reduce-LN fwd+bwd [4096,32,64]", 5, || {
        let _ = lnr(x.clone()).sum().backward();
    });
    let w = Tensor::<2>::random([32, 16], Distribution::Default, &dev).require_grad();
    time("lcb swap.matmul(w[1,32,16]).swap fwd+bwd", 5, || {
        let y = x.clone().swap_dims(1, 2).matmul(w.clone().unsqueeze_dim::<3>(0)).swap_dims(1, 2);
        let _ = y.sum().backward();
    });
    let y8 = Tensor::<2>::random([32, 8], Distribution::Default, &dev).require_grad();
    time("fm x(xT y) fwd+bwd [4096,32,64] k=8", 5, || {
        let xt = x.clone().swap_dims(1, 2);
        let z = x.clone().matmul(xt.matmul(y8.clone().unsqueeze_dim::<3>(0)));
        let _ = z.sum().backward();
    });
    time("relu fwd+bwd [4096,32,64]", 5, || {
        let _ = burn::tensor::activation::relu(x.clone()).sum().backward();
    });
    time("cat dim1 2x[4096,16,64] fwd+bwd", 5, || {
        let a = x.clone().narrow(1, 0, 16);
        let c = Tensor::cat(vec![a.clone(), a], 1);
        let _ = c.sum().backward();
    });
    use wukong::model::layers::{FmBlock, FmBlockSpec, FmKind, LinearCompress, Mlp, Pass};
    let spec = FmBlockSpec {
        kind: FmKind::Static,
        n_in: 32,
        n_out: 16,
        dim: 64,
        rank: 8,
        attention_compress: 8,
        attention_hidden: vec![64],
        mlp_hidden: vec![256, 256],
        dropout: 0.2,
        batch_norm: false,
    };
    let fmb = FmBlock::new(&spec, &dev);
    time("FMB interactions fwd+bwd", 5, || {
        let _ = fmb.interactions(x.clone(), &Pass::f32()).sum().backward();
    });
    time("FMB whole fwd+bwd", 5, || {
        let _ = fmb.forward(x.clone(), &Pass::f32()).sum().backward();
    });
    let mlp = Mlp::new(256, &[256, 256], 1024, 0.2, &dev);
    let h = Tensor::<2>::random([b, 256], Distribution::Default, &dev).require_grad();
    time("FMB MLP 256-256-256-1024 dropout fwd+bwd", 5, || {
        let _ = mlp.forward(h.clone(), &Pass::f32()).sum().backward();
    });
    let mlp0 = Mlp::new(256, &[256, 256], 1024, 0.0, &dev);
    time("same MLP no dropout fwd+bwd", 5, || {
        let _ = mlp0.forward(h.clone(), &Pass::f32()).sum().backward();
    });
    let lcb = LinearCompress::new(32, 16, &dev);
    time("LCB 32->16 fwd+bwd", 5, || {
        let _ = lcb.forward(x.clone(), wukong::model::Precision::F32).sum().backward();
    });
    let wl = Tensor::<2>::random([32, 16], Distribution::Default, &dev).require_grad();
    time("LCB reshape-2D fwd+bwd", 5, || {
        let [b, n, d] = x.dims();
        let y = x.clone().swap_dims(1, 2).reshape([b * d, n]).matmul(wl.clone()).reshape([b, d, 16]).swap_dims(1, 2);
        let _ = y.sum().backward();
    });
    time("LCB W-left broadcast fwd+bwd", 5, || {
        let y = wl.clone().transpose().unsqueeze_dim::<3>(0).matmul(x.clone());
        let _ = y.sum().backward();
    });
    time("LCB reshape-2D fwd only", 5, || {
        let [b, n, d] = x.dims();
        let _ = x.clone().swap_dims(1, 2).reshape([b * d, n]).matmul(wl.clone()).reshape([b, d, 16]).swap_dims(1, 2).into_data();
    });
    time("LCB current fwd only", 5, || {
        let _ = lcb.forward(x.clone(), wukong::model::Precision::F32).into_data();
    });
    time("LCB W-left fwd only", 5, || {
        let _ = wl.clone().transpose().unsqueeze_dim::<3>(0).matmul(x.clone()).into_data();
    });
    let top = Mlp::new(2048, &[256, 128], 1, 0.2, &dev);
    let t2 = Tensor::<2>::random([b, 2048], Distribution::Default, &dev).require_grad();
    time("top MLP 2048-256-128-1 fwd+bwd", 5, || {
        let _ = top.forward(t2.clone(), &Pass::f32()).sum().backward();
    });
    // BatchNorm in training mode: burn's (transposing copies) against the fused kernel, on a
    // batch-normed MLP layer's activations (FinalMLP, DCNv2, DLRM … on Frappe) and AFN's 3-D input
    for shape in [[b, 1024], [b, 256]] {
        let bn = burn::nn::BatchNormConfig::new(shape[1]).init(&dev);
        let a = Tensor::<2>::random(shape, Distribution::Default, &dev).require_grad();
        time(&format!("batch norm (burn) fwd+bwd {shape:?}"), 5, || {
            let _ = bn.forward(a.clone()).sum().backward();
        });
        time(&format!("batch norm (fused) fwd+bwd {shape:?}"), 5, || {
            let _ = wukong::model::batch_norm::batch_norm(&bn, a.clone()).sum().backward();
        });
    }
    let bn3 = burn::nn::BatchNormConfig::new(10).init(&dev);
    let a3 = Tensor::<3>::random([b, 10, 64], Distribution::Default, &dev).require_grad();
    time("batch norm (burn) fwd+bwd [4096,10,64]", 5, || {
        let _ = bn3.forward(a3.clone()).sum().backward();
    });
    time("batch norm (fused) fwd+bwd [4096,10,64]", 5, || {
        let _ = wukong::model::batch_norm::batch_norm(&bn3, a3.clone()).sum().backward();
    });
    time("sum().backward() harness alone [4096,32,64]", 5, || {
        let _ = x.clone().sum().backward();
    });
    let _ = Device::flex().inner();
    let _ = x.valid();
}

/// Per-block forward + backward times of one Frappe-sized Wukong layer (`[4096, 32, 64]` in).
#[allow(dead_code)]
pub fn layer_blocks() {}
