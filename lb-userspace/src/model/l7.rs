//! The proxy's configuration as values: entry points, routers, services and their upstreams'
//! TLS, certificates, ACME, TCP routers. What lb.toml, Traefik's files and the KV stores produce,
//! and what the proxy builds its table from.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{
    middleware::MiddlewareConfig,
    rule::{Rule, TcpRule},
};

/// How a pool picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx's): strict rotation for equal weights, interleaved
    /// otherwise.
    #[serde(alias = "wrr", alias = "round_robin")]
    WeightedRoundRobin,
    /// Uniform over the weights.
    Random,
    /// Fewest requests in flight (weighted: in-flight / weight), ties by rotation.
    LeastRequests,
    /// Power of two choices: two random candidates, the lower `latency EWMA × (in flight + 1)`.
    P2c,
}

/// Passive health: consecutive failures (connect errors, 5xx) eject an upstream for a back-off
/// that doubles with each ejection in a row, up to 16×.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Passive {
    pub failures: u32,
    pub backoff: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            failures: 3,
            backoff: Duration::from_secs(10),
        }
    }
}

/// Active checks of a service's upstreams, Traefik's `loadBalancer.healthCheck`: each upstream
/// gets a request every `interval` (every `unhealthy_interval` while it is down); `fall` failed
/// answers in a row take it out of the pool, `rise` good ones bring it back (Traefik: 1 and 1).
/// A request to a service whose upstreams are all down gets a `503`: the check has said they
/// cannot answer, and, unlike passive ejection, that is not a guess from a few errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    pub interval: Duration,
    pub unhealthy_interval: Duration,
    pub timeout: Duration,
    /// Path and query, starting with `/`.
    pub path: String,
    /// An HTTP method token (`GET` by default, `HEAD` is common).
    pub method: String,
    /// The `Host` header (and nothing else: the address is the upstream's).
    pub hostname: Option<String>,
    /// Another port than the upstream's.
    pub port: Option<u16>,
    /// The one status that means healthy; any 2xx or 3xx when absent.
    pub status: Option<u16>,
    /// Extra request headers, validated.
    pub headers: Vec<(String, String)>,
    pub rise: u32,
    pub fall: u32,
}

impl Default for ActiveCheck {
    /// Traefik's defaults.
    fn default() -> Self {
        ActiveCheck {
            interval: Duration::from_secs(30),
            unhealthy_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            path: "/".into(),
            method: "GET".into(),
            hostname: None,
            port: None,
            status: None,
            headers: Vec::new(),
            rise: 1,
            fall: 1,
        }
    }
}

impl ActiveCheck {
    /// What a check must be to be sent as written: the same words for lb.toml and Traefik's
    /// files (the caller names the key).
    pub fn validate(&self) -> Result<(), String> {
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
        if !self.path.starts_with('/') || !printable(&self.path) || self.path.len() > 2048 {
            return Err(format!(
                "path {:?}: expected an absolute path (and query) without spaces",
                self.path
            ));
        }
        if hyper::Method::from_bytes(self.method.as_bytes()).is_err() {
            return Err(format!("method {:?} is not an HTTP method", self.method));
        }
        if let Some(h) = &self.hostname {
            if h.is_empty() || !printable(h) || h.contains(['/', '@']) {
                return Err(format!("hostname {h:?}: expected a host name"));
            }
        }
        if self.port == Some(0) {
            return Err("port 0".into());
        }
        if self.status.is_some_and(|s| !(100..=599).contains(&s)) {
            return Err("status: expected 100..=599".into());
        }
        for (k, v) in &self.headers {
            if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || hyper::header::HeaderValue::from_str(v).is_err()
            {
                return Err(format!("header {k:?}: not a valid header name and value"));
            }
        }
        let ms = Duration::from_millis;
        if self.interval < ms(100) || self.unhealthy_interval < ms(100) {
            return Err("interval and unhealthyInterval must be at least 100ms".into());
        }
        if self.timeout.is_zero() || self.timeout > self.interval.max(self.unhealthy_interval) {
            return Err("timeout must be above 0 and at most the interval".into());
        }
        if self.rise == 0 || self.fall == 0 {
            return Err("rise and fall must be at least 1".into());
        }
        Ok(())
    }
}

/// How lb talks TLS to a service's upstreams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// Roots the upstream's certificate must chain to; the system's bundle when absent.
    pub ca_file: Option<PathBuf>,
    /// lb's client certificate and key (mTLS), both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the upstream's certificate must carry (SNI too); the address otherwise.
    pub server_name: Option<String>,
}

/// A TLS version lb speaks (rustls has no older ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum TlsVersion {
    #[default]
    Tls12,
    Tls13,
}

