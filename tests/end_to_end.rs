//! A tiny end-to-end run on a generated learnable task, and checkpoint round trips.

use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use wukong::config::ExperimentConfig;
use wukong::data::SplitData;
use wukong::data::pipeline::{self, SplitSource};
use wukong::model::DataShape;
use wukong::train::{self, RunOptions, checkpoint};

mod common;

fn workdir(name: &str) -> PathBuf {
    common::workdir(&format!("e2e-{name}"))
}

/// Trains without console output, run directories under `dir/runs`.
fn train_quietly(cfg: &ExperimentConfig, dir: &Path) -> train::TrainOutcome {
    train::train(cfg, &RunOptions { device: "cpu".into(), out_dir: dir.join("runs"), verbose: false, ..Default::default() }).unwrap()
}

/// Users and items with hidden 2-d tastes; a click happens when taste agrees (plus noise), and a
/// third field (context) shifts the odds. Ids are global, libfm style.
fn generate(dir: &Path) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let users: Vec<[f32; 2]> = (0..60).map(|_| [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]).collect();
    let items: Vec<[f32; 2]> = (0..40).map(|_| [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]).collect();
    for (name, rows) in [("train", 8000), ("valid", 1500), ("test", 1500)] {
        let mut text = String::new();
        for _ in 0..rows {
            let (u, i, c) = (rng.random_range(0..60), rng.random_range(0..40), rng.random_range(0..3));
            let score = 3.0 * (users[u][0] * items[i][0] + users[u][1] * items[i][1]) + [-0.5, 0.0, 0.5][c];
            let label = if score + rng.random_range(-0.3..0.3) > 0.0 { 1 } else { -1 };
            writeln!(text, "{label} {u}:1 {}:1 {}:1", 100 + i, 200 + c).unwrap();
        }
        std::fs::write(dir.join(format!("{name}.libfm")), text).unwrap();
    }
}

fn config(dir: &Path) -> ExperimentConfig {
    let text = format!(
        r#"
name = "tiny"
[data]
train = "{0}/train.libfm"
valid = "{0}/valid.libfm"
test = "{0}/test.libfm"
num_fields = 3
field_names = ["user", "item", "context"]
[model]
name = "wukong"
embedding_dim = 8
num_layers = 2
num_fmb = 4
num_lcb = 4
fm_rank = 3
fmb_mlp = [32]
top_mlp = [32]
[train]
epochs = 12
batch_size = 256
eval_batch_size = 1000
lr = 0.003
emb_lr = 0.1
warmup_steps = 10
patience = 3
seed = 1
"#,
        dir.display()
    );
    ExperimentConfig::parse(&text).unwrap()
}

