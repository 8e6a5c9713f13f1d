//! Text/Parquet → encoded splits: one pass over the training file fits the encoder while encoding
//! it, the other splits are encoded with the fitted encoder; with `data.cache_dir` each encoded
//! split (and the encoder) is kept on disk and later runs start from there.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Instant;

use super::cache::{CacheHeader, CacheReader, CacheWriter, SourceId, VERSION, write_header};
use super::dataset::EncodedDataset;
use super::encoder::{EncodeStats, Encoder, Fitter, Remap, check_compatible};
use super::extract::{Extractor, LABEL_HINT, ParsedChunk, hash_bytes};
use super::schema::{DataConfig, Format, SplitSpec};
use super::source::BadLines;
use super::source::{Next, Record, RecordSource, open_source};
use super::world::{self, World, WorldConfig};

pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// What reading one split did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitLog {
    pub rows: u64,
    pub skipped: u64,
    pub oov: u64,
    pub truncated: u64,
    pub positive_rate: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub from_cache: bool,
    /// Synthetic data: the LogLoss of the teacher's own probabilities on this split (the
    /// Bayes-optimal LogLoss) and their mean entropy (its expectation over label draws).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bayes_logloss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_entropy: Option<f64>,
}

/// Which file and which part of it a split is.
#[derive(Debug, Clone)]
pub struct SplitSource {
    pub name: &'static str,
    pub path: PathBuf,
    /// Index into `data.split.ratios` when the split is carved out of `path`.
    pub part: Option<usize>,
}

pub fn split_sources(cfg: &DataConfig) -> Vec<SplitSource> {
    match &cfg.split {
        Some(s) => (0..3)
            .filter(|&i| i < 2 || s.ratios[2] > 0.0)
            .map(|i| SplitSource { name: SPLITS[i], path: cfg.train.clone(), part: Some(i) })
            .collect(),
        None => [Some(&cfg.train), cfg.valid.as_ref(), cfg.test.as_ref()]
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| SplitSource { name: SPLITS[i], path: p.clone(), part: None }))
            .collect(),
    }
}

/// The part (0 train, 1 valid, 2 test) of data row `i` (0-based, skipped rows included) under a
/// seeded random split: a hash of (seed, i), so it never depends on reading order or memory.
pub fn split_part(spec: &SplitSpec, i: u64) -> usize {
    let z = crate::rng::mix(spec.seed ^ i.wrapping_mul(crate::rng::GAMMA));
    let u = (z >> 11) as f64 / (1u64 << 53) as f64 * spec.ratios.iter().sum::<f64>();
    if u < spec.ratios[0] {
        0
    } else if u < spec.ratios[0] + spec.ratios[1] {
        1
    } else {
        2
    }
}

