//! Request geometry: splitting a byte range into an unaligned head, whole sectors and an
//! unaligned tail, and spotting all-zero (never written or discarded) ciphertext sectors and
//! 16-byte blocks.

/// The parts of a request: an unaligned head inside one sector, whole sectors, an unaligned tail.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Span {
    /// (sector start, offset inside it, length)
    pub head: Option<(u64, usize, usize)>,
    /// (start, length), both sector-aligned; length may be 0.
    pub mid: (u64, u64),
    pub tail: Option<(u64, usize, usize)>,
}

pub(super) fn span(offset: u64, len: u64, ss: u64) -> Span {
    let end = offset + len;
    let mid_start = offset.div_ceil(ss) * ss;
    let mid_end = end / ss * ss;
    if mid_start > mid_end {
        // Inside one sector, touching neither of its edges.
        let s = offset / ss * ss;
        return Span {
            head: Some((s, (offset - s) as usize, len as usize)),
            mid: (mid_start, 0),
            tail: None,
        };
    }
    let head = (!offset.is_multiple_of(ss)).then(|| {
        let s = mid_start - ss;
        (s, (offset - s) as usize, (mid_start - offset) as usize)
    });
    let tail = (!end.is_multiple_of(ss)).then_some((mid_end, 0, (end - mid_end) as usize));
    Span {
        head,
        mid: (mid_start, mid_end - mid_start),
        tail,
    }
}

/// True if every byte is zero; word-wise with an early exit per 256 bytes.
pub(super) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(256);
    for c in &mut chunks {
        let mut acc = 0u128;
        for w in c.chunks_exact(16) {
            acc |= u128::from_ne_bytes(w.try_into().expect("16-byte chunk"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Size of one XTS block: the unit whose ciphertext is independent of the others in a sector.
pub(super) const XTS_BLOCK: usize = 16;

fn block_is_zero(w: &[u8]) -> bool {
    let a = u64::from_ne_bytes(w[..8].try_into().expect("8 bytes"));
    let b = u64::from_ne_bytes(w[8..16].try_into().expect("8 bytes"));
    a | b == 0
}

/// True if the first 16-byte block of `b` is all zero: a cheap hint that a sector is a hole
/// (it only routes a sector to the path that decides on its ciphertext; see `decrypt_read`).
pub(super) fn starts_with_zero_block(b: &[u8]) -> bool {
    block_is_zero(&b[..XTS_BLOCK])
}

/// The indices below `n` of the sectors whose bit is set in `flags` (bit `i % 64` of word
/// `i / 64`, as `Xts::decrypt_sectors_flagging` sets them), in order.
pub(super) fn flagged(flags: &[u64], n: usize) -> impl Iterator<Item = usize> + '_ {
    flags.iter().enumerate().flat_map(move |(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                w * 64 + b
            })
        })
        .take_while(move |&i| i < n)
    })
}

/// Zeroes, in `plain`, every 16-byte block whose ciphertext in `cipher` was all zero: those
/// blocks have not been written (yet) — a write landing, or a hole being punched, while this
/// read ran — and read as zeroes, like a never-written sector.
pub(super) fn rezero_blocks(cipher_zero: &[bool], plain: &mut [u8]) {
    for (z, w) in cipher_zero.iter().zip(plain.chunks_exact_mut(XTS_BLOCK)) {
        if *z {
            w.fill(0);
        }
    }
}

/// Which 16-byte blocks of `b` are all zero (`out` gets one entry per block).
pub(super) fn zero_blocks(b: &[u8], out: &mut Vec<bool>) {
    out.clear();
    out.extend(b.chunks_exact(XTS_BLOCK).map(block_is_zero));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(
            span(0, 8192, 4096),
            Span {
                head: None,
                mid: (0, 8192),
                tail: None
            }
        );
        assert_eq!(
            span(100, 10, 4096),
            Span {
                head: Some((0, 100, 10)),
                mid: (4096, 0),
                tail: None
            }
        );
        assert_eq!(
            span(100, 3996, 4096),
            Span {
                head: Some((0, 100, 3996)),
                mid: (4096, 0),
                tail: None
            }
        );
        assert_eq!(
            span(4096, 100, 4096),
            Span {
                head: None,
                mid: (4096, 0),
                tail: Some((4096, 0, 100))
            }
        );
        assert_eq!(
            span(4000, 9000, 4096),
            Span {
                head: Some((0, 4000, 96)),
                mid: (4096, 8192),
                tail: Some((12288, 0, 712))
            }
        );
    }

    #[test]
    fn flagged_lists_set_bits_below_n() {
        let flags = [0b1001u64 | 1 << 63, 1 << 2 | 1 << 40];
        assert_eq!(
            flagged(&flags, 128).collect::<Vec<_>>(),
            [0, 3, 63, 66, 104]
        );
        assert_eq!(flagged(&flags, 67).collect::<Vec<_>>(), [0, 3, 63, 66]);
        assert_eq!(flagged(&[0, 0], 128).count(), 0);
        assert!(starts_with_zero_block(&[0u8; 16]));
        let mut b = [0u8; 32];
        b[15] = 1;
        assert!(!starts_with_zero_block(&b));
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4096];
        assert!(is_zero(&b));
        b[4095] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[0u8; 17]));
        assert!(!is_zero(&[0, 0, 1]));
    }
}
