//! Middlewares as configured: what lb.toml, Traefik's files and the KV stores say, as values.
//! The proxy builds each into its running form (`proxy::middleware`); equal configurations keep
//! the built one (and its state).

use std::collections::HashMap;

use serde::Deserialize;

/// A middleware as configured: the key names the kind (`strip_prefix = { … }`). Configuration
/// is read rarely and kept small in number, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MiddlewareConfig {
    StripPrefix(StripPrefixConfig),
    StripPrefixRegex(StripPrefixRegexConfig),
    AddPrefix(AddPrefixConfig),
    ReplacePath(ReplacePathConfig),
    ReplacePathRegex(ReplacePathRegexConfig),
    RedirectScheme(RedirectSchemeConfig),
    RedirectRegex(RedirectRegexConfig),
    Headers(HeadersConfig),
    BasicAuth(BasicAuthConfig),
    ApiKey(ApiKeyConfig),
    ForwardAuth(ForwardAuthConfig),
    IpAllowList(IpAllowListConfig),
    RateLimit(RateLimitConfig),
    InFlightReq(InFlightReqConfig),
    Buffering(BufferingConfig),
    Retry(RetryConfig),
    CircuitBreaker(CircuitBreakerConfig),
    Compress(CompressConfig),
    Errors(ErrorsConfig),
    DigestAuth(DigestAuthConfig),
    PassTlsClientCert(PassTlsClientCertConfig),
    ContentType(ContentTypeConfig),
    GrpcWeb(GrpcWebConfig),
}

/// Traefik's `grpcWeb`: gRPC-Web calls from browsers to a gRPC upstream (one that speaks
/// HTTP/2), and the CORS preflights of the origins allowed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcWebConfig {
    /// Origins whose pages may call (`*`: any); none: no cross-origin calls.
    #[serde(default)]
    pub allow_origins: Vec<String>,
}

/// Traefik's `contentType`: an answer without `Content-Type` gets the one its first bytes show,
/// by Go's `http.DetectContentType` (the WHATWG sniffing subset Traefik uses). Without this
/// middleware lb, like Traefik, adds none.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContentTypeConfig {}

/// Traefik's `passTLSClientCert`: the client's TLS certificates to the upstream in
/// `X-Forwarded-Tls-Client-Cert` (each DER in base64, URL-escaped, comma-separated, the client's
/// own first). Whatever the client sent in that header (or `…-Info`) is removed first.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassTlsClientCertConfig {
    #[serde(default)]
    pub pem: bool,
    /// Fields of each certificate to `X-Forwarded-Tls-Client-Cert-Info`, in Traefik's format.
    #[serde(default)]
    pub info: Option<CertInfoConfig>,
}

/// What `passTLSClientCert.info` passes of each certificate.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertInfoConfig {
    #[serde(default)]
    pub not_after: bool,
    #[serde(default)]
    pub not_before: bool,
    #[serde(default)]
    pub sans: bool,
    #[serde(default)]
    pub serial_number: bool,
    #[serde(default)]
    pub subject: Option<DnFields>,
    #[serde(default)]
    pub issuer: Option<DnFields>,
}

/// The parts of a distinguished name to pass (`organizational_unit` is the subject's only, as
/// in Traefik).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnFields {
    #[serde(default)]
    pub country: bool,
    #[serde(default)]
    pub province: bool,
    #[serde(default)]
    pub locality: bool,
    #[serde(default)]
    pub organization: bool,
    #[serde(default)]
    pub organizational_unit: bool,
    #[serde(default)]
    pub common_name: bool,
    #[serde(default)]
    pub serial_number: bool,
    #[serde(default)]
    pub domain_component: bool,
}

/// HTTP Digest authentication (RFC 7616 with MD5, `qop=auth`: what Traefik's `digestAuth` and
/// browsers speak): `user:realm:HA1` lines as `htdigest` writes them; only the lines of `realm`
/// count.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DigestAuthConfig {
    pub users: Vec<String>,
    #[serde(default = "realm")]
    pub realm: String,
    /// Passes the authenticated user's name to the upstream in this header.
    #[serde(default)]
    pub header_field: Option<String>,
}

impl MiddlewareConfig {
    /// The service this middleware sends requests of its own to (the errors page's).
    pub fn service(&self) -> Option<&str> {
        match self {
            MiddlewareConfig::Errors(c) => Some(&c.service),
            _ => None,
        }
    }
}

