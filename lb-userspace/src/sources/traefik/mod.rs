//! Traefik's dynamic configuration, read as lb's own: `http.routers`, `http.services`,
//! `http.middlewares`, `http.serversTransports` and `tls.certificates` / `tls.stores`, so a
//! Traefik user can point lb at what they already have (a file, or Redis / etcd keys under
//! `traefik/…`).
//!
//! Everything lb has is translated; everything else is reported by its key path
//! (`http.services.api.loadBalancer.responseForwarding: not supported`), never silently dropped. A
//! value lb cannot use (a rule that does not parse, a server URL without an address) breaks its
//! item only (`http.routers.api`): that item keeps its last good version or is left out, with
//! whatever names it, and the rest applies ([`keep`]). Only a document of the wrong shape is
//! refused whole. A directory of files is one configuration ([`merge`]).
//!
//! Differences a Traefik user should know: keys are matched case-insensitively as in Traefik;
//! a middleware or TLS options named `name@provider` are that provider's (the document's own
//! when it is this one's: `file`, `redis`, `etcd`), while services are one namespace across
//! providers (`name@provider` names the service `name`, a clash is reported); a router to an
//! `@internal` service is left out, by name;
//! a server's host name is resolved when the configuration is read, and the configuration is
//! read again when the answer's TTL runs out ([`crate::sources::dns`]); `tls.options` apply as
//! in Traefik (the client's SNI chooses them, a router answers only under its own), but within
//! rustls's reach (TLS 1.2 and 1.3, AEAD suites with forward secrecy: an older version or
//! suite asked for is said and not offered), and a router they cannot be chosen for (no
//! `Host` in its rule, a host whose routers disagree) is left out where Traefik would serve
//! it under `default`; a `healthCheck` runs at once
//! rather than after its first interval, through the service's own connections (so in its
//! scheme), and counts a redirect as healthy rather than following it.
//!
//! Fail closed: what guards access and cannot be honoured leaves out what it guards, never
//! serves it unguarded. A router whose `tls.options` (its own, or `default`) are broken (a CA
//! file that does not read, say) is left out, and reported; so is a TCP router with a
//! middleware lb lacks, and an access middleware (`basicAuth`, `forwardAuth`, `ipAllowList`,
//! `headers.allowedHosts`) with a setting lb lacks is left out with every router using it.
//! Files a document names are read as root: from a key-value store, only inside the directories
//! allowed ([`Files`]).

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub mod install;
pub mod keep;
pub mod merge;

use serde_json::{Map, Value};

use crate::model::instance::{Instance, Services};
use crate::model::{
    l7::{
        ActiveCheck, Algorithm, CertSpec, Composite, Dynamic, Mirror, MirrorTarget, Passive,
        RouterSpec, ServiceSpec, TcpGuards, TcpRouterSpec, TlsMode, TlsOptions, UpstreamTls,
    },
    middleware::{
        AddPrefixConfig, BasicAuthConfig, BufferingConfig, CircuitBreakerConfig, CompressConfig,
        CorsConfig, ForwardAuthConfig, HeadersConfig, InFlightPer, InFlightReqConfig,
        IpAllowListConfig, MiddlewareConfig, RateLimitConfig, RedirectRegexConfig,
        RedirectSchemeConfig, ReplacePathConfig, ReplacePathRegexConfig, RetryConfig,
        StripPrefixConfig, StripPrefixRegexConfig,
    },
    rule::{Rule, TcpRule},
};

/// A translated document.
#[derive(Debug, Default)]
pub struct Translated {
    /// Upstream servers, as registry instances by service.
    pub services: Services,
    pub dynamic: Dynamic,
    /// Key paths lb does not support (reported, not fatal).
    pub unsupported: Vec<String>,
    /// Items with a value lb cannot use, each left out (the rest of the document applies).
    pub errors: Vec<TraefikError>,
    /// When the earliest DNS answer it used runs out: the document is to be translated again
    /// then, so a changed record is followed ([`crate::sources::dns`]).
    pub refresh_at: Option<std::time::Instant>,
}

/// A value lb cannot use: where (key path) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraefikError {
    pub path: String,
    pub reason: String,
    /// The item it breaks (`http.routers.api`): only that item is left out (or kept at its last
    /// good version, see [`keep`]). `None`: the document's shape is wrong, and all of it is
    /// refused.
    pub item: Option<String>,
}

impl TraefikError {
    fn in_item(mut self, item: &str) -> TraefikError {
        self.item = Some(item.to_string());
        self
    }
}

impl std::fmt::Display for TraefikError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

type R<T> = Result<T, TraefikError>;

fn fail<T>(path: &str, reason: impl Into<String>) -> R<T> {
    Err(TraefikError {
        path: path.to_string(),
        reason: reason.into(),
        item: None,
    })
}

/// Which files a document may have lb read (certificates, keys, CAs, users files). A file the
/// operator wrote may name any, as lb.toml may; a record in Redis or etcd, which others may be
/// able to write, only those inside the directories the operator allowed: the agent runs as
/// root and would otherwise read any file for whoever can write a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Files {
    #[default]
    Any,
    Within(Vec<PathBuf>),
}

impl Files {
    /// The file to read for `path`, if it may be read: its real path (symlinks and `..`
    /// resolved, so what is read is what was checked). The refusal reads the same whether the
    /// file exists or not, so a record cannot probe for files either.
    fn allow(&self, path: &str) -> Result<PathBuf, String> {
        let Files::Within(dirs) = self else {
            return Ok(PathBuf::from(path));
        };
        let p = Path::new(path);
        let real = p.is_absolute().then(|| p.canonicalize().ok()).flatten();
        if let Some(real) = real {
            if dirs
                .iter()
                .filter_map(|d| d.canonicalize().ok())
                .any(|d| real.starts_with(d))
            {
                return Ok(real);
            }
        }
        let allowed = if dirs.is_empty() {
            "none are: set traefik_file_dirs".to_string()
        } else {
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(format!(
            "{path:?} is not inside the directories this provider may name files in ({allowed})"
        ))
    }

    fn allow_at(&self, path: &str, key: &str) -> R<PathBuf> {
        self.allow(path).or_else(|why| fail(key, why))
    }
}

/// Whether a parsed document is a Traefik dynamic configuration (rather than lb's services file).
pub fn is_traefik(doc: &Value) -> bool {
    doc.as_object().is_some_and(|m| {
        m.keys().any(|k| {
            matches!(
                k.to_ascii_lowercase().as_str(),
                "http" | "tcp" | "udp" | "tls"
            )
        })
    })
}

/// The line (1-based) where a key path's last key appears, found by looking for each key in
/// turn after the previous one; 0 when not found. Good enough for TOML and YAML as people write
/// them, and it lets an error point into the file like lb.toml's do.
pub fn line_of(text: &str, path: &str) -> usize {
    // Keys are case-insensitive (a merged directory's come out in lowercase); ASCII lowercase
    // keeps every byte where it was.
    let text = text.to_ascii_lowercase();
    let path = path.to_ascii_lowercase();
    let mut at = 0;
    let mut found = None;
    for key in path.split('.') {
        let key = key.split('[').next().unwrap_or(key);
        if key.is_empty() {
            continue;
        }
        match text[at..].find(key) {
            Some(i) => {
                at += i;
                found = Some(at);
                at += key.len();
            }
            None => return 0,
        }
    }
    found.map_or(0, |i| text[..i].bytes().filter(|b| *b == b'\n').count() + 1)
}

/// An object's entries by lowercase key; what is not taken is reported as unsupported.
struct Obj<'a> {
    path: String,
    entries: Vec<(String, &'a str, &'a Value)>,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> R<Obj<'a>> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        match v {
            Value::Object(m) => Ok(Obj::of(m, path)),
            // `services:` with nothing (or only a comment) under it, as Traefik accepts it.
            Value::Null => Ok(Obj::of(EMPTY.get_or_init(Map::new), path)),
            _ => fail(path, "expected a table"),
        }
    }

    fn of(m: &'a Map<String, Value>, path: &str) -> Obj<'a> {
        Obj {
            path: path.to_string(),
            entries: m
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), k.as_str(), v))
                .collect(),
        }
    }

    fn take(&mut self, key: &str) -> Option<(String, &'a Value)> {
        let i = self.entries.iter().position(|(k, _, _)| k == key)?;
        let (_, name, v) = self.entries.remove(i);
        Some((self.sub(name), v))
    }

    fn sub(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn string(&mut self, key: &str) -> R<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some((p, v)) => scalar(v, &p).map(Some),
        }
    }

    fn bool(&mut self, key: &str) -> R<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some((p, v)) => match v {
                Value::Bool(b) => Ok(Some(*b)),
                Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
                Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
                _ => fail(&p, "expected true or false"),
            },
        }
    }

    fn number(&mut self, key: &str) -> R<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some((p, v)) => scalar(v, &p)?
                .parse::<f64>()
                .map(Some)
                .or_else(|_| fail(&p, "expected a number")),
        }
    }

    fn strings(&mut self, key: &str) -> R<Option<Vec<String>>> {
        match self.take(key) {
            None => Ok(None),
            Some((p, v)) => list(v, &p).map(Some),
        }
    }

    /// The tables of list `key` (absent: none), each knowing its path (`key[i]`).
    fn tables(&mut self, key: &str) -> R<Vec<Obj<'a>>> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some((p, Value::Array(a))) => a
                .iter()
                .enumerate()
                .map(|(i, x)| Obj::new(x, &format!("{p}[{i}]")))
                .collect(),
            Some((p, _)) => fail(&p, "expected a list"),
        }
    }

    fn duration(&mut self, key: &str) -> R<Option<Duration>> {
        match self.take(key) {
            None => Ok(None),
            Some((p, v)) => duration(v, &p).map(Some),
        }
    }

    /// A router's `priority` and `entryPoints` (HTTP and TCP routers alike).
    fn placement(&mut self) -> R<(Option<i64>, Vec<String>)> {
        let priority = match self.number("priority")? {
            Some(p) if p.fract() == 0.0 => Some(p as i64),
            Some(_) => return fail(&self.sub("priority"), "expected an integer"),
            None => None,
        };
        let entrypoints = self
            .strings("entrypoints")?
            .unwrap_or_default()
            .iter()
            .map(|e| local(e))
            .collect();
        Ok((priority, entrypoints))
    }

    /// Reports every key not taken.
    fn rest(self, unsupported: &mut Vec<String>) {
        for (_, name, _) in &self.entries {
            unsupported.push(format!("{}: not supported", self.sub(name)));
        }
    }
}

/// A scalar as text (numbers and booleans too: KV stores hold everything as strings).
fn scalar(v: &Value, path: &str) -> R<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => fail(path, "expected a value"),
    }
}

/// A list of scalars; a single scalar or a comma-separated string counts as one (KV style).
fn list(v: &Value, path: &str) -> R<Vec<String>> {
    match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| scalar(x, &format!("{path}[{i}]")))
            .collect(),
        Value::String(s) => Ok(s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()),
        _ => fail(path, "expected a list"),
    }
}

/// Go's duration syntax (`100ms`, `1m30s`, `2h`), or a bare number of seconds.
fn duration(v: &Value, path: &str) -> R<Duration> {
    let s = scalar(v, path)?;
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Duration::try_from_secs_f64(secs)
                .or_else(|_| fail(path, format!("{s:?}: too long")));
        }
    }
    let mut total = 0f64;
    let mut rest = s.as_str();
    if rest.is_empty() {
        return fail(path, "expected a duration such as 100ms or 10s");
    }
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = match rest[..n_end].parse() {
            Ok(n) => n,
            Err(_) => return fail(path, format!("{s:?}: expected a duration such as 100ms")),
        };
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return fail(path, format!("{s:?}: unknown unit {u:?}")),
        };
        total += n * unit;
        rest = &rest[u_end..];
    }
    Duration::try_from_secs_f64(total).or_else(|_| fail(path, format!("{s:?}: too long")))
}

