//! Models. Each lives in its own file with its config; [`ModelConfig`] is the registry that maps
//! the `name` key of a TOML `[model]` table to a model.
//!
//! Every model owns a [`SparseEmbedding`] (`embedding`, one table for all fields) and sees the
//! looked-up field embeddings `[b, fields, table_dim]` plus the dense features `[b, num_dense]`.
//! Most models use `table_dim = embedding_dim`; LR uses 1, FM and xDeepFM `d + 1` (the extra
//! column is the first-order weight), AFN+ `2d` (separate halves for the AFN and its DNN).

pub mod afn;
pub mod amx;
pub mod autoint;
pub mod batch_norm;
pub mod bf16;
pub(crate) mod cin;
pub mod dcnv2;
pub mod dlrm;
pub mod embedding;
pub(crate) mod exp;
pub mod export;
pub mod finalmlp;
pub mod fused;
pub mod layers;
pub mod masknet;
pub mod packed;
pub mod simple;
pub mod wukong;
pub mod xdeepfm;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use embedding::{Gathered, SlotLayout, SparseEmbedding, SparseInput, TableInit, TableStorage};
pub use layers::{Pass, Precision};
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
    /// The model's view: extra embeddings of a field (`[data] embeddings`) count as fields.
    pub fn of(encoder: &crate::data::Encoder) -> Self {
        // A table needs at least one row even when all features are dense.
        Self { fields: encoder.model_fields(), dense: encoder.num_dense(), table_rows: encoder.model_rows().max(1) }
    }
}

/// The model registry, declared once: each line is a variant, its config and model types, its
/// `[model] name` and any aliases. Adding a model is its file plus one line here. The macro
/// makes the [`ModelConfig`] and [`Model`] enums and everything that dispatches over them.
macro_rules! registry {
    ($($variant:ident($config:ty, $model:ty) = $name:literal $(| $alias:literal)*;)*) => {
        /// A model's configuration: `[model] name = "wukong"` selects the variant, the other keys
        /// are that model's config (unknown keys are refused).
        #[derive(Debug, Clone, Serialize, PartialEq)]
        #[serde(tag = "name")]
        pub enum ModelConfig {
            $(#[serde(rename = $name)] $variant($config),)*
        }

        #[derive(Module, Debug)]
        pub enum Model {
            $($variant($model),)*
        }

        $(impl From<$model> for Model {
            fn from(m: $model) -> Self {
                Model::$variant(m)
            }
        })*

        impl ModelConfig {
            /// The `[model] name` of every model, in registry order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            pub fn name(&self) -> &'static str {
                match self {
                    $(ModelConfig::$variant(_) => $name,)*
                }
            }

            fn spec(&self) -> &dyn ModelSpec {
                match self {
                    $(ModelConfig::$variant(c) => c,)*
                }
            }

            /// The config named `name` from the rest of its table (None: no such model).
            fn from_table(name: &str, table: toml::Table) -> Option<Result<Self, String>> {
                fn de<T: serde::de::DeserializeOwned>(t: toml::Table) -> Result<T, String> {
                    serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| format!("model.{}: {}", e.path(), e.inner()))
                }
                match name {
                    $($name $(| $alias)* => Some(de(table).map(ModelConfig::$variant)),)*
                    _ => None,
                }
            }
        }

        impl Model {
            pub fn embedding(&self) -> &SparseEmbedding {
                match self {
                    $(Model::$variant(m) => &m.embedding,)*
                }
            }

            /// Applies `f` to the embedding table, taking it by value so updates can happen in place.
            pub fn map_embedding(self, f: impl FnOnce(SparseEmbedding) -> SparseEmbedding) -> Self {
                match self {
                    $(Model::$variant(mut m) => {
                        m.embedding = f(m.embedding);
                        Model::$variant(m)
                    })*
                }
            }

            /// The model's own forward pass on looked-up embeddings and dense features.
            fn forward_inner(&self, x0: Option<Tensor<3>>, dense: Option<Tensor<2>>, pass: &Pass) -> Tensor<1> {
                match self {
                    $(Model::$variant(m) => m.forward(x0, dense, pass),)*
                }
            }
        }
    };
}

