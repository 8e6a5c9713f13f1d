//! Every numeric config key, walked through 0, a negative and an absurd value: the config is
//! either refused with an error that names the key, or accepted and then builds, trains a step
//! and scores without panicking. (Absurd sizes must be refused before any allocation.)

use burn::module::Module;
use std::panic::AssertUnwindSafe;
use std::path::Path;

use wukong::config::ExperimentConfig;
use wukong::data::{BatchLoader, EncodedDataset};
use wukong::model::{DataShape, ModelConfig, SlotLayout, SparseInput};
use wukong::train::{self, RunOptions, Stepper};

mod common;

/// Every model, and DLRM with batch norm (its running statistics are another code path).
fn models() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    const EXTRA: [(&str, &str); 1] = [("dlrm", "embedding_dim = 8\nbottom_mlp_units = [16]\ntop_mlp_units = [32, 16]\nbatch_norm = true")];
    common::MODELS.iter().chain(EXTRA.iter())
}

/// The values each numeric leaf is tried with (as TOML text).
fn probes(v: &toml::Value) -> Vec<String> {
    match v {
        toml::Value::Integer(_) => vec!["0".into(), "-1".into(), "1000000000000000".into()],
        toml::Value::Float(_) => vec!["0.0".into(), "-1.0".into(), "1e30".into(), "nan".into(), "inf".into()],
        toml::Value::Array(a) if a.iter().all(|x| x.is_integer()) => {
            vec!["[0]".into(), "[-1]".into(), "[1000000000000000]".into(), "[8, 0]".into()]
        }
        toml::Value::Array(a) if a.iter().all(|x| x.is_float()) && !a.is_empty() => vec!["[0.0]".into(), "[-1.0]".into(), "[1e30]".into()],
        _ => vec![],
    }
}

/// `table` with `key` replaced by the TOML text `value`.
fn with(table: &toml::Table, key: &str, value: &str) -> toml::Table {
    let mut t = table.clone();
    let v: toml::Table = toml::from_str(&format!("x = {value}")).unwrap();
    t.insert(key.to_string(), v["x"].clone());
    t
}

/// Builds, trains one step and scores one batch; Err(message) on a panic.
fn exercise_model(cfg: &ModelConfig) -> Result<(), String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let device = burn::tensor::Device::flex();
        let shape = DataShape { fields: 3, dense: 2, table_rows: 12 };
        if cfg.check_shape(&shape).is_err() {
            return;
        }
        let model = cfg.init(&shape, &device.clone().autodiff());
        let b = 16;
        let data = EncodedDataset {
            num_slots: 3,
            num_dense: 2,
            labels: (0..b).map(|i| (i % 2) as f32).collect(),
            rows: (0..b * 3).map(|i| ((i % 3) * 4 + (i / 3) % 4) as u32).collect(),
            values: vec![1.0; b * 3],
            dense: (0..b * 2).map(|i| i as f32 / 10.0).collect(),
        };
        let loader = BatchLoader::new(std::sync::Arc::new(data), 12, b);
        let batch = loader.epoch(None).next().unwrap().unwrap();
        let t = wukong::config::TrainConfig::default();
        let mut stepper = Stepper::new(model, cfg, &t, SlotLayout::one_hot(3), &device);
        let _ = stepper.step(&batch, 1e-3, 1e-2);
        let input = SparseInput::from_batch(&batch, &SlotLayout::one_hot(3), &device);
        let _ = stepper.model().valid().forward(&input, false, &wukong::model::Pass::f32());
    }))
    .map_err(common::panic_text)
}

