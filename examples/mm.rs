//! Matrix-multiply throughput of the CPU backend for a few shapes: `cargo run --release --example mm`.
fn main() {
    for (m, k, n) in [(512, 2048, 2048), (4096, 2048, 2048), (512, 2048, 4096), (2048, 512, 2048), (2048, 2048, 512)] {
        let g = wukong::bench::matmul_gflops("cpu", m, k, n, 7, wukong::model::Precision::F32).unwrap();
        println!("{m} {k} {n} burn GFLOP/s {g:.1}");
    }
}
