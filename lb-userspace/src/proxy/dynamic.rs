//! Routing that arrives from providers (a Traefik dynamic configuration in a watched file, or in
//! Redis / etcd under Traefik's key layout) rather than from lb.toml, and how it joins lb.toml's.
//!
//! Each provider's part is kept whole and replaced whole, like registry snapshots: a provider
//! that stops saying something takes it back. On a name clash lb.toml wins, then providers in
//! name order; the loser is reported, never silently merged field by field.

use std::{collections::HashMap, sync::Arc};

use super::{middleware::Middleware, L7Config};
use crate::model::l7::Dynamic;

/// A provider's part with its middlewares built.
pub struct Built {
    pub dynamic: Dynamic,
    middlewares: HashMap<String, Arc<dyn Middleware>>,
    /// What could not be used, said again when the provider repeats itself.
    pub problems: Vec<String>,
}

impl Built {
    /// Builds the middlewares; one that does not build is left out (and its routers with it),
    /// and said in the returned problems. A middleware configured as in `previous` is kept, not
    /// rebuilt: its state (buckets, a breaker's window, requests in flight) carries on.
    pub fn new(dynamic: Dynamic, previous: Option<&Built>) -> (Built, Vec<String>) {
        let mut problems = Vec::new();
        let mut middlewares = HashMap::new();
        for (name, cfg) in &dynamic.middlewares {
            let kept = previous.and_then(|p| {
                let same = p
                    .dynamic
                    .middlewares
                    .iter()
                    .any(|(n, c)| n == name && c == cfg);
                same.then(|| p.middlewares.get(name).cloned()).flatten()
            });
            if let Some(m) = kept {
                middlewares.insert(name.clone(), m);
                continue;
            }
            match cfg.build_named(name) {
                Ok(m) => {
                    middlewares.insert(name.clone(), m);
                }
                Err(e) => problems.push(format!("middleware {name}: {e}")),
            }
        }
        let mut dynamic = dynamic;
        dynamic.routers.retain(|r| {
            // Another provider's (`name@provider`) are looked for when the parts are merged.
            let missing: Vec<&String> = r
                .middlewares
                .iter()
                .filter(|m| !m.contains('@') && !middlewares.contains_key(*m))
                .collect();
            if missing.is_empty() {
                return true;
            }
            problems.push(format!(
                "router {}: left out, its middlewares {missing:?} are not usable",
                r.name
            ));
            false
        });
        (
            Built {
                dynamic,
                middlewares,
                problems: problems.clone(),
            },
            problems,
        )
    }
}

