//! Types shared by the XDP program (lb-ebpf) and the agent (lb-userspace).
//!
//! Every map key and value is defined here once, `#[repr(C)]`, with its size checked at compile
//! time: the kernel and userspace must agree byte for byte, and a layout change must bump
//! [`LAYOUT_VERSION`] (it is part of the pin path, so an agent never reuses maps of another layout).
#![no_std]

pub mod bench;
pub mod csum;
pub mod hash;

/// Part of the pin path (`<root>/<instance>/v<LAYOUT_VERSION>/`): bump it when any type below changes.
pub const LAYOUT_VERSION: u32 = 2;

/// Backend id 0 means "no backend": an all-zero ring slot or flow entry never forwards.
pub const BACKEND_NONE: u32 = 0;

/// Default Maglev table size (a prime, as the algorithm requires).
pub const DEFAULT_RING_SIZE: u32 = 65_537;

/// `VipMeta::mode`: how packets for a VIP leave the balancer.
pub mod mode {
    /// L2 direct server return: rewrite the MACs, `XDP_TX`; backends hold the VIP on `lo`.
    pub const DSR: u8 = 1;
    /// Destination NAT to the backend's address/port, next hop from `bpf_fib_lookup`,
    /// `XDP_REDIRECT`; replies get their source rewritten back to the VIP.
    pub const NAT: u8 = 2;
    /// Served on this host (the L7 proxy): `XDP_PASS`.
    pub const LOCAL: u8 = 3;
    /// IP-in-IP (IPv4 or IPv6 outer header, the backend's family) to a backend that decapsulates
    /// (`lb decap`); the backend answers the client directly, as in DSR.
    pub const IPIP: u8 = 4;
}

/// `Backend::flags`.
pub mod backend_flags {
    /// Flows tracked on this backend may stay on it. Cleared when the backend is removed (or, later,
    /// marked down), so connection tracking re-picks its flows through Maglev.
    pub const USABLE: u8 = 1;
    /// Receives no new flows (it is not in the Maglev table) but keeps the ones it has.
    pub const DRAINING: u8 = 2;
}

/// Address family of a VIP or backend, as stored in the maps.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// Filters that spare a packet which is not for a VIP the lookups only VIP traffic needs. The
/// agent keeps them conservative (a set bit costs a lookup, a missing one loses a reply), the
/// program only reads them.
pub mod gate {
    /// `NAT_PORTS` words: bit `p % 64` of word `p / 64` is set when a NAT backend may answer
    /// from source port `p`, so only such packets look for a NAT reply in `NAT_REVERSE`.
    pub const NAT_PORT_WORDS: u32 = 65_536 / 64;
    /// `WILDCARD` entries, by IP protocol number: non-zero when a VIP of that protocol takes
    /// every port (port 0), so only then does a packet that missed its exact VIP look further.
    pub const PROTOCOLS: u32 = 256;
    /// `VIP_ADDRS` words: bit [`addr_bit`] is set for every VIP address, so a packet whose
    /// destination's bit is clear is not for a VIP without a hash lookup.
    pub const VIP_ADDR_WORDS: u32 = 65_536 / 64;

    /// A 16-bit fold of an address as the maps store it (IPv4 in `addr[0]`, the rest zero).
    #[inline(always)]
    pub fn addr_bit(addr: &[u32; 4]) -> u32 {
        let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
        (x ^ (x >> 16)) & 0xffff
    }
}

/// IP protocol numbers the data path understands.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Key of `VIPS`. `port` 0 is the wildcard entry for every port of `addr`.
/// Addresses are stored as the raw bytes of the packet (network order); IPv4 uses `addr[0]` only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Network byte order, as read from the packet.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `STATS_VIP` and into `RINGS` (`(id * 2 + ring_slot) * M`). Less than `max_vips`.
    pub id: u32,
    /// One of [`mode`].
    pub mode: u8,
    /// Which half of the VIP's double-buffered Maglev table is live. The agent flips it only after
    /// the spare half is completely written, so a packet never sees half a table.
    pub ring_slot: u8,
    pub _pad: [u8; 2],
}

/// Value of `BACKENDS` (an array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Network order; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// NAT mode: the backend's port in network order, 0 to keep the VIP's port.
    pub port: u16,
    /// [`backend_flags`].
    pub flags: u8,
    /// [`family`].
    pub family: u8,
    /// DSR mode: the backend's MAC on the shared segment.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The VIP this backend serves: lets a restarted agent adopt ids (and so tracked flows).
    pub vip_id: u32,
}

/// A connection's identity as the balancer sees it (client → VIP), key of `FLOWS`, and the
/// reply's identity (backend → client), key of `NAT_REVERSE`. Ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet (tick resolution is plenty for a timeout of
    /// seconds, and costs a fraction of a clocksource read), for UDP only: UDP flows age out; TCP
    /// flows live until the LRU evicts them or their backend stops being usable, and hold 0 here.
    pub last_seen_ns: u64,
}

