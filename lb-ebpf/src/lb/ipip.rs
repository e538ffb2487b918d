//! ipip: the packet wrapped in an outer IPv4/IPv6 header to a decapsulating backend.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

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
pub(crate) fn encap(
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
pub(crate) unsafe fn ipv4_header_checksum(ip: *const Ipv4Hdr) -> u16 {
    let w = ip as *const u16;
    let mut sum = 0u64;
    let mut i = 0;
    while i < 10 {
        sum += unsafe { *w.add(i) } as u64;
        i += 1;
    }
    !csum::fold(sum)
}