/// How a split is encoded: fitting (train) or with a fitted encoder.
pub enum Encoding<'a> {
    Fit(&'a mut Fitter),
    Apply(&'a Encoder),
}

/// Rows per parsed chunk handed from the parsing thread to the encoder.
const CHUNK: usize = 16_384;

/// Parses `source` on the calling thread into chunks of extracted rows sent to `tx`; returns the
/// bytes read. Bad rows are skipped and counted or end the read, as `data.bad_lines` says.
/// The distinct label values from the current row on (up to 20, over at most 100,000 rows), for
/// an error about an unusable label: the user sees what the column holds and can map it.
fn distinct_labels(source: &mut dyn RecordSource, rec: &mut Record, ex: &Extractor) -> Result<String> {
    let mut seen = std::collections::BTreeSet::new();
    seen.insert(ex.label_text(rec));
    for _ in 0..100_000 {
        if seen.len() >= 20 {
            break;
        }
        match source.next(rec)? {
            Next::End => break,
            Next::Row => {
                seen.insert(ex.label_text(rec));
            }
            Next::Bad(_) => {}
        }
    }
    let list: Vec<String> = seen.iter().map(|s| format!("{s:?}")).collect();
    Ok(format!("label values in the file from this row on: {}{}", list.join(", "), if seen.len() >= 20 { ", …" } else { "" }))
}

fn parse_chunks(
    cfg: &DataConfig,
    part: Option<usize>,
    mut source: Box<dyn RecordSource>,
    ex: &Extractor,
    tx: &SyncSender<Result<ParsedChunk>>,
) -> Result<u64> {
    let mut rec = Record::default();
    let mut chunk = ParsedChunk::new(ex.num_fields(), ex.num_dense());
    let (mut index, mut reported) = (0u64, 0u64);
    loop {
        let outcome = match source.next(&mut rec)? {
            Next::End => break,
            Next::Bad(msg) => Err(msg),
            Next::Row => Ok(()),
        };
        let i = index;
        index += 1;
        if let (Some(spec), Some(part)) = (&cfg.split, part)
            && split_part(spec, i) != part
        {
            continue;
        }
        match outcome.and_then(|()| ex.extract(&rec, &mut chunk)) {
            Ok(()) => {}
            Err(msg) if cfg.bad_lines == BadLines::Skip => {
                if reported < 5 {
                    tracing::warn!("{}: {} (skipped)", source.location(), msg.trim_end_matches(LABEL_HINT));
                    reported += 1;
                }
                chunk.skipped += 1;
            }
            Err(msg) => {
                let at = source.location();
                match msg.strip_suffix(LABEL_HINT) {
                    Some(m) => bail!("{at}: {m}; {}", distinct_labels(source.as_mut(), &mut rec, ex)?),
                    None => bail!("{at}: {msg}"),
                }
            }
        }
        if chunk.len() == CHUNK {
            let full = std::mem::replace(&mut chunk, ParsedChunk::new(ex.num_fields(), ex.num_dense()));
            if tx.send(Ok(full)).is_err() {
                return Ok(source.bytes_read()); // the encoder stopped (its own error)
            }
        }
    }
    if !chunk.is_empty() || chunk.skipped > 0 {
        let _ = tx.send(Ok(chunk));
    }
    Ok(source.bytes_read())
}

/// A split's file opened (joins loaded) with the schema bound to its columns.
pub struct Opened {
    source: Box<dyn RecordSource>,
    ex: Extractor,
}

pub fn open_bound(cfg: &DataConfig, src: &SplitSource) -> Result<Opened> {
    let source = open_source(&src.path, cfg)?;
    let ex = Extractor::bind(cfg, source.columns()).with_context(|| format!("{}: the schema does not fit the file", src.path.display()))?;
    Ok(Opened { source, ex })
}

impl Encoding<'_> {
    /// (slots, dense columns) of the encoded rows.
    fn layout(&self) -> (usize, usize) {
        match self {
            Encoding::Fit(f) => (f.num_slots(), f.num_dense()),
            Encoding::Apply(e) => (e.num_slots(), e.num_dense()),
        }
    }
}

/// Reads the opened split, extracts and encodes every row, handing encoded chunks to `sink`.
/// Parsing runs on a second thread while this one encodes (the vocabulary is fit in file order
/// either way).
pub fn read_encode(
    cfg: &DataConfig,
    src: &SplitSource,
    opened: Opened,
    mut enc: Encoding,
    mut sink: impl FnMut(&EncodedDataset) -> Result<()>,
) -> Result<SplitLog> {
    let start = Instant::now();
    let Opened { source, ex } = opened;
    if let Encoding::Apply(e) = &enc {
        check_compatible(e, &ex).with_context(|| format!("{}: the encoder does not fit the schema", src.path.display()))?;
    }
    let (slots, dense) = enc.layout();
    let (tx, rx) = sync_channel::<Result<ParsedChunk>>(2);
    let (thread_cfg, part) = (cfg.clone(), src.part);
    let parser = std::thread::spawn(move || {
        let r = parse_chunks(&thread_cfg, part, source, &ex, &tx);
        if let Err(e) = &r {
            let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
        }
        r
    });
    let mut out = EncodedDataset::new(slots, dense);
    let (mut stats, mut log, mut positives) = (EncodeStats::default(), SplitLog::default(), 0.0f64);
    let mut failed = None;
    for chunk in rx.iter() {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        log.skipped += chunk.skipped;
        log.rows += chunk.len() as u64;
        positives += chunk.labels.iter().map(|&y| y as f64).sum::<f64>();
        out.clear();
        match &mut enc {
            Encoding::Fit(f) => f.encode_chunk(&chunk, &mut out, &mut stats),
            Encoding::Apply(e) => e.encode_chunk(&chunk, &mut out, &mut stats),
        }
        if !out.is_empty()
            && let Err(e) = sink(&out)
        {
            failed = Some(e);
            break;
        }
    }
    drop(rx);
    let parsed = parser.join().map_err(|_| anyhow::anyhow!("the parsing thread panicked"))?;
    if let Some(e) = failed {
        return Err(e);
    }
    log.bytes = parsed?;
    if log.rows == 0 {
        bail!(
            "{}: no data rows{}",
            src.path.display(),
            if log.skipped > 0 { format!(" ({} malformed rows skipped)", log.skipped) } else { String::new() }
        );
    }
    log.oov = stats.oov;
    log.truncated = stats.truncated;
    log.positive_rate = positives / log.rows as f64;
    log.seconds = start.elapsed().as_secs_f64();
    Ok(log)
}

