//! From records to model inputs: the schema bound to a file's columns ([`Extractor`]), and the
//! encoding fit on the training split only ([`Encoder`]).
//!
//! Table layout: all categorical fields share one concatenated embedding table. Field `f` owns
//! rows `offsets[f] ..`: first its OOV row, then its vocabulary (values seen ≥ `min_count` times in
//! training, in order of first appearance), then `hash_buckets` rows that unseen values hash into
//! (when configured). A value never seen in training therefore maps to OOV or a bucket of its own
//! field, never to a crash or another field's row.
//!
//! Slots: a categorical field is one slot; a multi-hot field is `max_len` slots whose embeddings
//! the model pools (unused slots carry weight 0). `values` holds each slot's weight: 1, the libfm
//! value, or 1/count for mean pooling.

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

use super::schema::{DataConfig, FieldKind, Pooling, Transform};
use super::source::{Cell, Record};

/// Hashes a `u64` key with one multiply-xorshift: keys are already well-mixed value hashes or small
/// bucket ids, and std's SipHash was half of the encoding time.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let z = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z ^ (z >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k;
    }
}

type KeyMap = HashMap<u64, u32, std::hash::BuildHasherDefault<KeyHasher>>;

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
struct BoundField {
    name: String,
    col_name: String,
    extract: Extract,
    width: usize,
    pooling: Pooling,
    min_count: u32,
    hash_buckets: u32,
}

#[derive(Debug, Clone)]
struct BoundDense {
    name: String,
    col: usize,
    missing: f64,
    transform: Transform,
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
    label: usize,
    label_name: String,
    threshold: Option<f64>,
    /// String labels (`data.positive` / `data.negative`), trimmed.
    positive: Vec<Vec<u8>>,
    negative: Vec<Vec<u8>>,
    fields: Vec<BoundField>,
    dense: Vec<BoundDense>,
}

