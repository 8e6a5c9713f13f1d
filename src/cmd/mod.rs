//! One module per `wukong` command: its arguments (`Args`) and what it does (`run`). Shared
//! flags and parsers live here.

pub mod bench;
pub mod cache;
pub mod compare;
pub mod eval;
pub mod flops;
pub mod gen_criteo;
pub mod gen_world;
pub mod report;
pub mod scale;
pub mod serve;
pub mod train;
pub mod tune;

use anyhow::Result;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use wukong::config::ExperimentConfig;
use wukong::data::SplitData;
use wukong::train::checkpoint;

/// Overrides of the config's data files.
#[derive(clap::Args)]
pub struct SplitPaths {
    #[arg(long)]
    pub train: Option<PathBuf>,
    #[arg(long)]
    pub valid: Option<PathBuf>,
    #[arg(long)]
    pub test: Option<PathBuf>,
}

impl SplitPaths {
    pub fn is_empty(&self) -> bool {
        self.train.is_none() && self.valid.is_none() && self.test.is_none()
    }

    pub fn apply(self, cfg: &mut ExperimentConfig) {
        if let Some(p) = self.train {
            cfg.data.train = p
        }
        if let Some(p) = self.valid {
            cfg.data.valid = Some(p)
        }
        if let Some(p) = self.test {
            cfg.data.test = Some(p)
        }
    }
}

/// How stale data caches are treated (default: rebuilt, with a line saying why).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct CacheFlags {
    /// Rebuild every data cache, current or not.
    #[arg(long, conflicts_with = "no_rebuild_cache")]
    pub rebuild_cache: bool,
    /// Refuse a stale data cache instead of rebuilding it.
    #[arg(long)]
    pub no_rebuild_cache: bool,
}

impl CacheFlags {
    pub fn policy(self) -> wukong::data::CachePolicy {
        use wukong::data::CachePolicy::*;
        match (self.rebuild_cache, self.no_rebuild_cache) {
            (true, _) => RebuildAll,
            (_, true) => RefuseStale,
            _ => RebuildStale,
        }
    }
}

/// Loads a run directory and encodes `data` (default: the run's test split) with its saved
/// encoder (unseen values → OOV or their hash bucket).
pub fn load_run_and_data(run: &Path, data: Option<PathBuf>, device: &str) -> Result<(Device, checkpoint::LoadedRun, SplitData)> {
    let dev = wukong::runtime::parse_device(device)?;
    let loaded = checkpoint::load_run(run, &dev)?;
    let split = loaded.encode(data)?;
    Ok((dev, loaded, split))
}

pub fn parse_precision(s: &str) -> std::result::Result<wukong::model::layers::Precision, String> {
    match s {
        "f32" => Ok(wukong::model::layers::Precision::F32),
        "bf16" => Ok(wukong::model::layers::Precision::Bf16),
        other => Err(format!("unknown precision {other:?} (expected f32 or bf16)")),
    }
}

pub fn parse_storage(s: &str) -> std::result::Result<wukong::model::TableStorage, String> {
    match s {
        "f32" => Ok(wukong::model::TableStorage::F32),
        "f16" => Ok(wukong::model::TableStorage::F16),
        "bf16" => Ok(wukong::model::TableStorage::Bf16),
        other => Err(format!("unknown table storage {other:?} (expected f32, f16 or bf16)")),
    }
}
