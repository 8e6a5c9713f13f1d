//! Runs that survive: kill -9 at several moments (also inside a checkpoint write) and `--resume`
//! must end bit-identical to the uninterrupted run (in memory and streamed; Wukong, DLRM with
//! batch norm, MaskNet); a corrupted newest checkpoint is refused and the previous one used; the
//! loss-explosion guard recovers under `rollback` and stops under `fail`; a loader error stops
//! the run with its checkpoint intact.
//!
//! Faults are injected with `WUKONG_FAULT` (see `train::checkpoint::Faults`); one test also kills
//! the process with a real SIGKILL at a random moment.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wukong"));
    c.args(["--threads", "1"]);
    c
}

/// Labels follow the parity of user + item ids; a third field carries no signal.
fn write_data(dir: &Path) {
    for (name, n, shift) in [("train", 3000, 0), ("valid", 600, 7), ("test", 600, 13)] {
        let text: String = (0..n)
            .map(|i| {
                let (u, it, c) = ((i * 7 + shift) % 20, (i * 11 + shift * 3) % 15, (i * 13 + shift) % 5);
                let y = if (u + it) % 2 == 0 { 1 } else { 0 };
                format!("{y} {u}:1 {}:1 {}:1\n", 100 + it, 200 + c)
            })
            .collect();
        std::fs::write(dir.join(format!("{name}.libsvm")), text).unwrap();
    }
}

const WUKONG: &str = "name = \"wukong\"\nembedding_dim = 8\nnum_layers = 2\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 2\nfmb_mlp = [16]\ntop_mlp = [16]\ndropout = 0.1\n";
const DLRM: &str =
    "name = \"dlrm\"\nembedding_dim = 8\ninteraction = \"cat\"\ntop_mlp_units = [32, 16]\ndropout = 0.2\nbatch_norm = true\n";
const MASKNET: &str = "name = \"masknet\"\nembedding_dim = 8\nmodel_type = \"serial\"\nblock_hidden_units = [16, 16]\ndropout = 0.1\n";

/// A config over the data in `dir`; `stream` trains from the cache in chunks.
fn write_config(dir: &Path, model: &str, stream: bool, extra_train: &str) -> PathBuf {
    let data = if stream {
        format!("cache_dir = \"{0}/cache\"\nstream = true\nchunk_rows = 500\nshuffle_chunks = 2\n", dir.display())
    } else {
        String::new()
    };
    let cfg = format!(
        "name = \"resume\"\n[data]\ntrain = \"{0}/train.libsvm\"\nvalid = \"{0}/valid.libsvm\"\ntest = \"{0}/test.libsvm\"\n{data}\
         [model]\n{model}\
         [train]\nepochs = 3\nbatch_size = 128\nwarmup_steps = 5\npatience = 10\ncheckpoint_every_steps = 7\neval_every_steps = 20\nemb_lr = 0.05\n{extra_train}",
        dir.display()
    );
    let path = dir.join(format!("cfg-{}.toml", if stream { "stream" } else { "mem" }));
    std::fs::write(&path, cfg).unwrap();
    path
}

fn output(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

/// The run directory a `train` created under `out` (there is exactly one).
fn only_run(out: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// What must be identical between runs: the result without its timings, and every metrics line
/// without its timings.
fn fingerprint(run: &Path) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut result: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    for timing in ["seconds", "checkpoint_seconds", "checkpoints_written"] {
        result.as_object_mut().unwrap().remove(timing);
    }
    let lines = common::metrics_lines(run)
        .into_iter()
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("epoch_seconds");
            v
        })
        .collect();
    (result, lines)
}

fn train(cfg: &Path, out: &Path, fault: Option<&str>) -> (Output, String) {
    let mut c = bin();
    c.args(["train", "--config"]).arg(cfg).arg("--out").arg(out);
    if let Some(f) = fault {
        c.env("WUKONG_FAULT", f);
    }
    output(&mut c)
}

fn resume(run: &Path) -> (Output, String) {
    output(bin().args(["train", "--resume"]).arg(run))
}

/// An uninterrupted reference run, then one run per fault, each crashed and resumed (twice when
/// the fault is given as two faults separated by `|`, each for one process).
fn check_resume_is_exact(tag: &str, model: &str, stream: bool, faults: &[&str]) {
    check_resume_is_exact_with(tag, model, stream, "", faults)
}

