//! The `[data]` table of an experiment config: where the splits are, the file format, and the
//! schema that turns columns into model inputs.
//!
//! Column kinds (one `[[data.fields]]` entry each; `names = [...]` expands to one field per
//! column with the same settings):
//! - `categorical`: one value per row → one embedding;
//! - `multi_hot`: a list in one column split by `separator` → embeddings sum- or mean-pooled;
//! - `flags`: several 0/1 columns (`columns = [...]`) → one multi-hot field of the set ones;
//! - `numeric`: a number with a `missing` default and a `transform`: `none`, `log1p`,
//!   `standardize` (dense features, fed to the dense MLP) or `bucketize` (explicit
//!   `boundaries`), `log2_bucket` (⌊log2 x⌋), `log_square_bucket` (the Criteo convention
//!   ⌊ln(x)²⌋ for x > 2, else ⌊x⌋) — bucketized numerics become categorical fields.
//!
//! Columns no field names are ignored (`ignore = [...]` documents and checks them).

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::source::BadLines;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `label id:value ...`, fields by position (libsvm is the same syntax).
    #[default]
    Libfm,
    Libsvm,
    /// Criteo Kaggle/Terabyte text: no header; label, I1–I13, C1–C26, tab-separated.
    Criteo,
    /// Comma-separated, header line by default.
    Csv,
    /// Tab-separated, header line by default.
    Tsv,
    Parquet,
    /// No file: the generated stream of `[data.world]` (synthetic, with a known Bayes limit).
    Synthetic,
}

impl DataConfig {
    /// The synthetic world's settings (defaults when `[data.world]` is omitted).
    pub fn world(&self) -> super::world::WorldConfig {
        self.world.clone().unwrap_or_default()
    }
}

