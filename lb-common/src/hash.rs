//! The flow hash: which Maglev slot a connection maps to.
//!
//! It runs in the kernel on every connection-tracking miss and in userspace tests, so it lives here
//! once. Every node must compute the same value for a flow (ECMP may send it to any of them), so it is
//! a fixed, seeded function of the 5-tuple — not a per-boot random hash like the kernel's
//! `skb->hash`. Multiply-xor rounds over 64-bit lanes, then the MurmurHash3 64-bit finalizer for
//! avalanche: cheap in BPF (no loops after unrolling, no helper calls), and strong enough that 1e6
//! random flows spread over 100 backends within sampling noise (see lb-userspace's maglev tests).

use crate::FlowKey;

const SEED: u64 = 0x6c62_2d66_6c6f_7731; // "lb-flow1"
const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn round(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(K).rotate_left(29)
}

/// MurmurHash3's `fmix64`.
#[inline(always)]
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Hash of a flow's 5-tuple. IPv4 flows have zeros in `src[1..]`/`dst[1..]`; fragments are hashed
/// with both ports zero so every fragment of a datagram lands on one backend.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = SEED;
    h = round(h, k.src[0] as u64 | (k.dst[0] as u64) << 32);
    h = round(h, k.src[1] as u64 | (k.dst[1] as u64) << 32);
    h = round(h, k.src[2] as u64 | (k.dst[2] as u64) << 32);
    h = round(h, k.src[3] as u64 | (k.dst[3] as u64) << 32);
    h = round(
        h,
        k.sport as u64 | (k.dport as u64) << 16 | (k.proto as u64) << 32,
    );
    fmix64(h) as u32
}
