//! bf16 matrix products on Intel AMX tiles (`tdpbf16ps`: 16×16 f32 accumulators, f32 accumulation),
//! written here because no crate reaches AMX: `gemmkit` stops at AVX512-BF16 dot products, and the
//! AMX intrinsics are unstable in Rust 1.95, so the tile instructions are inline `asm!` (stable).
//!
//! Layout (the usual AMX packing): A in 16-row × 32-k tiles (a row of 32 bf16 is 64 bytes), B in
//! "VNNI" tiles of 16 k-pairs × 16 columns (each 32-bit lane holds B[k, j], B[k+1, j]); both are
//! zero-padded, so edges need no masked tiles. One register block is 2×2 C tiles (32×32 f32) fed
//! by two A and two B tiles: the eight tile registers. B is packed once (in parallel); each rayon
//! task packs its own block of MC rows of A, which stays in L2 while every column block passes.
//!
//! Linux grants AMX's tile data state per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once, and is false where the CPU lacks AMX-BF16 or the kernel refuses.

// Off x86-64 Linux only `available` (false) and `product` (unreachable) are used.
#![cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]

use gemmkit::bf16;
use rayon::prelude::*;

use super::bf16::Operand;

/// Whether this process may run AMX bf16 tiles (asked of the kernel once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(imp::request)
}

/// `a · b` with f32 accumulation, the result rounded to bf16 and returned as row-major f32 (the
/// contract of [`super::bf16::product`]). Panics unless [`available`].
pub fn product(a: Operand, b: Operand) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "amx product: inner dimensions differ");
    assert!(available(), "amx product: AMX-BF16 is not available to this process");
    imp::product(a, b)
}

/// A's tile: 16 rows × 32 k. B's tile: 16 k-pairs × 16 columns × 2. C's tile: 16 × 16 f32.
const TM: usize = 16;
const TK: usize = 32;
const TN: usize = 16;
/// The register block: 2×2 C tiles.
const BM: usize = 2 * TM;
const BN: usize = 2 * TN;
/// Rows of A packed per task: at k = 2048 a 128-row block is 512 KiB, well inside L2.
const MC: usize = 128;

fn bits(x: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a transparent u16.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u16>(), x.len()) }
}

/// B (`k × n`) as `[16-column tile][k tile][16 pairs][16 columns][2]`, zero-padded to
/// `kp × np`: the k tiles of one column tile are consecutive 1 KiB tiles. Every element of `out`
/// (`kp · np` long) is written, padding included, so a reused buffer needs no clearing.
fn pack_b(b: &Operand, kp: usize, out: &mut [u16]) {
    let (k, n) = (b.rows, b.cols);
    let panel = kp * TN;
    let data = bits(b.data);
    if b.transposed {
        // B(r, c) = data[c·k + r]: one column's k-pairs are adjacent in memory, so a whole tile
        // is a 16 × 16 transpose of (k-pair) u32s; edge tiles go element by element.
        out.par_chunks_mut(panel).enumerate().for_each(|(jt, panel)| {
            let j0 = jt * TN;
            for (kt, tile) in panel.chunks_exact_mut(TK * TN).enumerate() {
                let kb = kt * TK;
                if j0 + TN <= n && kb + TK <= k {
                    for j in 0..TN {
                        let col: &[u16; TK] = data[(j0 + j) * k + kb..][..TK].try_into().unwrap();
                        for q in 0..TK / 2 {
                            tile[q * 2 * TN + 2 * j] = col[2 * q];
                            tile[q * 2 * TN + 2 * j + 1] = col[2 * q + 1];
                        }
                    }
                    continue;
                }
                tile.fill(0);
                for j in 0..TN.min(n.saturating_sub(j0)) {
                    for r in 0..TK.min(k.saturating_sub(kb)) {
                        tile[(r / 2) * 2 * TN + 2 * j + r % 2] = data[(j0 + j) * k + kb + r];
                    }
                }
            }
        });
    } else {
        // B(r, c) = data[r·n + c]: two rows at a time, contiguous in c; a k tile writes 1 KiB
        // into every column tile's panel, so the tasks (one per k tile) write disjoint ranges.
        let mut tiles: Vec<Vec<&mut [u16]>> = (0..kp / TK).map(|_| Vec::new()).collect();
        for panel in out.chunks_mut(panel) {
            for (kt, tile) in panel.chunks_mut(TK * TN).enumerate() {
                tiles[kt].push(tile);
            }
        }
        let row = |r: usize| (r < k).then(|| &data[r * n..][..n]);
        tiles.into_par_iter().enumerate().for_each(|(kt, mut column_tiles)| {
            for pair in 0..TK / 2 {
                let k0 = kt * TK + 2 * pair;
                let (lo, hi) = (row(k0), row(k0 + 1));
                for (jt, tile) in column_tiles.iter_mut().enumerate() {
                    let j0 = jt * TN;
                    let dst = &mut tile[pair * 2 * TN..][..2 * TN];
                    match (lo, hi) {
                        (Some(lo), Some(hi)) if j0 + TN <= n => {
                            for (j, d) in dst.chunks_exact_mut(2).enumerate() {
                                d[0] = lo[j0 + j];
                                d[1] = hi[j0 + j];
                            }
                        }
                        _ => {
                            for (j, d) in dst.chunks_exact_mut(2).enumerate() {
                                let at = |r: Option<&[u16]>| r.and_then(|r| r.get(j0 + j).copied()).unwrap_or(0);
                                d[0] = at(lo);
                                d[1] = at(hi);
                            }
                        }
                    }
                }
            }
        });
    }
}

