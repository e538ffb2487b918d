//! Packet fixtures: the XDP program run with BPF_PROG_TEST_RUN on crafted frames, asserting the
//! verdict and the exact output bytes. Expected frames are built by `etherparse`, which computes
//! its own IP and L4 checksums: the product's incremental checksum code is checked against an
//! independent implementation, never against itself.
//!
//! Most fixtures are entries of one table (`fixtures!`, as Katran's `lib/testing/fixtures`): a
//! test is a list of cases {what, interface, input, verdict, output, reason counter}, run in order
//! on one program, and adding a case is one line. What a table cannot say stays code: properties
//! over many flows (conntrack, drains, Maglev on ICMP) and the malformed-frame classes, each tried
//! against a VIP of every mode and family.
//!
//! Needs root and BPF. Each test runs in a thread with a private network namespace (made with
//! unshare, gone when the thread ends) and its own pin root, removed on drop.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use etherparse::{
    IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4Options, PacketBuilder, VlanId,
};
use lb_common::{Flow, FlowKey, NatReverse, Reason};
use lb_userspace::{
    l4::dataplane::{self, Dataplane},
    l4::{Balancer, Desired},
    model::instance::InstanceKey,
    model::{BackendMode, BackendSpec, Limits, Mac, Mode, Protocol, VipSpec},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const BACKEND2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// The lb's backend-side interface in the NAT fixtures' namespace.
const LB_B0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];

const CLIENT: [u8; 4] = [10, 0, 0, 1];
const DSR_VIP: [u8; 4] = [10, 0, 0, 100];
const NAT_VIP: [u8; 4] = [10, 0, 0, 101];
const UDP_VIP: [u8; 4] = [10, 0, 0, 102];
const WILD_VIP: [u8; 4] = [10, 0, 0, 103];
const EMPTY_VIP: [u8; 4] = [10, 0, 0, 104];
const TWO_VIP: [u8; 4] = [10, 0, 0, 105];
const NAT_BACKEND: [u8; 4] = [10, 1, 0, 5];
const UNRESOLVED_BACKEND: [u8; 4] = [10, 1, 0, 6];
const NONEIGH_VIP: [u8; 4] = [10, 0, 0, 106];
const NAT_UDP_VIP: [u8; 4] = [10, 0, 0, 107];
const LOCAL_VIP: [u8; 4] = [10, 0, 0, 108];
const IPIP_VIP: [u8; 4] = [10, 0, 0, 109];
const IPIP_BACKEND: [u8; 4] = [10, 0, 1, 1];
const IPIP_VIP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2];
const IPIP_BACKEND6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11, 1];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DSR_VIP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
const NAT_VIP6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1];
const NAT_BACKEND6: [u8; 16] = [0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}

fn backend(addr: IpAddr, port: u16, mac: Option<[u8; 6]>) -> BackendSpec {
    BackendSpec {
        address: addr,
        port,
        weight: 1,
        mac: mac.map(Mac),
    }
}

fn vip(
    name: &str,
    address: IpAddr,
    port: u16,
    protocol: Protocol,
    mode: Mode,
    backends: Vec<BackendSpec>,
) -> VipSpec {
    VipSpec {
        name: name.into(),
        address,
        port,
        protocol,
        mode,
        service: name.into(),
        backends,
        health: None,
    }
}

/// A VIP's configured backends as the control loop would hand them to the balancer.
fn desired(spec: &VipSpec, state: impl Fn(&BackendSpec) -> Option<BackendMode>) -> Vec<Desired> {
    spec.backends
        .iter()
        .filter_map(|b| {
            let state = state(b)?;
            let key = InstanceKey {
                address: b.address,
                port: b.port,
            };
            Some(Desired {
                key,
                weight: b.weight,
                mac: b.mac,
                state,
            })
        })
        .collect()
}

fn fixture_vips() -> Vec<VipSpec> {
    use Mode::*;
    use Protocol::*;
    let b1 = backend(ip4([10, 0, 1, 1]), 0, Some(BACKEND_MAC));
    let b2 = backend(ip4([10, 0, 1, 2]), 0, Some(BACKEND2_MAC));
    vec![
        vip("dsr", ip4(DSR_VIP), 80, Tcp, Dsr, vec![b1.clone()]),
        vip(
            "nat",
            ip4(NAT_VIP),
            80,
            Tcp,
            Nat,
            vec![backend(ip4(NAT_BACKEND), 8080, None)],
        ),
        vip("udp", ip4(UDP_VIP), 53, Udp, Dsr, vec![b1.clone()]),
        vip("wild", ip4(WILD_VIP), 0, Udp, Dsr, vec![b1.clone()]),
        vip("empty", ip4(EMPTY_VIP), 80, Tcp, Dsr, vec![]),
        vip("two", ip4(TWO_VIP), 80, Tcp, Dsr, vec![b1.clone(), b2]),
        vip(
            "noneigh",
            ip4(NONEIGH_VIP),
            80,
            Tcp,
            Nat,
            vec![backend(ip4(UNRESOLVED_BACKEND), 0, None)],
        ),
        vip(
            "nat-udp",
            ip4(NAT_UDP_VIP),
            53,
            Udp,
            Nat,
            vec![backend(ip4(NAT_BACKEND), 5300, None)],
        ),
        vip("local", ip4(LOCAL_VIP), 443, Tcp, Local, vec![]),
        vip(
            "ipip",
            ip4(IPIP_VIP),
            80,
            Tcp,
            Ipip,
            vec![backend(ip4(IPIP_BACKEND), 0, Some(BACKEND_MAC))],
        ),
        vip(
            "ipip6",
            IpAddr::from(IPIP_VIP6),
            80,
            Tcp,
            Ipip,
            vec![backend(IpAddr::from(IPIP_BACKEND6), 0, Some(BACKEND_MAC))],
        ),
        vip("dsr6", IpAddr::from(DSR_VIP6), 80, Tcp, Dsr, vec![b1]),
        vip(
            "nat6",
            IpAddr::from(NAT_VIP6),
            80,
            Tcp,
            Nat,
            vec![backend(IpAddr::from(NAT_BACKEND6), 8080, None)],
        ),
        // UDP beside the TCP VIPs above, so every mode and family has a UDP VIP too.
        vip(
            "ipip-udp",
            ip4(IPIP_VIP),
            53,
            Udp,
            Ipip,
            vec![backend(ip4(IPIP_BACKEND), 0, Some(BACKEND_MAC))],
        ),
        vip(
            "udp6",
            IpAddr::from(DSR_VIP6),
            53,
            Udp,
            Dsr,
            vec![backend(ip4([10, 0, 1, 1]), 0, Some(BACKEND_MAC))],
        ),
        vip(
            "nat-udp6",
            IpAddr::from(NAT_VIP6),
            53,
            Udp,
            Nat,
            // Not nat-udp's port: `nat_reply_gate_follows_the_backends` closes that port's gate.
            vec![backend(IpAddr::from(NAT_BACKEND6), 5306, None)],
        ),
        vip(
            "ipip-udp6",
            IpAddr::from(IPIP_VIP6),
            53,
            Udp,
            Ipip,
            vec![backend(IpAddr::from(IPIP_BACKEND6), 0, Some(BACKEND_MAC))],
        ),
    ]
}

/// A loaded program with the fixture VIPs, inside the calling thread's network namespace.
struct Env {
    balancer: Option<Balancer>,
    pin_root: PathBuf,
}

impl Env {
    fn new() -> Env {
        Env::with_udp_timeout(30)
    }

    fn with_udp_timeout(udp_timeout_secs: u64) -> Env {
        let pin_root = PathBuf::from(format!(
            "/sys/fs/bpf/lb-test-packet-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let limits = Limits {
            max_vips: 32,
            max_backends: 64,
            ring_size: 1021,
            max_flows: 4096,
            udp_timeout_secs,
            ipip_source_v4: "172.16.0.0".parse().expect("static"),
            ipip_source_v6: "fd00:ffff::".parse().expect("static"),
        };
        let dp = Dataplane::open(&pin_root, "t", &limits, false).expect("load program");
        let mut balancer = Balancer::new(dp, &fixture_vips()).expect("program maps");
        for v in fixture_vips() {
            let all = desired(&v, |_| Some(BackendMode::Active));
            balancer.apply(&v.name, &all).expect("apply");
        }
        Env {
            balancer: Some(balancer),
            pin_root,
        }
    }

    fn b(&mut self) -> &mut Balancer {
        self.balancer.as_mut().expect("balancer")
    }

    fn run(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.b()
            .dataplane()
            .test_run(frame, ifindex)
            .expect("test run")
    }

    fn reason(&mut self, r: Reason) -> u64 {
        let all = self.b().dataplane().reason_counters().expect("counters");
        all.into_iter()
            .find(|(x, _)| *x == r)
            .map(|(_, n)| n)
            .unwrap_or(0)
    }
}

impl Env {
    /// One of the connection-tracking maps, opened from its pin as any other observer would.
    fn pinned<V: aya::Pod>(
        &self,
        name: &str,
    ) -> aya::maps::HashMap<aya::maps::MapData, FlowKey, V> {
        use aya::maps::{HashMap, Map, MapData};
        let path = dataplane::pin_dir(&self.pin_root, "t").join(name);
        let data = MapData::from_pin(path).expect(name);
        HashMap::try_from(Map::LruHashMap(data)).expect(name)
    }

    /// How many (flows, reverse entries) connection tracking holds.
    fn state(&self) -> (usize, usize) {
        let count = |keys: aya::maps::MapKeys<'_, FlowKey>| keys.filter(Result::is_ok).count();
        (
            count(self.pinned::<Flow>("FLOWS").keys()),
            count(self.pinned::<NatReverse>("NAT_REVERSE").keys()),
        )
    }

    fn clear_state(&self) {
        let mut flows = self.pinned::<Flow>("FLOWS");
        let mut reverse = self.pinned::<NatReverse>("NAT_REVERSE");
        let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
        keys.iter()
            .for_each(|k| flows.remove(k).expect("remove flow"));
        let keys: Vec<FlowKey> = reverse.keys().filter_map(Result::ok).collect();
        keys.iter()
            .for_each(|k| reverse.remove(k).expect("remove reverse entry"));
    }

    /// Runs a frame that must reach the stack exactly as it came, creating no state, and says
    /// how it did not: the verdict, a changed byte, a new flow or reverse entry, or a reason
    /// other than `pass_truncated` (the counter of frames whose headers the program cannot trust).
    fn untouched(&mut self, what: &str, frame: &[u8], ifindex: u32) -> Option<String> {
        let reasons = |env: &mut Env| env.b().dataplane().reason_counters().expect("counters");
        self.clear_state();
        let counted = reasons(self);
        let (verdict, out) = self.run(frame, ifindex);
        let mut wrong = Vec::new();
        if verdict != XDP_PASS {
            wrong.push(format!("verdict {verdict}"));
        }
        if out != frame {
            wrong.push("frame rewritten".to_string());
        }
        let state = self.state();
        if state != (0, 0) {
            wrong.push(format!("created (flows, reverse) {state:?}"));
        }
        let moved: Vec<&str> = reasons(self)
            .iter()
            .zip(&counted)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0.name())
            .collect();
        if moved != ["pass_truncated"] {
            wrong.push(format!("counted as {moved:?}"));
        }
        (!wrong.is_empty()).then(|| format!("{what}: {}", wrong.join(", ")))
    }
}

