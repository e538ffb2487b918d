//! Prometheus metrics for both tiers and the control plane, served as `/metrics` in the
//! Prometheus text format (0.0.4).
//!
//! Two kinds of series:
//! - **Collected at scrape time** from state that already exists: the L4 counters in the per-CPU
//!   maps (summed over CPUs by the dataplane), connection tracking, Maglev rebuilds, provider
//!   status, apply statistics, health verdicts, certificate expiry. Nothing on the packet path
//!   or in the control loop pays for them; a scrape builds them from a [`Snapshot`].
//! - **Updated as things happen** in the L7 proxy ([`Http`]): requests, durations, upstream
//!   errors, retries, connections, TLS handshakes. A router's label handles are resolved once,
//!   when the routing table is built ([`Http::route`]), so a request only increments atomics:
//!   no label strings are built, hashed or allocated per request.
//!
//! Label sets are bounded by configuration (VIPs, backends, entry points, routers, services,
//! providers) — never by anything a client sends.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{body::Frame, Request, Response};
use lb_common::Reason;
use prometheus::{
    core::Collector, proto::MetricFamily, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{
    access_log::{AccessLog, Entry, RequestInfo},
    balancer::{BackendMode, VipView},
    control::{ApplyStats, Control},
    health,
    proxy::{Body, BoxError},
    registry::ProviderStatus,
};

/// Request durations: 1 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Change-to-apply latency: 100 µs to 10 s.
const APPLY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Status classes, the `code_class` label: `1xx` … `5xx`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

// ------------------------------------------------------------------ the control loop's part

/// What the control loop records as it applies (registered by [`Metrics::new`]).
#[derive(Clone)]
pub struct ControlObs {
    /// From the oldest change of a batch to the maps being written.
    pub change_to_apply: Histogram,
}

impl Default for ControlObs {
    fn default() -> Self {
        let opts = HistogramOpts::new(
            "lb_config_change_to_apply_seconds",
            "Time from a change (provider event, API call, health verdict) to its map writes",
        )
        .buckets(APPLY_BUCKETS.to_vec());
        ControlObs {
            change_to_apply: Histogram::with_opts(opts).unwrap_or_else(|_| unreachable_metric()),
        }
    }
}

/// Metric options are static strings checked by the tests; a failure here is a programming error
/// caught by `cargo test`, never something input can cause.
#[track_caller]
fn unreachable_metric<T>() -> T {
    panic!("static metric definition rejected by the prometheus crate")
}

// ------------------------------------------------------------------ L7

/// One router on one entry point: its pre-resolved handles, and the names the access log needs.
pub struct RouteStats {
    pub router: Arc<str>,
    pub service: Arc<str>,
    classes: [IntCounter; 5],
    duration: Histogram,
    connect_errors: IntCounter,
    timeouts: IntCounter,
    retries: IntCounter,
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
    /// Every (entry point, router, service) handed out, to reuse handles across rebuilds.
    routes: Mutex<HashMap<(String, String, String), Arc<RouteStats>>>,
    /// Requests no router took (404, 431, ACME answers), per entry point.
    unrouted: RwLock<HashMap<String, Arc<RouteStats>>>,
    access_log: arc_swap::ArcSwapOption<AccessLog>,
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
            routes: Mutex::new(HashMap::new()),
            unrouted: RwLock::new(HashMap::new()),
            access_log: arc_swap::ArcSwapOption::empty(),
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

    fn unrouted(&self, entrypoint: &str) -> Arc<RouteStats> {
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

    pub fn access_log(&self) -> Option<Arc<AccessLog>> {
        self.access_log.load_full()
    }

    /// Reads the expiry of the configured certificate files (after a (re)load).
    pub fn set_certificate_files(&self, specs: &[crate::proxy::tls::CertSpec]) {
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
            Box::new(RequestInfo::of(entrypoint, client, req))
        });
        Trace {
            started: Instant::now(),
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

/// A certificate's notAfter, in seconds since the epoch.
fn not_after(der: &[u8]) -> Option<f64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp() as f64)
}

// ------------------------------------------------------------------ the registry and scrapes

/// Everything a scrape reads from the control state, taken under its lock in one go.
pub struct Snapshot {
    pub vips: Vec<VipView>,
    pub reasons: Vec<(Reason, u64)>,
    pub tracked_flows: usize,
    pub flow_capacity: u32,
    pub rebuilds: BTreeMap<String, u64>,
    pub providers: BTreeMap<String, ProviderStatus>,
    pub apply: ApplyStats,
    /// Active health verdicts: (VIP, backend, up).
    pub health: Vec<(String, String, bool)>,
    /// ACME certificates: (name, notAfter).
    pub acme_certificates: Vec<(String, f64)>,
}

impl Snapshot {
    /// Reads the maps (through the dataplane) and the control state. Blocking: map reads are
    /// syscalls; call it off the async workers.
    pub fn take(c: &mut Control, health: &health::Table) -> Result<Snapshot> {
        let vips = c.balancer.list()?;
        let rebuilds = c.balancer.rebuilds().clone();
        let flow_capacity = c.balancer.dataplane().limits().max_flows;
        let dp = c.balancer.dataplane();
        let reasons = dp.reason_counters()?;
        let tracked_flows = dp.flow_count();
        let health = health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|((vip, key), v)| (vip.clone(), key.to_string(), v.up))
            .collect();
        let acme_certificates = c
            .proxy
            .as_ref()
            .map(|p| {
                p.acme_store()
                    .issued()
                    .iter()
                    .filter_map(|(name, key)| Some((name.clone(), not_after(key.cert.first()?)?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Snapshot {
            vips,
            reasons,
            tracked_flows,
            flow_capacity,
            rebuilds,
            providers: c.registry.status(),
            apply: c.stats.clone(),
            health,
            acme_certificates,
        })
    }
}

/// What a verdict did with the packet: the `action` label of `lb_xdp_verdicts_total`.
fn action(r: Reason) -> &'static str {
    match r {
        Reason::PassNotIp
        | Reason::PassNotL4
        | Reason::PassTruncated
        | Reason::PassNotVip
        | Reason::PassFragment
        | Reason::PassLocal
        | Reason::PassNoNeigh
        | Reason::PassTtl => "pass",
        Reason::TxDsr | Reason::TxNat | Reason::TxIpip => "tx",
        Reason::RedirectNat => "redirect",
        // The reply path and ICMP steering forward like the forward path (sent on, rewritten).
        Reason::NatReply | Reason::IcmpToBackend => "forward",
        Reason::DropNoBackend
        | Reason::DropBadMaps
        | Reason::DropNoRoute
        | Reason::DropBadBackend => "drop",
    }
}

fn mode_name(m: BackendMode) -> &'static str {
    match m {
        BackendMode::Active => "active",
        BackendMode::Draining => "draining",
        BackendMode::Down => "down",
    }
}

/// Families built for one scrape from plain values.
#[derive(Default)]
struct Scrape {
    families: Vec<MetricFamily>,
}

impl Scrape {
    fn counter<'a>(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        rows: impl IntoIterator<Item = (Vec<&'a str>, u64)>,
    ) -> Result<()> {
        let v = IntCounterVec::new(Opts::new(name, help), labels)?;
        for (values, n) in rows {
            v.get_metric_with_label_values(&values)?.inc_by(n);
        }
        self.families.extend(v.collect());
        Ok(())
    }

    fn gauge<'a>(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        rows: impl IntoIterator<Item = (Vec<&'a str>, f64)>,
    ) -> Result<()> {
        let v = GaugeVec::new(Opts::new(name, help), labels)?;
        for (values, n) in rows {
            v.get_metric_with_label_values(&values)?.set(n);
        }
        self.families.extend(v.collect());
        Ok(())
    }
}

