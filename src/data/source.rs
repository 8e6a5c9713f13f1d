//! Row sources: every file format yields [`Record`]s (typed cells by column position), so the
//! schema, the encoder and the cache never depend on the format.
//!
//! Errors come in two kinds: a fatal one (I/O, a truncated gzip stream, an unreadable file) ends
//! the read; a bad row (wrong column count, unparsable value) is reported with its location and
//! either stops the run or is skipped and counted, as `data.bad_lines` says.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::schema::{DataConfig, Format, JoinSpec, criteo_columns};

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

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    /// Byte range into [`Record::buf`].
    Text(u32, u32),
}

/// One row: cells by column position; text cells point into `buf`. `weights` is set only by
/// libfm (the `value` of each `id:value` pair).
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub cells: Vec<Cell>,
    pub buf: Vec<u8>,
    pub weights: Vec<f32>,
}

impl Record {
    pub fn text(&self, c: Cell) -> &[u8] {
        match c {
            Cell::Text(a, b) => &self.buf[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Appends a text cell (empty text is a null cell, as in files).
    pub fn push_text(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            self.cells.push(Cell::Null);
        } else {
            let a = self.buf.len() as u32;
            self.buf.extend_from_slice(bytes);
            self.cells.push(Cell::Text(a, self.buf.len() as u32));
        }
    }

    pub fn clear(&mut self) {
        self.cells.clear();
        self.buf.clear();
        self.weights.clear();
    }
}

/// The outcome of reading one row.
pub enum Next {
    Row,
    /// A malformed row: the message says which column and why.
    Bad(String),
    End,
}

pub trait RecordSource: Send {
    fn columns(&self) -> &[String];
    /// Reads the next row into `rec` (cleared first).
    fn next(&mut self, rec: &mut Record) -> Result<Next>;
    /// Where the last row came from, e.g. `data.tsv:17`.
    fn location(&self) -> String;
    /// Bytes consumed so far (compressed bytes for gzip are not tracked: the decoded count).
    fn bytes_read(&self) -> u64;
}

/// Opens `path` as configured: the format, header and column names of `cfg`, plus its joins.
pub fn open_source(path: &Path, cfg: &DataConfig) -> Result<Box<dyn RecordSource>> {
    let base = open_format(path, cfg.format, cfg)?;
    if cfg.join.is_empty() {
        return Ok(base);
    }
    let mut joined = Joined { base, sides: Vec::new(), columns: Vec::new() };
    joined.columns = joined.base.columns().to_vec();
    for j in &cfg.join {
        let side = SideTable::load(j, cfg)?;
        let on = joined.columns.iter().position(|c| c == &j.on).with_context(|| {
            format!("join {}: the main table has no column {:?} (columns: {})", j.path.display(), j.on, joined.columns.join(", "))
        })?;
        for c in &side.columns {
            if joined.columns.contains(c) {
                bail!("join {}: column {c:?} exists in both tables", j.path.display());
            }
            joined.columns.push(c.clone());
        }
        joined.sides.push((on, side));
    }
    Ok(Box::new(joined))
}

fn open_format(path: &Path, format: Format, cfg: &DataConfig) -> Result<Box<dyn RecordSource>> {
    Ok(match format {
        Format::Libfm | Format::Libsvm => Box::new(LibfmSource::open(path, cfg)?),
        Format::Criteo => {
            let names = if cfg.columns.is_empty() { criteo_columns() } else { cfg.columns.clone() };
            Box::new(DelimitedSource::open(path, b'\t', false, cfg.header.unwrap_or(false), names)?)
        }
        Format::Csv => Box::new(DelimitedSource::open(path, b',', true, cfg.header.unwrap_or(true), cfg.columns.clone())?),
        Format::Tsv => Box::new(DelimitedSource::open(path, b'\t', true, cfg.header.unwrap_or(true), cfg.columns.clone())?),
        Format::Parquet => Box::new(ParquetSource::open(path)?),
        Format::Synthetic => bail!("{}: synthetic data is generated, not read from a file", path.display()),
    })
}

// ---------------------------------------------------------------------------------------------
// Delimited text (Criteo TSV, CSV/TSV with header), plain or gzip.

pub struct DelimitedSource {
    path: PathBuf,
    reader: csv::Reader<Box<dyn BufRead + Send>>,
    record: csv::ByteRecord,
    columns: Vec<String>,
    /// Line where the last record started (a quoted field may span several).
    line: u64,
}

impl DelimitedSource {
    /// `quoting`: RFC 4180 quoted fields (quoted delimiters, `""`, line breaks) for CSV/TSV;
    /// Criteo's TSV has no quoting, so a quote character there is plain text.
    pub fn open(path: &Path, delim: u8, quoting: bool, header: bool, names: Vec<String>) -> Result<Self> {
        let reader = csv::ReaderBuilder::new()
            .delimiter(delim)
            .quoting(quoting)
            .has_headers(false) // read below, so line numbers and errors stay ours
            .flexible(true) // a row with the wrong column count is a bad row, reported by `next`
            .buffer_capacity(1 << 20)
            .from_reader(open_maybe_gz(path)?);
        let mut s = Self { path: path.to_path_buf(), reader, record: csv::ByteRecord::new(), columns: names, line: 0 };
        if header {
            if !s.read_record()? {
                bail!("{}: empty file (no header line)", path.display());
            }
            let from_file: Vec<String> = s.record.iter().map(|c| String::from_utf8_lossy(c).trim().to_string()).collect();
            if s.columns.is_empty() {
                s.columns = from_file;
            } else if s.columns.len() != from_file.len() {
                bail!("{}:{}: header has {} columns, data.columns names {}", path.display(), s.line, from_file.len(), s.columns.len());
            }
        }
        if s.columns.is_empty() {
            bail!("{}: no header line and no data.columns: column names are unknown", path.display());
        }
        Ok(s)
    }

    /// Reads the next record into `self.record`; false at the end. Only I/O fails here (a
    /// truncated gzip stream, a read error): byte records have no UTF-8 or length errors.
    fn read_record(&mut self) -> Result<bool> {
        let more = self.reader.read_byte_record(&mut self.record).map_err(|e| {
            let line = self.reader.position().line();
            anyhow::anyhow!("{}:{line}: read error (truncated or corrupt file?): {e}", self.path.display())
        })?;
        if more {
            self.line = self.record.position().map_or(self.line + 1, |p| p.line());
        }
        Ok(more)
    }
}

impl RecordSource for DelimitedSource {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next(&mut self, rec: &mut Record) -> Result<Next> {
        rec.clear();
        loop {
            if !self.read_record()? {
                return Ok(Next::End);
            }
            // blank lines are skipped (the reader drops empty ones; these hold only spaces)
            if !(self.record.len() == 1 && self.record[0].iter().all(u8::is_ascii_whitespace)) {
                break;
            }
        }
        if self.record.len() != self.columns.len() {
            let span = if self.record.iter().any(|f| f.contains(&b'\n')) {
                " (a quoted field holds a line break: an unterminated quote?)"
            } else {
                ""
            };
            return Ok(Next::Bad(format!("expected {} columns, found {}{span}", self.columns.len(), self.record.len())));
        }
        for field in self.record.iter() {
            rec.push_text(field);
        }
        Ok(Next::Row)
    }

    fn location(&self) -> String {
        format!("{}:{}", self.path.display(), self.line)
    }

    fn bytes_read(&self) -> u64 {
        self.reader.position().byte()
    }
}

// ---------------------------------------------------------------------------------------------
// libfm / libsvm: the label, then one categorical cell (the id) per field with its value as weight.

pub struct LibfmSource {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    columns: Vec<String>,
    num_fields: Option<usize>,
    line: String,
    lineno: usize,
    bytes: u64,
}

impl LibfmSource {
    pub fn open(path: &Path, cfg: &DataConfig) -> Result<Self> {
        let num_fields = cfg.num_fields.or((!cfg.field_names.is_empty()).then_some(cfg.field_names.len()));
        if let (Some(n), false) = (num_fields, cfg.field_names.is_empty())
            && n != cfg.field_names.len()
        {
            bail!("data.num_fields = {n} but {} field_names are given", cfg.field_names.len());
        }
        let mut s = Self {
            path: path.to_path_buf(),
            reader: open_maybe_gz(path)?,
            columns: Vec::new(),
            num_fields,
            line: String::new(),
            lineno: 0,
            bytes: 0,
        };
        if s.num_fields.is_none() {
            // The first non-empty line's pair count (its errors are reported when it is read).
            let mut first = String::new();
            let mut peek = open_maybe_gz(path)?;
            while first.trim().is_empty() {
                first.clear();
                if peek.read_line(&mut first).with_context(|| format!("{}:1: read error (truncated or corrupt file?)", path.display()))?
                    == 0
                {
                    bail!("{}: no data rows", path.display());
                }
            }
            s.num_fields = Some(first.split_ascii_whitespace().count().saturating_sub(1).max(1));
        }
        let n = s.num_fields.unwrap();
        s.columns = std::iter::once("label".to_string())
            .chain((0..n).map(|k| cfg.field_names.get(k).cloned().unwrap_or_else(|| format!("f{k}"))))
            .collect();
        Ok(s)
    }
}

impl RecordSource for LibfmSource {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next(&mut self, rec: &mut Record) -> Result<Next> {
        rec.clear();
        loop {
            self.line.clear();
            let n = self
                .reader
                .read_line(&mut self.line)
                .with_context(|| format!("{}:{}: read error (truncated or corrupt file?)", self.path.display(), self.lineno + 1))?;
            if n == 0 {
                return Ok(Next::End);
            }
            self.bytes += n as u64;
            self.lineno += 1;
            if !self.line.trim().is_empty() {
                break;
            }
        }
        let mut tokens = self.line.split_ascii_whitespace();
        let label = match tokens.next().unwrap_or("") {
            "1" | "+1" | "1.0" => 1.0,
            "0" | "-1" | "0.0" | "-1.0" => 0.0,
            other => return Ok(Next::Bad(format!("label: expected -1/0/1, got {other:?}"))),
        };
        rec.cells.push(Cell::Float(label));
        rec.weights.push(1.0);
        for (k, tok) in tokens.enumerate() {
            let Some((id, value)) = tok.split_once(':') else {
                return Ok(Next::Bad(format!("field {k}: expected id:value, got {tok:?}")));
            };
            let Ok(id) = id.parse::<u64>() else {
                return Ok(Next::Bad(format!("field {k}: feature id {id:?} is not a non-negative integer")));
            };
            let value: f32 = match value.parse() {
                Ok(v) if f32::is_finite(v) => v,
                Ok(v) => return Ok(Next::Bad(format!("field {k}: value {v} is not finite"))),
                Err(_) => return Ok(Next::Bad(format!("field {k}: value {value:?} is not a number"))),
            };
            rec.cells.push(Cell::Int(id as i64));
            rec.weights.push(value);
        }
        let nf = self.num_fields.unwrap_or(0);
        if rec.cells.len() - 1 != nf {
            return Ok(Next::Bad(format!("expected {nf} id:value pairs (one per field), found {}", rec.cells.len() - 1)));
        }
        if rec.cells.len() == 1 {
            return Ok(Next::Bad("no features".into()));
        }
        Ok(Next::Row)
    }

    fn location(&self) -> String {
        format!("{}:{}", self.path.display(), self.lineno)
    }

    fn bytes_read(&self) -> u64 {
        self.bytes
    }
}

// ---------------------------------------------------------------------------------------------
// Parquet, decoded column-wise into Arrow record batches (any codec compiled in: brotli, snappy,
// gzip, lz4, zstd). Each batch's columns are cast once to one of four kinds; rows then take
// their cells from those arrays.

/// A batch column in the kind the schema reads.
enum ArrowColumn {
    Int(arrow_array::Int64Array),
    Float(arrow_array::Float64Array),
    Text(arrow_array::LargeStringArray),
    Bytes(arrow_array::LargeBinaryArray),
}

impl ArrowColumn {
    /// Integers and booleans → i64, floats → f64, strings (plain, large, view, dictionary) →
    /// text, binaries → bytes, anything else (dates, decimals, lists…) → its text form.
    fn of(array: &arrow_array::ArrayRef, name: &str) -> Result<Self> {
        use arrow_array::cast::AsArray;
        use arrow_schema::DataType as T;
        let mut t = array.data_type().clone();
        if let T::Dictionary(_, values) = &t {
            t = (**values).clone();
        }
        let (target, kind) = match t {
            T::Boolean | T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32 | T::UInt64 => (T::Int64, 0),
            T::Float16 | T::Float32 | T::Float64 => (T::Float64, 1),
            T::Binary | T::LargeBinary | T::BinaryView | T::FixedSizeBinary(_) => (T::LargeBinary, 3),
            _ => (T::LargeUtf8, 2),
        };
        let cast =
            arrow_cast::cast(array, &target).with_context(|| format!("column {name}: cannot read Parquet type {}", array.data_type()))?;
        Ok(match kind {
            0 => Self::Int(cast.as_primitive::<arrow_array::types::Int64Type>().clone()),
            1 => Self::Float(cast.as_primitive::<arrow_array::types::Float64Type>().clone()),
            2 => Self::Text(cast.as_string::<i64>().clone()),
            _ => Self::Bytes(cast.as_binary::<i64>().clone()),
        })
    }

    fn push(&self, rec: &mut Record, i: usize) {
        use arrow_array::Array;
        let cell_is_null = match self {
            Self::Int(a) => a.is_null(i),
            Self::Float(a) => a.is_null(i),
            Self::Text(a) => a.is_null(i),
            Self::Bytes(a) => a.is_null(i),
        };
        if cell_is_null {
            rec.cells.push(Cell::Null);
            return;
        }
        match self {
            Self::Int(a) => rec.cells.push(Cell::Int(a.value(i))),
            Self::Float(a) => rec.cells.push(Cell::Float(a.value(i))),
            Self::Text(a) => rec.push_text(a.value(i).as_bytes()),
            Self::Bytes(a) => rec.push_text(a.value(i)),
        }
    }
}

pub struct ParquetSource {
    path: PathBuf,
    columns: Vec<String>,
    batches: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    batch: Vec<ArrowColumn>,
    batch_rows: usize,
    /// Next row of the current batch.
    at: usize,
    row: usize,
    bytes_per_row: f64,
}

impl ParquetSource {
    pub fn open(path: &Path) -> Result<Self> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        // SAFETY: the map is read-only; a file truncated by another process while mapped would
        // fault, as reading any input that changes underneath would be undefined for training.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let builder = std::panic::catch_unwind(|| ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from_owner(map)))
            .map_err(|_| anyhow::anyhow!("{}: the parquet decoder failed on the metadata (corrupt file?)", path.display()))?
            .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
        // The parquet crate asserts (panics) on some corrupt metadata when it reads a column
        // chunk; check the chunks' byte ranges against the file first (found by fuzzing).
        for (r, rg) in builder.metadata().row_groups().iter().enumerate() {
            for (c, col) in rg.columns().iter().enumerate() {
                let start = col.dictionary_page_offset().unwrap_or(col.data_page_offset());
                let len = col.compressed_size();
                let end = start.checked_add(len).and_then(|e| u64::try_from(e).ok());
                if start < 0 || len < 0 || end.is_none_or(|e| e > size) {
                    bail!(
                        "{}: corrupt parquet metadata: row group {r}, column {c}: bytes {start} + {len} lie outside the file ({size} bytes)",
                        path.display()
                    );
                }
            }
        }
        let columns = builder.schema().fields().iter().map(|f| f.name().to_string()).collect();
        let n = builder.metadata().file_metadata().num_rows().max(1) as f64;
        let batches = builder.with_batch_size(8192).build().with_context(|| format!("{}: not a readable parquet file", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            columns,
            batches,
            batch: Vec::new(),
            batch_rows: 0,
            at: 0,
            row: 0,
            bytes_per_row: size as f64 / n,
        })
    }

    /// Decodes the next record batch; false at the end of the file.
    fn next_batch(&mut self) -> Result<bool> {
        // A safety net: the parquet crate is not panic-free on every corrupt file.
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.batches.next()))
            .map_err(|_| anyhow::anyhow!("{}: after row {}: the parquet decoder failed (corrupt file?)", self.path.display(), self.row))?;
        let Some(batch) = next else { return Ok(false) };
        let batch = batch.with_context(|| format!("{}: after row {}: cannot decode", self.path.display(), self.row))?;
        self.batch = batch
            .columns()
            .iter()
            .zip(&self.columns)
            .map(|(a, name)| ArrowColumn::of(a, name))
            .collect::<Result<_>>()
            .with_context(|| format!("{}", self.path.display()))?;
        self.batch_rows = batch.num_rows();
        self.at = 0;
        Ok(true)
    }
}

