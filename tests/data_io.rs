//! Readers (libfm, Criteo TSV, CSV/TSV, Parquet, joins), transforms, the encoder (OOV, hashing,
//! min-count, statistics), the split, the binary cache (reuse, staleness, streaming) and every
//! kind of bad input.

use std::io::Write;
use std::path::{Path, PathBuf};

use wukong::config::ExperimentConfig;
use wukong::data::extract::{MISSING, bucket, hash_bytes};
use wukong::data::pipeline::{self, SplitData, SplitSource, encode_in_memory, fit_in_memory, split_part};
use wukong::data::schema::{SplitSpec, Transform};
use wukong::data::{BatchLoader, CachePolicy, DataConfig, EncodedDataset, Encoder};

mod common;

fn dir(tag: &str) -> PathBuf {
    common::workdir(&format!("data-{tag}"))
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn write_gz(path: &Path, text: &str) -> PathBuf {
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
    path.to_path_buf()
}

/// A data config from TOML; `train` (and valid) paths are set by the caller.
fn cfg(toml_text: &str, train: &Path) -> DataConfig {
    let mut c: DataConfig = toml::from_str(&format!("train = \"\"\nvalid = \"\"\n{toml_text}")).unwrap();
    c.train = train.to_path_buf();
    c.valid = Some(train.to_path_buf());
    c.validate().unwrap();
    c
}

fn src(path: &Path) -> SplitSource {
    SplitSource { name: "train", path: path.to_path_buf(), part: None }
}

fn fit(c: &DataConfig) -> (Encoder, EncodedDataset) {
    let (e, d, _) = fit_in_memory(c, &src(&c.train)).unwrap();
    (e, d)
}

fn fit_err(c: &DataConfig) -> String {
    format!("{:#}", fit_in_memory(c, &src(&c.train)).expect_err("must fail"))
}

fn local_row(e: &Encoder, field: usize, key: u64) -> u32 {
    e.offsets()[field] + 1 + e.fields[field].vocab.iter().position(|&k| k == key).expect("key in vocabulary") as u32
}

#[test]
fn libfm_plain_and_gzip_labels_values_and_positional_fields() {
    let d = dir("libfm");
    let text = "-1 3:1 10:1\r\n1 4:1 11:0.5\r\n\n0 3:1 12:1\n";
    for path in [write(&d.join("a.libfm"), text), write_gz(&d.join("a.libfm.gz"), text)] {
        let c = cfg("format = \"libfm\"\nfield_names = [\"user\", \"item\"]", &path);
        let (e, data) = fit(&c);
        assert_eq!(e.field_names(), vec!["user", "item"]);
        assert_eq!(data.labels, vec![0.0, 1.0, 0.0]);
        assert_eq!(e.field_sizes(), vec![3, 4]); // OOV + values, per field
        assert_eq!(data.rows, vec![1, 4, 2, 5, 1, 6]);
        assert_eq!(data.values, vec![1.0, 1.0, 1.0, 0.5, 1.0, 1.0]);
    }
}

#[test]
fn libfm_malformed_lines_name_file_line_and_field() {
    let d = dir("libfm-bad");
    let cases = [
        ("1 3:1 10:1\n1 3:x 10:1\n", "bad.libfm:2: field 0: value \"x\""),
        ("1 3:1 10:1\n1 3:1\n", "bad.libfm:2: expected 2 id:value pairs"),
        ("1 3:1 10:1\n2 3:1 10:1\n", "bad.libfm:2: label"),
        ("1 3:1 10:1\n1 3:1 q:1\n", "bad.libfm:2: field 1: feature id \"q\""),
        ("1 3:1 10:1\n1 3:1 10\n", "bad.libfm:2: field 1: expected id:value"),
        ("1 3:1 10:inf\n", "bad.libfm:1: field 1: value inf is not finite"),
        ("", "no data rows"),
    ];
    for (text, want) in cases {
        let p = write(&d.join("bad.libfm"), text);
        let err = fit_err(&cfg("format = \"libfm\"", &p));
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    // skip mode: counted, the good rows kept
    let p = write(&d.join("skip.libfm"), "1 3:1 10:1\n1 3:x 10:1\nhello\n0 4:1 11:1\n1 5:1\n");
    let (_, data, log) = fit_in_memory(&cfg("format = \"libfm\"\nnum_fields = 2\nbad_lines = \"skip\"", &p), &src(&p)).unwrap();
    assert_eq!((data.len(), log.skipped), (2, 3));
}

#[test]
fn truncated_gzip_and_missing_files_are_errors_not_silent_loss() {
    let d = dir("gz");
    let text: String = (0..5000).map(|i| format!("{}\t{}\tab{}\n", i % 2, i % 7, i % 13)).collect();
    let full = write_gz(&d.join("full.tsv.gz"), &text);
    let bytes = std::fs::read(&full).unwrap();
    let cut = d.join("cut.tsv.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let schema = "format = \"tsv\"\nheader = false\ncolumns = [\"label\", \"n\", \"c\"]\n[[fields]]\nname = \"c\"\nkind = \"categorical\"";
    assert_eq!(fit(&cfg(schema, &full)).1.len(), 5000);
    let err = fit_err(&cfg(schema, &cut));
    assert!(err.contains("cut.tsv.gz") && err.contains("truncated or corrupt"), "{err}");
    let err = fit_err(&cfg(schema, &d.join("nope.tsv")));
    assert!(err.contains("cannot open") && err.contains("nope.tsv"), "{err}");
}

const CRITEO_SCHEMA: &str = r#"
format = "criteo"
[[fields]]
names = ["I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I9", "I10", "I11", "I12", "I13"]
kind = "numeric"
transform = "log1p"
[[fields]]
names = ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9", "C10", "C11", "C12", "C13",
         "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21", "C22", "C23", "C24", "C25", "C26"]
kind = "categorical"
"#;

fn criteo_line(label: u8, ints: &[&str; 13], cats: &[&str; 26]) -> String {
    format!("{label}\t{}\t{}\n", ints.join("\t"), cats.join("\t"))
}

#[test]
fn criteo_tsv_missing_values_and_log_transform() {
    let d = dir("criteo");
    let mut ints = ["1"; 13];
    ints[1] = "-3";
    ints[4] = ""; // missing → 0
    let mut cats = ["68fd1e64"; 26];
    cats[25] = ""; // missing categorical
    let text = criteo_line(1, &ints, &cats) + &criteo_line(0, &["0"; 13], &["a1b2c3d4"; 26]);
    let p = write(&d.join("day.tsv"), &text);
    let (e, data) = fit(&cfg(CRITEO_SCHEMA, &p));
    assert_eq!((e.num_fields(), e.num_dense(), e.num_slots()), (26, 13, 26));
    assert_eq!(data.labels, vec![1.0, 0.0]);
    let ln2 = 2f32.ln();
    assert!((data.dense[0] - ln2).abs() < 1e-6);
    assert!((data.dense[1] + 4f32.ln()).abs() < 1e-6, "sign(x)·ln(1+|x|) for x = -3");
    assert_eq!(data.dense[4], 0.0);
    assert_eq!(data.rows[0], local_row(&e, 0, hash_bytes(b"68fd1e64")));
    assert_eq!(data.rows[25], local_row(&e, 25, MISSING), "an empty categorical is the field's 'missing' value");
    // a wrong column count names the line
    let p = write(&d.join("short.tsv"), &(text.clone() + "1\t2\t3\n"));
    let err = fit_err(&cfg(CRITEO_SCHEMA, &p));
    assert!(err.contains("short.tsv:3: expected 40 columns, found 3"), "{err}");
}

const CSV_SCHEMA: &str = r#"
format = "csv"
label = "click"
ignore = ["comment"]
[[fields]]
name = "city"
kind = "categorical"
[[fields]]
name = "tags"
kind = "multi_hot"
separator = "|"
max_len = 2
[[fields]]
name = "tags_mean"
column = "tags"
kind = "multi_hot"
separator = "|"
max_len = 3
pooling = "mean"
[[fields]]
name = "price"
kind = "numeric"
transform = "standardize"
[[fields]]
name = "age"
kind = "numeric"
transform = "bucketize"
boundaries = [18, 30]
"#;

#[test]
fn csv_with_header_quotes_multi_hot_pooling_standardize_and_bucketize() {
    let d = dir("csv");
    let train = write(
        &d.join("train.csv"),
        "click,city,tags,price,age,comment\n1,\"Paris, FR\",a|b|c,10,17,\"say \"\"hi\"\"\"\n0,Oslo,b,20,30,x\n1,Oslo,,30,45,\n",
    );
    let c = cfg(CSV_SCHEMA, &train);
    let (e, data) = fit(&c);
    assert_eq!(e.field_names(), vec!["city", "tags", "tags_mean", "age"]);
    assert_eq!(e.num_slots(), 1 + 2 + 3 + 1);
    let s = e.num_slots();
    // row 0: "Paris, FR" kept whole; tags a|b|c truncated to 2 slots (sum); mean over 3 slots
    assert_eq!(data.rows[0], local_row(&e, 0, hash_bytes(b"Paris, FR")));
    assert_eq!(data.rows[1..3], [local_row(&e, 1, hash_bytes(b"a")), local_row(&e, 1, hash_bytes(b"b"))]);
    assert_eq!(data.values[1..3], [1.0, 1.0]);
    assert!(data.values[3..6].iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6));
    // row 1: one tag → second sum slot is padding (OOV row, weight 0)
    assert_eq!(data.rows[s + 2], e.offsets()[1]);
    assert_eq!((data.values[s + 1], data.values[s + 2]), (1.0, 0.0));
    assert_eq!(data.values[s + 3..s + 6], [1.0, 0.0, 0.0], "mean of one value is that value");
    // row 2: empty list → the field's 'missing' value
    assert_eq!(data.rows[2 * s + 1], local_row(&e, 1, MISSING));
    // standardize with train statistics: mean 20, sample std 10
    assert_eq!(data.dense, vec![-1.0, 0.0, 1.0]);
    assert_eq!(e.dense[0].shift, 20.0);
    // bucketize: 17 → 0, 30 → 2 (edges are inclusive lower bounds), 45 → 2
    let age = |i: usize| data.rows[i * s + 6];
    assert_eq!(age(0), local_row(&e, 3, 0));
    assert_eq!(age(1), local_row(&e, 3, 2));
    assert_eq!(age(2), age(1));
    // another split uses the train statistics and vocabulary
    let valid = write(&d.join("valid.csv"), "click,city,tags,price,age,comment\n0,Rome,a|z,40,25,\n");
    let (v, log) = encode_in_memory(&c, &src(&valid), &e).unwrap();
    assert_eq!(v.dense, vec![2.0]);
    assert_eq!(v.rows[0], e.offsets()[0], "unseen city → OOV row of its field");
    assert_eq!(v.rows[2], e.offsets()[1], "unseen tag → OOV row of its field");
    assert_eq!(log.oov, 1 + 1 + 1 + 1, "Rome, z twice (two multi-hot fields), age bucket 1");
}

/// RFC 4180: quoted fields hold delimiters, doubled quotes and line breaks; CRLF line ends; the
/// lines after a multi-line record keep their true numbers in errors.
#[test]
fn csv_quoted_line_breaks_crlf_and_true_line_numbers() {
    let d = dir("rfc4180");
    let header = "click,city,tags,price,age,comment\r\n";
    let text = format!("{header}1,\"Par\nis\",x,1,20,\"two\r\nlines, \"\"quoted\"\"\"\r\n0,Oslo,y,2,30,\r\n\r\n1,Oslo,y,3,40,plain\r\n");
    let p = write(&d.join("ok.csv"), &text);
    let (e, data) = fit(&cfg(CSV_SCHEMA, &p));
    assert_eq!(data.len(), 3, "three records over six lines (one blank)");
    assert_eq!(data.rows[0], local_row(&e, 0, hash_bytes(b"Par\nis")), "the line break is part of the value");
    assert_eq!(data.labels, vec![1.0, 0.0, 1.0]);
    // the record after a two-line one starts on line 4
    let bad = format!("{header}1,a,x,1,20,\"line one\nline two\"\n0,b,x,cheap,20,\n");
    let p = write(&d.join("bad.csv"), &bad);
    let err = fit_err(&cfg(CSV_SCHEMA, &p));
    assert!(err.contains("bad.csv:4: column price: value \"cheap\" is not a number"), "{err}");
}

#[test]
fn bucket_conventions() {
    assert_eq!(bucket(0.0, Transform::Log2Bucket, &[]), 0);
    assert_eq!(bucket(1.0, Transform::Log2Bucket, &[]), 1);
    assert_eq!(bucket(7.9, Transform::Log2Bucket, &[]), 3);
    assert_eq!(bucket(8.0, Transform::Log2Bucket, &[]), 4);
    assert_eq!(bucket(-2.0, Transform::Log2Bucket, &[]), -2);
    // Criteo convention: ⌊ln(x)²⌋ above 2, else ⌊x⌋
    assert_eq!(bucket(2.0, Transform::LogSquareBucket, &[]), 2);
    assert_eq!(bucket(100.0, Transform::LogSquareBucket, &[]), 21);
    assert_eq!(bucket(-1.0, Transform::LogSquareBucket, &[]), -1);
    assert_eq!(bucket(5.0, Transform::Bucketize, &[1.0, 5.0, 9.0]), 2);
}

#[test]
fn bad_numbers_labels_and_empty_files_name_file_line_and_column() {
    let d = dir("bad");
    let header = "click,city,tags,price,age,comment\n";
    let good = "1,a,x,1,20,\n";
    let cases = [
        (format!("{header}{good}1,b,x,cheap,20,\n"), "bad.csv:3: column price: value \"cheap\" is not a number"),
        (format!("{header}{good}1,b,x,NaN,20,\n"), "bad.csv:3: column price: value NaN is not finite"),
        (format!("{header}{good}1,b,x,inf,20,\n"), "bad.csv:3: column price: value inf is not finite"),
        (format!("{header}{good}2,b,x,1,20,\n"), "bad.csv:3: column click: label 2 is not 0/1"),
        (format!("{header}{good},b,x,1,20,\n"), "bad.csv:3: column click: the label is empty"),
        (format!("{header}{good}1,b,x,1\n"), "bad.csv:3: expected 6 columns, found 4"),
        (
            format!("{header}{good}1,\"b,x,1,20,\n"),
            "bad.csv:3: expected 6 columns, found 2 (a quoted field holds a line break: an unterminated quote?)",
        ),
        (header.to_string(), "bad.csv: no data rows"),
        (String::new(), "bad.csv: empty file (no header line)"),
    ];
    for (text, want) in &cases {
        let p = write(&d.join("bad.csv"), text);
        let err = fit_err(&cfg(CSV_SCHEMA, &p));
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    // a schema column that the file lacks
    let p = write(&d.join("cols.csv"), "click,city\n1,a\n");
    let err = fit_err(&cfg(CSV_SCHEMA, &p));
    assert!(err.contains("no column \"comment\"") || err.contains("no column \"tags\""), "{err}");
    // skip mode counts every bad row and keeps the rest
    let text: String = std::iter::once(header.to_string())
        .chain(cases[..6].iter().map(|(t, _)| t[header.len() + good.len()..].to_string()))
        .collect::<String>()
        + good;
    let p = write(&d.join("skip.csv"), &text);
    let (_, data, log) = fit_in_memory(&cfg(&format!("bad_lines = \"skip\"\n{CSV_SCHEMA}"), &p), &src(&p)).unwrap();
    assert_eq!((data.len(), log.skipped), (1, 6));
}

#[test]
fn hash_buckets_min_count_and_encoder_round_trip() {
    let d = dir("oov");
    let mut text = String::from("label,u\n");
    for v in ["a", "a", "b", "c", "a", "b"] {
        text += &format!("1,{v}\n");
    }
    let p = write(&d.join("t.csv"), &text);
    let base = "format = \"csv\"\n[[fields]]\nname = \"u\"\nkind = \"categorical\"\n";
    let c = cfg(&format!("min_count = 2\nhash_buckets = 4\n{base}"), &p);
    let (e, data) = fit(&c);
    assert_eq!(e.fields[0].vocab, vec![hash_bytes(b"a"), hash_bytes(b"b")]);
    assert_eq!(e.field_sizes(), vec![1 + 2 + 4]);
    let bucket_c = 3 + (hash_bytes(b"c") % 4) as u32;
    assert_eq!(data.rows, vec![1, 1, 2, bucket_c, 1, 2], "rare 'c' goes to its hash bucket, in training too");
    // unseen values at test time land in the same buckets, never outside the field's rows
    let t = write(&d.join("test.csv"), "label,u\n0,c\n0,zzz\n");
    let (v, _) = encode_in_memory(&c, &src(&t), &e).unwrap();
    assert_eq!(v.rows[0], bucket_c);
    assert!(v.rows[1] >= 3 && v.rows[1] < 7);
    // without buckets they share the OOV row
    let (e1, d1) = fit(&cfg(&format!("min_count = 2\n{base}"), &p));
    assert_eq!(d1.rows, vec![1, 1, 2, 0, 1, 2]);
    // save/load gives the same encoding
    let path = d.join("enc.json");
    e.save(&path).unwrap();
    let back = Encoder::load(&path).unwrap();
    assert_eq!(back, e);
    assert_eq!(encode_in_memory(&c, &src(&t), &back).unwrap().0.rows, v.rows);
    assert_ne!(e.fingerprint(), e1.fingerprint());
}

#[test]
fn joins_attach_side_columns_and_report_missing_keys() {
    let d = dir("join");
    let main = write(&d.join("ratings.csv"), "user,item,rating\n1,10,5\n2,10,1\n1,11,4\n");
    write(&d.join("users.csv"), "user,age\n1,30\n2,40\n");
    write(&d.join("items.tsv"), "item_id\tgenres\n10\tA|B\n11\tC\n");
    let schema = format!(
        r#"format = "csv"
label = "rating"
label_threshold = 4
[[join]]
path = "{0}/users.csv"
on = "user"
[[join]]
path = "{0}/items.tsv"
on = "item"
key = "item_id"
[[fields]]
names = ["user", "age"]
kind = "categorical"
[[fields]]
name = "genres"
kind = "multi_hot"
separator = "|"
max_len = 2
"#,
        d.display()
    );
    let c = cfg(&schema, &main);
    let (e, data) = fit(&c);
    assert_eq!(data.labels, vec![1.0, 0.0, 1.0]);
    let s = e.num_slots();
    assert_eq!(data.rows[1], local_row(&e, 1, hash_bytes(b"30")));
    assert_eq!(data.rows[s + 1], local_row(&e, 1, hash_bytes(b"40")));
    assert_eq!(data.rows[2..4], [local_row(&e, 2, hash_bytes(b"A")), local_row(&e, 2, hash_bytes(b"B"))]);
    let bad = write(&d.join("bad.csv"), "user,item,rating\n1,10,5\n3,10,1\n");
    let mut c2 = c.clone();
    c2.train = bad;
    let err = fit_err(&c2);
    assert!(err.contains("bad.csv:3: column user: key \"3\" not found in") && err.contains("users.csv"), "{err}");
    write(&d.join("users.csv"), "user,age\n1,30\n1,40\n");
    let err = fit_err(&c);
    assert!(err.contains("users.csv:3: key user is not unique"), "{err}");
}

#[test]
fn seeded_split_is_deterministic_disjoint_and_proportional() {
    let spec = SplitSpec { ratios: [8.0, 1.0, 1.0], seed: 7 };
    let parts: Vec<usize> = (0..100_000).map(|i| split_part(&spec, i)).collect();
    assert_eq!(parts, (0..100_000).map(|i| split_part(&spec, i)).collect::<Vec<_>>());
    let share = |k| parts.iter().filter(|&&p| p == k).count() as f64 / 1e5;
    assert!((share(0) - 0.8).abs() < 0.01 && (share(1) - 0.1).abs() < 0.01 && (share(2) - 0.1).abs() < 0.01);
    let other: Vec<usize> = (0..1000).map(|i| split_part(&SplitSpec { seed: 8, ..spec.clone() }, i)).collect();
    assert_ne!(other, parts[..1000]);
    // splitting a file: every row lands in exactly one split
    let d = dir("split");
    let text: String = std::iter::once("label,u\n".to_string()).chain((0..500).map(|i| format!("{},{i}\n", i % 2))).collect();
    let p = write(&d.join("all.csv"), &text);
    let mut c: DataConfig = toml::from_str(&format!(
        "train = \"{}\"\nformat = \"csv\"\nsplit = {{ ratios = [8, 1, 1], seed = 3 }}\n[[fields]]\nname = \"u\"\nkind = \"categorical\"",
        p.display()
    ))
    .unwrap();
    c.validate().unwrap();
    let prepared = pipeline::prepare(&c, CachePolicy::RebuildStale).unwrap();
    let sizes: Vec<usize> = prepared.splits.iter().map(|(_, d, _)| d.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 500);
    assert!(sizes[0] > 350 && sizes[1] > 20 && sizes[2] > 20, "{sizes:?}");
    c.split = None;
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("data.valid is missing"));
}

fn memory(d: &SplitData) -> &EncodedDataset {
    match d {
        SplitData::Memory(m) => m,
        _ => panic!("expected an in-memory split"),
    }
}

#[test]
fn cache_is_reused_refused_when_stale_and_streams_every_row_once() {
    let d = dir("cache");
    let train = d.join("train.tsv");
    wukong::data::synth::write_criteo(&train, 3000, 1, 500).unwrap();
    let valid = d.join("valid.tsv");
    wukong::data::synth::write_criteo(&valid, 500, 2, 500).unwrap();
    let mut c = cfg(CRITEO_SCHEMA, &train);
    c.valid = Some(valid.clone());
    c.cache_dir = Some(d.join("cache"));
    let first = pipeline::prepare(&c, CachePolicy::RebuildStale).unwrap();
    assert!(first.splits.iter().all(|(_, _, l)| !l.from_cache));
    let second = pipeline::prepare(&c, CachePolicy::RebuildStale).unwrap();
    assert!(second.splits.iter().all(|(_, _, l)| l.from_cache));
    assert_eq!(second.encoder, first.encoder);
    for ((_, a, _), (_, b, _)) in first.splits.iter().zip(&second.splits) {
        let (a, b) = (memory(a), memory(b));
        assert_eq!((&a.labels, &a.rows, &a.values, &a.dense), (&b.labels, &b.rows, &b.values, &b.dense));
    }
    // the cache equals the in-memory encoding
    let (enc_mem, train_mem) = fit(&c); // fit_in_memory never touches the cache
    assert_eq!(enc_mem, first.encoder);
    assert_eq!(train_mem.rows, memory(&first.splits[0].1).rows);
    assert_eq!(train_mem.dense, memory(&first.splits[0].1).dense);

    // streaming: every row exactly once per epoch, in batches, with memory's content
    let mut s = c.clone();
    s.stream = true;
    s.chunk_rows = 700;
    s.shuffle_chunks = 2;
    let streamed = pipeline::prepare(&s, CachePolicy::RebuildStale).unwrap();
    let SplitData::Stream(reader) = &streamed.splits[0].1 else { panic!("train should stream") };
    let loader = BatchLoader::from_split(SplitData::Stream(reader.clone()), streamed.encoder.total_rows(), 256, 700, 2);
    let mut seen: Vec<(u32, u32)> = Vec::new();
    for b in loader.epoch(Some(5)) {
        let b = b.unwrap();
        let slots = b.inverse.len() / b.size;
        for i in 0..b.size {
            seen.push((b.unique_rows[b.inverse[i * slots] as usize] as u32, b.unique_rows[b.inverse[i * slots + 1] as usize] as u32));
        }
    }
    let s_ = train_mem.num_slots;
    let mut want: Vec<(u32, u32)> = (0..train_mem.len()).map(|i| (train_mem.rows[i * s_], train_mem.rows[i * s_ + 1])).collect();
    assert_ne!(seen, want, "the streamed epoch is shuffled");
    seen.sort();
    want.sort();
    assert_eq!(seen, want);

    // stale: the source changed
    std::fs::write(
        &valid,
        std::fs::read_to_string(&valid).unwrap()
            + "1\t\t\t\t\t\t\t\t\t\t\t\t\t\ta\tb\tc\td\te\tf\tg\th\ti\tj\tk\tl\tm\tn\to\tp\tq\tr\ts\tt\tu\tv\tw\tx\ty\tz\n",
    )
    .unwrap();
    let err = format!("{:#}", pipeline::prepare(&c, CachePolicy::RefuseStale).err().expect("--no-rebuild-cache refuses a stale cache"));
    assert!(err.contains("is stale: source changed") && err.contains("--rebuild-cache") && err.contains("valid.tsv"), "{err}");
    // by default a stale cache is rebuilt (only that one)
    let auto = pipeline::prepare(&c, CachePolicy::RebuildStale).unwrap();
    assert!(auto.splits[0].2.from_cache && !auto.splits[1].2.from_cache, "train reused, valid rebuilt");
    assert_eq!(auto.splits[1].1.len(), 501);
    // stale: the schema changed
    let mut c2 = c.clone();
    c2.min_count = 3;
    let err = format!("{:#}", pipeline::prepare(&c2, CachePolicy::RefuseStale).err().expect("stale cache must be refused"));
    assert!(err.contains("the data schema changed"), "{err}");
    // rebuilding replaces it
    let rebuilt = pipeline::prepare(&c2, CachePolicy::RebuildAll).unwrap();
    assert!(rebuilt.splits.iter().all(|(_, _, l)| !l.from_cache));
    assert_eq!(rebuilt.splits[1].1.len(), 501);
    assert!(pipeline::prepare(&c2, CachePolicy::RebuildStale).unwrap().splits.iter().all(|(_, _, l)| l.from_cache));
}

#[test]
fn parquet_from_shared_data_with_joins_and_flags() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/movielens100k"));
    if !root.exists() {
        eprintln!("skipped: {} is absent (the shared data directory is not mounted)", root.display());
        return;
    }
    let cfgfile = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/movielens100k_wukong.toml"));
    let mut c = ExperimentConfig::load(cfgfile).unwrap().data;
    c.train = root.join("MovieLens100k_data.parquet.brotli");
    for j in &mut c.join {
        j.path = root.join(j.path.file_name().unwrap());
    }
    let prepared = pipeline::prepare(&c, CachePolicy::RebuildStale).unwrap();
    let rows: Vec<usize> = prepared.splits.iter().map(|(_, d, _)| d.len()).collect();
    assert_eq!(rows.iter().sum::<usize>(), 100_000);
    let positives: f64 = prepared.splits.iter().map(|(_, d, _)| memory(d).labels.iter().map(|&y| y as f64).sum::<f64>()).sum();
    assert_eq!(positives, 55_375.0, "rating ≥ 4 (the data README's count)");
    let e = &prepared.encoder;
    assert_eq!(e.field_names(), vec!["user_id", "movie_id", "gender", "occupation", "zip_code", "age", "genres"]);
    assert_eq!(e.fields[6].vocab.len(), 19, "19 genres");
    assert_eq!(e.fields[2].vocab.len(), 2);
    // Toy Story (movie 1) is Animation|Children's|Comedy: 3 of 6 mean-pooled slots carry 1/3
    let train = memory(&prepared.splits[0].1);
    let s = e.num_slots();
    let toy = e.offsets()[1] + 1 + e.fields[1].vocab.iter().position(|&k| k == hash_bytes(b"1")).unwrap() as u32;
    let i = (0..train.len()).find(|&i| train.rows[i * s + 1] == toy).unwrap();
    let w = &train.values[i * s + 6..i * s + 12];
    assert_eq!(w.iter().filter(|&&v| (v - 1.0 / 3.0).abs() < 1e-6).count(), 3, "{w:?}");
}

