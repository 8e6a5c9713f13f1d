//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// A fresh, empty scratch directory unique to this test process and `tag`.
#[allow(dead_code)] // not every test binary writes files
pub fn workdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wukong-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// burn's Flex backend has one process-wide generator (`Device::seed` reseeds it for the whole
/// process), so tests that seed it and draw from it take turns: otherwise concurrent tests
/// interleave their draws and a test's random weights change from run to run.
#[allow(dead_code)] // not every test binary draws
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[allow(dead_code)] // not every test binary uses every helper
/// Small instances of every model (and the variants with other code paths).
pub const MODELS: [(&str, &str); 15] = [
    ("wukong", "embedding_dim = 8\nnum_layers = 1\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 2\nfmb_mlp = [16]\ntop_mlp = [16]\ndense_mlp = [8]"),
    ("lr", ""),
    ("fm", "embedding_dim = 8"),
    ("dnn", "embedding_dim = 8\nhidden_units = [32, 16]\ndense_mlp = [8]"),
    ("dlrm", "embedding_dim = 8\nbottom_mlp_units = [16]\ntop_mlp_units = [32, 16]"),
    ("dcnv2", "embedding_dim = 8\nnum_cross_layers = 2\ndnn_hidden_units = [32, 16]"),
    ("dcnv2", "embedding_dim = 8\nnum_cross_layers = 2\nlow_rank = 4\nmodel_structure = \"stacked\"\ndnn_hidden_units = [32]"),
    ("autoint+", "embedding_dim = 8\nattention_dim = 8\nnum_heads = 2\nuse_scale = true\ndnn_hidden_units = [32]"),
    ("afn+", "embedding_dim = 8\nlogarithmic_neurons = 16\nafn_hidden_units = [32]\ndnn_hidden_units = [32]"),
    ("finalmlp", "embedding_dim = 8\nmlp1_hidden_units = [32, 16]\nmlp2_hidden_units = [32, 16]\nnum_heads = 2\nfs_hidden_units = [16]"),
    ("masknet", "embedding_dim = 8\nparallel_num_blocks = 2\nparallel_block_dim = 16\ndnn_hidden_units = [32]"),
    ("masknet", "embedding_dim = 8\nmodel_type = \"serial\"\nblock_hidden_units = [16, 16]"),
    ("xdeepfm", "embedding_dim = 8\ncin_hidden_units = [4, 4]\ndnn_hidden_units = [32]"),
    ("autoint", "embedding_dim = 8\nattention_dim = 8\nnum_heads = 1\ndnn_hidden_units = []\nlayer_norm = true"),
    // the paper's §3.2 grouping: fields 1 and 2 embedded at widths 3 and 5, mapped to 2 embeddings
    (
        "wukong",
        "embedding_dim = 8\nnum_layers = 1\nnum_fmb = 4\nnum_lcb = 4\nfm_rank = 2\nfmb_mlp = [16]\ntop_mlp = [16]\ndense_mlp = [8]\nfield_dims = { 1 = 3, 2 = 5 }\ngroup_embeddings = 2\ngroup_mlp = [8]",
    ),
];

/// The interaction switches (the MovieLens 100K third pass's): an entry of `MODELS` by index, the
/// config line that switches its interaction part off, and a substring of that part's parameter
/// names.
#[allow(dead_code)]
pub const INTERACTION_OFF: [(usize, &str, &str); 7] = [
    (0, "ablate = [\"fmb\"]", "fmb"),
    (5, "num_cross_layers = 0", "cross."),
    (7, "attention_layers = 0", "attention."),
    (8, "use_afn = false", "log_neurons"),
    (9, "bilinear_fusion = false", "bilinear"),
    (10, "use_mask = false", "mask_"),
    (12, "cin_hidden_units = []", "cin"),
];

/// `MODELS[i]` with its interaction switched off by `line` (which replaces a line of the same key).
#[allow(dead_code)]
pub fn switched_off(i: usize, line: &str) -> (&'static str, String) {
    let (name, body) = MODELS[i];
    let key = line.split('=').next().unwrap().trim();
    let kept = body.lines().filter(|l| l.split('=').next().unwrap().trim() != key);
    (name, kept.chain([line]).collect::<Vec<_>>().join("\n"))
}

/// The message of a caught panic.
#[allow(dead_code)]
pub fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// A run directory's `metrics.jsonl`, one JSON object per evaluation.
#[allow(dead_code)]
pub fn metrics_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join(wukong::train::checkpoint::METRICS)).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
