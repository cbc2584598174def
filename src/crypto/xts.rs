//! AES-256-XTS over whole sectors (IEEE 1619), with the dm-crypt `plain64` tweak convention: the
//! tweak of a sector is the little-endian number of its first 512-byte unit, zero-extended to 16
//! bytes. Sectors are 512 or 4096 bytes, so no ciphertext stealing is ever needed.
//!
//! SKELETON: this is the portable path (the `aes` crate, a sector's blocks batched). The AES-NI
//! fast path is still to be written.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};

use super::keys::XtsKey;

/// Bytes in one tweak unit: the tweak counts 512-byte units whatever the sector size.
pub const UNIT: usize = 512;

/// A keyed XTS engine. Cheap to share between threads (`&self` methods, no interior state).
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

impl Xts {
    pub fn new(key: &XtsKey) -> Self {
        Self {
            data: Aes256::new(key.dangerous_k1().into()),
            tweak: Aes256::new(key.dangerous_k2().into()),
        }
    }

    /// Encrypts `data` in place: consecutive sectors of `sector_size` bytes, the first one
    /// starting at 512-byte unit `first_unit`. `data.len()` must be a multiple of `sector_size`.
    pub fn encrypt_sectors(&self, data: &mut [u8], sector_size: usize, first_unit: u64) {
        self.run(data, sector_size, first_unit, true)
    }

    /// Decrypts `data` in place; see [`Xts::encrypt_sectors`].
    pub fn decrypt_sectors(&self, data: &mut [u8], sector_size: usize, first_unit: u64) {
        self.run(data, sector_size, first_unit, false)
    }

    fn run(&self, data: &mut [u8], sector_size: usize, first_unit: u64, enc: bool) {
        assert!(
            sector_size == 512 || sector_size == 4096,
            "XTS sector size must be 512 or 4096"
        );
        assert_eq!(
            data.len() % sector_size,
            0,
            "XTS input must be whole sectors"
        );
        let units_per_sector = (sector_size / UNIT) as u64;
        let nblocks = sector_size / 16;
        // The xor with the tweak on the way in and out doubles as the copy into AES-sized blocks.
        let mut blocks = [Block::default(); 4096 / 16];
        let mut tweaks = [[0u8; 16]; 4096 / 16];
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            let unit = first_unit.wrapping_add(i as u64 * units_per_sector);
            let mut t = Block::default();
            t[..8].copy_from_slice(&unit.to_le_bytes());
            self.tweak.encrypt_block(&mut t);
            let mut t: [u8; 16] = t.into();
            for tw in tweaks[..nblocks].iter_mut() {
                *tw = t;
                t = mul_alpha(t);
            }
            for ((b, c), tw) in blocks.iter_mut().zip(sector.chunks_exact(16)).zip(&tweaks) {
                for k in 0..16 {
                    b[k] = c[k] ^ tw[k];
                }
            }
            if enc {
                self.data.encrypt_blocks(&mut blocks[..nblocks]);
            } else {
                self.data.decrypt_blocks(&mut blocks[..nblocks]);
            }
            for ((b, c), tw) in blocks.iter().zip(sector.chunks_exact_mut(16)).zip(&tweaks) {
                for k in 0..16 {
                    c[k] = b[k] ^ tw[k];
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_xts_mode_crate() {
        use xts_mode::{get_tweak_default, Xts128};
        let key = XtsKey::generate();
        let xts = Xts::new(&key);
        let oracle = Xts128::new(
            Aes256::new(key.dangerous_k1().into()),
            Aes256::new(key.dangerous_k2().into()),
        );
        for &ss in &[512usize, 4096] {
            let mut data: Vec<u8> = (0..ss * 3).map(|i| (i * 7 + 3) as u8).collect();
            let orig = data.clone();
            let first_unit = (1u64 << 33) + 5;
            xts.encrypt_sectors(&mut data, ss, first_unit);
            let mut expect = orig.clone();
            for (i, s) in expect.chunks_exact_mut(ss).enumerate() {
                let unit = first_unit + (i * ss / 512) as u64;
                oracle.encrypt_sector(s, get_tweak_default(unit as u128));
            }
            assert_eq!(data, expect);
            xts.decrypt_sectors(&mut data, ss, first_unit);
            assert_eq!(data, orig);
        }
    }
}
