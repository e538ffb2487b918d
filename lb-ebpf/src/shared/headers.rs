//! Packet headers and the bounds-checked reads of them: shared by every XDP program here
//! (included by path, as the lib crate must stay buildable on the host).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88a8;
pub(crate) const AF_INET: u8 = 2;
pub(crate) const AF_INET6: u8 = 10;

#[repr(C)]
pub(crate) struct EthHdr {
    pub(crate) dst: [u8; 6],
    pub(crate) src: [u8; 6],
    pub(crate) proto: u16,
}

#[repr(C)]
pub(crate) struct VlanHdr {
    pub(crate) tci: u16,
    pub(crate) proto: u16,
}

#[repr(C)]
pub(crate) struct Ipv4Hdr {
    pub(crate) ver_ihl: u8,
    pub(crate) tos: u8,
    pub(crate) tot_len: u16,
    pub(crate) id: u16,
    pub(crate) frag_off: u16,
    pub(crate) ttl: u8,
    pub(crate) proto: u8,
    pub(crate) check: u16,
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
}

#[repr(C)]
pub(crate) struct Ipv6Hdr {
    pub(crate) ver_tc_flow: u32,
    pub(crate) payload_len: u16,
    pub(crate) next_hdr: u8,
    pub(crate) hop_limit: u8,
    pub(crate) saddr: [u32; 4],
    pub(crate) daddr: [u32; 4],
}

/// The first 8 bytes of TCP and UDP share the port layout; the checksum sits at a
/// protocol-specific offset (16 for TCP, 6 for UDP).
#[repr(C)]
pub(crate) struct Ports {
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

pub(crate) const TCP_HDR_LEN: usize = 20;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_ACK: u8 = 0x10;
pub(crate) const UDP_HDR_LEN: usize = 8;

/// Bounds-checked pointer into the frame: the only way this program reads packet memory.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Same as [`ptr_at`] but also proves `len` bytes are present (for an L4 header whose fields we touch).
#[inline(always)]
pub(crate) fn ptr_with_len<T>(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut T> {
    // One pointer, compared and returned: the verifier's range check must be on the register
    // that is then dereferenced.
    let p = ctx.data() + off;
    if p + len > ctx.data_end() {
        return None;
    }
    Some(p as *mut T)
}

pub(crate) const IPPROTO_IPIP: u8 = 4;
pub(crate) const IPPROTO_IPV6: u8 = 41;
pub(crate) const VLAN_LEN: usize = size_of::<VlanHdr>();
pub(crate) const IPPROTO_ICMP: u8 = 1;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;
