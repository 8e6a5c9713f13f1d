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
    /// Decoupled weight decay on dense parameters (0 = off).
    pub weight_decay: f64,
    /// Linear warm-up of both learning rates over this many steps.
    pub warmup_steps: usize,
    /// Global L2-norm clipping of the dense gradients (0 = off).
    pub grad_clip_norm: f64,
    /// Optimizer of the embedding rows: `rowwise_adagrad` (default) or `adam` (lazy Adam on the
    /// touched rows, with `adam_beta1`/`adam_beta2`).
    pub emb_optimizer: crate::train::EmbOptimizerKind,
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
    pub seed: u64,
    /// Matrix products of the MLPs: `f32` (default) or `bf16` (mixed precision: bf16 inputs and
    /// weights, f32 accumulation, f32 master weights, optimizer state, loss and metrics).
    pub precision: crate::model::layers::Precision,
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
            seed: 2024,
            precision: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Monitor {
    #[default]
    Auc,
    Logloss,
}

impl Monitor {
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
        anyhow::ensure!(self.train.batch_size > 0 && self.train.eval_batch_size > 0, "batch sizes must be positive");
        anyhow::ensure!(self.train.epochs > 0, "train.epochs must be positive");
        anyhow::ensure!(self.train.lr > 0.0 && self.train.emb_lr > 0.0, "learning rates must be positive");
        self.model.validate()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}
