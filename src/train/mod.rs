//! Training: the loop (Adam for dense parameters, row-wise Adagrad for embedding rows, linear
//! warm-up, global-norm clipping, early stopping on validation AUC with best-weight restore),
//! evaluation and prediction.

pub mod checkpoint;
pub mod optim;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, decay::WeightDecayConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{ExperimentConfig, TrainConfig};
use crate::profile::{self, Phase};
use crate::data::{BatchLoader, Encoder, SplitData};
use crate::metrics::{MetricAccumulator, Metrics};
use crate::model::{DataShape, Model, ModelConfig, SlotLayout, SparseInput};
pub use optim::{EmbOptimizerKind, RowWiseAdagrad, SparseAdam, SparseOptimizer, clip_global_norm, grad_norm};

/// Mean binary cross-entropy from logits, stable for any logit:
/// `max(z,0) − z·y + ln(1 + e^{−|z|})`.
pub fn bce_with_logits(logits: Tensor<1>, labels: Tensor<1>) -> Tensor<1> {
    let stable = logits.clone().abs().neg().exp().log1p();
    (relu(logits.clone()) - logits * labels + stable).mean()
}

/// Logits of every example, in file order.
pub fn predict_logits(model: &Model, data: &SplitData, encoder: &Encoder, batch_size: usize, device: &Device) -> Result<Vec<f32>> {
    let layout = SlotLayout::of(encoder);
    let loader = BatchLoader::from_split(data.clone(), encoder.total_rows(), batch_size, 65_536, 1);
    let mut out = Vec::with_capacity(data.len());
    for batch in loader.epoch(None) {
        let input = SparseInput::from_batch(&batch, &layout, device);
        let (logits, _) = model.forward(&input, false);
        out.extend(logits.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?);
    }
    anyhow::ensure!(out.len() == data.len(), "scored {} of {} examples (a read error ended the pass; see above)", out.len(), data.len());
    Ok(out)
}

/// AUC and LogLoss of `model` (an inference copy: `model.valid()`) on an in-memory split.
pub fn evaluate(model: &Model, data: &SplitData, encoder: &Encoder, batch_size: usize, device: &Device) -> Result<Metrics> {
    let SplitData::Memory(d) = data else { anyhow::bail!("evaluation needs the split in memory") };
    let logits = predict_logits(model, data, encoder, batch_size, device)?;
    let mut acc = MetricAccumulator::new();
    for (z, y) in logits.iter().zip(&d.labels) {
        acc.push(*z, *y);
    }
    acc.finish()
}

/// One training step's machinery: the model, Adam for its dense parameters, row-wise Adagrad
/// for the embedding rows, gradient clipping. The trainer and the benchmark both step through
/// this, so what the benchmark times is exactly what training runs.
pub struct Stepper {
    model: Option<Model>,
    adam: ModuleOptimizer,
    sparse_optimizer: SparseOptimizer,
    layout: SlotLayout,
    autodiff: Device,
    grad_clip_norm: f64,
}

impl Stepper {
    /// `model` must live on the autodiff version of `device`.
    pub fn new(model: Model, cfg: &ModelConfig, t: &TrainConfig, layout: SlotLayout, device: &Device) -> Self {
        let adam = AdamConfig::new()
            .with_beta_1(t.adam_beta1 as f32)
            .with_beta_2(t.adam_beta2 as f32)
            .with_epsilon(t.adam_epsilon as f32)
            .with_weight_decay((t.weight_decay > 0.0).then(|| WeightDecayConfig::new(t.weight_decay as f32)))
            .init();
        let rows = model.embedding().rows();
        let sparse_optimizer = SparseOptimizer::new(t, rows, &cfg.table_segments(), device);
        Self { model: Some(model), adam, sparse_optimizer, layout, autodiff: device.clone().autodiff(), grad_clip_norm: t.grad_clip_norm }
    }

    pub fn model(&self) -> &Model {
        self.model.as_ref().expect("model present between steps")
    }

    pub fn into_model(self) -> Model {
        self.model.expect("model present between steps")
    }

