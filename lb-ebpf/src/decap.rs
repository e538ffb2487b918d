//! `lb decap`: runs on a backend of an `ipip` VIP and strips the outer IPv4/IPv6 header the
//! balancer added, so the stack sees the client's original packet (addressed to the VIP, which the
//! backend holds on `lo`) and answers the client directly. Needed because this kernel has no
//! ipip/ip6_tunnel modules; also cheaper than a tunnel device. Everything else is `XDP_PASS`.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};

// The balancer's headers and bounds-checked reads, not a copy of them.
#[allow(dead_code)]
#[path = "shared/headers.rs"]
mod headers;

use headers::{ptr_at, EthHdr, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6};

const ETH_HLEN: usize = size_of::<EthHdr>();

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    try_decap(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Option<u32> {
    // The L2 header as it is: MACs, an optional tag.
    let macs: [u8; 12] = unsafe { *ptr_at::<[u8; 12]>(ctx, 0)? };
    let mut ether_type = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 12)? });
    let mut l3 = ETH_HLEN;
    let mut tci = 0u16;
    let tagged = ether_type == ETH_P_8021Q;
    if tagged {
        tci = unsafe { *ptr_at::<u16>(ctx, 14)? };
        ether_type = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 16)? });
        l3 += 4;
    }
    let (outer_len, inner) = match ether_type {
        ETH_P_IP => {
            let vihl = unsafe { *ptr_at::<u8>(ctx, l3)? };
            let proto = unsafe { *ptr_at::<u8>(ctx, l3 + 9)? };
            let frag = u16::from_be(unsafe { *ptr_at::<u16>(ctx, l3 + 6)? });
            // Fragmented outer packets are the stack's business.
            if vihl >> 4 != 4 || frag & 0x3fff != 0 {
                return None;
            }
            ((vihl & 0x0f) as usize * 4, proto)
        }
        ETH_P_IPV6 => (40, unsafe { *ptr_at::<u8>(ctx, l3 + 6)? }),
        _ => return None,
    };
    if outer_len < 20 {
        return None;
    }
    let inner_type = match inner {
        IPPROTO_IPIP => ETH_P_IP,
        IPPROTO_IPV6 => ETH_P_IPV6,
        _ => return None,
    };
    // The inner header must be there before anything moves.
    ptr_at::<[u8; 20]>(ctx, l3 + outer_len)?;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Some(xdp_action::XDP_DROP);
    }
    unsafe {
        *ptr_at::<[u8; 12]>(ctx, 0)? = macs;
        if tagged {
            *ptr_at::<u16>(ctx, 12)? = ETH_P_8021Q.to_be();
            *ptr_at::<u16>(ctx, 14)? = tci;
            *ptr_at::<u16>(ctx, 16)? = inner_type.to_be();
        } else {
            *ptr_at::<u16>(ctx, 12)? = inner_type.to_be();
        }
    }
    Some(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
