//! Middlewares: small steps a router runs on the request before it is forwarded (and on the
//! response after), configured by name and attached to routers in order.
//!
//! Each is one type behind [`Middleware`]; state that depends on time (rate limits) takes the
//! clock as an argument so it is tested exactly. Configuration, one kind per `[[middleware]]`:
//!
//! ```toml
//! [[middleware]]
//! name = "api-strip"
//! strip_prefix = { prefixes = ["/api"] }
//! ```

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    header::{self, HeaderName, HeaderValue},
    Response, StatusCode, Uri,
};
use ipnet::IpNet;
use serde::Deserialize;

use super::Body;

/// What a middleware sees of the request besides the request itself.
pub struct Ctx {
    pub client_ip: IpAddr,
    pub scheme: &'static str,
    pub host: String,
    pub now: Instant,
    /// Releases taken on the way (in-flight slots), dropped when the response is done.
    pub guards: Vec<Box<dyn Send>>,
}

pub trait Middleware: Send + Sync {
    /// May change the request, or answer it (the request then goes no further).
    fn request(
        &self,
        ctx: &mut Ctx,
        req: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>>;
    /// May change the response on its way back.
    fn response(&self, _ctx: &Ctx, _resp: &mut Response<Body>) {}
}

fn answer(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}

fn set_path(req: &mut hyper::Request<super::Incoming>, path: &str) {
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

/// Removes the first matching prefix from the path (and says which in `X-Forwarded-Prefix`).
pub struct StripPrefix {
    pub prefixes: Vec<String>,
}

impl Middleware for StripPrefix {
    fn request(
        &self,
        _: &mut Ctx,
        req: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        let path = req.uri().path().to_string();
        if let Some(p) = self.prefixes.iter().find(|p| path.starts_with(p.as_str())) {
            let rest = &path[p.len()..];
            let rest = if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            };
            if let Ok(v) = HeaderValue::from_str(p) {
                req.headers_mut().insert("x-forwarded-prefix", v);
            }
            set_path(req, &rest);
        }
        None
    }
}

pub struct AddPrefix {
    pub prefix: String,
}

impl Middleware for AddPrefix {
    fn request(
        &self,
        _: &mut Ctx,
        req: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        let path = format!("{}{}", self.prefix.trim_end_matches('/'), req.uri().path());
        set_path(req, &path);
        None
    }
}

/// Sets, adds or removes request and response headers.
#[derive(Default)]
pub struct Headers {
    pub request_set: Vec<(HeaderName, HeaderValue)>,
    pub request_remove: Vec<HeaderName>,
    pub response_set: Vec<(HeaderName, HeaderValue)>,
    pub response_remove: Vec<HeaderName>,
}

impl Middleware for Headers {
    fn request(
        &self,
        _: &mut Ctx,
        req: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        let h = req.headers_mut();
        for n in &self.request_remove {
            h.remove(n);
        }
        for (n, v) in &self.request_set {
            h.insert(n.clone(), v.clone());
        }
        None
    }
    fn response(&self, _: &Ctx, resp: &mut Response<Body>) {
        let h = resp.headers_mut();
        for n in &self.response_remove {
            h.remove(n);
        }
        for (n, v) in &self.response_set {
            h.insert(n.clone(), v.clone());
        }
    }
}

/// Redirects to another scheme (e.g. http → https), keeping host, path and query.
pub struct RedirectScheme {
    pub scheme: String,
    pub permanent: bool,
}

impl Middleware for RedirectScheme {
    fn request(
        &self,
        ctx: &mut Ctx,
        req: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        if ctx.scheme == self.scheme {
            return None;
        }
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let location = format!("{}://{}{pq}", self.scheme, ctx.host);
        let code = if self.permanent {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::FOUND
        };
        let mut r = answer(code, "redirecting");
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Some(r)
    }
}

/// HTTP Basic authentication against bcrypt (`$2…`) or argon2 (`$argon2…`) hashes; plain-text
/// passwords are refused when the configuration is loaded.
pub struct BasicAuth {
    /// user → hash.
    pub users: HashMap<String, String>,
    pub realm: String,
}

impl BasicAuth {
    /// `user:hash` lines, as htpasswd writes them.
    pub fn new(users: &[String], realm: &str) -> Result<BasicAuth, String> {
        let mut map = HashMap::new();
        for u in users {
            let (name, hash) = u
                .split_once(':')
                .ok_or_else(|| format!("{u:?}: expected user:hash"))?;
            if !(hash.starts_with("$2") || hash.starts_with("$argon2")) {
                return Err(format!("user {name:?}: only bcrypt ($2…) or argon2 ($argon2…) hashes are accepted, never plain text"));
            }
            map.insert(name.to_string(), hash.to_string());
        }
        Ok(BasicAuth {
            users: map,
            realm: realm.to_string(),
        })
    }

