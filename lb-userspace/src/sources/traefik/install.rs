//! Traefik's install configuration (what Traefik calls static: `traefik.yml` / `traefik.toml`),
//! read into lb's own [`Config`]. `lb run --traefik traefik.yml` runs a Traefik setup with no
//! lb.toml; beside one (`--config lb.toml`), lb.toml keeps the agent's, the API's and the
//! dataplane's settings and the Traefik file adds its entry points, providers and resolver.
//!
//! What maps, key by key: `entryPoints` (address, asDefault, http.redirections, http.tls,
//! http2.maxConcurrentStreams, forwardedHeaders, proxyProtocol, transport.respondingTimeouts),
//! `providers.file` / `redis` / `etcd` (read in Traefik's layout under their `rootKey`),
//! `providersThrottleDuration`, one `certificatesResolvers.<name>.acme` (HTTP-01 or TLS-ALPN-01),
//! `accessLog`, and `api` / `metrics.prometheus` / `ping`, which lb serves on its admin API's
//! listener, behind its token. Everything else is reported by key path, never dropped quietly.
//!
//! As in Traefik, an entry point without `http.tls` takes TLS and plain HTTP on one port, told
//! apart by the client's first byte, and a router serves only the kind its `tls` section says;
//! one with `http.tls` makes every router on it a TLS router. Until a provider brings
//! certificates, TLS is served with a certificate from lb's development CA, as Traefik serves
//! its default certificate.
//!
//! Fail closed: what guards access and cannot be honoured leaves out what it guards. An entry
//! point with `http.middlewares` or `http.tls.options` is left out (its port is not opened), as is a provider whose TLS or sentinel settings lb lacks. `api.insecure` is
//! refused: the admin API always needs its token.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use super::{fail, list, scalar, Obj, R};
use crate::model::{
    l7::{AcmeSpec, ChallengeKind, EntryPointSpec, RouterSpec},
    middleware::{MiddlewareConfig, RedirectSchemeConfig},
    rule::Rule,
    EtcdAuth, EtcdSpec, EtcdTls, FileProviderSpec, RedisSpec,
};
use crate::sources::config::{Config, ConfigError};

/// Let's Encrypt's production directory: Traefik's default `caServer`.
const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// A redirecting router's priority when none is given: Traefik's (`MaxInt - 1`), above every
/// router a user writes.
const REDIRECT_PRIORITY: i64 = i64::MAX - 1;

/// What an install configuration contributes.
#[derive(Debug, Default)]
struct Install {
    entrypoints: Vec<EntryPointSpec>,
    routers: Vec<RouterSpec>,
    middlewares: Vec<(String, MiddlewareConfig)>,
    files: Vec<FileProviderSpec>,
    redis: Option<RedisSpec>,
    etcd: Option<EtcdSpec>,
    acme: Option<AcmeSpec>,
    access_log: Option<crate::observe::access_log::AccessLogSpec>,
    notes: Vec<String>,
}

/// Reads `path` and adds what it configures to `cfg`; a clash with what `cfg` has (an entry
/// point of the same name, a second Redis provider) is an error.
pub fn load_into(cfg: &mut Config, path: &Path) -> Result<(), ConfigError> {
    apply(cfg, path, &crate::sources::config::read(path)?)
}

/// As [`load_into`], with the text given (`path` names the file in errors and is where relative
/// paths start).
pub fn apply(cfg: &mut Config, path: &Path, text: &str) -> Result<(), ConfigError> {
    let at = |field: &str, reason: String| ConfigError {
        file: path.into(),
        line: super::line_of(text, field),
        field: field.to_string(),
        reason,
    };
    let doc = document(path, text)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let i = read(&doc, base).map_err(|e| at(&e.path, e.reason))?;
    for ep in &i.entrypoints {
        if cfg.entrypoints.iter().any(|e| e.name == ep.name) {
            return Err(at(
                &format!("entryPoints.{}", ep.name),
                "lb.toml has an entry point of this name too".into(),
            ));
        }
    }
    for r in &i.routers {
        if cfg.routers.iter().any(|o| o.name == r.name) {
            return Err(at(
                "entryPoints",
                format!("its redirection router {:?} clashes with lb.toml's", r.name),
            ));
        }
    }
    let twice = |what: &str| at(what, format!("lb.toml configures {what} too: keep one"));
    if i.redis.is_some() && cfg.providers.redis.is_some() {
        return Err(twice("providers.redis"));
    }
    if i.etcd.is_some() && cfg.providers.etcd.is_some() {
        return Err(twice("providers.etcd"));
    }
    if i.acme.is_some() && cfg.acme.is_some() {
        return Err(twice("certificatesResolvers"));
    }
    if i.access_log.is_some() && cfg.access_log.is_some() {
        return Err(twice("accessLog"));
    }
    // Traefik serves its default certificate until one matches; lb's development CA is that.
    if i.entrypoints.iter().any(|e| e.tls) {
        cfg.tls_dev_ca = true;
    }
    cfg.entrypoints.extend(i.entrypoints);
    cfg.routers.extend(i.routers);
    cfg.middlewares.extend(i.middlewares);
    cfg.providers.files.extend(i.files);
    cfg.providers.redis = cfg.providers.redis.take().or(i.redis);
    cfg.providers.etcd = cfg.providers.etcd.take().or(i.etcd);
    cfg.acme = cfg.acme.take().or(i.acme);
    cfg.access_log = cfg.access_log.take().or(i.access_log);
    let file = path.display();
    cfg.notes
        .extend(i.notes.into_iter().map(|n| format!("{file}: {n}")));
    Ok(())
}

