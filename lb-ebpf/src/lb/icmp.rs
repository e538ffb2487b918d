//! ICMP "fragmentation needed" / "packet too big": sent to the backend that owns the quoted flow.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// What an ICMP error must quote of the offending packet's L4 header to be acted on.
pub(crate) const QUOTED_L4_LEN: usize = 8;

#[repr(C)]
pub(crate) struct IcmpHdr {
    pub(crate) kind: u8,
    pub(crate) code: u8,
    pub(crate) check: u16,
    pub(crate) rest: u32,
}

/// The flow an ICMP error quotes, seen from the client (the quoted packet went VIP → client), its
/// VIP and its backend, looked up without creating or refreshing a flow. Hashing the quoted header
/// this way gives the same backend Maglev gives the flow itself. An error is about a VIP's packet
/// only when it is sent to the packet's source: one addressed elsewhere (the host, another VIP) is
/// not for a VIP whatever it quotes, and the stack gets it.
#[inline(always)]
pub(crate) fn quoted_flow(
    outer_dst: [u32; 4],
    inner_src: [u32; 4],
    inner_dst: [u32; 4],
    ports: *const Ports,
    l4_proto: u8,
) -> Result<(FlowKey, VipMeta, Pick), Verdict> {
    if outer_dst != inner_src {
        return Err((PASS, Reason::PassNotVip));
    }
    // SAFETY: the caller checked `ports` is inside the frame.
    let (sport, dport) = unsafe { ((*ports).sport, (*ports).dport) };
    let key = FlowKey {
        src: inner_dst,
        dst: inner_src,
        sport: dport,
        dport: sport,
        proto: l4_proto,
        _pad: [0; 3],
    };
    let Some(vip) = find_vip(key.dst, key.dport, l4_proto) else {
        return Err((PASS, Reason::PassNotVip));
    };
    if vip.mode == mode::LOCAL {
        return Err((PASS, Reason::PassLocal));
    }
    match pick_backend(&vip, &key, l4_proto == proto::UDP, false, false) {
        Ok(p) => Ok((key, vip, p)),
        Err(r) => Err(drop_for(r)),
    }
}

/// Tags a successful forward of an ICMP error with its own reason.
#[inline(always)]
pub(crate) fn as_icmp(v: Verdict) -> Verdict {
    match v.0 {
        xdp_action::XDP_TX | xdp_action::XDP_REDIRECT => (v.0, Reason::IcmpToBackend),
        _ => v,
    }
}

/// ICMP "fragmentation needed" about a VIP flow goes where the flow goes, in every mode: the
/// backend that owns the connection is the one whose path MTU must shrink.
#[inline(always)]
pub(crate) fn icmp_v4(
    ctx: &XdpContext,
    l3: usize,
    ip: *mut Ipv4Hdr,
    hdr_len: usize,
    tot_len: usize,
) -> Verdict {
    let icmp_off = l3 + hdr_len;
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, icmp_off) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (header reads below): bounds checked by ptr_at.
    if unsafe { (*icmp).kind != 3 || (*icmp).code != 4 } {
        return (PASS, Reason::PassNotL4);
    }
    let inner_l3 = icmp_off + size_of::<IcmpHdr>();
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let (inner_ver_ihl, inner_proto) = unsafe { ((*inner).ver_ihl, (*inner).proto) };
    let inner_hdr_len = (inner_ver_ihl & 0x0f) as usize * 4;
    if inner_ver_ihl >> 4 != 4 || inner_hdr_len < size_of::<Ipv4Hdr>() {
        return (PASS, Reason::PassTruncated);
    }
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    // RFC 792 quotes the header and at least 8 bytes after it, inside the error's own datagram
    // (a short frame's padding is not part of the quote); less is malformed, the stack's to judge.
    // The frame check comes first: after the datagram check LLVM drops it as implied, and the
    // verifier, which does not follow that arithmetic, needs it on the pointer it dereferences.
    let quoted_l4 = inner_l3 + inner_hdr_len;
    let Some(ports) = ptr_with_len::<Ports>(ctx, quoted_l4, QUOTED_L4_LEN) else {
        return (PASS, Reason::PassTruncated);
    };
    if quoted_l4 + QUOTED_L4_LEN > l3 + tot_len {
        return (PASS, Reason::PassTruncated);
    }
    let (isrc, idst, odst) = unsafe { ((*inner).saddr, (*inner).daddr, (*ip).daddr) };
    let quoted = quoted_flow(
        [odst, 0, 0, 0],
        [isrc, 0, 0, 0],
        [idst, 0, 0, 0],
        ports,
        inner_proto,
    );
    let (key, vip, pick) = match quoted {
        Ok(x) => x,
        Err(v) => return v,
    };
    match vip.mode {
        mode::DSR => as_icmp(forward_dsr(ctx, &pick.backend)),
        mode::IPIP => {
            let (tos, frag) = unsafe { ((*ip).tos, (*ip).frag_off) };
            let df = u16::from_be(frag) & 0x4000 != 0;
            as_icmp(encap(
                ctx,
                l3,
                true,
                tot_len as u16,
                tos,
                df,
                &pick.backend,
                pick.flow_hash(&key),
            ))
        }
        mode::NAT => as_icmp(nat_icmp_v4(ctx, ip, icmp, inner, ports, &pick.backend)),
        _ => (PASS, Reason::PassLocal),
    }
}

