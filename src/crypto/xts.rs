//! AES-256-XTS over whole sectors (IEEE 1619), with the dm-crypt `plain64` tweak convention: the
//! tweak of a sector is the little-endian number of its first 512-byte unit, zero-extended to 16
//! bytes. Sectors are 512 or 4096 bytes, so no ciphertext stealing is ever needed.
//!
//! Four kernels give identical bytes (see [`Kernel`]): on x86_64 three AES-NI kernels chosen at
//! run time (`xts_vaes512`, 32 blocks in flight with AVX-512 + VAES; `xts_vaes`, 16 blocks with
//! AVX2 + VAES; `xts_ni`, 8 blocks with SSE), and a portable one built on the `aes` crate that
//! runs on any target (`xts_portable`). This file is the one place a kernel is chosen; the
//! kernels and their leaves `xts_common` (key schedules, tweak helpers) and `xts_zmm` (the
//! 512-bit kernel's tweak helpers and CPU model preference) never import it, nor each other.
//! The engine allocates nothing per call and holds no mutable state, so one `Xts` is shared by
//! `&` between threads.

use super::keys::XtsKey;
use super::locked::LockedValue;
use super::xts_portable::Portable;

/// Bytes in one tweak unit: the tweak counts 512-byte units whatever the sector size.
pub const UNIT: usize = 512;

/// The encryption sector sizes the engine accepts.
pub const SECTOR_SIZES: [usize; 2] = [512, 4096];

/// The implementation an [`Xts`] engine runs on. All give identical bytes.
///
/// Measured on the development machine (AMD EPYC, Zen 5, KVM guest, ≈3.5 GHz; one core, 1 MiB
/// calls, `XTS_SPEED=1 cargo bench --bench xts`, three runs on a loaded machine, 2026-12-02),
/// beside OpenSSL 3.0's `openssl speed -evp aes-256-xts` at 6.0–7.1 GB/s (4096 B) and
/// 4.8–5.1 GB/s (512 B): `AesNiVaes512` 21.5–26 and 15–19 GB/s (≈3.6×; ≈0.14 cycles/byte at
/// 4096 B, against ≈0.115 for the bare `vaesenc` throughput of two per cycle), `AesNiVaes`
/// 12–14 and 9–10.5 GB/s (≈2×), `AesNi` ≈6–7 GB/s (≈1×), `Portable` ≈3.5 GB/s (≈0.55×). Zen 5
/// runs two 512-bit AES operations per cycle, hence `AesNiVaes512` first; see
/// [`Kernel::available`] for the CPUs where it is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AES-NI with AVX-512 + VAES: four blocks per instruction, 32 in flight (x86_64).
    AesNiVaes512,
    /// AES-NI with AVX2 + VAES: two blocks per instruction, 16 in flight (x86_64).
    AesNiVaes,
    /// AES-NI with SSE: 8 blocks in flight (x86_64).
    AesNi,
    /// The `aes` crate: any target.
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first (where the CPU runs them all at full rate; see
    /// [`Kernel::available`] for the order on this one).
    pub const ALL: [Kernel; 4] = [
        Kernel::AesNiVaes512,
        Kernel::AesNiVaes,
        Kernel::AesNi,
        Kernel::Portable,
    ];

    /// A short name for logs and benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::AesNiVaes512 => "aes-ni-vaes512",
            Kernel::AesNiVaes => "aes-ni-vaes",
            Kernel::AesNi => "aes-ni",
            Kernel::Portable => "portable",
        }
    }

    /// Whether this CPU (and target) can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::AesNiVaes512 => super::xts_vaes512::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AesNiVaes => super::xts_vaes::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AesNi => super::xts_ni::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::AesNiVaes512 | Kernel::AesNiVaes | Kernel::AesNi => false,
            Kernel::Portable => true,
        }
    }

    /// The kernels this CPU can run, fastest first (the portable one is always there): the
    /// order of [`Kernel::ALL`], except that the 512-bit kernel goes after the 256-bit one on the
    /// CPUs where 512-bit instructions lower the clock (early AVX-512 Intel models).
    pub fn available() -> Vec<Kernel> {
        let mut kernels: Vec<Kernel> = Self::ALL.into_iter().filter(|k| k.is_available()).collect();
        #[cfg(target_arch = "x86_64")]
        if kernels.starts_with(&[Kernel::AesNiVaes512, Kernel::AesNiVaes])
            && !super::xts_zmm::zmm_preferred()
        {
            kernels.swap(0, 1);
        }
        kernels
    }
}