/// The file as a document, or its syntax error at its line.
fn document(path: &Path, text: &str) -> Result<Value, ConfigError> {
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    );
    let doc: Result<Value, ()> = if yaml {
        serde_saphyr::from_str(text).map_err(|_| ())
    } else {
        toml::from_str(text).map_err(|_| ())
    };
    doc.map_err(|()| {
        let (line, reason) =
            crate::sources::file::syntax_error(path, text).unwrap_or((0, "unreadable".into()));
        ConfigError {
            file: path.into(),
            line,
            field: String::new(),
            reason,
        }
    })
}

/// A left-out item's note: what is not served, and why.
fn left_out(notes: &mut Vec<String>, path: &str, why: &str) {
    notes.push(format!("{path}: left out: {why}"));
}

fn read(doc: &Value, base: &Path) -> R<Install> {
    let mut top = Obj::new(doc, "")?;
    let mut i = Install::default();
    let throttle = top.duration("providersthrottleduration")?;
    let mut domains: Vec<(String, String, Vec<String>)> = Vec::new();
    if let Some((p, eps)) = top.take("entrypoints") {
        let mut eps = Obj::new(eps, &p)?;
        let names: Vec<(String, String)> = eps
            .entries
            .iter()
            .map(|(_, name, _)| (name.to_string(), eps.sub(name)))
            .collect();
        let mut redirects = Vec::new();
        for (name, path) in &names {
            super::check_name(name, path)?;
            let Some((_, v)) = eps.take(&name.to_ascii_lowercase()) else {
                continue;
            };
            let default = Obj::new(v, path)?.bool("asdefault")?.unwrap_or(false);
            let got = entrypoint(name, v, path, &mut i.notes)?;
            if got.is_none() && default {
                // Its routers (those naming no entry point) would spread to every other one,
                // without what this one asked for.
                return fail(
                    path,
                    "a default entry point (asDefault) cannot be left out: fix what is reported for it, or drop asDefault",
                );
            }
            if let Some((ep, redirect, names)) = got {
                if let Some(r) = redirect {
                    redirects.push((name.clone(), path.clone(), r));
                }
                for (resolver, list) in names {
                    domains.push((resolver, format!("{path}.http.tls.domains"), list));
                }
                i.entrypoints.push(ep);
            }
        }
        for (from, path, r) in redirects {
            redirection(&mut i, &from, &path, r)?;
        }
    }
    if let Some((p, v)) = top.take("providers") {
        providers(&mut i, v, &p, base, throttle)?;
    }
    if let Some((p, v)) = top.take("certificatesresolvers") {
        resolvers(&mut i, v, &p, base, &domains)?;
    }
    if let Some((p, v)) = top.take("api") {
        let mut api = Obj::new(v, &p)?;
        if api.bool("insecure")? == Some(true) {
            i.notes.push(format!(
                "{p}.insecure: refused: lb's admin API (dashboard included) is served on [api] listen, always behind its token"
            ));
        }
        // The dashboard is lb's, on the API's listener.
        api.take("dashboard");
        api.rest(&mut i.notes);
    }
    if let Some((p, v)) = top.take("metrics") {
        let mut m = Obj::new(v, &p)?;
        if let Some((pp, v)) = m.take("prometheus") {
            let mut prom = Obj::new(v, &pp)?;
            if let Some((ep, _)) = prom.take("entrypoint") {
                i.notes.push(format!(
                    "{ep}: lb serves its metrics on [api] listen at /metrics, behind the admin token"
                ));
            }
            prom.rest(&mut i.notes);
        }
        m.rest(&mut i.notes);
    }
    if let Some((p, v)) = top.take("ping") {
        let mut ping = Obj::new(v, &p)?;
        if let Some((ep, _)) = ping.take("entrypoint") {
            i.notes.push(format!(
                "{ep}: lb answers health checks on [api] listen at /healthz"
            ));
        }
        ping.rest(&mut i.notes);
    }
    if let Some((p, v)) = top.take("accesslog") {
        i.access_log = Some(access_log(v, &p, &mut i.notes)?);
    }
    if let Some((p, _)) = top.take("log") {
        i.notes.push(format!(
            "{p}: not supported: lb's log is filtered by RUST_LOG and shaped by --log-format"
        ));
    }
    if let Some((p, _)) = top.take("global") {
        i.notes.push(format!(
            "{p}: not supported (lb neither checks for versions nor reports usage)"
        ));
    }
    top.rest(&mut i.notes);
    Ok(i)
}

/// `entryPoints.<name>.http.redirections.entryPoint`.
struct Redirect {
    to: String,
    scheme: String,
    permanent: bool,
    priority: i64,
}

