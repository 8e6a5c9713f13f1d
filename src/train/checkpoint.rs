//! Run directories and checkpoints.
//!
//! A run directory holds `config.toml` (resolved), `encoder.json`, `env.json`,
//! `metrics.jsonl` (one JSON object per evaluation), `model.bpk` (burnpack: the best weights),
//! `result.json`, and `checkpoints/ckpt-<step>.wkc`: the full training state, from which
//! `wukong train --resume DIR` continues exactly.
//!
//! A checkpoint file is `WUKONGCK`, a format version (u32 LE), the manifest length (u64 LE), the
//! manifest (JSON: the trainer's state and the list of sections with their lengths), the
//! sections' bytes one after another, and a trailer: the CRC-32 of everything before it (u32 LE)
//! and `END!`. Files are written to a temporary name, fsynced, renamed and the directory fsynced,
//! so a crash leaves either the old set of checkpoints or the new one; a torn or corrupted file
//! fails its length or CRC check and is refused with the reason, and the previous one is used.

use anyhow::{Context, Result, bail, ensure};
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use serde::{Deserialize, Serialize};
use std::io::Write;
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
/// Best weights by the validation metric `monitor` does not select on.
pub const MODEL_OTHER: &str = "model-other.bpk";
/// Predicted against observed positive rate per decile of the test predictions (best weights).
pub const RELIABILITY: &str = "reliability.csv";
pub const ENV: &str = "env.json";
pub const CHECKPOINTS: &str = "checkpoints";

const MAGIC: &[u8; 8] = b"WUKONGCK";
const TRAILER: &[u8; 4] = b"END!";
const VERSION: u32 = 1;

/// Writes the model's parameters atomically and durably.
pub fn save_model(model: &Model, path: &Path) -> Result<()> {
    write_atomic(path, &model_bytes(model)?)
}

/// The model's parameters (and batch-norm statistics) as burnpack bytes, parameter ids included
/// (the dense optimizer's state is keyed by them).
pub fn model_bytes(model: &Model) -> Result<Vec<u8>> {
    sync_running_stats(model);
    let bytes = model.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("cannot serialize the model: {e}"))?;
    Ok(bytes.to_vec())
}

/// Folds pending batch-norm statistic updates into their values. burn's `RunningState` keeps the
/// last update aside until the next forward (or `valid()`) merges it, and records read the
/// merged value only: without this a checkpoint would hold statistics one step old. Merging
/// early is what the next forward does anyway, so it does not change the run.
fn sync_running_stats(model: &Model) {
    let _ = model.valid();
}

/// Loads burnpack bytes into `model` (built from the same config and data shape).
pub fn load_model_bytes(model: Model, bytes: Vec<u8>, what: &str) -> Result<Model> {
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| anyhow::anyhow!("cannot read {what}: {e}"))?;
    model.try_load_record(record).map_err(|e| anyhow::anyhow!("{what} does not fit the config: {e}"))
}

/// The directory of rank `rank`'s own files in a job with a row-sharded table (its part of the
/// table in `model.bpk`/`model-other.bpk` and its checkpoints).
pub fn shard_dir(run_dir: &Path, rank: usize, ranks: usize) -> PathBuf {
    run_dir.join("shards").join(format!("rank{rank}-of-{ranks}"))
}

/// [`load_model`] for rank `rank` of a job with a row-sharded table: the model with that rank's
/// part of the table, weights from its own file.
pub fn load_model_shard(
    cfg: &ExperimentConfig,
    encoder: &Encoder,
    path: &Path,
    device: &Device,
    rank: usize,
    ranks: usize,
) -> Result<Model> {
    let model = cfg.model.init_shard(&crate::model::DataShape::of(encoder), cfg.train.emb_storage, rank, ranks, device);
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    load_model_bytes(model, bytes, &format!("checkpoint {}", path.display()))
}

