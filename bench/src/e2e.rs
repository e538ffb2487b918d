//! End to end over veth: packets per second and TCP connections per second through a balancer
//! namespace, for lb (the real agent, NAT mode, native XDP), the kernel doing the same balancing
//! with nftables DNAT (`jhash` map over the same 4 backends), and a bare XDP forward as the floor.
//!
//! Each contender gets its own three namespaces (client, balancer, backend) with identical
//! addressing, built once, so rounds interleave without re-plumbing:
//!
//! ```text
//!  client lbbc-V 10.10.0.1 ── lbbi-V 10.10.0.2 [balancer] lbbo-V 10.11.0.1 ── lbbk-V 10.11.0.11-14 backend
//! ```
//! Traffic for the packet rate comes from the project's own generator (`bench_gen`, run with
//! BPF_F_TEST_XDP_LIVE_FRAMES into the client veth: UDP to the VIP over 1,024 source ports) and is
//! counted where it arrives (`bench_sink` on the backend veth). Every veth uses threaded NAPI: the
//! balancer's two veths' threads are pinned to the "work" CPU and their run time is the balancer's
//! packet work; client, backend and generator stay on the "load" CPU.

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use etherparse::PacketBuilder;
use lb_common::bench::BenchFrame;
use lb_tests::netns::{enter, Netns};
use lb_userspace::l4::dataplane::{FLOOR_OBJECT, HARNESS_OBJECT};

use crate::{
    report::{col, Table},
    sys::{self, Cpus, Proc},
};

pub struct Opts {
    pub rounds: usize,
    pub secs: f64,
    pub cpus: Cpus,
    pub lb_bin: PathBuf,
    pub out: PathBuf,
}

const VIP: &str = "10.10.0.100";
const UDP_PORT: u16 = 9;
const TCP_PORT: u16 = 80;
const BACKENDS: u8 = 4;
/// Distinct flows the generator cycles through (its UDP source ports).
const FLOWS: u32 = 1024;
/// Frames per BPF_PROG_RUN call of the generator.
const GEN_BATCH: u32 = 100_000;
const CONN_THREADS: usize = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lb,
    Nft,
    Floor,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Lb => "lb",
            Kind::Nft => "nf",
            Kind::Floor => "fl",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Lb => "lb (XDP, NAT)",
            Kind::Nft => "nftables DNAT (jhash map)",
            Kind::Floor => "floor: bare XDP forward",
        }
    }
}

struct Contender {
    kind: Kind,
    client: Netns,
    mid: Netns,
    backend: Netns,
    /// The generator's frame (MACs of this topology).
    frame: Vec<u8>,
    client_ifindex: u32,
    sink: Option<Ebpf>,
    floor: Option<Ebpf>,
    agent: Option<Proc>,
    agent_log: PathBuf,
    pin_root: PathBuf,
}

impl Drop for Contender {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
        self.sink.take();
        self.floor.take();
        // The namespaces delete themselves after this (fields drop in order).
    }
}

fn dev(prefix: &str, k: Kind) -> String {
    format!("lbb{prefix}-{}", k.code())
}

/// `ip -o link show` of a device in `ns` (nsenter does not remount /sys, so sysfs would show the
/// host's devices): its MAC.
fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let s = ns.exec(&format!("ip -o link show dev {dev}"))?;
    let text = s
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no MAC for {dev} in {s:?}"))?;
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {text:?} for {dev}");
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16)?;
    }
    Ok(m)
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Writes to a sysfs file of a device inside a namespace (`ip netns exec` mounts that namespace's
/// /sys; nothing BPF happens in there).
fn sysfs_write(ns: &Netns, path: &str, value: &str) -> Result<()> {
    sys::run(&[
        "ip",
        "netns",
        "exec",
        &ns.name,
        "sh",
        "-c",
        &format!("echo {value} > {path}"),
    ])
    .map(|_| ())
}

fn ifindex_in(ns: &Netns, dev: &str) -> Result<u32> {
    let s = ns.exec(&format!("ip -o link show dev {dev}"))?;
    s.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("ifindex of {dev} in {s:?}"))
}

