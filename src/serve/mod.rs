//! Scoring with a finished run: [`Scorer`] turns rows (JSON objects by field name, or records of
//! a file) into click probabilities with the run's saved encoder and an inference-only model (no
//! autodiff bookkeeping). [`predict`] scores files row-aligned; [`http`] serves the scorer over
//! HTTP with micro-batching; [`loadtest`] measures a server.

pub mod http;
pub mod loadtest;
pub mod predict;

use anyhow::{Context, Result};
use burn::tensor::Device;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

use crate::data::EncodedDataset;
use crate::data::encoder::{EncodeStats, check_compatible};
use crate::data::extract::{Extractor, ParsedChunk, schema_columns};
use crate::data::loader::batch_of;
use crate::data::source::{Cell, Record};
use crate::model::embedding::SlotLayout;
use crate::train::checkpoint::{LoadedRun, load_run};

/// The click probability of a logit (f64, so that every path prints the same digits).
pub fn probability(logit: f32) -> f64 {
    1.0 / (1.0 + (-logit as f64).exp())
}

/// A row of a request that cannot be scored: which row (0-based, in request order), which
/// field when known, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RowError {
    pub row: usize,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "row {}, field {field:?}: {}", self.row, self.message),
            None => write!(f, "row {}: {}", self.row, self.message),
        }
    }
}

/// How JSON rows map onto the schema's columns.
struct JsonSchema {
    /// Column name → (position in the record, multi-hot separator).
    columns: HashMap<String, (usize, Option<u8>)>,
    width: usize,
    extractor: Extractor,
    label: String,
}

/// A loaded run ready to score: model (inference copy), encoder, and the schema bound for rows
/// that arrive by name.
pub struct Scorer {
    pub run: LoadedRun,
    device: Device,
    layout: SlotLayout,
    json: JsonSchema,
    /// The run's `result.json` (metrics), when it has one.
    pub result: Option<Value>,
    /// The encoder's fingerprint (a hash of all its vocabularies: computed once, at load).
    pub encoder_fingerprint: String,
    /// Platt scaling (a, b) applied to every logit (`--calibrated`: the run's
    /// `result.json` `calibrated`, fitted on its validation split); `None`: the raw model.
    pub calibration: Option<(f64, f64)>,
}

