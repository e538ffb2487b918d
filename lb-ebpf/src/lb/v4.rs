//! The IPv4 path: validate, find the VIP, pick, forward by mode.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

#[inline(always)]
pub(crate) fn process_v4(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let Some((hdr_len, tot_len)) = ipv4_lengths(ctx, l3, ip) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (all header reads below): ptr_at checked the bounds.
    let l4_proto = unsafe { (*ip).proto };
    if l4_proto == IPPROTO_ICMP {
        return icmp_v4(ctx, l3, ip, hdr_len, tot_len);
    }
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    let saddr = unsafe { (*ip).saddr };
    let daddr = unsafe { (*ip).daddr };
    // MF set or a non-zero offset: a fragment.
    let fragment = u16::from_be(unsafe { (*ip).frag_off }) & 0x3fff != 0;
    let mut key = FlowKey {
        src: [saddr, 0, 0, 0],
        dst: [daddr, 0, 0, 0],
        sport: 0,
        dport: 0,
        proto: l4_proto,
        _pad: [0; 3],
    };
    if fragment {
        let Some(vip) = find_vip(key.dst, 0, l4_proto) else {
            return (PASS, Reason::PassFragment);
        };
        return steer_fragment(ctx, &vip, &key);
    }
    let Some(l4) = parse_l4(ctx, l3 + hdr_len, tot_len - hdr_len, l4_proto) else {
        return (PASS, Reason::PassTruncated);
    };
    key.sport = unsafe { (*l4.ports).sport };
    key.dport = unsafe { (*l4.ports).dport };
    let Some(vip) = find_vip(key.dst, key.dport, l4_proto) else {
        return nat_reply_v4(ctx, ip, &l4, &key);
    };
    if vip.mode == mode::LOCAL {
        return (PASS, Reason::PassLocal);
    }
    // Before a flow exists: an expiring packet must not create a NAT flow without its reverse.
    if vip.mode == mode::NAT && unsafe { (*ip).ttl } <= 1 {
        return (PASS, Reason::PassTtl);
    }
    let pick = match pick_backend(&vip, &key, l4.udp, l4.syn, true) {
        Ok(p) => p,
        Err(reason) => return drop_for(reason),
    };
    account(ctx, &vip, &pick);
    match vip.mode {
        mode::DSR => forward_dsr(ctx, &pick.backend),
        mode::NAT => nat_forward_v4(ctx, ip, &l4, &key, &vip, &pick),
        mode::IPIP => {
            let (tos, frag) = unsafe { ((*ip).tos, (*ip).frag_off) };
            let df = u16::from_be(frag) & 0x4000 != 0;
            encap(
                ctx,
                l3,
                true,
                tot_len as u16,
                tos,
                df,
                &pick.backend,
                pick.flow_hash(&key),
            )
        }
        _ => (PASS, Reason::PassLocal),
    }
}

#[inline(always)]
pub(crate) fn drop_for(reason: Reason) -> Verdict {
    (xdp_action::XDP_DROP, reason)
}
