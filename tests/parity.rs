//! Parity with PyTorch: for every model, a small reference written in PyTorch beside the
//! benchmarks (`benchmarks/torch_parity.py`, following the published reference implementations)
//! is loaded with our weights (exported as safetensors) and fed the same batch. It must give
//! the same logits, loss and gradients (dense parameters and embedding rows), and after one
//! training step of ours (dense Adam with global-norm clipping, row-wise Adagrad on the rows)
//! the same parameters as its own step — all within 1e-5.
//!
//! Runs wherever `torch` imports: the interpreter named by `WUKONG_TORCH_PYTHON`, else the venv
//! `../shared/tools/torch-venv.sh` makes (`~/.cache/wukong-torch-venv`), else `python3`. Skipped
//! with a printed reason when none has torch (set `WUKONG_REQUIRE_TORCH=1` to fail instead).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};

use wukong::config::TrainConfig;
use wukong::data::Batch;
use wukong::model::export::{NamedTensor, Values, model_parameters, named_gradients, safetensors_bytes, strip_variant};
use wukong::model::{DataShape, ModelConfig, Pass, SlotLayout, SparseInput};
use wukong::train::{Stepper, batch_logits, bce_with_logits};

mod common;

const FIELDS: usize = 4;
const VOCAB: usize = 5;
const DENSE: usize = 2;
const BATCH: usize = 12;
const TOLERANCE: f64 = 1e-5;

/// The cases: every registered model, small, without dropout (masks cannot be shared), with
/// embeddings large enough that every interaction matters.
fn cases() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "wukong-static",
            "wukong",
            "embedding_dim = 4\nnum_layers = 2\nnum_fmb = 3\nnum_lcb = 2\nfm_rank = 2\nfmb_mlp = [8]\ntop_mlp = [8]\ndense_mlp = [4]",
        ),
        (
            "wukong-attentive",
            "wukong",
            "embedding_dim = 4\nnum_layers = 2\nnum_fmb = 3\nnum_lcb = 3\nfm_rank = 2\nfm_kind = \"attentive\"\nattention_compress = 2\nattention_hidden = [6]\nfmb_mlp = [8]\ntop_mlp = [8]\ndense_mlp = [4]",
        ),
        ("lr", "lr", ""),
        ("fm", "fm", "embedding_dim = 3\ndense_mlp = [4]"),
        ("dnn", "dnn", "embedding_dim = 3\nhidden_units = [8, 6]\ndense_mlp = [4]"),
        ("dlrm", "dlrm", "embedding_dim = 4\nbottom_mlp_units = [6]\ntop_mlp_units = [8]"),
        ("dcnv2-full", "dcnv2", "embedding_dim = 3\nnum_cross_layers = 2\ndnn_hidden_units = [8]\ndense_mlp = [4]"),
        (
            "dcnv2-mix",
            "dcnv2",
            "embedding_dim = 3\nnum_cross_layers = 2\nlow_rank = 2\nnum_experts = 3\nmodel_structure = \"stacked\"\ndnn_hidden_units = [8]\ndense_mlp = [4]",
        ),
        (
            "autoint+",
            "autoint+",
            "embedding_dim = 4\nattention_layers = 2\nnum_heads = 2\nattention_dim = 6\nuse_scale = true\nlayer_norm = true\ndnn_hidden_units = [8]\ndense_mlp = [4]",
        ),
        (
            "afn+",
            "afn+",
            "embedding_dim = 3\nlogarithmic_neurons = 5\nafn_hidden_units = [6]\ndnn_hidden_units = [6]\nbatch_norm = false\ndense_mlp = [4]",
        ),
        (
            "finalmlp",
            "finalmlp",
            "embedding_dim = 3\nmlp1_hidden_units = [8, 4]\nmlp2_hidden_units = [6, 4]\nfs_hidden_units = [5]\nfs1_context = [0, 2]\nnum_heads = 2\ndense_mlp = [4]",
        ),
        // batch-normed MLPs (the fused BatchNorm's 2-D path; AFN+ above has the 3-D one)
        (
            "finalmlp-bn",
            "finalmlp",
            "embedding_dim = 3\nmlp1_hidden_units = [8, 4]\nmlp2_hidden_units = [6]\nmlp1_batch_norm = true\nmlp2_batch_norm = true\nfs_hidden_units = [5]\nnum_heads = 2\ndense_mlp = [4]",
        ),
        (
            "masknet-serial",
            "masknet",
            "embedding_dim = 3\nmodel_type = \"serial\"\nblock_hidden_units = [8, 6]\nreduction_ratio = 0.5\ndense_mlp = [4]",
        ),
        (
            "masknet-parallel",
            "masknet",
            "embedding_dim = 3\nparallel_num_blocks = 2\nparallel_block_dim = 5\ndnn_hidden_units = [8]\nreduction_ratio = 2.0\ndense_mlp = [4]",
        ),
        ("xdeepfm", "xdeepfm", "embedding_dim = 3\ncin_hidden_units = [4, 3]\ndnn_hidden_units = [6]\ndense_mlp = [4]"),
        // dense features embedded one by one, x_i · v_i
        (
            "wukong-per-feature",
            "wukong",
            "embedding_dim = 4\nnum_layers = 1\nnum_fmb = 3\nnum_lcb = 2\nfm_rank = 2\nfmb_mlp = [8]\ntop_mlp = [8]\nnumeric_embedding = \"per_feature\"",
        ),
        (
            "autoint+-per-feature",
            "autoint+",
            "embedding_dim = 4\nattention_layers = 1\nnum_heads = 2\nattention_dim = 4\ndnn_hidden_units = [8]\nnumeric_embedding = \"per_feature\"",
        ),
        (
            "xdeepfm-per-feature",
            "xdeepfm",
            "embedding_dim = 3\ncin_hidden_units = [4]\ndnn_hidden_units = [6]\nnumeric_embedding = \"per_feature\"",
        ),
    ]
}