registry! {
    Wukong(WukongConfig, Wukong) = "wukong";
    Lr(simple::LrConfig, simple::Lr) = "lr";
    Fm(simple::FmConfig, simple::Fm) = "fm";
    Dnn(simple::DnnConfig, simple::Dnn) = "dnn";
    Dlrm(dlrm::DlrmConfig, dlrm::Dlrm) = "dlrm";
    Dcnv2(dcnv2::Dcnv2Config, dcnv2::Dcnv2) = "dcnv2";
    AutoInt(autoint::AutoIntConfig, autoint::AutoInt) = "autoint+" | "autoint";
    Afn(afn::AfnConfig, afn::Afn) = "afn+" | "afn";
    FinalMlp(finalmlp::FinalMlpConfig, finalmlp::FinalMlp) = "finalmlp";
    MaskNet(masknet::MaskNetConfig, masknet::MaskNet) = "masknet";
    XDeepFm(xdeepfm::XDeepFmConfig, xdeepfm::XDeepFm) = "xdeepfm";
}

/// Deserialised through a table so that an error names its key (`model.embedding_dim: invalid
/// value …`): serde's internally tagged enums buffer their content and lose toml's positions.
impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(d)?;
        let name = match table.remove("name") {
            Some(toml::Value::String(s)) => s,
            Some(other) => return Err(serde::de::Error::custom(format!("model.name must be a string, got {other}"))),
            None => return Err(serde::de::Error::custom(format!("model.name is missing (one of {})", ModelConfig::NAMES.join(", ")))),
        };
        let cfg = ModelConfig::from_table(&name, table)
            .unwrap_or_else(|| Err(format!("unknown model.name {name:?}: expected one of {}", ModelConfig::NAMES.join(", "))));
        cfg.map_err(serde::de::Error::custom)
    }
}

/// What the registry needs from each model's config.
pub trait ModelSpec {
    /// Width of the embedding table's rows.
    fn table_dim(&self) -> usize;
    /// Parts of a row with their own row-wise Adagrad accumulator (default: the whole row).
    fn table_segments(&self) -> Vec<usize> {
        vec![self.table_dim()]
    }
    fn validate(&self) -> anyhow::Result<()>;
    /// Checks against the data (e.g. field positions named in the config).
    fn check_shape(&self, _shape: &DataShape) -> anyhow::Result<()> {
        Ok(())
    }
    /// The model with fresh parameters, its embedding table stored as `storage` from the start
    /// (a half-precision table never exists in f32: that copy would double the peak memory).
    fn build(&self, shape: &DataShape, storage: TableInit, device: &Device) -> Model;
    /// Analytic forward FLOPs per example (2 × multiply-adds of the matrix products).
    fn forward_flops(&self, shape: &DataShape) -> u64;
}

impl ModelConfig {
    /// Whether any part of the model normalises with batch statistics (`batch_norm = true`
    /// anywhere in its config): data-parallel jobs refuse it, since each rank would see only its
    /// share of the batch and keep its own running statistics.
    pub fn uses_batch_norm(&self) -> bool {
        fn find(v: &serde_json::Value) -> bool {
            match v {
                serde_json::Value::Object(m) => {
                    m.iter().any(|(k, v)| (k == "batch_norm" && v == &serde_json::Value::Bool(true)) || find(v))
                }
                serde_json::Value::Array(a) => a.iter().any(find),
                _ => false,
            }
        }
        serde_json::to_value(self).is_ok_and(|v| find(&v))
    }

