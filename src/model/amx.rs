//! bf16 matrix products on Intel AMX tiles (`tdpbf16ps`: 16×16 f32 accumulators, f32 accumulation),
//! written here because no crate reaches AMX: `gemmkit` stops at AVX512-BF16 dot products, and the
//! AMX intrinsics are unstable in Rust 1.95, so the tile instructions are inline `asm!` (stable).
//!
//! Layout (the usual AMX packing): A in 16-row × 32-k tiles (a row of 32 bf16 is 64 bytes), B in
//! "VNNI" tiles of 16 k-pairs × 16 columns (each 32-bit lane holds B[k, j], B[k+1, j]); both are
//! zero-padded, so edges need no masked tiles. One register block is 2×2 C tiles (32×32 f32) fed
//! by two A and two B tiles: the eight tile registers. B is packed once (in parallel); each rayon
//! task packs its own block of MC rows of A, which stays in L2 while every column block passes.
//! The operands arrive in f32 and are rounded to bf16 while they are packed (a separate rounding
//! pass read and wrote every operand once more), with AVX-512 shuffles and in-register transposes for the
//! transposed views the backward products use.
//!
//! The same packed operands feed a second kernel for CPUs with AVX512-BF16 but no AMX (Zen 4,
//! Cooper Lake): a register block of 8 rows × 48 columns (24 zmm accumulators), one `vdpbf16ps`
//! per row and 16 columns for each k-pair, B's tile rows being exactly the 64-byte vectors it
//! takes and A's k-pairs broadcast from the tile rows ([`dot_product`]). On a Zen 4 it replaced
//! gemmkit's bf16 GEMM (14% off a table5 bf16 step; gemmkit's layer products ran at 280–330
//! GFLOP/s where PyTorch's reach 405–430, and tuning its blocking through its `GEMMKIT_*`
//! variables did not help). Rounding while packing with the CPU's own conversion
//! (`vcvtne2ps2bf16`, one instruction for the thirteen of two branch-free roundings and a
//! permute) was tried there and left the packing's share of the products unchanged (4.5% →
//! 4.4%): the packing is bound by memory, not by the rounding.
//!
//! Linux grants AMX's tile data state per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once, and is false where the CPU lacks AMX-BF16 or the kernel refuses.

// Off x86-64 Linux only `available` (false) and `product` (unreachable) are used.
#![cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]

use rayon::prelude::*;

use super::bf16::{Operand, round_bits};
use super::fused::View3;

/// Whether this process may run AMX bf16 tiles (asked of the kernel once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(imp::request)
}

/// `a · b` over f32 operands rounded to bf16 (nearest even, as [`super::bf16::round_bits`]),
/// with f32 accumulation, the result rounded to bf16 and returned as row-major f32 (the contract
/// of [`super::bf16::product`]). Panics unless [`available`].
pub fn product(a: Operand<f32>, b: Operand<f32>) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "amx product: inner dimensions differ");
    assert!(available(), "amx product: AMX-BF16 is not available to this process");
    imp::product(a, b)
}

/// Whether this CPU runs the AVX512-BF16 register kernel ([`dot_product`]): `vdpbf16ps` with the
/// AVX-512 F and BW the packing uses.
pub fn dot_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// [`product`]'s contract on CPUs with AVX512-BF16 but no AMX (Zen 4, Cooper Lake): the same
/// packed operands, multiplied by a register kernel of `vdpbf16ps` (16 f32 lanes, each the sum of
/// one k-pair's two products). Panics unless [`dot_available`].
pub fn dot_product(a: Operand<f32>, b: Operand<f32>) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "avx512-bf16 product: inner dimensions differ");
    assert!(dot_available(), "avx512-bf16 product: this CPU has no AVX512-BF16");
    imp::dot_product(a, b)
}

/// A weight matrix W (`k × n`, row-major f32) rounded to bf16 and packed for [`product`]'s or
/// [`dot_product`]'s kernel in both orientations a layer's products read it: as the forward's B
/// (`X·W`) and, transposed, as the B of `dX = dY·Wᵀ`. Packing W for every product read it
/// twice per step from memory (the forward's and the backward's packing, ~10% of a table5 bf16
/// step on Zen 4); a packing made once — in the forward on the first use of a W, or by the
/// optimizer while the updated rows of W are in cache (`super::packed`) — serves both products
/// and every forward until W changes (evaluation and serving never pack again).
pub struct PackedWeight {
    k: usize,
    n: usize,
    /// AMX tiles (column blocks of 32) or the register kernel (48).
    amx: bool,
    forward: Vec<Line>,
    transposed: Vec<Line>,
}

/// Rows of W per band of [`PackedWeight`]'s packing: one column tile of Wᵀ's, half a k tile of W's.
pub const BAND: usize = TN;

impl PackedWeight {
    /// Zeroed packings of a `k × n` W for AMX tiles (`amx`, where [`available`]) or the register
    /// kernel (where [`dot_available`]); None where that kernel cannot run.
    pub fn new(k: usize, n: usize, amx: bool) -> Option<Self> {
        if !(if amx { available() } else { dot_available() }) {
            return None;
        }
        let mut w = PackedWeight { k, n, amx, forward: Vec::new(), transposed: Vec::new() };
        let [kp, np, kp_t, np_t] = w.padded();
        // zero once: packing writes only positions inside W, so the padding stays zero
        w.forward = vec![Line([0; 32]); (kp * np).div_ceil(32)];
        w.transposed = vec![Line([0; 32]); (kp_t * np_t).div_ceil(32)];
        Some(w)
    }

    /// W's shape `[k, n]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    /// `[kp, np]` of W's packing and `[kp_t, np_t]` of Wᵀ's: k padded to whole k tiles, columns
    /// to whole column blocks of the kernel.
    fn padded(&self) -> [usize; 4] {
        let block = if self.amx { BN } else { DN };
        [self.k.div_ceil(TK) * TK, self.n.div_ceil(block) * block, self.n.div_ceil(TK) * TK, self.k.div_ceil(block) * block]
    }

    /// Packs all of W (`k · n` values, row-major), bands in parallel.
    pub fn pack(&mut self, w: &[f32]) {
        assert_eq!(w.len(), self.k * self.n, "packed weight: {} values for {} × {}", w.len(), self.k, self.n);
        let n = self.n.max(1);
        let bands = self.bands();
        w.par_chunks(BAND * n).enumerate().for_each(|(b, rows)| bands.pack(b, rows));
    }

    /// A packer that takes W band by band ([`Bands::pack`]), for a caller that writes W in bands
    /// (the fused optimizer packs each band of updated rows while it is in cache).
    pub fn bands(&mut self) -> Bands<'_> {
        let [kp, _, kp_t, _] = self.padded();
        Bands {
            claimed: (0..self.k.div_ceil(BAND)).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
            fwd: self.forward.as_mut_ptr().cast(),
            tr: self.transposed.as_mut_ptr().cast(),
            dims: [self.k, self.n, kp, kp_t],
            _packing: std::marker::PhantomData,
        }
    }
}

/// Writes bands of W into a [`PackedWeight`] from several threads, each band once (a band's
/// positions are its own, so concurrent bands never touch the same bytes).
pub struct Bands<'a> {
    claimed: Vec<std::sync::atomic::AtomicBool>,
    fwd: *mut u16,
    tr: *mut u16,
    /// `[k, n, kp, kp_t]`.
    dims: [usize; 4],
    _packing: std::marker::PhantomData<&'a mut PackedWeight>,
}

// SAFETY: the pointers are into buffers borrowed mutably for 'a; threads write disjoint bands
// (each band claimed once, atomically).
unsafe impl Send for Bands<'_> {}
unsafe impl Sync for Bands<'_> {}

impl Bands<'_> {
    /// Packs band `band`: rows `BAND · band ..` of W, `rows` holding them (BAND rows of `n`
    /// values, fewer only for the last band). Panics on a band out of range, a wrong length, or
    /// a band packed twice.
    pub fn pack(&self, band: usize, rows: &[f32]) {
        let [k, n, kp, kp_t] = self.dims;
        assert!(band < self.claimed.len(), "packed weight: band {band} of {}", self.claimed.len());
        assert_eq!(rows.len(), BAND.min(k - band * BAND) * n, "packed weight: band {band}'s length");
        assert!(!self.claimed[band].swap(true, std::sync::atomic::Ordering::Relaxed), "packed weight: band {band} packed twice");
        if n == 0 {
            return;
        }
        // SAFETY: PackedWeight::new checked the kernel's CPU features (AVX-512 F and BW for
        // both); the band is in range, claimed by this call only, and the buffers are borrowed
        // mutably by `self`.
        unsafe { imp::pack_band(rows, n, band, [kp, kp_t], self.fwd, self.tr) }
    }
}

