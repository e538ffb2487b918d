//! The maps the agent fills, and the settings it writes before the program loads (they size
//! nothing, so they may differ per agent).

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// Maglev table size M: `RINGS` holds `2 * max_vips * M` entries.
#[unsafe(no_mangle)]
pub(crate) static RING_SIZE: Global<u32> = Global::new(DEFAULT_RING_SIZE);

/// A UDP flow idle longer than this is re-picked (there is no FIN to end it).
#[unsafe(no_mangle)]
pub(crate) static UDP_TIMEOUT_NS: Global<u64> = Global::new(30_000_000_000);

/// `ipip`: outer IPv4 source prefix (network order, /16): the low 16 bits carry the flow hash, so
/// a backend's NIC spreads decapsulation over its queues (receive-side scaling on the outer header).
#[unsafe(no_mangle)]
pub(crate) static IPIP_SRC_V4: Global<u32> = Global::new(u32::from_ne_bytes([172, 16, 0, 0]));

/// `ipip`: outer IPv6 source prefix (/96); the low 32 bits carry the flow hash.
#[unsafe(no_mangle)]
pub(crate) static IPIP_SRC_V6: Global<[u32; 4]> =
    Global::new([u32::from_ne_bytes([0xfd, 0x00, 0xff, 0xff]), 0, 0, 0]);

#[map]
pub(crate) static VIPS: HashMap<VipKey, VipMeta> = HashMap::pinned(512, 0);

#[map]
pub(crate) static BACKENDS: Array<Backend> = Array::pinned(4096, 0);

#[map]
pub(crate) static RINGS: Array<u32> = Array::pinned(2 * 512 * DEFAULT_RING_SIZE, 0);

/// Shared (not per-CPU) LRU: on veth, and with any sender that migrates between CPUs, a flow is
/// processed on whichever CPU its packet arrives; a per-CPU table would miss there and fall back to
/// Maglev, which is stable but not immune to backend changes.
#[map]
pub(crate) static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(65_536, 0);

#[map]
pub(crate) static NAT_REVERSE: LruHashMap<FlowKey, NatReverse> = LruHashMap::pinned(65_536, 0);

#[map]
pub(crate) static NAT_PORTS: Array<u64> = Array::pinned(gate::NAT_PORT_WORDS, 0);

#[map]
pub(crate) static WILDCARD: Array<u32> = Array::pinned(gate::PROTOCOLS, 0);

#[map]
pub(crate) static VIP_ADDRS: Array<u64> = Array::pinned(gate::VIP_ADDR_WORDS, 0);

#[map]
pub(crate) static STATS_VIP: PerCpuArray<Counters> = PerCpuArray::pinned(512, 0);

#[map]
pub(crate) static STATS_BACKEND: PerCpuArray<Counters> = PerCpuArray::pinned(4096, 0);

#[map]
pub(crate) static STATS_REASON: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);
