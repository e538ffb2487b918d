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
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Context as _, Result};
use lb_common::Reason;
use prometheus::{
    core::Collector, proto::MetricFamily, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::{
    control::health,
    control::{ApplyStats, Control, ControlObs},
    l4::VipView,
    model::BackendMode,
    proxy::obs::{not_after, Http},
    registry::ProviderStatus,
};

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
    pub fn take(
        c: &mut Control,
        health: &health::Table,
        proxy: Option<&crate::proxy::Proxy>,
    ) -> Result<Snapshot> {
        let vips = c.balancer.list()?;
        let rebuilds = c.balancer.rebuilds();
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
        let acme_certificates = proxy
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
        let mut collectors = http.collectors();
        collectors.push(Box::new(control.change_to_apply.clone()));
        collectors.push(Box::new(crate::observe::access_log::ENTRIES.clone()));
        collectors.push(Box::new(crate::observe::access_log::DROPPED.clone()));
        collectors.push(Box::new(
            crate::proxy::middleware::limit::STORE_ERRORS.clone(),
        ));
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
            .certificate_files()
            .into_iter()
            .map(|(n, t)| (n, "file", t))
            .collect();
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
    let per_backend = |f: &dyn Fn(&crate::l4::BackendView) -> u64| -> Vec<(Vec<&str>, u64)> {
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
        "lb_provider_broken_items",
        "Items of a provider's routing lb could not use (each kept at its last good version or left out; the rest applies)",
        &["provider"],
        p.iter()
            .map(|(n, st)| (vec![n.as_str()], st.broken.len() as f64)),
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
    use crate::l4::{BackendView, CountersView};
    use crate::proxy::obs::class_index;

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
            protocol: crate::model::Protocol::Tcp,
            mode: crate::model::Mode::Dsr,
            service: "web".into(),
            id: 0,
            table_digest: None,
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
        let dashboard = include_str!("../../../contrib/grafana-lb.json");
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
