//! `wukong loadtest`: closed-loop load against a scoring server (ours or any with the same
//! `POST /v1/score` contract): C concurrent clients each send requests of R rows back to back
//! for a fixed time over kept-alive connections (hyper's client). Reports QPS, rows/s, latency
//! percentiles and errors per (R, C).

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::data::DataConfig;
use crate::data::extract::schema_columns;
use crate::data::source::{Cell, Next, Record, cell_key, open_source};

/// Up to `limit` rows of a data file as JSON objects by column name (the schema's input columns;
/// empty cells left out = missing), the shape a client sends to `/v1/score`.
pub fn json_rows(cfg: &DataConfig, libfm_fields: &[String], path: &Path, limit: usize) -> Result<Vec<Value>> {
    let wanted: Vec<String> = schema_columns(cfg, libfm_fields).into_iter().skip(1).map(|(c, _)| c).collect();
    let mut src = open_source(path, cfg)?;
    let at: Vec<(usize, String)> =
        wanted.iter().filter_map(|c| src.columns().iter().position(|x| x == c).map(|i| (i, c.clone()))).collect();
    let (mut rec, mut out) = (Record::default(), Vec::new());
    while out.len() < limit {
        match src.next(&mut rec)? {
            Next::End => break,
            Next::Bad(_) => continue,
            Next::Row => {}
        }
        let mut o = serde_json::Map::new();
        for (i, name) in &at {
            let v = match rec.cells[*i] {
                Cell::Null => continue,
                Cell::Int(k) => Value::from(k),
                Cell::Float(f) => Value::from(f),
                c @ Cell::Text(..) => Value::from(String::from_utf8_lossy(&cell_key(&rec, c)).into_owned()),
            };
            o.insert(name.clone(), v);
        }
        out.push(Value::Object(o));
    }
    anyhow::ensure!(!out.is_empty(), "{}: no rows to send", path.display());
    Ok(out)
}

/// Request bodies of `rows_per_request` rows each, cycling through `rows`.
pub fn bodies(rows: &[Value], rows_per_request: usize, count: usize) -> Vec<Bytes> {
    (0..count)
        .map(|k| {
            let batch: Vec<&Value> = (0..rows_per_request).map(|j| &rows[(k * rows_per_request + j) % rows.len()]).collect();
            Bytes::from(serde_json::to_vec(&serde_json::json!({ "rows": batch })).expect("rows serialize"))
        })
        .collect()
}

/// One (rows per request, concurrency) cell of the table.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub rows_per_request: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    /// Status codes of failed requests (and `io` for transport errors), with counts.
    pub error_kinds: Vec<(String, u64)>,
    pub qps: f64,
    pub rows_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Runs `concurrency` closed-loop clients against `url` (…/v1/score) for `duration` after
/// `warmup`; each answer must be 200 with one score per row to count as a success.
pub async fn run(
    url: &str,
    bodies: &[Bytes],
    rows_per_request: usize,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<LoadResult> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(concurrency.max(1)).build(connector);
    let start = Instant::now();
    let (measure_from, end) = (start + warmup, start + warmup + duration);
    let mut tasks = Vec::new();
    for c in 0..concurrency.max(1) {
        let (client, uri, bodies) = (client.clone(), uri.clone(), bodies.to_vec());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), Vec::<String>::new());
            let mut k = c;
            while Instant::now() < end {
                let body = bodies[k % bodies.len()].clone();
                k += concurrency;
                let t = Instant::now();
                let outcome = send(&client, &uri, body, rows_per_request).await;
                let done = Instant::now();
                if t < measure_from || done > end {
                    continue;
                }
                match outcome {
                    Ok(()) => lat.push((done - t).as_secs_f64() * 1e3),
                    Err(kind) => errors.push(kind),
                }
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errs) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errs.extend(e);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| if lat.is_empty() { f64::NAN } else { lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1] };
    let secs = duration.as_secs_f64();
    let mut kinds: Vec<(String, u64)> = Vec::new();
    for e in errs.iter() {
        match kinds.iter_mut().find(|(k, _)| k == e) {
            Some((_, n)) => *n += 1,
            None => kinds.push((e.clone(), 1)),
        }
    }
    Ok(LoadResult {
        rows_per_request,
        concurrency,
        seconds: secs,
        requests: lat.len() as u64,
        errors: errs.len() as u64,
        error_kinds: kinds,
        qps: lat.len() as f64 / secs,
        rows_per_s: (lat.len() * rows_per_request) as f64 / secs,
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
    })
}

/// One request; `Err` is the failure kind (status code, `io`, or `short` for a wrong score count).
async fn send(client: &Client<HttpConnector, Full<Bytes>>, uri: &hyper::Uri, body: Bytes, rows: usize) -> std::result::Result<(), String> {
    let req = hyper::Request::post(uri.clone())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|_| "request".to_string())?;
    let resp = client.request(req).await.map_err(|_| "io".to_string())?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(|_| "io".to_string())?.to_bytes();
    if !status.is_success() {
        return Err(status.as_u16().to_string());
    }
    // count the scores without building a tree: `"scores":[a,b,...]`
    let text = std::str::from_utf8(&bytes).map_err(|_| "body".to_string())?;
    let list = text
        .split_once("\"scores\"")
        .and_then(|(_, r)| r.split_once('['))
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(l, _)| l)
        .ok_or("body")?;
    let n = if list.trim().is_empty() { 0 } else { list.matches(',').count() + 1 };
    if n != rows {
        return Err("short".into());
    }
    Ok(())
}

/// The markdown table of a sweep.
pub fn table(server: &str, results: &[LoadResult]) -> String {
    let mut s = String::from(
        "| server | rows/request | clients | QPS | rows/s | p50 ms | p90 ms | p99 ms | max ms | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let errs = if r.errors == 0 {
            "0".to_string()
        } else {
            format!("{} ({})", r.errors, r.error_kinds.iter().map(|(k, n)| format!("{k}×{n}")).collect::<Vec<_>>().join(" "))
        };
        s += &format!(
            "| {server} | {} | {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {errs} |\n",
            r.rows_per_request, r.concurrency, r.qps, r.rows_per_s, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms
        );
    }
    s
}
