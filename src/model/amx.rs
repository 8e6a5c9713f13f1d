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
/// `kp × np`: the k tiles of one column tile are consecutive 1 KiB tiles.
fn pack_b(b: &Operand, kp: usize, np: usize) -> Vec<u16> {
    let (k, n) = (b.rows, b.cols);
    let panel = kp * TN;
    let data = bits(b.data);
    let mut out = vec![0u16; kp * np];
    if b.transposed {
        // B(r, c) = data[c·k + r]: one column's k-pairs are adjacent in memory.
        out.par_chunks_mut(panel).enumerate().for_each(|(jt, panel)| {
            for j in 0..TN.min(n.saturating_sub(jt * TN)) {
                for (p, &v) in data[(jt * TN + j) * k..][..k].iter().enumerate() {
                    let (kt, r) = (p / TK, p % TK);
                    panel[kt * TK * TN + (r / 2) * 2 * TN + 2 * j + r % 2] = v;
                }
            }
        });
    } else {
        // B(r, c) = data[r·n + c]: two rows at a time, contiguous in c; a k tile writes 1 KiB
        // into every column tile's panel, so the tasks (one per k tile) write disjoint ranges.
        let rows: Vec<&[u16]> = (0..k).map(|r| &data[r * n..][..n]).collect();
        let mut tiles: Vec<Vec<&mut [u16]>> = (0..kp / TK).map(|_| Vec::new()).collect();
        for panel in out.chunks_mut(panel) {
            for (kt, tile) in panel.chunks_mut(TK * TN).enumerate() {
                tiles[kt].push(tile);
            }
        }
        tiles.into_par_iter().enumerate().for_each(|(kt, mut column_tiles)| {
            for pair in 0..TK / 2 {
                let k0 = kt * TK + 2 * pair;
                if k0 >= k {
                    break;
                }
                let (lo, hi) = (rows[k0], rows.get(k0 + 1).copied());
                for (jt, tile) in column_tiles.iter_mut().enumerate() {
                    let j0 = jt * TN;
                    let dst = &mut tile[pair * 2 * TN..][..2 * TN];
                    for j in 0..TN.min(n.saturating_sub(j0)) {
                        dst[2 * j] = lo[j0 + j];
                        dst[2 * j + 1] = hi.map_or(0, |h| h[j0 + j]);
                    }
                }
            }
        });
    }
    out
}

/// Rows `r0..r0 + rows` of A (`rows` a multiple of 16) as `[16-row tile][k tile][16][32]`,
/// zero-padded past A's rows and k.
fn pack_a(a: &Operand, r0: usize, rows: usize, kp: usize, out: &mut [u16]) {
    let (m, k) = (a.rows, a.cols);
    let data = bits(a.data);
    let ktiles = kp / TK;
    for rt in 0..rows / TM {
        for kt in 0..ktiles {
            let tile = &mut out[(rt * ktiles + kt) * TM * TK..][..TM * TK];
            let kb = kt * TK;
            let len = TK.min(k - kb.min(k));
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
    use std::arch::asm;

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
            && crate::runtime::cpu_flag("amx_bf16")
            && crate::runtime::cpu_flag("amx_tile")
            // SAFETY: a plain syscall with integer arguments.
            && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
    }

    pub(super) fn product(a: Operand, b: Operand) -> Vec<f32> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut c = vec![0f32; m * n];
        if m == 0 || n == 0 || k == 0 {
            return c;
        }
        let (kp, np) = (k.div_ceil(TK) * TK, n.div_ceil(BN) * BN);
        let ktiles = kp / TK;
        let bp = pack_b(&b, kp, np);
        c.par_chunks_mut(MC * n).enumerate().for_each(|(block, cblock)| {
            let valid_rows = cblock.len() / n;
            let rows = valid_rows.div_ceil(BM) * BM;
            let mut ap = vec![0u16; rows * kp];
            pack_a(&a, block * MC, rows, kp, &mut ap);
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
        });
        c
    }

    /// The 2×2 tiles of one register block into C (rows `i0..`, columns `j0..`), each value
    /// rounded to bf16 like every other bf16 product here; parts past C's edge are dropped.
    fn write_block(scratch: &[[f32; TM * TN]; 4], c: &mut [f32], n: usize, valid_rows: usize, i0: usize, j0: usize) {
        for (t, tile) in scratch.iter().enumerate() {
            let (r0, c0) = (i0 + (t / 2) * TM, j0 + (t % 2) * TN);
            if c0 >= n {
                continue;
            }
            let len = TN.min(n - c0);
            for i in 0..TM.min(valid_rows.saturating_sub(r0)) {
                let dst = &mut c[(r0 + i) * n + c0..][..len];
                for (d, s) in dst.iter_mut().zip(&tile[i * TN..]) {
                    *d = bf16::from_f32(*s).to_f32();
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