/// Builds the model of `cfg` for `encoder` on `device` and loads the weights at `path`.
pub fn load_model(cfg: &ExperimentConfig, encoder: &Encoder, path: &Path, device: &Device) -> Result<Model> {
    let model = cfg.model.init_with_storage(&crate::model::DataShape::of(encoder), cfg.train.emb_storage, device);
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    load_model_bytes(model, bytes, &format!("checkpoint {}", path.display()))
}

/// CRC-32 of every parameter's values in module order (hex): equal digests mean equal weights,
/// whatever the parameter ids (they are random per process).
pub fn weights_digest(model: &Model) -> Result<String> {
    struct Digest(crc32fast::Hasher);
    impl burn::module::ModuleVisitor for Digest {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            let data = param.val().into_data();
            for d in data.shape().iter() {
                self.0.update(&(*d as u64).to_le_bytes());
            }
            self.0.update(data.as_bytes());
        }
    }
    sync_running_stats(model);
    let mut d = Digest(crc32fast::Hasher::new());
    model.visit(&mut d);
    Ok(format!("{:08x}", d.0.finalize()))
}

/// Everything `eval`/`predict` need from a finished run.
pub struct LoadedRun {
    pub dir: PathBuf,
    pub config: ExperimentConfig,
    pub encoder: Encoder,
    pub model: Model,
}

impl LoadedRun {
    /// Logits of every example of `split`, in file order, with the run's batch size and precision.
    pub fn predict_logits(&self, split: &crate::data::SplitData, device: &Device) -> Result<Vec<f32>> {
        let t = &self.config.train;
        super::predict_logits(&self.model, split, &self.encoder, t.eval_batch_size, t.precision, device)
    }

    /// AUC and LogLoss on `split` (labelled, in memory).
    pub fn evaluate(&self, split: &crate::data::SplitData, device: &Device) -> Result<crate::metrics::Metrics> {
        let t = &self.config.train;
        super::evaluate(&self.model, split, &self.encoder, t.eval_batch_size, t.precision, device)
    }

    /// A labelled file encoded with the run's saved encoder: `data`, or else the run's test split.
    pub fn encode(&self, data: Option<PathBuf>) -> Result<crate::data::SplitData> {
        use crate::data::pipeline;
        if data.is_none() && self.config.data.format == crate::data::schema::Format::Synthetic {
            // the run's held-out test stream, regenerated (or its validation stream when it has none)
            use crate::data::world::{TEST_STREAM, VALID_STREAM, World};
            let w = self.config.data.world();
            let (stream, rows) = if w.test_examples > 0 { (TEST_STREAM, w.test_examples) } else { (VALID_STREAM, w.valid_examples) };
            return Ok(pipeline::world_split(&World::new(&w)?, stream, rows).0);
        }
        let src = match data {
            Some(path) => pipeline::SplitSource { name: "data", path, part: None },
            None => pipeline::split_sources(&self.config.data)
                .into_iter()
                .find(|s| s.name == "test")
                .context("the run's config has no test split: give --data")?,
        };
        let (enc, log) = pipeline::encode_in_memory(&self.config.data, &src, &self.encoder)?;
        tracing::info!("{}: {} rows, {} skipped, {} values out of vocabulary", src.path.display(), log.rows, log.skipped, log.oov);
        Ok(crate::data::SplitData::Memory(std::sync::Arc::new(enc)))
    }
}

/// The config a run directory was trained with (its `config.toml`).
pub fn saved_config(dir: &Path) -> Result<ExperimentConfig> {
    ExperimentConfig::load(&dir.join(CONFIG)).with_context(|| format!("{} is not a run directory", dir.display()))
}

pub fn load_run(dir: &Path, device: &Device) -> Result<LoadedRun> {
    let config = saved_config(dir)?;
    let encoder = Encoder::load(&dir.join(ENCODER))?;
    let model = load_model(&config, &encoder, &dir.join(MODEL), device)?;
    Ok(LoadedRun { dir: dir.to_path_buf(), config, encoder, model })
}

/// One checkpoint: the trainer's state (JSON) and named binary sections (model, optimizers).
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    pub state: serde_json::Value,
    pub sections: Vec<(String, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    state: serde_json::Value,
    /// (name, byte length) in file order.
    sections: Vec<(String, u64)>,
}