/// One entry point, with its redirection and the names its `http.tls.domains` give each
/// resolver; `None` when it is left out.
#[allow(clippy::type_complexity)]
fn entrypoint(
    name: &str,
    v: &Value,
    path: &str,
    notes: &mut Vec<String>,
) -> R<Option<(EntryPointSpec, Option<Redirect>, Vec<(String, Vec<String>)>)>> {
    let mut e = Obj::new(v, path)?;
    let Some(address) = e.string("address")? else {
        return fail(path, "address is required (such as \":80\")");
    };
    let at = format!("{path}.address");
    let (host, proto) = match address.rsplit_once('/') {
        Some((h, p)) => (h, p.to_ascii_lowercase()),
        None => (address.as_str(), "tcp".to_string()),
    };
    match proto.as_str() {
        "tcp" => {}
        "udp" => {
            left_out(notes, path, "UDP entry points are not supported");
            return Ok(None);
        }
        other => return fail(&at, format!("{other:?}: expected /tcp or /udp")),
    }
    let address = listen_address(host).or_else(|why| fail(&at, why))?;
    let mut spec = EntryPointSpec {
        name: name.to_string(),
        address,
        tls: true,
        client_ca_file: None,
        trusted_ips: Vec::new(),
        limits: crate::model::l7::ConnLimits {
            // Traefik's respondingTimeouts defaults (readTimeout 60 s, idleTimeout 180 s); its
            // writeTimeout of 0 (none) stays lb's bound.
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(180),
            ..Default::default()
        },
        also_plain: true,
        as_default: e.bool("asdefault")?.unwrap_or(false),
        proxy_protocol: None,
    };
    let mut redirect = None;
    let mut domains = Vec::new();
    if let Some((hp, http)) = e.take("http") {
        let mut h = Obj::new(http, &hp)?;
        if let Some((rp, r)) = h.take("redirections") {
            let mut r = Obj::new(r, &rp)?;
            if let Some((ep, v)) = r.take("entrypoint") {
                let mut x = Obj::new(v, &ep)?;
                let Some(to) = x.string("to")? else {
                    return fail(&ep, "to is required (an entry point name or a port)");
                };
                let priority = match x.number("priority")? {
                    Some(p) if p.fract() == 0.0 && p >= 1.0 => p as i64,
                    Some(_) => {
                        return fail(&format!("{ep}.priority"), "expected a positive integer")
                    }
                    None => REDIRECT_PRIORITY,
                };
                redirect = Some(Redirect {
                    to,
                    scheme: x.string("scheme")?.unwrap_or_else(|| "https".into()),
                    permanent: x.bool("permanent")?.unwrap_or(true),
                    priority,
                });
                x.rest(notes);
            }
            r.rest(notes);
        }
        if let Some((mp, _)) = h.take("middlewares") {
            left_out(
                notes,
                path,
                &format!("{mp}: middlewares for every router of an entry point are not supported; put them on the routers"),
            );
            return Ok(None);
        }
        if let Some((tp, tls)) = h.take("tls") {
            spec.also_plain = false;
            let mut t = Obj::new(tls, &tp)?;
            if let Some((op, _)) = t.take("options") {
                left_out(
                    notes,
                    path,
                    &format!("{op}: an entry point's TLS options are not applied by lb"),
                );
                return Ok(None);
            }
            let resolver = t.string("certresolver")?;
            let mut names = Vec::new();
            for (j, mut d) in t.tables("domains")?.into_iter().enumerate() {
                let dp = format!("{tp}.domains[{j}]");
                if let Some(main) = d.string("main")? {
                    names.push(main);
                }
                names.extend(d.strings("sans")?.unwrap_or_default());
                d.rest(notes);
                if resolver.is_none() {
                    notes.push(format!(
                        "{dp}: not used: without certResolver no certificate is ordered for it"
                    ));
                }
            }
            if let Some(r) = resolver {
                domains.push((r, names));
            }
            t.rest(notes);
        }
        for k in ["encodequerysemicolons", "maxheaderbytes"] {
            if let Some((kp, _)) = h.take(k) {
                notes.push(format!(
                    "{kp}: not supported (lb's bounds on a request's head apply)"
                ));
            }
        }
        if let Some((sp, v)) = h.take("sanitizepath") {
            if scalar(v, &sp)?.eq_ignore_ascii_case("false") {
                notes.push(format!(
                    "{sp}: false is not honoured: lb always normalises the path it routes on and forwards"
                ));
            }
        }
        h.rest(notes);
    }
    if let Some((hp, v)) = e.take("http2") {
        let mut h = Obj::new(v, &hp)?;
        if let Some(n) = h.number("maxconcurrentstreams")? {
            if !(n.fract() == 0.0 && (1.0..=u32::MAX as f64).contains(&n)) {
                return fail(
                    &format!("{hp}.maxConcurrentStreams"),
                    "expected a positive integer",
                );
            }
            spec.limits.h2_max_streams = n as u32;
        }
        h.rest(notes);
    }
    if let Some((fp, v)) = e.take("forwardedheaders") {
        let mut f = Obj::new(v, &fp)?;
        for (j, t) in f
            .strings("trustedips")?
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let net = crate::model::ip_net(t).ok_or_else(|| super::TraefikError {
                path: format!("{fp}.trustedIPs[{j}]"),
                reason: format!("{t:?} is not an address or CIDR"),
                item: None,
            })?;
            spec.trusted_ips.push(net);
        }
        if f.bool("insecure")? == Some(true) {
            spec.trusted_ips = every_address();
        }
        f.rest(notes);
    }
    if let Some((pp, v)) = e.take("proxyprotocol") {
        let mut x = Obj::new(v, &pp)?;
        let mut nets = Vec::new();
        for (j, t) in x
            .strings("trustedips")?
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            nets.push(crate::model::ip_net(t).ok_or_else(|| super::TraefikError {
                path: format!("{pp}.trustedIPs[{j}]"),
                reason: format!("{t:?} is not an address or CIDR"),
                item: None,
            })?);
        }
        if x.bool("insecure")? == Some(true) {
            nets = every_address();
        }
        x.rest(notes);
        spec.proxy_protocol = Some(nets);
    }
    if let Some((tp, v)) = e.take("transport") {
        let mut t = Obj::new(v, &tp)?;
        if let Some((rp, v)) = t.take("respondingtimeouts") {
            let mut r = Obj::new(v, &rp)?;
            let bounded = |d: Option<Duration>, key: &str, notes: &mut Vec<String>| match d {
                Some(d) if d.is_zero() => {
                    notes.push(format!(
                        "{rp}.{key}: 0 (no limit) is not honoured: lb keeps its bound"
                    ));
                    None
                }
                other => other,
            };
            if let Some(d) = bounded(r.duration("readtimeout")?, "readTimeout", notes) {
                spec.limits.header_timeout = d;
                spec.limits.body_timeout = d;
            }
            if let Some(d) = bounded(r.duration("writetimeout")?, "writeTimeout", notes) {
                spec.limits.write_timeout = d;
            }
            if let Some(d) = bounded(r.duration("idletimeout")?, "idleTimeout", notes) {
                spec.limits.idle_timeout = d;
            }
            r.rest(notes);
        }
        if let Some((lp, _)) = t.take("lifecycle") {
            notes.push(format!(
                "{lp}: not supported: lb stops accepting at once and gives requests in progress 30 s"
            ));
        }
        t.rest(notes);
    }
    for k in ["reuseport", "allowacmebypass"] {
        if let Some((kp, _)) = e.take(k) {
            notes.push(format!("{kp}: not supported"));
        }
    }
    if let Some((up, _)) = e.take("udp") {
        notes.push(format!("{up}: not used (a TCP entry point)"));
    }
    e.rest(notes);
    Ok(Some((spec, redirect, domains)))
}

