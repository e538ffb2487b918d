//! The L7 reverse proxy (first step): entry points serving HTTP/1.1 and h2c, routers matched by
//! compiled rules, services whose upstreams are the registry's instances, balanced by smooth
//! weighted round robin over pooled keep-alive connections.
//!
//! A request's life is `request`'s phases, one function each: refuse → normalise (one host and
//! one path, see [`normalise`]) → route (first matching router of the entry point, by priority)
//! → request filters (middlewares) → upstream request → pick upstream → attempt and retry →
//! upstream response → response filters → log. This file owns what they run against: the
//! routing table, an immutable value swapped atomically ([`ArcSwap`]), so a request in flight
//! finishes on the table it started with; how it is built from one [`L7State`]; the listeners.

pub mod acme;
pub mod balance;
pub mod client;
pub mod conn;
pub mod dynamic;
pub mod health;
pub mod limits;
pub mod middleware;
pub mod normalise;
pub mod obs;
pub mod proxy_protocol;
mod request;
use crate::model::rule;
pub mod tcp;
pub mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    header::{self, HeaderName, HeaderValue},
    Response, StatusCode,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::model::instance::Services;
use crate::model::l7::{
    CertSpec, ConnLimits, Dynamic, EntryPointSpec, RouterSpec, ServiceSpec, TcpRouterSpec,
};
use balance::{Pool, Upstream};
use client::{ClientKey, UpstreamClient};
use middleware::{ClientFault, UpstreamFailure};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies in both directions, boxed: middlewares may replace them (buffered, compressed).
pub type Body = BoxBody<Bytes, BoxError>;

/// A TLS entry point's server configuration, replaceable while it listens.
pub type TlsConfig = Arc<ArcSwap<tls::TlsBase>>;

impl ServiceSpec {
    fn client_key(&self) -> ClientKey {
        ClientKey {
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            http2: self.http2,
        }
    }
}

struct Route {
    spec: RouterSpec,
    priority: i64,
    chain: Vec<Arc<dyn middleware::Middleware>>,
    /// A middleware of the chain sends requests of its own (gets [`middleware::Ctx::fetch`]).
    fetches: bool,
    /// Metric handles per entry point, resolved once per table.
    obs: obs::RouteObs,
    /// The TLS options its TLS connections must have been made under.
    tls_options: Arc<str>,
}

/// Routes listed under each entry point they serve (when they name none: the `as_default`
/// ones, or every one when none is), highest
/// priority first; ties by name, so the order never depends on config order. HTTP and TCP routes
/// alike; `key` gives a route's entry points, priority and name.
pub(crate) fn per_entrypoint<R>(
    entrypoints: &[EntryPointSpec],
    routes: Vec<Arc<R>>,
    key: impl Fn(&R) -> (&[String], i64, &str),
) -> HashMap<String, Vec<Arc<R>>> {
    let mut out: HashMap<String, Vec<Arc<R>>> = HashMap::new();
    // Where a route that names none goes: the default entry points, or all when none is.
    let defaults = entrypoints.iter().any(|e| e.as_default);
    for r in routes {
        let (serves, _, _) = key(&r);
        for ep in entrypoints {
            let named = serves.contains(&ep.name);
            if named || (serves.is_empty() && (ep.as_default || !defaults)) {
                out.entry(ep.name.clone()).or_default().push(r.clone());
            }
        }
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| {
            let ((_, pa, na), (_, pb, nb)) = (key(a), key(b));
            pb.cmp(&pa).then_with(|| na.cmp(nb))
        });
    }
    out
}

/// A service as the table holds it: its upstreams, settings and the client that reaches them.
struct Svc {
    pool: Arc<Pool>,
    spec: ServiceSpec,
    client: UpstreamClient,
}

/// Starts (or keeps) a checked service's active checks on its upstreams; returns their flags.
type Checked<'a> = dyn FnMut(
        &str,
        &ServiceSpec,
        &UpstreamClient,
        &[SocketAddr],
    ) -> HashMap<SocketAddr, Arc<std::sync::atomic::AtomicBool>>
    + 'a;

/// Routes per entry point (highest priority first) and a pool per service.
pub struct Table {
    routes: HashMap<String, Vec<Arc<Route>>>,
    /// Entry points that take TLS and plain HTTP: their routers match only their kind.
    dual: std::collections::HashSet<String>,
    pools: HashMap<String, Svc>,
    /// Services made of services, by name.
    composites: HashMap<String, Mixed>,
    tcp: tcp::Routes,
    /// Per entry point, the TLS options a handshake naming a host is made under (the options
    /// of the routers whose rule names it, when they agree); any other: `default`.
    sni: HashMap<String, HashMap<String, Arc<str>>>,
    tls_options: HashMap<Arc<str>, Arc<crate::model::l7::TlsOptions>>,
    /// `default` options a provider defined and lb could not use: no handshake falls back to
    /// lb's own policy in their place.
    tls_default_broken: bool,
}

impl Table {
    /// The options a handshake on `entrypoint` naming `sni` is made under, and what they ask
    /// (`None`: `default` is not defined, and the entry point's own configuration applies).
    /// An error: no handshake (its options are broken or gone).
    pub(crate) fn tls_for(
        &self,
        entrypoint: &str,
        sni: Option<&str>,
    ) -> Result<(Arc<str>, Option<Arc<crate::model::l7::TlsOptions>>), String> {
        let name = sni
            .and_then(|h| self.sni.get(entrypoint)?.get(&h.to_ascii_lowercase()))
            .cloned()
            .unwrap_or_else(|| crate::model::l7::DEFAULT_TLS_OPTIONS.into());
        self.tls_named(name)
    }