/// Traefik's `errors`: an answer whose status is in `status` (`500-599`, `404`) is replaced by
/// what `service` answers a GET to `query` (`{status}` and `{url}` filled in), keeping the
/// status; the client's request headers go along.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ErrorsConfig {
    pub status: Vec<String>,
    pub service: String,
    #[serde(default = "slash")]
    pub query: String,
}

fn slash() -> String {
    "/".into()
}

// ---- path

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StripPrefixConfig {
    pub prefixes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StripPrefixRegexConfig {
    pub regex: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AddPrefixConfig {
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplacePathConfig {
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplacePathRegexConfig {
    pub regex: String,
    /// With `$1` / `${name}` for the regex's groups.
    pub replacement: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectSchemeConfig {
    pub scheme: String,
    #[serde(default)]
    pub permanent: bool,
    /// The port to redirect to; the scheme's default when absent.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectRegexConfig {
    /// Matched against the whole URL: `scheme://host[:port]/path?query`.
    pub regex: String,
    pub replacement: String,
    #[serde(default)]
    pub permanent: bool,
}

// ---- headers

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed (`*`: any).
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[serde(default)]
    pub max_age_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    #[serde(default)]
    pub request_set: HashMap<String, String>,
    #[serde(default)]
    pub request_add: HashMap<String, String>,
    #[serde(default)]
    pub request_remove: Vec<String>,
    #[serde(default)]
    pub response_set: HashMap<String, String>,
    #[serde(default)]
    pub response_add: HashMap<String, String>,
    #[serde(default)]
    pub response_remove: Vec<String>,
    #[serde(default)]
    pub cors: Option<CorsConfig>,
}

// ---- auth

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// `user:hash` lines, as htpasswd writes them (bcrypt or argon2).
    pub users: Vec<String>,
    #[serde(default = "realm")]
    pub realm: String,
    /// Passes the authenticated user's name to the upstream in this header.
    #[serde(default)]
    pub header_field: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// `sha256:<hex>` digests of the accepted keys.
    pub keys: Vec<String>,
    /// The header that carries the key.
    #[serde(default = "api_key_header")]
    pub header: String,
    /// Also accepted as this query parameter (removed before forwarding).
    #[serde(default)]
    pub query: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// The authentication service (`http://` or `https://`).
    pub address: String,
    /// Keep the client's `X-Forwarded-*` headers (only when lb sits behind trusted proxies).
    #[serde(default)]
    pub trust_forward_header: bool,
    /// Headers of the auth service's 2xx answer copied onto the request.
    #[serde(default)]
    pub auth_response_headers: Vec<String>,
    /// Request headers sent to the auth service; empty: all of them.
    #[serde(default)]
    pub auth_request_headers: Vec<String>,
    #[serde(default = "auth_timeout")]
    pub timeout_ms: u64,
    /// CA for an `https://` address (the system's roots otherwise).
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

pub fn api_key_header() -> String {
    "X-API-Key".into()
}

fn auth_timeout() -> u64 {
    5000
}

fn realm() -> String {
    "lb".into()
}

// ---- limit

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpAllowListConfig {
    pub source_range: Vec<String>,
    /// Which address is checked; the connection's (or a PROXY header's) without.
    #[serde(default)]
    pub ip_strategy: Option<IpStrategyConfig>,
}

/// Traefik's `ipStrategy`: the client's address taken from `X-Forwarded-For` (which reaches
/// middlewares only from a proxy the entry point trusts: from anyone else lb drops it). `depth`
/// counts from the right (1: the last proxy's client); without it, the rightmost address not in
/// `excluded_ips` (the connection's when the header is absent). `ipv6_subnet` keys IPv6 clients
/// by their prefix.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IpStrategyConfig {
    #[serde(default)]
    pub depth: usize,
    #[serde(default)]
    pub excluded_ips: Vec<String>,
    #[serde(default)]
    pub ipv6_subnet: Option<u8>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests a second, sustained.
    pub average: f64,
    #[serde(default = "one")]
    pub burst: f64,
    /// Key the buckets by this request header's value instead of the client address (requests
    /// without it share one bucket keyed by their address).
    #[serde(default)]
    pub source_header: Option<String>,
    /// Buckets kept in Redis, shared by every node that names the same server and middleware.
    #[serde(default)]
    pub redis: Option<RateLimitRedis>,
    /// Which address keys the buckets (without a header); the connection's without.
    #[serde(default)]
    pub ip_strategy: Option<IpStrategyConfig>,
}

/// A rate limit's buckets in Redis: one atomic script per decision.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRedis {
    /// `redis://[user:password@]host:port/db`.
    pub url: String,
    /// Keys are `<prefix><middleware name>:<client key hash>`.
    #[serde(default = "rate_limit_prefix")]
    pub prefix: String,
    /// What a request gets when Redis cannot decide in time: no default, each router chooses.
    pub on_error: RateLimitFailure,
    /// The most a decision may wait for Redis (connect included).
    #[serde(default = "rate_limit_timeout_ms")]
    pub timeout_ms: u64,
}

/// Redis unreachable: let requests through (counted, logged) or refuse them (`503`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitFailure {
    Open,
    Closed,
}

fn rate_limit_prefix() -> String {
    "lb/ratelimit/".into()
}

fn rate_limit_timeout_ms() -> u64 {
    100
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InFlightReqConfig {
    pub amount: u64,
    /// Whose requests are counted together: the router's all together (the default in
    /// lb.toml), each client address's (Traefik's default), or each value of a header.
    #[serde(default)]
    pub per: InFlightPer,
    /// With `per = "header"`: the header (requests without it count by client address).
    #[serde(default)]
    pub source_header: Option<String>,
    /// Which address counts, per client address; the connection's without.
    #[serde(default)]
    pub ip_strategy: Option<IpStrategyConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InFlightPer {
    #[default]
    Router,
    ClientIp,
    Header,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BufferingConfig {
    /// Larger request bodies: 413. 0: no limit.
    #[serde(default)]
    pub max_request_body_bytes: u64,
    /// Larger response bodies: 500 instead. 0: no limit.
    #[serde(default)]
    pub max_response_body_bytes: u64,
}

fn one() -> f64 {
    1.0
}

// ---- resilience

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub attempts: u32,
    #[serde(default = "initial_interval")]
    pub initial_interval_ms: u64,
    /// Answers to send again too: statuses and ranges (`"502"`, `"500-599"`).
    #[serde(default)]
    pub status: Vec<String>,
    /// No retry once this long has passed since the first attempt (0: no bound).
    #[serde(default)]
    pub timeout_ms: u64,
    /// An attempt that got no answer is not sent again.
    #[serde(default)]
    pub disable_retry_on_network_error: bool,
    /// POST, PATCH and the like are sent again too (when their body can be).
    #[serde(default)]
    pub retry_non_idempotent_method: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    pub expression: String,
    #[serde(default = "check_period")]
    pub check_period_ms: u64,
    #[serde(default = "ten_seconds")]
    pub fallback_duration_ms: u64,
    #[serde(default = "ten_seconds")]
    pub recovery_duration_ms: u64,
    #[serde(default = "unavailable")]
    pub response_code: u16,
}

fn check_period() -> u64 {
    100
}

fn initial_interval() -> u64 {
    100
}

fn ten_seconds() -> u64 {
    10_000
}

fn unavailable() -> u16 {
    503
}

// ---- compress

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompressConfig {
    #[serde(default = "default_encodings")]
    pub encodings: Vec<String>,
    #[serde(default = "default_min")]
    pub min_response_body_bytes: u64,
    #[serde(default)]
    pub excluded_content_types: Vec<String>,
}

fn default_encodings() -> Vec<String> {
    vec!["zstd".into(), "br".into(), "gzip".into()]
}

fn default_min() -> u64 {
    1024
}

/// What is weak about a hash lb accepts only because htpasswd and Traefik's documentation make
/// them: `None` for bcrypt and argon2 (and for what is not a hash at all).
pub fn weak_hash(hash: &str) -> Option<&'static str> {
    if hash.starts_with("$apr1$") {
        Some("$apr1$ is MD5, fast to guess (use htpasswd -B for bcrypt)")
    } else if hash.starts_with("{SHA}") {
        Some("{SHA} is unsalted SHA-1, fast to guess (use htpasswd -B for bcrypt)")
    } else {
        None
    }
}
