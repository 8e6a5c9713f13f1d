//! `wukong tune`: seeded trials (the same on a restart), a leaderboard ordered by the validation
//! metric only, resumption, grids, and the best config re-run with seeds (mean ± std).

use std::path::Path;

use wukong::train::RunOptions;
use wukong::tune;

mod common;

fn write(dir: &Path, space: &str) {
    std::fs::write(
        dir.join("base.toml"),
        "name = \"base\"\n[data]\nformat = \"synthetic\"\n[data.world]\nfields = 6\nmulti_hot_fields = 1\nmax_bag = 2\nvocab_max = 500\ndense = 2\nterms = 64\n\
         train_examples = 3000\nvalid_examples = 1500\ntest_examples = 1500\n[model]\nname = \"wukong\"\nembedding_dim = 4\nnum_layers = 1\nnum_fmb = 2\n\
         num_lcb = 2\nfm_rank = 2\nfmb_mlp = [8]\ntop_mlp = [8]\n[train]\nepochs = 1\nbatch_size = 500\neval_batch_size = 1500\nwarmup_steps = 0\n",
    )
    .unwrap();
    std::fs::write(dir.join("space.toml"), space).unwrap();
}

const SPACE: &str = "name = \"t\"\nbase = \"base.toml\"\ntrials = 4\nseed = 3\nseeds = [1, 2]\n[space]\n\
    \"train.lr\" = { loguniform = [1e-4, 3e-2] }\n\"model.dropout\" = { uniform = [0.0, 0.2] }\n\"model.num_fmb\" = { choice = [2, 4] }\n\"model.num_layers\" = { int = [1, 2] }\n";