/// What `insecure: true` trusts: everyone.
fn every_address() -> Vec<ipnet::IpNet> {
    ["0.0.0.0/0", "::/0"]
        .iter()
        .filter_map(|n| crate::model::ip_net(n))
        .collect()
}

/// An entry point's `address` host part as a listening address: `""` is every address (IPv6
/// and IPv4 where the host has IPv6), a literal is itself, `localhost` is loopback.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?}: expected [host]:port, such as \":80\""))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host {
        "" => {
            // Go's ":80" listens on every address of both families.
            let v6 = std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).is_ok();
            if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }
        }
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => match h.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => (h, port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| a.ip())
                .ok_or_else(|| format!("{h:?} is not an address of this host"))?,
        },
    };
    Ok(SocketAddr::new(ip, port))
}

/// The router (and its middleware) that sends every request of entry point `from` to `to`:
/// what Traefik makes of `http.redirections.entryPoint`.
fn redirection(i: &mut Install, from: &str, path: &str, r: Redirect) -> R<()> {
    let at = format!("{path}.http.redirections.entryPoint.to");
    let port = match r.to.trim_start_matches(':').parse::<u16>() {
        Ok(p) => p,
        Err(_) => match i.entrypoints.iter().find(|e| e.name == r.to) {
            Some(e) => e.address.port(),
            None => {
                return fail(
                    &at,
                    format!("{:?}: neither an entry point of this file nor a port", r.to),
                )
            }
        },
    };
    let scheme = r.scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return fail(
            &format!("{path}.http.redirections.entryPoint.scheme"),
            format!("{:?}: expected https or http", r.scheme),
        );
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    let name = format!("{from}-to-{}", r.to.trim_start_matches(':'));
    super::check_name(&name, &at)?;
    i.middlewares.push((
        name.clone(),
        MiddlewareConfig::RedirectScheme(RedirectSchemeConfig {
            scheme,
            permanent: r.permanent,
            port: (port != default_port).then_some(port),
        }),
    ));
    let rule_text = "PathPrefix(`/`)".to_string();
    let rule = Rule::parse(&rule_text).or_else(|e| fail(&at, e.to_string()))?;
    i.routers.push(RouterSpec {
        name: name.clone(),
        entrypoints: vec![from.to_string()],
        rule,
        rule_text,
        priority: Some(r.priority),
        // Never reached: the redirect answers first.
        service: name.clone(),
        middlewares: vec![name],
        // Traefik's redirecting router is a plain one: TLS on this port goes to TLS routers.
        tls: Some(false),
        tls_options: None,
    });
    Ok(())
}

