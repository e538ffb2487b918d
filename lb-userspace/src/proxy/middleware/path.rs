//! Path rewrites and redirects.
//!
//! ```toml
//! [[middleware]]
//! name = "strip-api"
//! strip_prefix = { prefixes = ["/api"] }          # /api/users → /users
//! [[middleware]]
//! name = "strip-tenant"
//! strip_prefix_regex = { regex = ["^/t/[a-z0-9]+"] } # /t/acme/x → /x
//! [[middleware]]
//! name = "v1"
//! add_prefix = { prefix = "/v1" }                  # /users → /v1/users
//! [[middleware]]
//! name = "health"
//! replace_path = { path = "/healthz" }             # any path → /healthz
//! [[middleware]]
//! name = "rewrite"
//! replace_path_regex = { regex = "^/old/(.*)", replacement = "/new/$1" }
//! [[middleware]]
//! name = "https"
//! redirect_scheme = { scheme = "https", permanent = true, port = 8443 }
//! [[middleware]]
//! name = "moved"
//! redirect_regex = { regex = "^https?://old\\.example\\.com/(.*)", replacement = "https://example.com/${1}", permanent = true }
//! ```
//! A rewrite leaves the path it replaced in `X-Replaced-Path` (or `X-Forwarded-Prefix` for a
//! stripped prefix), so the upstream can build links that work from the outside.

use hyper::{
    header::{self, HeaderValue},
    Method, StatusCode,
};
use regex::Regex;

use super::{answer, set_path, BuildError, Ctx, Flow, Middleware, Req};
use crate::model::middleware::{
    AddPrefixConfig, RedirectRegexConfig, RedirectSchemeConfig, ReplacePathConfig,
    ReplacePathRegexConfig, StripPrefixConfig, StripPrefixRegexConfig,
};

fn original_path(req: &mut Req, header: &'static str) {
    if let Ok(v) = HeaderValue::from_str(req.uri().path()) {
        req.headers_mut().insert(header, v);
    }
}

/// A path that starts with `/` whatever was removed.
fn rooted(rest: &str) -> String {
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    }
}

impl StripPrefixConfig {
    pub fn build(&self) -> StripPrefix {
        StripPrefix {
            prefixes: self.prefixes.clone(),
        }
    }
}

/// Removes the first matching prefix from the path.
pub struct StripPrefix {
    pub prefixes: Vec<String>,
}

impl Middleware for StripPrefix {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let path = req.uri().path().to_string();
        if let Some(p) = self.prefixes.iter().find(|p| path.starts_with(p.as_str())) {
            if let Ok(v) = HeaderValue::from_str(p) {
                req.headers_mut().insert("x-forwarded-prefix", v);
            }
            set_path(req, &rooted(&path[p.len()..]));
        }
        Flow::Next
    }
}

impl StripPrefixRegexConfig {
    pub fn build(&self) -> Result<StripPrefixRegex, BuildError> {
        let regex = self
            .regex
            .iter()
            .map(|r| Regex::new(r).map_err(BuildError::regex(r)))
            .collect::<Result<_, _>>()?;
        Ok(StripPrefixRegex { regex })
    }
}

/// Removes the first prefix that a regex matches at the start of the path.
pub struct StripPrefixRegex {
    regex: Vec<Regex>,
}

impl Middleware for StripPrefixRegex {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let path = req.uri().path().to_string();
        let found = self
            .regex
            .iter()
            .find_map(|r| r.find(&path).filter(|m| m.start() == 0));
        if let Some(m) = found {
            if let Ok(v) = HeaderValue::from_str(m.as_str()) {
                req.headers_mut().insert("x-forwarded-prefix", v);
            }
            set_path(req, &rooted(&path[m.end()..]));
        }
        Flow::Next
    }
}

impl AddPrefixConfig {
    pub fn build(&self) -> Result<AddPrefix, BuildError> {
        if !self.prefix.starts_with('/') {
            return Err(BuildError::NotRooted {
                field: "prefix",
                value: self.prefix.clone(),
            });
        }
        Ok(AddPrefix {
            prefix: self.prefix.trim_end_matches('/').to_string(),
        })
    }
}

pub struct AddPrefix {
    prefix: String,
}

impl Middleware for AddPrefix {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let path = format!("{}{}", self.prefix, req.uri().path());
        set_path(req, &path);
        Flow::Next
    }
}

