//! `wukong predict`: scores a file row by row, the output aligned one-to-one with the input. The
//! label column is optional; chosen columns (ids) are copied through; a row that cannot be scored
//! stops the run with its location, or (with `bad_lines = "skip"`) gets an output line that says
//! which row and why — never a silent shift.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

use super::{Scorer, probability};
use crate::data::BadLines;
use crate::data::encoder::check_compatible;
use crate::data::extract::Extractor;
use crate::data::pipeline::split_part;
use crate::data::schema::{Format, criteo_columns};
use crate::data::source::{Next, Record, cell_key, open_source};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutFormat {
    /// One probability per line, nothing else.
    Plain,
    Csv,
    Tsv,
    /// One JSON object per line: `{"row": n, <kept columns>, "score": p}` or `{"row": n, "error": …}`.
    Jsonl,
}

impl OutFormat {
    /// From an output file's extension (`.csv`, `.tsv`, `.jsonl`/`.json`), else plain.
    pub fn from_path(p: Option<&Path>) -> Self {
        match p.and_then(|p| p.extension()).and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("csv") => Self::Csv,
            Some("tsv") => Self::Tsv,
            Some("jsonl" | "json" | "ndjson") => Self::Jsonl,
            _ => Self::Plain,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Header-less files (Criteo, CSV with `data.columns`): the file has no label column.
    pub unlabeled: bool,
    /// Columns copied to the output before the score (ids first).
    pub keep: Vec<String>,
    pub format: OutFormat,
    /// Rows per forward pass.
    pub batch_rows: usize,
    /// Score only the rows of this part of the config's seeded random split (`data.split`):
    /// the run's carved test split when no file is given. Rows are numbered in the whole file.
    pub part: Option<usize>,
    /// Overrides the run's `data.bad_lines` (skip: bad rows get an error line in the output).
    pub bad_lines: Option<BadLines>,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct PredictLog {
    pub rows: u64,
    pub scored: u64,
    pub skipped: u64,
    /// Whether the file had a label column (not used for scoring).
    pub labelled: bool,
}

/// A row waiting for its score: its kept values, or why it cannot be scored.
struct Pending {
    row: u64,
    keep: Vec<String>,
    error: Option<String>,
}

/// Scores `path` with `scorer`, writing one output line per input row to `w`.
pub fn predict_file(scorer: &Scorer, path: &Path, opts: &PredictOptions, w: &mut dyn Write) -> Result<PredictLog> {
    let mut cfg = scorer.run.config.data.clone();
    if let Some(b) = opts.bad_lines {
        cfg.bad_lines = b;
    }
    anyhow::ensure!(cfg.format != Format::Synthetic, "a synthetic run has no files to score: give --data in a file format");
    if opts.unlabeled {
        if cfg.format == Format::Criteo && cfg.columns.is_empty() {
            cfg.columns = criteo_columns();
        }
        anyhow::ensure!(
            !cfg.columns.is_empty(),
            "--unlabeled is for files without a header (Criteo, or CSV/TSV with data.columns); a file with a header simply omits the label column"
        );
        cfg.columns.retain(|c| c != &cfg.label);
    }
    anyhow::ensure!(
        opts.format != OutFormat::Plain || opts.keep.is_empty(),
        "--keep/--id-column need an output format with columns (csv, tsv or jsonl)"
    );
    let mut source = open_source(path, &cfg)?;
    let ex = Extractor::bind_for_scoring(&cfg, source.columns())
        .with_context(|| format!("{}: the schema does not fit the file", path.display()))?;
    check_compatible(&scorer.run.encoder, &ex).with_context(|| format!("{}: the run's encoder does not fit the schema", path.display()))?;
    let keep_at: Vec<usize> = opts
        .keep
        .iter()
        .map(|k| {
            source
                .columns()
                .iter()
                .position(|c| c == k)
                .with_context(|| format!("--keep {k:?}: no such column (columns: {})", source.columns().join(", ")))
        })
        .collect::<Result<_>>()?;
    let skip = cfg.bad_lines == BadLines::Skip;
    let ncols = source.columns().len();
    let mut out = Output::new(opts.format, &opts.keep, skip, w)?;
    let mut log = PredictLog { labelled: ex.has_label(), ..Default::default() };
    let (mut rec, mut chunk, mut pending, mut index) = (Record::default(), scorer.new_chunk(), Vec::new(), 0u64);
    loop {
        let next = source.next(&mut rec)?;
        if let Next::End = next {
            break;
        }
        index += 1;
        if let (Some(spec), Some(part)) = (&cfg.split, opts.part)
            && split_part(spec, index - 1) != part
        {
            continue;
        }
        log.rows += 1;
        let keep = match next {
            Next::Row => keep_at.iter().map(|&c| String::from_utf8_lossy(&cell_key(&rec, rec.cells[c])).into_owned()).collect(),
            _ => vec![String::new(); keep_at.len()],
        };
        let error = match next {
            Next::Bad(msg) => Some(msg),
            _ => ex.extract(&rec, &mut chunk).err(),
        };
        if let Some(msg) = &error {
            // a first row one column short is a file without its label, not a bad row: said even
            // under `skip` (which would otherwise report every row)
            let no_label = log.rows == 1 && ex.has_label() && msg.contains(&format!("expected {} columns, found {}", ncols, ncols - 1));
            if no_label {
                bail!("{}: {msg} — a file without its label column? pass --unlabeled", source.location());
            }
            if !skip {
                bail!(
                    "{}: {msg} (with --bad-lines skip the other rows are scored and this one is reported in the output)",
                    source.location()
                );
            }
            log.skipped += 1;
        }
        let error = error.map(|m| format!("{}: {m}", source.location()));
        pending.push(Pending { row: index, keep, error });
        if chunk.len() >= opts.batch_rows.max(1) {
            log.scored += flush(scorer, &mut chunk, &mut pending, &mut out)?;
        }
    }
    log.scored += flush(scorer, &mut chunk, &mut pending, &mut out)?;
    out.finish()?;
    Ok(log)
}

/// Scores the extracted rows and writes every pending row in input order.
fn flush(scorer: &Scorer, chunk: &mut crate::data::extract::ParsedChunk, pending: &mut Vec<Pending>, out: &mut Output) -> Result<u64> {
    let logits = scorer.logits(&scorer.encode(chunk))?;
    let mut scores = logits.into_iter();
    for p in pending.drain(..) {
        let score = if p.error.is_none() { Some(probability(scores.next().context("fewer scores than rows")?)) } else { None };
        out.row(&p, score)?;
    }
    anyhow::ensure!(scores.next().is_none(), "more scores than rows");
    let n = chunk.len() as u64;
    *chunk = scorer.new_chunk();
    Ok(n)
}

struct Output<'a> {
    format: OutFormat,
    keep: Vec<String>,
    /// csv/tsv: the `error` column exists (rows may be skipped).
    skip: bool,
    csv: Option<csv::Writer<&'a mut dyn Write>>,
    w: Box<dyn Write + 'a>,
}

impl<'a> Output<'a> {
    fn new(format: OutFormat, keep: &[String], skip: bool, w: &'a mut dyn Write) -> Result<Self> {
        let delim = match format {
            OutFormat::Csv => Some(b','),
            OutFormat::Tsv => Some(b'\t'),
            _ => None,
        };
        if let Some(d) = delim {
            let mut csv = csv::WriterBuilder::new().delimiter(d).from_writer(w);
            let mut header: Vec<&str> = keep.iter().map(String::as_str).collect();
            header.push("score");
            if skip {
                header.push("error");
            }
            csv.write_record(&header)?;
            return Ok(Self { format, keep: keep.to_vec(), skip, csv: Some(csv), w: Box::new(std::io::sink()) });
        }
        Ok(Self { format, keep: keep.to_vec(), skip, csv: None, w: Box::new(w) })
    }

