//! Training: the loop (Adam for dense parameters, row-wise Adagrad for embedding rows, linear
//! warm-up, global-norm clipping, early stopping on validation AUC with best-weight restore),
//! full-state checkpoints with exact resume, the loss-explosion guard, evaluation and prediction.

pub mod adam;
pub mod average;
pub mod checkpoint;
pub mod dist;
pub mod guard;
pub mod optim;
pub mod prune;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{ExperimentConfig, TrainConfig};
use crate::data::{BatchLoader, Encoder, SplitData};
use crate::metrics::{MetricAccumulator, Metrics};
use crate::model::{DataShape, Model, ModelConfig, Pass, Precision, SlotLayout, SparseInput};
use crate::profile::{self, Phase};
pub use adam::{AdamHyper, DenseAdam};
use checkpoint::{Checkpoint, CheckpointDir, Faults};
pub use guard::{GuardConfig, GuardEvent, GuardPolicy, GuardState, StepReport};
pub use optim::{EmbOptimizerKind, RowWiseAdagrad, SparseAdam, SparseOptimizer, grad_norm};

/// Mean binary cross-entropy from logits, stable for any logit:
/// `max(z,0) − z·y + ln(1 + e^{−|z|})`.
pub fn bce_with_logits(logits: Tensor<1>, labels: Tensor<1>) -> Tensor<1> {
    let stable = logits.clone().abs().neg().exp().log1p();
    (relu(logits.clone()) - logits * labels + stable).mean()
}

/// Logits of every example, in file order.
pub fn predict_logits(
    model: &Model,
    data: &SplitData,
    encoder: &Encoder,
    batch_size: usize,
    precision: Precision,
    device: &Device,
) -> Result<Vec<f32>> {
    let layout = SlotLayout::of(encoder);
    let loader = BatchLoader::from_split(data.clone(), encoder.total_rows(), batch_size, 65_536, 1).with_extra(encoder.extra_embeddings());
    let mut out = Vec::with_capacity(data.len());
    for batch in loader.epoch(None) {
        out.extend(batch_logits(model, &batch?, &layout, precision, device)?);
    }
    anyhow::ensure!(out.len() == data.len(), "scored {} of {} examples", out.len(), data.len());
    Ok(out)
}