/// Fits the encoder on the training split and encodes it, in memory.
pub fn fit_in_memory(cfg: &DataConfig, src: &SplitSource) -> Result<(Encoder, EncodedDataset, SplitLog)> {
    let opened = open_bound(cfg, src)?;
    let mut fitter = Fitter::new(&opened.ex);
    let mut data = EncodedDataset::new(fitter.num_slots(), fitter.num_dense());
    let mut log = read_encode(cfg, src, opened, Encoding::Fit(&mut fitter), |c| {
        data.append(c);
        Ok(())
    })?;
    let (encoder, remap) = fitter.finish();
    remap.apply(&mut data.rows, &mut data.dense);
    log.oov += remap.rare;
    Ok((encoder, data, log))
}

/// Encodes a split with a fitted encoder, in memory (eval/predict, and runs without a cache).
pub fn encode_in_memory(cfg: &DataConfig, src: &SplitSource, encoder: &Encoder) -> Result<(EncodedDataset, SplitLog)> {
    let mut data = EncodedDataset::new(encoder.num_slots(), encoder.num_dense());
    let log = read_encode(cfg, src, open_bound(cfg, src)?, Encoding::Apply(encoder), |c| {
        data.append(c);
        Ok(())
    })?;
    Ok((data, log))
}

/// A hash of everything in the data config that changes the encoding (not where the files are).
pub fn schema_hash(cfg: &DataConfig) -> Result<String> {
    let mut c = cfg.clone();
    c.train = PathBuf::new();
    c.valid = None;
    c.test = None;
    c.cache_dir = None;
    c.stream = false;
    c.chunk_rows = 0;
    c.shuffle_chunks = 0;
    let mut text = serde_json::to_string(&c)?;
    for j in &cfg.join {
        text.push_str(&serde_json::to_string(&SourceId::of(&j.path)?)?);
    }
    Ok(format!("{:016x}", hash_bytes(text.as_bytes())))
}

/// An encoded split, in memory or streamed from its cache.
#[derive(Debug, Clone)]
pub enum SplitData {
    Memory(Arc<EncodedDataset>),
    Stream(CacheReader),
    /// Examples `0 .. rows` of a synthetic stream, generated as they are batched.
    Generated {
        world: Arc<World>,
        stream: u64,
        rows: usize,
    },
}

