//! The agent's configuration file (TOML).
//!
//! Parsing happens in two steps so every error can name the file, the line and the field: serde
//! (through `toml`) reports syntax, unknown fields and type errors with their position; then
//! [`validate`] checks meaning (addresses, modes, duplicates) on values that kept their spans.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::model::{
    valid_name, AttachMode, BackendSpec, CheckKind, ClusterSpec, EtcdAuth, EtcdSpec, EtcdTls,
    FileProviderSpec, HealthSpec, Limits, Mac, Mode, Protocol, ProvidersSpec, RedisSpec, VipSpec,
};

/// A configuration error: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no position (e.g. the file cannot be read).
    pub line: usize,
    /// Dotted path of the field, e.g. `vip[0].backend[2].address`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

// ------------------------------------------------------------------ the file, as written

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    providers: RawProviders,
    #[serde(default)]
    vip: Vec<Spanned<RawVip>>,
    #[serde(default)]
    entrypoint: Vec<Spanned<RawEntryPoint>>,
    #[serde(default)]
    router: Vec<Spanned<RawRouter>>,
    #[serde(default)]
    http_service: Vec<Spanned<RawHttpService>>,
    #[serde(default)]
    tcp_router: Vec<Spanned<RawTcpRouter>>,
    #[serde(default)]
    certificate: Vec<Spanned<RawCertificate>>,
    #[serde(default)]
    middleware: Vec<Spanned<RawMiddleware>>,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    acme: Option<Spanned<RawAcme>>,
    #[serde(default)]
    access_log: Option<Spanned<RawAccessLog>>,
    #[serde(default)]
    cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    bgp: Option<Spanned<RawBgp>>,
}

/// `[bgp]`: announcing the VIPs through the bird2 beside the agent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgp {
    #[serde(default = "d_bird_socket")]
    socket: Spanned<PathBuf>,
    include: Spanned<PathBuf>,
    local_as: Spanned<u32>,
    #[serde(default = "d_hold")]
    hold_time_secs: Spanned<u64>,
    #[serde(default)]
    med: Option<u32>,
    #[serde(default)]
    communities: Vec<Spanned<String>>,
    #[serde(default)]
    large_communities: Vec<Spanned<String>>,
    /// Default: the first of `agent.interfaces`.
    #[serde(default)]
    interface: Option<Spanned<String>>,
    #[serde(default = "d_drain")]
    drain_secs: Spanned<u64>,
    #[serde(default)]
    neighbor: Vec<Spanned<RawNeighbor>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNeighbor {
    address: Spanned<String>,
    #[serde(rename = "as")]
    asn: Spanned<u32>,
    #[serde(default = "d_bgp_port")]
    port: u16,
}

fn d_bird_socket() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/run/bird/bird.ctl"))
}
fn d_hold() -> Spanned<u64> {
    Spanned::new(0..0, 90)
}
fn d_drain() -> Spanned<u64> {
    Spanned::new(0..0, 5)
}
fn d_bgp_port() -> u16 {
    179
}

/// `[access_log]`: one line per proxied request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    /// A file, or "stdout" (the default).
    #[serde(default)]
    path: Option<Spanned<String>>,
    /// "json" (default) or "common".
    #[serde(default)]
    format: Option<Spanned<String>>,
    /// Lines that may wait for the writer (default 4096); beyond that they are dropped.
    #[serde(default)]
    buffer: Option<Spanned<usize>>,
    /// Statuses to log: "404", "4xx", "500-599" (default: all).
    #[serde(default)]
    status: Vec<Spanned<String>>,
    /// Share of the (filtered) requests logged, default 1.0.
    #[serde(default)]
    sample: Option<Spanned<f64>>,
}

/// `[acme]`: certificates from an ACME CA for the TLS entry points.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    directory: Spanned<String>,
    #[serde(default)]
    email: Option<Spanned<String>>,
    #[serde(default = "d_challenge")]
    challenge: Spanned<String>,
    domains: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    ca_file: Option<Spanned<PathBuf>>,
    #[serde(default = "d_renew_before")]
    renew_before_days: Spanned<u32>,
}

fn d_challenge() -> Spanned<String> {
    Spanned::new(0..0, "http-01".into())
}
fn d_renew_before() -> Spanned<u32> {
    Spanned::new(0..0, 30)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    /// Issue certificates for unknown names from a development CA in the state directory.
    #[serde(default)]
    dev_ca: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpService {
    name: Spanned<String>,
    #[serde(default = "d_algorithm")]
    algorithm: crate::model::l7::Algorithm,
    #[serde(default = "d_passive_failures")]
    passive_failures: u32,
    #[serde(default = "d_passive_backoff")]
    passive_backoff_secs: u64,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    request_timeout_ms: u64,
    #[serde(default)]
    sticky_cookie: Option<String>,
    #[serde(default)]
    tls: Option<Spanned<RawUpstreamTls>>,
    #[serde(default)]
    mirror: Option<Spanned<RawMirror>>,
    #[serde(default = "d_connect_timeout")]
    connect_timeout_ms: u64,
    #[serde(default = "d_idle_timeout")]
    idle_timeout_secs: u64,
    #[serde(default)]
    max_connections: Option<Spanned<u64>>,
    #[serde(default)]
    health: Option<Spanned<RawActiveCheck>>,
    /// A service made of services: `weighted = [{ service = "v1", weight = 9 }, …]` …
    #[serde(default)]
    weighted: Option<Spanned<Vec<RawWeighted>>>,
    /// … or `failover = { main = "eu", fallback = "us" }`.
    #[serde(default)]
    failover: Option<Spanned<RawFailover>>,
    /// `false`: the upstreams get their own address as `Host` (Traefik's `passHostHeader`).
    #[serde(default = "d_true")]
    pass_host_header: bool,
    /// HTTP/2 to the upstreams: by ALPN with `tls`, h2c (prior knowledge) without.
    #[serde(default)]
    http2: bool,
}

fn d_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeighted {
    service: String,
    #[serde(default = "d_one")]
    weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    main: String,
    fallback: String,
}

/// `health = { path = "/healthz", interval_ms = 2000 }` of an `[[http_service]]`: active
/// checks of its upstreams (Traefik's defaults where unsaid, but 1 s timeouts and 10 s
/// intervals are more usual here, so say them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActiveCheck {
    #[serde(default = "d_check_path")]
    path: String,
    #[serde(default = "d_check_method")]
    method: String,
    #[serde(default = "d_check_interval")]
    interval_ms: u64,
    #[serde(default)]
    unhealthy_interval_ms: Option<u64>,
    #[serde(default = "d_check_timeout")]
    timeout_ms: u64,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default = "d_one")]
    rise: u32,
    #[serde(default = "d_one")]
    fall: u32,
}

fn d_check_path() -> String {
    "/".into()
}
fn d_check_method() -> String {
    "GET".into()
}
fn d_check_interval() -> u64 {
    30_000
}
fn d_check_timeout() -> u64 {
    5_000
}
fn d_one() -> u32 {
    1
}

/// Whether following `name`'s composites comes back to a service on `path` (left holding the
/// loop when it does).
fn composite_loop(
    services: &std::collections::HashMap<String, crate::model::l7::ServiceSpec>,
    name: &str,
    path: &mut Vec<String>,
) -> bool {
    let Some(c) = services.get(name).and_then(|s| s.composite.as_ref()) else {
        return false;
    };
    for child in c.children() {
        let seen = path.iter().any(|p| p == child);
        path.push(child.to_string());
        if seen || composite_loop(services, child, path) {
            return true;
        }
        path.pop();
    }
    false
}

fn d_connect_timeout() -> u64 {
    5000
}
fn d_idle_timeout() -> u64 {
    90
}

/// `tls = { … }` of an `[[http_service]]`: TLS to its upstreams.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    server_name: Option<String>,
}

/// `mirror = { service = "shadow", percent = 10 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    service: String,
    #[serde(default = "d_percent")]
    percent: f64,
    #[serde(default = "d_mirror_body")]
    max_body_bytes: usize,
    /// `false`: copies go without the request's body (nothing is held for them).
    #[serde(default = "d_true")]
    body: bool,
}

fn d_percent() -> f64 {
    100.0
}
fn d_mirror_body() -> usize {
    64 * 1024
}

fn d_algorithm() -> crate::model::l7::Algorithm {
    crate::model::l7::Algorithm::WeightedRoundRobin
}
fn d_passive_failures() -> u32 {
    3
}
fn d_passive_backoff() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntryPoint {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    forwarded_trusted_ips: Vec<String>,
    /// PROXY protocol headers are believed from these sources (and looked for from no other).
    #[serde(default)]
    proxy_protocol_trusted_ips: Option<Vec<String>>,
    /// Bounds on client connections ([`crate::model::l7::ConnLimits`]); every one has a safe default.
    #[serde(default)]
    header_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    idle_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    body_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    body_min_rate: Option<Spanned<u64>>,
    #[serde(default)]
    write_timeout_secs: Option<Spanned<u64>>,
    #[serde(default)]
    h2_keepalive_secs: Option<Spanned<u64>>,
    #[serde(default)]
    h2_max_streams: Option<Spanned<u64>>,
    #[serde(default)]
    max_connections: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouter {
    name: Spanned<String>,
    rule: Spanned<String>,
    service: Spanned<String>,
    #[serde(default)]
    entrypoints: Vec<String>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    middlewares: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcpRouter {
    name: Spanned<String>,
    rule: Spanned<String>,
    service: Spanned<String>,
    #[serde(default)]
    entrypoints: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    priority: Option<i64>,
    /// "passthrough" or "terminate"; absent: plain TCP.
    #[serde(default)]
    tls: Option<Spanned<String>>,
    /// Only clients from these addresses or CIDRs are served (Traefik's TCP `ipAllowList`).
    #[serde(default)]
    allow_ips: Option<Spanned<Vec<String>>>,
    /// Connections at once from one client address (Traefik's `inFlightConn`).
    #[serde(default)]
    in_flight_per_ip: Option<Spanned<u64>>,
}

/// `[[middleware]]`: a name and exactly one kind (`strip_prefix = { … }`, …).
#[derive(Debug, Deserialize)]
struct RawMiddleware {
    name: Spanned<String>,
    #[serde(flatten)]
    kind: crate::model::middleware::MiddlewareConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProviders {
    #[serde(default)]
    file: Vec<Spanned<RawFileProvider>>,
    #[serde(default)]
    redis: Option<RawRedis>,
    #[serde(default)]
    etcd: Option<RawEtcd>,
    #[serde(default)]
    dns: Option<Spanned<RawDns>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    resolver: Option<String>,
    #[serde(default)]
    refresh_s: Option<u64>,
    #[serde(default = "d_min_ttl")]
    min_ttl_ms: u64,
}

fn d_min_ttl() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileProvider {
    path: PathBuf,
    #[serde(default = "d_debounce")]
    debounce_ms: u64,
}

fn d_debounce() -> u64 {
    200
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Spanned<String>,
    #[serde(default = "d_prefix")]
    prefix: String,
    /// Also read a Traefik configuration stored under this root (Traefik's KV layout).
    #[serde(default)]
    traefik_root: Option<String>,
    /// The only directories its records may name files in.
    #[serde(default)]
    traefik_file_dirs: Vec<Spanned<PathBuf>>,
    #[serde(default = "d_resync")]
    resync_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Vec<String>,
    #[serde(default = "d_prefix")]
    prefix: String,
    #[serde(default)]
    traefik_root: Option<String>,
    #[serde(default)]
    traefik_file_dirs: Vec<Spanned<PathBuf>>,
    // How lb reaches etcd, the same for the provider and the cluster store.
    /// etcd's RBAC user; its password is read from `password_file`.
    #[serde(default)]
    username: Option<Spanned<String>>,
    #[serde(default)]
    password_file: Option<Spanned<PathBuf>>,
    /// TLS: the CA of etcd's certificate (the endpoints must be `https://`).
    #[serde(default)]
    ca: Option<Spanned<PathBuf>>,
    #[serde(default)]
    cert: Option<Spanned<PathBuf>>,
    #[serde(default)]
    key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    server_name: Option<Spanned<String>>,
}

/// `[cluster]`: nodes that share the API store and publish their status in one etcd prefix.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    /// Default: the host name.
    #[serde(default)]
    node: Option<Spanned<String>>,
    #[serde(default = "d_status_ttl")]
    status_ttl_secs: Spanned<u64>,
    /// As `[providers.etcd]`, without a Traefik root: the store's layout is lb's own.
    etcd: Spanned<RawEtcd>,
}

fn d_status_ttl() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}

fn d_prefix() -> String {
    "lb/".into()
}
fn d_resync() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "d_check")]
    check: Spanned<String>,
    #[serde(default = "d_interval")]
    interval_ms: u64,
    #[serde(default = "d_timeout")]
    timeout_ms: u64,
    #[serde(default = "d_rise")]
    rise: u32,
    #[serde(default = "d_fall")]
    fall: u32,
    #[serde(default = "d_path")]
    path: String,
    #[serde(default)]
    port: u16,
}