/// A keyed XTS engine. Cheap to share between threads (`&self` methods, no interior state).
/// Its key schedules are zeroized when it is dropped.
pub struct Xts {
    engine: Engine,
}

/// The kernel an engine runs, with its keys.
enum Engine {
    #[cfg(target_arch = "x86_64")]
    AesNiVaes512(Box<super::xts_common::AesKeys>),
    #[cfg(target_arch = "x86_64")]
    AesNiVaes(Box<super::xts_common::AesKeys>),
    #[cfg(target_arch = "x86_64")]
    AesNi(Box<super::xts_common::AesKeys>),
    // On locked, non-dumpable pages, like the AES-NI schedules; moving an `Xts` moves a pointer.
    Portable(LockedValue<Portable>),
}

// `Xts` is handed to many connection tasks by reference; keep that a compile-time fact.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Xts>();
};

impl std::fmt::Debug for Xts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Xts({}, <key redacted>)", self.kernel().name())
    }
}

impl Xts {
    /// An engine for `key` on the fastest kernel this CPU can run (an AES-NI one when the CPU
    /// has AES-NI, else portable): the first of [`Kernel::available`].
    pub fn new(key: &XtsKey) -> Self {
        Kernel::available()
            .into_iter()
            .find_map(|k| Self::with_kernel(key, k))
            .unwrap_or_else(|| Self::new_portable(key))
    }

