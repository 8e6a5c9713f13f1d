//! `exp` over a whole f32 buffer on the widest vector unit.
//!
//! burn's CPU `exp` calls the C library's scalar `expf` once per element: 8.6% of an AFN+
//! MovieLens trial, and AFN+'s Frappe space draws `[4096, 800, 64]` logarithmic neurons per step.
//! Here Cephes' `expf` (Cody–Waite reduction `x = n·ln 2 + r`, a degree-7 polynomial for `eʳ`,
//! `2ⁿ` built in the exponent bits) written plainly so that [`crate::simd`] compiles it for
//! AVX-512 and AVX2 — the same bits on every instruction set (no fused multiply-add, exact
//! `floor`), within 2 ulp of the true value (test). Overflow gives +∞ and NaN stays NaN like
//! `expf`; results below f32's smallest normal number (x < −87.34) are flushed to 0 where `expf`
//! would return a subnormal.

use rayon::prelude::*;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: `n·LN2_HI` is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// ln(f32::MAX): above it the result overflows.
const MAX_X: f32 = 88.722_84;
/// ln of the smallest normal f32: below it the result is flushed to 0.
const MIN_X: f32 = -87.336_55;

/// eˣ, as described in the module.
#[inline(always)]
pub(crate) fn exp1(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p =
        (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5) * z + r + 1.0;
    // 2ⁿ in the exponent bits; n = 128 (x within 0.35 of ln f32::MAX) as 2¹²⁷·2
    let scale = f32::from_bits((((n.min(127.0) as i32) + 127) as u32) << 23);
    let y = p * scale * if n > 127.0 { 2.0 } else { 1.0 };
    if x > MAX_X {
        f32::INFINITY
    } else if x < MIN_X {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `out[i] = exp(x[i])` in one slice.
struct ExpLoop<'a> {
    x: &'a [f32],
    out: &'a mut [f32],
}

impl crate::simd::Wide for ExpLoop<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (o, &v) in self.out.iter_mut().zip(self.x) {
            *o = exp1(v);
        }
    }
}

/// `out[i] = g[i]·y[i]`: exp's backward (its derivative is its value).
struct ScaleLoop<'a> {
    g: &'a [f32],
    y: &'a [f32],
    out: &'a mut [f32],
}

impl crate::simd::Wide for ScaleLoop<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for ((o, &g), &y) in self.out.iter_mut().zip(self.g).zip(self.y) {
            *o = g * y;
        }
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// eˣ of every element.
pub(crate) fn exp(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(out, x)| crate::simd::run(ExpLoop { x, out }));
    out
}

/// eˣ of every element, overwriting them.
pub(crate) fn exp_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|x| crate::simd::run(ExpInPlace { x }));
}

struct ExpInPlace<'a> {
    x: &'a mut [f32],
}

impl crate::simd::Wide for ExpInPlace<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for v in self.x.iter_mut() {
            *v = exp1(*v);
        }
    }
}

/// The gradient of [`exp`]'s input: `g ⊙ y` with `y` its output.
pub(crate) fn exp_backward(g: &[f32], y: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), y.len(), "exp backward: gradient and output differ in size");
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each(|(out, (g, y))| crate::simd::run(ScaleLoop { g, y, out }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between an f32 and the exact value.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_the_exact_value_across_the_normal_range() {
        let mut worst = 0f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = MIN_X + 0.01 + (MAX_X - 0.01 - (MIN_X + 0.01)) * i as f32 / steps as f32;
            worst = worst.max(ulps(exp1(x), (x as f64).exp()));
        }
        // and near 0, where eˣ ≈ 1 + x matters most for small neurons
        for i in -10_000..=10_000 {
            let x = i as f32 * 1e-5;
            worst = worst.max(ulps(exp1(x), (x as f64).exp()));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn special_values_follow_expf() {
        assert_eq!(exp1(0.0), 1.0);
        assert_eq!(exp1(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp1(100.0), f32::INFINITY);
        assert_eq!(exp1(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp1(-100.0), 0.0);
        assert!(exp1(f32::NAN).is_nan());
        assert!(exp1(88.72).is_finite() && ulps(exp1(88.72), (88.72f32 as f64).exp()) <= 2.0);
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let x: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.731).sin() * 90.0).chain([f32::NAN, f32::INFINITY, -0.0]).collect();
        let mut want = vec![0f32; x.len()];
        crate::simd::run_on(crate::simd::Isa::Baseline, ExpLoop { x: &x, out: &mut want }).unwrap();
        for isa in [crate::simd::Isa::Avx2, crate::simd::Isa::Avx512] {
            let mut out = vec![0f32; x.len()];
            if crate::simd::run_on(isa, ExpLoop { x: &x, out: &mut out }).is_some() {
                let same = out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?}");
            }
        }
        // the parallel whole-buffer forms are the per-element one
        let par = exp(&x);
        assert!(par.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut in_place = x.clone();
        exp_in_place(&mut in_place);
        assert!(in_place.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn the_backward_scales_the_gradient_by_the_output() {
        let y = exp(&[0.0, 1.0, -2.0]);
        assert_eq!(exp_backward(&[2.0, 1.0, 0.5], &y), vec![2.0, y[1], 0.5 * y[2]]);
    }
}