/// Whether a handshake asks for a client certificate, and what it does with one (Traefik's
/// `clientAuthType`, Go's `tls.ClientAuthType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    #[default]
    None,
    /// Asked for; none is required, and one sent is not verified.
    Request,
    /// Required, not verified: what `passTLSClientCert` passes on is what the client says.
    RequireAny,
    /// Verified when sent.
    VerifyIfGiven,
    RequireAndVerify,
}

/// A handshake policy routers choose by name (Traefik's `tls.options`). The client's SNI picks
/// one before any request is read: the options of the routers whose `Host` names it, else
/// `default`. A router then answers only connections made under its own options, so a Host
/// header cannot lead past what the handshake did not ask (421).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    pub min_version: TlsVersion,
    /// `None`: the newest lb has.
    pub max_version: Option<TlsVersion>,
    /// rustls's names of the TLS 1.2 suites allowed, in the server's order of preference;
    /// empty: all of lb's. TLS 1.3's are always all, as in Go.
    pub cipher_suites: Vec<String>,
    /// rustls's names of the key exchange groups, in order; empty: all of lb's.
    pub curves: Vec<String>,
    pub client_auth: ClientAuth,
    /// PEM of the CAs a client certificate must chain to (when verified).
    pub client_ca_pem: Vec<u8>,
    /// Refuse a handshake whose SNI is missing or names no certificate lb has (rather than
    /// answer with the default one).
    pub sni_strict: bool,
    /// ALPN protocols offered, in order; `None`: `h2`, `http/1.1`.
    pub alpn: Option<Vec<String>>,
    /// No resumption: neither TLS 1.3 tickets nor a TLS 1.2 session cache.
    pub disable_session_tickets: bool,
}

/// The TLS 1.2 suites lb offers: Go's (Traefik's) name and rustls's. All are AEADs with
/// forward secrecy; TLS 1.3's suites are always all offered, as in Go.
pub const TLS12_SUITES: &[(&str, &str)] = &[
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
];

/// The key exchange groups lb offers: Go's (Traefik's) names for each, and rustls's.
pub const KX_GROUPS: &[(&str, &str)] = &[
    ("X25519", "X25519"),
    ("x25519", "X25519"),
    ("CurveP256", "secp256r1"),
    ("secp256r1", "secp256r1"),
    ("CurveP384", "secp384r1"),
    ("secp384r1", "secp384r1"),
];

/// The name of the options a router without any uses, and a handshake whose SNI no router's
/// options claim.
pub const DEFAULT_TLS_OPTIONS: &str = "default";

/// One entry point's bounds (see the module's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes per second; 0: only the gap counts.
    pub body_min_rate: u64,
    pub write_timeout: Duration,
    /// `None`: no PINGs.
    pub h2_keepalive: Option<Duration>,
    pub h2_max_streams: u32,
    pub max_connections: usize,
}

impl Default for ConnLimits {
    /// Safe for a server on the internet: nginx's and Traefik's orders of magnitude, and an
    /// upload at dial-up speed still gets through.
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            body_min_rate: 512,
            write_timeout: Duration::from_secs(60),
            h2_keepalive: Some(Duration::from_secs(30)),
            h2_max_streams: 100,
            max_connections: 10_000,
        }
    }
}

/// A certificate as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    /// Served when the client's name matches no certificate (or it sends none).
    pub default: bool,
}

/// How the CA validates control of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// The CA fetches `http://<name>/.well-known/acme-challenge/<token>` (port 80).
    Http01,
    /// The CA connects with TLS to `<name>:443` offering only ALPN `acme-tls/1`.
    TlsAlpn01,
}

/// `[acme]` as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSpec {
    /// The resolver's name in a Traefik install configuration: routers whose
    /// `tls.certResolver` names it add their names to `domains`. `None` (lb.toml's `[acme]`):
    /// every router's that names a resolver.
    pub resolver: Option<String>,
    /// The directory URL (https).
    pub directory: String,
    pub email: Option<String>,
    pub challenge: ChallengeKind,
    /// One certificate per name; lowercase DNS names, no wildcards.
    pub domains: Vec<String>,
    /// A root trusted for the directory's HTTPS besides the system's (a private or test CA).
    pub ca_file: Option<PathBuf>,
    pub renew_before: Duration,
}

/// What a TCP router does with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Not TLS: bytes relayed as they come (only `HostSNI(`*`)` can match).
    Plain,
    /// TLS relayed encrypted; the upstream terminates it.
    Passthrough,
    /// lb terminates TLS with its certificates; the upstream gets the plaintext.
    Terminate,
}

