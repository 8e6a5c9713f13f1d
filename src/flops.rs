//! `wukong flops`: parameter counts and analytic FLOPs per example of a config.

use burn::module::Module;
use burn::tensor::Device;

use crate::model::{DataShape, ModelConfig};

#[derive(Debug, Clone, serde::Serialize)]
pub struct FlopsReport {
    pub model: String,
    pub num_fields: usize,
    pub num_dense: usize,
    pub dense_params: usize,
    pub embedding_rows: Option<usize>,
    pub embedding_params: Option<usize>,
    pub forward_flops: u64,
    pub train_flops: u64,
}

/// Dense parameters are counted on an instance (exact, whatever the architecture); the
/// embedding table is `rows × d` when the vocabulary size is known.
pub fn report(model: &ModelConfig, num_fields: usize, num_dense: usize, embedding_rows: Option<usize>) -> FlopsReport {
    let d = model.embedding_dim();
    let shape = DataShape { fields: num_fields, dense: num_dense, table_rows: 1 };
    let instance = model.init(&shape, &Device::flex());
    let dense_params = instance.num_params() - d;
    let forward = model.forward_flops(&shape);
    FlopsReport {
        model: model.name().to_string(),
        num_fields,
        num_dense,
        dense_params,
        embedding_rows,
        embedding_params: embedding_rows.map(|r| r * d),
        forward_flops: forward,
        // backward ≈ 2× forward (gradients w.r.t. inputs and weights)
        train_flops: 3 * forward,
    }
}

impl std::fmt::Display for FlopsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model                      {}", self.model)?;
        writeln!(f, "categorical fields         {}", self.num_fields)?;
        writeln!(f, "dense features             {}", self.num_dense)?;
        writeln!(f, "dense parameters           {}", self.dense_params)?;
        match (self.embedding_rows, self.embedding_params) {
            (Some(r), Some(p)) => {
                writeln!(f, "embedding rows             {r}")?;
                writeln!(f, "embedding parameters       {p}")?;
                writeln!(f, "total parameters           {}", p + self.dense_params)?;
            }
            _ => writeln!(f, "embedding parameters       unknown (training file not readable)")?,
        }
        writeln!(
            f,
            "forward FLOPs/example      {} ({:.4} MFLOP, {:.6} GFLOP)",
            self.forward_flops,
            self.forward_flops as f64 / 1e6,
            self.forward_flops as f64 / 1e9
        )?;
        write!(f, "training FLOPs/example     {} (3 × forward)", self.train_flops)
    }
}