    /// The options called `name` as this table has them; an error when they are broken or
    /// not there (only `default` may be absent: lb's policy).
    pub(crate) fn tls_named(
        &self,
        name: Arc<str>,
    ) -> Result<(Arc<str>, Option<Arc<crate::model::l7::TlsOptions>>), String> {
        let default = *name == *crate::model::l7::DEFAULT_TLS_OPTIONS;
        if default && self.tls_default_broken {
            return Err("the default tls.options are broken".into());
        }
        match self.tls_options.get(&name) {
            Some(o) => Ok((name.clone(), Some(o.clone()))),
            None if default => Ok((name, None)),
            None => Err(format!("tls.options {name:?} are not defined")),
        }
    }
}

/// A composite as the table holds it.
enum Mixed {
    /// Smooth WRR over the named services, with its current weights.
    Weighted(Vec<(String, i64)>, std::sync::Mutex<Vec<i64>>),
    Failover {
        main: String,
        fallback: String,
    },
}

impl Table {
    /// The service with upstreams a request to `name` goes to: composites resolved (weighted by
    /// their weights among the services that have an upstream to send to, failover to `main`
    /// while it has one), at most [`MAX_COMPOSITE_DEPTH`] deep.
    fn service(&self, name: &str) -> Option<&Svc> {
        let mut name = name;
        for _ in 0..=crate::model::l7::MAX_COMPOSITE_DEPTH {
            if let Some(s) = self.pools.get(name) {
                return Some(s);
            }
            name = match self.composites.get(name)? {
                Mixed::Weighted(children, current) => {
                    let up: Vec<usize> = (0..children.len())
                        .filter(|&i| self.available(&children[i].0, 0))
                        .collect();
                    let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
                    let total: i64 = up.iter().map(|&i| children[i].1).sum();
                    let mut best: Option<usize> = None;
                    for &i in &up {
                        cur[i] += children[i].1;
                        if best.is_none_or(|b| cur[i] > cur[b]) {
                            best = Some(i);
                        }
                    }
                    let b = best?;
                    cur[b] -= total;
                    &children[b].0
                }
                Mixed::Failover { main, fallback } => {
                    if self.available(main, 0) {
                        main
                    } else {
                        fallback
                    }
                }
            };
        }
        None
    }

    /// Whether `name` has an upstream a request could go to now (one its active checks did not
    /// take out; passive ejection is a guess, and the pool still answers through it).
    fn available(&self, name: &str, depth: usize) -> bool {
        if depth > crate::model::l7::MAX_COMPOSITE_DEPTH {
            return false;
        }
        if let Some(s) = self.pools.get(name) {
            return s.pool.available();
        }
        match self.composites.get(name) {
            Some(Mixed::Weighted(children, _)) => {
                children.iter().any(|(c, _)| self.available(c, depth + 1))
            }
            Some(Mixed::Failover { main, fallback }) => {
                self.available(main, depth + 1) || self.available(fallback, depth + 1)
            }
            None => false,
        }
    }
}

/// The services `names` send to, through composites: what needs a pool and instances.
fn with_children(names: Vec<String>, specs: &HashMap<String, ServiceSpec>) -> Vec<String> {
    let mut seen: std::collections::HashSet<String> = names.iter().cloned().collect();
    let mut out = names.clone();
    let mut todo = names;
    while let Some(n) = todo.pop() {
        let Some(c) = specs.get(&n).and_then(|s| s.composite.as_ref()) else {
            continue;
        };
        for child in c.children() {
            if seen.insert(child.to_string()) {
                out.push(child.to_string());
                todo.push(child.to_string());
            }
        }
    }
    out
}

