//! The balancer's XDP program.
//!
//! Packet path (see ARCHITECTURE.md): parse Ethernet (+ one 802.1Q/802.1ad tag), IPv4 (options
//! allowed) or IPv6 (no extension headers), TCP or UDP; find the VIP by (address, port, protocol),
//! falling back to the port-0 wildcard; keep the flow on its backend through connection tracking;
//! on a miss pick a backend from the VIP's live Maglev table; forward by the VIP's mode. Anything
//! that is not for a VIP, or cannot be parsed, is `XDP_PASS`: the host's own traffic (ssh, the
//! agent's API) must never be dropped by accident. A malformed frame (a version or length field
//! that disagrees with the frame or with another header) is passed too, checked while parsing,
//! before any flow or NAT reverse entry exists and before any byte is rewritten: what the stack
//! would refuse, the balancer must not forward for it.
//!
//! Fragments carry ports only in the first piece, so a fragmented datagram is steered by addresses
//! alone (ports hashed as zero) and only through a port-0 VIP; without one it is passed to the stack.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
    Global,
};
use lb_common::{
    backend_flags, csum, gate, hash::flow_hash, mode, proto, Backend, Counters, Flow, FlowKey,
    NatReverse, Reason, VipKey, VipMeta, BACKEND_NONE, DEFAULT_RING_SIZE, REASON_COUNT,
};

// ---- load-time settings (the agent overrides them; they size nothing, so they may differ
// between program versions sharing one map set only as the agent allows) ----

/// Maglev table size M: `RINGS` holds `2 * max_vips * M` entries.
#[unsafe(no_mangle)]
static RING_SIZE: Global<u32> = Global::new(DEFAULT_RING_SIZE);
/// A UDP flow idle longer than this is re-picked (there is no FIN to end it).
#[unsafe(no_mangle)]
static UDP_TIMEOUT_NS: Global<u64> = Global::new(30_000_000_000);

/// `ipip`: outer IPv4 source prefix (network order, /16): the low 16 bits carry the flow hash, so
/// a backend's NIC spreads decapsulation over its queues (receive-side scaling on the outer header).
#[unsafe(no_mangle)]
static IPIP_SRC_V4: Global<u32> = Global::new(u32::from_ne_bytes([172, 16, 0, 0]));
/// `ipip`: outer IPv6 source prefix (/96); the low 32 bits carry the flow hash.
#[unsafe(no_mangle)]
static IPIP_SRC_V6: Global<[u32; 4]> =
    Global::new([u32::from_ne_bytes([0xfd, 0x00, 0xff, 0xff]), 0, 0, 0]);

// ---- maps (max_entries are set by the agent at creation; these are defaults) ----

#[map]
static VIPS: HashMap<VipKey, VipMeta> = HashMap::pinned(512, 0);
#[map]
static BACKENDS: Array<Backend> = Array::pinned(4096, 0);
#[map]
static RINGS: Array<u32> = Array::pinned(2 * 512 * DEFAULT_RING_SIZE, 0);
/// Shared (not per-CPU) LRU: on veth, and with any sender that migrates between CPUs, a flow is
/// processed on whichever CPU its packet arrives; a per-CPU table would miss there and fall back to
/// Maglev, which is stable but not immune to backend changes.
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(65_536, 0);
#[map]
static NAT_REVERSE: LruHashMap<FlowKey, NatReverse> = LruHashMap::pinned(65_536, 0);
#[map]
static NAT_PORTS: Array<u64> = Array::pinned(gate::NAT_PORT_WORDS, 0);
#[map]
static WILDCARD: Array<u32> = Array::pinned(gate::PROTOCOLS, 0);
#[map]
static VIP_ADDRS: Array<u64> = Array::pinned(gate::VIP_ADDR_WORDS, 0);
#[map]
static STATS_VIP: PerCpuArray<Counters> = PerCpuArray::pinned(512, 0);
#[map]
static STATS_BACKEND: PerCpuArray<Counters> = PerCpuArray::pinned(4096, 0);
#[map]
static STATS_REASON: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);

// ---- headers ----

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[repr(C)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
}