/// `name@provider` → `name`: here everything is one provider's.
fn local(name: &str) -> String {
    name.split('@').next().unwrap_or(name).to_string()
}

fn check_name(name: &str, path: &str) -> R<()> {
    if crate::model::valid_name(name) {
        Ok(())
    } else {
        fail(path, format!("{name:?}: names are [A-Za-z0-9_.-]"))
    }
}

/// Translates a whole document written by the operator (any file may be named).
pub fn translate(doc: &Value) -> R<Translated> {
    translate_with(doc, &Files::Any)
}

/// Translates a whole document; `files` says which files it may name.
pub fn translate_with(doc: &Value, files: &Files) -> R<Translated> {
    let cx = Cx::new(files);
    let mut t = translate_in(doc, &cx, &HashSet::new())?;
    t.refresh_at = cx.refresh_at();
    Ok(t)
}

/// What a translation uses besides the document, kept across the passes of [`keep::Kept`].
pub struct Cx<'a> {
    files: &'a Files,
    /// Traefik's name for the provider the document comes from (`file`, `redis`, `etcd`):
    /// `name@<it>` is the document's own `name`, any other `name@provider` another's.
    provider: String,
    /// Host names resolved once per reload however many passes it takes: `(host, port)` →
    /// the first address, or why there is none.
    dns: RefCell<HashMap<(String, u16), Result<SocketAddr, String>>>,
    /// Until when those answers hold.
    lookups: RefCell<crate::sources::dns::Lookups>,
}

impl<'a> Cx<'a> {
    pub fn new(files: &'a Files) -> Cx<'a> {
        Cx {
            files,
            provider: "file".into(),
            dns: RefCell::new(HashMap::new()),
            lookups: RefCell::new(Default::default()),
        }
    }

    /// When the translation is to be made again, for the names it looked up.
    pub fn refresh_at(&self) -> Option<std::time::Instant> {
        self.lookups.borrow().refresh_at()
    }

    /// The same, for a document of `provider`.
    pub fn of(mut self, provider: &str) -> Cx<'a> {
        self.provider = provider.to_string();
        self
    }

    /// A middleware's or TLS options' name as the merged configuration will know it: the
    /// document's own without a suffix, another provider's with its own (resolved when the
    /// providers' parts are merged, [`crate::proxy::dynamic::merge`]).
    fn reference(&self, name: &str) -> String {
        match name.split_once('@') {
            Some((n, p)) if p == self.provider => n.to_string(),
            Some(_) => name.to_string(),
            None => name.to_string(),
        }
    }

    fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        let key = (host.to_string(), port);
        if let Some(r) = self.dns.borrow().get(&key) {
            return r.clone();
        }
        // An address is itself; a name is asked of DNS, and followed (see `sources::dns`).
        let r = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SocketAddr::new(ip, port)),
            Err(_) => match crate::sources::dns::lookup(host) {
                Ok(a) => {
                    self.lookups.borrow_mut().used(a.until);
                    // The lowest address: the same one whatever order the server answers in,
                    // so a refresh that changes nothing moves nothing.
                    a.addresses
                        .iter()
                        .min()
                        .map(|ip| SocketAddr::new(*ip, port))
                        .ok_or_else(|| format!("{host:?} has no address"))
                }
                Err(why) => {
                    // Asked again later: a name that appears is followed too.
                    self.lookups
                        .borrow_mut()
                        .used(crate::sources::dns::retry_at());
                    Err(why)
                }
            },
        };
        self.dns.borrow_mut().insert(key, r.clone());
        r
    }
}

/// Takes in the `weighted` and `failover` services whose services are all usable, rounds until
/// none more is; the rest are broken by the first service they name that is not (left out,
/// undefined, or in a loop of composites).
fn composed(
    mut pending: Vec<(String, Composite, String)>,
    out: &mut Translated,
    left: &mut HashSet<String>,
) {
    loop {
        let before = pending.len();
        pending.retain(|(name, c, _)| {
            let ready = c
                .children()
                .iter()
                .all(|child| out.dynamic.services.contains_key(*child));
            if ready {
                out.dynamic.services.insert(
                    name.clone(),
                    ServiceSpec {
                        composite: Some(c.clone()),
                        ..Default::default()
                    },
                );
            }
            !ready
        });
        if pending.len() == before {
            break;
        }
    }
    let waiting: HashSet<String> = pending.iter().map(|(n, _, _)| n.clone()).collect();
    for (name, c, path) in pending {
        let Some(child) = c
            .children()
            .into_iter()
            .find(|child| !out.dynamic.services.contains_key(*child))
        else {
            continue;
        };
        let reason = if left.contains(&format!("http.services.{child}")) {
            format!("its service {child:?} is not usable")
        } else if waiting.contains(child) {
            format!("its service {child:?} is part of a loop of weighted/failover services")
        } else {
            format!("no service {child:?}")
        };
        let e = TraefikError {
            path,
            reason,
            item: None,
        };
        broke(out, left, format!("http.services.{name}"), e);
    }
}

/// Records an item's error: it is left out, and so is whatever names it.
fn broke(out: &mut Translated, left: &mut HashSet<String>, key: String, e: TraefikError) {
    out.errors.push(e.in_item(&key));
    left.insert(key);
}

/// Says why a router is left out, by what it names.
fn left_out_because(path: &str, what: &str, unsupported: &mut Vec<String>) {
    unsupported.push(format!(
        "{path}: left out: {what}; lb does not serve a router without what it names"
    ));
}

/// Translates a document. Each item (`http.routers.api`, `tls.certificates[0]`, …) stands
/// alone: one lb cannot use goes to [`Translated::errors`] and is left out with whatever names
/// it, and the rest applies. `gone` names items already taken out of `doc` (broken, with no last
/// good version): what names them is left out too. Only a document of the wrong shape (a section
/// that is not a table) is an error as a whole.
pub fn translate_in(doc: &Value, cx: &Cx<'_>, gone: &HashSet<String>) -> R<Translated> {
    let mut out = Translated::default();
    let mut left = gone.clone();
    let options = tls_options(doc, cx.files, &mut out, &mut left)?;
    if let Some(Some(why)) = options.get(crate::model::l7::DEFAULT_TLS_OPTIONS) {
        out.dynamic.tls_default_broken = Some(why.clone());
    }
    let mut top = Obj::new(doc, "")?;
    let mut transports: HashMap<String, (UpstreamTls, bool)> = HashMap::new();
    if let Some((p, http)) = top.take("http") {
        let mut http = Obj::new(http, &p)?;
        if let Some((p, st)) = http.take("serverstransports") {
            let m = Obj::new(st, &p)?;
            for (_, name, v) in &m.entries {
                let key = format!("http.serverstransports.{name}");
                match servers_transport(v, &m.sub(name), cx.files, &mut out.unsupported) {
                    Ok(t) => {
                        transports.insert(name.to_string(), t);
                    }
                    Err(e) => broke(&mut out, &mut left, key, e),
                }
            }
        }
        let mut chains: HashMap<String, Vec<String>> = HashMap::new();
        if let Some((p, mws)) = http.take("middlewares") {
            let m = Obj::new(mws, &p)?;
            for (_, name, v) in &m.entries {
                let path = m.sub(name);
                let key = format!("http.middlewares.{name}");
                let got = check_name(name, &path)
                    .and_then(|()| middleware(v, &path, cx.files, &mut out.unsupported));
                match got {
                    Ok(Some(Kind::One(cfg))) => {
                        out.dynamic.middlewares.push((name.to_string(), *cfg))
                    }
                    Ok(Some(Kind::Chain(list))) => {
                        chains.insert(name.to_string(), list);
                    }
                    Ok(None) => {
                        left.insert(key);
                    }
                    Err(e) => broke(&mut out, &mut left, key, e),
                }
            }
        }
        if let Some((p, svcs)) = http.take("services") {
            let m = Obj::new(svcs, &p)?;
            let mut mirrors = Vec::new();
            let mut composites = Vec::new();
            for (_, name, v) in &m.entries {
                let path = m.sub(name);
                let key = format!("http.services.{name}");
                let got = check_name(name, &path).and_then(|()| {
                    service(
                        name,
                        v,
                        &path,
                        &transports,
                        &left,
                        cx,
                        &mut out,
                        &mut mirrors,
                        &mut composites,
                    )
                });
                match got {
                    Ok(true) => {}
                    Ok(false) => {
                        left.insert(key);
                    }
                    Err(e) => broke(&mut out, &mut left, key, e),
                }
            }
            // A mirroring service sends to its main service's servers, with copies elsewhere.
            // Before the composites: a weighted or failover service may name a mirroring one
            // (whose main is a loadBalancer, never a composite).
            for (name, main, mirror, path) in mirrors {
                let key = format!("http.services.{name}");
                let usable = !left.contains(&format!("http.services.{main}"));
                let Some(instances) = out.services.get(&main).cloned().filter(|_| usable) else {
                    let e = TraefikError {
                        path,
                        reason: format!(
                            "service {main:?} is not a usable loadBalancer service here"
                        ),
                        item: None,
                    };
                    broke(&mut out, &mut left, key, e);
                    continue;
                };
                let mut spec = out.dynamic.services.get(&main).cloned().unwrap_or_default();
                spec.mirror = Some(mirror);
                out.services.insert(name.clone(), instances);
                out.dynamic.services.insert(name, spec);
            }
            composed(composites, &mut out, &mut left);
        }
        if let Some((p, routers)) = http.take("routers") {
            let m = Obj::new(routers, &p)?;
            for (_, name, v) in &m.entries {
                let path = m.sub(name);
                let key = format!("http.routers.{name}");
                let got = check_name(name, &path).and_then(|()| {
                    router(
                        name,
                        v,
                        &path,
                        cx,
                        &chains,
                        &options,
                        &left,
                        &mut out.unsupported,
                    )
                });
                match got {
                    Ok(Some((r, wish))) => {
                        out.dynamic.routers.push(r);
                        out.dynamic.acme.extend(wish);
                    }
                    Ok(None) => {}
                    Err(e) => broke(&mut out, &mut left, key, e),
                }
            }
        }
        http.rest(&mut out.unsupported);
    }
    if let Some((p, tcp)) = top.take("tcp") {
        tcp_section(tcp, &p, &options, cx, &mut left, &mut out)?;
    }
    if let Some((p, tls)) = top.take("tls") {
        let mut tls = Obj::new(tls, &p)?;
        let certs = match tls.take("certificates") {
            None => Vec::new(),
            Some((_, Value::Null)) => Vec::new(),
            Some((p, Value::Array(a))) => a
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("{p}[{i}]"), i, c))
                .collect(),
            Some((p, _)) => return fail(&p, "expected a list"),
        };
        for (cp, i, c) in certs {
            // Taken out by `keep`: the others keep their indexes.
            if c.is_null() {
                continue;
            }
            let key = format!("tls.certificates[{i}]");
            let got = Obj::new(c, &cp).and_then(|mut c| {
                let _stores = c.take("stores");
                cert_pair(c, false, cx.files, &mut out.unsupported)
            });
            match got {
                Ok(Some(cert)) => out.dynamic.certificates.push(cert),
                Ok(None) => {}
                Err(e) => broke(&mut out, &mut left, key, e),
            }
        }
        if let Some((p, stores)) = tls.take("stores") {
            let stores = Obj::new(stores, &p)?;
            for (_, name, v) in &stores.entries {
                let key = format!("tls.stores.{name}");
                let sp = stores.sub(name);
                let got = if name.eq_ignore_ascii_case("default") {
                    default_store(v, &sp, cx.files, &mut out.unsupported)
                } else {
                    out.unsupported.push(format!(
                        "{sp}: not supported (lb has one certificate store: default)"
                    ));
                    Ok(None)
                };
                match got {
                    Ok(Some(cert)) => out.dynamic.certificates.push(cert),
                    Ok(None) => {}
                    Err(e) => broke(&mut out, &mut left, key, e),
                }
            }
        }
        // Read (and reported) first, by tls_options.
        let _ = tls.take("options");
        tls.rest(&mut out.unsupported);
    }
    top.rest(&mut out.unsupported);
    Ok(out)
}

