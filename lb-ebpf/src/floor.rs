//! The bare programs `cargo xtask bench` measures the balancer against: the least a program must
//! do to send a frame on, so "ratio to the floor" says what the balancer's own work costs.
//!
//! - `bench_floor`: swap the MACs and `XDP_TX` (the BPF_PROG_TEST_RUN floor).
//! - `bench_fwd`: set the MACs and `XDP_REDIRECT` to a fixed interface (the end-to-end floor:
//!   forwarding with no parsing, lookup or rewrite beyond L2).
//! - `bench_sink`: count and drop UDP (the receiving end of the end-to-end packet-rate runs).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
    Global,
};

/// `bench_fwd`: where frames go and with which addresses (set at load).
#[unsafe(no_mangle)]
static FWD_IFINDEX: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FWD_DST_MAC: Global<[u8; 6]> = Global::new([0; 6]);
#[unsafe(no_mangle)]
static FWD_SRC_MAC: Global<[u8; 6]> = Global::new([0; 6]);

/// `bench_sink`: frames seen, per CPU.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn macs(ctx: &XdpContext) -> Option<*mut [u8; 12]> {
    let p = ctx.data();
    if p + 12 > ctx.data_end() {
        return None;
    }
    Some(p as *mut [u8; 12])
}

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let Some(m) = macs(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: 12 bytes bounds-checked above.
    unsafe {
        let old = *m;
        let mut new = [0u8; 12];
        new[..6].copy_from_slice(&old[6..]);
        new[6..].copy_from_slice(&old[..6]);
        *m = new;
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_fwd(ctx: XdpContext) -> u32 {
    let Some(m) = macs(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let (dst, src) = (FWD_DST_MAC.load(), FWD_SRC_MAC.load());
    let mut new = [0u8; 12];
    new[..6].copy_from_slice(&dst);
    new[6..].copy_from_slice(&src);
    // SAFETY: 12 bytes bounds-checked above.
    unsafe {
        *m = new;
        bpf_redirect(FWD_IFINDEX.load(), 0) as u32
    }
}

/// IPv4 UDP (the generator's traffic) is counted and dropped; everything else goes to the stack,
/// so the same backend also serves the TCP connection-rate runs.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let p = ctx.data();
    if p + 24 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 24 bytes bounds-checked above (Ethernet type at 12, IPv4 protocol at 14 + 9).
    let (ether_type, proto) = unsafe { (*((p + 12) as *const u16), *((p + 23) as *const u8)) };
    if ether_type != 0x0800u16.to_be() || proto != 17 {
        return xdp_action::XDP_PASS;
    }
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
