//! XDP ns/packet with BPF_PROG_TEST_RUN: the balancer's real packet paths timed through the
//! restore-and-tail-call harness (lb-ebpf `lb-harness`), against a bare MAC-swap `XDP_TX` program.
//!
//! Each measurement is the kernel's own average over `repeat` runs. The harness writes the original
//! frame back before every run (otherwise run N would see run N-1's rewrite, and an `ipip` frame
//! would grow until the headroom ran out), so its cost is measured too — by tail-calling the floor
//! instead of the balancer — and taken off: `lb = (harness → lb) − ((harness → floor) − floor)`,
//! every term from the same round.
//!
//! Everything runs on one thread, pinned, in a private network namespace (made with unshare; the
//! NAT path's FIB lookups need its interfaces and neighbours) with a private pin root.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::{
    maps::{Array, MapData, ProgramArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
    Ebpf,
};
use etherparse::PacketBuilder;
use lb_common::bench::BenchFrame;
use lb_userspace::{
    l4::dataplane::{self, Dataplane, FLOOR_OBJECT, HARNESS_OBJECT},
    l4::{Balancer, Desired},
    model::instance::InstanceKey,
    model::{BackendMode, BackendSpec, Limits, Mac, Mode, Protocol, VipSpec},
};

use crate::{
    report::{col, Table},
    sys,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT4: [u8; 4] = [10, 0, 0, 1];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Backends per VIP: enough for a real Maglev table.
const BACKENDS: u8 = 4;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const NAT_PORT: u16 = 8080;
/// Connection-tracking entries (the agent's default `max_flows`).
const MAX_FLOWS: u32 = 262_144;

pub struct Opts {
    pub rounds: usize,
    pub repeat: u32,
    pub cpu: usize,
    /// Another build's XDP object, timed beside this one in the same rounds: (its name, the ELF).
    pub baseline: Option<(String, Vec<u8>)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// A SYN (UDP: a first datagram) of a new flow each run into full flow tables: parse, Maglev,
    /// an insert that evicts, rewrite (UDP: a conntrack lookup first).
    Miss,
    /// The same, into flow tables with room: the insert takes a free entry.
    MissRoom,
    /// TCP: one SYN, the frame restored unchanged every run (how the Katran figures were
    /// taken): for lb a retransmitted SYN, whose insert-if-absent finds the flow, then looks it up.
    SameSyn,
    /// The same established flow every run: parse, conntrack hit, rewrite.
    Hit,
}

/// Runs of each "table with room" case per round: all of them together stay below `MAX_FLOWS`
/// inserts, so none evicts.
const ROOM_REPEAT: u32 = 16_384;

const MODES: [(Mode, &str); 3] = [(Mode::Dsr, "DSR"), (Mode::Nat, "NAT"), (Mode::Ipip, "IPIP")];

fn mode_octet(mode: Mode) -> u8 {
    match mode {
        Mode::Dsr => 100,
        Mode::Nat => 101,
        _ => 102,
    }
}

fn vip_addr(mode: Mode, fam: Family) -> IpAddr {
    let o = mode_octet(mode);
    match fam {
        Family::V4 => IpAddr::from([10, 0, 0, o]),
        Family::V6 => IpAddr::from([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, o]),
    }
}

/// Addresses nothing is configured for.
fn not_vip(fam: Family) -> [u8; 16] {
    match fam {
        Family::V4 => v4_in_16([10, 0, 0, 250]),
        Family::V6 => [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0xfa],
    }
}

fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a);
    o
}

fn backend_specs(mode: Mode, fam: Family) -> Vec<BackendSpec> {
    (1..=BACKENDS)
        .map(|i| {
            let mac = Some(Mac([0x02, 0, 0, 0, mode_octet(mode), i]));
            let (address, port, mac) = match (mode, fam) {
                (Mode::Nat, Family::V4) => (IpAddr::from([10, 1, 0, 10 + i]), NAT_PORT, None),
                (Mode::Nat, Family::V6) => (
                    IpAddr::from([0xfd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10 + i]),
                    NAT_PORT,
                    None,
                ),
                (_, Family::V4) => (IpAddr::from([10, 0, mode_octet(mode), i]), 0, mac),
                (_, Family::V6) => (
                    IpAddr::from([
                        0xfd,
                        0,
                        0,
                        mode_octet(mode),
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        i,
                    ]),
                    0,
                    mac,
                ),
            };
            BackendSpec {
                address,
                port,
                weight: 1,
                mac,
            }
        })
        .collect()
}