/// `tls.stores.default`: its default certificate, if it has one lb may read.
fn default_store(
    v: &Value,
    path: &str,
    files: &Files,
    unsupported: &mut Vec<String>,
) -> R<Option<CertSpec>> {
    let mut d = Obj::new(v, path)?;
    let mut cert = None;
    if let Some((p, dc)) = d.take("defaultcertificate") {
        cert = cert_pair(Obj::new(dc, &p)?, true, files, unsupported)?;
    }
    d.rest(unsupported);
    Ok(cert)
}

/// Every `tls.options` entry, translated into the document's [`Dynamic::tls_options`]; by
/// name, `Some(why)` for one that is broken (a router naming it is left out: it would be served
/// under options it did not ask for).
fn tls_options(
    doc: &Value,
    files: &Files,
    out: &mut Translated,
    left: &mut HashSet<String>,
) -> R<HashMap<String, Option<String>>> {
    let mut options = HashMap::new();
    // Taken out of the document already (broken, with no last good version): still broken for
    // the routers that name them, never absent (an absent `default` is lb's policy).
    for gone in left.iter() {
        if let Some(name) = gone.strip_prefix("tls.options.") {
            options.insert(
                name.to_string(),
                Some(format!("its tls.options {name:?} are broken")),
            );
        }
    }
    let Some((tls_key, tls)) = doc
        .as_object()
        .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case("tls")))
    else {
        return Ok(options);
    };
    let Some((opt_key, opts)) = tls
        .as_object()
        .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case("options")))
    else {
        return Ok(options);
    };
    let m = Obj::new(opts, &format!("{tls_key}.{opt_key}"))?;
    for (_, name, v) in &m.entries {
        let key = format!("tls.options.{name}");
        match check_name(name, &m.sub(name))
            .and_then(|()| tls_option(v, &m.sub(name), files, &mut out.unsupported))
        {
            Ok(o) => {
                options.insert(name.to_string(), None);
                out.dynamic
                    .tls_options
                    .insert(name.to_string(), std::sync::Arc::new(o));
            }
            Err(e) => {
                options.insert(
                    name.to_string(),
                    Some(format!(
                        "its tls.options {name:?} are broken ({})",
                        e.reason
                    )),
                );
                broke(out, left, key, e);
            }
        }
    }
    Ok(options)
}

/// Go's cipher suite names (Traefik's `pkg/tls/cipher.go`) lb does not offer: CBC, RC4 and
/// 3DES suites and RSA key exchange, which have no forward secrecy or no AEAD.
const GO_SUITES_NOT_OFFERED: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// Go's TLS 1.3 suite names: accepted in `cipherSuites` and without effect, as in Go (TLS 1.3's
/// suites are not configurable), and `TLS_FALLBACK_SCSV`, which is no suite.
const GO_SUITES_WITHOUT_EFFECT: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_FALLBACK_SCSV",
];

/// Go's curve names lb does not offer (ring has neither).
const GO_CURVES_NOT_OFFERED: &[&str] =
    &["secp521r1", "CurveP521", "x25519mlkem768", "X25519MLKEM768"];

/// One `tls.options` entry (Traefik's routing-configuration/http/tls/tls-options.md).
fn tls_option(v: &Value, p: &str, files: &Files, unsupported: &mut Vec<String>) -> R<TlsOptions> {
    use crate::model::l7::{ClientAuth, TlsVersion, KX_GROUPS, TLS12_SUITES};
    let mut o = Obj::new(v, p)?;
    let mut out = TlsOptions::default();
    if let Some(v) = o.string("minversion")? {
        out.min_version = match v.as_str() {
            "VersionTLS10" | "VersionTLS11" => {
                unsupported.push(format!(
                    "{p}.minVersion: {v}: lb serves TLS 1.2 at least (rustls has no older versions)"
                ));
                TlsVersion::Tls12
            }
            "VersionTLS12" => TlsVersion::Tls12,
            "VersionTLS13" => TlsVersion::Tls13,
            _ => {
                return fail(
                    &format!("{p}.minVersion"),
                    format!("{v:?}: expected VersionTLS10 … VersionTLS13"),
                )
            }
        };
    }
    if let Some(v) = o.string("maxversion")? {
        out.max_version = Some(match v.as_str() {
            "VersionTLS12" => TlsVersion::Tls12,
            "VersionTLS13" => TlsVersion::Tls13,
            "VersionTLS10" | "VersionTLS11" => {
                return fail(
                    &format!("{p}.maxVersion"),
                    format!("{v}: lb serves TLS 1.2 and 1.3 only"),
                )
            }
            _ => {
                return fail(
                    &format!("{p}.maxVersion"),
                    format!("{v:?}: expected VersionTLS12 or VersionTLS13"),
                )
            }
        });
    }
    if out.max_version.is_some_and(|m| m < out.min_version) {
        return fail(&format!("{p}.maxVersion"), "below minVersion");
    }
    if let Some(list) = o.strings("ciphersuites")? {
        let mut offered = false;
        for name in &list {
            if let Some((_, ours)) = TLS12_SUITES.iter().find(|(go, _)| go == name) {
                offered = true;
                if !out.cipher_suites.iter().any(|s| s == ours) {
                    out.cipher_suites.push(ours.to_string());
                }
            } else if GO_SUITES_NOT_OFFERED.contains(&name.as_str()) {
                unsupported.push(format!(
                    "{p}.cipherSuites: {name}: not offered (lb's TLS 1.2 suites are AEADs with forward secrecy)"
                ));
            } else if !GO_SUITES_WITHOUT_EFFECT.contains(&name.as_str()) {
                return fail(
                    &format!("{p}.cipherSuites"),
                    format!("{name:?} is not a cipher suite"),
                );
            }
        }
        if !offered {
            // A list with no suite lb has for TLS 1.2: TLS 1.2 is not served at all, rather
            // than with suites the list did not name.
            if out.max_version == Some(TlsVersion::Tls12) {
                return fail(
                    &format!("{p}.cipherSuites"),
                    "none of these TLS 1.2 suites is one lb offers, and maxVersion rules out TLS 1.3",
                );
            }
            if out.min_version < TlsVersion::Tls13 {
                unsupported.push(format!(
                    "{p}.cipherSuites: none is a TLS 1.2 suite lb offers: only TLS 1.3 is served"
                ));
            }
            out.min_version = TlsVersion::Tls13;
        }
    }
    if let Some(list) = o.strings("curvepreferences")? {
        for name in &list {
            if let Some((_, ours)) = KX_GROUPS.iter().find(|(go, _)| go == name) {
                if !out.curves.iter().any(|c| c == ours) {
                    out.curves.push(ours.to_string());
                }
            } else if GO_CURVES_NOT_OFFERED.contains(&name.as_str()) {
                unsupported.push(format!(
                    "{p}.curvePreferences: {name}: not offered (lb has X25519, P-256 and P-384)"
                ));
            } else {
                return fail(
                    &format!("{p}.curvePreferences"),
                    format!("{name:?} is not a curve"),
                );
            }
        }
        if out.curves.is_empty() {
            return fail(
                &format!("{p}.curvePreferences"),
                "none of these is a curve lb offers (X25519, CurveP256, CurveP384)",
            );
        }
    }
    if let Some((cp, ca)) = o.take("clientauth") {
        let mut c = Obj::new(ca, &cp)?;
        let cas = c.strings("cafiles")?.unwrap_or_default();
        let kind = c.string("clientauthtype")?;
        // A key lb does not know here may be the one that was to require certificates (a
        // `caFile` typo): the options fail rather than serve without it.
        let mut unknown = Vec::new();
        c.rest(&mut unknown);
        if let Some(u) = unknown.first() {
            return fail(
                &cp,
                format!("{u}: client authentication is not served without it"),
            );
        }
        for (i, f) in cas.iter().enumerate() {
            let at = format!("{cp}.caFiles[{i}]");
            // Traefik's FileOrContent: PEM text itself, or a file's path.
            let pem = if f.trim_start().starts_with("-----BEGIN") {
                f.as_bytes().to_vec()
            } else {
                let path = files.allow_at(f, &at)?;
                std::fs::read(&path).or_else(|e| fail(&at, format!("{f}: {e}")))?
            };
            use rustls_pki_types::pem::PemObject as _;
            let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .or_else(|e| fail(&at, format!("{f}: not PEM certificates ({e:?})")))?;
            if certs.is_empty() {
                return fail(&at, format!("{f}: no certificate in it"));
            }
            out.client_ca_pem.extend_from_slice(&pem);
            out.client_ca_pem.push(b'\n');
        }
        // Traefik: CA files without a type require and verify a certificate.
        out.client_auth = match kind.as_deref() {
            None if cas.is_empty() => ClientAuth::None,
            None => ClientAuth::RequireAndVerify,
            Some("NoClientCert") => ClientAuth::None,
            Some("RequestClientCert") => ClientAuth::Request,
            Some("RequireAnyClientCert") => ClientAuth::RequireAny,
            Some("VerifyClientCertIfGiven") => ClientAuth::VerifyIfGiven,
            Some("RequireAndVerifyClientCert") => ClientAuth::RequireAndVerify,
            Some(other) => {
                return fail(
                    &format!("{cp}.clientAuthType"),
                    format!("{other:?}: unknown client auth type"),
                )
            }
        };
        if matches!(
            out.client_auth,
            ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify
        ) && cas.is_empty()
        {
            return fail(
                &format!("{cp}.caFiles"),
                "required to verify client certificates",
            );
        }
        let verifies = matches!(
            out.client_auth,
            ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify
        );
        if !cas.is_empty() && !verifies {
            unsupported.push(format!(
                "{cp}.caFiles: not used: clientAuthType {} verifies no certificate (as in Go)",
                kind.as_deref().unwrap_or_default()
            ));
        }
    }
    out.sni_strict = o.bool("snistrict")?.unwrap_or(false);
    if let Some(list) = o.strings("alpnprotocols")? {
        let mut alpn = Vec::new();
        for proto in list {
            match proto.as_str() {
                "h2" | "http/1.1" => {
                    if !alpn.contains(&proto) {
                        alpn.push(proto)
                    }
                }
                // Offered whenever an ACME resolver answers TLS-ALPN-01, and only to validators.
                "acme-tls/1" => {}
                other => unsupported.push(format!(
                    "{p}.alpnProtocols: {other:?}: not offered (lb speaks h2 and http/1.1 inside TLS)"
                )),
            }
        }
        out.alpn = Some(alpn);
    }
    out.disable_session_tickets = o.bool("disablesessiontickets")?.unwrap_or(false);
    if let Some((kp, _)) = o.take("preferserverciphersuites") {
        unsupported.push(format!(
            "{kp}: without effect, as in Go: the server's order of suites is always used"
        ));
    }
    o.rest(unsupported);
    Ok(out)
}