    fn verify(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        if hash.starts_with("$argon2") {
            use argon2::{password_hash::PasswordHash, PasswordVerifier as _};
            return PasswordHash::new(hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            });
        }
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

impl Middleware for BasicAuth {
    fn request(
        &self,
        _: &mut Ctx,
        req: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        use base64::Engine as _;
        let creds = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok());
        if let Some((user, pass)) = creds.as_deref().and_then(|c| c.split_once(':')) {
            if self.verify(user, pass) {
                // The upstream never sees the password.
                req.headers_mut().remove(header::AUTHORIZATION);
                return None;
            }
        }
        let mut r = answer(StatusCode::UNAUTHORIZED, "authentication required");
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm)) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        Some(r)
    }
}

/// Only clients from these ranges; others get 403.
pub struct IpAllowList {
    pub ranges: Vec<IpNet>,
}

impl Middleware for IpAllowList {
    fn request(
        &self,
        ctx: &mut Ctx,
        _: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        if self.ranges.iter().any(|n| n.contains(&ctx.client_ip)) {
            return None;
        }
        Some(answer(StatusCode::FORBIDDEN, "forbidden"))
    }
}

/// A token bucket: `average` tokens a second, up to `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token if there is one, refilling for the time since the last call.
    pub fn take(&mut self, average: f64, burst: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * average).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-client-IP token buckets; over the limit: 429. The bucket map is bounded: when it is full,