#[repr(C)]
struct VlanHdr {
    tci: u16,
    proto: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct Ipv6Hdr {
    ver_tc_flow: u32,
    payload_len: u16,
    next_hdr: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// The first 8 bytes of TCP and UDP share the port layout; the checksum sits at a
/// protocol-specific offset (16 for TCP, 6 for UDP).
#[repr(C)]
struct Ports {
    sport: u16,
    dport: u16,
}

const TCP_HDR_LEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const UDP_HDR_LEN: usize = 8;

/// Bounds-checked pointer into the frame: the only way this program reads packet memory.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Same as [`ptr_at`] but also proves `len` bytes are present (for an L4 header whose fields we touch).
#[inline(always)]
fn ptr_with_len<T>(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut T> {
    // One pointer, compared and returned: the verifier's range check must be on the register
    // that is then dereferenced.
    let p = ctx.data() + off;
    if p + len > ctx.data_end() {
        return None;
    }
    Some(p as *mut T)
}

#[inline(always)]
fn count_reason(reason: Reason) {
    if let Some(c) = STATS_REASON.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<Counters>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[xdp]
pub fn lb(ctx: XdpContext) -> u32 {
    let (action, reason) = process(&ctx);
    count_reason(reason);
    if action == xdp_action::XDP_DROP {
        // Written only with `[agent] debug = true` (the agent sets AYA_LOG_LEVEL); otherwise
        // this is one load and a branch, on drops only. The agent forwards it to its log.
        aya_log_ebpf::info!(&ctx, "dropped a packet: reason {}", reason as u32);
    }
    action
}

type Verdict = (u32, Reason);

const PASS: u32 = xdp_action::XDP_PASS;

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY: ptr_at checked the bounds.
    let mut ether_type = u16::from_be(unsafe { (*eth).proto });
    let mut l3 = size_of::<EthHdr>();
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, l3) else {
            return (PASS, Reason::PassTruncated);
        };
        ether_type = u16::from_be(unsafe { (*vlan).proto });
        l3 += size_of::<VlanHdr>();
    }
    match ether_type {
        ETH_P_IP => process_v4(ctx, l3),
        ETH_P_IPV6 => process_v6(ctx, l3),
        _ => (PASS, Reason::PassNotIp),
    }
}

/// Where the L4 ports and checksum of a TCP/UDP packet sit, once the IP header is understood.
struct L4 {
    ports: *mut Ports,
    /// Null for a fragment (ports not present or not trusted).
    check: *mut u16,
    udp: bool,
    /// A TCP SYN without ACK: the first packet of a connection, which needs no flow lookup.
    syn: bool,
}

/// Parses TCP/UDP at `off`, the start of an IP payload of `l4_len` bytes (from the validated IP
/// length, never the frame's: padding is not payload). `None` when the header is cut short, by the
/// frame or by the IP length, or its own length field is impossible: a TCP data offset below 5 or
/// past the segment, a UDP length below 8 or past the IP payload. A UDP length *short* of the IP
/// payload is forwarded: Linux accepts it and trims the datagram to it (`__udp4_lib_rcv`,
/// `udpv6_rcv`), so the backend's stack does what it would do without the balancer, and the ports
/// the flow is steered by are in the header either way.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, off: usize, l4_len: usize, l4_proto: u8) -> Option<L4> {
    if l4_proto == proto::TCP {
        let ports = ptr_with_len::<Ports>(ctx, off, TCP_HDR_LEN)?;
        // SAFETY: bytes 12 (data offset) and 13 (flags) lie inside the TCP_HDR_LEN bytes just checked.
        let (doff, flags) = unsafe {
            (
                *((ports as usize + 12) as *const u8),
                *((ports as usize + 13) as *const u8),
            )
        };
        let hdr_len = (doff >> 4) as usize * 4;
        if hdr_len < TCP_HDR_LEN || hdr_len > l4_len {
            return None;
        }
        Some(L4 {
            ports,
            check: (ports as usize + 16) as *mut u16,
            udp: false,
            syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        })
    } else {
        let ports = ptr_with_len::<Ports>(ctx, off, UDP_HDR_LEN)?;
        // SAFETY: the length (bytes 4..6) lies inside the UDP_HDR_LEN bytes just checked.
        let udp_len = u16::from_be(unsafe { *((ports as usize + 4) as *const u16) }) as usize;
        if udp_len < UDP_HDR_LEN || udp_len > l4_len {
            return None;
        }
        Some(L4 {
            ports,
            check: (ports as usize + 6) as *mut u16,
            udp: true,
            syn: false,
        })
    }
}