#[test]
fn every_model_key_is_refused_by_name_or_safe() {
    let mut failures = Vec::new();
    let mut refused = 0;
    let mut accepted = 0;
    for &(name, body) in models() {
        let base: ModelConfig = toml::from_str(&format!("name = \"{name}\"\n{body}")).unwrap();
        // every key with its default value present
        let table: toml::Table = toml::from_str(&toml::to_string(&base).unwrap()).unwrap();
        for (key, value) in &table {
            for probe in probes(value) {
                let t = with(&table, key, &probe);
                let parsed = toml::to_string(&t).map_err(anyhow::Error::from).and_then(|s| Ok(toml::from_str::<ModelConfig>(&s)?));
                match parsed.and_then(|c| c.validate().map(|_| c)) {
                    Err(e) => {
                        refused += 1;
                        let msg = format!("{e:#}");
                        if !msg.contains(key.as_str()) {
                            failures.push(format!("{name}.{key} = {probe}: refused without naming the key: {msg}"));
                        }
                    }
                    Ok(c) => {
                        accepted += 1;
                        if let Err(p) = exercise_model(&c) {
                            failures.push(format!("{name}.{key} = {probe}: accepted, then panicked: {p}"));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} problems ({refused} refused, {accepted} accepted):\n{}", failures.len(), failures.join("\n"));
    assert!(refused > 100 && accepted > 10, "{refused} refused, {accepted} accepted");
}

fn write_data(dir: &Path) {
    for (name, n) in [("train", 400), ("valid", 100)] {
        let text: String = (0..n).map(|i| format!("{} {}:1 {}:1\n", (i % 7 + i % 3) % 2, i % 7, 10 + i % 3)).collect();
        std::fs::write(dir.join(format!("{name}.libsvm")), text).unwrap();
    }
}

/// `[train]` and `[data]` keys: refused by name, or a whole (tiny) training run that ends in a
/// result or an error, never a panic.
#[test]
fn every_train_and_data_key_is_refused_by_name_or_safe() {
    let dir = common::workdir("config-walk");
    write_data(&dir);
    let text = format!(
        "name = \"walk\"\n[data]\ntrain = \"{0}/train.libsvm\"\nvalid = \"{0}/valid.libsvm\"\ncache_dir = \"{0}/cache\"\nhash_buckets = 2\nnum_fields = 2\n\
         [model]\nname = \"wukong\"\nembedding_dim = 4\nnum_layers = 1\nnum_fmb = 2\nnum_lcb = 2\nfm_rank = 2\nfmb_mlp = [8]\ntop_mlp = [8]\n\
         [train]\nepochs = 1\nbatch_size = 64\nwarmup_steps = 2\n",
        dir.display()
    );
    let base: ExperimentConfig = ExperimentConfig::parse(&text).unwrap();
    let full: toml::Table = toml::from_str(&base.to_toml()).unwrap();
    let mut failures = Vec::new();
    let (mut refused, mut accepted) = (0, 0);
    for section in ["train", "data"] {
        let table = full[section].as_table().unwrap().clone();
        for (key, value) in &table {
            for probe in probes(value) {
                let mut cfg = full.clone();
                cfg.insert(section.into(), toml::Value::Table(with(&table, key, &probe)));
                let parsed = toml::to_string(&cfg).map_err(anyhow::Error::from).and_then(|s| ExperimentConfig::parse(&s));
                match parsed {
                    Err(e) => {
                        refused += 1;
                        let msg = format!("{e:#}");
                        if !msg.contains(key.as_str()) {
                            failures.push(format!("{section}.{key} = {probe}: refused without naming the key: {msg}"));
                        }
                    }
                    Ok(c) => {
                        accepted += 1;
                        let out = dir.join("runs");
                        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            train::train(
                                &c,
                                &RunOptions { out_dir: out.clone(), cache: wukong::data::CachePolicy::RebuildAll, ..Default::default() },
                            )
                        }));
                        if let Err(p) = r {
                            let p = common::panic_text(p);
                            failures.push(format!("{section}.{key} = {probe}: accepted, then panicked: {p}"));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} problems ({refused} refused, {accepted} accepted):\n{}", failures.len(), failures.join("\n"));
    assert!(refused > 40 && accepted > 5, "{refused} refused, {accepted} accepted");
}