impl Format {
    pub fn is_libfm(self) -> bool {
        matches!(self, Format::Libfm | Format::Libsvm)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    #[serde(default)]
    pub format: Format,
    /// The training file (unused by `format = "synthetic"`).
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub train: PathBuf,
    /// Omitted when `split` carves valid/test out of `train`.
    pub valid: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// Random split of the `train` file into train/valid/test by row.
    pub split: Option<SplitSpec>,
    /// libfm: id:value pairs per line, one per field in this order; omitted = taken from the first line.
    pub num_fields: Option<usize>,
    /// libfm: field names, for logs and the saved encoder.
    #[serde(default)]
    pub field_names: Vec<String>,
    /// Column names of a file without a header (Criteo has built-in ones).
    #[serde(default)]
    pub columns: Vec<String>,
    /// Whether text files start with a header line (default: yes for csv/tsv, no for criteo).
    pub header: Option<bool>,
    /// The label column.
    #[serde(default = "default_label")]
    pub label: String,
    /// Label = 1 when the column's value is ≥ this (e.g. rating ≥ 4); otherwise it must be 0/1 or -1/1.
    pub label_threshold: Option<f64>,
    /// String labels: the values (as written in the file, surrounding spaces ignored) that mean
    /// 1, e.g. `positive = [">50K", ">50K."]` …
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positive: Vec<String>,
    /// … and, optionally, those that mean 0. With `negative` given, any other value is an error
    /// (or a counted skip); without it, every value not in `positive` is 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negative: Vec<String>,
    #[serde(default)]
    pub fields: Vec<FieldSpec>,
    /// Several embeddings for important fields (the paper's §3.2): `{ user = 2 }` gives field
    /// `user` (by name, or position for unnamed fields) two embeddings, each its own block of table
    /// rows, that enter the model as two fields. Every model uses them.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub embeddings: std::collections::BTreeMap<String, usize>,
    /// Columns present in the files that no field uses (checked to exist).
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Side tables joined on a key column (e.g. MovieLens ratings ⋈ users ⋈ items).
    #[serde(default)]
    pub join: Vec<JoinSpec>,
    /// Values seen fewer times in training map to the field's OOV row (or a hash bucket).
    #[serde(default = "one")]
    pub min_count: u32,
    /// Default hash buckets per categorical field for values not in the vocabulary (0 = one OOV row).
    #[serde(default)]
    pub hash_buckets: u32,
    /// `error` (default) or `skip` (count and report malformed rows).
    #[serde(default, alias = "bad_rows")]
    pub bad_lines: BadLines,
    /// Directory of the binary caches (encoded splits + the fitted encoder). Omitted = encode in memory each run.
    pub cache_dir: Option<PathBuf>,
    /// Stream the training split from the cache in chunks instead of loading it (bounded memory).
    #[serde(default)]
    pub stream: bool,
    /// Streaming: rows per chunk read from the cache.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
    /// Streaming: chunks held and shuffled together (memory ≈ this × chunk_rows rows).
    #[serde(default = "default_shuffle_chunks")]
    pub shuffle_chunks: usize,
    /// `format = "synthetic"`: the teacher and stream sizes (defaults when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<super::world::WorldConfig>,
}

fn is_empty_path(p: &std::path::Path) -> bool {
    p.as_os_str().is_empty()
}

fn default_label() -> String {
    "label".into()
}
fn one() -> u32 {
    1
}
fn default_chunk_rows() -> usize {
    65_536
}
fn default_shuffle_chunks() -> usize {
    4
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// Relative sizes of train, valid and test, e.g. `[8, 1, 1]`.
    pub ratios: [f64; 3],
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JoinSpec {
    /// The side table (any supported format; csv/tsv/parquet by extension unless `format` says).
    pub path: PathBuf,
    pub format: Option<Format>,
    /// Key column in the main table.
    pub on: String,
    /// Key column in the side table (default: same name as `on`).
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    Categorical,
    MultiHot,
    Flags,
    Numeric,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Sum,
    Mean,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    #[default]
    None,
    /// sign(x)·ln(1 + |x|).
    Log1p,
    /// (x − mean) / std with train statistics.
    Standardize,
    Bucketize,
    Log2Bucket,
    LogSquareBucket,
}

impl Transform {
    pub fn is_bucket(self) -> bool {
        matches!(self, Transform::Bucketize | Transform::Log2Bucket | Transform::LogSquareBucket)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// Field name (also the column name unless `column` is given).
    pub name: Option<String>,
    /// Shorthand: one field per listed column, all with these settings.
    #[serde(default)]
    pub names: Vec<String>,
    pub column: Option<String>,
    pub kind: Option<FieldKind>,
    /// `flags`: the 0/1 columns forming the field.
    #[serde(default)]
    pub columns: Vec<String>,
    /// `multi_hot`: the list separator (one character).
    pub separator: Option<String>,
    #[serde(default)]
    pub pooling: Pooling,
    /// `multi_hot`/`flags`: values kept per row (embedding slots); extra ones are counted and dropped.
    pub max_len: Option<usize>,
    /// `numeric`: the value used when the cell is empty/null.
    pub missing: Option<f64>,
    #[serde(default)]
    pub transform: Transform,
    /// `bucketize`: sorted bucket edges.
    #[serde(default)]
    pub boundaries: Vec<f64>,
    /// Per-field overrides of `data.min_count` / `data.hash_buckets`.
    pub min_count: Option<u32>,
    pub hash_buckets: Option<u32>,
}

impl FieldSpec {
    /// `(field name, column it reads)` for each field this entry declares: `name` reads `column`
    /// when given, and every `names` entry reads its own column.
    pub fn named_columns(&self) -> impl Iterator<Item = (&String, &String)> {
        self.name.iter().chain(&self.names).map(|name| (name, self.column.as_ref().filter(|_| self.name.is_some()).unwrap_or(name)))
    }
}

impl DataConfig {
    pub fn validate(&self) -> Result<()> {
        if self.format == Format::Synthetic {
            ensure!(
                is_empty_path(&self.train) && self.valid.is_none() && self.test.is_none() && self.split.is_none(),
                "synthetic data is generated: give no data.train, data.valid, data.test or data.split (sizes are in [data.world])"
            );
            ensure!(
                self.fields.is_empty() && self.join.is_empty() && self.cache_dir.is_none(),
                "synthetic data has its own schema: data.fields, data.join and data.cache_dir do not apply"
            );
            return self.world().validate();
        }
        ensure!(self.world.is_none(), "data.world applies to format = \"synthetic\" only");
        ensure!(!is_empty_path(&self.train), "data.train is missing");
        match (&self.split, &self.valid) {
            (Some(s), _) => {
                ensure!(
                    self.valid.is_none() && self.test.is_none(),
                    "data.split carves valid/test out of data.train: leave data.valid and data.test out"
                );
                ensure!(
                    s.ratios.iter().all(|r| *r >= 0.0) && s.ratios[0] > 0.0 && s.ratios[1] > 0.0,
                    "data.split.ratios must be non-negative with train and valid > 0"
                );
            }
            (None, None) => bail!("data.valid is missing (or give data.split to carve it out of data.train)"),
            (None, Some(_)) => {}
        }
        if self.format.is_libfm() {
            ensure!(
                self.fields.is_empty() && self.join.is_empty(),
                "libfm data has positional fields: data.fields and data.join do not apply"
            );
        } else {
            ensure!(!self.fields.is_empty(), "data.fields is empty: declare at least one field for {:?} data", self.format);
        }
        ensure!(self.negative.is_empty() || !self.positive.is_empty(), "data.negative needs data.positive (the values that mean 1)");
        ensure!(
            self.positive.is_empty() || self.label_threshold.is_none(),
            "give data.positive (string labels) or data.label_threshold (numbers), not both"
        );
        if let Some(v) = self.positive.iter().find(|v| self.negative.contains(v)) {
            bail!("data.positive and data.negative both list {v:?}");
        }
        if let Some(n) = self.num_fields {
            crate::config::check::int("data.num_fields", n, 1, 1 << 20)?;
        }
        if self.stream {
            ensure!(self.cache_dir.is_some(), "data.stream needs data.cache_dir (the training split is streamed from the cache)");
            ensure!(self.chunk_rows > 0 && self.shuffle_chunks > 0, "data.chunk_rows and data.shuffle_chunks must be positive");
        }
        for f in &self.fields {
            f.validate()?;
        }
        Ok(())
    }
}

impl FieldSpec {
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.names.join(","))
    }

    fn validate(&self) -> Result<()> {
        let who = self.display_name();
        ensure!(self.name.is_some() == self.names.is_empty(), "data.fields: give exactly one of name or names (field {who:?})");
        let kind = self.kind.ok_or_else(|| anyhow::anyhow!("field {who:?}: kind is missing (categorical, multi_hot, flags or numeric)"))?;
        match kind {
            FieldKind::MultiHot => {
                let sep = self.separator.as_deref().unwrap_or("");
                ensure!(sep.len() == 1, "field {who:?}: multi_hot needs a one-byte separator");
                ensure!(self.max_len.unwrap_or(0) > 0, "field {who:?}: multi_hot needs max_len > 0");
            }
            FieldKind::Flags => {
                ensure!(!self.columns.is_empty() && self.name.is_some(), "field {who:?}: flags needs a name and columns = [...]");
            }
            FieldKind::Numeric => {
                if self.transform == Transform::Bucketize {
                    ensure!(
                        !self.boundaries.is_empty() && self.boundaries.windows(2).all(|w| w[0] < w[1]),
                        "field {who:?}: bucketize needs increasing boundaries"
                    );
                }
            }
            FieldKind::Categorical => {}
        }
        if kind != FieldKind::Numeric {
            ensure!(
                self.transform == Transform::None && self.missing.is_none(),
                "field {who:?}: transform/missing apply to numeric fields only"
            );
        }
        Ok(())
    }
}

/// Column names of the Criteo text format.
pub fn criteo_columns() -> Vec<String> {
    std::iter::once("label".to_string()).chain((1..=13).map(|i| format!("I{i}"))).chain((1..=26).map(|i| format!("C{i}"))).collect()
}
