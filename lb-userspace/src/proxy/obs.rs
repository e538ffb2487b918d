//! The proxy's own instruments, updated as things happen: requests, durations, upstream
//! errors, retries, connections, TLS handshakes, and the access log's entries. A router's label
//! handles are resolved once, when the routing table is built ([`Http::route`]), so a request
//! only increments atomics: no label strings are built, hashed or allocated per request. The
//! Prometheus renderer ([`crate::observe::metrics`]) registers them; nothing here renders.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{body::Frame, Request, Response};
use prometheus::{
    core::Collector, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts,
};

use crate::{
    observe::access_log::{AccessLog, Entry, RequestInfo},
    proxy::{Body, BoxError},
};

/// Request durations: 1 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Status classes, the `code_class` label: `1xx` … `5xx`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub(crate) fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// One router on one entry point: its pre-resolved handles, and the names the access log needs.
pub struct RouteStats {
    pub router: Arc<str>,
    pub service: Arc<str>,
    pub(crate) classes: [IntCounter; 5],
    pub(crate) duration: Histogram,
    pub(crate) connect_errors: IntCounter,
    pub(crate) timeouts: IntCounter,
    pub(crate) retries: IntCounter,
}

impl RouteStats {
    /// Requests answered so far, by status class (`1xx` … `5xx`).
    pub fn by_class(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.classes[i].get())
    }
}

/// A router's handles per entry point, built with the routing table.
#[derive(Default)]
pub struct RouteObs {
    by_entrypoint: HashMap<String, Arc<RouteStats>>,
}

impl RouteObs {
    pub fn get(&self, entrypoint: &str) -> Option<&Arc<RouteStats>> {
        self.by_entrypoint.get(entrypoint)
    }
}

/// The proxy's metrics and its access log. One per [`crate::proxy::Proxy`]; the agent registers
/// its families with [`Metrics::new`].
pub struct Http {
    requests: IntCounterVec,
    duration: HistogramVec,
    connect_errors: IntCounterVec,
    timeouts: IntCounterVec,
    retries: IntCounterVec,
    open_connections: IntGaugeVec,
    idle_connections: IntGaugeVec,
    connections: IntCounterVec,
    handshakes: IntCounterVec,
    /// 1 while a checked upstream passes its service's active checks, 0 while it fails them.
    server_up: IntGaugeVec,
    /// Every (entry point, router, service) handed out, to reuse handles across rebuilds.
    routes: Mutex<HashMap<(String, String, String), Arc<RouteStats>>>,
    /// Requests no router took (404, 431, ACME answers), per entry point.
    unrouted: RwLock<HashMap<String, Arc<RouteStats>>>,
    access_log: arc_swap::ArcSwapOption<AccessLog>,
    /// Query parameters the configured middlewares read credentials from (an API key's
    /// `query`), lowercased: redacted in the access log besides the names that look secret.
    secret_queries: arc_swap::ArcSwap<Vec<String>>,
    /// Expiry of the configured certificate files (ACME's are read at scrape time).
    cert_files: Mutex<Vec<(String, f64)>>,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric())
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_metric())
}