fn d_check() -> Spanned<String> {
    Spanned::new(0..0, "tcp".into())
}
fn d_interval() -> u64 {
    1000
}
fn d_timeout() -> u64 {
    500
}
fn d_rise() -> u32 {
    2
}
fn d_fall() -> u32 {
    3
}
fn d_path() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    #[serde(default = "default_instance")]
    instance: Spanned<String>,
    #[serde(default = "default_pin_root")]
    pin_root: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default = "default_attach")]
    xdp_mode: AttachMode,
    /// Forward kernel-side (aya-log) messages; costs packet-path cycles.
    #[serde(default)]
    debug: bool,
}

impl Default for RawAgent {
    fn default() -> Self {
        RawAgent {
            instance: default_instance(),
            pin_root: default_pin_root(),
            state_dir: default_state_dir(),
            interfaces: Vec::new(),
            xdp_mode: default_attach(),
            debug: false,
        }
    }
}

fn default_instance() -> Spanned<String> {
    Spanned::new(0..0, "default".into())
}
fn default_pin_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lb")
}
fn default_attach() -> AttachMode {
    AttachMode::Auto
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    #[serde(default = "d_max_vips")]
    max_vips: Spanned<u32>,
    #[serde(default = "d_max_backends")]
    max_backends: Spanned<u32>,
    #[serde(default = "d_ring_size")]
    ring_size: Spanned<u32>,
    #[serde(default = "d_max_flows")]
    max_flows: Spanned<u32>,
    #[serde(default = "d_udp_timeout")]
    udp_timeout_secs: u64,
    #[serde(default = "d_ipip4")]
    ipip_source_v4: std::net::Ipv4Addr,
    #[serde(default = "d_ipip6")]
    ipip_source_v6: std::net::Ipv6Addr,
}

fn d_ipip4() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(172, 16, 0, 0)
}
fn d_ipip6() -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 0)
}

impl Default for RawDataplane {
    fn default() -> Self {
        RawDataplane {
            max_vips: d_max_vips(),
            max_backends: d_max_backends(),
            ring_size: d_ring_size(),
            max_flows: d_max_flows(),
            udp_timeout_secs: d_udp_timeout(),
            ipip_source_v4: d_ipip4(),
            ipip_source_v6: d_ipip6(),
        }
    }
}

fn d_max_vips() -> Spanned<u32> {
    Spanned::new(0..0, 64)
}
fn d_max_backends() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}
fn d_ring_size() -> Spanned<u32> {
    Spanned::new(0..0, lb_common::DEFAULT_RING_SIZE)
}
fn d_max_flows() -> Spanned<u32> {
    Spanned::new(0..0, 262_144)
}
fn d_udp_timeout() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    #[serde(default = "d_listen")]
    listen: Spanned<String>,
    #[serde(default)]
    token: Option<Spanned<String>>,
}

/// The shortest admin token accepted (16 characters; `openssl rand -hex 32` gives 64). The API
/// changes the maps of a root agent: a token that can be guessed, or an empty one that a bare
/// `Authorization: Bearer ` matches, must not start it.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why `token` cannot guard the admin API, if it cannot: shorter than [`MIN_TOKEN_LEN`], or with
/// characters an `Authorization` header cannot carry as they are (then it could never match,
/// and an operator would be locked out wondering why).
pub fn check_token(token: &str) -> Result<(), TokenError> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort(token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotVisibleAscii);
    }
    Ok(())
}

/// Why [`check_token`] refuses a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{0} characters: an admin token needs at least {MIN_TOKEN_LEN} (generate one with `openssl rand -hex 32`)")]
    TooShort(usize),
    #[error("only visible ASCII characters (no spaces) can be sent as a bearer token")]
    NotVisibleAscii,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            listen: d_listen(),
            token: None,
        }
    }
}

fn d_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:9090".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    port: u16,
    #[serde(default = "d_proto")]
    protocol: Spanned<String>,
    #[serde(default = "d_mode")]
    mode: Spanned<String>,
    /// The registry service whose instances are this VIP's backends (default: the VIP's name).
    #[serde(default)]
    service: Option<Spanned<String>>,
    #[serde(default)]
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

fn d_proto() -> Spanned<String> {
    Spanned::new(0..0, "tcp".into())
}
fn d_mode() -> Spanned<String> {
    Spanned::new(0..0, "dsr".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    #[serde(default)]
    port: u16,
    #[serde(default = "d_weight")]
    weight: Spanned<u32>,
    #[serde(default)]
    mac: Option<Spanned<String>>,
}

fn d_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

// ------------------------------------------------------------------ the validated config

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub instance: String,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub interfaces: Vec<String>,
    pub xdp_mode: AttachMode,
    pub debug: bool,
    pub limits: Limits,
    pub api_listen: SocketAddr,
    pub api_token: Option<String>,
    pub providers: ProvidersSpec,
    pub vips: Vec<VipSpec>,
    /// L7: listeners and routers (empty: no proxy).
    pub entrypoints: Vec<crate::model::l7::EntryPointSpec>,
    pub routers: Vec<crate::model::l7::RouterSpec>,
    /// L4 routers on the entry points: by TLS server name, passthrough, termination or plain.
    pub tcp_routers: Vec<crate::model::l7::TcpRouterSpec>,
    /// L7 balancing per registry service (default: smooth WRR, passive health 3 × / 10 s).
    pub http_services: std::collections::HashMap<String, crate::model::l7::ServiceSpec>,
    /// TLS certificates for the entry points with `tls = true` (chosen by SNI).
    pub certificates: Vec<crate::model::l7::CertSpec>,
    /// `[tls] dev_ca`: a development CA issues certificates for names no certificate covers.
    pub tls_dev_ca: bool,
    /// `[acme]`: certificates ordered from an ACME CA.
    pub acme: Option<crate::model::l7::AcmeSpec>,
    /// Middlewares by name (validated: each builds).
    pub middlewares: Vec<(String, crate::model::middleware::MiddlewareConfig)>,
    /// `[access_log]`: off when absent.
    pub access_log: Option<crate::observe::access_log::AccessLogSpec>,
    /// `[cluster]`: absent, the node is alone (its API store is a file).
    pub cluster: Option<ClusterSpec>,
    /// `[bgp]`: absent, nothing is announced (the routers are configured by hand).
    pub bgp: Option<crate::model::bgp::BgpSpec>,
    /// What a Traefik install configuration asks for that lb does differently or not at all, by
    /// key path. A note that says `left out` names something lb will not serve (an error for
    /// `lb check-config`); the others are warnings.
    pub notes: Vec<String>,
}

fn bgp_spec(
    b: &Spanned<RawBgp>,
    interfaces: &[String],
    err: ErrFn<'_>,
) -> Result<crate::model::bgp::BgpSpec, ConfigError> {
    let r = b.get_ref();
    let at = |s: std::ops::Range<usize>| if s == (0..0) { b.span() } else { s };
    for (what, p) in [("socket", &r.socket), ("include", &r.include)] {
        if !p.get_ref().is_absolute() {
            return Err(err(
                at(p.span()),
                format!("bgp.{what}"),
                format!("{:?}: must be an absolute path", p.get_ref()),
            ));
        }
    }
    let asn_ok = |a: u32| (1..=4_294_967_294).contains(&a);
    if !asn_ok(*r.local_as.get_ref()) {
        return Err(err(
            r.local_as.span(),
            "bgp.local_as".into(),
            "out of range 1..=4294967294".into(),
        ));
    }
    let hold = *r.hold_time_secs.get_ref();
    if !(3..=65_535).contains(&hold) {
        return Err(err(
            at(r.hold_time_secs.span()),
            "bgp.hold_time_secs".into(),
            format!("{hold}: out of range 3..=65535"),
        ));
    }
    if r.neighbor.is_empty() {
        return Err(err(
            b.span(),
            "bgp.neighbor".into(),
            "at least one [[bgp.neighbor]] (address, as)".into(),
        ));
    }
    let mut neighbors = Vec::new();
    for (i, n) in r.neighbor.iter().enumerate() {
        let n = n.get_ref();
        let address = n.address.get_ref().parse::<IpAddr>().map_err(|_| {
            err(
                n.address.span(),
                format!("bgp.neighbor[{i}].address"),
                format!("{:?} is not an IP address", n.address.get_ref()),
            )
        })?;
        if !asn_ok(*n.asn.get_ref()) {
            return Err(err(
                n.asn.span(),
                format!("bgp.neighbor[{i}].as"),
                "out of range 1..=4294967294".into(),
            ));
        }
        neighbors.push(crate::model::bgp::Neighbor {
            address,
            asn: *n.asn.get_ref(),
            port: n.port,
        });
    }
    let mut communities = Vec::new();
    for (i, c) in r.communities.iter().enumerate() {
        let parsed = c
            .get_ref()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)));
        communities.push(parsed.ok_or_else(|| {
            err(
                c.span(),
                format!("bgp.communities[{i}]"),
                format!(
                    "{:?}: a community is \"asn:value\", each 0..=65535",
                    c.get_ref()
                ),
            )
        })?);
    }
    let mut large_communities = Vec::new();
    for (i, c) in r.large_communities.iter().enumerate() {
        let parts: Vec<Option<u32>> = c.get_ref().split(':').map(|p| p.parse().ok()).collect();
        match parts.as_slice() {
            [Some(a), Some(b), Some(c)] => large_communities.push((*a, *b, *c)),
            _ => {
                return Err(err(
                    c.span(),
                    format!("bgp.large_communities[{i}]"),
                    format!(
                        "{:?}: a large community is \"global:local1:local2\"",
                        c.get_ref()
                    ),
                ))
            }
        }
    }
    let interface = match &r.interface {
        Some(i) if interfaces.contains(i.get_ref()) => i.get_ref().clone(),
        Some(i) => {
            return Err(err(
                i.span(),
                "bgp.interface".into(),
                format!("{:?} is not one of agent.interfaces", i.get_ref()),
            ))
        }
        None => interfaces.first().cloned().ok_or_else(|| {
            err(
                b.span(),
                "bgp.interface".into(),
                "the VIPs' routes need an interface: set agent.interfaces".into(),
            )
        })?,
    };
    Ok(crate::model::bgp::BgpSpec {
        socket: r.socket.get_ref().clone(),
        include: r.include.get_ref().clone(),
        local_as: *r.local_as.get_ref(),
        neighbors,
        hold_time: Duration::from_secs(hold),
        med: r.med,
        communities,
        large_communities,
        interface,
        drain: Duration::from_secs(*r.drain_secs.get_ref().min(&3600)),
    })
}