impl RecordSource for ParquetSource {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next(&mut self, rec: &mut Record) -> Result<Next> {
        rec.clear();
        while self.at >= self.batch_rows {
            if !self.next_batch()? {
                return Ok(Next::End);
            }
        }
        for col in &self.batch {
            col.push(rec, self.at);
        }
        self.at += 1;
        self.row += 1;
        Ok(Next::Row)
    }

    fn location(&self) -> String {
        format!("{}: row {}", self.path.display(), self.row)
    }

    fn bytes_read(&self) -> u64 {
        (self.row as f64 * self.bytes_per_row) as u64
    }
}

// ---------------------------------------------------------------------------------------------
// Joins: side tables held in memory by key; every main row gets the side row's other columns.

struct SideTable {
    path: PathBuf,
    /// Columns appended to the main row (the side table's key column left out).
    columns: Vec<String>,
    rows: HashMap<Vec<u8>, Record>,
}

impl SideTable {
    fn load(j: &JoinSpec, cfg: &DataConfig) -> Result<Self> {
        let format = j.format.unwrap_or_else(|| {
            let name = j.path.to_string_lossy().to_lowercase();
            if name.contains(".parquet") {
                Format::Parquet
            } else if name.contains(".tsv") {
                Format::Tsv
            } else {
                Format::Csv
            }
        });
        let side_cfg = DataConfig { columns: Vec::new(), header: None, ..cfg.clone() };
        let mut src = open_format(&j.path, format, &side_cfg)?;
        let key_name = j.key.as_deref().unwrap_or(&j.on);
        let key =
            src.columns().iter().position(|c| c == key_name).with_context(|| {
                format!("join {}: no key column {key_name:?} (columns: {})", j.path.display(), src.columns().join(", "))
            })?;
        let columns = src.columns().iter().enumerate().filter(|(i, _)| *i != key).map(|(_, c)| c.clone()).collect();
        let mut rows = HashMap::new();
        let mut rec = Record::default();
        loop {
            match src.next(&mut rec)? {
                Next::End => break,
                Next::Bad(msg) => bail!("{}: {msg}", src.location()),
                Next::Row => {
                    let k = cell_key(&rec, rec.cells[key]);
                    let mut kept = Record::default();
                    for (i, &c) in rec.cells.iter().enumerate() {
                        if i != key {
                            push_cell(&mut kept, &rec, c);
                        }
                    }
                    if rows.insert(k, kept).is_some() {
                        bail!("{}: key {key_name} is not unique (a join needs one side row per key)", src.location());
                    }
                }
            }
        }
        Ok(Self { path: j.path.clone(), columns, rows })
    }
}

