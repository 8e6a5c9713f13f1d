//! `wukong bench`: training and scoring speed of a model on generated data of a dataset's shape,
//! side by side with the PyTorch reference (`benchmarks/torch_ref.py`) in the same invocation.
//!
//! The parent process generates each config's data once into a work directory (`spec.json` plus
//! little-endian column files), then runs every measurement in its own child process: ours
//! (`wukong bench-run`), PyTorch eager and PyTorch with `torch.compile`. Separate processes give
//! each its own peak RSS and keep one's allocations from slowing the next. Children print one
//! `BENCH_RESULT {json}` line. The generated data is [`data`]'s; the CPU-vs-GPU check is
//! [`equivalence`]'s.

mod data;
mod equivalence;

pub use data::{generate, read_work_dir, write_work_dir};
pub use equivalence::{Equivalence, equivalence};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{ExperimentConfig, TrainConfig};
use crate::data::{BatchLoader, EncodedDataset};
use crate::model::{DataShape, ModelConfig, SlotLayout, SparseInput};
use crate::profile::{self, Phase};
use crate::train::Stepper;
use burn::module::Module;

/// A benchmark config file (`benchmarks/configs/*.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchFile {
    name: String,
    #[serde(default)]
    description: String,
    /// An experiment config whose `[model]` and `[train]` are used (a `[model]`/`[train]` here
    /// replaces the base's).
    base: Option<PathBuf>,
    model: Option<ModelConfig>,
    train: Option<TrainConfig>,
    shape: ShapeSpec,
}

/// The generated data and the measurement protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapeSpec {
    /// Table rows per categorical field (a field's block in the shared table). Alternatively
    /// `fields` + `rows`: that many fields sharing `rows` rows evenly.
    pub vocab: Vec<usize>,
    pub fields: usize,
    pub rows: usize,
    /// Dense (numeric) features, drawn from N(0, 1).
    pub dense: usize,
    /// Training batch size (0: the train config's).
    pub batch_size: usize,
    /// Exponent of the power law that picks rows within a field (0: uniform). Real click logs
    /// are heavy-tailed; the exponent sets how many distinct rows a batch touches.
    pub zipf: f64,
    pub positive_rate: f64,
    /// Untimed steps first (allocator and cache warm-up), then timed steps.
    pub warmup: usize,
    pub steps: usize,
    /// Scoring: batches of this size (0: the training batch size), timed over this many.
    pub infer_batch_size: usize,
    pub infer_batches: usize,
}

impl Default for ShapeSpec {
    fn default() -> Self {
        Self {
            vocab: Vec::new(),
            fields: 0,
            rows: 0,
            dense: 0,
            batch_size: 0,
            zipf: 1.1,
            positive_rate: 0.25,
            warmup: 3,
            steps: 20,
            infer_batch_size: 0,
            infer_batches: 10,
        }
    }
}

/// Everything a measurement needs, written as `spec.json` for both sides.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub description: String,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub vocab: Vec<usize>,
    pub dense: usize,
    pub batch_size: usize,
    pub warmup: usize,
    pub steps: usize,
    pub infer_batch_size: usize,
    pub infer_batches: usize,
    /// Rows of generated data (enough for warm-up + timed steps and for scoring).
    pub examples: usize,
    pub table_rows: usize,
    pub table_dim: usize,
    pub table_segments: Vec<usize>,
    /// Analytic forward FLOPs per example (matrix products only); training counts 3×.
    pub forward_flops: u64,
    pub zipf: f64,
    pub positive_rate: f64,
}

impl Spec {
    /// Overrides the training and scoring batch size (and the generated rows with it).
    pub fn set_batch_size(&mut self, b: usize) {
        self.batch_size = b;
        self.infer_batch_size = b;
        self.size_data();
    }

    /// Generated rows: enough for warm-up + timed steps, and for the scoring batches.
    fn size_data(&mut self) {
        self.examples = ((self.warmup + self.steps) * self.batch_size).max((self.infer_batches + 1) * self.infer_batch_size);
    }

