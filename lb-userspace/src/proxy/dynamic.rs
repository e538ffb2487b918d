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
            let missing: Vec<&String> = r
                .middlewares
                .iter()
                .filter(|m| !middlewares.contains_key(*m))
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
    for (provider, part) in parts {
        for r in &part.dynamic.routers {
            if out.routers.iter().any(|o| o.name == r.name) {
                problems.push(format!("{provider}: router {} is defined already", r.name));
                continue;
            }
            // A router's middlewares are its own provider's (a name in lb.toml may mean
            // something else): they go in under a provider-qualified name.
            let mut r = r.clone();
            r.middlewares = r
                .middlewares
                .iter()
                .map(|m| format!("{m}@{provider}"))
                .collect();
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
            out.tcp_routers.push(r.clone());
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
    (out, problems)
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
}