/// Fails with every case that went wrong, so one run shows the whole class.
fn assert_all_untouched(failures: Vec<String>, total: usize) {
    assert!(
        failures.is_empty(),
        "{} of {total} malformed frames were not passed untouched:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.balancer.take());
        let _ = dataplane::detach(&self.pin_root, "t");
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// Runs `f` on a thread in a fresh, unnamed network namespace (nothing to clean up: it dies with
/// the thread).
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns (root?)");
        f()
    })
    .join()
    .expect("fixture thread panicked")
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

/// NAT fixtures' namespace: c0 (client side, 10.0.0.2/24) and b0 (backend side, 10.1.0.1/24),
/// each the end of a veth pair, with static neighbours so FIB lookups have fixed answers.
/// Returns (c0 ifindex, b0 ifindex).
fn nat_topology() -> (u32, u32) {
    sh(
        "ip link add c0 address 02:00:00:00:00:02 type veth peer name c1 &&
        ip link add b0 address 02:00:00:00:02:02 type veth peer name b1 &&
        ip link set c0 up && ip link set c1 up && ip link set b0 up && ip link set b1 up &&
        ip addr add 10.0.0.2/24 dev c0 && ip addr add 10.1.0.1/24 dev b0 &&
        ip -6 addr add fd00::2/64 dev c0 nodad && ip -6 addr add fd01::1/64 dev b0 nodad &&
        ip neigh add 10.0.0.1 lladdr 02:00:00:00:00:01 dev c0 nud permanent &&
        ip neigh add 10.1.0.5 lladdr 02:00:00:00:01:01 dev b0 nud permanent &&
        ip -6 neigh add fd00::1 lladdr 02:00:00:00:00:01 dev c0 nud permanent &&
        ip -6 neigh add fd01::5 lladdr 02:00:00:00:01:01 dev b0 nud permanent &&
        sysctl -qw net.ipv4.ip_forward=1 && sysctl -qw net.ipv6.conf.all.forwarding=1",
    );
    let idx = |n: &str| nix::net::if_::if_nametoindex(n).expect("ifindex");
    (idx("c0"), idx("b0"))
}

// ------------------------------------------------------------------ frame builders

#[allow(clippy::too_many_arguments)] // every argument is a header field the fixture sets
fn tcp4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    ttl: u8,
    syn: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, ttl)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload: &[u8] = if syn { &[] } else { b"hello" };
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build frame");
    out
}

fn udp4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    ttl: u8,
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, ttl)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .expect("build frame");
    out
}

fn tcp6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    hops: u8,
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, hops)
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("build frame");
    out
}

fn udp6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    hops: u8,
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, hops)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .expect("build frame");
    out
}

