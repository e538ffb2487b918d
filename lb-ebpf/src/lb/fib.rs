//! Forwarding by the kernel's FIB: the next hop's MAC and the egress interface.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// Sends an already rewritten packet towards `params`' destination through the FIB.
/// `forward_reason` names the verdict when the next hop is found.
#[inline(always)]
pub(crate) fn fib_forward(
    ctx: &XdpContext,
    params: &mut FibParams,
    forward_reason: Reason,
) -> Verdict {
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
pub(crate) fn fib_params_v4(l4_proto: u8, tot_len: u16, saddr: u32, daddr: u32) -> FibParams {
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
pub(crate) fn fib_params_v6(
    l4_proto: u8,
    tot_len: u16,
    saddr: [u32; 4],
    daddr: [u32; 4],
) -> FibParams {
    // SAFETY: as above.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = l4_proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv6_src = saddr;
    p.__bindgen_anon_4.ipv6_dst = daddr;
    p
}
