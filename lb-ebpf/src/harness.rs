//! Drives the balancer for `cargo xtask bench`.
//!
//! `bench_harness` makes `BPF_PROG_TEST_RUN` with a large repeat count time the real packet path:
//! the kernel hands every run the buffer the previous run rewrote (and moved, after an `ipip`
//! encapsulation), so this program first writes the original frame back from `FRAME`, optionally
//! varies one field (every run a new flow: the conntrack miss path), then tail-calls whatever
//! userspace put in `TARGET[0]` — the balancer, or a floor program to measure the harness itself.
//!
//! `bench_gen` is the same restore without the tail call, returning `XDP_TX`: run with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` it is a traffic generator into a veth. Live frames are recycled and
//! may come back rewritten, which is why every header is written on every run.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};
use lb_common::bench::{BenchFrame, FRAME_MAX};

#[map]
static FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);
#[map]
static TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_harness(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: on success control never comes back; on failure (empty slot) we fall through.
    unsafe { TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    match restore(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}

/// Puts `FRAME` back into the packet buffer, at its original length.
#[inline(always)]
fn restore(ctx: &XdpContext) -> Option<()> {
    let f = FRAME.get_ptr_mut(0)?;
    // SAFETY: f is a valid map value pointer; this CPU is the only one running the test.
    unsafe {
        let len = (*f).len;
        let cur = (ctx.data_end() - ctx.data()) as u32;
        if cur != len {
            // A program that grew (or shrank) the head left the frame longer (shorter) by exactly
            // that much: move the start back.
            if bpf_xdp_adjust_head(ctx.ctx, cur.wrapping_sub(len) as i32) != 0 {
                return None;
            }
        }
        // 1..=FRAME_MAX in a form the verifier can bound (FRAME_MAX is a power of two).
        let n = (len.wrapping_sub(1) & (FRAME_MAX as u32 - 1)) + 1;
        let data = (&raw mut (*f).data) as *mut c_void;
        if bpf_xdp_store_bytes(ctx.ctx, 0, data, n) != 0 {
            return None;
        }
        let width = (*f).vary_bytes;
        if width == 0 {
            return Some(());
        }
        let seq = (*f).seq;
        (*f).seq = seq.wrapping_add(1);
        let modulo = (*f).vary_modulo;
        let step = if modulo != 0 { seq % modulo } else { seq };
        let value = (*f).vary_base.wrapping_add(step);
        let off = (*f).vary_off;
        let rc = if width == 2 {
            let mut b = (value as u16).to_be_bytes();
            bpf_xdp_store_bytes(ctx.ctx, off, b.as_mut_ptr() as *mut c_void, 2)
        } else {
            let mut b = value.to_be_bytes();
            bpf_xdp_store_bytes(ctx.ctx, off, b.as_mut_ptr() as *mut c_void, 4)
        };
        (rc == 0).then_some(())
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
