//! bf16 matrix products for `--precision bf16` on the CPU backend: both operands rounded to bf16
//! (round to nearest even), products accumulated in f32 by `gemmkit`, whose kernels use the
//! CPU's bf16 dot-product instructions (`vdpbf16ps`, AVX512-BF16) where it has them; the result
//! is rounded to bf16 like PyTorch's autocast and returned as f32. Forward and both backward
//! products (`dX = dY·Wᵀ`, `dW = Xᵀ·dY`, transposes as strided views, no copies) run here; the
//! rounded operands are what the backward pass keeps (half the bytes of f32).
//!
//! Which path `--precision bf16` takes ([`Bf16Kernel::chosen`]): AMX tiles ([`super::amx`],
//! written here) where the CPU has AMX-BF16 and Linux grants it; on CPUs with AVX512-BF16 a
//! `vdpbf16ps` register kernel over the same packed operands ([`super::amx::dot_product`], also
//! written here: 14% faster than gemmkit on a table5 bf16 step on Zen 4, BENCHMARKS.md); gemmkit
//! where forced (or AVX512-BF16 is reported without AVX-512 BW);
//! elsewhere the portable one (operands cast to bf16, burn's product — widened to f32 on CPUs
//! without bf16 units, so it is no faster than f32 there, and neither is gemmkit's own widening
//! fallback). `WUKONG_BF16=amx|avx512|gemmkit|portable` overrides the choice (A/B timing; tests).
//! Measured gemmkit on Zen 4 at 380–430 GFLOP/s against ~200 for f32 (`../shared/notes/bf16-gemm.md`);
//! AMX in BENCHMARKS.md.

use gemmkit::{MatMut, MatRef, Parallelism, bf16};
use rayon::prelude::*;

/// The kernel behind `--precision bf16` products on the CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tile products ([`super::amx`]).
    Amx,
    /// The AVX512-BF16 register kernel ([`super::amx::dot_product`]: `vdpbf16ps`).
    Avx512,
    /// gemmkit's bf16 GEMM (this module).
    Gemmkit,
    /// Operands cast to bf16 and multiplied by burn.
    Portable,
}

impl Bf16Kernel {
    /// For benchmark headers.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "bf16 products: AMX tiles (tdpbf16ps, f32 accumulation)",
            Bf16Kernel::Avx512 => "bf16 products: AVX512-BF16 register kernel (vdpbf16ps, f32 accumulation)",
            Bf16Kernel::Gemmkit => "bf16 products: gemmkit (bf16 dot-product instructions where the CPU has them)",
            Bf16Kernel::Portable => "bf16 products: portable (operands rounded to bf16, multiplied in f32: no bf16 units)",
        }
    }

    /// `WUKONG_BF16` if set (`amx` only where AMX is available), else AMX where the process may
    /// use it, else gemmkit exactly where the CPU has bf16 dot-product units.
    pub fn chosen() -> Self {
        static K: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
        *K.get_or_init(|| match std::env::var("WUKONG_BF16").as_deref() {
            Ok("amx") if super::amx::available() => Bf16Kernel::Amx,
            Ok("amx") => {
                tracing::warn!("WUKONG_BF16=amx: AMX-BF16 is not available here (CPU or kernel); using gemmkit");
                Bf16Kernel::Gemmkit
            }
            Ok("avx512") if super::amx::dot_available() => Bf16Kernel::Avx512,
            Ok("avx512") => {
                tracing::warn!("WUKONG_BF16=avx512: this CPU has no AVX512-BF16; using gemmkit");
                Bf16Kernel::Gemmkit
            }
            Ok("gemmkit") => Bf16Kernel::Gemmkit,
            Ok("portable") => Bf16Kernel::Portable,
            _ if super::amx::available() => Bf16Kernel::Amx,
            _ if super::amx::dot_available() => Bf16Kernel::Avx512,
            _ if crate::runtime::cpu_has_bf16_units() => Bf16Kernel::Gemmkit,
            _ => Bf16Kernel::Portable,
        })
    }

    /// Whether this path runs the products itself (the backend-extension op), not burn.
    pub fn is_kernel(self) -> bool {
        self != Bf16Kernel::Portable
    }
}