/// Logits of one batch: an inference forward pass (no dropout, no gathered rows kept).
pub fn batch_logits(
    model: &Model,
    batch: &crate::data::Batch,
    layout: &SlotLayout,
    precision: Precision,
    device: &Device,
) -> Result<Vec<f32>> {
    let input = SparseInput::from_batch(batch, layout, device);
    let (logits, _) = model.forward(&input, false, &Pass::new(precision, 0));
    logits.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// AUC and LogLoss of `model` (an inference copy: `model.valid()`) on an in-memory split.
pub fn evaluate(
    model: &Model,
    data: &SplitData,
    encoder: &Encoder,
    batch_size: usize,
    precision: Precision,
    device: &Device,
) -> Result<Metrics> {
    Ok(score(model, data, encoder, batch_size, precision, device)?.0)
}

/// [`evaluate`] that also returns the logits it computed (scored once, used twice at the end of
/// a run: metrics and the reliability table).
fn score(
    model: &Model,
    data: &SplitData,
    encoder: &Encoder,
    batch_size: usize,
    precision: Precision,
    device: &Device,
) -> Result<(Metrics, Vec<f32>)> {
    let SplitData::Memory(d) = data else { anyhow::bail!("evaluation needs the split in memory") };
    let logits = predict_logits(model, data, encoder, batch_size, precision, device)?;
    Ok((metrics_of(&logits, &d.labels)?, logits))
}

fn metrics_of(logits: &[f32], labels: &[f32]) -> Result<Metrics> {
    let mut acc = MetricAccumulator::new();
    for (z, y) in logits.iter().zip(labels) {
        acc.push(*z, *y);
    }
    acc.finish()
}

/// Logits of `part` with a row-sharded table: every batch's rows are fetched from their owners,
/// and every rank runs the same number of rounds (that of the longest part, `longest` examples),
/// taking part with an empty batch when its own part has run out.
#[allow(clippy::too_many_arguments)]
fn sharded_logits(
    model: &Model,
    part: crate::data::EncodedDataset,
    encoder: &Encoder,
    batch_size: usize,
    precision: Precision,
    device: &Device,
    comm: &dyn crate::dist::Collective,
    longest: usize,
) -> Result<Vec<f32>> {
    let layout = SlotLayout::of(encoder);
    let n = part.len();
    let loader = BatchLoader::from_split(SplitData::Memory(std::sync::Arc::new(part)), encoder.total_rows(), batch_size, 65_536, 1)
        .with_extra(encoder.extra_embeddings());
    let mut batches = (n > 0).then(|| loader.epoch(None));
    let mut out = Vec::with_capacity(n);
    let dim = model.embedding().dim();
    let inner = device.clone().inner();
    for _ in 0..longest.div_ceil(batch_size.max(1)) {
        let batch = match batches.as_mut().and_then(|b| b.next()) {
            Some(b) => b?,
            None => crate::data::Batch::default(),
        };
        let (rows, _) = dist::RowExchange::fetch(comm, model, &batch.unique_rows, &inner)?;
        if batch.size == 0 {
            continue;
        }
        let mut input = SparseInput::from_batch(&batch, &layout, device);
        input.rows = Some(Tensor::<2>::from_data(TensorData::new(rows, [batch.unique_rows.len(), dim]), &inner));
        let (logits, _) = model.forward(&input, false, &Pass::new(precision, 0));
        out.extend(logits.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?);
    }
    anyhow::ensure!(out.len() == n, "scored {} of this rank's {n} examples", out.len());
    Ok(out)
}

/// [`score`] in a data-parallel job: each rank scores its contiguous part of the split
/// ([`crate::dist::shard_range`]) and the logits are all-gathered in example order, so every
/// rank gets the exact AUC and LogLoss of the whole split (the same numbers as one process, up
/// to float rounding inside the model). Without `dp`, [`score`].
fn score_on(
    model: &Model,
    data: &SplitData,
    encoder: &Encoder,
    batch_size: usize,
    precision: Precision,
    device: &Device,
    dp: Option<&dist::DataParallel>,
) -> Result<(Metrics, Vec<f32>)> {
    let Some(dp) = dp else { return score(model, data, encoder, batch_size, precision, device) };
    let comm = dp.comm.as_ref();
    let SplitData::Memory(d) = data else { anyhow::bail!("evaluation needs the split in memory") };
    let part = d.slice(crate::dist::shard_range(d.len(), comm.rank(), comm.size()));
    let local = if dp.embeddings == crate::dist::EmbeddingMode::Sharded {
        sharded_logits(model, part, encoder, batch_size, precision, device, comm, d.len().div_ceil(comm.size()))?
    } else if part.is_empty() {
        Vec::new()
    } else {
        predict_logits(model, &SplitData::Memory(std::sync::Arc::new(part)), encoder, batch_size, precision, device)?
    };
    let (logits, _) = comm.all_gather_f32(&local)?;
    anyhow::ensure!(logits.len() == d.len(), "the ranks scored {} of {} examples", logits.len(), d.len());
    Ok((metrics_of(&logits, &d.labels)?, logits))
}

/// The gradient of a step's gathered embedding rows, with those rows.
type RowsGrad = (Tensor<2>, crate::model::Gathered);

/// The forward and backward pass of one batch: the dense gradients, the gradient of the gathered
/// rows (with them) and the loss. With `scale`, the mean loss times it is backpropagated (a
/// data-parallel rank passes its share's size: the sum of its losses).
fn forward_backward(
    model: &Model,
    input: &SparseInput,
    labels: Tensor<1>,
    pass: &Pass,
    scale: Option<f64>,
) -> Result<(GradientsParams, Option<RowsGrad>, f32)> {
    let (logits, gathered) = model.forward(input, true, pass);
    let loss = bce_with_logits(logits, labels);
    let loss = match scale {
        Some(s) => loss.mul_scalar(s),
        None => loss,
    };
    profile::mark(Phase::Mlp);
    let mut grads = loss.backward();
    let loss = loss.into_scalar::<f32>();
    profile::mark(Phase::Backward);
    let sparse = match gathered {
        Some(g) => Some((g.rows.grad_remove(&mut grads).context("embedding rows received no gradient")?, g)),
        None => None,
    };
    Ok((GradientsParams::from_grads(grads, model), sparse, loss))
}

/// One training step's machinery: the model, Adam for its dense parameters (with the global-norm
/// clipping, fused on the CPU backend), row-wise Adagrad for the embedding rows. The trainer and
/// the benchmark both step through this, so what the benchmark times is exactly what training
/// runs.
pub struct Stepper {
    model: Option<Model>,
    adam: DenseAdam,
    sparse_optimizer: SparseOptimizer,
    layout: SlotLayout,
    autodiff: Device,
    grad_clip_norm: f64,
    precision: Precision,
    /// Position of the dropout-mask stream (carried from step to step, saved in checkpoints).
    dropout_stream: u64,
    /// This process's place in a data-parallel job (`None`: one process).
    dist: Option<dist::DataParallel>,
    /// Examples of the last step's global batch (all ranks together).
    last_examples: usize,
}

/// Named binary parts of a checkpoint.
pub type Sections = Vec<(String, Vec<u8>)>;

/// Checkpoint section names of a [`Stepper`]'s state.
const MODEL_SECTION: &str = "model";
const ADAM_SECTION: &str = "adam";
const SPARSE_SECTION: &str = "sparse_optimizer";

impl Stepper {
    /// `model` must live on the autodiff version of `device`.
    pub fn new(model: Model, cfg: &ModelConfig, t: &TrainConfig, layout: SlotLayout, device: &Device) -> Self {
        let adam = DenseAdam::new(AdamHyper::of(t), device);
        let rows = model.embedding().rows();
        let sparse_optimizer = SparseOptimizer::new(t, rows, &cfg.table_segments(), device);
        Self {
            model: Some(model),
            adam,
            sparse_optimizer,
            layout,
            autodiff: device.clone().autodiff(),
            grad_clip_norm: t.grad_clip_norm,
            precision: t.precision,
            dropout_stream: Pass::seeded(t.precision, t.seed).dropout_stream(),
            dist: None,
            last_examples: 0,
        }
    }

    /// Makes every step a data-parallel one (the batches given to [`Self::step`] are then this
    /// rank's share of the global batch; see [`dist`]).
    pub fn set_data_parallel(&mut self, dp: dist::DataParallel) {
        self.dist = Some(dp);
    }

    pub fn data_parallel(&self) -> Option<&dist::DataParallel> {
        self.dist.as_ref()
    }

    /// Adds 1 to every value of embedding row 0 (fault injection: replicas that diverge).
    pub fn perturb_for_tests(&mut self) {
        let model = self.model.take().expect("model present between steps");
        let ids = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(vec![0i64], [1]), &self.autodiff);
        let current = model.embedding().current_rows(ids.clone());
        let delta = current.ones_like();
        self.model = Some(model.map_embedding(|e| e.add_rows(ids, current, delta)));
    }

    /// Examples in the last step's global batch (in a data-parallel job, all ranks' shares).
    pub fn last_step_examples(&self) -> usize {
        self.last_examples
    }

    /// Replaces the dense optimizer (benchmarks: burn's Adam against the fused one). Only before
    /// the first step.
    pub fn set_dense_adam(&mut self, adam: DenseAdam) {
        self.adam = adam;
    }

    pub fn dropout_stream(&self) -> u64 {
        self.dropout_stream
    }

    /// Restores a position from [`Self::dropout_stream`] (resuming a run, or replaying the same
    /// masks on another device).
    pub fn set_dropout_stream(&mut self, position: u64) {
        self.dropout_stream = position;
    }

    pub fn model(&self) -> &Model {
        self.model.as_ref().expect("model present between steps")
    }

    pub fn into_model(self) -> Model {
        self.model.expect("model present between steps")
    }

    /// One step on `batch` with the given learning rates; returns the batch's mean loss.
    pub fn step(&mut self, batch: &crate::data::Batch, lr: f64, emb_lr: f64) -> Result<f32> {
        Ok(self.step_checked(batch, lr, emb_lr, None)?.0.loss)
    }

    /// One step whose update is applied only when `accept` (given the loss and the gradient
    /// norms, computed before any parameter changes) says so; returns the report and whether the
    /// update was applied. Without `accept` the embedding gradient norm is not computed (0).
    pub fn step_checked(
        &mut self,
        batch: &crate::data::Batch,
        lr: f64,
        emb_lr: f64,
        accept: Option<&mut dyn FnMut(&StepReport) -> bool>,
    ) -> Result<(StepReport, bool)> {
        if let Some(dp) = self.dist.clone() {
            return self.step_data_parallel(&dp, batch, lr, emb_lr, accept);
        }
        self.last_examples = batch.size;
        let ad = &self.autodiff;
        let input = SparseInput::from_batch(batch, &self.layout, ad);
        let labels = Tensor::<1>::from_data(TensorData::new(batch.labels.clone(), [batch.size]), ad);
        profile::mark(Phase::Data);
        let model = self.model.take().expect("model present between steps");
        let pass = Pass::new(self.precision, self.dropout_stream);
        let (dense_grads, sparse, loss) = match forward_backward(&model, &input, labels, &pass, None) {
            Ok(out) => out,
            Err(e) => {
                self.model = Some(model);
                return Err(e);
            }
        };
        self.dropout_stream = pass.dropout_stream();
        let grad_norm = self.adam.grad_norm(&model, &dense_grads);
        let mut report = StepReport { loss, grad_norm, emb_grad_norm: 0.0, examples: batch.size };
        if let Some(accept) = accept {
            if let Some((g, _)) = &sparse {
                report.emb_grad_norm = (g.clone().powi_scalar(2).sum().into_scalar::<f32>() as f64).sqrt();
            }
            if !accept(&report) {
                self.model = Some(model);
                return Ok((report, false));
            }
        }
        let mut model = self.adam.step(lr, model, dense_grads, grad_norm, self.grad_clip_norm);
        profile::mark(Phase::DenseOptimizer);
        if let Some((emb_grad, g)) = sparse {
            let opt = &mut self.sparse_optimizer;
            model = model.map_embedding(|e| opt.step(e, g.unique_rows, g.rows, emb_grad, emb_lr));
            profile::mark(Phase::SparseOptimizer);
        }
        self.model = Some(model);
        Ok((report, true))
    }

    /// [`Self::step_checked`] as one rank of a data-parallel job: `batch` is this rank's share
    /// (possibly empty) of the global batch. Loss, gradient norms and the accept decision are
    /// computed from the reduced gradients, so every rank decides the same.
    fn step_data_parallel(
        &mut self,
        dp: &dist::DataParallel,
        batch: &crate::data::Batch,
        lr: f64,
        emb_lr: f64,
        accept: Option<&mut dyn FnMut(&StepReport) -> bool>,
    ) -> Result<(StepReport, bool)> {
        let comm = &dp.comm;
        let inner = self.autodiff.clone().inner();
        let model = self.model.take().expect("model present between steps");
        // Each rank masks its own rows from its own part of the stream; the position then moves
        // on identically on every rank (whatever each rank drew), so checkpoints agree.
        let base = self.dropout_stream;
        self.dropout_stream = crate::rng::mix(base ^ 0xD15C_0DA7);
        let dim = model.embedding().dim();
        // A row-sharded table: this rank's rows come from their owners first (every rank takes
        // part, even with an empty share of the batch).
        let sharded = dp.embeddings == crate::dist::EmbeddingMode::Sharded;
        let (fetched, exchange) = if sharded {
            profile::mark(Phase::Data);
            let (rows, ex) = dist::RowExchange::fetch(comm.as_ref(), &model, &batch.unique_rows, &inner)?;
            profile::mark(Phase::Communication);
            (Some(rows), Some(ex))
        } else {
            (None, None)
        };
        let (grads, sparse, loss_sum) = if batch.size > 0 {
            let ad = &self.autodiff;
            let mut input = SparseInput::from_batch(batch, &self.layout, ad);
            if let Some(rows) = fetched {
                input.rows = Some(Tensor::<2>::from_data(TensorData::new(rows, [batch.unique_rows.len(), dim]), &inner));
            }
            let labels = Tensor::<1>::from_data(TensorData::new(batch.labels.clone(), [batch.size]), ad);
            profile::mark(Phase::Data);
            let pass = Pass::new(self.precision, crate::rng::mix(base ^ (dp.rank() as u64 + 1).wrapping_mul(crate::rng::GAMMA)));
            let (grads, sparse, loss_sum) = match forward_backward(&model, &input, labels, &pass, Some(batch.size as f64)) {
                Ok(out) => out,
                Err(e) => {
                    self.model = Some(model);
                    return Err(e);
                }
            };
            (Some(grads), sparse.map(|(grad, g)| (g.unique_rows, grad)), loss_sum as f64)
        } else {
            (None, None, 0.0)
        };
        let restore = |this: &mut Self, model: Model, e: anyhow::Error| {
            this.model = Some(model);
            Err(e)
        };
        // Dense: one flat all-reduce; the sums over the global batch, divided by its size.
        let mut flat = match dist::flatten(&model, grads.as_ref()) {
            Ok(f) => f,
            Err(e) => return restore(self, model, e),
        };
        let mut totals = [loss_sum, batch.size as f64];
        comm.all_reduce_sum_f32(&mut flat)?;
        comm.all_reduce_sum_f64(&mut totals)?;
        let global = totals[1];
        self.last_examples = global as usize;
        if global <= 0.0 {
            return restore(self, model, anyhow::anyhow!("the global batch is empty"));
        }
        let dense_grads = match dist::unflatten(&model, &flat, (1.0 / global) as f32, &inner) {
            Ok(g) => g,
            Err(e) => return restore(self, model, e),
        };
        drop(flat);
        // Embedding rows: every rank's touched rows and gradients, merged by row (replicated), or
        // the gradients of this rank's own rows from the ranks that used them (sharded).
        let (ids, rows_grad) = match sparse {
            Some((ids, g)) => {
                let ids = ids.into_data().convert::<i64>().try_into_vec::<i64>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let g = g.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                (ids, g)
            }
            None => (Vec::new(), Vec::new()),
        };
        let (ids, mut emb_grad) = match exchange {
            Some(ex) => ex.return_gradients(comm.as_ref(), &rows_grad, dim)?,
            None => {
                let (all_ids, _) = comm.all_gather_i64(&ids)?;
                let (all_grads, _) = comm.all_gather_f32(&rows_grad)?;
                crate::dist::merge_rows(&all_ids, &all_grads, dim)
            }
        };
        let inv = (1.0 / global) as f32;
        emb_grad.iter_mut().for_each(|g| *g *= inv);
        profile::mark(Phase::Communication);

        let grad_norm = self.adam.grad_norm(&model, &dense_grads);
        let mut report = StepReport { loss: (totals[0] / global) as f32, grad_norm, emb_grad_norm: 0.0, examples: global as usize };
        if let Some(accept) = accept {
            let mut squares = [emb_grad.iter().map(|&g| g as f64 * g as f64).sum::<f64>()];
            if sharded {
                comm.all_reduce_sum_f64(&mut squares)?; // each rank holds the gradients of its own rows
            }
            report.emb_grad_norm = squares[0].sqrt();
            if !accept(&report) {
                self.model = Some(model);
                return Ok((report, false));
            }
        }
        let mut model = self.adam.step(lr, model, dense_grads, grad_norm, self.grad_clip_norm);
        profile::mark(Phase::DenseOptimizer);
        if !ids.is_empty() {
            let u = ids.len();
            let unique = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(ids, [u]), &self.autodiff);
            let rows = model.embedding().current_rows(unique.clone());
            let grad = Tensor::<2>::from_data(TensorData::new(emb_grad, [u, dim]), &inner);
            let opt = &mut self.sparse_optimizer;
            model = model.map_embedding(|e| opt.step(e, unique, rows, grad, emb_lr));
            profile::mark(Phase::SparseOptimizer);
        }
        self.model = Some(model);
        Ok((report, true))
    }

    /// The model, Adam and the embedding optimizer as checkpoint sections (and the embedding
    /// optimizer's description for the manifest).
    pub fn save_state(&self) -> Result<(serde_json::Value, Sections)> {
        let model = checkpoint::model_bytes(self.model())?;
        let adam = self.adam.to_bytes()?;
        let (meta, sparse) = self.sparse_optimizer.save_state()?;
        Ok((meta, vec![(MODEL_SECTION.into(), model), (ADAM_SECTION.into(), adam), (SPARSE_SECTION.into(), sparse)]))
    }

    /// Restores what [`Self::save_state`] wrote (into a stepper built from the same config).
    pub fn load_state(&mut self, meta: &serde_json::Value, ckpt: &mut Checkpoint) -> Result<()> {
        let model = self.model.take().expect("model present between steps");
        self.model = Some(checkpoint::load_model_bytes(model, ckpt.take_section(MODEL_SECTION)?, "the checkpoint's model")?);
        self.adam.load_bytes(ckpt.take_section(ADAM_SECTION)?)?;
        self.sparse_optimizer.load_state(meta, ckpt.section(SPARSE_SECTION)?)
    }
}

