//! End to end for the control plane: health checks taking a dead backend out and back, and an
//! agent restart (with another binary) under steady TCP and UDP traffic losing nothing.
//! Run one at a time (`--test-threads=1`).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use lb_tests::{
    lab::{lb_bin, Lab, Mode, VIP4},
    server::{http, who, Conn, UdpSink},
};

/// Polls the API until backend `addr` of the VIP is in `state`; returns how long it took.
fn wait_state(lab: &Lab, addr: &str, state: &str, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let v = lab.vip_state()?;
        let found = v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["address"].as_str() == Some(addr) && b["state"].as_str() == Some(state));
        if found {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{addr} not {state} within {limit:?}")
}

const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;

#[test]
fn health_checks_take_a_dead_backend_out_and_bring_it_back() -> Result<()> {
    let mut lab = Lab::new("lbt", "hc", Mode::Dsr, 3, false)?;
    lab.start_servers()?;
    let health = format!("\n[vip.health]\ncheck = \"tcp\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 100\nfall = {FALL}\nrise = {RISE}\n");
    lab.start_agent_with(&[1, 1, 1], &health, &lb_bin())?;
    lab.assert_native()?;
    let vip = lab.vip();
    let mut conns = lab
        .client
        .run(move || (0..30).map(|_| Conn::open(vip)).collect::<Result<Vec<_>>>())??;
    let others: Vec<usize> = (0..conns.len())
        .filter(|&i| conns[i].backend != "b1")
        .collect();

    lab.stop_server(1);
    let dead = lab.backend_addr(1, false).to_string();
    let limit = Duration::from_millis(3 * INTERVAL_MS * FALL);
    let took = wait_state(&lab, &dead, "down", limit + Duration::from_secs(2))?;
    println!(
        "hc: b1 marked down {took:?} after its server stopped (interval × fall = {} ms)",
        INTERVAL_MS * FALL
    );
    ensure!(
        took <= limit,
        "took {took:?}, more than 3 × interval × fall = {limit:?}"
    );
    for &i in &others {
        conns[i]
            .echo("still-here")
            .map_err(|e| anyhow::anyhow!("connection {i} on {}: {e}", conns[i].backend))?;
    }
    let (t, failed) = tally(&lab, 100)?;
    ensure!(
        failed == 0 && !t.contains_key("b1"),
        "after b1 went down: {t:?}, {failed} failed"
    );

    lab.restart_server(1)?;
    let limit = Duration::from_millis(3 * INTERVAL_MS * RISE);
    let took = wait_state(&lab, &dead, "active", limit + Duration::from_secs(2))?;
    println!(
        "hc: b1 back {took:?} after its server restarted (interval × rise = {} ms)",
        INTERVAL_MS * RISE
    );
    ensure!(
        took <= limit,
        "took {took:?} to come back, more than {limit:?}"
    );
    let (t, failed) = tally(&lab, 100)?;
    ensure!(
        failed == 0 && t.contains_key("b1"),
        "after b1 came back: {t:?}, {failed} failed"
    );
    for &i in &others {
        conns[i].echo("still-here-2")?;
    }
    Ok(())
}