impl Checkpoint {
    pub fn section(&self, name: &str) -> Result<&[u8]> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
            .with_context(|| format!("the checkpoint has no {name:?} section"))
    }

    pub fn take_section(&mut self, name: &str) -> Result<Vec<u8>> {
        let i = self.sections.iter().position(|(n, _)| n == name).with_context(|| format!("the checkpoint has no {name:?} section"))?;
        Ok(self.sections.swap_remove(i).1)
    }

    /// Serialises into `w` (header, sections, trailer with the CRC of all of it). `midway` is
    /// called after the first half of the sections (fault injection: a crash during a write).
    fn write_to<W: Write>(&self, w: &mut W, midway: &mut dyn FnMut(&mut W)) -> Result<()> {
        let manifest =
            Manifest { state: self.state.clone(), sections: self.sections.iter().map(|(n, b)| (n.clone(), b.len() as u64)).collect() };
        let manifest = serde_json::to_vec(&manifest)?;
        let mut crc = crc32fast::Hasher::new();
        let head: [&[u8]; 4] = [MAGIC, &VERSION.to_le_bytes(), &(manifest.len() as u64).to_le_bytes(), &manifest];
        for bytes in head {
            crc.update(bytes);
            w.write_all(bytes)?;
        }
        for (i, (_, bytes)) in self.sections.iter().enumerate() {
            if i == self.sections.len() / 2 {
                midway(w);
            }
            crc.update(bytes);
            w.write_all(bytes)?;
        }
        w.write_all(&crc.finalize().to_le_bytes())?;
        w.write_all(TRAILER)?;
        Ok(())
    }

    /// Parses and verifies a whole checkpoint file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let n = bytes.len();
        ensure!(n >= 8 + 4 + 8 + 8, "too short ({n} bytes) to be a checkpoint");
        ensure!(&bytes[..8] == MAGIC, "not a checkpoint (bad magic)");
        ensure!(&bytes[n - 4..] == TRAILER, "truncated: the end marker is missing ({n} bytes)");
        let stored = u32::from_le_bytes(bytes[n - 8..n - 4].try_into()?);
        let actual = crc32fast::hash(&bytes[..n - 8]);
        ensure!(stored == actual, "corrupted: CRC-32 {actual:08x} does not match the stored {stored:08x}");
        let version = u32::from_le_bytes(bytes[8..12].try_into()?);
        ensure!(version == VERSION, "checkpoint format version {version}, this build reads {VERSION}");
        let mlen = u64::from_le_bytes(bytes[12..20].try_into()?) as usize;
        let body = &bytes[20..n - 8];
        ensure!(mlen <= body.len(), "manifest length {mlen} exceeds the file");
        let manifest: Manifest = serde_json::from_slice(&body[..mlen]).context("bad manifest")?;
        let mut at = mlen;
        let mut sections = Vec::with_capacity(manifest.sections.len());
        for (name, len) in manifest.sections {
            let len = usize::try_from(len)?;
            ensure!(at + len <= body.len(), "section {name:?} runs past the end of the file");
            sections.push((name, body[at..at + len].to_vec()));
            at += len;
        }
        ensure!(at == body.len(), "{} unexplained bytes after the sections", body.len() - at);
        Ok(Self { state: manifest.state, sections })
    }
}

/// Fault injection for tests (`WUKONG_FAULT`): what should go wrong, and when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Abort the process (no unwinding, like `kill -9`) after this optimizer step.
    pub abort_at_step: Option<u64>,
    /// Abort halfway through writing the N-th checkpoint of this process (1-based).
    pub abort_in_checkpoint: Option<usize>,
    /// Give the batch of this step NaN labels (a non-finite loss).
    pub nan_at_step: Option<u64>,
    /// Flip the labels of the batches of these steps (a loss spike).
    pub spike_at_steps: Option<(u64, u64)>,
    /// The training loader reports a read error at this batch of the first epoch it runs.
    pub loader_error_at_batch: Option<usize>,
    /// Data-parallel jobs: the faults fire on this rank only (default: on every rank).
    pub only_rank: Option<usize>,
    /// After this step, change one embedding row of this process's model (replicas diverge).
    pub diverge_at_step: Option<u64>,
}

