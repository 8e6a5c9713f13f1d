//! The batched interaction products of one table5-shaped Wukong layer (batch 512, n = 64
//! embeddings of d = 128, k = 24, n_L = 32), forward and backward, through `fused::fm` and `fused::bmm` as
//! the training step runs them, in f32 and in bf16 (the AVX512-BF16 batched kernel where the CPU has
//! it): `cargo run --release --example bmm_phases [f32|bf16]` (median of 20 of each).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;
use wukong::model::Precision;
use wukong::model::fused::{bmm, fm};

fn time(name: &str, flop: f64, mut f: impl FnMut()) {
    f();
    let mut ms: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!("{name:32} {:7.2} ms {:6.0} GFLOP/s", ms[10], flop / ms[10] / 1e6);
}

fn main() {
    println!("{}", wukong::model::bf16::Bf16Kernel::chosen().describe());
    let dev = Device::flex().autodiff();
    let (b, n, d, k, nl) = (512usize, 64usize, 128usize, 24usize, 32usize);
    let x = Tensor::<3>::random([b, n, d], Distribution::Default, &dev).require_grad();
    let y = Tensor::<2>::random([n, k], Distribution::Default, &dev).require_grad();
    let w = Tensor::<2>::random([n, nl], Distribution::Default, &dev).require_grad();
    let f = |m: usize, kk: usize, nn: usize| 2.0 * (b * m * kk * nn) as f64;
    let only = std::env::args().nth(1);
    for (label, p) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
        if only.as_deref().is_some_and(|o| o != label) {
            continue;
        }
        time(&format!("{label} FM X(XᵀY) fwd+bwd"), 3.0 * (f(d, n, k) + f(n, d, k)), || {
            let _ = fm(x.clone(), y.clone().unsqueeze_dim::<3>(0), p).sum().backward();
        });
        time(&format!("{label} LCB WᵀX fwd+bwd"), 3.0 * f(nl, n, d), || {
            let _ = bmm(w.clone().transpose().unsqueeze_dim::<3>(0), x.clone(), p).sum().backward();
        });
    }
}