/// VIP lookup: exact (address, port, protocol) first, then the port-0 wildcard.
#[inline(always)]
fn find_vip(addr: [u32; 4], port: u16, l4_proto: u8) -> Option<VipMeta> {
    // Array reads the JIT inlines, where a hash lookup would hash the key and walk a bucket:
    // most packets on a balancer's host that are not for a VIP stop at the first.
    let bit = gate::addr_bit(&addr);
    if VIP_ADDRS
        .get(bit / 64)
        .is_some_and(|w| *w & (1u64 << (bit % 64)) == 0)
    {
        return None;
    }
    let mut key = VipKey {
        addr,
        port,
        proto: l4_proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces whole entries.
    if port != 0 {
        if let Some(v) = unsafe { VIPS.get(&key) } {
            return Some(*v);
        }
    }
    if WILDCARD.get(l4_proto as u32).is_some_and(|w| *w == 0) {
        return None;
    }
    key.port = 0;
    unsafe { VIPS.get(&key) }.copied()
}

/// A backend chosen for a packet: its id, a copy of its entry, and whether this packet started
/// (or re-started) the flow.
struct Pick {
    id: u32,
    backend: Backend,
    new_flow: bool,
    /// The flow hash, when Maglev needed it (a miss): ipip reuses it for the outer source.
    hash: Option<u32>,
}

impl Pick {
    #[inline(always)]
    fn flow_hash(&self, key: &FlowKey) -> u32 {
        self.hash.unwrap_or_else(|| flow_hash(key))
    }
}

/// Connection tracking, then Maglev on a miss.
///
/// A tracked flow stays on its backend while the backend is usable (up or draining), so adding or
/// removing other backends never moves it; a flow whose backend was removed is re-picked here.
/// `track` false only looks (ICMP errors about a flow must not create or refresh it).
///
/// A TCP SYN (`syn`) nearly always opens a connection, so it skips the lookup and goes straight
/// to Maglev, inserting only if the flow is absent: one hash-table operation on the new-connection
/// path instead of two. A retransmitted SYN finds its entry that way and keeps its backend, exactly
/// as a lookup would have. Only UDP reads the clock: it is the only protocol whose flows age.
#[inline(always)]
fn pick_backend(
    vip: &VipMeta,
    key: &FlowKey,
    udp: bool,
    syn: bool,
    track: bool,
) -> Result<Pick, Reason> {
    let now = if udp {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };
    if !syn {
        if let Some(p) = tracked(vip, key, udp, track, now) {
            return Ok(p);
        }
    }
    let (id, backend, hash) = match maglev(vip, key) {
        Ok(x) => x,
        Err(r) => {
            // A retransmitted SYN of a flow on a draining backend, the table empty of others.
            if syn {
                if let Some(p) = tracked(vip, key, udp, track, now) {
                    return Ok(p);
                }
            }
            return Err(r);
        }
    };
    let flow = Flow {
        backend_id: id,
        _pad: 0,
        last_seen_ns: now,
    };
    // A full LRU evicts; a failed insert only costs a Maglev lookup on the next packet.
    if track {
        if !syn || FLOWS.insert(key, &flow, BPF_NOEXIST as u64).is_err() {
            if syn {
                if let Some(p) = tracked(vip, key, udp, track, now) {
                    return Ok(p);
                }
            }
            let _ = FLOWS.insert(key, &flow, 0);
        }
    }
    Ok(Pick {
        id,
        backend,
        new_flow: true,
        hash: Some(hash),
    })
}

/// The flow's tracked backend, if it may still take the flow.
#[inline(always)]
fn tracked(vip: &VipMeta, key: &FlowKey, udp: bool, track: bool, now: u64) -> Option<Pick> {
    let flow = FLOWS.get_ptr_mut(key)?;
    // SAFETY: LRU value pointer; a concurrent update replaces the whole 16 bytes at worst.
    let id = unsafe { (*flow).backend_id };
    let b = BACKENDS.get(id)?;
    let fresh = !udp || now.wrapping_sub(unsafe { (*flow).last_seen_ns }) < UDP_TIMEOUT_NS.load();
    // A backend id the agent gave to another VIP's backend since is not this flow's.
    if id == BACKEND_NONE || b.flags & backend_flags::USABLE == 0 || b.vip_id != vip.id || !fresh {
        return None;
    }
    if udp && track {
        unsafe { (*flow).last_seen_ns = now };
    }
    Some(Pick {
        id,
        backend: *b,
        new_flow: false,
        hash: None,
    })
}

/// The VIP's live Maglev table's pick for the flow: (backend id, its entry, the flow hash).
#[inline(always)]
fn maglev(vip: &VipMeta, key: &FlowKey) -> Result<(u32, Backend, u32), Reason> {
    let m = RING_SIZE.load();
    if m == 0 {
        return Err(Reason::DropBadMaps);
    }
    let hash = flow_hash(key);
    let slot = (hash % m) as u64;
    let base = ((vip.id as u64) * 2 + (vip.ring_slot & 1) as u64) * m as u64;
    let index = base + slot;
    if index > u32::MAX as u64 {
        return Err(Reason::DropBadMaps);
    }
    let Some(id) = RINGS.get(index as u32).copied() else {
        return Err(Reason::DropBadMaps);
    };
    if id == BACKEND_NONE {
        return Err(Reason::DropNoBackend);
    }
    let Some(b) = BACKENDS.get(id) else {
        return Err(Reason::DropBadMaps);
    };
    if b.flags & backend_flags::USABLE == 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok((id, *b, hash))
}

/// DSR: the backend holds the VIP itself; only the L2 destination changes.
#[inline(always)]
fn forward_dsr(ctx: &XdpContext, backend: &Backend) -> Verdict {
    if backend.mac == [0u8; 6] {
        return (xdp_action::XDP_DROP, Reason::DropBadBackend);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY: bounds checked above.
    unsafe {
        (*eth).src = (*eth).dst;
        (*eth).dst = backend.mac;
    }
    (xdp_action::XDP_TX, Reason::TxDsr)
}

/// Sends an already rewritten packet towards `params`' destination through the FIB.
/// `forward_reason` names the verdict when the next hop is found.
#[inline(always)]
fn fib_forward(ctx: &XdpContext, params: &mut FibParams, forward_reason: Reason) -> Verdict {
    let ingress = ctx.ingress_ifindex() as u32;
    params.ifindex = ingress;
    // SAFETY: params is a properly sized bpf_fib_lookup on the stack.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            params as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return (PASS, Reason::PassTruncated);
        };
        // SAFETY: bounds checked above.
        unsafe {
            (*eth).dst = params.dmac;
            (*eth).src = params.smac;
        }
        if params.ifindex == ingress {
            let reason = if matches!(forward_reason, Reason::RedirectNat) {
                Reason::TxNat
            } else {
                forward_reason
            };
            return (xdp_action::XDP_TX, reason);
        }
        let action = unsafe { bpf_redirect(params.ifindex, 0) } as u32;
        return (action, forward_reason);
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The packet is already rewritten: the kernel routes it to the same next hop and resolves
        // the neighbour on the way; the next packets take the fast path.
        return (PASS, Reason::PassNoNeigh);
    }
    (xdp_action::XDP_DROP, Reason::DropNoRoute)
}

#[inline(always)]
fn fib_params_v4(l4_proto: u8, tot_len: u16, saddr: u32, daddr: u32) -> FibParams {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = l4_proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    p
}

#[inline(always)]
fn fib_params_v6(l4_proto: u8, tot_len: u16, saddr: [u32; 4], daddr: [u32; 4]) -> FibParams {
    // SAFETY: as above.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = l4_proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv6_src = saddr;
    p.__bindgen_anon_4.ipv6_dst = daddr;
    p
}

/// Applies an accumulated checksum change to the L4 checksum. A zero UDP checksum over IPv4 means
/// "none" and stays zero; a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
fn update_l4_check(l4: &L4, acc: u64, v4: bool) {
    // SAFETY: l4.check was derived from a bounds-checked L4 header pointer.
    unsafe {
        let old = *l4.check;
        if l4.udp && v4 && old == 0 {
            return;
        }
        let mut new = csum::apply(old, acc);
        if l4.udp && new == 0 {
            new = 0xffff;
        }
        *l4.check = new;
    }
}

// ---------------------------------------------------------------- IP-in-IP

const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const VLAN_LEN: usize = size_of::<VlanHdr>();