/// lb.toml's configuration with every provider's part added; clashes reported.
pub fn merge<'a>(
    base: &L7Config,
    parts: impl IntoIterator<Item = (&'a String, &'a Built)>,
) -> (L7Config, Vec<String>) {
    let mut out = base.clone();
    let mut problems = Vec::new();
    let parts: Vec<(&String, &Built)> = parts.into_iter().collect();
    let keys: Vec<&str> = parts.iter().map(|(k, _)| k.as_str()).collect();
    // Whose each router is: what is said of it goes to its provider's status.
    let mut owner: HashMap<String, String> = HashMap::new();
    let mut tcp_owner: HashMap<String, String> = HashMap::new();
    // Providers whose `default` options lost to another's: their routers would be served under
    // options they did not define.
    let mut lost_default: Vec<String> = Vec::new();
    for (provider, part) in parts {
        let qualified = |name: &str| qualified(name, provider, &keys);
        for r in &part.dynamic.routers {
            if out.routers.iter().any(|o| o.name == r.name) {
                problems.push(format!("{provider}: router {} is defined already", r.name));
                continue;
            }
            // A router's middlewares are its own provider's (a name in lb.toml may mean
            // something else): they go in under a provider-qualified name.
            let mut r = r.clone();
            let resolved: Result<Vec<String>, String> =
                r.middlewares.iter().map(|m| qualified(m)).collect();
            match resolved {
                Ok(list) => r.middlewares = list,
                Err(why) => {
                    problems.push(format!("{provider}: router {}: left out: {why}", r.name));
                    continue;
                }
            }
            match r.tls_options.as_deref().map(qualified).transpose() {
                Ok(o) => r.tls_options = o,
                Err(why) => {
                    problems.push(format!("{provider}: router {}: left out: {why}", r.name));
                    continue;
                }
            }
            owner.insert(r.name.clone(), provider.clone());
            out.routers.push(r);
        }
        for r in &part.dynamic.tcp_routers {
            if out.tcp_routers.iter().any(|o| o.name == r.name) {
                problems.push(format!(
                    "{provider}: TCP router {} is defined already",
                    r.name
                ));
                continue;
            }
            let mut r = r.clone();
            match r.tls_options.as_deref().map(qualified).transpose() {
                Ok(o) => r.tls_options = o,
                Err(why) => {
                    problems.push(format!(
                        "{provider}: TCP router {}: left out: {why}",
                        r.name
                    ));
                    continue;
                }
            }
            tcp_owner.insert(r.name.clone(), provider.clone());
            out.tcp_routers.push(r);
        }
        for (name, o) in &part.dynamic.tls_options {
            let name = match name.as_str() {
                crate::model::l7::DEFAULT_TLS_OPTIONS => name.clone(),
                _ => format!("{name}@{provider}"),
            };
            match out.tls_options.get(&name) {
                Some(first) if **first == **o => {}
                Some(_) => {
                    problems.push(format!("{provider}: tls.options {name} is defined already"));
                    if name == crate::model::l7::DEFAULT_TLS_OPTIONS {
                        lost_default.push(provider.clone());
                    }
                }
                None => {
                    out.tls_options.insert(name, o.clone());
                }
            }
        }
        if let Some(why) = &part.dynamic.tls_default_broken {
            out.tls_default_broken
                .get_or_insert_with(|| format!("{provider}: {why}"));
        }
        for (name, spec) in &part.dynamic.services {
            if out.specs.contains_key(name) {
                problems.push(format!("{provider}: service {name} is defined already"));
                continue;
            }
            out.specs.insert(name.clone(), spec.clone());
        }
        for (name, m) in &part.middlewares {
            out.middlewares
                .insert(format!("{name}@{provider}"), m.clone());
        }
    }
    // A middleware another provider was to define, and does not.
    let defined = &out.middlewares;
    let mut undefined = Vec::new();
    for r in &out.routers {
        let by_default = r
            .tls_options
            .as_deref()
            .is_none_or(|o| o == crate::model::l7::DEFAULT_TLS_OPTIONS);
        let lost = owner.get(&r.name).is_some_and(|p| lost_default.contains(p));
        if by_default && lost && r.tls != Some(false) {
            undefined.push((
                r.name.clone(),
                "its provider's tls.options default are not the ones in force (another provider's are)".to_string(),
            ));
        }
    }
    // (lb.toml's own routers name lb.toml's middlewares, which its loader checked.)
    for r in out.routers.iter().filter(|r| owner.contains_key(&r.name)) {
        let missing: Vec<&str> = r
            .middlewares
            .iter()
            .filter(|m| !defined.contains_key(*m))
            .map(|m| m.as_str())
            .collect();
        if !missing.is_empty() {
            undefined.push((
                r.name.clone(),
                format!("its middlewares {missing:?} are not defined"),
            ));
        }
    }
    for (router, why) in undefined.into_iter().chain(unservable_tls(&out)) {
        let whose = owner.get(&router).map_or("lb.toml", |p| p.as_str());
        problems.push(format!("{whose}: router {router}: left out: {why}"));
        out.routers.retain(|r| r.name != router);
    }
    out.tcp_routers.retain(|r| {
        let undefined = r.tls == crate::model::l7::TlsMode::Terminate
            && r.tls_options.as_ref().is_some_and(|o| {
                !out.tls_options.contains_key(o) && o != crate::model::l7::DEFAULT_TLS_OPTIONS
            });
        if undefined {
            problems.push(format!(
                "{}: TCP router {}: left out: it names tls.options {:?}, which are not defined",
                tcp_owner.get(&r.name).map_or("lb.toml", |p| p.as_str()),
                r.name,
                r.tls_options.as_deref().unwrap_or_default()
            ));
        }
        !undefined
    });
    (out, problems)
}

