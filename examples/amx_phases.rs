//! Phases of the bf16 products of one table5-shaped layer (batch 512, 2048 wide):
//! `cargo run --release --example amx_phases`.
use std::time::Instant;
use wukong::model::bf16::{Operand, product};
fn main() {
    let (m, k, n) = (512usize, 2048usize, 2048usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let w: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 2001) as f32 / 1000.0 - 1.0).collect();
    let g: Vec<f32> = (0..m * n).map(|i| ((i * 31) % 2001) as f32 / 1000.0 - 1.0).collect();
    let f = 2.0 * (m * k * n) as f64;
    if std::env::args().nth(1).as_deref() == Some("fwd") {
        let (xb, wb) = (&x, &w);
        let t = Instant::now();
        for _ in 0..200 {
            drop(product(Operand::new(xb, m, k), Operand::new(wb, k, n)));
        }
        println!("forward: {:.0} GF/s", 200.0 * f / t.elapsed().as_secs_f64() / 1e9);
        return;
    }
    for _ in 0..6 {
        let t0 = Instant::now();
        let (xb, wb, gb) = (&x, &w, &g);
        let t1 = Instant::now();
        let y = product(Operand::new(xb, m, k), Operand::new(wb, k, n));
        let t2 = Instant::now();
        let dx = product(Operand::new(gb, m, n), Operand::transpose_of(wb, k, n));
        let t3 = Instant::now();
        let dw = product(Operand::transpose_of(xb, m, k), Operand::new(gb, m, n));
        let t4 = Instant::now();
        drop((y, dx, dw));
        let gf = |a: Instant, b: Instant| f / (b - a).as_secs_f64() / 1e9;
        println!(
            "convert {:.2} ms | forward {:.2} ms {:.0} GF/s | dX {:.2} ms {:.0} GF/s | dW {:.2} ms {:.0} GF/s",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            gf(t1, t2),
            (t3 - t2).as_secs_f64() * 1e3,
            gf(t2, t3),
            (t4 - t3).as_secs_f64() * 1e3,
            gf(t3, t4)
        );
    }
}
