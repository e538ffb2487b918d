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
//!
//! One module per concern, as Katran's `lib/bpf` is cut: `headers` (shared with `lb-decap`),
//! `maps`, `parse`, `vip` (lookup and gates), `conntrack`, `maglev`, one per forwarding mode
//! (`dsr`, `nat`, `ipip`, and `fib` for the next hop), `icmp`, `stats`, and the two address
//! families' paths (`v4`, `v6`) that tie them together.
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

mod conntrack;
mod dsr;
mod fib;
#[path = "../shared/headers.rs"]
mod headers;
mod icmp;
mod ipip;
mod maglev;
mod maps;
mod nat;
mod parse;
mod stats;
mod v4;
mod v6;
mod vip;

use {
    conntrack::*, dsr::*, fib::*, headers::*, icmp::*, ipip::*, maglev::*, maps::*, nat::*,
    parse::*, stats::*, v4::*, v6::*, vip::*,
};

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

// ---------------------------------------------------------------- IP-in-IP

// ---------------------------------------------------------------- ICMP "too big"

// ---------------------------------------------------------------- IPv4

// ---------------------------------------------------------------- IPv6

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