    pub fn shape(&self) -> DataShape {
        DataShape { fields: self.vocab.len(), dense: self.dense, table_rows: self.table_rows }
    }

    /// Reads and resolves a bench config; `steps`/`warmup` override the file's when given.
    pub fn load(path: &Path, steps: Option<usize>, warmup: Option<usize>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read bench config {}", path.display()))?;
        let file: BenchFile = toml::from_str(&text).with_context(|| format!("invalid bench config {}", path.display()))?;
        Self::resolve(file, path).with_context(|| format!("invalid bench config {}", path.display())).map(|mut s| {
            if let Some(n) = steps {
                s.steps = n
            }
            if let Some(n) = warmup {
                s.warmup = n
            }
            s.size_data(); // for the overridden step counts
            s
        })
    }

    /// Parses a bench config's text (`base` paths resolve against the working directory).
    pub fn parse(text: &str) -> Result<Self> {
        let file: BenchFile = toml::from_str(text)?;
        Self::resolve(file, Path::new("."))
    }

    fn resolve(file: BenchFile, path: &Path) -> Result<Self> {
        let base = match &file.base {
            Some(b) => {
                // Relative to the working directory (the repository root), else to this file.
                let p = if b.exists() { b.clone() } else { path.parent().unwrap_or(Path::new(".")).join(b) };
                Some(ExperimentConfig::load(&p)?)
            }
            None => None,
        };
        let model = file.model.or_else(|| base.as_ref().map(|b| b.model.clone())).context("needs [model] or base")?;
        let train = file.train.or_else(|| base.as_ref().map(|b| b.train.clone())).unwrap_or_default();
        model.validate()?;
        let s = file.shape;
        let vocab = if !s.vocab.is_empty() {
            s.vocab.clone()
        } else {
            anyhow::ensure!(s.fields > 0 && s.rows >= s.fields, "shape needs vocab = [...] or fields and rows (rows ≥ fields)");
            (0..s.fields).map(|f| s.rows / s.fields + usize::from(f < s.rows % s.fields)).collect()
        };
        anyhow::ensure!(vocab.iter().all(|&v| v > 0), "every field needs at least one row");
        anyhow::ensure!(s.steps > 0, "shape.steps must be positive");
        anyhow::ensure!(s.zipf >= 0.0 && (0.0..=1.0).contains(&s.positive_rate), "shape.zipf ≥ 0 and positive_rate in [0, 1]");
        let batch_size = if s.batch_size > 0 { s.batch_size } else { train.batch_size };
        let infer_batch_size = if s.infer_batch_size > 0 { s.infer_batch_size } else { batch_size };
        let table_rows: usize = vocab.iter().sum();
        let shape = DataShape { fields: vocab.len(), dense: s.dense, table_rows };
        model.check_shape(&shape)?;
        let mut spec = Self {
            name: file.name,
            description: file.description,
            forward_flops: model.forward_flops(&shape),
            table_dim: model.embedding_dim(),
            table_segments: model.table_segments(),
            model,
            train,
            vocab,
            dense: s.dense,
            batch_size,
            warmup: s.warmup,
            steps: s.steps,
            infer_batch_size,
            infer_batches: s.infer_batches,
            examples: 0, // set by size_data
            table_rows,
            zipf: s.zipf,
            positive_rate: s.positive_rate,
        };
        spec.size_data();
        Ok(spec)
    }
}

/// One side's measurement (ours or a PyTorch mode), as printed on the `BENCH_RESULT` line.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Measurement {
    pub framework: String,
    pub version: String,
    pub device: String,
    pub threads: usize,
    pub step_ms: Vec<f64>,
    /// Seconds per phase summed over the timed steps (phase name → seconds); empty when the
    /// side cannot split its step (compiled graphs).
    #[serde(default)]
    pub phases: Vec<(String, f64)>,
    pub infer_examples_per_s: f64,
    pub peak_rss_mb: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Seconds spent before the first step (model build, compilation).
    #[serde(default)]
    pub setup_s: f64,
    /// Processes of a data-parallel measurement (1: one process).
    #[serde(default)]
    pub ranks: usize,
    /// Data-parallel: payload bytes rank 0 sent through the collectives per timed step.
    #[serde(default)]
    pub bytes_per_step: f64,
}

