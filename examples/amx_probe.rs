//! Register-level AMX probe (x86-64 Linux with AMX-BF16): the tile unit's peak, the 2×2 register
//! block with its four tile loads from L1, and `tileloadd` throughput by working-set size with
//! the tiles cache-line aligned and misaligned by 16 bytes (what a `Vec<u16>` from malloc gives).
//! One core: `taskset -c 0 cargo run --release --example amx_probe`. The figures behind
//! BENCHMARKS.md "AMX, second pass"; `src/model/amx.rs` is the kernel.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod probe {
    use std::arch::asm;
    use std::time::Instant;

    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// A buffer of `len` u16 starting `offset_bytes` past a cache-line boundary.
    fn buffer(len: usize, offset_bytes: usize) -> (Vec<u16>, usize) {
        let raw: Vec<u16> = (0..len + 64).map(|i| 0x3F80 + (i % 7) as u16).collect();
        let start = ((64 - raw.as_ptr() as usize % 64) % 64 + offset_bytes) / 2;
        (raw, start)
    }

    const FLOP_PER_TILE_PRODUCT: f64 = 2.0 * 16.0 * 16.0 * 32.0;

    pub fn run() {
        let ok = std::arch::is_x86_feature_detected!("avx512f")
            && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("amx_bf16"))
            // SAFETY: a plain syscall (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
            && unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023 as libc::c_long, 18 as libc::c_long) } == 0;
        if !ok {
            println!("AMX-BF16 is not available here (CPU or kernel): nothing to probe");
            return;
        }
        let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [64; 16], rows: [16; 16] };
        config.colsb[8..].fill(0);
        config.rows[8..].fill(0);
        // SAFETY: a valid palette-1 configuration of eight 16 × 64-byte tiles.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly)) };
        let iterations = 2_000_000u64;
        let (buf, start) = buffer(8 * 512, 0);
        let (a, b) = (buf[start..].as_ptr(), buf[start + 2 * 512..].as_ptr());
        let t = Instant::now();
        for _ in 0..iterations {
            // SAFETY: register-only tile products.
            unsafe {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem)
                )
            };
        }
        let peak = iterations as f64 * 4.0 * FLOP_PER_TILE_PRODUCT / t.elapsed().as_secs_f64() / 1e9;
        println!("tdpbf16ps alone (4 accumulators, no loads): {peak:.0} GFLOP/s");
        let t = Instant::now();
        for _ in 0..iterations {
            // SAFETY: four 1 KiB tile loads inside `buf`, then four products.
            unsafe {
                asm!(
                    "tileloadd tmm4, [{a} + {s}]",
                    "tileloadd tmm5, [{a} + {s} + 1024]",
                    "tileloadd tmm6, [{b} + {s}]",
                    "tileloadd tmm7, [{b} + {s} + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a = in(reg) a, b = in(reg) b, s = in(reg) 64usize, options(nostack, readonly)
                )
            };
        }
        let block = iterations as f64 * 4.0 * FLOP_PER_TILE_PRODUCT / t.elapsed().as_secs_f64() / 1e9;
        println!("2×2 register block, 4 aligned tile loads from L1 per 4 products: {block:.0} GFLOP/s");
        println!("\ntileloadd throughput, bytes per ns (streaming through the working set):");
        println!("| working set | aligned | 16 bytes off a cache line |\n|---|---|---|");
        for kib in [16usize, 128, 1024, 8192] {
            let rate = |offset: usize| {
                let (buf, start) = buffer(kib * 512, offset);
                let tiles = kib; // 1 KiB each
                let reps = (1usize << 30) / (kib * 1024);
                let t = Instant::now();
                for _ in 0..reps {
                    let mut p = buf[start..].as_ptr();
                    for _ in 0..tiles / 4 {
                        // SAFETY: four consecutive 1 KiB tiles inside `buf`.
                        unsafe {
                            asm!(
                                "tileloadd tmm4, [{p} + {s}]",
                                "tileloadd tmm5, [{p} + {s} + 1024]",
                                "tileloadd tmm6, [{p} + {s} + 2048]",
                                "tileloadd tmm7, [{p} + {s} + 3072]",
                                p = in(reg) p, s = in(reg) 64usize, options(nostack, readonly)
                            );
                            p = p.add(2048);
                        }
                    }
                }
                (reps * kib * 1024) as f64 / t.elapsed().as_secs_f64() / 1e9
            };
            println!("| {kib} KiB | {:.0} | {:.0} |", rate(0), rate(16));
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

fn main() {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    probe::run();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    println!("the AMX probe needs x86-64 Linux");
}