/// A reused scratch buffer of at least `len` elements (contents unspecified): packing runs for
/// every product of every step, and fresh multi-MiB buffers cost page faults and zeroing each
/// time. Falls back to a fresh buffer if this thread's is in use (a nested product).
fn with_scratch<R>(cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<u16>>>, len: usize, f: impl FnOnce(&mut [u16]) -> R) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0u16; len]),
    })
}

thread_local! {
    static PACKED_A: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACKED_B: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows `r0..r0 + rows` of A (`rows` a multiple of 16) as `[16-row tile][k tile][16][32]`,
/// zero-padded past A's rows and k. (Inlined into the AVX-512-compiled task: whole-tile rows
/// are fixed-size copies, not `memcpy` calls.)
#[inline(always)]
fn pack_a(a: &Operand, r0: usize, rows: usize, kp: usize, out: &mut [u16]) {
    let (m, k) = (a.rows, a.cols);
    let data = bits(a.data);
    let ktiles = kp / TK;
    for rt in 0..rows / TM {
        for kt in 0..ktiles {
            let tile = &mut out[(rt * ktiles + kt) * TM * TK..][..TM * TK];
            let kb = kt * TK;
            let len = TK.min(k - kb.min(k));
            if a.transposed && len == TK && r0 + rt * TM + TM <= m {
                // A(r, c) = data[c·m + r]: a whole tile is a 32 × 16 transpose
                let rb = r0 + rt * TM;
                for p in 0..TK {
                    let src: &[u16; TM] = data[(kb + p) * m + rb..][..TM].try_into().unwrap();
                    for i in 0..TM {
                        tile[i * TK + p] = src[i];
                    }
                }
                continue;
            }
            for i in 0..TM {
                let r = r0 + rt * TM + i;
                let row = &mut tile[i * TK..][..TK];
                if r >= m {
                    row.fill(0);
                    continue;
                }
                if a.transposed {
                    // A(r, c) = data[c·m + r]
                    for (p, d) in row[..len].iter_mut().enumerate() {
                        *d = data[(kb + p) * m + r];
                    }
                } else if len == TK {
                    row.copy_from_slice(&data[r * k + kb..][..TK]);
                    continue;
                } else {
                    row[..len].copy_from_slice(&data[r * k + kb..][..len]);
                }
                row[len..].fill(0);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::*;
    use crate::model::bf16::round_bits;
    use std::arch::asm;
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

    pub(super) fn product(a: Operand, b: Operand) -> Vec<f32> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        if m == 0 || n == 0 || k == 0 {
            return vec![0f32; m * n];
        }
        // C is written whole by the tasks (every row below m, every column below n), so it is
        // not zeroed first (that memset was 3% of a bf16 table5 step).
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        let (kp, np) = (k.div_ceil(TK) * TK, n.div_ceil(BN) * BN);
        with_scratch(&PACKED_B, kp * np, |bp| {
            pack_b(&b, kp, bp);
            multiply(&a, bp, &mut c.spare_capacity_mut()[..m * n], [m, kp, n, np])
        });
        // SAFETY: `multiply` initialised all m·n elements (see `write_block`).
        unsafe { c.set_len(m * n) };
        c
    }

    /// C = A · B over the packed B, by blocks of MC rows of C (one rayon task each).
    fn multiply(a: &Operand, bp: &[u16], c: &mut [MaybeUninit<f32>], [m, kp, n, np]: [usize; 4]) {
        debug_assert_eq!(c.len(), m * n);
        c.par_chunks_mut(MC * n).enumerate().for_each(|(block, cblock)| {
            let valid_rows = cblock.len() / n;
            let rows = valid_rows.div_ceil(BM) * BM;
            // SAFETY: `request` checked AVX-512 (F, BW) before granting AMX.
            with_scratch(&PACKED_A, rows * kp, |ap| unsafe { tiles(a, block * MC, ap, bp, cblock, [rows, kp, n, np]) });
        });
    }

    /// One task: rows `r0..` of A packed into `ap`, times the packed B, into `cblock` (every
    /// element written, rounded to bf16). Compiled for AVX-512: the packing, copies and rounding
    /// inlined here vectorize.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tiles(a: &Operand, r0: usize, ap: &mut [u16], bp: &[u16], cblock: &mut [MaybeUninit<f32>], [rows, kp, n, np]: [usize; 4]) {
        let ktiles = kp / TK;
        let valid_rows = cblock.len() / n;
        pack_a(a, r0, rows, kp, ap);
        let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [64; 16], rows: [16; 16] };
        config.colsb[8..].fill(0);
        config.rows[8..].fill(0);
        let mut scratch = [[0f32; TM * TN]; 4];
        let tile_elems = TM * TK; // = TK·TN: every A and B tile is 512 bf16
        // SAFETY: the tile registers are this thread's (nothing else here uses AMX, and the
        // closure makes no rayon calls, so no other task interleaves on this thread between
        // `ldtilecfg` and `tilerelease`); every tile load reads 16 rows of 64 bytes inside
        // `ap`/`bp` (both padded to whole tiles), every store writes one 1 KiB `scratch` tile.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
            for jb in 0..np / BN {
                let b0 = bp.as_ptr().add(2 * jb * ktiles * tile_elems);
                let b1 = b0.add(ktiles * tile_elems);
                for ib in 0..rows / BM {
                    let a0 = ap.as_ptr().add(2 * ib * ktiles * tile_elems);
                    let a1 = a0.add(ktiles * tile_elems);
                    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    for kt in 0..ktiles {
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
                    asm!(
                        "tilestored [{c0} + {s}], tmm0",
                        "tilestored [{c1} + {s}], tmm1",
                        "tilestored [{c2} + {s}], tmm2",
                        "tilestored [{c3} + {s}], tmm3",
                        c0 = in(reg) scratch[0].as_mut_ptr(), c1 = in(reg) scratch[1].as_mut_ptr(),
                        c2 = in(reg) scratch[2].as_mut_ptr(), c3 = in(reg) scratch[3].as_mut_ptr(),
                        s = in(reg) 64usize, options(nostack)
                    );
                    write_block(&scratch, cblock, n, valid_rows, ib * BM, jb * BN);
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
        let round = |v: f32| f32::from_bits((round_bits(v) as u32) << 16);
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
                        d.write(round(v));
                    }
                } else {
                    for (d, &v) in c[(r0 + i) * n + c0..][..len].iter_mut().zip(src) {
                        d.write(round(v));
                    }
                }
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::*;
    pub(super) fn request() -> bool {
        false
    }
    pub(super) fn product(_: Operand, _: Operand) -> Vec<f32> {
        unreachable!("amx::available() is false off x86-64 Linux")
    }
}