    fn row(&mut self, p: &Pending, score: Option<f64>) -> Result<()> {
        let score_text = score.map(|s| format!("{s:.7}")).unwrap_or_default();
        match self.format {
            OutFormat::Plain => match &p.error {
                None => writeln!(self.w, "{score_text}")?,
                Some(e) => writeln!(self.w, "error: row {}: {e}", p.row)?,
            },
            OutFormat::Jsonl => {
                let mut o = serde_json::Map::new();
                o.insert("row".into(), p.row.into());
                for (k, v) in self.keep.iter().zip(&p.keep) {
                    o.insert(k.clone(), v.clone().into());
                }
                match (&p.error, score) {
                    (None, Some(s)) => o.insert("score".into(), serde_json::Number::from_f64((s * 1e7).round() / 1e7).into()),
                    (e, _) => o.insert("error".into(), e.clone().unwrap_or_default().into()),
                };
                writeln!(self.w, "{}", serde_json::Value::Object(o))?;
            }
            OutFormat::Csv | OutFormat::Tsv => {
                let csv = self.csv.as_mut().expect("csv writer");
                let mut rec: Vec<&str> = p.keep.iter().map(String::as_str).collect();
                rec.push(&score_text);
                if self.skip {
                    rec.push(p.error.as_deref().unwrap_or(""));
                }
                csv.write_record(&rec)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(csv) = self.csv.as_mut() {
            csv.flush()?;
        }
        Ok(self.w.flush()?)
    }
}
