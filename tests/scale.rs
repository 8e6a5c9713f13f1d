//! `wukong scale`: the power-law fit, a tiny sweep on the synthetic stream end to end, and the
//! runner's resume rules (finished points read back, an interrupted one resumed, a changed config
//! refused).

use std::path::Path;

use wukong::experiment::{self, PointState};
use wukong::scale::{self, fit_power_law};
use wukong::train::RunOptions;

mod common;

#[test]
fn the_fit_recovers_a_known_law_from_noiseless_points() {
    for &(a, b, c) in &[(0.40, 0.05, -0.3), (0.0, 2.0, -0.5), (-100.0, 99.56, 0.00071), (1.0, -0.2, 0.25)] {
        let xs: Vec<f64> = (0..8).map(|i| 0.5 * 4f64.powi(i)).collect();
        let ys: Vec<f64> = xs.iter().map(|x| a + b * x.powf(c)).collect();
        let p = fit_power_law(&xs, &ys).unwrap();
        let worst = xs.iter().zip(&ys).map(|(x, y)| (p.at(*x) - y).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6 * (1.0 + a.abs()), "({a}, {b}, {c}): fitted {p:?}, worst residual {worst}");
        if c.abs() > 0.01 {
            assert!(
                (p.c - c).abs() < 1e-3 && (p.a - a).abs() < 1e-3 && (p.b - b).abs() < 1e-3 * b.abs().max(1.0),
                "({a}, {b}, {c}): {p:?}"
            );
        }
        assert!(p.r2 > 0.999_999);
    }
    assert!(fit_power_law(&[1.0, 2.0, 3.0], &[1.0, 0.5, 0.4]).is_none(), "three points only interpolate three parameters");
    assert!(fit_power_law(&[0.0, 1.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).is_none(), "x must be positive");
}

#[test]
fn the_tail_slope_is_the_change_per_4x_over_the_three_largest_points() {
    // y = 0.5 − 0.001·log₄(x) exactly on the last three points, a steep first step before them
    let xs = [1.0, 4.0, 16.0, 64.0, 0.25];
    let ys = [0.5, 0.499, 0.498, 0.497, 0.6];
    let t = scale::tail_slope_per_4x(&xs, &ys).unwrap();
    assert!((t + 0.001).abs() < 1e-12, "{t}");
    // order does not matter; a flat tail is 0; too few points or one compute value is None
    assert!(scale::tail_slope_per_4x(&[64.0, 1.0, 16.0], &[0.3, 0.3, 0.3]).unwrap().abs() < 1e-15);
    assert!(scale::tail_slope_per_4x(&[1.0, 2.0], &[0.3, 0.2]).is_none());
    assert!(scale::tail_slope_per_4x(&[2.0, 2.0, 2.0], &[0.3, 0.2, 0.1]).is_none());
}

fn write_sweep(dir: &Path, lr: &str) {
    std::fs::write(
        dir.join("base.toml"),
        format!(
            "name = \"base\"\n[data]\nformat = \"synthetic\"\n[data.world]\nfields = 6\nmulti_hot_fields = 1\nmax_bag = 2\nvocab_max = 500\ndense = 2\nterms = 64\n\
             train_examples = 3000\nvalid_examples = 1500\ntest_examples = 1500\n[model]\nname = \"lr\"\n[train]\nepochs = 1\nbatch_size = 500\n\
             eval_batch_size = 1500\nlr = {lr}\nwarmup_steps = 0\neval_every_steps = 2\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("sweep.toml"),
        "name = \"tiny\"\nbase = \"base.toml\"\nreference = \"lr-1\"\n\
         [[family]]\nname = \"lr\"\nmodel = { name = \"lr\" }\n\
         [[family]]\nname = \"wukong\"\nmodel = { name = \"wukong\", embedding_dim = 4, fmb_mlp = [8], top_mlp = [8] }\n\
         grow = { num_layers = [1, 1, 2, 2], num_fmb = [2, 4, 4, 6], num_lcb = [2, 4, 4, 6], fm_rank = [2, 2, 4, 4] }\n",
    )
    .unwrap();
}

#[test]
fn a_sweep_runs_reports_and_resumes_where_it_stopped() {
    let dir = common::workdir("scale");
    write_sweep(&dir, "0.01");
    let out = dir.join("out");
    let opts = RunOptions { out_dir: out.clone(), ..Default::default() };
    let written = scale::run(&dir.join("sweep.toml"), &out, &opts).unwrap();
    for name in ["scale.md", "scale.csv", "fits.json", "scale_compute.png", "scale_params.png", "scale_examples_wukong.png"] {
        assert!(written.iter().any(|p| p.ends_with(name)), "{name} not written: {written:?}");
    }
    let png = std::fs::read(out.join("scale_compute.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let md = std::fs::read_to_string(out.join("scale.md")).unwrap();
    assert!(md.contains("**synthetic**") && md.contains("| lr-1 | lr |") && md.contains("| wukong-4 | wukong |"), "{md}");
    let (_, points) = scale::points(&dir.join("sweep.toml")).unwrap();
    assert_eq!(points.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["lr-1", "wukong-1", "wukong-2", "wukong-3", "wukong-4"]);
    let done: Vec<_> = points.iter().map(|p| experiment::run_point(p, &out, &opts).unwrap()).collect();
    assert!(done.iter().all(|d| !d.trained_now), "a finished sweep trains nothing again");
    let rows = scale::rows(&done, Some("lr-1"));
    assert_eq!(rows[0].relative_pct, 0.0);
    assert!(rows.iter().all(|r| r.bayes.is_some() && r.excess.unwrap() > 0.0 && r.examples == 3000), "{rows:?}");
    let flops: Vec<f64> = rows[1..].iter().map(|r| r.gflop_per_example).collect();
    assert!(flops.windows(2).all(|w| w[0] < w[1]), "the grown points grow: {flops:?}");
    let fits = scale::fits(&rows);
    assert!(fits.iter().find(|f| f.family == "wukong").unwrap().fit.is_some(), "four points are fitted");

    // an interrupted point (its result gone, its checkpoints there) resumes; the others are read
    let victim = experiment::point_dir(&out, "wukong-2");
    let before: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(victim.join("result.json")).unwrap()).unwrap();
    std::fs::remove_file(victim.join("result.json")).unwrap();
    assert_eq!(experiment::state(&victim), PointState::Interrupted);
    // `wukong scale --status` reads where the sweep stands from its directory
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_wukong"))
        .arg("scale")
        .arg(dir.join("sweep.toml"))
        .arg("--out")
        .arg(&out)
        .arg("--status")
        .output()
        .unwrap();
    let st = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(st.contains("is not running: 4 of 5 points finished; about "), "{st}");
    assert!(st.contains("| wukong-2 | started |") && st.contains("| wukong-3 | finished |"), "{st}");
    let again = experiment::run_all(&points, &out, &opts, |_| Ok(())).unwrap();
    assert_eq!(again.iter().filter(|d| d.trained_now).map(|d| d.id.as_str()).collect::<Vec<_>>(), ["wukong-2"]);
    let after = &again[2].result;
    assert_eq!(after["test_logloss"], before["test_logloss"], "the resumed point ends where it had");
    assert_eq!(after["best_weights_digest"], before["best_weights_digest"]);

    // a point whose config changed under a finished run is refused, by name
    write_sweep(&dir, "0.02");
    let err = format!("{:#}", scale::run(&dir.join("sweep.toml"), &out, &opts).unwrap_err());
    assert!(err.contains("point lr-1") && err.contains("another config"), "{err}");
}

#[test]
fn sweep_files_are_checked() {
    let dir = common::workdir("scale-bad");
    write_sweep(&dir, "0.01");
    let bad = |text: &str| {
        std::fs::write(dir.join("bad.toml"), text).unwrap();
        format!("{:#}", scale::points(&dir.join("bad.toml")).unwrap_err())
    };
    assert!(bad("name = \"x\"\nbase = \"base.toml\"\n[[family]]\nname = \"w\"\nmodel = { name = \"wukong\" }\ngrow = { num_layers = [1, 2], num_fmb = [2] }\n").contains("same, non-zero length"));
    assert!(
        bad("name = \"x\"\nbase = \"base.toml\"\nreference = \"nope\"\n[[family]]\nname = \"lr\"\nmodel = { name = \"lr\" }\n")
            .contains("reference point \"nope\"")
    );
    assert!(
        bad("name = \"x\"\nbase = \"base.toml\"\n[[family]]\nname = \"w\"\nmodel = { name = \"wukong\", dropout = 1.5 }\n")
            .contains("model.dropout")
    );
    assert!(bad("name = \"x\"\nbase = \"missing.toml\"\n[[family]]\nname = \"lr\"\nmodel = { name = \"lr\" }\n").contains("missing.toml"));
}

/// Every shipped sweep parses into valid points, and every base config is a valid experiment.
#[test]
fn shipped_sweeps_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/scale");
    let mut sweeps = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = e.path();
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("[[family]]") {
            let (_, points) = scale::points(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(!points.is_empty());
            sweeps += 1;
        } else {
            wukong::config::ExperimentConfig::parse(&text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
    }
    assert!(sweeps >= 5, "found {sweeps} sweeps");
}

/// Under `budget_pf_days` every point gets the same training compute: examples × training
/// FLOPs/example is the budget (to rounding), so bigger models see fewer examples.
#[test]
fn a_compute_budget_sets_each_points_examples() {
    let dir = common::workdir("scale-budget");
    write_sweep(&dir, "0.01");
    let text = std::fs::read_to_string(dir.join("sweep.toml"))
        .unwrap()
        .replace("reference = \"lr-1\"\n", "reference = \"lr-1\"\nbudget_pf_days = 1e-12\n");
    std::fs::write(dir.join("budget.toml"), text).unwrap();
    let (_, points) = scale::points(&dir.join("budget.toml")).unwrap();
    let world = wukong::data::world::World::new(&points[1].config.data.world()).unwrap();
    let shape = wukong::model::DataShape::of(&world.encoder());
    let mut examples = Vec::new();
    for p in &points[1..] {
        let n = p.config.data.world().train_examples;
        let spent = n as f64 * 3.0 * p.config.model.forward_flops(&shape) as f64 / 1e15 / 86_400.0;
        assert!((spent - 1e-12).abs() < 1e-12 * 1e-3, "{}: {n} examples spend {spent} PF-days", p.id);
        examples.push(n);
    }
    assert!(examples.windows(2).all(|w| w[0] > w[1]), "{examples:?}");
}
