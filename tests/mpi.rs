//! Data-parallel training under `mpirun -n 2` (feature `mpi`; `.ci/run` installs Open MPI and
//! runs `cargo test --release --features mpi --test mpi`). Without `mpirun` on the PATH every
//! test prints why and passes without checking anything.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use wukong::config::ExperimentConfig;
use wukong::data::Encoder;
use wukong::model::DataShape;
use wukong::train::checkpoint::{self, CheckpointDir, Faults};

mod common;

const WUKONG: &str = env!("CARGO_BIN_EXE_wukong");

/// A small Wukong on the synthetic stream: 5,889 training examples in global batches of 256,
/// so the last batch of each epoch has one example (rank 1's share of it is empty).
fn config(extra_train: &str) -> String {
    format!(
        r#"name = "dp"
[data]
format = "synthetic"
[data.world]
fields = 6
multi_hot_fields = 1
max_bag = 2
vocab_max = 500
dense = 2
terms = 64
train_examples = 5889
valid_examples = 1000
test_examples = 1000
[model]
name = "wukong"
embedding_dim = 8
num_layers = 2
num_fmb = 4
num_lcb = 4
fm_rank = 4
fmb_mlp = [16]
top_mlp = [16]
dense_mlp = [16]
[train]
epochs = 2
batch_size = 256
eval_batch_size = 300
lr = 0.003
emb_lr = 0.05
warmup_steps = 10
checkpoint_every_secs = 0
{extra_train}
"#
    )
}

fn have_mpirun() -> bool {
    let ok = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: no mpirun on the PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)");
    }
    ok
}

/// `wukong train` as one process (`ranks = 0`) or under `mpirun -n ranks`, killed after 300 s
/// (a hang is a failure, not a stuck CI job).
fn train(ranks: usize, dir: &Path, args: &[&str], fault: Option<&str>) -> Output {
    let mut cmd = if ranks == 0 {
        let mut c = Command::new(WUKONG);
        c.args(["--threads", "2"]);
        c
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-n", &ranks.to_string(), "--oversubscribe", "--bind-to", "none", WUKONG, "--threads", "1"]);
        c
    };
    cmd.arg("train").args(args).current_dir(dir);
    // Open MPI refuses root unless told; CI containers run as root.
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    cmd.env_remove("WUKONG_FAULT");
    if let Some(f) = fault {
        cmd.env("WUKONG_FAULT", f);
    }
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(300) {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!("the job hung for 300 s: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run_dir(out: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    assert_eq!(dirs.len(), 1, "one run directory in {}: {dirs:?}", out.display());
    dirs[0].clone()
}

fn result(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join(checkpoint::RESULT)).unwrap()).unwrap()
}

/// The embedding table in the run's newest checkpoint (of rank `shard`'s part in a sharded job).
fn final_table(run: &Path, shard: Option<usize>) -> Vec<f32> {
    let cfg = ExperimentConfig::load(&run.join(checkpoint::CONFIG)).unwrap();
    let encoder = Encoder::load(&run.join(checkpoint::ENCODER)).unwrap();
    let device = wukong::runtime::parse_device("cpu").unwrap();
    let dir = shard.map_or(run.to_path_buf(), |r| checkpoint::shard_dir(run, r, 2));
    let (found, _) = CheckpointDir::new(&dir, 3, &Faults::default()).unwrap().newest_valid().unwrap();
    let (_, mut ckpt) = found.unwrap();
    let shape = DataShape::of(&encoder);
    let model = match shard {
        Some(r) => cfg.model.init_shard(&shape, cfg.train.emb_storage, r, 2, &device),
        None => cfg.model.init(&shape, &device),
    };
    let model = checkpoint::load_model_bytes(model, ckpt.take_section("model").unwrap(), "the checkpoint").unwrap();
    let table = model.embedding().current_rows(burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new((0..model.embedding().rows() as i64).collect::<Vec<_>>(), [model.embedding().rows()]),
        &device,
    ));
    table.into_data().convert::<f32>().iter::<f32>().collect()
}

