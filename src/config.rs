//! Experiment configs: one TOML file per experiment under `configs/`, with `[data]`, `[model]`
//! (the registry: `name = "wukong"` plus that model's keys) and `[train]` tables.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::data::schema::DataConfig;
use crate::model::ModelConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Experiment id; names the run directory.
    pub name: String,
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    /// A published result to compare with (shown by `wukong compare`).
    pub reference: Option<Reference>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub test_auc: f64,
    /// Where the number comes from, e.g. "BARS Frappe_x1".
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Adam learning rate for dense parameters.
    pub lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// L2 weight decay on dense parameters: `weight_decay · θ` added to the (clipped) gradient
    /// before Adam's moments, as PyTorch's `Adam(weight_decay=…)` (not AdamW's decoupled decay); 0 = off.
    pub weight_decay: f64,
    /// Linear warm-up of both learning rates over this many steps …
    pub warmup_steps: usize,
    /// … or, when > 0, over this fraction of the planned steps (epochs × batches per epoch; the
    /// paper warms up over the first 10%). Evaluations inside the warm-up do not count against
    /// `patience` (a small data set must not stop before its learning rate is even set).
    pub warmup_fraction: f64,
    /// Global L2-norm clipping of the dense gradients (0 = off).
    pub grad_clip_norm: f64,
    /// Optimizer of the embedding rows: `rowwise_adagrad` (default) or `adam` (lazy Adam on the
    /// touched rows, with `adam_beta1`/`adam_beta2`).
    pub emb_optimizer: EmbOptimizerKind,
    /// Learning rate of the embedding optimizer.
    pub emb_lr: f64,
    pub emb_epsilon: f64,
    pub emb_initial_accumulator: f64,
    /// L2 on the embedding rows a batch touched (added to their gradient).
    pub emb_l2: f64,
    /// How the table's values are stored: `f32` (default), `f16` or `bf16` (half the memory;
    /// lookups and updates compute in f32 and write back with stochastic rounding).
    pub emb_storage: crate::model::TableStorage,
    /// Validation metric that selects the best epoch and drives early stopping: `auc`
    /// (default) or `logloss`.
    pub monitor: Monitor,
    /// Early stopping: epochs without improvement of the monitored metric before stopping.
    pub patience: usize,
    /// Multiply both learning rates by this when the monitored metric does not improve (1 = off).
    pub plateau_lr_factor: f64,
    /// The plateau rule never takes the learning rates below this fraction of their base values
    /// (PyTorch's `ReduceLROnPlateau(min_lr=…)`, as a fraction); 0 (default) = no floor. With
    /// `plateau_lr_factor = 0.1` and a floor of 0.1 the rates are cut once and training goes on at
    /// a tenth of them until `patience` stops it.
    pub plateau_min_lr_scale: f64,
    /// A fixed step schedule beside the plateau rule (PyTorch's `MultiStepLR`): after each of
    /// these epochs (1-based, counted at the end-of-epoch evaluation) both learning rates are
    /// multiplied by `lr_milestone_factor`. Empty (default) = none. Not bounded by
    /// `plateau_min_lr_scale`; set `plateau_lr_factor = 1` for the step schedule alone.
    pub lr_milestones: Vec<usize>,
    pub lr_milestone_factor: f64,
    /// Weight averaging (stochastic weight averaging taken at evaluation points): from the
    /// evaluation at the end of this epoch (1-based) on, every evaluation folds the present
    /// weights into a running mean, and the mean is what is evaluated, selected (patience, the
    /// plateau rule and the median rule see its metrics) and saved as the best weights; training
    /// itself goes on from the raw weights. 0 (default) = off. Costs one f32 copy of every
    /// parameter, the embedding table included, in memory and in each checkpoint. Not with batch
    /// norm (its running statistics belong to the raw weights) nor in data-parallel jobs.
    pub average_from_epoch: usize,
    pub seed: u64,
    /// Matrix products of the MLPs: `f32` (default) or `bf16` (mixed precision: bf16 inputs and
    /// weights, f32 accumulation, f32 master weights, optimizer state, loss and metrics).
    pub precision: crate::model::layers::Precision,
    /// Also evaluate (and checkpoint) every this many optimizer steps inside an epoch (0 = only
    /// at the end of each epoch). Patience and the plateau factor then count evaluations.
    pub eval_every_steps: usize,
    /// Write a full-state checkpoint every this many steps (0 = off) …
    pub checkpoint_every_steps: usize,
    /// … and/or when this many seconds passed since the last one (0 = off). Checkpoints are
    /// also written at the start, at every evaluation and at the end.
    pub checkpoint_every_secs: f64,
    /// Checkpoints kept in `<run>/checkpoints` (the newest ones).
    pub keep_checkpoints: usize,
    /// Loss-explosion guard: `rollback` (default), `fail` or `off`.
    pub guard: GuardPolicy,
    /// A loss spike is a loss above this × its running mean (0 = only non-finite values are
    /// anomalies) …
    pub guard_spike_factor: f64,
    /// … and above the running mean + this × its running standard deviation …
    pub guard_spike_sigma: f64,
    /// … and at least this much (in nats of mean log-loss) above the running mean: a nearly
    /// memorized training set (mean 0.0006, std 0.0007) trips both relative rules on a harmless
    /// 0.005 batch, and three such rollbacks would end a run.
    pub guard_spike_min_excess: f64,
    /// Memory of the loss's running statistics, in steps.
    pub guard_window: usize,
    /// Steps observed before spikes are checked.
    pub guard_min_steps: usize,
    /// Rollbacks before the run gives up with an error.
    pub guard_max_rollbacks: usize,
    /// Both learning rates are multiplied by this at every rollback.
    pub guard_lr_factor: f64,
    /// Data-parallel jobs (`mpirun -n N wukong train`, feature `mpi`): how the embedding table
    /// lives on the ranks — `replicated` (every rank holds it all).
    pub embedding_sharding: crate::dist::EmbeddingMode,
    /// Data-parallel jobs: compare the replicas' weight checksums every this many steps (and at
    /// every checkpoint); a difference stops the job. 0 = only at checkpoints.
    pub replica_check_every_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 4096,
            eval_batch_size: 8192,
            lr: 1e-3,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 100,
            warmup_fraction: 0.0,
            grad_clip_norm: 10.0,
            emb_optimizer: Default::default(),
            emb_lr: 0.05,
            emb_epsilon: 1e-8,
            emb_initial_accumulator: 0.0,
            emb_l2: 0.0,
            emb_storage: Default::default(),
            monitor: Monitor::Auc,
            patience: 2,
            plateau_lr_factor: 0.1,
            plateau_min_lr_scale: 0.0,
            lr_milestones: Vec::new(),
            lr_milestone_factor: 0.1,
            average_from_epoch: 0,
            seed: 2024,
            precision: Default::default(),
            eval_every_steps: 0,
            checkpoint_every_steps: 0,
            checkpoint_every_secs: 300.0,
            keep_checkpoints: 3,
            guard: Default::default(),
            guard_spike_factor: 3.0,
            guard_spike_sigma: 6.0,
            guard_spike_min_excess: 0.1,
            guard_window: 100,
            guard_min_steps: 100,
            guard_max_rollbacks: 3,
            guard_lr_factor: 0.5,
            embedding_sharding: Default::default(),
            replica_check_every_steps: 100,
        }
    }
}

