//! NAT: destination (and for replies, source) rewritten with incremental checksums.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// Applies an accumulated checksum change to the L4 checksum. A zero UDP checksum over IPv4 means
/// "none" and stays zero; a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub(crate) fn update_l4_check(l4: &L4, acc: u64, v4: bool) {
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

#[inline(always)]
pub(crate) fn nat_forward_v4(
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

/// Replies from a NAT backend: source back to the VIP, then forwarded to the client.
#[inline(always)]
pub(crate) fn nat_reply_v4(ctx: &XdpContext, ip: *mut Ipv4Hdr, l4: &L4, key: &FlowKey) -> Verdict {
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
pub(crate) unsafe fn rewrite_v4(ip: *mut Ipv4Hdr, l4: &L4, source: bool, addr: u32, port: u16) {
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

#[inline(always)]
pub(crate) fn nat_forward_v6(
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
pub(crate) fn nat_reply_v6(ctx: &XdpContext, ip: *mut Ipv6Hdr, l4: &L4, key: &FlowKey) -> Verdict {
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
pub(crate) unsafe fn rewrite_v6(
    ip: *mut Ipv6Hdr,
    l4: &L4,
    source: bool,
    addr: [u32; 4],
    port: u16,
) {
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
