//! Models. Each lives in its own file with its config; [`ModelConfig`] is the registry that maps
//! the `name` key of a TOML `[model]` table to a model.
//!
//! Every model owns a [`SparseEmbedding`] (`embedding`, one table for all fields) and sees the
//! looked-up field embeddings `[b, fields, table_dim]` plus the dense features `[b, num_dense]`.
//! Most models use `table_dim = embedding_dim`; LR uses 1, FM and xDeepFM `d + 1` (the extra
//! column is the first-order weight), AFN+ `2d` (separate halves for the AFN and its DNN).

pub mod afn;
pub mod autoint;
pub mod dcnv2;
pub mod dlrm;
pub mod embedding;
pub mod finalmlp;
pub mod fused;
pub mod layers;
pub mod masknet;
pub mod simple;
pub mod wukong;
pub mod xdeepfm;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use embedding::{Gathered, SlotLayout, SparseEmbedding, SparseInput, TableStorage};
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

/// Applies `$body` to whichever variant `$value` holds (the variants share field and method names).
macro_rules! each {
    ($enum:ident, $value:expr, $m:ident => $body:expr) => {
        match $value {
            $enum::Wukong($m) => $body,
            $enum::Lr($m) => $body,
            $enum::Fm($m) => $body,
            $enum::Dnn($m) => $body,
            $enum::Dlrm($m) => $body,
            $enum::Dcnv2($m) => $body,
            $enum::AutoInt($m) => $body,
            $enum::Afn($m) => $body,
            $enum::FinalMlp($m) => $body,
            $enum::MaskNet($m) => $body,
            $enum::XDeepFm($m) => $body,
        }
    };
}

/// The model registry: `[model] name = "wukong"` selects the variant, the other keys are that
/// model's config (unknown keys are refused).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum ModelConfig {
    Wukong(WukongConfig),
    Lr(simple::LrConfig),
    Fm(simple::FmConfig),
    Dnn(simple::DnnConfig),
    Dlrm(dlrm::DlrmConfig),
    Dcnv2(dcnv2::Dcnv2Config),
    #[serde(rename = "autoint+", alias = "autoint")]
    AutoInt(autoint::AutoIntConfig),
    #[serde(rename = "afn+", alias = "afn")]
    Afn(afn::AfnConfig),
    FinalMlp(finalmlp::FinalMlpConfig),
    MaskNet(masknet::MaskNetConfig),
    XDeepFm(xdeepfm::XDeepFmConfig),
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
        fn de<T: serde::de::DeserializeOwned>(t: toml::Table) -> Result<T, String> {
            serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| format!("model.{}: {}", e.path(), e.inner()))
        }
        let cfg = match name.as_str() {
            "wukong" => de(table).map(ModelConfig::Wukong),
            "lr" => de(table).map(ModelConfig::Lr),
            "fm" => de(table).map(ModelConfig::Fm),
            "dnn" => de(table).map(ModelConfig::Dnn),
            "dlrm" => de(table).map(ModelConfig::Dlrm),
            "dcnv2" => de(table).map(ModelConfig::Dcnv2),
            "autoint+" | "autoint" => de(table).map(ModelConfig::AutoInt),
            "afn+" | "afn" => de(table).map(ModelConfig::Afn),
            "finalmlp" => de(table).map(ModelConfig::FinalMlp),
            "masknet" => de(table).map(ModelConfig::MaskNet),
            "xdeepfm" => de(table).map(ModelConfig::XDeepFm),
            other => Err(format!("unknown model.name {other:?}: expected one of {}", ModelConfig::NAMES.join(", "))),
        };
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
    fn build(&self, shape: &DataShape, device: &Device) -> Model;
    /// Analytic forward FLOPs per example (2 × multiply-adds of the matrix products).
    fn forward_flops(&self, shape: &DataShape) -> u64;
}

