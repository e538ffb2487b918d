//! Middlewares: steps a router runs on the request before it is forwarded (and on the response
//! after), configured by name and attached to routers in order.
//!
//! Most are synchronous and allocation-free on the request path; the few that must wait (an auth
//! server, a body to buffer) return a future instead, so the common chain never boxes one. State
//! that depends on time (rate limits, the circuit breaker) takes the clock as an argument so it
//! is tested exactly. Configuration, one kind per `[[middleware]]`:
//!
//! ```toml
//! [[middleware]]
//! name = "api-strip"
//! strip_prefix = { prefixes = ["/api"] }
//! ```

pub mod auth;
pub mod compress;
pub mod digest;
pub mod errors;
pub mod grpc_web;
pub mod headers;
pub mod limit;
pub mod path;
pub mod resilience;
pub mod sniff;

use std::{future::Future, net::IpAddr, pin::Pin, sync::Arc, time::Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode, Uri};

use super::Body;
use crate::model::middleware::MiddlewareConfig;
pub use resilience::RetryPolicy;

/// A request on its way through the chain (its body boxed, so a middleware may replace it).
pub type Req = hyper::Request<Body>;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a middleware sees of the request besides the request itself, and what it leaves for
/// the forwarding step and for the response half of the chain.
pub struct Ctx {
    pub client_ip: IpAddr,
    pub scheme: &'static str,
    /// Host without port, lowercase.
    pub host: String,
    /// When the request arrived (latency for the circuit breaker; the clock for rate limits).
    pub now: Instant,
    /// Releases taken on the way (in-flight slots), dropped when the response is done.
    pub guards: Vec<Box<dyn Send>>,
    /// Set by `retry`: replaces the service's retry count for this request.
    pub retry: Option<RetryPolicy>,
    /// The request body, when a middleware buffered it whole: lets a retry or a mirror send it
    /// again.
    pub replay: Option<Bytes>,
    /// Per-request notes a middleware leaves for its own response half (the client's Origin,
    /// the negotiated encoding, …).
    pub notes: hyper::http::Extensions,
    /// The routing table's services, for a middleware that sends requests of its own (set only
    /// on routes that have one).
    pub fetch: Option<Arc<dyn Fetch>>,
}

/// A GET to one of the table's services (an error page): its head and whole body (at most
/// `max` bytes), or `None` when it has no upstream free, or none answered whole in time.
pub trait Fetch: Send + Sync {
    fn get<'a>(
        &'a self,
        service: &'a str,
        path_and_query: &'a str,
        headers: hyper::HeaderMap,
        max: usize,
    ) -> BoxFuture<'a, Option<(hyper::http::response::Parts, Bytes)>>;
}

impl Ctx {
    pub fn new(client_ip: IpAddr, scheme: &'static str, host: String, now: Instant) -> Ctx {
        Ctx {
            client_ip,
            scheme,
            host,
            now,
            guards: Vec::new(),
            retry: None,
            replay: None,
            notes: hyper::http::Extensions::new(),
            fetch: None,
        }
    }
}

/// What a middleware decided about a request.
pub enum Flow<'a> {
    /// On to the next step.
    Next,
    /// Answered here: the request goes no further (the earlier middlewares still see the answer).
    Answer(Response<Body>),
    /// Must wait first; `Some` answers, `None` goes on.
    Wait(BoxFuture<'a, Option<Response<Body>>>),
}

pub trait Middleware: Send + Sync {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a>;
    /// May change the response on its way back; `Some` when that needs waiting.
    fn response<'a>(
        &'a self,
        _ctx: &'a Ctx,
        _resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        None
    }
    /// A query parameter that carries a credential this middleware reads (an API key's custom
    /// `query` name): the access log redacts it whatever it is called.
    fn secret_query(&self) -> Option<&str> {
        None
    }
    /// The service this middleware sends requests of its own to: the table keeps its pool, and
    /// the routes using it get [`Ctx::fetch`].
    fn service(&self) -> Option<&str> {
        None
    }
}

/// Marks a response lb made because the upstream could not be reached or did not answer in
/// time (as opposed to an error status the upstream chose): the circuit breaker's network errors.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamFailure;

/// Marks a response lb made because of what the client sent (a malformed or stalled body, a
/// target lb refuses): evidence about the client, never about the service, so the circuit
/// breaker leaves it out of its window.
#[derive(Debug, Clone, Copy)]
pub struct ClientFault;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn answer(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = code;
    r
}

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum ReadError {
    TooLarge,
    Broken(super::BoxError),
}