/// `frame` with its Ethernet addresses replaced: what DSR must produce.
fn with_macs(frame: &[u8], src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

// ------------------------------------------------------------------ the fixture table

/// Which interface a frame arrives on: none in particular (ifindex 0), or one of
/// [`nat_topology`]'s ends.
#[derive(Clone, Copy)]
enum Port {
    Any,
    C0,
    B0,
}

/// What the program must hand back.
enum Out {
    /// The frame as it came.
    Same,
    /// The frame as it came with these Ethernet addresses (source, destination): DSR.
    Macs([u8; 6], [u8; 6]),
    /// Exactly these bytes (built independently, by etherparse).
    Frame(Vec<u8>),
    /// Whatever bytes: only the verdict is the point.
    Any,
}

/// One frame of a fixture: what it is, where it arrives, the verdict and output it must get, and
/// the reason counter it must move by one.
struct Case {
    what: &'static str,
    port: Port,
    input: Vec<u8>,
    verdict: u32,
    output: Out,
    counts: Option<Reason>,
}

impl Case {
    fn new(what: &'static str, input: Vec<u8>, verdict: u32, output: Out) -> Case {
        Case {
            what,
            port: Port::Any,
            input,
            verdict,
            output,
            counts: None,
        }
    }
    /// Passed to the stack untouched.
    fn pass(what: &'static str, input: Vec<u8>) -> Case {
        Case::new(what, input, XDP_PASS, Out::Same)
    }
    /// Transmitted back out with the backend's MAC: DSR to [`BACKEND_MAC`].
    fn dsr(what: &'static str, input: Vec<u8>) -> Case {
        Case::new(what, input, XDP_TX, Out::Macs(LB_MAC, BACKEND_MAC))
    }
    fn on(mut self, port: Port) -> Case {
        self.port = port;
        self
    }
    fn counts(mut self, reason: Reason) -> Case {
        self.counts = Some(reason);
        self
    }
}

/// Runs a fixture's cases in order on one program (later cases may rely on the flows earlier
/// ones created), in a fresh namespace, with `nat_topology` when a case arrives on one of its
/// ends. Every case is checked and every failure reported together; `then` asserts the rest.
fn run_fixture(test: &str, cases: Vec<Case>, then: Option<fn(&mut Env, &[Case])>) {
    let test = test.to_string();
    in_netns(move || {
        let nat = cases.iter().any(|c| !matches!(c.port, Port::Any));
        let (c0, b0) = if nat { nat_topology() } else { (0, 0) };
        let mut env = Env::new();
        let mut failures = Vec::new();
        for c in &cases {
            let ifindex = match c.port {
                Port::Any => 0,
                Port::C0 => c0,
                Port::B0 => b0,
            };
            let before = c.counts.map(|r| env.reason(r));
            let (verdict, out) = env.run(&c.input, ifindex);
            if verdict != c.verdict {
                failures.push(format!("{}: verdict {verdict}, want {}", c.what, c.verdict));
            }
            let want = match &c.output {
                Out::Same => Some(c.input.clone()),
                Out::Macs(src, dst) => Some(with_macs(&c.input, *src, *dst)),
                Out::Frame(f) => Some(f.clone()),
                Out::Any => None,
            };
            if want.is_some_and(|w| w != out) {
                failures.push(format!(
                    "{}: output differs from the expected bytes",
                    c.what
                ));
            }
            if let (Some(r), Some(n)) = (c.counts, before) {
                let moved = env.reason(r) - n;
                if moved != 1 {
                    failures.push(format!("{}: {} moved by {moved}, want 1", c.what, r.name()));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{test}: {} of {} cases failed:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        if let Some(then) = then {
            then(&mut env, &cases);
        }
    });
}

/// The table: each entry is a test (the name it always had) with its cases in order, and
/// optionally a check of what the cases left behind. Adding a case is one more `Case` line.
macro_rules! fixtures {
    ($( $(#[$doc:meta])* $test:ident: [ $($case:expr),* $(,)? ] $(then $then:expr)? ;)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $test() {
                #[allow(unused_mut, unused_assignments)]
                let mut then: Option<fn(&mut Env, &[Case])> = None;
                $( then = Some($then); )?
                run_fixture(stringify!($test), vec![$($case),*], then);
            }
        )*
    };
}

fixtures! {
    syn_to_vip_dsr_rewrites_macs_and_transmits: [
        Case::dsr("SYN to the DSR VIP", tcp4(CLIENT_MAC, LB_MAC, CLIENT, DSR_VIP, 40000, 80, 64, true))
            .counts(Reason::TxDsr),
    ] then |env, cases| {
        let views = env.b().list().expect("list");
        let v = views.iter().find(|v| v.name == "dsr").expect("vip");
        assert_eq!((v.counters.packets, v.counters.new_flows), (1, 1));
        assert_eq!(v.backends[0].counters.bytes, cases[0].input.len() as u64);
    };

    non_vip_packet_passes_untouched: [
        Case::pass("another address", tcp4(CLIENT_MAC, LB_MAC, CLIENT, [10, 0, 0, 200], 40000, 22, 64, true))
            .counts(Reason::PassNotVip),
        Case::pass("the VIP's address, another port", tcp4(CLIENT_MAC, LB_MAC, CLIENT, DSR_VIP, 40000, 81, 64, true))
            .counts(Reason::PassNotVip),
        Case::pass("ARP is not IP", arp()).counts(Reason::PassNotIp),
    ];

    truncated_headers_pass_untouched: [
        // BPF_PROG_TEST_RUN refuses frames under 14 bytes, so the L2 cut is inside a VLAN tag.
        Case::pass("cut inside the VLAN tag", {
            let mut f = dsr_syn()[..12].to_vec();
            f.extend_from_slice(&[0x81, 0x00, 0x00]);
            f
        })
        .counts(Reason::PassTruncated),
        Case::pass("cut inside IPv4", dsr_syn()[..14 + 12].to_vec()).counts(Reason::PassTruncated),
        Case::pass("cut inside TCP, ports present", dsr_syn()[..14 + 20 + 10].to_vec())
            .counts(Reason::PassTruncated),
        // An IHL below 5 is malformed, not a shorter header.
        Case::pass("IHL 4", mutated(&dsr_syn(), |f| f[14] = 0x44)).counts(Reason::PassTruncated),
    ];

    ipv4_with_options_is_parsed_past_them: [
        Case::dsr("8 bytes of options", with_options(80)),
        // The same options with a port that is not the VIP's: the port was read after them.
        Case::new("8 bytes of options, another port", with_options(81), XDP_PASS, Out::Any),
    ];

    ipv6_syn_to_vip_dsr: [
        Case::dsr("IPv6 SYN", tcp6(CLIENT_MAC, LB_MAC, CLIENT6, DSR_VIP6, 40000, 80, 64)),
    ];

    udp_to_vip_dsr: [
        Case::dsr("UDP query", udp4(CLIENT_MAC, LB_MAC, CLIENT, UDP_VIP, 5353, 53, 64)),
        // TCP to the UDP VIP's port is another VIP key: not ours.
        Case::new(
            "TCP to the UDP VIP's port",
            tcp4(CLIENT_MAC, LB_MAC, CLIENT, UDP_VIP, 5353, 53, 64, true),
            XDP_PASS,
            Out::Any,
        ),
    ];

    vlan_tagged_frame_keeps_its_tag: [
        Case::dsr("VLAN 100", {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .single_vlan(VlanId::try_new(100).expect("vlan"))
                .ipv4(CLIENT, DSR_VIP, 64)
                .tcp(40000, 80, 1, 64240)
                .syn()
                .write(&mut f, &[])
                .expect("frame");
            assert_eq!(&f[12..14], &[0x81, 0x00]);
            f
        }),
    ];

    /// First fragment (has the UDP header) and a later one (has none): the same backend. A
    /// fragment for a VIP that has only a port entry cannot be steered: the stack gets it.
    fragments_follow_addresses_through_a_wildcard_vip: [
        Case::dsr(
            "first fragment",
            fragment4(WILD_VIP, true, 0, &[0x13, 0x88, 0x00, 0x35, 0, 24, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
        ),
        Case::dsr("later fragment", fragment4(WILD_VIP, false, 2, &[9u8; 8])),
        Case::pass("fragment for a port VIP", fragment4(UDP_VIP, false, 2, &[9u8; 8]))
            .counts(Reason::PassFragment),
    ];

    /// Local VIPs have no backends and must not drop.
    local_vip_passes_to_the_host: [
        Case::pass("SYN to a local VIP", tcp4(CLIENT_MAC, LB_MAC, CLIENT, LOCAL_VIP, 40000, 443, 64, true))
            .counts(Reason::PassLocal),
    ];

    /// The kernel answers Time Exceeded; the same flow with a live TTL is then created whole:
    /// its reply is translated back.
    nat_expiring_ttl_creates_no_flow: [
        Case::pass("TTL 1", tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, 40100, 80, 1, true))
            .on(Port::C0)
            .counts(Reason::PassTtl),
        Case::new("TTL 64", tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, 40100, 80, 64, true), XDP_REDIRECT, Out::Any)
            .on(Port::C0),
        Case::new(
            "the reply",
            tcp4(BACKEND_MAC, LB_B0_MAC, NAT_BACKEND, CLIENT, 8080, 40100, 64, false),
            XDP_REDIRECT,
            Out::Any,
        )
        .on(Port::B0),
    ];

    vip_without_backends_drops: [
        Case::new("SYN to a VIP with no backend", tcp4(CLIENT_MAC, LB_MAC, CLIENT, EMPTY_VIP, 40000, 80, 64, true), XDP_DROP, Out::Any)
            .counts(Reason::DropNoBackend),
    ];

    /// Destination rewritten to the backend's address and port, TTL decremented, next-hop MACs
    /// from the FIB (etherparse recomputes both checksums from scratch); a data packet of the
    /// same flow (its payload changes the L4 checksum base); the backend's reply, arriving on b0,
    /// gets the VIP as its source again and goes out of c0 to the client. A reply-shaped packet
    /// of a flow the balancer never saw is not ours.
    nat_rewrites_destination_and_redirects_then_reverses_the_reply: [
        Case::new(
            "SYN",
            tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, 40000, 80, 64, true),
            XDP_REDIRECT,
            Out::Frame(tcp4(LB_B0_MAC, BACKEND_MAC, CLIENT, NAT_BACKEND, 40000, 8080, 63, true)),
        )
        .on(Port::C0)
        .counts(Reason::RedirectNat),
        Case::new(
            "data",
            tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, 40000, 80, 64, false),
            XDP_REDIRECT,
            Out::Frame(tcp4(LB_B0_MAC, BACKEND_MAC, CLIENT, NAT_BACKEND, 40000, 8080, 63, false)),
        )
        .on(Port::C0)
        .counts(Reason::RedirectNat),
        Case::new(
            "the reply",
            tcp4(BACKEND_MAC, LB_B0_MAC, NAT_BACKEND, CLIENT, 8080, 40000, 64, false),
            XDP_REDIRECT,
            Out::Frame(tcp4(LB_MAC, CLIENT_MAC, NAT_VIP, CLIENT, 80, 40000, 63, false)),
        )
        .on(Port::B0)
        .counts(Reason::NatReply),
        Case::pass(
            "a stray reply",
            tcp4(BACKEND_MAC, LB_B0_MAC, NAT_BACKEND, CLIENT, 8080, 40999, 64, false),
        )
        .on(Port::B0),
    ];

    nat_ipv6_rewrites_destination_and_checksum: [
        Case::new(
            "IPv6 SYN",
            tcp6(CLIENT_MAC, LB_MAC, CLIENT6, NAT_VIP6, 40000, 80, 64),
            XDP_REDIRECT,
            Out::Frame(tcp6(LB_B0_MAC, BACKEND_MAC, CLIENT6, NAT_BACKEND6, 40000, 8080, 63)),
        )
        .on(Port::C0),
    ];

    /// Never hand the kernel the un-rewritten packet: it would answer for the VIP with a RST.
    nat_without_neighbour_is_rewritten_and_passed_to_the_kernel: [
        Case::new(
            "SYN to a backend with no neighbour entry",
            tcp4(CLIENT_MAC, LB_MAC, CLIENT, NONEIGH_VIP, 40000, 80, 64, true),
            XDP_PASS,
            Out::Frame(tcp4(CLIENT_MAC, LB_MAC, CLIENT, UNRESOLVED_BACKEND, 40000, 80, 63, true)),
        )
        .on(Port::C0)
        .counts(Reason::PassNoNeigh),
    ];

    nat_udp_checksum_is_updated: [
        Case::new(
            "UDP query",
            udp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_UDP_VIP, 5353, 53, 64),
            XDP_REDIRECT,
            Out::Frame(udp4(LB_B0_MAC, BACKEND_MAC, CLIENT, NAT_BACKEND, 5353, 5300, 63)),
        )
        .on(Port::C0),
    ];

    /// Encapsulated from the ipip source prefix with the flow hash in its low bits; on the
    /// backend, the decap program gives the stack the client's packet back, and passes frames
    /// that are not IP-in-IP untouched.
    ipip_v4_encapsulates_and_decap_restores_the_original: [
        Case::new(
            "SYN to the ipip VIP",
            tcp4(CLIENT_MAC, LB_MAC, CLIENT, IPIP_VIP, 40000, 80, 64, true),
            XDP_TX,
            Out::Frame(ipip4(
                &tcp4(CLIENT_MAC, LB_MAC, CLIENT, IPIP_VIP, 40000, 80, 64, true),
                flow_hash_of(&CLIENT, &IPIP_VIP, 40000, 80),
            )),
        )
        .counts(Reason::TxIpip),
    ] then |_, cases| {
        let syn = &cases[0].input;
        assert_eq!(decap(&expected(&cases[0])), (XDP_PASS, with_macs(syn, LB_MAC, BACKEND_MAC)));
        assert_eq!(decap(syn), (XDP_PASS, syn.clone()));
    };

    /// The outer IPv6 header carries the flow hash in its source and in the flow label.
    ipip_v6_encapsulates_with_flow_label_entropy: [
        Case::new(
            "IPv6 SYN to the ipip VIP",
            tcp6(CLIENT_MAC, LB_MAC, CLIENT6, IPIP_VIP6, 40000, 80, 64),
            XDP_TX,
            Out::Frame(ipip6(&tcp6(CLIENT_MAC, LB_MAC, CLIENT6, IPIP_VIP6, 40000, 80, 64))),
        ),
    ] then |_, cases| {
        let syn = &cases[0].input;
        assert_eq!(decap(&expected(&cases[0])), (XDP_PASS, with_macs(syn, LB_MAC, BACKEND_MAC)));
    };

    /// Same outer source as the flow's own packets (the hash of the client-side 5-tuple), DF
    /// copied from the ICMP packet's.
    icmp_frag_needed_is_encapsulated_to_an_ipip_backend: [
        Case::new(
            "frag needed for an ipip flow",
            frag_needed(IPIP_VIP, &quoted_v4(IPIP_VIP, 80, 40000)),
            XDP_TX,
            Out::Frame({
                let icmp = frag_needed(IPIP_VIP, &quoted_v4(IPIP_VIP, 80, 40000));
                assert!(icmp[14 + 6] & 0x40 != 0, "the ICMP packet has DF");
                ipip4(&icmp, flow_hash_of(&CLIENT, &IPIP_VIP, 40000, 80))
            }),
        ),
    ];

    /// The router saw the reply as NAT_VIP:80 → client; the backend sent NAT_BACKEND:8080. The
    /// expected frame is built from scratch by etherparse: the quoted header with its own
    /// checksum, the ICMP checksum over it, the outer header with TTL 63.
    icmp_frag_needed_for_a_nat_flow_is_translated_for_the_backend: [
        Case::new(
            "the flow's SYN",
            tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, 40000, 80, 64, true),
            XDP_REDIRECT,
            Out::Any,
        )
        .on(Port::C0),
        Case::new(
            "frag needed for it",
            frag_needed(NAT_VIP, &quoted_v4(NAT_VIP, 80, 40000)),
            XDP_REDIRECT,
            Out::Frame({
                use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
                let mut want = Vec::new();
                PacketBuilder::ethernet2(LB_B0_MAC, BACKEND_MAC)
                    .ipv4(ROUTER, NAT_BACKEND, 63)
                    .icmpv4(Icmpv4Type::DestinationUnreachable(
                        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
                    ))
                    .write(&mut want, &quoted_v4(NAT_BACKEND, 8080, 40000))
                    .expect("expected frame");
                want
            }),
        )
        .on(Port::C0)
        .counts(Reason::IcmpToBackend),
    ];

    /// An error sent elsewhere than to the quoted packet's source (the host, here) is not about
    /// a VIP's packet, whatever it quotes: found by the packet fuzzer, which turned the
    /// destination into another address and saw the error steered.
    icmp_error_not_sent_to_the_quoted_vip_passes_untouched: [
        Case::pass("frag needed to the host, quoting a DSR flow", {
            let mut f = frag_needed([10, 0, 0, 2], &quoted_v4(DSR_VIP, 80, 40000));
            assert_eq!(&f[L3 + 16..L3 + 20], &[10, 0, 0, 2]);
            fix_ip4_checksum(&mut f);
            f
        })
        .counts(Reason::PassNotVip),
        Case::pass(
            "frag needed to the NAT VIP, quoting a DSR flow",
            frag_needed(NAT_VIP, &quoted_v4(DSR_VIP, 80, 40000)),
        )
        .on(Port::C0)
        .counts(Reason::PassNotVip),
        Case::pass(
            "too big to the client's address, quoting a NAT flow",
            packet_too_big(CLIENT6, NAT_VIP6, 80, 40000, LB_MAC, ROUTER_MAC, 64, ROUTER6),
        )
        .on(Port::C0)
        .counts(Reason::PassNotVip),
    ];

    /// DSR: unchanged but for the MACs. NAT: destination and quoted source become the
    /// backend's; etherparse recomputes the ICMPv6 checksum (pseudo-header included).
    icmpv6_packet_too_big_reaches_dsr_and_nat_backends: [
        Case::dsr(
            "too big for a DSR flow",
            packet_too_big(DSR_VIP6, DSR_VIP6, 80, 40000, LB_MAC, ROUTER_MAC, 64, ROUTER6),
        ),
        Case::new(
            "the NAT flow's SYN",
            tcp6(CLIENT_MAC, LB_MAC, CLIENT6, NAT_VIP6, 40000, 80, 64),
            XDP_REDIRECT,
            Out::Any,
        )
        .on(Port::C0),
        Case::new(
            "too big for it",
            packet_too_big(NAT_VIP6, NAT_VIP6, 80, 40000, LB_MAC, ROUTER_MAC, 64, ROUTER6),
            XDP_REDIRECT,
            Out::Frame(packet_too_big(
                NAT_BACKEND6,
                NAT_BACKEND6,
                8080,
                40000,
                BACKEND_MAC,
                LB_B0_MAC,
                63,
                ROUTER6,
            )),
        )
        .on(Port::C0),
    ];
}

/// The SYN most fixtures start from: client to the DSR VIP's port 80.
fn dsr_syn() -> Vec<u8> {
    tcp4(CLIENT_MAC, LB_MAC, CLIENT, DSR_VIP, 40000, 80, 64, true)
}

/// A broadcast ARP frame (zeros past the Ethernet header): not IP.
fn arp() -> Vec<u8> {
    let mut f = with_macs(&[0u8; 42], CLIENT_MAC, [0xff; 6]);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f
}

