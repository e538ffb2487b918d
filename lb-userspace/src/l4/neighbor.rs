//! Finds a DSR backend's MAC in this host's neighbour table.
//!
//! DSR rewrites only the destination MAC, so the agent must know each backend's MAC. It asks the
//! kernel, which already speaks ARP/NDP: a datagram to the backend's discard port makes the kernel
//! resolve the neighbour, then `ip neigh` reports it.
//!
//! This is the only code that runs a process. It runs as its own task ([`run`]), fed the set of
//! addresses still without a MAC; what it finds goes back to the control loop as an event, so the
//! control lock is never held while `ip` runs or ARP is awaited.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use crate::model::Mac;

/// How often addresses that did not answer are tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// At most this many resolutions wait on ARP/NDP at once.
const PARALLEL: usize = 32;

/// Resolves every address in `wanted` as it appears, retrying the ones that did not answer every
/// [`RETRY`], and hands each MAC found to `found`. Ends when the sender is dropped.
pub async fn run<F>(mut wanted: watch::Receiver<BTreeSet<IpAddr>>, found: F)
where
    F: Fn(IpAddr, Mac) + Send + Sync + 'static,
{
    let found = Arc::new(found);
    let mut tried = BTreeSet::new();
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = wanted.borrow_and_update().clone();
        tried.retain(|a| now.contains(a));
        let todo: BTreeSet<IpAddr> = now.difference(&tried).copied().collect();
        tried.extend(todo.iter().copied());
        if !todo.is_empty() {
            let f = found.clone();
            let r = tokio::task::spawn_blocking(move || {
                for (addr, mac) in resolve_many(&todo) {
                    f(addr, mac);
                }
            })
            .await;
            if let Err(e) = r {
                tracing::warn!("neighbour resolution task: {e}");
            }
        }
        tokio::select! {
            r = wanted.changed() => if r.is_err() { return },
            _ = retry.tick() => tried.clear(),
        }
    }
}

/// Resolves `addrs`, [`PARALLEL`] at a time; each waits up to a second. Blocking.
pub fn resolve_many(addrs: &BTreeSet<IpAddr>) -> Vec<(IpAddr, Mac)> {
    let addrs: Vec<IpAddr> = addrs.iter().copied().collect();
    let mut out = Vec::new();
    for chunk in addrs.chunks(PARALLEL) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&a| s.spawn(move || resolve(a).map(|m| (a, m))))
                .collect();
            out.extend(handles.into_iter().filter_map(|h| h.join().ok().flatten()));
        });
    }
    out
}

/// Resolves the MAC frames for `addr` must carry: its own when it is on a local segment, its
/// gateway's when it is routed. Waits up to one second for ARP/NDP to answer.
pub fn resolve(addr: IpAddr) -> Option<Mac> {
    let hop = next_hop(addr).unwrap_or(addr);
    resolve_neighbor(hop)
}

/// The gateway `ip route get` names for `addr`, if it is routed.
#[allow(clippy::disallowed_methods)] // the neighbour task is where processes run
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
    let deadline = crate::clock::now() + Duration::from_secs(1);
    while crate::clock::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if let Some(mac) = lookup(addr) {
            return Some(mac);
        }
    }
    None
}

/// The neighbour table's entry for `addr`, if it has a link-layer address.
#[allow(clippy::disallowed_methods)] // the neighbour task is where processes run
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
