//! Best of 5 runs per shape, GFLOP/s = 2·m·k·n / time; row-major operands, C = A·B.
use std::time::Instant;
fn bench(name: &str, m: usize, k: usize, n: usize, f: &dyn Fn(&[f32], &[f32], &mut [f32])) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) * 0.01).collect();
    let mut c = vec![0f32; m * n];
    f(&a, &b, &mut c);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f(&a, &b, &mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let g = 2.0 * (m * k * n) as f64 / best / 1e9;
    println!("{name:>16} {m}x{k}x{n}: {g:.1} GFLOP/s");
    g
}
fn main() {
    let threads: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    // matrixmultiply reads its thread count from the environment
    unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads.to_string()) };
    for &(m, k, n) in &[(512, 2048, 2048), (4096, 2048, 2048), (2048, 512, 2048), (2048, 2048, 512), (4096, 1024, 256)] {
        bench("gemm", m, k, n, &|a, b, c| unsafe {
            gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), 1, n as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(threads));
        });
        bench("matrixmultiply", m, k, n, &|a, b, c| unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, 0.0, c.as_mut_ptr(), n as isize, 1);
        });
    }
}