fn vip_specs() -> Vec<VipSpec> {
    let mut out = Vec::new();
    for (mode, mname) in MODES {
        for fam in [Family::V4, Family::V6] {
            for (protocol, port, pname) in [
                (Protocol::Tcp, TCP_PORT, "tcp"),
                (Protocol::Udp, UDP_PORT, "udp"),
            ] {
                let name = format!(
                    "{}-{}-{pname}",
                    mname.to_lowercase(),
                    if fam == Family::V4 { 4 } else { 6 }
                );
                out.push(VipSpec {
                    name: name.clone(),
                    address: vip_addr(mode, fam),
                    port,
                    protocol,
                    mode,
                    service: name,
                    backends: backend_specs(mode, fam),
                    health: None,
                });
            }
        }
    }
    out
}

/// The frame a client sends: a SYN (miss path) or an ACK with data (established), or a UDP
/// datagram, to `dst`.
fn frame(fam: Family, udp: bool, dst: [u8; 16], port: u16, syn: bool) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let mut out = Vec::new();
    let payload: &[u8] = if syn { &[] } else { b"hello" };
    match (fam, udp) {
        (Family::V4, false) => {
            let d: [u8; 4] = dst[..4].try_into()?;
            let t = b.ipv4(CLIENT4, d, 64).tcp(40000, port, 1000, 64240);
            let t = if syn { t.syn() } else { t.ack(1) };
            t.write(&mut out, payload)?;
        }
        (Family::V4, true) => {
            let d: [u8; 4] = dst[..4].try_into()?;
            b.ipv4(CLIENT4, d, 64)
                .udp(40000, port)
                .write(&mut out, b"query")?;
        }
        (Family::V6, false) => {
            let t = b.ipv6(CLIENT6, dst, 64).tcp(40000, port, 1000, 64240);
            let t = if syn { t.syn() } else { t.ack(1) };
            t.write(&mut out, payload)?;
        }
        (Family::V6, true) => {
            b.ipv6(CLIENT6, dst, 64)
                .udp(40000, port)
                .write(&mut out, b"query")?;
        }
    }
    Ok(out)
}

/// Offset of the low 32 bits of the source address: what the miss path varies, so every run is a
/// flow conntrack has not seen (the IP checksum is not fixed: the balancer does not verify it).
fn src_low32_offset(fam: Family) -> usize {
    match fam {
        Family::V4 => 14 + 12,
        Family::V6 => 14 + 8 + 12,
    }
}

struct Case {
    row: String,
    frame: BenchFrame,
    expect: u32,
    /// Advanced by `repeat` every round so a miss-path run never meets a flow of an earlier round.
    varies: bool,
    /// Timed right after the flow tables are emptied, `ROOM_REPEAT` runs.
    room: bool,
}

