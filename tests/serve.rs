//! Scoring in production: `wukong serve` (HTTP) against `predict` (files), every 4xx/413/503
//! path, a flood against a tiny queue, hot reload under load, graceful shutdown, and `predict`
//! on unlabeled files with ids and skipped rows reported in place.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use wukong::config::ExperimentConfig;
use wukong::serve::Scorer;
use wukong::serve::http::{ServeConfig, Server};
use wukong::serve::predict::{OutFormat, PredictOptions, predict_file};
use wukong::train::{RunOptions, train};

/// Clicks depend on user × item parity, the tags and the price, so every input matters.
fn write_data(dir: &Path) {
    let tags = ["a", "b", "c", "d", "e"];
    for (name, n, shift) in [("train", 2000, 0), ("valid", 300, 7), ("test", 200, 13)] {
        let mut text = String::from("id,label,user,item,tags,price\n");
        for i in 0..n {
            let (u, it) = ((i * 7 + shift) % 20, (i * 11 + shift * 3) % 15);
            let t1 = tags[(i + shift) % 5];
            let t2 = tags[(i * 3 + shift) % 5];
            let price = ((i * 13) % 50) as f64 * 1.5;
            let y = ((u + it) % 2 == 0) || (t1 == "a" && price > 60.0);
            text += &format!("r{name}{i},{},{u},{it},{t1}|{t2},{price}\n", y as u8);
        }
        std::fs::write(dir.join(format!("{name}.csv")), text).unwrap();
    }
}

fn config(dir: &Path, model: &str, params: &str, seed: u64) -> ExperimentConfig {
    let text = format!(
        "name = \"serve-{model}\"\n[data]\nformat = \"csv\"\ntrain = \"{0}/train.csv\"\nvalid = \"{0}/valid.csv\"\ntest = \"{0}/test.csv\"\n\
         ignore = [\"id\"]\n\
         [[data.fields]]\nnames = [\"user\", \"item\"]\nkind = \"categorical\"\n\
         [[data.fields]]\nname = \"tags\"\nkind = \"multi_hot\"\nseparator = \"|\"\nmax_len = 3\n\
         [[data.fields]]\nname = \"price\"\nkind = \"numeric\"\ntransform = \"log1p\"\n\
         [model]\nname = \"{model}\"\n{params}\n[train]\nepochs = 6\nbatch_size = 64\nlr = 0.01\nwarmup_steps = 5\nseed = {seed}\n",
        dir.display()
    );
    toml::from_str(&text).unwrap()
}

struct Fixture {
    dir: PathBuf,
    /// (model name, run directory)
    runs: Vec<(String, PathBuf)>,
    /// A second Wukong run (another seed): the reload target.
    other: PathBuf,
}

/// Three trained runs (Wukong and two baselines) shared by every test of this binary.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::workdir("serve");
        write_data(&dir);
        let opts = RunOptions { out_dir: dir.join("runs"), ..Default::default() };
        let mut runs = Vec::new();
        for (model, params) in common::MODELS.iter().filter(|(m, _)| ["wukong", "dlrm", "dcnv2"].contains(m)).take(3) {
            let out = train(&config(&dir, model, params, 1), &opts).unwrap();
            runs.push((model.to_string(), out.run_dir));
        }
        let (_, wukong_params) = common::MODELS[0];
        let other = train(&config(&dir, "wukong", wukong_params, 2), &opts).unwrap().run_dir;
        Fixture { dir, runs, other }
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// (status, Retry-After header, body as JSON or as a string)
async fn request(c: &HttpClient, method: &str, url: String, body: Vec<u8>) -> (u16, Option<String>, Value) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, retry, v)
}

fn post(server: &Server, path: &str, body: Value) -> (u16, Option<String>, Value) {
    rt().block_on(request(&client(), "POST", format!("http://{}{path}", server.addr), serde_json::to_vec(&body).unwrap()))
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let (s, _, v) = rt().block_on(request(&client(), "GET", format!("http://{}{path}", server.addr), Vec::new()));
    (s, v)
}

fn start(run: &Path, cfg: ServeConfig) -> Server {
    Server::start(run.to_path_buf(), "127.0.0.1:0".parse().unwrap(), cfg, burn::tensor::Device::flex()).unwrap()
}