#[test]
fn every_shipped_config_parses_and_unknown_keys_are_refused() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs"));
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue; // configs/scale: sweeps, checked by tests/scale.rs
        }
        let cfg = ExperimentConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(ExperimentConfig::parse(&cfg.to_toml()).unwrap(), cfg, "{} round trip", path.display());
        n += 1;
    }
    assert!(n >= 4);
    let text = std::fs::read_to_string(dir.join("frappe_wukong.toml")).unwrap();
    let typo = text.replace("num_fmb =", "num_fmbs =");
    let err = format!("{:#}", ExperimentConfig::parse(&typo).unwrap_err());
    assert!(err.contains("num_fmbs"), "{err}");
    let bad: String = text
        .lines()
        .map(|l| if l.starts_with("dropout =") { "dropout = 1.5".to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(bad, text);
    assert!(format!("{:#}", ExperimentConfig::parse(&bad).unwrap_err()).contains("dropout"));
    let text = std::fs::read_to_string(dir.join("criteo_wukong.toml")).unwrap();
    let err = format!("{:#}", ExperimentConfig::parse(&text.replace("transform = \"log1p\"", "transform = \"log3\"")).unwrap_err());
    assert!(err.contains("log3"), "{err}");
}

/// Writes a small parquet file (snappy) with a required int label, a nullable string and a
/// nullable double, through the parquet crate's column writers.
fn write_parquet(path: &Path, labels: &[i64], cities: &[Option<&str>], prices: &[Option<f64>]) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message t { REQUIRED INT64 label; OPTIONAL BYTE_ARRAY city (UTF8); OPTIONAL DOUBLE price; }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let levels = |present: Vec<bool>| present.into_iter().map(i16::from).collect::<Vec<_>>();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(labels, None, None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let vals: Vec<ByteArray> = cities.iter().flatten().map(|c| ByteArray::from(*c)).collect();
    col.typed::<ByteArrayType>().write_batch(&vals, Some(&levels(cities.iter().map(Option::is_some).collect())), None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let vals: Vec<f64> = prices.iter().flatten().copied().collect();
    col.typed::<DoubleType>().write_batch(&vals, Some(&levels(prices.iter().map(Option::is_some).collect())), None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_reader_types_nulls_and_the_same_keys_as_text() {
    let d = dir("parquet");
    let p = d.join("t.parquet");
    write_parquet(&p, &[1, 0, 1, -1], &[Some("Oslo"), None, Some("5"), Some("Oslo")], &[Some(2.0), None, Some(4.0), Some(f64::NAN)]);
    let schema = "format = \"parquet\"\n[[fields]]\nname = \"city\"\nkind = \"categorical\"\n[[fields]]\nname = \"price\"\nkind = \"numeric\"\nmissing = -1.0\n";
    // the NaN in row 4 is bad input: an error naming the row and column, or a counted skip
    let err = fit_err(&cfg(schema, &p));
    assert!(err.contains("t.parquet: row 4: column price: value NaN is not finite"), "{err}");
    let c = cfg(&format!("bad_lines = \"skip\"\n{schema}"), &p);
    let (e, data, log) = fit_in_memory(&c, &src(&p)).unwrap();
    assert_eq!((data.len(), log.skipped), (3, 1));
    assert_eq!(data.labels, vec![1.0, 0.0, 1.0]);
    assert_eq!(data.dense, vec![2.0, -1.0, 4.0], "a null number takes the `missing` value");
    assert_eq!(data.rows, vec![local_row(&e, 0, hash_bytes(b"Oslo")), local_row(&e, 0, MISSING), local_row(&e, 0, hash_bytes(b"5"))]);
    // the text "5" in a CSV maps to the same row as in parquet (keys are the value's text)
    let csv = write(&d.join("t.csv"), "label,city,price\n1,5,1\n");
    let (v, _) = encode_in_memory(
        &cfg(
            "format = \"csv\"\n[[fields]]\nname = \"city\"\nkind = \"categorical\"\n[[fields]]\nname = \"price\"\nkind = \"numeric\"\n",
            &csv,
        ),
        &src(&csv),
        &e,
    )
    .unwrap();
    assert_eq!(v.rows[0], data.rows[2]);
    // not a parquet file
    let bad = write(&d.join("bad.parquet"), "label,city\n1,a\n");
    assert!(fit_err(&cfg(schema, &bad)).contains("bad.parquet: not a readable parquet file"));
}

/// A zstd-compressed parquet file whose label column holds strings (`"<=50K"` / `">50K"`, as in
/// the Adult census data) and one categorical column.
fn write_string_label_parquet(path: &Path, incomes: &[&str], jobs: &[&str]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type("message t { REQUIRED BYTE_ARRAY income (UTF8); REQUIRED BYTE_ARRAY job (UTF8); }")
            .unwrap(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(
        file,
        schema,
        Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::ZSTD(Default::default())).build()),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    for values in [incomes, jobs] {
        let mut col = rg.next_column().unwrap().unwrap();
        let v: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(*s)).collect();
        col.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn string_labels_map_through_positive_and_unmapped_ones_are_listed() {
    let d = dir("string-labels");
    let p = d.join("adult.parquet");
    write_string_label_parquet(&p, &["<=50K", ">50K", " >50K", "<=50K"], &["a", "b", "b", "c"]);
    let schema = "format = \"parquet\"\nlabel = \"income\"\n[[fields]]\nname = \"job\"\nkind = \"categorical\"\n";
    // no mapping: the error names the column and lists the values it holds
    let err = format!("{:#}", fit_in_memory(&cfg(schema, &p), &src(&p)).unwrap_err());
    assert!(err.contains("adult.parquet: row 1: column income") && err.contains("data.positive"), "{err}");
    assert!(err.contains("\"<=50K\"") && err.contains("\">50K\""), "the distinct values are listed: {err}");
    // positive = [...] maps them (surrounding spaces ignored)
    let mapped = format!("positive = [\">50K\"]\n{schema}");
    let (_, data, _) = fit_in_memory(&cfg(&mapped, &p), &src(&p)).unwrap();
    assert_eq!(data.labels, vec![0.0, 1.0, 1.0, 0.0]);
    // with negative = [...] too, an unknown value is an error naming it
    write_string_label_parquet(&p, &["<=50K", ">50K", "unknown"], &["a", "b", "c"]);
    let strict = format!("positive = [\">50K\"]\nnegative = [\"<=50K\"]\n{schema}");
    let err = format!("{:#}", fit_in_memory(&cfg(&strict, &p), &src(&p)).unwrap_err());
    assert!(err.contains("row 3") && err.contains("\"unknown\" is in neither data.positive nor data.negative"), "{err}");
    // conflicting settings are refused where the config is read
    let bad: DataConfig =
        toml::from_str(&format!("train = \"x\"\nvalid = \"x\"\npositive = [\"a\"]\nnegative = [\"a\"]\n{schema}")).unwrap();
    assert!(bad.validate().unwrap_err().to_string().contains("both list \"a\""));
}

/// Two files of the same name in different folders get different caches; a changed source is
/// rebuilt without being asked.
#[test]
fn same_named_files_in_two_folders_get_two_caches() {
    let d = dir("cache-keys");
    let (a, b) = (d.join("a"), d.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write(&a.join("train.libsvm"), "1 1:1 5:1\n0 2:1 6:1\n1 1:1 6:1\n");
    write(&b.join("train.libsvm"), "0 1:1 5:1\n1 2:1 6:1\n0 3:1 7:1\n1 3:1 5:1\n");
    let mk = |folder: &Path| {
        let mut c = cfg("format = \"libfm\"\n", &folder.join("train.libsvm"));
        c.cache_dir = Some(d.join("cache"));
        c
    };
    let first = pipeline::prepare(&mk(&a), CachePolicy::RefuseStale).unwrap();
    let second = pipeline::prepare(&mk(&b), CachePolicy::RefuseStale).expect("b's file must not meet a's cache");
    assert_eq!((first.splits[0].1.len(), second.splits[0].1.len()), (3, 4));
    assert!(!second.splits[0].2.from_cache);
    assert!(pipeline::prepare(&mk(&a), CachePolicy::RefuseStale).unwrap().splits[0].2.from_cache, "a's cache is still there");
    let dirs = std::fs::read_dir(d.join("cache")).unwrap().count();
    assert_eq!(dirs, 2, "one cache per source file");
    // a changed source: rebuilt by default
    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&a.join("train.libsvm"), "1 1:1 5:1\n0 2:1 6:1\n1 1:1 6:1\n0 2:1 5:1\n1 3:1 5:1\n");
    let again = pipeline::prepare(&mk(&a), CachePolicy::RebuildStale).unwrap();
    assert_eq!(again.splits[0].1.len(), 5);
    assert!(!again.splits[0].2.from_cache);
}
