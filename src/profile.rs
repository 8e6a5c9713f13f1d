//! Where a training step's time goes: a per-thread phase clock that the trainer and the models
//! tick at phase boundaries (`mark`). Off unless a benchmark turns it on, and then one clock
//! read per mark; on an asynchronous device (GPU) it can synchronize at every mark so that each
//! phase is charged with its own work, at some cost to the total.

use burn::tensor::Device;
use std::cell::RefCell;
use std::time::Instant;

/// Phases of one training step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the loader's batch, host → device transfer of its indices and labels.
    Data,
    /// Forward: embedding-row gather, multi-hot pooling, dense-feature embeddings.
    Embedding,
    /// Forward: the interaction part (Wukong layers; the whole remaining forward for baselines).
    Interaction,
    /// Forward: the top MLP and the loss.
    Mlp,
    /// Backward pass through everything.
    Backward,
    /// Gradient clipping and Adam on the dense parameters.
    DenseOptimizer,
    /// Row-wise Adagrad on the touched embedding rows.
    SparseOptimizer,
    /// Data-parallel jobs: the all-reduce of dense gradients and the exchange of embedding rows.
    Communication,
}

/// Number of phases.
pub const PHASES: usize = 8;

impl Phase {
    pub const ALL: [Phase; PHASES] = [
        Phase::Data,
        Phase::Embedding,
        Phase::Interaction,
        Phase::Mlp,
        Phase::Backward,
        Phase::DenseOptimizer,
        Phase::SparseOptimizer,
        Phase::Communication,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::Embedding => "embedding",
            Phase::Interaction => "interaction",
            Phase::Mlp => "mlp",
            Phase::Backward => "backward",
            Phase::DenseOptimizer => "dense_optimizer",
            Phase::SparseOptimizer => "sparse_optimizer",
            Phase::Communication => "communication",
        }
    }
}

struct Clock {
    last: Instant,
    seconds: [f64; PHASES],
    sync: Option<Device>,
}

thread_local! {
    static CLOCK: RefCell<Option<Clock>> = const { RefCell::new(None) };
}

/// Starts (or restarts) this thread's phase clock with zeroed totals; `sync` makes every mark
/// wait for the device first.
pub fn enable(sync: Option<Device>) {
    CLOCK.with(|c| *c.borrow_mut() = Some(Clock { last: Instant::now(), seconds: [0.0; PHASES], sync }));
}

/// Stops the clock and returns seconds per phase (indexed like [`Phase::ALL`]).
pub fn disable() -> [f64; PHASES] {
    CLOCK.with(|c| c.borrow_mut().take().map(|c| c.seconds).unwrap_or_default())
}

/// Restarts the current interval without charging it to any phase.
pub fn restart() {
    CLOCK.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.last = Instant::now();
        }
    });
}

/// Charges the time since the previous mark to `phase`. A no-op when the clock is off.
pub fn mark(phase: Phase) {
    CLOCK.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            if let Some(d) = &c.sync {
                let _ = d.sync();
            }
            let now = Instant::now();
            c.seconds[phase as usize] += (now - c.last).as_secs_f64();
            c.last = now;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_charge_their_interval_to_their_phase() {
        mark(Phase::Data); // off: nothing recorded, no panic
        enable(None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark(Phase::Backward);
        restart();
        mark(Phase::Mlp);
        let s = disable();
        assert!(s[Phase::Backward as usize] >= 0.019, "{s:?}");
        assert!(s[Phase::Mlp as usize] < 0.01, "{s:?}");
        assert_eq!(s[Phase::Data as usize], 0.0);
        assert_eq!(disable(), [0.0; PHASES]);
    }
}