impl Table {
    fn build(
        conf: &L7Config,
        services: &Services,
        upstream: &mut dyn FnMut(SocketAddr) -> Arc<Upstream>,
        client: &mut dyn FnMut(ClientKey) -> Option<UpstreamClient>,
        checked: &mut Checked<'_>,
        metrics: &obs::Http,
    ) -> Table {
        let L7Config {
            entrypoints,
            routers,
            specs,
            middlewares,
            tcp_routers,
            tls_options,
            tls_default_broken,
        } = conf;
        let tls_options: HashMap<Arc<str>, Arc<crate::model::l7::TlsOptions>> = tls_options
            .iter()
            .map(|(n, o)| (Arc::from(n.as_str()), o.clone()))
            .collect();
        let mut built = Vec::new();
        for r in routers {
            let Some(chain) = r
                .middlewares
                .iter()
                .map(|m| middlewares.get(m).cloned())
                .collect::<Option<Vec<Arc<dyn middleware::Middleware>>>>()
            else {
                // Checked before (the provider's problems say which): a router never runs
                // without a middleware it names.
                continue;
            };
            let tls_name: Arc<str> = match &r.tls_options {
                Some(n) => tls_options
                    .get_key_value(n.as_str())
                    .map(|(k, _)| k.clone())
                    .unwrap_or_else(|| n.as_str().into()),
                None => crate::model::l7::DEFAULT_TLS_OPTIONS.into(),
            };
            let serves =
                |ep: &&EntryPointSpec| r.entrypoints.is_empty() || r.entrypoints.contains(&ep.name);
            let obs = metrics.route(
                &r.name,
                &r.service,
                entrypoints.iter().filter(serves).map(|ep| ep.name.as_str()),
            );
            let fetches = chain.iter().any(|m| m.service().is_some());
            built.push(Arc::new(Route {
                spec: r.clone(),
                priority: r.priority.unwrap_or(r.rule.default_priority),
                fetches,
                chain,
                obs,
                tls_options: tls_name,
            }));
        }
        let routes = per_entrypoint(entrypoints, built, |r: &Route| {
            (&r.spec.entrypoints[..], r.priority, r.spec.name.as_str())
        });
        let sni = sni_choices(entrypoints, &routes);
        let mut pools = HashMap::new();
        // HTTP and TCP routers of one service share its pool (and its upstreams' health).
        let mirrors = specs
            .values()
            .filter_map(|s| s.mirror.as_ref())
            .flat_map(|m| m.services().map(str::to_string));
        let pages = middlewares
            .values()
            .filter_map(|m| m.service().map(str::to_string));
        let wanted: Vec<String> = routers
            .iter()
            .map(|r| r.service.clone())
            .chain(tcp_routers.iter().map(|r| r.service.clone()))
            .chain(mirrors)
            .chain(pages)
            .collect();
        let mut composites = HashMap::new();
        for name in with_children(wanted, specs) {
            if pools.contains_key(&name) || composites.contains_key(&name) {
                continue;
            }
            match specs.get(&name).and_then(|s| s.composite.as_ref()) {
                Some(crate::model::l7::Composite::Weighted(list)) => {
                    let list: Vec<(String, i64)> = list
                        .iter()
                        .filter(|(_, w)| *w > 0)
                        .map(|(n, w)| (n.clone(), i64::from(*w)))
                        .collect();
                    let current = std::sync::Mutex::new(vec![0; list.len()]);
                    composites.insert(name, Mixed::Weighted(list, current));
                    continue;
                }
                Some(crate::model::l7::Composite::Failover { main, fallback }) => {
                    composites.insert(
                        name,
                        Mixed::Failover {
                            main: main.clone(),
                            fallback: fallback.clone(),
                        },
                    );
                    continue;
                }
                None => {}
            }
            let members: Vec<(Arc<Upstream>, u32)> = services
                .get(&name)
                .map(|m| {
                    m.values()
                        .map(|i| (upstream(SocketAddr::new(i.address, i.port)), i.weight))
                        .collect()
                })
                .unwrap_or_default();
            let spec = specs.get(&name).cloned().unwrap_or_default();
            // A client that cannot be built (its files went bad since the config was checked)
            // leaves the service without a pool: 503s, logged, until the files are fixed.
            let Some(client) = client(spec.client_key()) else {
                continue;
            };
            let mut pool = Pool::new(spec.algorithm, members);
            if spec.health.is_some() {
                let addrs: Vec<SocketAddr> = pool.addrs().collect();
                let flags = checked(&name, &spec, &client, &addrs);
                pool = pool.with_checks(|a| flags.get(&a).cloned());
            }
            pools.insert(
                name,
                Svc {
                    pool: Arc::new(pool),
                    spec,
                    client,
                },
            );
        }
        Table {
            routes,
            dual: entrypoints
                .iter()
                .filter(|e| e.tls && e.also_plain)
                .map(|e| e.name.clone())
                .collect(),
            pools,
            composites,
            tcp: tcp::Routes::build(entrypoints, tcp_routers),
            sni,
            tls_options,
            tls_default_broken: tls_default_broken.is_some(),
        }
    }
}

/// Per TLS entry point, the options each host's handshakes are made under: those of the
/// routers whose rule names the host, where they all name the same; where they differ, none
/// (`default`), so a router whose options lost answers nothing (421) rather than serve under
/// options it did not ask for. Hosts only `default` routers name are left to the fallback.
fn sni_choices(
    entrypoints: &[EntryPointSpec],
    routes: &HashMap<String, Vec<Arc<Route>>>,
) -> HashMap<String, HashMap<String, Arc<str>>> {
    let mut out = HashMap::new();
    for ep in entrypoints.iter().filter(|e| e.tls) {
        let mut by_host: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        for r in routes.get(&ep.name).into_iter().flatten() {
            // A plain router of an entry point that takes both is never reached over TLS.
            if r.spec.tls == Some(false) && ep.also_plain {
                continue;
            }
            for h in r.spec.rule.hosts() {
                let names = by_host.entry(h.to_ascii_lowercase()).or_default();
                if !names.contains(&r.tls_options) {
                    names.push(r.tls_options.clone());
                }
            }
        }
        let chosen: HashMap<String, Arc<str>> = by_host
            .into_iter()
            .filter_map(|(h, names)| match &names[..] {
                [one] if **one != *crate::model::l7::DEFAULT_TLS_OPTIONS => Some((h, one.clone())),
                _ => None,
            })
            .collect();
        if !chosen.is_empty() {
            out.insert(ep.name.clone(), chosen);
        }
    }
    out
}

/// The proxy's own configuration: what a config reload replaces.
#[derive(Clone)]
pub struct L7Config {
    pub entrypoints: Vec<EntryPointSpec>,
    pub routers: Vec<RouterSpec>,
    pub specs: HashMap<String, ServiceSpec>,
    pub middlewares: HashMap<String, Arc<dyn middleware::Middleware>>,
    pub tcp_routers: Vec<TcpRouterSpec>,
    /// Handshake policies by the names routers give (provider-qualified, but `default`).
    pub tls_options: HashMap<String, Arc<crate::model::l7::TlsOptions>>,
    /// Why the `default` options a provider defined could not be used, if so.
    pub tls_default_broken: Option<String>,
}