/// A SYN to the DSR VIP's address and `dport` with 8 bytes of IPv4 options (NOPs, record-route
/// sized), so TCP starts at offset 28 of the IP header.
fn with_options(dport: u16) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT, DSR_VIP).expect("header");
    ip.options = Ipv4Options::try_from(&[1u8; 8][..]).expect("options");
    let mut f = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default()))
        .tcp(40000, dport, 1, 64240)
        .syn()
        .write(&mut f, &[])
        .expect("frame");
    assert_eq!(f[14] & 0x0f, 7, "IHL 7");
    f
}

// ------------------------------------------------------------------ fixtures

/// Opens flow 40001 to the "two" VIP with a SYN, then drains the backend it chose: (its MAC, its
/// address, the VIP).
fn open_then_drain(env: &mut Env) -> ([u8; 6], IpAddr, VipSpec) {
    let syn = tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, 40001, 80, 64, true);
    let (_, out) = env.run(&syn, 0);
    let chosen: [u8; 6] = out[0..6].try_into().expect("mac");
    let chosen_ip = if chosen == BACKEND_MAC {
        ip4([10, 0, 1, 1])
    } else {
        ip4([10, 0, 1, 2])
    };
    let two = fixture_vips()
        .into_iter()
        .find(|v| v.name == "two")
        .expect("vip");
    let drained = desired(&two, |b| {
        Some(if b.address == chosen_ip {
            BackendMode::Draining
        } else {
            BackendMode::Active
        })
    });
    env.b().apply("two", &drained).expect("drain");
    (chosen, chosen_ip, two)
}

#[test]
fn second_packet_of_a_flow_hits_conntrack() {
    in_netns(|| {
        let mut env = Env::new();
        // Draining takes the chosen backend out of the Maglev table: only connection tracking can
        // still send this flow there.
        let (chosen, chosen_ip, two) = open_then_drain(&mut env);
        let ack = tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, 40001, 80, 64, false);
        let (verdict, out) = env.run(&ack, 0);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            out,
            with_macs(&ack, LB_MAC, chosen),
            "tracked flow stays on its backend"
        );
        // A new flow cannot reach the drained backend.
        for port in 41000..41020 {
            let (_, out) = env.run(
                &tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, port, 80, 64, true),
                0,
            );
            assert_ne!(
                out[0..6],
                chosen,
                "new flow {port} went to a draining backend"
            );
        }
        // Removing it releases the tracked flow: the next packet is re-picked.
        let removed = desired(&two, |b| {
            (b.address != chosen_ip).then_some(BackendMode::Active)
        });
        env.b().apply("two", &removed).expect("remove");
        let (_, out) = env.run(&ack, 0);
        assert_ne!(out[0..6], chosen);
        let views = env.b().list().expect("list");
        let v = views.iter().find(|v| v.name == "two").expect("vip");
        assert_eq!(v.counters.packets, 23);
        assert_eq!(
            v.counters.new_flows, 22,
            "SYN + 20 new flows + the re-picked flow"
        );
    });
}

/// A SYN is not looked up (it is inserted if absent), yet a retransmitted one still finds its
/// flow: it stays on its backend, even one drained out of the table, and is not a new flow.
#[test]
fn retransmitted_syn_keeps_its_backend() {
    in_netns(|| {
        let mut env = Env::new();
        let (chosen, _, two) = open_then_drain(&mut env);
        let syn = tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, 40001, 80, 64, true);
        let (verdict, out) = env.run(&syn, 0);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            out,
            with_macs(&syn, LB_MAC, chosen),
            "the retransmitted SYN"
        );
        // Both backends draining: the table is empty, the tracked SYN still goes through.
        let none = desired(&two, |_| Some(BackendMode::Draining));
        env.b().apply("two", &none).expect("drain all");
        let (verdict, out) = env.run(&syn, 0);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, with_macs(&syn, LB_MAC, chosen), "with an empty table");
        let fresh = tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, 40002, 80, 64, true);
        assert_eq!(env.run(&fresh, 0).0, XDP_DROP, "a new SYN finds no backend");
        let views = env.b().list().expect("list");
        let v = views.iter().find(|v| v.name == "two").expect("vip");
        assert_eq!(v.counters.new_flows, 1, "one connection, however many SYNs");
    });
}

/// Packets that are not for a VIP look for a NAT reply only when they come from a port a NAT
/// backend answers from: the gate opens before a new backend's first flow and closes when no
/// backend answers from that port any more.
#[test]
fn nat_reply_gate_follows_the_backends() {
    in_netns(|| {
        let (c0, b0) = nat_topology();
        let mut env = Env::new();
        let q = udp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_UDP_VIP, 5353, 53, 64);
        assert_eq!(env.run(&q, c0).0, XDP_REDIRECT);
        let answer = |port| udp4(BACKEND_MAC, LB_B0_MAC, NAT_BACKEND, CLIENT, port, 5353, 64);
        let (verdict, out) = env.run(&answer(5300), b0);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            out,
            udp4(LB_MAC, CLIENT_MAC, NAT_UDP_VIP, CLIENT, 53, 5353, 63)
        );
        // The backend moves to port 5301.
        let mut moved = fixture_vips()
            .into_iter()
            .find(|v| v.name == "nat-udp")
            .expect("vip");
        moved.backends[0].port = 5301;
        env.b()
            .apply("nat-udp", &desired(&moved, |_| Some(BackendMode::Active)))
            .expect("apply");
        // Its old flow's reverse entry is still in NAT_REVERSE, but nothing answers from 5300.
        let stale = answer(5300);
        assert_eq!(env.run(&stale, b0), (XDP_PASS, stale.clone()));
        let q2 = udp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_UDP_VIP, 5354, 53, 64);
        let (verdict, out) = env.run(&q2, c0);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            out,
            udp4(LB_B0_MAC, BACKEND_MAC, CLIENT, NAT_BACKEND, 5354, 5301, 63)
        );
        let a2 = udp4(BACKEND_MAC, LB_B0_MAC, NAT_BACKEND, CLIENT, 5301, 5354, 64);
        let (verdict, out) = env.run(&a2, b0);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(
            out,
            udp4(LB_MAC, CLIENT_MAC, NAT_UDP_VIP, CLIENT, 53, 5354, 63)
        );
    });
}

/// A UDP flow keeps its backend while its packets keep coming; idle past `udp_timeout_secs` it
/// is picked again (the program reads the kernel's coarse clock).
#[test]
fn an_idle_udp_flow_is_picked_again() {
    in_netns(|| {
        let mut env = Env::with_udp_timeout(1);
        let q = udp4(CLIENT_MAC, LB_MAC, CLIENT, UDP_VIP, 5353, 53, 64);
        let (_, out) = env.run(&q, 0);
        assert_eq!(out[0..6], BACKEND_MAC);
        // The first backend drains (it keeps its flows), a second takes new ones.
        let member = |last: u8, mac: [u8; 6], state| Desired {
            key: InstanceKey {
                address: ip4([10, 0, 1, last]),
                port: 0,
            },
            weight: 1,
            mac: Some(Mac(mac)),
            state,
        };
        let both = [
            member(1, BACKEND_MAC, BackendMode::Draining),
            member(2, BACKEND2_MAC, BackendMode::Active),
        ];
        env.b().apply("udp", &both).expect("apply");
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(400));
            let (_, out) = env.run(&q, 0);
            assert_eq!(out[0..6], BACKEND_MAC, "kept while packets come");
        }
        std::thread::sleep(std::time::Duration::from_millis(1600));
        let (_, out) = env.run(&q, 0);
        assert_eq!(
            out[0..6],
            BACKEND2_MAC,
            "idle past the timeout: picked again"
        );
    });
}

/// Builds an IPv4 fragment by hand: etherparse writes the header (and its checksum), the payload
/// is raw bytes (a non-first fragment has no UDP header).
fn fragment4(dst: [u8; 4], more: bool, offset_units: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip =
        Ipv4Header::new(payload.len() as u16, 64, IpNumber::UDP, CLIENT, dst).expect("header");
    ip.identification = 0x1234;
    ip.more_fragments = more;
    ip.fragment_offset = etherparse::IpFragOffset::try_new(offset_units).expect("offset");
    ip.header_checksum = ip.calc_header_checksum();
    let mut f = with_macs(&[0u8; 14], CLIENT_MAC, LB_MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    ip.write(&mut f).expect("header");
    f.extend_from_slice(payload);
    f
}

/// The outer source the program must choose: the configured prefix with the flow hash in the low
/// bits (the specified rule; the hash function is lb-common's, shared with the kernel).
fn flow_hash_of(src: &[u8], dst: &[u8], sport: u16, dport: u16) -> u32 {
    let words = |a: &[u8]| {
        let mut w = [0u32; 4];
        for (i, c) in a.chunks(4).enumerate() {
            w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        w
    };
    let key = lb_common::FlowKey {
        src: words(src),
        dst: words(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: lb_common::proto::TCP,
        _pad: [0; 3],
    };
    lb_common::hash::flow_hash(&key)
}

/// Runs the decap program (what `lb decap` attaches on a backend) once on `frame`.
fn decap(frame: &[u8]) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun as _, TestRunOptions, Xdp};
    let mut ebpf = aya::Ebpf::load(dataplane::DECAP_OBJECT).expect("load decap");
    let prog: &mut Xdp = ebpf
        .program_mut("lb_decap")
        .expect("lb_decap")
        .try_into()
        .expect("xdp");
    prog.load().expect("verifier");
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let r = prog.test_run(opts).expect("test run");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

// ------------------------------------------------------------------ ICMP "too big"

const ROUTER: [u8; 4] = [10, 0, 0, 254];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const ROUTER6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];

/// What an ICMP error quotes: the IP header of a reply (`src` → client) and 8 bytes of its TCP
/// header, as RFC 792 requires.
fn quoted_v4(src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let reply = tcp4(
        BACKEND_MAC,
        CLIENT_MAC,
        src,
        CLIENT,
        sport,
        dport,
        64,
        false,
    );
    reply[14..14 + 20 + 8].to_vec()
}

/// "Fragmentation needed" from a router on the path to the client, about a packet from `src`.
fn frag_needed(to: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
    let mut f = Vec::new();
    PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
        .ipv4(ROUTER, to, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut f, quoted)
        .expect("icmp frame");
    f
}

#[test]
fn icmp_frag_needed_reaches_the_backend_that_owns_the_flow() {
    in_netns(|| {
        let mut env = Env::new();
        for port in 42000..42010u16 {
            // The flow exists (tracked): the error goes where its packets go.
            let (_, out) = env.run(
                &tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, port, 80, 64, true),
                0,
            );
            let owner: [u8; 6] = out[0..6].try_into().expect("mac");
            let icmp = frag_needed(TWO_VIP, &quoted_v4(TWO_VIP, 80, port));
            let (verdict, out) = env.run(&icmp, 0);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(
                out,
                with_macs(&icmp, LB_MAC, owner),
                "port {port}: only the MACs change"
            );
        }
        // An untracked flow (e.g. after a restart): Maglev on the quoted header picks the backend
        // the flow's own packets get — and the error creates no flow.
        for port in 42100..42110u16 {
            let icmp = frag_needed(TWO_VIP, &quoted_v4(TWO_VIP, 80, port));
            let (_, out) = env.run(&icmp, 0);
            let (_, syn_out) = env.run(
                &tcp4(CLIENT_MAC, LB_MAC, CLIENT, TWO_VIP, port, 80, 64, true),
                0,
            );
            assert_eq!(out[0..6], syn_out[0..6], "port {port}");
        }
        assert_eq!(env.reason(Reason::IcmpToBackend), 20);
        let v = env
            .b()
            .list()
            .expect("list")
            .into_iter()
            .find(|v| v.name == "two")
            .expect("vip");
        assert_eq!(v.counters.new_flows, 20, "ICMP errors create no flows");
        // Other ICMP (an echo request to the VIP) is the stack's.
        let mut ping = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv4(CLIENT, TWO_VIP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut ping, b"ping")
            .expect("ping");
        assert_eq!(env.run(&ping, 0), (XDP_PASS, ping.clone()));
    });
}

