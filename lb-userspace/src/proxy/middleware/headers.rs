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
    pub info: Option<crate::model::middleware::CertInfoConfig>,
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
        let Some(chain) = chain else {
            return Flow::Next;
        };
        if self.pem {
            // As Traefik 3 writes it: each PEM's base64 on one line, no armour, comma-separated.
            use base64::Engine as _;
            let value = chain
                .0
                .iter()
                .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
                .collect::<Vec<_>>()
                .join(",");
            if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
                req.headers_mut().insert(CLIENT_CERT, v);
            }
        }
        if let Some(info) = &self.info {
            let value = chain
                .0
                .iter()
                .map(|der| cert_info(der, info))
                .collect::<Vec<_>>()
                .join(",");
            if let Ok(v) = hyper::header::HeaderValue::from_str(&query_escape(&value)) {
                req.headers_mut().insert(CLIENT_CERT_INFO, v);
            }
        }
        Flow::Next
    }
}

/// Go's `url.QueryEscape`: unreserved bytes as they are, a space as `+`, the rest `%XX`.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One certificate's fields as Traefik's `passTLSClientCert.info` writes them:
/// `Subject="…";Issuer="…";SerialNumber="…";NB="…";NA="…";SAN="…"`, each part only when asked
/// for and present. A certificate that does not parse (it was not verified, say) gives nothing.
fn cert_info(der: &[u8], info: &crate::model::middleware::CertInfoConfig) -> String {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return String::new();
    };
    let mut parts = Vec::new();
    let subject = info.subject.as_ref().map(|f| dn(cert.subject(), f, true));
    if let Some(s) = subject.filter(|s| !s.is_empty()) {
        parts.push(format!("Subject=\"{s}\""));
    }
    let issuer = info.issuer.as_ref().map(|f| dn(cert.issuer(), f, false));
    if let Some(s) = issuer.filter(|s| !s.is_empty()) {
        parts.push(format!("Issuer=\"{s}\""));
    }
    if info.serial_number {
        parts.push(format!("SerialNumber=\"{}\"", cert.serial));
    }
    if info.not_before {
        parts.push(format!(
            "NB=\"{}\"",
            cert.validity().not_before.timestamp().max(0)
        ));
    }
    if info.not_after {
        parts.push(format!(
            "NA=\"{}\"",
            cert.validity().not_after.timestamp().max(0)
        ));
    }
    if info.sans {
        // Go's order: DNS names, e-mail addresses, IP addresses, URIs.
        let names: Vec<&GeneralName> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|e| e.value.general_names.iter().collect())
            .unwrap_or_default();
        let mut sans: Vec<String> = Vec::new();
        for kind in 0..4 {
            for n in &names {
                match (kind, n) {
                    (0, GeneralName::DNSName(d)) => sans.push(d.to_string()),
                    (1, GeneralName::RFC822Name(e)) => sans.push(e.to_string()),
                    (2, GeneralName::IPAddress(ip)) => {
                        if let Some(ip) = ip_text(ip) {
                            sans.push(ip)
                        }
                    }
                    (3, GeneralName::URI(u)) => sans.push(u.to_string()),
                    _ => {}
                }
            }
        }
        if !sans.is_empty() {
            parts.push(format!("SAN=\"{}\"", sans.join(",")));
        }
    }
    parts.join(";")
}

fn ip_text(raw: &[u8]) -> Option<String> {
    match raw.len() {
        4 => Some(std::net::Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]).to_string()),
        16 => {
            let b: [u8; 16] = raw.try_into().ok()?;
            Some(std::net::Ipv6Addr::from(b).to_string())
        }
        _ => None,
    }
}

/// A distinguished name's parts in Go's `pkix.Name` order: DC, C, ST, L, O, OU (subjects only),
/// SN, CN; all values of the repeatable ones, the last of serialNumber and CN.
fn dn(
    name: &x509_parser::x509::X509Name<'_>,
    f: &crate::model::middleware::DnFields,
    subject: bool,
) -> String {
    use x509_parser::oid_registry::{OID_DOMAIN_COMPONENT, OID_X509_SERIALNUMBER};
    let text =
        |a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().ok().map(str::to_string);
    let mut out: Vec<String> = Vec::new();
    let mut all = |on: bool, tag: &str, values: Vec<String>| {
        if on {
            out.extend(
                values
                    .into_iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| format!("{tag}={v}")),
            );
        }
    };
    all(
        f.domain_component,
        "DC",
        name.iter_by_oid(&OID_DOMAIN_COMPONENT)
            .filter_map(text)
            .collect(),
    );
    all(
        f.country,
        "C",
        name.iter_country().filter_map(text).collect(),
    );
    all(
        f.province,
        "ST",
        name.iter_state_or_province().filter_map(text).collect(),
    );
    all(
        f.locality,
        "L",
        name.iter_locality().filter_map(text).collect(),
    );
    all(
        f.organization,
        "O",
        name.iter_organization().filter_map(text).collect(),
    );
    all(
        f.organizational_unit && subject,
        "OU",
        name.iter_organizational_unit().filter_map(text).collect(),
    );
    all(
        f.serial_number,
        "SN",
        name.iter_by_oid(&OID_X509_SERIALNUMBER)
            .filter_map(text)
            .last()
            .into_iter()
            .collect(),
    );
    all(
        f.common_name,
        "CN",
        name.iter_common_name()
            .filter_map(text)
            .last()
            .into_iter()
            .collect(),
    );
    out.join(",")
}
