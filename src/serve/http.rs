//! `wukong serve`: a run's model over HTTP (axum on tokio).
//!
//! - `POST /v1/score` `{"rows": [{field: value, ...}, ...]}` → `{"scores": [...]}`.
//! - `GET /healthz`, `GET /v1/model`, `GET /metrics` (Prometheus text), `GET /openapi.json`.
//! - `POST /admin/reload` `{"run": DIR}` (or SIGHUP: the current directory again).
//!
//! Requests are parsed and their rows extracted on the async threads (a bad row is a 400 naming
//! it before anything is queued), then queued; scoring threads coalesce queued requests into one
//! forward pass of up to `max_batch` rows, waiting at most `max_wait` after the oldest arrived.
//! The queue is bounded in rows: a request that does not fit gets 503 with `Retry-After`, so
//! overload costs neither unbounded memory nor unbounded latency. A reload loads and checks the
//! new run off the request path, then swaps it in atomically: queued requests keep the model
//! they were extracted for, new ones get the new one, none fails. Shutdown (SIGTERM, Ctrl-C)
//! stops accepting, lets in-flight requests finish, then stops the scoring threads.

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use burn::tensor::Device;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::{Scorer, probability};
use crate::data::EncodedDataset;

/// Limits and batching of a server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Rows per forward pass (requests are coalesced up to this).
    pub max_batch: usize,
    /// How long the oldest queued request may wait for others to join its batch. 0 (the
    /// default) batches opportunistically: an idle scoring thread takes whatever is queued at
    /// once, and requests arriving during a forward pass form the next batch — no added
    /// latency when idle, full batches under load.
    pub max_wait: Duration,
    /// Scoring threads (each runs whole forward passes).
    pub workers: usize,
    /// Rows that may wait in the queue; beyond it requests get 503.
    pub queue_rows: usize,
    /// Rows per request; beyond it 413.
    pub max_rows: usize,
    /// Request body bytes; beyond it 413.
    pub max_body_bytes: usize,
    /// The `Retry-After` seconds of a 503.
    pub retry_after_s: u32,
    /// A connection must send its request headers within this (hyper closes it otherwise).
    pub header_timeout: Duration,
    /// … and its request body within this (408 otherwise).
    pub body_timeout: Duration,
    /// On shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
    /// Serve calibrated probabilities (the run's Platt scaling, also on reloads).
    pub calibrated: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            max_wait: Duration::ZERO,
            workers: 1,
            queue_rows: 16_384,
            max_rows: 4096,
            max_body_bytes: 8 << 20,
            retry_after_s: 1,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            calibrated: false,
        }
    }
}

/// The loaded model and what `/v1/model` says about it.
struct Loaded {
    scorer: Arc<Scorer>,
    dir: PathBuf,
    version: u64,
    loaded_at: u64,
}

/// One request waiting to be scored.
struct Job {
    scorer: Arc<Scorer>,
    data: EncodedDataset,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Vec<f64>, String>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    rows: usize,
    closed: bool,
}

