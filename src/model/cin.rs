//! One layer of xDeepFM's Compressed Interaction Network without its outer-product tensor.
//!
//! A CIN layer maps the feature maps `h` `[b, H, d]` and the field embeddings `x0` `[b, m, d]` to
//! `out[e, o, t] = Σ_{i,j} W[i·m + j, o] · h[e, i, t] · x0[e, j, t]` (`W` `[H·m, H']`, the 1×1
//! convolution). Written as tensor ops it materializes `z = h ⊗ x0` `[b, H·m, d]` and, in the
//! backward, its gradient and the broadcast product's gradients — four tensors of `H·m` maps per
//! example (805 MB each for a Frappe batch of 4096 at `H = 64`, m = 12, d = 64), whose fresh pages
//! alone were 10.7% of an xDeepFM trial (`clear_page`), plus one small weight-gradient product per
//! example. Here `z` exists only for a chunk of [`CHUNK`] examples at a time, laid out `[H·m,
//! CHUNK·d]` so that the weight gradient and `dz` are one product per chunk with `k = CHUNK·d`.
//!
//! The weight gradient is summed over fixed groups of examples and the groups' sums added in
//! order, so its bits do not depend on the thread count.

use rayon::prelude::*;

/// Examples whose `z` is built at once (the products' inner dimension is `CHUNK·d`).
const CHUNK: usize = 32;
/// Examples per weight-gradient partial sum (a multiple of [`CHUNK`]; fixed, for determinism).
const GROUP: usize = 256;

/// The layer's sizes: examples, input maps H, fields m, embedding width d, output maps H'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CinDims {
    pub b: usize,
    pub h: usize,
    pub m: usize,
    pub d: usize,
    pub o: usize,
}