/// NAT: the error was addressed to the VIP and quotes the VIP as the source; the backend must see
/// its own address and port in both places. Patches the outer header (destination, TTL), the
/// quoted header (source, its checksum) and the ICMP checksum, which covers the quoted bytes.
#[inline(always)]
pub(crate) fn nat_icmp_v4(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    icmp: *mut IcmpHdr,
    inner: *mut Ipv4Hdr,
    ports: *mut Ports,
    b: &Backend,
) -> Verdict {
    if b.family != lb_common::family::V4 {
        return drop_for(Reason::DropBadBackend);
    }
    // SAFETY: every pointer was bounds-checked by the caller.
    unsafe {
        if (*ip).ttl <= 1 {
            return (PASS, Reason::PassTtl);
        }
        let new_addr = b.addr[0];
        let old_isrc = (*inner).saddr;
        let old_isport = (*ports).sport;
        let new_port = if b.port != 0 { b.port } else { old_isport };
        let old_icheck = (*inner).check;
        let new_icheck = csum::apply(old_icheck, csum::diff32(0, old_isrc, new_addr));
        (*inner).saddr = new_addr;
        (*inner).check = new_icheck;
        (*ports).sport = new_port;
        let mut acc = csum::diff32(0, old_isrc, new_addr);
        acc = csum::diff16(acc, old_isport, new_port);
        acc = csum::diff16(acc, old_icheck, new_icheck);
        (*icmp).check = csum::apply((*icmp).check, acc);
        let old_daddr = (*ip).daddr;
        let ttl_word = ip as *mut u8 as usize + 8;
        let old_ttl_word = *(ttl_word as *const u16);
        (*ip).ttl -= 1;
        let new_ttl_word = *(ttl_word as *const u16);
        (*ip).daddr = new_addr;
        (*ip).check = csum::apply(
            (*ip).check,
            csum::diff16(
                csum::diff32(0, old_daddr, new_addr),
                old_ttl_word,
                new_ttl_word,
            ),
        );
        let params = &mut fib_params_v4(
            IPPROTO_ICMP,
            u16::from_be((*ip).tot_len),
            (*ip).saddr,
            new_addr,
        );
        fib_forward(ctx, params, Reason::RedirectNat)
    }
}

