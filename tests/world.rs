//! The synthetic stream (`format = "synthetic"`): deterministic by (seed, stream, index), no
//! example repeated, labels drawn from the teacher's probabilities, and the Bayes limit equal to
//! what our own metrics give the teacher's probabilities.

use std::collections::HashSet;
use std::sync::Arc;

use wukong::config::ExperimentConfig;
use wukong::data::pipeline::{SplitData, world_split};
use wukong::data::world::{self, TRAIN_STREAM, VALID_STREAM, World, WorldConfig};
use wukong::data::{BatchLoader, EncodedDataset};
use wukong::metrics::MetricAccumulator;

fn small() -> WorldConfig {
    WorldConfig { fields: 8, multi_hot_fields: 1, max_bag: 3, vocab_max: 5_000, dense: 3, terms: 256, ..Default::default() }
}

fn row(d: &EncodedDataset, i: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (s, n) = (d.num_slots, d.num_dense);
    (
        d.rows[i * s..(i + 1) * s].to_vec(),
        d.values[i * s..(i + 1) * s].iter().map(|v| v.to_bits()).collect(),
        d.dense[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect(),
    )
}

#[test]
fn examples_are_a_function_of_seed_stream_and_index_and_never_repeat() {
    let w = World::new(&small()).unwrap();
    let (a, pa) = w.generate(TRAIN_STREAM, 0, 3_000);
    let (b, pb) = w.generate(TRAIN_STREAM, 1_000, 500);
    for i in 0..500 {
        assert_eq!(row(&a, 1_000 + i), row(&b, i), "example {} differs when generated from another start", 1_000 + i);
        assert_eq!(a.labels[1_000 + i], b.labels[i]);
        assert_eq!(pa[1_000 + i], pb[i]);
    }
    // a rebuilt world (same seed) gives the same stream; another seed another one
    let again = World::new(&small()).unwrap();
    assert_eq!(again.generate(TRAIN_STREAM, 0, 100).1, pa[..100].to_vec());
    let other = World::new(&WorldConfig { seed: 2, ..small() }).unwrap();
    assert_ne!(other.generate(TRAIN_STREAM, 0, 100).1, pa[..100].to_vec());
    // 50,000 training examples and the validation stream: no example twice
    let (t, _) = w.generate(TRAIN_STREAM, 0, 50_000);
    let (v, _) = w.generate(VALID_STREAM, 0, 10_000);
    let mut seen = HashSet::new();
    for i in 0..t.len() {
        assert!(seen.insert(row(&t, i)), "training example {i} repeats an earlier one");
    }
    for i in 0..v.len() {
        assert!(seen.insert(row(&v, i)), "validation example {i} also occurs in training");
    }
    // rows stay inside each field's block of the table; bag padding has weight 0
    let enc = w.encoder();
    assert_eq!(enc.num_slots(), t.num_slots);
    assert!(t.rows.iter().all(|&r| (r as usize) < enc.total_rows()));
    assert!(t.values.iter().all(|&v| v == 0.0 || v == 1.0));
}

#[test]
fn bayes_limit_is_the_logloss_our_metrics_give_the_teacher_and_labels_follow_it() {
    let w = World::new(&small()).unwrap();
    let (split, log) = world_split(&w, VALID_STREAM, 40_000);
    let SplitData::Memory(d) = &split else { panic!("held-out splits live in memory") };
    let (_, p) = w.generate(VALID_STREAM, 0, 40_000);
    // a "model" that outputs the teacher's logit gets exactly the Bayes LogLoss through our metrics
    let mut acc = MetricAccumulator::new();
    for (&p, &y) in p.iter().zip(&d.labels) {
        acc.push((p / (1.0 - p)).ln() as f32, y);
    }
    let m = acc.finish().unwrap();
    let bayes = log.bayes_logloss.unwrap();
    assert!((m.logloss - bayes).abs() < 1e-5, "metrics {} vs Bayes {bayes}", m.logloss);
    // the realised LogLoss is near its expectation (the mean entropy): within 4 standard errors
    let entropy = log.teacher_entropy.unwrap();
    assert!((bayes - entropy).abs() < 4.0 * 0.6 / (40_000f64).sqrt(), "Bayes {bayes} vs entropy {entropy}");
    assert!((world::logloss(&p, &d.labels) - bayes).abs() < 1e-12);
    // the offset hits the positive rate; labels are calibrated to p (deciles of p)
    assert!((log.positive_rate - 0.25).abs() < 0.015, "positive rate {}", log.positive_rate);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    for decile in idx.chunks(4_000) {
        let mean_p = decile.iter().map(|&i| p[i]).sum::<f64>() / decile.len() as f64;
        let rate = decile.iter().map(|&i| d.labels[i] as f64).sum::<f64>() / decile.len() as f64;
        let se = (mean_p * (1.0 - mean_p) / decile.len() as f64).sqrt();
        assert!((rate - mean_p).abs() < 5.0 * se + 0.01, "observed {rate} vs predicted {mean_p}");
    }
    // the teacher is informative (well below the entropy of the base rate) and not deterministic
    let base = -(0.25f64 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
    assert!(bayes < base - 0.05 && bayes > 0.05, "Bayes {bayes}, base-rate entropy {base}");
}

#[test]
fn the_loader_batches_the_generated_stream_in_order_and_resumes_inside_it() {
    let w = Arc::new(World::new(&small()).unwrap());
    let rows = w.encoder().total_rows();
    let split = SplitData::Generated { world: Arc::clone(&w), stream: TRAIN_STREAM, rows: 2_500 };
    let loader = BatchLoader::from_split(split, rows, 256, 1_000, 1);
    assert_eq!(loader.num_batches(), 10);
    let batches: Vec<_> = loader.epoch(Some(7)).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 10);
    assert_eq!(batches.iter().map(|b| b.size).sum::<usize>(), 2_500);
    let (d, _) = w.generate(TRAIN_STREAM, 0, 2_500);
    let labels: Vec<f32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, d.labels, "examples arrive in stream order, every one once");
    let resumed: Vec<_> = loader.epoch_from(Some(7), 6).map(|b| b.unwrap()).collect();
    assert_eq!(resumed.len(), 4);
    assert_eq!(resumed[0].labels, batches[6].labels);
    assert_eq!(resumed[0].unique_rows, batches[6].unique_rows);
}

