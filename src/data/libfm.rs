//! libfm / libsvm text reader (plain or gzip).
//!
//! A line is `label id:value id:value ...`. Labels may be `-1/1` or `0/1`. Features are assigned
//! to fields by position: the k-th pair of a line belongs to field k, so every line must hold
//! exactly `num_fields` pairs (Frappe: 10 one-hot fields in a known order).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BadLines {
    /// Stop with an error naming file, line and field (the default).
    #[default]
    Error,
    /// Skip the line and count it; the count is reported in the run log.
    Skip,
}

#[derive(Debug, Clone)]
pub struct LibfmOptions {
    /// Pairs per line; `None` takes the count of the first data line.
    pub num_fields: Option<usize>,
    pub bad_lines: BadLines,
}

/// Rows as read, before encoding: raw feature ids and values, row-major `[rows, num_fields]`.
#[derive(Debug, Clone, Default)]
pub struct RawDataset {
    pub num_fields: usize,
    pub labels: Vec<f32>,
    pub ids: Vec<u64>,
    pub values: Vec<f32>,
    /// Malformed lines skipped under [`BadLines::Skip`].
    pub skipped: usize,
}

impl RawDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn positive_rate(&self) -> f64 {
        self.labels.iter().map(|&y| y as f64).sum::<f64>() / self.len().max(1) as f64
    }
}

/// Opens a file, transparently decompressing gzip (detected by its magic bytes, not its name).
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).with_context(|| format!("cannot read {}", path.display()))?;
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(file))))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 20, file)))
    }
}

/// Parses one line into `(label, [(id, value)])`; the error names the field at fault.
fn parse_line(line: &str, pairs: &mut Vec<(u64, f32)>) -> std::result::Result<f32, String> {
    let mut tokens = line.split_ascii_whitespace();
    let label_tok = tokens.next().ok_or("empty line")?;
    let label = match label_tok {
        "1" | "+1" | "1.0" => 1.0,
        "0" | "-1" | "0.0" | "-1.0" => 0.0,
        other => return Err(format!("label: expected -1/0/1, got {other:?}")),
    };
    pairs.clear();
    for (k, tok) in tokens.enumerate() {
        let (id, value) = tok
            .split_once(':')
            .ok_or_else(|| format!("field {k}: expected id:value, got {tok:?}"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| format!("field {k}: feature id {id:?} is not a non-negative integer"))?;
        let value: f32 = value
            .parse()
            .map_err(|_| format!("field {k}: value {value:?} is not a number"))?;
        if !value.is_finite() {
            return Err(format!("field {k}: value {value} is not finite"));
        }
        pairs.push((id, value));
    }
    Ok(label)
}

/// Reads a whole libfm/libsvm file.
pub fn read_libfm(path: &Path, opts: &LibfmOptions) -> Result<RawDataset> {
    let reader = open_maybe_gz(path)?;
    let mut data = RawDataset { num_fields: opts.num_fields.unwrap_or(0), ..Default::default() };
    let mut pairs = Vec::new();
    for (lineno, line) in reader.lines().enumerate() {
        let lineno = lineno + 1;
        let line = line.with_context(|| {
            format!("{}:{lineno}: read error (truncated or corrupt file?)", path.display())
        })?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let parsed = parse_line(line, &mut pairs).and_then(|label| {
            if data.num_fields == 0 {
                if pairs.is_empty() {
                    return Err("no features on the first line".to_string());
                }
                data.num_fields = pairs.len();
            }
            if pairs.len() != data.num_fields {
                return Err(format!(
                    "expected {} id:value pairs (one per field), found {}",
                    data.num_fields,
                    pairs.len()
                ));
            }
            Ok(label)
        });
        match parsed {
            Ok(label) => {
                data.labels.push(label);
                data.ids.extend(pairs.iter().map(|p| p.0));
                data.values.extend(pairs.iter().map(|p| p.1));
            }
            Err(msg) if opts.bad_lines == BadLines::Skip => {
                if data.skipped < 5 {
                    eprintln!("warning: {}:{lineno}: {msg} (skipped)", path.display());
                }
                data.skipped += 1;
            }
            Err(msg) => bail!("{}:{lineno}: {msg}", path.display()),
        }
    }
    if data.is_empty() {
        bail!("{}: no data rows", path.display());
    }
    Ok(data)
}