/// The registry of the families updated as things happen, and the scrape-time collectors.
pub struct Metrics {
    registry: Registry,
    http: Arc<Http>,
}

impl Metrics {
    /// Registers the proxy's families, the control loop's histogram and the access log's
    /// counters.
    pub fn new(http: Arc<Http>, control: &ControlObs) -> Result<Metrics> {
        let registry = Registry::new();
        let h = &http;
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(h.requests.clone()),
            Box::new(h.duration.clone()),
            Box::new(h.connect_errors.clone()),
            Box::new(h.timeouts.clone()),
            Box::new(h.retries.clone()),
            Box::new(h.open_connections.clone()),
            Box::new(h.idle_connections.clone()),
            Box::new(h.connections.clone()),
            Box::new(h.handshakes.clone()),
            Box::new(control.change_to_apply.clone()),
            Box::new(crate::access_log::ENTRIES.clone()),
            Box::new(crate::access_log::DROPPED.clone()),
        ];
        for c in collectors {
            registry.register(c).context("registering metrics")?;
        }
        Ok(Metrics { registry, http })
    }

    /// The whole exposition: registered families plus those collected from `snap`.
    pub fn render(&self, snap: &Snapshot) -> Result<String> {
        let mut s = Scrape::default();
        l4(&mut s, snap)?;
        control_plane(&mut s, snap)?;
        let mut certs: Vec<(String, &str, f64)> = self
            .http
            .cert_files
            .lock()
            .map(|c| c.iter().map(|(n, t)| (n.clone(), "file", *t)).collect())
            .unwrap_or_default();
        certs.extend(
            snap.acme_certificates
                .iter()
                .map(|(n, t)| (n.clone(), "acme", *t)),
        );
        s.gauge(
            "lb_tls_certificate_expiry_timestamp_seconds",
            "When a certificate expires (notAfter), by file or ACME name",
            &["certificate", "source"],
            certs.iter().map(|(n, src, t)| (vec![n.as_str(), *src], *t)),
        )?;
        s.gauge(
            "lb_build_info",
            "The running lb's version (always 1)",
            &["version"],
            [(vec![env!("CARGO_PKG_VERSION")], 1.0)],
        )?;
        let mut families = self.registry.gather();
        families.append(&mut s.families);
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&families, &mut out)
            .map_err(|e| anyhow!("encoding metrics: {e}"))?;
        Ok(out)
    }
}