/// A batch over `FIELDS` fields of `VOCAB` rows each (field f owns rows f·VOCAB…), with dense
/// features; returns it with each example's global row ids.
fn batch(seed: u64) -> (Batch, Vec<i64>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rows: Vec<i64> = (0..BATCH * FIELDS).map(|k| ((k % FIELDS) * VOCAB + rng.random_range(0..VOCAB)) as i64).collect();
    let mut unique = rows.clone();
    unique.sort();
    unique.dedup();
    let inverse = rows.iter().map(|r| unique.iter().position(|u| u == r).unwrap() as i64).collect();
    let b = Batch {
        size: BATCH,
        labels: (0..BATCH).map(|_| rng.random_range(0..2) as f32).collect(),
        unique_rows: unique,
        inverse,
        values: None,
        dense: Some((0..BATCH * DENSE).map(|_| rng.random_range(0.0..2.0)).collect()),
    };
    (b, rows)
}

/// Adam's ε is 1e-4 here (1e-8 by default): a gradient that is pure rounding noise — AFN's
/// BatchNorm shift before the exponential is cancelled exactly by the BatchNorm after it, so
/// its gradient is ~1e-9 either way — would otherwise become a whole first step (Adam's first
/// update is lr·g/(|g| + ε)) and differ between any two implementations.
fn train_config() -> TrainConfig {
    TrainConfig {
        adam_epsilon: 1e-4,
        lr: 0.01,
        emb_lr: 0.05,
        grad_clip_norm: 1.0,
        emb_initial_accumulator: 0.1,
        warmup_steps: 0,
        seed: 5,
        ..TrainConfig::default()
    }
}

/// Writes the case's safetensors file: weights before and after one step, the batch, our
/// logits, loss and gradients, and the configs as metadata.
fn write_case(case: &str, name: &str, body: &str, path: &Path) {
    let cfg: ModelConfig =
        toml::from_str(&format!("name = \"{name}\"\nembedding_init_std = 0.5\n{body}")).unwrap_or_else(|e| panic!("{case}: {e}"));
    cfg.validate().unwrap();
    let shape = DataShape { fields: FIELDS, dense: DENSE, table_rows: FIELDS * VOCAB };
    let dev = Device::flex().autodiff();
    dev.seed(11);
    let model = cfg.init(&shape, &dev);
    let t = train_config();
    let layout = SlotLayout::one_hot(FIELDS);
    let (b, rows) = batch(3);
    let mut out: Vec<(String, Vec<usize>, Values)> = Vec::new();
    let mut put = |prefix: &str, ts: Vec<NamedTensor>| {
        for t in ts {
            out.push((format!("{prefix}.{}", t.name), t.shape, Values::F32(t.values)));
        }
    };
    put("param", model_parameters(&model));

    // inference logits (burn's BatchNorm uses its running statistics outside autodiff)
    let inner = dev.clone().inner();
    let logits = batch_logits(&model.valid(), &b, &layout, t.precision, &inner).unwrap();

    // the training loss and gradients
    let input = SparseInput::from_batch(&b, &layout, &dev);
    let labels = Tensor::<1>::from_data(TensorData::new(b.labels.clone(), [BATCH]), &dev);
    let (train_logits, gathered) = model.forward(&input, true, &Pass::f32());
    let loss = bce_with_logits(train_logits, labels);
    let grads = loss.backward();
    let loss = loss.into_scalar::<f32>();
    let gathered = gathered.expect("categorical fields");
    let rows_grad = gathered.rows.grad(&grads).expect("row gradient");
    let width = rows_grad.dims()[1];
    let rows_grad = rows_grad.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    put("grad", strip_variant(named_gradients(&model, &grads)));

    // one step of ours
    let mut stepper = Stepper::new(model, &cfg, &t, layout, &dev);
    let step_loss = stepper.step(&b, t.lr, t.emb_lr).unwrap();
    put("after", model_parameters(stepper.model()));

    let u = b.unique_rows.len();
    out.push(("batch.rows".into(), vec![BATCH, FIELDS], Values::I64(rows)));
    out.push(("batch.dense".into(), vec![BATCH, DENSE], Values::F32(b.dense.clone().unwrap())));
    out.push(("batch.labels".into(), vec![BATCH], Values::F32(b.labels.clone())));
    out.push(("batch.unique_rows".into(), vec![u], Values::I64(b.unique_rows.clone())));
    out.push(("out.logits".into(), vec![BATCH], Values::F32(logits)));
    out.push(("out.loss".into(), vec![1], Values::F32(vec![loss])));
    out.push(("out.step_loss".into(), vec![1], Values::F32(vec![step_loss])));
    out.push(("grad_rows".into(), vec![u, width], Values::F32(rows_grad)));

    let mut meta = HashMap::new();
    meta.insert("case".into(), case.to_string());
    meta.insert("model".into(), serde_json::to_string(&cfg).unwrap());
    meta.insert(
        "train".into(),
        serde_json::json!({
            "lr": t.lr, "emb_lr": t.emb_lr, "beta1": t.adam_beta1, "beta2": t.adam_beta2, "eps": t.adam_epsilon,
            "grad_clip_norm": t.grad_clip_norm, "emb_epsilon": t.emb_epsilon,
            "emb_initial_accumulator": t.emb_initial_accumulator, "segments": cfg.table_segments(),
        })
        .to_string(),
    );
    meta.insert("shape".into(), serde_json::json!({"fields": FIELDS, "dense": DENSE, "table_rows": FIELDS * VOCAB}).to_string());
    std::fs::write(path, safetensors_bytes(&out, meta).unwrap()).unwrap();
}