/// Everything the routing table is built from, as one value: lb.toml's part, each provider's
/// part and the instances of the services they name. Control publishes it on a
/// `tokio::sync::watch` ([`Proxy::follow`]); a change to any part is one build, and a change
/// that touches none (a health flap of a VIP backend) is none.
#[derive(Clone)]
pub struct L7State {
    /// Counts publications, so a caller can wait for one to be in force ([`Proxy::installed`]).
    pub generation: u64,
    pub base: Arc<L7Config>,
    pub dynamic: std::collections::BTreeMap<String, Dynamic>,
    pub services: Services,
}

impl L7State {
    /// The same routing and instances (the generation aside).
    pub fn same(&self, o: &L7State) -> bool {
        Arc::ptr_eq(&self.base, &o.base) && self.dynamic == o.dynamic && self.services == o.services
    }
}

/// The registry services a configuration sends to: its routers' (HTTP and TCP), its mirrors'
/// and its middlewares' (error pages).
pub fn wanted_services<'a>(
    base: &L7Config,
    dynamic: impl IntoIterator<Item = &'a Dynamic>,
) -> Vec<String> {
    let dynamic: Vec<&Dynamic> = dynamic.into_iter().collect();
    let mut v: Vec<String> = base
        .middlewares
        .values()
        .filter_map(|m| m.service().map(str::to_string))
        .collect();
    for d in &dynamic {
        v.extend(
            d.middlewares
                .iter()
                .filter_map(|(_, m)| m.service().map(str::to_string)),
        );
    }
    let mut add =
        |routers: &[RouterSpec], tcp: &[TcpRouterSpec], specs: &HashMap<String, ServiceSpec>| {
            v.extend(routers.iter().map(|r| r.service.clone()));
            v.extend(tcp.iter().map(|r| r.service.clone()));
            v.extend(
                specs
                    .values()
                    .filter_map(|s| s.mirror.as_ref())
                    .flat_map(|m| m.services().map(str::to_string)),
            );
        };
    add(&base.routers, &base.tcp_routers, &base.specs);
    let mut specs = base.specs.clone();
    for d in dynamic {
        add(&d.routers, &d.tcp_routers, &d.services);
        specs.extend(d.services.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut v = with_children(v, &specs);
    v.sort();
    v.dedup();
    v
}

pub struct Proxy {
    /// lb.toml's part.
    conf: std::sync::Mutex<Arc<L7Config>>,
    /// Each provider's part (Traefik dynamic configuration), by provider: as it came, and
    /// with its middlewares built.
    dynamic: std::sync::Mutex<std::collections::BTreeMap<String, (Dynamic, dynamic::Built)>>,
    /// What each provider's part could not use (middlewares that do not build) …
    problems: std::sync::Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// … and its clashes with lb.toml or another provider, found by the last merge.
    clashes: std::sync::Mutex<Vec<String>>,
    /// Routing tables built so far (each change of configuration or instances is one).
    builds: std::sync::atomic::AtomicU64,
    /// The generation of the last [`L7State`] installed.
    installed: tokio::sync::watch::Sender<u64>,
    /// Both together: what the table is built from.
    merged: std::sync::Mutex<Arc<L7Config>>,
    /// The registry's last word, to rebuild the table when the configuration changes.
    services: std::sync::Mutex<Services>,
    table: ArcSwap<Table>,
    /// Per-upstream state by address: it survives table swaps.
    upstreams: std::sync::Mutex<HashMap<SocketAddr, Arc<Upstream>>>,
    /// One client per TLS setting, kept across rebuilds so pooled connections survive.
    clients: std::sync::Mutex<HashMap<ClientKey, UpstreamClient>>,
    /// Mirror copies in flight (bounded: a slow shadow must not pile up tasks).
    mirroring: Arc<std::sync::atomic::AtomicUsize>,
    /// ACME challenges to answer and certificates it issued.
    acme: Arc<acme::Store>,
    /// Raised when a provider's certificates change (the listeners reload theirs).
    certificates_changed: tokio::sync::Notify,
    /// Held by every change (configuration, provider routing, registry) from its write to the
    /// table it stores: two changes at once cannot store their tables in the wrong order.
    updating: std::sync::Mutex<()>,
    /// Request metrics and the access log.
    obs: Arc<obs::Http>,
    /// Active checks of the services that have them; their verdicts outlive table swaps.
    checks: health::Checks,
    /// TCP routers' connections per client address (`inFlightConn`), across table swaps.
    tcp_in_flight: tcp::InFlightConns,
}

/// The most mirror copies in flight at once; beyond it copies are skipped.
const MAX_MIRRORING: usize = 1024;

/// How long a client has to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most header bytes a request may carry (HTTP/1 read buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and never cross a proxy.
/// Names, not strings: a string key is parsed and validated again on every lookup.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub(crate) fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    // Most requests name nothing in `Connection`: they pay for no list.
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// A fresh request id: 128 random bits as 32 lowercase hex digits.
pub(crate) fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = crate::clock::random::<u128>();
    let mut digits = [0u8; 32];
    for d in digits.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&digits))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn text(code: StatusCode, msg: &str) -> Response<Body> {
    middleware::answer(code, msg)
}