impl ModelConfig {
    pub const NAMES: [&'static str; 11] =
        ["wukong", "lr", "fm", "dnn", "dlrm", "dcnv2", "autoint+", "afn+", "finalmlp", "masknet", "xdeepfm"];

    pub fn name(&self) -> &'static str {
        let i = match self {
            ModelConfig::Wukong(_) => 0,
            ModelConfig::Lr(_) => 1,
            ModelConfig::Fm(_) => 2,
            ModelConfig::Dnn(_) => 3,
            ModelConfig::Dlrm(_) => 4,
            ModelConfig::Dcnv2(_) => 5,
            ModelConfig::AutoInt(_) => 6,
            ModelConfig::Afn(_) => 7,
            ModelConfig::FinalMlp(_) => 8,
            ModelConfig::MaskNet(_) => 9,
            ModelConfig::XDeepFm(_) => 10,
        };
        Self::NAMES[i]
    }
    fn spec(&self) -> &dyn ModelSpec {
        each!(ModelConfig, self, c => c as &dyn ModelSpec)
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
    pub fn init(&self, shape: &DataShape, device: &Device) -> Model {
        self.spec().build(shape, device)
    }
    /// [`Self::init`] with the embedding table stored as `storage` (`[train] emb_storage`).
    pub fn init_with_storage(&self, shape: &DataShape, storage: TableStorage, device: &Device) -> Model {
        embedding::with_init_storage(storage, || self.init(shape, device))
    }
    /// Analytic forward FLOPs per example (matrix products only).
    pub fn forward_flops(&self, shape: &DataShape) -> u64 {
        self.spec().forward_flops(shape)
    }
}

#[derive(Module, Debug)]
pub enum Model {
    Wukong(Wukong),
    Lr(simple::Lr),
    Fm(simple::Fm),
    Dnn(simple::Dnn),
    Dlrm(dlrm::Dlrm),
    Dcnv2(dcnv2::Dcnv2),
    AutoInt(autoint::AutoInt),
    Afn(afn::Afn),
    FinalMlp(finalmlp::FinalMlp),
    MaskNet(masknet::MaskNet),
    XDeepFm(xdeepfm::XDeepFm),
}

impl Model {
    pub fn embedding(&self) -> &SparseEmbedding {
        each!(Model, self, m => &m.embedding)
    }

    /// Applies `f` to the embedding table, taking it by value so updates can happen in place.
    pub fn map_embedding(self, f: impl FnOnce(SparseEmbedding) -> SparseEmbedding) -> Self {
        each!(Model, self, m => {
            let mut m = m;
            m.embedding = f(m.embedding);
            m.into()
        })
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
        crate::profile::mark(crate::profile::Phase::Embedding);
        let logits = each!(Model, self, m => m.forward(x0, input.dense.clone()));
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

macro_rules! impl_from {
    ($($variant:ident($ty:ty)),*) => {
        $(impl From<$ty> for Model {
            fn from(m: $ty) -> Self {
                Model::$variant(m)
            }
        })*
    };
}
impl_from!(
    Wukong(Wukong),
    Lr(simple::Lr),
    Fm(simple::Fm),
    Dnn(simple::Dnn),
    Dlrm(dlrm::Dlrm),
    Dcnv2(dcnv2::Dcnv2),
    AutoInt(autoint::AutoInt),
    Afn(afn::Afn),
    FinalMlp(finalmlp::FinalMlp),
    MaskNet(masknet::MaskNet),
    XDeepFm(xdeepfm::XDeepFm)
);

/// The checks every baseline config shares: positive embedding widths, dropouts in [0, 1).
pub fn check_common(embedding_dim: usize, num_dense_embeddings: usize, dropouts: &[(&str, f64)]) -> anyhow::Result<()> {
    anyhow::ensure!(embedding_dim > 0 && num_dense_embeddings > 0, "model.embedding_dim and num_dense_embeddings must be positive");
    for (name, p) in dropouts {
        anyhow::ensure!((0.0..1.0).contains(p), "model.{name} must be in [0, 1)");
    }
    Ok(())
}

/// Dense features → an MLP → `n` extra embeddings of width `d` (`[b, n, d]`).
pub fn dense_embeddings(mlp: &Option<layers::Mlp>, dense: Option<Tensor<2>>, d: usize) -> Option<Tensor<3>> {
    match (mlp, dense) {
        (Some(mlp), Some(values)) => {
            let e = mlp.forward(values);
            let [b, w] = e.dims();
            Some(e.reshape([b, w / d, d]))
        }
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

/// The dense-feature MLP every model shares (None when the data has no dense features).
pub fn dense_mlp(shape: &DataShape, hidden: &[usize], n: usize, d: usize, device: &Device) -> Option<layers::Mlp> {
    (shape.dense > 0).then(|| layers::Mlp::new(shape.dense, hidden, n * d, 0.0, device))
}

/// FLOPs of that MLP.
pub fn dense_mlp_flops(shape: &DataShape, hidden: &[usize], n: usize, d: usize) -> u64 {
    if shape.dense == 0 { 0 } else { mlp_flops(shape.dense, hidden, n * d) }
}

/// 2 × multiply-adds of an MLP's layers.
pub fn mlp_flops(d_in: usize, hidden: &[usize], d_out: usize) -> u64 {
    layers::mlp_dims(d_in, hidden, d_out).iter().map(|&(a, b)| 2 * (a * b) as u64).sum()
}

/// Embeddings entering a model's interaction part: fields plus dense embeddings (when present).
pub fn num_inputs(shape: &DataShape, dense_embeddings: usize) -> usize {
    shape.fields + if shape.dense > 0 { dense_embeddings } else { 0 }
}
