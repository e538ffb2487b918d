//! Instances: what every source reports and both tiers are programmed from (a VIP's backends, an
//! HTTP service's upstreams). The registry merges them; here they are only values.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

/// An instance's identity within a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceKey {
    pub address: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        SocketAddr::new(self.address, self.port).fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub address: IpAddr,
    #[serde(default)]
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Free-form labels. `mac` is read by DSR (the backend's MAC, when it is not resolvable).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

impl Instance {
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            address: self.address,
            port: self.port,
        }
    }
}

/// Instances by service, as one provider sees them.
pub type Services = BTreeMap<String, BTreeMap<InstanceKey, Instance>>;
