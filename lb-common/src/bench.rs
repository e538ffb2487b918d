//! Map values of the benchmark programs (lb-ebpf's `lb-harness` and `lb-floor`), shared with
//! `cargo xtask bench`. Not part of the balancer's pinned layout: these maps live only as long as
//! a benchmark run.

/// Largest frame the harness can restore (a TCP/UDP packet over IPv6 fits with room to spare).
pub const FRAME_MAX: usize = 256;

/// `BenchFrame::vary_bytes`: nothing varies; every run sees the same frame.
pub const VARY_NONE: u32 = 0;

/// The frame the harness writes back before every run, and which field it varies.
///
/// `BPF_PROG_TEST_RUN` with `repeat > 1` hands each run the buffer the previous run rewrote (and
/// moved, when a program grew the head), so a rewriting program would otherwise be timed on its
/// own output. The harness restores `data[..len]`, then optionally writes a counter into one
/// field so that every run is a new flow (the conntrack miss path) or one of `vary_modulo` flows
/// (a traffic generator's flow set).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BenchFrame {
    /// Frame length, 1..=FRAME_MAX.
    pub len: u32,
    /// Byte offset of the varied field in the frame.
    pub vary_off: u32,
    /// Width of the varied field: [`VARY_NONE`], 2 or 4 bytes (written in network order).
    pub vary_bytes: u32,
    /// The field's value is `vary_base + seq % vary_modulo` (`vary_modulo` 0: `vary_base + seq`).
    pub vary_base: u32,
    pub vary_modulo: u32,
    /// Runs so far; the harness increments it (one CPU runs a test at a time).
    pub seq: u32,
    pub data: [u8; FRAME_MAX],
}

impl BenchFrame {
    /// `frame` restored unchanged on every run. `None` when it does not fit.
    pub fn fixed(frame: &[u8]) -> Option<BenchFrame> {
        if frame.is_empty() || frame.len() > FRAME_MAX {
            return None;
        }
        let mut data = [0u8; FRAME_MAX];
        data[..frame.len()].copy_from_slice(frame);
        Some(BenchFrame {
            len: frame.len() as u32,
            vary_off: 0,
            vary_bytes: VARY_NONE,
            vary_base: 0,
            vary_modulo: 0,
            seq: 0,
            data,
        })
    }

    /// `frame` with the `bytes`-wide field at `off` counting up from its value in `frame`.
    /// `None` when the frame does not fit or the field lies outside it.
    pub fn varying(frame: &[u8], off: usize, bytes: u32, modulo: u32) -> Option<BenchFrame> {
        let mut f = BenchFrame::fixed(frame)?;
        let base = match bytes {
            2 => u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]) as u32,
            4 => u32::from_be_bytes(frame.get(off..off + 4)?.try_into().ok()?),
            _ => return None,
        };
        f.vary_off = off as u32;
        f.vary_bytes = bytes;
        f.vary_base = base;
        f.vary_modulo = modulo;
        Some(f)
    }
}

const _: () = assert!(core::mem::size_of::<BenchFrame>() == 24 + FRAME_MAX);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], integer fields and a byte array, no padding, any bit pattern valid.
unsafe impl aya::Pod for BenchFrame {}