/// Where and how a training run happens (the parts not in the experiment config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: String,
    pub out_dir: PathBuf,
    /// Progress bars and per-evaluation lines on stderr/stdout.
    pub verbose: bool,
    /// What to do with stale data caches.
    pub cache: crate::data::CachePolicy,
    /// Fault injection (tests only; `WUKONG_FAULT` at the CLI).
    pub faults: Faults,
    /// Create the run in exactly this directory (which must not exist) instead of a new
    /// `<out_dir>/<name>-seed<seed>-<time>` (the experiment runner names its points' runs).
    pub run_dir: Option<PathBuf>,
    /// A data-parallel job's collective engine (`None`: this process trains alone). Rank 0
    /// writes the run directory; every rank reads it (on several hosts it must be shared).
    pub comm: Option<crate::dist::Comm>,
    /// Searches: stop the run early when it falls below the median of finished trials.
    pub median_rule: Option<prune::MedianRule>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            out_dir: PathBuf::from("runs"),
            verbose: false,
            cache: Default::default(),
            faults: Faults::default(),
            run_dir: None,
            comm: None,
            median_rule: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub valid: Metrics,
    pub test: Option<Metrics>,
    pub seconds: f64,
    /// Loss-explosion guard events (rollbacks).
    pub guard_events: Vec<GuardEvent>,
}

fn log(verbose: bool, msg: impl AsRef<str>) {
    if verbose {
        println!("{}", msg.as_ref());
    }
}

/// Creates `<out>/<prefix>-<unix time>`, adding `-2`, `-3`, … when that exists: runs started in
/// the same second (parallel sweeps) must never share a directory.
pub fn new_run_dir(out: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    for n in 1.. {
        let name = if n == 1 { format!("{prefix}-{stamp}") } else { format!("{prefix}-{stamp}-{n}") };
        let dir = out.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!()
}

/// The best evaluation so far.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BestEval {
    pub epoch: usize,
    pub step: u64,
    pub valid_auc: f64,
    pub valid_logloss: f64,
    pub count: u64,
}

impl BestEval {
    fn metrics(&self) -> Metrics {
        Metrics { auc: self.valid_auc, logloss: self.valid_logloss, count: self.count }
    }
}

/// Everything of the training loop that is not in the model and optimizers: with them, a
/// checkpoint of this continues the run exactly.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps applied.
    pub step: u64,
    /// The epoch in progress (1-based) and the batches of it already consumed.
    pub epoch: usize,
    pub batch: usize,
    /// Training examples the model has learned from.
    pub examples: u64,
    /// Loss sum and example count of the epoch so far (its train LogLoss).
    pub epoch_loss_sum: f64,
    pub epoch_examples: u64,
    /// Plateau learning-rate scale.
    pub lr_scale: f64,
    /// Evaluations without improvement (early stopping).
    pub bad_evals: usize,
    pub best: Option<BestEval>,
    /// The best evaluation by the metric `monitor` does not select on (its weights are kept in
    /// [`checkpoint::MODEL_OTHER`]), so both selections are reported.
    #[serde(default)]
    pub best_other: Option<BestEval>,
    pub evals: usize,
    pub last_eval_step: Option<u64>,
    /// Position of the dropout mask stream.
    pub dropout_stream: u64,
    pub guard: GuardState,
    /// Seconds of training before this checkpoint (all processes of the run).
    pub seconds: f64,
    /// Checkpoints written and the seconds spent writing them (the cost of surviving crashes).
    pub checkpoints: u64,
    pub checkpoint_seconds: f64,
    /// Training finished (epochs done or early stop): a resume only scores the test split.
    pub done: bool,
    pub stop_reason: Option<String>,
}

