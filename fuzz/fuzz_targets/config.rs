#![no_main]
//! Coverage-guided fuzzing of the config input path (see `wukong::data::probe`): any input must give
//! a result or an error, never a panic, an abort or a runaway allocation.

use libfuzzer_sys::fuzz_target;
use wukong::data::probe::{Target, read_bytes};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("wukong-fuzz-config-{}", std::process::id()));
    let _ = read_bytes(Target::Config, data, &dir);
});