struct Metrics {
    registry: Registry,
    requests: Family<Vec<(&'static str, String)>, Counter>,
    errors: Family<Vec<(&'static str, &'static str)>, Counter>,
    rows: Counter,
    latency: Histogram,
    batch_rows: Histogram,
    queue_rows: Gauge,
    reloads: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("wukong");
        let m = Self {
            requests: Family::default(),
            errors: Family::default(),
            rows: Counter::default(),
            latency: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            queue_rows: Gauge::default(),
            reloads: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("http_requests", "HTTP requests by route and status code", m.requests.clone());
        registry.register("errors", "Failed requests by kind", m.errors.clone());
        registry.register("scored_rows", "Rows scored", m.rows.clone());
        registry.register("score_latency_seconds", "POST /v1/score latency, arrival to response", m.latency.clone());
        registry.register("batch_rows", "Rows per forward pass", m.batch_rows.clone());
        registry.register("queue_rows", "Rows waiting to be scored", m.queue_rows.clone());
        registry.register("reloads", "Successful model reloads", m.reloads.clone());
        Self { registry, ..m }
    }
}

struct App {
    cfg: ServeConfig,
    device: Device,
    model: RwLock<Arc<Loaded>>,
    queue: Mutex<Queue>,
    ready: Condvar,
    metrics: Metrics,
    reload_lock: tokio::sync::Mutex<()>,
    versions: AtomicU64,
}

/// A running server (tests and `loadtest` start one in-process).
pub struct Server {
    pub addr: SocketAddr,
    app: Arc<App>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Server {
    /// Loads `run` and serves it on `addr` (port 0 = any free one) from a runtime of its own.
    pub fn start(run: PathBuf, addr: SocketAddr, cfg: ServeConfig, device: Device) -> Result<Self> {
        let app = App::new(run, cfg, device)?;
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let served = Arc::clone(&app);
        let handle = std::thread::Builder::new().name("http".into()).spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                serve_until(listener, served, async {
                    let _ = rx.await;
                })
                .await
            })
        })?;
        Ok(Self { addr, app, shutdown: Some(tx), handle: Some(handle) })
    }

    /// Graceful stop: in-flight requests finish first.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }

    /// Rows waiting in the queue now.
    pub fn queued_rows(&self) -> usize {
        self.app.queue.lock().map(|q| q.rows).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// `wukong serve`: serves until SIGTERM/Ctrl-C; SIGHUP reloads the current run directory.
pub fn serve_forever(run: PathBuf, addr: SocketAddr, cfg: ServeConfig, device: Device, runtime_threads: usize) -> Result<()> {
    let app = App::new(run, cfg, device)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(runtime_threads.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("serving {} on http://{}", app.model.read().unwrap().dir.display(), listener.local_addr()?);
        let hup_app = Arc::clone(&app);
        tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                let dir = hup_app.model.read().unwrap().dir.clone();
                match hup_app.reload(dir).await {
                    Ok(v) => eprintln!("SIGHUP: reloaded (version {v})"),
                    Err(e) => eprintln!("SIGHUP: reload failed, still serving the previous model: {e:#}"),
                }
            }
        });
        serve_until(listener, app, async {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term => {},
            }
            eprintln!("shutting down: finishing in-flight requests");
        })
        .await
    })
}

async fn serve_until(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let workers: Vec<_> = (0..app.cfg.workers.max(1))
        .map(|i| {
            let a = Arc::clone(&app);
            std::thread::Builder::new().name(format!("score-{i}")).spawn(move || a.work())
        })
        .collect::<std::io::Result<_>>()?;
    let router = Router::new()
        .route("/v1/score", post(score))
        .route("/healthz", get(healthz))
        .route("/v1/model", get(model_info))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/admin/reload", post(reload))
        .fallback(not_found)
        .with_state(Arc::clone(&app));
    let served = accept_loop(listener, router, signal, &app.cfg).await;
    app.queue.lock().unwrap().closed = true;
    app.ready.notify_all();
    for w in workers {
        let _ = w.join();
    }
    served.context("the HTTP server failed")
}

/// Serves connections (hyper's HTTP/1.1 with a header-read timeout, so a client that never
/// finishes its headers cannot hold a connection forever) until `signal`; then stops accepting
/// and lets open connections finish their requests, for at most `drain_timeout`.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    cfg: &ServeConfig,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // out of file descriptors and the like: back off instead of spinning
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new()).header_read_timeout(cfg.header_timeout);
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut signal => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(cfg.drain_timeout) => {
            tracing::warn!("connections still open after {:?}; exiting anyway", cfg.drain_timeout);
        }
    }
    Ok(())
}