/// `predict` on the test file: (id, score) per row.
fn predicted(run: &Path, file: &Path, unlabeled: bool) -> Vec<(String, f64)> {
    let scorer = Scorer::load(run, &burn::tensor::Device::flex()).unwrap();
    let opts = PredictOptions { unlabeled, keep: vec!["id".into()], format: OutFormat::Csv, batch_rows: 64, part: None, bad_lines: None };
    let mut out = Vec::new();
    let log = predict_file(&scorer, file, &opts, &mut out).unwrap();
    assert_eq!(log.skipped, 0);
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("id,score"));
    lines.map(|l| l.split_once(',').map(|(a, b)| (a.to_string(), b.parse().unwrap())).unwrap()).collect()
}

/// The test file's rows as typed JSON: numbers as numbers, tags as arrays.
fn typed_rows(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("test.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            json!({ "user": c[2].parse::<i64>().unwrap(), "item": c[3], "tags": c[4].split('|').collect::<Vec<_>>(), "price": c[5].parse::<f64>().unwrap() })
        })
        .collect()
}

#[test]
fn served_scores_equal_predict_for_three_models() {
    let f = fixture();
    let typed = typed_rows(&f.dir);
    let textual = wukong::serve::loadtest::json_rows(&config(&f.dir, "wukong", "", 1).data, &[], &f.dir.join("test.csv"), 10_000).unwrap();
    assert_eq!(textual.len(), 200);
    for (model, run) in &f.runs {
        let expected = predicted(run, &f.dir.join("test.csv"), false);
        assert_eq!(expected.len(), 200);
        // predict agrees with the evaluation path (the run's own batching)
        let loaded = wukong::train::checkpoint::load_run(run, &burn::tensor::Device::flex()).unwrap();
        let split = loaded.encode(None).unwrap();
        let logits = loaded.predict_logits(&split, &burn::tensor::Device::flex()).unwrap();
        for ((_, p), z) in expected.iter().zip(&logits) {
            assert!((p - wukong::serve::probability(*z)).abs() < 1e-6, "{model}: predict {p} vs eval path");
        }
        let server = start(run, ServeConfig { max_wait: Duration::from_millis(2), ..Default::default() });
        for rows in [&typed, &textual] {
            // one request of all rows, and single-row requests
            let (status, _, body) = post(&server, "/v1/score", json!({ "rows": rows }));
            assert_eq!(status, 200, "{model}: {body}");
            let scores: Vec<f64> = body["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(scores.len(), 200);
            for (i, (s, (_, p))) in scores.iter().zip(&expected).enumerate() {
                assert!((s - p).abs() < 1e-6, "{model} row {i}: served {s} vs predict {p}");
            }
            for i in [0, 17, 199] {
                let (status, _, body) = post(&server, "/v1/score", json!({ "rows": [rows[i]] }));
                assert_eq!(status, 200);
                assert!((body["scores"][0].as_f64().unwrap() - expected[i].1).abs() < 1e-6);
            }
        }
        // the label and ignored columns are accepted; a missing field is its missing value
        let (status, _, body) = post(&server, "/v1/score", json!({ "rows": [{ "label": 1, "id": "x", "user": 3 }, {}] }));
        assert_eq!(status, 200, "{body}");
        assert!(body["scores"].as_array().unwrap().iter().all(|s| (0.0..=1.0).contains(&s.as_f64().unwrap())));
        server.stop().unwrap();
    }
}

#[test]
fn bad_requests_get_clear_4xx_and_the_server_keeps_answering() {
    let f = fixture();
    let cfg = ServeConfig { max_rows: 50, max_body_bytes: 20_000, ..Default::default() };
    let server = start(&f.runs[0].1, cfg);
    let url = format!("http://{}/v1/score", server.addr);
    let rt = rt();
    let c = client();
    let raw = |body: &[u8]| rt.block_on(request(&c, "POST", url.clone(), body.to_vec()));
    let kind = |v: &Value| v["error"]["kind"].as_str().unwrap_or("").to_string();

    let (s, _, v) = raw(b"{not json");
    assert_eq!((s, kind(&v).as_str()), (400, "bad_json"), "{v}");
    let (s, _, v) = raw(b"{\"rows\": 5}");
    assert_eq!((s, kind(&v).as_str()), (400, "bad_json"), "{v}");
    let (s, _, v) = raw(b"{\"rows\": [], \"extra\": 1}");
    assert_eq!((s, kind(&v).as_str()), (400, "bad_json"), "{v}");
    let (s, _, v) = raw(b"");
    assert_eq!(s, 400, "{v}");
    let (s, _, v) = raw(b"{\"rows\": []}");
    assert_eq!((s, v["scores"].as_array().map(Vec::len)), (200, Some(0)), "{v}");

    let cases = [
        (json!([{ "user": 1 }, { "usr": 1 }]), 1, Some("usr"), "unknown field"),
        (json!([{ "user": { "a": 1 } }]), 0, Some("user"), "object"),
        (json!([{ "item": [1, 2] }]), 0, Some("item"), "only accepted for a multi-hot"),
        (json!([{ "tags": [{ "x": 1 }] }]), 0, Some("tags"), "list items"),
        (json!([{ "tags": ["a|b"] }]), 0, Some("tags"), "separator"),
        (json!([{}, {}, { "price": "cheap" }]), 2, Some("price"), "not a number"),
        (json!([5]), 0, None, "JSON object"),
    ];
    for (rows, row, field, says) in cases {
        let (s, _, v) = post(&server, "/v1/score", json!({ "rows": rows }));
        assert_eq!((s, kind(&v).as_str()), (400, "bad_row"), "{rows}: {v}");
        assert_eq!(v["error"]["row"], json!(row), "{v}");
        assert_eq!(v["error"]["field"].as_str(), field, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{v}");
    }

    // over the limits: 413 (by rows, by declared length, by a body with no length)
    let (s, _, v) = post(&server, "/v1/score", json!({ "rows": vec![json!({}); 51] }));
    assert_eq!((s, kind(&v).as_str()), (413, "too_large"), "{v}");
    let big = format!("{{\"rows\": [{{\"item\": \"{}\"}}]}}", "x".repeat(30_000));
    let (s, _, v) = raw(big.as_bytes());
    assert_eq!((s, kind(&v).as_str()), (413, "too_large"), "{v}");
    let chunked = rt.block_on(async {
        let body = Chunks(big.as_bytes().chunks(4096).map(Bytes::copy_from_slice).collect());
        let req = hyper::Request::post(url.clone()).body(body).unwrap();
        let c: Client<HttpConnector, Chunks> = Client::builder(TokioExecutor::new()).build_http();
        c.request(req).await.map(|r| r.status().as_u16())
    });
    assert_eq!(chunked.unwrap(), 413);

    // the other routes
    assert_eq!(get(&server, "/healthz").0, 200);
    let (s, m) = get(&server, "/v1/model");
    assert_eq!(s, 200);
    assert_eq!(m["model"], "wukong");
    assert_eq!(m["inputs"], json!(["id", "user", "item", "tags", "price"]));
    assert_eq!(m["encoder_fingerprint"].as_str().unwrap().len(), 16);
    assert!(m["metrics"]["test_auc"].is_number(), "{m}");
    let (s, api) = get(&server, "/openapi.json");
    assert_eq!((s, api["openapi"].as_str()), (200, Some("3.0.3")));
    assert!(api["paths"]["/v1/score"]["post"]["responses"]["413"].is_object());
    // request rows are typed for this model: its fields, nothing else
    let row = &api["components"]["schemas"]["Row"];
    assert_eq!(row["additionalProperties"], false);
    assert_eq!(row["properties"]["price"]["type"], "number");
    assert!(row["properties"]["tags"]["oneOf"].as_array().unwrap().iter().any(|t| t["type"] == "array"));
    assert!(row["properties"]["user"].is_object() && row["properties"]["label"].is_object() && row["properties"].get("usr").is_none());
    let (s, v) = get(&server, "/nope");
    assert_eq!((s, kind(&v).as_str()), (404, "not_found"));
    let (s, metrics) = get(&server, "/metrics");
    let text = metrics.as_str().unwrap();
    assert_eq!(s, 200);
    for needle in [
        "wukong_http_requests_total{route=\"/v1/score\",code=\"400\"}",
        "wukong_errors_total{kind=\"too_large\"} 3",
        "wukong_score_latency_seconds_bucket",
        "wukong_batch_rows_bucket",
        "wukong_queue_rows",
    ] {
        assert!(text.contains(needle), "no {needle} in\n{text}");
    }
    // still answering
    let (s, _, v) = post(&server, "/v1/score", json!({ "rows": [{ "user": 1 }] }));
    assert_eq!(s, 200, "{v}");
}

/// A body sent in chunks without a Content-Length (chunked transfer encoding).
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[test]
fn a_flood_against_a_tiny_queue_gets_503s_not_a_crash() {
    let f = fixture();
    // one scoring thread that waits 30 ms for batches to fill, and room for 8 queued rows
    let cfg = ServeConfig { queue_rows: 8, max_batch: 8, max_wait: Duration::from_millis(30), ..Default::default() };
    let server = start(&f.runs[0].1, cfg);
    let url = format!("http://{}/v1/score", server.addr);
    let body = serde_json::to_vec(&json!({ "rows": vec![json!({ "user": 2, "tags": ["a"] }); 4] })).unwrap();
    let rt = rt();
    let c = client();
    let results: Vec<(u16, Option<String>, Value)> = rt.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                tokio::spawn({
                    let (c, url, body) = (c.clone(), url.clone(), body.clone());
                    async move { request(&c, "POST", url, body).await }
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let shed: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(ok + shed.len(), 64, "only 200 and 503 expected: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(ok >= 2 && !shed.is_empty(), "{ok} ok, {} shed", shed.len());
    assert!(shed.iter().all(|r| r.1.as_deref() == Some("1") && r.2["error"]["kind"] == "overloaded"), "{:?}", shed[0]);
    assert_eq!(server.queued_rows(), 0);
    let (s, _, v) = post(&server, "/v1/score", json!({ "rows": [{ "user": 1 }] }));
    assert_eq!(s, 200, "{v}");
    assert_eq!(get(&server, "/healthz").0, 200);
}

#[test]
fn hot_reload_under_load_fails_no_request_and_switches_the_model() {
    let f = fixture();
    let (first, second) = (&f.runs[0].1, &f.other);
    let rows = typed_rows(&f.dir)[..8].to_vec();
    let p1: Vec<f64> = predicted(first, &f.dir.join("test.csv"), false)[..8].iter().map(|x| x.1).collect();
    let p2: Vec<f64> = predicted(second, &f.dir.join("test.csv"), false)[..8].iter().map(|x| x.1).collect();
    assert!(p1.iter().zip(&p2).any(|(a, b)| (a - b).abs() > 1e-4), "the two runs must differ");
    let server = start(first, ServeConfig { max_wait: Duration::from_micros(200), ..Default::default() });
    let url = format!("http://{}/v1/score", server.addr);
    let body = serde_json::to_vec(&json!({ "rows": rows })).unwrap();
    let rt = rt();
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (oks, fails, seen_new) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (c, url, body, stop, oks, fails, seen_new, p1, p2) =
                (c.clone(), url.clone(), body.clone(), stop.clone(), oks.clone(), fails.clone(), seen_new.clone(), p1.clone(), p2.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (s, _, v) = request(&c, "POST", url.clone(), body.clone()).await;
                    let scores: Vec<f64> =
                        v["scores"].as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect()).unwrap_or_default();
                    let is = |p: &[f64]| scores.len() == 8 && scores.iter().zip(p).all(|(a, b)| (a - b).abs() < 1e-6);
                    if s == 200 && (is(&p1) || is(&p2)) {
                        oks.fetch_add(1, Ordering::Relaxed);
                        if is(&p2) {
                            seen_new.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        fails.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = oks.load(Ordering::Relaxed);
    // a broken run is refused; the old model keeps serving
    let (s, _, v) = post(&server, "/admin/reload", json!({ "run": f.dir.join("nope") }));
    assert_eq!((s, v["error"]["kind"].as_str()), (422, Some("reload_failed")), "{v}");
    let (s, _, v) = post(&server, "/admin/reload", json!({ "run": second }));
    assert_eq!((s, v["version"].as_u64()), (200, Some(2)), "{v}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in clients {
            t.await.unwrap();
        }
    });
    assert_eq!(fails.load(Ordering::Relaxed), 0, "failed requests during the reload");
    assert!(before > 0 && seen_new.load(Ordering::Relaxed) > 0, "{before} before, {} on the new model", seen_new.load(Ordering::Relaxed));
    let (_, _, v) = post(&server, "/v1/score", json!({ "rows": rows }));
    assert!((v["scores"][0].as_f64().unwrap() - p2[0]).abs() < 1e-6);
    assert_eq!(get(&server, "/v1/model").1["version"], 2);
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let f = fixture();
    // the request waits 300 ms in the queue for company; shutdown comes meanwhile
    let server = start(&f.runs[0].1, ServeConfig { max_wait: Duration::from_millis(300), ..Default::default() });
    let url = format!("http://{}/v1/score", server.addr);
    let rt = rt();
    let c = client();
    let body = serde_json::to_vec(&json!({ "rows": typed_rows(&f.dir) })).unwrap();
    let pending = rt.spawn(async move { request(&c, "POST", url, body).await });
    let t0 = std::time::Instant::now();
    while server.queued_rows() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the request never arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
    server.stop().unwrap();
    let (s, _, v) = rt.block_on(pending).unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["scores"].as_array().unwrap().len(), 200);
}

#[test]
fn predict_without_labels_with_ids_and_skipped_rows_in_place() {
    let f = fixture();
    let run = &f.runs[0].1;
    let labelled = predicted(run, &f.dir.join("test.csv"), false);
    // the same file without its label column: the same scores, ids passed through
    let text = std::fs::read_to_string(f.dir.join("test.csv")).unwrap();
    let drop_label = |l: &str| {
        let mut c: Vec<&str> = l.split(',').collect();
        c.remove(1);
        c.join(",")
    };
    let unlabeled: String = text.lines().map(|l| drop_label(l) + "\n").collect();
    std::fs::write(f.dir.join("unlabeled.csv"), &unlabeled).unwrap();
    assert_eq!(predicted(run, &f.dir.join("unlabeled.csv"), false), labelled);

    // header-less: --unlabeled with the config's column names
    let scorer = Scorer::load(run, &burn::tensor::Device::flex()).unwrap();
    let opts =
        |format, bad_lines| PredictOptions { unlabeled: false, keep: vec!["id".into()], format, batch_rows: 7, part: None, bad_lines };
    // bad rows: line 4 (row 3) has a non-number price, line 6 (row 5) too few columns
    let mut lines: Vec<String> = unlabeled.lines().map(str::to_string).collect();
    lines[3] = lines[3].rsplit_once(',').map(|(a, _)| format!("{a},expensive")).unwrap();
    lines[5] = "only,three,cols".into();
    std::fs::write(f.dir.join("bad.csv"), lines.join("\n") + "\n").unwrap();
    let err = predict_file(&scorer, &f.dir.join("bad.csv"), &opts(OutFormat::Csv, None), &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("bad.csv:4") && err.contains("price") && err.contains("--bad-lines skip"), "{err}");

    let mut out = Vec::new();
    let log = predict_file(&scorer, &f.dir.join("bad.csv"), &opts(OutFormat::Csv, Some(wukong::data::BadLines::Skip)), &mut out).unwrap();
    assert_eq!((log.rows, log.scored, log.skipped, log.labelled), (200, 198, 2, false));
    let out = String::from_utf8(out).unwrap();
    let rows: Vec<Vec<String>> =
        csv::Reader::from_reader(out.as_bytes()).records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect();
    assert_eq!(out.lines().next(), Some("id,score,error"));
    assert_eq!(rows.len(), 200, "one output row per input row");
    for (i, r) in rows.iter().enumerate() {
        match i {
            2 => assert!(r[1].is_empty() && r[2].contains("bad.csv:4") && r[2].contains("price"), "{r:?}"),
            4 => assert!(r[1].is_empty() && r[2].contains("bad.csv:6") && r[2].contains("columns"), "{r:?}"),
            _ => {
                assert_eq!(r[0], labelled[i].0);
                assert!((r[1].parse::<f64>().unwrap() - labelled[i].1).abs() < 1e-6 && r[2].is_empty(), "{r:?}");
            }
        }
    }
    // JSON lines: the row number and the reason
    let mut out = Vec::new();
    predict_file(&scorer, &f.dir.join("bad.csv"), &opts(OutFormat::Jsonl, Some(wukong::data::BadLines::Skip)), &mut out).unwrap();
    let lines: Vec<Value> = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 200);
    assert_eq!(lines[4]["row"], 5);
    assert!(lines[4]["error"].as_str().unwrap().contains("columns") && lines[4].get("score").is_none());
    assert_eq!(lines[0]["id"], labelled[0].0);
    // an unknown --keep column is an error naming it
    let bad = PredictOptions { keep: vec!["nope".into()], ..opts(OutFormat::Csv, None) };
    let err = predict_file(&scorer, &f.dir.join("unlabeled.csv"), &bad, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn the_fixture_models_learned_something() {
    // scores that vary across rows make the equality checks above meaningful
    for (model, run) in &fixture().runs {
        let result: Value = serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
        assert!(result["test_auc"].as_f64().unwrap() > 0.6, "{model}: {}", result["test_auc"]);
    }
}

#[test]
fn slow_clients_are_timed_out_and_cannot_block_shutdown() {
    use std::io::{Read, Write};
    let f = fixture();
    let cfg = ServeConfig {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        drain_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let server = start(&f.runs[0].1, cfg);
    // headers never finished: the connection is closed after the header timeout
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(3), "closed after {:?}", t.elapsed());
    // a body that stops half-way: 408 after the body timeout
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"rows\": [").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = [0u8; 64];
    let n = s.read(&mut reply).unwrap();
    assert!(reply[..n].starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&reply[..n]));
    // a client stuck mid-body does not hold shutdown beyond the drain timeout
    let mut stuck = std::net::TcpStream::connect(server.addr).unwrap();
    stuck.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    server.stop().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "shutdown took {:?}", t.elapsed());
}

/// `serve --calibrated`: the run's Platt scaling (fitted on its validation split) on every
/// served score, σ(a·z + b) of the raw logit; a run without one is refused at load.
#[test]
fn calibrated_serving_maps_every_score_by_the_runs_platt_scaling() {
    let f = fixture();
    let run = &f.runs[0].1;
    let result: Value = serde_json::from_str(&std::fs::read_to_string(run.join("result.json")).unwrap()).unwrap();
    let (a, b) = (result["calibrated"]["a"].as_f64().unwrap(), result["calibrated"]["b"].as_f64().unwrap());
    let raw = predicted(run, &f.dir.join("test.csv"), false);
    let rows = typed_rows(&f.dir);
    let server = start(run, ServeConfig { calibrated: true, ..Default::default() });
    let (status, _, body) = post(&server, "/v1/score", json!({ "rows": rows }));
    assert_eq!(status, 200, "{body}");
    let served: Vec<f64> = body["scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(served.len(), raw.len());
    for ((_, p), s) in raw.iter().zip(&served) {
        let z = (p / (1.0 - p)).ln();
        let want = 1.0 / (1.0 + (-(a * z + b)).exp());
        assert!((s - want).abs() < 1e-5, "raw {p} → served {s}, expected {want}");
    }
    server.stop().unwrap();
    // a run whose result.json has no calibration (trained before it existed) is refused
    let old = f.dir.join("uncalibrated-run");
    let _ = std::fs::remove_dir_all(&old);
    std::fs::create_dir_all(&old).unwrap();
    for e in std::fs::read_dir(run).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), old.join(e.file_name())).unwrap();
        }
    }
    let mut r = result.clone();
    r.as_object_mut().unwrap().remove("calibrated");
    std::fs::write(old.join("result.json"), r.to_string()).unwrap();
    let err = format!("{:#}", Scorer::load_with(&old, &burn::tensor::Device::flex(), true).err().unwrap());
    assert!(err.contains("has no calibration"), "{err}");
    assert!(Scorer::load(&old, &burn::tensor::Device::flex()).is_ok(), "without --calibrated it serves as before");
    // an invalid calibration (an order-reversing or zero slope, a non-finite or missing value,
    // hand-edited or corrupt) is refused by name, never served
    for bad in [json!({"a": -0.5, "b": 0.1}), json!({"a": 0.0, "b": 0.1}), json!({"a": 1.0, "b": "nan"}), json!({"b": 0.1})] {
        let mut r = result.clone();
        r["calibrated"] = bad.clone();
        std::fs::write(old.join("result.json"), r.to_string()).unwrap();
        let err = format!("{:#}", Scorer::load_with(&old, &burn::tensor::Device::flex(), true).err().unwrap());
        assert!(err.contains("invalid calibration") && err.contains("uncalibrated-run"), "{bad}: {err}");
    }
}