impl Default for Http {
    fn default() -> Self {
        Http {
            requests: counter_vec(
                "lb_http_requests_total",
                "HTTP requests answered, by entry point, router, service and status class",
                &["entrypoint", "router", "service", "code_class"],
            ),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "lb_http_request_duration_seconds",
                    "Time from a request's arrival to its response headers",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["entrypoint", "router", "service"],
            )
            .unwrap_or_else(|_| unreachable_metric()),
            connect_errors: counter_vec(
                "lb_http_upstream_connect_errors_total",
                "Attempts whose connection to the upstream could not be made",
                &["service"],
            ),
            timeouts: counter_vec(
                "lb_http_upstream_timeouts_total",
                "Attempts the upstream did not answer within the request timeout",
                &["service"],
            ),
            retries: counter_vec(
                "lb_http_retries_total",
                "Requests sent again to another upstream after a failed attempt",
                &["service"],
            ),
            open_connections: gauge_vec(
                "lb_http_open_connections",
                "Client connections open on an entry point",
                &["entrypoint"],
            ),
            idle_connections: gauge_vec(
                "lb_http_idle_connections",
                "HTTP/1 keep-alive connections waiting for their next request, parked without \
                 request buffers (nginx's \"waiting\")",
                &["entrypoint"],
            ),
            connections: counter_vec(
                "lb_http_connections_total",
                "Client connections accepted on an entry point",
                &["entrypoint"],
            ),
            handshakes: counter_vec(
                "lb_tls_handshakes_total",
                "TLS handshakes on an entry point, by result (ok, error)",
                &["entrypoint", "result"],
            ),
            server_up: gauge_vec(
                "lb_http_server_up",
                "1 while an upstream passes its service's active health checks, 0 while it fails them",
                &["service", "server"],
            ),
            routes: Mutex::new(HashMap::new()),
            unrouted: RwLock::new(HashMap::new()),
            access_log: arc_swap::ArcSwapOption::empty(),
            secret_queries: arc_swap::ArcSwap::from_pointee(Vec::new()),
            cert_files: Mutex::new(Vec::new()),
        }
    }
}