/// Whether a router using TLS options `named` (none: `default`, as in Traefik) may be served,
/// and if not, why.
fn tls_allows(
    options: &HashMap<String, Option<String>>,
    named: Option<&str>,
) -> Result<(), String> {
    let name = named.unwrap_or("default").to_string();
    // Another provider's: whether it is defined is known once the providers are merged.
    if name.contains('@') {
        return Ok(());
    }
    match options.get(&name) {
        Some(Some(why)) => Err(why.clone()),
        Some(None) => Ok(()),
        None if name == "default" => Ok(()),
        None => Err(format!(
            "it names tls.options {name:?}, which is not defined"
        )),
    }
}

/// `tcp.routers` (HostSNI rules; `tls.passthrough` relays TLS, any other `tls` terminates it,
/// none is plain TCP) and `tcp.services` (`loadBalancer.servers[].address`), each item alone.
fn tcp_section(
    v: &Value,
    path: &str,
    options: &HashMap<String, Option<String>>,
    cx: &Cx<'_>,
    left: &mut HashSet<String>,
    out: &mut Translated,
) -> R<()> {
    let mut tcp = Obj::new(v, path)?;
    if let Some((p, svcs)) = tcp.take("services") {
        let m = Obj::new(svcs, &p)?;
        for (_, name, v) in &m.entries {
            let sp = m.sub(name);
            let key = format!("tcp.services.{name}");
            match check_name(name, &sp).and_then(|()| tcp_service(v, &sp, cx, &mut out.unsupported))
            {
                Ok(Some(instances)) => {
                    if out.services.contains_key(*name) {
                        let e = TraefikError {
                            path: sp,
                            reason: "an http service has this name too".into(),
                            item: None,
                        };
                        broke(out, left, key, e);
                    } else {
                        out.services.insert(name.to_string(), instances);
                    }
                }
                Ok(None) => {
                    left.insert(key);
                }
                Err(e) => broke(out, left, key, e),
            }
        }
    }
    let mut middlewares = HashMap::new();
    if let Some((p, mws)) = tcp.take("middlewares") {
        let m = Obj::new(mws, &p)?;
        for (_, name, v) in &m.entries {
            let key = format!("tcp.middlewares.{name}");
            match check_name(name, &m.sub(name)).and_then(|()| tcp_middleware(v, &m.sub(name))) {
                Ok(mw) => {
                    middlewares.insert(name.to_string(), mw);
                }
                Err(e) => broke(out, left, key, e),
            }
        }
    }
    if let Some((p, routers)) = tcp.take("routers") {
        let m = Obj::new(routers, &p)?;
        for (_, name, v) in &m.entries {
            let rp = m.sub(name);
            let key = format!("tcp.routers.{name}");
            let got = check_name(name, &rp).and_then(|()| {
                tcp_router(
                    name,
                    v,
                    &rp,
                    cx,
                    options,
                    &middlewares,
                    left,
                    &mut out.unsupported,
                )
            });
            match got {
                Ok(Some(r)) => out.dynamic.tcp_routers.push(r),
                Ok(None) => {}
                Err(e) => broke(out, left, key, e),
            }
        }
    }
    tcp.rest(&mut out.unsupported);
    Ok(())
}