    /// One step on `batch` with the given learning rates; returns the batch's mean loss.
    pub fn step(&mut self, batch: &crate::data::Batch, lr: f64, emb_lr: f64) -> Result<f32> {
        let ad = &self.autodiff;
        let input = SparseInput::from_batch(batch, &self.layout, ad);
        let labels = Tensor::<1>::from_data(TensorData::new(batch.labels.clone(), [batch.size]), ad);
        profile::mark(Phase::Data);
        let model = self.model.take().expect("model present between steps");
        let (logits, gathered) = model.forward(&input, true);
        let loss = bce_with_logits(logits, labels);
        profile::mark(Phase::Mlp);
        let mut grads = loss.backward();
        let loss = loss.into_scalar::<f32>();
        profile::mark(Phase::Backward);

        let sparse = match gathered {
            Some(g) => Some((g.rows.grad_remove(&mut grads).context("embedding rows received no gradient")?, g)),
            None => None,
        };
        let mut dense_grads = GradientsParams::from_grads(grads, &model);
        clip_global_norm(&model, &mut dense_grads, self.grad_clip_norm);
        let mut model = self.adam.step(lr, model, dense_grads);
        profile::mark(Phase::DenseOptimizer);
        if let Some((emb_grad, g)) = sparse {
            let opt = &mut self.sparse_optimizer;
            model = model.map_embedding(|e| opt.step(e, g.unique_rows, g.rows, emb_grad, emb_lr));
            profile::mark(Phase::SparseOptimizer);
        }
        self.model = Some(model);
        Ok(loss)
    }
}

/// Where and how a training run happens (the parts not in the experiment config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: String,
    pub out_dir: PathBuf,
    /// Progress bars and per-epoch lines on stderr/stdout.
    pub verbose: bool,
    /// Rebuild stale data caches instead of refusing them.
    pub rebuild_cache: bool,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub valid: Metrics,
    pub test: Option<Metrics>,
    pub seconds: f64,
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

