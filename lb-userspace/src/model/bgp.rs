//! `[bgp]`: how a node announces its VIPs to the routers in front of it, through the bird2 that
//! runs beside it, and what it announces at a given moment.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpSpec {
    /// bird's control socket.
    pub socket: PathBuf,
    /// The file lb writes (its static routes and BGP sessions); bird.conf includes it.
    pub include: PathBuf,
    pub local_as: u32,
    pub neighbors: Vec<Neighbor>,
    pub hold_time: Duration,
    /// Sent with every announcement (none by default).
    pub med: Option<u32>,
    /// Standard communities `(asn, value)` added to every announcement.
    pub communities: Vec<(u16, u16)>,
    /// Large communities `(global, local1, local2)`.
    pub large_communities: Vec<(u32, u32, u32)>,
    /// The interface the VIPs' static routes are bound to: bird withdraws them by itself when
    /// it goes, even if the agent is dead.
    pub interface: String,
    /// `lb leave`: how long the node keeps forwarding after the router has stopped sending it
    /// new flows.
    pub drain: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbor {
    pub address: IpAddr,
    pub asn: u32,
    /// BGP's port (179 unless told).
    pub port: u16,
}

/// The VIP addresses to announce now: each with at least one backend taking new flows, on a
/// node whose program is attached and not leaving.
pub type Announce = BTreeSet<IpAddr>;

/// What bird says of one of lb's sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Session {
    pub name: String,
    pub neighbor: String,
    /// bird's protocol state (`up`, `start`, `down`) and its BGP state (`Established`, …).
    pub state: String,
    pub info: String,
    /// Routes bird exports to this neighbour now (`None`: bird did not say).
    pub exported: Option<u64>,
}

/// The announcer's view, for the node's status and `lb leave`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BgpStatus {
    /// What bird has been told to announce (its include as last written and accepted).
    pub announced: Vec<IpAddr>,
    pub sessions: Vec<Session>,
    /// Why bird could not be driven, if it could not (unreachable socket, refused config).
    pub error: Option<String>,
}
