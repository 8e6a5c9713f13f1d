//! From records to values: the schema bound to a file's columns ([`Extractor`]) pulls each row's
//! label, categorical value keys (stable hashes of the values' bytes) and dense numbers into a
//! [`ParsedChunk`]; the encoder ([`super::encoder`]) then maps keys to table rows.

use anyhow::{Context, Result, ensure};

use super::schema::{DataConfig, FieldKind, Pooling, Transform};
use super::source::{Cell, Record};

/// The key of a missing categorical value (its own vocabulary entry when frequent).
pub const MISSING: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a, 64 bit: a stable hash of a value's bytes (stable across runs and machines, unlike std's).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cell_hash(rec: &Record, c: Cell) -> u64 {
    match c {
        Cell::Null => MISSING,
        Cell::Text(..) => hash_bytes(rec.text(c)),
        Cell::Int(i) => hash_bytes(itoa(i, &mut [0u8; 24])),
        Cell::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => hash_bytes(itoa(f as i64, &mut [0u8; 24])),
        Cell::Float(f) => hash_bytes(f.to_string().as_bytes()),
    }
}

/// Decimal text of `i` without allocating.
fn itoa(i: i64, buf: &mut [u8; 24]) -> &[u8] {
    let mut n = i.unsigned_abs();
    let mut p = buf.len();
    loop {
        p -= 1;
        buf[p] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        p -= 1;
        buf[p] = b'-';
    }
    &buf[p..]
}

fn cell_number(rec: &Record, c: Cell) -> std::result::Result<Option<f64>, String> {
    let v = match c {
        Cell::Null => return Ok(None),
        Cell::Int(i) => i as f64,
        Cell::Float(f) => f,
        Cell::Text(..) => {
            let t = rec.text(c);
            let s = std::str::from_utf8(t).map_err(|_| "value is not UTF-8 text".to_string())?.trim();
            if s.is_empty() {
                return Ok(None);
            }
            s.parse::<f64>().map_err(|_| format!("value {s:?} is not a number"))?
        }
    };
    if !v.is_finite() {
        return Err(format!("value {v} is not finite"));
    }
    Ok(Some(v))
}

// ---------------------------------------------------------------------------------------------
// The schema bound to column positions.

#[derive(Debug, Clone)]
enum Extract {
    Cat(usize),
    Multi { col: usize, sep: u8 },
    Flags(Vec<(usize, u64)>),
    Bucket { col: usize, transform: Transform, boundaries: Vec<f64> },
}

#[derive(Debug, Clone)]
pub(super) struct BoundField {
    pub(super) name: String,
    col_name: String,
    extract: Extract,
    pub(super) width: usize,
    pub(super) pooling: Pooling,
    pub(super) min_count: u32,
    pub(super) hash_buckets: u32,
}

#[derive(Debug, Clone)]
pub(super) struct BoundDense {
    pub(super) name: String,
    col: usize,
    missing: f64,
    pub(super) transform: Transform,
}

/// Rows after extraction, before encoding: per (row, field) the value keys and weights, plus
/// dense numbers. Encoding then walks it field by field, so each vocabulary stays in cache.
#[derive(Debug, Default, Clone)]
pub struct ParsedChunk {
    pub num_fields: usize,
    pub num_dense: usize,
    pub labels: Vec<f32>,
    pub ids: Vec<u64>,
    pub weights: Vec<f32>,
    /// `[rows, fields]`: where each (row, field)'s values start in `ids`, and how many there are.
    pub starts: Vec<u32>,
    pub lens: Vec<u32>,
    pub dense: Vec<f64>,
    /// Malformed rows skipped while filling this chunk.
    pub skipped: u64,
}