#[test]
fn a_search_ranks_by_validation_resumes_and_reruns_the_best_with_seeds() {
    let dir = common::workdir("tune");
    write(&dir, SPACE);
    let (_, a) = tune::trials(&dir.join("space.toml")).unwrap();
    let (_, b) = tune::trials(&dir.join("space.toml")).unwrap();
    assert_eq!(
        a.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
        b.iter().map(|t| t.0.clone()).collect::<Vec<_>>(),
        "trials are a function of the seed"
    );
    assert_eq!(a.len(), 4);
    for (s, p) in &a {
        let lr = s["train.lr"].as_float().unwrap();
        assert!((1e-4..=3e-2).contains(&lr) && p.config.train.lr == lr, "the sampled value reaches the config");
        let layers = s["model.num_layers"].as_integer().unwrap();
        assert!((1..=2).contains(&layers));
    }
    let out = dir.join("out");
    let opts = RunOptions { out_dir: out.clone(), ..Default::default() };
    let summary = tune::run(&dir.join("space.toml"), &out, &opts, None).unwrap();
    // the leaderboard is ordered by validation AUC, best first, and the summary names its top
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(csv.as_bytes());
    let header = rdr.headers().unwrap().clone();
    let col = header.iter().position(|h| h == "valid_auc").unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 4);
    let aucs: Vec<f64> = rows.iter().map(|r| r[col].parse().unwrap()).collect();
    assert!(aucs.windows(2).all(|w| w[0] >= w[1]), "{aucs:?}");
    let cal = header.iter().position(|h| h == "calibrated_test_logloss").unwrap();
    assert!(rows.iter().all(|r| r[cal].parse::<f64>().unwrap().is_finite()), "every trial's calibrated test LogLoss");
    // one-epoch trials end at their cap with their best in it: flagged, since more epochs may pay
    let at = |name: &str| header.iter().position(|h| h == name).unwrap();
    for r in &rows {
        assert_eq!((&r[at("best_epoch")], &r[at("epochs_run")], &r[at("at_cap_improving")]), ("1", "1", "yes"), "{r:?}");
    }
    assert_eq!(&rows[0][1], summary.best.as_str());
    assert!(std::fs::read_to_string(out.join("leaderboard.md")).unwrap().contains("| 1 | trial-"));
    // two seeds of the best config: mean ± std from their test metrics
    let seed_auc: Vec<f64> = [1, 2]
        .iter()
        .map(|s| {
            let r: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join(format!("points/best-{}-seed{s}/result.json", summary.best))).unwrap(),
            )
            .unwrap();
            r["test_auc"].as_f64().unwrap()
        })
        .collect();
    let mean = (seed_auc[0] + seed_auc[1]) / 2.0;
    assert!((summary.test_auc_mean.unwrap() - mean).abs() < 1e-12);
    assert!((summary.test_auc_std.unwrap() - (seed_auc[0] - seed_auc[1]).abs() / 2f64.sqrt()).abs() < 1e-12);
    // `wukong compare --tuned`: the Table-2 row of the search
    let row = wukong::compare::read_tuned(&out).unwrap();
    assert_eq!((row.name.as_str(), row.trials, row.best.as_str(), row.seeds.len()), ("t", 4, summary.best.as_str(), 2));
    let table = wukong::compare::tuned_table(std::slice::from_ref(&row));
    let sd = summary.test_auc_std.unwrap();
    assert!(table.contains(&format!("| t | wukong | {mean:.6} ± {sd:.6} |")), "{table}");
    // the seeds' calibrated test LogLoss (Platt scaling on validation), mean ± std, in its column
    let cal: Vec<f64> = row.seeds.iter().map(|r| r.calibrated_test_logloss.unwrap()).collect();
    let (cm, cs) = tune::mean_std(&cal).unwrap();
    assert!(table.contains(&format!(" | {cm:.6} ± {cs:.6} | 2 | 4 (")), "{table}");
    assert!(table.contains(&format!("| t | wukong | {mean:.6} ± {sd:.6} | 1 | best |")), "{table}");
    // a second row 0.01 lower on every seed: ranked second, 0.01 behind, in units of the std
    let mut worse = row.clone();
    worse.name = "w".into();
    worse.seeds.iter_mut().for_each(|r| r.test_auc = r.test_auc.map(|a| a - 0.01));
    let two = wukong::compare::tuned_table(&[worse, row.clone()]);
    let (_, wsd) = tune::mean_std(&seed_auc.iter().map(|a| a - 0.01).collect::<Vec<_>>()).unwrap();
    let behind = format!("| w | wukong | {:.6} ± {wsd:.6} | 2 | −0.010000 ({:.2} std) |", mean - 0.01, 0.01 / sd.max(wsd));
    assert!(two.contains(&behind), "{two}\nwanted {behind}");
    assert!(two.contains(&format!("| t | wukong | {mean:.6} ± {sd:.6} | 1 | best |")), "{two}");
    // a second invocation trains nothing again
    let before = std::fs::metadata(out.join("points/trial-001/result.json")).unwrap().modified().unwrap();
    let again = tune::run(&dir.join("space.toml"), &out, &opts, None).unwrap();
    assert_eq!(again.best, summary.best);
    assert_eq!(std::fs::metadata(out.join("points/trial-001/result.json")).unwrap().modified().unwrap(), before);
}