fn build(kind: Kind, o: &Opts) -> Result<Contender> {
    let c = kind.code();
    let client = Netns::new(&format!("lbb-e2e-{c}-c"))?;
    let mid = Netns::new(&format!("lbb-e2e-{c}-m"))?;
    let backend = Netns::new(&format!("lbb-e2e-{c}-b"))?;
    let (cd, id, od, kd) = (
        dev("c", kind),
        dev("i", kind),
        dev("o", kind),
        dev("k", kind),
    );
    client.exec(&format!(
        "ip link add {cd} type veth peer name {id} netns {}",
        mid.name
    ))?;
    mid.exec(&format!(
        "ip link add {od} type veth peer name {kd} netns {}",
        backend.name
    ))?;
    // Checksums complete on every sender (no partial checksums into an XDP path), GRO on every
    // receiver (frames injected with XDP_TX/REDIRECT need NAPI there), all up.
    for (ns, d) in [(&client, &cd), (&mid, &id), (&mid, &od), (&backend, &kd)] {
        ns.exec(&format!(
            "ip link set {d} up && ethtool -K {d} tx off >/dev/null && ethtool -K {d} gro off >/dev/null && ethtool -K {d} gro on >/dev/null"
        ))?;
    }
    client.exec(&format!(
        "ip addr add 10.10.0.1/24 dev {cd} && ip route add {VIP}/32 via 10.10.0.2 && \
         sysctl -qw net.ipv4.ip_local_port_range='1024 65000'"
    ))?;
    mid.exec(&format!(
        "ip addr add 10.10.0.2/24 dev {id} && ip addr add 10.11.0.1/24 dev {od} && \
         sysctl -qw net.ipv4.ip_forward=1"
    ))?;
    let addrs: String = (1..=BACKENDS)
        .map(|i| format!("ip addr add 10.11.0.{}/24 dev {kd} && ", 10 + i))
        .collect();
    backend.exec(&format!(
        "{addrs}ip route add default via 10.11.0.1 && sysctl -qw net.core.somaxconn=8192"
    ))?;
    let (cmac, imac, omac, kmac) = (
        mac_of(&client, &cd)?,
        mac_of(&mid, &id)?,
        mac_of(&mid, &od)?,
        mac_of(&backend, &kd)?,
    );
    // Static neighbours: no ARP in anything timed.
    client.exec(&format!(
        "ip neigh replace 10.10.0.2 lladdr {} dev {cd} nud permanent",
        mac_str(imac)
    ))?;
    let mut n = format!(
        "ip neigh replace 10.10.0.1 lladdr {} dev {id} nud permanent",
        mac_str(cmac)
    );
    for i in 1..=BACKENDS {
        n += &format!(
            " && ip neigh replace 10.11.0.{} lladdr {} dev {od} nud permanent",
            10 + i,
            mac_str(kmac)
        );
    }
    mid.exec(&n)?;
    backend.exec(&format!(
        "ip neigh replace 10.11.0.1 lladdr {} dev {kd} nud permanent",
        mac_str(omac)
    ))?;
    for (ns, d) in [(&client, &cd), (&mid, &id), (&mid, &od), (&backend, &kd)] {
        sysfs_write(ns, &format!("/sys/class/net/{d}/threaded"), "1")?;
    }

    // The receiving end: counts and drops the generator's UDP, passes TCP to the stack.
    let kd2 = kd.clone();
    let sink = backend.run(move || -> Result<Ebpf> {
        let mut e = Ebpf::load(FLOOR_OBJECT)?;
        let p: &mut Xdp = e
            .program_mut("bench_sink")
            .context("bench_sink")?
            .try_into()?;
        p.load()?;
        p.attach(&kd2, XdpMode::Driver)
            .with_context(|| format!("attaching bench_sink to {kd2}"))?;
        Ok(e)
    })??;

    let client_ifindex = ifindex_in(&client, &cd)?;
    let frame = gen_frame(cmac, imac)?;
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/lbb-e2e-{}", std::process::id()));
    let agent_log = o.out.join("agent.log");
    let mut ct = Contender {
        kind,
        client,
        mid,
        backend,
        frame,
        client_ifindex,
        sink: Some(sink),
        floor: None,
        agent: None,
        agent_log,
        pin_root,
    };
    match kind {
        Kind::Lb => start_agent(&mut ct, o, &id, &od)?,
        Kind::Nft => {
            let map: String = (0..BACKENDS)
                .map(|i| format!("{i} : 10.11.0.{}", 11 + i))
                .collect::<Vec<_>>()
                .join(", ");
            let rules = format!(
                "table ip lbb {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                 ip daddr {VIP} udp dport {UDP_PORT} dnat to jhash ip saddr . udp sport mod {BACKENDS} map {{ {map} }}\n    \
                 ip daddr {VIP} tcp dport {TCP_PORT} dnat to jhash ip saddr . tcp sport mod {BACKENDS} map {{ {map} }}\n  }}\n}}\n"
            );
            let path = o.out.join("nft.rules");
            std::fs::write(&path, rules)?;
            ct.mid.exec(&format!("nft -f {}", path.display()))?;
        }
        Kind::Floor => {
            let out_ifindex = ifindex_in(&ct.mid, &od)?;
            let id2 = id.clone();
            let e = ct.mid.run(move || -> Result<Ebpf> {
                let mut e = EbpfLoader::new()
                    .override_global("FWD_IFINDEX", &out_ifindex, true)
                    .override_global("FWD_DST_MAC", &kmac, true)
                    .override_global("FWD_SRC_MAC", &omac, true)
                    .load(FLOOR_OBJECT)?;
                let p: &mut Xdp = e
                    .program_mut("bench_fwd")
                    .context("bench_fwd")?
                    .try_into()?;
                p.load()?;
                p.attach(&id2, XdpMode::Driver)
                    .with_context(|| format!("attaching bench_fwd to {id2}"))?;
                Ok(e)
            })??;
            ct.floor = Some(e);
        }
    }
    Ok(ct)
}