/// A `[[tcp_router]]` as configured.
#[derive(Debug, Clone)]
pub struct TcpRouterSpec {
    pub name: String,
    /// Entry points it serves; empty: all.
    pub entrypoints: Vec<String>,
    pub rule: TcpRule,
    pub rule_text: String,
    pub priority: Option<i64>,
    /// A registry service: its instances are the upstreams.
    pub service: String,
    pub tls: TlsMode,
    /// The [`TlsOptions`] a terminated handshake is made under; `None`: `default`.
    pub tls_options: Option<String>,
    /// What a connection must pass before it is served (Traefik's TCP middlewares).
    pub guards: TcpGuards,
}

/// Traefik's TCP middlewares: checked on every connection before anything is read or relayed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpGuards {
    /// `ipAllowList`s: the client's address must be in each of them (one list per middleware).
    pub allow: Vec<Vec<ipnet::IpNet>>,
    /// `inFlightConn`: connections at once from one client address (the smallest of several).
    pub in_flight_per_ip: Option<u32>,
}

/// Equal when configured the same (the compiled rule follows from its text).
impl PartialEq for TcpRouterSpec {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.name,
            &self.entrypoints,
            &self.rule_text,
            self.priority,
            &self.service,
            self.tls,
            &self.tls_options,
            &self.guards,
        ) == (
            &o.name,
            &o.entrypoints,
            &o.rule_text,
            o.priority,
            &o.service,
            o.tls,
            &o.tls_options,
            &o.guards,
        )
    }
}

impl Eq for TcpRouterSpec {}

/// A router as configured.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    pub name: String,
    /// Entry points it serves; empty: all.
    pub entrypoints: Vec<String>,
    pub rule: Rule,
    pub rule_text: String,
    pub priority: Option<i64>,
    pub service: String,
    /// Names of `[[middleware]]`s, run in this order.
    pub middlewares: Vec<String>,
    /// Traefik's routers serve either TLS or plain HTTP (`tls` present or not); on an entry
    /// point that takes both ([`EntryPointSpec::also_plain`]) such a router matches only
    /// connections of its kind, so a plain router cannot answer what a TLS router guards.
    /// `None` (lb.toml's): any connection its entry point takes.
    pub tls: Option<bool>,
    /// The [`TlsOptions`] it needs its TLS connections made under; `None`: `default`.
    pub tls_options: Option<String>,
}

/// Equal when configured the same (the compiled rule follows from its text).
impl PartialEq for RouterSpec {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.name,
            &self.entrypoints,
            &self.rule_text,
            self.priority,
            &self.service,
            self.tls,
            &self.tls_options,
        ) == (
            &o.name,
            &o.entrypoints,
            &o.rule_text,
            o.priority,
            &o.service,
            o.tls,
            &o.tls_options,
        )
    }
}

impl Eq for RouterSpec {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPointSpec {
    pub name: String,
    pub address: SocketAddr,
    /// Terminate TLS here (certificates from `[[certificate]]`).
    pub tls: bool,
    /// mTLS: clients must present a certificate signed by this CA.
    pub client_ca_file: Option<std::path::PathBuf>,
    /// Clients whose `X-Forwarded-*` / `Forwarded` headers are believed (other proxies). From
    /// anyone else those headers are replaced, never extended: a client cannot forge its origin.
    pub trusted_ips: Vec<ipnet::IpNet>,
    /// How long, and how much, a client connection may hold while it does nothing useful.
    pub limits: ConnLimits,
    /// With `tls`: plain HTTP on the same port too, told apart by the client's first byte (a
    /// TLS record starts with 0x16, an HTTP request with a letter), as Traefik's entry points
    /// serve both.
    pub also_plain: bool,
    /// Routers that name no entry point serve the entry points marked so (Traefik's
    /// `asDefault`), or every one when none is.
    pub as_default: bool,
    /// The PROXY protocol: connections from these sources may start with a header naming the
    /// client, which then is the client for everything after. `None`: no header is looked for.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
}

/// How a service's upstreams are balanced, checked, retried and timed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub algorithm: Algorithm,
    pub passive: Passive,
    /// Extra attempts on other upstreams for a replayable request that got no answer.
    pub retries: u32,
    /// No answer within this: 504 (and a failure for passive health).
    pub request_timeout: Option<std::time::Duration>,
    /// Sticky sessions: the cookie that pins a client to its upstream.
    pub sticky_cookie: Option<String>,
    /// TLS to the upstreams (verified; optionally with lb's client certificate).
    pub tls: Option<UpstreamTls>,
    /// A copy of a share of the requests goes to another service; its answers are dropped.
    pub mirror: Option<Mirror>,
    /// Connecting to an upstream (TCP and TLS) must finish within this.
    pub connect_timeout: std::time::Duration,
    /// Pooled keep-alive connections to the upstreams unused this long are closed.
    pub idle_timeout: std::time::Duration,
    /// Connections in use to each upstream (one per request in flight, from the send to the
    /// answer's end). Beyond it a request waits up to `connect_timeout`, then gets a `503`.
    pub max_connections: usize,
    /// Active checks of its upstreams; passive ejection only when absent.
    pub health: Option<ActiveCheck>,
    /// A service made of services: it has no upstreams of its own.
    pub composite: Option<Composite>,
    /// `None`: the upstreams get the client's `Host` (Traefik's `passHostHeader: true`).
    /// `Some`: each gets its own, the name its server URL had (by address), or else its
    /// address; the client's stays in `X-Forwarded-Host`.
    pub upstream_host: Option<std::collections::BTreeMap<SocketAddr, String>>,
    /// HTTP/2 to the upstreams: with TLS offered by ALPN beside HTTP/1.1 (the upstream picks),
    /// without it spoken from the first byte (h2c, what gRPC servers without TLS expect).
    pub http2: bool,
}