#[allow(clippy::too_many_arguments)] // every argument is a header field the fixture sets
fn packet_too_big(
    to: [u8; 16],
    quoted_src: [u8; 16],
    sport: u16,
    dport: u16,
    mac_dst: [u8; 6],
    mac_src: [u8; 6],
    hops: u8,
    from: [u8; 16],
) -> Vec<u8> {
    use etherparse::Icmpv6Type;
    let reply = tcp6(
        BACKEND_MAC,
        CLIENT_MAC,
        quoted_src,
        CLIENT6,
        sport,
        dport,
        64,
    );
    let quoted = &reply[14..14 + 40 + 8];
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac_src, mac_dst)
        .ipv6(from, to, hops)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut f, quoted)
        .expect("icmpv6 frame");
    f
}

// ------------------------------------------------------------------ malformed and padded frames
//
// A VIP frame whose length fields or version disagree with the frame (or with each other) is the
// stack's to judge: the program passes it untouched, before it creates a flow or a NAT reverse
// entry and before any rewrite. Each class is tried against a VIP of every mode and family.

const L3: usize = 14;

fn is_v4(f: &[u8]) -> bool {
    f[12..14] == [0x08, 0x00]
}

/// Offset of the L4 header of an unmodified fixture frame (no IPv4 options, no IPv6 extensions).
fn l4_at(f: &[u8]) -> usize {
    if is_v4(f) {
        L3 + 20
    } else {
        L3 + 40
    }
}

fn set16(f: &mut [u8], off: usize, v: u16) {
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn adjust16(f: &mut [u8], off: usize, by: i32) {
    let v = get16(f, off) as i32 + by;
    set16(f, off, v as u16);
}

/// The IP length field: IPv4 `tot_len`, IPv6 `payload_len`.
fn ip_len_at(f: &[u8]) -> usize {
    if is_v4(f) {
        L3 + 2
    } else {
        L3 + 4
    }
}

/// Recomputes the IPv4 header checksum (a 20-byte header at `L3`) after a fixture changed a field,
/// so the frame is wrong only in the field under test.
fn fix_ip4_checksum(f: &mut [u8]) {
    if !is_v4(f) {
        return;
    }
    f[L3 + 10..L3 + 12].fill(0);
    let sum: u32 = f[L3..L3 + 20]
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    f[L3 + 10..L3 + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// A named change that makes a well-formed frame malformed.
type Mutation<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>));

/// `frame` changed by `m` (IPv4 header checksum recomputed).
fn mutated(frame: &[u8], m: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    m(&mut f);
    fix_ip4_checksum(&mut f);
    f
}

/// A well-formed first packet to a VIP of every mode and family, with the interface it arrives on
/// (NAT's FIB lookup needs the client-side veth).
fn tcp_targets(c0: u32) -> Vec<(&'static str, Vec<u8>, u32)> {
    let syn4 = |dst| tcp4(CLIENT_MAC, LB_MAC, CLIENT, dst, 40000, 80, 64, true);
    let syn6 = |dst| tcp6(CLIENT_MAC, LB_MAC, CLIENT6, dst, 40000, 80, 64);
    vec![
        ("dsr v4", syn4(DSR_VIP), 0),
        ("nat v4", syn4(NAT_VIP), c0),
        ("ipip v4", syn4(IPIP_VIP), 0),
        ("dsr v6", syn6(DSR_VIP6), 0),
        ("nat v6", syn6(NAT_VIP6), c0),
        ("ipip v6", syn6(IPIP_VIP6), 0),
    ]
}

fn udp_targets(c0: u32) -> Vec<(&'static str, Vec<u8>, u32)> {
    let q4 = |dst| udp4(CLIENT_MAC, LB_MAC, CLIENT, dst, 5353, 53, 64);
    let q6 = |dst| udp6(CLIENT_MAC, LB_MAC, CLIENT6, dst, 5353, 53, 64);
    vec![
        ("dsr v4", q4(UDP_VIP), 0),
        ("nat v4", q4(NAT_UDP_VIP), c0),
        ("ipip v4", q4(IPIP_VIP), 0),
        ("dsr v6", q6(DSR_VIP6), 0),
        ("nat v6", q6(NAT_VIP6), c0),
        ("ipip v6", q6(IPIP_VIP6), 0),
    ]
}

/// Every target frame, changed by every mutation: (description, frame, ifindex).
fn cases(
    targets: Vec<(&'static str, Vec<u8>, u32)>,
    mutations: &[Mutation],
) -> Vec<(String, Vec<u8>, u32)> {
    let mut out = Vec::new();
    for (target, frame, ifindex) in &targets {
        for (what, m) in mutations {
            out.push((format!("{target}, {what}"), mutated(frame, m), *ifindex));
        }
    }
    out
}

fn run_untouched(cases: Vec<(String, Vec<u8>, u32)>) {
    let mut env = Env::new();
    let total = cases.len();
    let failures = cases
        .iter()
        .filter_map(|(what, f, ifindex)| env.untouched(what, f, *ifindex))
        .collect();
    assert_all_untouched(failures, total);
}

#[test]
fn ip_version_that_disagrees_with_the_ethertype_passes_untouched() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        // An IPv4 ethertype carrying version 6 (IHL still 5), an IPv6 one carrying version 4.
        let other_version = |f: &mut Vec<u8>| f[L3] ^= 0x20;
        let zero_version = |f: &mut Vec<u8>| f[L3] &= 0x0f;
        let mut all = cases(
            tcp_targets(c0),
            &[
                ("other version", &other_version),
                ("version 0", &zero_version),
            ],
        );
        all.extend(cases(udp_targets(c0), &[("other version", &other_version)]));
        run_untouched(all);
    });
}

#[test]
fn ip_length_beyond_the_frame_or_inside_the_header_passes_untouched() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        let one_past_frame = |f: &mut Vec<u8>| {
            let at = ip_len_at(f);
            adjust16(f, at, 1);
        };
        let max = |f: &mut Vec<u8>| {
            let at = ip_len_at(f);
            set16(f, at, 0xffff);
        };
        let mut all = cases(
            tcp_targets(c0),
            &[
                ("IP length 1 past the frame", &one_past_frame),
                ("IP length 65535", &max),
            ],
        );
        all.extend(cases(
            udp_targets(c0),
            &[("IP length 1 past the frame", &one_past_frame)],
        ));
        // IPv4 only: a total length shorter than the header it counts, and an IHL below 5.
        let v4: Vec<_> = tcp_targets(c0)
            .into_iter()
            .chain(udp_targets(c0))
            .filter(|t| is_v4(&t.1))
            .collect();
        let inside_header = |f: &mut Vec<u8>| set16(f, L3 + 2, 19);
        let zero = |f: &mut Vec<u8>| set16(f, L3 + 2, 0);
        let ihl4 = |f: &mut Vec<u8>| f[L3] = 0x44;
        all.extend(cases(
            v4,
            &[
                ("tot_len 19 < IHL×4", &inside_header),
                ("tot_len 0", &zero),
                ("IHL 4", &ihl4),
            ],
        ));
        run_untouched(all);
    });
}

#[test]
fn tcp_data_offset_outside_the_segment_passes_untouched() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        let offset = |words: u8| {
            move |f: &mut Vec<u8>| {
                let at = l4_at(f) + 12;
                f[at] = words << 4 | (f[at] & 0x0f);
            }
        };
        let (zero, four, six, fifteen) = (offset(0), offset(4), offset(6), offset(15));
        // The 20-byte header is in the frame, but the IP length ends the datagram 10 bytes into it.
        let header_past_ip_length = |f: &mut Vec<u8>| {
            let at = ip_len_at(f);
            adjust16(f, at, -10);
        };
        run_untouched(cases(
            tcp_targets(c0),
            &[
                ("data offset 0", &zero),
                ("data offset 4", &four),
                ("data offset 6 in a 20-byte segment", &six),
                ("data offset 15 in a 20-byte segment", &fifteen),
                ("TCP header past the IP length", &header_past_ip_length),
            ],
        ));
    });
}

#[test]
fn udp_length_outside_the_ip_payload_passes_untouched() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        let udp_len = |v: fn(u16) -> u16| {
            move |f: &mut Vec<u8>| {
                let at = l4_at(f) + 4;
                let old = get16(f, at);
                set16(f, at, v(old));
            }
        };
        let (zero, seven, one_more) = (udp_len(|_| 0), udp_len(|_| 7), udp_len(|n| n + 1));
        // The UDP header is in the frame, but the IP length ends the datagram inside it.
        let header_past_ip_length = |f: &mut Vec<u8>| {
            let at = ip_len_at(f);
            adjust16(f, at, -5 - 4);
        };
        run_untouched(cases(
            udp_targets(c0),
            &[
                ("UDP length 0", &zero),
                ("UDP length 7", &seven),
                ("UDP length 1 past the IP payload", &one_more),
                ("UDP header past the IP length", &header_past_ip_length),
            ],
        ));
    });
}

/// IPv4 "fragmentation needed" and ICMPv6 "packet too big" about a VIP flow, in every mode.
fn icmp_targets(c0: u32) -> Vec<(&'static str, Vec<u8>, u32)> {
    let ptb = |vip| packet_too_big(vip, vip, 80, 40000, LB_MAC, ROUTER_MAC, 64, ROUTER6);
    vec![
        (
            "dsr v4",
            frag_needed(DSR_VIP, &quoted_v4(DSR_VIP, 80, 40000)),
            0,
        ),
        (
            "nat v4",
            frag_needed(NAT_VIP, &quoted_v4(NAT_VIP, 80, 40000)),
            c0,
        ),
        (
            "ipip v4",
            frag_needed(IPIP_VIP, &quoted_v4(IPIP_VIP, 80, 40000)),
            0,
        ),
        ("dsr v6", ptb(DSR_VIP6), 0),
        ("nat v6", ptb(NAT_VIP6), c0),
        ("ipip v6", ptb(IPIP_VIP6), 0),
    ]
}