/// Katran-style encapsulation: an outer IPv4 or IPv6 header (the backend's family) in front of the
/// untouched inner packet, outer source from a configured prefix plus the flow hash, MACs as in
/// DSR, `XDP_TX`. A VLAN tag stays in front of the outer header. `l3` is the inner header's offset
/// (14, or 18 with a tag), `inner_len` the inner datagram's length from its IP header, which the
/// caller checked against the frame ([`ipv4_lengths`], [`ipv6_payload_len`]): the outer header
/// claims exactly the inner datagram, and a short frame's padding follows it uncounted. The outer
/// IPv4 header copies the inner DF bit (RFC 2003; IPv6 inner packets never fragment en route), so
/// path MTU discovery keeps working through the tunnel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn encap(
    ctx: &XdpContext,
    l3: usize,
    inner_v4: bool,
    inner_len: u16,
    tos: u8,
    df: bool,
    backend: &Backend,
    hash: u32,
) -> Verdict {
    if backend.mac == [0u8; 6] {
        return (xdp_action::XDP_DROP, Reason::DropBadBackend);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY: bounds checked above; values copied before the head moves.
    let our_mac = unsafe { (*eth).dst };
    let mut tci = 0u16;
    let tagged = l3 == size_of::<EthHdr>() + VLAN_LEN;
    if tagged {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, size_of::<EthHdr>()) else {
            return (PASS, Reason::PassTruncated);
        };
        tci = unsafe { (*vlan).tci };
    }
    let inner_proto = if inner_v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    let outer_v4 = backend.family == lb_common::family::V4;
    let outer_len = if outer_v4 {
        size_of::<Ipv4Hdr>()
    } else {
        size_of::<Ipv6Hdr>()
    };
    // SAFETY: the helper moves data; every pointer is re-derived and re-checked afterwards.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return (xdp_action::XDP_DROP, Reason::DropBadMaps);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, Reason::PassTruncated);
    };
    let outer_type: u16 = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 };
    let mut off = size_of::<EthHdr>();
    unsafe {
        (*eth).dst = backend.mac;
        (*eth).src = our_mac;
        if tagged {
            (*eth).proto = ETH_P_8021Q.to_be();
            let Some(vlan) = ptr_at::<VlanHdr>(ctx, off) else {
                return (xdp_action::XDP_DROP, Reason::PassTruncated);
            };
            (*vlan).tci = tci;
            (*vlan).proto = outer_type.to_be();
            off += VLAN_LEN;
        } else {
            (*eth).proto = outer_type.to_be();
        }
    }
    if outer_v4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
            return (xdp_action::XDP_DROP, Reason::PassTruncated);
        };
        let src = (IPIP_SRC_V4.load() & u32::from_ne_bytes([0xff, 0xff, 0, 0]))
            | u32::from_ne_bytes([0, 0, (hash >> 8) as u8, hash as u8]);
        unsafe {
            (*ip).ver_ihl = 0x45;
            (*ip).tos = tos;
            (*ip).tot_len = inner_len.wrapping_add(size_of::<Ipv4Hdr>() as u16).to_be();
            (*ip).id = 0;
            (*ip).frag_off = if df { 0x4000u16.to_be() } else { 0 };
            (*ip).ttl = 64;
            (*ip).proto = inner_proto;
            (*ip).check = 0;
            (*ip).saddr = src;
            (*ip).daddr = backend.addr[0];
            (*ip).check = ipv4_header_checksum(ip);
        }
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
            return (xdp_action::XDP_DROP, Reason::PassTruncated);
        };
        let prefix = IPIP_SRC_V6.load();
        unsafe {
            (*ip).ver_tc_flow =
                (0x6000_0000u32 | (tos as u32) << 20 | (hash & 0x000f_ffff)).to_be();
            (*ip).payload_len = inner_len.to_be();
            (*ip).next_hdr = inner_proto;
            (*ip).hop_limit = 64;
            (*ip).saddr = [prefix[0], prefix[1], prefix[2], hash];
            (*ip).daddr = backend.addr;
        }
    }
    (xdp_action::XDP_TX, Reason::TxIpip)
}

/// Full checksum of a 20-byte IPv4 header whose `check` is zero.
///
/// # Safety
/// `ip` must point at 20 bounds-checked bytes.
#[inline(always)]
unsafe fn ipv4_header_checksum(ip: *const Ipv4Hdr) -> u16 {
    let w = ip as *const u16;
    let mut sum = 0u64;
    let mut i = 0;
    while i < 10 {
        sum += unsafe { *w.add(i) } as u64;
        i += 1;
    }
    !csum::fold(sum)
}

// ---------------------------------------------------------------- ICMP "too big"

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// What an ICMP error must quote of the offending packet's L4 header to be acted on.
const QUOTED_L4_LEN: usize = 8;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    rest: u32,
}

/// The flow an ICMP error quotes, seen from the client (the quoted packet went VIP → client), its
/// VIP and its backend, looked up without creating or refreshing a flow. Hashing the quoted header
/// this way gives the same backend Maglev gives the flow itself.
#[inline(always)]
fn quoted_flow(
    inner_src: [u32; 4],
    inner_dst: [u32; 4],
    ports: *const Ports,
    l4_proto: u8,
) -> Result<(FlowKey, VipMeta, Pick), Verdict> {
    // SAFETY: the caller checked `ports` is inside the frame.
    let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
    let key = FlowKey {
        src: inner_dst,
        dst: inner_src,
        sport: dport,
        dport: sport,
        proto: l4_proto,
        _pad: [0; 3],
    };
    let Some(vip) = find_vip(key.dst, key.dport, l4_proto) else {
        return Err((PASS, Reason::PassNotVip));
    };
    if vip.mode == mode::LOCAL {
        return Err((PASS, Reason::PassLocal));
    }
    match pick_backend(&vip, &key, l4_proto == proto::UDP, false, false) {
        Ok(p) => Ok((key, vip, p)),
        Err(r) => Err(drop_for(r)),
    }
}

/// Tags a successful forward of an ICMP error with its own reason.
#[inline(always)]
fn as_icmp(v: Verdict) -> Verdict {
    match v.0 {
        xdp_action::XDP_TX | xdp_action::XDP_REDIRECT => (v.0, Reason::IcmpToBackend),
        _ => v,
    }
}