impl TrainState {
    fn new() -> Self {
        Self {
            step: 0,
            epoch: 1,
            batch: 0,
            examples: 0,
            epoch_loss_sum: 0.0,
            epoch_examples: 0,
            lr_scale: 1.0,
            bad_evals: 0,
            best: None,
            best_other: None,
            evals: 0,
            last_eval_step: None,
            dropout_stream: 0,
            guard: GuardState::default(),
            seconds: 0.0,
            checkpoints: 0,
            checkpoint_seconds: 0.0,
            done: false,
            stop_reason: None,
        }
    }
}

/// Trains the experiment end to end and writes its run directory.
pub fn train(cfg: &ExperimentConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    run(cfg.clone(), None, opts)
}

/// Why a run's loop ended because it reached its cap (the stop reason its checkpoints keep).
fn cap_reason(epochs: usize) -> String {
    format!("{epochs} epochs done")
}

/// Whether a finished run's `result.json` says it stopped at its epoch cap with its best
/// evaluation in its last epoch: more epochs might have paid (`--resume DIR --epochs N`).
pub fn capped_while_improving(result: &serde_json::Value) -> bool {
    match (result["best_epoch"].as_u64(), result["epochs_run"].as_u64(), result["stop_reason"].as_str()) {
        (Some(best), Some(run), Some(why)) => best == run && why == cap_reason(run as usize),
        _ => false,
    }
}

/// Continues the run in `run_dir` from its newest valid checkpoint (`wukong train --resume`).
/// With the same thread count on the CPU the result is bit-identical to a run never interrupted.
pub fn resume(run_dir: &Path, opts: &RunOptions) -> Result<TrainOutcome> {
    let cfg = checkpoint::saved_config(run_dir)?;
    run(cfg, Some(Resume { dir: run_dir.to_path_buf(), extended_from: None }), opts)
}

/// Continues the run in `run_dir` with a larger epoch cap (`wukong train --resume DIR --epochs N`):
/// a run that reached its cap still improving goes on instead of starting over, and (same thread
/// count on the CPU) ends bit-identical to a run started with `epochs = N`. Refused where it could
/// not be that run: fewer epochs, a run that stopped early (patience or pruning: more epochs
/// change nothing), or a warm-up set as a fraction of the planned steps (it would lengthen).
pub fn extend(run_dir: &Path, epochs: usize, opts: &RunOptions) -> Result<TrainOutcome> {
    let mut cfg = checkpoint::saved_config(run_dir)?;
    let old = cfg.train.epochs;
    anyhow::ensure!(
        epochs >= old,
        "cannot extend {} to {epochs} epochs: it was started with {old}; a run can be extended, not shortened",
        run_dir.display()
    );
    anyhow::ensure!(
        cfg.train.warmup_fraction == 0.0 || epochs == old,
        "cannot extend {}: its warm-up is train.warmup_fraction = {} of the planned steps, so with {epochs} epochs it would be longer than the one it trained with; start a new run instead",
        run_dir.display(),
        cfg.train.warmup_fraction
    );
    cfg.train.epochs = epochs;
    run(cfg, Some(Resume { dir: run_dir.to_path_buf(), extended_from: Some(old) }), opts)
}

/// The run directory being continued, and the epoch cap it had when it is being extended.
struct Resume {
    dir: PathBuf,
    extended_from: Option<usize>,
}

/// The device generator's seed for one step: it drives the stochastic rounding of half-precision
/// tables, and re-seeding it per step makes that stream a function of (seed, step), so a resumed
/// run draws what the uninterrupted one drew.
fn step_seed(seed: u64, step: u64) -> u64 {
    crate::rng::mix(seed ^ step.wrapping_mul(crate::rng::GAMMA))
}

/// What a user should hear before a run whose plan cannot work well: epochs of a handful of
/// steps, or a warm-up that outlasts the run (its learning rate never reaches the set value).
fn plan_warnings(fresh: bool, batches: usize, warmup: u64, planned: u64, t: &TrainConfig) -> Vec<String> {
    let mut out = Vec::new();
    if !fresh {
        return out;
    }
    if batches < 20 {
        out.push(format!(
            "an epoch is only {batches} step(s) (batch_size {}): the optimizers see few updates per epoch; a batch size of about rows/20 or less (--batch-size) usually trains better",
            t.batch_size
        ));
    }
    if warmup >= planned {
        out.push(format!(
            "the warm-up ({warmup} steps) lasts the whole run ({planned} steps = {} epochs × {batches}): the learning rates never reach their set values; lower train.warmup_steps or use train.warmup_fraction = 0.1",
            t.epochs
        ));
    }
    out
}

/// Keeps the lines of `metrics.jsonl` whose step is at most `step` (a resumed or rolled-back run
/// rewrites what came after its checkpoint).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    crate::runtime::write_atomic(path, kept.as_bytes())
}

fn append_line(path: &Path, line: &serde_json::Value) -> Result<()> {
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_data().with_context(|| format!("cannot fsync {}", path.display()))?;
    Ok(())
}

/// The loop's world: what stays fixed for the run, and the state that moves.
struct Loop<'a> {
    cfg: &'a ExperimentConfig,
    verbose: bool,
    run_dir: PathBuf,
    encoder: Encoder,
    valid_data: SplitData,
    device: Device,
    stepper: Stepper,
    state: TrainState,
    ckpts: CheckpointDir,
    /// When this process started training, and the state's seconds at that moment.
    clock: Instant,
    seconds_before: f64,
    last_checkpoint: Instant,
    /// Warm-up length in steps (from `warmup_steps` or `warmup_fraction`).
    warmup: u64,
    /// This process writes the run directory (rank 0, or the only process).
    writer: bool,
    /// A row-sharded job: this rank's own directory (its weights and checkpoints).
    shard_dir: Option<PathBuf>,
    /// Searches: the median stopping rule.
    median_rule: Option<prune::MedianRule>,
    /// The running mean of the weights (`train.average_from_epoch`; empty until it starts).
    average: average::WeightAverage,
}

/// The checkpoint section holding the running weight mean (present once it holds a snapshot).
const AVERAGE_SECTION: &str = "weight_average";