/// Every value of the model in the run's newest checkpoint (dense parameters and the table).
fn final_params(run: &Path) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(param.val().into_data().convert::<f32>().iter::<f32>());
        }
    }
    let cfg = ExperimentConfig::load(&run.join(checkpoint::CONFIG)).unwrap();
    let encoder = Encoder::load(&run.join(checkpoint::ENCODER)).unwrap();
    let device = wukong::runtime::parse_device("cpu").unwrap();
    let (found, refused) = CheckpointDir::new(run, 3, &Faults::default()).unwrap().newest_valid().unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let (_, mut ckpt) = found.unwrap();
    let model = cfg.model.init(&DataShape::of(&encoder), &device);
    let model = checkpoint::load_model_bytes(model, ckpt.take_section("model").unwrap(), "the checkpoint").unwrap();
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Per-step tolerance: the ranks sum gradients in another order than one process does (float
/// rounding), and Adam divides by √v, which turns 1e-8 differences of tiny gradients into
/// slightly larger ones; 48 steps stay far below the effect of any real difference (a wrong
/// scaling of the gradient or a missed row moves the loss in the third digit).
const LOSS_TOL: f64 = 2e-5;
const PARAM_TOL: f32 = 2e-4;

#[test]
fn two_ranks_take_the_steps_of_one_process() {
    equal_steps("replicated");
}

#[test]
fn two_ranks_with_a_sharded_table_take_the_steps_of_one_process() {
    equal_steps("sharded");
}

fn equal_steps(mode: &str) {
    if !have_mpirun() {
        return;
    }
    let dir = common::workdir(&format!("mpi-equal-{mode}"));
    // evaluate after every step: metrics.jsonl then holds the running training loss and the
    // validation metrics of every step
    std::fs::write(dir.join("c.toml"), config(&format!("eval_every_steps = 1\npatience = 100\nembedding_sharding = \"{mode}\""))).unwrap();
    let one = train(0, &dir, &["--config", "c.toml", "--out", "one"], None);
    assert!(one.status.success(), "{}", text(&one));
    let two = train(2, &dir, &["--config", "c.toml", "--out", "two"], None);
    assert!(two.status.success(), "{}", text(&two));
    let (r1, r2) = (run_dir(&dir.join("one")), run_dir(&dir.join("two")));
    let (m1, m2) = (common::metrics_lines(&r1), common::metrics_lines(&r2));
    assert_eq!(m1.len(), m2.len());
    assert!(m1.len() >= 46, "an evaluation per step: {}", m1.len());
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["examples"], b["examples"], "the global batch is the same");
        for key in ["train_logloss", "valid_logloss", "valid_auc"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() < LOSS_TOL, "step {}: {key} {x} (1 process) vs {y} (2 ranks)", a["step"]);
        }
    }
    if mode == "replicated" {
        let d = max_abs_diff(&final_params(&r1), &final_params(&r2));
        assert!(d < PARAM_TOL, "final parameters differ by {d}");
    } else {
        // the two shards together are the one process's table: rows r of rank r mod 2
        let whole = final_table(&r1, None);
        let shards = [final_table(&r2, Some(0)), final_table(&r2, Some(1))];
        let (rows, dim) = (whole.len() / 8, 8);
        assert_eq!(shards[0].len() / dim + shards[1].len() / dim, rows);
        assert!(shards.iter().all(|s| (s.len() / dim).abs_diff(rows / 2) <= 1), "each rank holds half the rows");
        let mut d = 0f32;
        for r in 0..rows {
            let (k, i) = (r % 2, r / 2);
            d = d.max(max_abs_diff(&whole[r * dim..(r + 1) * dim], &shards[k][i * dim..(i + 1) * dim]));
        }
        assert!(d < PARAM_TOL, "the sharded table differs from the one process's by {d}");
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r2.join("shards/manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["table_rows"].as_u64().unwrap() as usize, rows);
        assert_eq!(manifest["shards"][1]["rows"].as_u64().unwrap() as usize, shards[1].len() / dim);
    }
    // the exact global evaluation: the test split scored by two ranks, metrics of all of it
    let (a, b) = (result(&r1), result(&r2));
    assert_eq!(a["steps"], b["steps"]);
    for key in ["test_auc", "test_logloss"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() < LOSS_TOL, "{key}: {x} vs {y}");
    }
    // only rank 0 wrote, once
    assert_eq!(text(&two).matches("run directory:").count(), 1, "{}", text(&two));
}

#[test]
fn the_evaluation_of_two_ranks_is_exact() {
    exact_evaluation("replicated");
}

#[test]
fn a_sharded_run_is_assembled_and_its_evaluation_is_exact() {
    exact_evaluation("sharded");
}