#[test]
fn icmp_error_quoting_less_than_8_bytes_of_l4_passes_untouched() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        // Where the quoted IP header starts: outer IP header, then the 8-byte ICMP header.
        let quoted = |f: &[u8]| l4_at(f) + 8;
        // The quote ends after the ports (4 of the 8 bytes RFC 792 and RFC 4443 ask for).
        let ports_only = |f: &mut Vec<u8>| {
            f.truncate(f.len() - 4);
            let at = ip_len_at(f);
            adjust16(f, at, -4);
        };
        // All 8 bytes in the frame, but the outer IP length ends the datagram after the ports.
        let past_ip_length = |f: &mut Vec<u8>| {
            let at = ip_len_at(f);
            adjust16(f, at, -4);
        };
        // The quoted header's version is not its family's.
        let quoted_version = |f: &mut Vec<u8>| {
            let at = quoted(f);
            f[at] ^= 0x20;
        };
        let all = cases(
            icmp_targets(c0),
            &[
                ("4 bytes of L4 quoted", &ports_only),
                ("quote past the IP length", &past_ip_length),
                ("quoted IP version wrong", &quoted_version),
            ],
        );
        // The well-formed errors themselves still go to the backends (checked in detail above).
        let mut env = Env::new();
        for (what, f, ifindex) in icmp_targets(c0) {
            let (verdict, _) = env.run(&f, ifindex);
            assert!(
                matches!(verdict, XDP_TX | XDP_REDIRECT),
                "{what}: {verdict}"
            );
        }
        drop(env);
        run_untouched(all);
    });
}

/// Whatever the sender padded a short frame with (a minimum-size Ethernet frame is 60 bytes
/// before the FCS; a 40-byte IPv4 SYN needs 6 bytes of it).
fn padded(frame: &[u8], to: usize) -> Vec<u8> {
    let mut f = frame.to_vec();
    let pad = [0xa5u8, 0x5a, 0xff, 0x00, 0x11, 0x22, 0x33, 0x44];
    let mut i = 0;
    while f.len() < to {
        f.push(pad[i % pad.len()]);
        i += 1;
    }
    f
}

/// Ethernet padding is legal: the IP length, not the frame, ends the datagram. The program keeps
/// the padding (it rewrites nothing past the headers, as a switch would forward the frame), and
/// every length it writes or checks comes from the IP header, as the receiving stack trims to it.
#[test]
fn padded_minimum_size_frames_are_forwarded_with_their_padding() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        let mut env = Env::new();
        let syn = |dst| tcp4(CLIENT_MAC, LB_MAC, CLIENT, dst, 40000, 80, 64, true);
        let tail = |f: &[u8], len: usize| f[len..].to_vec();

        let f = padded(&syn(DSR_VIP), 60);
        assert_eq!(f.len() - L3, 46, "a 40-byte datagram in a 60-byte frame");
        assert_eq!(env.run(&f, 0), (XDP_TX, with_macs(&f, LB_MAC, BACKEND_MAC)));

        let f = padded(&syn(NAT_VIP), 60);
        let mut want = tcp4(
            LB_B0_MAC,
            BACKEND_MAC,
            CLIENT,
            NAT_BACKEND,
            40000,
            8080,
            63,
            true,
        );
        want.extend(tail(&f, 54));
        assert_eq!(
            env.run(&f, c0),
            (XDP_REDIRECT, want),
            "NAT keeps the padding"
        );

        // ipip: the outer length covers the inner datagram (40 bytes), not the frame (46).
        let plain = syn(IPIP_VIP);
        let f = padded(&plain, 60);
        let h = flow_hash_of(&CLIENT, &IPIP_VIP, 40000, 80);
        let mut outer = Ipv4Header::new(
            40,
            64,
            IpNumber::IPV4,
            [172, 16, (h >> 8) as u8, h as u8],
            IPIP_BACKEND,
        )
        .expect("outer");
        outer.dont_fragment = true;
        outer.header_checksum = outer.calc_header_checksum();
        let mut want = with_macs(&f[..L3], LB_MAC, BACKEND_MAC);
        outer.write(&mut want).expect("outer header");
        want.extend_from_slice(&f[L3..]);
        let (verdict, out) = env.run(&f, 0);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(out, want);
        assert_eq!(
            get16(&out, L3 + 2),
            60,
            "outer tot_len = 20 + inner tot_len"
        );
        // Decapsulated, the backend's stack gets the original frame, padding and all.
        assert_eq!(decap(&out), (XDP_PASS, with_macs(&f, LB_MAC, BACKEND_MAC)));

        // UDP with a 1-byte payload (43 bytes) padded to 60.
        let one = |dst| {
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, dst, 64)
                .udp(5353, 53)
                .write(&mut out, b"q")
                .expect("frame");
            out
        };
        let f = padded(&one(UDP_VIP), 60);
        assert_eq!(env.run(&f, 0), (XDP_TX, with_macs(&f, LB_MAC, BACKEND_MAC)));
        let f = padded(&one(NAT_UDP_VIP), 60);
        let mut want = Vec::new();
        PacketBuilder::ethernet2(LB_B0_MAC, BACKEND_MAC)
            .ipv4(CLIENT, NAT_BACKEND, 63)
            .udp(5353, 5300)
            .write(&mut want, b"q")
            .expect("frame");
        want.extend(tail(&f, 43));
        assert_eq!(env.run(&f, c0), (XDP_REDIRECT, want));

        // IPv6 frames are never short enough to need padding, but trailing bytes are as legal.
        let syn6 = |dst| tcp6(CLIENT_MAC, LB_MAC, CLIENT6, dst, 40000, 80, 64);
        let f = padded(&syn6(NAT_VIP6), 80);
        let mut want = tcp6(
            LB_B0_MAC,
            BACKEND_MAC,
            CLIENT6,
            NAT_BACKEND6,
            40000,
            8080,
            63,
        );
        want.extend(tail(&f, 74));
        assert_eq!(env.run(&f, c0), (XDP_REDIRECT, want));
        let f = padded(&syn6(IPIP_VIP6), 80);
        let (verdict, out) = env.run(&f, 0);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            get16(&out, L3 + 4),
            60,
            "outer payload_len = the inner datagram"
        );
        assert_eq!(
            &out[L3 + 40..],
            &f[L3..],
            "inner datagram and trailing bytes kept"
        );
    });
}

/// RFC 768 leaves a UDP length shorter than the IP payload undefined; Linux accepts it and trims
/// the datagram to the UDP length (`__udp4_lib_rcv`, `udpv6_rcv`). The balancer forwards it as it
/// is and lets the backend's stack do the same: the ports it steers by are in the header either way.
#[test]
fn udp_length_short_of_the_ip_payload_is_forwarded_like_the_kernel_accepts_it() {
    in_netns(|| {
        let (c0, _) = nat_topology();
        let mut env = Env::new();
        // UDP length 11 of a 13-byte IP payload; no UDP checksum (IPv4 allows none), so the
        // expected frame needs no checksum over the shortened datagram.
        let short = |f: &[u8]| {
            mutated(f, |f| {
                set16(f, L3 + 20 + 4, 8 + 3);
                set16(f, L3 + 20 + 6, 0);
            })
        };
        let f = short(&udp4(CLIENT_MAC, LB_MAC, CLIENT, UDP_VIP, 5353, 53, 64));
        assert_eq!(env.run(&f, 0), (XDP_TX, with_macs(&f, LB_MAC, BACKEND_MAC)));
        let f = short(&udp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_UDP_VIP, 5353, 53, 64));
        let want = short(&udp4(
            LB_B0_MAC,
            BACKEND_MAC,
            CLIENT,
            NAT_BACKEND,
            5353,
            5300,
            63,
        ));
        assert_eq!(env.run(&f, c0), (XDP_REDIRECT, want));
    });
}

/// The NAT reply path rewrites too: a malformed reply of a tracked flow is the stack's, and the
/// well-formed one after it is still translated (its reverse entry was there all along).
#[test]
fn malformed_nat_replies_pass_untouched() {
    in_netns(|| {
        let (c0, b0) = nat_topology();
        let mut env = Env::new();
        let flows: [(&str, Vec<u8>, Vec<u8>); 4] = [
            (
                "tcp v4",
                tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, 40000, 80, 64, true),
                tcp4(
                    BACKEND_MAC,
                    LB_B0_MAC,
                    NAT_BACKEND,
                    CLIENT,
                    8080,
                    40000,
                    64,
                    false,
                ),
            ),
            (
                "tcp v6",
                tcp6(CLIENT_MAC, LB_MAC, CLIENT6, NAT_VIP6, 40000, 80, 64),
                tcp6(
                    BACKEND_MAC,
                    LB_B0_MAC,
                    NAT_BACKEND6,
                    CLIENT6,
                    8080,
                    40000,
                    64,
                ),
            ),
            (
                "udp v4",
                udp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_UDP_VIP, 5353, 53, 64),
                udp4(BACKEND_MAC, LB_B0_MAC, NAT_BACKEND, CLIENT, 5300, 5353, 64),
            ),
            (
                "udp v6",
                udp6(CLIENT_MAC, LB_MAC, CLIENT6, NAT_VIP6, 5353, 53, 64),
                udp6(
                    BACKEND_MAC,
                    LB_B0_MAC,
                    NAT_BACKEND6,
                    CLIENT6,
                    5306,
                    5353,
                    64,
                ),
            ),
        ];
        let other_version = |f: &mut Vec<u8>| f[L3] ^= 0x20;
        let past_frame = |f: &mut Vec<u8>| {
            let at = ip_len_at(f);
            adjust16(f, at, 1);
        };
        // The L4 header's own length: TCP data offset 4, UDP length 7.
        let l4_length = |f: &mut Vec<u8>| {
            let at = l4_at(f);
            let tcp = f[if is_v4(f) { L3 + 9 } else { L3 + 6 }] == 6;
            if tcp {
                f[at + 12] = 0x40 | (f[at + 12] & 0x0f);
            } else {
                set16(f, at + 4, 7);
            }
        };
        let mut failures = Vec::new();
        let mut total = 0;
        for (flow, open, reply) in &flows {
            assert_eq!(env.run(open, c0).0, XDP_REDIRECT, "the flow opens");
            let bad: [Mutation; 3] = [
                ("other version", &other_version),
                ("IP length past the frame", &past_frame),
                ("L4 length field", &l4_length),
            ];
            for (what, m) in bad {
                total += 1;
                let f = mutated(reply, m);
                let got = env.run(&f, b0);
                if got != (XDP_PASS, f.clone()) {
                    failures.push(format!("{flow} reply, {what}: verdict {}", got.0));
                }
            }
            assert_eq!(env.run(reply, b0).0, XDP_REDIRECT, "the well-formed reply");
        }
        assert_all_untouched(failures, total);
    });
}

/// What the verifier processed for each program, the measure the architecture issue asks to
/// compare before and after a change to lb-ebpf (`cargo test -p lb-userspace --test packet
/// verifier -- --nocapture`). Each count must be known on this kernel and under its limit of one
/// million processed instructions; the numbers themselves are printed, not asserted.
#[test]
fn verifier_instruction_counts() {
    use aya::programs::Xdp;
    let mut env = Env::new();
    let info = env
        .b()
        .dataplane()
        .program()
        .expect("program")
        .info()
        .expect("program info");
    let lb = info.verified_instruction_count().expect("verified_insns");
    let mut decap = aya::Ebpf::load(dataplane::DECAP_OBJECT).expect("load decap");
    let prog: &mut Xdp = decap
        .program_mut("lb_decap")
        .expect("lb_decap")
        .try_into()
        .expect("xdp");
    prog.load().expect("verifier");
    let dec = prog
        .info()
        .expect("program info")
        .verified_instruction_count()
        .expect("verified_insns");
    println!("verifier: lb {lb} instructions processed, lb_decap {dec}");
    for (name, n) in [("lb", lb), ("lb_decap", dec)] {
        assert!(n > 0 && n < 1_000_000, "{name}: {n}");
    }
}

