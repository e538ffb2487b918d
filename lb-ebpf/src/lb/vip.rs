//! Which VIP a packet is for, and the gates that let the rest skip the lookups.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// VIP lookup: exact (address, port, protocol) first, then the port-0 wildcard.
#[inline(always)]
pub(crate) fn find_vip(addr: [u32; 4], port: u16, l4_proto: u8) -> Option<VipMeta> {
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

/// Whether a packet from `sport` (network order) may be a NAT backend's reply: most traffic
/// that is not for a VIP is not, and skips the `NAT_REVERSE` lookup.
#[inline(always)]
pub(crate) fn maybe_nat_reply(sport: u16) -> bool {
    let port = u16::from_be(sport) as u32;
    NAT_PORTS
        .get(port / 64)
        .is_none_or(|w| *w & (1u64 << (port % 64)) != 0)
}