/// Connection bookkeeping (open, idle): decrements the gauge when dropped.
pub struct ConnectionGuard(IntGauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An entry point's connection and handshake handles, resolved when it starts listening.
#[derive(Clone)]
pub struct EntryPointObs {
    open: IntGauge,
    idle: IntGauge,
    accepted: IntCounter,
    handshake_ok: IntCounter,
    handshake_error: IntCounter,
}

impl EntryPointObs {
    /// A connection was accepted; it counts as open until the guard drops.
    pub fn connection(&self) -> ConnectionGuard {
        self.accepted.inc();
        self.open.inc();
        ConnectionGuard(self.open.clone())
    }

    /// A connection was parked idle; it counts as idle until the guard drops.
    pub fn parked(&self) -> ConnectionGuard {
        self.idle.inc();
        ConnectionGuard(self.idle.clone())
    }

    /// Connections parked idle now.
    pub fn idle(&self) -> i64 {
        self.idle.get()
    }

    pub fn handshake(&self, ok: bool) {
        match ok {
            true => self.handshake_ok.inc(),
            false => self.handshake_error.inc(),
        }
    }
}

impl Http {
    /// The certificate files in use and when each expires (notAfter, seconds since the epoch).
    pub fn certificate_files(&self) -> Vec<(String, f64)> {
        self.cert_files
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Its series, for a registry to render.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.connect_errors.clone()),
            Box::new(self.timeouts.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.open_connections.clone()),
            Box::new(self.idle_connections.clone()),
            Box::new(self.connections.clone()),
            Box::new(self.handshakes.clone()),
            Box::new(self.server_up.clone()),
        ]
    }

    /// The gauge of `server`'s active checks in `service`.
    pub fn server_up(&self, service: &str, server: std::net::SocketAddr) -> prometheus::IntGauge {
        let g = self
            .server_up
            .with_label_values(&[service, &server.to_string()]);
        // Up until a check says otherwise, as the pools see it.
        g.set(1);
        g
    }

    /// Drops the series of an upstream no longer checked.
    pub fn forget_server(&self, service: &str, server: std::net::SocketAddr) {
        let _ = self
            .server_up
            .remove_label_values(&[service, &server.to_string()]);
    }

    /// The handles of `router` (to `service`) on `entrypoint`: created once, reused by every
    /// later table build.
    fn route_stats(&self, entrypoint: &str, router: &str, service: &str) -> Arc<RouteStats> {
        let key = (
            entrypoint.to_string(),
            router.to_string(),
            service.to_string(),
        );
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .entry(key)
            .or_insert_with(|| {
                Arc::new(RouteStats {
                    router: router.into(),
                    service: service.into(),
                    classes: CLASSES.map(|c| {
                        self.requests
                            .with_label_values(&[entrypoint, router, service, c])
                    }),
                    duration: self
                        .duration
                        .with_label_values(&[entrypoint, router, service]),
                    connect_errors: self.connect_errors.with_label_values(&[service]),
                    timeouts: self.timeouts.with_label_values(&[service]),
                    retries: self.retries.with_label_values(&[service]),
                })
            })
            .clone()
    }

    /// A router's handles on each of `entrypoints` (called when the routing table is built).
    pub fn route<'a>(
        &self,
        router: &str,
        service: &str,
        entrypoints: impl IntoIterator<Item = &'a str>,
    ) -> RouteObs {
        RouteObs {
            by_entrypoint: entrypoints
                .into_iter()
                .map(|ep| (ep.to_string(), self.route_stats(ep, router, service)))
                .collect(),
        }
    }

    /// Connection and handshake handles of an entry point.
    pub fn entrypoint(&self, entrypoint: &str) -> EntryPointObs {
        EntryPointObs {
            open: self.open_connections.with_label_values(&[entrypoint]),
            idle: self.idle_connections.with_label_values(&[entrypoint]),
            accepted: self.connections.with_label_values(&[entrypoint]),
            handshake_ok: self.handshakes.with_label_values(&[entrypoint, "ok"]),
            handshake_error: self.handshakes.with_label_values(&[entrypoint, "error"]),
        }
    }

    pub(crate) fn unrouted(&self, entrypoint: &str) -> Arc<RouteStats> {
        if let Some(s) = self
            .unrouted
            .read()
            .ok()
            .and_then(|m| m.get(entrypoint).cloned())
        {
            return s;
        }
        let s = self.route_stats(entrypoint, "", "");
        if let Ok(mut m) = self.unrouted.write() {
            m.insert(entrypoint.to_string(), s.clone());
        }
        s
    }

    /// Requests answered per router (all entry points), by status class.
    pub fn router_totals(&self) -> BTreeMap<String, [u64; 5]> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<String, [u64; 5]> = BTreeMap::new();
        for ((_, router, _), s) in routes.iter() {
            let t = out.entry(router.clone()).or_default();
            for (i, n) in s.by_class().into_iter().enumerate() {
                t[i] += n;
            }
        }
        out
    }

    /// Starts (or, with `None`, stops) access logging.
    pub fn set_access_log(&self, log: Option<Arc<AccessLog>>) {
        self.access_log.store(log);
    }

    /// The credential-carrying query names of the middlewares now configured.
    pub fn set_secret_queries(&self, names: impl IntoIterator<Item = String>) {
        let mut names: Vec<String> = names.into_iter().map(|n| n.to_ascii_lowercase()).collect();
        names.sort();
        names.dedup();
        self.secret_queries.store(Arc::new(names));
    }

    pub fn access_log(&self) -> Option<Arc<AccessLog>> {
        self.access_log.load_full()
    }

    /// Reads the expiry of the configured certificate files (after a (re)load).
    pub fn set_certificate_files(&self, specs: &[crate::model::l7::CertSpec]) {
        let list = specs
            .iter()
            .filter_map(|s| {
                let pem = std::fs::read(&s.cert_file).ok()?;
                let der = {
                    use rustls_pki_types::pem::PemObject as _;
                    rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                        .next()?
                        .ok()?
                };
                Some((s.cert_file.display().to_string(), not_after(der.as_ref())?))
            })
            .collect();
        *self.cert_files.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }

    /// The start of a request: when, and (only with an access log) what it asked for. Gives
    /// the request an `X-Request-Id` when it has none, so the log and the upstream agree.
    pub fn start<B>(&self, entrypoint: &str, client: IpAddr, req: &mut Request<B>) -> Trace {
        let request = self.access_log.load().as_ref().map(|_| {
            if !req.headers().contains_key(crate::proxy::X_REQUEST_ID) {
                req.headers_mut()
                    .insert(crate::proxy::X_REQUEST_ID, crate::proxy::new_request_id());
            }
            Box::new(RequestInfo::of(
                entrypoint,
                client,
                req,
                &self.secret_queries.load(),
            ))
        });
        Trace {
            started: crate::clock::now(),
            route: None,
            upstream: None,
            attempts: 0,
            upstream_time: Duration::ZERO,
            request,
        }
    }

    /// The response is ready: counts it, and hands the access log an entry that is written
    /// when the body has been sent (or the client went away).
    pub fn finish(&self, entrypoint: &str, trace: Trace, resp: Response<Body>) -> Response<Body> {
        let ttfb = trace.started.elapsed();
        let status = resp.status().as_u16();
        let stats = match &trace.route {
            Some(s) => s.clone(),
            None => self.unrouted(entrypoint),
        };
        stats.classes[class_index(status)].inc();
        stats.duration.observe(ttfb.as_secs_f64());
        let (Some(request), Some(log)) = (trace.request, self.access_log.load_full()) else {
            return resp;
        };
        if !log.wants(status) {
            return resp;
        }
        let entry = Entry {
            request: *request,
            status,
            router: trace.route.as_ref().map(|r| r.router.clone()),
            service: trace.route.as_ref().map(|r| r.service.clone()),
            upstream: trace.upstream,
            attempts: trace.attempts,
            upstream_time: trace.upstream_time,
            ttfb,
            bytes: 0,
            duration: Duration::ZERO,
            completed: false,
        };
        let (parts, body) = resp.into_parts();
        let logged = Logged {
            inner: body,
            started: trace.started,
            entry: Some(entry),
            log,
        };
        Response::from_parts(parts, logged.boxed())
    }
}

