//! DSR: only the destination MAC changes; the backend answers the client directly.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

/// DSR: the backend holds the VIP itself; only the L2 destination changes.
#[inline(always)]
pub(crate) fn forward_dsr(ctx: &XdpContext, backend: &Backend) -> Verdict {
    if backend.mac == [0u8; 6] {
        return (xdp_action::XDP_DROP, Reason::DropBadBackend);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (PASS, Reason::PassTruncated);
    };
    // SAFETY: bounds checked above.
    unsafe {
        (*eth).src = (*eth).dst;
        (*eth).dst = backend.mac;
    }
    (xdp_action::XDP_TX, Reason::TxDsr)
}