/// Trains the experiment end to end and writes its run directory.
pub fn train(cfg: &ExperimentConfig, opts: &RunOptions) -> Result<TrainOutcome> {
    let start = Instant::now();
    let t = &cfg.train;
    let v = opts.verbose;

    // Data: fit the encoder on train only (or take it from the cache), encode every split.
    let prepared = crate::data::prepare(&cfg.data, opts.rebuild_cache)?;
    let encoder = prepared.encoder;
    let mut data_log = serde_json::Map::new();
    let mut splits = std::collections::HashMap::new();
    for (name, data, l) in prepared.splits {
        log(v, format!(
            "{name}: {} rows{}, positive rate {:.4}, {} malformed rows skipped, {} values out of vocabulary, {} multi-hot values truncated ({:.1}s{})",
            l.rows, if matches!(data, SplitData::Stream(_)) { " (streamed)" } else { "" }, l.positive_rate, l.skipped, l.oov, l.truncated, l.seconds,
            if l.from_cache { ", from cache" } else { "" }
        ));
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

    // Run directory.
    let run_dir = new_run_dir(&opts.out_dir, &format!("{}-seed{}", cfg.name, t.seed))?;
    crate::runtime::write_atomic(&run_dir.join(checkpoint::CONFIG), cfg.to_toml().as_bytes())?;
    encoder.save(&run_dir.join(checkpoint::ENCODER))?;
    let mut env = crate::runtime::env_info(&opts.device);
    env["data"] = serde_json::Value::Object(data_log);
    crate::runtime::write_atomic(&run_dir.join(checkpoint::ENV), serde_json::to_string_pretty(&env)?.as_bytes())?;
    let mut metrics_file = std::fs::File::create(run_dir.join(checkpoint::METRICS))?;

    // Model and optimizers.
    let device = crate::runtime::parse_device(&opts.device)?;
    device.seed(t.seed);
    crate::model::layers::seed_dropout(t.seed);
    crate::model::layers::set_matmul_precision(t.precision);
    let ad = device.clone().autodiff();
    let model = cfg.model.init_with_storage(&shape, t.emb_storage, &ad);
    let (emb_params, dense_params) = model.param_counts();
    log(v, format!(
        "model {}: {dense_params} dense + {emb_params} embedding parameters ({total_rows} rows × {}, {:?} table: {:.1} MiB), {:.4} MFLOP/example forward",
        cfg.model.name(), cfg.model.embedding_dim(), t.emb_storage, model.embedding().table_bytes() as f64 / (1 << 20) as f64,
        cfg.model.forward_flops(&shape) as f64 / 1e6
    ));
    let mut stepper = Stepper::new(model, &cfg.model, t, layout, &device);

    let loader = BatchLoader::from_split(train_data, total_rows, t.batch_size, cfg.data.chunk_rows, cfg.data.shuffle_chunks);
    let model_path = run_dir.join(checkpoint::MODEL);
    let (mut best_epoch, mut best_valid) = (0, None::<Metrics>);
    let (mut bad_epochs, mut lr_scale, mut step, mut epochs_run) = (0usize, 1.0f64, 0usize, 0usize);

    for epoch in 1..=t.epochs {
        epochs_run = epoch;
        let epoch_start = Instant::now();
        let bar = if v { ProgressBar::new(loader.num_batches() as u64) } else { ProgressBar::hidden() };
        bar.set_style(ProgressStyle::with_template("epoch {msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}").unwrap().progress_chars("=> "));
        bar.set_message(format!("{epoch}/{}", t.epochs));
        let (mut loss_sum, mut loss_n) = (0.0f64, 0usize);
        for batch in loader.epoch(Some(t.seed.wrapping_add(epoch as u64))) {
            step += 1;
            let warm = if t.warmup_steps > 0 { (step as f64 / t.warmup_steps as f64).min(1.0) } else { 1.0 };
            let (lr, emb_lr) = (t.lr * warm * lr_scale, t.emb_lr * warm * lr_scale);

            let loss = stepper.step(&batch, lr, emb_lr)?;
            loss_sum += loss as f64 * batch.size as f64;
            loss_n += batch.size;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_secs = epoch_start.elapsed().as_secs_f64();
        let valid = evaluate(&stepper.model().valid(), &valid_data, &encoder, t.eval_batch_size, &device)?;
        let improved = best_valid.as_ref().is_none_or(|best| t.monitor.score(&valid) > t.monitor.score(best));
        if improved {
            best_epoch = epoch;
            best_valid = Some(valid);
            bad_epochs = 0;
            checkpoint::save_model(stepper.model(), &model_path)?;
        } else {
            bad_epochs += 1;
            lr_scale *= t.plateau_lr_factor;
        }
        let line = serde_json::json!({
            "epoch": epoch, "step": step, "train_logloss": loss_sum / loss_n.max(1) as f64,
            "valid_auc": valid.auc, "valid_logloss": valid.logloss, "lr": t.lr * lr_scale,
            "train_seconds": train_secs, "epoch_seconds": epoch_start.elapsed().as_secs_f64(), "best": improved,
        });
        writeln!(metrics_file, "{line}")?;
        metrics_file.flush()?;
        log(v, format!(
            "epoch {epoch:>3}: train logloss {:.5}  valid AUC {:.6}  LogLoss {:.6}  ({train_secs:.1}s train, {:.1}s total){}",
            loss_sum / loss_n.max(1) as f64, valid.auc, valid.logloss, epoch_start.elapsed().as_secs_f64(),
            if improved { "  *best" } else { "" }
        ));
        if bad_epochs >= t.patience.max(1) {
            log(v, format!("early stop: no validation {:?} improvement for {bad_epochs} epoch(s); best epoch {best_epoch}", t.monitor));
            break;
        }
    }

    // Restore the best weights and score the test split with them.
    let best = checkpoint::load_model(cfg, &encoder, &model_path, &device)?;
    let test = match &test_data {
        Some(d) => Some(evaluate(&best, d, &encoder, t.eval_batch_size, &device)?),
        None => None,
    };
    let valid = best_valid.context("no epoch was evaluated")?;
    let seconds = start.elapsed().as_secs_f64();
    let result = serde_json::json!({
        "best_epoch": best_epoch, "epochs_run": epochs_run, "valid_auc": valid.auc, "valid_logloss": valid.logloss,
        "test_auc": test.map(|m| m.auc), "test_logloss": test.map(|m| m.logloss), "seconds": seconds,
        "dense_params": dense_params, "embedding_params": emb_params, "forward_flops_per_example": cfg.model.forward_flops(&shape),
    });
    crate::runtime::write_atomic(&run_dir.join(checkpoint::RESULT), serde_json::to_string_pretty(&result)?.as_bytes())?;
    Ok(TrainOutcome { run_dir, best_epoch, epochs_run, valid, test, seconds })
}