/// Range checks shared by every config section: each error names the key and the allowed range.
pub mod check {
    use anyhow::{Result, ensure};

    /// An integer in `[lo, hi]`.
    pub fn int(key: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
        ensure!((lo..=hi).contains(&v), "{key} = {v} is out of range: allowed {lo} ..= {hi}");
        Ok(())
    }

    /// A finite number in `[lo, hi]`.
    pub fn num(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
        ensure!(v.is_finite() && v >= lo && v <= hi, "{key} = {v} is out of range: allowed {lo} ..= {hi}");
        Ok(())
    }

    /// A finite number in `(lo, hi]` (strictly above `lo`).
    pub fn above(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
        ensure!(v.is_finite() && v > lo && v <= hi, "{key} = {v} is out of range: allowed > {lo} and ≤ {hi}");
        Ok(())
    }

    /// Every entry of a width list in `[1, hi]`.
    pub fn widths(key: &str, v: &[usize], hi: usize) -> Result<()> {
        for (i, &w) in v.iter().enumerate() {
            ensure!((1..=hi).contains(&w), "{key}[{i}] = {w} is out of range: widths must be 1 ..= {hi}");
        }
        Ok(())
    }

    /// A dropout probability in `[0, 1)`.
    pub fn prob(key: &str, v: f64) -> Result<()> {
        ensure!(v.is_finite() && (0.0..1.0).contains(&v), "{key} = {v} is out of range: allowed 0 ≤ p < 1");
        Ok(())
    }

    /// Layer widths and embedding dimensions: large enough for any real model on one machine,
    /// small enough that an absurd value is refused instead of attempting the allocation.
    pub const MAX_WIDTH: usize = 1 << 16;
    /// Counts of layers, blocks, heads.
    pub const MAX_COUNT: usize = 1 << 10;
}