/// f32 → bf16, round to nearest even (in parallel: this pass is a few % of the product's time).
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    out.par_chunks_mut(1 << 14).zip(x.par_chunks(1 << 14)).for_each(|(o, x)| convert(o, x));
    out
}

/// f32 → bf16 bits, round to nearest even, NaN kept (quiet): bit for bit `half`'s
/// `bf16::from_f32`, written branch-free so the loops over it vectorize (`half` converts one
/// value at a time: the conversions took 12% of a bf16 table5 step on an AMX CPU).
#[inline(always)]
pub fn round_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) | 0x0040) as u16;
    if v.is_nan() { quiet_nan } else { rounded }
}

#[inline(always)]
fn convert_plain(out: &mut [bf16], x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = bf16::from_bits(round_bits(v));
    }
}

/// One chunk's rounding, run on the widest vector instructions the CPU has (`crate::simd`).
struct Convert<'a>(&'a mut [bf16], &'a [f32]);

impl crate::simd::Wide for Convert<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        convert_plain(self.0, self.1)
    }
}

/// `out[i] = x[i]` rounded to bf16 (nearest even).
pub fn convert(out: &mut [bf16], x: &[f32]) {
    crate::simd::run(Convert(out, x))
}

/// A `rows × cols` operand over row-major data, or (`transposed`) over the row-major data of its
/// `cols × rows` transpose: f32 (the products' input, rounded to bf16 on the way in) or bf16.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a, T = bf16> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a, T> Operand<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "operand: {} values for {rows} × {cols}", data.len());
        Self { data, rows, cols, transposed: false }
    }
    /// The transpose of the row-major `rows × cols` matrix in `data` (a `cols × rows` view).
    pub fn transpose_of(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "operand: {} values for {rows} × {cols}", data.len());
        Self { data, rows: cols, cols: rows, transposed: true }
    }
}

impl<'a> Operand<'a, bf16> {
    fn view(&self) -> MatRef<'a, bf16> {
        if self.transposed {
            MatRef::from_col_major(self.data, self.rows, self.cols)
        } else {
            MatRef::from_row_major(self.data, self.rows, self.cols)
        }
    }
}

/// `a · b` over f32 operands rounded to bf16 (nearest even), f32 accumulation, the result rounded
/// to bf16 and returned as row-major f32: on AMX tiles where [`Bf16Kernel::chosen`] is AMX (which
/// rounds while it packs), else by gemmkit over rounded copies (callers that reuse an operand
/// round it once with [`to_bf16`] and call [`gemmkit_product`]).
pub fn product(a: Operand<f32>, b: Operand<f32>) -> Vec<f32> {
    match Bf16Kernel::chosen() {
        Bf16Kernel::Amx => super::amx::product(a, b),
        Bf16Kernel::Avx512 => super::amx::dot_product(a, b),
        _ => {
            let (ab, bb) = (to_bf16(a.data), to_bf16(b.data));
            let rounded = |o: Operand<f32>, data| Operand { data, rows: o.rows, cols: o.cols, transposed: o.transposed };
            gemmkit_product(rounded(a, &ab), rounded(b, &bb))
        }
    }
}

