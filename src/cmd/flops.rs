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
        let enc = enc.with_embeddings(&cfg.data.embeddings)?;
        println!("{}", wukong::flops::report(&cfg.model, enc.model_fields(), enc.num_dense(), Some(enc.model_rows())));
        return Ok(());
    }
    let train_src = &pipeline::split_sources(&cfg.data)[0];
    let (fields, dense, rows) = match pipeline::fit_in_memory(&cfg.data, train_src) {
        Ok((enc, _, _)) => {
            let enc = enc.with_embeddings(&cfg.data.embeddings)?;
            (enc.model_fields(), enc.num_dense(), Some(enc.model_rows()))
        }
        Err(e) => {
            tracing::warn!("{e:#}; counting without the vocabulary");
            let fields = cfg.data.num_fields.context("data.num_fields is needed when the training file is not readable")?;
            (fields + cfg.data.embeddings.values().map(|m| m.saturating_sub(1)).sum::<usize>(), 0, None)
        }
    };
    println!("{}", wukong::flops::report(&cfg.model, fields, dense, rows));
    Ok(())
}
