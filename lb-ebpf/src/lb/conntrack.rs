//! Connection tracking: a flow stays on its backend; on a miss Maglev picks one. NAT flows
//! also get the reverse entry their replies are matched against.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// A backend chosen for a packet: its id, a copy of its entry, and whether this packet started
/// (or re-started) the flow.
pub(crate) struct Pick {
    pub(crate) id: u32,
    pub(crate) backend: Backend,
    pub(crate) new_flow: bool,
    /// The flow hash, when Maglev needed it (a miss): ipip reuses it for the outer source.
    pub(crate) hash: Option<u32>,
}

impl Pick {
    #[inline(always)]
    pub(crate) fn flow_hash(&self, key: &FlowKey) -> u32 {
        self.hash.unwrap_or_else(|| flow_hash(key))
    }
}

/// Connection tracking, then Maglev on a miss.
///
/// A tracked flow stays on its backend while the backend is usable (up or draining), so adding or
/// removing other backends never moves it; a flow whose backend was removed is re-picked here.
/// `track` false only looks (ICMP errors about a flow must not create or refresh it).
///
/// A TCP SYN (`syn`) nearly always opens a connection, so it skips the lookup and goes straight
/// to Maglev, inserting only if the flow is absent: one hash-table operation on the new-connection
/// path instead of two. A retransmitted SYN finds its entry that way and keeps its backend, exactly
/// as a lookup would have. Only UDP reads the clock: it is the only protocol whose flows age.
#[inline(always)]
pub(crate) fn pick_backend(
    vip: &VipMeta,
    key: &FlowKey,
    udp: bool,
    syn: bool,
    track: bool,
) -> Result<Pick, Reason> {
    let now = if udp {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        0
    };
    if !syn {
        if let Some(p) = tracked(vip, key, udp, track, now) {
            return Ok(p);
        }
    }
    let (id, backend, hash) = match maglev(vip, key) {
        Ok(x) => x,
        Err(r) => {
            // A retransmitted SYN of a flow on a draining backend, the table empty of others.
            if syn {
                if let Some(p) = tracked(vip, key, udp, track, now) {
                    return Ok(p);
                }
            }
            return Err(r);
        }
    };
    let flow = Flow {
        backend_id: id,
        _pad: 0,
        last_seen_ns: now,
    };
    // A full LRU evicts; a failed insert only costs a Maglev lookup on the next packet.
    if track {
        if !syn || FLOWS.insert(key, &flow, BPF_NOEXIST as u64).is_err() {
            if syn {
                if let Some(p) = tracked(vip, key, udp, track, now) {
                    return Ok(p);
                }
            }
            let _ = FLOWS.insert(key, &flow, 0);
        }
    }
    Ok(Pick {
        id,
        backend,
        new_flow: true,
        hash: Some(hash),
    })
}

/// The flow's tracked backend, if it may still take the flow.
#[inline(always)]
pub(crate) fn tracked(
    vip: &VipMeta,
    key: &FlowKey,
    udp: bool,
    track: bool,
    now: u64,
) -> Option<Pick> {
    let flow = FLOWS.get_ptr_mut(key)?;
    // SAFETY: LRU value pointer; a concurrent update replaces the whole 16 bytes at worst.
    let id = unsafe { (*flow).backend_id };
    let b = BACKENDS.get(id)?;
    let fresh = !udp || now.wrapping_sub(unsafe { (*flow).last_seen_ns }) < UDP_TIMEOUT_NS.load();
    // A backend id the agent gave to another VIP's backend since is not this flow's.
    if id == BACKEND_NONE || b.flags & backend_flags::USABLE == 0 || b.vip_id != vip.id || !fresh {
        return None;
    }
    if udp && track {
        unsafe { (*flow).last_seen_ns = now };
    }
    Some(Pick {
        id,
        backend: *b,
        new_flow: false,
        hash: None,
    })
}

/// Fragments of a datagram for a port-0 VIP: one backend per (source, destination, protocol).
/// NAT cannot rewrite ports it cannot see, so only DSR and local VIPs steer fragments.
#[inline(always)]
pub(crate) fn steer_fragment(ctx: &XdpContext, vip: &VipMeta, key: &FlowKey) -> Verdict {
    match vip.mode {
        mode::DSR => {
            let pick = match pick_backend(vip, key, true, false, true) {
                Ok(p) => p,
                Err(reason) => return drop_for(reason),
            };
            account(ctx, vip, &pick);
            forward_dsr(ctx, &pick.backend)
        }
        mode::LOCAL => (PASS, Reason::PassLocal),
        _ => (PASS, Reason::PassFragment),
    }
}

/// Makes sure the reply of this NAT flow can be translated back: written on a new flow, and
/// re-written when the reverse LRU evicted it while the flow lived on.
#[inline(always)]
pub(crate) fn ensure_reverse(
    key: &FlowKey,
    b: &Backend,
    new_port: u16,
    vip_id: u32,
    new_flow: bool,
) {
    let rev_key = FlowKey {
        src: b.addr,
        dst: key.src,
        sport: new_port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    if !new_flow && NAT_REVERSE.get_ptr(&rev_key).is_some() {
        return;
    }
    let rev = NatReverse {
        vip_addr: key.dst,
        vip_port: key.dport,
        _pad: 0,
        vip_id,
    };
    // A full LRU evicts; a failed insert is retried by the flow's next packet.
    let _ = NAT_REVERSE.insert(&rev_key, &rev, 0);
}