/// ICMPv6 "packet too big" about a VIP flow: as [`icmp_v4`].
#[inline(always)]
pub(crate) fn icmp_v6(
    ctx: &XdpContext,
    l3: usize,
    ip: *mut Ipv6Hdr,
    payload_len: usize,
) -> Verdict {
    let icmp_off = l3 + size_of::<Ipv6Hdr>();
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, icmp_off) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY (header reads below): bounds checked by ptr_at.
    if unsafe { (*icmp).kind } != 2 {
        return (PASS, Reason::PassNotL4);
    }
    let inner_l3 = icmp_off + size_of::<IcmpHdr>();
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, inner_l3) else {
        return (PASS, Reason::PassTruncated);
    };
    let (inner_version, inner_proto) = unsafe { (*(inner as *const u8) >> 4, (*inner).next_hdr) };
    if inner_version != 6 {
        return (PASS, Reason::PassTruncated);
    }
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return (PASS, Reason::PassNotL4);
    }
    // RFC 4443 quotes as much as fits, so a real error holds 8 bytes of L4; frame check first,
    // as in `icmp_v4`.
    let quoted_l4 = inner_l3 + size_of::<Ipv6Hdr>();
    let Some(ports) = ptr_with_len::<Ports>(ctx, quoted_l4, QUOTED_L4_LEN) else {
        return (PASS, Reason::PassTruncated);
    };
    if quoted_l4 + QUOTED_L4_LEN > icmp_off + payload_len {
        return (PASS, Reason::PassTruncated);
    }
    let (isrc, idst, odst) = unsafe { ((*inner).saddr, (*inner).daddr, (*ip).daddr) };
    let (key, vip, pick) = match quoted_flow(odst, isrc, idst, ports, inner_proto) {
        Ok(x) => x,
        Err(v) => return v,
    };
    match vip.mode {
        mode::DSR => as_icmp(forward_dsr(ctx, &pick.backend)),
        mode::IPIP => {
            let vtf = u32::from_be(unsafe { (*ip).ver_tc_flow });
            as_icmp(encap(
                ctx,
                l3,
                false,
                (size_of::<Ipv6Hdr>() + payload_len) as u16,
                (vtf >> 20) as u8,
                true,
                &pick.backend,
                pick.flow_hash(&key),
            ))
        }
        mode::NAT => as_icmp(nat_icmp_v6(ctx, ip, icmp, inner, ports, &pick.backend)),
        _ => (PASS, Reason::PassLocal),
    }
}

/// NAT twin of [`nat_icmp_v4`] for ICMPv6, whose checksum also covers the outer addresses.
#[inline(always)]
pub(crate) fn nat_icmp_v6(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    icmp: *mut IcmpHdr,
    inner: *mut Ipv6Hdr,
    ports: *mut Ports,
    b: &Backend,
) -> Verdict {
    if b.family != lb_common::family::V6 {
        return drop_for(Reason::DropBadBackend);
    }
    // SAFETY: every pointer was bounds-checked by the caller.
    unsafe {
        if (*ip).hop_limit <= 1 {
            return (PASS, Reason::PassTtl);
        }
        let new_addr = b.addr;
        let old_isrc = (*inner).saddr;
        let old_dst = (*ip).daddr;
        let old_isport = (*ports).sport;
        let new_port = if b.port != 0 { b.port } else { old_isport };
        (*inner).saddr = new_addr;
        (*ports).sport = new_port;
        (*ip).daddr = new_addr;
        (*ip).hop_limit -= 1;
        let mut acc = csum::diff16(0, old_isport, new_port);
        let mut i = 0;
        while i < 4 {
            acc = csum::diff32(acc, old_isrc[i], new_addr[i]);
            acc = csum::diff32(acc, old_dst[i], new_addr[i]);
            i += 1;
        }
        (*icmp).check = csum::apply((*icmp).check, acc);
        let tot = u16::from_be((*ip).payload_len).wrapping_add(size_of::<Ipv6Hdr>() as u16);
        let params = &mut fib_params_v6(IPPROTO_ICMPV6, tot, (*ip).saddr, new_addr);
        fib_forward(ctx, params, Reason::RedirectNat)
    }
}