/// ICMP "fragmentation needed" about a VIP flow goes where the flow goes, in every mode: the
/// backend that owns the connection is the one whose path MTU must shrink.
#[inline(always)]
fn icmp_v4(
    ctx: &XdpContext,
    l3: usize,
    ip: *mut Ipv4Hdr,
    hdr_len: usize,
    tot_len: usize,
) -> Verdict {
    let icmp_off = l3 + hdr_len;
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, icmp_off) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (header reads below): bounds checked by ptr_at.
    if unsafe { (*icmp).kind != 3 || (*icmp).code != 4 } {
        return (PASS, Reason::PassNotL4);
    }
    let inner_l3 = icmp_off + size_of::<IcmpHdr>();
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let (inner_ver_ihl, inner_proto) = unsafe { ((*inner).ver_ihl, (*inner).proto) };
    let inner_hdr_len = (inner_ver_ihl & 0x0f) as usize * 4;
    if inner_ver_ihl >> 4 != 4 || inner_hdr_len < size_of::<Ipv4Hdr>() {
        return (PASS, Reason::PassTruncated);
    }
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    // RFC 792 quotes the header and at least 8 bytes after it, inside the error's own datagram
    // (a short frame's padding is not part of the quote); less is malformed, the stack's to judge.
    // The frame check comes first: after the datagram check LLVM drops it as implied, and the
    // verifier, which does not follow that arithmetic, needs it on the pointer it dereferences.
    let quoted_l4 = inner_l3 + inner_hdr_len;
    let Some(ports) = ptr_with_len::<Ports>(ctx, quoted_l4, QUOTED_L4_LEN) else {
        return (PASS, Reason::PassTruncated);
    };
    if quoted_l4 + QUOTED_L4_LEN > l3 + tot_len {
        return (PASS, Reason::PassTruncated);
    }
    let (isrc, idst) = unsafe { ((*inner).saddr, (*inner).daddr) };
    let (key, vip, pick) = match quoted_flow([isrc, 0, 0, 0], [idst, 0, 0, 0], ports, inner_proto) {
        Ok(x) => x,
        Err(v) => return v,
    };
    match vip.mode {
        mode::DSR => as_icmp(forward_dsr(ctx, &pick.backend)),
        mode::IPIP => {
            let (tos, frag) = unsafe { ((*ip).tos, (*ip).frag_off) };
            let df = u16::from_be(frag) & 0x4000 != 0;
            as_icmp(encap(
                ctx,
                l3,
                true,
                tot_len as u16,
                tos,
                df,
                &pick.backend,
                pick.flow_hash(&key),
            ))
        }
        mode::NAT => as_icmp(nat_icmp_v4(ctx, ip, icmp, inner, ports, &pick.backend)),
        _ => (PASS, Reason::PassLocal),
    }
}

/// NAT: the error was addressed to the VIP and quotes the VIP as the source; the backend must see
/// its own address and port in both places. Patches the outer header (destination, TTL), the
/// quoted header (source, its checksum) and the ICMP checksum, which covers the quoted bytes.
#[inline(always)]
fn nat_icmp_v4(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    icmp: *mut IcmpHdr,
    inner: *mut Ipv4Hdr,
    ports: *mut Ports,
    b: &Backend,
) -> Verdict {
    if b.family != lb_common::family::V4 {
        return drop_for(Reason::DropBadBackend);
    }
    // SAFETY: every pointer was bounds-checked by the caller.
    unsafe {
        if (*ip).ttl <= 1 {
            return (PASS, Reason::PassTtl);
        }
        let new_addr = b.addr[0];
        let old_isrc = (*inner).saddr;
        let old_isport = (*ports).sport;
        let new_port = if b.port != 0 { b.port } else { old_isport };
        let old_icheck = (*inner).check;
        let new_icheck = csum::apply(old_icheck, csum::diff32(0, old_isrc, new_addr));
        (*inner).saddr = new_addr;
        (*inner).check = new_icheck;
        (*ports).sport = new_port;
        let mut acc = csum::diff32(0, old_isrc, new_addr);
        acc = csum::diff16(acc, old_isport, new_port);
        acc = csum::diff16(acc, old_icheck, new_icheck);
        (*icmp).check = csum::apply((*icmp).check, acc);
        let old_daddr = (*ip).daddr;
        let ttl_word = ip as *mut u8 as usize + 8;
        let old_ttl_word = *(ttl_word as *const u16);
        (*ip).ttl -= 1;
        let new_ttl_word = *(ttl_word as *const u16);
        (*ip).daddr = new_addr;
        (*ip).check = csum::apply(
            (*ip).check,
            csum::diff16(
                csum::diff32(0, old_daddr, new_addr),
                old_ttl_word,
                new_ttl_word,
            ),
        );
        let params = &mut fib_params_v4(
            IPPROTO_ICMP,
            u16::from_be((*ip).tot_len),
            (*ip).saddr,
            new_addr,
        );
        fib_forward(ctx, params, Reason::RedirectNat)
    }
}

/// ICMPv6 "packet too big" about a VIP flow: as [`icmp_v4`].
#[inline(always)]
fn icmp_v6(ctx: &XdpContext, l3: usize, ip: *mut Ipv6Hdr, payload_len: usize) -> Verdict {
    let icmp_off = l3 + size_of::<Ipv6Hdr>();
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, icmp_off) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (header reads below): bounds checked by ptr_at.
    if unsafe { (*icmp).kind } != 2 {
        return (PASS, Reason::PassNotL4);
    }
    let inner_l3 = icmp_off + size_of::<IcmpHdr>();
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, inner_l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let (inner_version, inner_proto) = unsafe { (*(inner as *const u8) >> 4, (*inner).next_hdr) };
    if inner_version != 6 {
        return (PASS, Reason::PassTruncated);
    }
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    // RFC 4443 quotes as much as fits, so a real error holds 8 bytes of L4; frame check first,
    // as in `icmp_v4`.
    let quoted_l4 = inner_l3 + size_of::<Ipv6Hdr>();
    let Some(ports) = ptr_with_len::<Ports>(ctx, quoted_l4, QUOTED_L4_LEN) else {
        return (PASS, Reason::PassTruncated);
    };
    if quoted_l4 + QUOTED_L4_LEN > icmp_off + payload_len {
        return (PASS, Reason::PassTruncated);
    }
    let (isrc, idst) = unsafe { ((*inner).saddr, (*inner).daddr) };
    let (key, vip, pick) = match quoted_flow(isrc, idst, ports, inner_proto) {
        Ok(x) => x,
        Err(v) => return v,
    };
    match vip.mode {
        mode::DSR => as_icmp(forward_dsr(ctx, &pick.backend)),
        mode::IPIP => {
            let vtf = u32::from_be(unsafe { (*ip).ver_tc_flow });
            as_icmp(encap(
                ctx,
                l3,
                false,
                (size_of::<Ipv6Hdr>() + payload_len) as u16,
                (vtf >> 20) as u8,
                true,
                &pick.backend,
                pick.flow_hash(&key),
            ))
        }
        mode::NAT => as_icmp(nat_icmp_v6(ctx, ip, icmp, inner, ports, &pick.backend)),
        _ => (PASS, Reason::PassLocal),
    }
}