fn cases() -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for fam in [Family::V4, Family::V6] {
        let fname = if fam == Family::V4 { "IPv4" } else { "IPv6" };
        for udp in [false, true] {
            let (pname, port) = if udp {
                ("UDP", UDP_PORT)
            } else {
                ("TCP", TCP_PORT)
            };
            for (mode, mname) in MODES {
                let dst = match vip_addr(mode, fam) {
                    IpAddr::V4(a) => v4_in_16(a.octets()),
                    IpAddr::V6(a) => a.octets(),
                };
                let expect = if mode == Mode::Nat {
                    XDP_REDIRECT
                } else {
                    XDP_TX
                };
                for path in [Path::Miss, Path::MissRoom, Path::SameSyn, Path::Hit] {
                    if udp && path == Path::SameSyn {
                        continue;
                    }
                    let f = frame(fam, udp, dst, port, path != Path::Hit)?;
                    let first = if udp { "new flow" } else { "SYN" };
                    let (bench_frame, what) = match path {
                        Path::Miss => (
                            BenchFrame::varying(&f, src_low32_offset(fam), 4, 0),
                            format!("{first}, full table (miss)"),
                        ),
                        Path::MissRoom => (
                            BenchFrame::varying(&f, src_low32_offset(fam), 4, 0),
                            format!("{first}, table with room (miss)"),
                        ),
                        Path::SameSyn => (
                            BenchFrame::fixed(&f),
                            "SYN, same frame each run".to_string(),
                        ),
                        Path::Hit => (BenchFrame::fixed(&f), "established (hit)".to_string()),
                    };
                    out.push(Case {
                        row: format!("{mname} · {fname} {pname} · {what}"),
                        frame: bench_frame.ok_or_else(|| anyhow!("frame too large"))?,
                        expect,
                        varies: matches!(path, Path::Miss | Path::MissRoom),
                        room: path == Path::MissRoom,
                    });
                }
            }
            let f = frame(fam, udp, not_vip(fam), port, false)?;
            out.push(Case {
                row: format!("any mode · {fname} {pname} · not a VIP"),
                frame: BenchFrame::fixed(&f).ok_or_else(|| anyhow!("frame too large"))?,
                expect: XDP_PASS,
                varies: false,
                room: false,
            });
        }
    }
    Ok(out)
}

/// Interfaces and neighbours the NAT path's FIB lookups resolve against: c0 (client side) and b0
/// (backend side), neighbours permanent so every lookup succeeds. Returns c0's ifindex.
fn topology() -> Result<u32> {
    let mut cmds = vec![
        "ip link add c0 address 02:00:00:00:00:02 type veth peer name c1".to_string(),
        "ip link add b0 address 02:00:00:00:02:02 type veth peer name b1".into(),
        "ip link set lo up && ip link set c0 up && ip link set c1 up && ip link set b0 up && ip link set b1 up".into(),
        "ip addr add 10.0.0.2/24 dev c0 && ip addr add 10.1.0.1/24 dev b0".into(),
        "ip -6 addr add fd00::2/64 dev c0 nodad && ip -6 addr add fd01::1/64 dev b0 nodad".into(),
        "ip neigh add 10.0.0.1 lladdr 02:00:00:00:00:01 dev c0 nud permanent".into(),
        "ip -6 neigh add fd00::1 lladdr 02:00:00:00:00:01 dev c0 nud permanent".into(),
        "sysctl -qw net.ipv4.ip_forward=1 && sysctl -qw net.ipv6.conf.all.forwarding=1".into(),
    ];
    for i in 1..=BACKENDS {
        cmds.push(format!(
            "ip neigh add 10.1.0.{} lladdr 02:00:00:00:65:{i:02x} dev b0 nud permanent",
            10 + i
        ));
        cmds.push(format!(
            "ip -6 neigh add fd01::{:x} lladdr 02:00:00:00:65:{i:02x} dev b0 nud permanent",
            0x10 + i
        ));
    }
    for c in cmds {
        sys::run(&["sh", "-c", &c])?;
    }
    nix::net::if_::if_nametoindex("c0").context("ifindex of c0")
}