impl Proxy {
    pub fn new(
        entrypoints: Vec<EntryPointSpec>,
        routers: Vec<RouterSpec>,
        specs: HashMap<String, ServiceSpec>,
        middlewares: HashMap<String, Arc<dyn middleware::Middleware>>,
        services: &Services,
    ) -> Proxy {
        let empty = Table {
            routes: HashMap::new(),
            dual: Default::default(),
            pools: HashMap::new(),
            composites: HashMap::new(),
            tcp: Default::default(),
            sni: HashMap::new(),
            tls_options: HashMap::new(),
            tls_default_broken: false,
        };
        let conf = Arc::new(L7Config {
            entrypoints,
            routers,
            specs,
            middlewares,
            tcp_routers: Vec::new(),
            tls_options: HashMap::new(),
            tls_default_broken: None,
        });
        let proxy = Proxy {
            conf: std::sync::Mutex::new(conf.clone()),
            dynamic: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            problems: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            clashes: std::sync::Mutex::new(Vec::new()),
            builds: std::sync::atomic::AtomicU64::new(0),
            installed: tokio::sync::watch::channel(0).0,
            merged: std::sync::Mutex::new(conf),
            services: std::sync::Mutex::new(Services::new()),
            table: ArcSwap::from_pointee(empty),
            upstreams: std::sync::Mutex::new(HashMap::new()),
            clients: std::sync::Mutex::new(HashMap::new()),
            mirroring: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            acme: Default::default(),
            certificates_changed: tokio::sync::Notify::new(),
            updating: std::sync::Mutex::new(()),
            obs: Default::default(),
            checks: Default::default(),
            tcp_in_flight: Default::default(),
        };
        proxy.update_services(services);
        proxy
    }

    /// Its metrics and access log.
    pub fn obs(&self) -> &Arc<obs::Http> {
        &self.obs
    }

    /// The configuration in force: lb.toml's and the providers' routing merged.
    pub fn routing(&self) -> Arc<L7Config> {
        self.merged()
    }

    /// Shared with the ACME client (it fills it) and the TLS certificate resolver.
    pub fn acme_store(&self) -> Arc<acme::Store> {
        self.acme.clone()
    }