/// NAT twin of [`nat_icmp_v4`] for ICMPv6, whose checksum also covers the outer addresses.
#[inline(always)]
fn nat_icmp_v6(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    icmp: *mut IcmpHdr,
    inner: *mut Ipv6Hdr,
    ports: *mut Ports,
    b: &Backend,
) -> Verdict {
    if b.family != lb_common::family::V6 {
        return drop_for(Reason::DropBadBackend);
    }
    // SAFETY: every pointer was bounds-checked by the caller.
    unsafe {
        if (*ip).hop_limit <= 1 {
            return (PASS, Reason::PassTtl);
        }
        let new_addr = b.addr;
        let old_isrc = (*inner).saddr;
        let old_dst = (*ip).daddr;
        let old_isport = (*ports).sport;
        let new_port = if b.port != 0 { b.port } else { old_isport };
        (*inner).saddr = new_addr;
        (*ports).sport = new_port;
        (*ip).daddr = new_addr;
        (*ip).hop_limit -= 1;
        let mut acc = csum::diff16(0, old_isport, new_port);
        let mut i = 0;
        while i < 4 {
            acc = csum::diff32(acc, old_isrc[i], new_addr[i]);
            acc = csum::diff32(acc, old_dst[i], new_addr[i]);
            i += 1;
        }
        (*icmp).check = csum::apply((*icmp).check, acc);
        let tot = u16::from_be((*ip).payload_len).wrapping_add(size_of::<Ipv6Hdr>() as u16);
        let params = &mut fib_params_v6(IPPROTO_ICMPV6, tot, (*ip).saddr, new_addr);
        fib_forward(ctx, params, Reason::RedirectNat)
    }
}

// ---------------------------------------------------------------- IPv4

/// The lengths of an IPv4 header that can be trusted: (header length, datagram length), or `None`
/// for a version other than 4, an IHL below 5, or a total length shorter than the header or
/// longer than the frame. The frame may be longer than the datagram (Ethernet pads frames to 60
/// bytes, so a 40-byte SYN carries 6 bytes of padding): the padding is kept as it came, as a
/// switch would forward it, and the receiving stack trims it (`ip_rcv_core`); every length the
/// program checks or writes comes from `tot_len`, never from the frame.
#[inline(always)]
fn ipv4_lengths(ctx: &XdpContext, l3: usize, ip: *const Ipv4Hdr) -> Option<(usize, usize)> {
    // SAFETY: the caller bounds-checked the 20-byte header.
    let (ver_ihl, tot_len) = unsafe { ((*ip).ver_ihl, u16::from_be((*ip).tot_len) as usize) };
    let hdr_len = (ver_ihl & 0x0f) as usize * 4;
    if ver_ihl >> 4 != 4
        || hdr_len < size_of::<Ipv4Hdr>()
        || tot_len < hdr_len
        || ctx.data() + l3 + tot_len > ctx.data_end()
    {
        return None;
    }
    Some((hdr_len, tot_len))
}

#[inline(always)]
fn process_v4(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let Some((hdr_len, tot_len)) = ipv4_lengths(ctx, l3, ip) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (all header reads below): ptr_at checked the bounds.
    let l4_proto = unsafe { (*ip).proto };
    if l4_proto == IPPROTO_ICMP {
        return icmp_v4(ctx, l3, ip, hdr_len, tot_len);
    }
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    let saddr = unsafe { (*ip).saddr };
    let daddr = unsafe { (*ip).daddr };
    // MF set or a non-zero offset: a fragment.
    let fragment = u16::from_be(unsafe { (*ip).frag_off }) & 0x3fff != 0;
    let mut key = FlowKey {
        src: [saddr, 0, 0, 0],
        dst: [daddr, 0, 0, 0],
        sport: 0,
        dport: 0,
        proto: l4_proto,
        _pad: [0; 3],
    };
    if fragment {
        let Some(vip) = find_vip(key.dst, 0, l4_proto) else {
            return (PASS, Reason::PassFragment);
        };
        return steer_fragment(ctx, &vip, &key);
    }
    let Some(l4) = parse_l4(ctx, l3 + hdr_len, tot_len - hdr_len, l4_proto) else {
        return (PASS, Reason::PassTruncated);
    };
    key.sport = unsafe { (*l4.ports).sport };
    key.dport = unsafe { (*l4.ports).dport };
    let Some(vip) = find_vip(key.dst, key.dport, l4_proto) else {
        return nat_reply_v4(ctx, ip, &l4, &key);
    };
    if vip.mode == mode::LOCAL {
        return (PASS, Reason::PassLocal);
    }
    // Before a flow exists: an expiring packet must not create a NAT flow without its reverse.
    if vip.mode == mode::NAT && unsafe { (*ip).ttl } <= 1 {
        return (PASS, Reason::PassTtl);
    }
    let pick = match pick_backend(&vip, &key, l4.udp, l4.syn, true) {
        Ok(p) => p,
        Err(reason) => return drop_for(reason),
    };
    account(ctx, &vip, &pick);
    match vip.mode {
        mode::DSR => forward_dsr(ctx, &pick.backend),
        mode::NAT => nat_forward_v4(ctx, ip, &l4, &key, &vip, &pick),
        mode::IPIP => {
            let (tos, frag) = unsafe { ((*ip).tos, (*ip).frag_off) };
            let df = u16::from_be(frag) & 0x4000 != 0;
            encap(
                ctx,
                l3,
                true,
                tot_len as u16,
                tos,
                df,
                &pick.backend,
                pick.flow_hash(&key),
            )
        }
        _ => (PASS, Reason::PassLocal),
    }
}