impl ReplacePathConfig {
    pub fn build(&self) -> Result<ReplacePath, BuildError> {
        if !self.path.starts_with('/') {
            return Err(BuildError::NotRooted {
                field: "path",
                value: self.path.clone(),
            });
        }
        Ok(ReplacePath {
            path: self.path.clone(),
        })
    }
}

pub struct ReplacePath {
    path: String,
}

impl Middleware for ReplacePath {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        original_path(req, "x-replaced-path");
        set_path(req, &self.path);
        Flow::Next
    }
}

impl ReplacePathRegexConfig {
    pub fn build(&self) -> Result<ReplacePathRegex, BuildError> {
        Ok(ReplacePathRegex {
            regex: Regex::new(&self.regex).map_err(BuildError::regex(&self.regex))?,
            replacement: self.replacement.clone(),
        })
    }
}

/// Rewrites the path when the regex matches it (all matches replaced, as `Regex::replace_all`).
pub struct ReplacePathRegex {
    regex: Regex,
    replacement: String,
}

impl Middleware for ReplacePathRegex {
    fn request<'a>(&'a self, _: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let path = req.uri().path().to_string();
        if self.regex.is_match(&path) {
            let new = self.regex.replace_all(&path, self.replacement.as_str());
            original_path(req, "x-replaced-path");
            set_path(req, &rooted(&new));
        }
        Flow::Next
    }
}

/// 301/302 keep GET as GET, but clients may turn other methods into GET; 308/307 never do.
fn redirect_code(method: &Method, permanent: bool) -> StatusCode {
    let safe = method == Method::GET || method == Method::HEAD;
    match (permanent, safe) {
        (true, true) => StatusCode::MOVED_PERMANENTLY,
        (true, false) => StatusCode::PERMANENT_REDIRECT,
        (false, true) => StatusCode::FOUND,
        (false, false) => StatusCode::TEMPORARY_REDIRECT,
    }
}

fn redirect(method: &Method, permanent: bool, location: &str) -> Flow<'static> {
    let mut r = answer(redirect_code(method, permanent), "redirecting");
    match HeaderValue::from_str(location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            Flow::Answer(r)
        }
        Err(_) => Flow::Answer(answer(StatusCode::BAD_REQUEST, "bad redirect target")),
    }
}

impl RedirectSchemeConfig {
    pub fn build(&self) -> Result<RedirectScheme, BuildError> {
        if self.scheme != "https" && self.scheme != "http" {
            return Err(BuildError::Expected {
                field: "scheme",
                value: self.scheme.clone(),
                expected: "http or https",
            });
        }
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        Ok(RedirectScheme {
            scheme: self.scheme.clone(),
            permanent: self.permanent,
            port: self.port.filter(|p| *p != default_port),
        })
    }
}

/// Redirects to another scheme (e.g. http → https), keeping host, path and query.
pub struct RedirectScheme {
    scheme: String,
    permanent: bool,
    port: Option<u16>,
}

impl Middleware for RedirectScheme {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        if ctx.scheme == self.scheme {
            return Flow::Next;
        }
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let host = if ctx.host.contains(':') && !ctx.host.starts_with('[') {
            format!("[{}]", ctx.host) // an IPv6 literal
        } else {
            ctx.host.clone()
        };
        let location = match self.port {
            Some(p) => format!("{}://{host}:{p}{pq}", self.scheme),
            None => format!("{}://{host}{pq}", self.scheme),
        };
        redirect(req.method(), self.permanent, &location)
    }
}

impl RedirectRegexConfig {
    pub fn build(&self) -> Result<RedirectRegex, BuildError> {
        Ok(RedirectRegex {
            regex: Regex::new(&self.regex).map_err(BuildError::regex(&self.regex))?,
            replacement: self.replacement.clone(),
            permanent: self.permanent,
        })
    }
}

/// Redirects when the request's URL matches, to the replacement (with the regex's groups).
pub struct RedirectRegex {
    regex: Regex,
    replacement: String,
    permanent: bool,
}

impl Middleware for RedirectRegex {
    fn request<'a>(&'a self, ctx: &'a mut Ctx, req: &'a mut Req) -> Flow<'a> {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| ctx.host.clone());
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let url = format!("{}://{authority}{pq}", ctx.scheme);
        if !self.regex.is_match(&url) {
            return Flow::Next;
        }
        let location = self.regex.replace(&url, self.replacement.as_str());
        redirect(req.method(), self.permanent, &location)
    }
}