impl Loop<'_> {
    fn seconds(&self) -> f64 {
        self.seconds_before + self.clock.elapsed().as_secs_f64()
    }

    fn checkpoint(&mut self) -> Result<()> {
        let start = Instant::now();
        self.state.dropout_stream = self.stepper.dropout_stream();
        self.state.seconds = self.seconds();
        self.state.checkpoints += 1;
        if let Some(dp) = self.stepper.data_parallel() {
            // a checkpoint of rank 0 stands for every rank: they must hold the same weights
            dp.check_replicas(self.stepper.model(), self.state.step)?;
        }
        if !self.keeps_files() {
            self.last_checkpoint = Instant::now();
            return Ok(());
        }
        let (meta, mut sections) = self.stepper.save_state()?;
        if self.average.count() > 0 {
            sections.push((AVERAGE_SECTION.into(), self.average.to_bytes()));
        }
        let state = serde_json::json!({ "train": self.state, "sparse_optimizer": meta, "encoder_fingerprint": self.encoder.fingerprint() });
        self.ckpts.write(self.state.step, &Checkpoint { state, sections })?;
        // counted after the write: the state on disk holds the time up to the previous one
        self.state.checkpoint_seconds += start.elapsed().as_secs_f64();
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Restores the stepper from `ckpt` and returns its training state and weight mean.
    fn restore(stepper: &mut Stepper, mut ckpt: Checkpoint) -> Result<(TrainState, average::WeightAverage)> {
        let state: TrainState =
            serde_json::from_value(ckpt.state["train"].clone()).context("the checkpoint's training state is unreadable")?;
        let meta = ckpt.state["sparse_optimizer"].clone();
        let average = match ckpt.section(AVERAGE_SECTION) {
            Ok(b) => average::WeightAverage::from_bytes(b)?,
            Err(_) => average::WeightAverage::default(),
        };
        stepper.load_state(&meta, &mut ckpt)?;
        stepper.set_dropout_stream(state.dropout_stream);
        Ok((state, average))
    }

    /// Whether this process writes checkpoints and best weights: rank 0 (or the only process),
    /// and in a row-sharded job every rank (its own part).
    fn keeps_files(&self) -> bool {
        self.writer || self.shard_dir.is_some()
    }

    /// Where this process keeps `name` (a model file): its shard directory in a row-sharded job.
    fn own_path(&self, name: &str) -> PathBuf {
        self.shard_dir.as_ref().unwrap_or(&self.run_dir).join(name)
    }

    fn newest_checkpoint(&self) -> Result<(PathBuf, Checkpoint)> {
        if let (Some(dp), Some(_)) = (self.stepper.data_parallel(), &self.shard_dir) {
            // every rank holds its own part: go back to the newest step all ranks have intact
            // (each rank lists a step at most once, so a step on all of them appears N times)
            let mine: Vec<i64> = self.ckpts.valid_steps()?.into_iter().map(|s| s as i64).collect();
            let (all, _) = dp.comm.all_gather_i64(&mine)?;
            let step = mine
                .iter()
                .rev()
                .find(|&&s| all.iter().filter(|&&a| a == s).count() == dp.size())
                .with_context(|| format!("no checkpoint step is intact on every rank (this rank, {}, has {mine:?})", dp.rank()))?;
            return self.ckpts.at(*step as u64);
        }
        let (found, refused) = self.ckpts.newest_valid()?;
        for r in &refused {
            tracing::warn!("refusing checkpoint {r}");
        }
        found.with_context(|| {
            format!(
                "no valid checkpoint in {}{}",
                self.ckpts.dir.display(),
                if refused.is_empty() { String::new() } else { format!(" (refused: {})", refused.join("; ")) }
            )
        })
    }

    /// Evaluates on the validation split, updates best/patience, logs a `metrics.jsonl` line,
    /// saves the best weights, checkpoints. `epoch` is the epoch the evaluation belongs to.
    fn evaluate(&mut self, epoch: usize, train_logloss: f64, end_of_epoch: bool, epoch_secs: Option<f64>) -> Result<()> {
        let t = &self.cfg.train;
        // From the end of epoch `average_from_epoch` on, the running weight mean stands for the model.
        let from = t.average_from_epoch;
        let averaged = if from > 0 && (epoch > from || (end_of_epoch && epoch == from)) {
            self.average.add(self.stepper.model())?;
            Some(self.average.apply(self.stepper.model().valid())?)
        } else {
            None
        };
        let evaluated = averaged.as_ref().unwrap_or(self.stepper.model());
        let valid = score_on(
            &evaluated.valid(),
            &self.valid_data,
            &self.encoder,
            t.eval_batch_size,
            t.precision,
            &self.device,
            self.stepper.data_parallel(),
        )
        .with_context(|| format!("validation at step {}", self.state.step))?
        .0;
        let seconds = self.seconds();
        let (model_path, other_path) = (self.own_path(checkpoint::MODEL), self.own_path(checkpoint::MODEL_OTHER));
        let keeps_files = self.keeps_files();
        let s = &mut self.state;
        s.evals += 1;
        s.last_eval_step = Some(s.step);
        let improved = s.best.as_ref().is_none_or(|b| t.monitor.score(&valid) > t.monitor.score(&b.metrics()));
        if improved {
            s.best = Some(BestEval { epoch, step: s.step, valid_auc: valid.auc, valid_logloss: valid.logloss, count: valid.count });
            s.bad_evals = 0;
            if keeps_files {
                checkpoint::save_model(evaluated, &model_path)?;
            }
        } else if s.step > self.warmup {
            s.bad_evals += 1;
            s.lr_scale = plateau_cut(s.lr_scale, t.plateau_lr_factor, t.plateau_min_lr_scale);
        }
        if end_of_epoch && t.lr_milestones.contains(&epoch) {
            s.lr_scale *= t.lr_milestone_factor;
        }
        let other = t.monitor.other();
        if s.best_other.as_ref().is_none_or(|b| other.score(&valid) > other.score(&b.metrics())) {
            s.best_other = Some(BestEval { epoch, step: s.step, valid_auc: valid.auc, valid_logloss: valid.logloss, count: valid.count });
            if keeps_files {
                checkpoint::save_model(evaluated, &other_path)?;
            }
        }
        let mut line = serde_json::json!({
            "epoch": epoch, "step": s.step, "examples": s.examples, "end_of_epoch": end_of_epoch,
            "train_logloss": train_logloss, "valid_auc": valid.auc, "valid_logloss": valid.logloss,
            "lr": t.lr * s.lr_scale * s.guard.lr_scale, "seconds": seconds,
            "epoch_seconds": epoch_secs, "best": improved,
        });
        let mean_of = averaged.as_ref().map(|_| self.average.count());
        if let Some(n) = mean_of {
            line["averaged_over"] = n.into();
        }
        if self.writer {
            append_line(&self.run_dir.join(checkpoint::METRICS), &line)?;
        }
        let what = if end_of_epoch { format!("epoch {epoch:>3}") } else { format!("step {:>6}", s.step) };
        log(
            self.verbose,
            format!(
                "{what}: train logloss {train_logloss:.5}  valid AUC {:.6}  LogLoss {:.6}  ({} examples, {:.1}s){}{}",
                valid.auc,
                valid.logloss,
                s.examples,
                seconds,
                mean_of.map_or(String::new(), |n| format!("  (weights: mean of {n})")),
                if improved { "  *best" } else { "" }
            ),
        );
        if let (Some(rule), Some(best)) = (&self.median_rule, s.best.as_ref()) {
            let why = rule.check(t.monitor, s.evals, t.monitor.score(&best.metrics()))?;
            if let Some(why) = why.filter(|_| !s.done) {
                log(self.verbose, why.clone());
                s.done = true;
                s.stop_reason = Some(why);
            }
        }
        if !s.done && s.bad_evals >= t.patience.max(1) {
            let best = s.best.map(|b| b.step).unwrap_or(0);
            log(
                self.verbose,
                format!("early stop: no validation {:?} improvement in {} evaluation(s); best at step {best}", t.monitor, s.bad_evals),
            );
            s.done = true;
            s.stop_reason = Some(format!("early stop after {} evaluations without improvement", s.bad_evals));
        }
        self.checkpoint()
    }
}

/// The plateau rule's new learning-rate scale after an evaluation without improvement: cut by
/// `factor`, never below `floor` — and never raised: a milestone cut (`lr_milestones`) may
/// already have taken the scale under the floor.
fn plateau_cut(scale: f64, factor: f64, floor: f64) -> f64 {
    (scale * factor).max(floor).min(scale)
}

