//! Wukong (Zhang et al., ICML 2024) and CTR baselines on burn.
//!
//! Layout follows the data flow: [`data`] (readers, encoding, batching) → [`model`] (sparse
//! embedding, interaction layers, one file per model) → [`train`] (loop, optimizers, metrics,
//! checkpoints) → the `wukong` binary at the edge, which picks the backend.

pub mod bench;
pub mod compare;
pub mod config;
pub mod data;
pub mod dist;
pub mod experiment;
pub mod flops;
pub mod log;
pub mod metrics;
pub mod model;
pub mod profile;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod scale;
pub mod serve;
pub mod simd;
pub mod train;
pub mod tune;