impl App {
    fn new(run: PathBuf, cfg: ServeConfig, device: Device) -> Result<Arc<Self>> {
        let scorer = Scorer::load_with(&run, &device, cfg.calibrated)?;
        let loaded = Loaded { scorer: Arc::new(scorer), dir: run, version: 1, loaded_at: unix_now() };
        Ok(Arc::new(Self {
            cfg,
            device,
            model: RwLock::new(Arc::new(loaded)),
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            metrics: Metrics::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            versions: AtomicU64::new(1),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.model.read().unwrap())
    }

    /// Loads and checks `dir` off the async threads, then swaps it in; one reload at a time.
    async fn reload(self: &Arc<Self>, dir: PathBuf) -> Result<u64> {
        let _one = self.reload_lock.lock().await;
        let device = self.device.clone();
        let (d, calibrated) = (dir.clone(), self.cfg.calibrated);
        let scorer = tokio::task::spawn_blocking(move || Scorer::load_with(&d, &device, calibrated))
            .await
            .context("the loading thread failed")??;
        let version = self.versions.fetch_add(1, Ordering::SeqCst) + 1;
        let loaded = Loaded { scorer: Arc::new(scorer), dir, version, loaded_at: unix_now() };
        *self.model.write().unwrap() = Arc::new(loaded);
        self.metrics.reloads.inc();
        Ok(version)
    }

    /// Queues a job unless the queue is full (then `false`).
    fn enqueue(&self, job: Job) -> bool {
        let mut q = self.queue.lock().unwrap();
        let n = job.data.len();
        if q.closed || (q.rows > 0 && q.rows + n > self.cfg.queue_rows) {
            return false;
        }
        q.rows += n;
        q.jobs.push_back(job);
        self.metrics.queue_rows.set(q.rows as i64);
        drop(q);
        self.ready.notify_one();
        true
    }

    /// A scoring thread: takes a batch of jobs, one forward pass, replies to each.
    fn work(&self) {
        while let Some(jobs) = self.next_batch() {
            let scorer = Arc::clone(&jobs[0].scorer);
            let mut data = EncodedDataset::new(jobs[0].data.num_slots, jobs[0].data.num_dense);
            for j in &jobs {
                data.append(&j.data);
            }
            self.metrics.batch_rows.observe(data.len() as f64);
            // a panic in a forward pass must fail these requests, not kill the thread
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scorer.logits(&data)));
            match result {
                Ok(Ok(logits)) => {
                    let mut at = 0;
                    for j in jobs {
                        let n = j.data.len();
                        let _ = j.reply.send(Ok(logits[at..at + n].iter().map(|&z| probability(z)).collect()));
                        at += n;
                    }
                }
                Ok(Err(e)) => jobs.into_iter().for_each(|j| drop(j.reply.send(Err(format!("{e:#}"))))),
                Err(_) => jobs.into_iter().for_each(|j| drop(j.reply.send(Err("the forward pass panicked".into())))),
            }
        }
    }

    /// Waits for work, then up to `max_wait` after the oldest job for the batch to fill; takes
    /// jobs (of the oldest one's model) up to `max_batch` rows. `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut q = self.queue.lock().unwrap();
        loop {
            if let Some(first) = q.jobs.front() {
                let deadline = first.enqueued + self.cfg.max_wait;
                let now = Instant::now();
                if q.rows >= self.cfg.max_batch || now >= deadline || q.closed {
                    break;
                }
                q = self.ready.wait_timeout(q, deadline - now).unwrap().0;
            } else if q.closed {
                return None;
            } else {
                q = self.ready.wait(q).unwrap();
            }
        }
        let model = Arc::clone(&q.jobs[0].scorer);
        let (mut jobs, mut rows) = (Vec::new(), 0);
        while let Some(j) = q.jobs.front() {
            let same = Arc::ptr_eq(&j.scorer, &model);
            if !same || (rows > 0 && rows + j.data.len() > self.cfg.max_batch) {
                break;
            }
            rows += j.data.len();
            jobs.push(q.jobs.pop_front().unwrap());
        }
        q.rows -= rows;
        self.metrics.queue_rows.set(q.rows as i64);
        if !q.jobs.is_empty() {
            self.ready.notify_one(); // more work for another thread
        }
        Some(jobs)
    }

    fn count(&self, route: &'static str, code: StatusCode) {
        self.metrics.requests.get_or_create(&vec![("route", route.to_string()), ("code", code.as_u16().to_string())]).inc();
    }

    fn error(&self, route: &'static str, code: StatusCode, kind: &'static str, message: String, extra: Value) -> Response {
        self.count(route, code);
        self.metrics.errors.get_or_create(&vec![("kind", kind)]).inc();
        let mut body = json!({ "error": { "kind": kind, "message": message } });
        if let (Value::Object(e), Value::Object(x)) = (&mut body["error"], extra) {
            e.extend(x);
        }
        let mut r = (code, axum::Json(body)).into_response();
        if code == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.cfg.retry_after_s));
        }
        r
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    rows: Vec<Value>,
}

