//! End to end: real TCP clients and servers in namespaces, the real agent attached natively.
//! Run one at a time (`--test-threads=1`): they share the kernel and two cores.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::{ensure, Result};
use lb_common::{hash::flow_hash, FlowKey, DEFAULT_RING_SIZE};
use lb_tests::{
    lab::{Lab, Mode},
    server::{who, Conn},
};
use lb_userspace::{
    l4::maglev::{Member, Table},
    model::addr_words,
};

/// Opens `n` short connections and tallies which backend answered each; also counts failures.
fn tally(lab: &Lab, n: usize) -> Result<(BTreeMap<String, usize>, usize)> {
    let vip = lab.vip();
    lab.client.run(move || {
        let mut t = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..n {
            match who(vip) {
                Ok(b) => *t.entry(b).or_insert(0) += 1,
                Err(_) => failed += 1,
            }
        }
        (t, failed)
    })
}

/// (a) weights 1:1:2 give shares within ±4 points over 2,000 new connections, and each server's
/// own accept count equals the program's per-backend new-flow counter.
fn weighted_shares(name: &str, mode: Mode, ipv6: bool) -> Result<Lab> {
    let mut lab = Lab::new("lbt", name, mode, 3, ipv6)?;
    lab.start_servers()?;
    lab.start_agent(&[1, 1, 2])?;
    lab.assert_native()?;
    let n = 2000;
    let (t, failed) = tally(&lab, n)?;
    println!("{name}: {n} connections → {t:?}, {failed} failed");
    ensure!(failed == 0, "{failed} connections failed");
    for (backend, want) in [("b0", 25.0), ("b1", 25.0), ("b2", 50.0)] {
        let got = 100.0 * *t.get(backend).unwrap_or(&0) as f64 / n as f64;
        ensure!(
            (got - want).abs() <= 4.0,
            "{backend}: {got:.1}% of connections, want {want}% ± 4"
        );
    }
    counters_match_servers(&lab, ipv6)?;
    Ok(lab)
}

#[test]
fn dsr_weighted_shares_and_counters_match_servers() -> Result<()> {
    let mut lab = weighted_shares("wdsr", Mode::Dsr, false)?;
    // SIGTERM stops the agent, not the data path.
    lab.stop_agent()?;
    let (t, failed) = tally(&lab, 100)?;
    ensure!(
        failed == 0 && t.len() == 3,
        "after SIGTERM: {t:?}, {failed} failed"
    );
    ensure!(lab.xdp_attached()?, "program detached with the agent");
    // `lb detach` removes it.
    lab.detach()?;
    ensure!(
        !lab.xdp_attached()?,
        "program still attached after lb detach"
    );
    ensure!(
        !lab.pin_root.join("t").exists(),
        "pins left after lb detach"
    );
    Ok(())
}

#[test]
fn nat_weighted_shares_and_counters_match_servers() -> Result<()> {
    weighted_shares("wnat", Mode::Nat, false).map(drop)
}

/// Each server's own accept count equals the program's new-flow counter for its backend.
fn counters_match_servers(lab: &Lab, v6: bool) -> Result<()> {
    let counters = lab.backend_new_flows()?;
    for (i, s) in lab.servers.iter().enumerate() {
        let addr = lab.backend_addr(i, v6);
        let c = counters
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, c)| *c)
            .unwrap_or(0);
        println!(
            "{}: {} accepted {}, program counted {c} new flows",
            lab.name,
            s.name,
            s.accepted()
        );
        ensure!(
            s.accepted() == c,
            "{}: server accepted {}, program counted {c}",
            s.name,
            s.accepted()
        );
    }
    Ok(())
}