/// buckets idle long enough to be full again are dropped (they would allow a burst anyway).
pub struct RateLimit {
    pub average: f64,
    pub burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

const MAX_BUCKETS: usize = 100_000;

impl RateLimit {
    pub fn new(average: f64, burst: f64) -> RateLimit {
        RateLimit {
            average,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, key: IpAddr, now: Instant) -> bool {
        let Ok(mut b) = self.buckets.lock() else {
            return true;
        };
        if b.len() >= MAX_BUCKETS && !b.contains_key(&key) {
            let full_after = self.burst / self.average.max(f64::MIN_POSITIVE);
            b.retain(|_, v| now.saturating_duration_since(v.at).as_secs_f64() < full_after);
        }
        let burst = self.burst;
        b.entry(key)
            .or_insert(Bucket {
                tokens: burst,
                at: now,
            })
            .take(self.average, burst, now)
    }
}

impl Middleware for RateLimit {
    fn request(
        &self,
        ctx: &mut Ctx,
        _: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        if self.allow(ctx.client_ip, ctx.now) {
            return None;
        }
        let mut r = answer(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Some(r)
    }
}

/// At most `amount` requests of this router in flight; the rest get 429 at once.
pub struct InFlightReq {
    pub amount: u64,
    current: Arc<AtomicU64>,
}

impl InFlightReq {
    pub fn new(amount: u64) -> InFlightReq {
        InFlightReq {
            amount,
            current: Arc::new(AtomicU64::new(0)),
        }
    }
}

struct Slot(Arc<AtomicU64>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Middleware for InFlightReq {
    fn request(
        &self,
        ctx: &mut Ctx,
        _: &mut hyper::Request<super::Incoming>,
    ) -> Option<Response<Body>> {
        if self.current.fetch_add(1, Ordering::SeqCst) >= self.amount {
            self.current.fetch_sub(1, Ordering::SeqCst);
            return Some(answer(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests in flight",
            ));
        }
        ctx.guards.push(Box::new(Slot(self.current.clone())));
        None
    }
}

// ------------------------------------------------------------------ configuration

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MiddlewareConfig {
    StripPrefix {
        prefixes: Vec<String>,
    },
    AddPrefix {
        prefix: String,
    },
    Headers {
        #[serde(default)]
        request_set: HashMap<String, String>,
        #[serde(default)]
        request_remove: Vec<String>,
        #[serde(default)]
        response_set: HashMap<String, String>,
        #[serde(default)]
        response_remove: Vec<String>,
    },
    RedirectScheme {
        scheme: String,
        #[serde(default)]
        permanent: bool,
    },
    BasicAuth {
        users: Vec<String>,
        #[serde(default = "realm")]
        realm: String,
    },
    IpAllowList {
        source_range: Vec<String>,
    },
    RateLimit {
        average: f64,
        #[serde(default = "one")]
        burst: f64,
    },
    InFlightReq {
        amount: u64,
    },
}

fn realm() -> String {
    "lb".into()
}
fn one() -> f64 {
    1.0
}

fn headers(map: &HashMap<String, String>) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    map.iter()
        .map(|(k, v)| {
            let n = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("{k:?} is not a header name"))?;
            let v = HeaderValue::from_str(v).map_err(|_| format!("{v:?} is not a header value"))?;
            Ok((n, v))
        })
        .collect()
}

fn names(list: &[String]) -> Result<Vec<HeaderName>, String> {
    list.iter()
        .map(|k| {
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("{k:?} is not a header name"))
        })
        .collect()
}

impl MiddlewareConfig {
    /// Builds the middleware, or says what is wrong with its configuration.
    pub fn build(&self) -> Result<Arc<dyn Middleware>, String> {
        Ok(match self {
            MiddlewareConfig::StripPrefix { prefixes } => Arc::new(StripPrefix {
                prefixes: prefixes.clone(),
            }),
            MiddlewareConfig::AddPrefix { prefix } => {
                if !prefix.starts_with('/') {
                    return Err(format!("prefix {prefix:?} must start with /"));
                }
                Arc::new(AddPrefix {
                    prefix: prefix.clone(),
                })
            }
            MiddlewareConfig::Headers {
                request_set,
                request_remove,
                response_set,
                response_remove,
            } => Arc::new(Headers {
                request_set: headers(request_set)?,
                request_remove: names(request_remove)?,
                response_set: headers(response_set)?,
                response_remove: names(response_remove)?,
            }),
            MiddlewareConfig::RedirectScheme { scheme, permanent } => {
                if scheme != "https" && scheme != "http" {
                    return Err(format!("scheme {scheme:?}: expected http or https"));
                }
                Arc::new(RedirectScheme {
                    scheme: scheme.clone(),
                    permanent: *permanent,
                })
            }
            MiddlewareConfig::BasicAuth { users, realm } => Arc::new(BasicAuth::new(users, realm)?),
            MiddlewareConfig::IpAllowList { source_range } => {
                let ranges = source_range
                    .iter()
                    .map(|r| {
                        r.parse::<IpNet>()
                            .or_else(|_| r.parse::<IpAddr>().map(IpNet::from))
                            .map_err(|_| format!("{r:?} is not an address or CIDR"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Arc::new(IpAllowList { ranges })
            }
            MiddlewareConfig::RateLimit { average, burst } => {
                if *average <= 0.0 {
                    return Err("average must be > 0".into());
                }
                Arc::new(RateLimit::new(*average, *burst))
            }
            MiddlewareConfig::InFlightReq { amount } => {
                if *amount == 0 {
                    return Err("amount must be ≥ 1".into());
                }
                Arc::new(InFlightReq::new(*amount))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn token_bucket_allows_burst_then_average() {
        let t0 = Instant::now();
        let rl = RateLimit::new(10.0, 5.0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first: Vec<bool> = (0..7).map(|_| rl.allow(ip, t0)).collect();
        assert_eq!(
            first,
            vec![true, true, true, true, true, false, false],
            "burst of 5"
        );
        assert!(
            rl.allow(ip, t0 + Duration::from_millis(100)),
            "one token after 100 ms at 10/s"
        );
        assert!(!rl.allow(ip, t0 + Duration::from_millis(110)));
        assert!(
            rl.allow("10.0.0.2".parse().unwrap(), t0),
            "buckets are per client"
        );
    }

    #[test]
    fn basic_auth_accepts_hashes_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = BasicAuth::new(&[format!("alice:{hash}")], "lb").unwrap();
        assert!(auth.verify("alice", "s3cret"));
        assert!(!auth.verify("alice", "wrong"));
        assert!(!auth.verify("bob", "s3cret"));
        assert!(
            BasicAuth::new(&["alice:s3cret".to_string()], "lb").is_err(),
            "plain text refused"
        );
        use argon2::{password_hash::SaltString, PasswordHasher as _};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let a2 = argon2::Argon2::default()
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let auth = BasicAuth::new(&[format!("carol:{a2}")], "lb").unwrap();
        assert!(auth.verify("carol", "pw") && !auth.verify("carol", "px"));
    }
}
