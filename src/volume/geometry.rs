//! Request geometry: splitting a byte range into an unaligned head, whole sectors and an
//! unaligned tail, and spotting all-zero (never written or discarded) ciphertext sectors.

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
    fn zero_detection() {
        let mut b = vec![0u8; 4096];
        assert!(is_zero(&b));
        b[4095] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[0u8; 17]));
        assert!(!is_zero(&[0, 0, 1]));
    }
}