    /// Width of the embedding table's rows.
    pub fn embedding_dim(&self) -> usize {
        self.spec().table_dim()
    }
    /// Parts of a table row that the row-wise optimizer treats separately.
    pub fn table_segments(&self) -> Vec<usize> {
        self.spec().table_segments()
    }
    /// Range checks on every numeric key (by its kind, so no model can forget one: sizes and
    /// counts within [`crate::config::check::MAX_WIDTH`], width lists without zeros, dropouts in
    /// [0, 1), initialisation scales positive, everything finite), then the model's own checks.
    pub fn validate(&self) -> anyhow::Result<()> {
        use crate::config::check::MAX_WIDTH;
        let table = toml::Table::try_from(self)?;
        for (key, value) in &table {
            let key = format!("model.{key}");
            match value {
                toml::Value::Integer(v) => crate::config::check::int(&key, usize::try_from(*v).unwrap_or(usize::MAX), 0, MAX_WIDTH)?,
                toml::Value::Float(v) if key.contains("dropout") => crate::config::check::prob(&key, *v)?,
                toml::Value::Float(v) if key.ends_with("_std") => crate::config::check::above(&key, *v, 0.0, 100.0)?,
                toml::Value::Float(v) => crate::config::check::num(&key, *v, 0.0, 1e6)?,
                toml::Value::Array(items) => {
                    // field positions may be 0; every other integer list is a list of widths
                    let lo = if key.ends_with("_context") { 0 } else { 1 };
                    for (i, item) in items.iter().enumerate() {
                        if let Some(v) = item.as_integer() {
                            crate::config::check::int(&format!("{key}[{i}]"), usize::try_from(v).unwrap_or(usize::MAX), lo, MAX_WIDTH)?;
                        }
                    }
                }
                _ => {}
            }
        }
        self.spec().validate()
    }
    pub fn check_shape(&self, shape: &DataShape) -> anyhow::Result<()> {
        self.spec().check_shape(shape)
    }
    /// The model with fresh parameters and an f32 embedding table.
    pub fn init(&self, shape: &DataShape, device: &Device) -> Model {
        self.spec().build(shape, TableStorage::F32.into(), device)
    }
    /// [`Self::init`] with the embedding table stored as `storage` (`[train] emb_storage`).
    pub fn init_with_storage(&self, shape: &DataShape, storage: TableStorage, device: &Device) -> Model {
        self.spec().build(shape, storage.into(), device)
    }

    /// [`Self::init_with_storage`] keeping only rank `rank` of `ranks`' rows of the table (row r
    /// on rank r mod ranks), drawn block by block: the values are those of the whole table.
    pub fn init_shard(&self, shape: &DataShape, storage: TableStorage, rank: usize, ranks: usize, device: &Device) -> Model {
        self.spec().build(shape, TableInit { storage, shard: Some((rank, ranks)) }, device)
    }
    /// Analytic forward FLOPs per example (matrix products only).
    pub fn forward_flops(&self, shape: &DataShape) -> u64 {
        self.spec().forward_flops(shape)
    }
}

impl Model {
    /// Logits `[b]`; with `track` the gathered embedding rows are returned as the autodiff leaf
    /// (None when the data has no categorical field).
    /// Precision and dropout stream come from `pass`.
    pub fn forward(&self, input: &SparseInput, track: bool, pass: &Pass) -> (Tensor<1>, Option<Gathered>) {
        let (x0, gathered) = match input.slots {
            0 => (None, None), // all-dense data: no embedding lookup
            _ => {
                let (x, g) = self.embedding().lookup(input, track);
                (Some(x), g)
            }
        };
        crate::profile::mark(crate::profile::Phase::Embedding);
        let logits = self.forward_inner(x0, input.dense.clone(), pass);
        // Wukong marks its own phases; for the others the whole rest is "interaction".
        crate::profile::mark(crate::profile::Phase::Interaction);
        (logits, gathered)
    }

    /// Parameter counts: (embedding table, dense).
    pub fn param_counts(&self) -> (usize, usize) {
        let emb = self.embedding().rows() * self.embedding().dim();
        (emb, self.num_params() - emb)
    }
}