/// One request's way through the proxy, filled as it goes (router, upstream attempts).
pub struct Trace {
    started: Instant,
    pub route: Option<Arc<RouteStats>>,
    upstream: Option<SocketAddr>,
    attempts: u32,
    upstream_time: Duration,
    request: Option<Box<RequestInfo>>,
}

impl Trace {
    /// One attempt on `upstream` ended (answered or not) after `took`.
    pub fn attempt(&mut self, upstream: SocketAddr, took: Duration) {
        self.upstream = Some(upstream);
        self.attempts += 1;
        self.upstream_time += took;
    }

    /// The attempt failed: no connection (`connect`), or no answer in time (`timed_out`).
    pub fn upstream_failed(&self, connect: bool, timed_out: bool) {
        if let Some(r) = &self.route {
            if connect {
                r.connect_errors.inc();
            }
            if timed_out {
                r.timeouts.inc();
            }
        }
    }

    /// The request is sent again to another upstream.
    pub fn retried(&self) {
        if let Some(r) = &self.route {
            r.retries.inc();
        }
    }
}

/// A response body that counts what it sends and logs the request when it ends or is dropped.
struct Logged {
    inner: Body,
    started: Instant,
    entry: Option<Entry>,
    log: Arc<AccessLog>,
}

impl Logged {
    fn emit(&mut self, completed: bool) {
        if let Some(mut e) = self.entry.take() {
            e.duration = self.started.elapsed();
            e.completed = completed;
            self.log.send(e);
        }
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(e)) = (frame.data_ref(), self.entry.as_mut()) {
                    e.bytes += d.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.emit(true),
            std::task::Poll::Ready(Some(Err(_))) => self.emit(false),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A body that was complete without being polled to its end (empty, or the client
        // stopped reading after the last byte) still counts as sent.
        let done = hyper::body::Body::is_end_stream(&self.inner);
        self.emit(done);
    }
}

/// Metric options are static strings checked by the tests; a failure here is a programming error
/// caught by `cargo test`, never something input can cause.
#[track_caller]
fn unreachable_metric<T>() -> T {
    panic!("static metric definition rejected by the prometheus crate")
}

/// A certificate's notAfter, in seconds since the epoch.
pub fn not_after(der: &[u8]) -> Option<f64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() as f64)
}
