//! `wukong flops`: parameter count and analytic FLOPs per example of a config.

use anyhow::{Context, Result};
use std::path::PathBuf;

use wukong::config::ExperimentConfig;
use wukong::data::pipeline;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    config: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = ExperimentConfig::load(&a.config)?;
    if cfg.data.format == wukong::data::schema::Format::Synthetic {
        let enc = wukong::data::world::World::new(&cfg.data.world())?.encoder();
        println!("{}", wukong::flops::report(&cfg.model, enc.num_fields(), enc.num_dense(), Some(enc.total_rows())));
        return Ok(());
    }
    let train_src = &pipeline::split_sources(&cfg.data)[0];
    let (fields, dense, rows) = match pipeline::fit_in_memory(&cfg.data, train_src) {
        Ok((enc, _, _)) => (enc.num_fields(), enc.num_dense(), Some(enc.total_rows())),
        Err(e) => {
            tracing::warn!("{e:#}; counting without the vocabulary");
            (cfg.data.num_fields.context("data.num_fields is needed when the training file is not readable")?, 0, None)
        }
    };
    println!("{}", wukong::flops::report(&cfg.model, fields, dense, rows));
    Ok(())
}
