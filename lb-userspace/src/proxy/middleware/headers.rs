//! Request and response headers, and CORS.
//!
//! ```toml
//! [[middleware]]
//! name = "secure"
//! [middleware.headers]
//! request_set = { "X-Env" = "prod" }
//! request_add = { "X-Trace" = "lb" }
//! request_remove = ["X-Debug"]
//! response_set = { "Strict-Transport-Security" = "max-age=63072000", "X-Frame-Options" = "DENY" }
//! response_remove = ["Server"]
//! cors = { allow_origins = ["https://app.example.com"], allow_methods = ["GET", "POST"], allow_headers = ["Content-Type"], allow_credentials = true, max_age_secs = 600 }
//! ```
//! `set` replaces, `add` appends to what is there. CORS answers preflights (`OPTIONS` with
//! `Access-Control-Request-Method`) itself with 204 and adds the allow headers to the responses
//! of allowed origins; a disallowed origin gets no CORS headers (the browser then refuses).

use std::collections::HashMap;

use hyper::{
    header::{self, HeaderName, HeaderValue},
    Method, Response, StatusCode,
};

use super::{full, header_name, BoxFuture, BuildError, Ctx, Flow, Middleware, Req};
use crate::model::middleware::HeadersConfig;
use crate::proxy::Body;

type Pairs = Vec<(HeaderName, HeaderValue)>;

fn pairs(map: &HashMap<String, String>) -> Result<Pairs, BuildError> {
    let mut v: Pairs = map
        .iter()
        .map(|(k, v)| {
            let n = header_name(k)?;
            let v = HeaderValue::from_str(v).map_err(|_| BuildError::HeaderValue(v.clone()))?;
            Ok((n, v))
        })
        .collect::<Result<_, BuildError>>()?;
    v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Ok(v)
}

fn names(list: &[String]) -> Result<Vec<HeaderName>, BuildError> {
    list.iter().map(|k| header_name(k)).collect()
}

fn joined(list: &[String]) -> Result<Option<HeaderValue>, BuildError> {
    if list.is_empty() {
        return Ok(None);
    }
    let s = list.join(", ");
    HeaderValue::from_str(&s)
        .map(Some)
        .map_err(|_| BuildError::HeaderValue(s))
}

impl HeadersConfig {
    pub fn build(&self) -> Result<Headers, BuildError> {
        let cors = match &self.cors {
            None => None,
            Some(c) => {
                if c.allow_origins.is_empty() {
                    return Err(BuildError::Empty("cors.allow_origins"));
                }
                if c.allow_credentials && c.allow_origins.iter().any(|o| o == "*") {
                    return Err(BuildError::CredentialedWildcard);
                }
                Some(Cors {
                    any_origin: c.allow_origins.iter().any(|o| o == "*"),
                    origins: c.allow_origins.clone(),
                    methods: joined(&c.allow_methods)?,
                    headers: joined(&c.allow_headers)?,
                    expose: joined(&c.expose_headers)?,
                    credentials: c.allow_credentials,
                    max_age: c.max_age_secs.map(HeaderValue::from),
                })
            }
        };
        Ok(Headers {
            request_set: pairs(&self.request_set)?,
            request_add: pairs(&self.request_add)?,
            request_remove: names(&self.request_remove)?,
            response_set: pairs(&self.response_set)?,
            response_add: pairs(&self.response_add)?,
            response_remove: names(&self.response_remove)?,
            cors,
        })
    }
}

struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for this request's Origin, if it is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any_origin {
            return Some(HeaderValue::from_static("*"));
        }
        let o = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|a| a.eq_ignore_ascii_case(o))
            .then(|| origin.clone())
    }

    fn decorate(&self, h: &mut hyper::HeaderMap, allowed: HeaderValue, preflight: bool) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if preflight {
            if let Some(v) = &self.methods {
                h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
            }
            if let Some(v) = &self.headers {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
            if let Some(v) = &self.max_age {
                h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
            }
        } else if let Some(v) = &self.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

pub struct Headers {
    request_set: Pairs,
    request_add: Pairs,
    request_remove: Vec<HeaderName>,
    response_set: Pairs,
    response_add: Pairs,
    response_remove: Vec<HeaderName>,
    cors: Option<Cors>,
}

/// The allowed origin, remembered for the response half.
#[derive(Clone)]
struct AllowedOrigin(HeaderValue);

impl Middleware for Headers {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        if let Some(cors) = &self.cors {
            if let Some(origin) = req.headers().get(header::ORIGIN) {
                let allowed = cors.allow(origin);
                let preflight = req.method() == Method::OPTIONS
                    && req
                        .headers()
                        .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
                if preflight {
                    let mut r = Response::new(full(""));
                    *r.status_mut() = StatusCode::NO_CONTENT;
                    if !cors.any_origin {
                        r.headers_mut()
                            .append(header::VARY, HeaderValue::from_static("Origin"));
                    }
                    if let Some(a) = allowed {
                        cors.decorate(r.headers_mut(), a, true);
                    }
                    return Flow::Answer(r);
                }
                if let Some(a) = allowed {
                    ctx.notes.insert(AllowedOrigin(a));
                }
            }
        }
        let h = req.headers_mut();
        for n in &self.request_remove {
            h.remove(n);
        }
        for (n, v) in &self.request_set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.request_add {
            h.append(n.clone(), v.clone());
        }
        Flow::Next
    }

    fn response<'a>(
        &'a self,
        ctx: &'a Ctx,
        resp: &'a mut Response<Body>,
    ) -> Option<BoxFuture<'a, ()>> {
        let h = resp.headers_mut();
        for n in &self.response_remove {
            h.remove(n);
        }
        for (n, v) in &self.response_set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.response_add {
            h.append(n.clone(), v.clone());
        }
        if let Some(cors) = &self.cors {
            // The answer depends on the Origin whether or not this one was allowed: a shared
            // cache must not hand one origin's answer to another.
            if !cors.any_origin {
                h.append(header::VARY, HeaderValue::from_static("Origin"));
            }
            if let Some(AllowedOrigin(a)) = ctx.notes.get() {
                cors.decorate(h, a.clone(), false);
            }
        }
        None
    }
}

/// Traefik's `passTLSClientCert` (see [`crate::model::middleware::PassTlsClientCertConfig`]).
pub struct PassTlsClientCert {
    pub pem: bool,
}

const CLIENT_CERT: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-forwarded-tls-client-cert");
const CLIENT_CERT_INFO: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("x-forwarded-tls-client-cert-info");

impl Middleware for PassTlsClientCert {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        // A client never speaks for its own certificate.
        req.headers_mut().remove(CLIENT_CERT);
        req.headers_mut().remove(CLIENT_CERT_INFO);
        let chain = req
            .extensions()
            .get::<crate::proxy::conn::ClientCertificates>()
            .cloned();
        if let (true, Some(chain)) = (self.pem, chain) {
            use base64::Engine as _;
            let value = chain
                .0
                .iter()
                .map(|der| {
                    crate::model::escape_unreserved(
                        &base64::engine::general_purpose::STANDARD.encode(der),
                    )
                })
                .collect::<Vec<_>>()
                .join(",");
            if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
                req.headers_mut().insert(CLIENT_CERT, v);
            }
        }
        Flow::Next
    }
}