/// Reads a body whole, refusing it once it passes `max` bytes.
pub async fn read_body(mut body: Body, max: usize) -> Result<Bytes, ReadError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Broken)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Replaces the path, keeping the query.
pub fn set_path(req: &mut Req, path: &str) {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(p) = pq.parse() {
        parts.path_and_query = Some(p);
        if let Ok(u) = Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

// ------------------------------------------------------------------ configuration

/// Why a middleware's configuration cannot be built. Every variant names the field and the value
/// at fault: the config layer wraps it with the file, line and middleware name, and a Traefik or
/// Redis source with its key path, so the operator sees one value to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("regex {pattern:?}: {source}")]
    Regex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("{0:?} is not a header name")]
    HeaderName(String),
    #[error("{0:?} is not a header value")]
    HeaderValue(String),
    #[error("{field} {value:?} must start with /")]
    NotRooted { field: &'static str, value: String },
    #[error("{field} {value:?}: expected {expected}")]
    Expected {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{field} must be {bound}")]
    OutOfRange {
        field: &'static str,
        bound: &'static str,
    },
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A circuit breaker's `expression`, at a 1-based column.
    #[error("expression, column {column}: {what}")]
    Expression { column: usize, what: &'static str },
    /// Passwords are configured only as hashes, so a leaked config leaks no password.
    #[error(
        "user {user:?}: only bcrypt ($2…) or argon2 ($argon2…) hashes are accepted, never plain text"
    )]
    PlainPassword { user: String },
    #[error("keys are configured as sha256:<hex digest>, never in plain text")]
    PlainKey,
    /// Browsers refuse credentials with `*`; lb says so rather than serve a CORS policy that
    /// silently fails in every browser.
    #[error("cors: allow_credentials with origin \"*\" is refused by browsers; list the origins")]
    CredentialedWildcard,
    /// forwardAuth's client (its CA file) could not be set up.
    #[error("its HTTP client: {0}")]
    Client(String),
}

impl BuildError {
    fn regex(pattern: &str) -> impl FnOnce(regex::Error) -> BuildError + '_ {
        move |source| BuildError::Regex {
            pattern: pattern.to_string(),
            source,
        }
    }
}

/// A header name from configuration.
fn header_name(name: &str) -> Result<hyper::header::HeaderName, BuildError> {
    hyper::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| BuildError::HeaderName(name.to_string()))
}

impl MiddlewareConfig {
    /// Builds the middleware, or says what is wrong with its configuration.
    pub fn build(&self) -> Result<Arc<dyn Middleware>, BuildError> {
        self.build_named("unnamed")
    }

    /// [`MiddlewareConfig::build`] for the middleware called `name` (what names its state
    /// shared with other nodes: a Redis rate limit's keys).
    pub fn build_named(&self, name: &str) -> Result<Arc<dyn Middleware>, BuildError> {
        Ok(match self {
            MiddlewareConfig::StripPrefix(c) => Arc::new(c.build()),
            MiddlewareConfig::StripPrefixRegex(c) => Arc::new(c.build()?),
            MiddlewareConfig::AddPrefix(c) => Arc::new(c.build()?),
            MiddlewareConfig::ReplacePath(c) => Arc::new(c.build()?),
            MiddlewareConfig::ReplacePathRegex(c) => Arc::new(c.build()?),
            MiddlewareConfig::RedirectScheme(c) => Arc::new(c.build()?),
            MiddlewareConfig::RedirectRegex(c) => Arc::new(c.build()?),
            MiddlewareConfig::Headers(c) => Arc::new(c.build()?),
            MiddlewareConfig::BasicAuth(c) => Arc::new(c.build()?),
            MiddlewareConfig::ApiKey(c) => Arc::new(c.build()?),
            MiddlewareConfig::ForwardAuth(c) => Arc::new(c.build()?),
            MiddlewareConfig::IpAllowList(c) => Arc::new(c.build()?),
            MiddlewareConfig::RateLimit(c) => Arc::new(c.build_named(name)?),
            MiddlewareConfig::InFlightReq(c) => Arc::new(c.build()?),
            MiddlewareConfig::Buffering(c) => Arc::new(c.build()?),
            MiddlewareConfig::Retry(c) => Arc::new(c.build()?),
            MiddlewareConfig::CircuitBreaker(c) => Arc::new(c.build()?),
            MiddlewareConfig::Compress(c) => Arc::new(c.build()?),
            MiddlewareConfig::Errors(c) => Arc::new(c.build()?),
            MiddlewareConfig::DigestAuth(c) => Arc::new(c.build()?),
            MiddlewareConfig::PassTlsClientCert(c) => Arc::new(headers::PassTlsClientCert {
                pem: c.pem,
                info: c.info.clone(),
            }),
            MiddlewareConfig::ContentType(_) => Arc::new(sniff::ContentType),
            MiddlewareConfig::GrpcWeb(c) => Arc::new(grpc_web::GrpcWeb {
                allow_origins: c.allow_origins.clone(),
            }),
        })
    }
}