#[test]
fn synthetic_configs_refuse_files_and_check_their_keys() {
    let parse = |extra: &str| -> anyhow::Result<ExperimentConfig> {
        let text = format!("name = \"s\"\n[data]\nformat = \"synthetic\"\n{extra}\n[model]\nname = \"lr\"\n");
        let cfg: ExperimentConfig = toml::from_str(&text)?;
        cfg.validate()?;
        Ok(cfg)
    };
    let ok = parse("[data.world]\ntrain_examples = 1000").unwrap();
    assert_eq!(ok.data.world().train_examples, 1000);
    assert_eq!(ok.data.world().fields, WorldConfig::default().fields, "unset keys take their defaults");
    let err = |extra: &str| format!("{:#}", parse(extra).expect_err(extra));
    assert!(err("train = \"x.tsv\"").contains("synthetic data is generated"));
    assert!(err("[data.world]\nmax_order = 1").contains("data.world.max_order"));
    assert!(err("[data.world]\npositive_rate = 1.5").contains("data.world.positive_rate"));
    assert!(err("[data.world]\nvocab_min = 100\nvocab_max = 10").contains("data.world.vocab_max"));
    assert!(err("[data.world]\nnot_a_key = 1").contains("not_a_key"));
}

/// The stream written as TSV reads back through `format = "tsv"`: same labels, dense values and
/// the same value partition per field.
#[test]
fn the_stream_written_as_tsv_reads_back() {
    use wukong::data::pipeline::{SplitSource, fit_in_memory};
    let dir = std::env::temp_dir().join(format!("wukong-world-tsv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = small();
    let w = World::new(&cfg).unwrap();
    let path = dir.join("train.tsv.gz");
    w.write_tsv(TRAIN_STREAM, 0, 2_000, &path).unwrap();
    let mut schema = String::from("format = \"tsv\"\ntrain = \"\"\nvalid = \"\"\nlabel = \"label\"\n");
    for f in 0..cfg.fields {
        if f < cfg.multi_hot_fields {
            schema += &format!("[[fields]]\nname = \"c{f}\"\nkind = \"multi_hot\"\nseparator = \"|\"\nmax_len = {}\n", cfg.max_bag);
        } else {
            schema += &format!("[[fields]]\nname = \"c{f}\"\nkind = \"categorical\"\n");
        }
    }
    for k in 0..cfg.dense {
        schema += &format!("[[fields]]\nname = \"d{k}\"\nkind = \"numeric\"\n");
    }
    let mut data: wukong::data::DataConfig = toml::from_str(&schema).unwrap();
    data.train = path.clone();
    data.valid = Some(path.clone());
    data.validate().unwrap();
    let (_, read, log) = fit_in_memory(&data, &SplitSource { name: "train", path, part: None }).unwrap();
    let (made, _) = w.generate(TRAIN_STREAM, 0, 2_000);
    assert_eq!((log.rows, log.skipped), (2_000, 0));
    assert_eq!(read.labels, made.labels);
    assert_eq!(read.dense, made.dense, "dense values survive the text round trip exactly");
    // the same values of a field get the same row, different values different rows
    for slot in 0..made.num_slots {
        let mut pairs = HashSet::new();
        for i in 0..made.len() {
            pairs.insert((made.rows[i * made.num_slots + slot], read.rows[i * read.num_slots + slot]));
        }
        let a: HashSet<_> = pairs.iter().map(|p| p.0).collect();
        let b: HashSet<_> = pairs.iter().map(|p| p.1).collect();
        assert!(pairs.len() == a.len() && pairs.len() == b.len(), "slot {slot}: the value partition differs");
    }
}

/// A run reports both selections (best validation AUC and best validation LogLoss, each scored on
/// test) and writes the reliability table of its test predictions.
#[test]
fn runs_report_both_selections_and_a_reliability_table() {
    use wukong::train::{self, RunOptions};
    let dir = std::env::temp_dir().join(format!("wukong-world-select-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = "name = \"sel\"\n[data]\nformat = \"synthetic\"\n[data.world]\nfields = 6\nmulti_hot_fields = 1\nmax_bag = 2\nvocab_max = 500\ndense = 2\nterms = 64\n\
                train_examples = 4000\nvalid_examples = 1500\ntest_examples = 2000\n[model]\nname = \"wukong\"\nembedding_dim = 4\nnum_layers = 1\nnum_fmb = 2\n\
                num_lcb = 2\nfm_rank = 2\nfmb_mlp = [8]\ntop_mlp = [8]\n[train]\nepochs = 3\nbatch_size = 500\neval_every_steps = 2\nwarmup_steps = 0\npatience = 100\nlr = 0.02\n";
    let cfg = ExperimentConfig::parse(text).unwrap();
    let out = train::train(&cfg, &RunOptions { out_dir: dir.clone(), ..Default::default() }).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.run_dir.join("result.json")).unwrap()).unwrap();
    let (auc, ll) = (&r["selected_by"]["auc"], &r["selected_by"]["logloss"]);
    assert_eq!(auc["test_auc"], r["test_auc"], "the monitored selection is the run's headline");
    assert_eq!(auc["step"], r["best_step"]);
    assert!(ll["test_logloss"].as_f64().is_some() && ll["valid_logloss"].as_f64().unwrap() <= auc["valid_logloss"].as_f64().unwrap());
    assert!(ll["valid_auc"].as_f64().unwrap() <= auc["valid_auc"].as_f64().unwrap());
    // the reliability table: 10 deciles over the 2,000 test examples, increasing predictions
    let table = std::fs::read_to_string(out.run_dir.join("reliability.csv")).unwrap();
    let rows: Vec<Vec<f64>> = table.lines().skip(1).map(|l| l.split(',').map(|x| x.parse().unwrap()).collect()).collect();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows.iter().map(|r| r[3]).sum::<f64>(), 2000.0);
    assert!(rows.windows(2).all(|w| w[0][1] <= w[1][1]));
    // the selected checkpoint calibrated on validation (Platt): its validation LogLoss can only
    // fall (the fit minimises it; the identity is a candidate), its ranking stays (AUC within
    // the rounding of the mapped logits to f32)
    let c = &r["calibrated"];
    assert_eq!(c["method"], "platt", "{c}");
    assert!(c["a"].as_f64().unwrap() > 0.0);
    assert!(c["valid_logloss"].as_f64().unwrap() <= auc["valid_logloss"].as_f64().unwrap() + 1e-6, "{c} vs {auc}");
    assert!((c["test_auc"].as_f64().unwrap() - r["test_auc"].as_f64().unwrap()).abs() < 1e-4, "{c}");
    assert!((c["valid_auc"].as_f64().unwrap() - r["valid_auc"].as_f64().unwrap()).abs() < 1e-4, "{c}");
    assert!(c["test_logloss"].as_f64().unwrap().is_finite());
}