/// The etcd user and TLS settings shared by `[providers.etcd]` and `[cluster.etcd]`. The
/// password file is read now, so a missing one is a config error, not a failure later.
fn etcd_access(
    a: &RawEtcd,
    endpoints: &[String],
    at: &str,
    err: ErrFn<'_>,
) -> Result<(Option<EtcdAuth>, Option<EtcdTls>), ConfigError> {
    let auth = match (&a.username, &a.password_file) {
        (None, None) => None,
        (Some(u), Some(p)) => {
            let password = std::fs::read_to_string(p.get_ref()).map_err(|e| {
                err(
                    p.span(),
                    format!("{at}.password_file"),
                    format!("{}: {e}", p.get_ref().display()),
                )
            })?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if u.get_ref().is_empty() || password.is_empty() {
                return Err(err(
                    u.span(),
                    format!("{at}.username"),
                    "the user and its password must not be empty".into(),
                ));
            }
            Some(EtcdAuth {
                username: u.get_ref().clone(),
                password,
            })
        }
        (Some(u), None) => {
            return Err(err(
                u.span(),
                format!("{at}.password_file"),
                "a username needs its password_file".into(),
            ))
        }
        (None, Some(p)) => {
            return Err(err(
                p.span(),
                format!("{at}.username"),
                "a password_file needs its username".into(),
            ))
        }
    };
    let tls = match &a.ca {
        None => {
            if let Some(c) = a.cert.as_ref().or(a.key.as_ref()) {
                return Err(err(
                    c.span(),
                    format!("{at}.ca"),
                    "a client certificate needs the CA of etcd's (TLS to etcd)".into(),
                ));
            }
            None
        }
        Some(ca) => {
            for (what, f) in [
                ("ca", Some(ca)),
                ("cert", a.cert.as_ref()),
                ("key", a.key.as_ref()),
            ] {
                if let Some(f) = f {
                    if let Err(e) = std::fs::metadata(f.get_ref()) {
                        return Err(err(
                            f.span(),
                            format!("{at}.{what}"),
                            format!("{}: {e}", f.get_ref().display()),
                        ));
                    }
                }
            }
            if a.cert.is_some() != a.key.is_some() {
                let s = a.cert.as_ref().or(a.key.as_ref()).map(|s| s.span());
                return Err(err(
                    s.unwrap_or(0..0),
                    format!("{at}.cert"),
                    "a client certificate needs both cert and key".into(),
                ));
            }
            Some(EtcdTls {
                ca: ca.get_ref().clone(),
                cert: a.cert.as_ref().map(|c| c.get_ref().clone()),
                key: a.key.as_ref().map(|c| c.get_ref().clone()),
                server_name: a.server_name.as_ref().map(|c| c.get_ref().clone()),
            })
        }
    };
    let scheme = if tls.is_some() { "https://" } else { "http://" };
    if endpoints.is_empty() {
        return Err(err(0..0, format!("{at}.endpoints"), "empty".into()));
    }
    if let Some((i, e)) = endpoints
        .iter()
        .enumerate()
        .find(|(_, e)| !e.starts_with(scheme))
    {
        let why = if tls.is_some() {
            "with ca (TLS) every endpoint is https://"
        } else {
            "without ca every endpoint is http:// (set ca for TLS)"
        };
        return Err(err(
            0..0,
            format!("{at}.endpoints[{i}]"),
            format!("{e:?}: {why}"),
        ));
    }
    Ok((auth, tls))
}

fn cluster_spec(c: &Spanned<RawCluster>, err: ErrFn<'_>) -> Result<ClusterSpec, ConfigError> {
    let r = c.get_ref();
    let label = |s: &Spanned<String>, field: &str| -> Result<String, ConfigError> {
        let v = s.get_ref();
        if v.is_empty()
            || v.len() > 63
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(err(
                s.span(),
                format!("cluster.{field}"),
                format!("{v:?}: must be 1 to 63 of [A-Za-z0-9_.-]"),
            ));
        }
        Ok(v.clone())
    };
    let name = label(&r.name, "name")?;
    let node = match &r.node {
        Some(n) => label(n, "node")?,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            label(&Spanned::new(c.span(), host.trim().to_string()), "node").map_err(|e| {
                ConfigError {
                    reason: format!("{} (the host name; set cluster.node)", e.reason),
                    ..e
                }
            })?
        }
    };
    let ttl = *r.status_ttl_secs.get_ref();
    if !(3..=300).contains(&ttl) {
        return Err(err(
            r.status_ttl_secs.span(),
            "cluster.status_ttl_secs".into(),
            format!("{ttl}: out of range 3..=300"),
        ));
    }
    let e = r.etcd.get_ref();
    if e.traefik_root.is_some() || !e.traefik_file_dirs.is_empty() {
        return Err(err(
            r.etcd.span(),
            "cluster.etcd.traefik_root".into(),
            "a Traefik configuration in etcd is read by [providers.etcd]".into(),
        ));
    }
    let (auth, tls) = etcd_access(e, &e.endpoints, "cluster.etcd", &|s, f, m| {
        err(if s == (0..0) { r.etcd.span() } else { s }, f, m)
    })?;
    Ok(ClusterSpec {
        name,
        node,
        status_ttl: Duration::from_secs(ttl),
        etcd: EtcdSpec {
            endpoints: e.endpoints.clone(),
            prefix: e.prefix.clone(),
            traefik_root: None,
            traefik_file_dirs: Vec::new(),
            auth,
            tls,
        },
    })
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &read(path)?)
}

/// A configuration file's text, or the error naming it.
pub(crate) fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.into(),
        line: 0,
        field: String::new(),
        reason: format!("cannot read: {e}"),
    })
}

/// Parses and validates config text; `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        ConfigError {
            file: path.into(),
            line,
            field: String::new(),
            reason: e.message().to_string(),
        }
    })?;
    validate(path, text, raw)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// `[[tcp_router]]`s, checked against the entry points.
fn tcp_routers(
    raw: &RawConfig,
    entrypoints: &[crate::model::l7::EntryPointSpec],
    err: &dyn Fn(std::ops::Range<usize>, String, String) -> ConfigError,
) -> Result<Vec<crate::model::l7::TcpRouterSpec>, ConfigError> {
    use crate::model::l7::{TcpRouterSpec, TlsMode};
    let mut out: Vec<TcpRouterSpec> = Vec::new();
    for (i, r) in raw.tcp_router.iter().enumerate() {
        let r = r.get_ref();
        let field = |f: &str| format!("tcp_router[{i}].{f}");
        let name = r.name.get_ref().clone();
        if !valid_name(&name) || out.iter().any(|x| x.name == name) {
            return Err(err(
                r.name.span(),
                field("name"),
                format!("{name:?}: must be unique [A-Za-z0-9_.-]"),
            ));
        }
        let tls = match r.tls.as_ref().map(|t| (t.get_ref().as_str(), t.span())) {
            None => TlsMode::Plain,
            Some(("passthrough", _)) => TlsMode::Passthrough,
            Some(("terminate", _)) => TlsMode::Terminate,
            Some((other, span)) => {
                return Err(err(
                    span,
                    field("tls"),
                    format!("{other:?}: expected \"passthrough\" or \"terminate\" (or no tls for plain TCP)"),
                ))
            }
        };
        let text = r.rule.get_ref().clone();
        let rule = crate::model::rule::TcpRule::parse(&text, tls != TlsMode::Plain)
            .map_err(|e| err(r.rule.span(), field("rule"), e.to_string()))?;
        if !valid_name(r.service.get_ref()) {
            return Err(err(
                r.service.span(),
                field("service"),
                "must be [A-Za-z0-9_.-]".into(),
            ));
        }
        let (eps, eps_span) = match &r.entrypoints {
            Some(e) => (e.get_ref().clone(), e.span()),
            None => (Vec::new(), r.name.span()),
        };
        for ep in &eps {
            if !entrypoints.iter().any(|e| &e.name == ep) {
                return Err(err(
                    eps_span,
                    field("entrypoints"),
                    format!("no entrypoint named {ep:?}"),
                ));
            }
        }
        if tls == TlsMode::Terminate {
            // The certificates belong to TLS entry points: terminating elsewhere has none.
            if let Some(plain) = entrypoints
                .iter()
                .find(|e| !e.tls && (eps.is_empty() || eps.contains(&e.name)))
            {
                return Err(err(
                    r.tls.as_ref().map_or(r.name.span(), |t| t.span()),
                    field("tls"),
                    format!(
                        "\"terminate\" needs entry points with tls = true (they hold the certificates); entrypoint {:?} has none{}",
                        plain.name,
                        if eps.is_empty() { ": list the TLS ones in entrypoints" } else { "" }
                    ),
                ));
            }
        }
        let mut guards = crate::model::l7::TcpGuards::default();
        if let Some(a) = &r.allow_ips {
            let mut list = Vec::new();
            for ip in a.get_ref() {
                let net = crate::model::ip_net(ip).ok_or_else(|| {
                    err(
                        a.span(),
                        field("allow_ips"),
                        format!("{ip:?} is not an address or CIDR"),
                    )
                })?;
                list.push(net);
            }
            if list.is_empty() {
                return Err(err(
                    a.span(),
                    field("allow_ips"),
                    "empty: it would refuse everyone (leave it out to allow all)".into(),
                ));
            }
            guards.allow.push(list);
        }
        guards.in_flight_per_ip = bounded(
            &r.in_flight_per_ip,
            1..=1_000_000,
            field("in_flight_per_ip"),
            "",
            err,
        )?
        .map(|n| n as u32);
        out.push(TcpRouterSpec {
            name,
            entrypoints: eps,
            rule,
            rule_text: text,
            priority: r.priority,
            service: r.service.get_ref().clone(),
            tls,
            tls_options: None,
            guards,
        });
    }
    Ok(out)
}

