//! Services → instances: the one model both tiers are programmed from.
//!
//! Every provider (the config file, watched files, the API store, Redis, etcd) reports a complete
//! snapshot of what it knows; the registry keeps the last good snapshot of each and merges them by
//! service name. A provider that fails keeps its last good snapshot — a broken source never wipes
//! what it, or any other source, provided — and its error is recorded for the API and metrics.

use std::{collections::BTreeMap, time::SystemTime};

use serde::Serialize;

use crate::model::instance::Services;

/// Where a provider stands, for the API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProviderStatus {
    pub services: usize,
    pub instances: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_unix: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub errors: u64,
    /// Routers it brought (a Traefik dynamic configuration).
    #[serde(skip_serializing_if = "is_zero")]
    pub routers: usize,
    /// What it said that lb does not support, by key path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
    /// Items of its routing lb could not use, each kept at its last good version or left out
    /// (the rest of its routing applies), by file, line and key path.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub broken: Vec<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

struct Source {
    /// Precedence when two providers report the same instance: the higher one's fields win.
    rank: u8,
    services: Services,
    status: ProviderStatus,
}

#[derive(Default)]
pub struct Registry {
    sources: BTreeMap<String, Source>,
    /// Bumped on every change of the merged view.
    pub generation: u64,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    fn source(&mut self, provider: &str, rank: u8) -> &mut Source {
        self.sources
            .entry(provider.to_string())
            .or_insert_with(|| Source {
                rank,
                services: Services::new(),
                status: ProviderStatus::default(),
            })
    }

    /// Replaces a provider's snapshot. Returns whether the merged view may have changed.
    pub fn update(
        &mut self,
        provider: &str,
        rank: u8,
        services: Services,
        now: SystemTime,
    ) -> bool {
        let src = self.source(provider, rank);
        src.rank = rank;
        src.status.last_success_unix = Some(unix(now));
        src.status.last_error = None;
        src.status.services = services.len();
        src.status.instances = services.values().map(BTreeMap::len).sum();
        let changed = src.services != services;
        src.services = services;
        if changed {
            self.generation += 1;
        }
        changed
    }

    /// Records what a provider's routing brought and what of it lb could not use.
    pub fn routing(
        &mut self,
        provider: &str,
        rank: u8,
        routers: usize,
        unsupported: Vec<String>,
        broken: Vec<String>,
    ) {
        let src = self.source(provider, rank);
        src.status.routers = routers;
        src.status.unsupported = unsupported;
        src.status.broken = broken;
    }

    /// Records a provider failure; its last good snapshot stays.
    pub fn fail(&mut self, provider: &str, rank: u8, error: String) {
        let src = self.source(provider, rank);
        src.status.last_error = Some(error);
        src.status.errors += 1;
    }

    /// All providers' instances merged by service name; on the same instance the higher-ranked
    /// provider wins (then the later name, so the result never depends on arrival order).
    pub fn merged(&self) -> Services {
        self.merged_without("")
    }

    /// [`Registry::merged`] leaving one provider out.
    pub fn merged_without(&self, provider: &str) -> Services {
        let mut order: Vec<&Source> = self
            .sources
            .iter()
            .filter(|(n, _)| *n != provider)
            .map(|(_, s)| s)
            .collect();
        order.sort_by_key(|s| s.rank);
        let mut out = Services::new();
        for src in order {
            for (svc, instances) in &src.services {
                let dst = out.entry(svc.clone()).or_default();
                for (k, i) in instances {
                    dst.insert(*k, i.clone());
                }
            }
        }
        out
    }

    pub fn status(&self) -> BTreeMap<String, ProviderStatus> {
        self.sources
            .iter()
            .map(|(n, s)| (n.clone(), s.status.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::instance::Instance;

    fn inst(addr: &str, weight: u32) -> Instance {
        Instance {
            address: addr.parse().unwrap(),
            port: 80,
            weight,
            zone: None,
            metadata: BTreeMap::new(),
        }
    }

    fn services(svc: &str, list: &[Instance]) -> Services {
        let mut s = Services::new();
        s.insert(
            svc.into(),
            list.iter().map(|i| (i.key(), i.clone())).collect(),
        );
        s
    }

    #[test]
    fn merges_by_name_and_rank_wins() {
        let mut r = Registry::default();
        let now = crate::clock::wall();
        r.update(
            "file",
            1,
            services("web", &[inst("10.0.0.1", 1), inst("10.0.0.2", 1)]),
            now,
        );
        r.update(
            "api",
            4,
            services("web", &[inst("10.0.0.2", 5), inst("10.0.0.3", 1)]),
            now,
        );
        r.update("redis", 2, services("db", &[inst("10.0.1.1", 1)]), now);
        let m = r.merged();
        assert_eq!(m["web"].len(), 3);
        assert_eq!(
            m["web"][&inst("10.0.0.2", 0).key()].weight,
            5,
            "api outranks file"
        );
        assert_eq!(m["db"].len(), 1);
    }

    #[test]
    fn a_failing_provider_keeps_its_last_good_state() {
        let mut r = Registry::default();
        let now = crate::clock::wall();
        r.update("redis", 2, services("web", &[inst("10.0.0.1", 1)]), now);
        let gen = r.generation;
        r.fail("redis", 2, "connection refused".into());
        assert_eq!(r.merged()["web"].len(), 1);
        assert_eq!(r.generation, gen, "a failure changes nothing");
        let st = &r.status()["redis"];
        assert_eq!(
            (st.errors, st.last_error.as_deref()),
            (1, Some("connection refused"))
        );
        assert!(
            !r.update("redis", 2, services("web", &[inst("10.0.0.1", 1)]), now),
            "same snapshot: no change"
        );
        assert!(r.status()["redis"].last_error.is_none());
    }
}