/// Three equal backends in `mode`: 300 connections all succeed, spread over all three, and the
/// counters agree with the servers. ipip backends run `lb decap`.
fn balanced_and_counted(name: &str, mode: Mode, ipv6: bool) -> Result<()> {
    let mut lab = Lab::new("lbt", name, mode, 3, ipv6)?;
    lab.start_servers()?;
    if mode == Mode::Ipip {
        lab.start_decap()?;
    }
    lab.start_agent(&[1, 1, 1])?;
    lab.assert_native()?;
    let (t, failed) = tally(&lab, 300)?;
    println!("{name}: {t:?}, {failed} failed");
    ensure!(failed == 0, "{failed} connections failed");
    ensure!(
        t.len() == 3 && t.values().all(|c| *c >= 60),
        "uneven: {t:?}"
    );
    counters_match_servers(&lab, ipv6)
}

#[test]
fn ipv6_nat_balances_and_counts() -> Result<()> {
    balanced_and_counted("v6nat", Mode::Nat, true)
}

/// Opens `n` long-lived connections from the client namespace.
fn open_conns(lab: &Lab, n: usize) -> Result<Vec<Conn>> {
    let vip = lab.vip();
    lab.client
        .run(move || (0..n).map(|_| Conn::open(vip)).collect::<Result<Vec<_>>>())?
}

/// Removes backend 0 and adds backend 3 through the admin API.
fn swap_backends(lab: &Lab) -> Result<()> {
    let gone = lab.backend_addr(0, false);
    let (code, body) = lab.api("DELETE", &format!("/api/v1/vips/web/backends/{gone}"), None)?;
    ensure!(code == 204, "remove: {code} {body}");
    let new = lab.backend_addr(3, false);
    let body = format!(
        "{{\"address\": \"{new}\", \"port\": {}, \"weight\": 1}}",
        lab.backend_port()
    );
    let (code, resp) = lab.api("POST", "/api/v1/vips/web/backends", Some(&body))?;
    ensure!(code == 201, "add: {code} {resp}");
    Ok(())
}

/// Echoes on every connection; returns the indices that failed.
fn echo_all(conns: &mut [Conn]) -> BTreeSet<usize> {
    conns
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| c.echo(&format!("ping-{i}")).err().map(|_| i))
        .collect()
}

fn new_connections_reach(lab: &Lab) -> Result<BTreeMap<String, usize>> {
    let (t, failed) = tally(lab, 200)?;
    ensure!(
        failed == 0,
        "{failed} new connections failed after the change"
    );
    ensure!(
        t.contains_key("b3"),
        "no new connection reached the added backend: {t:?}"
    );
    ensure!(
        !t.contains_key("b0"),
        "a new connection reached the removed backend: {t:?}"
    );
    Ok(t)
}

/// (b) 200 live connections; add a backend and remove another: every connection that was not on
/// the removed backend keeps working, and new connections reach the new backend.
#[test]
fn live_connections_survive_backend_add_and_remove() -> Result<()> {
    let mut lab = Lab::new("lbt", "live", Mode::Dsr, 4, false)?;
    lab.start_servers()?;
    lab.start_agent(&[1, 1, 1])?;
    lab.assert_native()?;
    let mut conns = open_conns(&lab, 200)?;
    let on_removed: BTreeSet<usize> = conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.backend == "b0")
        .map(|(i, _)| i)
        .collect();
    swap_backends(&lab)?;
    let broken = echo_all(&mut conns);
    let unexpected: Vec<_> = broken.difference(&on_removed).collect();
    println!(
        "live: {} connections, {} on the removed backend, {} broken, {} of them elsewhere",
        conns.len(),
        on_removed.len(),
        broken.len(),
        unexpected.len()
    );
    ensure!(
        unexpected.is_empty(),
        "connections not on the removed backend broke: {unexpected:?}"
    );
    let t = new_connections_reach(&lab)?;
    println!("live: new connections after the change: {t:?}");
    Ok(())
}

/// The Maglev table the agent builds for these backends (same identities, same order rule).
fn table(addrs: &[IpAddr]) -> Result<(Vec<String>, Vec<u32>)> {
    let mut ids: Vec<String> = addrs
        .iter()
        .map(|a| SocketAddr::new(*a, 0).to_string())
        .collect();
    ids.sort();
    let members: Vec<Member<'_>> = ids
        .iter()
        .map(|i| Member {
            identity: i,
            weight: 1,
        })
        .collect();
    let t = Table::build(&members, DEFAULT_RING_SIZE)?;
    Ok((ids.clone(), t.slots().to_vec()))
}