fn tally(lab: &Lab, n: usize) -> Result<(std::collections::BTreeMap<String, usize>, usize)> {
    let vip = lab.vip();
    lab.client.run(move || {
        let mut t = std::collections::BTreeMap::new();
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

const UDP_PORT: u16 = 5353;

/// Restart under load: new TCP connections opened throughout, long-lived ones used throughout, and
/// a paced UDP stream; the agent is stopped (SIGTERM), then a second binary starts on the same
/// pinned maps and swaps its program into the pinned link. Nothing may fail or be lost. The L7
/// proxy runs in the agent, so it is away while the agent is: that gap is measured (a request
/// every 5 ms) and must end once the next agent is up.
#[test]
fn agent_restart_loses_no_request_and_no_datagram() -> Result<()> {
    restart_under_load("rst", false)
}

/// The same with the agent killed (SIGKILL) instead: a crash loses no flow and no datagram either,
/// since the pinned program forwards on its own until the next agent takes its maps over.
#[test]
fn agent_killed_loses_no_request_and_no_datagram() -> Result<()> {
    restart_under_load("kill", true)
}

fn restart_under_load(name: &str, kill: bool) -> Result<()> {
    let mut lab = Lab::new("lbt", name, Mode::Dsr, 3, false)?;
    lab.start_servers()?;
    let sinks: Vec<UdpSink> = lab
        .backends
        .iter()
        .map(|b| UdpSink::start(b, SocketAddr::new(VIP4.parse().expect("static"), UDP_PORT)))
        .collect::<Result<_>>()?;
    let mut udp_vip = format!(
        "\n[[vip]]\nname = \"dns\"\naddress = \"{VIP4}\"\nport = {UDP_PORT}\nprotocol = \"udp\"\nmode = \"dsr\"\n"
    );
    for i in 0..3 {
        udp_vip += &format!(
            "\n[[vip.backend]]\naddress = \"{}\"\n",
            lab.backend_addr(i, false)
        );
    }
    // The proxy on the balancer's own address, its upstreams the backends' servers.
    let services = lab.out_dir.join("services.toml");
    let mut doc = "[[service]]\nname = \"app\"\n".to_string();
    for i in 0..3 {
        doc += &format!(
            "[[service.instance]]\naddress = \"{}\"\nport = 80\n",
            lab.backend_addr(i, false)
        );
    }
    std::fs::write(&services, doc)?;
    udp_vip += &format!(
        "\n[[entrypoint]]\nname = \"web\"\naddress = \"0.0.0.0:8000\"\n\n\
         [[router]]\nname = \"all\"\nrule = \"PathPrefix(`/`)\"\nservice = \"app\"\n\n\
         [[providers.file]]\npath = \"{}\"\n",
        services.display()
    );
    lab.start_agent_with(&[1, 1, 1], &udp_vip, &lb_bin())?;
    lab.assert_native()?;
    let prog_before = xdp_prog_id(&lab)?;
    // The agent gave up what it never uses, from its bounding set too; it kept what it uses.
    let pid = lab.agent_pid().ok_or_else(|| anyhow::anyhow!("no agent"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let (eff, bnd) = (mask("CapEff:"), mask("CapBnd:"));
    // CAP_SYS_MODULE 16, CAP_SYS_RAWIO 17, CAP_SYS_PTRACE 19, CAP_SETUID 7, CAP_SYS_TIME 25
    for bit in [16, 17, 19, 7, 25] {
        ensure!(
            eff & (1 << bit) == 0 && bnd & (1 << bit) == 0,
            "capability {bit} kept: CapEff {eff:x}, CapBnd {bnd:x}"
        );
    }
    // CAP_BPF 39, CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21
    for bit in [39, 12, 21] {
        ensure!(
            eff & (1 << bit) != 0,
            "capability {bit} lost: CapEff {eff:x}"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (requests, tcp_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let vip = lab.vip();
    let tcp = {
        let (stop, requests, failed) = (stop.clone(), requests.clone(), tcp_failed.clone());
        lab.client.spawn(move || -> Result<()> {
            let mut long: Vec<Conn> = (0..20).map(|_| Conn::open(vip)).collect::<Result<_>>()?;
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for (i, c) in long.iter_mut().enumerate() {
                    if c.echo(&format!("{n}-{i}")).is_err() {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                }
                for _ in 0..10 {
                    if who(vip).is_err() {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
            }
            Ok(())
        })
    };
    let udp_sent = Arc::new(AtomicU64::new(0));
    let udp = {
        let (stop, sent) = (stop.clone(), udp_sent.clone());
        let target = SocketAddr::new(VIP4.parse().expect("static"), UDP_PORT);
        lab.client.spawn(move || -> Result<()> {
            // Four sockets: four flows, spread over the backends.
            let socks: Vec<std::net::UdpSocket> = (0..4)
                .map(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
                .collect::<Result<_, _>>()?;
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let s = &socks[(seq % 4) as usize];
                s.send_to(&seq.to_be_bytes(), target)?;
                seq += 1;
                sent.store(seq, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };

    let l7: SocketAddr = "10.0.0.2:8000".parse()?;
    let probes = {
        let stop = stop.clone();
        lab.client.spawn(move || {
            // (when the answer came, whether it was a 200)
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let ok = http(l7, "GET", "/", None, None).is_ok_and(|r| r.0 == 200);
                seen.push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };

    std::thread::sleep(Duration::from_millis(700));
    // A second agent on the same interface is refused, and the running one is not disturbed.
    let second = lab.lb.exec(&format!(
        "{} run --config {} 2>&1; echo exit=$?",
        lb_bin().display(),
        lab.out_dir.join("lb.toml").display()
    ))?;
    ensure!(
        second.contains("another lb agent") && !second.contains("exit=0"),
        "second agent: {second}"
    );
    let dead_from = Instant::now();
    if kill {
        lab.kill_agent()?;
    } else {
        lab.stop_agent()?;
    }
    // No agent at all for a while: the pinned program forwards on its own.
    std::thread::sleep(Duration::from_millis(700));
    let other_bin = lab.out_dir.join("lb-second-binary");
    std::fs::copy(lb_bin(), &other_bin)?;
    lab.start_agent_with(&[1, 1, 1], &udp_vip, &other_bin)?;
    let restarted = Instant::now();
    // The proxy answers again (its file provider read) before the load stops.
    let t0 = Instant::now();
    while !lab
        .client
        .run(move || http(l7, "GET", "/", None, None).is_ok_and(|r| r.0 == 200))?
    {
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "the proxy did not answer within 10 s of the restart"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    tcp.join()
        .map_err(|_| anyhow::anyhow!("tcp client panicked"))???;
    udp.join()
        .map_err(|_| anyhow::anyhow!("udp client panicked"))???;
    let probes = probes
        .join()
        .map_err(|_| anyhow::anyhow!("L7 prober panicked"))??;
    std::thread::sleep(Duration::from_millis(300));

    let prog_after = xdp_prog_id(&lab)?;
    let sent = udp_sent.load(Ordering::SeqCst);
    let mut seen = std::collections::BTreeSet::new();
    for s in &sinks {
        seen.extend(s.seen());
    }
    let lost = (0..sent).filter(|q| !seen.contains(q)).count();
    let (reqs, failed) = (
        requests.load(Ordering::SeqCst),
        tcp_failed.load(Ordering::SeqCst),
    );
    // The gap: the longest time between two answers of the proxy.
    let answers: Vec<Instant> = probes.iter().filter(|p| p.1).map(|p| p.0).collect();
    let gap = answers
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let refused = probes.iter().filter(|p| !p.1).count();
    let how = if kill { "SIGKILL" } else { "SIGTERM" };
    println!("restart after {how}: {reqs} TCP requests, {failed} failed; {sent} datagrams, {lost} lost; program id {prog_before} → {prog_after}");
    println!(
        "restart after {how}: L7 {} requests, {refused} not answered; longest gap {} ms (from \
         the signal to the next agent's API: {} ms, 700 of them with no agent)",
        probes.len(),
        gap.as_millis(),
        (restarted - dead_from).as_millis()
    );
    ensure!(
        answers.last().is_some_and(|t| *t > restarted),
        "the proxy answered nothing after the restart"
    );
    ensure!(
        failed == 0,
        "{failed} of {reqs} TCP requests failed across the restart"
    );
    ensure!(
        lost == 0,
        "{lost} of {sent} datagrams lost across the restart"
    );
    ensure!(
        prog_before != prog_after,
        "the new agent did not replace the program"
    );
    Ok(())
}

/// The id of the XDP program on the balancer's eth0.
fn xdp_prog_id(lab: &Lab) -> Result<u64> {
    let out = lab.lb.exec("ip -d link show eth0")?;
    out.split("prog/xdp id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no XDP program on eth0: {out}"))
}