/// The second stage (`refine`): trials drawn near the first stage's best once it finished —
/// each a copy of one of the `refine_top` best with some keys moved a bounded step, never a
/// setting already tried, the same on a restart; the budget and leaderboard include them and the
/// seeds re-run the best of all.
#[test]
fn a_second_stage_refines_near_the_first_stages_best() {
    let dir = common::workdir("tune-refine");
    write(&dir, &SPACE.replace("seeds = [1, 2]\n", "seeds = [1]\nrefine = 3\nrefine_top = 2\n"));
    let (space_path, out) = (dir.join("space.toml"), dir.join("out"));
    let opts = RunOptions { out_dir: out.clone(), ..Default::default() };
    // before the first stage has finished, a second-stage trial cannot be drawn
    let err = format!("{:#}", tune::run_only(&space_path, &out, &opts, "trial-005").unwrap_err());
    assert!(err.contains("the refinement stage needs the first stage's 4 trials finished"), "{err}");
    let st = tune::status(&space_path, &out).unwrap();
    assert!(st.contains("0 of 8 points finished") && st.contains("| trial-007 | pending |"), "{st}");
    assert!(st.contains("| best-tbd-seed1 | pending |"), "no trial finished, no best yet: {st}");
    let summary = tune::run(&space_path, &out, &opts, None).unwrap();
    let (space, first) = tune::trials(&space_path).unwrap();
    let second = tune::refined(&space_path, &space, &first, &out).unwrap();
    assert_eq!(second.iter().map(|(_, p)| p.id.as_str()).collect::<Vec<_>>(), ["trial-005", "trial-006", "trial-007"]);
    // the parents: the first stage's two best by validation AUC, in turn
    let auc = |id: &str| result(&out, id)["valid_auc"].as_f64().unwrap();
    let mut ranked: Vec<&(tune::Settings, wukong::experiment::Point)> = first.iter().collect();
    ranked.sort_by(|a, b| auc(&b.1.id).partial_cmp(&auc(&a.1.id)).unwrap());
    for (j, (child, p)) in second.iter().enumerate() {
        let parent = &ranked[j % 2].0;
        assert!(first.iter().all(|(s, _)| s != child), "{}: a new setting", p.id);
        assert!(second[..j].iter().all(|(s, _)| s != child), "{}: not drawn twice", p.id);
        let lr = (child["train.lr"].as_float().unwrap(), parent["train.lr"].as_float().unwrap());
        assert!((1e-4..=3e-2).contains(&lr.0) && (lr.0 / lr.1).ln().abs() <= 0.25 * (3e-2f64 / 1e-4).ln() + 1e-12, "{}: {lr:?}", p.id);
        let dropout = (child["model.dropout"].as_float().unwrap(), parent["model.dropout"].as_float().unwrap());
        assert!((0.0..=0.2).contains(&dropout.0) && (dropout.0 - dropout.1).abs() <= 0.05 + 1e-12, "{}: {dropout:?}", p.id);
        let layers = child["model.num_layers"].as_integer().unwrap();
        assert!((1..=2).contains(&layers));
        // what the trial trained is what was drawn (a restart draws the same)
        let saved: toml::Table =
            toml::from_str(&std::fs::read_to_string(out.join(format!("points/{}/config.toml", p.id))).unwrap()).unwrap();
        assert_eq!(saved["train"]["lr"].as_float(), Some(lr.0), "{}", p.id);
        assert_eq!(saved["model"]["num_layers"].as_integer(), Some(layers), "{}", p.id);
    }
    // every trial is on the leaderboard; the seed re-runs the best of all seven
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    assert_eq!(csv.lines().count(), 8, "{csv}");
    let best_all = (1..=7).map(|i| format!("trial-{i:03}")).max_by(|a, b| auc(a).partial_cmp(&auc(b)).unwrap()).unwrap();
    assert_eq!(summary.best, best_all);
    assert!(result(&out, &format!("best-{best_all}-seed1"))["test_auc"].as_f64().unwrap().is_finite());
    let st = tune::status(&space_path, &out).unwrap();
    assert!(st.contains("8 of 8 points finished") && st.contains(&format!("| best-{best_all}-seed1 | finished |")), "{st}");
    let row = wukong::compare::read_tuned(&out).unwrap();
    assert_eq!((row.trials, row.best.as_str()), (7, best_all.as_str()));
    // while the second stage runs, the status names the seed runs of the best finished so far
    for id in ["trial-005", "trial-006", "trial-007"] {
        std::fs::rename(out.join(format!("points/{id}/result.json")), out.join(format!("points/{id}/result.json.kept"))).unwrap();
    }
    let st = tune::status(&space_path, &out).unwrap();
    assert!(st.contains(&format!("| best-{}-seed1 |", ranked[0].1.id)), "the first stage's best: {st}");
    for id in ["trial-005", "trial-006", "trial-007"] {
        std::fs::rename(out.join(format!("points/{id}/result.json.kept")), out.join(format!("points/{id}/result.json"))).unwrap();
    }
    // a second invocation trains nothing again
    let before = std::fs::metadata(out.join("points/trial-006/result.json")).unwrap().modified().unwrap();
    assert_eq!(tune::run(&space_path, &out, &opts, None).unwrap().best, summary.best);
    assert_eq!(std::fs::metadata(out.join("points/trial-006/result.json")).unwrap().modified().unwrap(), before);
}