    fn conf(&self) -> Arc<L7Config> {
        self.conf
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Follows control's publications of the proxy's desired state until the sender is gone:
    /// each one is installed whole, off the request path (a build may read certificate files).
    pub async fn follow(self: Arc<Self>, mut rx: tokio::sync::watch::Receiver<Arc<L7State>>) {
        loop {
            let state = rx.borrow_and_update().clone();
            let me = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || me.install(&state)).await {
                warn!("routing table build: {e}");
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Resolves once the state of `generation` (or a later one) is in force.
    pub async fn installed(&self, generation: u64) {
        let mut rx = self.installed.subscribe();
        let _ = rx.wait_for(|g| *g >= generation).await;
    }

    /// Routing tables built so far.
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::Relaxed)
    }

    /// What each provider's routing could not use, for its status.
    pub fn problems(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out = self.problems.lock().map(|p| p.clone()).unwrap_or_default();
        for c in self.clashes.lock().map(|c| c.clone()).unwrap_or_default() {
            // `<provider>: router r is defined already`
            let owner = c.split(": ").next().unwrap_or("").to_string();
            out.entry(owner).or_default().push(c);
        }
        out
    }

    /// Makes `state` the one in force: what changed is rebuilt (a provider's middlewares that
    /// stayed the same keep their state: rate-limit buckets, an open breaker, requests in
    /// flight), and the table is built once — or not at all when nothing changed.
    pub fn install(&self, state: &L7State) {
        let _one_at_a_time = self.updating.lock();
        let mut changed = false;
        if let Ok(mut c) = self.conf.lock() {
            if !Arc::ptr_eq(&c, &state.base) {
                *c = state.base.clone();
                changed = true;
            }
        }
        if let (Ok(mut d), Ok(mut problems)) = (self.dynamic.lock(), self.problems.lock()) {
            let gone: Vec<String> = d
                .keys()
                .filter(|p| !state.dynamic.contains_key(*p))
                .cloned()
                .collect();
            for p in gone {
                if d.remove(&p)
                    .is_some_and(|(_, b)| !b.dynamic.certificates.is_empty())
                {
                    self.certificates_changed.notify_one();
                }
                problems.remove(&p);
                changed = true;
            }
            for (provider, part) in &state.dynamic {
                let before = d.get(provider);
                // A provider repeats itself (every resync): what did not change is not rebuilt.
                if before.is_some_and(|(input, _)| input == part) {
                    continue;
                }
                let (built, found) = dynamic::Built::new(part.clone(), before.map(|(_, b)| b));
                if before.map(|(_, b)| &b.dynamic.certificates) != Some(&built.dynamic.certificates)
                {
                    self.certificates_changed.notify_one();
                }
                d.insert(provider.clone(), (part.clone(), built));
                problems.insert(provider.clone(), found);
                changed = true;
            }
        }
        if let Ok(mut s) = self.services.lock() {
            if *s != state.services {
                *s = state.services.clone();
                changed = true;
            }
        }
        if changed {
            self.remerge();
            self.rebuild();
        }
        self.installed.send_if_modified(|g| {
            let newer = state.generation > *g;
            if newer {
                *g = state.generation;
            }
            newer
        });
    }

    /// The state in force now, as an [`L7State`] of the last generation installed.
    fn current(&self) -> L7State {
        L7State {
            generation: *self.installed.borrow(),
            base: self.conf(),
            dynamic: self
                .dynamic
                .lock()
                .map(|d| {
                    d.iter()
                        .map(|(p, (input, _))| (p.clone(), input.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            services: self.services.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }

    /// New upstreams from the registry: a new table, swapped in whole. Upstream state is kept
    /// for addresses that stay, dropped for those that left.
    pub fn update_services(&self, services: &Services) {
        let mut s = self.current();
        s.services = services.clone();
        self.install(&s);
    }

    /// A reloaded configuration: routers, middlewares and balancing settings change for the
    /// next request; requests in flight finish on the table they started with. (Listeners are
    /// the caller's to open and close.)
    pub fn reconfigure(&self, conf: L7Config) {
        let mut s = self.current();
        s.base = Arc::new(conf);
        self.install(&s);
    }

    /// A provider's routing, replacing what it said before (empty: it takes everything back).
    /// Returns what could not be used, for the provider's status.
    pub fn set_dynamic(&self, provider: &str, part: Dynamic) -> Vec<String> {
        let mut s = self.current();
        s.dynamic.insert(provider.to_string(), part);
        self.install(&s);
        self.problems().remove(provider).unwrap_or_default()
    }

    /// Resolves when a provider's certificates changed since the last call.
    pub async fn certificates_changed(&self) {
        self.certificates_changed.notified().await
    }

    /// Certificates the providers brought.
    pub fn dynamic_certificates(&self) -> Vec<CertSpec> {
        self.dynamic
            .lock()
            .map(|d| {
                d.values()
                    .flat_map(|(_, b)| b.dynamic.certificates.iter().cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// lb.toml's part and the providers' merged into what the table is built from; a clash
    /// (`<provider>: router r is defined already`) is one of that provider's problems.
    fn remerge(&self) {
        let base = self.conf();
        let Ok(parts) = self.dynamic.lock() else {
            return;
        };
        let (merged, clashes) = dynamic::merge(&base, parts.iter().map(|(p, (_, b))| (p, b)));
        drop(parts);
        for c in &clashes {
            warn!("routing: {c}");
        }
        if let Ok(mut c) = self.clashes.lock() {
            *c = clashes;
        }
        if let Ok(mut m) = self.merged.lock() {
            *m = Arc::new(merged);
        }
    }

    fn merged(&self) -> Arc<L7Config> {
        self.merged
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Sets the TCP routers (not among `new`'s arguments, which HTTP-only callers keep).
    pub fn set_tcp_routers(&self, tcp_routers: Vec<TcpRouterSpec>) {
        let mut s = self.current();
        let mut conf = (*s.base).clone();
        conf.tcp_routers = tcp_routers;
        s.base = Arc::new(conf);
        self.install(&s);
    }

    fn rebuild(&self) {
        let conf = self.merged();
        let services = self.services.lock().map(|s| s.clone()).unwrap_or_default();
        let Ok(mut known) = self.upstreams.lock() else {
            return;
        };
        let mut keep: HashMap<SocketAddr, Arc<Upstream>> = HashMap::new();
        let mut get = |addr: SocketAddr| {
            let u = known
                .get(&addr)
                .cloned()
                .unwrap_or_else(|| Arc::new(Upstream::new(addr)));
            keep.insert(addr, u.clone());
            u
        };
        let Ok(mut clients) = self.clients.lock() else {
            return;
        };
        let mut used: HashMap<ClientKey, UpstreamClient> = HashMap::new();
        let mut client = |key: ClientKey| {
            if let Some(c) = used.get(&key).or_else(|| clients.get(&key)) {
                let c = c.clone();
                used.insert(key, c.clone());
                return Some(c);
            }
            match UpstreamClient::new(&key) {
                Ok(c) => {
                    used.insert(key, c.clone());
                    Some(c)
                }
                Err(e) => {
                    warn!("upstream TLS: {e:#}");
                    None
                }
            }
        };
        let mut checked_services = std::collections::HashSet::new();
        let mut checked =
            |name: &str, spec: &ServiceSpec, client: &UpstreamClient, addrs: &[SocketAddr]| {
                let Some(check) = &spec.health else {
                    return HashMap::new();
                };
                checked_services.insert(name.to_string());
                self.checks.sync(name, check, client, addrs, &self.obs)
            };
        let table = Table::build(
            &conf,
            &services,
            &mut get,
            &mut client,
            &mut checked,
            &self.obs,
        );
        self.checks.keep_only(&checked_services, &self.obs);
        self.obs.set_secret_queries(
            conf.middlewares
                .values()
                .filter_map(|m| m.secret_query())
                .map(str::to_string),
        );
        *clients = used;
        *known = keep;
        self.table.store(Arc::new(table));
        self.builds.fetch_add(1, Ordering::Relaxed);
    }

    /// Every actively checked upstream, by service, and whether it passes.
    pub fn active_checks(&self) -> Vec<(String, SocketAddr, bool)> {
        self.checks.verdicts()
    }

    /// The registry services the routers (HTTP and TCP) send to.
    pub fn service_names(&self) -> Vec<String> {
        wanted_services(&self.merged(), [])
    }

    /// Serves one entry point on `listener` until the task is dropped; with `tls`, every
    /// connection is a TLS handshake first (ALPN picks h2 or HTTP/1.1).
    pub async fn serve(
        self: Arc<Self>,
        entrypoint: String,
        listener: TcpListener,
        tls: Option<TlsConfig>,
    ) {
        let stop = tokio_util::sync::CancellationToken::new();
        self.serve_until(entrypoint, listener, tls, stop)
            .await
            .finish(std::time::Duration::MAX)
            .await;
    }

    /// [`Proxy::serve`] until `stop`: then the listener closes (new connections are refused) and
    /// the connections in progress are returned as a [`Drain`] for the caller to finish.
    pub async fn serve_until(
        self: Arc<Self>,
        entrypoint: String,
        listener: TcpListener,
        tls: Option<TlsConfig>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Drain {
        let connections = tokio_util::task::TaskTracker::new();
        let drain = CancellationToken::new();
        let obs = self.obs.entrypoint(&entrypoint);
        let name: Arc<str> = entrypoint.as_str().into();
        // Beyond its connection cap the entry point stops accepting until one closes (the
        // kernel's backlog holds the rest). Read once: a new cap takes a new listener.
        let cap = self
            .conf()
            .entrypoints
            .iter()
            .find(|e| e.name == entrypoint)
            .map_or(ConnLimits::default().max_connections, |e| {
                e.limits.max_connections
            });
        let slots = Arc::new(tokio::sync::Semaphore::new(cap));
        let mut shared_limits: Option<Arc<ConnLimits>> = None;
        loop {
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
                () = stop.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors, say: retrying at once would only spin.
                        warn!(entrypoint, "accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            // An IPv4 client of a dual-stack listener is itself, not `::ffff:a.b.c.d`, for every
            // list and limit that follows.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let (trusted, limits, dual, proxied) = self
                .conf()
                .entrypoints
                .iter()
                .find(|e| e.name == entrypoint)
                .map(|e| {
                    (
                        e.trusted_ips.iter().any(|n| n.contains(&peer.ip())),
                        e.limits,
                        e.also_plain,
                        e.proxy_protocol
                            .as_ref()
                            .is_some_and(|l| l.iter().any(|n| n.contains(&peer.ip()))),
                    )
                })
                .unwrap_or_default();
            // One shared copy while the bounds stay what they were: a connection holds a
            // pointer to them, not its own (10,000 idle connections, 1 MiB less).
            if shared_limits.as_deref() != Some(&limits) {
                shared_limits = Some(Arc::new(limits));
            }
            let limits = shared_limits.clone().unwrap_or_default();
            let (mut tls, obs) = (tls.clone(), obs.clone());
            let (proxy, name, drain) = (self.clone(), name.clone(), drain.clone());
            let connections = connections.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _open = obs.connection();
                let (mut stream, mut peer, mut trusted, mut read) =
                    (stream, peer, trusted, Vec::new());
                // One deadline for what comes before the request (a PROXY header, the first
                // byte): each stage does not get a header timeout of its own.
                let before = crate::clock::timer_now() + limits.header_timeout;
                if proxied {
                    match proxy_protocol::read(&mut stream, peer, before).await {
                        Ok((client, rest)) => {
                            if client != peer {
                                let client =
                                    SocketAddr::new(client.ip().to_canonical(), client.port());
                                trusted = proxy.conf().entrypoints.iter().any(|e| {
                                    *e.name == *name
                                        && e.trusted_ips.iter().any(|n| n.contains(&client.ip()))
                                });
                                peer = client;
                            }
                            read = rest;
                        }
                        Err(why) => {
                            debug!(entrypoint = &*name, %peer, "closed: {why}");
                            return;
                        }
                    }
                }
                if dual && tls.is_some() {
                    let first = match read.first() {
                        Some(b) => Some(*b),
                        None => first_byte(&stream, before).await,
                    };
                    match first {
                        Some(TLS_HANDSHAKE) => {}
                        Some(_) => tls = None,
                        None => return,
                    }
                }
                let client = Arc::new(conn::Client {
                    proxy,
                    entrypoint: name,
                    peer,
                    scheme: if tls.is_some() { "https" } else { "http" },
                    trusted,
                    drain,
                    obs: obs.clone(),
                    limits,
                    certificates: Default::default(),
                    tls_options: Default::default(),
                });
                // TCP routers first: they may take the connection, else it comes back for HTTP
                // with the bytes they read replayed. Boxed, as is the handshake: what they hold
                // is freed before the connection's long life begins.
                let Some(stream) = Box::pin(tcp::intercept(
                    &client.proxy,
                    &client.entrypoint,
                    stream,
                    read,
                    peer,
                    tls.as_ref(),
                ))
                .await
                else {
                    return;
                };
                // Boxed: the task keeps room only for the path its connection takes (a TLS
                // stream is large; a parked plain connection is a socket and little else).
                // Tracked for the drain from here: a TCP router's relay is not HTTP, and has no
                // request to finish.
                match tls {
                    None => {
                        connections
                            .track_future(Box::pin(conn::serve(stream, false, client)))
                            .await
                    }
                    Some(config) => {
                        connections
                            .track_future(Box::pin(serve_tls(stream, config, client, &obs)))
                            .await
                    }
                }
            });
        }
        drop(listener);
        info!(entrypoint, "stopped accepting; draining");
        connections.close();
        Drain {
            connections,
            drain,
            entrypoint,
        }
    }
}

/// The first byte of a TLS connection: a handshake record's content type.
const TLS_HANDSHAKE: u8 = 0x16;

/// The client's first byte, left in the socket; `None` when it closes or sends nothing by
/// `until` (within the header timeout: it is a request that has not started).
async fn first_byte(stream: &tokio::net::TcpStream, until: tokio::time::Instant) -> Option<u8> {
    let mut b = [0u8; 1];
    match tokio::time::timeout_at(until, stream.peek(&mut b)).await {
        Ok(Ok(1)) => Some(b[0]),
        _ => None,
    }
}

/// An entry point's connections after it stopped accepting.
pub struct Drain {
    connections: tokio_util::task::TaskTracker,
    drain: CancellationToken,
    entrypoint: String,
}

impl Drain {
    /// Lets every connection finish the request it is on — idle keep-alive connections close at
    /// once, HTTP/2 ones get GOAWAY — and returns when all have closed, or after `within` (the
    /// rest stay open until they end or the process exits). True when all finished in time.
    pub async fn finish(self, within: std::time::Duration) -> bool {
        let n = self.connections.len();
        self.drain.cancel();
        let done = tokio::time::timeout(within, self.connections.wait())
            .await
            .is_ok();
        if done {
            info!(entrypoint = self.entrypoint, connections = n, "drained");
        } else {
            warn!(
                entrypoint = self.entrypoint,
                connections = n,
                "drain timed out"
            );
        }
        done
    }
}

/// A TLS connection: the handshake, then HTTP inside it (ALPN picks h2 or HTTP/1.1). The
/// ClientHello's SNI picks the TLS options (a router's `tls.options`) before the rest of the
/// handshake is made under them.
async fn serve_tls(
    stream: tcp::Prefixed<tokio::net::TcpStream>,
    config: TlsConfig,
    client: Arc<conn::Client>,
    obs: &obs::EntryPointObs,
) {
    // The configuration in force when the client connects (certificates reload). A handshake
    // has 10 s, or the entry point's header timeout when that is shorter: a client that stalls
    // in it holds nothing longer.
    let base = config.load_full();
    let handshake = async {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await?;
        let (used, server) = {
            let hello = start.client_hello();
            // An ACME validator: no HTTP follows, and it presents no client certificate.
            let validator = hello
                .alpn()
                .is_some_and(|mut p| p.any(|p| p == acme::ACME_TLS_ALPN));
            let table = client.proxy.table.load();
            let refused = |why: String| {
                debug!(entrypoint = &*client.entrypoint, "no TLS handshake: {why}");
                std::io::Error::other("TLS options unusable")
            };
            let (name, options) = table
                .tls_for(&client.entrypoint, hello.server_name())
                .map_err(refused)?;
            let server = match (&options, validator) {
                (None, _) | (_, true) => base.config(),
                (Some(o), false) => base
                    .config_for(&name, o)
                    .map_err(|e| refused(format!("{e:#}")))?,
            };
            (conn::TlsOptionsUsed(name, options), server)
        };
        let s = start.into_stream(server).await?;
        Ok::<_, std::io::Error>((s, used))
    };
    let accepted = tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT.min(client.limits.header_timeout),
        handshake,
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    match accepted {
        // TLS-ALPN-01: the handshake was the answer; no HTTP follows.
        Ok((s, _)) if acme::is_validation(s.get_ref().1) => obs.handshake(true),
        Ok((s, name)) => {
            obs.handshake(true);
            if let Some(chain) = s.get_ref().1.peer_certificates().filter(|c| !c.is_empty()) {
                let chain: Arc<[Vec<u8>]> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
                let _ = client.certificates.set(conn::ClientCertificates(chain));
            }
            let _ = client.tls_options.set(name);
            let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
            conn::serve(s, h2, client).await
        }
        Err(e) => {
            obs.handshake(false);
            debug!("TLS handshake from {}: {e}", client.peer);
        }
    }
}

/// An answer lb makes because the upstream failed (the circuit breaker counts these).
fn failure(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = text(code, msg);
    r.extensions_mut().insert(UpstreamFailure);
    r
}

/// An answer lb makes because of what the client sent (the circuit breaker ignores these).
fn client_fault(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = text(code, msg);
    r.extensions_mut().insert(ClientFault);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, as_default: bool) -> EntryPointSpec {
        EntryPointSpec {
            name: name.into(),
            address: "127.0.0.1:0".parse().unwrap(),
            tls: false,
            client_ca_file: None,
            trusted_ips: vec![],
            limits: Default::default(),
            also_plain: false,
            as_default,
            proxy_protocol: None,
        }
    }

    /// Routers naming no entry point serve the `asDefault` ones (Traefik's
    /// install-configuration/entrypoints "asDefault"), or all when none is; one that names its
    /// entry points serves those alone, highest priority first.
    #[test]
    fn routes_go_to_their_entry_points_or_the_default_ones() {
        type R = (Vec<String>, i64, &'static str);
        let routes: Vec<Arc<R>> = vec![
            Arc::new((vec![], 1, "anywhere")),
            Arc::new((vec!["admin".into()], 5, "named")),
        ];
        fn key(r: &R) -> (&[String], i64, &str) {
            (&r.0[..], r.1, r.2)
        }
        let names = |m: &HashMap<String, Vec<Arc<R>>>, ep: &str| -> Vec<&'static str> {
            m.get(ep)
                .map(|l| l.iter().map(|r| r.2).collect())
                .unwrap_or_default()
        };
        let all = [ep("web", false), ep("admin", false)];
        let m = per_entrypoint(&all, routes.clone(), key);
        assert_eq!(names(&m, "web"), ["anywhere"]);
        assert_eq!(names(&m, "admin"), ["named", "anywhere"]);
        let some = [ep("web", true), ep("admin", false)];
        let m = per_entrypoint(&some, routes, key);
        assert_eq!(names(&m, "web"), ["anywhere"]);
        assert_eq!(names(&m, "admin"), ["named"], "not a default entry point");
    }
}
