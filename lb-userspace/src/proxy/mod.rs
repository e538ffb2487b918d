//! The L7 reverse proxy (first step): entry points serving HTTP/1.1 and h2c, routers matched by
//! compiled rules, services whose upstreams are the registry's instances, balanced by smooth
//! weighted round robin over pooled keep-alive connections.
//!
//! A request's life, top to bottom in [`Proxy::handle`]: accept → normalise (one host and one
//! path, see [`normalise`]) → route (first matching router of the entry point, by priority) →
//! middlewares → pick an upstream of the router's service → forward (hop-by-hop headers dropped,
//! `X-Forwarded-*` added) → answer. The routing table is an immutable value
//! swapped atomically ([`ArcSwap`]): a request in flight finishes on the table it started with.

pub mod acme;
pub mod balance;
pub mod client;
pub mod conn;
pub mod dynamic;
pub mod limits;
pub mod middleware;
pub mod normalise;
pub mod obs;
pub use crate::model::rule;
pub mod tcp;
pub mod tls;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{atomic::Ordering, Arc},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::{
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    Request, Response, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::model::l7::{
    EntryPointSpec, Mirror, RouterSpec, ServiceSpec, DEFAULT_MAX_UPSTREAM_CONNECTIONS,
};
use crate::registry::Services;
use balance::{Pool, Upstream};
use client::{ClientKey, UpstreamClient};
use middleware::{ClientFault, Ctx, Flow, UpstreamFailure};
use rule::RequestView;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies in both directions, boxed: middlewares may replace them (buffered, compressed).
pub type Body = BoxBody<Bytes, BoxError>;

/// A TLS entry point's server configuration, replaceable while it listens.
pub type TlsConfig = Arc<ArcSwap<rustls::ServerConfig>>;

impl ServiceSpec {
    fn client_key(&self) -> ClientKey {
        ClientKey {
            tls: self.tls.clone(),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

struct Route {
    spec: RouterSpec,
    priority: i64,
    chain: Vec<Arc<dyn middleware::Middleware>>,
    /// Metric handles per entry point, resolved once per table.
    obs: obs::RouteObs,
}

/// Routes listed under each entry point they serve (every one when they name none), highest
/// priority first; ties by name, so the order never depends on config order. HTTP and TCP routes
/// alike; `key` gives a route's entry points, priority and name.
pub(crate) fn per_entrypoint<R>(
    entrypoints: &[EntryPointSpec],
    routes: Vec<Arc<R>>,
    key: impl Fn(&R) -> (&[String], i64, &str),
) -> HashMap<String, Vec<Arc<R>>> {
    let mut out: HashMap<String, Vec<Arc<R>>> = HashMap::new();
    for r in routes {
        let (serves, _, _) = key(&r);
        for ep in entrypoints {
            if serves.is_empty() || serves.contains(&ep.name) {
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

/// Routes per entry point (highest priority first) and a pool per service.
pub struct Table {
    routes: HashMap<String, Vec<Arc<Route>>>,
    pools: HashMap<String, Svc>,
    tcp: tcp::Routes,
}

impl Table {
    fn build(
        conf: &L7Config,
        services: &Services,
        upstream: &mut dyn FnMut(SocketAddr) -> Arc<Upstream>,
        client: &mut dyn FnMut(ClientKey) -> Option<UpstreamClient>,
        metrics: &obs::Http,
    ) -> Table {
        let L7Config {
            entrypoints,
            routers,
            specs,
            middlewares,
            tcp_routers,
        } = conf;
        let mut built = Vec::new();
        for r in routers {
            let chain = r
                .middlewares
                .iter()
                .filter_map(|m| middlewares.get(m).cloned())
                .collect();
            let serves =
                |ep: &&EntryPointSpec| r.entrypoints.is_empty() || r.entrypoints.contains(&ep.name);
            let obs = metrics.route(
                &r.name,
                &r.service,
                entrypoints.iter().filter(serves).map(|ep| ep.name.as_str()),
            );
            built.push(Arc::new(Route {
                spec: r.clone(),
                priority: r.priority.unwrap_or(r.rule.default_priority),
                chain,
                obs,
            }));
        }
        let routes = per_entrypoint(entrypoints, built, |r: &Route| {
            (&r.spec.entrypoints[..], r.priority, r.spec.name.as_str())
        });
        let mut pools = HashMap::new();
        // HTTP and TCP routers of one service share its pool (and its upstreams' health).
        let mirrors = specs
            .values()
            .filter_map(|s| s.mirror.as_ref().map(|m| m.service.clone()));
        let wanted: Vec<String> = routers
            .iter()
            .map(|r| r.service.clone())
            .chain(tcp_routers.iter().map(|r| r.service.clone()))
            .chain(mirrors)
            .collect();
        for name in wanted {
            if pools.contains_key(&name) {
                continue;
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
            pools.insert(
                name,
                Svc {
                    pool: Arc::new(Pool::new(spec.algorithm, members)),
                    spec,
                    client,
                },
            );
        }
        Table {
            routes,
            pools,
            tcp: tcp::Routes::build(entrypoints, tcp_routers),
        }
    }
}

/// The proxy's own configuration: what a config reload replaces.
#[derive(Clone)]
pub struct L7Config {
    pub entrypoints: Vec<EntryPointSpec>,
    pub routers: Vec<RouterSpec>,
    pub specs: HashMap<String, ServiceSpec>,
    pub middlewares: HashMap<String, Arc<dyn middleware::Middleware>>,
    pub tcp_routers: Vec<tcp::TcpRouterSpec>,
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
    pub dynamic: std::collections::BTreeMap<String, dynamic::Dynamic>,
    pub services: Services,
}

impl L7State {
    /// The same routing and instances (the generation aside).
    pub fn same(&self, o: &L7State) -> bool {
        Arc::ptr_eq(&self.base, &o.base) && self.dynamic == o.dynamic && self.services == o.services
    }
}

/// The registry services a configuration sends to: its routers' (HTTP and TCP) and its mirrors'.
pub fn wanted_services<'a>(
    base: &L7Config,
    dynamic: impl IntoIterator<Item = &'a dynamic::Dynamic>,
) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    let mut add = |routers: &[RouterSpec],
                   tcp: &[tcp::TcpRouterSpec],
                   specs: &HashMap<String, ServiceSpec>| {
        v.extend(routers.iter().map(|r| r.service.clone()));
        v.extend(tcp.iter().map(|r| r.service.clone()));
        v.extend(
            specs
                .values()
                .filter_map(|s| s.mirror.as_ref().map(|m| m.service.clone())),
        );
    };
    add(&base.routers, &base.tcp_routers, &base.specs);
    for d in dynamic {
        add(&d.routers, &d.tcp_routers, &d.services);
    }
    v.sort();
    v.dedup();
    v
}

pub struct Proxy {
    /// lb.toml's part.
    conf: std::sync::Mutex<Arc<L7Config>>,
    /// Each provider's part (Traefik dynamic configuration), by provider: as it came, and
    /// with its middlewares built.
    dynamic:
        std::sync::Mutex<std::collections::BTreeMap<String, (dynamic::Dynamic, dynamic::Built)>>,
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
            pools: HashMap::new(),
            tcp: Default::default(),
        };
        let conf = Arc::new(L7Config {
            entrypoints,
            routers,
            specs,
            middlewares,
            tcp_routers: Vec::new(),
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
    pub fn set_dynamic(&self, provider: &str, part: dynamic::Dynamic) -> Vec<String> {
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
    pub fn dynamic_certificates(&self) -> Vec<tls::CertSpec> {
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
    pub fn set_tcp_routers(&self, tcp_routers: Vec<tcp::TcpRouterSpec>) {
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
        let table = Table::build(&conf, &services, &mut get, &mut client, &self.obs);
        *clients = used;
        *known = keep;
        self.table.store(Arc::new(table));
        self.builds.fetch_add(1, Ordering::Relaxed);
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
            .map_or(limits::ConnLimits::default().max_connections, |e| {
                e.limits.max_connections
            });
        let slots = Arc::new(tokio::sync::Semaphore::new(cap));
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
            let (trusted, limits) = self
                .conf()
                .entrypoints
                .iter()
                .find(|e| e.name == entrypoint)
                .map(|e| {
                    (
                        e.trusted_ips.iter().any(|n| n.contains(&peer.ip())),
                        e.limits,
                    )
                })
                .unwrap_or_default();
            let client = Arc::new(conn::Client {
                proxy: self.clone(),
                entrypoint: name.clone(),
                peer,
                scheme: if tls.is_some() { "https" } else { "http" },
                trusted,
                drain: drain.clone(),
                obs: obs.clone(),
                limits,
            });
            let (tls, obs) = (tls.clone(), obs.clone());
            let connections = connections.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _open = obs.connection();
                // TCP routers first: they may take the connection, else it comes back for HTTP
                // with the bytes they read replayed. Boxed, as is the handshake: what they hold
                // is freed before the connection's long life begins.
                let Some(stream) = Box::pin(tcp::intercept(
                    &client.proxy,
                    &client.entrypoint,
                    stream,
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

    /// One request: observed (metrics, access log) around [`Proxy::respond`].
    pub async fn handle(
        &self,
        entrypoint: &str,
        client_ip: IpAddr,
        scheme: &'static str,
        trusted: bool,
        mut req: Request<Body>,
    ) -> Response<Body> {
        let mut trace = self.obs.start(entrypoint, client_ip, &mut req);
        let resp = self
            .respond(entrypoint, client_ip, scheme, trusted, req, &mut trace)
            .await;
        self.obs.finish(entrypoint, trace, resp)
    }

    /// One request, phase by phase.
    async fn respond(
        &self,
        entrypoint: &str,
        client_ip: IpAddr,
        scheme: &'static str,
        trusted: bool,
        mut req: Request<Body>,
        trace: &mut obs::Trace,
    ) -> Response<Body> {
        // Limits: however the connection buffered them, headers beyond the bound are refused.
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            return text(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request headers too large",
            );
        }
        // Targets that are not a resource: answered here, never forwarded half-understood. `OPTIONS
        // *` asks about lb itself: 200 with no body, as Go's net/http (so Traefik) answers it.
        // lb tunnels nothing: CONNECT is not implemented (nginx says 405, Envoy 404).
        if req.method() == hyper::Method::CONNECT {
            return client_fault(StatusCode::NOT_IMPLEMENTED, "CONNECT is not supported");
        }
        if req.uri().path() == "*" {
            if req.method() != hyper::Method::OPTIONS {
                return client_fault(StatusCode::BAD_REQUEST, "* is a target for OPTIONS only");
            }
            return Response::new(middleware::full(Bytes::new()));
        }
        // Normalise: from here on the request has one host (in `Host`) and one path, the ones
        // the router, the middlewares and the upstream all see.
        let host = match normalise::request(&mut req, trusted) {
            Ok(host) => host,
            Err(normalise::Refused(why)) => return client_fault(StatusCode::BAD_REQUEST, why),
        };
        if let Some(answer) = self.acme.http01_response(scheme, &req) {
            return answer;
        }
        // Route.
        let table = self.table.load_full();
        let view = RequestView {
            host: &host,
            path: req.uri().path(),
            method: req.method().as_str(),
            query: req.uri().query(),
            headers: req.headers(),
            client_ip,
        };
        let Some(route) = table
            .routes
            .get(entrypoint)
            .and_then(|rs| rs.iter().find(|r| r.spec.rule.matches(&view)))
        else {
            return text(StatusCode::NOT_FOUND, "no router matches");
        };
        trace.route = route.obs.get(entrypoint).cloned();
        // Middlewares, in order; one may answer instead of the upstream, and the ones before
        // it still see that answer on its way back.
        let mut ctx = Ctx::new(client_ip, scheme, host, crate::clock::now());
        let mut answered = None;
        for (i, m) in route.chain.iter().enumerate() {
            let early = match m.request(&mut ctx, &mut req) {
                Flow::Next => None,
                Flow::Answer(r) => Some(r),
                Flow::Wait(f) => f.await,
            };
            if let Some(r) = early {
                answered = Some((i, r));
                break;
            }
        }
        let (ran, mut resp) = match answered {
            Some(x) => x,
            None => (
                route.chain.len(),
                self.forward(route, &table, &mut ctx, trusted, req, trace)
                    .await,
            ),
        };
        for m in route.chain[..ran].iter().rev() {
            if let Some(f) = m.response(&ctx, &mut resp) {
                f.await;
            }
        }
        resp
    }

    /// Picks an upstream of the route's service and forwards the request to it. An attempt that
    /// got no answer is retried on another upstream (within the service's retries, or the
    /// router's `retry` middleware, and the retry budget) when the request can be sent again:
    /// its body is empty or buffered, and either the connection was never made or the method
    /// is idempotent.
    async fn forward(
        &self,
        route: &Route,
        table: &Table,
        ctx: &mut Ctx,
        trusted: bool,
        mut req: Request<Body>,
        trace: &mut obs::Trace,
    ) -> Response<Body> {
        let Some(svc) = table.pools.get(&route.spec.service) else {
            return failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream for this service",
            );
        };
        let (pool, spec) = (&svc.pool, &svc.spec);
        // An `Upgrade` (WebSocket, …) keeps its Connection/Upgrade headers and becomes a tunnel.
        // Never `h2c`: a tunnel to an upstream speaking HTTP/2 would carry requests that no
        // router or middleware sees (h2c smuggling); such a request goes on as a plain one.
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .filter(|_| req.version() == hyper::Version::HTTP_11)
            .filter(|u| {
                !u.to_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
            });
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| req.extensions_mut().remove::<conn::ClientUpgrade>());
        let sticky = spec
            .sticky_cookie
            .as_deref()
            .and_then(|name| cookie(req.headers(), name));
        prepare_headers(
            &mut req,
            ctx.client_ip,
            ctx.scheme,
            trusted,
            upgrade.as_ref(),
        );
        let (mut parts, body) = req.into_parts();
        // From the body itself: its framing headers are hop-by-hop and already gone.
        let bodiless = hyper::body::Body::is_end_stream(&body);
        // What can be sent again: nothing, or what a middleware buffered.
        let mut replay = match (&ctx.replay, bodiless) {
            (Some(b), _) => Some(b.clone()),
            (None, true) => Some(Bytes::new()),
            (None, false) => None,
        };
        // A body streamed from the client is watched: if it breaks or stalls, the failure is the
        // client's, and must not eject the upstream or feed the breaker.
        let (body, watch) = if bodiless {
            (body, None)
        } else {
            let (b, w) = ClientBody::new(body);
            (b.boxed(), Some(w))
        };
        let mut body = Some(body);
        if let Some(m) = &spec.mirror {
            if crate::clock::random::<f64>() * 100.0 < m.percent && upgrade.is_none() {
                if replay.is_none() {
                    match read_small(&parts.headers, &mut body, m.max_body_bytes).await {
                        Ok(b) => replay = b,
                        // The body was read and broke: there is nothing whole to send anywhere.
                        Err(()) => return text(StatusCode::BAD_REQUEST, "incomplete request body"),
                    }
                }
                if let (Some(b), Some(shadow)) = (&replay, table.pools.get(&m.service)) {
                    self.mirror(shadow, &parts, b.clone());
                }
            }
        }
        let idempotent = matches!(
            parts.method,
            hyper::Method::GET
                | hyper::Method::HEAD
                | hyper::Method::OPTIONS
                | hyper::Method::PUT
                | hyper::Method::DELETE
                | hyper::Method::TRACE
        );
        let attempts = ctx.retry.map_or(spec.retries + 1, |p| p.attempts);
        let mut tried: Vec<SocketAddr> = Vec::new();
        pool.budget.deposit();
        loop {
            if let Some(p) = ctx.retry {
                let wait = p.backoff(tried.len() as u32 + 1);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            let now = crate::clock::now();
            let sticky_hit = if tried.is_empty() {
                sticky.and_then(|k| pool.by_key(k, now))
            } else {
                None
            };
            let picked = sticky_hit.clone().or_else(|| {
                // Prefer an upstream this request has not failed on yet.
                (0..4)
                    .filter_map(|_| pool.pick(now, &mut || crate::clock::random::<u64>()))
                    .find(|u| !tried.contains(&u.addr))
            });
            let Some(upstream) =
                picked.or_else(|| pool.pick(now, &mut || crate::clock::random::<u64>()))
            else {
                return failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no upstream for this service",
                );
            };
            let Some(uri) = upstream_uri(&svc.client, &upstream, &parts.uri) else {
                return text(StatusCode::BAD_REQUEST, "bad request target");
            };
            // One connection's worth of the upstream, held to the answer's end; beyond the
            // cap the request waits in line as long as a connect may take. Not the upstream's
            // failure, nor the client's: lb is at the limit it was given.
            let until = crate::clock::timer_now() + spec.connect_timeout;
            let Some(slot) = Upstream::slot(&upstream, spec.max_connections, until).await else {
                warn!(
                    router = route.spec.name,
                    upstream = %upstream.addr,
                    cap = spec.max_connections,
                    "upstream at its connection cap"
                );
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream at its connection limit",
                );
            };
            let this_body = match (&replay, body.take()) {
                (Some(b), _) => middleware::full(b.clone()),
                (None, Some(b)) => b,
                (None, None) => middleware::full(Bytes::new()),
            };
            // No attempt can follow this one (the same test as `again` below, one failure
            // ahead): the head moves instead of being copied.
            let last =
                replay.is_none() || upgrade.is_some() || tried.len() + 1 >= attempts as usize;
            let head = if last {
                std::mem::replace(&mut parts, Request::new(()).into_parts().0)
            } else {
                parts.clone()
            };
            let mut attempt = Request::from_parts(head, this_body);
            *attempt.uri_mut() = uri;
            *attempt.version_mut() = hyper::Version::HTTP_11;
            let started = crate::clock::now();
            let in_flight = Upstream::start(&upstream);
            let sent = svc.client.request(attempt);
            let result: Result<Result<Response<Incoming>, _>, ()> = match spec.request_timeout {
                Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
                None => Ok(sent.await),
            };
            drop(in_flight);
            trace.attempt(upstream.addr, started.elapsed());
            // Only the body this attempt streamed can be the client's fault (a replayed one is
            // whole in memory).
            let fault = watch
                .as_ref()
                .filter(|_| replay.is_none())
                .and_then(|w| w.fault(result.is_err()));
            let error = match result {
                Ok(Ok(mut resp)) => {
                    // An upstream that answered a body the client broke is not to blame.
                    if fault.is_none() {
                        upstream.record(
                            resp.status().as_u16() < 500,
                            started.elapsed(),
                            &spec.passive,
                            crate::clock::now(),
                        );
                    }
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(client_side) = client_upgrade {
                            let upstream_side = hyper::upgrade::on(&mut resp);
                            tokio::spawn(async move {
                                tunnel(client_side, upstream_side).await;
                                drop(slot);
                            });
                            let (parts, _) = resp.into_parts();
                            return Response::from_parts(parts, middleware::full(Bytes::new()));
                        }
                    }
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    if let Some(name) = &spec.sticky_cookie {
                        let key = upstream_key(upstream.addr);
                        if sticky != Some(key) {
                            if let Ok(v) = HeaderValue::from_str(&format!(
                                "{name}={key:016x}; Path=/; HttpOnly; SameSite=Lax"
                            )) {
                                rparts.headers.append(header::SET_COOKIE, v);
                            }
                        }
                    }
                    return Response::from_parts(
                        rparts,
                        Holding {
                            body: rbody,
                            _slot: slot,
                        }
                        .boxed(),
                    );
                }
                Ok(Err(e)) => Some(e),
                Err(_) => None,
            };
            match fault {
                Some(ClientBodyFault::Broken) => {
                    debug!(router = route.spec.name, "request body broke: {error:?}");
                    return client_fault(StatusCode::BAD_REQUEST, "incomplete request body");
                }
                Some(ClientBodyFault::Stalled) => {
                    debug!(
                        router = route.spec.name,
                        "request body stalled past the timeout"
                    );
                    return client_fault(StatusCode::REQUEST_TIMEOUT, "request body too slow");
                }
                None => {}
            }
            upstream.record(false, started.elapsed(), &spec.passive, crate::clock::now());
            tried.push(upstream.addr);
            let never_connected = error.as_ref().is_some_and(|e| e.is_connect());
            trace.upstream_failed(never_connected, error.is_none());
            match &error {
                Some(e) => {
                    warn!(router = route.spec.name, upstream = %upstream.addr, "upstream: {e}")
                }
                None => {
                    warn!(router = route.spec.name, upstream = %upstream.addr, "upstream: timed out")
                }
            }
            let again = replay.is_some()
                && upgrade.is_none()
                && (never_connected || idempotent)
                && tried.len() < attempts as usize;
            if again && pool.budget.withdraw() {
                trace.retried();
                continue;
            }
            return match error {
                None => failure(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
                Some(_) => failure(StatusCode::BAD_GATEWAY, "upstream unreachable"),
            };
        }
    }

    /// Sends a copy to one of the shadow service's upstreams and forgets it.
    fn mirror(&self, shadow: &Svc, parts: &hyper::http::request::Parts, body: Bytes) {
        let Some(upstream) = shadow
            .pool
            .pick(crate::clock::now(), &mut || crate::clock::random::<u64>())
        else {
            return;
        };
        let Some(uri) = upstream_uri(&shadow.client, &upstream, &parts.uri) else {
            return;
        };
        // A copy never waits for, nor takes the last of, an upstream's connections.
        let Some(slot) = Upstream::try_slot(&upstream, shadow.spec.max_connections) else {
            return;
        };
        if self.mirroring.fetch_add(1, Ordering::Relaxed) >= MAX_MIRRORING {
            self.mirroring.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let mut copy = Request::from_parts(parts.clone(), middleware::full(body));
        *copy.uri_mut() = uri;
        *copy.version_mut() = hyper::Version::HTTP_11;
        let (client, count) = (shadow.client.clone(), self.mirroring.clone());
        tokio::spawn(async move {
            let sent = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                if let Ok(resp) = client.request(copy).await {
                    // Read to the end so the connection goes back to the pool.
                    let _ = resp.into_body().collect().await;
                }
            });
            let _ = sent.await;
            drop(slot);
            count.fetch_sub(1, Ordering::Relaxed);
        });
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

/// A TLS connection: the handshake, then HTTP inside it (ALPN picks h2 or HTTP/1.1).
async fn serve_tls(
    stream: tcp::Prefixed<tokio::net::TcpStream>,
    config: TlsConfig,
    client: Arc<conn::Client>,
    obs: &obs::EntryPointObs,
) {
    // The configuration in force when the client connects (certificates reload). A handshake
    // has 10 s: a client that stalls in it holds nothing longer.
    let accepted = tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config.load_full()).accept(stream),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    match accepted {
        // TLS-ALPN-01: the handshake was the answer; no HTTP follows.
        Ok(s) if acme::is_validation(s.get_ref().1) => obs.handshake(true),
        Ok(s) => {
            obs.handshake(true);
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

/// How the client's part of a failed attempt went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientBodyFault {
    /// The body ended in an error: bad chunked framing, a reset stream, a client gone.
    Broken,
    /// Time ran out while lb was waiting for the client's next bytes.
    Stalled,
}

/// An upstream's answer, holding its connection's slot until hyper is done with it.
struct Holding {
    body: Incoming,
    _slot: balance::Slot,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.get_mut().body)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// What became of a request body on its way to the upstream, as the attempt's outcome needs it.
#[derive(Default)]
struct BodyWatch {
    broken: std::sync::atomic::AtomicBool,
    /// Cut for coming too slowly (the entry point's body limits).
    too_slow: std::sync::atomic::AtomicBool,
    /// The last read found no bytes from the client yet (not: the upstream was not reading).
    waiting: std::sync::atomic::AtomicBool,
    ended: std::sync::atomic::AtomicBool,
}

impl BodyWatch {
    /// Whose fault a failed or timed-out attempt was: `Some` when it was the client's.
    fn fault(&self, timed_out: bool) -> Option<ClientBodyFault> {
        if self.too_slow.load(Ordering::Acquire) {
            return Some(ClientBodyFault::Stalled);
        }
        if self.broken.load(Ordering::Acquire) {
            return Some(ClientBodyFault::Broken);
        }
        let stalled = timed_out
            && !self.ended.load(Ordering::Acquire)
            && self.waiting.load(Ordering::Acquire);
        stalled.then_some(ClientBodyFault::Stalled)
    }
}

/// The client's request body, reporting to a [`BodyWatch`] as hyper's client reads it.
struct ClientBody {
    body: Body,
    watch: Arc<BodyWatch>,
}

impl ClientBody {
    fn new(body: Body) -> (ClientBody, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::default());
        (
            ClientBody {
                body,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let w = &this.watch;
        w.waiting.store(r.is_pending(), Ordering::Release);
        match &r {
            Poll::Ready(Some(Err(e))) if limits::is_too_slow(&**e) => {
                w.too_slow.store(true, Ordering::Release)
            }
            Poll::Ready(Some(Err(_))) => w.broken.store(true, Ordering::Release),
            Poll::Ready(None) => w.ended.store(true, Ordering::Release),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The request's target on an upstream: its address, the client's scheme, the path and query.
/// Assembled from parts (the upstream's authority is parsed once, when it is first seen); a
/// target that is not a path (`*`) goes through the parser as text.
fn upstream_uri(client: &UpstreamClient, upstream: &Upstream, target: &Uri) -> Option<Uri> {
    use hyper::http::uri::{PathAndQuery, Scheme};
    let pq = match target.path_and_query() {
        None => PathAndQuery::from_static("/"),
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        Some(pq) => return upstream_uri_text(client, upstream.addr, pq.as_str()),
    };
    let Some(authority) = upstream.authority.clone() else {
        return upstream_uri_text(client, upstream.addr, pq.as_str());
    };
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(if client.tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    });
    parts.authority = Some(authority);
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).ok()
}

fn upstream_uri_text(client: &UpstreamClient, addr: SocketAddr, pq: &str) -> Option<Uri> {
    let scheme = if client.tls { "https" } else { "http" };
    format!("{scheme}://{addr}{pq}").parse().ok()
}

/// Reads a body of at most `max` bytes whole (for a mirror); `None` (and the body left as it
/// was) when it is larger or of unknown length; `Err` when reading it failed (it is gone).
async fn read_small(
    headers: &hyper::HeaderMap,
    body: &mut Option<Body>,
    max: usize,
) -> Result<Option<Bytes>, ()> {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if len.is_none_or(|n| n > max) {
        return Ok(None);
    }
    let Some(b) = body.take() else {
        return Ok(None);
    };
    match middleware::read_body(b, max).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) => {
            debug!("request body: {e:?}");
            Err(())
        }
    }
}

/// A stable, opaque id for an upstream in a sticky cookie (not its address).
fn upstream_key(addr: SocketAddr) -> u64 {
    xxhash_rust::xxh3::xxh3_64(addr.to_string().as_bytes())
}

/// The value of cookie `name`, parsed as a sticky key.
fn cookie(h: &hyper::HeaderMap, name: &str) -> Option<u64> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| u64::from_str_radix(v, 16).ok())
}

/// Appends `v` as an RFC 7239 (RFC 9110 §5.6.4) quoted-string, `"` and `\` escaped, so a value
/// can never close the string and start an element of its own (`a.test";for=1.2.3.4`).
fn push_quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Headers for the upstream: hop-by-hop ones removed (an upgrade keeps its own), the forwarding
/// trail (`X-Forwarded-For/-Proto/-Host`) added, `Host` kept, a request id if there is none.
/// Every request passes here: names are constants and each value is built in one buffer that
/// becomes the header without another copy.
fn prepare_headers(
    req: &mut Request<Body>,
    client_ip: IpAddr,
    scheme: &'static str,
    trusted: bool,
    upgrade: Option<&HeaderValue>,
) {
    use std::fmt::Write as _;
    // HTTP/2 carries the host in the URI (`:authority`), not in a Host header.
    let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let h = req.headers_mut();
    strip_hop_by_hop(h);
    // Room for what is added below in one step: the map otherwise grows (and rehashes) as the
    // headers go in. A map too large to reserve in is left as it was.
    let _ = h.try_reserve(8);
    if !trusted {
        for name in [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_FORWARDED_PORT,
            X_REAL_IP,
            FORWARDED,
        ] {
            h.remove(name);
        }
    }
    // RFC 7239: quoted IPv6, the host as the client asked for it.
    let mut fwd = String::with_capacity(96);
    if let Some(prev) = h.get(FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    // Writing to a String cannot fail.
    let _ = match client_ip {
        IpAddr::V4(a) => write!(fwd, "for={a};proto={scheme}"),
        IpAddr::V6(a) => write!(fwd, "for=\"[{a}]\";proto={scheme}"),
    };
    if let Some(v) = original_host.as_ref().and_then(|v| v.to_str().ok()) {
        fwd.push_str(";host=");
        push_quoted(&mut fwd, v);
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(fwd)) {
        h.insert(FORWARDED, v);
    }
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u.clone());
    }
    let mut xff = String::with_capacity(48);
    if let Some(prev) = h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{client_ip}");
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    if let Some(host) = original_host {
        h.insert(X_FORWARDED_HOST, host.clone());
        h.insert(header::HOST, host);
    }
    if !h.contains_key(X_REQUEST_ID) {
        h.insert(X_REQUEST_ID, new_request_id());
    }
}

/// Joins an upgraded client connection to the upgraded upstream connection, bytes both ways,
/// until either side closes.
async fn tunnel(client: conn::ClientUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Some(mut c), Ok(u)) = (client.get().await, upstream.await) else {
        debug!("upgrade failed on one side");
        return;
    };
    let mut u = TokioIo::new(u);
    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
        debug!("tunnel closed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::get("/a/b?c=d");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(middleware::full(Bytes::new())).expect("request")
    }

    fn value<'a>(r: &'a Request<Body>, name: &str) -> Option<&'a str> {
        r.headers().get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn forwarding_headers_read_as_before() {
        let mut r = request(&[
            ("host", "example.test:8080"),
            ("connection", "keep-alive, x-drop"),
            ("x-drop", "1"),
            ("te", "trailers"),
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
        ]);
        prepare_headers(
            &mut r,
            "192.0.2.7".parse().expect("ip"),
            "http",
            false,
            None,
        );
        assert_eq!(
            value(&r, "forwarded"),
            Some("for=192.0.2.7;proto=http;host=\"example.test:8080\"")
        );
        assert_eq!(value(&r, "x-forwarded-for"), Some("192.0.2.7"));
        assert_eq!(value(&r, "x-forwarded-proto"), Some("http"));
        assert_eq!(value(&r, "x-forwarded-host"), Some("example.test:8080"));
        for gone in ["connection", "x-drop", "te"] {
            assert!(r.headers().get(gone).is_none(), "{gone} is hop-by-hop");
        }
        let id = value(&r, "x-request-id").expect("an id");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );

        // A trusted proxy's trail is extended; IPv6 is quoted in Forwarded.
        let mut r = request(&[
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-request-id", "abc"),
        ]);
        prepare_headers(
            &mut r,
            "2001:db8::1".parse().expect("ip"),
            "https",
            true,
            None,
        );
        assert_eq!(
            value(&r, "forwarded"),
            Some("for=6.6.6.6, for=\"[2001:db8::1]\";proto=https")
        );
        assert_eq!(value(&r, "x-forwarded-for"), Some("6.6.6.6, 2001:db8::1"));
        assert_eq!(value(&r, "x-request-id"), Some("abc"));
    }

    /// Whatever the host says, `Forwarded` keeps one element, lb's: the host is a quoted-string
    /// that cannot be closed from inside.
    #[test]
    fn forwarded_host_is_a_quoted_string() {
        for (host, want) in [
            (
                r#"a.test";for=1.2.3.4;by="x"#,
                r#""a.test\";for=1.2.3.4;by=\"x""#,
            ),
            (r#"a\"#, r#""a\\""#),
            ("a.test:8080", r#""a.test:8080""#),
        ] {
            let mut r = request(&[("host", host)]);
            prepare_headers(
                &mut r,
                "192.0.2.7".parse().expect("ip"),
                "http",
                false,
                None,
            );
            assert_eq!(
                value(&r, "forwarded"),
                Some(format!("for=192.0.2.7;proto=http;host={want}").as_str()),
                "{host}"
            );
        }
    }

    #[test]
    fn upstream_uri_from_parts_equals_the_parsed_text() {
        let client = UpstreamClient::new(&ClientKey::default()).expect("client");
        for addr in ["127.0.0.1:8080", "[::1]:443"] {
            let up = Upstream::new(addr.parse().expect("addr"));
            for target in ["/", "/a/b?c=d&e", "http://h.test/x?y", "*"] {
                let t: Uri = target.parse().expect("target");
                let fast = upstream_uri(&client, &up, &t);
                let pq = t.path_and_query().map_or("/", |p| p.as_str());
                let text = upstream_uri_text(&client, up.addr, pq);
                assert_eq!(fast, text, "{addr} {target}");
            }
        }
    }
}