impl SplitData {
    pub fn len(&self) -> usize {
        match self {
            SplitData::Memory(d) => d.len(),
            SplitData::Stream(c) => c.len(),
            SplitData::Generated { rows, .. } => *rows,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Prepared {
    pub encoder: Encoder,
    /// In `train`, `valid`, `test` order (test when configured).
    pub splits: Vec<(&'static str, SplitData, SplitLog)>,
}

/// What to do with a cache that exists but no longer matches its source, schema or encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// Rebuild it, saying why (the default: a cache behaves like a build system's output).
    #[default]
    RebuildStale,
    /// Rebuild every cache (`--rebuild-cache`).
    RebuildAll,
    /// Refuse with the reason (`--no-rebuild-cache`).
    RefuseStale,
}

/// The cache directory of a split: `<cache_dir>/<file name>-<hash of its absolute path>[.<split>]`,
/// so two files of the same name in different folders never share a cache.
pub fn cache_dir_of(cache: &Path, src: &SplitSource) -> PathBuf {
    let file = src.path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_else(|| "data".into());
    let absolute = std::path::absolute(&src.path).unwrap_or_else(|_| src.path.clone());
    let absolute = std::fs::canonicalize(&absolute).unwrap_or(absolute);
    let key = format!("{file}-{:08x}", hash_bytes(absolute.to_string_lossy().as_bytes()) as u32);
    match src.part {
        Some(_) => cache.join(format!("{key}.{}", src.name)),
        None => cache.join(key),
    }
}

fn want_header(cfg: &DataConfig, src: &SplitSource, encoder_hash: String) -> Result<CacheHeader> {
    Ok(CacheHeader {
        version: VERSION,
        source: SourceId::of(&src.path)?,
        split: src.part.map(|_| src.name.to_string()),
        schema_hash: schema_hash(cfg)?,
        encoder_hash,
        rows: 0,
        num_slots: 0,
        num_dense: 0,
        skipped: 0,
        oov: 0,
        truncated: 0,
    })
}

/// Opens the cache of `src` when it is present and current; Ok(None) when it must be built
/// (absent, stale under [`CachePolicy::RebuildStale`], or any under `RebuildAll`). A damaged
/// header or column file counts as stale.
fn usable_cache(dir: &Path, want: &CacheHeader, policy: CachePolicy) -> Result<Option<CacheReader>> {
    if !dir.join(super::cache::HEADER).exists() || policy == CachePolicy::RebuildAll {
        return Ok(None);
    }
    let why = match CacheHeader::read(dir) {
        Ok(Some(have)) => match have.mismatch(want) {
            None => match CacheReader::open(dir) {
                Ok(reader) => return Ok(Some(reader)),
                Err(e) => format!("{e:#}"),
            },
            Some(why) => why,
        },
        Ok(None) => return Ok(None),
        Err(e) => format!("{e:#}"),
    };
    match policy {
        CachePolicy::RefuseStale => bail!(
            "cache {} is stale: {why}. Rebuild it with --rebuild-cache, or run without --no-rebuild-cache to rebuild stale caches automatically",
            dir.display()
        ),
        _ => {
            tracing::info!("cache {} is stale ({why}); rebuilding it", dir.display());
            Ok(None)
        }
    }
}

fn header_log(h: &CacheHeader, secs: f64, positive_rate: f64) -> SplitLog {
    SplitLog {
        rows: h.rows,
        skipped: h.skipped,
        oov: h.oov,
        truncated: h.truncated,
        positive_rate,
        bytes: 0,
        seconds: secs,
        from_cache: true,
        ..Default::default()
    }
}

fn finish_cache(dir: &Path, mut want: CacheHeader, log: &SplitLog, slots: usize, dense: usize) -> Result<CacheReader> {
    want.rows = log.rows;
    want.num_slots = slots;
    want.num_dense = dense;
    want.skipped = log.skipped;
    want.oov = log.oov;
    want.truncated = log.truncated;
    write_header(dir, &want)?;
    CacheReader::open(dir)
}

/// Reads (or takes from the cache) every split: fits the encoder on train, encodes the rest.
pub fn prepare(cfg: &DataConfig, policy: CachePolicy) -> Result<Prepared> {
    let mut p = prepare_encoded(cfg, policy)?;
    // Extra embeddings change no encoding (nor any cache): batches add them.
    p.encoder = p.encoder.with_embeddings(&cfg.embeddings)?;
    Ok(p)
}

fn prepare_encoded(cfg: &DataConfig, policy: CachePolicy) -> Result<Prepared> {
    if cfg.format == Format::Synthetic {
        return prepare_world(&cfg.world());
    }
    let sources = split_sources(cfg);
    let Some(cache) = &cfg.cache_dir else {
        let mut it = sources.iter();
        let train_src = it.next().expect("train is always a split");
        let (encoder, train, log) = fit_in_memory(cfg, train_src)?;
        let mut splits = vec![("train", SplitData::Memory(Arc::new(train)), log)];
        for src in it {
            let (d, log) = encode_in_memory(cfg, src, &encoder)?;
            splits.push((src.name, SplitData::Memory(Arc::new(d)), log));
        }
        return Ok(Prepared { encoder, splits });
    };

    // Train: the cache holds the encoder too.
    let train_src = &sources[0];
    let dir = cache_dir_of(cache, train_src);
    let want = want_header(cfg, train_src, String::new())?;
    let start = Instant::now();
    let (encoder, train_cache, train_log) = match usable_cache(&dir, &want, policy)? {
        Some(c) => {
            let enc = Encoder::load(&dir.join("encoder.json"))?;
            if enc.fingerprint() != c.header.encoder_hash {
                bail!("cache {} is stale: its encoder.json does not match its header. Rebuild it with --rebuild-cache", dir.display());
            }
            let log = header_log(&c.header, start.elapsed().as_secs_f64(), f64::NAN);
            (enc, c, log)
        }
        None => {
            let opened = open_bound(cfg, train_src)?;
            let mut fitter = Fitter::new(&opened.ex);
            let (slots, dense) = (fitter.num_slots(), fitter.num_dense());
            let mut w = CacheWriter::create(&dir)?;
            let log = read_encode(cfg, train_src, opened, Encoding::Fit(&mut fitter), |c| w.push(c))?;
            w.finish()?;
            let (encoder, remap): (Encoder, Remap) = fitter.finish();
            CacheReader::rewrite(&dir, slots, dense, log.rows, |r, d| remap.apply(r, d))?;
            encoder.save(&dir.join("encoder.json"))?;
            let mut want = want;
            want.encoder_hash = encoder.fingerprint();
            let mut log = log;
            log.oov += remap.rare;
            log.seconds = start.elapsed().as_secs_f64();
            (encoder, finish_cache(&dir, want, &log, slots, dense)?, log)
        }
    };
    let mut caches = vec![(train_src.name, train_cache, train_log)];
    let fingerprint = encoder.fingerprint();
    let mut built = Vec::new();
    for src in &sources[1..] {
        let dir = cache_dir_of(cache, src);
        let want = want_header(cfg, src, fingerprint.clone())?;
        // valid and test may be the same file: build its cache once
        let policy = if built.contains(&dir) && policy == CachePolicy::RebuildAll { CachePolicy::RebuildStale } else { policy };
        built.push(dir.clone());
        let start = Instant::now();
        let entry = match usable_cache(&dir, &want, policy)? {
            Some(c) => {
                let log = header_log(&c.header, start.elapsed().as_secs_f64(), f64::NAN);
                (src.name, c, log)
            }
            None => {
                let mut w = CacheWriter::create(&dir)?;
                let log = read_encode(cfg, src, open_bound(cfg, src)?, Encoding::Apply(&encoder), |c| w.push(c))?;
                w.finish()?;
                (src.name, finish_cache(&dir, want, &log, encoder.num_slots(), encoder.num_dense())?, log)
            }
        };
        caches.push(entry);
    }
    let mut splits = Vec::new();
    for (name, c, mut log) in caches {
        let data = if cfg.stream && name == "train" {
            SplitData::Stream(c)
        } else {
            let start = Instant::now();
            let d = c.read_all()?;
            if log.from_cache {
                log.seconds = start.elapsed().as_secs_f64();
                log.positive_rate = d.positive_rate();
            }
            SplitData::Memory(Arc::new(d))
        };
        splits.push((name, data, log));
    }
    Ok(Prepared { encoder, splits })
}

/// A held-out split of a synthetic stream, generated into memory, with its Bayes limit.
pub fn world_split(world: &World, stream: u64, rows: usize) -> (SplitData, SplitLog) {
    let start = Instant::now();
    let (data, probs) = world.generate(stream, 0, rows);
    let log = SplitLog {
        rows: rows as u64,
        positive_rate: data.labels.iter().map(|&y| y as f64).sum::<f64>() / rows.max(1) as f64,
        seconds: start.elapsed().as_secs_f64(),
        bayes_logloss: Some(world::logloss(&probs, &data.labels)),
        teacher_entropy: Some(world::mean_entropy(&probs)),
        ..Default::default()
    };
    (SplitData::Memory(Arc::new(data)), log)
}

/// The synthetic world's splits: training generated as it is batched, valid and test (other
/// streams of the same teacher) generated into memory with their Bayes limits.
fn prepare_world(cfg: &WorldConfig) -> Result<Prepared> {
    let world = Arc::new(World::new(cfg)?);
    let encoder = world.encoder();
    let train_log = SplitLog { rows: cfg.train_examples as u64, positive_rate: f64::NAN, ..Default::default() };
    let mut splits = vec![(
        "train",
        SplitData::Generated { world: Arc::clone(&world), stream: world::TRAIN_STREAM, rows: cfg.train_examples },
        train_log,
    )];
    let (valid, log) = world_split(&world, world::VALID_STREAM, cfg.valid_examples);
    splits.push(("valid", valid, log));
    if cfg.test_examples > 0 {
        let (test, log) = world_split(&world, world::TEST_STREAM, cfg.test_examples);
        splits.push(("test", test, log));
    }
    Ok(Prepared { encoder, splits })
}
