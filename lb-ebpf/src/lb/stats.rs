//! Per-CPU counters: per verdict reason, per VIP, per backend.

// One program: each part sees the maps, the headers and the other parts through the root.
use crate::*;

#[inline(always)]
pub(crate) fn count_reason(reason: Reason) {
    if let Some(c) = STATS_REASON.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn count(map: &PerCpuArray<Counters>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[inline(always)]
pub(crate) fn account(ctx: &XdpContext, vip: &VipMeta, pick: &Pick) {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count(&STATS_VIP, vip.id, bytes, pick.new_flow);
    count(&STATS_BACKEND, pick.id, bytes, pick.new_flow);
}