/// The checks every baseline config shares: positive embedding widths, dropouts in [0, 1).
pub fn check_common(embedding_dim: usize, num_dense_embeddings: usize, dropouts: &[(&str, f64)]) -> anyhow::Result<()> {
    anyhow::ensure!(embedding_dim > 0 && num_dense_embeddings > 0, "model.embedding_dim and num_dense_embeddings must be positive");
    for (name, p) in dropouts {
        anyhow::ensure!((0.0..1.0).contains(p), "model.{name} must be in [0, 1)");
    }
    Ok(())
}

/// How dense (numeric) features become embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NumericEmbedding {
    /// An MLP over all dense features into `num_dense_embeddings` embeddings (the paper's).
    #[default]
    Mlp,
    /// One embedding per feature, `x_i · v_i` with a learned `v_i` (FuxiCTR's numeric features).
    PerFeature,
}

/// Dense features → embeddings `[b, k, d]`: through the MLP (`mlp`), or `x_i · v_i` with the rows
/// of `scale` `[num_dense, d]`; None without dense features.
pub fn dense_embeddings(
    mlp: &Option<layers::Mlp>,
    scale: &Option<burn::module::Param<Tensor<2>>>,
    dense: Option<Tensor<2>>,
    d: usize,
    pass: &Pass,
) -> Option<Tensor<3>> {
    match (mlp, scale, dense) {
        (Some(mlp), _, Some(values)) => {
            let e = mlp.forward(values, pass);
            let [b, w] = e.dims();
            Some(e.reshape([b, w / d, d]))
        }
        (None, Some(v), Some(values)) => Some(values.unsqueeze_dim::<3>(2) * v.val().unsqueeze_dim::<3>(0)),
        _ => None,
    }
}

/// Field embeddings and dense embeddings side by side: `[b, fields + n, d]`.
pub fn cat_fields(sparse: Option<Tensor<3>>, dense: Option<Tensor<3>>) -> Tensor<3> {
    match (sparse, dense) {
        (Some(s), Some(e)) => Tensor::cat(vec![s, e], 1),
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => panic!("a model needs categorical or dense input"),
    }
}

/// The dense-feature MLP every model shares (None without dense features, or when each feature
/// is embedded on its own).
pub fn dense_mlp(shape: &DataShape, mode: NumericEmbedding, hidden: &[usize], n: usize, d: usize, device: &Device) -> Option<layers::Mlp> {
    (shape.dense > 0 && mode == NumericEmbedding::Mlp).then(|| layers::Mlp::new(shape.dense, hidden, n * d, 0.0, device))
}

/// The per-feature vectors `[num_dense, d]` of `numeric_embedding = "per_feature"` (N(0, 0.01²),
/// as embedding rows), else None.
pub fn numeric_scale(shape: &DataShape, mode: NumericEmbedding, d: usize, device: &Device) -> Option<burn::module::Param<Tensor<2>>> {
    (shape.dense > 0 && mode == NumericEmbedding::PerFeature).then(|| {
        burn::module::Param::from_tensor(Tensor::<2>::random([shape.dense, d], burn::tensor::Distribution::Normal(0.0, 0.01), device))
    })
}

/// FLOPs of that MLP (the per-feature products are element-wise: not counted).
pub fn dense_mlp_flops(shape: &DataShape, mode: NumericEmbedding, hidden: &[usize], n: usize, d: usize) -> u64 {
    if shape.dense == 0 || mode == NumericEmbedding::PerFeature { 0 } else { mlp_flops(shape.dense, hidden, n * d) }
}

/// 2 × multiply-adds of an MLP's layers.
pub fn mlp_flops(d_in: usize, hidden: &[usize], d_out: usize) -> u64 {
    layers::mlp_dims(d_in, hidden, d_out).iter().map(|&(a, b)| 2 * (a * b) as u64).sum()
}

/// Embeddings entering a model's interaction part: fields plus dense embeddings (when present).
pub fn num_inputs(shape: &DataShape, mode: NumericEmbedding, dense_embeddings: usize) -> usize {
    shape.fields
        + match (shape.dense, mode) {
            (0, _) => 0,
            (m, NumericEmbedding::PerFeature) => m,
            (_, NumericEmbedding::Mlp) => dense_embeddings,
        }
}