/// One `tcp.services` entry's servers; `None` (reported) when it has no kind lb supports.
fn tcp_service(
    v: &Value,
    sp: &str,
    cx: &Cx<'_>,
    unsupported: &mut Vec<String>,
) -> R<Option<std::collections::BTreeMap<crate::model::instance::InstanceKey, Instance>>> {
    let mut s = Obj::new(v, sp)?;
    let Some((lp, lb)) = s.take("loadbalancer") else {
        for (_, k, _) in &s.entries {
            unsupported.push(format!(
                "{}: not supported; the routers using the service are left out",
                s.sub(k)
            ));
        }
        return Ok(None);
    };
    s.rest(unsupported);
    let mut lb = Obj::new(lb, &lp)?;
    let mut instances = std::collections::BTreeMap::new();
    for mut x in lb.tables("servers")? {
        let ip = x.path.clone();
        let address = x.string("address")?;
        let weight = x.number("weight")?.unwrap_or(1.0);
        x.rest(unsupported);
        let Some(address) = address else {
            return fail(&ip, "address is required");
        };
        let Some((host, port)) = address.rsplit_once(':') else {
            return fail(
                &format!("{ip}.address"),
                format!("{address:?}: expected host:port"),
            );
        };
        let Ok(port) = port.parse::<u16>() else {
            return fail(&format!("{ip}.address"), format!("{address:?}: bad port"));
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = cx
            .resolve(host, port)
            .or_else(|why| fail(&format!("{ip}.address"), why))?;
        let inst = Instance {
            address: addr.ip(),
            port: addr.port(),
            weight: weight.clamp(0.0, 1000.0) as u32,
            zone: None,
            metadata: Default::default(),
        };
        instances.insert(inst.key(), inst);
    }
    lb.rest(unsupported);
    Ok(Some(instances))
}

/// One `tcp.routers` entry; `None` (reported) when it is left out.
#[allow(clippy::too_many_arguments)] // the document's parts a router names, each by itself
fn tcp_router(
    name: &str,
    v: &Value,
    rp: &str,
    cx: &Cx<'_>,
    options: &HashMap<String, Option<String>>,
    middlewares: &HashMap<String, TcpMiddleware>,
    left: &HashSet<String>,
    unsupported: &mut Vec<String>,
) -> R<Option<TcpRouterSpec>> {
    let mut r = Obj::new(v, rp)?;
    let Some(rule_text) = r.string("rule")? else {
        return fail(rp, "rule is required");
    };
    let Some(service) = r.string("service")? else {
        return fail(rp, "service is required");
    };
    let mut named_options = None;
    let mode = match r.take("tls") {
        None => TlsMode::Plain,
        Some((tp, tls)) => {
            let mut t = Obj::new(tls, &tp)?;
            let pass = t.bool("passthrough")?.unwrap_or(false);
            named_options = t.string("options")?.map(|n| cx.reference(&n));
            for k in ["certresolver", "domains"] {
                if let Some((kp, _)) = t.take(k) {
                    unsupported.push(format!("{kp}: not supported (certificates come from [[certificate]], [acme] or tls.certificates)"));
                }
            }
            t.rest(unsupported);
            if pass {
                TlsMode::Passthrough
            } else {
                TlsMode::Terminate
            }
        }
    };
    let rule = TcpRule::parse_traefik(&rule_text, mode != TlsMode::Plain)
        .or_else(|e| fail(&format!("{rp}.rule"), e.to_string()))?;
    let (priority, entrypoints) = r.placement()?;
    // A passthrough router terminates no TLS: options do not apply to it.
    if mode == TlsMode::Terminate {
        if let Err(why) = tls_allows(options, named_options.as_deref()) {
            unsupported.push(format!(
                "{rp}: left out: {why}; lb does not serve a router without the protection it asks for"
            ));
            return Ok(None);
        }
    }
    let mut guards = TcpGuards::default();
    for m in r.strings("middlewares")?.unwrap_or_default() {
        // Another provider's TCP middleware: its guard is not in this document.
        let m = cx.reference(&m);
        // A middleware guards the router: without it, the router would serve everyone.
        match middlewares.get(&m) {
            Some(TcpMiddleware::Allow(list)) => guards.allow.push(list.clone()),
            Some(TcpMiddleware::InFlight(n)) => {
                guards.in_flight_per_ip = Some(guards.in_flight_per_ip.map_or(*n, |o| o.min(*n)))
            }
            None => {
                left_out_because(
                    rp,
                    &format!("its TCP middleware {m:?} is not usable"),
                    unsupported,
                );
                return Ok(None);
            }
        }
    }
    let service = local(&service);
    if left.contains(&format!("tcp.services.{service}")) {
        left_out_because(
            rp,
            &format!("its service {service:?} is not usable"),
            unsupported,
        );
        return Ok(None);
    }
    r.rest(unsupported);
    Ok(Some(TcpRouterSpec {
        name: name.to_string(),
        entrypoints,
        rule,
        rule_text,
        priority,
        service,
        tls: mode,
        tls_options: named_options
            .filter(|_| mode == TlsMode::Terminate)
            .map(|n| cx.reference(&n)),
        guards,
    }))
}

/// A `tcp.middlewares` entry lb honours.
enum TcpMiddleware {
    Allow(Vec<ipnet::IpNet>),
    InFlight(u32),
}

/// One `tcp.middlewares` entry (Traefik's reference: routing/tcp/middlewares, `ipAllowList`
/// and `inFlightConn`). Another kind, or an option lb lacks, is an error: its routers are left
/// out, never served unguarded.
fn tcp_middleware(v: &Value, path: &str) -> R<TcpMiddleware> {
    let m = Obj::new(v, path)?;
    if m.entries.len() != 1 {
        return fail(path, "expected exactly one middleware kind");
    }
    let (kind, name, body) = m.entries[0].clone();
    let bp = m.sub(name);
    let mut b = Obj::new(body, &bp)?;
    let got = match kind.as_str() {
        "ipallowlist" | "ipwhitelist" => {
            let ranges = b.strings("sourcerange")?.unwrap_or_default();
            if ranges.is_empty() {
                return fail(&format!("{bp}.sourceRange"), "at least one range is required");
            }
            let mut list = Vec::new();
            for r in &ranges {
                let Some(net) = crate::model::ip_net(r) else {
                    return fail(
                        &format!("{bp}.sourceRange"),
                        format!("{r:?} is not an address or CIDR"),
                    );
                };
                list.push(net);
            }
            TcpMiddleware::Allow(list)
        }
        "inflightconn" => match b.number("amount")? {
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= 1e6 => TcpMiddleware::InFlight(n as u32),
            _ => return fail(&format!("{bp}.amount"), "expected a whole number 1..=1000000"),
        },
        _ => {
            return fail(
                &bp,
                format!("the TCP middleware {name:?} is not supported (lb has ipAllowList and inFlightConn)"),
            )
        }
    };
    if let Some((_, k, _)) = b.entries.first() {
        return fail(
            &b.sub(k),
            "not supported; lb does not serve a TCP router without what guards it",
        );
    }
    Ok(got)
}

/// A `{certFile, keyFile}` table as a certificate to serve; `None` (reported) when `files` does
/// not let it be read: the certificate is left out, the rest of the document still counts.
fn cert_pair(
    mut c: Obj<'_>,
    default: bool,
    files: &Files,
    unsupported: &mut Vec<String>,
) -> R<Option<CertSpec>> {
    let (cert, key) = (c.string("certfile")?, c.string("keyfile")?);
    let path = c.path.clone();
    c.rest(unsupported);
    let (Some(cert), Some(key)) = (cert, key) else {
        return fail(&path, "certFile and keyFile are required");
    };
    match (files.allow(&cert), files.allow(&key)) {
        (Ok(cert_file), Ok(key_file)) => Ok(Some(CertSpec {
            cert_file,
            key_file,
            default,
        })),
        (cert, key) => {
            for (what, r) in [("certFile", cert), ("keyFile", key)] {
                if let Err(why) = r {
                    unsupported.push(format!(
                        "{path}.{what}: refused, the certificate is left out: {why}"
                    ));
                }
            }
            Ok(None)
        }
    }
}

/// One `http.serversTransports` entry, as the TLS lb speaks to a service's servers.
/// Also whether it turns HTTP/2 off (`disableHTTP2`).
fn servers_transport(
    v: &Value,
    p: &str,
    files: &Files,
    unsupported: &mut Vec<String>,
) -> R<(UpstreamTls, bool)> {
    let mut t = Obj::new(v, p)?;
    let h2_off = t.bool("disablehttp2")?.unwrap_or(false);
    let mut tls = UpstreamTls {
        server_name: t.string("servername")?,
        ..Default::default()
    };
    if let Some(cas) = t.strings("rootcas")? {
        if cas.len() > 1 {
            unsupported.push(format!("{p}.rootCAs: only the first CA file is used"));
        }
        tls.ca_file = match cas.first() {
            Some(ca) => Some(files.allow_at(ca, &format!("{p}.rootCAs[0]"))?),
            None => None,
        };
    }
    let certs = t.tables("certificates")?;
    if certs.len() > 1 {
        unsupported.push(format!(
            "{p}.certificates: only the first client certificate is used"
        ));
    }
    if let Some(mut c) = certs.into_iter().next() {
        let cp = c.path.clone();
        if let Some(f) = c.string("certfile")? {
            tls.cert_file = Some(files.allow_at(&f, &format!("{cp}.certFile"))?);
        }
        if let Some(f) = c.string("keyfile")? {
            tls.key_file = Some(files.allow_at(&f, &format!("{cp}.keyFile"))?);
        }
        c.rest(unsupported);
    }
    if t.bool("insecureskipverify")? == Some(true) {
        return fail(
            &format!("{p}.insecureSkipVerify"),
            "lb always verifies upstream certificates: give rootCAs instead",
        );
    }
    // Checks on who the upstream is that lb would skip: refused, not weakened.
    for k in ["spiffe", "peercerturi"] {
        if let Some((kp, _)) = t.take(k) {
            return fail(
                &kp,
                "not supported: lb verifies the upstream's chain and name (serverName), not SPIFFE IDs or URI SANs",
            );
        }
    }
    t.rest(unsupported);
    Ok((tls, h2_off))
}

/// One `http.services` entry. False (reported) when it has no kind lb supports: the routers
/// using it are left out, never served a 503.
#[allow(clippy::too_many_arguments)]
fn service(
    name: &str,
    v: &Value,
    path: &str,
    transports: &HashMap<String, (UpstreamTls, bool)>,
    left: &HashSet<String>,
    cx: &Cx<'_>,
    out: &mut Translated,
    mirrors: &mut Vec<(String, String, Mirror, String)>,
    composites: &mut Vec<(String, Composite, String)>,
) -> R<bool> {
    let mut s = Obj::new(v, path)?;
    if let Some((p, m)) = s.take("mirroring") {
        let mut m = Obj::new(m, &p)?;
        let Some(main) = m.string("service")? else {
            return fail(&p, "service is required");
        };
        let max_body = m.number("maxbodysize")?;
        let body = m.bool("mirrorbody")?.unwrap_or(true);
        let mut targets = Vec::new();
        for mut x in m.tables("mirrors")? {
            let xp = x.path.clone();
            let target = x.string("name")?;
            let percent = x.number("percent")?.unwrap_or(0.0);
            x.rest(&mut out.unsupported);
            let Some(target) = target else {
                return fail(&xp, "name is required");
            };
            targets.push(MirrorTarget {
                service: local(&target),
                percent: percent.clamp(0.0, 100.0),
            });
        }
        m.rest(&mut out.unsupported);
        s.rest(&mut out.unsupported);
        if targets.is_empty() {
            return fail(&p, "mirrors: at least one is required");
        }
        let mirror = Mirror {
            targets,
            // Traefik's -1 (no limit) is bounded here: the copy is held in memory.
            max_body_bytes: match max_body {
                Some(n) if n >= 0.0 => n as usize,
                _ => 1 << 20,
            },
            body,
        };
        mirrors.push((name.to_string(), local(&main), mirror, p));
        return Ok(true);
    }
    if let Some((wp, w)) = s.take("weighted") {
        let mut w = Obj::new(w, &wp)?;
        let mut list = Vec::new();
        for mut x in w.tables("services")? {
            let xp = x.path.clone();
            let child = x.string("name")?;
            let weight = x.number("weight")?.unwrap_or(1.0);
            x.rest(&mut out.unsupported);
            let Some(child) = child else {
                return fail(&xp, "name is required");
            };
            if !(0.0..=1000.0).contains(&weight) || weight.fract() != 0.0 {
                return fail(&format!("{xp}.weight"), "expected 0..=1000");
            }
            list.push((local(&child), weight as u32));
        }
        if list.iter().all(|(_, w)| *w == 0) {
            return fail(
                &format!("{wp}.services"),
                "at least one with a weight above 0",
            );
        }
        if let Some((sp, _)) = w.take("sticky") {
            out.unsupported.push(format!(
                "{sp}: not supported (each request is shared by weight; a loadBalancer's sticky cookie still pins within it)"
            ));
        }
        // lb always passes over a service with no upstream up; Traefik's `healthCheck: {}` asks
        // for that.
        let _ = w.take("healthcheck");
        w.rest(&mut out.unsupported);
        s.rest(&mut out.unsupported);
        composites.push((name.to_string(), Composite::Weighted(list), wp));
        return Ok(true);
    }
    if let Some((fp, f)) = s.take("failover") {
        let mut f = Obj::new(f, &fp)?;
        let main = f.string("service")?;
        let fallback = f.string("fallback")?;
        let _ = f.take("healthcheck");
        f.rest(&mut out.unsupported);
        s.rest(&mut out.unsupported);
        let (Some(main), Some(fallback)) = (main, fallback) else {
            return fail(&fp, "service and fallback are required");
        };
        composites.push((
            name.to_string(),
            Composite::Failover {
                main: local(&main),
                fallback: local(&fallback),
            },
            fp,
        ));
        return Ok(true);
    }
    let Some((lp, lb)) = s.take("loadbalancer") else {
        for (_, k, _) in &s.entries {
            out.unsupported.push(format!(
                "{}: not supported; the routers using the service are left out",
                s.sub(k)
            ));
        }
        if s.entries.is_empty() {
            out.unsupported.push(format!(
                "{path}: no loadBalancer; the routers using the service are left out"
            ));
        }
        return Ok(false);
    };
    s.rest(&mut out.unsupported);
    let mut lb = Obj::new(lb, &lp)?;
    let mut spec = ServiceSpec {
        algorithm: Algorithm::WeightedRoundRobin,
        passive: Passive::default(),
        ..Default::default()
    };
    if let Some(strategy) = lb.string("strategy")? {
        spec.algorithm = match strategy.to_ascii_lowercase().as_str() {
            "wrr" => Algorithm::WeightedRoundRobin,
            "p2c" => Algorithm::P2c,
            other => {
                return fail(
                    &format!("{lp}.strategy"),
                    format!("{other:?}: expected wrr or p2c"),
                )
            }
        };
    }
    if let Some((sp, sticky)) = lb.take("sticky") {
        let mut st = Obj::new(sticky, &sp)?;
        if let Some((cp, cookie)) = st.take("cookie") {
            let mut c = Obj::new(cookie, &cp)?;
            spec.sticky_cookie = Some(c.string("name")?.unwrap_or_else(|| "lb_sticky".into()));
            for k in ["secure", "httponly", "samesite", "maxage", "path"] {
                if let Some((kp, _)) = c.take(k) {
                    out.unsupported.push(format!(
                        "{kp}: not supported (lb's sticky cookie is HttpOnly, SameSite=Lax, Path=/)"
                    ));
                }
            }
            c.rest(&mut out.unsupported);
        }
        st.rest(&mut out.unsupported);
    }
    let health = lb.take("healthcheck");
    if let Some((pp, p)) = lb.take("passivehealthcheck") {
        let mut p = Obj::new(p, &pp)?;
        // Traefik counts failures within the window and keeps the server out for the window;
        // lb counts them in a row and doubles the time out with each ejection in a row.
        if let Some(n) = p.number("maxfailedattempts")? {
            if !(1.0..=1000.0).contains(&n) || n.fract() != 0.0 {
                return fail(&format!("{pp}.maxFailedAttempts"), "expected 1..=1000");
            }
            spec.passive.failures = n as u32;
        }
        if let Some(w) = p.duration("failurewindow")? {
            if w.is_zero() {
                return fail(
                    &format!("{pp}.failureWindow"),
                    "expected a duration above 0",
                );
            }
            spec.passive.backoff = w;
        }
        p.rest(&mut out.unsupported);
    }
    let pass_host = lb.bool("passhostheader")?.unwrap_or(true);
    if let Some((rp, rf)) = lb.take("responseforwarding") {
        // lb passes each chunk of an answer on as it arrives (Traefik's -1), which is never
        // later than any interval asks: every value is honoured.
        let mut rf = Obj::new(rf, &rp)?;
        if let Some((fp, v)) = rf.take("flushinterval") {
            let text = scalar(v, &fp)?;
            if !text.starts_with('-') {
                duration(v, &fp)?;
            } else if text.trim_start_matches('-').parse::<f64>().is_err() {
                return fail(&fp, format!("{text:?}: expected a duration or -1"));
            }
        }
        rf.rest(&mut out.unsupported);
    }
    let transport = match lb.string("serverstransport")? {
        Some(t) => match transports.get(&local(&t)) {
            Some(tls) => Some(tls.clone()),
            None if left.contains(&format!("http.serverstransports.{}", local(&t))) => {
                return fail(
                    &format!("{lp}.serversTransport"),
                    format!("serversTransport {t:?} is not usable"),
                )
            }
            None => {
                return fail(
                    &format!("{lp}.serversTransport"),
                    format!("no serversTransport {t:?}"),
                )
            }
        },
        None => None,
    };
    let mut instances = std::collections::BTreeMap::new();
    let mut hosts = std::collections::BTreeMap::new();
    let mut https = None;
    for mut x in lb.tables("servers")? {
        let xp = x.path.clone();
        let url = x.string("url")?;
        let weight = x.number("weight")?.unwrap_or(1.0);
        x.rest(&mut out.unsupported);
        let Some(url) = url else {
            return fail(&xp, "url is required");
        };
        let (addr, scheme) = server_address(&url, &format!("{xp}.url"), cx)?;
        if !pass_host {
            // Traefik's `Host` is then the URL's host (and port) as written, not its address.
            if let Some(a) = url
                .parse::<hyper::Uri>()
                .ok()
                .and_then(|u| u.authority().cloned())
            {
                let host = a.as_str().rsplit('@').next().unwrap_or("").to_string();
                hosts.insert(addr, host);
            }
        }
        if https.is_some_and(|h| h != scheme) {
            return fail(&xp, "all servers of a service use the same scheme");
        }
        https = Some(scheme);
        if !(0.0..=1000.0).contains(&weight) {
            return fail(&format!("{xp}.weight"), "expected 0..=1000");
        }
        let inst = Instance {
            address: addr.ip(),
            port: addr.port(),
            weight: weight as u32,
            zone: None,
            metadata: Default::default(),
        };
        instances.insert(inst.key(), inst);
    }
    if https == Some(Scheme::H2c) && transport.is_some() {
        return fail(
            &format!("{lp}.serversTransport"),
            "h2c servers are spoken to without TLS: a serversTransport's TLS cannot apply",
        );
    }
    let (tls, _h2_off) = match transport {
        Some((tls, off)) => (Some(tls), off),
        None => (None, false),
    };
    if https == Some(Scheme::Https) || tls.is_some() {
        spec.tls = Some(tls.unwrap_or_default());
    }
    // HTTP/2 to https:// servers would carry the upstream's address as `:authority`, which
    // HTTP/2 servers read as the host (lb.toml's `http2 = true` asks for it knowingly); they
    // are spoken to in HTTP/1.1 with the client's Host. h2c:// asks for HTTP/2 by name.
    spec.http2 = https == Some(Scheme::H2c);
    if let Some((hp, h)) = health {
        spec.health = Some(health_check(h, &hp, spec.tls.is_some(), out)?);
    }
    if !pass_host {
        spec.upstream_host = Some(hosts);
    }
    lb.rest(&mut out.unsupported);
    out.services.insert(name.to_string(), instances);
    out.dynamic.services.insert(name.to_string(), spec);
    Ok(true)
}

/// `loadBalancer.healthCheck` (Traefik's reference: routing/services, "Health Check"). Its
/// scheme must be the servers' own: lb checks through the service's client, as it sends.
fn health_check(v: &Value, path: &str, https: bool, out: &mut Translated) -> R<ActiveCheck> {
    let mut h = Obj::new(v, path)?;
    let mut c = ActiveCheck::default();
    if let Some(mode) = h.string("mode")? {
        if !mode.eq_ignore_ascii_case("http") {
            return fail(
                &h.sub("mode"),
                format!("{mode:?}: only http checks are supported (not gRPC's health protocol)"),
            );
        }
    }
    if let Some(scheme) = h.string("scheme")? {
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            other => {
                return fail(
                    &h.sub("scheme"),
                    format!("{other:?}: expected http or https"),
                )
            }
        };
        if https != tls {
            return fail(
                &h.sub("scheme"),
                "a check in another scheme than the servers' is not supported (lb checks through the service's own connections)",
            );
        }
    }
    if let Some(p) = h.string("path")? {
        c.path = p;
    }
    if let Some(m) = h.string("method")? {
        c.method = m.to_ascii_uppercase();
    }
    if let Some(s) = h.number("status")? {
        if s.fract() != 0.0 {
            return fail(&h.sub("status"), "expected an HTTP status");
        }
        c.status = Some(s as u16).filter(|s| *s != 0);
        if !(0.0..=599.0).contains(&s) {
            return fail(&h.sub("status"), "expected an HTTP status");
        }
    }
    if let Some(p) = h.number("port")? {
        if !(1.0..=65535.0).contains(&p) || p.fract() != 0.0 {
            return fail(&h.sub("port"), "expected a port 1..=65535");
        }
        c.port = Some(p as u16);
    }
    if let Some(i) = h.duration("interval")? {
        c.interval = i;
        c.unhealthy_interval = i;
    }
    if let Some(i) = h.duration("unhealthyinterval")? {
        c.unhealthy_interval = i;
    }
    if let Some(t) = h.duration("timeout")? {
        c.timeout = t;
    }
    c.hostname = h.string("hostname")?;
    if let Some(true) = h.bool("followredirects")? {
        // Traefik's default; lb counts the redirect itself (a 3xx is healthy).
    }
    if let Some((hp, headers)) = h.take("headers") {
        let m = Obj::new(headers, &hp)?;
        for (_, name, v) in &m.entries {
            c.headers.push((name.to_string(), scalar(v, &m.sub(name))?));
        }
    }
    h.rest(&mut out.unsupported);
    c.validate().or_else(|e| fail(path, e))?;
    Ok(c)
}