/// A search directory another process holds is refused with a message naming it and that
/// process, before anything is trained; so is a trial a running search's child holds.
#[test]
fn a_search_directory_in_use_is_refused() {
    let dir = common::workdir("tune-held");
    write(&dir, SPACE);
    let out = dir.join("out");
    let opts = RunOptions { out_dir: out.clone(), ..Default::default() };
    let held = wukong::experiment::hold(&out.join(wukong::experiment::LOCK_FILE), "test").unwrap();
    let err = format!("{:#}", tune::run(&dir.join("space.toml"), &out, &opts, None).unwrap_err());
    assert!(err.contains("is in use by another process") && err.contains(&out.display().to_string()), "{err}");
    assert!(!out.join("points").exists(), "nothing trained");
    drop(held);
    let point = wukong::experiment::hold(&out.join("points").join(format!("trial-002{}", wukong::experiment::LOCK_FILE)), "test").unwrap();
    let err = format!("{:#}", tune::run_only(&dir.join("space.toml"), &out, &opts, "trial-002").unwrap_err());
    assert!(err.contains("point trial-002") && err.contains("is in use"), "{err}");
    drop(point);
}

#[test]
fn grids_and_bad_spaces() {
    let dir = common::workdir("tune-grid");
    write(
        &dir,
        "name = \"g\"\nbase = \"base.toml\"\ntrials = 5\nsearch = \"grid\"\n[space]\n\"model.num_fmb\" = { choice = [2, 4] }\n\"model.num_layers\" = { int = [1, 3] }\n",
    );
    let (_, t) = tune::trials(&dir.join("space.toml")).unwrap();
    assert_eq!(t.len(), 5, "a 2 × 3 grid cut to the budget of 5");
    let pairs: std::collections::HashSet<(i64, i64)> =
        t.iter().map(|(s, _)| (s["model.num_fmb"].as_integer().unwrap(), s["model.num_layers"].as_integer().unwrap())).collect();
    assert_eq!(pairs.len(), 5, "no grid point twice");
    let bad = |space: &str| {
        std::fs::write(dir.join("bad.toml"), format!("name = \"b\"\nbase = \"base.toml\"\ntrials = 2\n{space}")).unwrap();
        format!("{:#}", tune::trials(&dir.join("bad.toml")).unwrap_err())
    };
    assert!(bad("search = \"grid\"\n[space]\n\"train.lr\" = { uniform = [0.1, 0.2] }\n").contains("a grid needs choice"));
    assert!(bad("[space]\n\"train.lr\" = { loguniform = [0.0, 0.2] }\n").contains("loguniform needs 0 < lo"));
    assert!(bad("[space]\n\"lr\" = { choice = [0.1] }\n").contains("needs its section"));
    assert!(bad("[space]\n\"model.dropout\" = { choice = [1.5] }\n").contains("model.dropout"));
    assert!(bad("[space]\n\"train.nope\" = { choice = [1] }\n").contains("nope"));
    assert!(bad("refine = 2\nrefine_top = 0\n[space]\n\"train.lr\" = { choice = [0.1] }\n").contains("refine_top must be positive"));
}