#[inline(always)]
fn drop_for(reason: Reason) -> Verdict {
    (xdp_action::XDP_DROP, reason)
}

#[inline(always)]
fn account(ctx: &XdpContext, vip: &VipMeta, pick: &Pick) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count(&STATS_VIP, vip.id, bytes, pick.new_flow);
    count(&STATS_BACKEND, pick.id, bytes, pick.new_flow);
}

/// Fragments of a datagram for a port-0 VIP: one backend per (source, destination, protocol).
/// NAT cannot rewrite ports it cannot see, so only DSR and local VIPs steer fragments.
#[inline(always)]
fn steer_fragment(ctx: &XdpContext, vip: &VipMeta, key: &FlowKey) -> Verdict {
    match vip.mode {
        mode::DSR => {
            let pick = match pick_backend(vip, key, true, false, true) {
                Ok(p) => p,
                Err(reason) => return drop_for(reason),
            };
            account(ctx, vip, &pick);
            forward_dsr(ctx, &pick.backend)
        }
        mode::LOCAL => (PASS, Reason::PassLocal),
        _ => (PASS, Reason::PassFragment),
    }
}

/// Makes sure the reply of this NAT flow can be translated back: written on a new flow, and
/// re-written when the reverse LRU evicted it while the flow lived on.
#[inline(always)]
fn ensure_reverse(key: &FlowKey, b: &Backend, new_port: u16, vip_id: u32, new_flow: bool) {
    let rev_key = FlowKey {
        src: b.addr,
        dst: key.src,
        sport: new_port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    if !new_flow && NAT_REVERSE.get_ptr(&rev_key).is_some() {
        return;
    }
    let rev = NatReverse {
        vip_addr: key.dst,
        vip_port: key.dport,
        _pad: 0,
        vip_id,
    };
    // A full LRU evicts; a failed insert is retried by the flow's next packet.
    let _ = NAT_REVERSE.insert(&rev_key, &rev, 0);
}

#[inline(always)]
fn nat_forward_v4(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    key: &FlowKey,
    vip: &VipMeta,
    pick: &Pick,
) -> Verdict {
    let b = &pick.backend;
    if b.family != lb_common::family::V4 {
        return drop_for(Reason::DropBadBackend);
    }
    // SAFETY: ip and l4 come from bounds-checked pointers.
    unsafe {
        if (*ip).ttl <= 1 {
            return (PASS, Reason::PassTtl);
        }
        let new_port = if b.port != 0 { b.port } else { key.dport };
        ensure_reverse(key, b, new_port, vip.id, pick.new_flow);
        rewrite_v4(ip, l4, false, b.addr[0], new_port);
        let params = &mut fib_params_v4(
            key.proto,
            u16::from_be((*ip).tot_len),
            (*ip).saddr,
            (*ip).daddr,
        );
        fib_forward(ctx, params, Reason::RedirectNat)
    }
}

/// Whether a packet from `sport` (network order) may be a NAT backend's reply: most traffic
/// that is not for a VIP is not, and skips the `NAT_REVERSE` lookup.
#[inline(always)]
fn maybe_nat_reply(sport: u16) -> bool {
    let port = u16::from_be(sport) as u32;
    NAT_PORTS
        .get(port / 64)
        .is_none_or(|w| *w & (1u64 << (port % 64)) != 0)
}

/// Replies from a NAT backend: source back to the VIP, then forwarded to the client.
#[inline(always)]
fn nat_reply_v4(ctx: &XdpContext, ip: *mut Ipv4Hdr, l4: &L4, key: &FlowKey) -> Verdict {
    if !maybe_nat_reply(key.sport) {
        return (PASS, Reason::PassNotVip);
    }
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { NAT_REVERSE.get(key) }).copied() else {
        return (PASS, Reason::PassNotVip);
    };
    unsafe {
        if (*ip).ttl <= 1 {
            return (PASS, Reason::PassTtl);
        }
        rewrite_v4(ip, l4, true, rev.vip_addr[0], rev.vip_port);
        let params = &mut fib_params_v4(
            key.proto,
            u16::from_be((*ip).tot_len),
            (*ip).saddr,
            (*ip).daddr,
        );
        fib_forward(ctx, params, Reason::NatReply)
    }
}

/// Rewrites the destination (or, for replies, the source) address and port, decrements the TTL,
/// and patches both checksums incrementally.
///
/// # Safety
/// `ip` and `l4` must point into the frame, bounds-checked.
#[inline(always)]
unsafe fn rewrite_v4(ip: *mut Ipv4Hdr, l4: &L4, source: bool, addr: u32, port: u16) {
    unsafe {
        let (addr_ptr, port_ptr) = if source {
            (&raw mut (*ip).saddr, &raw mut (*l4.ports).sport)
        } else {
            (&raw mut (*ip).daddr, &raw mut (*l4.ports).dport)
        };
        let old_addr = *addr_ptr;
        let old_port = *port_ptr;
        // TTL shares a 16-bit checksum word with the protocol field.
        let ttl_word = ip as *mut u8 as usize + 8;
        let old_ttl_word = *(ttl_word as *const u16);
        (*ip).ttl -= 1;
        let new_ttl_word = *(ttl_word as *const u16);
        *addr_ptr = addr;
        *port_ptr = port;
        let ip_acc = csum::diff16(csum::diff32(0, old_addr, addr), old_ttl_word, new_ttl_word);
        (*ip).check = csum::apply((*ip).check, ip_acc);
        // The L4 checksum covers the pseudo-header address and the port, not the TTL.
        update_l4_check(
            l4,
            csum::diff16(csum::diff32(0, old_addr, addr), old_port, port),
            true,
        );
    }
}

// ---------------------------------------------------------------- IPv6