/// The balancer, the floor and the harness, loaded; removed (pins included) on drop.
struct Rig {
    balancer: Option<Balancer>,
    pin_root: PathBuf,
    floor: Ebpf,
    harness: Ebpf,
    frame: Array<MapData, BenchFrame>,
    target: ProgramArray<MapData>,
    ctx: Vec<u8>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        drop(self.balancer.take());
        let _ = dataplane::detach(&self.pin_root, "bench");
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

#[derive(Clone, Copy)]
enum Target {
    Lb,
    Floor,
}

impl Rig {
    /// `object` is the balancer's ELF; `tag` keeps two rigs' pins apart.
    fn new(ifindex: u32, object: &[u8], tag: &str) -> Result<Rig> {
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/lbb-xdp-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_root);
        let limits = Limits {
            max_vips: 16,
            max_backends: 64,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            max_flows: MAX_FLOWS,
            udp_timeout_secs: 30,
            ipip_source_v4: "172.16.0.0".parse()?,
            ipip_source_v6: "fd00:ffff::".parse()?,
        };
        // From here on the pins are removed on every exit path.
        let mut rig_pins = PinGuard(Some(pin_root.clone()));
        let dp = Dataplane::open_object(object, &pin_root, "bench", &limits, false)
            .with_context(|| format!("loading the {tag} object"))?;
        let vips = vip_specs();
        let mut balancer = Balancer::new(dp, &vips)?;
        for v in &vips {
            let desired: Vec<Desired> = v
                .backends
                .iter()
                .map(|b| Desired {
                    key: InstanceKey {
                        address: b.address,
                        port: b.port,
                    },
                    weight: b.weight,
                    mac: b.mac,
                    state: BackendMode::Active,
                })
                .collect();
            balancer.apply(&v.name, &desired)?;
        }
        let mut floor = Ebpf::load(FLOOR_OBJECT).context("loading lb-floor")?;
        let p: &mut Xdp = floor
            .program_mut("bench_floor")
            .context("bench_floor missing")?
            .try_into()?;
        p.load().context("the verifier rejected bench_floor")?;
        let mut harness = Ebpf::load(HARNESS_OBJECT).context("loading lb-harness")?;
        let p: &mut Xdp = harness
            .program_mut("bench_harness")
            .context("bench_harness missing")?
            .try_into()?;
        p.load().context("the verifier rejected bench_harness")?;
        let frame: Array<MapData, BenchFrame> =
            Array::try_from(harness.take_map("FRAME").context("FRAME missing")?)?;
        let target: ProgramArray<MapData> =
            ProgramArray::try_from(harness.take_map("TARGET").context("TARGET missing")?)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let md: [u32; 6] = [0, 0, 0, ifindex, 0, 0];
        rig_pins.0 = None;
        Ok(Rig {
            balancer: Some(balancer),
            pin_root,
            floor,
            harness,
            frame,
            target,
            ctx: md.iter().flat_map(|w| w.to_ne_bytes()).collect(),
        })
    }

    fn floor_prog(&self) -> Result<&Xdp> {
        Ok(self
            .floor
            .program("bench_floor")
            .context("bench_floor")?
            .try_into()?)
    }

    fn harness_prog(&self) -> Result<&Xdp> {
        Ok(self
            .harness
            .program("bench_harness")
            .context("bench_harness")?
            .try_into()?)
    }

    fn set_target(&mut self, t: Target) -> Result<()> {
        let fd = match t {
            Target::Lb => self
                .balancer
                .as_mut()
                .context("balancer")?
                .dataplane()
                .program()?
                .fd()?
                .try_clone()?,
            Target::Floor => self.floor_prog()?.fd()?.try_clone()?,
        };
        self.target.set(0, &fd, 0).context("TARGET[0]")
    }

    /// Empties FLOWS and NAT_REVERSE.
    fn clear_flows(&mut self) -> Result<()> {
        self.balancer
            .as_mut()
            .context("balancer")?
            .clear_flows()
            .map(drop)
    }

    fn set_frame(&mut self, f: &BenchFrame) -> Result<()> {
        self.frame.set(0, f, 0).context("FRAME[0]")
    }

    /// One BPF_PROG_TEST_RUN of `prog` on `data`: (verdict, ns per run, output frame).
    fn run(&self, prog: &Xdp, data: &[u8], repeat: u32) -> Result<(u32, u64, Vec<u8>)> {
        let mut out = vec![0u8; data.len() + 256];
        let mut ctx = self.ctx.clone();
        ctx[4..8].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(data);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, r.duration.as_nanos() as u64, out))
    }

    fn run_harness(&self, data: &[u8], repeat: u32) -> Result<(u32, u64, Vec<u8>)> {
        self.run(self.harness_prog()?, data, repeat)
    }
}