#[test]
fn tiny_training_learns_and_the_checkpoint_round_trips() {
    let _turn = common::serial();
    let dir = workdir("train");
    generate(&dir);
    let cfg = config(&dir);
    let out = train_quietly(&cfg, &dir);
    let test = out.test.expect("test split configured");
    // The generator's Bayes-optimal AUC is about 0.97; a model that learned the user×item
    // interaction clears 0.90, one that did not stays near 0.6 (context alone).
    assert!(test.auc > 0.90, "test AUC {} should exceed 0.90", test.auc);
    assert!(test.logloss < 0.45, "test LogLoss {}", test.logloss);

    // Run directory contents.
    for f in [checkpoint::CONFIG, checkpoint::ENCODER, checkpoint::MODEL, checkpoint::METRICS, checkpoint::RESULT, checkpoint::ENV] {
        assert!(out.run_dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(common::metrics_lines(&out.run_dir).len(), out.epochs_run);

    // Reloading the run reproduces the reported test metrics exactly (same best weights).
    let (_, m) = reload_and_score_test(&out.run_dir, &dir);
    assert_eq!(m.auc, test.auc);
    assert_eq!(m.logloss, test.logloss);
}

/// The run in `run_dir` reloaded from its directory, and its metrics on `dir/test.libfm`.
fn reload_and_score_test(run_dir: &Path, dir: &Path) -> (checkpoint::LoadedRun, wukong::metrics::Metrics) {
    let device = Device::flex();
    let run = checkpoint::load_run(run_dir, &device).unwrap();
    let src = SplitSource { name: "test", path: dir.join("test.libfm"), part: None };
    let (enc, _) = pipeline::encode_in_memory(&run.config.data, &src, &run.encoder).unwrap();
    let m =
        train::evaluate(&run.model, &SplitData::Memory(Arc::new(enc)), &run.encoder, 1000, wukong::model::Precision::F32, &device).unwrap();
    (run, m)
}

/// The paper's whole embedding layer (§3.2) in one run: `user` and `item` get two embeddings
/// each (`[data] embeddings`), `context` is a narrow field (width 3) that the group MLP maps to
/// one embedding. It learns, its table holds the extra blocks, and the reloaded run scores the
/// test split exactly as reported.
#[test]
fn several_embeddings_and_grouped_narrow_fields_train_and_reload() {
    let _turn = common::serial();
    let dir = workdir("embedding-layer");
    generate(&dir);
    let mut cfg = config(&dir);
    cfg.data.embeddings = [("user".to_string(), 2), ("item".to_string(), 2)].into_iter().collect();
    let wukong::model::ModelConfig::Wukong(w) = &mut cfg.model else { unreachable!() };
    w.field_dims.insert("2".into(), 3); // context
    let out = train_quietly(&cfg, &dir);
    let test = out.test.expect("test split configured");
    assert!(test.auc > 0.90, "test AUC {} should exceed 0.90", test.auc);

    let (run, m) = reload_and_score_test(&out.run_dir, &dir);
    assert_eq!(run.encoder.model_fields(), 5);
    let (users, items) = (run.encoder.field_sizes()[0], run.encoder.field_sizes()[1]);
    assert_eq!(run.model.embedding().rows(), run.encoder.total_rows() + users + items);
    assert_eq!(DataShape::of(&run.encoder).fields, 5);
    assert_eq!((m.auc, m.logloss), (test.auc, test.logloss));
}

#[test]
fn checkpoint_round_trip_gives_identical_predictions() {
    let _turn = common::serial();
    let dir = workdir("ckpt");
    generate(&dir);
    let cfg = config(&dir);
    let src = SplitSource { name: "train", path: cfg.data.train.clone(), part: None };
    let (encoder, data, _) = pipeline::fit_in_memory(&cfg.data, &src).unwrap();
    let data = SplitData::Memory(Arc::new(data));
    let device = Device::flex();
    device.seed(99);
    let model = cfg.model.init(&DataShape::of(&encoder), &device);
    let path = dir.join("m.bpk");
    checkpoint::save_model(&model, &path).unwrap();
    device.seed(100); // a fresh instance starts from different random weights
    let loaded = checkpoint::load_model(&cfg, &encoder, &path, &device).unwrap();
    let a = train::predict_logits(&model, &data, &encoder, 512, wukong::model::Precision::F32, &device).unwrap();
    let b = train::predict_logits(&loaded, &data, &encoder, 512, wukong::model::Precision::F32, &device).unwrap();
    assert_eq!(a.len(), 8000);
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "predictions differ after reload");

    // a checkpoint of another shape is refused with a message, not a panic
    let mut other = cfg.clone();
    let wukong::model::ModelConfig::Wukong(c) = &mut other.model else { panic!("the tiny config is a Wukong") };
    c.num_fmb = 5;
    let err = format!("{:#}", checkpoint::load_model(&other, &encoder, &path, &device).expect_err("shape mismatch must fail"));
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn same_seed_same_run_and_another_seed_differs() {
    let _turn = common::serial();
    let dir = workdir("seed");
    generate(&dir);
    let mut cfg = config(&dir);
    cfg.train.epochs = 2;
    cfg.train.patience = 5;
    let run = |cfg: &ExperimentConfig| {
        let out = train_quietly(cfg, &dir);
        (out.test.unwrap(), out.run_dir)
    };
    let ((a, dir_a), (b, dir_b)) = (run(&cfg), run(&cfg));
    assert_ne!(dir_a, dir_b, "every run gets its own directory, even within one second");
    assert_eq!((a.auc, a.logloss), (b.auc, b.logloss), "same seed must reproduce the run");
    cfg.train.seed = 2;
    let (c, _) = run(&cfg);
    assert_ne!(a.logloss, c.logloss, "another seed should change the run");
}

#[test]
fn run_directories_never_collide() {
    let dir = workdir("dirs");
    let made: Vec<PathBuf> = (0..5).map(|_| train::new_run_dir(&dir, "x-seed1").unwrap()).collect();
    let mut unique = made.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "{made:?}");
    assert!(made.iter().all(|d| d.is_dir()));
}

#[test]
fn logloss_monitor_keeps_the_epoch_with_the_lowest_validation_logloss() {
    let _turn = common::serial();
    let dir = workdir("monitor");
    generate(&dir);
    let mut cfg = config(&dir);
    cfg.train.monitor = wukong::config::Monitor::Logloss;
    cfg.train.epochs = 6;
    cfg.train.patience = 6;
    cfg.train.plateau_lr_factor = 1.0;
    let out = train_quietly(&cfg, &dir);
    let losses: Vec<f64> = common::metrics_lines(&out.run_dir).iter().map(|e| e["valid_logloss"].as_f64().unwrap()).collect();
    let best = losses.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(out.valid.logloss, best);
    assert_eq!(losses[out.best_epoch - 1], best);
}

/// A run made to overfit (an evaluation every 8 steps at lr 0.01, no early stop), so that several
/// evaluations fail to improve; `rules` sets the rate rules under test. Its evaluations.
fn overfitting_run(
    tag: &str,
    epochs: usize,
    rules: impl FnOnce(&mut wukong::config::TrainConfig),
) -> (ExperimentConfig, Vec<serde_json::Value>) {
    let _turn = common::serial();
    let dir = workdir(tag);
    generate(&dir);
    let mut cfg = config(&dir);
    cfg.train.epochs = epochs;
    cfg.train.eval_every_steps = 8;
    cfg.train.patience = 100;
    cfg.train.lr = 0.01;
    rules(&mut cfg.train);
    let out = train_quietly(&cfg, &dir);
    (cfg, common::metrics_lines(&out.run_dir))
}

/// Replays the rate rules from each evaluation's `best` and `end_of_epoch` flags alone and checks
/// every logged rate against them: on an evaluation without a gain after warm-up the plateau rule
/// cuts by its factor, not under its floor and never upwards; at the end of a milestone epoch the
/// milestone factor applies. Returns the epochs of the plateau cuts and the milestone steps taken.
fn replay_rates(evals: &[serde_json::Value], t: &wukong::config::TrainConfig) -> (Vec<usize>, usize) {
    let (mut scale, mut cuts, mut steps) = (1.0f64, Vec::new(), 0);
    for e in evals {
        let epoch = e["epoch"].as_u64().unwrap() as usize;
        if !e["best"].as_bool().unwrap() && e["step"].as_u64().unwrap() > t.warmup_steps as u64 {
            scale = (scale * t.plateau_lr_factor).max(t.plateau_min_lr_scale).min(scale);
            cuts.push(epoch);
        }
        if e["end_of_epoch"].as_bool().unwrap() && t.lr_milestones.contains(&epoch) {
            scale *= t.lr_milestone_factor;
            steps += 1;
        }
        let lr = e["lr"].as_f64().unwrap();
        assert!((lr - t.lr * scale).abs() < 1e-12, "step {}: lr {lr}, expected {}", e["step"], t.lr * scale);
    }
    (cuts, steps)
}

/// The plateau rule cuts both rates on every evaluation without a gain, but never under
/// `plateau_min_lr_scale`: the logged rates replay from the `best` flags alone, and the floor is
/// reached and held.
#[test]
fn plateau_cuts_stop_at_the_floor() {
    let (cfg, evals) = overfitting_run("plateau-floor", 8, |t| {
        t.plateau_lr_factor = 0.5;
        t.plateau_min_lr_scale = 0.2;
    });
    let (cuts, _) = replay_rates(&evals, &cfg.train);
    // Three cuts reach the floor (0.5³ = 0.125 < 0.2); the test needs at least one more to see it held.
    assert!(cuts.len() >= 4, "only {} evaluations without a gain in {}: the floor was not exercised", cuts.len(), evals.len());
    assert!(evals.last().unwrap()["lr"].as_f64().unwrap() >= 0.2 * cfg.train.lr - 1e-12);
}

/// `lr_milestones`: the rates step down after the named epochs whatever validation does, and a
/// plateau cut afterwards never raises a scale the milestones took under the plateau floor.
#[test]
fn milestones_step_the_rates_and_the_plateau_floor_does_not_undo_them() {
    let (cfg, evals) = overfitting_run("milestones", 6, |t| {
        t.lr_milestones = vec![1, 2];
        t.lr_milestone_factor = 0.25;
        t.plateau_lr_factor = 0.5;
        t.plateau_min_lr_scale = 0.1;
    });
    let (cuts, steps) = replay_rates(&evals, &cfg.train);
    assert_eq!(steps, 2);
    // The milestones alone take the scale to 1/16, under the floor of 0.1; the test needs a
    // plateau cut after them to see the floor leave it there.
    let late_cuts = cuts.iter().filter(|&&epoch| epoch > 2).count();
    assert!(late_cuts >= 1, "no evaluation without a gain after epoch 2 in {}: the floor was not exercised", evals.len());
    assert!(evals.last().unwrap()["lr"].as_f64().unwrap() <= cfg.train.lr / 16.0 + 1e-12);
}

#[test]
fn bad_milestones_are_refused_by_name() {
    for bad in [vec![0usize], vec![3, 3], vec![4, 2]] {
        let train = wukong::config::TrainConfig { lr_milestones: bad.clone(), ..Default::default() };
        let err = format!("{:#}", train.validate().unwrap_err());
        assert!(err.contains("train.lr_milestones"), "{bad:?}: {err}");
    }
}

/// Weight averaging (`average_from_epoch = 2`): training goes on from the raw weights (the final
/// weights equal those of the same run without it), the first averaged evaluation (one snapshot)
/// scores what the plain run scored, later ones score something else, and the saved best
/// weights are exactly the mean of the plain run's weights at the evaluations from epoch 2 to the
/// selected one (read from its checkpoints).
#[test]
fn weight_averaging_evaluates_the_mean_and_leaves_training_alone() {
    let _turn = common::serial();
    let dir = workdir("average");
    generate(&dir);
    let mut cfg = config(&dir);
    cfg.train.epochs = 5;
    cfg.train.patience = 100;
    cfg.train.plateau_lr_factor = 1.0; // the rates must not depend on what is evaluated
    cfg.train.keep_checkpoints = 100;
    cfg.train.checkpoint_every_secs = 0.0;
    let plain = train_quietly(&cfg, &dir.join("plain"));
    cfg.train.average_from_epoch = 2;
    let avg = train_quietly(&cfg, &dir.join("avg"));
    let result =
        |run: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap() };
    let (rp, ra) = (result(&plain.run_dir), result(&avg.run_dir));
    assert_eq!(rp["final_weights_digest"], ra["final_weights_digest"], "averaging changed the training itself");

    let (ep, ea) = (common::metrics_lines(&plain.run_dir), common::metrics_lines(&avg.run_dir));
    assert_eq!((ep.len(), ea.len()), (5, 5));
    assert_eq!(ea[0]["averaged_over"], serde_json::Value::Null, "epoch 1 is before the averaging");
    for (i, e) in ea.iter().enumerate().skip(1) {
        assert_eq!(e["averaged_over"].as_u64(), Some(i as u64), "epoch {}", i + 1);
    }
    assert_eq!(ea[0]["valid_auc"], ep[0]["valid_auc"]);
    assert_eq!(ea[1]["valid_auc"], ep[1]["valid_auc"], "a mean of one snapshot is the model itself");
    assert!((2..5).any(|i| ea[i]["valid_auc"] != ep[i]["valid_auc"]), "the mean of several snapshots scored like the raw weights");

    // The selected weights, rebuilt from the plain run's checkpoints at the same evaluations.
    let best = ra["best_epoch"].as_u64().unwrap() as usize;
    let ckpts = checkpoint::CheckpointDir::new(&plain.run_dir, 100, &Default::default()).unwrap();
    let device = Device::flex();
    let base = checkpoint::load_run(&plain.run_dir, &device).unwrap().model;
    let weights_at = |epoch: usize| {
        let (_, mut c) = ckpts.at(ep[epoch - 1]["step"].as_u64().unwrap()).unwrap();
        checkpoint::load_model_bytes(base.clone(), c.take_section("model").unwrap(), "checkpoint").unwrap()
    };
    let expected = if best == 1 {
        weights_at(1)
    } else {
        let mut mean = train::average::WeightAverage::default();
        for e in 2..=best {
            mean.add(&weights_at(e)).unwrap();
        }
        mean.apply(base.clone()).unwrap()
    };
    assert_eq!(ra["best_weights_digest"].as_str().unwrap(), checkpoint::weights_digest(&expected).unwrap(), "best epoch {best}");
    assert!(best >= 3, "the test wants a selected mean of several snapshots; best epoch {best}: {ea:?}");
}

/// Weight averaging refuses what it would get wrong: batch-norm statistics of the raw weights.
#[test]
fn weight_averaging_refuses_batch_norm() {
    let _turn = common::serial();
    let dir = workdir("average-bn");
    generate(&dir);
    let mut cfg = config(&dir);
    cfg.model = toml::from_str("name = \"dlrm\"\nembedding_dim = 8\ntop_mlp_units = [16]\nbatch_norm = true").unwrap();
    cfg.train.average_from_epoch = 1;
    let err = train::train(&cfg, &RunOptions { device: "cpu".into(), out_dir: dir.join("runs"), verbose: false, ..Default::default() })
        .unwrap_err();
    assert!(format!("{err:#}").contains("train.average_from_epoch needs a model without batch norm"), "{err:#}");
}