fn start_agent(ct: &mut Contender, o: &Opts, id: &str, od: &str) -> Result<()> {
    let _ = std::fs::remove_dir_all(&ct.pin_root);
    let backends: String = (1..=BACKENDS)
        .map(|i| {
            format!(
                "\n[[vip.backend]]\naddress = \"10.11.0.{}\"\nport = 0\nweight = 1\n",
                10 + i
            )
        })
        .collect();
    let conf = format!(
        "[agent]\ninstance = \"e2e\"\npin_root = \"{pins}\"\nstate_dir = \"{state}\"\n\
         interfaces = [\"{id}\", \"{od}\"]\nxdp_mode = \"native\"\n\n\
         [dataplane]\nmax_vips = 4\nmax_backends = 64\n\n\
         [api]\nlisten = \"127.0.0.1:9090\"\ntoken = \"bench-token-0123456789\"\n\n\
         [[vip]]\nname = \"udp\"\naddress = \"{VIP}\"\nport = {UDP_PORT}\nprotocol = \"udp\"\nmode = \"nat\"\n{backends}\n\
         [[vip]]\nname = \"tcp\"\naddress = \"{VIP}\"\nport = {TCP_PORT}\nprotocol = \"tcp\"\nmode = \"nat\"\n{backends}",
        pins = ct.pin_root.display(),
        state = o.out.join("lb-state").display(),
    );
    let path = o.out.join("lb.toml");
    std::fs::write(&path, conf)?;
    let bin = o.lb_bin.display().to_string();
    let p = path.display().to_string();
    let mid_name = ct.mid.name.clone();
    ct.agent = Some(Proc::spawn(
        "lb agent",
        Some(&mid_name),
        None,
        &["env", "RUST_LOG=warn", &bin, "run", "--config", &p],
        &ct.agent_log,
    )?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = ct.mid.exec(&format!("ip -d link show {id}"))?;
        let b = ct.mid.exec(&format!("ip -d link show {od}"))?;
        if a.contains("prog/xdp") && b.contains("prog/xdp") {
            if a.contains("xdpgeneric") || b.contains("xdpgeneric") {
                bail!("lb attached in generic mode, not native");
            }
            return Ok(());
        }
        if let Some(agent) = ct.agent.as_mut() {
            agent.check_alive(&ct.agent_log)?;
        }
        if Instant::now() > deadline {
            bail!("the lb agent did not attach within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// UDP from the client to the VIP, checksum 0 ("none" in IPv4) so varying the source port keeps
/// the frame valid without recomputing anything.
fn gen_frame(src: [u8; 6], dst: [u8; 6]) -> Result<Vec<u8>> {
    let vip: std::net::Ipv4Addr = VIP.parse()?;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4([10, 10, 0, 1], vip.octets(), 64)
        .udp(10_000, UDP_PORT)
        .write(&mut out, &[0u8; 18])?;
    out[40] = 0;
    out[41] = 0;
    Ok(out)
}

/// Run time (ns) of the balancer's NAPI threads, after pinning them to `cpu`.
fn balancer_threads(k: Kind) -> Vec<i32> {
    let mut v = sys::kthreads(&format!("napi/{}-", dev("i", k)));
    v.extend(sys::kthreads(&format!("napi/{}-", dev("o", k))));
    v
}

fn pin_napi(k: Kind, cpus: Cpus) -> Result<Vec<i32>> {
    let work = balancer_threads(k);
    if work.is_empty() {
        bail!("no threaded NAPI kthreads for the balancer's veths");
    }
    for &t in &work {
        sys::pin_task(t, cpus.work)?;
    }
    for d in [dev("c", k), dev("k", k)] {
        for t in sys::kthreads(&format!("napi/{d}-")) {
            sys::pin_task(t, cpus.load)?;
        }
    }
    Ok(work)
}

fn napi_ns(threads: &[i32]) -> u64 {
    threads.iter().map(|&t| sys::task_cpu_ns(t)).sum()
}

fn sink_count(ct: &mut Contender) -> Result<u64> {
    let e = ct.sink.as_mut().context("sink")?;
    let m: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(e.map("SINK_COUNT").context("SINK_COUNT")?)?;
    Ok(m.get(&0, 0)?.iter().sum())
}

/// Runs the live-frames generator into the client veth for `secs`: frames sent.
fn generate(ct: &Contender, cpu: usize, secs: f64) -> Result<(u64, Duration)> {
    let frame = ct.frame.clone();
    let ifindex = ct.client_ifindex;
    ct.client.run(move || -> Result<(u64, Duration)> {
        sys::pin_thread(cpu)?;
        let mut e = Ebpf::load(HARNESS_OBJECT).context("loading lb-harness")?;
        let p: &mut Xdp = e
            .program_mut("bench_gen")
            .context("bench_gen")?
            .try_into()?;
        p.load().context("the verifier rejected bench_gen")?;
        let mut fm: Array<MapData, BenchFrame> =
            Array::try_from(e.take_map("FRAME").context("FRAME")?)?;
        // Source port at 14 (Ethernet) + 20 (IPv4): 1,024 flows.
        let f = BenchFrame::varying(&frame, 34, 2, FLOWS).ok_or_else(|| anyhow!("frame"))?;
        fm.set(0, f, 0)?;
        let p: &Xdp = e.program("bench_gen").context("bench_gen")?.try_into()?;
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.ctx_in = Some(&ctx);
            opts.repeat = GEN_BATCH;
            opts.attrs = TestRunAttrs::new().xdp_live_frames(0);
            p.test_run(opts).context("BPF_PROG_RUN (live frames)")?;
            sent += GEN_BATCH as u64;
        }
        Ok((sent, t0.elapsed()))
    })?
}

struct PpsResult {
    sent_pps: f64,
    delivered_pps: f64,
    ns_per_packet: Option<f64>,
}

fn pps(ct: &mut Contender, cpus: Cpus, secs: f64) -> Result<PpsResult> {
    let threads = pin_napi(ct.kind, cpus)?;
    let before = sink_count(ct)?;
    let cpu0 = napi_ns(&threads);
    let (sent, wall) = generate(ct, cpus.load, secs)?;
    // Let the rings drain before counting.
    std::thread::sleep(Duration::from_millis(200));
    let cpu = napi_ns(&threads).saturating_sub(cpu0);
    let delivered = sink_count(ct)?.saturating_sub(before);
    if delivered == 0 {
        bail!("{}: no packet reached the backend", ct.kind.label());
    }
    Ok(PpsResult {
        sent_pps: sent as f64 / wall.as_secs_f64(),
        delivered_pps: delivered as f64 / wall.as_secs_f64(),
        ns_per_packet: Some(cpu as f64 / delivered as f64),
    })
}

/// Accepts and resets every connection (no TIME_WAIT on either side), until dropped.
struct Acceptor {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn set_linger0(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn acceptor(ct: &Contender, cpu: usize) -> Result<Acceptor> {
    let listener = ct.backend.run(|| -> Result<TcpListener> {
        let l = TcpListener::bind(("0.0.0.0", TCP_PORT))?;
        // SAFETY: a listening socket; a larger backlog only.
        unsafe { libc::listen(l.as_raw_fd(), 8192) };
        l.set_nonblocking(true)?;
        Ok(l)
    })??;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let _ = sys::pin_thread(cpu);
        while !s.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((c, _)) => {
                    set_linger0(c.as_raw_fd());
                    drop(c);
                }
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
    Ok(Acceptor {
        stop,
        handle: Some(handle),
    })
}

struct ConnResult {
    rate: f64,
    failed: u64,
    us_per_conn: Option<f64>,
}

/// Connections opened (SYN, SYN-ACK, ACK) and reset by the backend, from several client threads.
fn conn_rate(ct: &Contender, cpus: Cpus, secs: f64) -> Result<ConnResult> {
    let threads = pin_napi(ct.kind, cpus)?;
    let _acceptor = acceptor(ct, cpus.load)?;
    let vip: SocketAddr = format!("{VIP}:{TCP_PORT}").parse()?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let path = format!("/run/netns/{}", ct.client.name);
    let cpu0 = napi_ns(&threads);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..CONN_THREADS)
        .map(|_| {
            let (d, f, p) = (done.clone(), failed.clone(), path.clone());
            let load = cpus.load;
            std::thread::spawn(move || -> Result<()> {
                enter(&p)?;
                sys::pin_thread(load)?;
                let t = Instant::now();
                while t.elapsed().as_secs_f64() < secs {
                    match TcpStream::connect_timeout(&vip, Duration::from_secs(1)) {
                        Ok(mut s) => {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                            let mut b = [0u8; 1];
                            // The backend resets the connection: read returns an error or 0.
                            let _ = s.read(&mut b);
                            set_linger0(s.as_raw_fd());
                            d.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if f.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("lb-bench: e2e: first failed connect: {e}");
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow!("client thread panicked"))??;
    }
    let wall = t0.elapsed();
    let cpu = napi_ns(&threads).saturating_sub(cpu0);
    let n = done.load(Ordering::SeqCst);
    if n == 0 {
        bail!("{}: no connection completed", ct.kind.label());
    }
    Ok(ConnResult {
        rate: n as f64 / wall.as_secs_f64(),
        failed: failed.load(Ordering::SeqCst),
        us_per_conn: Some(cpu as f64 / 1000.0 / n as f64),
    })
}

pub fn run(o: &Opts) -> Result<Vec<Table>> {
    if sys::run(&["sh", "-c", "command -v nft"]).is_err() {
        bail!("nft is missing (cargo xtask bench installs nftables)");
    }
    let _ = std::fs::remove_dir_all(&o.out);
    std::fs::create_dir_all(&o.out)?;
    let mut all = vec![
        build(Kind::Floor, o)?,
        build(Kind::Lb, o)?,
        build(Kind::Nft, o)?,
    ];
    let mut pps_t = Table::new(
        "e2e_pps",
        "End to end over veth: UDP packet rate",
        vec![
            col("delivered", "Mpps", 3),
            col("offered", "Mpps", 2),
            col("balancer CPU", "ns/packet", 0),
        ],
    );
    let mut conn_t = Table::new(
        "e2e_conn",
        "End to end over veth: TCP connection rate",
        vec![
            col("connections/s", "", 0),
            col("balancer CPU", "µs/connection", 2),
            col("failed connects", "", 0),
        ],
    );
    for c in &all {
        pps_t.row(c.kind.label());
        if c.kind != Kind::Floor {
            conn_t.row(c.kind.label());
        }
    }
    for round in 0..o.rounds {
        let n = all.len();
        for k in 0..n {
            let c = &mut all[(k + round) % n];
            let r = pps(c, o.cpus, o.secs)?;
            let row = c.kind.label();
            pps_t.add(row, "delivered", r.delivered_pps / 1e6);
            pps_t.add(row, "offered", r.sent_pps / 1e6);
            if let Some(ns) = r.ns_per_packet {
                pps_t.add(row, "balancer CPU", ns);
            }
        }
        for k in 0..n {
            let c = &mut all[(k + round) % n];
            if c.kind == Kind::Floor {
                continue;
            }
            let r = conn_rate(c, o.cpus, o.secs)?;
            let row = c.kind.label();
            conn_t.add(row, "connections/s", r.rate);
            conn_t.add(row, "failed connects", r.failed as f64);
            if let Some(us) = r.us_per_conn {
                conn_t.add(row, "balancer CPU", us);
            }
        }
        for c in &mut all {
            if let Some(a) = c.agent.as_mut() {
                a.check_alive(&c.agent_log)?;
            }
        }
    }
    pps_t.note(format!(
        "{} interleaved rounds × {} s. Generator: lb-ebpf `bench_gen` with BPF_F_TEST_XDP_LIVE_FRAMES \
         into the client veth (UDP, {FLOWS} flows by source port), pinned to CPU {}; counted by \
         `bench_sink` (XDP) on the backend veth. Balancer CPU: run time of the balancer \
         namespace's threaded-NAPI kthreads (both veths, pinned to CPU {}) ÷ packets delivered. \
         lb: the agent (release build), NAT VIP with 4 backends, native XDP on both veths; \
         nftables: `dnat to jhash ip saddr . udp sport mod 4 map {{…}}` with forwarding; floor: \
         `bench_fwd` (MAC rewrite + XDP_REDIRECT, no lookup).",
        o.rounds, o.secs, o.cpus.load, o.cpus.work
    ));
    conn_t.note(format!(
        "{CONN_THREADS} client threads connect to the VIP in a loop (1 s connect timeout); the backend accepts and resets \
         (SO_LINGER 0: no TIME_WAIT); replies return through the balancer (lb: its NAT reverse path; \
         nftables: conntrack). Client and backend on CPU {}, the balancer's NAPI threads on CPU {}. \
         The floor does not translate addresses, so it has no connection rate.",
        o.cpus.load, o.cpus.work
    ));
    drop(all);
    Ok(vec![pps_t, conn_t])
}