fn validate(path: &Path, text: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let err = |span: std::ops::Range<usize>, field: String, reason: String| ConfigError {
        file: path.into(),
        line: if span.is_empty() && span.start == 0 {
            0
        } else {
            line_of(text, span.start)
        },
        field,
        reason,
    };
    let a = &raw.agent;
    let instance = a.instance.get_ref();
    if instance.is_empty()
        || !instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(err(
            a.instance.span(),
            "agent.instance".into(),
            "must be non-empty [A-Za-z0-9_-]".into(),
        ));
    }
    let mut interfaces = Vec::new();
    for (i, ifc) in a.interfaces.iter().enumerate() {
        let name = ifc.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(err(
                ifc.span(),
                format!("agent.interfaces[{i}]"),
                format!("{name:?} is not an interface name"),
            ));
        }
        interfaces.push(name.clone());
    }
    let d = &raw.dataplane;
    let ring = *d.ring_size.get_ref();
    if !crate::l4::maglev::is_prime(ring) || ring < 7 {
        return Err(err(
            d.ring_size.span(),
            "dataplane.ring_size".into(),
            format!(
                "{ring} is not a prime ≥ 7 (Maglev needs a prime table size; 65537 is the default)"
            ),
        ));
    }
    let max_vips = *d.max_vips.get_ref();
    if max_vips == 0 || 2 * max_vips as u64 * ring as u64 > u32::MAX as u64 {
        return Err(err(
            d.max_vips.span(),
            "dataplane.max_vips".into(),
            format!("{max_vips}: must be ≥ 1 and 2 × max_vips × ring_size must fit in 32 bits"),
        ));
    }
    let max_backends = *d.max_backends.get_ref();
    if max_backends < 2 {
        return Err(err(
            d.max_backends.span(),
            "dataplane.max_backends".into(),
            "must be ≥ 2 (id 0 is reserved)".into(),
        ));
    }
    if *d.max_flows.get_ref() < 1024 {
        return Err(err(
            d.max_flows.span(),
            "dataplane.max_flows".into(),
            "must be ≥ 1024".into(),
        ));
    }
    if let Some(t) = &raw.api.token {
        check_token(t.get_ref())
            .map_err(|why| err(t.span(), "api.token".into(), why.to_string()))?;
    }
    let api_listen: SocketAddr = raw.api.listen.get_ref().parse().map_err(|_| {
        err(
            raw.api.listen.span(),
            "api.listen".into(),
            format!("{:?} is not an address:port", raw.api.listen.get_ref()),
        )
    })?;
    // The admin API speaks plain HTTP: off loopback its bearer token, and every change it
    // allows, would cross the network in the clear.
    if !api_listen.ip().is_loopback() {
        return Err(err(
            raw.api.listen.span(),
            "api.listen".into(),
            format!(
                "{api_listen} is not a loopback address, and the admin API has no TLS: keep it \
                 on 127.0.0.1 or [::1] and reach it over SSH, or through a TLS entry point \
                 with a router to it"
            ),
        ));
    }
    if raw.vip.len() > max_vips as usize {
        return Err(err(
            d.max_vips.span(),
            "dataplane.max_vips".into(),
            format!("{} VIPs configured, max_vips is {max_vips}", raw.vip.len()),
        ));
    }
    // Each VIP's backend takes an id of its own; id 0 means "none".
    let inline: usize = raw.vip.iter().map(|v| v.get_ref().backend.len()).sum();
    if inline >= max_backends as usize {
        return Err(err(
            d.max_backends.span(),
            "dataplane.max_backends".into(),
            format!(
                "{inline} backends configured, max_backends {max_backends} holds {} (id 0 is \
                 reserved)",
                max_backends - 1
            ),
        ));
    }
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut vips = Vec::new();
    for (i, v) in raw.vip.iter().enumerate() {
        let v = v.get_ref();
        let name = v.name.get_ref().clone();
        if !valid_name(&name) {
            return Err(err(
                v.name.span(),
                format!("vip[{i}].name"),
                format!("{name:?}: must be non-empty [A-Za-z0-9_.-]"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                v.name.span(),
                format!("vip[{i}].name"),
                format!("duplicate VIP name {name:?}"),
            ));
        }
        let address: IpAddr = v.address.get_ref().parse().map_err(|_| {
            err(
                v.address.span(),
                format!("vip[{i}].address"),
                format!("{:?} is not an IP address", v.address.get_ref()),
            )
        })?;
        let protocol = match v.protocol.get_ref().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(err(
                    v.protocol.span(),
                    format!("vip[{i}].protocol"),
                    format!("{other:?}: expected \"tcp\" or \"udp\""),
                ))
            }
        };
        let mode = match v.mode.get_ref().as_str() {
            "dsr" => Mode::Dsr,
            "nat" => Mode::Nat,
            "local" => Mode::Local,
            "ipip" => Mode::Ipip,
            other => {
                return Err(err(
                    v.mode.span(),
                    format!("vip[{i}].mode"),
                    format!("{other:?}: expected \"dsr\", \"nat\", \"ipip\" or \"local\""),
                ))
            }
        };
        if !keys.insert((address, v.port, protocol)) {
            return Err(err(
                v.address.span(),
                format!("vip[{i}]"),
                format!(
                    "another VIP already has {address} port {} {:?}",
                    v.port, protocol
                ),
            ));
        }
        let mut backends: Vec<BackendSpec> = Vec::new();
        for (j, b) in v.backend.iter().enumerate() {
            let b = b.get_ref();
            let field = |f: &str| format!("vip[{i}].backend[{j}].{f}");
            let baddr: IpAddr = b.address.get_ref().parse().map_err(|_| {
                err(
                    b.address.span(),
                    field("address"),
                    format!("{:?} is not an IP address", b.address.get_ref()),
                )
            })?;
            if mode == Mode::Nat && baddr.is_ipv4() != address.is_ipv4() {
                return Err(err(
                    b.address.span(),
                    field("address"),
                    "NAT backends must have the VIP's address family".into(),
                ));
            }
            let weight = *b.weight.get_ref();
            if weight > 1000 {
                return Err(err(
                    b.weight.span(),
                    field("weight"),
                    format!("{weight}: weights go from 0 to 1000"),
                ));
            }
            let mac = match &b.mac {
                Some(m) => Some(
                    m.get_ref()
                        .parse::<Mac>()
                        .map_err(|e| err(m.span(), field("mac"), e.to_string()))?,
                ),
                None => None,
            };
            let spec = BackendSpec {
                address: baddr,
                port: b.port,
                weight,
                mac,
            };
            if backends
                .iter()
                .any(|o| o.address == spec.address && o.port == spec.port)
            {
                return Err(err(
                    b.address.span(),
                    field("address"),
                    format!("duplicate backend {baddr} port {}", b.port),
                ));
            }
            backends.push(spec);
        }
        let service = v
            .service
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| name.clone());
        if let Some(s) = &v.service {
            if !valid_name(s.get_ref()) {
                return Err(err(
                    s.span(),
                    format!("vip[{i}].service"),
                    format!("{:?}: must be non-empty [A-Za-z0-9_.-]", s.get_ref()),
                ));
            }
        }
        let health = match &v.health {
            None => None,
            Some(h) => {
                let span = h.span();
                let h = h.get_ref();
                let check = match h.check.get_ref().as_str() {
                    "tcp" => CheckKind::Tcp,
                    "http" => CheckKind::Http,
                    other => {
                        return Err(err(
                            h.check.span(),
                            format!("vip[{i}].health.check"),
                            format!("{other:?}: expected \"tcp\" or \"http\""),
                        ))
                    }
                };
                if h.rise == 0
                    || h.fall == 0
                    || h.interval_ms < 10
                    || h.timeout_ms == 0
                    || h.timeout_ms > h.interval_ms
                {
                    return Err(err(
                        span,
                        format!("vip[{i}].health"),
                        "rise and fall must be ≥ 1, interval_ms ≥ 10, 0 < timeout_ms ≤ interval_ms"
                            .into(),
                    ));
                }
                Some(HealthSpec {
                    check,
                    interval: Duration::from_millis(h.interval_ms),
                    timeout: Duration::from_millis(h.timeout_ms),
                    rise: h.rise,
                    fall: h.fall,
                    path: h.path.clone(),
                    port: h.port,
                })
            }
        };
        vips.push(VipSpec {
            name,
            address,
            port: v.port,
            protocol,
            mode,
            service,
            backends,
            health,
        });
    }
    let dns = match &raw.providers.dns {
        None => crate::model::sources::DnsSpec::default(),
        Some(d) => {
            let r = d.get_ref();
            if r.refresh_s == Some(0) || r.min_ttl_ms < 100 {
                return Err(err(
                    d.span(),
                    "providers.dns".into(),
                    "refresh_s must be at least 1 and min_ttl_ms at least 100: a name is never asked in a loop"
                        .into(),
                ));
            }
            let resolver = match &r.resolver {
                None => None,
                Some(a) => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
                    err(
                        d.span(),
                        "providers.dns.resolver".into(),
                        format!("{a:?}: expected ip:port (\"10.0.0.53:53\")"),
                    )
                })?),
            };
            crate::model::sources::DnsSpec {
                resolver,
                refresh: r.refresh_s.map(Duration::from_secs),
                min_ttl: Duration::from_millis(r.min_ttl_ms),
            }
        }
    };
    let mut files = Vec::new();
    for (i, f) in raw.providers.file.iter().enumerate() {
        let f = f.get_ref();
        if f.path.as_os_str().is_empty() {
            return Err(err(
                raw.providers.file[i].span(),
                format!("providers.file[{i}].path"),
                "empty path".into(),
            ));
        }
        files.push(FileProviderSpec {
            path: f.path.clone(),
            debounce: Duration::from_millis(f.debounce_ms),
        });
    }
    let file_dirs = |dirs: &[Spanned<PathBuf>], which: &str| -> Result<Vec<PathBuf>, ConfigError> {
        dirs.iter()
            .enumerate()
            .map(|(i, d)| {
                if d.get_ref().is_absolute() {
                    Ok(d.get_ref().clone())
                } else {
                    Err(err(
                        d.span(),
                        format!("providers.{which}.traefik_file_dirs[{i}]"),
                        format!("{:?}: must be an absolute path", d.get_ref()),
                    ))
                }
            })
            .collect()
    };
    let redis = match &raw.providers.redis {
        Some(r) => {
            if !r.url.get_ref().starts_with("redis://") && !r.url.get_ref().starts_with("unix://") {
                return Err(err(
                    r.url.span(),
                    "providers.redis.url".into(),
                    format!(
                        "{:?}: expected redis://host:port or unix:///path",
                        r.url.get_ref()
                    ),
                ));
            }
            Some(RedisSpec {
                url: r.url.get_ref().clone(),
                prefix: r.prefix.clone(),
                resync: Duration::from_secs(r.resync_secs.max(1)),
                traefik_root: r.traefik_root.clone(),
                traefik_file_dirs: file_dirs(&r.traefik_file_dirs, "redis")?,
            })
        }
        None => None,
    };
    let etcd = match &raw.providers.etcd {
        Some(e) => {
            let (auth, tls) = etcd_access(e, &e.endpoints, "providers.etcd", &err)?;
            Some(EtcdSpec {
                endpoints: e.endpoints.clone(),
                prefix: e.prefix.clone(),
                traefik_root: e.traefik_root.clone(),
                traefik_file_dirs: file_dirs(&e.traefik_file_dirs, "etcd")?,
                auth,
                tls,
            })
        }
        None => None,
    };
    let cluster = match &raw.cluster {
        Some(c) => Some(cluster_spec(c, &err)?),
        None => None,
    };
    let bgp = match &raw.bgp {
        Some(b) => Some(bgp_spec(b, &interfaces, &err)?),
        None => None,
    };
    let mut entrypoints: Vec<crate::model::l7::EntryPointSpec> = Vec::new();
    for (i, e) in raw.entrypoint.iter().enumerate() {
        let e = e.get_ref();
        let name = e.name.get_ref().clone();
        if !valid_name(&name) || entrypoints.iter().any(|x| x.name == name) {
            return Err(err(
                e.name.span(),
                format!("entrypoint[{i}].name"),
                format!("{name:?}: must be unique [A-Za-z0-9_.-]"),
            ));
        }
        let address: SocketAddr = e.address.get_ref().parse().map_err(|_| {
            err(
                e.address.span(),
                format!("entrypoint[{i}].address"),
                format!("{:?} is not an address:port", e.address.get_ref()),
            )
        })?;
        if e.client_ca_file.is_some() && !e.tls {
            return Err(err(
                e.name.span(),
                format!("entrypoint[{i}].client_ca_file"),
                "needs tls = true".into(),
            ));
        }
        let nets = |list: &[String], key: &str| -> Result<Vec<ipnet::IpNet>, ConfigError> {
            list.iter()
                .map(|t| {
                    crate::model::ip_net(t).ok_or_else(|| {
                        err(
                            e.name.span(),
                            format!("entrypoint[{i}].{key}"),
                            format!("{t:?} is not an address or CIDR"),
                        )
                    })
                })
                .collect()
        };
        let trusted_ips = nets(&e.forwarded_trusted_ips, "forwarded_trusted_ips")?;
        let proxy_protocol = match &e.proxy_protocol_trusted_ips {
            Some(l) => Some(nets(l, "proxy_protocol_trusted_ips")?),
            None => None,
        };
        let limits = entrypoint_limits(e, i, &err)?;
        entrypoints.push(crate::model::l7::EntryPointSpec {
            name,
            address,
            tls: e.tls,
            client_ca_file: e.client_ca_file.clone(),
            trusted_ips,
            limits,
            also_plain: false,
            as_default: false,
            proxy_protocol,
        });
    }
    let mut middlewares: Vec<(String, crate::model::middleware::MiddlewareConfig)> = Vec::new();
    for (i, m) in raw.middleware.iter().enumerate() {
        let span = m.span();
        let m = m.get_ref();
        let name = m.name.get_ref().clone();
        if !valid_name(&name) || middlewares.iter().any(|(n, _)| *n == name) {
            return Err(err(
                m.name.span(),
                format!("middleware[{i}].name"),
                format!("{name:?}: must be unique [A-Za-z0-9_.-]"),
            ));
        }
        if let Err(e) = m.kind.build() {
            return Err(err(
                span,
                format!("middleware[{i}] ({name})"),
                e.to_string(),
            ));
        }
        middlewares.push((name, m.kind.clone()));
    }
    let mut routers: Vec<crate::model::l7::RouterSpec> = Vec::new();
    for (i, r) in raw.router.iter().enumerate() {
        let r = r.get_ref();
        let name = r.name.get_ref().clone();
        if !valid_name(&name) || routers.iter().any(|x| x.name == name) {
            return Err(err(
                r.name.span(),
                format!("router[{i}].name"),
                format!("{name:?}: must be unique [A-Za-z0-9_.-]"),
            ));
        }
        let text = r.rule.get_ref().clone();
        let rule = crate::model::rule::Rule::parse(&text)
            .map_err(|e| err(r.rule.span(), format!("router[{i}].rule"), e.to_string()))?;
        if !valid_name(r.service.get_ref()) {
            return Err(err(
                r.service.span(),
                format!("router[{i}].service"),
                "must be [A-Za-z0-9_.-]".into(),
            ));
        }
        for mw in &r.middlewares {
            if !middlewares.iter().any(|(n, _)| n == mw) {
                return Err(err(
                    r.name.span(),
                    format!("router[{i}].middlewares"),
                    format!("no middleware named {mw:?}"),
                ));
            }
        }
        for ep in &r.entrypoints {
            if !entrypoints.iter().any(|e| &e.name == ep) {
                return Err(err(
                    r.name.span(),
                    format!("router[{i}].entrypoints"),
                    format!("no entrypoint named {ep:?}"),
                ));
            }
        }
        routers.push(crate::model::l7::RouterSpec {
            name,
            entrypoints: r.entrypoints.clone(),
            rule,
            rule_text: text,
            priority: r.priority,
            service: r.service.get_ref().clone(),
            middlewares: r.middlewares.clone(),
            tls: None,
            tls_options: None,
        });
    }
    let tcp_routers = tcp_routers(&raw, &entrypoints, &err)?;
    let mut http_services = std::collections::HashMap::new();
    for (i, h) in raw.http_service.iter().enumerate() {
        let h = h.get_ref();
        let name = h.name.get_ref().clone();
        if !valid_name(&name) || http_services.contains_key(&name) {
            return Err(err(
                h.name.span(),
                format!("http_service[{i}].name"),
                format!("{name:?}: must be unique [A-Za-z0-9_.-]"),
            ));
        }
        if h.passive_failures == 0 {
            return Err(err(
                h.name.span(),
                format!("http_service[{i}].passive_failures"),
                "must be ≥ 1".into(),
            ));
        }
        let passive = crate::model::l7::Passive {
            failures: h.passive_failures,
            backoff: Duration::from_secs(h.passive_backoff_secs.max(1)),
        };
        if h.sticky_cookie.as_deref().is_some_and(|c| {
            c.is_empty()
                || !c
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch))
        }) {
            return Err(err(
                h.name.span(),
                format!("http_service[{i}].sticky_cookie"),
                "cookie names are [A-Za-z0-9_-]".into(),
            ));
        }
        let tls = match &h.tls {
            None => None,
            Some(t) => {
                let r = t.get_ref();
                let spec = crate::model::l7::UpstreamTls {
                    ca_file: r.ca_file.clone(),
                    cert_file: r.cert_file.clone(),
                    key_file: r.key_file.clone(),
                    server_name: r.server_name.clone(),
                };
                if let Err(e) = crate::tls_files::check_upstream(&spec) {
                    return Err(err(
                        t.span(),
                        format!("http_service[{i}].tls"),
                        format!("{e:#}"),
                    ));
                }
                Some(spec)
            }
        };
        let mirror = match &h.mirror {
            None => None,
            Some(m) => {
                let r = m.get_ref();
                if !valid_name(&r.service) || !(0.0..=100.0).contains(&r.percent) {
                    return Err(err(
                        m.span(),
                        format!("http_service[{i}].mirror"),
                        "expected a service name and a percent in 0..=100".into(),
                    ));
                }
                Some(crate::model::l7::Mirror {
                    targets: vec![crate::model::l7::MirrorTarget {
                        service: r.service.clone(),
                        percent: r.percent,
                    }],
                    max_body_bytes: r.max_body_bytes,
                    body: r.body,
                })
            }
        };
        let health = match &h.health {
            None => None,
            Some(c) => {
                let r = c.get_ref();
                let check = crate::model::l7::ActiveCheck {
                    interval: Duration::from_millis(r.interval_ms),
                    unhealthy_interval: Duration::from_millis(
                        r.unhealthy_interval_ms.unwrap_or(r.interval_ms),
                    ),
                    timeout: Duration::from_millis(r.timeout_ms),
                    path: r.path.clone(),
                    method: r.method.to_ascii_uppercase(),
                    hostname: r.hostname.clone(),
                    port: r.port,
                    status: r.status,
                    headers: r
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    rise: r.rise,
                    fall: r.fall,
                };
                if let Err(e) = check.validate() {
                    return Err(err(c.span(), format!("http_service[{i}].health"), e));
                }
                Some(check)
            }
        };
        let composite = match (&h.weighted, &h.failover) {
            (Some(_), Some(f)) => {
                return Err(err(
                    f.span(),
                    format!("http_service[{i}]"),
                    "weighted or failover, not both".into(),
                ))
            }
            (Some(w), None) => {
                let list = w.get_ref();
                if list.is_empty()
                    || list.iter().all(|x| x.weight == 0)
                    || list
                        .iter()
                        .any(|x| !valid_name(&x.service) || x.weight > 1000 || x.service == name)
                {
                    return Err(err(
                        w.span(),
                        format!("http_service[{i}].weighted"),
                        "expected services by name (not this one) with weights 0..=1000, one above 0".into(),
                    ));
                }
                Some(crate::model::l7::Composite::Weighted(
                    list.iter().map(|x| (x.service.clone(), x.weight)).collect(),
                ))
            }
            (None, Some(f)) => {
                let r = f.get_ref();
                if [&r.main, &r.fallback]
                    .iter()
                    .any(|n| !valid_name(n) || **n == name)
                    || r.main == r.fallback
                {
                    return Err(err(
                        f.span(),
                        format!("http_service[{i}].failover"),
                        "expected two other services by name".into(),
                    ));
                }
                Some(crate::model::l7::Composite::Failover {
                    main: r.main.clone(),
                    fallback: r.fallback.clone(),
                })
            }
            (None, None) => None,
        };
        http_services.insert(
            name,
            crate::model::l7::ServiceSpec {
                upstream_host: (!h.pass_host_header).then(Default::default),
                http2: h.http2,
                composite,
                health,
                algorithm: h.algorithm,
                passive,
                retries: h.retries.min(10),
                request_timeout: (h.request_timeout_ms > 0)
                    .then(|| Duration::from_millis(h.request_timeout_ms)),
                sticky_cookie: h.sticky_cookie.clone(),
                tls,
                mirror,
                connect_timeout: Duration::from_millis(h.connect_timeout_ms.max(1)),
                idle_timeout: Duration::from_secs(h.idle_timeout_secs),
                max_connections: bounded(
                    &h.max_connections,
                    1..=1_000_000,
                    format!("http_service[{i}].max_connections"),
                    "",
                    &err,
                )?
                .map_or(crate::model::l7::DEFAULT_MAX_UPSTREAM_CONNECTIONS, |n| {
                    n as usize
                }),
            },
        );
    }
    // A loop of composites would send a request round for ever: refused, by its first service.
    for (i, h) in raw.http_service.iter().enumerate() {
        let start = h.get_ref().name.get_ref();
        let mut path = vec![start.clone()];
        if composite_loop(&http_services, start, &mut path) {
            return Err(err(
                h.span(),
                format!("http_service[{i}]"),
                format!("its services loop: {}", path.join(" → ")),
            ));
        }
    }
    let certificates: Vec<crate::model::l7::CertSpec> = raw
        .certificate
        .iter()
        .map(|c| {
            let c = c.get_ref();
            crate::model::l7::CertSpec {
                cert_file: c.cert_file.clone(),
                key_file: c.key_file.clone(),
                default: c.default,
            }
        })
        .collect();
    if certificates.iter().filter(|c| c.default).count() > 1 {
        return Err(err(
            0..0,
            "certificate".into(),
            "more than one certificate has default = true".into(),
        ));
    }
    let access_log = match &raw.access_log {
        Some(a) => Some(validate_access_log(a.get_ref(), &err)?),
        None => None,
    };
    let acme = match &raw.acme {
        Some(a) => Some(validate_acme(a.get_ref(), &entrypoints, &err)?),
        None => None,
    };
    if let Some(e) = raw.entrypoint.iter().find(|e| e.get_ref().tls) {
        if certificates.is_empty() && !raw.tls.dev_ca && acme.is_none() {
            return Err(err(
                e.span(),
                "entrypoint".into(),
                "tls = true needs at least one [[certificate]] (or [tls] dev_ca = true, or [acme])"
                    .into(),
            ));
        }
    }
    Ok(Config {
        access_log,
        acme,
        tls_dev_ca: raw.tls.dev_ca,
        middlewares,
        certificates,
        http_services,
        entrypoints,
        routers,
        tcp_routers,
        providers: ProvidersSpec {
            files,
            redis,
            etcd,
            dns,
        },
        cluster,
        bgp,
        instance: instance.clone(),
        pin_root: a.pin_root.clone(),
        state_dir: a.state_dir.clone(),
        interfaces,
        xdp_mode: a.xdp_mode,
        debug: a.debug,
        limits: Limits {
            max_vips,
            max_backends,
            ring_size: ring,
            max_flows: *d.max_flows.get_ref(),
            udp_timeout_secs: d.udp_timeout_secs,
            ipip_source_v4: d.ipip_source_v4,
            ipip_source_v6: d.ipip_source_v6,
        },
        api_listen,
        api_token: raw.api.token.as_ref().map(|t| t.get_ref().clone()),
        vips,
        notes: Vec::new(),
    })
}

