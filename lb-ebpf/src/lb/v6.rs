//! The IPv6 path: the twin of the IPv4 one (no extension headers).

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

#[inline(always)]
pub(crate) fn process_v6(ctx: &XdpContext, l3: usize) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let Some(payload_len) = ipv6_payload_len(ctx, l3, ip) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (header reads below): ptr_at checked the bounds.
    let next = unsafe { (*ip).next_hdr };
    if next == IPPROTO_ICMPV6 {
        return icmp_v6(ctx, l3, ip, payload_len);
    }
    // Extension headers (fragments included) are not parsed: the stack gets them.
    if next != proto::TCP && next != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    let Some(l4) = parse_l4(ctx, l3 + size_of::<Ipv6Hdr>(), payload_len, next) else {
        return (PASS, Reason::PassTruncated);
    };
    let key = unsafe {
        FlowKey {
            src: (*ip).saddr,
            dst: (*ip).daddr,
            sport: (*l4.ports).sport,
            dport: (*l4.ports).dport,
            proto: next,
            _pad: [0; 3],
        }
    };
    let Some(vip) = find_vip(key.dst, key.dport, next) else {
        return nat_reply_v6(ctx, ip, &l4, &key);
    };
    if vip.mode == mode::LOCAL {
        return (PASS, Reason::PassLocal);
    }
    // Before a flow exists: an expiring packet must not create a NAT flow without its reverse.
    if vip.mode == mode::NAT && unsafe { (*ip).hop_limit } <= 1 {
        return (PASS, Reason::PassTtl);
    }
    let pick = match pick_backend(&vip, &key, l4.udp, l4.syn, true) {
        Ok(p) => p,
        Err(reason) => return drop_for(reason),
    };
    account(ctx, &vip, &pick);
    match vip.mode {
        mode::DSR => forward_dsr(ctx, &pick.backend),
        mode::NAT => nat_forward_v6(ctx, ip, &l4, &key, &vip, &pick),
        mode::IPIP => {
            let vtf = u32::from_be(unsafe { (*ip).ver_tc_flow });
            encap(
                ctx,
                l3,
                false,
                (size_of::<Ipv6Hdr>() + payload_len) as u16,
                (vtf >> 20) as u8,
                true,
                &pick.backend,
                pick.flow_hash(&key),
            )
        }
        _ => (PASS, Reason::PassLocal),
    }
}