/// Value of `NAT_REVERSE`: what a reply's source must be rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    pub vip_addr: [u32; 4],
    /// Network order.
    pub vip_port: u16,
    pub _pad: u16,
    pub vip_id: u32,
}

/// Per-CPU packet counters, summed by the agent (values of `STATS_VIP` and `STATS_BACKEND`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// Connection-tracking misses that picked this VIP/backend: new connections, in practice.
    pub new_flows: u64,
}

/// Why the program returned what it returned: index into `STATS_REASON` (per-CPU `u64`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, …).
    PassNotIp = 0,
    /// IP but not TCP/UDP, or IPv6 with extension headers.
    PassNotL4 = 1,
    /// A header ran past the end of the frame, or is malformed: an IP version that is not the
    /// ethertype's, a length field that disagrees with the frame or with the IP length, an ICMP
    /// error quoting fewer than 8 bytes of L4. (One reason for both: a separate one would resize
    /// `STATS_REASON`, a layout change.)
    PassTruncated = 2,
    /// TCP/UDP, but no VIP matches the destination.
    PassNotVip = 3,
    /// A fragment without a port-0 (wildcard) VIP to steer it by addresses.
    PassFragment = 4,
    /// VIP in `local` mode: handed to this host's stack.
    PassLocal = 5,
    /// NAT, next hop not resolved yet: rewritten and handed to the kernel, which resolves it.
    PassNoNeigh = 6,
    /// NAT, TTL/hop limit would expire here: handed to the kernel for the ICMP error.
    PassTtl = 7,
    /// DSR: MACs rewritten, sent back out of the ingress interface.
    TxDsr = 8,
    /// NAT forward path, egress is the ingress interface.
    TxNat = 9,
    /// NAT forward path, redirected to another interface.
    RedirectNat = 10,
    /// NAT reply path: source rewritten back to the VIP and forwarded.
    NatReply = 11,
    /// The VIP's table has no backend (all removed or draining).
    DropNoBackend = 12,
    /// The ring index or backend id is outside the maps (agent/program mismatch).
    DropBadMaps = 13,
    /// `bpf_fib_lookup` found no route (or forwarding is disabled) for the backend or client.
    DropNoRoute = 14,
    /// DSR backend without a MAC, or a family that does not match the VIP.
    DropBadBackend = 15,
    /// IP-in-IP: encapsulated and sent back out of the ingress interface.
    TxIpip = 16,
    /// ICMP "fragmentation needed" / "packet too big" about a VIP flow, sent to the flow's backend.
    IcmpToBackend = 17,
}

/// Number of [`Reason`] values: the size of `STATS_REASON`.
pub const REASON_COUNT: u32 = 18;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotL4,
        Reason::PassTruncated,
        Reason::PassNotVip,
        Reason::PassFragment,
        Reason::PassLocal,
        Reason::PassNoNeigh,
        Reason::PassTtl,
        Reason::TxDsr,
        Reason::TxNat,
        Reason::RedirectNat,
        Reason::NatReply,
        Reason::DropNoBackend,
        Reason::DropBadMaps,
        Reason::DropNoRoute,
        Reason::DropBadBackend,
        Reason::TxIpip,
        Reason::IcmpToBackend,
    ];

    /// Stable snake_case name, used in the API and in metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotL4 => "pass_not_l4",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassFragment => "pass_fragment",
            Reason::PassLocal => "pass_local",
            Reason::PassNoNeigh => "pass_no_neigh",
            Reason::PassTtl => "pass_ttl",
            Reason::TxDsr => "tx_dsr",
            Reason::TxNat => "tx_nat",
            Reason::RedirectNat => "redirect_nat",
            Reason::NatReply => "nat_reply",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBadMaps => "drop_bad_maps",
            Reason::DropNoRoute => "drop_no_route",
            Reason::DropBadBackend => "drop_bad_backend",
            Reason::TxIpip => "tx_ipip",
            Reason::IcmpToBackend => "icmp_to_backend",
        }
    }
}

// The kernel and userspace must agree on these sizes; a change here is a layout change.
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);
const _: () = assert!(core::mem::size_of::<VipMeta>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 32);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<Flow>() == 16);
const _: () = assert!(core::mem::size_of::<NatReverse>() == 24);
const _: () = assert!(core::mem::size_of::<Counters>() == 24);
const _: () = assert!(Reason::ALL.len() == REASON_COUNT as usize);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain-old-data: #[repr(C)], only integer fields, explicit padding, any bit pattern valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for NatReverse {}
    unsafe impl aya::Pod for Counters {}
}
