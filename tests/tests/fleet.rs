//! Three lb nodes behind a BGP router (bird2 on every node and on the router), DSR backends:
//! the router learns each VIP (IPv4 and IPv6) with one next hop per node and spreads flows over
//! them; the same 5-tuple reaches the same backend through every node; a node that leaves
//! (`lb leave`) withdraws first and no request fails; a node lost with traffic flowing —
//! SIGKILL and `lb detach`, then a deleted link — is withdrawn (at once, and within the hold
//! time), and every long-lived connection that entered through it carries on through a
//! survivor to the same backend. A second fleet shares one etcd: a change through one node's
//! API reaches the other, and with etcd gone for 30 s both keep forwarding on their last state.
//! Times are measured and printed.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    fleet::{Fleet, HOLD, VIP4, VIP6},
    server::{who, Conn},
};

fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

fn nodes(n: &[usize], v6: bool) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = n.iter().map(|i| Fleet::node_addr(*i, v6)).collect();
    v.sort();
    v
}

/// Opens `n` long-lived connections from the client; each knows its backend.
fn open(f: &Fleet, v6: bool, n: usize) -> Vec<Conn> {
    let vip = Fleet::vip(v6);
    f.client
        .run(move || {
            (0..n)
                .map(|_| Conn::open(vip))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .expect("client thread")
        .expect("connections")
}

/// Every connection still reaches its own backend (the line comes back on the same TCP
/// connection, which only that backend holds). Returns how many did.
fn echo_all(conns: &mut [Conn], tag: &str) -> usize {
    let mut ok = 0;
    for (k, c) in conns.iter_mut().enumerate() {
        match c.echo(&format!("{tag}-{k}")) {
            Ok(()) => ok += 1,
            Err(e) => eprintln!("connection {k} ({}, from {}): {e:#}", c.backend, c.local),
        }
    }
    ok
}

/// The next hop (node) each connection's 5-tuple hashes to at the router now.
fn via(f: &Fleet, conns: &[Conn]) -> Vec<Option<IpAddr>> {
    conns
        .iter()
        .map(|c| f.next_hop_of(c.local.is_ipv6(), c.local.port()))
        .collect()
}

/// VIP `name` as node `i`'s API shows it: its table digest and its backends' addresses.
fn table(f: &Fleet, i: usize, name: &str) -> Option<(String, Vec<String>)> {
    let (_, body) = f.api(i, "GET", "/api/v1/vips", None).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let vip = v["vips"].as_array()?.iter().find(|x| x["name"] == name)?;
    let backends = vip["backends"]
        .as_array()?
        .iter()
        .filter_map(|b| b["address"].as_str().map(str::to_string))
        .collect();
    Some((vip["table_digest"].as_str()?.to_string(), backends))
}

/// Short connections from the client in a loop until stopped: (answered, failed).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn start(f: &Fleet) -> Load {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, o, x) = (stop.clone(), ok.clone(), failed.clone());
        let handle = f.client.spawn(move || {
            let mut k = 0u64;
            while !s.load(Ordering::Relaxed) {
                k += 1;
                match who(Fleet::vip(k.is_multiple_of(4))) {
                    Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("load: {e:#}");
                        x.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Load {
            stop,
            ok,
            failed,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn a_fleet_behind_bgp_keeps_every_flow_when_a_node_goes() {
    let name = format!("{:x}", std::process::id() % 0xfff);
    let mut f = Fleet::new(&name, 3, 3).expect("topology");
    f.start_servers().expect("servers");
    // The agents first: bird is not there yet, so each agent's include waits for it.
    for i in 0..3 {
        f.start_agent(i).expect("agent");
    }
    f.start_router_bird().expect("router bird");
    for i in 0..3 {
        f.start_node_bird(i).expect("node bird");
    }
    let learned = until(
        "the router learns both VIPs from all three nodes",
        Duration::from_secs(40),
        || {
            f.next_hops(VIP4) == nodes(&[0, 1, 2], false)
                && f.next_hops(VIP6) == nodes(&[0, 1, 2], true)
        },
    );
    println!("router: both VIPs with 3 next hops after {learned:?}");
    let seen = lb_userspace::bgp::bird::Bird {
        socket: &f.dir.join("router-bird.ctl"),
    }
    .command(&format!("show route all {VIP4}/32"))
    .expect("router's bird");
    let text: String = seen.iter().map(|(_, t)| format!("{t}\n")).collect();
    assert!(text.contains("BGP.med: 10"), "{text}");
    assert!(text.contains("BGP.community: (65001,100)"), "{text}");

    // `lb status` shows what the node announces and its sessions (refreshed every 2 s).
    let mut status = String::new();
    until(
        "lb status shows both sessions established",
        Duration::from_secs(10),
        || {
            status = f
                .lb(0, &["status", "--interval", "0.2"])
                .unwrap_or_default();
            status.matches("Established").count() == 2
        },
    );
    assert!(
        status.contains(&format!("BGP   announcing {VIP4}, {VIP6}")),
        "{status}"
    );
    assert!(status.contains("1 exported"), "{status}");

    // Consistency: the same 5-tuple through each node reaches the same backend.
    let ports = 20_000..21_000;
    let through: Vec<Vec<String>> = (0..3)
        .map(|i| f.probe_through(i, false, ports.clone()).expect("probe"))
        .collect();
    let differ = (0..ports.len())
        .filter(|&k| through[0][k] != through[1][k] || through[0][k] != through[2][k])
        .count();
    assert_eq!(
        differ, 0,
        "flows that reached another backend through another node"
    );
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &through[0] {
        *per_backend.entry(b).or_default() += 1;
    }
    println!(
        "consistency: 1000 IPv4 flows, same backend through all 3 nodes; spread {per_backend:?}"
    );
    let through6: Vec<Vec<String>> = (0..3)
        .map(|i| f.probe_through(i, true, 22_000..22_200).expect("probe v6"))
        .collect();
    assert!(
        through6[0] == through6[1] && through6[1] == through6[2],
        "IPv6 flows agree"
    );

    // Which flows move when the backend set changes during an ECMP rehash: a flow that the
    // router moves to a node with no entry for it gets that node's Maglev pick. Flows seen by
    // node 0, then the same 5-tuples through node 1 after b2 was removed there.
    let fresh = 23_000..24_000;
    let old = f.probe_through(0, false, fresh.clone()).expect("probe");
    let (code, body) = f
        .api(1, "DELETE", "/api/v1/vips/web/backends/10.20.0.22:80", None)
        .expect("api");
    assert_eq!(code, 204, "{body}");
    let new = f.probe_through(1, false, fresh.clone()).expect("probe");
    let on_b2 = old.iter().filter(|b| *b == "b2").count();
    let kept: Vec<usize> = (0..old.len()).filter(|&k| old[k] != "b2").collect();
    let moved = kept.iter().filter(|&&k| new[k] != old[k]).count();
    println!(
        "backend set changed during a rehash: {on_b2} of 1000 flows were on the removed backend; \
         of the other {}, {moved} ({:.1} %) got another backend",
        kept.len(),
        100.0 * moved as f64 / kept.len() as f64
    );
    // And the other way: flows seen by node 1 without b2, through node 0 (which has it).
    let fresh2 = 24_000..25_000;
    let without = f.probe_through(1, false, fresh2.clone()).expect("probe");
    let with = f.probe_through(0, false, fresh2).expect("probe");
    let to_b2 = with.iter().filter(|b| *b == "b2").count();
    let moved_else = (0..with.len())
        .filter(|&k| with[k] != without[k] && with[k] != "b2")
        .count();
    println!(
        "a backend added during a rehash: {to_b2} of 1000 flows ({:.1} %) go to the new one, \
         {moved_else} move between the others",
        to_b2 as f64 / 10.0
    );
    assert_eq!(
        moved, 0,
        "Maglev moves only the removed backend's flows here"
    );
    // b2 back on node 1: the three tables are the same again.
    let (code, body) = f
        .api(
            1,
            "POST",
            "/api/v1/vips/web/backends",
            Some(r#"{"address":"10.20.0.22","port":80}"#),
        )
        .expect("api");
    assert!(code == 200 || code == 201, "{code} {body}");
    let digest = |i: usize| table(&f, i, "web").map(|t| t.0);
    until(
        "node 1's table is the others' again",
        Duration::from_secs(5),
        || {
            let d = digest(1);
            d.is_some() && d == digest(0) && d == digest(2)
        },
    );

    // Long-lived connections from the client, spread by the router over the nodes.
    let mut conns = open(&f, false, 150);
    conns.extend(open(&f, true, 60));
    let hops = via(&f, &conns);
    for (i, v6) in [
        (0, false),
        (1, false),
        (2, false),
        (0, true),
        (1, true),
        (2, true),
    ] {
        let n = hops
            .iter()
            .filter(|h| **h == Some(Fleet::node_addr(i, v6)))
            .count();
        assert!(n > 0, "no connection through node {i} (v6 {v6})");
    }
    assert_eq!(echo_all(&mut conns, "start"), conns.len());

    // Graceful: node 2 leaves under load; nothing fails, its connections move on.
    let load = Load::start(&f);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let out = f.lb(2, &["leave"]).expect("lb leave");
    println!("lb leave: {}", out.trim());
    f.wait_agent_exit(2, Duration::from_secs(10))
        .expect("node 2 exits");
    assert_eq!(
        f.next_hops(VIP4),
        nodes(&[0, 1], false),
        "withdrawn before the agent exits"
    );
    println!("node 2 left in {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.stop();
    println!("while node 2 left: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 50, "the load ran ({ok})");
    assert_eq!(echo_all(&mut conns, "after-leave"), conns.len());

    // Node 0 lost: SIGKILL and `lb detach` (which withdraws; its program is gone).
    let before = via(&f, &conns);
    let through0 = before
        .iter()
        .filter(|h| h.is_some_and(|h| h == Fleet::node_addr(0, h.is_ipv6())))
        .count();
    f.kill_agent(0);
    let t0 = Instant::now();
    f.lb(0, &["detach"]).expect("lb detach");
    let withdrawn = until("the router drops node 0", Duration::from_secs(HOLD), || {
        f.next_hops(VIP4) == nodes(&[1], false) && f.next_hops(VIP6) == nodes(&[1], true)
    });
    println!(
        "SIGKILL + lb detach: node 0 withdrawn {:?} after the detach began",
        t0.elapsed().min(withdrawn + Duration::from_secs(60))
    );
    let survived = echo_all(&mut conns, "after-kill");
    println!("connections that had entered through node 0: {through0}; all connections that carry on: {survived} of {}", conns.len());
    assert_eq!(
        survived,
        conns.len(),
        "Maglev: the same backend through a survivor"
    );
    for _ in 0..50 {
        who(Fleet::vip(false)).expect("a new flow avoids the dead node");
    }

    // Node 2 comes back (its agent announces again), then node 1's link is deleted: bird on
    // node 1 loses it and the router drops node 1 when the hold time runs out.
    f.start_agent(2).expect("agent 2 again");
    until("node 2 announced again", Duration::from_secs(30), || {
        f.next_hops(VIP4) == nodes(&[1, 2], false)
    });
    assert_eq!(echo_all(&mut conns, "rejoined"), conns.len());
    f.delete_link(1).expect("delete node 1's link");
    let t0 = Instant::now();
    until(
        "the router drops node 1 within the hold time",
        Duration::from_secs(HOLD + 3),
        || f.next_hops(VIP4) == nodes(&[2], false) && f.next_hops(VIP6) == nodes(&[2], true),
    );
    println!(
        "link deleted: node 1 withdrawn after {:?} (hold time {HOLD} s)",
        t0.elapsed()
    );
    let survived = echo_all(&mut conns, "after-link");
    println!(
        "after the link deletion: {survived} of {} connections carry on",
        conns.len()
    );
    assert_eq!(survived, conns.len());
}

/// Two nodes sharing one etcd (on the fabric, reachable from every node's namespace): a change
/// through one node's API reaches the other's maps (measured); with etcd gone for 30 s, both
/// nodes keep forwarding on their last state, long-lived and new connections alike, a node
/// restarted meanwhile comes back on its local copy, a write is refused rather than lost, and
/// the nodes converge once etcd is back.
#[test]
fn a_fleet_sharing_etcd_forwards_on_its_last_state_while_etcd_is_away() {
    let name = format!("e{:x}", std::process::id() % 0xfff);
    let mut f = Fleet::new(&name, 2, 3).expect("topology");
    f.cluster = true;
    f.start_etcd().expect("etcd");
    f.start_servers().expect("servers");
    for i in 0..2 {
        f.start_agent(i).expect("agent");
    }
    f.start_router_bird().expect("router bird");
    for i in 0..2 {
        f.start_node_bird(i).expect("node bird");
    }
    until(
        "the router learns both VIPs from both nodes",
        Duration::from_secs(40),
        || f.next_hops(VIP4) == nodes(&[0, 1], false) && f.next_hops(VIP6) == nodes(&[0, 1], true),
    );

    // A change through node 0's API reaches node 1's maps.
    let b2 = Fleet::backend_addr(2, false).to_string();
    let (code, body) = f
        .api(
            0,
            "DELETE",
            &format!("/api/v1/vips/web/backends/{b2}:80"),
            None,
        )
        .expect("api");
    assert_eq!(code, 204, "{body}");
    let reached = until("node 1 drops b2 too", Duration::from_secs(10), || {
        let (a, b) = (table(&f, 0, "web"), table(&f, 1, "web"));
        b.as_ref()
            .is_some_and(|t| t.1.len() == 2 && !t.1.contains(&b2))
            && a == b
    });
    println!("an API change on node 0 reached node 1's maps in {reached:?}");
    let ports = 20_000..20_300;
    let through0 = f.probe_through(0, false, ports.clone()).expect("probe");
    let through1 = f.probe_through(1, false, ports).expect("probe");
    assert_eq!(through0, through1, "both nodes pick the same backends");
    assert!(!through0.iter().any(|b| b == "b2"), "b2 is out on both");
    let state = (table(&f, 0, "web"), table(&f, 0, "web6"));
    assert!(state.0.is_some() && state.1.is_some(), "{state:?}");

    let mut conns = open(&f, false, 100);
    conns.extend(open(&f, true, 40));
    assert_eq!(echo_all(&mut conns, "start"), conns.len());
    let load = Load::start(&f);
    std::thread::sleep(Duration::from_millis(500));

    // etcd gone: forwarding goes on, writes are refused, a restart starts on the local copy.
    f.stop_etcd();
    let away = Instant::now();
    let (code, body) = f
        .api(
            1,
            "POST",
            "/api/v1/vips/web/backends",
            Some(&format!(r#"{{"address":"{b2}","port":80}}"#)),
        )
        .expect("api");
    assert_eq!(code, 503, "a write without the store is refused: {body}");
    f.stop_agent(1).expect("node 1 stops");
    f.start_agent(1).expect("node 1 starts without etcd");
    for i in 0..2 {
        assert_eq!(
            (table(&f, i, "web"), table(&f, i, "web6")),
            state,
            "node {i} runs on its last state"
        );
    }
    let mut rounds = 0;
    while away.elapsed() < Duration::from_secs(30) {
        rounds += 1;
        assert_eq!(
            echo_all(&mut conns, &format!("away-{rounds}")),
            conns.len(),
            "long-lived connections carry on without etcd"
        );
        for i in 0..2 {
            assert_eq!(table(&f, i, "web"), state.0, "node {i} keeps its state");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        f.next_hops(VIP4),
        nodes(&[0, 1], false),
        "both nodes still announce"
    );

    // etcd back: a change through node 1 reaches node 0.
    f.start_etcd().expect("etcd again");
    let back = Instant::now();
    until("node 1 writes again", Duration::from_secs(20), || {
        f.api(
            1,
            "POST",
            "/api/v1/vips/web/backends",
            Some(&format!(r#"{{"address":"{b2}","port":80}}"#)),
        )
        .is_ok_and(|(code, _)| code == 201 || code == 200)
    });
    until("node 0 has b2 again", Duration::from_secs(20), || {
        let (a, b) = (table(&f, 0, "web"), table(&f, 1, "web"));
        a.as_ref().is_some_and(|t| t.1.len() == 3) && a == b
    });
    println!(
        "etcd back: node 1's change reached node 0 {:?} after etcd started",
        back.elapsed()
    );
    let (ok, failed) = load.stop();
    println!("while etcd was away (and node 1 restarted): {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 500, "the load ran ({ok})");
    assert_eq!(echo_all(&mut conns, "end"), conns.len());
}