impl Faults {
    /// Parses `abort-at-step:N,abort-in-checkpoint:N,nan-at-step:N,spike-at-steps:A-B,loader-error-at-batch:N,only-rank:R,diverge-at-step:N`.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut f = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once(':').with_context(|| format!("WUKONG_FAULT item {item:?}: expected kind:value"))?;
            let num = |v: &str| v.parse::<u64>().with_context(|| format!("WUKONG_FAULT item {item:?}: {v:?} is not a number"));
            match k {
                "abort-at-step" => f.abort_at_step = Some(num(v)?),
                "abort-in-checkpoint" => f.abort_in_checkpoint = Some(num(v)? as usize),
                "nan-at-step" => f.nan_at_step = Some(num(v)?),
                "spike-at-steps" => {
                    let (a, b) = v.split_once('-').with_context(|| format!("WUKONG_FAULT item {item:?}: expected A-B"))?;
                    f.spike_at_steps = Some((num(a)?, num(b)?));
                }
                "loader-error-at-batch" => f.loader_error_at_batch = Some(num(v)? as usize),
                "only-rank" => f.only_rank = Some(num(v)? as usize),
                "diverge-at-step" => f.diverge_at_step = Some(num(v)?),
                other => bail!("WUKONG_FAULT: unknown fault {other:?}"),
            }
        }
        Ok(f)
    }

    /// The faults that fire on `rank` (none when they are meant for another rank).
    pub fn for_rank(&self, rank: usize) -> Self {
        match self.only_rank {
            Some(r) if r != rank => Self::default(),
            _ => self.clone(),
        }
    }

    pub fn from_env() -> Result<Self> {
        match std::env::var("WUKONG_FAULT") {
            Ok(s) => Self::parse(&s),
            Err(_) => Ok(Self::default()),
        }
    }
}

/// A checkpoint that verified, with its path.
pub type Found = (PathBuf, Checkpoint);

/// The checkpoints of a run directory: writing (keeping the last `keep`), finding the newest
/// valid one.
pub struct CheckpointDir {
    pub dir: PathBuf,
    keep: usize,
    written: usize,
    abort_in: Option<usize>,
}

impl CheckpointDir {
    pub fn new(run_dir: &Path, keep: usize, faults: &Faults) -> Result<Self> {
        let dir = run_dir.join(CHECKPOINTS);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // A temporary file is what a crash during a write leaves behind; it was never a checkpoint.
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path).ok();
            }
        }
        Ok(Self { dir, keep: keep.max(1), written: 0, abort_in: faults.abort_in_checkpoint })
    }

    fn path_of(&self, step: u64) -> PathBuf {
        self.dir.join(format!("ckpt-{step:012}.wkc"))
    }

    /// Writes the checkpoint of `step` durably, then deletes all but the newest `keep`.
    pub fn write(&mut self, step: u64, ckpt: &Checkpoint) -> Result<PathBuf> {
        self.written += 1;
        let path = self.path_of(step);
        let tmp = path.with_extension("wkc.tmp");
        let abort_now = self.abort_in == Some(self.written);
        {
            let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            ckpt.write_to(&mut w, &mut |w| {
                if abort_now {
                    w.flush().ok();
                    abort_in_write();
                }
            })
            .with_context(|| format!("cannot write {}", tmp.display()))?;
            let file = w.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
            file.sync_all().with_context(|| format!("cannot fsync {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename to {}", path.display()))?;
        crate::runtime::sync_dir(&self.dir)?;
        self.prune()?;
        Ok(path)
    }

    /// Checkpoint files, oldest first (by step, from the name).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if let Some(step) = name.strip_prefix("ckpt-").and_then(|s| s.strip_suffix(".wkc")).and_then(|s| s.parse::<u64>().ok()) {
                out.push((step, path));
            }
        }
        out.sort();
        Ok(out)
    }

    fn prune(&self) -> Result<()> {
        let all = self.list()?;
        for (_, p) in all.iter().take(all.len().saturating_sub(self.keep)) {
            std::fs::remove_file(p).with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
        }
        Ok(())
    }

    /// Steps of the checkpoints that read and verify, ascending.
    pub fn valid_steps(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for (step, path) in self.list()? {
            if std::fs::read(&path).ok().is_some_and(|b| Checkpoint::from_bytes(&b).is_ok()) {
                out.push(step);
            }
        }
        Ok(out)
    }

    /// The checkpoint of `step`, verified.
    pub fn at(&self, step: u64) -> Result<Found> {
        let path = self.path_of(step);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let c = Checkpoint::from_bytes(&bytes).with_context(|| format!("checkpoint {}", path.display()))?;
        Ok((path, c))
    }

    /// The newest checkpoint that reads and verifies; every newer one that does not is reported
    /// in `refused` (path and reason) and skipped.
    pub fn newest_valid(&self) -> Result<(Option<Found>, Vec<String>)> {
        let mut refused = Vec::new();
        for (_, path) in self.list()?.into_iter().rev() {
            let read =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display())).and_then(|b| Checkpoint::from_bytes(&b));
            match read {
                Ok(c) => return Ok((Some((path, c)), refused)),
                Err(e) => refused.push(format!("{}: {e:#}", path.display())),
            }
        }
        Ok((None, refused))
    }
}