/// Removes a pin root if setup fails half way.
struct PinGuard(Option<PathBuf>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = dataplane::detach(&p, "bench");
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

fn frame_bytes(f: &BenchFrame) -> &[u8] {
    &f.data[..f.len as usize]
}

/// Proves each case measures what it claims before it is timed: the verdict is the path's, and
/// for a fixed frame three harnessed runs end exactly like one (the harness restores the frame).
fn verify(rig: &mut Rig, case: &Case) -> Result<()> {
    rig.set_frame(&case.frame)?;
    let data = frame_bytes(&case.frame).to_vec();
    let (v1, _, out1) = rig.run_harness(&data, 1)?;
    ensure!(
        v1 == case.expect,
        "{}: verdict {v1}, expected {}",
        case.row,
        case.expect
    );
    if !case.varies {
        rig.set_frame(&case.frame)?;
        let (v3, _, out3) = rig.run_harness(&data, 3)?;
        ensure!(
            v3 == v1 && out3 == out1,
            "{}: three harnessed runs differ from one — the harness did not restore the frame",
            case.row
        );
    }
    Ok(())
}

pub fn run(opts: Opts) -> Result<Table> {
    std::thread::spawn(move || -> Result<Table> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare a network namespace")?;
        sys::pin_thread(opts.cpu)?;
        measure(&opts)
    })
    .join()
    .map_err(|_| anyhow!("the XDP benchmark thread panicked"))?
}

const FLOOR_ROW: &str = "floor: MAC swap + XDP_TX (direct)";
const HARNESS_FLOOR_ROW: &str = "harness → floor";
const HARNESS_ROW: &str = "harness alone (difference)";

/// Fills FLOWS and NAT_REVERSE with new NAT flows of `nat_miss` (a NAT miss case), past their
/// size so both are full. `offset` keeps these flows apart from that case's timed ones.
fn fill_tables(rig: &mut Rig, nat_miss: &Case, offset: &mut u32) -> Result<()> {
    let n = MAX_FLOWS + MAX_FLOWS / 4;
    let mut f = nat_miss.frame;
    f.vary_base = f.vary_base.wrapping_add(*offset);
    *offset = offset.wrapping_add(n + 1);
    rig.set_frame(&f)?;
    rig.run_harness(frame_bytes(&f), n)?;
    Ok(())
}

/// One timed run of `repeat` packets: (ns via the harness, ns net of the harness).
fn time_case(
    rig: &mut Rig,
    c: &Case,
    offset: &mut u32,
    repeat: u32,
    harness: f64,
) -> Result<(f64, f64)> {
    let mut f = c.frame;
    if c.varies {
        f.vary_base = f.vary_base.wrapping_add(*offset);
        *offset = offset.wrapping_add(repeat + 1);
    }
    rig.set_frame(&f)?;
    let data = frame_bytes(&f).to_vec();
    if !c.varies {
        // Establish the flow (a no-op for the non-VIP case).
        rig.run_harness(&data, 1)?;
    }
    let (v, ns, _) = rig.run_harness(&data, repeat)?;
    if v != c.expect {
        bail!(
            "{}: verdict {v} during the timed run, expected {}",
            c.row,
            c.expect
        );
    }
    Ok((ns as f64, ns as f64 - harness))
}

/// One balancer build under test: its rig, and the offsets that keep its varying frames new.
struct Contender {
    rig: Rig,
    offsets: Vec<u32>,
    /// `Some(name)`: another commit's build, reported in the `name` column (net of its own
    /// harness measurement); `None`: this tree's, whose columns are the table's first three.
    baseline: Option<String>,
}

