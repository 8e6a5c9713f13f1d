//! The `wukong` binary as a user runs it: train → eval → predict, flops, and error messages.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wukong"))
}

mod common;

fn workdir(name: &str) -> PathBuf {
    common::workdir(&format!("cli-{name}"))
}

/// Labels follow the parity of user + item ids, learnable from their embeddings' interaction.
fn write_data(dir: &Path) {
    for (name, n, shift) in [("train", 3000, 0), ("valid", 600, 7), ("test", 600, 13)] {
        let text: String = (0..n)
            .map(|i| {
                let (u, it) = ((i * 7 + shift) % 20, (i * 11 + shift * 3) % 15);
                let y = if (u + it) % 2 == 0 { 1 } else { 0 };
                format!("{y} {u}:1 {}:1\n", 100 + it)
            })
            .collect();
        std::fs::write(dir.join(format!("{name}.libsvm")), text).unwrap();
    }
    let cfg = format!(
        "name = \"cli\"\n[data]\ntrain = \"{0}/train.libsvm\"\nvalid = \"{0}/valid.libsvm\"\ntest = \"{0}/test.libsvm\"\n\
         [model]\nname = \"wukong\"\nembedding_dim = 8\nnum_layers = 1\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 2\nfmb_mlp = [16]\ntop_mlp = [16]\n\
         [train]\nepochs = 1\nbatch_size = 128\nwarmup_steps = 5\n",
        dir.display()
    );
    std::fs::write(dir.join("cfg.toml"), cfg).unwrap();
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "command failed\nstdout:\n{so}\nstderr:\n{se}");
    so
}

#[test]
fn train_eval_predict_flops() {
    let dir = workdir("ok");
    write_data(&dir);
    let cfg = dir.join("cfg.toml");
    let out = run_ok(
        bin().args(["--threads", "1", "train", "--config"]).arg(&cfg).args(["--epochs", "3", "--seed", "5", "--out"]).arg(dir.join("runs")),
    );
    assert!(out.contains("epoch   1: train logloss"), "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("test AUC "), "the final line reports test metrics: {last}");
    let auc: f64 = last.split_whitespace().nth(2).unwrap().parse().unwrap();
    let run_dir = out.lines().find_map(|l| l.strip_prefix("run directory: ")).unwrap().to_string();

    // eval on the test file reproduces the reported number
    let eval = run_ok(bin().args(["eval", "--run", &run_dir, "--data"]).arg(dir.join("test.libsvm")));
    let eval_auc: f64 = eval.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((eval_auc - auc).abs() < 1e-6, "eval {eval_auc} vs train {auc}");

    // predict: one probability per input line
    let pred = dir.join("pred.txt");
    run_ok(bin().args(["predict", "--run", &run_dir, "--data"]).arg(dir.join("test.libsvm")).arg("--out").arg(&pred));
    let probs: Vec<f64> = std::fs::read_to_string(&pred).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(probs.len(), 600);
    assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));

    // predict --calibrated: every score through the run's Platt scaling, σ(a·z + b) of the raw logit z
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&run_dir).join("result.json")).unwrap()).unwrap();
    let (a, b) = (result["calibrated"]["a"].as_f64().unwrap(), result["calibrated"]["b"].as_f64().unwrap());
    let cal = dir.join("pred-calibrated.txt");
    run_ok(bin().args(["predict", "--calibrated", "--run", &run_dir, "--data"]).arg(dir.join("test.libsvm")).arg("--out").arg(&cal));
    let calibrated: Vec<f64> = std::fs::read_to_string(&cal).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(calibrated.len(), probs.len());
    for (p, c) in probs.iter().zip(&calibrated) {
        let z = (p / (1.0 - p)).ln();
        let want = 1.0 / (1.0 + (-(a * z + b)).exp());
        assert!((c - want).abs() < 1e-4, "raw {p} → calibrated {c}, expected {want} (a {a}, b {b})");
    }

    // serve as a process: score over HTTP (same as predict), SIGHUP reloads, SIGTERM exits cleanly
    serve_process(&run_dir, &probs);

    // compare: a Table-2-style row from the finished run, with its numbers and directory
    let table_path = dir.join("table.md");
    let table = run_ok(bin().args(["compare", "--run", &run_dir, "--out"]).arg(&table_path));
    let row = table.lines().find(|l| l.starts_with("| wukong | cli |")).unwrap_or_else(|| panic!("no row in\n{table}"));
    assert!(row.contains(&format!("{auc:.6}")) && row.contains(&run_dir), "{row}");
    assert_eq!(std::fs::read_to_string(&table_path).unwrap().lines().count(), 3);
    let bad = bin().args(["compare", "--run"]).arg(dir.join("nope")).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("is not a run directory"));

    // flops on the same config
    let flops = run_ok(bin().args(["flops", "--config"]).arg(&cfg));
    assert!(flops.contains("forward FLOPs/example") && flops.contains("embedding rows             37"), "{flops}");
}

