//! The encoding fit on the training split only ([`Encoder`]): per-field vocabularies and dense
//! standardisation, fit while the training split is first encoded ([`Fitter`], [`Remap`]).
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
//!
//! Several embeddings per field (the paper's §3.2, `[data] embeddings = { user = 2 }`): the
//! encoding and its caches stay as they are; each extra embedding of a field is a block of rows
//! appended after the encoder's table and a field appended after the encoder's fields
//! ([`ExtraEmbeddings`]), filled in when batches are built. A model sees `model_fields()` fields
//! and a table of `model_rows()` rows, and every embedding keeps its own row-wise optimizer state.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

use super::dataset::EncodedDataset;
use super::extract::{Extractor, ParsedChunk, hash_bytes};
use super::schema::{Pooling, Transform};

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

/// Most embeddings one field may have.
pub const MAX_EMBEDDINGS: usize = 64;

type KeyMap = HashMap<u64, u32, std::hash::BuildHasherDefault<KeyHasher>>;

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
    /// Embeddings per field (`[data] embeddings`); empty when every field has one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<usize>,
    /// Per field: (slots, pooling, first table row); derived, kept for the per-row hot path.
    #[serde(skip)]
    layout: Vec<(usize, Pooling, u32)>,
}

/// The extra embeddings of fields with `embeddings = m > 1`: copy `j` of field `f` reads the
/// field's slots and maps each row `r` of the field to `to + (r − from)`, a row of its own block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraEmbeddings {
    /// Per copy: the field's slots, its first row, its rows, the copy's first row.
    copies: Vec<(std::ops::Range<usize>, u32, u32, u32)>,
    rows: usize,
    slots: usize,
}

impl ExtraEmbeddings {
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }
    /// Table rows the copies add.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Slots the copies add to every example.
    pub fn slots(&self) -> usize {
        self.slots
    }
    /// Calls `emit(row, value)` for every extra slot of one example, given its encoded rows and
    /// values (all its slots, in order). A row outside its field's block (a corrupted cache) is
    /// an error naming the slot.
    pub fn for_example(&self, rows: &[u32], values: &[f32], mut emit: impl FnMut(u32, f32)) -> Result<()> {
        for (slots, from, len, to) in &self.copies {
            for s in slots.clone() {
                let local = rows[s].wrapping_sub(*from);
                if local >= *len {
                    bail!("slot {s}: embedding row {} is not a row of its field (rows {from}..{})", rows[s], from + len);
                }
                emit(to + local, values[s]);
            }
        }
        Ok(())
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

    /// Embeddings of field `f` (`[data] embeddings`, default 1).
    pub fn embeddings_of(&self, f: usize) -> usize {
        self.embeddings.get(f).copied().unwrap_or(1)
    }

    /// Sets the embeddings per field from `[data] embeddings` (keys: field names, or positions
    /// for unnamed fields).
    pub fn with_embeddings(mut self, plan: &std::collections::BTreeMap<String, usize>) -> Result<Self> {
        let names = self.field_names();
        let mut m = vec![1; names.len()];
        for (key, &count) in plan {
            let f = names.iter().position(|n| n == key).or_else(|| key.parse::<usize>().ok().filter(|&p| p < names.len()));
            let Some(f) = f else {
                bail!("data.embeddings: no field {key:?} (fields: {})", names.join(", "));
            };
            if !(1..=MAX_EMBEDDINGS).contains(&count) {
                bail!("data.embeddings.{key} = {count}: must be between 1 and {MAX_EMBEDDINGS}");
            }
            m[f] = count;
        }
        self.embeddings = if m.iter().all(|&c| c == 1) { Vec::new() } else { m };
        Ok(self)
    }

    /// Fields the model sees: the encoder's fields, then every extra embedding as a field.
    pub fn model_fields(&self) -> usize {
        (0..self.num_fields()).map(|f| self.embeddings_of(f)).sum()
    }
    /// Rows of the model's table: the encoder's, then each extra embedding's block.
    pub fn model_rows(&self) -> usize {
        self.total_rows() + self.extra_embeddings().rows()
    }
    /// The model field of every model slot (the encoder's slots, then the extra embeddings').
    pub fn model_slot_fields(&self) -> Vec<usize> {
        let mut out = self.slot_fields();
        let mut next = self.num_fields();
        for (f, v) in self.fields.iter().enumerate() {
            for _ in 1..self.embeddings_of(f) {
                out.extend(std::iter::repeat_n(next, v.width));
                next += 1;
            }
        }
        out
    }
    /// How batches fill in the extra embeddings.
    pub fn extra_embeddings(&self) -> ExtraEmbeddings {
        let mut extra = ExtraEmbeddings::default();
        let (mut slot0, mut to) = (0usize, self.total_rows() as u32);
        for ((f, v), from) in self.fields.iter().enumerate().zip(self.offsets()) {
            let rows = v.rows() as u32;
            for _ in 1..self.embeddings_of(f) {
                extra.copies.push((slot0..slot0 + v.width, from, rows, to));
                to += rows;
                extra.rows += rows as usize;
                extra.slots += v.width;
            }
            slot0 += v.width;
        }
        extra
    }

    /// One line naming every field with its vocabulary size (and slots), and the dense columns.
    pub fn describe(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut d = format!("{} ({}", f.name, f.vocab.len());
                if f.hash_buckets > 0 {
                    d += &format!(" + {} buckets", f.hash_buckets);
                }
                if f.width > 1 {
                    d += &format!(", {} slots {:?}", f.width, f.pooling).to_lowercase();
                }
                if self.embeddings_of(i) > 1 {
                    d += &format!(", {} embeddings", self.embeddings_of(i));
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

    /// An encoder whose vocabularies are ranges, not fitted: field `(name, slots, values)` owns
    /// rows `offset + 1 ..= offset + values` (its values' ids, in hash-bucket form), plus its OOV
    /// row; dense columns are passed through (generated data, [`super::world`]).
    pub fn fixed(fields: Vec<(String, usize, usize)>, dense: Vec<String>) -> Self {
        let fields = fields
            .into_iter()
            .map(|(name, width, values)| FieldVocab {
                name,
                width,
                pooling: Pooling::Sum,
                min_count: 1,
                hash_buckets: values as u32,
                vocab: Vec::new(),
                lookup: KeyMap::default(),
            })
            .collect();
        let dense = dense.into_iter().map(|name| DenseColumn { name, shift: 0.0, scale: 1.0 }).collect();
        Self { fields, dense, embeddings: Vec::new(), layout: Vec::new() }.with_lookup()
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
        let enc = Encoder { fields, dense: dense_cols, embeddings: Vec::new(), layout: Vec::new() }.with_lookup();
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