/// A case's expected output when it is exact bytes.
fn expected(c: &Case) -> Vec<u8> {
    match &c.output {
        Out::Frame(f) => f.clone(),
        _ => panic!("{}: expects no exact frame", c.what),
    }
}

/// What IP-in-IP must make of `frame`: its Ethernet header with the backend's MAC, an outer IPv4
/// header from the ipip source prefix with the flow hash `h` in its low bits and DF (copied from
/// the inner packet's, which every fixture sets), the IP packet unchanged inside.
fn ipip4(frame: &[u8], h: u32) -> Vec<u8> {
    let inner = &frame[14..];
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        IpNumber::IPV4,
        [172, 16, (h >> 8) as u8, h as u8],
        IPIP_BACKEND,
    )
    .expect("outer");
    outer.dont_fragment = true;
    outer.header_checksum = outer.calc_header_checksum();
    let mut want = with_macs(&frame[..14], LB_MAC, BACKEND_MAC);
    outer.write(&mut want).expect("outer header");
    want.extend_from_slice(inner);
    want
}

/// The IPv6 counterpart: the hash in the low 32 bits of the source (fd00:ffff::/32) and in the
/// flow label.
fn ipip6(frame: &[u8]) -> Vec<u8> {
    let h = flow_hash_of(&CLIENT6, &IPIP_VIP6, 40000, 80);
    let inner = &frame[14..];
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&[0xfd, 0x00, 0xff, 0xff]);
    src[12..].copy_from_slice(&h.to_ne_bytes());
    let outer = etherparse::Ipv6Header {
        traffic_class: 0,
        flow_label: etherparse::Ipv6FlowLabel::try_new(h & 0xfffff).expect("label"),
        payload_length: inner.len() as u16,
        next_header: IpNumber::IPV6,
        hop_limit: 64,
        source: src,
        destination: IPIP_BACKEND6,
    };
    let mut want = with_macs(&frame[..14], LB_MAC, BACKEND_MAC);
    outer.write(&mut want).expect("outer header");
    want.extend_from_slice(inner);
    want
}

// ------------------------------------------------------------------ fuzzing
//
// Frames made at random from every kind the program handles (each family and protocol to every
// VIP and to none, NAT replies, ICMP errors, fragments, ARP), then dressed (VLAN stacks, IPv6
// extension chains, every TCP flag, zero ports) and broken (truncated, bogus lengths, IHL and
// data offsets, random bytes, bad checksums, padding). Each is judged by rules that need no
// model of the balancer: a legal verdict, exactly one reason counted, no rewrite on a pass (but
// the NAT no-neighbour one), the frame byte-identical when it is neither addressed to a VIP nor
// from a NAT backend, and checksums on a rewritten frame checked by etherparse: valid when they
// were, the same error when they were not.