fn validate_access_log(
    a: &RawAccessLog,
    err: &dyn Fn(std::ops::Range<usize>, String, String) -> ConfigError,
) -> Result<crate::observe::access_log::AccessLogSpec, ConfigError> {
    use crate::observe::access_log::{AccessLogSpec, Format};
    let path = match &a.path {
        Some(p) if p.get_ref() == "stdout" || p.get_ref() == "-" => None,
        Some(p) if p.get_ref().is_empty() => {
            return Err(err(
                p.span(),
                "access_log.path".into(),
                "empty: give a file or \"stdout\"".into(),
            ))
        }
        Some(p) => Some(PathBuf::from(p.get_ref())),
        None => None,
    };
    let format = match a.format.as_ref().map(|f| (f.get_ref().as_str(), f.span())) {
        None | Some(("json", _)) => Format::Json,
        Some(("common", _)) => Format::Common,
        Some((other, span)) => {
            return Err(err(
                span,
                "access_log.format".into(),
                format!("{other:?}: expected \"json\" or \"common\""),
            ))
        }
    };
    let buffer = match &a.buffer {
        Some(b) if *b.get_ref() == 0 || *b.get_ref() > 1 << 20 => {
            return Err(err(
                b.span(),
                "access_log.buffer".into(),
                "must be 1..=1048576".into(),
            ))
        }
        Some(b) => *b.get_ref(),
        None => 4096,
    };
    let mut status = Vec::new();
    for (i, s) in a.status.iter().enumerate() {
        status.push(
            s.get_ref()
                .parse::<crate::observe::access_log::StatusRange>()
                .map_err(|e| err(s.span(), format!("access_log.status[{i}]"), e.to_string()))?,
        );
    }
    let sample = match &a.sample {
        Some(s) if !(*s.get_ref() > 0.0 && *s.get_ref() <= 1.0) => {
            return Err(err(
                s.span(),
                "access_log.sample".into(),
                "must be in (0, 1]".into(),
            ))
        }
        Some(s) => *s.get_ref(),
        None => 1.0,
    };
    Ok(AccessLogSpec {
        path,
        format,
        buffer,
        status,
        sample,
    })
}