/// The payload length of an IPv6 header that can be trusted, or `None` for a version other than 6
/// or a payload longer than the frame; trailing bytes are kept, as for IPv4 ([`ipv4_lengths`]).
/// A zero payload length (a jumbogram) comes with a hop-by-hop header, which is the stack's.
#[inline(always)]
fn ipv6_payload_len(ctx: &XdpContext, l3: usize, ip: *const Ipv6Hdr) -> Option<usize> {
    // SAFETY: the caller bounds-checked the 40-byte header.
    let (version, payload_len) = unsafe {
        (
            *(ip as *const u8) >> 4,
            u16::from_be((*ip).payload_len) as usize,
        )
    };
    if version != 6 || ctx.data() + l3 + size_of::<Ipv6Hdr>() + payload_len > ctx.data_end() {
        return None;
    }
    Some(payload_len)
}

#[inline(always)]
fn process_v6(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let Some(payload_len) = ipv6_payload_len(ctx, l3, ip) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (header reads below): ptr_at checked the bounds.
    let next = unsafe { (*ip).next_hdr };
    if next == IPPROTO_ICMPV6 {
        return icmp_v6(ctx, l3, ip, payload_len);
    }
    // Extension headers (fragments included) are not parsed: the stack gets them.
    if next != proto::TCP && next != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    let Some(l4) = parse_l4(ctx, l3 + size_of::<Ipv6Hdr>(), payload_len, next) else {
        return (PASS, Reason::PassTruncated);
    };
    let key = unsafe {
        FlowKey {
            src: (*ip).saddr,
            dst: (*ip).daddr,
            sport: (*l4.ports).sport,
            dport: (*l4.ports).dport,
            proto: next,
            _pad: [0; 3],
        }
    };
    let Some(vip) = find_vip(key.dst, key.dport, next) else {
        return nat_reply_v6(ctx, ip, &l4, &key);
    };
    if vip.mode == mode::LOCAL {
        return (PASS, Reason::PassLocal);
    }
    // Before a flow exists: an expiring packet must not create a NAT flow without its reverse.
    if vip.mode == mode::NAT && unsafe { (*ip).hop_limit } <= 1 {
        return (PASS, Reason::PassTtl);
    }
    let pick = match pick_backend(&vip, &key, l4.udp, l4.syn, true) {
        Ok(p) => p,
        Err(reason) => return drop_for(reason),
    };
    account(ctx, &vip, &pick);
    match vip.mode {
        mode::DSR => forward_dsr(ctx, &pick.backend),
        mode::NAT => nat_forward_v6(ctx, ip, &l4, &key, &vip, &pick),
        mode::IPIP => {
            let vtf = u32::from_be(unsafe { (*ip).ver_tc_flow });
            encap(
                ctx,
                l3,
                false,
                (size_of::<Ipv6Hdr>() + payload_len) as u16,
                (vtf >> 20) as u8,
                true,
                &pick.backend,
                pick.flow_hash(&key),
            )
        }
        _ => (PASS, Reason::PassLocal),
    }
}

#[inline(always)]
fn nat_forward_v6(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    l4: &L4,
    key: &FlowKey,
    vip: &VipMeta,
    pick: &Pick,
) -> Verdict {
    let b = &pick.backend;
    if b.family != lb_common::family::V6 {
        return drop_for(Reason::DropBadBackend);
    }
    // SAFETY: ip and l4 come from bounds-checked pointers.
    unsafe {
        if (*ip).hop_limit <= 1 {
            return (PASS, Reason::PassTtl);
        }
        let new_port = if b.port != 0 { b.port } else { key.dport };
        ensure_reverse(key, b, new_port, vip.id, pick.new_flow);
        rewrite_v6(ip, l4, false, b.addr, new_port);
        let tot = u16::from_be((*ip).payload_len).wrapping_add(size_of::<Ipv6Hdr>() as u16);
        let params = &mut fib_params_v6(key.proto, tot, (*ip).saddr, (*ip).daddr);
        fib_forward(ctx, params, Reason::RedirectNat)
    }
}

#[inline(always)]
fn nat_reply_v6(ctx: &XdpContext, ip: *mut Ipv6Hdr, l4: &L4, key: &FlowKey) -> Verdict {
    if !maybe_nat_reply(key.sport) {
        return (PASS, Reason::PassNotVip);
    }
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { NAT_REVERSE.get(key) }).copied() else {
        return (PASS, Reason::PassNotVip);
    };
    unsafe {
        if (*ip).hop_limit <= 1 {
            return (PASS, Reason::PassTtl);
        }
        rewrite_v6(ip, l4, true, rev.vip_addr, rev.vip_port);
        let tot = u16::from_be((*ip).payload_len).wrapping_add(size_of::<Ipv6Hdr>() as u16);
        let params = &mut fib_params_v6(key.proto, tot, (*ip).saddr, (*ip).daddr);
        fib_forward(ctx, params, Reason::NatReply)
    }
}

/// IPv6 twin of [`rewrite_v4`]: no IP checksum; the L4 checksum covers all 128 address bits.
///
/// # Safety
/// `ip` and `l4` must point into the frame, bounds-checked.
#[inline(always)]
unsafe fn rewrite_v6(ip: *mut Ipv6Hdr, l4: &L4, source: bool, addr: [u32; 4], port: u16) {
    unsafe {
        let (addr_ptr, port_ptr) = if source {
            (&raw mut (*ip).saddr, &raw mut (*l4.ports).sport)
        } else {
            (&raw mut (*ip).daddr, &raw mut (*l4.ports).dport)
        };
        let old = *addr_ptr;
        let old_port = *port_ptr;
        (*ip).hop_limit -= 1;
        *addr_ptr = addr;
        *port_ptr = port;
        let mut acc = csum::diff16(0, old_port, port);
        acc = csum::diff32(acc, old[0], addr[0]);
        acc = csum::diff32(acc, old[1], addr[1]);
        acc = csum::diff32(acc, old[2], addr[2]);
        acc = csum::diff32(acc, old[3], addr[3]);
        update_l4_check(l4, acc, false);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