async fn score(State(app): State<Arc<App>>, req: Request) -> Response {
    const ROUTE: &str = "/v1/score";
    let start = Instant::now();
    let limit = app.cfg.max_body_bytes;
    let too_large = |what: String| app.error(ROUTE, StatusCode::PAYLOAD_TOO_LARGE, "too_large", what, json!({}));
    if let Some(n) = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && n > limit
    {
        return too_large(format!("the body has {n} bytes; the limit is {limit}"));
    }
    let read = tokio::time::timeout(app.cfg.body_timeout, axum::body::to_bytes(req.into_body(), limit)).await;
    let Ok(read) = read else {
        let msg = format!("the body did not arrive within {:?}", app.cfg.body_timeout);
        return app.error(ROUTE, StatusCode::REQUEST_TIMEOUT, "timeout", msg, json!({}));
    };
    let body = match read {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return too_large(format!("the body is over the limit of {limit} bytes")),
        Err(e) => return app.error(ROUTE, StatusCode::BAD_REQUEST, "bad_body", format!("cannot read the body: {e}"), json!({})),
    };
    let parsed: ScoreRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("the body is not a score request ({e}); expected {{\"rows\": [{{\"field\": value, ...}}, ...]}}");
            return app.error(ROUTE, StatusCode::BAD_REQUEST, "bad_json", msg, json!({}));
        }
    };
    let n = parsed.rows.len();
    if n > app.cfg.max_rows {
        return too_large(format!("{n} rows; the limit is {} per request", app.cfg.max_rows));
    }
    let loaded = app.current();
    let scorer = Arc::clone(&loaded.scorer);
    let mut chunk = scorer.new_chunk();
    if let Err(e) = scorer.extract_json(&parsed.rows, &mut chunk) {
        let extra = json!({ "row": e.row, "field": e.field });
        return app.error(ROUTE, StatusCode::BAD_REQUEST, "bad_row", e.to_string(), extra);
    }
    let data = scorer.encode(&chunk);
    let scores = if n == 0 {
        Vec::new()
    } else {
        let (tx, rx) = oneshot::channel();
        let job = Job { scorer, data, enqueued: Instant::now(), reply: tx };
        if !app.enqueue(job) {
            return app.error(
                ROUTE,
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the scoring queue is full; retry later".into(),
                json!({}),
            );
        }
        match rx.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return app.error(ROUTE, StatusCode::INTERNAL_SERVER_ERROR, "internal", e, json!({})),
            Err(_) => {
                return app.error(ROUTE, StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the server is shutting down".into(), json!({}));
            }
        }
    };
    app.metrics.rows.inc_by(n as u64);
    app.metrics.latency.observe(start.elapsed().as_secs_f64());
    app.count(ROUTE, StatusCode::OK);
    let mut r = axum::Json(json!({ "scores": scores, "model_version": loaded.version })).into_response();
    r.headers_mut().insert("x-model-version", HeaderValue::from(loaded.version));
    r
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        src = s.source();
    }
    false
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    app.count("/healthz", StatusCode::OK);
    axum::Json(json!({ "status": "ok", "model_version": app.current().version })).into_response()
}

