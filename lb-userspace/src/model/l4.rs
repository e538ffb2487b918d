//! What L4 is asked to do: VIPs, their backends and modes, health checks, and the sizes the
//! maps are made with. Values only: the config file, the API and the providers produce them,
//! the planner and the dataplane consume them.

use std::{fmt, net::IpAddr, time::Duration};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Dsr,
    Nat,
    Local,
    Ipip,
}

impl Mode {
    /// DSR and IP-in-IP put the backend's (or its next hop's) MAC on the frame.
    pub fn needs_mac(self) -> bool {
        matches!(self, Mode::Dsr | Mode::Ipip)
    }

    pub fn number(self) -> u8 {
        match self {
            Mode::Dsr => lb_common::mode::DSR,
            Mode::Nat => lb_common::mode::NAT,
            Mode::Local => lb_common::mode::LOCAL,
            Mode::Ipip => lb_common::mode::IPIP,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub name: String,
    pub address: IpAddr,
    /// 0: every port of the address.
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    /// Registry service that fills this VIP.
    pub service: String,
    /// Inline backends: the `config` provider's instances of `service`.
    pub backends: Vec<BackendSpec>,
    pub health: Option<HealthSpec>,
}

/// Active health checking of a VIP's backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthSpec {
    pub check: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend back.
    pub rise: u32,
    /// Consecutive failures that take an up backend out.
    pub fall: u32,
    /// HTTP: the path to GET; 2xx/3xx is healthy.
    pub path: String,
    /// 0: the backend's port, else the VIP's.
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: IpAddr,
    /// NAT: the backend's port; 0 keeps the VIP's port. Ignored in DSR.
    pub port: u16,
    pub weight: u32,
    /// DSR: the backend's MAC; resolved from the neighbour table when absent.
    pub mac: Option<Mac>,
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mac(pub [u8; 6]);

/// A `mac` value that is not six hex octets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)")]
pub struct NotAMac(pub String);

impl std::str::FromStr for Mac {
    type Err = NotAMac;
    fn from_str(s: &str) -> Result<Self, NotAMac> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(NotAMac(s.to_string()));
        }
        let mut mac = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            mac[i] = u8::from_str_radix(p, 16).map_err(|_| NotAMac(s.to_string()))?;
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A backend's administrative/health state as the data path must see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// In the Maglev table; its flows stay.
    Active,
    /// Out of the table; its tracked flows stay (graceful removal).
    Draining,
    /// Out of the table and its flows are re-picked (failed health checks).
    Down,
}

/// Sizes fixed when the maps are created. They cannot change under pinned maps: a different
/// value for an existing pin set is refused (run `lb detach` to recreate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vips: u32,
    pub max_backends: u32,
    pub ring_size: u32,
    pub max_flows: u32,
    pub udp_timeout_secs: u64,
    /// `ipip` outer source prefixes (a /16 and a /96): not map sizes, set per program load.
    pub ipip_source_v4: std::net::Ipv4Addr,
    pub ipip_source_v6: std::net::Ipv6Addr,
}

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

/// An address as the program sees it: the packet's bytes, read as native-endian words.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}
