//! Element-wise loops compiled for the widest vector instructions the CPU has, chosen at run time.
//!
//! The crate is built for the default x86-64 target, whose vectors are SSE2's 4 lanes; the
//! memory-bound loops (the fused Adam, LayerNorm, bf16 rounding) are written plainly so that they
//! vectorize, and compiled again here with AVX2 and AVX-512 enabled. A loop is a [`Wide`] whose
//! `run` is `#[inline(always)]`, so that each of [`run_on`]'s wrappers compiles its own copy
//! with its features. The loops avoid anything that rounds differently by width (no mul+add is
//! contracted into an FMA without fast-math, and their sums use a fixed number of accumulators),
//! so every instruction set gives the same bits (tested per loop).

/// A loop to compile once per instruction set. Mark `run` `#[inline(always)]`.
pub trait Wide {
    type Output;
    fn run(self) -> Self::Output;
}

/// An instruction set a [`Wide`] loop can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// The default target (SSE2 on x86-64; whatever the target has elsewhere).
    Baseline,
    Avx2,
    /// AVX-512 F and BW.
    Avx512,
}

impl Isa {
    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            Isa::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest this CPU runs.
    pub fn widest() -> Isa {
        static WIDEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.available()).unwrap_or(Isa::Baseline))
    }
}

/// Runs `job` compiled for the widest instruction set this CPU has.
pub fn run<W: Wide>(job: W) -> W::Output {
    run_on(Isa::widest(), job).expect("the widest instruction set is available")
}

/// Runs `job` compiled for `isa`; None where this CPU lacks it (tests compare the paths).
pub fn run_on<W: Wide>(isa: Isa, job: W) -> Option<W::Output> {
    if !isa.available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): the CPU has the features the wrapper was compiled for (checked above).
        match isa {
            Isa::Avx512 => return Some(unsafe { x86::avx512(job) }),
            Isa::Avx2 => return Some(unsafe { x86::avx2(job) }),
            Isa::Baseline => {}
        }
    }
    Some(job.run())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Wide;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn avx512<W: Wide>(job: W) -> W::Output {
        job.run()
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn avx2<W: Wide>(job: W) -> W::Output {
        job.run()
    }
}