impl Measurement {
    pub fn median_ms(&self) -> f64 {
        let mut v = self.step_ms.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    pub fn min_ms(&self) -> f64 {
        self.step_ms.iter().copied().fold(f64::INFINITY, f64::min)
    }
    pub fn max_ms(&self) -> f64 {
        self.step_ms.iter().copied().fold(0.0, f64::max)
    }
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The trainer's linear warm-up, which both sides of the benchmark apply (`step` from 0).
pub fn warmup_factor(step: usize, warmup_steps: usize) -> f64 {
    if warmup_steps == 0 { 1.0 } else { ((step + 1) as f64 / warmup_steps as f64).min(1.0) }
}

/// Our side, in this process: warm-up steps, timed steps with the phase clock, then scoring.
/// `burn_adam`: step the dense parameters with burn's Adam instead of the fused one.
/// With `comm`, one rank of a data-parallel job: every rank trains on its share of the same
/// global batches (scoring is skipped).
pub fn measure_ours(
    spec: &Spec,
    data: EncodedDataset,
    device_spec: &str,
    sync_phases: bool,
    burn_adam: bool,
    comm: Option<crate::dist::Comm>,
    embeddings: crate::dist::EmbeddingMode,
) -> Result<Measurement> {
    let setup = Instant::now();
    let device = crate::runtime::parse_device(device_spec)?;
    device.seed(spec.train.seed);
    let shape = spec.shape();
    let layout = SlotLayout::one_hot(shape.fields);
    let ad = device.clone().autodiff();
    let model = match &comm {
        Some(c) if embeddings == crate::dist::EmbeddingMode::Sharded => {
            spec.model.init_shard(&shape, spec.train.emb_storage, c.rank(), c.size(), &ad)
        }
        _ => spec.model.init_with_storage(&shape, spec.train.emb_storage, &ad),
    };
    let mut stepper = Stepper::new(model, &spec.model, &spec.train, layout.clone(), &device);
    if burn_adam {
        stepper.set_dense_adam(crate::train::DenseAdam::burn(crate::train::AdamHyper::of(&spec.train)));
    }
    let (rank, ranks) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
    if let Some(c) = &comm {
        stepper.set_data_parallel(crate::train::dist::DataParallel { comm: c.clone(), embeddings });
    }
    let data = Arc::new(data);
    let loader = BatchLoader::new(Arc::clone(&data), spec.table_rows, spec.batch_size).sharded(rank, ranks);
    let setup_s = setup.elapsed().as_secs_f64();
    let mut bytes_before = 0;

    let (lr, emb_lr) = (spec.train.lr, spec.train.emb_lr);
    let mut step_ms = Vec::with_capacity(spec.steps);
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut batches = loader.epoch(None);
    for i in 0..spec.warmup + spec.steps {
        if i == spec.warmup {
            profile::enable(sync_phases.then(|| device.clone()));
            bytes_before = comm.as_ref().map_or(0, |c| c.bytes_sent());
        }
        let t = Instant::now();
        profile::restart();
        let batch = batches.next().context("generated data ran out")??;
        let warm = warmup_factor(i, spec.train.warmup_steps);
        let loss = stepper.step(&batch, lr * warm, emb_lr * warm)? as f64;
        if i >= spec.warmup {
            step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if i == 0 {
            first_loss = loss;
        }
        last_loss = loss;
    }
    drop(batches);
    let phases = profile::disable();
    let bytes_per_step = comm.as_ref().map_or(0.0, |c| (c.bytes_sent() - bytes_before) as f64 / spec.steps.max(1) as f64);
    let phases = Phase::ALL.iter().map(|p| (p.name().to_string(), phases[*p as usize])).collect();
    let common = Measurement {
        framework: if burn_adam { "wukong-rs, burn Adam".into() } else { "wukong-rs".into() },
        version: format!("wukong {} / burn 0.22.1", env!("CARGO_PKG_VERSION")),
        device: device_spec.into(),
        threads: crate::runtime::cpu_threads(),
        step_ms,
        phases,
        infer_examples_per_s: 0.0,
        peak_rss_mb: peak_rss_mb(),
        first_loss,
        last_loss,
        setup_s,
        ranks,
        bytes_per_step,
    };
    if comm.is_some() {
        return Ok(common);
    }

    // Scoring: the inference copy of the model, batches of `infer_batch_size`.
    let model = stepper.into_model().valid();
    let loader = BatchLoader::new(data, spec.table_rows, spec.infer_batch_size);
    let mut scored = 0usize;
    let mut start = Instant::now();
    for (i, batch) in loader.epoch(None).enumerate().take(spec.infer_batches + 1) {
        let batch = batch?;
        if i == 1 {
            start = Instant::now(); // the first batch warms up
        }
        let input = SparseInput::from_batch(&batch, &layout, &device);
        let (logits, _) = model.forward(&input, false, &crate::model::Pass::new(spec.train.precision, 0));
        let v = logits.into_data();
        if i >= 1 {
            scored += v.num_elements();
        }
    }
    let infer_examples_per_s = scored as f64 / start.elapsed().as_secs_f64();

    Ok(Measurement { infer_examples_per_s, peak_rss_mb: peak_rss_mb(), ..common })
}

/// Matrix-multiply throughput of the backend: `[m, k] × [k, n]`, median GFLOP/s; with bf16, as
/// our bf16 MLP products run: through the bf16 kernel from f32 operands (their rounding timed)
/// where [`crate::model::bf16::Bf16Kernel::chosen`] picks it, else on bf16 tensors (cast once,
/// outside the timing).
pub fn matmul_gflops(
    device_spec: &str,
    m: usize,
    k: usize,
    n: usize,
    reps: usize,
    precision: crate::model::layers::Precision,
) -> Result<f64> {
    use burn::tensor::{DType, Distribution, Tensor};
    let device = crate::runtime::parse_device(device_spec)?;
    let mut a = Tensor::<2>::random([m, k], Distribution::Default, &device);
    let mut b = Tensor::<2>::random([k, n], Distribution::Default, &device);
    let bf16 = precision == crate::model::layers::Precision::Bf16;
    let kernel = bf16 && crate::model::bf16::Bf16Kernel::chosen().is_kernel();
    if bf16 && !kernel {
        (a, b) = (a.cast(DType::BF16), b.cast(DType::BF16));
    }
    let mut times = Vec::new();
    for i in 0..reps + 2 {
        let t = Instant::now();
        let c = match kernel {
            true => crate::model::fused::bf16_matmul(a.clone(), b.clone()),
            false => a.clone().matmul(b.clone()),
        };
        let _ = c.slice([0..1, 0..1]).into_data(); // waits for the product
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (m * k * n) as f64 / times[times.len() / 2] / 1e9)
}

/// Finds and parses the `BENCH_RESULT {json}` line of a child's output (a [`Measurement`], or
/// another shape such as the matmul peak's `{"gflops": …}`).
pub fn parse_result<T: serde::de::DeserializeOwned>(stdout: &str) -> Result<T> {
    let line = stdout.lines().rev().find_map(|l| l.strip_prefix("BENCH_RESULT ")).context("no BENCH_RESULT line in the output")?;
    Ok(serde_json::from_str(line)?)
}

/// One config's row group in the report.
pub struct ConfigResult {
    pub spec: Spec,
    pub ours: std::result::Result<Measurement, String>,
    pub eager: std::result::Result<Measurement, String>,
    pub compiled: std::result::Result<Measurement, String>,
    /// Ours again with burn's (unfused) Adam, when asked for (`--burn-adam`): the A/B of the
    /// fused dense optimizer in the same invocation.
    pub ours_burn_adam: Option<std::result::Result<Measurement, String>>,
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// A data-parallel measurement: (ranks, threads per rank, embedding mode, result).
pub type DpRow = (usize, usize, String, std::result::Result<Measurement, String>);

/// The markdown table of `wukong bench-dp`: per config, one process against R ranks.
pub fn report_dp(rows: &[(Spec, Vec<DpRow>)], cpu: &str) -> String {
    let mut out = format!(
        "{cpu}\n\nData parallelism on one machine: generated data of each config's shape, the same global batch for every rank count; median ms per step over the timed steps. Bytes: payload rank 0 sent through the collectives per step (dense gradients all-reduced, touched rows and their gradients all-gathered). Communication: the share of the step inside the collectives (waiting for the slowest rank included).\n\n| config | global batch | ranks × threads | embeddings | ms/step | examples/s | vs 1 process | MB sent/step/rank | communication | peak RSS/rank MiB |\n|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (spec, ms) in rows {
        let base = ms.first().and_then(|(_, _, _, m)| m.as_ref().ok()).map(|m| m.median_ms());
        for (r, t, mode, m) in ms {
            match m {
                Ok(m) => {
                    let step = m.median_ms();
                    let total: f64 = m.phases.iter().map(|(_, s)| s).sum();
                    let comm = m.phases.iter().find(|(n, _)| n == "communication").map_or(0.0, |(_, s)| *s);
                    let share = if *r > 1 && total > 0.0 { format!("{:.0}%", 100.0 * comm / total) } else { "–".into() };
                    out.push_str(&format!(
                        "| {} | {} | {r} × {t} | {mode} | {step:.1} | {} | {} | {} | {share} | {:.0} |\n",
                        spec.name,
                        spec.batch_size,
                        fmt_rate(spec.batch_size as f64 / (step / 1e3)),
                        base.map_or("–".into(), |b| format!("{:.2}×", b / step)),
                        if *r > 1 { format!("{:.2}", m.bytes_per_step / 1e6) } else { "–".into() },
                        m.peak_rss_mb
                    ));
                }
                Err(e) => out.push_str(&format!("| {} | {} | {r} × {t} | {mode} | failed: {e} | | | | | |\n", spec.name, spec.batch_size)),
            }
        }
    }
    out
}

/// The burn backend a `--device` runs on, for labels ("Flex" on the CPU, else the device).
pub fn backend_name(device: &str) -> String {
    if device == "cpu" { "Flex".to_string() } else { device.to_string() }
}

/// The markdown report: one speed table (ratio ours/this per row) and the phase shares. `device`
/// names our backend in the rows (a GPU run must not read as the CPU backend).
pub fn report(results: &[ConfigResult], peaks: &[(String, std::result::Result<f64, String>)], header: &str, device: &str) -> String {
    let ours_name = format!("ours (burn {})", backend_name(device));
    let mut s = String::new();
    s.push_str(header);
    s.push_str("\n| config | framework | ms/step median (min–max) | train ex/s | train GFLOP/s | score ex/s | peak RSS MiB | ours / this (time) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let train_flops = 3.0 * r.spec.forward_flops as f64 * r.spec.batch_size as f64;
        let ours_ms = r.ours.as_ref().map(|m| m.median_ms()).ok();
        let mut tags = if r.spec.train.precision == crate::model::layers::Precision::Bf16 { ", bf16".to_string() } else { String::new() };
        if r.spec.train.emb_storage != crate::model::TableStorage::F32 {
            // Only our side stores the table in half precision; the reference stays f32.
            tags.push_str(&format!(", our table {:?}", r.spec.train.emb_storage).to_lowercase());
        }
        let label = format!("{} (b={}, {:.2} MFLOP/ex{tags})", r.spec.name, r.spec.batch_size, r.spec.forward_flops as f64 / 1e6);
        let burn_adam = r.ours_burn_adam.iter().map(|m| ("ours, burn's Adam", m));
        for (name, m) in [(ours_name.as_str(), &r.ours)]
            .into_iter()
            .chain(burn_adam)
            .chain([("PyTorch eager", &r.eager), ("PyTorch compile", &r.compiled)])
        {
            match m {
                Ok(m) => {
                    let med = m.median_ms();
                    let ratio = ours_ms.map(|o| format!("{:.2}", o / med)).unwrap_or_else(|| "–".into());
                    s.push_str(&format!(
                        "| {label} | {name} | {med:.1} ({:.1}–{:.1}) | {} | {:.1} | {} | {:.0} | {ratio} |\n",
                        m.min_ms(),
                        m.max_ms(),
                        fmt_rate(r.spec.batch_size as f64 / med * 1e3),
                        train_flops / med / 1e6,
                        fmt_rate(m.infer_examples_per_s),
                        m.peak_rss_mb,
                    ));
                }
                Err(e) => {
                    s.push_str(&format!("| {label} | {name} | not run: {} | | | | | |\n", e.replace('|', "/").lines().next().unwrap_or("")))
                }
            }
        }
    }
    s.push_str("\nShare of the timed steps per phase (forward phases, then the whole backward, then the optimizers):\n\n");
    s.push_str("| config | framework | data | embedding | interaction | mlp+loss | backward | dense opt | sparse opt |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let burn_adam = r.ours_burn_adam.iter().map(|m| ("ours, burn's Adam", m));
        for (name, m) in [("ours", &r.ours)].into_iter().chain(burn_adam).chain([("PyTorch eager", &r.eager)]) {
            if let Ok(m) = m {
                if m.phases.is_empty() {
                    continue;
                }
                let total: f64 = m.phases.iter().map(|p| p.1).sum();
                let get =
                    |k: &str| m.phases.iter().find(|p| p.0 == k).map(|p| format!("{:.0}%", 100.0 * p.1 / total)).unwrap_or("–".into());
                s.push_str(&format!(
                    "| {} | {name} | {} | {} | {} | {} | {} | {} | {} |\n",
                    r.spec.name,
                    get("data"),
                    get("embedding"),
                    get("interaction"),
                    get("mlp"),
                    get("backward"),
                    get("dense_optimizer"),
                    get("sparse_optimizer")
                ));
            }
        }
    }
    if !peaks.is_empty() {
        s.push_str("\nMatrix-multiply peak, `[4096, 2048] × [2048, 2048]`, same threads (the physical limit a step's GFLOP/s is judged against):\n\n| backend | GFLOP/s |\n|---|---|\n");
        for (name, p) in peaks {
            match p {
                Ok(g) => s.push_str(&format!("| {name} | {g:.1} |\n")),
                Err(e) => s.push_str(&format!("| {name} | not run: {} |\n", e.lines().next().unwrap_or(""))),
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let m = Measurement { step_ms: vec![5.0, 1.0, 3.0, 10.0], ..Default::default() };
        assert_eq!(m.median_ms(), 4.0);
        assert_eq!(m.min_ms(), 1.0);
        assert_eq!(m.max_ms(), 10.0);
    }

    /// A GPU run's rows and peak must name the device's backend: the first H200 report labelled
    /// Vulkan timings "burn Flex" (the CPU backend).
    #[test]
    fn report_names_the_backend_that_ran() {
        let spec = Spec::parse("name = \"t\"\n[model]\nname = \"fm\"\nembedding_dim = 4\n[shape]\nvocab = [5, 7]\nsteps = 2\nwarmup = 0\n")
            .unwrap();
        let m = Measurement { step_ms: vec![2.0, 4.0], ..Default::default() };
        let r = ConfigResult { spec, ours: Ok(m), eager: Err("not run".into()), compiled: Err("not run".into()), ours_burn_adam: None };
        let peaks = vec![(format!("burn 0.22.1 {} (ours), f32", backend_name("vulkan")), Ok(1.0))];
        let gpu = report(std::slice::from_ref(&r), &peaks, "", "vulkan");
        assert!(gpu.contains("| ours (burn vulkan) | 3.0 (2.0–4.0) |"), "{gpu}");
        assert!(gpu.contains("burn 0.22.1 vulkan (ours), f32"), "{gpu}");
        assert!(!gpu.contains("Flex"), "{gpu}");
        assert!(report(&[r], &[], "", "cpu").contains("| ours (burn Flex) |"));
    }
}
