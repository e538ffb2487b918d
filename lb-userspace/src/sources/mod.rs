//! The sources: lb.toml ([`config`], read at start and on every change) and the providers, which
//! turn a source into registry snapshots sent to the control loop as [`Event`]s.
//!
//! Each provider owns its source and reports *complete* snapshots (never deltas), so a lost or
//! repeated event cannot leave the registry inconsistent; a provider that fails reports an error
//! and the registry keeps its last good snapshot.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use crate::model::instance::{InstanceKey, Services};

pub mod cluster;
pub mod config;
pub mod dns;
pub mod etcd;
pub mod file;
pub mod kv;
pub mod redis;
pub mod store;
pub mod traefik;

/// Precedence when two providers report the same instance: higher wins.
pub struct Rank;

impl Rank {
    pub const CONFIG: u8 = 0;
    pub const FILE: u8 = 1;
    pub const REDIS: u8 = 2;
    pub const ETCD: u8 = 3;
    /// An operator's API change outranks every discovered source.
    pub const API: u8 = 4;
}

/// What reaches the control loop. `at` is when the source changed: the loop measures the time from
/// there to the maps.
#[derive(Debug)]
pub enum Event {
    Snapshot {
        provider: String,
        rank: u8,
        services: Services,
        at: Instant,
    },
    Error {
        provider: String,
        rank: u8,
        error: String,
    },
    /// A health check verdict changed.
    Health {
        vip: String,
        key: InstanceKey,
        up: bool,
        at: Instant,
    },
    /// A provider's routing (Traefik dynamic configuration), replacing what it said before.
    Routing {
        provider: String,
        rank: u8,
        /// Boxed: a whole configuration, where the other events are a few words.
        routing: Box<crate::model::l7::Dynamic>,
        /// Key paths lb does not support.
        unsupported: Vec<String>,
        /// Items it could not use, each kept at its last good version or left out, as said.
        broken: Vec<String>,
    },
    /// The API store changed (it is read directly by the loop).
    StoreChanged { at: Instant },
    /// The cluster's store at an etcd revision, whole (its watch's news).
    ClusterStore {
        data: Box<store::Data>,
        revision: i64,
        /// Records refused, by key.
        rejected: Vec<String>,
        at: Instant,
    },
    /// The neighbour task found the MAC of a backend that needed one.
    Neighbour {
        address: std::net::IpAddr,
        mac: crate::model::Mac,
        at: Instant,
    },
}

/// Where the configuration comes from: lb.toml, a Traefik install configuration
/// (`traefik.yml`), or both (lb.toml's agent, API and dataplane settings, Traefik's entry
/// points, providers and resolvers beside lb.toml's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub lb: Option<PathBuf>,
    pub traefik: Option<PathBuf>,
}

impl Source {
    pub fn lb(path: &Path) -> Source {
        Source {
            lb: Some(path.to_path_buf()),
            traefik: None,
        }
    }

    /// Reads and validates every file; the first error is returned, naming its file.
    pub fn load(&self) -> Result<config::Config, config::ConfigError> {
        let mut cfg = match &self.lb {
            Some(p) => config::load(p)?,
            None => config::parse(Path::new("(lb defaults)"), "")?,
        };
        if let Some(t) = &self.traefik {
            traefik::install::load_into(&mut cfg, t)?;
        }
        Ok(cfg)
    }

    /// The files to watch for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        self.lb.iter().chain(self.traefik.iter()).cloned().collect()
    }
}