/// A base whose trials evaluate three times (every two of their six steps) and never stop on
/// patience.
fn write_long(dir: &Path, space: &str) {
    write(dir, space);
    let base = std::fs::read_to_string(dir.join("base.toml")).unwrap();
    let base = base.replace("warmup_steps = 0\n", "warmup_steps = 0\neval_every_steps = 2\npatience = 10\n");
    std::fs::write(dir.join("base.toml"), base).unwrap();
}

fn result(out: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join(format!("points/{id}/result.json"))).unwrap()).unwrap()
}

#[test]
fn the_median_rule_stops_a_trial_below_the_finished_ones() {
    let dir = common::workdir("tune-median");
    write_long(
        &dir,
        "name = \"m\"\nbase = \"base.toml\"\ntrials = 2\nsearch = \"grid\"\nprune = \"median\"\nprune_grace_evals = 0\nprune_min_trials = 1\n\
         [space]\n\"train.lr\" = { choice = [0.03, 1e-9] }\n\"train.emb_lr\" = { choice = [0.5] }\n",
    );
    let out = dir.join("out");
    tune::run(&dir.join("space.toml"), &out, &RunOptions { out_dir: out.clone(), ..Default::default() }, None).unwrap();
    let evals = |id: &str| std::fs::read_to_string(out.join(format!("points/{id}/metrics.jsonl"))).unwrap().lines().count();
    // the first trial has no finished peer: it runs to the end
    assert_eq!(evals("trial-001"), 3);
    assert!(!result(&out, "trial-001")["stop_reason"].as_str().unwrap().contains("pruned"));
    // the second (dense layers that cannot learn) stops at the evaluation the rule names, before
    // its last, and below the first trial's best at that evaluation
    let why = result(&out, "trial-002")["stop_reason"].as_str().unwrap().to_string();
    let at: usize = why
        .strip_prefix("pruned by the median rule at evaluation ")
        .and_then(|r| r.split(':').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{why}"));
    assert!(at < 3 && evals("trial-002") == at, "{why}");
    assert!(why.contains("of 1 finished trials"), "{why}");
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    let mut rdr = csv::Reader::from_reader(csv.as_bytes());
    let pruned_at = rdr.headers().unwrap().iter().position(|h| h == "pruned_at").unwrap();
    let row = rdr.records().map(|r| r.unwrap()).find(|r| &r[1] == "trial-002").unwrap();
    assert_eq!(&row[pruned_at], at.to_string(), "the leaderboard says where it was pruned: {row:?}");
}

#[test]
fn parallel_trials_train_in_child_processes_with_a_share_of_the_threads() {
    let dir = common::workdir("tune-parallel");
    write_long(
        &dir,
        "name = \"p\"\nbase = \"base.toml\"\ntrials = 3\nseed = 4\nseeds = [1, 2]\nparallel = 2\nrefine = 1\n\
         [space]\n\"train.lr\" = { loguniform = [1e-3, 3e-2] }\n\"model.num_fmb\" = { choice = [2, 4] }\n",
    );
    let out = dir.join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_wukong"))
        .args(["--threads", "2", "tune"])
        .arg(dir.join("space.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("3 to train, 2 at a time with 1 thread(s) each"), "{stderr}");
    assert!(stderr.contains("1 to train, 1 at a time with 2 thread(s) each"), "the second stage's one trial: {stderr}");
    assert!(stderr.contains("2 to train, 2 at a time with 1 thread(s) each"), "the seed re-runs too: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let best = summary["best"].as_str().unwrap();
    for id in ["trial-001", "trial-002", "trial-003", "trial-004"]
        .map(String::from)
        .into_iter()
        .chain([1, 2].map(|s| format!("best-{best}-seed{s}")))
    {
        assert!(result(&out, &id)["test_auc"].as_f64().unwrap().is_finite(), "{id}");
    }
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    // the children trained the configs the search drew, in both stages
    let (space, first) = tune::trials(&dir.join("space.toml")).unwrap();
    let second = tune::refined(&dir.join("space.toml"), &space, &first, &out).unwrap();
    for (s, p) in first.iter().chain(&second) {
        let saved: wukong::config::ExperimentConfig =
            toml::from_str(&std::fs::read_to_string(out.join(format!("points/{}/config.toml", p.id))).unwrap()).unwrap();
        assert_eq!(saved.train.lr, s["train.lr"].as_float().unwrap());
    }
    // the children's lock files beside their points are not trials of the Table-2 row
    assert_eq!(wukong::compare::read_tuned(&out).unwrap().trials, 4);
}

/// The Table-2 search spaces (`configs/tune/`, one per model and dataset): every trial each draws
/// is a valid config of its model, and all spaces spend the same budget the same way.
#[test]
fn the_shipped_search_spaces_draw_valid_configs_with_equal_budgets() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tune");
    let mut per_dataset = std::collections::BTreeMap::<String, usize>::new();
    let mut shared_keys = std::collections::BTreeMap::<String, Vec<String>>::new();
    let mut refine = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        *per_dataset.entry(stem[..stem.rfind('_').unwrap()].to_string()).or_default() += 1;
        let (space, trials) = tune::trials(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!((space.trials, trials.len(), space.seeds.len()), (16, 16, 3), "{}", path.display());
        assert_eq!(space.prune, tune::Prune::Median, "{}", path.display());
        // the second stage's budget is the dataset's, for every model alike
        let stage2 = refine.entry(stem[..stem.rfind('_').unwrap()].to_string()).or_insert((space.refine, space.refine_top));
        assert_eq!(*stage2, (space.refine, space.refine_top), "{}: another second stage than its dataset's", path.display());
        for key in ["train.lr", "train.emb_lr", "train.emb_l2", "model.embedding_dim"] {
            assert!(space.space.contains_key(key), "{}: {key}", path.display());
        }
        for (_, p) in &trials {
            p.config.model.validate().unwrap_or_else(|e| panic!("{} {}: {e:#}", path.display(), p.id));
            // several embeddings per field (§3.2) name fields the data has
            for key in p.config.data.embeddings.keys() {
                assert!(p.config.data.field_names.contains(key), "{} {}: data.embeddings.{key}", path.display(), p.id);
            }
        }
        // within a dataset, every model's space draws the same kind of keys outside its model
        let shared: Vec<String> =
            space.space.keys().filter(|k| !k.starts_with("model.") || k.as_str() == "model.embedding_dim").cloned().collect();
        let first = shared_keys.entry(stem[..stem.rfind('_').unwrap()].to_string()).or_insert_with(|| shared.clone());
        assert_eq!(first, &shared, "{}: other non-model keys than its dataset's", path.display());
    }
    let expected: std::collections::BTreeMap<String, usize> =
        ["frappe", "movielens100k", "movielens100k3", "movielens10m_tags"].iter().map(|d| (d.to_string(), 8)).collect();
    assert_eq!(per_dataset, expected, "one space per model and dataset");
    for ds in expected.keys() {
        assert_eq!(refine[ds], (8, 3), "{ds}: the second stage of every dataset");
    }
}

/// The MovieLens 100K third pass: each model's space is its second-pass space (same budget,
/// seed, stages) with one interaction switch, off in about half of the draws and on in the rest.
#[test]
fn the_third_pass_spaces_add_one_interaction_switch_to_the_second_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tune");
    let off = |key: &str, v: &toml::Value| match key {
        "model.ablate" => v.as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some("fmb"))),
        "model.interaction" => v.as_str() == Some("cat"),
        "model.num_cross_layers" | "model.attention_layers" => v.as_integer() == Some(0),
        "model.use_mask" | "model.bilinear_fusion" | "model.use_afn" => v.as_bool() == Some(false),
        "model.cin_hidden_units" => v.as_array().is_some_and(|a| a.is_empty()),
        _ => false,
    };
    for m in ["wukong", "dlrm", "dcnv2", "autoint", "masknet", "finalmlp", "afn", "xdeepfm"] {
        let (second, _) = tune::trials(&dir.join(format!("movielens100k_{m}.toml"))).unwrap();
        let (third, draws) = tune::trials(&dir.join(format!("movielens100k3_{m}.toml"))).unwrap();
        assert_eq!(
            (third.trials, third.seed, third.refine, third.refine_top, &third.seeds),
            (second.trials, second.seed, second.refine, second.refine_top, &second.seeds),
            "{m}"
        );
        let changed: Vec<&String> = third.space.keys().filter(|k| second.space.get(*k) != third.space.get(*k)).collect();
        assert_eq!(changed.len(), 1, "{m}: one key added or widened, got {changed:?}");
        assert!(second.space.keys().all(|k| third.space.contains_key(k)), "{m}: a second-pass key is missing");
        let switched = draws.iter().filter(|(s, _)| s.get(changed[0].as_str()).is_some_and(|v| off(changed[0], v))).count();
        assert!((4..=12).contains(&switched), "{m}: {switched} of 16 draws switch the interaction off");
        for (_, p) in &draws {
            p.config.model.validate().unwrap_or_else(|e| panic!("{m} {}: {e:#}", p.id));
        }
    }
}