fn providers(
    i: &mut Install,
    v: &Value,
    path: &str,
    base: &Path,
    throttle: Option<Duration>,
) -> R<()> {
    let mut p = Obj::new(v, path)?;
    // A provider's own throttle wins over the top-level one.
    let throttle = p.duration("providersthrottleduration")?.or(throttle);
    if let Some((fp, v)) = p.take("file") {
        let mut f = Obj::new(v, &fp)?;
        let file = f.string("filename")?;
        let dir = f.string("directory")?;
        let target = match (file, dir) {
            (Some(_), Some(_)) => {
                return fail(
                    &fp,
                    "filename and directory cannot both be set (as in Traefik)",
                )
            }
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => return fail(&fp, "filename or directory is required"),
        };
        if f.bool("watch")? == Some(false) {
            i.notes.push(format!(
                "{fp}.watch: false is not honoured: lb always follows its files"
            ));
        }
        if let Some((kp, _)) = f.take("debugloggeneratedtemplate") {
            i.notes
                .push(format!("{kp}: not supported (lb reads no templates)"));
        }
        f.rest(&mut i.notes);
        i.files.push(FileProviderSpec {
            path: base.join(target),
            debounce: throttle.unwrap_or(Duration::from_millis(200)),
        });
    }
    if let Some((rp, v)) = p.take("redis") {
        let mut r = Obj::new(v, &rp)?;
        let endpoints = r
            .strings("endpoints")?
            .unwrap_or_else(|| vec!["127.0.0.1:6379".into()]);
        let root = r.string("rootkey")?.unwrap_or_else(|| "traefik".into());
        let user = r.string("username")?;
        let password = r.string("password")?;
        let db = match r.number("db")? {
            Some(n) if n.fract() == 0.0 && (0.0..=1e6).contains(&n) => n as u64,
            Some(_) => return fail(&format!("{rp}.db"), "expected a database number"),
            None => 0,
        };
        let mut usable = true;
        for k in ["tls", "sentinel"] {
            if let Some((kp, _)) = r.take(k) {
                left_out(
                    &mut i.notes,
                    &rp,
                    &format!("{kp} is not supported: lb reaches Redis in plain TCP only"),
                );
                usable = false;
            }
        }
        r.rest(&mut i.notes);
        let Some(first) = endpoints.first() else {
            return fail(&format!("{rp}.endpoints"), "empty");
        };
        if endpoints.len() > 1 {
            i.notes.push(format!(
                "{rp}.endpoints: only the first ({first}) is used (lb speaks to one Redis)"
            ));
        }
        if first.contains('/') || first.contains('@') || !first.contains(':') {
            return fail(
                &format!("{rp}.endpoints[0]"),
                format!("{first:?}: expected host:port"),
            );
        }
        let auth = match (user, password) {
            (None, None) => String::new(),
            (u, p) => format!(
                "{}:{}@",
                crate::model::escape_unreserved(u.as_deref().unwrap_or("")),
                crate::model::escape_unreserved(p.as_deref().unwrap_or(""))
            ),
        };
        if usable {
            i.redis = Some(RedisSpec {
                url: format!("redis://{auth}{first}/{db}"),
                prefix: "lb/".into(),
                resync: Duration::from_secs(30),
                traefik_root: Some(root),
                traefik_file_dirs: Vec::new(),
            });
        }
    }
    if let Some((ep, v)) = p.take("etcd") {
        let mut e = Obj::new(v, &ep)?;
        let endpoints = e
            .strings("endpoints")?
            .unwrap_or_else(|| vec!["127.0.0.1:2379".into()]);
        if endpoints.is_empty() {
            return fail(&format!("{ep}.endpoints"), "empty");
        }
        let root = e.string("rootkey")?.unwrap_or_else(|| "traefik".into());
        let auth = match (e.string("username")?, e.string("password")?) {
            (None, None) => None,
            (Some(username), Some(password)) => Some(EtcdAuth { username, password }),
            _ => return fail(&ep, "username and password go together"),
        };
        let mut usable = true;
        let tls = match e.take("tls") {
            None => None,
            Some((tp, v)) => {
                let mut t = Obj::new(v, &tp)?;
                let ca = t.string("ca")?;
                let cert = t.string("cert")?;
                let key = t.string("key")?;
                if t.bool("insecureskipverify")? == Some(true) {
                    left_out(
                        &mut i.notes,
                        &ep,
                        &format!("{tp}.insecureSkipVerify: lb always verifies etcd's certificate"),
                    );
                    usable = false;
                }
                t.rest(&mut i.notes);
                match ca {
                    Some(ca) => Some(EtcdTls {
                        ca: base.join(ca),
                        cert: cert.map(|c| base.join(c)),
                        key: key.map(|k| base.join(k)),
                        server_name: None,
                    }),
                    None => {
                        left_out(
                            &mut i.notes,
                            &ep,
                            &format!("{tp}: lb needs tls.ca to verify etcd's certificate"),
                        );
                        usable = false;
                        None
                    }
                }
            }
        };
        e.rest(&mut i.notes);
        // Traefik's endpoints are host:port; lb's carry the scheme TLS gives them. One that
        // says https:// without tls settings is not made plain.
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut urls = Vec::new();
        if tls.is_none() && usable && endpoints.iter().any(|x| x.starts_with("https://")) {
            left_out(
                &mut i.notes,
                &ep,
                "an https:// endpoint needs tls.ca (the CA lb verifies etcd's certificate against)",
            );
            usable = false;
        }
        for (j, x) in endpoints.iter().enumerate() {
            let bare = x
                .strip_prefix("http://")
                .or_else(|| x.strip_prefix("https://"))
                .unwrap_or(x);
            if bare.is_empty() || bare.contains('/') || !bare.contains(':') {
                return fail(
                    &format!("{ep}.endpoints[{j}]"),
                    format!("{x:?}: expected host:port"),
                );
            }
            urls.push(format!("{scheme}://{bare}"));
        }
        if usable {
            i.etcd = Some(EtcdSpec {
                endpoints: urls,
                prefix: "lb/".into(),
                traefik_root: Some(root),
                traefik_file_dirs: Vec::new(),
                auth,
                tls,
            });
        }
    }
    for (_, name, _) in &p.entries {
        left_out(
            &mut i.notes,
            &p.sub(name),
            "lb's providers are file, redis and etcd",
        );
    }
    Ok(())
}

