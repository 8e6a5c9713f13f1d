//! Models. Each lives in its own file with its config; [`ModelConfig`] is the registry that maps
//! the `name` key of a TOML `[model]` table to a model.

pub mod embedding;
pub mod layers;
pub mod wukong;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use embedding::{Gathered, SlotLayout, SparseEmbedding, SparseInput};
pub use wukong::{Wukong, WukongConfig};

/// What a model needs to know about the data: categorical fields (after multi-hot pooling),
/// dense features, and embedding-table rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    pub fields: usize,
    pub dense: usize,
    pub table_rows: usize,
}

impl DataShape {
    pub fn of(encoder: &crate::data::Encoder) -> Self {
        // A table needs at least one row even when all features are dense.
        Self { fields: encoder.num_fields(), dense: encoder.num_dense(), table_rows: encoder.total_rows().max(1) }
    }
}

/// The model registry: `[model] name = "wukong"` selects the variant, the other keys are that
/// model's config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum ModelConfig {
    Wukong(WukongConfig),
}

impl ModelConfig {
    pub fn name(&self) -> &'static str {
        match self {
            ModelConfig::Wukong(_) => "wukong",
        }
    }
    pub fn embedding_dim(&self) -> usize {
        match self {
            ModelConfig::Wukong(c) => c.embedding_dim,
        }
    }
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            ModelConfig::Wukong(c) => c.validate(),
        }
    }
    pub fn init(&self, shape: &DataShape, device: &Device) -> Model {
        match self {
            ModelConfig::Wukong(c) => Model::Wukong(c.init(shape, device)),
        }
    }
    /// Analytic forward FLOPs per example (matrix products only).
    pub fn forward_flops(&self, shape: &DataShape) -> u64 {
        match self {
            ModelConfig::Wukong(c) => c.forward_flops(shape),
        }
    }
}

#[derive(Module, Debug)]
pub enum Model {
    Wukong(Wukong),
}

impl Model {
    pub fn embedding(&self) -> &SparseEmbedding {
        match self {
            Model::Wukong(m) => &m.embedding,
        }
    }

    /// Applies `f` to the embedding table, taking it by value so updates can happen in place.
    pub fn map_embedding(self, f: impl FnOnce(SparseEmbedding) -> SparseEmbedding) -> Self {
        match self {
            Model::Wukong(mut m) => {
                m.embedding = f(m.embedding);
                Model::Wukong(m)
            }
        }
    }

    /// Logits `[b]`; with `track` the gathered embedding rows are returned as the autodiff leaf
    /// (None when the data has no categorical field).
    pub fn forward(&self, input: &SparseInput, track: bool) -> (Tensor<1>, Option<Gathered>) {
        let (x0, gathered) = match input.slots {
            0 => (None, None), // all-dense data: no embedding lookup
            _ => {
                let (x, g) = self.embedding().lookup(input, track);
                (Some(x), g)
            }
        };
        let logits = match self {
            Model::Wukong(m) => m.forward(x0, input.dense.clone()),
        };
        (logits, gathered)
    }

    /// Parameter counts: (embedding table, dense).
    pub fn param_counts(&self) -> (usize, usize) {
        let emb = self.embedding().rows() * self.embedding().dim();
        (emb, self.num_params() - emb)
    }
}