    /// An engine for `key` on `kernel`, or `None` when this CPU cannot run it. For tests and
    /// benchmarks that must exercise one kernel specifically.
    pub fn with_kernel(key: &XtsKey, kernel: Kernel) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use super::xts_common::AesKeys;
            if kernel == Kernel::Portable {
                return Some(Self::new_portable(key));
            }
            if !kernel.is_available() {
                return None;
            }
            let keys = AesKeys::new(key.dangerous_k1(), key.dangerous_k2())?;
            let engine = match kernel {
                Kernel::AesNiVaes512 => Engine::AesNiVaes512(keys),
                Kernel::AesNiVaes => Engine::AesNiVaes(keys),
                _ => Engine::AesNi(keys),
            };
            Some(Self { engine })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (kernel == Kernel::Portable).then(|| Self::new_portable(key))
        }
    }

    /// An engine for `key` on the portable path, whatever the CPU (for tests and benchmarks).
    pub fn new_portable(key: &XtsKey) -> Self {
        Self {
            engine: Engine::Portable(LockedValue::new_with(|| Portable::new(key))),
        }
    }

    /// An engine for `key` on the fastest AES-NI kernel, or `None` when this CPU (or target)
    /// has no AES-NI.
    pub fn new_aesni(key: &XtsKey) -> Option<Self> {
        Kernel::available()
            .into_iter()
            .filter(|&k| k != Kernel::Portable)
            .find_map(|k| Self::with_kernel(key, k))
    }

    /// `"aes-ni"` (either AES-NI kernel) or `"portable"`: which backend this engine runs on.
    pub fn backend_name(&self) -> &'static str {
        match self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes512(_) | Engine::AesNiVaes(_) | Engine::AesNi(_) => "aes-ni",
            Engine::Portable(_) => "portable",
        }
    }

    /// The exact kernel this engine runs on.
    pub fn kernel(&self) -> Kernel {
        match &self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes512(_) => Kernel::AesNiVaes512,
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes(_) => Kernel::AesNiVaes,
            #[cfg(target_arch = "x86_64")]
            Engine::AesNi(_) => Kernel::AesNi,
            Engine::Portable(_) => Kernel::Portable,
        }
    }

    /// Encrypts `data` in place: consecutive sectors of `sector_size` bytes, the first one
    /// starting at 512-byte unit `first_unit`; sector `i` uses tweak
    /// `first_unit + i * sector_size / 512` (wrapping modulo 2^64, as dm-crypt's `plain64`).
    ///
    /// # Panics
    /// On programmer error only: `sector_size` not 512 or 4096, or `data.len()` not a multiple
    /// of `sector_size`.
    pub fn encrypt_sectors(&self, data: &mut [u8], sector_size: usize, first_unit: u64) {
        check(data.len(), sector_size);
        self.run::<true>(None, data, sector_size, first_unit)
    }

    /// Decrypts `data` in place; see [`Xts::encrypt_sectors`] (same tweaks, same panics).
    pub fn decrypt_sectors(&self, data: &mut [u8], sector_size: usize, first_unit: u64) {
        check(data.len(), sector_size);
        self.run::<false>(None, data, sector_size, first_unit)
    }

    /// Encrypts `src` into `dst`; see [`Xts::encrypt_sectors`].
    ///
    /// # Panics
    /// As [`Xts::encrypt_sectors`], and when `src` and `dst` differ in length.
    pub fn encrypt_sectors_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
    ) {
        assert_eq!(
            src.len(),
            dst.len(),
            "XTS source and destination lengths differ"
        );
        check(src.len(), sector_size);
        self.run::<true>(Some(src), dst, sector_size, first_unit)
    }

    /// Decrypts `src` into `dst`; see [`Xts::encrypt_sectors_to`] (same panics).
    pub fn decrypt_sectors_to(
        &self,
        src: &[u8],
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
    ) {
        assert_eq!(
            src.len(),
            dst.len(),
            "XTS source and destination lengths differ"
        );
        check(src.len(), sector_size);
        self.run::<false>(Some(src), dst, sector_size, first_unit)
    }

    /// Decrypts `data` in place as [`Xts::decrypt_sectors`] does, and reports which sectors had
    /// an all-zero 16-byte ciphertext block: bit `i % 64` of `zero[i / 64]` is set for sector
    /// `i` (the first `sectors.div_ceil(64)` words are overwritten; the rest are left alone).
    /// The test is made on the very value each block was decrypted from (loaded once), so it
    /// replaces a scan of the ciphertext before decrypting (see `volume::mapped`). Every sector
    /// is decrypted, flagged or not, so re-encrypting a flagged sector gives its ciphertext back
    /// (XTS is a permutation of each sector). Returns whether any sector was flagged.
    ///
    /// # Panics
    /// As [`Xts::decrypt_sectors`], and when `zero` has fewer than `sectors.div_ceil(64)` words.
    pub fn decrypt_sectors_flagging(
        &self,
        data: &mut [u8],
        sector_size: usize,
        first_unit: u64,
        zero: &mut [u64],
    ) -> bool {
        check(data.len(), sector_size);
        let words = clear_flags(data.len() / sector_size, zero);
        self.run_flagging(None, data, sector_size, first_unit, words);
        words.iter().any(|&w| w != 0)
    }

    /// Decrypts `src` into `dst` and flags sectors with an all-zero ciphertext block, as
    /// [`Xts::decrypt_sectors_flagging`]; `src` may change while it is read (a mapping of a file
    /// being written): each block is loaded once, and its flag and plaintext come from that one
    /// load. The contents of `dst` for a flagged sector are unspecified.
    ///
    /// # Panics
    /// As [`Xts::decrypt_sectors_to`], and when `zero` is too short (see above).
    pub fn decrypt_sectors_to_flagging(
        &self,
        src: &[u8],
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
        zero: &mut [u64],
    ) -> bool {
        assert_eq!(
            src.len(),
            dst.len(),
            "XTS source and destination lengths differ"
        );
        check(src.len(), sector_size);
        let words = clear_flags(src.len() / sector_size, zero);
        self.run_flagging(Some(src), dst, sector_size, first_unit, words);
        words.iter().any(|&w| w != 0)
    }

    /// The flagging decryption on this engine's kernel: `zero` holds exactly the words for the
    /// sectors of `dst`, cleared. Lengths are already checked.
    // Calling the AES-NI kernels (`unsafe fn`s: CPU features and pointer contract).
    #[allow(unsafe_code)]
    fn run_flagging(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
        zero: &mut [u64],
    ) {
        #[cfg(target_arch = "x86_64")]
        let (len, d) = (dst.len(), dst.as_mut_ptr());
        #[cfg(target_arch = "x86_64")]
        let s = src.map_or(d.cast_const(), <[u8]>::as_ptr);
        match &self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes512(keys) => {
                // SAFETY: as in `run`; `zero` has a bit for every sector (`clear_flags`).
                unsafe {
                    super::xts_vaes512::decrypt_sectors_flagging(
                        &keys.dec1,
                        &keys.enc2,
                        s,
                        d,
                        len,
                        sector_size,
                        first_unit,
                        zero,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes(keys) => {
                // SAFETY: as in `run`; `zero` has a bit for every sector (`clear_flags`).
                unsafe {
                    super::xts_vaes::decrypt_sectors_flagging(
                        &keys.dec1,
                        &keys.enc2,
                        s,
                        d,
                        len,
                        sector_size,
                        first_unit,
                        zero,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Engine::AesNi(keys) => {
                // SAFETY: as in `run`; `zero` has a bit for every sector (`clear_flags`).
                unsafe {
                    super::xts_ni::decrypt_sectors_flagging(
                        keys,
                        s,
                        d,
                        len,
                        sector_size,
                        first_unit,
                        zero,
                    )
                }
            }
            Engine::Portable(p) => p.crypt::<false>(src, dst, sector_size, first_unit, Some(zero)),
        }
    }

    /// `src: None` means in place (read from `dst`). Lengths are already checked.
    // Calling the AES-NI kernels (`unsafe fn`s: CPU features and pointer contract).
    #[allow(unsafe_code)]
    fn run<const ENC: bool>(
        &self,
        src: Option<&[u8]>,
        dst: &mut [u8],
        sector_size: usize,
        first_unit: u64,
    ) {
        let (len, d) = (dst.len(), dst.as_mut_ptr());
        let s = src.map_or(d.cast_const(), <[u8]>::as_ptr);
        // SAFETY: `s` and `d` are valid for `len` bytes (`check` and the length assert ran);
        // they are equal (in place) or disjoint (a `&[u8]` and a `&mut [u8]` cannot overlap);
        // `len` is a multiple of `sector_size`, itself 512 or 4096.
        if unsafe { self.run_kernel::<ENC>(s, d, len, sector_size, first_unit) } {
            return;
        }
        if let Engine::Portable(p) = &self.engine {
            p.run::<ENC>(src, dst, sector_size, first_unit);
        }
    }

    /// Runs this engine's AES-NI kernel over raw pointers; `false` (nothing done) for the
    /// portable engine, which the caller runs on slices.
    ///
    /// # Safety
    /// `s` must be valid for reads and `d` for writes of `len` bytes, equal or disjoint; `len` a
    /// multiple of `sector_size`, itself 512 or 4096. `d` may be memory other threads store to
    /// meanwhile (a shared mapping): the kernels store to it only from their asm and read it only
    /// when `s == d`.
    #[allow(unsafe_code)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    unsafe fn run_kernel<const ENC: bool>(
        &self,
        s: *const u8,
        d: *mut u8,
        len: usize,
        sector_size: usize,
        first_unit: u64,
    ) -> bool {
        match &self.engine {
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes512(keys) => {
                // SAFETY: our contract; the engine exists only if this kernel's `available()`
                // said yes at construction; 512 and 4096 are multiples of its 512-byte group.
                unsafe {
                    super::xts_vaes512::crypt_sectors::<ENC>(
                        keys.data::<ENC>(),
                        &keys.enc2,
                        s,
                        d,
                        len,
                        sector_size,
                        first_unit,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Engine::AesNiVaes(keys) => {
                // SAFETY: as for `AesNiVaes512`, with this kernel's 256-byte group.
                unsafe {
                    super::xts_vaes::crypt_sectors::<ENC>(
                        keys.data::<ENC>(),
                        &keys.enc2,
                        s,
                        d,
                        len,
                        sector_size,
                        first_unit,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Engine::AesNi(keys) => {
                // SAFETY: as for `AesNiVaes512`, with this kernel's 128-byte group.
                unsafe {
                    super::xts_ni::crypt_sectors::<ENC>(keys, s, d, len, sector_size, first_unit)
                }
            }
            Engine::Portable(_) => return false,
        }
        true
    }

    /// Encrypts `src` into `dst`, memory shared with other threads and with the kernel (a
    /// writable file mapping, see `backend::mapped`): other writers may store the same bytes at
    /// the same time, and what lands is then any mix of theirs and ours, byte by byte. Same
    /// tweaks as [`Xts::encrypt_sectors`]. Every byte of `dst` is stored once; none is read.
    ///
    /// Why `&[AtomicU8]`: a `&mut [u8]` would promise no one else touches the bytes, and plain
    /// stores racing with other threads' stores are undefined. The AES-NI kernels store only
    /// from inside their inline assembly (vector stores, which x86 performs byte-wise atomically
    /// at least); the portable engine encrypts one sector into a stack buffer and stores it with
    /// relaxed atomic byte stores.
    ///
    /// # Panics
    /// As [`Xts::encrypt_sectors_to`], and when `src` and `dst` overlap.
    // Calling the AES-NI kernels with a destination that is not a `&mut [u8]`.
    #[allow(unsafe_code)]
    pub fn encrypt_sectors_to_shared(
        &self,
        src: &[u8],
        dst: &[std::sync::atomic::AtomicU8],
        sector_size: usize,
        first_unit: u64,
    ) {
        assert_eq!(
            src.len(),
            dst.len(),
            "XTS source and destination lengths differ"
        );
        check(src.len(), sector_size);
        let (s, len) = (src.as_ptr(), src.len());
        // `AtomicU8` is an `UnsafeCell<u8>`: a pointer derived from a shared slice of them may
        // be written through, for the whole slice.
        let d = dst.as_ptr().cast::<u8>().cast_mut();
        assert!(
            len == 0 || (s as usize + len <= d as usize || d as usize + len <= s as usize),
            "XTS shared destination overlaps the source"
        );
        // SAFETY: `s` is valid for reads and `d` for writes of `len` bytes (the slices' lengths,
        // checked equal), they are disjoint (asserted), `len` is a multiple of `sector_size`
        // (512 or 4096, `check`). `d`'s bytes may be stored by other threads meanwhile, which
        // `run_kernel` allows: it neither reads them nor keeps them, it only stores, from asm.
        if unsafe { self.run_kernel::<true>(s, d, len, sector_size, first_unit) } {
            return;
        }
        if let Engine::Portable(p) = &self.engine {
            p.encrypt_to_shared(src, dst, sector_size, first_unit);
        }
    }
}

fn check(len: usize, sector_size: usize) {
    assert!(
        SECTOR_SIZES.contains(&sector_size),
        "XTS sector size must be 512 or 4096, got {sector_size}"
    );
    assert_eq!(
        len % sector_size,
        0,
        "XTS input must be whole sectors ({len} bytes is not a multiple of {sector_size})"
    );
}

/// The flag words for `sectors` sectors, taken from the front of `zero` and cleared.
fn clear_flags(sectors: usize, zero: &mut [u64]) -> &mut [u64] {
    let words = sectors.div_ceil(64);
    assert!(
        zero.len() >= words,
        "XTS zero flags: {} words for {sectors} sectors",
        zero.len()
    );
    let words = &mut zero[..words];
    words.fill(0);
    words
}

#[cfg(test)]
#[path = "xts_tests.rs"]
mod tests;