/// [`check_resume_is_exact`] with `extra_train` lines in the config's `[train]` table.
fn check_resume_is_exact_with(tag: &str, model: &str, stream: bool, extra_train: &str, faults: &[&str]) {
    let dir = common::workdir(&format!("resume-{tag}"));
    write_data(&dir);
    let cfg = write_config(&dir, model, stream, extra_train);
    let (out, text) = train(&cfg, &dir.join("reference"), None);
    assert!(out.status.success(), "{text}");
    let reference = fingerprint(&only_run(&dir.join("reference")));
    assert!(reference.1.len() >= 4, "evaluations inside the epochs are logged: {:?}", reference.1);

    for (i, spec) in faults.iter().enumerate() {
        let out_dir = dir.join(format!("crash{i}"));
        let mut parts = spec.split('|');
        let (out, text) = train(&cfg, &out_dir, parts.next());
        assert!(!out.status.success(), "the fault {spec} should have crashed the run: {text}");
        let run = only_run(&out_dir);
        for later in parts {
            let (out, text) = output(bin().args(["train", "--resume"]).arg(&run).env("WUKONG_FAULT", later));
            assert!(!out.status.success(), "the fault {later} should have crashed the resumed run: {text}");
        }
        let (out, text) = resume(&run);
        assert!(out.status.success(), "resume after {spec}: {text}");
        assert!(text.contains("resuming from"), "{text}");
        let got = fingerprint(&run);
        assert_eq!(got.0, reference.0, "{tag}: result after {spec} differs from the uninterrupted run");
        assert_eq!(got.1, reference.1, "{tag}: metrics after {spec} differ from the uninterrupted run");
    }
}

#[test]
fn wukong_in_memory_resumes_bit_identical() {
    check_resume_is_exact(
        "wukong-mem",
        WUKONG,
        false,
        &["abort-at-step:1", "abort-at-step:33", "abort-in-checkpoint:5", "abort-at-step:12|abort-at-step:50"],
    );
}

#[test]
fn wukong_streamed_resumes_bit_identical() {
    check_resume_is_exact("wukong-stream", WUKONG, true, &["abort-at-step:30", "abort-in-checkpoint:7|abort-at-step:61"]);
}

/// The running weight mean (`average_from_epoch`) lives in the checkpoints: a run crashed while
/// averaging resumes with the same mean (its evaluations and selected weights are the
/// uninterrupted run's).
#[test]
fn a_run_averaging_its_weights_resumes_bit_identical() {
    check_resume_is_exact_with("average", WUKONG, false, "average_from_epoch = 1\n", &["abort-at-step:40", "abort-in-checkpoint:9"]);
}

#[test]
fn baselines_resume_bit_identical() {
    check_resume_is_exact("dlrm-mem", DLRM, false, &["abort-at-step:26", "abort-in-checkpoint:3"]);
    check_resume_is_exact("masknet-stream", MASKNET, true, &["abort-at-step:45"]);
}