type ErrFn<'a> = &'a dyn Fn(std::ops::Range<usize>, String, String) -> ConfigError;

/// A number in `range`, or the field's error naming the range.
fn bounded(
    v: &Option<Spanned<u64>>,
    range: std::ops::RangeInclusive<u64>,
    field: String,
    unit: &str,
    err: ErrFn<'_>,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = v else { return Ok(None) };
    if !range.contains(v.get_ref()) {
        return Err(err(
            v.span(),
            field,
            format!(
                "{} is out of range: {}..={}{unit}",
                v.get_ref(),
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(Some(*v.get_ref()))
}

/// An entry point's connection bounds: each set one in its range, the rest the defaults.
fn entrypoint_limits(
    e: &RawEntryPoint,
    i: usize,
    err: ErrFn<'_>,
) -> Result<crate::model::l7::ConnLimits, ConfigError> {
    let d = crate::model::l7::ConnLimits::default();
    let f = |name: &str| format!("entrypoint[{i}].{name}");
    let secs = |v: &Option<Spanned<u64>>, name: &str, dflt: Duration| {
        bounded(v, 1..=86_400, f(name), " s", err).map(|v| v.map_or(dflt, Duration::from_secs))
    };
    Ok(crate::model::l7::ConnLimits {
        header_timeout: secs(
            &e.header_timeout_secs,
            "header_timeout_secs",
            d.header_timeout,
        )?,
        idle_timeout: secs(&e.idle_timeout_secs, "idle_timeout_secs", d.idle_timeout)?,
        body_timeout: secs(&e.body_timeout_secs, "body_timeout_secs", d.body_timeout)?,
        body_min_rate: bounded(
            &e.body_min_rate,
            0..=1 << 30,
            f("body_min_rate"),
            " bytes/s",
            err,
        )?
        .unwrap_or(d.body_min_rate),
        write_timeout: secs(&e.write_timeout_secs, "write_timeout_secs", d.write_timeout)?,
        // 0: no PINGs.
        h2_keepalive: match bounded(
            &e.h2_keepalive_secs,
            0..=86_400,
            f("h2_keepalive_secs"),
            " s",
            err,
        )? {
            None => d.h2_keepalive,
            Some(0) => None,
            Some(n) => Some(Duration::from_secs(n)),
        },
        h2_max_streams: bounded(&e.h2_max_streams, 1..=10_000, f("h2_max_streams"), "", err)?
            .map_or(d.h2_max_streams, |n| n as u32),
        max_connections: bounded(
            &e.max_connections,
            1..=1_000_000,
            f("max_connections"),
            "",
            err,
        )?
        .map_or(d.max_connections, |n| n as usize),
    })
}

/// A name to order a certificate for, lowercased without its final dot; or why it cannot be.
pub(crate) fn acme_name(raw: &str) -> Result<String, &'static str> {
    let name = raw.trim_end_matches('.').to_ascii_lowercase();
    if name.starts_with("*.") {
        Err("wildcards need the dns-01 challenge, which lb does not answer")
    } else if name.parse::<IpAddr>().is_ok() {
        Err("an IP address, not a DNS name")
    } else if name.is_empty()
        || name.len() > 253
        || !name.contains('.')
        || name
            .split('.')
            .any(|l| l.is_empty() || l.len() > 63 || l.starts_with('-') || l.ends_with('-'))
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        Err("not a DNS name")
    } else {
        Ok(name)
    }
}

fn validate_acme(
    a: &RawAcme,
    entrypoints: &[crate::model::l7::EntryPointSpec],
    err: &dyn Fn(std::ops::Range<usize>, String, String) -> ConfigError,
) -> Result<crate::model::l7::AcmeSpec, ConfigError> {
    use crate::model::l7::{AcmeSpec, ChallengeKind};
    let dir = a.directory.get_ref();
    let https = dir
        .parse::<hyper::Uri>()
        .ok()
        .filter(|u| u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()));
    if https.is_none() {
        return Err(err(
            a.directory.span(),
            "acme.directory".into(),
            format!("{dir:?}: expected an https:// URL"),
        ));
    }
    let email = match &a.email {
        Some(e) => {
            let v = e.get_ref();
            let ok = v.split_once('@').is_some_and(|(user, host)| {
                !user.is_empty() && host.contains('.') && !host.contains('@')
            }) && !v.chars().any(|c| c.is_whitespace() || c == ',' || c == ':');
            if !ok {
                return Err(err(
                    e.span(),
                    "acme.email".into(),
                    format!("{v:?} is not an email address"),
                ));
            }
            Some(v.clone())
        }
        None => None,
    };
    let challenge = match a.challenge.get_ref().as_str() {
        "http-01" => ChallengeKind::Http01,
        "tls-alpn-01" => ChallengeKind::TlsAlpn01,
        other => {
            return Err(err(
                a.challenge.span(),
                "acme.challenge".into(),
                format!("{other:?}: expected \"http-01\" or \"tls-alpn-01\""),
            ))
        }
    };
    // The CA validates on the proxy's own ports: there must be one of the right kind.
    let tls = challenge == ChallengeKind::TlsAlpn01;
    if !entrypoints.iter().any(|e| e.tls == tls) {
        return Err(err(
            a.challenge.span(),
            "acme.challenge".into(),
            format!(
                "{} is answered on an entry point with tls = {tls}, and there is none",
                a.challenge.get_ref()
            ),
        ));
    }
    let mut domains: Vec<String> = Vec::new();
    for (i, d) in a.domains.get_ref().iter().enumerate() {
        let (name, why) = match acme_name(d.get_ref()) {
            Ok(name) if domains.contains(&name) => (name, Some("listed twice")),
            Ok(name) => (name, None),
            Err(why) => (String::new(), Some(why)),
        };
        if let Some(why) = why {
            return Err(err(
                d.span(),
                format!("acme.domains[{i}]"),
                format!("{:?}: {why}", d.get_ref()),
            ));
        }
        domains.push(name);
    }
    if domains.is_empty() {
        return Err(err(
            a.domains.span(),
            "acme.domains".into(),
            "at least one name".into(),
        ));
    }
    if let Some(f) = &a.ca_file {
        if f.get_ref().as_os_str().is_empty() {
            return Err(err(f.span(), "acme.ca_file".into(), "empty path".into()));
        }
    }
    let days = *a.renew_before_days.get_ref();
    if days > 365 {
        return Err(err(
            a.renew_before_days.span(),
            "acme.renew_before_days".into(),
            format!("{days}: at most 365"),
        ));
    }
    Ok(AcmeSpec {
        resolver: None,
        directory: dir.clone(),
        email,
        challenge,
        domains,
        ca_file: a.ca_file.as_ref().map(|f| f.get_ref().clone()),
        renew_before: Duration::from_secs(u64::from(days) * 86_400),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
instance = "t1"
interfaces = ["eth0"]

[api]
listen = "127.0.0.1:9999"

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
mode = "nat"

[[vip.backend]]
address = "10.0.1.1"
port = 8080
weight = 2

[[vip.backend]]
address = "10.0.1.2"
"#;

    fn parse_err(text: &str) -> ConfigError {
        parse(Path::new("lb.toml"), text).expect_err("config should be rejected")
    }

    /// Connection bounds: safe defaults, each settable, each out-of-range value named with its
    /// line; 0 turns HTTP/2 PINGs off; an upstream cap per service.
    #[test]
    fn proxy_protocol_sources_are_addresses_or_cidrs() {
        let ep = "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8080\"\n";
        let c = parse(Path::new("lb.toml"), &format!("{GOOD}{ep}")).expect("valid");
        assert_eq!(c.entrypoints[0].proxy_protocol, None);
        let set = "proxy_protocol_trusted_ips = [\"10.0.0.0/8\", \"192.0.2.1\"]\n";
        let c = parse(Path::new("lb.toml"), &format!("{GOOD}{ep}{set}")).expect("valid");
        assert_eq!(
            c.entrypoints[0].proxy_protocol,
            Some(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.1/32".parse().unwrap()
            ])
        );
        let bad = "proxy_protocol_trusted_ips = [\"lb.example\"]\n";
        let e = parse(Path::new("lb.toml"), &format!("{GOOD}{ep}{bad}")).unwrap_err();
        assert_eq!(e.field, "entrypoint[0].proxy_protocol_trusted_ips", "{e}");
    }

    #[test]
    fn entry_point_bounds_and_upstream_caps() {
        let ep = "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8080\"\n";
        let c = parse(Path::new("lb.toml"), &format!("{GOOD}{ep}")).expect("valid");
        assert_eq!(
            c.entrypoints[0].limits,
            crate::model::l7::ConnLimits::default()
        );
        let set = "header_timeout_secs = 5\nidle_timeout_secs = 7\nbody_timeout_secs = 9\nbody_min_rate = 0\nwrite_timeout_secs = 11\nh2_keepalive_secs = 0\nh2_max_streams = 32\nmax_connections = 500\n";
        let c = parse(Path::new("lb.toml"), &format!("{GOOD}{ep}{set}")).expect("valid");
        let l = c.entrypoints[0].limits;
        assert_eq!(
            (
                l.header_timeout,
                l.idle_timeout,
                l.body_timeout,
                l.write_timeout
            ),
            (
                Duration::from_secs(5),
                Duration::from_secs(7),
                Duration::from_secs(9),
                Duration::from_secs(11)
            )
        );
        assert_eq!(
            (
                l.body_min_rate,
                l.h2_keepalive,
                l.h2_max_streams,
                l.max_connections
            ),
            (0, None, 32, 500)
        );
        for (bad, field) in [
            (
                "header_timeout_secs = 0",
                "entrypoint[0].header_timeout_secs",
            ),
            (
                "idle_timeout_secs = 999999999",
                "entrypoint[0].idle_timeout_secs",
            ),
            ("h2_max_streams = 0", "entrypoint[0].h2_max_streams"),
            ("max_connections = 0", "entrypoint[0].max_connections"),
        ] {
            let e = parse_err(&format!("{GOOD}{ep}{bad}\n"));
            assert_eq!((e.line, e.field.as_str()), (26, field), "{e}");
            assert!(e.to_string().contains("out of range"), "{e}");
        }
        let svc = "\n[[http_service]]\nname = \"web\"\n";
        let c = parse(
            Path::new("lb.toml"),
            &format!("{GOOD}{svc}max_connections = 16\n"),
        )
        .expect("valid");
        assert_eq!(c.http_services["web"].max_connections, 16);
        let c = parse(Path::new("lb.toml"), &format!("{GOOD}{svc}")).expect("valid");
        assert_eq!(
            c.http_services["web"].max_connections,
            crate::model::l7::DEFAULT_MAX_UPSTREAM_CONNECTIONS
        );
        let e = parse_err(&format!("{GOOD}{svc}max_connections = 0\n"));
        assert_eq!(e.field, "http_service[0].max_connections");
        let c = parse(
            Path::new("lb.toml"),
            &format!("{GOOD}{svc}health = {{ path = \"/healthz\", interval_ms = 2000, timeout_ms = 500, status = 204, headers = {{ x-check = \"lb\" }}, fall = 2 }}\n"),
        )
        .expect("valid");
        let h = c.http_services["web"].health.clone().expect("checked");
        assert_eq!(
            (
                h.path.as_str(),
                h.interval,
                h.unhealthy_interval,
                h.timeout,
                h.status,
                h.fall,
                h.rise
            ),
            (
                "/healthz",
                Duration::from_secs(2),
                Duration::from_secs(2),
                Duration::from_millis(500),
                Some(204),
                2,
                1
            )
        );
        assert_eq!(h.headers, vec![("x-check".to_string(), "lb".to_string())]);
        let c = parse(
            Path::new("lb.toml"),
            &format!("{GOOD}{svc}weighted = [{{ service = \"v1\", weight = 9 }}, {{ service = \"v2\" }}]\n[[http_service]]\nname = \"ha\"\nfailover = {{ main = \"web\", fallback = \"v1\" }}\n"),
        )
        .expect("valid");
        assert_eq!(
            c.http_services["web"].composite,
            Some(crate::model::l7::Composite::Weighted(vec![
                ("v1".into(), 9),
                ("v2".into(), 1)
            ]))
        );
        assert_eq!(
            c.http_services["ha"].composite,
            Some(crate::model::l7::Composite::Failover {
                main: "web".into(),
                fallback: "v1".into()
            })
        );
        let e = parse_err(&format!("{GOOD}{svc}weighted = [{{ service = \"ha\" }}]\n[[http_service]]\nname = \"ha\"\nfailover = {{ main = \"web\", fallback = \"v1\" }}\n"));
        assert!(e.to_string().contains("loop: web → ha → web"), "{e}");
        for bad in [
            "weighted = [{ service = \"web\" }]",
            "weighted = [{ service = \"v1\", weight = 0 }]",
            "failover = { main = \"v1\", fallback = \"v1\" }",
        ] {
            let e = parse_err(&format!("{GOOD}{svc}{bad}\n"));
            assert!(e.field.starts_with("http_service[0]"), "{bad}: {e}");
        }
        for bad in [
            "health = { path = \"healthz\" }",
            "health = { timeout_ms = 60000 }",
            "health = { method = \"GE T\" }",
            "health = { headers = { \"bad header\" = \"x\" } }",
        ] {
            let e = parse_err(&format!("{GOOD}{svc}{bad}\n"));
            assert_eq!(e.field, "http_service[0].health", "{bad}: {e}");
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(Path::new("lb.toml"), GOOD).expect("valid");
        assert_eq!(c.instance, "t1");
        assert_eq!(c.limits.ring_size, 65537);
        assert_eq!(c.vips[0].mode, Mode::Nat);
        assert_eq!(c.vips[0].backends[0].weight, 2);
        assert_eq!(c.vips[0].backends[1].weight, 1);
        assert_eq!(c.api_listen.port(), 9999);
    }

    #[test]
    fn access_log_section() {
        use crate::observe::access_log::{Format, StatusRange};
        let c = parse(
            Path::new("lb.toml"),
            &format!("{GOOD}\n[access_log]\npath = \"/var/log/lb/access.log\"\nformat = \"common\"\nstatus = [\"4xx\", \"502-504\"]\nsample = 0.5\n"),
        )
        .expect("valid");
        let a = c.access_log.expect("configured");
        assert_eq!(a.path.as_deref(), Some(Path::new("/var/log/lb/access.log")));
        assert_eq!((a.format, a.buffer, a.sample), (Format::Common, 4096, 0.5));
        assert_eq!(
            a.status,
            vec![
                StatusRange { lo: 400, hi: 499 },
                StatusRange { lo: 502, hi: 504 }
            ]
        );
        let stdout =
            parse(Path::new("lb.toml"), &format!("{GOOD}\n[access_log]\n")).expect("valid");
        assert_eq!(
            stdout.access_log.map(|a| (a.path, a.format)),
            Some((None, Format::Json))
        );
        let e = parse_err(&format!("{GOOD}\n[access_log]\nstatus = [\"7xx\"]\n"));
        assert_eq!(
            (e.line, e.field.as_str()),
            (24, "access_log.status[0]"),
            "{e}"
        );
        let e = parse_err(&format!("{GOOD}\n[access_log]\nformat = \"xml\"\n"));
        assert_eq!(e.field, "access_log.format");
        let e = parse_err(&format!("{GOOD}\n[access_log]\nsample = 0.0\n"));
        assert_eq!(e.field, "access_log.sample");
    }

    #[test]
    fn empty_and_short_api_tokens_are_refused_with_their_line() {
        let with = |t: &str| {
            GOOD.replace(
                "listen = \"127.0.0.1:9999\"",
                &format!("listen = \"127.0.0.1:9999\"\ntoken = {t}"),
            )
        };
        let line = GOOD
            .lines()
            .position(|l| l.starts_with("listen ="))
            .expect("listen")
            + 2;
        for t in [
            "\"\"",
            "\"short\"",
            "\"0123456789abcde\"",
            "\"0123456789 abcdef\"",
        ] {
            let e = parse_err(&with(t));
            assert_eq!((e.line, e.field.as_str()), (line, "api.token"), "{t}: {e}");
        }
        let c = parse(Path::new("lb.toml"), &with("\"0123456789abcdef\"")).expect("16 characters");
        assert_eq!(c.api_token.as_deref(), Some("0123456789abcdef"));
    }

    /// The admin API has no TLS: an address off loopback would send its token in the clear.
    #[test]
    fn an_admin_api_off_loopback_is_refused_with_its_line() {
        let line = GOOD
            .lines()
            .position(|l| l.starts_with("listen ="))
            .expect("listen")
            + 1;
        for addr in [
            "0.0.0.0:9999",
            "10.0.0.1:9999",
            "[::]:9999",
            "[fd00::1]:9999",
        ] {
            let text = GOOD.replace(
                "listen = \"127.0.0.1:9999\"",
                &format!("listen = \"{addr}\""),
            );
            let e = parse_err(&text);
            assert_eq!(
                (e.line, e.field.as_str()),
                (line, "api.listen"),
                "{addr}: {e}"
            );
            assert!(e.to_string().contains("no TLS"), "{e}");
        }
        for addr in ["127.0.0.1:9999", "127.0.0.2:9999", "[::1]:9999"] {
            let text = GOOD.replace(
                "listen = \"127.0.0.1:9999\"",
                &format!("listen = \"{addr}\""),
            );
            parse(Path::new("lb.toml"), &text).expect(addr);
        }
    }

    #[test]
    fn dns_settings_are_read_and_bounded() {
        let c = parse(Path::new("lb.toml"), GOOD).expect("valid");
        assert_eq!(c.providers.dns, crate::model::sources::DnsSpec::default());
        let text =
            format!("{GOOD}\n[providers.dns]\nresolver = \"127.0.0.1:8053\"\nmin_ttl_ms = 250\n");
        let c = parse(Path::new("lb.toml"), &text).expect("valid");
        assert_eq!(
            c.providers.dns.resolver,
            Some("127.0.0.1:8053".parse().unwrap())
        );
        assert_eq!(c.providers.dns.min_ttl, Duration::from_millis(250));
        let e = parse_err(&format!("{GOOD}\n[providers.dns]\nrefresh_s = 0\n"));
        assert_eq!(e.field, "providers.dns", "{e}");
        assert!(e.line > 0, "{e}");
        let e = parse_err(&format!(
            "{GOOD}\n[providers.dns]\nresolver = \"not an address\"\n"
        ));
        assert!(e.to_string().contains("resolver"), "{e}");
    }

    #[test]
    fn traefik_file_dirs_are_absolute() {
        let text = format!("{GOOD}\n[providers.redis]\nurl = \"redis://127.0.0.1:6379\"\ntraefik_root = \"traefik\"\ntraefik_file_dirs = [\"/etc/lb/certs\", \"certs\"]\n");
        let e = parse_err(&text);
        assert_eq!(e.field, "providers.redis.traefik_file_dirs[1]", "{e}");
        assert!(e.line > 0, "{e}");
        let c = parse(Path::new("lb.toml"), &text.replace(", \"certs\"", "")).expect("valid");
        let r = c.providers.redis.expect("redis");
        assert_eq!(r.traefik_file_dirs, vec![PathBuf::from("/etc/lb/certs")]);
        let c = parse(
            Path::new("lb.toml"),
            &format!("{GOOD}\n[providers.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n"),
        )
        .expect("valid");
        assert!(
            c.providers.etcd.expect("etcd").traefik_file_dirs.is_empty(),
            "none by default"
        );
    }

    #[test]
    fn cluster_and_etcd_access_are_checked_with_their_field() {
        let dir = std::env::temp_dir().join(format!("lb-cfg-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not read at load").unwrap();
        let cluster = |etcd: &str| {
            format!("{GOOD}\n[cluster]\nname = \"edge\"\nnode = \"lb-a\"\n[cluster.etcd]\n{etcd}\n")
        };
        let ok = cluster(&format!(
            "endpoints = [\"https://10.0.0.5:2379\"]\nca = \"{}\"\nusername = \"lb\"\npassword_file = \"{}\"",
            ca.display(),
            pw.display()
        ));
        let c = parse(Path::new("lb.toml"), &ok).expect("valid");
        let cl = c.cluster.expect("cluster");
        assert_eq!((cl.name.as_str(), cl.node.as_str()), ("edge", "lb-a"));
        let auth = cl.etcd.auth.expect("auth");
        assert_eq!(
            auth.password, "s3cret",
            "the file's line, without its newline"
        );
        assert!(!format!("{auth:?}").contains("s3cret"), "never printed");
        assert_eq!(cl.etcd.tls.expect("tls").ca, ca);
        for (etcd, field) in [
            ("endpoints = [\"https://10.0.0.5:2379\"]", "cluster.etcd.endpoints[0]"),
            ("endpoints = []", "cluster.etcd.endpoints"),
            (
                "endpoints = [\"http://10.0.0.5:2379\"]\nusername = \"lb\"",
                "cluster.etcd.password_file",
            ),
            (
                "endpoints = [\"http://10.0.0.5:2379\"]\nusername = \"lb\"\npassword_file = \"/nonexistent/pw\"",
                "cluster.etcd.password_file",
            ),
            (
                "endpoints = [\"http://10.0.0.5:2379\"]\ncert = \"/etc/lb/c.pem\"",
                "cluster.etcd.ca",
            ),
            (
                "endpoints = [\"http://10.0.0.5:2379\"]\ntraefik_root = \"traefik\"",
                "cluster.etcd.traefik_root",
            ),
        ] {
            let e = parse_err(&cluster(etcd));
            assert_eq!(e.field, field, "{etcd}: {e}");
            assert!(e.line > 0, "{etcd}: {e}");
        }
        let e = parse_err(&ok.replace("\"lb-a\"", "\"lb a\""));
        assert_eq!(e.field, "cluster.node", "{e}");
        let e = parse_err(
            &format!("{ok}\n").replace("[cluster.etcd]", "status_ttl_secs = 1\n[cluster.etcd]"),
        );
        assert_eq!(e.field, "cluster.status_ttl_secs", "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bgp_settings_are_checked_with_their_field() {
        let bgp = |body: &str| {
            format!(
                "{GOOD}\n[bgp]\ninclude = \"/etc/bird/lb.conf\"\nlocal_as = 65001\n{body}\n\
                 [[bgp.neighbor]]\naddress = \"10.0.0.254\"\nas = 65000\n"
            )
        };
        let c = parse(
            Path::new("lb.toml"),
            &bgp("hold_time_secs = 9\nmed = 5\ncommunities = [\"65001:100\"]\nlarge_communities = [\"65001:1:2\"]"),
        )
        .expect("valid");
        let b = c.bgp.expect("bgp");
        assert_eq!(b.interface, "eth0", "the first of agent.interfaces");
        assert_eq!(b.socket, PathBuf::from("/run/bird/bird.ctl"));
        assert_eq!((b.hold_time.as_secs(), b.med), (9, Some(5)));
        assert_eq!(b.communities, vec![(65001, 100)]);
        assert_eq!(b.large_communities, vec![(65001, 1, 2)]);
        for (body, field) in [
            ("hold_time_secs = 2", "bgp.hold_time_secs"),
            ("communities = [\"65001:70000\"]", "bgp.communities[0]"),
            ("large_communities = [\"1:2\"]", "bgp.large_communities[0]"),
            ("interface = \"eth9\"", "bgp.interface"),
            ("socket = \"bird.ctl\"", "bgp.socket"),
        ] {
            let e = parse_err(&bgp(body));
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(e.line > 0, "{body}: {e}");
        }
        let e = parse_err(&bgp("").replace("address = \"10.0.0.254\"", "address = \"router\""));
        assert_eq!(e.field, "bgp.neighbor[0].address", "{e}");
        let e = parse_err(&bgp("").replace("local_as = 65001", "local_as = 0"));
        assert_eq!(e.field, "bgp.local_as", "{e}");
    }

    #[test]
    fn bad_address_names_file_line_and_field() {
        let e = parse_err(&GOOD.replace("10.0.1.2", "10.0.1.x"));
        assert_eq!(e.line, 21);
        assert_eq!(e.field, "vip[0].backend[1].address");
        assert_eq!(
            e.to_string(),
            "lb.toml:21: vip[0].backend[1].address: \"10.0.1.x\" is not an IP address"
        );
    }

    #[test]
    fn unknown_field_is_reported_with_its_line() {
        let e = parse_err(&GOOD.replace("weight = 2", "wieght = 2"));
        assert_eq!(e.line, 18);
        assert!(e.reason.contains("wieght"), "{e}");
    }

    #[test]
    fn type_error_is_reported_with_its_line() {
        let e = parse_err(&GOOD.replace("port = 80\n", "port = \"eighty\"\n"));
        assert_eq!(e.line, 12, "{e}");
    }

    /// More VIPs or inline backends than the maps hold: refused at load, naming the limit.
    #[test]
    fn more_than_the_maps_hold_is_refused_with_its_line() {
        let e = parse_err(&format!("[dataplane]\nmax_backends = 2\n{GOOD}"));
        assert_eq!((e.line, e.field.as_str()), (2, "dataplane.max_backends"));
        assert!(e.reason.contains("2 backends configured"), "{e}");
        parse(
            Path::new("lb.toml"),
            &format!("[dataplane]\nmax_backends = 3\n{GOOD}"),
        )
        .expect("two backends fit in ids 1 and 2");
        let two = format!("{GOOD}\n[[vip]]\nname = \"b\"\naddress = \"10.0.0.101\"\n");
        let e = parse_err(&format!("[dataplane]\nmax_vips = 1\n{two}"));
        assert_eq!((e.line, e.field.as_str()), (2, "dataplane.max_vips"));
    }

    #[test]
    fn bad_mode_and_ring_and_duplicates() {
        let e = parse_err(&GOOD.replace("\"nat\"", "\"nta\""));
        assert_eq!((e.line, e.field.as_str()), (13, "vip[0].mode"));
        let e = parse_err(&format!("[dataplane]\nring_size = 65536\n{GOOD}"));
        assert_eq!((e.line, e.field.as_str()), (2, "dataplane.ring_size"));
        let dup = format!("{GOOD}\n[[vip]]\nname = \"web\"\naddress = \"10.0.0.101\"\n");
        let e = parse_err(&dup);
        assert_eq!(e.field, "vip[1].name");
        let e = parse_err(&GOOD.replace("10.0.1.2", "10.0.1.1\"\nport = 8080\n#\""));
        assert!(e.reason.contains("duplicate backend"), "{e}");
    }

    #[test]
    fn router_rule_errors_name_line_and_column() {
        let text = format!("{GOOD}\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8080\"\n\n[[router]]\nname = \"r\"\nservice = \"web\"\nrule = \"Host(`a`) && Pth(`/`)\"\n");
        let e = parse_err(&text);
        assert_eq!(e.field, "router[0].rule");
        assert!(
            e.reason.contains("column 14") && e.reason.contains("unknown matcher"),
            "{e}"
        );
        let want = text[..text.find("rule =").unwrap()].matches('\n').count() + 1;
        assert_eq!(e.line, want, "{e}");
    }

    #[test]
    fn middlewares_parse_and_bad_ones_are_named() {
        let base = format!("{GOOD}\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8080\"\n");
        let ok = format!("{base}\n[[middleware]]\nname = \"strip\"\nstrip_prefix = {{ prefixes = [\"/api\"] }}\n\n[[router]]\nname = \"r\"\nservice = \"web\"\nrule = \"PathPrefix(`/api`)\"\nmiddlewares = [\"strip\"]\n");
        let c = parse(Path::new("lb.toml"), &ok).expect("valid");
        assert_eq!(c.middlewares.len(), 1);
        assert_eq!(c.routers[0].middlewares, vec!["strip".to_string()]);
        let plain = format!("{base}\n[[middleware]]\nname = \"auth\"\nbasic_auth = {{ users = [\"alice:secret\"] }}\n");
        let e = parse_err(&plain);
        assert!(
            e.field.contains("middleware[0]") && e.reason.contains("plain text"),
            "{e}"
        );
        let missing = ok.replace("middlewares = [\"strip\"]", "middlewares = [\"nope\"]");
        assert!(parse_err(&missing).reason.contains("no middleware named"));
        let unknown = ok.replace("strip_prefix = ", "strip_prefixes = ");
        assert!(parse_err(&unknown).line > 0);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../examples/lb.toml");
        let c = parse(Path::new("examples/lb.toml"), text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.vips.len(), c.routers.len(), c.middlewares.len()),
            (1, 1, 2)
        );
        assert!(c.vips[0].health.is_some());
    }

    #[test]
    fn acme_section_parses_and_errors_name_line_and_field() {
        let base = format!(
            "{GOOD}\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:80\"\n\n[[entrypoint]]\nname = \"websecure\"\naddress = \"0.0.0.0:443\"\ntls = true\n"
        );
        let ok = format!(
            "{base}\n[acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\nemail = \"ops@example.com\"\ndomains = [\"A.example.test\", \"b.example.test\"]\nca_file = \"/tmp/ca.pem\"\n"
        );
        let c = parse(Path::new("lb.toml"), &ok).expect("valid");
        let a = c.acme.expect("acme");
        assert_eq!(a.domains, vec!["a.example.test", "b.example.test"]);
        assert_eq!(a.challenge, crate::model::l7::ChallengeKind::Http01);
        assert_eq!(a.renew_before, Duration::from_secs(30 * 86_400));
        let line_of_text = |needle: &str| ok[..ok.find(needle).unwrap()].matches('\n').count() + 1;
        let e = parse_err(&ok.replace("https://127", "http://127"));
        assert_eq!(
            (e.line, e.field.as_str()),
            (line_of_text("directory ="), "acme.directory")
        );
        let e = parse_err(&ok.replace("\"b.example.test\"", "\"*.example.test\""));
        assert_eq!(e.field, "acme.domains[1]");
        assert!(e.reason.contains("dns-01"), "{e}");
        assert_eq!(e.line, line_of_text("domains ="));
        let e = parse_err(&ok.replace("\"b.example.test\"", "\"a.example.test\""));
        assert!(e.reason.contains("twice"), "{e}");
        let e = parse_err(&ok.replace("ops@example.com", "ops"));
        assert_eq!(e.field, "acme.email");
        let e = parse_err(&format!("{ok}challenge = \"dns-01\"\n"));
        assert_eq!(e.field, "acme.challenge");
        let e = parse_err(&format!("{ok}renew_before_days = 400\n"));
        assert_eq!(e.field, "acme.renew_before_days");
        // TLS-ALPN-01 needs a TLS entry point; HTTP-01 a plain one.
        let plain_only = ok.replace("tls = true\n", "");
        let c = parse(Path::new("lb.toml"), &plain_only).expect("valid");
        assert!(c.acme.is_some());
        let e = parse_err(&format!("{plain_only}challenge = \"tls-alpn-01\"\n"));
        assert!(e.reason.contains("tls = true"), "{e}");
        // [acme] alone is enough for a TLS entry point.
        let no_acme = &ok[..ok.find("[acme]").unwrap()];
        assert!(parse_err(no_acme).reason.contains("[acme]"));
    }

    #[test]
    fn nat_family_mismatch_rejected() {
        let e = parse_err(&GOOD.replace("10.0.1.2", "fd00::2"));
        assert!(e.reason.contains("address family"), "{e}");
    }

    #[test]
    fn tcp_routers_parse_and_bad_ones_are_named() {
        let base = format!(
            "{GOOD}\n[tls]\ndev_ca = true\n\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8080\"\n\n[[entrypoint]]\nname = \"secure\"\naddress = \"0.0.0.0:8443\"\ntls = true\n"
        );
        let ok = format!(
            r#"{base}
[[tcp_router]]
name = "pass"
rule = "HostSNI(`a.example`, `*.b.example`) && !ClientIP(`192.0.2.0/24`)"
service = "db"
tls = "passthrough"
priority = 5

[[tcp_router]]
name = "term"
entrypoints = ["secure"]
rule = "HostSNI(`c.example`)"
service = "db"
tls = "terminate"

[[tcp_router]]
name = "plain"
entrypoints = ["web"]
rule = "HostSNI(`*`)"
service = "echo"
"#
        );
        let c = parse(Path::new("lb.toml"), &ok).unwrap_or_else(|e| panic!("{e}"));
        use crate::model::l7::TlsMode;
        let modes: Vec<_> = c
            .tcp_routers
            .iter()
            .map(|r| (r.name.as_str(), r.tls))
            .collect();
        assert_eq!(
            modes,
            vec![
                ("pass", TlsMode::Passthrough),
                ("term", TlsMode::Terminate),
                ("plain", TlsMode::Plain)
            ]
        );
        assert_eq!(c.tcp_routers[0].priority, Some(5));
        assert_eq!(c.tcp_routers[1].entrypoints, vec!["secure".to_string()]);

        let line_of_text =
            |text: &str, needle: &str| text[..text.find(needle).unwrap()].matches('\n').count() + 1;
        // Each mistake: the field, its line and the reason.
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            (
                "rule = \"HostSNI(`*`)\"\nservice = \"echo\"",
                "rule = \"HostSNI(`x.example`)\"\nservice = \"echo\"",
                "rule = \"HostSNI(`x",
                "tcp_router[2].rule",
                "column 9: plain TCP carries no server name",
            ),
            (
                "tls = \"terminate\"",
                "tls = \"terminat\"",
                "tls = \"terminat\"",
                "tcp_router[1].tls",
                "expected \"passthrough\"",
            ),
            (
                "entrypoints = [\"secure\"]",
                "entrypoints = [\"web\"]",
                "tls = \"terminate\"",
                "tcp_router[1].tls",
                "entrypoint \"web\" has none",
            ),
            (
                "entrypoints = [\"secure\"]",
                "entrypoints = [\"nope\"]",
                "entrypoints = [\"nope\"]",
                "tcp_router[1].entrypoints",
                "no entrypoint named \"nope\"",
            ),
            (
                "name = \"term\"",
                "name = \"pass\"",
                "name = \"pass\"\nentrypoints",
                "tcp_router[1].name",
                "must be unique",
            ),
            (
                "service = \"echo\"",
                "service = \"e cho\"",
                "service = \"e cho\"",
                "tcp_router[2].service",
                "must be",
            ),
            (
                "HostSNI(`c.example`)",
                "HostSNI(`c.example`) && Path(`/`)",
                "rule = \"HostSNI(`c.example`) &&",
                "tcp_router[1].rule",
                "column 25: unknown matcher \"Path\"",
            ),
        ];
        for (from, to, at, field, reason) in cases {
            let text = ok.replace(from, to);
            let e = parse_err(&text);
            assert_eq!(e.field, *field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
            assert_eq!(e.line, line_of_text(&text, at), "{e}");
        }
        // A terminating router without entrypoints would also serve the plain entry point.
        let e = parse_err(&ok.replace("entrypoints = [\"secure\"]\n", ""));
        assert!(e.reason.contains("list the TLS ones"), "{e}");
        let e = parse_err(&ok.replace("tls = \"passthrough\"", "tls = \"passthrough\"\ncolor = 1"));
        assert!(e.reason.contains("color"), "{e}");
    }
}
