//! A flow's backend from the VIP's live Maglev table (one of two ring halves).

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// The VIP's live Maglev table's pick for the flow: (backend id, its entry, the flow hash).
#[inline(always)]
pub(crate) fn maglev(vip: &VipMeta, key: &FlowKey) -> Result<(u32, Backend, u32), Reason> {
    let m = RING_SIZE.load();
    if m == 0 {
        return Err(Reason::DropBadMaps);
    }
    let hash = flow_hash(key);
    let slot = (hash % m) as u64;
    let base = ((vip.id as u64) * 2 + (vip.ring_slot & 1) as u64) * m as u64;
    let index = base + slot;
    if index > u32::MAX as u64 {
        return Err(Reason::DropBadMaps);
    }
    let Some(id) = RINGS.get(index as u32).copied() else {
        return Err(Reason::DropBadMaps);
    };
    if id == BACKEND_NONE {
        return Err(Reason::DropNoBackend);
    }
    let Some(b) = BACKENDS.get(id) else {
        return Err(Reason::DropBadMaps);
    };
    if b.flags & backend_flags::USABLE == 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok((id, *b, hash))
}
