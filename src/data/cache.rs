//! The binary cache: an encoded split as a directory of columns, read back at memory speed or
//! streamed in chunks.
//!
//! `<dir>/labels.f32`, `rows.u32`, `values.f32`, `dense.f32` hold the [`EncodedDataset`] columns
//! (little-endian, row-major within a column); `header.json` records the format version, the
//! source file (path, size, modification time), a hash of the schema, the encoder fingerprint and
//! the row count. The header is written last, so a directory without one is an interrupted build.
//! A cache whose header does not match the current source, schema or encoder is refused.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::dataset::EncodedDataset;

pub const VERSION: u32 = 1;
pub const COLUMNS: [&str; 4] = ["labels.f32", "rows.u32", "values.f32", "dense.f32"];
pub const HEADER: &str = "header.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceId {
    pub path: String,
    pub size: u64,
    pub modified: u64,
}

impl SourceId {
    pub fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self { path: path.display().to_string(), size: meta.len(), modified })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheHeader {
    pub version: u32,
    pub source: SourceId,
    /// `train`/`valid`/`test` when the split is carved out of one file by `data.split`.
    pub split: Option<String>,
    pub schema_hash: String,
    pub encoder_hash: String,
    pub rows: u64,
    pub num_slots: usize,
    pub num_dense: usize,
    pub skipped: u64,
    pub oov: u64,
    pub truncated: u64,
}

impl CacheHeader {
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(HEADER);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a cache header", p.display()))?))
    }

    /// Why this cache cannot serve `want` (None when it can).
    pub fn mismatch(&self, want: &CacheHeader) -> Option<String> {
        if self.version != want.version {
            return Some(format!("format version {} (this build writes {})", self.version, want.version));
        }
        if self.source != want.source {
            return Some(format!(
                "source changed: built from {:?} ({} bytes, mtime {}), now {:?} ({} bytes, mtime {})",
                self.source.path, self.source.size, self.source.modified, want.source.path, want.source.size, want.source.modified
            ));
        }
        if self.split != want.split {
            return Some(format!("built for split {:?}, wanted {:?}", self.split, want.split));
        }
        if self.schema_hash != want.schema_hash {
            return Some(format!("the data schema changed (schema hash {} → {})", self.schema_hash, want.schema_hash));
        }
        if !want.encoder_hash.is_empty() && self.encoder_hash != want.encoder_hash {
            return Some(format!("encoded with another encoder ({} → {})", self.encoder_hash, want.encoder_hash));
        }
        None
    }
}

/// Appends encoded chunks to a cache directory.
pub struct CacheWriter {
    dir: PathBuf,
    files: Vec<BufWriter<File>>,
    pub rows: u64,
}

/// Writes 4-byte values little-endian: one copy of the slice's bytes on little-endian machines.
fn write_le<T: Copy>(w: &mut impl Write, xs: &[T], to_le: impl Fn(T) -> [u8; 4]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        // SAFETY: T is a 4-byte plain number (f32/u32, asserted below); any byte pattern is valid to read.
        assert_eq!(std::mem::size_of::<T>(), 4);
        let bytes = unsafe { std::slice::from_raw_parts(xs.as_ptr() as *const u8, std::mem::size_of_val(xs)) };
        w.write_all(bytes)
    } else {
        xs.iter().try_for_each(|&x| w.write_all(&to_le(x)))
    }
}