/// `a · W` (`transposed`: `a · Wᵀ`) over W's packing: [`product`]'s contract (f32 `a` rounded to
/// bf16 while it is packed, f32 accumulation, C rounded to bf16) without packing W.
pub fn weight_product(a: Operand<f32>, w: &PackedWeight, transposed: bool) -> Vec<f32> {
    assert_eq!(a.cols, if transposed { w.n } else { w.k }, "packed weight product: inner dimensions differ");
    imp::weight_product(a, w, transposed)
}

/// The u16 elements of cache lines.
fn lines_as_u16(lines: &[Line]) -> &[u16] {
    // SAFETY: a Line is 32 plain u16s with no padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u16>(), 32 * lines.len()) }
}

/// Whether [`batched_dot`] runs here: the interaction products' bf16 kernel needs the same
/// instructions as [`dot_product`].
pub fn batched_available() -> bool {
    dot_available()
}

/// `a_e · b_e` for every example of two batched strided views (either may be one matrix shared
/// by every example: batch 1), both rounded to bf16, accumulated in f32 by `vdpbf16ps`, the
/// result rounded to bf16: `[batch, m, n]` row-major; with `sum`, `Σ_e a_e · b_e` (`[m, n]`,
/// summed in f32 and rounded once) — the gradient of a shared operand. For the small per-example
/// products of the interaction layers (FM's `Xᵀ Y` and `X (Xᵀ Y)`, the LCB's `Wᵀ X`, tens to a
/// few hundred rows each), where [`dot_product`]'s tiling and packing into 16 × 32 tiles would
/// cost more than the product: each example's operands are packed as k-pair dwords into a few
/// KiB that stay in L1, then 8-row × 48-column register blocks run over them. Panics unless
/// [`batched_available`].
pub(crate) fn batched_dot(a: View3, b: View3, sum: bool) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "batched bf16 product: inner dimensions differ");
    assert!(a.batch == b.batch || a.batch == 1 || b.batch == 1, "batched bf16 product: batches {} and {}", a.batch, b.batch);
    assert!(batched_available(), "batched bf16 product: this CPU has no AVX512-BF16");
    imp::batched_dot(a, b, sum)
}

/// FM's optimized interaction `X (Xᵀ Y)` per example in bf16 ([`batched_dot`]'s kernel), both
/// products of an example back to back while its X is in cache: `x` `[b, n, d]`, `y` `[n, k]`
/// shared (batch 1) or per example; returns the output `[b, n, k]` and `Z = Xᵀ Y` `[b, d, k]`
/// (bf16 values, kept for the backward). Panics unless [`batched_available`].
pub(crate) fn fm_forward(x: View3, y: View3) -> (Vec<f32>, Vec<f32>) {
    assert!(batched_available(), "bf16 FM: this CPU has no AVX512-BF16");
    assert!(x.rows == y.rows && (y.batch == 1 || y.batch == x.batch), "bf16 FM: X and Y disagree");
    imp::fm_forward(x, y)
}

/// The gradients of [`fm_forward`] for the output's gradient `g` `[b, n, k]`, per example while
/// its X is in cache: `dZ = Xᵀ G`, then `dX = G Zᵀ + Y dZᵀ` as one product `[G | Y] · [Z | dZ]ᵀ`
/// (no second pass over dX), and `dY = X dZ` (summed in f32 over the examples and rounded once
/// when Y is shared). Returns `(dX, dY)`.
pub(crate) fn fm_backward(x: View3, y: View3, z: &[f32], g: View3) -> (Vec<f32>, Vec<f32>) {
    assert!(batched_available(), "bf16 FM: this CPU has no AVX512-BF16");
    imp::fm_backward(x, y, z, g)
}

/// `v` rounded to bf16 ([`round_bits`]), as the f32 of the same value: how every product here
/// returns its result.
fn bf16_value(v: f32) -> f32 {
    f32::from_bits((round_bits(v) as u32) << 16)
}

/// A's tile: 16 rows × 32 k. B's tile: 16 k-pairs × 16 columns × 2. C's tile: 16 × 16 f32.
const TM: usize = 16;
const TK: usize = 32;
const TN: usize = 16;
/// The register block: 2×2 C tiles.
const BM: usize = 2 * TM;
const BN: usize = 2 * TN;
/// Column tiles of B packed per task (64 columns: two cache lines of each row of B).
const PANELS: usize = 4;
/// k tiles per chunk: the tile loop runs each column block's chunk of B over all row blocks of
/// the task while it sits in L1, parking the running sums between chunks.
const KC: usize = 8;
/// Rows of A packed per task: at k = 2048 a 128-row block is 512 KiB, well inside L2.
const MC: usize = 128;
/// The AVX512-BF16 register block: 8 rows (half an A tile) × 48 columns (three B column tiles),
/// 24 zmm accumulators; per k-pair three loads of B and eight broadcasts of A feed 24 products.
const DM: usize = 8;
const DN: usize = 3 * TN;
/// k tiles per chunk of the register kernel: B's chunk for one column block (48 × 256 bf16,
/// 24 KiB) stays in L1 while every row block of the task passes.
const DKC: usize = 8;

/// One 64-byte cache line of bf16 bits: the unit the packing buffers are allocated in, so that
/// every tile row starts on a cache-line boundary. `tileloadd` from a row that straddles two lines
/// (a `Vec<u16>` from malloc is only 16-byte aligned) ran 6× slower from L1 and 3× from L2 here.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// A reused, cache-line-aligned scratch buffer of at least `len` elements (contents unspecified):
/// packing runs for every product of every step, and fresh multi-MiB buffers cost page faults
/// and zeroing each time. Falls back to a fresh buffer if this thread's is in use (a nested
/// product).
fn with_scratch<R>(cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<Line>>>, len: usize, f: impl FnOnce(&mut [u16]) -> R) -> R {
    let lines = len.div_ceil(32);
    let view = |buf: &mut [Line]| -> &mut [u16] {
        // SAFETY: a Line is 32 plain u16s with no padding; the view is `len` ≤ 32·lines long.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u16>(), len) }
    };
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < lines {
                buf.resize(lines, Line([0; 32]));
            }
            f(view(&mut buf[..lines]))
        }
        Err(_) => f(view(&mut vec![Line([0; 32]); lines])),
    })
}