/// (b2) The same change with connection tracking cleared first: only Maglev's stability keeps
/// the unaffected flows in place. Which connections move is predicted exactly from the flow hash
/// and the two tables, and the count is set against the table's churn.
#[test]
fn maglev_alone_keeps_unaffected_flows_after_conntrack_clear() -> Result<()> {
    let mut lab = Lab::new("lbt", "mgl", Mode::Dsr, 4, false)?;
    lab.start_servers()?;
    lab.start_agent(&[1, 1, 1])?;
    lab.assert_native()?;
    let mut conns = open_conns(&lab, 200)?;

    let old_addrs: Vec<IpAddr> = (0..3).map(|i| lab.backend_addr(i, false)).collect();
    let new_addrs: Vec<IpAddr> = (1..4).map(|i| lab.backend_addr(i, false)).collect();
    let (old_ids, old_t) = table(&old_addrs)?;
    let (new_ids, new_t) = table(&new_addrs)?;
    let removed = SocketAddr::new(old_addrs[0], 0).to_string();
    let owner = |ids: &[String], t: &[u32], slot: usize| ids[t[slot] as usize].clone();
    // Slots that change owner though their old owner stays: the extra churn of this change.
    let m = DEFAULT_RING_SIZE as usize;
    let kept: Vec<usize> = (0..m)
        .filter(|&s| owner(&old_ids, &old_t, s) != removed)
        .collect();
    let churn = kept
        .iter()
        .filter(|&&s| owner(&old_ids, &old_t, s) != owner(&new_ids, &new_t, s))
        .count();

    let vip = lab.vip();
    let mut predicted = BTreeSet::new();
    let mut on_removed = BTreeSet::new();
    for (i, c) in conns.iter().enumerate() {
        let key = FlowKey {
            src: addr_words(c.local.ip()),
            dst: addr_words(vip.ip()),
            sport: c.local.port().to_be(),
            dport: vip.port().to_be(),
            proto: lb_common::proto::TCP,
            _pad: [0; 3],
        };
        let slot = (flow_hash(&key) % DEFAULT_RING_SIZE) as usize;
        let before = owner(&old_ids, &old_t, slot);
        // The prediction must agree with where the connection actually is.
        let addr = format!("{}:0", lab.backend_addr(c.backend[1..].parse()?, false));
        ensure!(
            before == addr,
            "connection {i} is on {} but the table says {before}",
            c.backend
        );
        if before == removed {
            on_removed.insert(i);
        } else if before != owner(&new_ids, &new_t, slot) {
            predicted.insert(i);
        }
    }

    let (code, body) = lab.api("POST", "/api/v1/flows/clear", None)?;
    ensure!(code == 200, "clear: {code} {body}");
    swap_backends(&lab)?;
    let broken: BTreeSet<usize> = echo_all(&mut conns)
        .difference(&on_removed)
        .copied()
        .collect();
    let survivors = conns.len() - on_removed.len();
    println!(
        "maglev: extra churn {churn} of the {} slots of kept backends ({:.2}%); {} of {survivors} unaffected connections predicted to move ({:.2}%), {} moved",
        kept.len(),
        100.0 * churn as f64 / kept.len() as f64,
        predicted.len(),
        100.0 * predicted.len() as f64 / survivors as f64,
        broken.len()
    );
    ensure!(
        broken == predicted,
        "moved {broken:?}, predicted {predicted:?}"
    );
    new_connections_reach(&lab)?;
    Ok(())
}

/// (ipip) Encapsulated to backends that run `lb decap`, over IPv4 and IPv6 outer headers.
#[test]
fn ipip_v4_to_decapsulating_backends() -> Result<()> {
    balanced_and_counted("ipip4", Mode::Ipip, false)
}

#[test]
fn ipip_v6_to_decapsulating_backends() -> Result<()> {
    balanced_and_counted("ipip6", Mode::Ipip, true)
}