/// One ACME resolver becomes lb's `[acme]`: it orders the names the entry points'
/// `http.tls.domains` give it, and those of the routers that name it (`tls.certResolver`:
/// their `tls.domains`, else their rule's hosts).
fn resolvers(
    i: &mut Install,
    v: &Value,
    path: &str,
    base: &Path,
    domains: &[(String, String, Vec<String>)],
) -> R<()> {
    let mut all = Obj::new(v, path)?;
    let names: Vec<String> = all.entries.iter().map(|(_, n, _)| n.to_string()).collect();
    for name in names {
        let rp = all.sub(&name);
        let Some((_, v)) = all.take(&name.to_ascii_lowercase()) else {
            continue;
        };
        let mut r = Obj::new(v, &rp)?;
        let Some((ap, acme)) = r.take("acme") else {
            r.rest(&mut i.notes);
            continue;
        };
        r.rest(&mut i.notes);
        if i.acme.is_some() {
            left_out(
                &mut i.notes,
                &rp,
                "lb has one ACME resolver; the first is used",
            );
            continue;
        }
        let mut a = Obj::new(acme, &ap)?;
        let directory = a.string("caserver")?.unwrap_or_else(|| LETS_ENCRYPT.into());
        if !directory.starts_with("https://") {
            return fail(
                &format!("{ap}.caServer"),
                format!("{directory:?}: expected an https:// URL"),
            );
        }
        let email = a.string("email")?.filter(|e| !e.is_empty());
        let ca_file = match a.strings("cacertificates")? {
            Some(list) => {
                if list.len() > 1 {
                    i.notes.push(format!(
                        "{ap}.caCertificates: only the first is trusted for the directory"
                    ));
                }
                list.first().map(|f| base.join(f))
            }
            None => None,
        };
        let http = a.take("httpchallenge");
        let tls = a.take("tlschallenge");
        if let Some((dp, _)) = a.take("dnschallenge") {
            left_out(
                &mut i.notes,
                &rp,
                &format!("{dp}: lb answers http-01 and tls-alpn-01 only"),
            );
            continue;
        }
        let challenge = match (http, tls) {
            (Some((hp, v)), _) => {
                let mut h = Obj::new(v, &hp)?;
                let ep = h.string("entrypoint")?;
                h.rest(&mut i.notes);
                let plain = i
                    .entrypoints
                    .iter()
                    .find(|e| Some(&e.name) == ep.as_ref())
                    .is_some_and(|e| !e.tls || e.also_plain);
                if !plain {
                    return fail(
                        &format!("{hp}.entryPoint"),
                        "must name an entry point of this file that takes plain HTTP (port 80)",
                    );
                }
                ChallengeKind::Http01
            }
            (None, Some(_)) => {
                if !i.entrypoints.iter().any(|e| e.tls) {
                    return fail(
                        &ap,
                        "tlsChallenge needs an entry point that takes TLS (port 443)",
                    );
                }
                ChallengeKind::TlsAlpn01
            }
            (None, None) => {
                left_out(
                    &mut i.notes,
                    &rp,
                    "it names no challenge (httpChallenge or tlsChallenge)",
                );
                continue;
            }
        };
        for k in [
            "storage",
            "keytype",
            "certificatesduration",
            "preferredchain",
        ] {
            if let Some((kp, _)) = a.take(k) {
                i.notes.push(format!(
                    "{kp}: not supported: lb keeps its ACME account and certificates under its state directory (P-256 keys, the CA's chain and lifetime)"
                ));
            }
        }
        a.rest(&mut i.notes);
        let mut names = Vec::new();
        for (resolver, at, list) in domains {
            if !resolver.eq_ignore_ascii_case(&name) {
                continue;
            }
            for d in list {
                let n = crate::sources::config::acme_name(d)
                    .or_else(|why| fail(at, format!("{d:?}: {why}")))?;
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        i.acme = Some(AcmeSpec {
            resolver: Some(name.clone()),
            directory,
            email,
            challenge,
            domains: names,
            ca_file,
            renew_before: Duration::from_secs(30 * 86_400),
        });
    }
    Ok(())
}

fn access_log(
    v: &Value,
    path: &str,
    notes: &mut Vec<String>,
) -> R<crate::observe::access_log::AccessLogSpec> {
    use crate::observe::access_log::{AccessLogSpec, Format, StatusRange};
    let mut a = Obj::new(v, path)?;
    let file = a.string("filepath")?.filter(|p| !p.is_empty());
    // Traefik's default is common.
    let format = match a.string("format")?.as_deref() {
        None | Some("common") => Format::Common,
        Some("json") => Format::Json,
        Some(other) => {
            return fail(
                &format!("{path}.format"),
                format!("{other:?}: expected common or json"),
            )
        }
    };
    let buffer = match a.number("bufferingsize")? {
        Some(n) if n.fract() == 0.0 && (1.0..=1_048_576.0).contains(&n) => n as usize,
        Some(0.0) => 4096,
        Some(_) => return fail(&format!("{path}.bufferingSize"), "must be 0..=1048576"),
        None => 4096,
    };
    let mut status = Vec::new();
    if let Some((fp, v)) = a.take("filters") {
        let mut f = Obj::new(v, &fp)?;
        if let Some((sp, v)) = f.take("statuscodes") {
            for (j, s) in list(v, &sp)?.iter().enumerate() {
                status.push(
                    s.parse::<StatusRange>()
                        .or_else(|e| fail(&format!("{sp}[{j}]"), e.to_string()))?,
                );
            }
        }
        f.rest(notes);
    }
    a.rest(notes);
    Ok(AccessLogSpec {
        path: file.map(PathBuf::from),
        format,
        buffer,
        status,
        sample: 1.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// lb's defaults, as `lb run --traefik` starts from.
    fn defaults() -> Config {
        crate::sources::config::parse(Path::new("(lb defaults)"), "").expect("defaults")
    }

    fn read_as(name: &str, text: &str) -> Result<Config, ConfigError> {
        let mut cfg = defaults();
        apply(&mut cfg, Path::new(name), text).map(|()| cfg)
    }

    // The usual setup of Traefik's documentation: port 80 redirected to 443, a resolver, a
    // directory of dynamic files, Redis, the API (install-configuration/entrypoints.md,
    // providers/file.md, providers/redis.md, https/acme.md, operations/api.md).
    const YAML: &str = r#"
entryPoints:
  web:
    address: ":8080"
    http:
      redirections:
        entryPoint:
          to: websecure
          scheme: https
  websecure:
    address: "127.0.0.1:8443"
    asDefault: true
    http:
      tls:
        certResolver: le
        domains:
          - main: example.test
            sans: [www.example.test]
    forwardedHeaders:
      trustedIPs: ["10.0.0.0/8", "192.0.2.1"]
    transport:
      respondingTimeouts:
        readTimeout: 10s
        idleTimeout: 90s
    http2:
      maxConcurrentStreams: 50
providers:
  file:
    directory: dynamic
  redis:
    endpoints: ["10.0.0.5:6379"]
    rootKey: tr
    password: "p@ss word"
    db: 2
certificatesResolvers:
  le:
    acme:
      email: ops@example.test
      caServer: https://pebble.test:14000/dir
      storage: acme.json
      httpChallenge:
        entryPoint: web
api:
  dashboard: true
  insecure: true
log:
  level: DEBUG
"#;

    const TOML: &str = r#"
[entryPoints.web]
address = ":8080"
[entryPoints.web.http.redirections.entryPoint]
to = "websecure"
scheme = "https"

[entryPoints.websecure]
address = "127.0.0.1:8443"
asDefault = true
[entryPoints.websecure.http.tls]
certResolver = "le"
[[entryPoints.websecure.http.tls.domains]]
main = "example.test"
sans = ["www.example.test"]
[entryPoints.websecure.forwardedHeaders]
trustedIPs = ["10.0.0.0/8", "192.0.2.1"]
[entryPoints.websecure.transport.respondingTimeouts]
readTimeout = "10s"
idleTimeout = "90s"
[entryPoints.websecure.http2]
maxConcurrentStreams = 50

[providers.file]
directory = "dynamic"
[providers.redis]
endpoints = ["10.0.0.5:6379"]
rootKey = "tr"
password = "p@ss word"
db = 2

[certificatesResolvers.le.acme]
email = "ops@example.test"
caServer = "https://pebble.test:14000/dir"
storage = "acme.json"
[certificatesResolvers.le.acme.httpChallenge]
entryPoint = "web"

[api]
dashboard = true
insecure = true
[log]
level = "DEBUG"
"#;

    #[test]
    fn the_usual_install_configuration_maps_in_yaml_and_toml_alike() {
        let y = read_as("/etc/traefik/traefik.yml", YAML).expect("yaml");
        let t = read_as("/etc/traefik/traefik.toml", TOML).expect("toml");
        let notes = |c: &Config| -> Vec<String> {
            c.notes
                .iter()
                .map(|n| n.split_once(": ").map_or(n.clone(), |x| x.1.to_string()))
                .collect()
        };
        assert_eq!(y.entrypoints, t.entrypoints);
        assert_eq!(y.routers, t.routers);
        assert_eq!(y.middlewares, t.middlewares);
        assert_eq!(y.providers, t.providers);
        assert_eq!(y.acme, t.acme);
        assert_eq!(notes(&y), notes(&t));

        let [web, secure] = &y.entrypoints[..] else {
            panic!("{:?}", y.entrypoints)
        };
        // Traefik's entry point takes TLS and plain HTTP; `http.tls` makes it TLS only.
        assert!(web.tls && web.also_plain && !web.as_default);
        assert_eq!(web.address.port(), 8080);
        assert!(web.address.ip().is_unspecified());
        assert!(secure.tls && !secure.also_plain && secure.as_default);
        assert_eq!(secure.address, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(secure.trusted_ips.len(), 2);
        assert_eq!(secure.limits.header_timeout, Duration::from_secs(10));
        assert_eq!(secure.limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(secure.limits.h2_max_streams, 50);
        // Traefik's defaults where nothing is said.
        assert_eq!(web.limits.header_timeout, Duration::from_secs(60));
        assert_eq!(web.limits.idle_timeout, Duration::from_secs(180));
        // The redirection: a router above every other on `web`, to websecure's port.
        let [r] = &y.routers[..] else {
            panic!("{:?}", y.routers)
        };
        assert_eq!(
            (r.name.as_str(), &r.entrypoints[..], r.priority),
            (
                "web-to-websecure",
                &["web".to_string()][..],
                Some(i64::MAX - 1)
            )
        );
        assert_eq!(
            y.middlewares,
            vec![(
                "web-to-websecure".to_string(),
                MiddlewareConfig::RedirectScheme(RedirectSchemeConfig {
                    scheme: "https".into(),
                    permanent: true,
                    port: Some(8443),
                })
            )]
        );
        assert_eq!(
            y.providers.files,
            vec![FileProviderSpec {
                path: PathBuf::from("/etc/traefik/dynamic"),
                debounce: Duration::from_millis(200),
            }]
        );
        let redis = y.providers.redis.as_ref().expect("redis");
        assert_eq!(redis.url, "redis://:p%40ss%20word@10.0.0.5:6379/2");
        assert_eq!(redis.traefik_root.as_deref(), Some("tr"));
        let acme = y.acme.as_ref().expect("the resolver");
        assert_eq!(acme.directory, "https://pebble.test:14000/dir");
        assert_eq!(acme.challenge, ChallengeKind::Http01);
        assert_eq!(acme.domains, ["example.test", "www.example.test"]);
        assert!(y.tls_dev_ca, "Traefik's default certificate");
        let n = y.notes.join("\n");
        for said in [
            "/etc/traefik/traefik.yml: api.insecure: refused",
            "certificatesResolvers.le.acme.storage: not supported",
            "log: not supported",
        ] {
            assert!(n.contains(said), "{said:?} not in {n}");
        }
        assert!(!n.contains("left out"), "{n}");
    }

    #[test]
    fn what_lb_cannot_honour_is_left_out_by_name() {
        let c = read_as(
            "t.yml",
            "entryPoints:\n  pp:\n    address: \":81\"\n    proxyProtocol:\n      trustedIPs: [\"10.0.0.1\"]\n  \
             mw:\n    address: \":82\"\n    http:\n      middlewares: [auth@file]\n  \
             dns:\n    address: \":53/udp\"\n  ok:\n    address: \":83\"\n\
             providers:\n  docker: {}\n  etcd:\n    endpoints: [\"10.0.0.9:2379\"]\n    tls:\n      insecureSkipVerify: true\n      ca: /x.pem\n\
             certificatesResolvers:\n  dns:\n    acme:\n      dnsChallenge:\n        provider: x\n",
        )
        .expect("loads");
        assert_eq!(
            c.entrypoints
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["ok", "pp"]
        );
        assert_eq!(c.entrypoints[0].proxy_protocol, None);
        assert_eq!(
            c.entrypoints[1].proxy_protocol,
            Some(vec!["10.0.0.1/32".parse().unwrap()])
        );
        assert!(c.providers.etcd.is_none() && c.acme.is_none());
        let n = c.notes.join("\n");
        for said in [
            "entryPoints.mw: left out: entryPoints.mw.http.middlewares",
            "entryPoints.dns: left out: UDP entry points are not supported",
            "providers.docker: left out",
            "providers.etcd: left out: providers.etcd.tls.insecureSkipVerify",
            "certificatesResolvers.dns: left out: certificatesResolvers.dns.acme.dnsChallenge",
        ] {
            assert!(n.contains(said), "{said:?} not in {n}");
        }
    }

    #[test]
    fn a_bad_value_names_file_line_and_key() {
        let e = read_as(
            "t.yml",
            "entryPoints:\n  web:\n    address: \":80\"\n  bad:\n    address: \"nowhere\"\n",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (5, "entryPoints.bad.address"),
            "{e}"
        );
        let e = read_as(
            "t.yml",
            "entryPoints:\n  web:\n    address: \":80\"\n    http:\n      redirections:\n        entryPoint:\n          to: nope\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "entryPoints.web.http.redirections.entryPoint.to");
        assert!(e.to_string().starts_with("t.yml:7: "), "{e}");
        let e = read_as("t.yml", "entryPoints:\n  web:\n    address: [\n").unwrap_err();
        assert!(e.line >= 3 && e.field.is_empty(), "{e}");
        let e = read_as("t.toml", "[entryPoints.web]\naddress = \n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = read_as(
            "t.yml",
            "entryPoints:\n  web:\n    address: \":80\"\ncertificatesResolvers:\n  le:\n    acme:\n      httpChallenge:\n        entryPoint: websecure\n",
        )
        .unwrap_err();
        assert_eq!(
            e.field,
            "certificatesResolvers.le.acme.httpChallenge.entryPoint"
        );
    }

    #[test]
    fn a_default_entry_point_is_never_left_out_quietly() {
        // Left out, its routers would go to `web`, without its middlewares.
        let e = read_as(
            "t.yml",
            "entryPoints:\n  web:\n    address: \":80\"\n  secure:\n    address: \":443\"\n    asDefault: true\n    \
             http:\n      middlewares: [auth@file]\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "entryPoints.secure", "{e}");
        assert!(e.reason.contains("asDefault"), "{e}");
        // An https:// etcd without tls settings is not spoken to in plain HTTP.
        let c = read_as(
            "t.yml",
            "providers:\n  etcd:\n    endpoints: [\"https://10.0.0.9:2379\"]\n    username: u\n    password: p\n",
        )
        .expect("loads");
        assert!(c.providers.etcd.is_none());
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("providers.etcd: left out: an https:// endpoint needs tls.ca")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn beside_lb_toml_a_clash_is_an_error() {
        let mut cfg = crate::sources::config::parse(
            Path::new("lb.toml"),
            "[[entrypoint]]\nname = \"web\"\naddress = \"127.0.0.1:80\"\n",
        )
        .expect("lb.toml");
        let e = apply(
            &mut cfg,
            Path::new("t.yml"),
            "entryPoints:\n  web:\n    address: \":80\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field, "entryPoints.web");
        assert!(e.reason.contains("lb.toml has an entry point of this name"));
        apply(
            &mut cfg,
            Path::new("t.yml"),
            "entryPoints:\n  web2:\n    address: \":81\"\n",
        )
        .expect("another name");
        assert_eq!(cfg.entrypoints.len(), 2);
    }
}