/// An interpreter that imports torch, or why there is none.
fn torch_python() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let home = std::env::var("HOME").unwrap_or_default();
    let candidates: Vec<PathBuf> = match std::env::var("WUKONG_TORCH_PYTHON") {
        Ok(p) => vec![p.into()],
        Err(_) => vec![Path::new(&home).join(".cache/wukong-torch-venv/bin/python"), "python3".into()],
    };
    for p in candidates {
        match Command::new(&p).args(["-c", "import torch, numpy"]).output() {
            Ok(o) if o.status.success() => return Ok(p),
            Ok(_) => tried.push(format!("{} has no torch", p.display())),
            Err(e) => tried.push(format!("{}: {e}", p.display())),
        }
    }
    Err(tried.join("; "))
}

#[test]
fn every_model_matches_its_pytorch_reference() {
    let python = match torch_python() {
        Ok(p) => p,
        Err(why) => {
            assert!(std::env::var("WUKONG_REQUIRE_TORCH").is_err(), "WUKONG_REQUIRE_TORCH is set but: {why}");
            eprintln!("skipped: PyTorch is not available ({why}); make it with ../shared/tools/torch-venv.sh");
            return;
        }
    };
    let dir = common::workdir("parity");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benchmarks/torch_parity.py");
    let mut files = Vec::new();
    for (case, name, body) in cases() {
        let file = dir.join(format!("{case}.safetensors"));
        write_case(case, name, body, &file);
        files.push(file);
    }
    let o = Command::new(&python).arg(&script).args(&files).output().expect("python runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let reports: Vec<serde_json::Value> =
        stdout.lines().filter_map(|l| l.strip_prefix("PARITY ")).map(|j| serde_json::from_str(j).unwrap()).collect();
    assert_eq!(reports.len(), files.len(), "the reference stopped early:\n{stdout}\n{stderr}");
    let mut failures = Vec::new();
    let mut table = String::from("| case | logits | loss | gradients | rows' gradients | after one step |\n|---|---|---|---|---|---|\n");
    for r in &reports {
        let num = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let case = r["case"].as_str().unwrap_or("?");
        table.push_str(&format!(
            "| {case} | {:.1e} | {:.1e} | {:.1e} | {:.1e} | {:.1e} |\n",
            num("logits"),
            num("loss"),
            num("grads"),
            num("rows_grad"),
            num("after")
        ));
        if r["problems"].as_array().is_none_or(|p| !p.is_empty()) {
            failures.push(format!("{case}: {}", r["problems"]));
        }
    }
    assert_eq!(o.status.success(), failures.is_empty(), "exit status and reports disagree:\n{stderr}");
    println!("largest differences to the PyTorch references (tolerance {TOLERANCE:e}):\n{table}");
    assert!(failures.is_empty(), "{} of {} models differ from PyTorch:\n{}", failures.len(), cases().len(), failures.join("\n"));
}
