//! Pure types: what the agent is asked to do, as values. No sockets, no maps, no tasks; this
//! layer imports only lb-common (and std and value crates: serde, regex, ipnet). Every other layer may use it.

pub mod bgp;
pub mod instance;
pub mod l4;
pub mod l7;
pub mod middleware;
pub mod rule;
pub mod sources;

pub use l4::{
    addr_words, AttachMode, BackendMode, BackendSpec, CheckKind, HealthSpec, Limits, Mac, Mode,
    Protocol, VipSpec,
};
pub use sources::{
    ClusterSpec, EtcdAuth, EtcdSpec, EtcdTls, FileProviderSpec, ProvidersSpec, RedisSpec,
};

/// A CIDR, or a bare address as its own /32 or /128: how every allow list, trusted-proxy list
/// and `ClientIP` rule is written.
pub fn ip_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Names of VIPs and services: they appear in API paths and store keys.
/// Every byte but RFC 3986's unreserved ones percent-encoded: a URL's user or password, a query
/// value, base64 in a header (as Go's `url.QueryEscape` leaves them readable).
pub fn escape_unreserved(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}