/// `dst (rows × cols, row-major, acc: +=) = lhs · rhs` with explicit strides (row, column), one
/// thread.
#[allow(clippy::too_many_arguments)]
fn product(rows: usize, cols: usize, k: usize, dst: &mut [f32], acc: bool, lhs: (&[f32], isize, isize), rhs: (&[f32], isize, isize)) {
    debug_assert!(dst.len() >= rows * cols);
    // SAFETY: the callers pass strides that keep every (row, k) and (k, col) index inside the
    // slices; dst is a dense rows × cols row-major buffer. gemm: dst = α·dst + β·lhs·rhs.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.as_mut_ptr(),
            1,
            cols as isize,
            acc,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `z` of examples `e0..e0+c` into `z` `[H·m, c·d]`: `z[i·m + j, e·d + t] = h[e, i, t]·x0[e, j, t]`.
fn build_z(hs: &[f32], x0: &[f32], n: CinDims, e0: usize, c: usize, z: &mut [f32]) {
    let CinDims { h, m, d, .. } = n;
    let width = c * d;
    for e in 0..c {
        let he = &hs[(e0 + e) * h * d..][..h * d];
        let xe = &x0[(e0 + e) * m * d..][..m * d];
        for i in 0..h {
            let hi = &he[i * d..][..d];
            for j in 0..m {
                let xj = &xe[j * d..][..d];
                let row = &mut z[(i * m + j) * width + e * d..][..d];
                for ((r, a), b) in row.iter_mut().zip(hi).zip(xj) {
                    *r = a * b;
                }
            }
        }
    }
}

/// The layer's output `[b, H', d]` for `hs` `[b, H, d]`, `x0` `[b, m, d]`, `w` `[H·m, H']`
/// (all row-major).
pub(crate) fn forward(hs: &[f32], x0: &[f32], w: &[f32], n: CinDims) -> Vec<f32> {
    let CinDims { b, h, m, d, o } = n;
    assert!(hs.len() == b * h * d && x0.len() == b * m * d && w.len() == h * m * o, "cin: sizes do not match {n:?}");
    let mut out = vec![0f32; b * o * d];
    if out.is_empty() {
        return out;
    }
    let hm = h * m;
    out.par_chunks_mut(CHUNK * o * d).enumerate().for_each_init(
        || (vec![0f32; hm * CHUNK * d], vec![0f32; o * CHUNK * d]),
        |(z, y), (ci, out)| {
            let (e0, c) = (ci * CHUNK, out.len() / (o * d));
            let width = c * d;
            build_z(hs, x0, n, e0, c, z);
            // Y = Wᵀ · z `[H', c·d]` in one product (Wᵀ is W read column-wise; one product per
            // example packed Wᵀ again for each), then each example's columns into its rows
            product(o, width, hm, y, false, (w, 1, o as isize), (z, width as isize, 1));
            for e in 0..c {
                for oi in 0..o {
                    out[(e * o + oi) * d..][..d].copy_from_slice(&y[oi * width + e * d..][..d]);
                }
            }
        },
    );
    out
}

/// Gradients `(dh, dx0, dw)` of [`forward`] given `g` = d(loss)/d(out) `[b, H', d]`.
pub(crate) fn backward(g: &[f32], hs: &[f32], x0: &[f32], w: &[f32], n: CinDims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let CinDims { b, h, m, d, o } = n;
    assert!(
        g.len() == b * o * d && hs.len() == b * h * d && x0.len() == b * m * d && w.len() == h * m * o,
        "cin: sizes do not match {n:?}"
    );
    let hm = h * m;
    let mut dh = vec![0f32; b * h * d];
    let mut dx0 = vec![0f32; b * m * d];
    if b == 0 || d == 0 {
        return (dh, dx0, vec![0f32; hm * o]);
    }
    let partials: Vec<Vec<f32>> = dh
        .par_chunks_mut(GROUP * h * d)
        .zip(dx0.par_chunks_mut(GROUP * m * d))
        .enumerate()
        .map(|(gi, (dh, dx0))| {
            let mut dw = vec![0f32; hm * o];
            let mut z = vec![0f32; hm * CHUNK * d];
            let mut gc = vec![0f32; o * CHUNK * d];
            let mut dz = vec![0f32; hm * CHUNK * d];
            let group_len = dh.len() / (h * d);
            for start in (0..group_len).step_by(CHUNK) {
                let (e0, c) = (gi * GROUP + start, CHUNK.min(group_len - start));
                let width = c * d;
                build_z(hs, x0, n, e0, c, &mut z);
                // G `[H', c·d]`: the chunk's output gradients side by side
                for e in 0..c {
                    for oi in 0..o {
                        gc[oi * width + e * d..][..d].copy_from_slice(&g[((e0 + e) * o + oi) * d..][..d]);
                    }
                }
                // dW += z · Gᵀ (k = c·d); dz = W · G
                product(hm, o, width, &mut dw, true, (&z, width as isize, 1), (&gc, 1, width as isize));
                product(hm, width, o, &mut dz, false, (w, o as isize, 1), (&gc, width as isize, 1));
                // dh[e, i, t] = Σ_j dz[i·m + j, e·d + t]·x0[e, j, t]; dx0[e, j, t] = Σ_i dz[…]·h[e, i, t]
                for e in 0..c {
                    let (he, xe) = (&hs[(e0 + e) * h * d..][..h * d], &x0[(e0 + e) * m * d..][..m * d]);
                    let (dhe, dxe) = (&mut dh[(start + e) * h * d..][..h * d], &mut dx0[(start + e) * m * d..][..m * d]);
                    for i in 0..h {
                        for j in 0..m {
                            let dzr = &dz[(i * m + j) * width + e * d..][..d];
                            let (hi, xj) = (&he[i * d..][..d], &xe[j * d..][..d]);
                            for (t, v) in dzr.iter().enumerate() {
                                dhe[i * d + t] += v * xj[t];
                                dxe[j * d + t] += v * hi[t];
                            }
                        }
                    }
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; hm * o];
    for p in &partials {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dh, dx0, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + seed as f32 * 1.3).sin() * 0.9).collect()
    }

    /// The definition, in f64.
    fn naive_forward(hs: &[f32], x0: &[f32], w: &[f32], n: CinDims) -> Vec<f64> {
        let CinDims { b, h, m, d, o } = n;
        let mut out = vec![0f64; b * o * d];
        for e in 0..b {
            for oi in 0..o {
                for t in 0..d {
                    let mut s = 0f64;
                    for i in 0..h {
                        for j in 0..m {
                            s += w[(i * m + j) * o + oi] as f64 * hs[(e * h + i) * d + t] as f64 * x0[(e * m + j) * d + t] as f64;
                        }
                    }
                    out[(e * o + oi) * d + t] = s;
                }
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (k, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}[{k}]: {a} vs {b}");
        }
    }

    // sizes around the chunk and the group (32, 256), one example, one map, odd widths
    const SHAPES: [CinDims; 5] = [
        CinDims { b: 1, h: 1, m: 1, d: 1, o: 1 },
        CinDims { b: 3, h: 2, m: 5, d: 7, o: 3 },
        CinDims { b: 33, h: 4, m: 3, d: 16, o: 5 },
        CinDims { b: 70, h: 6, m: 6, d: 9, o: 4 },
        CinDims { b: 300, h: 3, m: 4, d: 5, o: 2 },
    ];

    #[test]
    fn forward_is_the_definition() {
        for n in SHAPES {
            let (hs, x0, w) = (values(n.b * n.h * n.d, 1), values(n.b * n.m * n.d, 2), values(n.h * n.m * n.o, 3));
            close(&forward(&hs, &x0, &w, n), &naive_forward(&hs, &x0, &w, n), &format!("{n:?}"));
        }
    }

    #[test]
    fn backward_is_the_gradient_of_a_weighted_sum_of_the_outputs() {
        // loss = Σ g·out: its gradients are linear in g, so central differences are exact up to
        // rounding (the f64 definition makes the reference exact)
        for n in SHAPES {
            let (hs, x0, w, g) =
                (values(n.b * n.h * n.d, 1), values(n.b * n.m * n.d, 2), values(n.h * n.m * n.o, 3), values(n.b * n.o * n.d, 4));
            let (dh, dx0, dw) = backward(&g, &hs, &x0, &w, n);
            let loss =
                |hs: &[f32], x0: &[f32], w: &[f32]| -> f64 { naive_forward(hs, x0, w, n).iter().zip(&g).map(|(a, b)| a * *b as f64).sum() };
            let eps = 1e-2f32;
            let numeric = |which: usize, len: usize| -> Vec<f64> {
                (0..len)
                    .map(|k| {
                        let (mut a, mut b) = ([hs.clone(), x0.clone(), w.clone()], [hs.clone(), x0.clone(), w.clone()]);
                        a[which][k] += eps;
                        b[which][k] -= eps;
                        (loss(&a[0], &a[1], &a[2]) - loss(&b[0], &b[1], &b[2])) / (2.0 * eps as f64)
                    })
                    .collect()
            };
            if n.b <= 70 {
                close(&dh, &numeric(0, hs.len()), &format!("dh {n:?}"));
                close(&dx0, &numeric(1, x0.len()), &format!("dx0 {n:?}"));
            }
            close(&dw, &numeric(2, w.len()), &format!("dw {n:?}"));
        }
    }

    #[test]
    fn the_weight_gradient_does_not_depend_on_the_thread_count() {
        let n = CinDims { b: 600, h: 4, m: 5, d: 8, o: 3 };
        let (hs, x0, w, g) =
            (values(n.b * n.h * n.d, 1), values(n.b * n.m * n.d, 2), values(n.h * n.m * n.o, 3), values(n.b * n.o * n.d, 4));
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| (forward(&hs, &x0, &w, n), backward(&g, &hs, &x0, &w, n)))
        };
        assert_eq!(run(1), run(3));
    }
}