/// Trained by two ranks, then scored by `wukong eval` in one process: the test metrics the ranks
/// computed together from their halves are the whole split's (a sharded run's model.bpk is the
/// table put back together by rank 0).
fn exact_evaluation(mode: &str) {
    if !have_mpirun() {
        return;
    }
    let dir = common::workdir(&format!("mpi-eval-{mode}"));
    let cfg = config(&format!("embedding_sharding = \"{mode}\"")).replace("epochs = 2", "epochs = 1");
    std::fs::write(dir.join("c.toml"), cfg).unwrap();
    let two = train(2, &dir, &["--config", "c.toml", "--out", "two"], None);
    assert!(two.status.success(), "{}", text(&two));
    let run = run_dir(&dir.join("two"));
    let out = Command::new(WUKONG).args(["eval", "--run"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let r = result(&run);
    let auc = format!("{:.6}", r["test_auc"].as_f64().unwrap());
    assert!(printed.contains(&auc), "one process scores test AUC {auc} as the two ranks did: {printed}");
}

#[test]
fn a_rank_that_dies_ends_the_job_and_the_job_resumes() {
    killed_and_resumed("replicated");
}

#[test]
fn a_sharded_job_whose_rank_dies_resumes_from_its_shards() {
    killed_and_resumed("sharded");
}

fn killed_and_resumed(mode: &str) {
    if !have_mpirun() {
        return;
    }
    let dir = common::workdir(&format!("mpi-kill-{mode}"));
    std::fs::write(dir.join("c.toml"), config(&format!("checkpoint_every_steps = 10\nembedding_sharding = \"{mode}\""))).unwrap();
    let whole = train(2, &dir, &["--config", "c.toml", "--out", "whole"], None);
    assert!(whole.status.success(), "{}", text(&whole));
    // rank 1 is killed (abort, like kill -9) after step 25: the job must end, not hang
    let start = Instant::now();
    let killed = train(2, &dir, &["--config", "c.toml", "--out", "killed"], Some("abort-at-step:25,only-rank:1"));
    assert!(!killed.status.success(), "{}", text(&killed));
    assert!(start.elapsed() < Duration::from_secs(120), "the job took {:?} to notice", start.elapsed());
    let log = text(&killed);
    assert!(log.contains("rank 1") || log.contains("rank: 1"), "the launcher names the rank that died: {log}");
    let run = run_dir(&dir.join("killed"));
    assert!(!run.join(checkpoint::RESULT).exists());
    let resumed = train(2, &dir, &["--resume", run.to_str().unwrap()], None);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(text(&resumed).contains("resuming from"), "{}", text(&resumed));
    // same thread count, same ranks: the resumed job ends with the uninterrupted one's bits
    let (a, b) = (result(&run_dir(&dir.join("whole"))), result(&run));
    assert_eq!(a["final_weights_digest"], b["final_weights_digest"]);
    assert_eq!(a["test_auc"], b["test_auc"]);
}

#[test]
fn diverged_replicas_stop_the_job_with_the_rank_named() {
    if !have_mpirun() {
        return;
    }
    let dir = common::workdir("mpi-diverge");
    std::fs::write(dir.join("c.toml"), config("replica_check_every_steps = 5")).unwrap();
    let out = train(2, &dir, &["--config", "c.toml", "--out", "runs"], Some("diverge-at-step:7,only-rank:1"));
    assert!(!out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("replicas diverged at step 10: the weights of rank(s) [1] differ"), "{log}");
}

#[test]
fn batch_norm_is_refused_in_a_job() {
    if !have_mpirun() {
        return;
    }
    let cfg = config("").replace("dense_mlp = [16]", "dense_mlp = [16]\nbatch_norm = true");
    refused_in_a_job("mpi-bn", &cfg, "batch_norm = true is not supported in data-parallel jobs");
}

#[test]
fn weight_averaging_is_refused_in_a_job() {
    if !have_mpirun() {
        return;
    }
    let dir = refused_in_a_job(
        "mpi-average",
        &config("average_from_epoch = 1"),
        "train.average_from_epoch is not supported in data-parallel jobs",
    );
    // the same config trains in one process (the refusal is the job's, not the config's)
    let one = train(0, &dir, &["--config", "c.toml", "--out", "one"], None);
    assert!(one.status.success(), "{}", text(&one));
}

/// `cfg` under `mpirun -n 2` fails with `message`; returns the directory holding it as `c.toml`.
fn refused_in_a_job(tag: &str, cfg: &str, message: &str) -> PathBuf {
    let dir = common::workdir(tag);
    std::fs::write(dir.join("c.toml"), cfg).unwrap();
    let out = train(2, &dir, &["--config", "c.toml", "--out", "runs"], None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(message), "{}", text(&out));
    dir
}