/// Frames per run: a bounded sample in `cargo xtask test`; `LB_PACKET_FUZZ_FRAMES` for the long
/// mode (`cargo xtask fuzz --packets` sets 1,000,000).
fn fuzz_frames() -> usize {
    std::env::var("LB_PACKET_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// The seed: `LB_PACKET_FUZZ_SEED` to replay a failure, else a fresh one (printed).
fn fuzz_seed() -> u64 {
    std::env::var("LB_PACKET_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Every address a fixture VIP has: a frame to one of them may be steered.
fn vip_addresses() -> Vec<Vec<u8>> {
    fixture_vips()
        .iter()
        .map(|v| match v.address {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        })
        .collect()
}

/// The NAT backends' addresses: a frame from one may be a tracked reply.
fn nat_backend_addresses() -> Vec<Vec<u8>> {
    vec![
        NAT_BACKEND.to_vec(),
        NAT_BACKEND6.to_vec(),
        UNRESOLVED_BACKEND.to_vec(),
    ]
}

/// Where the IP header starts and which family it is, reading VLAN tags as the kernel would
/// (any depth): the oracle's own, deliberately lax parse.
fn ip_start(f: &[u8]) -> Option<(usize, u16)> {
    let mut at = 12;
    loop {
        let t = u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]);
        match t {
            0x8100 | 0x88a8 => at += 4,
            0x0800 | 0x86dd => return Some((at + 2, t)),
            _ => return None,
        }
    }
}

/// Whether the program may act on `f`: its destination is a VIP's address, or its source a NAT
/// backend's. Everything else must reach the stack as it came.
fn addressed_to_us(f: &[u8], vips: &[Vec<u8>], backends: &[Vec<u8>]) -> bool {
    let Some((ip, family)) = ip_start(f) else {
        return false;
    };
    let (src, dst) = if family == 0x0800 {
        (f.get(ip + 12..ip + 16), f.get(ip + 16..ip + 20))
    } else {
        (f.get(ip + 8..ip + 24), f.get(ip + 24..ip + 40))
    };
    dst.is_some_and(|d| vips.iter().any(|v| v == d))
        || src.is_some_and(|s| backends.iter().any(|b| b == s))
}

/// `a - b` in ones'-complement arithmetic, with the two zeros made one: how far a stored
/// checksum is from the right one.
fn ones_diff(a: u16, b: u16) -> u16 {
    let s = a as u32 + (!b) as u32;
    let s = ((s & 0xffff) + (s >> 16)) as u16;
    if s == 0xffff {
        0
    } else {
        s
    }
}

/// What a frame's checksums are off by, as etherparse computes them: the outermost IPv4 header's
/// (if any) and the innermost TCP or UDP segment's (through IP-in-IP), and whether the outer IP
/// header carries IP. `None` when etherparse cannot slice the frame strictly.
#[derive(Debug, PartialEq)]
struct Checksums {
    ip4: Option<u16>,
    l4: Option<u16>,
    encapsulated: bool,
}

fn checksums(f: &[u8]) -> Option<Checksums> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let outer = SlicedPacket::from_ethernet(f).ok()?;
    let ip4_of = |net: &NetSlice| match net {
        NetSlice::Ipv4(v4) => {
            let h = v4.header();
            Some(ones_diff(
                h.header_checksum(),
                h.to_header().calc_header_checksum(),
            ))
        }
        _ => None,
    };
    let net = outer.net.as_ref()?;
    let ip4 = ip4_of(net);
    let (payload, number) = match net {
        NetSlice::Ipv4(v4) => (v4.payload().payload, v4.payload().ip_number),
        NetSlice::Ipv6(v6) => (v6.payload().payload, v6.payload().ip_number),
    };
    let encapsulated = number == IpNumber::IPV4 || number == IpNumber::IPV6;
    let inner;
    let packet = if encapsulated {
        inner = SlicedPacket::from_ip(payload).ok()?;
        &inner
    } else {
        &outer
    };
    let (src, dst): (Vec<u8>, Vec<u8>) = match packet.net.as_ref()? {
        NetSlice::Ipv4(v4) => (
            v4.header().source().to_vec(),
            v4.header().destination().to_vec(),
        ),
        NetSlice::Ipv6(v6) => (
            v6.header().source().to_vec(),
            v6.header().destination().to_vec(),
        ),
    };
    let v4 = src.len() == 4;
    let l4 = match &packet.transport {
        Some(TransportSlice::Tcp(t)) => {
            let right = if v4 {
                t.calc_checksum_ipv4(src[..].try_into().ok()?, dst[..].try_into().ok()?)
            } else {
                t.calc_checksum_ipv6(src[..].try_into().ok()?, dst[..].try_into().ok()?)
            };
            Some(ones_diff(t.checksum(), right.ok()?))
        }
        // An IPv4 UDP checksum of 0 is "none".
        Some(TransportSlice::Udp(u)) if !(v4 && u.checksum() == 0) => {
            let h = u.to_header();
            let right = if v4 {
                h.calc_checksum_ipv4_raw(
                    src[..].try_into().ok()?,
                    dst[..].try_into().ok()?,
                    u.payload(),
                )
            } else {
                h.calc_checksum_ipv6_raw(
                    src[..].try_into().ok()?,
                    dst[..].try_into().ok()?,
                    u.payload(),
                )
            };
            Some(ones_diff(u.checksum(), right.ok()?))
        }
        _ => None,
    };
    Some(Checksums {
        ip4,
        l4,
        encapsulated,
    })
}

/// A well-formed frame of a random kind, and the interface it arrives on.
fn random_frame(rng: &mut impl rand::Rng, nat_ports: &[u16]) -> (Vec<u8>, Port) {
    use etherparse::TcpHeader;
    let v4s = [
        DSR_VIP,
        NAT_VIP,
        UDP_VIP,
        WILD_VIP,
        EMPTY_VIP,
        TWO_VIP,
        NONEIGH_VIP,
        NAT_UDP_VIP,
        LOCAL_VIP,
        IPIP_VIP,
        [10, 0, 0, 200],
        [192, 0, 2, 1],
    ];
    let v6s = [DSR_VIP6, NAT_VIP6, IPIP_VIP6, CLIENT6];
    let ports = [80u16, 53, 443, 0, 8080, 5300];
    let port = |rng: &mut dyn rand::RngCore| {
        if rng.next_u32().is_multiple_of(4) {
            rng.next_u32() as u16
        } else {
            ports[rng.next_u32() as usize % ports.len()]
        }
    };
    let client4 = [10, 0, 0, 1 + (rng.gen::<u8>() % 3)];
    let sport = port(rng);
    let dport = port(rng);
    let flags = rng.gen::<u16>();
    let tcp = |mut h: TcpHeader| {
        h.fin = flags & 1 != 0;
        h.syn = flags & 2 != 0;
        h.rst = flags & 4 != 0;
        h.psh = flags & 8 != 0;
        h.ack = flags & 16 != 0;
        h.urg = flags & 32 != 0;
        h.ece = flags & 64 != 0;
        h.cwr = flags & 128 != 0;
        h.ns = flags & 256 != 0;
        h
    };
    let payload: &[u8] = if rng.gen_bool(0.5) {
        b""
    } else {
        b"hello, fuzz"
    };
    let mut f = Vec::new();
    let port_in = if rng.gen_bool(0.5) {
        Port::C0
    } else {
        Port::Any
    };
    match rng.gen_range(0..9) {
        0 => {
            let dst = v4s[rng.gen_range(0..v4s.len())];
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv4(client4, dst, 64)
                .tcp_header(tcp(TcpHeader::new(sport, dport, rng.gen(), 64240)))
                .write(&mut f, payload)
                .expect("tcp4");
        }
        1 => {
            let dst = v4s[rng.gen_range(0..v4s.len())];
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv4(client4, dst, 64)
                .udp(sport, dport)
                .write(&mut f, payload)
                .expect("udp4");
        }
        2 => {
            let dst = v6s[rng.gen_range(0..v6s.len())];
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv6(CLIENT6, dst, 64)
                .tcp_header(tcp(TcpHeader::new(sport, dport, rng.gen(), 64240)))
                .write(&mut f, payload)
                .expect("tcp6");
        }
        3 => {
            let dst = v6s[rng.gen_range(0..v6s.len())];
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv6(CLIENT6, dst, 64)
                .udp(sport, dport)
                .write(&mut f, payload)
                .expect("udp6");
        }
        // A NAT backend answering: to a port a SYN opened, or to any.
        4 => {
            let to = if !nat_ports.is_empty() && rng.gen_bool(0.7) {
                nat_ports[rng.gen_range(0..nat_ports.len())]
            } else {
                sport
            };
            let from = if rng.gen_bool(0.8) { 8080 } else { dport };
            PacketBuilder::ethernet2(BACKEND_MAC, LB_B0_MAC)
                .ipv4(NAT_BACKEND, CLIENT, 64)
                .tcp_header(tcp(TcpHeader::new(from, to, rng.gen(), 64240)))
                .write(&mut f, payload)
                .expect("reply");
            return (f, Port::B0);
        }
        5 => {
            let vip = [DSR_VIP, NAT_VIP, IPIP_VIP, TWO_VIP][rng.gen_range(0..4)];
            f = frag_needed(vip, &quoted_v4(vip, 80, sport));
        }
        6 => {
            let vip = [DSR_VIP6, NAT_VIP6][rng.gen_range(0..2)];
            f = packet_too_big(vip, vip, 80, sport, LB_MAC, ROUTER_MAC, 64, ROUTER6);
        }
        7 => {
            let dst = [WILD_VIP, UDP_VIP, DSR_VIP][rng.gen_range(0..3)];
            f = fragment4(dst, rng.gen(), rng.gen_range(0..4), &[9u8; 16]);
        }
        _ => f = arp(),
    }
    (f, port_in)
}

/// Dresses and breaks a frame: zero to three changes of what a hostile or broken sender does.
fn random_change(rng: &mut impl rand::Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(0..4) {
        match rng.gen_range(0..9) {
            // A VLAN tag (802.1Q or 802.1ad) in front of the ethertype.
            0 => {
                let tpid: u16 = if rng.gen_bool(0.5) { 0x8100 } else { 0x88a8 };
                let tci: u16 = rng.gen::<u16>() & 0x0fff;
                let tag = [tpid.to_be_bytes(), tci.to_be_bytes()].concat();
                f.splice(12..12, tag);
            }
            // An IPv6 extension header (hop-by-hop or destination options, PadN) in front of
            // the upper layer: the L4 checksum stays right.
            1 => {
                if let Some((ip, 0x86dd)) = ip_start(&f) {
                    if f.len() >= ip + 40 {
                        let next = f[ip + 6];
                        let kind = if rng.gen_bool(0.5) { 0 } else { 60 };
                        let ext = [next, 0, 1, 4, 0, 0, 0, 0];
                        f.splice(ip + 40..ip + 40, ext);
                        f[ip + 6] = kind;
                        adjust16(&mut f, ip + 4, 8);
                    }
                }
            }
            2 => {
                let at = rng.gen_range(14..f.len().max(15));
                f.truncate(at);
            }
            // A length field, the IHL or the TCP data offset set to anything.
            3 => {
                if let Some((ip, family)) = ip_start(&f) {
                    let field = match (family, rng.gen_range(0..4)) {
                        (0x0800, 0) => ip + 2,
                        (0x0800, 1) => {
                            if let Some(b) = f.get_mut(ip) {
                                *b = 0x40 | (rng.gen::<u8>() & 0x0f);
                            }
                            continue;
                        }
                        (_, 0 | 1) => ip + 4,
                        (0x0800, _) => ip + 20 + if rng.gen_bool(0.5) { 4 } else { 12 },
                        _ => ip + 40 + if rng.gen_bool(0.5) { 4 } else { 12 },
                    };
                    if f.len() >= field + 2 {
                        let v: u16 = rng.gen();
                        set16(&mut f, field, v);
                    }
                }
            }
            4 => {
                let end = f.len().min(90);
                let at = rng.gen_range(12..end.max(13));
                if let Some(b) = f.get_mut(at) {
                    *b = rng.gen();
                }
            }
            // A bad L4 checksum: the fixed offset of TCP's and UDP's in an untagged,
            // option-free frame (elsewhere it breaks some other byte, also fine).
            5 => {
                if let Some((ip, family)) = ip_start(&f) {
                    let l4 = ip + if family == 0x0800 { 20 } else { 40 };
                    let at = match f.get(if family == 0x0800 { ip + 9 } else { ip + 6 }) {
                        Some(6) => l4 + 16,
                        _ => l4 + 6,
                    };
                    if let Some(b) = f.get_mut(at) {
                        *b ^= 1 << rng.gen_range(0..8);
                    }
                }
            }
            6 => f.extend((0..rng.gen_range(1..40)).map(|_| rng.gen::<u8>())),
            // Zero ports.
            7 => {
                if let Some((ip, family)) = ip_start(&f) {
                    let l4 = ip + if family == 0x0800 { 20 } else { 40 };
                    if f.len() >= l4 + 4 {
                        f[l4..l4 + 4].fill(0);
                    }
                }
            }
            // The IPv4 header checksum made right again after the others (often; not always).
            _ => {
                if let Some((ip, 0x0800)) = ip_start(&f) {
                    if f.len() >= ip + 20 && ip == L3 {
                        fix_ip4_checksum(&mut f);
                    }
                }
            }
        }
    }
    f
}

/// How one fuzzed frame broke the rules, if it did.
fn judge(
    env: &mut Env,
    frame: &[u8],
    ifindex: u32,
    vips: &[Vec<u8>],
    backends: &[Vec<u8>],
    tally: &mut std::collections::BTreeMap<&'static str, usize>,
) -> Option<String> {
    let reasons = |env: &mut Env| env.b().dataplane().reason_counters().expect("counters");
    let before = reasons(env);
    let (verdict, out) = env.run(frame, ifindex);
    let moved: Vec<(Reason, u64)> = reasons(env)
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let mut wrong = Vec::new();
    if !(XDP_DROP..=XDP_REDIRECT).contains(&verdict) {
        wrong.push(format!("verdict {verdict}"));
    }
    if moved.len() != 1 || moved[0].1 != 1 {
        let names: Vec<_> = moved
            .iter()
            .map(|(r, n)| format!("{}+{n}", r.name()))
            .collect();
        wrong.push(format!("counted as {names:?}"));
    }
    let no_neigh = moved.iter().any(|(r, _)| *r == Reason::PassNoNeigh);
    if verdict == XDP_PASS && out != frame && !no_neigh {
        wrong.push("passed rewritten".into());
    }
    let ours = addressed_to_us(frame, vips, backends);
    if !ours && (verdict != XDP_PASS || out != frame) {
        wrong.push(format!(
            "not addressed to a VIP, yet verdict {verdict} or rewritten"
        ));
    }
    *tally
        .entry(if ours {
            "addressed to us"
        } else {
            "checked byte-identical"
        })
        .or_default() += 1;
    if out != frame {
        *tally.entry("rewritten").or_default() += 1;
        if let (Some(before), Some(after)) = (checksums(frame), checksums(&out)) {
            *tally.entry("checksums compared").or_default() += 1;
            // A new outer header is right; a rewritten one keeps the error it came with.
            let ip4_want = if after.encapsulated && !before.encapsulated {
                Some(0)
            } else {
                before.ip4
            };
            if after.ip4.is_some() && after.ip4 != ip4_want {
                wrong.push(format!(
                    "IPv4 header checksum off by {:?}, want {ip4_want:?}",
                    after.ip4
                ));
            }
            if after.l4 != before.l4 {
                wrong.push(format!(
                    "L4 checksum off by {:?}, came off by {:?}",
                    after.l4, before.l4
                ));
            }
            if before.l4.is_some_and(|d| d != 0) {
                *tally.entry("bad checksums kept").or_default() += 1;
            }
        }
    }
    let verdict_name = match verdict {
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        XDP_TX => "tx",
        XDP_REDIRECT => "redirect",
        _ => "illegal",
    };
    *tally.entry(verdict_name).or_default() += 1;
    (!wrong.is_empty()).then(|| format!("{}: {}", hex(frame), wrong.join(", ")))
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every proper prefix of a well-formed frame of every mode and family (through the L4 header
/// and into the payload) is truncated: the stack gets it as it came, and nothing is created.
#[test]
fn frames_truncated_at_every_offset_pass_untouched() {
    in_netns(|| {
        let (c0, b0) = nat_topology();
        let mut env = Env::new();
        let mut frames = tcp_targets(c0);
        frames.extend(udp_targets(c0));
        frames.push((
            "icmp frag needed",
            frag_needed(NAT_VIP, &quoted_v4(NAT_VIP, 80, 40000)),
            c0,
        ));
        frames.push((
            "icmpv6 too big",
            packet_too_big(
                DSR_VIP6, DSR_VIP6, 80, 40000, LB_MAC, ROUTER_MAC, 64, ROUTER6,
            ),
            0,
        ));
        frames.push((
            "nat reply",
            tcp4(
                BACKEND_MAC,
                LB_B0_MAC,
                NAT_BACKEND,
                CLIENT,
                8080,
                40000,
                64,
                false,
            ),
            b0,
        ));
        let mut failures = Vec::new();
        let mut total = 0;
        for (what, frame, ifindex) in &frames {
            for cut in L3..frame.len() {
                total += 1;
                failures.extend(env.untouched(
                    &format!("{what} cut at {cut}"),
                    &frame[..cut],
                    *ifindex,
                ));
            }
        }
        assert_all_untouched(failures, total);
    });
}

#[test]
fn frames_are_judged_legally_under_fuzzing() {
    let (n, seed) = (fuzz_frames(), fuzz_seed());
    eprintln!("packet fuzz: {n} frames, LB_PACKET_FUZZ_SEED={seed}");
    let report = in_netns(move || {
        use rand::SeedableRng;
        let (c0, b0) = nat_topology();
        let mut env = Env::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (vips, backends) = (vip_addresses(), nat_backend_addresses());
        let mut tally = std::collections::BTreeMap::new();
        let mut failures = Vec::new();
        // Flows for the replies to belong to.
        let mut nat_ports = Vec::new();
        for port in 41000..41016u16 {
            env.run(
                &tcp4(CLIENT_MAC, LB_MAC, CLIENT, NAT_VIP, port, 80, 64, true),
                c0,
            );
            nat_ports.push(port);
        }
        for _ in 0..n {
            let (frame, port) = random_frame(&mut rng, &nat_ports);
            let frame = random_change(&mut rng, frame);
            if frame.len() < L3 {
                continue;
            }
            let ifindex = match port {
                Port::Any => 0,
                Port::C0 => c0,
                Port::B0 => b0,
            };
            if let Some(f) = judge(&mut env, &frame, ifindex, &vips, &backends, &mut tally) {
                failures.push(f);
                if failures.len() >= 20 {
                    break;
                }
            }
        }
        (tally, failures)
    });
    let (tally, failures) = report;
    eprintln!("packet fuzz: {tally:?}");
    assert!(
        failures.is_empty(),
        "seed {seed}: {} frames broke the rules (first 20):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The rules were put to work: each kind of check ran on a share of the frames.
    let share = |k: &str| tally.get(k).copied().unwrap_or(0) * 100 / n.max(1);
    for (kind, at_least) in [
        ("checked byte-identical", 5),
        ("rewritten", 5),
        ("checksums compared", 2),
    ] {
        assert!(
            share(kind) >= at_least,
            "{kind}: {}% of frames, want ≥ {at_least}%: {tally:?}",
            share(kind)
        );
    }
}