/// A server URL's scheme, as lb speaks to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    /// HTTP/2 without TLS, from the first byte (gRPC servers without TLS).
    H2c,
    /// TLS, HTTP/1.1.
    Https,
}

/// A server URL's address (a host name is resolved now) and its scheme.
fn server_address(url: &str, path: &str, cx: &Cx<'_>) -> R<(SocketAddr, Scheme)> {
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return fail(path, format!("{url:?}: {e}")),
    };
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        Some("h2c") => Scheme::H2c,
        _ => {
            return fail(
                path,
                format!("{url:?}: expected http://, https:// or h2c://"),
            )
        }
    };
    let https = scheme == Scheme::Https;
    let Some(host) = uri.host() else {
        return fail(path, format!("{url:?}: no host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    cx.resolve(host, port)
        .map(|a| (a, scheme))
        .or_else(|why| fail(path, why))
}

/// One HTTP router; `None` (reported) when it is left out.
#[allow(clippy::too_many_arguments)] // the document's parts a router names, each by itself
fn router(
    name: &str,
    v: &Value,
    path: &str,
    cx: &Cx<'_>,
    chains: &HashMap<String, Vec<String>>,
    options: &HashMap<String, Option<String>>,
    left: &HashSet<String>,
    unsupported: &mut Vec<String>,
) -> R<Option<(RouterSpec, Option<crate::model::l7::AcmeWish>)>> {
    let mut r = Obj::new(v, path)?;
    // Before the rule: a v2 rule read as v3 fails with a message about the rule, not the syntax.
    if let Some(syntax) = r.string("rulesyntax")? {
        if !syntax.eq_ignore_ascii_case("v3") {
            return fail(
                &format!("{path}.ruleSyntax"),
                format!("{syntax:?}: only Traefik's v3 rule syntax is supported (drop ruleSyntax and write the rule in v3)"),
            );
        }
    }
    let Some(rule_text) = r.string("rule")? else {
        return fail(path, "rule is required");
    };
    let rule = Rule::parse_traefik(&rule_text)
        .or_else(|e| fail(&format!("{path}.rule"), e.to_string()))?;
    let Some(service) = r.string("service")? else {
        return fail(path, "service is required");
    };
    let (priority, entrypoints) = r.placement()?;
    let mut middlewares = Vec::new();
    for m in r.strings("middlewares")?.unwrap_or_default() {
        expand(
            &cx.reference(&m),
            cx,
            chains,
            &mut middlewares,
            &mut Vec::new(),
            path,
        )?;
    }
    let mut named_options = None;
    let tls_section = r.take("tls");
    let serves_tls = tls_section.is_some();
    let mut wish = None;
    if let Some((tp, tls)) = tls_section {
        if let Ok(mut t) = Obj::new(tls, &tp) {
            named_options = t.string("options")?.map(|n| cx.reference(&n));
            let resolver = t.string("certresolver")?;
            let mut names = Vec::new();
            for mut d in t.tables("domains")? {
                names.extend(d.string("main")?);
                names.extend(d.strings("sans")?.unwrap_or_default());
                d.rest(unsupported);
            }
            if let Some(resolver) = resolver {
                // As Traefik: the rule's hosts when the router names no domains.
                if names.is_empty() {
                    names = rule.hosts();
                }
                let mut checked = Vec::new();
                for n in names {
                    match crate::sources::config::acme_name(&n) {
                        Ok(n) if !checked.contains(&n) => checked.push(n),
                        Ok(_) => {}
                        Err(why) => unsupported.push(format!("{tp}: {n:?} is not ordered: {why}")),
                    }
                }
                wish = Some(crate::model::l7::AcmeWish {
                    resolver,
                    names: checked,
                });
            } else if !names.is_empty() {
                unsupported.push(format!(
                    "{tp}.domains: not used without certResolver (certificates come from tls.certificates)"
                ));
            }
            t.rest(unsupported);
        }
    }
    r.rest(unsupported);
    // Checked for routers without `tls` too: an entry point that decides for its routers serves
    // them over TLS, so the default options guard every one of them.
    if let Err(why) = tls_allows(options, named_options.as_deref()) {
        unsupported.push(format!(
            "{path}: left out: {why}; lb does not serve a router without the protection it asks for"
        ));
        return Ok(None);
    }
    if let Some(internal) = service.strip_suffix("@internal") {
        left_out_because(path, &internal_service(internal), unsupported);
        return Ok(None);
    }
    let service = local(&service);
    if left.contains(&format!("http.services.{service}")) {
        left_out_because(
            path,
            &format!("its service {service:?} is not usable"),
            unsupported,
        );
        return Ok(None);
    }
    let unusable: Vec<&String> = middlewares
        .iter()
        .filter(|m| left.contains(&format!("http.middlewares.{m}")))
        .collect();
    if !unusable.is_empty() {
        left_out_because(
            path,
            &format!("its middlewares {unusable:?} are not usable"),
            unsupported,
        );
        return Ok(None);
    }
    let spec = RouterSpec {
        name: name.to_string(),
        entrypoints,
        rule,
        rule_text,
        priority,
        service,
        middlewares,
        tls: Some(serves_tls),
        tls_options: named_options.map(|n| cx.reference(&n)),
    };
    Ok(Some((spec, wish)))
}

/// An auth middleware's `users` and the lines of its `usersFile` (blank lines and comments
/// skipped), the file read only where this document may name files.
fn users(b: &mut Obj<'_>, p: &str, files: &Files) -> R<Vec<String>> {
    let mut users = b.strings("users")?.unwrap_or_default();
    if let Some(file) = b.string("usersfile")? {
        let file = files.allow_at(&file, &format!("{p}.usersFile"))?;
        let text = std::fs::read_to_string(&file).or_else(|e| {
            fail(
                &format!("{p}.usersFile"),
                format!("{}: {e}", file.display()),
            )
        })?;
        users.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    Ok(users)
}

/// `ipStrategy` (depth, excludedIPs, ipv6Subnet) of an allow list or a source criterion.
fn ip_strategy(o: &mut Obj<'_>) -> R<Option<crate::model::middleware::IpStrategyConfig>> {
    let Some((sp, v)) = o.take("ipstrategy") else {
        return Ok(None);
    };
    let mut s = Obj::new(v, &sp)?;
    let depth = match s.number("depth")? {
        Some(d) if d.fract() == 0.0 && (0.0..=64.0).contains(&d) => d as usize,
        Some(_) => return fail(&format!("{sp}.depth"), "expected 0..=64"),
        None => 0,
    };
    let excluded_ips = s.strings("excludedips")?.unwrap_or_default();
    for (i, e) in excluded_ips.iter().enumerate() {
        if crate::model::ip_net(e).is_none() {
            return fail(
                &format!("{sp}.excludedIPs[{i}]"),
                format!("{e:?} is not an address or CIDR"),
            );
        }
    }
    let ipv6_subnet = match s.number("ipv6subnet")? {
        Some(n) if n.fract() == 0.0 && (1.0..=128.0).contains(&n) => Some(n as u8),
        Some(_) => return fail(&format!("{sp}.ipv6Subnet"), "expected 1..=128"),
        None => None,
    };
    // Anything else in it would change whose address is checked: refused, not reported.
    if let Some((_, name, _)) = s.entries.first() {
        return fail(&s.sub(name), "not supported in an ipStrategy");
    }
    Ok(Some(crate::model::middleware::IpStrategyConfig {
        depth,
        excluded_ips,
        ipv6_subnet,
    }))
}

/// A `sourceCriterion`: by a header (`requestHeaderName`, or the host with `requestHost`),
/// else by the address an `ipStrategy` names.
#[allow(clippy::type_complexity)]
fn source_criterion(
    sc: &mut Obj<'_>,
) -> R<(
    Option<String>,
    Option<crate::model::middleware::IpStrategyConfig>,
)> {
    let named = sc.string("requestheadername")?;
    let host = sc.bool("requesthost")? == Some(true);
    let ip = ip_strategy(sc)?;
    // One source or none, as Traefik has it: a header beside an ipStrategy would let a client
    // choose its own bucket.
    if [named.is_some(), host, ip.is_some()]
        .iter()
        .filter(|x| **x)
        .count()
        > 1
    {
        return fail(
            &sc.path,
            "ipStrategy, requestHeaderName and requestHost exclude one another",
        );
    }
    // `requestHost`: the Host lb routes on (normalised, the one forwarded).
    let header = named.or(host.then(|| "host".to_string()));
    Ok((header, ip))
}

/// Why a router to Traefik's `<name>@internal` service is left out.
fn internal_service(name: &str) -> String {
    match name {
        "api" | "dashboard" => format!(
            "its service is {name}@internal: lb's API and dashboard are served on [api] listen only, always behind the token"
        ),
        "prometheus" => "its service is prometheus@internal: lb's metrics are served on [api] listen (/metrics)".into(),
        "ping" => "its service is ping@internal: lb answers health checks on [api] listen (/healthz)".into(),
        "noop" => "its service is noop@internal, which lb does not have".into(),
        other => format!("its service is {other}@internal, which lb does not have"),
    }
}

/// A middleware name, with chains expanded in place (cycles refused).
fn expand(
    name: &str,
    cx: &Cx<'_>,
    chains: &HashMap<String, Vec<String>>,
    out: &mut Vec<String>,
    stack: &mut Vec<String>,
    path: &str,
) -> R<()> {
    match chains.get(name) {
        None => {
            out.push(name.to_string());
            Ok(())
        }
        Some(list) => {
            if stack.iter().any(|s| s == name) {
                return fail(path, format!("middleware chain {name:?} contains itself"));
            }
            stack.push(name.to_string());
            for m in list {
                expand(&cx.reference(m), cx, chains, out, stack, path)?;
            }
            stack.pop();
            Ok(())
        }
    }
}

enum Kind {
    One(Box<MiddlewareConfig>),
    Chain(Vec<String>),
}

impl Kind {
    fn one(m: MiddlewareConfig) -> Kind {
        Kind::One(Box::new(m))
    }
}

/// One middleware; `None` (reported) when it is left out, and with it every router using it.
fn middleware(
    v: &Value,
    path: &str,
    files: &Files,
    unsupported: &mut Vec<String>,
) -> R<Option<Kind>> {
    let mut m = Obj::new(v, path)?;
    if m.entries.len() != 1 {
        return fail(path, "a middleware has exactly one kind");
    }
    let (key, name, body) = m.entries.remove(0);
    let p = m.sub(name);
    let mut b = Obj::new(body, &p)?;
    let kind = match key.as_str() {
        "chain" => Kind::Chain(b.strings("middlewares")?.unwrap_or_default()),
        "stripprefix" => {
            let _ = b.take("forceslash");
            Kind::one(MiddlewareConfig::StripPrefix(StripPrefixConfig {
                prefixes: b.strings("prefixes")?.unwrap_or_default(),
            }))
        }
        "stripprefixregex" => {
            Kind::one(MiddlewareConfig::StripPrefixRegex(StripPrefixRegexConfig {
                regex: b.strings("regex")?.unwrap_or_default(),
            }))
        }
        "addprefix" => Kind::one(MiddlewareConfig::AddPrefix(AddPrefixConfig {
            prefix: req(b.string("prefix")?, &p, "prefix")?,
        })),
        "replacepath" => Kind::one(MiddlewareConfig::ReplacePath(ReplacePathConfig {
            path: req(b.string("path")?, &p, "path")?,
        })),
        "replacepathregex" => {
            Kind::one(MiddlewareConfig::ReplacePathRegex(ReplacePathRegexConfig {
                regex: req(b.string("regex")?, &p, "regex")?,
                replacement: req(b.string("replacement")?, &p, "replacement")?,
            }))
        }
        "redirectscheme" => Kind::one(MiddlewareConfig::RedirectScheme(RedirectSchemeConfig {
            scheme: b.string("scheme")?.unwrap_or_else(|| "https".into()),
            permanent: b.bool("permanent")?.unwrap_or(false),
            port: match b.string("port")? {
                Some(port) => Some(
                    port.parse()
                        .or_else(|_| fail(&format!("{p}.port"), "expected a port"))?,
                ),
                None => None,
            },
        })),
        "redirectregex" => Kind::one(MiddlewareConfig::RedirectRegex(RedirectRegexConfig {
            regex: req(b.string("regex")?, &p, "regex")?,
            replacement: req(b.string("replacement")?, &p, "replacement")?,
            permanent: b.bool("permanent")?.unwrap_or(false),
        })),
        "headers" => {
            if let Some((ap, hosts)) = b.take("allowedhosts") {
                if !list(hosts, &ap)?.is_empty() {
                    return Ok(left_out(&ap, unsupported));
                }
            }
            Kind::one(MiddlewareConfig::Headers(headers(&mut b)?))
        }
        "basicauth" => {
            let users = users(&mut b, &p, files)?;
            for u in &users {
                if let Some((user, why)) = u.split_once(':').and_then(|(user, hash)| {
                    Some((user, crate::model::middleware::weak_hash(hash)?))
                }) {
                    unsupported.push(format!(
                        "{p}.users: user {user:?}: weak hash accepted: {why}"
                    ));
                }
            }
            let _ = b.take("removeheader"); // lb always removes the credentials
            Kind::one(MiddlewareConfig::BasicAuth(BasicAuthConfig {
                users,
                realm: b.string("realm")?.unwrap_or_else(|| "traefik".into()),
                header_field: b.string("headerfield")?,
            }))
        }
        "passtlsclientcert" => {
            use crate::model::middleware::{CertInfoConfig, DnFields};
            let pem = b.bool("pem")?.unwrap_or(false);
            let mut info = None;
            if let Some((ip, v)) = b.take("info") {
                let mut i = Obj::new(v, &ip)?;
                let mut dn = |i: &mut Obj<'_>, key: &str, subject: bool| -> R<Option<DnFields>> {
                    let Some((dp, v)) = i.take(key) else {
                        return Ok(None);
                    };
                    let mut d = Obj::new(v, &dp)?;
                    let f = DnFields {
                        country: d.bool("country")?.unwrap_or(false),
                        province: d.bool("province")?.unwrap_or(false),
                        locality: d.bool("locality")?.unwrap_or(false),
                        organization: d.bool("organization")?.unwrap_or(false),
                        organizational_unit: match subject {
                            true => d.bool("organizationalunit")?.unwrap_or(false),
                            false => false,
                        },
                        common_name: d.bool("commonname")?.unwrap_or(false),
                        serial_number: d.bool("serialnumber")?.unwrap_or(false),
                        domain_component: d.bool("domaincomponent")?.unwrap_or(false),
                    };
                    d.rest(unsupported);
                    Ok(Some(f))
                };
                let subject = dn(&mut i, "subject", true)?;
                let issuer = dn(&mut i, "issuer", false)?;
                info = Some(CertInfoConfig {
                    not_after: i.bool("notafter")?.unwrap_or(false),
                    not_before: i.bool("notbefore")?.unwrap_or(false),
                    sans: i.bool("sans")?.unwrap_or(false),
                    serial_number: i.bool("serialnumber")?.unwrap_or(false),
                    subject,
                    issuer,
                });
                i.rest(unsupported);
            }
            Kind::one(MiddlewareConfig::PassTlsClientCert(
                crate::model::middleware::PassTlsClientCertConfig { pem, info },
            ))
        }
        "grpcweb" => Kind::one(MiddlewareConfig::GrpcWeb(
            crate::model::middleware::GrpcWebConfig {
                allow_origins: b.strings("alloworigins")?.unwrap_or_default(),
            },
        )),
        "contenttype" => {
            // Traefik 3: the option is deprecated, and `false` is the same as no middleware.
            if b.bool("autodetect")? == Some(false) {
                unsupported.push(format!(
                    "{p}.autoDetect: false: deprecated; the middleware does nothing (as in Traefik)"
                ));
                return Ok(Some(Kind::Chain(Vec::new())));
            }
            Kind::one(MiddlewareConfig::ContentType(
                crate::model::middleware::ContentTypeConfig {},
            ))
        }
        "digestauth" => {
            let users = users(&mut b, &p, files)?;
            unsupported.push(format!(
                "{p}: digest authentication is MD5-based: weak, prefer basicAuth with bcrypt over TLS"
            ));
            let _ = b.take("removeheader"); // lb always removes the credentials
            Kind::one(MiddlewareConfig::DigestAuth(
                crate::model::middleware::DigestAuthConfig {
                    users,
                    realm: b.string("realm")?.unwrap_or_else(|| "traefik".into()),
                    header_field: b.string("headerfield")?,
                },
            ))
        }
        "forwardauth" => {
            let address = req(b.string("address")?, &p, "address")?;
            let mut ca_file = None;
            if let Some((tp, tls)) = b.take("tls") {
                let mut t = Obj::new(tls, &tp)?;
                ca_file = match t.string("ca")? {
                    Some(ca) => Some(files.allow_at(&ca, &format!("{tp}.ca"))?),
                    None => None,
                };
                if let Some((kp, _)) = t.take("insecureskipverify") {
                    unsupported.push(format!(
                        "{kp}: not supported (lb always verifies the auth service's certificate)"
                    ));
                }
                // A client certificate lb would not present: the auth service would see
                // another client than the one configured.
                if let Some((_, key, _)) = t.entries.first() {
                    return Ok(left_out(&t.sub(key), unsupported));
                }
            }
            Kind::one(MiddlewareConfig::ForwardAuth(ForwardAuthConfig {
                address,
                trust_forward_header: b.bool("trustforwardheader")?.unwrap_or(false),
                auth_response_headers: b.strings("authresponseheaders")?.unwrap_or_default(),
                auth_request_headers: b.strings("authrequestheaders")?.unwrap_or_default(),
                timeout_ms: 5000,
                ca_file,
            }))
        }
        "ipallowlist" | "ipwhitelist" => {
            // An allow list that checked another address than the one meant would let everyone
            // in: every ipStrategy key is honoured, or the middleware is refused.
            let ip_strategy = ip_strategy(&mut b)?;
            if let Some((kp, _)) = b.take("rejectstatuscode") {
                unsupported.push(format!("{kp}: not supported (lb refuses with 403)"));
            }
            Kind::one(MiddlewareConfig::IpAllowList(IpAllowListConfig {
                source_range: b.strings("sourcerange")?.unwrap_or_default(),
                ip_strategy,
            }))
        }
        "ratelimit" => {
            let average = b.number("average")?.unwrap_or(0.0);
            let period = b.duration("period")?.unwrap_or(Duration::from_secs(1));
            let (mut source_header, mut ip) = (None, None);
            if let Some((sp, sc)) = b.take("sourcecriterion") {
                let mut sc = Obj::new(sc, &sp)?;
                (source_header, ip) = source_criterion(&mut sc)?;
                sc.rest(unsupported);
            }
            if period.is_zero() {
                return fail(&format!("{p}.period"), "must be > 0");
            }
            Kind::one(MiddlewareConfig::RateLimit(RateLimitConfig {
                average: average / period.as_secs_f64(),
                burst: b.number("burst")?.unwrap_or(1.0),
                source_header,
                redis: None,
                ip_strategy: ip,
            }))
        }
        "inflightreq" => {
            // Traefik counts per source, by default the client's address.
            let (mut per, mut source_header, mut ip) = (InFlightPer::ClientIp, None, None);
            if let Some((sp, sc)) = b.take("sourcecriterion") {
                let mut sc = Obj::new(sc, &sp)?;
                let (h, s) = source_criterion(&mut sc)?;
                if h.is_some() {
                    (per, source_header) = (InFlightPer::Header, h);
                }
                ip = s;
                sc.rest(unsupported);
            }
            Kind::one(MiddlewareConfig::InFlightReq(InFlightReqConfig {
                amount: b.number("amount")?.unwrap_or(0.0) as u64,
                per,
                source_header,
                ip_strategy: ip,
            }))
        }
        "buffering" => {
            for k in ["memrequestbodybytes", "memresponsebodybytes"] {
                let _ = b.take(k); // lb buffers in memory, within the max limits
            }
            Kind::one(MiddlewareConfig::Buffering(BufferingConfig {
                max_request_body_bytes: b.number("maxrequestbodybytes")?.unwrap_or(0.0).max(0.0)
                    as u64,
                max_response_body_bytes: b.number("maxresponsebodybytes")?.unwrap_or(0.0).max(0.0)
                    as u64,
            }))
        }
        "retry" => {
            if let Some((kp, _)) = b.take("maxrequestbodybytes") {
                unsupported.push(format!(
                    "{kp}: not supported (lb sends a request with a body again only when a buffering middleware holds it)"
                ));
            }
            Kind::one(MiddlewareConfig::Retry(RetryConfig {
                attempts: b.number("attempts")?.unwrap_or(0.0) as u32,
                // Traefik's default is no wait.
                initial_interval_ms: b
                    .duration("initialinterval")?
                    .map_or(0, |d| d.as_millis() as u64),
                status: b.strings("status")?.unwrap_or_default(),
                timeout_ms: b.duration("timeout")?.map_or(0, |d| d.as_millis() as u64),
                disable_retry_on_network_error: b
                    .bool("disableretryonnetworkerror")?
                    .unwrap_or(false),
                retry_non_idempotent_method: b.bool("retrynonidempotentmethod")?.unwrap_or(false),
            }))
        }
        "circuitbreaker" => {
            let ms =
                |d: Option<Duration>, default: u64| d.map_or(default, |d| d.as_millis() as u64);
            Kind::one(MiddlewareConfig::CircuitBreaker(CircuitBreakerConfig {
                expression: req(b.string("expression")?, &p, "expression")?,
                check_period_ms: ms(b.duration("checkperiod")?, 100),
                fallback_duration_ms: ms(b.duration("fallbackduration")?, 10_000),
                recovery_duration_ms: ms(b.duration("recoveryduration")?, 10_000),
                response_code: b.number("responsecode")?.unwrap_or(503.0) as u16,
            }))
        }
        "errors" => {
            let Some(service) = b.string("service")? else {
                return fail(&format!("{p}.service"), "required");
            };
            if let Some((kp, _)) = b.take("statusrewrites") {
                unsupported.push(format!(
                    "{kp}: not supported (the client gets the upstream's status)"
                ));
            }
            Kind::one(MiddlewareConfig::Errors(
                crate::model::middleware::ErrorsConfig {
                    status: b.strings("status")?.unwrap_or_default(),
                    service: local(&service),
                    query: b.string("query")?.unwrap_or_else(|| "/".into()),
                },
            ))
        }
        "compress" => {
            let defaults = CompressConfig {
                encodings: vec!["zstd".into(), "br".into(), "gzip".into()],
                min_response_body_bytes: 1024,
                excluded_content_types: vec![],
            };
            Kind::one(MiddlewareConfig::Compress(CompressConfig {
                encodings: b.strings("encodings")?.unwrap_or(defaults.encodings),
                min_response_body_bytes: b
                    .number("minresponsebodybytes")?
                    .map_or(defaults.min_response_body_bytes, |n| n.max(0.0) as u64),
                excluded_content_types: b.strings("excludedcontenttypes")?.unwrap_or_default(),
            }))
        }
        _ => {
            unsupported.push(format!(
                "{p}: middleware kind not supported; the routers using it are left out"
            ));
            return Ok(None);
        }
    };
    // What guards access is honoured whole or not at all: a setting of it lb lacks (a header
    // regex, a body to forward, …) could let through what it was meant to stop.
    let guards = matches!(
        key.as_str(),
        "basicauth" | "forwardauth" | "ipallowlist" | "ipwhitelist"
    );
    if guards {
        if let Some((_, name, _)) = b.entries.first() {
            return Ok(left_out(&b.sub(name), unsupported));
        }
    }
    b.rest(unsupported);
    Ok(Some(kind))
}

/// Reports an access setting lb cannot honour: its middleware is left out, and the routers
/// using it with it (they name a middleware that is not there).
fn left_out(key: &str, unsupported: &mut Vec<String>) -> Option<Kind> {
    unsupported.push(format!(
        "{key}: not supported, and it guards access: the middleware is left out, and so is every router using it"
    ));
    None
}

fn req(v: Option<String>, path: &str, key: &str) -> R<String> {
    match v {
        Some(v) => Ok(v),
        None => fail(path, format!("{key} is required")),
    }
}

fn headers(b: &mut Obj<'_>) -> R<HeadersConfig> {
    let mut h = HeadersConfig::default();
    let mut custom =
        |key: &str, set: &mut HashMap<String, String>, remove: &mut Vec<String>| -> R<()> {
            if let Some((p, m)) = b.take(key) {
                let m = Obj::new(m, &p)?;
                for (_, name, v) in &m.entries {
                    let v = scalar(v, &m.sub(name))?;
                    // Traefik: an empty value removes the header.
                    if v.is_empty() {
                        remove.push(name.to_string());
                    } else {
                        set.insert(name.to_string(), v);
                    }
                }
            }
            Ok(())
        };
    custom(
        "customrequestheaders",
        &mut h.request_set,
        &mut h.request_remove,
    )?;
    custom(
        "customresponseheaders",
        &mut h.response_set,
        &mut h.response_remove,
    )?;
    if let Some(origins) = b.strings("accesscontrolalloworiginlist")? {
        h.cors = Some(CorsConfig {
            allow_origins: origins,
            allow_methods: b.strings("accesscontrolallowmethods")?.unwrap_or_default(),
            allow_headers: b.strings("accesscontrolallowheaders")?.unwrap_or_default(),
            expose_headers: b.strings("accesscontrolexposeheaders")?.unwrap_or_default(),
            allow_credentials: b.bool("accesscontrolallowcredentials")?.unwrap_or(false),
            max_age_secs: b.number("accesscontrolmaxage")?.map(|n| n.max(0.0) as u64),
        });
    }
    let mut set = |k: &str, v: String| {
        h.response_set.insert(k.to_string(), v);
    };
    if let Some(secs) = b.number("stsseconds")? {
        let mut v = format!("max-age={}", secs as u64);
        if b.bool("stsincludesubdomains")? == Some(true) {
            v.push_str("; includeSubDomains");
        }
        if b.bool("stspreload")? == Some(true) {
            v.push_str("; preload");
        }
        set("Strict-Transport-Security", v);
    }
    if b.bool("framedeny")? == Some(true) {
        set("X-Frame-Options", "DENY".into());
    }
    if let Some(v) = b.string("customframeoptionsvalue")? {
        set("X-Frame-Options", v);
    }
    if b.bool("contenttypenosniff")? == Some(true) {
        set("X-Content-Type-Options", "nosniff".into());
    }
    if b.bool("browserxssfilter")? == Some(true) {
        set("X-XSS-Protection", "1; mode=block".into());
    }
    for (key, header) in [
        ("referrerpolicy", "Referrer-Policy"),
        ("contentsecuritypolicy", "Content-Security-Policy"),
        ("permissionspolicy", "Permissions-Policy"),
    ] {
        if let Some(v) = b.string(key)? {
            set(header, v);
        }
    }
    Ok(h)
}

/// Traefik's KV layout (`traefik/http/routers/api/rule = …`,
/// `traefik/http/services/api/loadBalancer/servers/0/url = …`) as a document: keys split on
/// `/`, numeric segments become list positions.
pub fn from_kv<'a>(prefix: &str, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    let mut root = Value::Object(Map::new());
    let prefix = prefix.trim_end_matches('/');
    for (key, value) in pairs {
        let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            continue;
        }
        insert(&mut root, &parts, value);
    }
    arrays(&mut root);
    root
}