thread_local! {
    static PACKED_A: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACKED_B: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::*;
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// The tile configuration (`ldtilecfg`'s 64-byte operand): palette 1, eight 16-row tiles of
    /// 64 bytes per row.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    pub(super) fn request() -> bool {
        // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: refused by kernels or CPUs without AMX.
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && crate::runtime::cpu_flag("amx_bf16")
            && crate::runtime::cpu_flag("amx_tile")
            // SAFETY: a plain syscall with integer arguments.
            && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    }

    /// 16 f32 lanes → the same lanes with their bf16 in the upper 16 bits: [`round_bits`]
    /// (nearest even, NaN kept quiet) for 16 values at once.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn round_hi(v: __m512) -> __m512i {
        let b = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000)))
    }

    /// 32 f32 (`lo` then `hi`) → their 32 bf16, in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn bf16_32(lo: __m512, hi: __m512) -> __m512i {
        const ODD: [u16; 32] =
            [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63];
        // SAFETY: a 64-byte load of a 32-element array.
        let odd = unsafe { _mm512_loadu_si512(ODD.as_ptr().cast()) };
        _mm512_permutex2var_epi16(round_hi(lo), odd, round_hi(hi))
    }

    /// Lane-wise k-pairs: `bf16(lo[j]) | bf16(hi[j]) << 16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pairs(lo: __m512, hi: __m512) -> __m512i {
        _mm512_or_si512(_mm512_srli_epi32::<16>(round_hi(lo)), _mm512_and_si512(round_hi(hi), _mm512_set1_epi32(0xFFFF_0000u32 as i32)))
    }

    /// The permutes of [`transpose16`]'s stage `h`: the first row of each pair keeps its columns
    /// without bit `h` and takes the second row's columns `c − h` for the others; the second row
    /// takes the first's `c + h` and keeps the rest (indices ≥ 16 name the second operand).
    const fn butterfly(h: usize, second: bool) -> [i32; 16] {
        let mut out = [0i32; 16];
        let mut c = 0;
        while c < 16 {
            out[c] = match (c & h == 0, second) {
                (true, false) => c,
                (false, false) => 16 + c - h,
                (true, true) => c + h,
                (false, true) => 16 + c,
            } as i32;
            c += 1;
        }
        out
    }
    const BUTTERFLIES: [(usize, [i32; 16], [i32; 16]); 4] = [
        (8, butterfly(8, false), butterfly(8, true)),
        (4, butterfly(4, false), butterfly(4, true)),
        (2, butterfly(2, false), butterfly(2, true)),
        (1, butterfly(1, false), butterfly(1, true)),
    ];

    /// 16 vectors of 16 dwords → their transpose (`v[i]` lane `c` ← old `v[c]` lane `i`): four
    /// stages, each swapping the off-diagonal h×h blocks of every 2h×2h block, 64 two-source
    /// permutes in all. The transposed operands are packed with it (bf16 k-pairs are dwords)
    /// instead of with gathers: on Zen 4 that took a table5 layer's dX product from 11.3–11.7 to
    /// 10.9–11.2 ms and dW from 11.6–11.8 to 10.7–10.8 (`examples/amx_phases.rs`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn transpose16(v: &mut [__m512i; 16]) {
        for (h, first, second) in BUTTERFLIES {
            // SAFETY: 64-byte loads of 16-element arrays.
            let (first, second) = unsafe { (_mm512_loadu_si512(first.as_ptr().cast()), _mm512_loadu_si512(second.as_ptr().cast())) };
            for i in 0..16 {
                if i & h == 0 {
                    let (a, b) = (v[i], v[i + h]);
                    v[i] = _mm512_permutex2var_epi32(a, first, b);
                    v[i + h] = _mm512_permutex2var_epi32(a, second, b);
                }
            }
        }
    }

    /// Rows `r0..r0 + rows` of A (`rows` a multiple of 16) as `[16-row tile][k tile][16][32]`
    /// bf16, zero-padded past A's rows and k. Whole tile rows are two 16-lane roundings; a whole
    /// tile of a transposed A is 32 runs of 16 values, paired and transposed ([`transpose16`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_a(a: &Operand<f32>, r0: usize, rows: usize, kp: usize, out: &mut [u16]) {
        let (m, k, data) = (a.rows, a.cols, a.data);
        let ktiles = kp / TK;
        for rt in 0..rows / TM {
            for kt in 0..ktiles {
                let tile = &mut out[(rt * ktiles + kt) * TM * TK..][..TM * TK];
                let kb = kt * TK;
                let len = TK.min(k - kb.min(k));
                let rb = r0 + rt * TM;
                if a.transposed && len == TK && rb + TM <= m {
                    // A(r, c) = data[c·m + r]: k-pair q of the tile's 16 rows is two rows of
                    // `data`, 16 values each; the 16 pairs' dwords, transposed, are the tile.
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (q, v) in v.iter_mut().enumerate() {
                        let (lo, hi) = (&data[(kb + 2 * q) * m + rb..][..TM], &data[(kb + 2 * q + 1) * m + rb..][..TM]);
                        // SAFETY: 16-lane loads of 16-element slices.
                        *v = unsafe { pairs(_mm512_loadu_ps(lo.as_ptr()), _mm512_loadu_ps(hi.as_ptr())) };
                    }
                    transpose16(&mut v);
                    for (row, v) in tile.chunks_exact_mut(TK).zip(v) {
                        // SAFETY: a 64-byte store into the 32-element row.
                        unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), v) };
                    }
                    continue;
                }
                for (i, row) in tile.chunks_exact_mut(TK).enumerate() {
                    let r = rb + i;
                    if r >= m {
                        row.fill(0);
                        continue;
                    }
                    if a.transposed {
                        for (p, d) in row[..len].iter_mut().enumerate() {
                            *d = round_bits(data[(kb + p) * m + r]);
                        }
                    } else if len == TK {
                        let src = &data[r * k + kb..][..TK];
                        // SAFETY: two 16-lane loads of the 32-element `src`, one 64-byte store.
                        unsafe {
                            let v = bf16_32(_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(16)));
                            _mm512_storeu_si512(row.as_mut_ptr().cast(), v);
                        }
                        continue;
                    } else {
                        for (d, &v) in row[..len].iter_mut().zip(&data[r * k + kb..][..len]) {
                            *d = round_bits(v);
                        }
                    }
                    row[len..].fill(0);
                }
            }
        }
    }

    /// B (`k × n`) as `[16-column tile][k tile][16 pairs][16 columns][2]` bf16, zero-padded to
    /// `kp × np`: the k tiles of one column tile are consecutive 1 KiB tiles. Every element of
    /// `out` (`kp · np` long) is written, padding included, so a reused buffer needs no clearing.
    pub(super) fn pack_b(b: &Operand<f32>, kp: usize, out: &mut [u16]) {
        let panel = kp * TN;
        // SAFETY (both arms): both callers run only with AVX-512 F and BW (`request` grants AMX
        // only with them; `dot_available` checks them).
        if b.transposed {
            // B(r, c) = data[c·k + r]: one column's k-pairs are adjacent in memory; a whole tile
            // is 16 such runs of 32, transposed as k-pair dwords.
            out.par_chunks_mut(panel).enumerate().for_each(|(jt, panel)| unsafe { pack_b_panel_transposed(b, jt, panel) });
        } else {
            // B(r, c) = data[r·n + c]: two rows at a time, contiguous in c. A task takes PANELS
            // column tiles and walks down k: each cache line of B is read once and used whole,
            // and the task writes PANELS sequential streams. (A task per k tile, writing 1 KiB
            // into every panel, hit addresses 64 KiB apart — one L1 set — and packing took a
            // quarter of a forward product; a task per column tile re-read every line of B.)
            out.par_chunks_mut(PANELS * panel).enumerate().for_each(|(g, panels)| unsafe { pack_b_panels(b, g * PANELS, panel, panels) });
        }
    }

    /// Column tile `jt` (all its k tiles) of a transposed B.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_b_panel_transposed(b: &Operand<f32>, jt: usize, panel: &mut [u16]) {
        // B(r, c) = data[c·k + r]: column c is one run of k values
        let (k, n) = (b.rows, b.cols);
        let columns = (jt * TN).min(n)..((jt + 1) * TN).min(n);
        pack_runs_transposed(&b.data[columns.start * k..columns.end * k], k, panel);
    }

    /// One column tile of a packed B (`panel`: all its k tiles, every element written) from up to
    /// 16 runs of `len` values (`runs`), run c holding column c's k values: whole tiles are 16 runs
    /// of 32 rounded as k-pair dwords and transposed ([`transpose16`]); edges one value at a time,
    /// zero past the runs. A transposed B's column tile, and Wᵀ's from a band of W's rows.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_runs_transposed(runs: &[f32], len: usize, panel: &mut [u16]) {
        let count = runs.len().checked_div(len).unwrap_or(0);
        for (kt, tile) in panel.chunks_exact_mut(TK * TN).enumerate() {
            let kb = kt * TK;
            if count == TN && kb + TK <= len {
                let mut v = [_mm512_setzero_si512(); 16];
                for (c, v) in v.iter_mut().enumerate() {
                    let src = &runs[c * len + kb..][..TK];
                    // SAFETY: two 16-lane loads of the 32-element `src`.
                    *v = unsafe { bf16_32(_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(16))) };
                }
                transpose16(&mut v);
                for (row, v) in tile.chunks_exact_mut(2 * TN).zip(v) {
                    // SAFETY: a 64-byte store into the 32-element row.
                    unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), v) };
                }
                continue;
            }
            tile.fill(0);
            for c in 0..count {
                for r in 0..TK.min(len.saturating_sub(kb)) {
                    tile[(r / 2) * 2 * TN + 2 * c + r % 2] = round_bits(runs[c * len + kb + r]);
                }
            }
        }
    }

    /// One pair row of a row-major B's column tile at columns `j0..` (`dst`: its 32 elements, all
    /// written): rows `lo` and `hi` (None past B's last row: zeros) paired lane by lane, a whole
    /// row as two 16-lane roundings and one blend.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_pair_row(lo: Option<&[f32]>, hi: Option<&[f32]>, j0: usize, dst: &mut [u16]) {
        match (lo, hi) {
            (Some(lo), Some(hi)) if j0 + TN <= lo.len() => {
                let (lo, hi) = (&lo[j0..][..TN], &hi[j0..][..TN]);
                // SAFETY: 16-lane loads of 16-element slices, a 64-byte store into 32.
                unsafe {
                    let v = pairs(_mm512_loadu_ps(lo.as_ptr()), _mm512_loadu_ps(hi.as_ptr()));
                    _mm512_storeu_si512(dst[..2 * TN].as_mut_ptr().cast(), v);
                }
            }
            _ => {
                for (j, d) in dst[..2 * TN].chunks_exact_mut(2).enumerate() {
                    let at = |r: Option<&[f32]>| r.and_then(|r| r.get(j0 + j)).map_or(0, |&v| round_bits(v));
                    d[0] = at(lo);
                    d[1] = at(hi);
                }
            }
        }
    }

    /// Column tiles `jt0..` (`panels`: up to PANELS consecutive panels of `panel` elements) of a
    /// row-major B, pair row by pair row ([`pack_pair_row`]).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn pack_b_panels(b: &Operand<f32>, jt0: usize, panel: usize, panels: &mut [u16]) {
        let (k, n, data) = (b.rows, b.cols, b.data);
        let mut panels: Vec<&mut [u16]> = panels.chunks_mut(panel).collect();
        let row = |r: usize| (r < k).then(|| &data[r * n..][..n]);
        for p in 0..panel / (2 * TN) {
            let (lo, hi) = (row(2 * p), row(2 * p + 1));
            for (t, out) in panels.iter_mut().enumerate() {
                pack_pair_row(lo, hi, (jt0 + t) * TN, &mut out[p * 2 * TN..][..2 * TN]);
            }
        }
    }

    pub(super) fn product(a: Operand<f32>, b: Operand<f32>) -> Vec<f32> {
        // SAFETY: `request` checked AVX-512 (F, BW) before granting AMX.
        unsafe { drive(a, b, BN, BM, tiles) }
    }

    pub(super) fn dot_product(a: Operand<f32>, b: Operand<f32>) -> Vec<f32> {
        // SAFETY: `dot_available` checked AVX-512 F, BW and BF16.
        unsafe { drive(a, b, DN, TM, dot_tiles) }
    }

    /// Rows of the batched kernel's register block (× up to three 16-column tiles).
    const SR: usize = 8;

    /// One example's packed operands (or a shared operand's, packed once per task).
    struct Small {
        ap: Vec<u32>,
        bp: Vec<u32>,
        /// A's dword strides in `ap`: per row, per k-pair.
        a_strides: (usize, usize),
        a_packed: bool,
        b_packed: bool,
    }

    impl Small {
        /// Buffers for products `[m, k] · [k, n]`.
        fn new(m: usize, k: usize, n: usize) -> Self {
            let (kq, mp, np) = (k.div_ceil(2), m.div_ceil(SR) * SR, n.div_ceil(TN) * TN);
            Small { ap: vec![0; mp * kq], bp: vec![0; kq * np], a_strides: (0, 0), a_packed: false, b_packed: false }
        }
    }

    /// A one-matrix view of a row-major `rows × cols` slice.
    fn matrix_view(data: &[f32], rows: usize, cols: usize) -> View3<'_> {
        View3 { data, offset: 0, batch: 1, rows, cols, batch_stride: 0, row_stride: cols as isize, col_stride: 1 }
    }

    /// The elements of a written `MaybeUninit` slice.
    ///
    /// # Safety
    /// Every element was written.
    unsafe fn written(s: &[MaybeUninit<f32>]) -> &[f32] {
        // SAFETY: the caller's guarantee; MaybeUninit<f32> has f32's layout.
        unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
    }

    /// Row i of example e of a view into `dst` (its `cols` values).
    fn copy_row(v: &View3, e: usize, i: usize, dst: &mut [f32]) {
        for (j, d) in dst.iter_mut().enumerate().take(v.cols) {
            // SAFETY: (i, j) is inside the view.
            *d = unsafe { at(v, e, i, j) };
        }
    }

    pub(super) fn fm_forward(x: View3, y: View3) -> (Vec<f32>, Vec<f32>) {
        let (batch, n, d, k) = (x.batch, x.rows, x.cols, y.cols);
        let (nk, dk) = (n * k, d * k);
        let mut out: Vec<f32> = Vec::with_capacity(batch * nk);
        let mut z: Vec<f32> = Vec::with_capacity(batch * dk);
        if batch * nk * dk > 0 {
            let chunk = batch.div_ceil(4 * rayon::current_num_threads().max(1)).max(1);
            let xt = x.t();
            out.spare_capacity_mut()[..batch * nk]
                .par_chunks_mut(chunk * nk)
                .zip(z.spare_capacity_mut()[..batch * dk].par_chunks_mut(chunk * dk))
                .enumerate()
                .for_each(|(c, (o, zc))| {
                    let (mut first, mut second) = (Small::new(d, n, k), Small::new(n, d, k));
                    for (i, (o, zi)) in o.chunks_mut(nk).zip(zc.chunks_mut(dk)).enumerate() {
                        let e = c * chunk + i;
                        // SAFETY (both): `batched_available` checked by the caller; each output
                        // is this example's, written whole before it is read.
                        unsafe {
                            example(&xt, &y, e, &mut first, zi.as_mut_ptr().cast(), false);
                            second.b_packed = false;
                            example(&x, &matrix_view(written(zi), d, k), e, &mut second, o.as_mut_ptr().cast(), false);
                        }
                    }
                });
            // SAFETY: every example's outputs were written.
            unsafe {
                out.set_len(batch * nk);
                z.set_len(batch * dk);
            }
        }
        (out, z)
    }

    pub(super) fn fm_backward(x: View3, y: View3, z: &[f32], g: View3) -> (Vec<f32>, Vec<f32>) {
        let (batch, n, d, k) = (x.batch, x.rows, x.cols, y.cols);
        let (nd, nk, dk) = (n * d, n * k, d * k);
        let shared = y.batch == 1;
        let chunk = batch.div_ceil(4 * rayon::current_num_threads().max(1)).max(1);
        let xt = x.t();
        let mut dx: Vec<f32> = Vec::with_capacity(batch * nd);
        // per-example dY, or one partial sum per task
        let mut dy: Vec<f32> = Vec::with_capacity(if shared { 0 } else { batch * nk });
        // each task's per-example dY outputs (none when Y is shared)
        let dy_chunks: Vec<Option<&mut [MaybeUninit<f32>]>> = if shared {
            (0..batch.div_ceil(chunk)).map(|_| None).collect()
        } else {
            dy.spare_capacity_mut()[..batch * nk].chunks_mut(chunk * nk).map(Some).collect()
        };
        let partials: Vec<Vec<f32>> = dx.spare_capacity_mut()[..batch * nd]
            .par_chunks_mut(chunk * nd)
            .zip(dy_chunks.into_par_iter())
            .enumerate()
            .map(|(c, (dxc, mut dyc))| {
                let (mut s_dz, mut s_dx, mut s_dy) = (Small::new(d, n, k), Small::new(n, 2 * k, d), Small::new(n, d, k));
                let (mut dz, mut gy, mut zdz) = (vec![0f32; dk], vec![0f32; n * 2 * k], vec![0f32; d * 2 * k]);
                let mut acc = vec![0f32; if shared { nk } else { 0 }];
                for (i, dxi) in dxc.chunks_mut(nd).enumerate() {
                    let e = c * chunk + i;
                    let ze = &z[e * dk..][..dk];
                    // SAFETY (the products): as in the forward.
                    unsafe {
                        // dZ = Xᵀ G
                        example(&xt, &g, e, &mut s_dz, dz.as_mut_ptr(), false);
                        // dX = G Zᵀ + Y dZᵀ = [G | Y] · [Z | dZ]ᵀ, one product
                        for r in 0..n {
                            let row = &mut gy[r * 2 * k..][..2 * k];
                            copy_row(&g, e, r, &mut row[..k]);
                            copy_row(&y, e, r, &mut row[k..]);
                        }
                        for r in 0..d {
                            let row = &mut zdz[r * 2 * k..][..2 * k];
                            row[..k].copy_from_slice(&ze[r * k..][..k]);
                            row[k..].copy_from_slice(&dz[r * k..][..k]);
                        }
                        (s_dx.a_packed, s_dx.b_packed) = (false, false);
                        example(
                            &matrix_view(&gy, n, 2 * k),
                            &matrix_view(&zdz, d, 2 * k).t(),
                            0,
                            &mut s_dx,
                            dxi.as_mut_ptr().cast(),
                            false,
                        );
                        // dY = X dZ, summed over the examples when Y is shared
                        s_dy.b_packed = false;
                        let dzv = matrix_view(&dz, d, k);
                        match dyc.as_deref_mut() {
                            Some(dyc) => example(&x, &dzv, e, &mut s_dy, dyc[i * nk..].as_mut_ptr().cast(), false),
                            None => example(&x, &dzv, e, &mut s_dy, acc.as_mut_ptr(), true),
                        }
                    }
                }
                acc
            })
            .collect();
        // SAFETY: every example's dX (and, per example, dY) was written.
        unsafe {
            dx.set_len(batch * nd);
            if !shared {
                dy.set_len(batch * nk);
            }
        }
        if shared {
            let mut total = vec![0f32; nk];
            for p in &partials {
                total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
            }
            dy = total.into_iter().map(bf16_value).collect();
        }
        (dx, dy)
    }

    pub(super) fn batched_dot(a: View3, b: View3, sum: bool) -> Vec<f32> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let batch = a.batch.max(b.batch);
        if m == 0 || n == 0 {
            return Vec::new();
        }
        let threads = rayon::current_num_threads().max(1);
        let new_small = || Small::new(m, k, n);
        if sum {
            // one f32 partial sum per task, added and rounded at the end
            let chunk = batch.div_ceil(threads).max(1);
            let starts: Vec<usize> = (0..batch).step_by(chunk).collect();
            let total = starts
                .into_par_iter()
                .map(|start| {
                    let mut acc = vec![0f32; m * n];
                    let mut small = new_small();
                    for e in start..(start + chunk).min(batch) {
                        // SAFETY: `batched_available` checked the features; `acc` is m × n.
                        unsafe { example(&a, &b, e, &mut small, acc.as_mut_ptr(), true) };
                    }
                    acc
                })
                .reduce_with(|mut x, y| {
                    x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
                    x
                })
                .unwrap_or_else(|| vec![0f32; m * n]);
            return total.into_iter().map(bf16_value).collect();
        }
        let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
        // a few tasks per thread: examples cost the same, so this only absorbs noise
        let chunk = batch.div_ceil(4 * threads).max(1);
        out.spare_capacity_mut()[..batch * m * n].par_chunks_mut(chunk * m * n).enumerate().for_each(|(c, o)| {
            let mut small = new_small();
            for (i, o) in o.chunks_mut(m * n).enumerate() {
                // SAFETY: as above; `o` is example c·chunk + i's m × n output, written whole.
                unsafe { example(&a, &b, c * chunk + i, &mut small, o.as_mut_ptr().cast(), false) };
            }
        });
        // SAFETY: every example's m × n outputs were written.
        unsafe { out.set_len(batch * m * n) };
        out
    }

    /// Example `e`: its operands packed (a shared one only once), then every register block,
    /// written (rounded) into or added (`sum`) to the row-major m × n `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn example(a: &View3, b: &View3, e: usize, small: &mut Small, out: *mut f32, sum: bool) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let (kq, mp, np) = (k.div_ceil(2), m.div_ceil(SR) * SR, n.div_ceil(TN) * TN);
        if !(small.a_packed && a.batch == 1) {
            small.a_strides = unsafe { pack_small_a(a, e, mp, kq, &mut small.ap) };
            small.a_packed = true;
        }
        if !(small.b_packed && b.batch == 1) {
            unsafe { pack_small_b(b, e, kq, np, &mut small.bp) };
            small.b_packed = true;
        }
        let (sa_i, sa_q) = small.a_strides;
        for i0 in (0..mp).step_by(SR) {
            // SAFETY: rows i0..i0 + SR < mp of the packed A, tiles j0.. < np of the packed B.
            let ap = unsafe { small.ap.as_ptr().add(i0 * sa_i) };
            let mut j0 = 0;
            while j0 < np {
                let tiles = ((np - j0) / TN).min(3);
                let bp = unsafe { small.bp.as_ptr().add(j0) };
                unsafe {
                    match tiles {
                        3 => store_small(&small_block::<3>(ap, sa_i, sa_q, bp, np, kq), out, i0, j0, m, n, sum),
                        2 => store_small(&small_block::<2>(ap, sa_i, sa_q, bp, np, kq), out, i0, j0, m, n, sum),
                        _ => store_small(&small_block::<1>(ap, sa_i, sa_q, bp, np, kq), out, i0, j0, m, n, sum),
                    }
                }
                j0 += tiles * TN;
            }
        }
    }

    /// SR rows × T tiles of one example: per k-pair, T loads of B, SR broadcasts of A, SR·T
    /// `vdpbf16ps`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn small_block<const T: usize>(
        ap: *const u32,
        sa_i: usize,
        sa_q: usize,
        bp: *const u32,
        np: usize,
        kq: usize,
    ) -> [[__m512; T]; SR] {
        let mut acc = [[_mm512_setzero_ps(); T]; SR];
        for q in 0..kq {
            // SAFETY: the caller's bounds: k-pair q < kq of the packed rows and tiles.
            unsafe {
                let bv: [__m512bh; T] = std::array::from_fn(|t| std::mem::transmute(_mm512_loadu_si512(bp.add(q * np + t * TN).cast())));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let s: __m512bh = std::mem::transmute(_mm512_set1_epi32(ap.add(r * sa_i + q * sa_q).read() as i32));
                    for t in 0..T {
                        acc[t] = _mm512_dpbf16_ps(acc[t], s, bv[t]);
                    }
                }
            }
        }
        acc
    }

    /// A register block into the row-major m × n `out` at rows `i0..`, columns `j0..`: rounded to
    /// bf16, or (`sum`) added in f32; parts past m and n dropped.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn store_small<const T: usize>(acc: &[[__m512; T]; SR], out: *mut f32, i0: usize, j0: usize, m: usize, n: usize, sum: bool) {
        let keep = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        for (r, acc) in acc.iter().enumerate() {
            let i = i0 + r;
            if i >= m {
                break;
            }
            for (t, &v) in acc.iter().enumerate() {
                let c0 = j0 + t * TN;
                if c0 >= n {
                    break;
                }
                let mask: __mmask16 = if n - c0 >= TN { 0xFFFF } else { (1u16 << (n - c0)) - 1 };
                // SAFETY: the masked lanes are columns c0.. < n of row i < m.
                unsafe {
                    let p = out.add(i * n + c0);
                    let v = if sum {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v)
                    } else {
                        _mm512_castsi512_ps(_mm512_and_si512(round_hi(v), keep))
                    };
                    _mm512_mask_storeu_ps(p, mask, v);
                }
            }
        }
    }

    /// Element (i, j) of example e of a view.
    #[inline(always)]
    unsafe fn at(v: &View3, e: usize, i: usize, j: usize) -> f32 {
        // SAFETY: the caller's (i, j) is inside the view, whose layout keeps it in the storage.
        unsafe { v.matrix(e).offset(i as isize * v.row_stride + j as isize * v.col_stride).read() }
    }

    /// The bf16 k-pair (r, 2q), (r, 2q + 1) of a matrix indexed (row, k) or (k, column) by `get`;
    /// zero past k.
    #[inline(always)]
    fn pair(k: usize, q: usize, get: impl Fn(usize) -> f32) -> u32 {
        let hi = if 2 * q + 1 < k { round_bits(get(2 * q + 1)) as u32 } else { 0 };
        round_bits(get(2 * q)) as u32 | hi << 16
    }

    /// The first `n` (≤ 16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 }
    }

    /// Up to 16 floats from `p` (`n` of them; the other lanes zero, nothing read past `n`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load_n(p: *const f32, n: usize) -> __m512 {
        // SAFETY: the caller's `n` values are readable; masked lanes are not accessed.
        unsafe { if n >= 16 { _mm512_loadu_ps(p) } else { _mm512_maskz_loadu_ps(lanes(n), p) } }
    }

    /// k-pairs of `k` runs of `count` contiguous values, run r at `base + r·stride`: row q of `out`
    /// (`width` ≥ count dwords, a multiple of 16 or the end of `out`) holds runs 2q and 2q + 1
    /// element by element as k-pair dwords, zeros past `count` (and for the missing second run of
    /// an odd k). Both packings' contiguous case: A's columns when A is a transposed view, B's
    /// rows when B is row-major.
    ///
    /// # Safety
    /// Every run's `count` values are readable; `out` holds ⌈k/2⌉ rows of `width`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_pair_runs(base: *const f32, stride: isize, k: usize, count: usize, width: usize, out: &mut [u32]) {
        for (q, row) in out.chunks_exact_mut(width).take(k.div_ceil(2)).enumerate() {
            // SAFETY: the caller's runs 2q and (if < k) 2q + 1; masked stores inside `row`.
            unsafe {
                let lo = base.offset(2 * q as isize * stride);
                let hi = (2 * q + 1 < k).then(|| base.offset((2 * q + 1) as isize * stride));
                for i in (0..width).step_by(16) {
                    let valid = count.saturating_sub(i);
                    let l = load_n(lo.add(i), valid);
                    let h = hi.map_or(_mm512_setzero_ps(), |hi| load_n(hi.add(i), valid));
                    _mm512_mask_storeu_epi32(row.as_mut_ptr().add(i).cast(), lanes(width - i), pairs(l, h));
                }
            }
        }
    }

    /// Example e of A as k-pair dwords, rows padded to `mp` with zeros; returns the dword strides
    /// (per row, per k-pair). Row-contiguous A: `[row][pair]`, 32 values a vector; column-
    /// contiguous A (a transposed view): `[pair][row]`, two runs of 16 rows a vector (masked
    /// loads at the edges: the interaction shapes have k = 24 and 48); other strides one pair at
    /// a time.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_small_a(v: &View3, e: usize, mp: usize, kq: usize, out: &mut [u32]) -> (usize, usize) {
        let (m, k) = (v.rows, v.cols);
        let base = v.matrix(e);
        let (rs, cs) = (v.row_stride, v.col_stride);
        if rs == 1 && cs > 1 {
            // SAFETY: column j of A is m values from base + j·cs.
            unsafe { pack_pair_runs(base, cs, k, m, mp, out) };
            return (1, mp);
        }
        for (i, row) in out.chunks_exact_mut(kq).take(mp).enumerate() {
            if i >= m {
                row.fill(0);
                continue;
            }
            if cs == 1 {
                // SAFETY: columns 2q.. < k of row i; stores of the row's kq dwords.
                unsafe {
                    let src = base.offset(i as isize * rs);
                    for q in (0..kq).step_by(16) {
                        let left = k - 2 * q;
                        let pairs = bf16_32(load_n(src.add(2 * q), left), load_n(src.add(2 * q + 16), left.saturating_sub(16)));
                        _mm512_mask_storeu_epi32(row.as_mut_ptr().add(q).cast(), lanes(kq - q), pairs);
                    }
                }
                continue;
            }
            for (q, d) in row.iter_mut().enumerate() {
                *d = pair(k, q, |j| unsafe { at(v, e, i, j) });
            }
        }
        (kq, 1)
    }

    /// Example e of B as `[pair][column]` k-pair dwords, columns padded to `np` with zeros.
    /// Row-contiguous B: two runs of 16 columns a vector (masked at the edge). A transposed view
    /// (each column's k-pairs adjacent in memory, as in the backward's `G · Bᵀ`): blocks of 16
    /// columns × 16 k-pairs, each column's 32 values rounded as one run and the 16 runs of pair
    /// dwords transposed ([`transpose16`]; 64-bit gathers of the pairs were 1.8% of a table5
    /// bf16 step). Other strides, and a transposed view's last columns, one pair at a time.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_small_b(v: &View3, e: usize, kq: usize, np: usize, out: &mut [u32]) {
        let (k, n) = (v.rows, v.cols);
        let base = v.matrix(e);
        let (rs, cs) = (v.row_stride, v.col_stride);
        if cs == 1 {
            // SAFETY: row r of B is n values from base + r·rs.
            unsafe { pack_pair_runs(base, rs, k, n, np, out) };
            return;
        }
        let mut j0 = 0;
        if rs == 1 && cs > 1 {
            while j0 + 16 <= n {
                for q0 in (0..kq).step_by(16) {
                    let left = k - 2 * q0;
                    let mut runs = [_mm512_setzero_si512(); 16];
                    for (c, run) in runs.iter_mut().enumerate() {
                        // SAFETY: values 2q0.. < k of column j0 + c < n.
                        unsafe {
                            let src = base.offset((j0 + c) as isize * cs).add(2 * q0);
                            *run = bf16_32(load_n(src, left), load_n(src.add(16), left.saturating_sub(16)));
                        }
                    }
                    transpose16(&mut runs);
                    for (dq, run) in runs.iter().enumerate().take(kq - q0) {
                        // SAFETY: 16 dwords of pair row q0 + dq < kq at columns j0.. < np.
                        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add((q0 + dq) * np + j0).cast(), *run) };
                    }
                }
                j0 += 16;
            }
        }
        for q in 0..kq {
            let row = &mut out[q * np..][..np];
            for (j, d) in row.iter_mut().enumerate().take(n).skip(j0) {
                *d = pair(k, q, |r| unsafe { at(v, e, r, j) });
            }
            row[n.max(j0)..].fill(0);
        }
    }

    /// One task of a kernel: rows `r0..` of A packed into `ap`, times the packed B, into `cblock`
    /// (every element written), `[rows, kp, n, np]`.
    type Task = unsafe fn(&Operand<f32>, usize, &mut [u16], &[u16], &mut [MaybeUninit<f32>], [usize; 4]);

    /// C = A · B by one kernel: B packed once (columns padded to a multiple of `col_block`), then
    /// [`drive_packed`].
    ///
    /// # Safety
    /// The CPU has the features `task` was compiled for.
    unsafe fn drive(a: Operand<f32>, b: Operand<f32>, col_block: usize, row_block: usize, task: Task) -> Vec<f32> {
        let (k, n) = (a.cols, b.cols);
        let (kp, np) = (k.div_ceil(TK) * TK, n.div_ceil(col_block) * col_block);
        with_scratch(&PACKED_B, kp * np, |bp| {
            pack_b(&b, kp, bp);
            // SAFETY: the caller's guarantee.
            unsafe { drive_packed(a, bp, [kp, n, np], row_block, task) }
        })
    }

    /// C = A · B for a packed B (`kp × np`, `n` columns of it real): blocks of MC rows of C, one
    /// rayon task each (rows padded to a multiple of `row_block`). C is written whole by the
    /// tasks (every row below m, every column below n), so it is not zeroed first (that memset
    /// was 3% of a bf16 table5 step).
    ///
    /// # Safety
    /// The CPU has the features `task` was compiled for.
    unsafe fn drive_packed(a: Operand<f32>, bp: &[u16], [kp, n, np]: [usize; 3], row_block: usize, task: Task) -> Vec<f32> {
        let (m, k) = (a.rows, a.cols);
        if m == 0 || n == 0 || k == 0 {
            return vec![0f32; m * n];
        }
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        let cs = &mut c.spare_capacity_mut()[..m * n];
        cs.par_chunks_mut(MC * n).enumerate().for_each(|(block, cblock)| {
            let rows = (cblock.len() / n).div_ceil(row_block) * row_block;
            // SAFETY: the caller's guarantee.
            with_scratch(&PACKED_A, rows * kp, |ap| unsafe { task(&a, block * MC, ap, bp, cblock, [rows, kp, n, np]) });
        });
        // SAFETY: the tasks initialised all m·n elements.
        unsafe { c.set_len(m * n) };
        c
    }

    /// `a · W` (or `a · Wᵀ`) over a [`PackedWeight`]'s packing, by the kernel it was packed for.
    pub(super) fn weight_product(a: Operand<f32>, w: &PackedWeight, transposed: bool) -> Vec<f32> {
        let [kp, np, kp_t, np_t] = w.padded();
        let (bp, dims) = if transposed { (&w.transposed, [kp_t, w.k, np_t]) } else { (&w.forward, [kp, w.n, np]) };
        let bp = lines_as_u16(bp);
        // SAFETY: PackedWeight::new grants AMX only where `available` (which checked AVX-512 F
        // and BW), the register kernel only where `dot_available`.
        unsafe { if w.amx { drive_packed(a, bp, dims, BM, tiles) } else { drive_packed(a, bp, dims, TM, dot_tiles) } }
    }

    /// Rows `BAND · band ..` of W (`rows`: those rows, row-major, `n` values each; fewer than
    /// BAND only at W's end) into both packings, with the per-product packing's own pieces: W's
    /// as the forward's B (the band is half a k tile: its pair rows in every column tile,
    /// [`pack_pair_row`]) and Wᵀ's as dX's B (W's rows are Wᵀ's columns: the band is one column
    /// tile, [`pack_runs_transposed`]). Column tiles past W's columns and pair rows past its last
    /// row belong to no band and stay as allocated (zero).
    ///
    /// # Safety
    /// `fwd` and `tr` point to the packings' buffers (`[kp, np]` and `[kp_t, np_t]` of
    /// [`PackedWeight::padded`]); no other thread writes this band's positions or reads them.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn pack_band(rows: &[f32], n: usize, band: usize, [kp, kp_t]: [usize; 2], fwd: *mut u16, tr: *mut u16) {
        let count = rows.len() / n;
        let row = |i: usize| (i < count).then(|| &rows[i * n..][..n]);
        let pair0 = band * BAND / 2;
        for jt in 0..n.div_ceil(TN) {
            for pp in 0..count.div_ceil(2) {
                // SAFETY: pair row pair0 + pp < kp / 2 of column tile jt < np / TN, this band's
                // alone (the caller's guarantee).
                let dst = unsafe { std::slice::from_raw_parts_mut(fwd.add(jt * kp * TN + (pair0 + pp) * 2 * TN), 2 * TN) };
                pack_pair_row(row(2 * pp), row(2 * pp + 1), jt * TN, dst);
            }
        }
        // SAFETY: column tile `band` < np_t / TN of Wᵀ's packing, this band's alone.
        let panel = unsafe { std::slice::from_raw_parts_mut(tr.add(band * kp_t * TN), kp_t * TN) };
        pack_runs_transposed(rows, n, panel);
    }

    /// One task of the register kernel: rows `r0..` of A packed into `ap` (the AMX layout), times
    /// the packed B, into `cblock` (every element written, rounded to bf16).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn dot_tiles(
        a: &Operand<f32>,
        r0: usize,
        ap: &mut [u16],
        bp: &[u16],
        cblock: &mut [MaybeUninit<f32>],
        [rows, kp, n, np]: [usize; 4],
    ) {
        let ktiles = kp / TK;
        let valid_rows = cblock.len() / n;
        pack_a(a, r0, rows, kp, ap);
        let tile_elems = TM * TK;
        let panel = ktiles * tile_elems;
        let chunks = ktiles.div_ceil(DKC);
        // running sums of every register block of the task between k chunks
        let mut sums = [[_mm512_setzero_ps(); 3 * DM]; MC / DM];
        for jb in 0..np / DN {
            // SAFETY (pointer arithmetic below): column tiles 3jb..3jb + 3 are inside `bp`
            // (np is a multiple of DN), A's row blocks inside `ap` (rows ≤ MC, a multiple of TM).
            let b0 = unsafe { bp.as_ptr().add(3 * jb * panel) };
            for chunk in 0..chunks {
                let (k0, k1) = (chunk * DKC, ((chunk + 1) * DKC).min(ktiles));
                for (ib, sum) in sums.iter_mut().enumerate().take(rows / DM) {
                    let a0 = unsafe { ap.as_ptr().add((ib / 2) * panel + (ib % 2) * DM * TK) };
                    let mut acc = if chunk == 0 { [_mm512_setzero_ps(); 3 * DM] } else { *sum };
                    for kt in k0..k1 {
                        let (at, bt) = unsafe { (a0.add(kt * tile_elems), b0.add(kt * tile_elems)) };
                        for q in 0..TK / 2 {
                            // SAFETY: 64-byte loads of one k-pair row of each B tile; 4-byte
                            // loads of one k-pair of each A row, all inside the packed tiles.
                            unsafe {
                                let bv = |t: usize| -> __m512bh {
                                    std::mem::transmute(_mm512_loadu_si512(bt.add(t * panel + q * 2 * TN).cast()))
                                };
                                let (v0, v1, v2) = (bv(0), bv(1), bv(2));
                                for i in 0..DM {
                                    let s: __m512bh =
                                        std::mem::transmute(_mm512_set1_epi32(at.add(i * TK + 2 * q).cast::<i32>().read_unaligned()));
                                    acc[3 * i] = _mm512_dpbf16_ps(acc[3 * i], s, v0);
                                    acc[3 * i + 1] = _mm512_dpbf16_ps(acc[3 * i + 1], s, v1);
                                    acc[3 * i + 2] = _mm512_dpbf16_ps(acc[3 * i + 2], s, v2);
                                }
                            }
                        }
                    }
                    if chunk + 1 < chunks {
                        *sum = acc;
                        continue;
                    }
                    // the block into C, rounded to bf16; parts past C's edge dropped
                    let keep = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
                    for i in 0..DM {
                        let r = ib * DM + i;
                        if r >= valid_rows {
                            break;
                        }
                        for t in 0..3 {
                            let c0 = jb * DN + t * TN;
                            if c0 >= n {
                                break;
                            }
                            let v = _mm512_castsi512_ps(_mm512_and_si512(round_hi(acc[3 * i + t]), keep));
                            let mask: __mmask16 = if n - c0 >= TN { 0xFFFF } else { (1u16 << (n - c0)) - 1 };
                            // SAFETY: the masked lanes are columns c0.. < n of row r < valid_rows.
                            unsafe { _mm512_mask_storeu_ps(cblock.as_mut_ptr().add(r * n + c0).cast(), mask, v) };
                        }
                    }
                }
            }
        }
    }

    /// One task: rows `r0..` of A packed into `ap`, times the packed B, into `cblock` (every
    /// element written, rounded to bf16). Compiled for AVX-512: the packing, copies and rounding
    /// inlined here vectorize.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tiles(
        a: &Operand<f32>,
        r0: usize,
        ap: &mut [u16],
        bp: &[u16],
        cblock: &mut [MaybeUninit<f32>],
        [rows, kp, n, np]: [usize; 4],
    ) {
        let ktiles = kp / TK;
        let valid_rows = cblock.len() / n;
        pack_a(a, r0, rows, kp, ap);
        let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [64; 16], rows: [16; 16] };
        config.colsb[8..].fill(0);
        config.rows[8..].fill(0);
        // cache-line aligned, like the packed operands: tile stores too straddle lines otherwise
        #[repr(C, align(64))]
        struct CTiles([[f32; TM * TN]; 4]);
        let mut c_tiles = CTiles([[0f32; TM * TN]; 4]);
        let scratch = &mut c_tiles.0;
        // running sums of every register block of the task between k chunks
        #[repr(C, align(64))]
        struct Sums([[[f32; TM * TN]; 4]; MC / BM]);
        let mut sums = Sums([[[0f32; TM * TN]; 4]; MC / BM]);
        let tile_elems = TM * TK; // = TK·TN: every A and B tile is 512 bf16
        // SAFETY: the tile registers are this thread's (nothing else here uses AMX, and the
        // closure makes no rayon calls, so no other task interleaves on this thread between
        // `ldtilecfg` and `tilerelease`); every tile load reads 16 rows of 64 bytes inside
        // `ap`/`bp` (both padded to whole tiles), every C load or store one 1 KiB tile of
        // `scratch` or `sums` (rows ≤ MC, so `ib` < MC / BM).
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
            for jb in 0..np / BN {
                let b0 = bp.as_ptr().add(2 * jb * ktiles * tile_elems);
                let b1 = b0.add(ktiles * tile_elems);
                let chunks = ktiles.div_ceil(KC);
                for chunk in 0..chunks {
                    let (k0, k1) = (chunk * KC, ((chunk + 1) * KC).min(ktiles));
                    for ib in 0..rows / BM {
                        let a0 = ap.as_ptr().add(2 * ib * ktiles * tile_elems);
                        let a1 = a0.add(ktiles * tile_elems);
                        let sum = &mut sums.0[ib];
                        if chunk == 0 {
                            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                        } else {
                            asm!(
                                "tileloadd tmm0, [{c0} + {s}]",
                                "tileloadd tmm1, [{c1} + {s}]",
                                "tileloadd tmm2, [{c2} + {s}]",
                                "tileloadd tmm3, [{c3} + {s}]",
                                c0 = in(reg) sum[0].as_ptr(), c1 = in(reg) sum[1].as_ptr(),
                                c2 = in(reg) sum[2].as_ptr(), c3 = in(reg) sum[3].as_ptr(),
                                s = in(reg) 64usize, options(nostack, readonly)
                            );
                        }
                        for kt in k0..k1 {
                            let o = kt * tile_elems;
                            asm!(
                                "tileloadd tmm4, [{a0} + {s}]",
                                "tileloadd tmm5, [{a1} + {s}]",
                                "tileloadd tmm6, [{b0} + {s}]",
                                "tileloadd tmm7, [{b1} + {s}]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0.add(o), a1 = in(reg) a1.add(o),
                                b0 = in(reg) b0.add(o), b1 = in(reg) b1.add(o),
                                s = in(reg) 64usize, options(nostack, readonly)
                            );
                        }
                        let last = chunk + 1 == chunks;
                        let out = if last { &mut *scratch } else { &mut *sum };
                        asm!(
                            "tilestored [{c0} + {s}], tmm0",
                            "tilestored [{c1} + {s}], tmm1",
                            "tilestored [{c2} + {s}], tmm2",
                            "tilestored [{c3} + {s}], tmm3",
                            c0 = in(reg) out[0].as_mut_ptr(), c1 = in(reg) out[1].as_mut_ptr(),
                            c2 = in(reg) out[2].as_mut_ptr(), c3 = in(reg) out[3].as_mut_ptr(),
                            s = in(reg) 64usize, options(nostack)
                        );
                        if last {
                            write_block(scratch, cblock, n, valid_rows, ib * BM, jb * BN);
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// The 2×2 tiles of one register block into C (rows `i0..`, columns `j0..`), rounded to bf16
    /// like every other bf16 product here; parts past C's edge are dropped. Over all blocks of a
    /// task this writes every element of its rows of C.
    #[inline(always)]
    fn write_block(scratch: &[[f32; TM * TN]; 4], c: &mut [MaybeUninit<f32>], n: usize, valid_rows: usize, i0: usize, j0: usize) {
        for (t, tile) in scratch.iter().enumerate() {
            let (r0, c0) = (i0 + (t / 2) * TM, j0 + (t % 2) * TN);
            if c0 >= n {
                continue;
            }
            let len = TN.min(n - c0);
            for i in 0..TM.min(valid_rows.saturating_sub(r0)) {
                let src = &tile[i * TN..][..TN];
                if len == TN {
                    for (d, &v) in c[(r0 + i) * n + c0..][..TN].iter_mut().zip(src) {
                        d.write(bf16_value(v));
                    }
                } else {
                    for (d, &v) in c[(r0 + i) * n + c0..][..len].iter_mut().zip(src) {
                        d.write(bf16_value(v));
                    }
                }
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::*;
    pub(super) fn batched_dot(_: View3, _: View3, _: bool) -> Vec<f32> {
        unreachable!("amx::batched_available() is false off x86-64 Linux")
    }
    pub(super) fn fm_forward(_: View3, _: View3) -> (Vec<f32>, Vec<f32>) {
        unreachable!("amx::batched_available() is false off x86-64 Linux")
    }
    pub(super) fn fm_backward(_: View3, _: View3, _: &[f32], _: View3) -> (Vec<f32>, Vec<f32>) {
        unreachable!("amx::batched_available() is false off x86-64 Linux")
    }
    pub(super) fn request() -> bool {
        false
    }
    pub(super) fn product(_: Operand<f32>, _: Operand<f32>) -> Vec<f32> {
        unreachable!("amx::available() is false off x86-64 Linux")
    }
    pub(super) fn dot_product(_: Operand<f32>, _: Operand<f32>) -> Vec<f32> {
        unreachable!("amx::dot_available() is false off x86-64 Linux")
    }
    pub(super) fn weight_product(_: Operand<f32>, _: &PackedWeight, _: bool) -> Vec<f32> {
        unreachable!("no PackedWeight is made off x86-64 Linux")
    }
    pub(super) unsafe fn pack_band(_: &[f32], _: usize, _: usize, _: [usize; 2], _: *mut u16, _: *mut u16) {
        unreachable!("no PackedWeight is made off x86-64 Linux")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| (crate::rng::splitmix64(seed ^ i as u64) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    /// A batch of `rows × cols` matrices (`batch` 1: shared) stored in one of three layouts:
    /// row-major, transposed (each matrix stored as its transpose: a swapped-axes view) or
    /// row-major with every other column skipped (neither stride 1). Returns the storage and
    /// the element getter used by the reference.
    fn stored(batch: usize, rows: usize, cols: usize, layout: usize, seed: u64) -> (Vec<f32>, [isize; 3]) {
        let data = values(batch * rows * cols * 2, seed);
        let (r, c) = (rows as isize, cols as isize);
        let strides = match layout {
            0 => [r * c, c, 1],
            1 => [r * c, 1, r],
            _ => [2 * r * c, 2 * c, 2],
        };
        (data, [if batch == 1 { 0 } else { strides[0] }, strides[1], strides[2]])
    }

    fn view(data: &[f32], batch: usize, rows: usize, cols: usize, s: [isize; 3]) -> View3<'_> {
        View3 { data, offset: 0, batch, rows, cols, batch_stride: s[0], row_stride: s[1], col_stride: s[2] }
    }

    /// [`batched_dot`] against an f64 product of the bf16-rounded operands, per example and
    /// summed, on edge shapes (one row, k = 1 and odd k, columns short of one tile and past
    /// three, rows past one register block), every pair of operand layouts (row-major,
    /// transposed — the backward's views, packed by gathers for B — and general strides), and
    /// shared operands on either side.
    /// A [`PackedWeight`] holds exactly what packing W per product makes (the forward's B and
    /// dX's transposed B, bit for bit, padding included), whether packed whole or band by band in
    /// any order (the optimizer's way), so its products are the per-product kernel's bit for bit;
    /// on edge shapes (one row or column, sizes off every tile and block, a last band of one row)
    /// for every packed kernel the machine has. A band packed twice, or of the wrong length, panics.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn packed_weights_equal_packing_per_product() {
        let kernels: Vec<bool> = [true, false].into_iter().filter(|&amx| if amx { available() } else { dot_available() }).collect();
        if kernels.is_empty() {
            eprintln!("no AMX or AVX512-BF16 here: packed weights not tested");
            return;
        }
        for &amx in &kernels {
            for &(k, n) in &[(1, 1), (1, 40), (17, 1), (16, 16), (33, 17), (32, 48), (49, 97), (64, 130), (130, 33)] {
                let w = values(k * n, 11);
                let mut whole = PackedWeight::new(k, n, amx).expect("kernel available");
                whole.pack(&w);
                let [kp, np, kp_t, np_t] = whole.padded();
                let (mut fwd, mut tr) = (vec![0u16; kp * np], vec![0u16; kp_t * np_t]);
                imp::pack_b(&Operand::new(&w, k, n), kp, &mut fwd);
                imp::pack_b(&Operand::transpose_of(&w, k, n), kp_t, &mut tr);
                assert!(lines_as_u16(&whole.forward) == &fwd[..], "amx {amx} {k}×{n}: W's packing differs");
                assert!(lines_as_u16(&whole.transposed) == &tr[..], "amx {amx} {k}×{n}: Wᵀ's packing differs");
                // band by band, last band first, as separate calls
                let mut banded = PackedWeight::new(k, n, amx).unwrap();
                {
                    let bands = banded.bands();
                    for b in (0..k.div_ceil(BAND)).rev() {
                        bands.pack(b, &w[b * BAND * n..((b + 1) * BAND).min(k) * n]);
                    }
                    let twice = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bands.pack(0, &w[..BAND.min(k) * n])));
                    assert!(twice.is_err(), "a band packed twice must panic");
                }
                let same = |a: &[Line], b: &[Line]| lines_as_u16(a) == lines_as_u16(b);
                assert!(
                    same(&banded.forward, &whole.forward) && same(&banded.transposed, &whole.transposed),
                    "amx {amx} {k}×{n}: bands differ"
                );
                let short = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    PackedWeight::new(k, n, amx).unwrap().bands().pack(0, &w[..n - 1])
                }));
                assert!(short.is_err(), "a band of the wrong length must panic");
                let per_product: fn(Operand<f32>, Operand<f32>) -> Vec<f32> = if amx { product } else { dot_product };
                for m in [1, 5, 33] {
                    let (x, g) = (values(m * k, 12), values(m * n, 13));
                    let got = weight_product(Operand::new(&x, m, k), &whole, false);
                    assert!(got == per_product(Operand::new(&x, m, k), Operand::new(&w, k, n)), "amx {amx} {m}×{k}×{n}: X·W");
                    let got = weight_product(Operand::new(&g, m, n), &whole, true);
                    assert!(got == per_product(Operand::new(&g, m, n), Operand::transpose_of(&w, k, n)), "amx {amx} {m}×{k}×{n}: dY·Wᵀ");
                }
            }
        }
    }

    #[test]
    fn batched_products_match_f64_within_bf16_rounding() {
        if !batched_available() {
            eprintln!("AVX512-BF16 not available on this machine: the batched bf16 kernel is not tested here");
            return;
        }
        let r = |v: f32| bf16_value(v) as f64;
        for &(batch, m, k, n) in
            &[(3, 1, 1, 1), (2, 5, 7, 3), (4, 9, 17, 20), (3, 64, 128, 24), (2, 13, 64, 50), (5, 33, 33, 100), (2, 8, 31, 48)]
        {
            for (la, lb) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 1)] {
                for (ba, bb) in [(batch, batch), (1, batch), (batch, 1)] {
                    let (a, sa) = stored(ba, m, k, la, 1);
                    let (b, sb) = stored(bb, k, n, lb, 2);
                    let (va, vb) = (view(&a, ba, m, k, sa), view(&b, bb, k, n, sb));
                    let get = |v: &View3, e: usize, i: usize, j: usize| {
                        let e = if v.batch == 1 { 0 } else { e };
                        r(v.data[(e as isize * v.batch_stride + i as isize * v.row_stride + j as isize * v.col_stride) as usize])
                    };
                    let want = |e: usize, i: usize, j: usize| -> f64 { (0..k).map(|p| get(&va, e, i, p) * get(&vb, e, p, j)).sum() };
                    let name = format!("batch {batch} {m}×{k}×{n}, layouts {la}/{lb}, batches {ba}/{bb}");
                    let got = batched_dot(va, vb, false);
                    assert_eq!(got.len(), batch * m * n, "{name}");
                    for (x, &g) in got.iter().enumerate() {
                        let (e, i, j) = (x / (m * n), x / n % m, x % n);
                        let w = want(e, i, j);
                        assert!((g as f64 - w).abs() <= w.abs() * 2f64.powi(-8) + k as f64 * 1e-6, "{name} at {e},{i},{j}: {g} vs {w}");
                        assert_eq!(g.to_bits() & 0xFFFF, 0, "{name}: C not rounded to bf16");
                    }
                    let summed = batched_dot(va, vb, true);
                    assert_eq!(summed.len(), m * n, "{name}, summed");
                    for (x, &g) in summed.iter().enumerate() {
                        let w: f64 = (0..batch).map(|e| want(e, x / n, x % n)).sum();
                        let tol = w.abs() * 2f64.powi(-8) + (batch * k) as f64 * 1e-6;
                        assert!((g as f64 - w).abs() <= tol, "{name}, summed, at {x}: {g} vs {w}");
                    }
                }
            }
        }
    }
}