impl CacheWriter {
    /// Starts a fresh cache in `dir` (anything there is removed).
    pub fn create(dir: &Path) -> Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let files = COLUMNS
            .iter()
            .map(|c| {
                Ok(BufWriter::with_capacity(
                    1 << 20,
                    File::create(dir.join(c)).with_context(|| format!("cannot create {}", dir.join(c).display()))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { dir: dir.to_path_buf(), files, rows: 0 })
    }

    pub fn push(&mut self, chunk: &EncodedDataset) -> Result<()> {
        let ctx = || format!("cannot write the cache in {}", self.dir.display());
        write_le(&mut self.files[0], &chunk.labels, f32::to_le_bytes).with_context(ctx)?;
        write_le(&mut self.files[1], &chunk.rows, u32::to_le_bytes).with_context(ctx)?;
        write_le(&mut self.files[2], &chunk.values, f32::to_le_bytes).with_context(ctx)?;
        write_le(&mut self.files[3], &chunk.dense, f32::to_le_bytes).with_context(ctx)?;
        self.rows += chunk.len() as u64;
        Ok(())
    }

    /// Flushes the columns (the header is written separately, last).
    pub fn finish(self) -> Result<PathBuf> {
        for mut f in self.files {
            f.flush().with_context(|| format!("cannot write the cache in {}", self.dir.display()))?;
        }
        Ok(self.dir)
    }
}

pub fn write_header(dir: &Path, h: &CacheHeader) -> Result<()> {
    crate::runtime::write_atomic(&dir.join(HEADER), serde_json::to_string_pretty(h)?.as_bytes())
}

/// Random access to a finished cache's rows.
/// A finished cache, its column files memory-mapped: a read copies rows straight from the page
/// cache into the dataset (no intermediate buffer), and the kernel reads ahead and evicts.
#[derive(Debug, Clone)]
pub struct CacheReader {
    pub dir: PathBuf,
    pub header: CacheHeader,
    columns: std::sync::Arc<[Column; 4]>,
}

/// One mapped column file (None when it is empty: a zero-length file cannot be mapped).
#[derive(Debug)]
struct Column(Option<memmap2::Mmap>);

impl Column {
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl CacheReader {
    pub fn open(dir: &Path) -> Result<Self> {
        let header = CacheHeader::read(dir)?.with_context(|| format!("{} has no {HEADER}: not a finished cache", dir.display()))?;
        if header.version != VERSION {
            bail!("{}: cache format version {} (this build reads {VERSION}); rebuild it", dir.display(), header.version);
        }
        // The header's sizes must match the column files, so a damaged header can never make a
        // read go past what is on disk.
        let rows = header.rows;
        let per_row = [1, header.num_slots as u64, header.num_slots as u64, header.num_dense as u64];
        let mut columns = Vec::with_capacity(4);
        for (col, k) in COLUMNS.iter().zip(per_row) {
            let path = dir.join(col);
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            let have = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
            let want = rows.checked_mul(k).and_then(|v| v.checked_mul(4));
            if want != Some(have) {
                bail!(
                    "{}: {} bytes, but the header says {rows} rows × {k} values × 4 bytes (damaged cache; rebuild it)",
                    path.display(),
                    have
                );
            }
            // SAFETY: read-only map of a file only this program writes, and never while a reader
            // has it open (a cache is rebuilt into place only before it is opened).
            let map = if have == 0 {
                None
            } else {
                Some(unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?)
            };
            columns.push(Column(map));
        }
        let columns: [Column; 4] = columns.try_into().expect("four columns");
        Ok(Self { dir: dir.to_path_buf(), header, columns: std::sync::Arc::new(columns) })
    }

    pub fn len(&self) -> usize {
        self.header.rows as usize
    }
    pub fn is_empty(&self) -> bool {
        self.header.rows == 0
    }

    /// Rows `start .. start + n` (clamped to the end).
    pub fn read(&self, start: usize, n: usize) -> Result<EncodedDataset> {
        let n = n.min(self.len().saturating_sub(start));
        let (s, d) = (self.header.num_slots, self.header.num_dense);
        let col = |c: usize, per_row: usize| &self.columns[c].bytes()[4 * start * per_row..4 * (start + n) * per_row];
        let mut out = EncodedDataset::new(s, d);
        out.labels = f32s(col(0, 1)).collect();
        out.rows = col(1, s).chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.values = f32s(col(2, s)).collect();
        out.dense = f32s(col(3, d)).collect();
        Ok(out)
    }

    pub fn read_all(&self) -> Result<EncodedDataset> {
        self.read(0, self.len())
    }

    /// Rewrites the row and dense columns chunk by chunk (used once, to remap provisional ids).
    pub fn rewrite(dir: &Path, slots: usize, dense: usize, rows: u64, f: impl Fn(&mut [u32], &mut [f32])) -> Result<()> {
        let chunk = 1 << 16;
        let mut buf = Vec::new();
        let open = |c: usize| {
            let p = dir.join(COLUMNS[c]);
            std::fs::OpenOptions::new().read(true).write(true).open(&p).with_context(|| format!("cannot open {}", p.display()))
        };
        let (mut rf, mut df) = (open(1)?, open(3)?);
        let mut start = 0u64;
        while start < rows {
            let n = chunk.min(rows - start) as usize;
            rf.seek(SeekFrom::Start(4 * start * slots as u64))?;
            buf.resize(4 * n * slots, 0);
            rf.read_exact(&mut buf)?;
            let mut r: Vec<u32> = buf.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            df.seek(SeekFrom::Start(4 * start * dense as u64))?;
            buf.resize(4 * n * dense, 0);
            df.read_exact(&mut buf)?;
            let mut d: Vec<f32> = f32s(&buf).collect();
            f(&mut r, &mut d);
            rf.seek(SeekFrom::Start(4 * start * slots as u64))?;
            write_le(&mut rf, &r, u32::to_le_bytes)?;
            df.seek(SeekFrom::Start(4 * start * dense as u64))?;
            write_le(&mut df, &d, f32::to_le_bytes)?;
            start += n as u64;
        }
        rf.sync_all()?;
        df.sync_all()?;
        Ok(())
    }
}