fn measure(opts: &Opts) -> Result<Table> {
    let ifindex = topology()?;
    let mut cases = cases()?;
    // For iterating on one path: `LB_BENCH_XDP_CASES="IPv4 TCP"` keeps rows containing any of
    // the comma-separated substrings.
    if let Ok(filter) = std::env::var("LB_BENCH_XDP_CASES") {
        cases.retain(|c| filter.split(',').any(|f| c.row.contains(f)));
    }
    let floor_frame = BenchFrame::fixed(&frame(
        Family::V4,
        false,
        v4_in_16([10, 0, 0, 100]),
        TCP_PORT,
        true,
    )?)
    .ok_or_else(|| anyhow!("frame too large"))?;

    let mut columns = vec![
        col("lb", "ns/packet", 1),
        col("× floor", "", 2),
        col("via harness", "ns", 1),
    ];
    let mut contenders = vec![Contender {
        rig: Rig::new(ifindex, dataplane::LB_OBJECT, "head")?,
        offsets: vec![0; cases.len()],
        baseline: None,
    }];
    if let Some((name, object)) = &opts.baseline {
        columns.push(col(name, "ns/packet", 1));
        columns.push(col(&format!("lb ÷ {name}"), "", 2));
        contenders.push(Contender {
            rig: Rig::new(ifindex, object, "baseline")?,
            offsets: vec![0; cases.len()],
            baseline: Some(name.clone()),
        });
    }
    let mut t = Table::new("xdp", "XDP ns/packet (BPF_PROG_TEST_RUN)", columns);
    for r in [FLOOR_ROW, HARNESS_FLOOR_ROW, HARNESS_ROW] {
        t.row(r);
    }
    for c in &cases {
        t.row(&c.row);
    }

    let fill = cases
        .iter()
        .position(|c| c.varies && !c.room && c.expect == XDP_REDIRECT)
        .ok_or_else(|| anyhow!("no NAT miss case"))?;
    let fdata = frame_bytes(&floor_frame).to_vec();
    for k in &mut contenders {
        let rig = &mut k.rig;
        // Correctness first: floor and harness agree with a direct run, every case takes its path.
        rig.set_target(Target::Floor)?;
        rig.set_frame(&floor_frame)?;
        let (vd, _, outd) = rig.run(rig.floor_prog()?, &fdata, 1)?;
        let (vh, _, outh) = rig.run_harness(&fdata, 1)?;
        ensure!(
            vd == XDP_TX && vh == XDP_TX && outd == outh,
            "harness → floor differs from the floor run directly"
        );
        rig.set_target(Target::Lb)?;
        for c in &cases {
            verify(rig, c).with_context(|| match &k.baseline {
                Some(name) => format!("the baseline {name}"),
                None => "this tree's build".into(),
            })?;
        }
        // Steady state: lb's LRUs only ever lose entries by eviction, so on a balancer that has
        // run for a while FLOWS and NAT_REVERSE are full and every new flow evicts one. Fill both
        // first (a NAT miss inserts into each), else the first misses would find free room.
        fill_tables(rig, &cases[fill], &mut k.offsets[fill])?;
    }

    for round in 0..opts.rounds {
        // This round's net ns per row and contender, for the ratio column.
        let mut nets: Vec<std::collections::HashMap<String, f64>> =
            vec![Default::default(); contenders.len()];
        let n = contenders.len();
        for j in 0..n {
            // The contenders take turns going first.
            let ki = (j + round) % n;
            let k = &mut contenders[ki];
            let (c_net, c_via) = match &k.baseline {
                Some(name) => (name.clone(), None),
                None => ("lb".to_string(), Some("via harness")),
            };
            let rig = &mut k.rig;
            // The floor and the harness's own cost, this round.
            rig.set_target(Target::Floor)?;
            rig.set_frame(&floor_frame)?;
            let (_, floor, _) = rig.run(rig.floor_prog()?, &fdata, opts.repeat)?;
            let (v, hf, _) = rig.run_harness(&fdata, opts.repeat)?;
            ensure!(v == XDP_TX, "harness → floor returned {v}");
            let harness = hf as f64 - floor as f64;
            t.add(FLOOR_ROW, &c_net, floor as f64);
            t.add(HARNESS_ROW, &c_net, harness);
            if let Some(via) = c_via {
                t.add(FLOOR_ROW, "× floor", 1.0);
                t.add(HARNESS_FLOOR_ROW, via, hf as f64);
            }
            rig.set_target(Target::Lb)?;
            let mut record = |row: &str, ns: f64, net: f64| {
                nets[ki].insert(row.to_string(), net);
                t.add(row, &c_net, net);
                if let Some(via) = c_via {
                    t.add(row, via, ns);
                    if floor > 0 {
                        t.add(row, "× floor", net / floor as f64);
                    }
                }
            };
            // Tables with room first: emptied, the room cases, then filled again for the rest.
            // Each group starts at a different case every round so no case always follows the
            // same one.
            rig.clear_flows()?;
            let (room, rest): (Vec<usize>, Vec<usize>) =
                (0..cases.len()).partition(|&i| cases[i].room);
            for q in 0..room.len() {
                let i = room[(q + round) % room.len()];
                let (ns, net) = time_case(rig, &cases[i], &mut k.offsets[i], ROOM_REPEAT, harness)?;
                record(&cases[i].row, ns, net);
            }
            fill_tables(rig, &cases[fill], &mut k.offsets[fill])?;
            for q in 0..rest.len() {
                let i = rest[(q + round * 7) % rest.len()];
                let (ns, net) = time_case(rig, &cases[i], &mut k.offsets[i], opts.repeat, harness)?;
                record(&cases[i].row, ns, net);
            }
        }
        if let (Some(head), Some(base), Some(name)) = (
            nets.first(),
            nets.get(1),
            contenders.get(1).and_then(|k| k.baseline.as_ref()),
        ) {
            for (row, net) in head {
                if let Some(b) = base.get(row).filter(|b| **b > 0.0) {
                    t.add(row, &format!("lb ÷ {name}"), net / b);
                }
            }
        }
    }
    t.note(format!(
        "Kernel-reported average over {} runs per measurement (integer ns), {} interleaved rounds, \
         one pinned CPU. `lb` = via harness − harness alone; harness alone = (harness → floor) − floor, \
         from the same round.",
        opts.repeat, opts.rounds
    ));
    if let Some((name, _)) = &opts.baseline {
        t.note(format!(
            "`{name}`: that commit's XDP object, loaded through this tree's writer into its own maps \
             (same limits, VIPs and backends) and timed in the same rounds, the two builds taking \
             turns to go first; its floor and harness rows are its own rig's. `lb ÷ {name}`: the \
             ratio of the two nets within each round."
        ));
    }
    t.note(
        "Miss paths: the harness writes a new source address into every run's frame, so each run is \
         a new flow (a SYN goes straight to Maglev and an insert-if-absent; a UDP datagram is looked \
         up first). FLOWS (and NAT_REVERSE) hold 262,144 entries. Full table: both are filled before \
         timing, so every insert evicts, as on a balancer that has run for a while. Table with room: \
         both are emptied first and each case runs 16,384 times, so every insert takes a free entry. \
         SYN, same frame each run: one SYN restored unchanged, so after the first run lb sees a \
         retransmitted SYN (the insert-if-absent finds the flow, a lookup keeps its backend), with \
         every cache line hot. Hit path: one established flow. Not a VIP: the exact VIP lookup misses, and \
         the wildcard and NAT-reply lookups are skipped by their gates (no port-0 VIP for the \
         protocol, no NAT backend answering from the source port); XDP_PASS. 4 backends per VIP, \
         M = 65,537.",
    );
    t.note(
        "For scale (issue #6): Katran's balancer, measured through the same restore-and-tail-call \
         harness on this machine kind, costs about 186 ns (IPv4 SYN), 86 ns (hit) and 37 ns (not a \
         VIP), against 12 ns for its harness alone. Katran encapsulates in IP-in-IP and, for a SYN, \
         skips the flow lookup and overwrites the entry; one SYN repeated keeps all of that in cache. \
         Its figures compare with lb's IPIP rows: SYN with 'same frame each run', hit with hit. A new \
         flow in either balancer pays for cold hash buckets and LRU nodes (the 'table with room' and \
         'full table' rows), which one repeated SYN never shows.",
    );
    Ok(t)
}