async fn model_info(State(app): State<Arc<App>>) -> Response {
    app.count("/v1/model", StatusCode::OK);
    let l = app.current();
    let run = &l.scorer.run;
    axum::Json(json!({
        "model": run.config.model.name(),
        "run": l.dir,
        "version": l.version,
        "loaded_at_unix": l.loaded_at,
        "inputs": l.scorer.input_names(),
        "label": run.config.data.label,
        "encoder_fingerprint": l.scorer.encoder_fingerprint,
        "encoder": run.encoder.describe(),
        "config": run.config,
        "metrics": l.scorer.result,
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.count("/metrics", StatusCode::OK);
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &app.metrics.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

async fn openapi(State(app): State<Arc<App>>) -> Response {
    app.count("/openapi.json", StatusCode::OK);
    axum::Json(openapi_document(&app.cfg, &app.current().scorer)).into_response()
}

async fn reload(State(app): State<Arc<App>>, body: axum::body::Bytes) -> Response {
    const ROUTE: &str = "/admin/reload";
    let dir = if body.iter().all(u8::is_ascii_whitespace) {
        app.current().dir.clone()
    } else {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ReloadRequest {
            run: PathBuf,
        }
        match serde_json::from_slice::<ReloadRequest>(&body) {
            Ok(r) => r.run,
            Err(e) => return app.error(ROUTE, StatusCode::BAD_REQUEST, "bad_json", format!("expected {{\"run\": DIR}} ({e})"), json!({})),
        }
    };
    match app.reload(dir.clone()).await {
        Ok(version) => {
            app.count(ROUTE, StatusCode::OK);
            axum::Json(json!({ "status": "reloaded", "run": dir, "version": version })).into_response()
        }
        Err(e) => app.error(
            ROUTE,
            StatusCode::UNPROCESSABLE_ENTITY,
            "reload_failed",
            format!("{e:#}; still serving the previous model"),
            json!({}),
        ),
    }
}

async fn not_found(State(app): State<Arc<App>>, req: Request<Body>) -> Response {
    let msg = format!("no route {} {} (see /openapi.json)", req.method(), req.uri().path());
    app.error("other", StatusCode::NOT_FOUND, "not_found", msg, json!({}))
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The JSON schema of a request row for the served model: one property per input column, typed
/// by its kind (numbers for numeric and flag columns; strings, numbers or booleans for
/// categorical values; also arrays for multi-hot ones); other names are refused.
fn row_schema(scorer: &Scorer) -> Value {
    use crate::data::schema::FieldKind;
    let data = &scorer.run.config.data;
    let scalar = json!({ "nullable": true, "oneOf": [ { "type": "string" }, { "type": "number" }, { "type": "boolean" } ] });
    let number = json!({ "type": "number", "nullable": true });
    // list items must not contain the field's separator
    let list = |sep: &str| {
        let item =
            json!({ "type": "string", "pattern": format!("^[^{}]*$", sep.replace('\\', "\\\\").replace(']', "\\]").replace('^', "\\^")) });
        json!({ "nullable": true, "oneOf": [ { "type": "string" }, { "type": "number" }, { "type": "boolean" },
            { "type": "array", "items": { "oneOf": [ item, { "type": "number" } ] } } ] })
    };
    let mut props = serde_json::Map::new();
    for name in scorer.input_names() {
        props.insert(name, scalar.clone());
    }
    for spec in &data.fields {
        for (_, col) in spec.named_columns() {
            match spec.kind {
                Some(FieldKind::Numeric) => drop(props.insert(col.clone(), number.clone())),
                Some(FieldKind::Flags) => spec.columns.iter().for_each(|c| drop(props.insert(c.clone(), number.clone()))),
                Some(FieldKind::MultiHot) => drop(props.insert(col.clone(), list(spec.separator.as_deref().unwrap_or(",")))),
                _ => {}
            }
        }
    }
    let mut label = scalar.clone();
    label["description"] = json!("the label: accepted and unused");
    props.insert(data.label.clone(), label);
    json!({ "type": "object", "additionalProperties": false, "properties": props,
            "description": "Field values by name, as in the training data; absent or null = missing" })
}

/// The OpenAPI 3.0 document of the API (request rows typed for the served model).
pub fn openapi_document(cfg: &ServeConfig, scorer: &Scorer) -> Value {
    let err = json!({ "$ref": "#/components/schemas/Error" });
    let err_resp = |d: &str| json!({ "description": d, "content": { "application/json": { "schema": err } } });
    json!({
        "openapi": "3.0.3",
        "info": { "title": "wukong serve", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Click probabilities from a trained run (Wukong or a baseline), with the run's saved encoder." },
        "paths": {
            "/v1/score": { "post": {
                "summary": "Score rows",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ScoreRequest" } } } },
                "responses": {
                    "200": { "description": "One probability per row, in order",
                             "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ScoreResponse" } } } },
                    "400": err_resp("Malformed JSON, or a row that cannot be scored (the error names the row and field)"),
                    "413": err_resp(&format!("Body over {} bytes or over {} rows", cfg.max_body_bytes, cfg.max_rows)),
                    "503": err_resp("The scoring queue is full (see Retry-After), or the server is shutting down")
                }
            }},
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "ok",
                "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/v1/model": { "get": { "summary": "The served model: name, inputs, config, metrics, encoder fingerprint",
                "responses": { "200": { "description": "model", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "OpenMetrics text",
                "content": { "application/openmetrics-text": { "schema": { "type": "string" } } } } } } },
            "/admin/reload": { "post": {
                "summary": "Load a run directory (default: the current one), check it, swap it in",
                "requestBody": { "required": false, "content": { "application/json": { "schema": {
                    "type": "object", "additionalProperties": false, "required": ["run"], "properties": { "run": { "type": "string" } } } } } },
                "responses": {
                    "200": { "description": "reloaded", "content": { "application/json": { "schema": { "type": "object" } } } },
                    "400": err_resp("Malformed request"),
                    "422": err_resp("The run cannot be loaded; the previous model keeps serving")
                }
            }}
        },
        "components": { "schemas": {
            "ScoreRequest": { "type": "object", "additionalProperties": false, "required": ["rows"], "properties": {
                "rows": { "type": "array", "maxItems": cfg.max_rows, "items": { "$ref": "#/components/schemas/Row" } } } },
            "Row": row_schema(scorer),
            "ScoreResponse": { "type": "object", "required": ["scores"], "properties": {
                "scores": { "type": "array", "items": { "type": "number", "minimum": 0, "maximum": 1 } },
                "model_version": { "type": "integer" } } },
            "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["kind", "message"],
                "properties": { "kind": { "type": "string" }, "message": { "type": "string" },
                                "row": { "type": "integer" }, "field": { "type": "string", "nullable": true } } } } }
        }}
    })
}