#[test]
fn bad_input_is_reported_with_file_and_line() {
    let dir = workdir("bad");
    write_data(&dir);
    let mut text = std::fs::read_to_string(dir.join("train.libsvm")).unwrap();
    text.push_str("1 3:1 oops\n");
    std::fs::write(dir.join("train.libsvm"), text).unwrap();
    let out = bin().args(["train", "--config"]).arg(dir.join("cfg.toml")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.libsvm:3001: field 1: expected id:value"), "{err}");
    // a typo in the config names the key
    let cfg = std::fs::read_to_string(dir.join("cfg.toml")).unwrap().replace("fm_rank", "fm_rnak");
    std::fs::write(dir.join("typo.toml"), cfg).unwrap();
    let out = bin().args(["train", "--config"]).arg(dir.join("typo.toml")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("fm_rnak"));
}

#[test]
fn criteo_tsv_generate_cache_train_stream_eval() {
    let dir = workdir("criteo");
    for (name, rows, seed) in [("criteo_train.tsv", 30_000, 1), ("criteo_valid.tsv", 4_000, 2), ("criteo_test.tsv", 4_000, 3)] {
        run_ok(
            bin()
                .args(["gen-criteo", "--rows", &rows.to_string(), "--seed", &seed.to_string(), "--max-vocab", "2000", "--out"])
                .arg(dir.join(name)),
        );
    }
    // the shipped config, run from the data directory (its file names and cache_dir are relative)
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/criteo_wukong.toml");
    let cache = run_ok(bin().current_dir(&dir).args(["cache", "--config"]).arg(&cfg).args(["--read-passes", "1"]));
    assert!(cache.contains("train       30000") && cache.contains("epoch read 1: 30000 rows"), "{cache}");
    let train = |extra: &[&str]| {
        run_ok(
            bin()
                .current_dir(&dir)
                .args(["--threads", "1", "train", "--config"])
                .arg(&cfg)
                .args(["--epochs", "2", "--batch-size", "512", "--out", "runs"])
                .args(extra),
        )
    };
    let out = train(&[]);
    assert!(out.contains("train: 30000 rows") && out.contains("from cache"), "{out}");
    let auc: f64 = out.lines().last().unwrap().split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(auc > 0.65, "test AUC {auc} on the generated Criteo data\n{out}");
    // eval without --data scores the config's test split
    let run_dir = out.lines().find_map(|l| l.strip_prefix("run directory: ")).unwrap().to_string();
    let eval = run_ok(bin().current_dir(&dir).args(["eval", "--run", &run_dir]));
    let eval_auc: f64 = eval.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((eval_auc - auc).abs() < 1e-6, "eval {eval_auc} vs train {auc}");

    // a real Criteo test file has no label column: predict scores it with --unlabeled, the same
    // probabilities as the labelled file; without the flag the error says what to do
    let unlabeled: String = std::fs::read_to_string(dir.join("criteo_test.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.split_once('\t').unwrap().1.to_string() + "\n")
        .collect();
    std::fs::write(dir.join("unlabeled.tsv"), unlabeled).unwrap();
    run_ok(bin().current_dir(&dir).args(["predict", "--run", &run_dir, "--out", "labelled.txt"]));
    run_ok(bin().current_dir(&dir).args([
        "predict",
        "--run",
        &run_dir,
        "--data",
        "unlabeled.tsv",
        "--unlabeled",
        "--out",
        "unlabeled.txt",
    ]));
    let (a, b) = (std::fs::read_to_string(dir.join("labelled.txt")).unwrap(), std::fs::read_to_string(dir.join("unlabeled.txt")).unwrap());
    assert_eq!(a.lines().count(), 4000);
    assert_eq!(a, b);
    let out = bin().current_dir(&dir).args(["predict", "--run", &run_dir, "--data", "unlabeled.tsv"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unlabeled.tsv:1: expected 40 columns, found 39") && err.contains("--unlabeled"),
        "{err}"
    );

    // streamed from the cache in chunks: trains to a comparable AUC
    let streamed_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("cache_dir = \"cache/criteo\"", "cache_dir = \"cache/criteo\"\nstream = true\nchunk_rows = 5000\nshuffle_chunks = 2");
    std::fs::write(dir.join("stream.toml"), streamed_cfg).unwrap();
    let out = run_ok(bin().current_dir(&dir).args([
        "--threads",
        "1",
        "train",
        "--config",
        "stream.toml",
        "--epochs",
        "2",
        "--batch-size",
        "512",
        "--out",
        "runs",
    ]));
    assert!(out.contains("(streamed)"), "{out}");
    let streamed_auc: f64 = out.lines().last().unwrap().split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(streamed_auc > 0.65, "streamed test AUC {streamed_auc}\n{out}");

    // a changed training file makes the cache stale: refused under --no-rebuild-cache, rebuilt
    // (with a note saying why) by default
    let mut text = std::fs::read_to_string(dir.join("criteo_train.tsv")).unwrap();
    text.push_str("not a row\n");
    std::fs::write(dir.join("criteo_train.tsv"), text).unwrap();
    let out = bin().current_dir(&dir).args(["cache", "--no-rebuild-cache", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is stale") && err.contains("--rebuild-cache"), "{err}");
    let out = bin().current_dir(&dir).args(["cache", "--config"]).arg(&cfg).output().unwrap();
    let (rebuilt, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && err.contains("is stale (source changed") && err.contains("rebuilding it"), "{err}");
    assert!(rebuilt.contains("train       30000        1"), "the bad line is skipped and counted (bad_lines = skip):\n{rebuilt}");
}

/// A plan that cannot train well is announced: epochs of a few steps, a warm-up longer than the
/// run. With `warmup_fraction` the warm-up scales with the run and the second warning goes away.
#[test]
fn small_data_plans_warn_and_warmup_fraction_scales() {
    let dir = workdir("plan-warnings");
    write_data(&dir);
    let cfg = dir.join("cfg.toml");
    let out = bin()
        .args(["--threads", "1", "train", "--config"])
        .arg(&cfg)
        .args(["--batch-size", "1024", "--out"])
        .arg(dir.join("runs"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("an epoch is only 3 step(s)"), "{err}");
    assert!(err.contains("the warm-up (5 steps) lasts the whole run (3 steps"), "{err}");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("warmup_steps = 5", "warmup_fraction = 0.1");
    std::fs::write(dir.join("frac.toml"), text).unwrap();
    let out = bin()
        .args(["--threads", "1", "train", "--config"])
        .arg(dir.join("frac.toml"))
        .args(["--batch-size", "1024", "--epochs", "4", "--out"])
        .arg(dir.join("runs"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("an epoch is only 3 step(s)") && !err.contains("lasts the whole run"), "{err}");
}

/// `wukong report` on two tiny runs: the PNGs are PNGs and the page embeds them with each run's
/// numbers, config and environment (the git commit of the build among them).
#[test]
fn report_renders_for_tiny_runs() {
    let dir = workdir("report");
    write_data(&dir);
    let cfg = dir.join("cfg.toml");
    let mut runs = Vec::new();
    for seed in ["1", "2"] {
        let out = run_ok(
            bin()
                .args(["--threads", "1", "train", "--config"])
                .arg(&cfg)
                .args(["--epochs", "2", "--seed", seed, "--out"])
                .arg(dir.join("runs")),
        );
        runs.push(out.lines().find_map(|l| l.strip_prefix("run directory: ")).unwrap().to_string());
    }
    let report = dir.join("report");
    let out = run_ok(bin().arg("report").args(&runs).arg("--out").arg(&report));
    assert!(out.contains("wrote") && out.contains("report.html"), "{out}");
    for png in ["curves.png", "roc_reliability.png"] {
        let bytes = std::fs::read(report.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{png}: {} bytes", bytes.len());
    }
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert_eq!(html.matches("data:image/png;base64,").count(), 2);
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&runs[0]).join("result.json")).unwrap()).unwrap();
    assert!(html.contains(&format!("{:.6}", result["test_auc"].as_f64().unwrap())), "the table shows the run's test AUC");
    assert!(html.contains("git_commit") && html.contains("embedding_dim"), "config and environment are on the page");
    // a directory that is not a run is an error naming it
    let bad = bin().args(["report"]).arg(dir.join("nope")).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("is not a run directory"));
}

/// `compare --config` trains through the experiment runner: a second invocation reads the
/// finished run back instead of training it again, and the table names the same directory.
#[test]
fn compare_resumes_through_the_experiment_runner() {
    let dir = workdir("compare-runner");
    std::fs::write(
        dir.join("syn_lr.toml"),
        "name = \"syn-lr\"\n[data]\nformat = \"synthetic\"\n[data.world]\nfields = 4\nmulti_hot_fields = 0\nvocab_max = 100\ndense = 1\nterms = 16\nmax_order = 4\n\
         train_examples = 2000\nvalid_examples = 1000\ntest_examples = 1000\n[model]\nname = \"lr\"\n[train]\nepochs = 1\nbatch_size = 500\nwarmup_steps = 0\n",
    )
    .unwrap();
    let run = || {
        let out = bin()
            .args(["--threads", "1", "compare", "--config"])
            .arg(dir.join("syn_lr.toml"))
            .arg("--runs-dir")
            .arg(dir.join("runs"))
            .output()
            .unwrap();
        let (so, se) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        assert!(out.status.success(), "{so}\n{se}");
        (so, se)
    };
    let (first, err1) = run();
    assert!(err1.contains("syn_lr (training)"), "{err1}");
    let (second, err2) = run();
    assert!(err2.contains("syn_lr (finished, read back)"), "{err2}");
    let dir_line = |t: &str| t.lines().find(|l| l.contains("points/syn_lr")).map(str::to_string);
    assert!(dir_line(&first).is_some() && dir_line(&first) == dir_line(&second), "{first}\n{second}");
}

/// `wukong serve` as an operator runs it: the address line, a score equal to `predict`'s, a
/// reload on SIGHUP, a clean exit on SIGTERM.
fn serve_process(run_dir: &str, predicted: &[f64]) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = bin()
        .args(["--threads", "1", "serve", "--run", run_dir, "--addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit_once("http://").unwrap_or_else(|| panic!("no address in {line:?}")).1.to_string();
    // the first test row of write_data: i = 0, shift 13 → user 13, item 100 + 39 % 15
    let body = r#"{"rows": [{"f0": 13, "f1": 109}]}"#;
    let http = |body: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    };
    let resp = http(body);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let json: serde_json::Value = serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let score = json["scores"][0].as_f64().unwrap();
    assert!((score - predicted[0]).abs() < 1e-6, "served {score} vs predict {}", predicted[0]);
    let kill = |sig: &str| assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
    kill("-HUP");
    line.clear();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("SIGHUP: reloaded (version 2)"), "{line}");
    assert!(http(body).starts_with("HTTP/1.1 200"));
    kill("-TERM");
    let status = child.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success() && rest.contains("shutting down"), "{status}: {rest}");
}

/// Small failure paths: `gen-world` on a config without synthetic data or with an unknown split,
/// and a run asked to write into a directory that exists.
#[test]
fn gen_world_and_run_dir_refusals() {
    let dir = workdir("refusals");
    write_data(&dir);
    let cfg = dir.join("cfg.toml");
    let out = bin().args(["gen-world", "--config"]).arg(&cfg).arg("--out").arg(dir.join("w.tsv")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no synthetic data"), "{err}");
    let world = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/scale/synthetic_base.toml");
    let out = bin().args(["gen-world", "--config"]).arg(&world).args(["--split", "dev", "--out"]).arg(dir.join("w.tsv")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown split \"dev\""), "{err}");
    assert!(!dir.join("w.tsv").exists());

    let config = wukong::config::ExperimentConfig::load(&cfg).unwrap();
    let taken = dir.join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("keep.txt"), "mine").unwrap();
    let opts = wukong::train::RunOptions { run_dir: Some(taken.clone()), ..Default::default() };
    let err = format!("{:#}", wukong::train::train(&config, &opts).unwrap_err());
    assert!(err.contains("exists already") && err.contains("taken"), "{err}");
    assert_eq!(std::fs::read_to_string(taken.join("keep.txt")).unwrap(), "mine", "nothing of the directory touched");
}

/// A binary built without the `mpi` feature, started by an MPI launcher for several ranks, must
/// say so instead of training N independent copies that overwrite each other's run.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_binary_without_mpi_refuses_a_multi_rank_launch() {
    let out = bin().args(["train", "--config", "no-such.toml"]).env("OMPI_COMM_WORLD_SIZE", "2").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built without MPI") && err.contains("--features mpi"), "{err}");
}
