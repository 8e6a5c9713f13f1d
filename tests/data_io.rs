//! Reader, encoder and config behaviour, including every kind of bad input.

use std::io::Write;
use std::path::{Path, PathBuf};
use wukong::config::ExperimentConfig;
use wukong::data::{BadLines, Encoder, LibfmOptions, read_libfm};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wukong-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn write_gz(path: &Path, text: &str) {
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
}

fn opts(n: Option<usize>, bad: BadLines) -> LibfmOptions {
    LibfmOptions { num_fields: n, bad_lines: bad }
}

#[test]
fn reads_libfm_and_libsvm_labels_plain_and_gzip() {
    let text = "-1 3:1 10:1\r\n1 4:1 11:0.5\r\n\n0 3:1 12:1\n";
    let (p, g) = (tmp("a.libfm"), tmp("a.libfm.gz"));
    write(&p, text);
    write_gz(&g, text);
    for path in [&p, &g] {
        let d = read_libfm(path, &opts(None, BadLines::Error)).unwrap();
        assert_eq!(d.num_fields, 2);
        assert_eq!(d.labels, vec![0.0, 1.0, 0.0]);
        assert_eq!(d.ids, vec![3, 10, 4, 11, 3, 12]);
        assert_eq!(d.values, vec![1.0, 1.0, 1.0, 0.5, 1.0, 1.0]);
    }
}

#[test]
fn malformed_lines_name_file_line_and_field() {
    let p = tmp("bad.libfm");
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
        write(&p, text);
        let err = format!("{:#}", read_libfm(&p, &opts(None, BadLines::Error)).unwrap_err());
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
}

#[test]
fn skip_mode_counts_bad_lines() {
    let p = tmp("skip.libfm");
    write(&p, "1 3:1 10:1\n1 3:x 10:1\nhello\n0 4:1 11:1\n1 5:1\n");
    let d = read_libfm(&p, &opts(Some(2), BadLines::Skip)).unwrap();
    assert_eq!((d.len(), d.skipped), (2, 3));
}

#[test]
fn truncated_gzip_is_an_error_not_silent_loss() {
    let (full, cut) = (tmp("full.gz"), tmp("cut.gz"));
    let text: String = (0..5000).map(|i| format!("1 {}:1 {}:1\n", i % 97, 100 + i % 13)).collect();
    write_gz(&full, &text);
    let bytes = std::fs::read(&full).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", read_libfm(&cut, &opts(None, BadLines::Error)).unwrap_err());
    assert!(err.contains("cut.gz"), "{err}");
    assert!(err.contains("truncated or corrupt"), "{err}");
    let missing = format!("{:#}", read_libfm(&tmp("nope.libfm"), &opts(None, BadLines::Error)).unwrap_err());
    assert!(missing.contains("cannot open") && missing.contains("nope.libfm"), "{missing}");
}

#[test]
fn encoder_fits_on_train_maps_unseen_to_oov_and_round_trips() {
    let p = tmp("enc.libfm");
    write(&p, "1 7:1 100:1\n0 8:1 100:1\n1 7:1 101:1\n");
    let train = read_libfm(&p, &opts(None, BadLines::Error)).unwrap();
    let enc = Encoder::fit(&train, &["user".into(), "item".into()], 1).unwrap();
    assert_eq!(enc.field_sizes(), vec![3, 3]); // OOV + 2 ids each
    assert_eq!(enc.offsets(), vec![0, 3]);
    let (rows, oov) = enc.encode(&train).unwrap();
    assert_eq!(rows, vec![1, 4, 2, 4, 1, 5]);
    assert_eq!(oov, 0);
    // an id unseen in training (and one seen only in another field) maps to the field's OOV row
    write(&p, "1 9:1 7:1\n");
    let test = read_libfm(&p, &opts(None, BadLines::Error)).unwrap();
    assert_eq!(enc.encode(&test).unwrap(), (vec![0, 3], 2));
    // min_count drops rare ids
    let rare = Encoder::fit(&train, &[], 2).unwrap();
    assert_eq!(rare.field_sizes(), vec![2, 2]);
    // save/load gives the same encoding
    let path = tmp("enc.json");
    enc.save(&path).unwrap();
    let back = Encoder::load(&path).unwrap();
    assert_eq!(back.encode(&train).unwrap(), enc.encode(&train).unwrap());
    assert_eq!(back, enc);
}

#[test]
fn configs_parse_and_unknown_keys_are_refused() {
    let cfg = ExperimentConfig::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/frappe_wukong.toml"))).unwrap();
    assert_eq!(cfg.data.num_fields, Some(10));
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/frappe_wukong.toml")).unwrap();
    let typo = text.replace("num_fmb =", "num_fmbs =");
    let err = format!("{:#}", ExperimentConfig::parse(&typo).unwrap_err());
    assert!(err.contains("num_fmbs"), "{err}");
    let bad: String = text
        .lines()
        .map(|l| if l.starts_with("dropout =") { "dropout = 1.5".to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(bad, text);
    let err = format!("{:#}", ExperimentConfig::parse(&bad).unwrap_err());
    assert!(err.contains("dropout"), "{err}");
    // round trip through the resolved config a run directory stores
    assert_eq!(ExperimentConfig::parse(&cfg.to_toml()).unwrap(), cfg);
}
