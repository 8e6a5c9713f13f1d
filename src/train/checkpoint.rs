//! Run directories and checkpoints.
//!
//! A run directory holds `config.toml` (resolved), `encoder.json`, `env.json`,
//! `metrics.jsonl` (one JSON object per epoch), `model.bpk` (burnpack: the best weights, written
//! atomically) and `result.json`.

use anyhow::{Context, Result};
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use std::path::{Path, PathBuf};

use crate::config::ExperimentConfig;
use crate::data::Encoder;
use crate::model::Model;
use crate::runtime::write_atomic;

pub const CONFIG: &str = "config.toml";
pub const ENCODER: &str = "encoder.json";
pub const MODEL: &str = "model.bpk";
pub const METRICS: &str = "metrics.jsonl";
pub const RESULT: &str = "result.json";
pub const ENV: &str = "env.json";

/// Writes the model's parameters atomically.
pub fn save_model(model: &Model, path: &Path) -> Result<()> {
    let bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .map_err(|e| anyhow::anyhow!("cannot serialize checkpoint: {e}"))?;
    write_atomic(path, &bytes)
}

/// Builds the model of `cfg` for `encoder` on `device` and loads the weights at `path`.
pub fn load_model(cfg: &ExperimentConfig, encoder: &Encoder, path: &Path, device: &Device) -> Result<Model> {
    let model = cfg.model.init_with_storage(&crate::model::DataShape::of(encoder), cfg.train.emb_storage, device);
    let record = ModuleRecord::load(path).map_err(|e| anyhow::anyhow!("cannot read checkpoint {}: {e}", path.display()))?;
    model
        .try_load_record(record)
        .map_err(|e| anyhow::anyhow!("checkpoint {} does not fit the config: {e}", path.display()))
}

/// Everything `eval`/`predict` need from a finished run.
pub struct LoadedRun {
    pub dir: PathBuf,
    pub config: ExperimentConfig,
    pub encoder: Encoder,
    pub model: Model,
}

pub fn load_run(dir: &Path, device: &Device) -> Result<LoadedRun> {
    let config = ExperimentConfig::load(&dir.join(CONFIG)).with_context(|| format!("{} is not a run directory", dir.display()))?;
    let encoder = Encoder::load(&dir.join(ENCODER))?;
    crate::model::layers::set_matmul_precision(config.train.precision);
    let model = load_model(&config, &encoder, &dir.join(MODEL), device)?;
    Ok(LoadedRun { dir: dir.to_path_buf(), config, encoder, model })
}