/// A name a provider's router gives (a middleware, TLS options) as the merged configuration
/// knows it: the provider's own (`name@<provider key>`), or with Traefik's `name@file` /
/// `name@redis` / `name@etcd`, that provider's, when exactly one of lb's providers is of that
/// kind. TLS options `default` are everyone's (there is one fallback).
fn qualified(name: &str, provider: &str, keys: &[&str]) -> Result<String, String> {
    if name == crate::model::l7::DEFAULT_TLS_OPTIONS {
        return Ok(name.to_string());
    }
    let Some((local, kind)) = name.split_once('@') else {
        return Ok(format!("{name}@{provider}"));
    };
    if local == crate::model::l7::DEFAULT_TLS_OPTIONS {
        return Ok(local.to_string());
    }
    // A key is `file:<path>`, `redis:traefik`, `etcd:traefik`: its kind comes first.
    let of_kind: Vec<&&str> = keys
        .iter()
        .filter(|k| k.split(':').next() == Some(kind))
        .collect();
    match &of_kind[..] {
        [one] => Ok(format!("{local}@{one}")),
        [] => Err(format!(
            "{name:?} names provider {kind:?}, which lb does not run"
        )),
        _ => Err(format!(
            "{name:?} names provider {kind:?}, of which lb runs several ({})",
            of_kind
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Routers that could never be answered under the TLS options they name, and why: options that
/// are not defined, or that no handshake would choose (the client's SNI chooses them, so the
/// rule must name a host, and the routers of one host must agree). Left out and said, rather
/// than served under other options (which Traefik does, with `default`).
fn unservable_tls(conf: &L7Config) -> Vec<(String, String)> {
    use crate::model::l7::{ClientAuth, DEFAULT_TLS_OPTIONS};
    let mut out = Vec::new();
    let mut claims: HashMap<(String, String), Vec<(&str, &str)>> = HashMap::new();
    let named = |o: &Option<String>| o.as_deref().unwrap_or(DEFAULT_TLS_OPTIONS).to_string();
    // As routes go to entry points (`super::per_entrypoint`): the named ones, else the default
    // ones, else all.
    let defaults = conf.entrypoints.iter().any(|e| e.as_default);
    let eps = |list: &[String]| -> Vec<&crate::model::l7::EntryPointSpec> {
        conf.entrypoints
            .iter()
            .filter(|e| {
                e.tls
                    && (list.contains(&e.name) || (list.is_empty() && (e.as_default || !defaults)))
            })
            .collect()
    };
    for r in &conf.routers {
        let name = named(&r.tls_options);
        let options = conf.tls_options.get(&name);
        // As the provider named them.
        let said = name.split('@').next().unwrap_or(&name).to_string();
        if options.is_none() && name != DEFAULT_TLS_OPTIONS {
            out.push((
                r.name.clone(),
                format!("it names tls.options {said:?}, which are not defined"),
            ));
            continue;
        }
        let hosts = r.rule.hosts();
        if hosts.is_empty() && name != DEFAULT_TLS_OPTIONS {
            out.push((
                r.name.clone(),
                format!("its rule names no Host, so no handshake would be made under its tls.options {said:?} (the client's SNI chooses them)"),
            ));
            continue;
        }
        for ep in eps(&r.entrypoints) {
            if r.tls == Some(false) && ep.also_plain {
                continue;
            }
            if ep.client_ca_file.is_some()
                && options.is_some_and(|o| o.client_auth != ClientAuth::None)
            {
                out.push((
                    r.name.clone(),
                    format!("entry point {} verifies client certificates with its client_ca_file, which its tls.options {said:?} would replace", ep.name),
                ));
            }
            for h in &hosts {
                claims
                    .entry((ep.name.clone(), h.to_ascii_lowercase()))
                    .or_default()
                    .push((
                        &r.name,
                        r.tls_options.as_deref().unwrap_or(DEFAULT_TLS_OPTIONS),
                    ));
            }
        }
    }
    for ((ep, host), routers) in claims {
        let first = routers[0].1;
        if routers.iter().all(|(_, o)| *o == first) {
            continue;
        }
        for (r, o) in &routers {
            if *o != DEFAULT_TLS_OPTIONS {
                let local = |x: &str| x.split('@').next().unwrap_or(x).to_string();
                let others: Vec<String> = routers
                    .iter()
                    .filter(|(_, x)| x != o)
                    .map(|(n, x)| format!("{n} ({})", local(x)))
                    .collect();
                let o = local(o);
                out.push((
                    r.to_string(),
                    format!("on entry point {ep}, host {host} is also served by {} with other tls.options, so its handshakes are made under default, not {o:?}", others.join(", ")),
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{l7::RouterSpec, middleware::MiddlewareConfig, rule::Rule};
    use std::collections::BTreeMap;

    fn router(name: &str, service: &str, mws: &[&str]) -> RouterSpec {
        RouterSpec {
            name: name.into(),
            entrypoints: vec![],
            rule: Rule::parse("PathPrefix(`/`)").unwrap(),
            rule_text: "PathPrefix(`/`)".into(),
            priority: None,
            service: service.into(),
            middlewares: mws.iter().map(|s| s.to_string()).collect(),
            tls: None,
            tls_options: None,
        }
    }

    #[test]
    fn base_wins_clashes_and_middlewares_stay_per_provider() {
        let base = L7Config {
            entrypoints: vec![],
            routers: vec![router("web", "site", &[])],
            specs: HashMap::new(),
            middlewares: HashMap::new(),
            tcp_routers: Vec::new(),
            tls_options: Default::default(),
            tls_default_broken: None,
        };
        let strip = MiddlewareConfig::StripPrefix(crate::model::middleware::StripPrefixConfig {
            prefixes: vec!["/a".into()],
        });
        let bad = MiddlewareConfig::AddPrefix(crate::model::middleware::AddPrefixConfig {
            prefix: "no-slash".into(),
        });
        let (built, problems) = Built::new(
            Dynamic {
                routers: vec![
                    router("web", "other", &[]),
                    router("api", "api", &["strip"]),
                    router("broken", "api", &["bad"]),
                ],
                middlewares: vec![("strip".into(), strip), ("bad".into(), bad)],
                ..Default::default()
            },
            None,
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        // Built again from the same configuration: the middleware (and its state) is kept.
        let (again, _) = Built::new(built.dynamic.clone(), Some(&built));
        assert!(Arc::ptr_eq(
            &again.middlewares["strip"],
            &built.middlewares["strip"]
        ));
        let parts = BTreeMap::from([("file".to_string(), built)]);
        let (merged, problems) = merge(&base, &parts);
        assert_eq!(
            problems,
            vec!["file: router web is defined already".to_string()]
        );
        let names: Vec<(&str, &str)> = merged
            .routers
            .iter()
            .map(|r| (r.name.as_str(), r.service.as_str()))
            .collect();
        assert_eq!(names, vec![("web", "site"), ("api", "api")]);
        assert_eq!(
            merged.routers[1].middlewares,
            vec!["strip@file".to_string()]
        );
        assert!(merged.middlewares.contains_key("strip@file"));
    }

    /// A router whose TLS options no handshake would be made under is left out and said: named
    /// but not defined, on a rule without a host, or on a host whose routers disagree (Traefik
    /// serves those under `default`; lb does not weaken them). A provider's options are its own
    /// (`name@provider`), `default` is everyone's.
    #[test]
    fn routers_whose_tls_options_no_handshake_would_use_are_left_out() {
        use crate::model::l7::{ClientAuth, EntryPointSpec, TlsOptions};
        let ep = |name: &str, ca: bool| EntryPointSpec {
            name: name.into(),
            address: "127.0.0.1:0".parse().unwrap(),
            tls: true,
            client_ca_file: ca.then(|| "/etc/lb/ca.pem".into()),
            trusted_ips: vec![],
            limits: Default::default(),
            also_plain: false,
            as_default: false,
            proxy_protocol: None,
        };
        let base = L7Config {
            entrypoints: vec![ep("websecure", false), ep("internal", true)],
            routers: vec![],
            specs: HashMap::new(),
            middlewares: HashMap::new(),
            tcp_routers: Vec::new(),
            tls_options: Default::default(),
            tls_default_broken: None,
        };
        let with = |name: &str, rule: &str, opts: Option<&str>, eps: &[&str]| {
            let mut r = router(name, "site", &[]);
            r.rule = Rule::parse_traefik(rule).unwrap();
            r.rule_text = rule.into();
            r.tls = Some(true);
            r.tls_options = opts.map(str::to_string);
            r.entrypoints = eps.iter().map(|e| e.to_string()).collect();
            r
        };
        let mtls = TlsOptions {
            client_auth: ClientAuth::RequireAny,
            ..Default::default()
        };
        let (built, _) = Built::new(
            Dynamic {
                routers: vec![
                    with("ok", "Host(`a.test`)", Some("mtls"), &["websecure"]),
                    with("nohost", "PathPrefix(`/x`)", Some("mtls"), &["websecure"]),
                    with("undefined", "Host(`c.test`)", Some("nope"), &["websecure"]),
                    with("contested", "Host(`d.test`)", Some("mtls"), &["websecure"]),
                    with("open", "Host(`d.test`) && Path(`/o`)", None, &["websecure"]),
                    with("replaces", "Host(`e.test`)", Some("mtls"), &["internal"]),
                ],
                tls_options: BTreeMap::from([("mtls".to_string(), Arc::new(mtls))]),
                ..Default::default()
            },
            None,
        );
        let parts = BTreeMap::from([("file".to_string(), built)]);
        let (merged, problems) = merge(&base, &parts);
        let mut kept: Vec<(&str, Option<&str>)> = merged
            .routers
            .iter()
            .map(|r| (r.name.as_str(), r.tls_options.as_deref()))
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            vec![("ok", Some("mtls@file")), ("open", None)],
            "{problems:?}"
        );
        assert!(merged.tls_options.contains_key("mtls@file"));
        let said = problems.join("\n");
        for (router, why) in [
            ("nohost", "names no Host"),
            ("undefined", "\"nope\", which are not defined"),
            ("contested", "host d.test is also served by open"),
            ("replaces", "client_ca_file"),
        ] {
            assert!(
                said.contains(&format!("router {router}: left out")) && said.contains(why),
                "{router}: {said}"
            );
        }
    }

    /// `default` options are everyone's: a provider whose `default` lost to another's (they
    /// differ) has its routers that use `default` left out, not served under the other's.
    #[test]
    fn a_provider_whose_default_options_lost_serves_none_of_its_default_routers() {
        use crate::model::l7::{ClientAuth, TlsOptions};
        let base = L7Config {
            entrypoints: vec![],
            routers: vec![],
            specs: HashMap::new(),
            middlewares: HashMap::new(),
            tcp_routers: Vec::new(),
            tls_options: Default::default(),
            tls_default_broken: None,
        };
        let part = |router_name: &str, auth: ClientAuth| {
            let mut r = router(router_name, "site", &[]);
            r.tls = Some(true);
            Built::new(
                Dynamic {
                    routers: vec![r],
                    tls_options: BTreeMap::from([(
                        "default".to_string(),
                        Arc::new(TlsOptions {
                            client_auth: auth,
                            ..Default::default()
                        }),
                    )]),
                    ..Default::default()
                },
                None,
            )
            .0
        };
        let parts = BTreeMap::from([
            ("etcd:traefik".to_string(), part("loose", ClientAuth::None)),
            (
                "file:/x".to_string(),
                part("strict", ClientAuth::RequireAny),
            ),
        ]);
        let (merged, problems) = merge(&base, &parts);
        let names: Vec<&str> = merged.routers.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["loose"], "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("file:/x: router strict: left out")),
            "{problems:?}"
        );
    }
}