impl Extractor {
    /// Binds `cfg`'s schema to `columns` (the file's column names, joins included).
    pub fn bind(cfg: &DataConfig, columns: &[String]) -> Result<Self> {
        let col = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .with_context(|| format!("no column {name:?} in the data (columns: {})", columns.join(", ")))
        };
        let label = col(&cfg.label).context("data.label")?;
        for c in &cfg.ignore {
            col(c).context("data.ignore")?;
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
            for name in spec.name.iter().chain(&spec.names) {
                let col_name = spec.column.clone().filter(|_| spec.name.is_some()).unwrap_or_else(|| name.clone());
                let field = |extract, width| BoundField {
                    name: name.clone(),
                    col_name: col_name.clone(),
                    extract,
                    width,
                    pooling: spec.pooling,
                    min_count: spec.min_count.unwrap_or(cfg.min_count),
                    hash_buckets: spec.hash_buckets.unwrap_or(cfg.hash_buckets),
                };
                let at = || col(&col_name).with_context(|| format!("field {name:?}"));
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
        match rec.cells.get(self.label) {
            Some(&c) => String::from_utf8_lossy(crate::data::source::cell_key(rec, c).trim_ascii()).to_string(),
            None => String::new(),
        }
    }

    /// The label from a string value under `data.positive`/`negative`.
    fn string_label(&self, rec: &Record) -> std::result::Result<f32, String> {
        let key = crate::data::source::cell_key(rec, rec.cells[self.label]);
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
        if !self.positive.is_empty() {
            let label = self.string_label(rec)?;
            return self.extract_features(rec, out, label);
        }
        let y = cell_number(rec, rec.cells[self.label]).map_err(|m| {
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

// ---------------------------------------------------------------------------------------------
// The fitted encoder.

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FieldVocab {
    pub name: String,
    /// Embedding slots (1, or max_len for multi-hot fields).
    pub width: usize,
    pub pooling: Pooling,
    pub min_count: u32,
    pub hash_buckets: u32,
    /// Value keys in row order (local row = position + 1).
    pub vocab: Vec<u64>,
    #[serde(skip)]
    lookup: KeyMap,
}

impl FieldVocab {
    pub fn rows(&self) -> usize {
        1 + self.vocab.len() + self.hash_buckets as usize
    }

    /// Local row of a value key, and whether it was out of vocabulary.
    fn local(&self, id: u64) -> (u32, bool) {
        match self.lookup.get(&id) {
            Some(&i) => (i, false),
            None if self.hash_buckets > 0 => (1 + self.vocab.len() as u32 + (id % self.hash_buckets as u64) as u32, true),
            None => (0, true),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DenseColumn {
    pub name: String,
    /// `x ↦ (x − shift) / scale` (identity unless standardized).
    pub shift: f64,
    pub scale: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Encoder {
    pub fields: Vec<FieldVocab>,
    pub dense: Vec<DenseColumn>,
    /// Per field: (slots, pooling, first table row); derived, kept for the per-row hot path.
    #[serde(skip)]
    layout: Vec<(usize, Pooling, u32)>,
}

/// Encoded rows (row-major): `rows[i * num_slots + s]` is the table row of slot `s` of example
/// `i`, `values` its weight; `dense[i * num_dense + j]` the dense features.
#[derive(Debug, Clone, Default)]
pub struct EncodedDataset {
    pub num_slots: usize,
    pub num_dense: usize,
    pub labels: Vec<f32>,
    pub rows: Vec<u32>,
    pub values: Vec<f32>,
    pub dense: Vec<f32>,
}

impl EncodedDataset {
    pub fn new(num_slots: usize, num_dense: usize) -> Self {
        Self { num_slots, num_dense, ..Default::default() }
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn clear(&mut self) {
        self.labels.clear();
        self.rows.clear();
        self.values.clear();
        self.dense.clear();
    }
    pub fn positive_rate(&self) -> f64 {
        self.labels.iter().map(|&y| y as f64).sum::<f64>() / self.len().max(1) as f64
    }
    /// Appends all of `other`.
    pub fn append(&mut self, other: &EncodedDataset) {
        self.labels.extend_from_slice(&other.labels);
        self.rows.extend_from_slice(&other.rows);
        self.values.extend_from_slice(&other.values);
        self.dense.extend_from_slice(&other.dense);
    }
    /// Appends example `i` of `other`.
    pub fn push_from(&mut self, other: &EncodedDataset, i: usize) {
        let (s, d) = (self.num_slots, self.num_dense);
        self.labels.push(other.labels[i]);
        self.rows.extend_from_slice(&other.rows[i * s..(i + 1) * s]);
        self.values.extend_from_slice(&other.values[i * s..(i + 1) * s]);
        self.dense.extend_from_slice(&other.dense[i * d..(i + 1) * d]);
    }
}

/// Counters of what encoding did to the values.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct EncodeStats {
    /// Values not in the vocabulary (mapped to OOV or a hash bucket).
    pub oov: u64,
    /// Multi-hot values beyond `max_len`, dropped.
    pub truncated: u64,
}

/// Encodes `chunk` into `out`, field by field: `local(f, id)` gives the table row of a value of
/// field `f`, `dense(j, x)` the encoded dense value of column `j`.
fn fill_chunk(
    layout: &[(usize, Pooling, u32)],
    chunk: &ParsedChunk,
    out: &mut EncodedDataset,
    stats: &mut EncodeStats,
    mut local: impl FnMut(usize, u64) -> u32,
    mut dense: impl FnMut(usize, f64) -> f32,
) {
    let (n, nf, s, nd) = (chunk.len(), chunk.num_fields, out.num_slots, chunk.num_dense);
    out.labels.extend_from_slice(&chunk.labels);
    let base = out.rows.len();
    out.rows.resize(base + n * s, 0);
    out.values.resize(base + n * s, 0.0);
    let (rows, values) = (&mut out.rows[base..], &mut out.values[base..]);
    let mut slot0 = 0;
    for (f, &(width, pooling, pad_row)) in layout.iter().enumerate() {
        for i in 0..n {
            let (start, len) = (chunk.starts[i * nf + f] as usize, chunk.lens[i * nf + f] as usize);
            let kept = len.min(width);
            stats.truncated += (len - kept) as u64;
            let scale = if pooling == Pooling::Mean { 1.0 / kept as f32 } else { 1.0 };
            let at = i * s + slot0;
            for j in 0..kept {
                rows[at + j] = local(f, chunk.ids[start + j]);
                values[at + j] = chunk.weights[start + j] * scale;
            }
            for j in kept..width {
                rows[at + j] = pad_row; // weight 0: contributes nothing
            }
        }
        slot0 += width;
    }
    out.dense.extend(chunk.dense.iter().enumerate().map(|(k, &x)| dense(k % nd.max(1), x)));
}

impl Encoder {
    pub fn num_fields(&self) -> usize {
        self.fields.len()
    }
    pub fn num_dense(&self) -> usize {
        self.dense.len()
    }
    pub fn field_names(&self) -> Vec<String> {
        self.fields.iter().map(|f| f.name.clone()).collect()
    }
    /// The field of every slot.
    pub fn slot_fields(&self) -> Vec<usize> {
        self.fields.iter().enumerate().flat_map(|(f, v)| std::iter::repeat_n(f, v.width)).collect()
    }
    pub fn num_slots(&self) -> usize {
        self.fields.iter().map(|f| f.width).sum()
    }
    /// Rows per field (OOV row and hash buckets included).
    pub fn field_sizes(&self) -> Vec<usize> {
        self.fields.iter().map(FieldVocab::rows).collect()
    }
    /// First table row of each field.
    pub fn offsets(&self) -> Vec<u32> {
        let mut acc = 0u32;
        self.field_sizes()
            .iter()
            .map(|&s| {
                let o = acc;
                acc += s as u32;
                o
            })
            .collect()
    }
    pub fn total_rows(&self) -> usize {
        self.field_sizes().iter().sum()
    }

    /// One line naming every field with its vocabulary size (and slots), and the dense columns.
    pub fn describe(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|f| {
                let mut d = format!("{} ({}", f.name, f.vocab.len());
                if f.hash_buckets > 0 {
                    d += &format!(" + {} buckets", f.hash_buckets);
                }
                if f.width > 1 {
                    d += &format!(", {} slots {:?}", f.width, f.pooling).to_lowercase();
                }
                d + ")"
            })
            .collect();
        let dense: Vec<&str> = self.dense.iter().map(|c| c.name.as_str()).collect();
        format!(
            "{} categorical fields: {}; {} dense: {}",
            fields.len(),
            fields.join(", "),
            dense.len(),
            if dense.is_empty() { "-".into() } else { dense.join(", ") }
        )
    }

    /// A stable fingerprint of the fitted encoding (caches record it).
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", hash_bytes(serde_json::to_string(self).expect("encoder serializes").as_bytes()))
    }

    /// Appends the encoding of `chunk` to `out`.
    pub fn encode_chunk(&self, chunk: &ParsedChunk, out: &mut EncodedDataset, stats: &mut EncodeStats) {
        let mut oov = 0;
        fill_chunk(
            &self.layout,
            chunk,
            out,
            stats,
            |f, id| {
                let (l, miss) = self.fields[f].local(id);
                oov += miss as u64;
                self.layout[f].2 + l
            },
            |j, x| ((x - self.dense[j].shift) / self.dense[j].scale) as f32,
        );
        stats.oov += oov;
    }

    fn with_lookup(mut self) -> Self {
        for f in &mut self.fields {
            f.lookup = f.vocab.iter().enumerate().map(|(i, &id)| (id, i as u32 + 1)).collect();
        }
        self.layout = self.fields.iter().zip(self.offsets()).map(|(f, o)| (f.width, f.pooling, o)).collect();
        self
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::runtime::write_atomic(path, serde_json::to_string(self)?.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read encoder {}", path.display()))?;
        let e: Encoder = serde_json::from_str(&text).with_context(|| format!("{}: not a valid encoder file", path.display()))?;
        Ok(e.with_lookup())
    }
}

// ---------------------------------------------------------------------------------------------
// Fitting, in the same pass that encodes the training split.

/// Encodes the training split while fitting: values get provisional local ids in order of first
/// appearance; [`Fitter::finish`] then drops rare values and returns the encoder plus the
/// remapping that [`Remap::apply`] applies to the provisionally encoded rows.
pub struct Fitter {
    /// Vocabularies in first-appearance order (their lookups unused while fitting).
    fields: Vec<FieldVocab>,
    /// (slots, pooling, padding row) per field; provisional row 0 is OOV/padding.
    layout: Vec<(usize, Pooling, u32)>,
    /// Per field: value key → (provisional local row, count); one probe per value.
    seen: Vec<HashMap<u64, (u32, u32), std::hash::BuildHasherDefault<KeyHasher>>>,
    dense_names: Vec<String>,
    standardize: Vec<bool>,
    /// Welford running mean / M2 per dense column.
    moments: Vec<(u64, f64, f64)>,
}

/// Turns provisional rows into final table rows, and raw dense values into transformed ones.
#[derive(Debug, Clone)]
pub struct Remap {
    /// Training occurrences of values below `min_count` (now OOV or hash buckets).
    pub rare: u64,
    slot_fields: Vec<usize>,
    rows: Vec<Vec<u32>>,
    dense: Vec<(f64, f64)>,
}

impl Fitter {
    pub fn new(ex: &Extractor) -> Self {
        let fields = ex
            .fields
            .iter()
            .map(|f| FieldVocab {
                name: f.name.clone(),
                width: f.width,
                pooling: f.pooling,
                min_count: f.min_count.max(1),
                hash_buckets: f.hash_buckets,
                vocab: Vec::new(),
                lookup: KeyMap::default(),
            })
            .collect::<Vec<_>>();
        Self {
            layout: fields.iter().map(|f| (f.width, f.pooling, 0)).collect(),
            seen: vec![Default::default(); fields.len()],
            fields,
            dense_names: ex.dense.iter().map(|d| d.name.clone()).collect(),
            standardize: ex.dense.iter().map(|d| d.transform == Transform::Standardize).collect(),
            moments: vec![(0, 0.0, 0.0); ex.dense.len()],
        }
    }

    pub fn num_slots(&self) -> usize {
        self.layout.iter().map(|l| l.0).sum()
    }
    pub fn num_dense(&self) -> usize {
        self.moments.len()
    }

    /// Appends the provisional encoding of `chunk` to `out`, counting values and dense moments.
    pub fn encode_chunk(&mut self, chunk: &ParsedChunk, out: &mut EncodedDataset, stats: &mut EncodeStats) {
        let (fields, seen, moments) = (&mut self.fields, &mut self.seen, &mut self.moments);
        fill_chunk(
            &self.layout,
            chunk,
            out,
            stats,
            |f, id| {
                let next = seen[f].len() as u32 + 1;
                let e = seen[f].entry(id).or_insert((next, 0));
                if e.0 == next {
                    fields[f].vocab.push(id);
                }
                e.1 += 1;
                e.0
            },
            |j, x| {
                let m = &mut moments[j];
                m.0 += 1;
                let delta = x - m.1;
                m.1 += delta / m.0 as f64;
                m.2 += delta * (x - m.1);
                x as f32
            },
        );
    }

    pub fn finish(self) -> (Encoder, Remap) {
        let mut fields = Vec::new();
        let mut remaps = Vec::new();
        let mut offset = 0u32;
        let mut rare = 0u64;
        for (mut v, seen) in self.fields.into_iter().zip(self.seen) {
            let mut counts = vec![0u32; v.vocab.len() + 1];
            for (_, (l, c)) in seen {
                counts[l as usize] = c;
            }
            rare += counts[1..].iter().filter(|&&c| c < v.min_count).map(|&c| c as u64).sum::<u64>();
            let kept: Vec<u64> = v.vocab.iter().zip(&counts[1..]).filter(|(_, c)| **c >= v.min_count).map(|(&id, _)| id).collect();
            let mut remap = vec![offset; v.vocab.len() + 1];
            let (buckets, n_kept) = (v.hash_buckets as u64, kept.len() as u32);
            let mut k = 0u32;
            for (p, &id) in v.vocab.iter().enumerate() {
                remap[p + 1] = offset
                    + if counts[p + 1] >= v.min_count {
                        k += 1;
                        k
                    } else if buckets > 0 {
                        1 + n_kept + (id % buckets) as u32
                    } else {
                        0
                    };
            }
            v.vocab = kept;
            offset += v.rows() as u32;
            fields.push(v);
            remaps.push(remap);
        }
        let dense_cols: Vec<DenseColumn> = self
            .dense_names
            .iter()
            .zip(&self.standardize)
            .zip(&self.moments)
            .map(|((name, &st), &(n, mean, m2))| {
                let std = if n > 1 { (m2 / (n - 1) as f64).sqrt() } else { 0.0 };
                let (shift, scale) = if st { (mean, if std > 0.0 { std } else { 1.0 }) } else { (0.0, 1.0) };
                DenseColumn { name: name.clone(), shift, scale }
            })
            .collect();
        let enc = Encoder { fields, dense: dense_cols, layout: Vec::new() }.with_lookup();
        let remap =
            Remap { rare, slot_fields: enc.slot_fields(), rows: remaps, dense: enc.dense.iter().map(|c| (c.shift, c.scale)).collect() };
        (enc, remap)
    }
}

impl Remap {
    /// Rewrites provisionally encoded rows (and raw dense values) in place.
    pub fn apply(&self, rows: &mut [u32], dense: &mut [f32]) {
        let s = self.slot_fields.len();
        for (i, r) in rows.iter_mut().enumerate() {
            *r = self.rows[self.slot_fields[i % s]][*r as usize];
        }
        let d = self.dense.len();
        if d > 0 {
            for (i, x) in dense.iter_mut().enumerate() {
                let (shift, scale) = self.dense[i % d];
                *x = ((*x as f64 - shift) / scale) as f32;
            }
        }
    }
}

/// Checks that an encoder fits the schema it is used with (a run's saved encoder vs its config).
pub fn check_compatible(enc: &Encoder, ex: &Extractor) -> Result<()> {
    if enc.num_fields() != ex.num_fields() || enc.num_dense() != ex.dense.len() {
        bail!(
            "the saved encoder has {} fields and {} dense columns, the schema gives {} and {}",
            enc.num_fields(),
            enc.num_dense(),
            ex.num_fields(),
            ex.dense.len()
        );
    }
    Ok(())
}
