//! The IP lengths that can be trusted, and where TCP/UDP ports and checksums sit.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// Where the L4 ports and checksum of a TCP/UDP packet sit, once the IP header is understood.
pub(crate) struct L4 {
    pub(crate) ports: *mut Ports,
    /// Null for a fragment (ports not present or not trusted).
    pub(crate) check: *mut u16,
    pub(crate) udp: bool,
    /// A TCP SYN without ACK: the first packet of a connection, which needs no flow lookup.
    pub(crate) syn: bool,
}

/// Parses TCP/UDP at `off`, the start of an IP payload of `l4_len` bytes (from the validated IP
/// length, never the frame's: padding is not payload). `None` when the header is cut short, by the
/// frame or by the IP length, or its own length field is impossible: a TCP data offset below 5 or
/// past the segment, a UDP length below 8 or past the IP payload. A UDP length *short* of the IP
/// payload is forwarded: Linux accepts it and trims the datagram to it (`__udp4_lib_rcv`,
/// `udpv6_rcv`), so the backend's stack does what it would do without the balancer, and the ports
/// the flow is steered by are in the header either way.
#[inline(always)]
pub(crate) fn parse_l4(ctx: &XdpContext, off: usize, l4_len: usize, l4_proto: u8) -> Option<L4> {
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

/// The lengths of an IPv4 header that can be trusted: (header length, datagram length), or `None`
/// for a version other than 4, an IHL below 5, or a total length shorter than the header or
/// longer than the frame. The frame may be longer than the datagram (Ethernet pads frames to 60
/// bytes, so a 40-byte SYN carries 6 bytes of padding): the padding is kept as it came, as a
/// switch would forward it, and the receiving stack trims it (`ip_rcv_core`); every length the
/// program checks or writes comes from `tot_len`, never from the frame.
#[inline(always)]
pub(crate) fn ipv4_lengths(
    ctx: &XdpContext,
    l3: usize,
    ip: *const Ipv4Hdr,
) -> Option<(usize, usize)> {
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

/// The payload length of an IPv6 header that can be trusted, or `None` for a version other than 6
/// or a payload longer than the frame; trailing bytes are kept, as for IPv4 ([`ipv4_lengths`]).
/// A zero payload length (a jumbogram) comes with a hop-by-hop header, which is the stack's.
#[inline(always)]
pub(crate) fn ipv6_payload_len(ctx: &XdpContext, l3: usize, ip: *const Ipv6Hdr) -> Option<usize> {
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
