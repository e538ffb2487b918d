//! Finds a DSR backend's MAC in this host's neighbour table.
//!
//! DSR rewrites only the destination MAC, so the agent must know each backend's MAC. It asks the
//! kernel, which already speaks ARP/NDP: a datagram to the backend's discard port makes the kernel
//! resolve the neighbour, then `ip neigh` reports it. Unresolved backends are retried periodically.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use crate::model::Mac;

/// Resolves the MAC frames for `addr` must carry: its own when it is on a local segment, its
/// gateway's when it is routed. Waits up to one second for ARP/NDP to answer.
pub fn resolve(addr: IpAddr) -> Option<Mac> {
    let hop = next_hop(addr).unwrap_or(addr);
    resolve_neighbor(hop)
}

/// The gateway `ip route get` names for `addr`, if it is routed.
fn next_hop(addr: IpAddr) -> Option<IpAddr> {
    let out = Command::new("ip")
        .args(["route", "get", &addr.to_string()])
        .output()
        .ok()?;
    parse_via(&String::from_utf8_lossy(&out.stdout))
}

fn parse_via(out: &str) -> Option<IpAddr> {
    let mut words = out.split_whitespace();
    words.find(|w| *w == "via")?;
    words.next()?.parse().ok()
}

fn resolve_neighbor(addr: IpAddr) -> Option<Mac> {
    if let Some(mac) = lookup(addr) {
        return Some(mac);
    }
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .ok()?;
    if let Ok(sock) = UdpSocket::bind(bind) {
        let _ = sock.send_to(&[], SocketAddr::new(addr, 9));
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(mac) = lookup(addr) {
            return Some(mac);
        }
    }
    None
}

/// The neighbour table's entry for `addr`, if it has a link-layer address.
fn lookup(addr: IpAddr) -> Option<Mac> {
    let out = Command::new("ip")
        .args(["neigh", "show", "to", &addr.to_string()])
        .output()
        .ok()?;
    parse_neigh(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `ip neigh show` output: `10.0.0.5 dev eth0 lladdr 02:00:00:00:00:05 REACHABLE`.
fn parse_neigh(out: &str) -> Option<Mac> {
    out.lines().find_map(|line| {
        if line.contains("FAILED") || line.contains("INCOMPLETE") {
            return None;
        }
        let mut words = line.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_neigh_output() {
        let mac = parse_neigh("10.0.0.5 dev eth0 lladdr 02:00:00:00:00:05 REACHABLE\n");
        assert_eq!(mac, Some(Mac([2, 0, 0, 0, 0, 5])));
        assert_eq!(parse_neigh("10.0.0.5 dev eth0 FAILED\n"), None);
        assert_eq!(parse_neigh(""), None);
        assert_eq!(
            parse_via("10.9.0.1 via 10.0.0.254 dev eth0 src 10.0.0.2 uid 0"),
            "10.0.0.254".parse().ok()
        );
        assert_eq!(parse_via("10.0.0.5 dev eth0 src 10.0.0.2 uid 0"), None);
    }
}