impl ParsedChunk {
    pub fn new(num_fields: usize, num_dense: usize) -> Self {
        Self { num_fields, num_dense, ..Default::default() }
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Ends every label error: the reader appends the distinct label values it finds at this mark.
pub const LABEL_HINT: &str = " [label values]";

/// Pulls label, field values and dense numbers out of a [`Record`], per the schema.
#[derive(Debug, Clone)]
pub struct Extractor {
    /// `None` when scoring rows that have no label (`predict` on unlabeled files, `serve`).
    label: Option<usize>,
    label_name: String,
    threshold: Option<f64>,
    /// String labels (`data.positive` / `data.negative`), trimmed.
    positive: Vec<Vec<u8>>,
    negative: Vec<Vec<u8>>,
    pub(super) fields: Vec<BoundField>,
    pub(super) dense: Vec<BoundDense>,
}

impl Extractor {
    /// Binds `cfg`'s schema to `columns` (the file's column names, joins included).
    pub fn bind(cfg: &DataConfig, columns: &[String]) -> Result<Self> {
        Self::bind_with(cfg, columns, true)
    }

    /// [`Self::bind`] for scoring: the label column may be absent (then every row's label is 0
    /// and is never looked at); when present it is still parsed, so a bad one is reported.
    pub fn bind_for_scoring(cfg: &DataConfig, columns: &[String]) -> Result<Self> {
        Self::bind_with(cfg, columns, false)
    }

    /// Whether rows carry a label.
    pub fn has_label(&self) -> bool {
        self.label.is_some()
    }

    fn bind_with(cfg: &DataConfig, columns: &[String], label_required: bool) -> Result<Self> {
        let col = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .with_context(|| format!("no column {name:?} in the data (columns: {})", columns.join(", ")))
        };
        let label = match col(&cfg.label).context("data.label") {
            Ok(i) => Some(i),
            Err(e) if label_required => return Err(e),
            Err(_) => None,
        };
        if label_required {
            for c in &cfg.ignore {
                col(c).context("data.ignore")?;
            }
        }
        let (mut fields, mut dense) = (Vec::new(), Vec::new());
        if cfg.format.is_libfm() {
            for (i, name) in columns.iter().enumerate().skip(1) {
                fields.push(BoundField {
                    name: name.clone(),
                    col_name: name.clone(),
                    extract: Extract::Cat(i),
                    width: 1,
                    pooling: Pooling::Sum,
                    min_count: cfg.min_count,
                    hash_buckets: cfg.hash_buckets,
                });
            }
        }
        for spec in &cfg.fields {
            for (name, col_name) in spec.named_columns() {
                let field = |extract, width| BoundField {
                    name: name.clone(),
                    col_name: col_name.clone(),
                    extract,
                    width,
                    pooling: spec.pooling,
                    min_count: spec.min_count.unwrap_or(cfg.min_count),
                    hash_buckets: spec.hash_buckets.unwrap_or(cfg.hash_buckets),
                };
                let at = || col(col_name).with_context(|| format!("field {name:?}"));
                match spec.kind.expect("validated") {
                    FieldKind::Categorical => fields.push(field(Extract::Cat(at()?), 1)),
                    FieldKind::MultiHot => {
                        let sep = spec.separator.as_deref().expect("validated").as_bytes()[0];
                        fields.push(field(Extract::Multi { col: at()?, sep }, spec.max_len.expect("validated")));
                    }
                    FieldKind::Flags => {
                        let cols = spec
                            .columns
                            .iter()
                            .map(|c| Ok((col(c).with_context(|| format!("field {name:?}"))?, hash_bytes(c.as_bytes()))))
                            .collect::<Result<Vec<_>>>()?;
                        let width = spec.max_len.unwrap_or(cols.len());
                        fields.push(field(Extract::Flags(cols), width));
                    }
                    FieldKind::Numeric if spec.transform.is_bucket() => {
                        fields
                            .push(field(Extract::Bucket { col: at()?, transform: spec.transform, boundaries: spec.boundaries.clone() }, 1));
                    }
                    FieldKind::Numeric => dense.push(BoundDense {
                        name: name.clone(),
                        col: at()?,
                        missing: spec.missing.unwrap_or(0.0),
                        transform: spec.transform,
                    }),
                }
            }
        }
        ensure!(!fields.is_empty() || !dense.is_empty(), "the schema declares no input field");
        let trimmed = |v: &[String]| v.iter().map(|s| s.trim().as_bytes().to_vec()).collect();
        Ok(Self {
            label,
            label_name: cfg.label.clone(),
            threshold: cfg.label_threshold,
            positive: trimmed(&cfg.positive),
            negative: trimmed(&cfg.negative),
            fields,
            dense,
        })
    }

    pub fn num_fields(&self) -> usize {
        self.fields.len()
    }

    pub fn num_dense(&self) -> usize {
        self.dense.len()
    }

    /// Appends `rec` to `out`; on error (which names the column at fault) `out` is unchanged.
    pub fn extract(&self, rec: &Record, out: &mut ParsedChunk) -> std::result::Result<(), String> {
        let mark = (out.ids.len(), out.lens.len(), out.dense.len());
        let r = self.extract_into(rec, out);
        if r.is_err() {
            out.ids.truncate(mark.0);
            out.weights.truncate(mark.0);
            out.starts.truncate(mark.1);
            out.lens.truncate(mark.1);
            out.dense.truncate(mark.2);
        }
        r
    }

    /// The label cell as text (trimmed), for messages.
    pub fn label_text(&self, rec: &Record) -> String {
        match self.label.and_then(|l| rec.cells.get(l)) {
            Some(&c) => String::from_utf8_lossy(crate::data::source::cell_key(rec, c).trim_ascii()).to_string(),
            None => String::new(),
        }
    }

    /// The label from a string value under `data.positive`/`negative`.
    fn string_label(&self, rec: &Record, label_col: usize) -> std::result::Result<f32, String> {
        let key = crate::data::source::cell_key(rec, rec.cells[label_col]);
        let key = key.trim_ascii();
        if self.positive.iter().any(|p| p == key) {
            Ok(1.0)
        } else if self.negative.is_empty() || self.negative.iter().any(|n| n == key) {
            Ok(0.0)
        } else {
            Err(format!(
                "column {}: label {:?} is in neither data.positive nor data.negative{LABEL_HINT}",
                self.label_name,
                String::from_utf8_lossy(key)
            ))
        }
    }

    fn extract_into(&self, rec: &Record, out: &mut ParsedChunk) -> std::result::Result<(), String> {
        let Some(label_col) = self.label else {
            return self.extract_features(rec, out, 0.0);
        };
        if !self.positive.is_empty() {
            let label = self.string_label(rec, label_col)?;
            return self.extract_features(rec, out, label);
        }
        let y = cell_number(rec, rec.cells[label_col]).map_err(|m| {
            format!("column {}: {m}; string labels need data.positive = [...] (the values that mean 1){LABEL_HINT}", self.label_name)
        })?;
        let label = match (y, self.threshold) {
            (None, _) => return Err(format!("column {}: the label is empty", self.label_name)),
            (Some(v), Some(t)) => (v >= t) as u8 as f32,
            (Some(1.0), None) => 1.0,
            (Some(0.0 | -1.0), None) => 0.0,
            (Some(v), None) => {
                return Err(format!(
                    "column {}: label {v} is not 0/1 or -1/1 (set data.label_threshold to binarize, or data.positive = [...]){LABEL_HINT}",
                    self.label_name
                ));
            }
        };
        self.extract_features(rec, out, label)
    }

    fn extract_features(&self, rec: &Record, out: &mut ParsedChunk, label: f32) -> std::result::Result<(), String> {
        for f in &self.fields {
            let before = out.ids.len();
            let err = |m: String| format!("column {}: {m}", f.col_name);
            match &f.extract {
                Extract::Cat(c) => {
                    out.ids.push(cell_hash(rec, rec.cells[*c]));
                    out.weights.push(rec.weights.get(*c).copied().unwrap_or(1.0));
                }
                Extract::Multi { col, sep } => match rec.cells[*col] {
                    c @ Cell::Text(..) => {
                        for part in rec.text(c).split(|b| b == sep) {
                            let part = part.trim_ascii();
                            if !part.is_empty() {
                                out.ids.push(hash_bytes(part));
                                out.weights.push(1.0);
                            }
                        }
                    }
                    Cell::Null => {}
                    c => {
                        out.ids.push(cell_hash(rec, c));
                        out.weights.push(1.0);
                    }
                },
                Extract::Flags(cols) => {
                    for &(c, key) in cols {
                        if cell_number(rec, rec.cells[c]).map_err(err)?.unwrap_or(0.0) != 0.0 {
                            out.ids.push(key);
                            out.weights.push(1.0);
                        }
                    }
                }
                Extract::Bucket { col, transform, boundaries } => {
                    let id = match cell_number(rec, rec.cells[*col]).map_err(err)? {
                        None => MISSING,
                        Some(x) => bucket(x, *transform, boundaries) as u64,
                    };
                    out.ids.push(id);
                    out.weights.push(1.0);
                }
            }
            if out.ids.len() == before {
                out.ids.push(MISSING); // an empty list is "missing", like an empty categorical
                out.weights.push(1.0);
            }
            out.starts.push(before as u32);
            out.lens.push((out.ids.len() - before) as u32);
        }
        for d in &self.dense {
            let x = cell_number(rec, rec.cells[d.col]).map_err(|m| format!("column {}: {m}", d.name))?.unwrap_or(d.missing);
            out.dense.push(match d.transform {
                Transform::Log1p => x.signum() * x.abs().ln_1p(),
                _ => x,
            });
        }
        out.labels.push(label); // last: a row counts only once complete
        Ok(())
    }
}

/// The bucket of a numeric value (see the schema docs for each convention).
pub fn bucket(x: f64, transform: Transform, boundaries: &[f64]) -> i64 {
    match transform {
        Transform::Bucketize => boundaries.partition_point(|&b| b <= x) as i64,
        Transform::Log2Bucket if x >= 1.0 => 1 + x.log2().floor() as i64,
        Transform::LogSquareBucket if x > 2.0 => x.ln().powi(2).floor() as i64,
        _ => x.floor() as i64,
    }
}

/// The columns rows of `cfg`'s schema are read from, when rows arrive by name (JSON requests):
/// the label, then every column a field or dense feature reads, each once, with the separator
/// of multi-hot columns (a JSON array is joined with it); `data.ignore` columns are accepted and
/// unused. libfm fields are named as the run's encoder names them (`libfm_fields`).
pub fn schema_columns(cfg: &DataConfig, libfm_fields: &[String]) -> Vec<(String, Option<u8>)> {
    let mut out: Vec<(String, Option<u8>)> = vec![(cfg.label.clone(), None)];
    let mut add = |name: &str, sep: Option<u8>| {
        if !out.iter().any(|(c, _)| c == name) {
            out.push((name.to_string(), sep));
        }
    };
    cfg.ignore.iter().for_each(|c| add(c, None));
    if cfg.format.is_libfm() {
        for f in libfm_fields {
            add(f, None);
        }
    }
    for spec in &cfg.fields {
        for (_, col) in spec.named_columns() {
            match spec.kind {
                Some(FieldKind::Flags) => spec.columns.iter().for_each(|c| add(c, None)),
                Some(FieldKind::MultiHot) => add(col, spec.separator.as_deref().map(|s| s.as_bytes()[0])),
                _ => add(col, None),
            }
        }
    }
    out
}