impl Scorer {
    /// Loads the run in `dir` and checks that it scores (one all-missing row must give a finite
    /// probability), so a broken run is refused at load time, not on the first request.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, false)
    }

    /// [`Scorer::load`], and with `calibrated` every score mapped by the run's Platt scaling
    /// (an error when its `result.json` has none: a run trained before it existed, or without
    /// an in-memory test split).
    pub fn load_with(dir: &Path, device: &Device, calibrated: bool) -> Result<Self> {
        let run = load_run(dir, device)?;
        let cols = schema_columns(&run.config.data, &run.encoder.field_names());
        // the label's position stays (a row may carry it) but unbound: requests are never labelled
        let names: Vec<String> = cols.iter().enumerate().map(|(i, (c, _))| if i == 0 { String::new() } else { c.clone() }).collect();
        let extractor = Extractor::bind_for_scoring(&run.config.data, &names).context("the run's schema")?;
        check_compatible(&run.encoder, &extractor).context("the run's encoder does not fit its schema")?;
        let json = JsonSchema {
            columns: cols.iter().enumerate().map(|(i, (c, sep))| (c.clone(), (i, *sep))).collect(),
            width: cols.len(),
            extractor,
            label: run.config.data.label.clone(),
        };
        let result = std::fs::read_to_string(dir.join("result.json")).ok().and_then(|s| serde_json::from_str(&s).ok());
        let encoder_fingerprint = run.encoder.fingerprint();
        let calibration = if calibrated {
            let c = result.as_ref().map(|r: &Value| &r["calibrated"]).filter(|c| !c.is_null()).with_context(|| {
                format!("{}: --calibrated, but its result.json has no calibration (retrain with this version)", dir.display())
            })?;
            let (a, b) = (c["a"].as_f64(), c["b"].as_f64());
            Some(
                a.zip(b)
                    .filter(|(a, b)| *a > 0.0 && a.is_finite() && b.is_finite())
                    .with_context(|| format!("{}: result.json has an invalid calibration {c}", dir.display()))?,
            )
        } else {
            None
        };
        let scorer =
            Self { layout: SlotLayout::of(&run.encoder), run, device: device.clone(), json, result, encoder_fingerprint, calibration };
        let probe = scorer.score_json(&[Value::Object(Default::default())]).map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(probe[0].is_finite(), "{}: the model scores an empty row as {} (not finite)", dir.display(), probe[0]);
        Ok(scorer)
    }

    /// The names a JSON row may use (the label is accepted and ignored).
    pub fn input_names(&self) -> Vec<String> {
        let mut v: Vec<(usize, String)> = self.json.columns.iter().map(|(c, (i, _))| (*i, c.clone())).collect();
        v.sort();
        v.into_iter().map(|(_, c)| c).filter(|c| c != &self.json.label).collect()
    }

    pub fn new_chunk(&self) -> ParsedChunk {
        ParsedChunk::new(self.run.encoder.num_fields(), self.run.encoder.num_dense())
    }

    /// Logits of encoded rows (one forward pass; the run's precision).
    pub fn logits(&self, data: &EncodedDataset) -> Result<Vec<f32>> {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        let batch = batch_of(data, self.run.encoder.total_rows(), &self.run.encoder.extra_embeddings())?;
        let mut out = crate::train::batch_logits(&self.run.model, &batch, &self.layout, self.run.config.train.precision, &self.device)?;
        anyhow::ensure!(out.len() == data.len(), "scored {} of {} rows", out.len(), data.len());
        if let Some(ab) = self.calibration {
            crate::metrics::apply_platt(ab, &mut out);
        }
        Ok(out)
    }

    /// Encodes extracted rows with the run's encoder (unseen values → OOV or their hash bucket).
    pub fn encode(&self, chunk: &ParsedChunk) -> EncodedDataset {
        let enc = &self.run.encoder;
        let mut out = EncodedDataset::new(enc.num_slots(), enc.num_dense());
        enc.encode_chunk(chunk, &mut out, &mut EncodeStats::default());
        out
    }

    /// Extracts JSON rows (objects by column name) into `chunk`; the first bad row is the error.
    pub fn extract_json(&self, rows: &[Value], chunk: &mut ParsedChunk) -> std::result::Result<(), RowError> {
        let mut rec = Record::default();
        for (i, row) in rows.iter().enumerate() {
            self.json_record(i, row, &mut rec)?;
            self.json.extractor.extract(&rec, chunk).map_err(|m| {
                let field = m.strip_prefix("column ").and_then(|r| r.split_once(':')).map(|(c, _)| c.to_string());
                let message = m.split_once(": ").filter(|_| field.is_some()).map(|(_, m)| m.to_string()).unwrap_or(m);
                RowError { row: i, field, message }
            })?;
        }
        Ok(())
    }

    /// Probabilities of JSON rows.
    pub fn score_json(&self, rows: &[Value]) -> std::result::Result<Vec<f64>, ScoreError> {
        let mut chunk = self.new_chunk();
        self.extract_json(rows, &mut chunk).map_err(ScoreError::Row)?;
        let logits = self.logits(&self.encode(&chunk)).map_err(ScoreError::Internal)?;
        Ok(logits.into_iter().map(probability).collect())
    }

    /// One JSON object → a record in schema column order. Values as in the training data:
    /// strings or numbers; multi-hot values as an array or the separator form; null or absent
    /// = missing. Unknown names and other types are errors naming the row and field.
    fn json_record(&self, i: usize, row: &Value, rec: &mut Record) -> std::result::Result<(), RowError> {
        let err = |field: Option<&str>, message: String| RowError { row: i, field: field.map(str::to_string), message };
        let Value::Object(map) = row else {
            return Err(err(None, format!("a row must be a JSON object of field values, got {}", kind_of(row))));
        };
        rec.clear();
        rec.cells.resize(self.json.width, Cell::Null);
        rec.weights.resize(self.json.width, 1.0);
        for (name, v) in map {
            let Some(&(col, sep)) = self.json.columns.get(name) else {
                return Err(err(Some(name), format!("unknown field (the model reads: {})", self.input_names().join(", "))));
            };
            let cell = match v {
                Value::Null => Cell::Null,
                Value::Bool(b) => Cell::Int(*b as i64),
                Value::Number(n) => match n.as_i64() {
                    Some(k) => Cell::Int(k),
                    None => Cell::Float(
                        n.as_f64().filter(|x| x.is_finite()).ok_or_else(|| err(Some(name), format!("number {n} is out of range")))?,
                    ),
                },
                Value::String(s) => text_cell(rec, s.as_bytes()),
                Value::Array(items) => {
                    let Some(sep) = sep else {
                        return Err(err(Some(name), "an array is only accepted for a multi-hot field".into()));
                    };
                    let mut joined = Vec::new();
                    for (k, item) in items.iter().enumerate() {
                        if k > 0 {
                            joined.push(sep);
                        }
                        match item {
                            Value::String(s) if s.as_bytes().contains(&sep) => {
                                return Err(err(Some(name), format!("list item {s:?} contains the separator {:?}", sep as char)));
                            }
                            Value::String(s) => joined.extend_from_slice(s.as_bytes()),
                            Value::Number(n) => joined.extend_from_slice(n.to_string().as_bytes()),
                            other => return Err(err(Some(name), format!("list items must be strings or numbers, got {}", kind_of(other)))),
                        }
                    }
                    text_cell(rec, &joined)
                }
                Value::Object(_) => return Err(err(Some(name), "expected a string, number or list, got an object".into())),
            };
            rec.cells[col] = cell;
        }
        Ok(())
    }
}

/// A text cell over `bytes` (stored in the record's buffer; empty text is a null cell).
fn text_cell(rec: &mut Record, bytes: &[u8]) -> Cell {
    rec.push_text(bytes);
    rec.cells.pop().expect("just pushed")
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Why a request was not scored: a bad row (the client's fault) or a failure of ours.
#[derive(Debug)]
pub enum ScoreError {
    Row(RowError),
    Internal(anyhow::Error),
}

impl std::fmt::Display for ScoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScoreError::Row(e) => write!(f, "{e}"),
            ScoreError::Internal(e) => write!(f, "{e:#}"),
        }
    }
}