/// The canonical bytes of a cell as a key: integers and floats as their decimal text, so that
/// `5` from parquet and `"5"` from CSV are the same value.
pub fn cell_key(rec: &Record, c: Cell) -> Vec<u8> {
    match c {
        Cell::Null => Vec::new(),
        Cell::Int(i) => i.to_string().into_bytes(),
        Cell::Float(f) => f.to_string().into_bytes(),
        Cell::Text(..) => rec.text(c).to_vec(),
    }
}

fn push_cell(dst: &mut Record, src: &Record, c: Cell) {
    match c {
        Cell::Text(..) => dst.push_text(src.text(c)),
        other => dst.cells.push(other),
    }
}

struct Joined {
    base: Box<dyn RecordSource>,
    sides: Vec<(usize, SideTable)>,
    columns: Vec<String>,
}

impl RecordSource for Joined {
    fn columns(&self) -> &[String] {
        &self.columns
    }

    fn next(&mut self, rec: &mut Record) -> Result<Next> {
        match self.base.next(rec)? {
            Next::Row => {}
            other => return Ok(other),
        }
        for (on, side) in &self.sides {
            let k = cell_key(rec, rec.cells[*on]);
            let Some(row) = side.rows.get(&k) else {
                return Ok(Next::Bad(format!(
                    "column {}: key {:?} not found in {}",
                    self.columns[*on],
                    String::from_utf8_lossy(&k),
                    side.path.display()
                )));
            };
            for &c in &row.cells {
                push_cell(rec, row, c);
            }
        }
        Ok(Next::Row)
    }

    fn location(&self) -> String {
        self.base.location()
    }

    fn bytes_read(&self) -> u64 {
        self.base.bytes_read()
    }
}