impl TrainConfig {
    /// Every key against its range.
    pub fn validate(&self) -> Result<()> {
        use check::*;
        int("train.epochs", self.epochs, 1, 1_000_000)?;
        int("train.batch_size", self.batch_size, 1, 1 << 24)?;
        int("train.eval_batch_size", self.eval_batch_size, 1, 1 << 24)?;
        above("train.lr", self.lr, 0.0, 1e3)?;
        above("train.emb_lr", self.emb_lr, 0.0, 1e3)?;
        num("train.adam_beta1", self.adam_beta1, 0.0, 0.999_999)?;
        num("train.adam_beta2", self.adam_beta2, 0.0, 0.999_999_999)?;
        above("train.adam_epsilon", self.adam_epsilon, 0.0, 1.0)?;
        num("train.weight_decay", self.weight_decay, 0.0, 1.0)?;
        int("train.warmup_steps", self.warmup_steps, 0, 1 << 40)?;
        num("train.warmup_fraction", self.warmup_fraction, 0.0, 1.0)?;
        num("train.grad_clip_norm", self.grad_clip_norm, 0.0, 1e12)?;
        above("train.emb_epsilon", self.emb_epsilon, 0.0, 1.0)?;
        num("train.emb_initial_accumulator", self.emb_initial_accumulator, 0.0, 1e12)?;
        num("train.emb_l2", self.emb_l2, 0.0, 1e3)?;
        int("train.patience", self.patience, 0, 1_000_000)?;
        above("train.plateau_lr_factor", self.plateau_lr_factor, 0.0, 1.0)?;
        num("train.plateau_min_lr_scale", self.plateau_min_lr_scale, 0.0, 1.0)?;
        above("train.lr_milestone_factor", self.lr_milestone_factor, 0.0, 1.0)?;
        if self.lr_milestones.first() == Some(&0) || self.lr_milestones.windows(2).any(|w| w[0] >= w[1]) {
            anyhow::bail!("train.lr_milestones must be increasing epoch numbers from 1, got {:?}", self.lr_milestones);
        }
        int("train.eval_every_steps", self.eval_every_steps, 0, 1 << 40)?;
        int("train.average_from_epoch", self.average_from_epoch, 0, 1 << 20)?;
        int("train.checkpoint_every_steps", self.checkpoint_every_steps, 0, 1 << 40)?;
        num("train.checkpoint_every_secs", self.checkpoint_every_secs, 0.0, 1e9)?;
        int("train.keep_checkpoints", self.keep_checkpoints, 1, 1000)?;
        num("train.guard_spike_factor", self.guard_spike_factor, 0.0, 1e6)?;
        num("train.guard_spike_sigma", self.guard_spike_sigma, 0.0, 1e6)?;
        num("train.guard_spike_min_excess", self.guard_spike_min_excess, 0.0, 1e6)?;
        int("train.guard_window", self.guard_window, 1, 1 << 30)?;
        int("train.guard_min_steps", self.guard_min_steps, 0, 1 << 40)?;
        int("train.guard_max_rollbacks", self.guard_max_rollbacks, 0, 1_000_000)?;
        above("train.guard_lr_factor", self.guard_lr_factor, 0.0, 1.0)?;
        Ok(())
    }
}

/// `[train] guard`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GuardPolicy {
    /// Restore the newest checkpoint, skip the batches from it to the anomaly, scale the learning
    /// rates by `guard_lr_factor`; give up after `guard_max_rollbacks`.
    #[default]
    Rollback,
    /// Stop with an error naming the step and the values.
    Fail,
    /// No checks (a NaN flows into the optimizer).
    Off,
}

/// Which optimizer updates the embedding rows (`[train] emb_optimizer`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmbOptimizerKind {
    /// Row-wise Adagrad (the paper's, DLRM's): one accumulator per row (per packed segment).
    #[default]
    RowwiseAdagrad,
    /// Lazy Adam on touched rows (what BARS/FuxiCTR baselines are tuned with, there dense).
    Adam,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Monitor {
    #[default]
    Auc,
    Logloss,
}

impl Monitor {
    /// Its validation value's key in a run's `result.json` and `metrics.jsonl`.
    pub fn key(self) -> &'static str {
        match self {
            Monitor::Auc => "valid_auc",
            Monitor::Logloss => "valid_logloss",
        }
    }

    /// The metric this one is not.
    pub fn other(self) -> Self {
        match self {
            Monitor::Auc => Monitor::Logloss,
            Monitor::Logloss => Monitor::Auc,
        }
    }

    /// The metric as a score where larger is better.
    pub fn score(self, m: &crate::metrics::Metrics) -> f64 {
        match self {
            Monitor::Auc => m.auc,
            Monitor::Logloss => -m.logloss,
        }
    }
}

impl ExperimentConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.train.validate()?;
        self.model.validate()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}
