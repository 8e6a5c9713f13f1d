//! The three bf16 products of one table5-shaped MLP layer (batch 512, 2048 → 2048) through
//! `--precision bf16`'s kernel (AMX where granted, else the AVX512-BF16 register kernel, else gemmkit;
//! `WUKONG_BF16` overrides): the
//! forward `X·W`, `dX = dY·Wᵀ` and `dW = Xᵀ·dY`, from f32 operands as the training step passes
//! them. `cargo run --release --example amx_phases [table5]` (median and minimum of 20 of each; `table5`:
//! every product shape of a table5 step, and their sum over the step's layers; `M K N`: one shape).
// the binary's allocator, so buffer reuse behaves as in training
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;
use wukong::model::bf16::{Bf16Kernel, Operand, product};

fn main() {
    println!("{}", Bf16Kernel::chosen().describe());
    let shapes: Vec<(usize, usize, usize, usize)> = match std::env::args().nth(1).as_deref() {
        // every bf16 product shape of a table5 step (batch 512) and how many layers have it
        Some("table5") => vec![
            (512, 1536, 2048, 8),
            (512, 2048, 2048, 16),
            (512, 2048, 4096, 8),
            (512, 8192, 2048, 1),
            (512, 2048, 1024, 1),
            (512, 1024, 1, 1),
        ],
        // `M K N`: one shape (a small M shows the packing of B, which does not shrink with M)
        Some(m) if m.parse::<usize>().is_ok() => {
            let dim = |i: usize| std::env::args().nth(i).and_then(|v| v.parse().ok()).expect("amx_phases M K N");
            vec![(dim(1), dim(2), dim(3), 1)]
        }
        _ => vec![(512, 2048, 2048, 1)],
    };
    let mut total = 0.0;
    for (m, k, n, layers) in shapes {
        println!("[{m}, {k}] x [{k}, {n}], {layers} layer(s)");
        total += layers as f64 * layer(m, k, n);
    }
    println!("sum over the step's layers: {total:.1} ms");
}

/// The three products of one layer; returns the sum of their medians.
fn layer(m: usize, k: usize, n: usize) -> f64 {
    let values = |len: usize, step: usize| -> Vec<f32> { (0..len).map(|i| ((i * step) % 2001) as f32 / 1000.0 - 1.0).collect() };
    let (x, w, g) = (values(m * k, 7919), values(k * n, 104_729), values(m * n, 31));
    let flop = 2.0 * (m * k * n) as f64;
    let time = |name: &str, run: &dyn Fn() -> Vec<f32>| -> f64 {
        let mut ms: Vec<f64> = (0..22)
            .map(|_| {
                let t = Instant::now();
                drop(run());
                t.elapsed().as_secs_f64() * 1e3
            })
            .skip(2)
            .collect();
        ms.sort_by(f64::total_cmp);
        let (min, median) = (ms[0], ms[ms.len() / 2]);
        println!("  {name:26} {median:6.2} ms  {:6.0} GFLOP/s (min {min:6.2} ms, {:6.0} GFLOP/s)", flop / median / 1e6, flop / min / 1e6);
        median
    };
    time("forward X·W", &|| product(Operand::new(&x, m, k), Operand::new(&w, k, n)))
        + time("dX = dY·Wᵀ", &|| product(Operand::new(&g, m, n), Operand::transpose_of(&w, k, n)))
        + time("dW = Xᵀ·dY", &|| product(Operand::transpose_of(&x, m, k), Operand::new(&g, m, n)))
}
