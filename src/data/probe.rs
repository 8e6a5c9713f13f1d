//! Arbitrary bytes through each reader, end to end: written to a file, read with a fixed schema,
//! the encoder fitted, every split encoded and batched. The answer must be a result or an error
//! (or counted skips) — never a panic, a hang or an allocation the input did not justify. The
//! property test in the suite and the coverage-guided fuzz targets (`fuzz/`) both drive this.

use anyhow::{Context, Result};
use std::path::Path;

use super::cache::{CacheHeader, CacheReader};
use super::pipeline::{self, SplitData};
use super::{BatchLoader, DataConfig};

/// What a byte string is fed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Libfm,
    Criteo,
    Csv,
    Tsv,
    Parquet,
    /// An experiment config (TOML).
    Config,
    /// A binary cache: the bytes are split into its header and four column files.
    Cache,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Libfm, Target::Criteo, Target::Csv, Target::Tsv, Target::Parquet, Target::Config, Target::Cache];
}

/// The schema each text format is read with (label plus categorical, numeric and multi-hot fields).
fn schema(t: Target, skip: bool) -> &'static str {
    match (t, skip) {
        (Target::Libfm, false) => "format = \"libfm\"\n",
        (Target::Libfm, true) => "format = \"libfm\"\nbad_lines = \"skip\"\nhash_buckets = 3\n",
        (Target::Criteo, false) => {
            "format = \"criteo\"\n[[fields]]\nnames = [\"I1\", \"I2\"]\nkind = \"numeric\"\ntransform = \"log\"\n[[fields]]\nnames = [\"C1\", \"C2\"]\nkind = \"categorical\"\n"
        }
        (Target::Criteo, true) => {
            "format = \"criteo\"\nbad_lines = \"skip\"\nmin_count = 2\n[[fields]]\nnames = [\"I1\"]\nkind = \"numeric\"\n[[fields]]\nnames = [\"C1\"]\nkind = \"categorical\"\n"
        }
        (Target::Csv | Target::Tsv, s) => {
            if s {
                "label = \"y\"\nbad_lines = \"skip\"\n[[fields]]\nname = \"u\"\nkind = \"categorical\"\n[[fields]]\nname = \"x\"\nkind = \"numeric\"\n[[fields]]\nname = \"m\"\nkind = \"multi_hot\"\nseparator = \"|\"\nmax_len = 3\n"
            } else {
                "label = \"y\"\n[[fields]]\nname = \"u\"\nkind = \"categorical\"\n[[fields]]\nname = \"x\"\nkind = \"numeric\"\ntransform = \"bucketize\"\nboundaries = [0.0, 1.0]\n"
            }
        }
        (Target::Parquet, _) => {
            "format = \"parquet\"\n[[fields]]\nname = \"city\"\nkind = \"categorical\"\n[[fields]]\nname = \"price\"\nkind = \"numeric\"\n"
        }
        _ => "",
    }
}

/// Feeds `bytes` to `target`, using `scratch` (a directory of the caller's) for files. Returns
/// the number of training rows read when the input was accepted.
pub fn read_bytes(target: Target, bytes: &[u8], scratch: &Path) -> Result<usize> {
    std::fs::create_dir_all(scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    match target {
        Target::Config => {
            let text = String::from_utf8_lossy(bytes);
            crate::config::ExperimentConfig::parse(&text).map(|_| 0)
        }
        Target::Cache => read_cache(bytes, &scratch.join("cache")),
        _ => {
            let ext = match target {
                Target::Libfm => "libfm",
                Target::Criteo | Target::Tsv => "tsv",
                Target::Csv => "csv",
                _ => "parquet",
            };
            let path = scratch.join(format!("input.{ext}"));
            std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
            let skip = bytes.first().is_some_and(|b| b % 2 == 1);
            let mut text =
                format!("train = {:?}\nvalid = {:?}\n{}", path.display().to_string(), path.display().to_string(), schema(target, skip));
            if target == Target::Tsv {
                text = format!("format = \"tsv\"\n{text}");
            } else if target == Target::Csv {
                text = format!("format = \"csv\"\n{text}");
            }
            let cfg: DataConfig = toml::from_str(&text).context("probe schema")?;
            cfg.validate()?;
            let prepared = pipeline::prepare(&cfg, pipeline::CachePolicy::RebuildStale)?;
            let rows = prepared.encoder.total_rows().max(1);
            let mut n = 0;
            for (_, split, _) in prepared.splits {
                n = split.len();
                batch_all(split, rows)?;
            }
            Ok(n)
        }
    }
}

fn batch_all(split: SplitData, rows: usize) -> Result<()> {
    for b in BatchLoader::from_split(split, rows, 7, 5, 2).epoch(Some(1)) {
        b?;
    }
    Ok(())
}

/// Splits `bytes` into a header (up to the first 0 byte) and four column files (the rest, cut
/// at fixed fractions), then opens and streams the cache.
fn read_cache(bytes: &[u8], dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let cut = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    std::fs::write(dir.join(super::cache::HEADER), &bytes[..cut])?;
    let rest = &bytes[(cut + 1).min(bytes.len())..];
    let q = rest.len() / 4;
    for (i, col) in super::cache::COLUMNS.iter().enumerate() {
        let end = if i == 3 { rest.len() } else { (i + 1) * q };
        std::fs::write(dir.join(col), &rest[i * q..end])?;
    }
    let Some(_) = CacheHeader::read(dir)? else { return Ok(0) };
    let reader = CacheReader::open(dir)?;
    let n = reader.len();
    reader.read_all()?;
    batch_all(SplitData::Stream(reader), 16)?;
    Ok(n)
}
