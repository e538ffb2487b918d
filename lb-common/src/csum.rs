//! Incremental Internet checksum update (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! Values are the raw memory of the packet fields (whatever the host byte order makes of them):
//! the ones' complement sum is byte-order independent as long as the checksum field and the
//! changed fields are read the same way, so nothing here swaps bytes.

/// Adds the change of one 16-bit field from `old` to `new` to an accumulator.
#[inline(always)]
pub fn diff16(acc: u64, old: u16, new: u16) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// Adds the change of one 32-bit field (two 16-bit words) from `old` to `new` to an accumulator.
#[inline(always)]
pub fn diff32(acc: u64, old: u32, new: u32) -> u64 {
    let o = !old;
    acc + (o & 0xffff) as u64 + (o >> 16) as u64 + (new & 0xffff) as u64 + (new >> 16) as u64
}

/// Folds a 64-bit ones' complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    // Four folds bring any sum of fewer than 2^32 words down to 16 bits; written out so the
    // verifier sees no loop.
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Applies the accumulated changes to a checksum field's old value.
#[inline(always)]
pub fn apply(csum: u16, acc: u64) -> u16 {
    !fold((!csum) as u64 + acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full RFC 1071 checksum over big-endian words, as a reference for the incremental form.
    fn full(words: &[u16]) -> u16 {
        let s: u64 = words.iter().map(|w| *w as u64).sum();
        !fold(s)
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut words = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let before = full(&words);
        let (old, new) = ((words[8] as u32) << 16 | words[9] as u32, 0x0a00_0105u32);
        words[8] = (new >> 16) as u16;
        words[9] = new as u16;
        let after = full(&words);
        assert_eq!(apply(before, diff32(0, old, new)), after);
        // A 16-bit field (the TTL/protocol word) changed on top of that.
        let old16 = words[4];
        words[4] = 0x3f11;
        assert_eq!(apply(after, diff16(0, old16, words[4])), full(&words));
    }
}