fn run(cfg: ExperimentConfig, resume: Option<Resume>, opts: &RunOptions) -> Result<TrainOutcome> {
    let cfg = &cfg;
    let t = &cfg.train;
    let comm = opts.comm.clone();
    let (rank, ranks) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
    let writer = rank == 0;
    let v = opts.verbose && writer;
    let faults = &opts.faults.for_rank(rank);
    cfg.validate()?;
    anyhow::ensure!(
        t.average_from_epoch == 0 || !cfg.model.uses_batch_norm(),
        "train.average_from_epoch needs a model without batch norm: its running statistics belong to the raw weights, not to their mean (they would need recomputing on the training data); set batch_norm = false or average_from_epoch = 0"
    );
    anyhow::ensure!(
        t.average_from_epoch == 0 || ranks == 1,
        "train.average_from_epoch is not supported in data-parallel jobs yet: train in one process or set it to 0"
    );
    anyhow::ensure!(
        ranks == 1 || !cfg.model.uses_batch_norm(),
        "batch_norm = true is not supported in data-parallel jobs yet: each rank would normalise its share of the batch with its own statistics (it needs synchronized batch norm); set batch_norm = false or train in one process"
    );

    // Data: fit the encoder on train only (or take it from the cache), encode every split. In a
    // job, rank 0 first (it may write the cache), then the others (reading it).
    if let Some(c) = comm.as_ref().filter(|_| !writer) {
        c.barrier()?;
    }
    let prepared = crate::data::prepare(&cfg.data, opts.cache);
    if let Some(c) = comm.as_ref().filter(|_| writer) {
        c.barrier()?;
    }
    let prepared = prepared?;
    let encoder = prepared.encoder;
    let mut data_log = serde_json::Map::new();
    let mut bayes = serde_json::Map::new();
    let mut splits = std::collections::HashMap::new();
    for (name, data, l) in prepared.splits {
        log(
            v,
            format!(
                "{name}: {} rows{}, positive rate {:.4}, {} malformed rows skipped, {} values out of vocabulary, {} multi-hot values truncated ({:.1}s{})",
                l.rows,
                if matches!(data, SplitData::Stream(_)) { " (streamed)" } else { "" },
                l.positive_rate,
                l.skipped,
                l.oov,
                l.truncated,
                l.seconds,
                if l.from_cache { ", from cache" } else { "" }
            ),
        );
        if let Some(b) = l.bayes_logloss {
            log(v, format!("{name}: Bayes-optimal LogLoss {b:.6} (synthetic data: the teacher's own probabilities)"));
            bayes.insert(name.to_string(), b.into());
        }
        data_log.insert(name.to_string(), serde_json::to_value(&l)?);
        splits.insert(name, data);
    }
    let train_data = splits.remove("train").context("no training split")?;
    let valid_data = splits.remove("valid").context("no validation split")?;
    let test_data = splits.remove("test");
    log(v, format!("schema: {}", encoder.describe()));
    let shape = DataShape::of(&encoder);
    cfg.model.check_shape(&shape)?;
    let layout = SlotLayout::of(&encoder);
    let total_rows = shape.table_rows;
    let (encoded_rows, extra) = (encoder.total_rows(), encoder.extra_embeddings());

    // Run directory: a new one, or the one being resumed (whose data must encode the same way).
    // In a job rank 0 creates it and tells the others its name.
    let resume_dir = resume.as_ref().map(|r| r.dir.clone());
    let run_dir = match &resume_dir {
        None if !writer => {
            let c = comm.as_ref().expect("a non-zero rank is part of a job");
            let name = c.broadcast_bytes(0, Vec::new())?;
            PathBuf::from(String::from_utf8(name).context("the run directory's name from rank 0 is not UTF-8")?)
        }
        Some(dir) => {
            let saved = Encoder::load(&dir.join(checkpoint::ENCODER))?;
            anyhow::ensure!(
                saved.fingerprint() == encoder.fingerprint(),
                "cannot resume {}: the training data now encodes differently (encoder {} → {}); the files changed since the run started",
                dir.display(),
                saved.fingerprint(),
                encoder.fingerprint()
            );
            dir.clone()
        }
        None => {
            let dir = match &opts.run_dir {
                Some(d) => {
                    anyhow::ensure!(!d.exists(), "run directory {} exists already", d.display());
                    std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
                    d.clone()
                }
                None => new_run_dir(&opts.out_dir, &format!("{}-seed{}", cfg.name, t.seed))?,
            };
            crate::runtime::write_atomic(&dir.join(checkpoint::CONFIG), cfg.to_toml().as_bytes())?;
            encoder.save(&dir.join(checkpoint::ENCODER))?;
            let mut env = crate::runtime::env_info(&opts.device);
            env["data"] = serde_json::Value::Object(data_log);
            env["ranks"] = ranks.into();
            crate::runtime::write_atomic(&dir.join(checkpoint::ENV), serde_json::to_string_pretty(&env)?.as_bytes())?;
            crate::runtime::write_atomic(&dir.join(checkpoint::METRICS), b"")?;
            if let Some(c) = &comm {
                c.broadcast_bytes(0, dir.to_string_lossy().into_owned().into_bytes())?;
            }
            dir
        }
    };

    // Model and optimizers.
    let device = crate::runtime::parse_device(&opts.device)?;
    device.seed(t.seed);
    let ad = device.clone().autodiff();
    // A row-sharded job keeps rows rank, rank + N, … of the table every rank draws alike.
    let sharded = ranks > 1 && t.embedding_sharding == crate::dist::EmbeddingMode::Sharded;
    let model = if sharded {
        cfg.model.init_shard(&shape, t.emb_storage, rank, ranks, &ad)
    } else {
        cfg.model.init_with_storage(&shape, t.emb_storage, &ad)
    };
    let shard_dir = sharded.then(|| checkpoint::shard_dir(&run_dir, rank, ranks));
    let (emb_params, dense_params) = model.param_counts();
    log(
        v,
        format!(
            "model {}: {dense_params} dense + {emb_params} embedding parameters ({total_rows} rows × {}, {:?} table: {:.1} MiB), {:.4} MFLOP/example forward",
            cfg.model.name(),
            cfg.model.embedding_dim(),
            t.emb_storage,
            model.embedding().table_bytes() as f64 / (1 << 20) as f64,
            cfg.model.forward_flops(&shape) as f64 / 1e6
        ),
    );
    let mut stepper = Stepper::new(model, &cfg.model, t, layout, &device);
    if let Some(c) = &comm {
        stepper.set_data_parallel(dist::DataParallel { comm: c.clone(), embeddings: t.embedding_sharding });
        log(
            v,
            format!(
                "data parallel: {ranks} ranks, global batch {} ({} per rank), embeddings {:?}",
                t.batch_size,
                t.batch_size / ranks,
                t.embedding_sharding
            ),
        );
    }
    if sharded && writer && resume_dir.is_none() {
        let shards: Vec<serde_json::Value> = (0..ranks)
            .map(|r| {
                serde_json::json!({ "rank": r, "rows": crate::dist::shard_rows(total_rows, r, ranks),
                    "dir": checkpoint::shard_dir(Path::new(""), r, ranks) })
            })
            .collect();
        let manifest = serde_json::json!({
            "ranks": ranks, "table_rows": total_rows, "embedding_dim": cfg.model.embedding_dim(),
            "rule": "global row r is row r / ranks of rank r % ranks",
            "shards": shards,
        });
        std::fs::create_dir_all(run_dir.join("shards"))?;
        crate::runtime::write_atomic(&run_dir.join("shards").join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    }
    if let Some(d) = &shard_dir {
        log(
            opts.verbose,
            format!(
                "rank {rank}: {} of the table's {total_rows} rows ({:.1} MiB) and their optimizer state",
                stepper.model().embedding().rows(),
                stepper.model().embedding().table_bytes() as f64 / (1 << 20) as f64
            ),
        );
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let ckpts = CheckpointDir::new(shard_dir.as_ref().unwrap_or(&run_dir), t.keep_checkpoints, faults)?;
    let mut lp = Loop {
        cfg,
        verbose: v,
        run_dir: run_dir.clone(),
        encoder,
        valid_data,
        device: device.clone(),
        stepper,
        state: TrainState::new(),
        ckpts,
        clock: Instant::now(),
        seconds_before: 0.0,
        last_checkpoint: Instant::now(),
        warmup: 0,
        writer,
        shard_dir: shard_dir.clone(),
        median_rule: opts.median_rule.clone(),
        average: average::WeightAverage::default(),
    };
    if resume_dir.is_some() {
        let (path, ckpt) = lp.newest_checkpoint()?;
        let fingerprint = ckpt.state["encoder_fingerprint"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(
            fingerprint == lp.encoder.fingerprint(),
            "cannot resume from {}: it was written with encoder {fingerprint}, the data now encodes as {}",
            path.display(),
            lp.encoder.fingerprint()
        );
        stepper = lp.stepper;
        let (mut restored, average) =
            Loop::restore(&mut stepper, ckpt).with_context(|| format!("cannot resume from {}", path.display()))?;
        lp.stepper = stepper;
        lp.average = average;
        if let Some(old) = resume.as_ref().and_then(|r| r.extended_from) {
            if restored.done {
                anyhow::ensure!(
                    restored.stop_reason.as_deref() == Some(cap_reason(old).as_str()),
                    "cannot extend {}: it stopped early ({}), which more epochs would not change",
                    run_dir.display(),
                    restored.stop_reason.as_deref().unwrap_or("no reason recorded")
                );
                restored.done = false;
                restored.stop_reason = None;
            }
            if writer {
                crate::runtime::write_atomic(&run_dir.join(checkpoint::CONFIG), cfg.to_toml().as_bytes())?;
            }
            log(v, format!("extending the run from {old} to {} epochs", t.epochs));
        }
        log(v, format!("resuming from {} (step {}, epoch {}, batch {})", path.display(), restored.step, restored.epoch, restored.batch));
        lp.seconds_before = restored.seconds;
        lp.state = restored;
        if writer {
            truncate_metrics(&run_dir.join(checkpoint::METRICS), lp.state.step)?;
        }
    } else {
        lp.checkpoint()?; // step 0: resume and rollback always have a checkpoint to go back to
    }

    let loader = BatchLoader::from_split(train_data, encoded_rows, t.batch_size, cfg.data.chunk_rows, cfg.data.shuffle_chunks)
        .with_extra(extra)
        .fail_at_batch(faults.loader_error_at_batch)
        .sharded(rank, ranks);
    let nb = loader.num_batches();
    anyhow::ensure!(nb > 0, "the training split is empty");
    let planned = (t.epochs as u64).saturating_mul(nb as u64);
    let warmup = if t.warmup_fraction > 0.0 { (t.warmup_fraction * planned as f64).ceil() as u64 } else { t.warmup_steps as u64 };
    for w in plan_warnings(lp.state.step == 0 && writer, nb, warmup, planned, t) {
        tracing::warn!("{w}");
    }
    lp.warmup = warmup;
    let guard_cfg = GuardConfig::of(t);
    // Injected anomalies fire until the first rollback (so a test can watch the run recover).
    let mut inject = true;

    'epochs: while !lp.state.done {
        if lp.state.epoch > t.epochs {
            lp.state.done = true;
            lp.state.stop_reason = Some(cap_reason(t.epochs));
            break;
        }
        let epoch = lp.state.epoch;
        let epoch_start = Instant::now();
        let bar = if v && ranks == 1 { ProgressBar::new(nb as u64) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("epoch {msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}").unwrap().progress_chars("=> "));
        bar.set_message(format!("{epoch}/{}", t.epochs));
        bar.set_position(lp.state.batch as u64);
        let mut batches = loader.epoch_from(Some(t.seed.wrapping_add(epoch as u64)), lp.state.batch);
        while lp.state.batch < nb {
            let bi = lp.state.batch;
            let mut batch = match batches.next() {
                Some(b) => b.with_context(|| format!("reading training batch {bi} of epoch {epoch}"))?,
                None => bail!("the training loader ended epoch {epoch} after {bi} of {nb} batches"),
            };
            let g = ((epoch - 1) * nb + bi) as u64;
            lp.state.batch += 1;
            bar.inc(1);
            if lp.state.guard.skips(g) {
                continue;
            }
            let next = lp.state.step + 1;
            if inject && faults.nan_at_step == Some(next) {
                batch.labels[0] = f32::NAN;
            }
            if inject && faults.spike_at_steps.is_some_and(|(a, b)| (a..=b).contains(&next)) {
                batch.labels.iter_mut().for_each(|y| *y = 1.0 - *y);
            }
            let warm = if warmup > 0 { (next as f64 / warmup as f64).min(1.0) } else { 1.0 };
            let scale = warm * lp.state.lr_scale * lp.state.guard.lr_scale;
            device.seed(step_seed(t.seed, next));
            let mut verdict = None;
            let guard = &lp.state.guard;
            let (report, applied) = lp.stepper.step_checked(
                &batch,
                t.lr * scale,
                t.emb_lr * scale,
                Some(&mut |r: &StepReport| {
                    verdict = guard.check(&guard_cfg, r);
                    verdict.is_none()
                }),
            )?;
            if !applied {
                let kind = verdict.unwrap_or("non_finite");
                let s = &lp.state;
                if t.guard == GuardPolicy::Fail || s.guard.rollbacks >= t.guard_max_rollbacks {
                    let ev = s.guard.event(kind, next, epoch, bi, &report, "fail".into());
                    bar.finish_and_clear();
                    let why = if t.guard == GuardPolicy::Fail {
                        "train.guard = \"fail\"".to_string()
                    } else {
                        format!("giving up after {} rollbacks (train.guard_max_rollbacks)", s.guard.rollbacks)
                    };
                    bail!("{}; {why}. The last checkpoint is intact in {}", guard::describe(&ev), lp.ckpts.dir.display());
                }
                // Rollback: the newest checkpoint, minus the batches from it to here.
                let mut memory = lp.state.guard.clone();
                let (path, ckpt) = lp.newest_checkpoint()?;
                let (restored, average) =
                    Loop::restore(&mut lp.stepper, ckpt).with_context(|| format!("rollback to {}", path.display()))?;
                lp.average = average;
                let from = ((restored.epoch - 1) * nb + restored.batch) as u64;
                let action = format!(
                    "rolled back to step {} ({}); skipping batches {from}..={g}; learning rates ×{}",
                    restored.step,
                    path.display(),
                    t.guard_lr_factor
                );
                let ev = memory.event(kind, next, epoch, bi, &report, action);
                tracing::warn!("guard: {}; {}", guard::describe(&ev), ev.action);
                memory.events.push(ev);
                memory.skip.push((from, g));
                memory.rollbacks += 1;
                memory.lr_scale *= t.guard_lr_factor;
                inject = false;
                lp.state = restored;
                lp.state.guard = memory;
                if writer {
                    truncate_metrics(&run_dir.join(checkpoint::METRICS), lp.state.step)?;
                }
                bar.finish_and_clear();
                continue 'epochs;
            }
            let examples = lp.stepper.last_step_examples() as u64;
            let s = &mut lp.state;
            s.step = next;
            s.examples += examples;
            s.epoch_loss_sum += report.loss as f64 * examples as f64;
            s.epoch_examples += examples;
            s.guard.observe(&guard_cfg, report.loss, report.examples);
            if faults.diverge_at_step == Some(s.step) {
                lp.stepper.perturb_for_tests();
            }
            let s = &lp.state;
            if faults.abort_at_step == Some(s.step) {
                tracing::error!("fault injection: aborting after step {}", s.step);
                std::process::abort();
            }
            if lp.state.batch < nb {
                let s = &lp.state;
                if t.eval_every_steps > 0 && s.step.is_multiple_of(t.eval_every_steps as u64) {
                    let train_ll = s.epoch_loss_sum / s.epoch_examples.max(1) as f64;
                    lp.evaluate(epoch, train_ll, false, None)?;
                    if lp.state.done {
                        bar.finish_and_clear();
                        break 'epochs;
                    }
                } else {
                    let by_steps = t.checkpoint_every_steps > 0 && s.step.is_multiple_of(t.checkpoint_every_steps as u64);
                    let mut by_time =
                        t.checkpoint_every_secs > 0.0 && lp.last_checkpoint.elapsed().as_secs_f64() >= t.checkpoint_every_secs;
                    if let Some(dp) = lp.stepper.data_parallel().filter(|_| t.checkpoint_every_secs > 0.0) {
                        // rank 0's clock decides for all: every rank must reach the same collectives
                        by_time = dp.comm.broadcast_bytes(0, vec![u8::from(by_time)])?.first() == Some(&1);
                    }
                    if by_steps || by_time {
                        lp.checkpoint()?;
                    } else if let Some(dp) = lp.stepper.data_parallel()
                        && t.replica_check_every_steps > 0
                        && s.step.is_multiple_of(t.replica_check_every_steps as u64)
                    {
                        dp.check_replicas(lp.stepper.model(), s.step)?;
                    }
                }
            }
        }
        drop(batches);
        bar.finish_and_clear();
        // End of the epoch: the position moves to the next one before the evaluation's checkpoint.
        let s = &mut lp.state;
        let train_ll = s.epoch_loss_sum / s.epoch_examples.max(1) as f64;
        s.epoch += 1;
        s.batch = 0;
        s.epoch_loss_sum = 0.0;
        s.epoch_examples = 0;
        if s.last_eval_step == Some(s.step) {
            lp.checkpoint()?;
        } else {
            lp.evaluate(epoch, train_ll, true, Some(epoch_start.elapsed().as_secs_f64()))?;
        }
    }
    lp.state.done = true;
    lp.checkpoint()?;

    // Restore the best weights and score the test split with them.
    let best_eval = lp.state.best.context("no evaluation was made")?;
    if let Some(c) = &comm {
        c.barrier()?; // rank 0 has written the best weights
    }
    let load = |name: &str| match &shard_dir {
        Some(d) => checkpoint::load_model_shard(cfg, &lp.encoder, &d.join(name), &device, rank, ranks),
        None => checkpoint::load_model(cfg, &lp.encoder, &run_dir.join(name), &device),
    };
    let best = load(checkpoint::MODEL)?;
    let (test, test_logits) = match &test_data {
        Some(d) => {
            let (m, logits) = score_on(&best, d, &lp.encoder, t.eval_batch_size, t.precision, &device, lp.stepper.data_parallel())?;
            (Some(m), Some(logits))
        }
        None => (None, None),
    };
    let valid = best_eval.metrics();
    // Platt scaling of the selected checkpoint, fitted on the validation split's logits: the same
    // ranking (test AUC unchanged), probabilities calibrated (an AUC-selected epoch is often an
    // over-confident one: its LogLoss is what this repairs). Every rank scores (a collective).
    let calibrated = match (&lp.valid_data, &test_data, &test_logits) {
        (SplitData::Memory(vd), Some(SplitData::Memory(td)), Some(tl)) => {
            let (_, vl) =
                score_on(&best, &lp.valid_data, &lp.encoder, t.eval_batch_size, t.precision, &device, lp.stepper.data_parallel())?;
            match crate::metrics::platt(&vl, &vd.labels) {
                Some((a, b)) => {
                    let map = |l: &[f32]| {
                        let mut l = l.to_vec();
                        crate::metrics::apply_platt((a, b), &mut l);
                        l
                    };
                    let (cv, ct) = (metrics_of(&map(&vl), &vd.labels)?, metrics_of(&map(tl), &td.labels)?);
                    log(
                        v,
                        format!(
                            "calibrated on the validation split (Platt: σ({a:.4}·z {b:+.4})): test LogLoss {:.6} (uncalibrated {:.6}), AUC {:.6}",
                            ct.logloss,
                            test.map_or(f64::NAN, |m| m.logloss),
                            ct.auc
                        ),
                    );
                    serde_json::json!({ "method": "platt", "a": a, "b": b, "valid_logloss": cv.logloss, "valid_auc": cv.auc,
                        "test_logloss": ct.logloss, "test_auc": ct.auc })
                }
                None => serde_json::Value::Null,
            }
        }
        _ => serde_json::Value::Null,
    };
    // The other selection (by the metric not monitored), scored on test too; and the reliability
    // of the monitored one (predicted vs observed rate per decile of the test predictions).
    let mut selections = serde_json::Map::new();
    let describe_sel = |b: &BestEval, m: Option<Metrics>| {
        serde_json::json!({ "epoch": b.epoch, "step": b.step, "valid_auc": b.valid_auc, "valid_logloss": b.valid_logloss,
            "test_auc": m.map(|m| m.auc), "test_logloss": m.map(|m| m.logloss) })
    };
    selections.insert(format!("{:?}", t.monitor).to_lowercase(), describe_sel(&best_eval, test));
    if let Some(other) = lp.state.best_other {
        let path = shard_dir.as_ref().unwrap_or(&run_dir).join(checkpoint::MODEL_OTHER);
        let m = match (&test_data, path.exists()) {
            (Some(d), true) => {
                let model = load(checkpoint::MODEL_OTHER)?;
                Some(score_on(&model, d, &lp.encoder, t.eval_batch_size, t.precision, &device, lp.stepper.data_parallel())?.0)
            }
            _ => None,
        };
        selections.insert(format!("{:?}", t.monitor.other()).to_lowercase(), describe_sel(&other, m));
        if let Some(m) = m {
            log(
                v,
                format!(
                    "selected by {:?} instead (step {}): test AUC {:.6} LogLoss {:.6}",
                    t.monitor.other(),
                    other.step,
                    m.auc,
                    m.logloss
                ),
            );
        }
    }
    // A row-sharded job leaves whole models in the run directory too, so `eval`, `predict` and
    // `serve` read it like any run (rank 0 assembles them).
    if let (Some(dp), Some(d)) = (lp.stepper.data_parallel(), &shard_dir) {
        for name in [checkpoint::MODEL, checkpoint::MODEL_OTHER] {
            if !d.join(name).exists() {
                continue;
            }
            let part = if name == checkpoint::MODEL { best.clone() } else { load(name)? };
            if let Some(whole) = dist::assemble_sharded(dp.comm.as_ref(), part, total_rows, &device)? {
                checkpoint::save_model(&whole, &run_dir.join(name))?;
            }
        }
    }
    if let (true, Some(SplitData::Memory(data)), Some(logits)) = (writer, &test_data, &test_logits) {
        let scores: Vec<(f64, bool)> =
            logits.iter().zip(&data.labels).map(|(&z, &y)| (1.0 / (1.0 + (-z as f64).exp()), y >= 0.5)).collect();
        let mut table = String::from("decile,mean_predicted,observed_rate,count\n");
        for (i, (p, o, n)) in crate::metrics::reliability(&scores, 10).into_iter().enumerate() {
            table.push_str(&format!("{},{p:.6},{o:.6},{n}\n", i + 1));
        }
        crate::runtime::write_atomic(&run_dir.join(checkpoint::RELIABILITY), table.as_bytes())?;
    }
    let seconds = lp.seconds();
    let epochs_run = if lp.state.batch > 0 { lp.state.epoch } else { lp.state.epoch - 1 }.max(1);
    let guard_events = lp.state.guard.events.clone();
    if !guard_events.is_empty() {
        log(v, format!("guard: {} rollback(s) during the run:", guard_events.len()));
        for e in &guard_events {
            log(v, format!("  {} — {}", guard::describe(e), e.action));
        }
    }
    let result = serde_json::json!({
        "best_epoch": best_eval.epoch, "best_step": best_eval.step, "epochs_run": epochs_run, "steps": lp.state.step,
        "examples": lp.state.examples, "valid_auc": valid.auc, "valid_logloss": valid.logloss,
        "test_auc": test.map(|m| m.auc), "test_logloss": test.map(|m| m.logloss), "seconds": seconds,
        "dense_params": dense_params, "embedding_params": emb_params, "forward_flops_per_example": cfg.model.forward_flops(&shape),
        "stop_reason": lp.state.stop_reason, "guard_rollbacks": lp.state.guard.rollbacks, "guard_events": guard_events,
        "checkpoints_written": lp.state.checkpoints, "checkpoint_seconds": lp.state.checkpoint_seconds,
        "best_weights_digest": checkpoint::weights_digest(&best)?, "final_weights_digest": checkpoint::weights_digest(lp.stepper.model())?,
        "bayes_logloss": bayes, "selected_by": selections, "calibrated": calibrated,
    });
    if writer {
        crate::runtime::write_atomic(&run_dir.join(checkpoint::RESULT), serde_json::to_string_pretty(&result)?.as_bytes())?;
    }
    Ok(TrainOutcome { run_dir, best_epoch: best_eval.epoch, epochs_run, valid, test, seconds, guard_events })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_counts_as_capped_while_improving_only_at_its_cap_with_its_best_last() {
        let r = |best: u64, run: u64, why: &str| serde_json::json!({ "best_epoch": best, "epochs_run": run, "stop_reason": why });
        assert!(super::capped_while_improving(&r(20, 20, "20 epochs done")));
        assert!(!super::capped_while_improving(&r(17, 20, "20 epochs done")), "best before the cap");
        assert!(!super::capped_while_improving(&r(8, 8, "early stop after 3 evaluations without improvement")));
        assert!(!super::capped_while_improving(&r(4, 4, "pruned by the median rule at evaluation 4: …")));
        assert!(!super::capped_while_improving(&serde_json::json!({ "best_epoch": 3 })), "a result without the fields");
    }
}
