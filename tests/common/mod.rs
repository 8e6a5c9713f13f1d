//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// A fresh, empty scratch directory unique to this test process and `tag`.
pub fn workdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wukong-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