fn l4(s: &mut Scrape, snap: &Snapshot) -> Result<()> {
    let vips = &snap.vips;
    let per_vip = |f: fn(&VipView) -> u64| {
        vips.iter()
            .map(move |v| (vec![v.name.as_str()], f(v)))
            .collect::<Vec<_>>()
    };
    s.counter(
        "lb_vip_packets_total",
        "Packets the XDP program handled for a VIP (summed over CPUs)",
        &["vip"],
        per_vip(|v| v.counters.packets),
    )?;
    s.counter(
        "lb_vip_bytes_total",
        "Bytes the XDP program handled for a VIP (whole frames)",
        &["vip"],
        per_vip(|v| v.counters.bytes),
    )?;
    s.counter(
        "lb_vip_new_flows_total",
        "Connection-tracking misses for a VIP: flows Maglev placed (new connections)",
        &["vip"],
        per_vip(|v| v.counters.new_flows),
    )?;
    let addrs: Vec<(String, Vec<String>)> = vips
        .iter()
        .map(|v| {
            let list = v
                .backends
                .iter()
                .map(|b| SocketAddr::new(b.address, b.port).to_string())
                .collect();
            (v.name.clone(), list)
        })
        .collect();
    let per_backend = |f: &dyn Fn(&crate::balancer::BackendView) -> u64| -> Vec<(Vec<&str>, u64)> {
        vips.iter()
            .zip(&addrs)
            .flat_map(|(v, (name, list))| {
                v.backends
                    .iter()
                    .zip(list)
                    .map(|(b, a)| (vec![name.as_str(), a.as_str()], f(b)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    s.counter(
        "lb_backend_packets_total",
        "Packets the XDP program sent to a backend",
        &["vip", "backend"],
        per_backend(&|b| b.counters.packets),
    )?;
    s.counter(
        "lb_backend_bytes_total",
        "Bytes the XDP program sent to a backend (frames as received)",
        &["vip", "backend"],
        per_backend(&|b| b.counters.bytes),
    )?;
    s.counter(
        "lb_backend_new_flows_total",
        "Flows Maglev placed on a backend (connection-tracking misses)",
        &["vip", "backend"],
        per_backend(&|b| b.counters.new_flows),
    )?;
    s.gauge(
        "lb_backend_weight",
        "A backend's weight",
        &["vip", "backend"],
        per_backend(&|b| b.weight as u64)
            .into_iter()
            .map(|(l, n)| (l, n as f64)),
    )?;
    s.gauge(
        "lb_backend_maglev_slots",
        "Slots a backend owns in its VIP's live Maglev table",
        &["vip", "backend"],
        per_backend(&|b| b.slots as u64)
            .into_iter()
            .map(|(l, n)| (l, n as f64)),
    )?;
    let mut states = Vec::new();
    for (v, (name, list)) in vips.iter().zip(&addrs) {
        for (b, a) in v.backends.iter().zip(list) {
            for m in [
                BackendMode::Active,
                BackendMode::Draining,
                BackendMode::Down,
            ] {
                let on = if b.state == m { 1.0 } else { 0.0 };
                states.push((vec![name.as_str(), a.as_str(), mode_name(m)], on));
            }
        }
    }
    s.gauge(
        "lb_backend_state",
        "A backend's state in the data path: 1 for its current state (active, draining, down)",
        &["vip", "backend", "state"],
        states,
    )?;
    s.counter(
        "lb_xdp_verdicts_total",
        "The XDP program's verdicts, by action (pass, tx, redirect, forward, drop) and reason",
        &["action", "reason"],
        snap.reasons
            .iter()
            .map(|(r, n)| (vec![action(*r), r.name()], *n)),
    )?;
    s.gauge(
        "lb_conntrack_entries",
        "Flows in the connection-tracking table",
        &[],
        [(vec![], snap.tracked_flows as f64)],
    )?;
    s.gauge(
        "lb_conntrack_capacity",
        "Size of the connection-tracking table (max_flows; the LRU evicts beyond it)",
        &[],
        [(vec![], snap.flow_capacity as f64)],
    )?;
    s.counter(
        "lb_conntrack_misses_total",
        "Packets for a VIP that found no tracked flow and were placed by Maglev",
        &[],
        [(vec![], vips.iter().map(|v| v.counters.new_flows).sum())],
    )?;
    s.counter(
        "lb_maglev_rebuilds_total",
        "Maglev tables built and published for a VIP",
        &["vip"],
        snap.rebuilds.iter().map(|(v, n)| (vec![v.as_str()], *n)),
    )?;
    Ok(())
}

fn control_plane(s: &mut Scrape, snap: &Snapshot) -> Result<()> {
    let p = &snap.providers;
    s.counter(
        "lb_provider_errors_total",
        "Errors a discovery provider reported (its last good state stays in force)",
        &["provider"],
        p.iter().map(|(n, st)| (vec![n.as_str()], st.errors)),
    )?;
    s.gauge(
        "lb_provider_last_success_timestamp_seconds",
        "When a provider last delivered a snapshot",
        &["provider"],
        p.iter()
            .filter_map(|(n, st)| st.last_success_unix.map(|t| (vec![n.as_str()], t as f64))),
    )?;
    s.gauge(
        "lb_provider_healthy",
        "1 when a provider's last attempt succeeded, 0 when it is failing",
        &["provider"],
        p.iter().map(|(n, st)| {
            let ok = if st.last_error.is_none() { 1.0 } else { 0.0 };
            (vec![n.as_str()], ok)
        }),
    )?;
    s.gauge(
        "lb_provider_instances",
        "Instances a provider reports",
        &["provider"],
        p.iter()
            .map(|(n, st)| (vec![n.as_str()], st.instances as f64)),
    )?;
    let a = &snap.apply;
    s.gauge(
        "lb_config_generation",
        "Generation of the merged registry (bumped on every change)",
        &[],
        [(vec![], a.generation as f64)],
    )?;
    s.counter(
        "lb_config_applies_total",
        "Times the desired state was applied",
        &[],
        [(vec![], a.applies)],
    )?;
    s.counter(
        "lb_config_map_writes_total",
        "BPF map entries written by applies",
        &[],
        [(vec![], a.map_writes)],
    )?;
    s.counter(
        "lb_config_events_total",
        "Provider, API and health events the control loop handled",
        &[],
        [(vec![], a.events)],
    )?;
    s.gauge(
        "lb_config_last_reload_successful",
        "0 when the last config file change was rejected (the previous config stays), else 1",
        &[],
        [(
            vec![],
            if a.last_config_error.is_some() {
                0.0
            } else {
                1.0
            },
        )],
    )?;
    s.gauge(
        "lb_health_up",
        "Active health checks: 1 when a backend passes, 0 when it is marked down",
        &["vip", "backend"],
        snap.health
            .iter()
            .map(|(v, b, up)| (vec![v.as_str(), b.as_str()], if *up { 1.0 } else { 0.0 })),
    )?;
    Ok(())
}

/// Seconds since the epoch, for logs and gauges.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::{BackendView, CountersView};

    fn counters(packets: u64, bytes: u64, new_flows: u64) -> CountersView {
        CountersView {
            packets,
            bytes,
            new_flows,
        }
    }

    fn snapshot() -> Snapshot {
        let backend = |addr: &str, state, c| BackendView {
            address: addr.parse().expect("static"),
            port: 0,
            weight: 2,
            state,
            id: 1,
            mac: None,
            slots: 100,
            counters: c,
        };
        let vips = vec![VipView {
            name: "web".into(),
            address: "10.0.0.100".parse().expect("static"),
            port: 80,
            protocol: crate::config::Protocol::Tcp,
            mode: crate::config::Mode::Dsr,
            service: "web".into(),
            id: 0,
            counters: counters(30, 3000, 4),
            backends: vec![
                backend("10.0.0.11", BackendMode::Active, counters(20, 2000, 3)),
                backend("10.0.0.12", BackendMode::Draining, counters(10, 1000, 1)),
            ],
        }];
        let mut providers = BTreeMap::new();
        providers.insert(
            "redis".to_string(),
            ProviderStatus {
                errors: 2,
                last_error: Some("connection refused".into()),
                last_success_unix: Some(1_700_000_000),
                ..Default::default()
            },
        );
        Snapshot {
            vips,
            reasons: Reason::ALL
                .iter()
                .map(|r| (*r, if *r == Reason::TxDsr { 30 } else { 0 }))
                .collect(),
            tracked_flows: 4,
            flow_capacity: 1024,
            rebuilds: [("web".to_string(), 3)].into_iter().collect(),
            providers,
            apply: ApplyStats {
                generation: 9,
                last_config_error: Some("bad".into()),
                ..Default::default()
            },
            health: vec![("web".into(), "10.0.0.12:0".into(), false)],
            acme_certificates: vec![("example.com".into(), 1_900_000_000.0)],
        }
    }

    /// Every sample of `name` with all of `labels`, parsed back by a Prometheus text parser.
    fn value(parsed: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = parsed
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0]
    }

    #[test]
    fn scrape_parses_and_says_what_the_maps_say() {
        let http = Arc::new(Http::default());
        let m = Metrics::new(http.clone(), &ControlObs::default()).expect("registry");
        // One router on one entry point: 3 answers (2 × 200, 1 × 502), one unrouted 404.
        let obs = http.route("api", "web", ["web"]);
        let stats = obs.get("web").expect("resolved");
        for code in [200, 200, 502] {
            stats.classes[class_index(code)].inc();
            stats.duration.observe(0.003);
        }
        http.unrouted("web").classes[class_index(404)].inc();
        let text = m.render(&snapshot()).expect("render");
        let lines: Vec<String> = text
            .lines()
            .map(|l| Ok(l.to_string()))
            .collect::<Result<_, std::io::Error>>()
            .expect("lines");
        let parsed = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("parses");
        assert_eq!(
            value(&parsed, "lb_vip_packets_total", &[("vip", "web")]),
            30.0
        );
        assert_eq!(
            value(&parsed, "lb_vip_bytes_total", &[("vip", "web")]),
            3000.0
        );
        assert_eq!(
            value(
                &parsed,
                "lb_backend_packets_total",
                &[("backend", "10.0.0.12:0")]
            ),
            10.0
        );
        assert_eq!(
            value(
                &parsed,
                "lb_backend_state",
                &[("backend", "10.0.0.12:0"), ("state", "draining")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &parsed,
                "lb_backend_state",
                &[("backend", "10.0.0.12:0"), ("state", "active")]
            ),
            0.0
        );
        assert_eq!(
            value(
                &parsed,
                "lb_xdp_verdicts_total",
                &[("reason", "tx_dsr"), ("action", "tx")]
            ),
            30.0
        );
        assert_eq!(value(&parsed, "lb_conntrack_entries", &[]), 4.0);
        assert_eq!(value(&parsed, "lb_conntrack_misses_total", &[]), 4.0);
        assert_eq!(
            value(&parsed, "lb_maglev_rebuilds_total", &[("vip", "web")]),
            3.0
        );
        assert_eq!(
            value(
                &parsed,
                "lb_provider_errors_total",
                &[("provider", "redis")]
            ),
            2.0
        );
        assert_eq!(
            value(&parsed, "lb_provider_healthy", &[("provider", "redis")]),
            0.0
        );
        assert_eq!(value(&parsed, "lb_config_generation", &[]), 9.0);
        assert_eq!(value(&parsed, "lb_config_last_reload_successful", &[]), 0.0);
        assert_eq!(
            value(&parsed, "lb_health_up", &[("backend", "10.0.0.12:0")]),
            0.0
        );
        assert_eq!(
            value(
                &parsed,
                "lb_tls_certificate_expiry_timestamp_seconds",
                &[("certificate", "example.com")]
            ),
            1_900_000_000.0
        );
        let req = |class| {
            value(
                &parsed,
                "lb_http_requests_total",
                &[("router", "api"), ("code_class", class)],
            )
        };
        assert_eq!((req("2xx"), req("5xx")), (2.0, 1.0));
        assert_eq!(
            value(
                &parsed,
                "lb_http_requests_total",
                &[("router", ""), ("code_class", "4xx")]
            ),
            1.0
        );
        let count = parsed
            .samples
            .iter()
            .find(|s| {
                s.metric == "lb_http_request_duration_seconds"
                    && s.labels.get("router") == Some("api")
            })
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                _ => -1.0,
            });
        assert_eq!(count, Some(3.0), "histogram count");
        // Conventions: counters end in _total, every family has HELP and TYPE.
        for (name, doc) in &parsed.docs {
            assert!(!doc.is_empty(), "{name} has no HELP");
        }
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut w = l.split_whitespace().skip(2);
            let (name, kind) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            assert!(name.starts_with("lb_"), "{l}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
        }
    }

    /// The Grafana dashboard in contrib/ only uses series that lb exports.
    #[test]
    fn grafana_dashboard_uses_exported_metrics() {
        let http = Arc::new(Http::default());
        let m = Metrics::new(http.clone(), &ControlObs::default()).expect("registry");
        // Touch every family that appears only once something happens.
        let obs = http.route("api", "web", ["web"]);
        let stats = obs.get("web").expect("resolved");
        stats.classes[1].inc();
        stats.duration.observe(0.01);
        stats.connect_errors.inc();
        stats.timeouts.inc();
        stats.retries.inc();
        let ep = http.entrypoint("web");
        let _open = ep.connection();
        ep.handshake(true);
        let control = ControlObs::default();
        let m2 = Metrics::new(Arc::new(Http::default()), &control).expect("registry");
        control.change_to_apply.observe(0.001);
        let text =
            m.render(&snapshot()).expect("render") + &m2.render(&snapshot()).expect("render");
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let dashboard = include_str!("../../contrib/grafana-lb.json");
        let v: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard JSON");
        assert!(v["panels"].as_array().is_some_and(|p| p.len() > 20));
        let mut used = std::collections::BTreeSet::new();
        let mut rest = dashboard;
        while let Some(i) = rest.find("lb_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            if name != "lb_" {
                used.insert(name);
            }
        }
        assert!(used.len() > 20, "{used:?}");
        for name in &used {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard uses {name}, which lb does not export"
            );
        }
    }

    #[test]
    fn every_reason_has_an_action() {
        let drops = Reason::ALL.iter().filter(|r| action(**r) == "drop").count();
        assert_eq!(drops, 4);
        assert!(Reason::ALL
            .iter()
            .all(|r| r.name().starts_with(action(*r)) || action(*r) == "forward"));
    }
}
