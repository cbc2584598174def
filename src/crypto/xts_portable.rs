//! The portable XTS kernel: AES-256-XTS over whole sectors on the `aes` crate, for any target
//! and for CPUs without AES-NI. It lives apart from `xts` (which chooses a kernel and dispatches
//! to it) because it is a kernel like `xts_ni` and the VAES ones, only a safe one: it needs no
//! `unsafe`, works on slices (atomic ones for shared memory), and its caller (`xts`) has already
//! checked every length. It gives
//! the same bytes as the AES-NI kernels, including the zero-block flags of the flagging
//! decryption.

use std::sync::atomic::{AtomicU8, Ordering};

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};

use super::keys::XtsKey;
use super::xts_common::wipe;

/// The portable backend: the `aes` crate (its own backend batches blocks; it zeroizes its round
/// keys on drop with the crate's `zeroize` feature).
pub(super) struct Portable {
    data: Aes256,
    tweak: Aes256,
}

impl Portable {
    pub(super) fn new(key: &XtsKey) -> Self {
        Self {
            data: Aes256::new(key.dangerous_k1().into()),
            tweak: Aes256::new(key.dangerous_k2().into()),
        }
    }

    pub(super) fn run<const ENC: bool>(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
    ) {
        self.crypt::<ENC>(src, dst, sector_size, first_unit, None)
    }

    /// Encrypts `src` into `dst`, memory other threads may store to meanwhile (see
    /// `Xts::encrypt_sectors_to_shared`): one sector at a time into a stack buffer, then relaxed
    /// atomic byte stores, so no byte of `dst` is read or written non-atomically.
    pub(super) fn encrypt_to_shared(
        &self,
        src: &[u8],
        dst: &[AtomicU8],
        sector_size: usize,
        first_unit: u64,
    ) {
        let mut buf = [0u8; 4096];
        let out = &mut buf[..sector_size];
        let per = (sector_size / 512) as u64;
        for (i, (plain, shared)) in src
            .chunks_exact(sector_size)
            .zip(dst.chunks_exact(sector_size))
            .enumerate()
        {
            let unit = first_unit.wrapping_add(i as u64 * per);
            self.run::<true>(Some(plain), out, sector_size, unit);
            for (c, b) in out.iter().zip(shared) {
                b.store(*c, Ordering::Relaxed);
            }
        }
    }

    /// Encrypts (`ENC`) or decrypts; with `zero`, also flags the sectors that had an all-zero
    /// input block (decryption only: see `Xts::decrypt_sectors_flagging`).
    pub(super) fn crypt<const ENC: bool>(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
        mut zero: Option<&mut [u64]>,
    ) {
        // Tweaks count 512-byte units (`xts::UNIT`; not imported, so no cycle with `xts`).
        let units_per_sector = (sector_size / 512) as u64;
        let nblocks = sector_size / 16;
        // The xor with the tweak on the way in and out doubles as the copy into AES-sized
        // blocks, and lets the out-of-place form read `src` and write `dst` without a memcpy.
        let mut blocks = [Block::default(); 4096 / 16];
        let mut tweaks = [[0u8; 16]; 4096 / 16];
        for (i, out) in dst.chunks_exact_mut(sector_size).enumerate() {
            let unit = first_unit.wrapping_add(i as u64 * units_per_sector);
            let mut t = Block::default();
            t[..8].copy_from_slice(&unit.to_le_bytes());
            self.tweak.encrypt_block(&mut t);
            let mut t: [u8; 16] = t.into();
            for tw in tweaks[..nblocks].iter_mut() {
                *tw = t;
                t = mul_alpha(t);
            }
            let input: &[u8] = match src {
                Some(s) => &s[i * sector_size..(i + 1) * sector_size],
                None => out,
            };
            let mut any_zero = false;
            for ((b, c), tw) in blocks.iter_mut().zip(input.chunks_exact(16)).zip(&tweaks) {
                // One load of the block into a local: its zero test and its decryption see the
                // same value even if `src` changes meanwhile.
                let v = u128::from_ne_bytes(c.try_into().expect("16-byte chunk"));
                if !ENC {
                    any_zero |= v == 0;
                }
                let x = v ^ u128::from_ne_bytes(*tw);
                b.copy_from_slice(&x.to_ne_bytes());
            }
            if let Some(z) = zero.as_deref_mut() {
                z[i / 64] |= u64::from(any_zero) << (i % 64);
            }
            if ENC {
                self.data.encrypt_blocks(&mut blocks[..nblocks]);
            } else {
                self.data.decrypt_blocks(&mut blocks[..nblocks]);
            }
            for ((b, c), tw) in blocks.iter().zip(out.chunks_exact_mut(16)).zip(&tweaks) {
                for k in 0..16 {
                    c[k] = b[k] ^ tw[k];
                }
            }
        }
        // The scratch blocks held plaintext and tweaks (derived from the key); don't leave them
        // on the stack, nor (where we can say which) in vector registers.
        let used = nblocks.min(dst.len() / 16);
        for t in tweaks[..used].iter_mut() {
            wipe(t);
        }
        for b in blocks[..used].iter_mut() {
            wipe(b.as_mut_slice());
        }
        #[cfg(target_arch = "x86_64")]
        super::xts_common::clear_xmm();
    }
}

/// Multiplies a tweak by α in GF(2^128) (little-endian convention of IEEE 1619).
#[inline(always)]
pub(crate) fn mul_alpha(t: [u8; 16]) -> [u8; 16] {
    let v = u128::from_le_bytes(t);
    let carry = (v >> 127) as u8;
    let v = (v << 1) ^ (0x87 * carry as u128);
    v.to_le_bytes()
}