/// A crash in the middle of a checkpoint write (fault injection): no unwinding, no cleanup.
fn abort_in_write() -> ! {
    tracing::error!("fault injection: aborting in the middle of a checkpoint write");
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            state: serde_json::json!({"step": 7, "loss": 0.1f64}),
            sections: vec![("a".into(), vec![1, 2, 3]), ("b".into(), vec![]), ("c".into(), (0..=255).collect())],
        }
    }

    fn bytes_of(c: &Checkpoint) -> Vec<u8> {
        let mut v = Vec::new();
        c.write_to(&mut v, &mut |_| {}).unwrap();
        v
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let back = Checkpoint::from_bytes(&bytes_of(&c)).unwrap();
        assert_eq!(back.state, c.state);
        assert_eq!(back.sections, c.sections);
        assert_eq!(back.section("c").unwrap().len(), 256);
        assert!(back.section("zz").is_err());
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let b = bytes_of(&sample());
        for n in 0..b.len() {
            assert!(Checkpoint::from_bytes(&b[..n]).is_err(), "truncated to {n} bytes was accepted");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(Checkpoint::from_bytes(&c).is_err(), "flipped byte {i} was accepted");
        }
    }

    #[test]
    fn newest_valid_skips_a_corrupted_newest() {
        let run = std::env::temp_dir().join(format!("wukong-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&run).unwrap();
        let mut d = CheckpointDir::new(&run, 2, &Faults::default()).unwrap();
        for step in [10u64, 20, 30] {
            let mut c = sample();
            c.state = serde_json::json!({ "step": step });
            d.write(step, &c).unwrap();
        }
        assert_eq!(d.list().unwrap().iter().map(|x| x.0).collect::<Vec<_>>(), vec![20, 30], "keeps the last 2");
        let newest = d.list().unwrap()[1].1.clone();
        let mut bytes = std::fs::read(&newest).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&newest, bytes).unwrap();
        let (found, refused) = d.newest_valid().unwrap();
        assert_eq!(found.unwrap().1.state["step"], 20);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("truncated"), "{refused:?}");
        std::fs::remove_dir_all(&run).ok();
    }

    #[test]
    fn fault_specs() {
        let f = Faults::parse("abort-at-step:5, spike-at-steps:3-4,loader-error-at-batch:2").unwrap();
        assert_eq!(f.abort_at_step, Some(5));
        assert_eq!(f.spike_at_steps, Some((3, 4)));
        assert_eq!(f.loader_error_at_batch, Some(2));
        assert!(Faults::parse("explode:1").is_err());
        assert!(Faults::parse("nan-at-step:x").is_err());
    }
}