/// `a · b` by gemmkit (f32 accumulation, the result rounded to bf16), returned as row-major f32.
pub fn gemmkit_product(a: Operand, b: Operand) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "bf16 product: inner dimensions differ");
    let (m, n) = (a.rows, b.cols);
    let mut c = vec![bf16::ZERO; m * n];
    if a.cols == 0 {
        return vec![0.0; m * n];
    }
    let threads = rayon::current_num_threads();
    gemmkit::gemm(bf16::ONE, a.view(), b.view(), bf16::ZERO, MatMut::from_row_major(&mut c, m, n), Parallelism::Rayon(threads));
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(1 << 14).zip(c.par_chunks(1 << 14)).for_each(|(o, c)| {
        for (o, c) in o.iter_mut().zip(c) {
            *o = c.to_f32(); // exact: widening bf16 → f32
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 product of the bf16-rounded operands: what the kernel computes before rounding C.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        (0..m * n).map(|ij| (0..k).map(|p| r(a[ij / n * k + p]) * r(b[p * n + ij % n])).sum()).collect()
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| (crate::rng::splitmix64(seed ^ i as u64) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    type Kernel = fn(Operand<f32>, Operand<f32>) -> Vec<f32>;

    /// gemmkit over the operands rounded to bf16 (what [`product`] does off AMX).
    fn gemmkit_rounded(a: Operand<f32>, b: Operand<f32>) -> Vec<f32> {
        let (ab, bb) = (to_bf16(a.data), to_bf16(b.data));
        gemmkit_product(
            Operand { data: &ab, rows: a.rows, cols: a.cols, transposed: a.transposed },
            Operand { data: &bb, rows: b.rows, cols: b.cols, transposed: b.transposed },
        )
    }

    /// Every product kernel this machine can run, from f32 operands: gemmkit always (its
    /// widening fallback on CPUs without bf16 units), AMX where the CPU and kernel allow it
    /// (said when skipped).
    fn kernels() -> Vec<(&'static str, Kernel)> {
        let mut k: Vec<(&'static str, Kernel)> = vec![("gemmkit", gemmkit_rounded)];
        if super::super::amx::available() {
            k.push(("amx", super::super::amx::product));
        } else {
            eprintln!("AMX-BF16 not available on this machine: AMX kernel not tested here");
        }
        if super::super::amx::dot_available() {
            k.push(("avx512-bf16", super::super::amx::dot_product));
        } else {
            eprintln!("AVX512-BF16 not available on this machine: its register kernel not tested here");
        }
        k
    }

    /// Edge shapes: one row, one column, k = 1, odd sizes that are no multiple of any vector
    /// width, sizes past one tile, register block and row block (AMX: 16, 32, 128 rows; 32 k);
    /// plain, transposed and mixed operands, for every kernel the machine has.
    #[test]
    fn products_match_f64_within_bf16_rounding_on_edge_shapes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 3),
            (5, 1, 9),
            (5, 17, 9),
            (33, 65, 31),
            (1, 300, 1),
            (130, 257, 67),
            (300, 70, 129),
            (16, 32, 16),
            (129, 33, 33),
            (64, 96, 80),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let want = reference(&a, &b, m, k, n);
            // plain, and the same product from transposed storage
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let mut results = Vec::new();
            for (kernel, run) in kernels() {
                results.push((format!("{kernel}, plain"), run(Operand::new(&a, m, k), Operand::new(&b, k, n))));
                let viewed = run(Operand::transpose_of(&at, k, m), Operand::transpose_of(&bt, n, k));
                results.push((format!("{kernel}, transposed views"), viewed));
                // and the two mixed layouts the backward products use
                results.push((format!("{kernel}, A viewed"), run(Operand::transpose_of(&at, k, m), Operand::new(&b, k, n))));
                results.push((format!("{kernel}, B viewed"), run(Operand::new(&a, m, k), Operand::transpose_of(&bt, n, k))));
            }
            for (name, got) in results {
                assert_eq!(got.len(), m * n);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    // f32 accumulation then one bf16 rounding of C: 2⁻⁸ relative, plus the
                    // accumulation's error on a sum of k terms of magnitude ≤ 1
                    let tol = w.abs() * 2f64.powi(-8) + k as f64 * 1e-6;
                    assert!((g as f64 - w).abs() <= tol, "{name} {m}×{k}×{n} at {i}: {g} vs {w}");
                }
            }
        }
    }

    /// Every kernel rounds its f32 operands exactly as [`round_bits`] (AMX does it while packing,
    /// with vector code for whole tiles and scalar code at the edges, in all four layouts): with
    /// an identity as the other operand the product is the rounded operand, bit for bit (one
    /// nonzero term per sum, exact in f32). Values: random finite normals over many binades and
    /// halfway cases; a NaN in a row of A makes that row of C NaN.
    #[test]
    fn kernels_round_operands_like_round_bits() {
        let (m, k) = (40, 70);
        let mut a: Vec<f32> = (0..m * k)
            .map(|i| {
                let bits = crate::rng::splitmix64(7 ^ i as u64) as u32;
                let exponent = 64 + (bits >> 23) % 128; // 2⁻⁶³ … 2⁶⁴: normal after any rounding
                f32::from_bits((bits & 0x8000_0000) | (exponent << 23) | (bits & 0x007F_FFFF))
            })
            .collect();
        for v in a.iter_mut().step_by(7) {
            *v = f32::from_bits((v.to_bits() & 0xFFFF_0000) | 0x8000); // halfway: ties to even
        }
        let want: Vec<u16> = a.iter().map(|&v| round_bits(v)).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let eye = |n: usize| -> Vec<f32> { (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect() };
        let (ik, im) = (eye(k), eye(m));
        for (kernel, run) in kernels() {
            for (name, got, transpose) in [
                ("A·I", run(Operand::new(&a, m, k), Operand::new(&ik, k, k)), false),
                ("Aᵀ-view·I", run(Operand::transpose_of(&at, k, m), Operand::new(&ik, k, k)), false),
                ("I·A (A as B)", run(Operand::new(&im, m, m), Operand::new(&a, m, k)), false),
                ("I·Aᵀ-view (A as transposed B)", run(Operand::new(&im, m, m), Operand::transpose_of(&at, k, m)), false),
                ("I·(A viewed as its transpose)", run(Operand::new(&ik, k, k), Operand::transpose_of(&a, m, k)), true),
            ] {
                for (i, &g) in got.iter().enumerate() {
                    let w = if transpose { want[(i % m) * k + i / m] } else { want[i] };
                    assert_eq!(g.to_bits() >> 16, w as u32, "{kernel} {name} at {i}");
                    assert_eq!(g.to_bits() & 0xFFFF, 0, "{kernel} {name} at {i}: C not rounded");
                }
            }
            let mut with_nan = a.clone();
            with_nan[3 * k + 5] = f32::NAN;
            let c = run(Operand::new(&with_nan, m, k), Operand::new(&ik, k, k));
            assert!(c[3 * k..4 * k].iter().all(|v| v.is_nan()), "{kernel}: NaN in row 3 of A");
            assert!(c[..3 * k].iter().chain(&c[4 * k..]).all(|v| !v.is_nan()), "{kernel}: NaN outside row 3");
        }
    }

    /// The branch-free rounding is `half`'s, bit for bit: halfway cases, the largest finite
    /// values (which round to infinity), subnormals, zeros, infinities, NaNs, and a sweep.
    #[test]
    fn fast_rounding_is_bit_identical_to_half() {
        let mut xs = vec![0.0f32, -0.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-40, -1e-45, f32::INFINITY, f32::NEG_INFINITY];
        xs.extend([f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001), f32::from_bits(0xFFC0_1234)]);
        xs.extend([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000)]);
        xs.extend((0..200_000u64).map(|i| f32::from_bits(crate::rng::splitmix64(i) as u32)));
        let mut converted = vec![bf16::ZERO; xs.len()];
        convert(&mut converted, &xs);
        for (i, &x) in xs.iter().enumerate() {
            let want = bf16::from_f32(x);
            assert_eq!(converted[i].to_bits(), want.to_bits(), "{x:e} ({:#010x})", x.to_bits());
            assert_eq!(round_bits(x), want.to_bits(), "{x:e} ({:#010x})", x.to_bits());
        }
        // and on every instruction set the CPU offers, not only the widest
        use crate::simd::{Isa, run_on};
        for isa in [Isa::Baseline, Isa::Avx2, Isa::Avx512] {
            let mut on = vec![bf16::ZERO; xs.len()];
            if run_on(isa, Convert(&mut on, &xs)).is_some() {
                assert!(on.iter().zip(&converted).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?} rounds differently");
            }
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        let x = [1.0f32, 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5e-3, 0.0, f32::INFINITY];
        let got: Vec<f32> = to_bf16(&x).iter().map(|v| v.to_f32()).collect();
        // halfway cases go to the even mantissa: 1 + 2⁻⁸ → 1, 1 + 3·2⁻⁸ → 1 + 2⁻⁶
        assert_eq!(&got[..3], &[1.0, 1.0, 1.0 + 2f32.powi(-6)]);
        assert!((got[3] - -2.5e-3).abs() < 2.5e-3 * 2f32.powi(-8));
        assert_eq!((got[4], got[5]), (0.0, f32::INFINITY));
    }
}