/// A real SIGKILL at a pseudo-random moment (a different one per attempt), then resume.
#[test]
fn sigkill_at_a_random_moment_then_resume() {
    let dir = common::workdir("resume-sigkill");
    write_data(&dir);
    let cfg = write_config(&dir, WUKONG, false, "");
    let cfg_text = std::fs::read_to_string(&cfg).unwrap().replace("epochs = 3", "epochs = 8").replace("patience = 3", "patience = 100");
    std::fs::write(&cfg, cfg_text).unwrap();
    let (out, text) = train(&cfg, &dir.join("reference"), None);
    assert!(out.status.success(), "{text}");
    let reference = fingerprint(&only_run(&dir.join("reference")));
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    for attempt in 0..3u64 {
        let out_dir = dir.join(format!("killed{attempt}"));
        let mut child = bin()
            .args(["train", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let wait_ms = 150 + (seed.wrapping_mul(6364136223846793005).wrapping_add(attempt * 1442695040888963407) >> 33) % 700;
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        child.kill().ok(); // SIGKILL; the run may already have finished
        child.wait().unwrap();
        let Ok(mut entries) = std::fs::read_dir(&out_dir) else { continue };
        if entries.next().is_none() {
            continue; // killed before the run directory existed: nothing to resume
        }
        let run = only_run(&out_dir);
        if !run.join("checkpoints").exists() {
            continue;
        }
        let (out, text) = resume(&run);
        assert!(out.status.success(), "resume after SIGKILL at {wait_ms} ms: {text}");
        assert_eq!(fingerprint(&run), reference, "SIGKILL at {wait_ms} ms, then resume: differs");
    }
}

#[test]
fn a_corrupted_newest_checkpoint_is_refused_and_the_previous_used() {
    let dir = common::workdir("resume-corrupt");
    write_data(&dir);
    let cfg = write_config(&dir, WUKONG, false, "");
    let (out, text) = train(&cfg, &dir.join("reference"), None);
    assert!(out.status.success(), "{text}");
    let reference = fingerprint(&only_run(&dir.join("reference")));
    for (i, damage) in ["flip", "truncate"].iter().enumerate() {
        let out_dir = dir.join(format!("crash{i}"));
        let (out, _) = train(&cfg, &out_dir, Some("abort-at-step:40"));
        assert!(!out.status.success());
        let run = only_run(&out_dir);
        let mut ckpts: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
        ckpts.sort();
        let newest = ckpts.last().unwrap().clone();
        let mut bytes = std::fs::read(&newest).unwrap();
        match *damage {
            "flip" => {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x01;
            }
            _ => bytes.truncate(bytes.len() * 2 / 3),
        }
        std::fs::write(&newest, bytes).unwrap();
        let (out, text) = resume(&run);
        assert!(out.status.success(), "{text}");
        let why = if *damage == "flip" { "corrupted" } else { "truncated" };
        assert!(text.contains("refusing checkpoint") && text.contains(why), "the refusal names the file and why: {text}");
        assert_eq!(fingerprint(&run), reference, "resumed from the previous checkpoint after a {damage}ed newest one");
    }
}

#[test]
fn guard_rolls_back_a_nan_and_a_spike_and_fails_when_told() {
    let dir = common::workdir("guard");
    write_data(&dir);
    // NaN: recovered by a rollback, counted in result.json
    let cfg = write_config(&dir, WUKONG, false, "");
    let (out, text) = train(&cfg, &dir.join("nan"), Some("nan-at-step:30"));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("non-finite loss or gradient at step 30"), "{text}");
    assert!(text.contains("1 rollback(s)"), "the summary shows the rollback: {text}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(only_run(&dir.join("nan")).join("result.json")).unwrap()).unwrap();
    assert_eq!(result["guard_rollbacks"], 1);
    assert_eq!(result["guard_events"][0]["kind"], "non_finite");
    assert!(result["guard_events"][0]["loss"].is_null());
    assert!(result["test_auc"].as_f64().unwrap() > 0.6, "the run learned after the rollback: {result}");

    // Spike: flipped labels for three steps once the statistics are warm
    let cfg =
        write_config(&dir, WUKONG, false, "guard_min_steps = 20\nguard_window = 20\nguard_spike_factor = 2.0\nguard_spike_sigma = 4.0\n");
    let (out, text) = train(&cfg, &dir.join("spike"), Some("spike-at-steps:45-47"));
    assert!(out.status.success(), "{text}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(only_run(&dir.join("spike")).join("result.json")).unwrap()).unwrap();
    assert_eq!(result["guard_rollbacks"], 1, "{result}");
    assert_eq!(result["guard_events"][0]["kind"], "spike");
    assert_eq!(result["guard_events"][0]["step"], 45);

    // fail: an error naming the step and the values
    let cfg = write_config(&dir, WUKONG, false, "guard = \"fail\"\n");
    let (out, text) = train(&cfg, &dir.join("fail"), Some("nan-at-step:30"));
    assert!(!out.status.success());
    assert!(
        text.contains("non-finite loss or gradient at step 30") && text.contains("loss not finite") && text.contains("guard = \"fail\""),
        "{text}"
    );

    // rollbacks exhausted
    let cfg = write_config(&dir, WUKONG, false, "guard_max_rollbacks = 0\n");
    let (out, text) = train(&cfg, &dir.join("exhausted"), Some("nan-at-step:30"));
    assert!(!out.status.success());
    assert!(text.contains("giving up after 0 rollbacks"), "{text}");

    // off: the NaN reaches the weights and the validation refuses the scores (no hang)
    let cfg = write_config(&dir, WUKONG, false, "guard = \"off\"\n");
    let (out, text) = train(&cfg, &dir.join("off"), Some("nan-at-step:3"));
    assert!(!out.status.success());
    assert!(text.contains("scores are not finite"), "{text}");
}

#[test]
fn a_loader_error_fails_the_run_and_keeps_the_checkpoint() {
    let dir = common::workdir("loader-error");
    write_data(&dir);
    for stream in [false, true] {
        let cfg = write_config(&dir, WUKONG, stream, "");
        let out_dir = dir.join(format!("run-{stream}"));
        let (out, text) = train(&cfg, &out_dir, Some("loader-error-at-batch:10"));
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("reading training batch 10 of epoch 1") && text.contains("injected read error"), "{text}");
        let run = only_run(&out_dir);
        // the checkpoint before the error is intact and resumable (the fault is gone now)
        let (out, text) = resume(&run);
        assert!(out.status.success(), "{text}");
    }
}

#[test]
fn resume_refuses_what_it_cannot_continue() {
    let dir = common::workdir("resume-refuse");
    let (out, text) = output(bin().args(["train", "--resume"]).arg(dir.join("nothing")));
    assert!(!out.status.success());
    assert!(text.contains("is not a run directory"), "{text}");
    let (out, text) = output(bin().args(["train", "--resume", "x", "--config", "y.toml"]));
    assert!(!out.status.success());
    assert!(text.contains("cannot be used with"), "{text}");
}

/// `--resume DIR --epochs N` extends a run that reached its cap: it ends bit-identical to the run
/// started with N epochs (metrics, result, saved config). What extension could not make into that
/// run is refused by name: fewer epochs, an early-stopped run, a warm-up set as a fraction.
#[test]
fn a_run_at_its_cap_extends_to_the_run_started_with_more_epochs() {
    let dir = common::workdir("resume-extend");
    write_data(&dir);
    let cfg = write_config(&dir, WUKONG, false, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("epochs = 3\n"), "{text}");
    let cfg5 = dir.join("cfg-5.toml");
    std::fs::write(&cfg5, text.replace("epochs = 3\n", "epochs = 5\n")).unwrap();
    let (out, log) = train(&cfg5, &dir.join("reference"), None);
    assert!(out.status.success(), "{log}");
    let reference = only_run(&dir.join("reference"));

    let (out, log) = train(&cfg, &dir.join("short"), None);
    assert!(out.status.success(), "{log}");
    let run = only_run(&dir.join("short"));
    let short = fingerprint(&run);
    assert_eq!(short.0["epochs_run"], 3, "{:?}", short.0);
    let extend = |run: &Path, epochs: &str| output(bin().args(["train", "--resume"]).arg(run).args(["--epochs", epochs]));
    let (out, log) = extend(&run, "5");
    assert!(out.status.success(), "{log}");
    assert!(log.contains("extending the run from 3 to 5 epochs"), "{log}");
    let (got, want) = (fingerprint(&run), fingerprint(&reference));
    assert_eq!(got.0, want.0, "the extended run's result differs from the 5-epoch run's");
    assert_eq!(got.1, want.1, "the extended run's metrics differ from the 5-epoch run's");
    assert_ne!(got.1, short.1, "the extension trained nothing");
    let saved = |r: &Path| std::fs::read_to_string(r.join("config.toml")).unwrap();
    assert_eq!(saved(&run), saved(&reference), "the run directory's config says 5 epochs");

    let (out, log) = extend(&run, "4");
    assert!(!out.status.success());
    assert!(log.contains("it was started with 5; a run can be extended, not shortened"), "{log}");

    // Learning rates too small to move a weight: the second evaluation does not improve and
    // patience 1 stops the run early, which more epochs would not change.
    let stalled = text.replace("patience = 10", "patience = 1").replace("warmup_steps = 5", "warmup_steps = 0") + "lr = 1e-30\n";
    let stalled = stalled.replace("emb_lr = 0.05", "emb_lr = 1e-30");
    let cfg_stalled = dir.join("cfg-stalled.toml");
    std::fs::write(&cfg_stalled, stalled).unwrap();
    let (out, log) = train(&cfg_stalled, &dir.join("stalled"), None);
    assert!(out.status.success(), "{log}");
    let run = only_run(&dir.join("stalled"));
    let (out, log) = extend(&run, "6");
    assert!(!out.status.success());
    assert!(log.contains("it stopped early (early stop after 1 evaluations without improvement)"), "{log}");

    let cfg_fraction = dir.join("cfg-fraction.toml");
    std::fs::write(&cfg_fraction, text.replace("epochs = 3\n", "epochs = 1\n").replace("warmup_steps = 5", "warmup_fraction = 0.1"))
        .unwrap();
    let (out, log) = train(&cfg_fraction, &dir.join("fraction"), None);
    assert!(out.status.success(), "{log}");
    let (out, log) = extend(&only_run(&dir.join("fraction")), "2");
    assert!(!out.status.success());
    assert!(log.contains("its warm-up is train.warmup_fraction = 0.1 of the planned steps"), "{log}");
}