/// `wukong tune --status`: read from the directory alone, while a search runs or after, without
/// taking a lock; holders are the processes that hold the search's and the points' locks now.
#[test]
fn the_status_of_a_search_names_each_points_state_and_who_runs_it() {
    let dir = common::workdir("tune-status");
    write(
        &dir,
        "name = \"s\"\nbase = \"base.toml\"\ntrials = 3\nseed = 2\nseeds = []\n[space]\n\"train.lr\" = { loguniform = [1e-3, 3e-2] }\n",
    );
    let (space, out) = (dir.join("space.toml"), dir.join("out"));
    let opts = RunOptions { out_dir: out.clone(), ..Default::default() };
    tune::run(&space, &out, &opts, None).unwrap();
    let st = tune::status(&space, &out).unwrap();
    assert!(st.contains("is not running: 3 of 3 points finished"), "{st}");
    let done = st.lines().find(|l| l.starts_with("| trial-001 |")).unwrap();
    assert!(done.contains("| finished | 1 | 0."), "one evaluation, its validation AUC: {done}");
    // trial-003 interrupted (no result yet), trial-002 never started
    std::fs::remove_file(out.join("points/trial-003/result.json")).unwrap();
    std::fs::remove_dir_all(out.join("points/trial-002")).unwrap();
    let st = tune::status(&space, &out).unwrap();
    assert!(st.contains("1 of 3 points finished; about "), "with a time left from the finished one: {st}");
    assert!(st.contains("| trial-002 | pending | 0 |  |  |"), "{st}");
    assert!(st.contains("| trial-003 | started | 1 |"), "{st}");
    // a process holding the search and a point (here this one) is named, where the OS tells it
    let _search = wukong::experiment::hold(&out.join(wukong::experiment::LOCK_FILE), "search").unwrap();
    if cfg!(target_os = "linux") {
        // a sequential search trains its one started point in its own process
        let st = tune::status(&space, &out).unwrap();
        assert!(st.contains("| trial-003 | running (in the holder's process) | 1 |"), "{st}");
        assert!(st.contains("| trial-002 | pending |"), "{st}");
    }
    let _point =
        wukong::experiment::hold(&out.join("points").join(format!("trial-003{}", wukong::experiment::LOCK_FILE)), "point").unwrap();
    let st = tune::status(&space, &out).unwrap();
    if cfg!(target_os = "linux") {
        let me = std::process::id();
        assert!(st.contains(&format!("is running (pid {me})")), "{st}");
        assert!(st.contains(&format!("| trial-003 | running (pid {me}) | 1 |")), "{st}");
    }
    // and the status never took a lock: the holds above are still ours alone
    assert!(wukong::experiment::hold(&out.join(wukong::experiment::LOCK_FILE), "search").is_err());
}