/// A service made of other services (Traefik's `weighted` and `failover`), by name. A service it
/// names may be a composite too, up to [`MAX_COMPOSITE_DEPTH`] deep; one that has no upstream to
/// send to (all taken out by their active checks, or none) is passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Composite {
    /// Requests shared by weight (smooth weighted round robin) among the services that can take
    /// them.
    Weighted(Vec<(String, u32)>),
    /// Everything to `main` while it has an upstream to send to, else to `fallback`.
    Failover { main: String, fallback: String },
}

/// How many composites a request may pass through to reach upstreams (a loop would be endless).
pub const MAX_COMPOSITE_DEPTH: usize = 8;

impl Composite {
    /// The services it names.
    pub fn children(&self) -> Vec<&str> {
        match self {
            Composite::Weighted(list) => list.iter().map(|(n, _)| n.as_str()).collect(),
            Composite::Failover { main, fallback } => vec![main.as_str(), fallback.as_str()],
        }
    }
}

/// Connecting to an upstream (TCP and TLS), unless a service says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled keep-alive connection to an upstream unused this long is closed, unless a service
/// says otherwise.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Connections in use to one upstream, unless a service says otherwise.
pub const DEFAULT_MAX_UPSTREAM_CONNECTIONS: usize = 1024;

/// Shadow traffic: each target gets a copy of its `percent` of the requests, drawn on its own
/// (fire and forget: the answers are dropped). With `body`, a request with a body is mirrored
/// only when the body is at most `max_body_bytes` (it is read whole to be sent twice); without,
/// copies go with no body (Traefik's `mirrorBody: false`) and nothing is held.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub targets: Vec<MirrorTarget>,
    pub max_body_bytes: usize,
    pub body: bool,
}

impl Eq for Mirror {}

#[derive(Debug, Clone, PartialEq)]
pub struct MirrorTarget {
    pub service: String,
    pub percent: f64,
}

impl Mirror {
    /// The services copies go to.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|t| t.service.as_str())
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            algorithm: Algorithm::WeightedRoundRobin,
            passive: Passive::default(),
            retries: 0,
            request_timeout: None,
            sticky_cookie: None,
            tls: None,
            mirror: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_UPSTREAM_CONNECTIONS,
            health: None,
            composite: None,
            upstream_host: None,
            http2: false,
        }
    }
}

/// One provider's L7 configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dynamic {
    pub routers: Vec<RouterSpec>,
    pub services: std::collections::HashMap<String, ServiceSpec>,
    pub middlewares: Vec<(String, MiddlewareConfig)>,
    pub certificates: Vec<CertSpec>,
    pub tcp_routers: Vec<TcpRouterSpec>,
    /// Certificates its routers ask an ACME resolver for (Traefik's `tls.certResolver`).
    pub acme: Vec<AcmeWish>,
    /// Handshake policies its routers name (Traefik's `tls.options`).
    /// Shared: the same value stays the same allocation across merges and table builds, so
    /// the per-request check that a connection's options are current is a pointer comparison.
    pub tls_options: std::collections::BTreeMap<String, std::sync::Arc<TlsOptions>>,
    /// Why its `default` options could not be used, if it defined some: then no handshake
    /// anywhere falls back to lb's own policy in their place.
    pub tls_default_broken: Option<String>,
}

/// Names a router wants a certificate for from a resolver: its `tls.domains`, else the hosts
/// its rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeWish {
    pub resolver: String,
    pub names: Vec<String>,
}