fn insert(node: &mut Value, parts: &[&str], value: &str) {
    let Value::Object(m) = node else {
        return; // a key below a leaf: the leaf wins
    };
    if parts.len() == 1 {
        m.insert(parts[0].to_string(), Value::String(value.to_string()));
        return;
    }
    let child = m
        .entry(parts[0].to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    insert(child, &parts[1..], value);
}

/// Tables whose keys are all indexes become lists, in index order.
fn arrays(node: &mut Value) {
    if let Value::Object(m) = node {
        for v in m.values_mut() {
            arrays(v);
        }
        if !m.is_empty() && m.keys().all(|k| k.parse::<usize>().is_ok()) {
            let mut items: Vec<(usize, Value)> = std::mem::take(m)
                .into_iter()
                .filter_map(|(k, v)| k.parse().ok().map(|i| (i, v)))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            *node = Value::Array(items.into_iter().map(|(_, v)| v).collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s: &str| duration(&Value::String(s.into()), "x");
        assert_eq!(d("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(d("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(d("2").unwrap(), Duration::from_secs(2));
        assert_eq!(d("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(d("10 parsecs").is_err() && d("").is_err() && d("ms").is_err());
        assert!(
            d("1e20").is_err() && d("99999999999999999999h").is_err(),
            "no panic"
        );
    }

    #[test]
    fn kv_keys_become_a_document() {
        let doc = from_kv(
            "traefik",
            [
                ("traefik/http/routers/api/rule", "Host(`a.test`)"),
                ("traefik/http/routers/api/service", "api"),
                ("traefik/http/routers/api/middlewares/0", "strip"),
                (
                    "traefik/http/services/api/loadBalancer/servers/1/url",
                    "http://127.0.0.1:2",
                ),
                (
                    "traefik/http/services/api/loadBalancer/servers/0/url",
                    "http://127.0.0.1:1",
                ),
                ("elsewhere/x", "y"),
            ],
        );
        assert_eq!(doc["http"]["routers"]["api"]["middlewares"][0], "strip");
        let servers = &doc["http"]["services"]["api"]["loadBalancer"]["servers"];
        assert_eq!(servers[0]["url"], "http://127.0.0.1:1");
        assert_eq!(servers[1]["url"], "http://127.0.0.1:2");
        assert!(doc.get("x").is_none());
    }

    #[test]
    fn a_store_names_files_only_inside_its_directories() {
        let dir = std::env::temp_dir().join(format!("lb-traefik-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("users");
        std::fs::write(
            &ok,
            "alice:$2y$05$abcdefghijklmnopqrstuu5JvDPBbA2yQYTHX3Y6JQhM6l1pDq6Sy\n",
        )
        .unwrap();
        let files = Files::Within(vec![dir.clone()]);
        let doc = |key: &str, value: &str| from_kv("traefik", [(key, value)]);
        for (key, path) in [
            (
                "traefik/http/middlewares/a/basicAuth/usersFile",
                "/etc/shadow",
            ),
            (
                "traefik/http/middlewares/a/forwardAuth/tls/ca",
                "/etc/ssl/private/x.pem",
            ),
            ("traefik/http/serversTransports/t/rootCAs/0", "/etc/passwd"),
            (
                "traefik/http/serversTransports/t/certificates/0/keyFile",
                "relative.key",
            ),
        ] {
            let mut d = doc(key, path);
            if key.contains("forwardAuth") {
                d = from_kv(
                    "traefik",
                    [
                        (key, path),
                        (
                            "traefik/http/middlewares/a/forwardAuth/address",
                            "http://127.0.0.1:9/",
                        ),
                    ],
                );
            }
            let t = translate_with(&d, &files).expect(key);
            assert_eq!(t.errors.len(), 1, "{key}: {:?}", t.errors);
            assert!(
                t.errors[0].reason.contains("not inside"),
                "{key}: {:?}",
                t.errors
            );
            assert!(t.dynamic.middlewares.is_empty(), "{key}: left out");
            let t = translate_with(&d, &Files::Within(vec![])).expect(key);
            assert_eq!(t.errors.len(), 1, "{key}: none allowed");
        }
        let d = doc(
            "traefik/http/middlewares/a/basicAuth/usersFile",
            ok.to_str().unwrap(),
        );
        let t = translate_with(&d, &files).expect("inside");
        assert_eq!(t.dynamic.middlewares.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_of_key_paths() {
        let text = "http:\n  routers:\n    api:\n      service: api\n      rule: Nope(`x`)\n";
        assert_eq!(line_of(text, "http.routers.api.rule"), 5);
        assert_eq!(line_of(text, "http.routers.web.rule"), 0);
    }
}
