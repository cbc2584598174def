//! One virtio-blk request: its descriptor chain checked and laid out (header, data, status),
//! then executed against the [`Volume`] with guest memory reached only through `vm-memory`'s
//! checked accessors (`read_slice`/`write_slice`), so a bad address is an error, never a fault.
//!
//! What a guest can get wrong, and what it gets back: a chain that ends early (a loop cut by
//! the queue size, an index past the table, a broken indirect table), a readable descriptor after
//! a writable one, or no writable status byte — nothing can be answered, so the chain is
//! returned used with length 0 (and logged); a header too short, data outside guest memory, a
//! length that is not whole 512-byte sectors, a range past the end, or a write to a read-only
//! export — `VIRTIO_BLK_S_IOERR`; an unknown request type or flag — `VIRTIO_BLK_S_UNSUPP`.
//!
//! Data moves through a bounded per-worker buffer ([`CHUNK`] bytes at a time), so a request of
//! any size allocates nothing beyond it: guest memory is only reachable as volatile memory through
//! `vm-memory`, and decrypting into it directly would need `unsafe` outside the crate's fence.

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::volume::Volume;

/// Bytes moved between guest memory and the volume per step (a multiple of every sector size).
pub(crate) const CHUNK: usize = 1 << 20;
/// The virtio-blk sector: offsets and lengths in requests count 512-byte units.
const SECTOR: u64 = 512;
/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector) and of one discard/write-zeroes
/// segment (sector, num_sectors, flags).
const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;
/// Most segments in one DISCARD or WRITE_ZEROES request (`max_discard_seg`).
pub(crate) const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (1 GiB; `max_discard_sectors`).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

/// What a worker keeps between requests: descriptor lists and the bounce buffer, reused.
#[derive(Default)]
pub(crate) struct Scratch {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    buf: Vec<u8>,
}

/// The answer to one chain: how many bytes were written to guest memory (for the used ring)
/// and the status, if a status byte could be written at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    pub used_len: u32,
    pub status: Option<u8>,
}

/// What the device serves: the volume and the identity a guest reads with GET_ID.
pub(crate) struct Target<'a> {
    pub volume: &'a Volume,
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// A request the device refuses, with the status it answers.
struct Refused(u8);

impl Refused {
    fn ioerr() -> Self {
        Refused(VIRTIO_BLK_S_IOERR as u8)
    }
}

impl Scratch {
    /// Splits `chain` into readable and writable buffers. `Err` names why the chain cannot be
    /// answered at all.
    fn collect<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), &'static str>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.readable.clear();
        self.writable.clear();
        let mut last_has_next = false;
        for d in chain {
            let seg = Seg {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                self.writable.push(seg);
            } else if !self.writable.is_empty() {
                return Err("a device-readable descriptor follows a device-writable one");
            } else {
                self.readable.push(seg);
            }
            last_has_next = d.has_next();
        }
        // The iterator stops early, without saying so, on a loop (more descriptors than the
        // queue holds), an index past the table, an unreadable descriptor or a bad indirect
        // table: the last descriptor it gave then still points onwards.
        if last_has_next {
            return Err(
                "the descriptor chain is cut short (a loop, a bad index or a bad indirect table)",
            );
        }
        match self.writable.last_mut() {
            Some(s) if s.len > 0 => {
                s.len -= 1;
                Ok(())
            }
            _ => Err("the chain has no writable status byte"),
        }
    }

    /// The status byte's address: the last byte of the last writable buffer (`collect` has taken
    /// it off that buffer's length).
    fn status_addr(&self) -> Option<GuestAddress> {
        let s = self.writable.last()?;
        s.addr.checked_add(s.len)
    }
}

/// Total length of `segs`, or `None` past `u64`.
fn total(segs: &[Seg]) -> Option<u64> {
    segs.iter().try_fold(0u64, |t, s| t.checked_add(s.len))
}

/// Whether every byte of `segs` is guest memory.
fn all_mapped<M: GuestMemory>(mem: &M, segs: &[Seg], access: Permissions) -> bool {
    segs.iter()
        .all(|s| usize::try_from(s.len).is_ok_and(|n| n == 0 || mem.check_range(s.addr, n, access)))
}

/// Calls `f(guest address, range in out)` for the bytes `[skip, skip + len)` of `segs`.
fn walk(
    segs: &[Seg],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), Refused>,
) -> Result<(), Refused> {
    let mut pos = 0usize;
    for s in segs {
        if pos == len {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = usize::try_from(s.len - skip).map_or(len - pos, |avail| avail.min(len - pos));
        let addr = s.addr.checked_add(skip).ok_or_else(Refused::ioerr)?;
        f(addr, pos..pos + n)?;
        pos += n;
        skip = 0;
    }
    if pos == len {
        Ok(())
    } else {
        Err(Refused::ioerr())
    }
}

fn gather<M: GuestMemory>(mem: &M, segs: &[Seg], skip: u64, out: &mut [u8]) -> Result<(), Refused> {
    let len = out.len();
    walk(segs, skip, len, |a, r| {
        mem.read_slice(&mut out[r], a).map_err(|_| Refused::ioerr())
    })
}

fn scatter<M: GuestMemory>(mem: &M, segs: &[Seg], skip: u64, data: &[u8]) -> Result<(), Refused> {
    walk(segs, skip, data.len(), |a, r| {
        mem.write_slice(&data[r], a).map_err(|_| Refused::ioerr())
    })
}

/// Handles one chain popped from a queue; never panics on guest input.
pub(crate) fn process<M, G>(
    mem: &G,
    chain: DescriptorChain<M>,
    target: &Target<'_>,
    scratch: &mut Scratch,
) -> Result<Done, &'static str>
where
    M: Deref<Target = G>,
    G: GuestMemory,
{
    scratch.collect(chain)?;
    let status_addr = scratch
        .status_addr()
        .ok_or("the status byte's address overflows")?;
    if !mem.check_range(status_addr, 1, Permissions::Write) {
        return Err("the status byte is outside guest memory");
    }
    let (status, written) = match execute(mem, target, scratch) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(Refused(s)) => (s, 0),
    };
    mem.write_obj(status, status_addr)
        .map_err(|_| "the status byte cannot be written")?;
    Ok(Done {
        used_len: written.saturating_add(1),
        status: Some(status),
    })
}

/// Runs the request laid out in `scratch`; returns the data bytes written to guest memory.
fn execute<G: GuestMemory>(mem: &G, t: &Target<'_>, s: &mut Scratch) -> Result<u32, Refused> {
    let mut hdr = [0u8; HEADER_LEN];
    gather(mem, &s.readable, 0, &mut hdr)?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let vol = t.volume;
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = total(&s.writable).ok_or_else(Refused::ioerr)?;
            let off = data_range(vol, sector, len)?;
            if !all_mapped(mem, &s.writable, Permissions::Write) {
                return Err(Refused::ioerr());
            }
            let buf = bounce(&mut s.buf, len);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                vol.read(off + done, &mut buf[..n])
                    .map_err(|_| Refused::ioerr())?;
                scatter(mem, &s.writable, done, &buf[..n])?;
                done += n as u64;
            }
            // `data_range` capped len below 2^32.
            Ok(len as u32)
        }
        VIRTIO_BLK_T_OUT => {
            writable(vol)?;
            let len = total(&s.readable)
                .and_then(|t| t.checked_sub(HEADER_LEN as u64))
                .ok_or_else(Refused::ioerr)?;
            let off = data_range(vol, sector, len)?;
            // All or nothing: a bad buffer late in the chain must not leave half a write.
            if !all_mapped(mem, &s.readable, Permissions::Read) {
                return Err(Refused::ioerr());
            }
            let buf = bounce(&mut s.buf, len);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                gather(mem, &s.readable, HEADER_LEN as u64 + done, &mut buf[..n])?;
                vol.write(off + done, &mut buf[..n], false)
                    .map_err(|_| Refused::ioerr())?;
                done += n as u64;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !vol.is_read_only() {
                vol.flush().map_err(|_| Refused::ioerr())?;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let room = total(&s.writable).ok_or_else(Refused::ioerr)?;
            let n = room.min(t.serial.len() as u64) as usize;
            scatter(mem, &s.writable, 0, &t.serial[..n])?;
            Ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            writable(vol)?;
            discard_or_zero(mem, vol, s, kind == VIRTIO_BLK_T_DISCARD)?;
            Ok(0)
        }
        _ => Err(Refused(VIRTIO_BLK_S_UNSUPP as u8)),
    }
}

fn writable(vol: &Volume) -> Result<(), Refused> {
    if vol.is_read_only() {
        Err(Refused::ioerr())
    } else {
        Ok(())
    }
}

/// The byte offset of a data transfer of `len` bytes at `sector`, checked: whole sectors, below
/// 4 GiB (a chain cannot be longer), inside the volume.
fn data_range(vol: &Volume, sector: u64, len: u64) -> Result<u64, Refused> {
    if !len.is_multiple_of(SECTOR) || len > u64::from(u32::MAX) {
        return Err(Refused::ioerr());
    }
    let off = sector.checked_mul(SECTOR).ok_or_else(Refused::ioerr)?;
    match off.checked_add(len) {
        Some(end) if end <= vol.size() => Ok(off),
        _ => Err(Refused::ioerr()),
    }
}

/// The reused bounce buffer, at least `min(len, CHUNK)` long.
fn bounce(buf: &mut Vec<u8>, len: u64) -> &mut [u8] {
    let want = len.min(CHUNK as u64) as usize;
    if buf.len() < want {
        buf.resize(want, 0);
    }
    &mut buf[..]
}

fn discard_or_zero<G: GuestMemory>(
    mem: &G,
    vol: &Volume,
    s: &Scratch,
    discard: bool,
) -> Result<(), Refused> {
    let len = total(&s.readable)
        .and_then(|t| t.checked_sub(HEADER_LEN as u64))
        .ok_or_else(Refused::ioerr)?;
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) {
        return Err(Refused::ioerr());
    }
    let count = len / SEGMENT_LEN as u64;
    if count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(Refused::ioerr());
    }
    // Every segment is checked before any is applied.
    let mut ranges = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
    for (i, r) in ranges.iter_mut().enumerate().take(count as usize) {
        let mut seg = [0u8; SEGMENT_LEN];
        gather(
            mem,
            &s.readable,
            (HEADER_LEN + i * SEGMENT_LEN) as u64,
            &mut seg,
        )?;
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // DISCARD defines no flags; WRITE_ZEROES only "unmap".
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
            return Err(Refused(VIRTIO_BLK_S_UNSUPP as u8));
        }
        if num > MAX_DISCARD_SECTORS {
            return Err(Refused::ioerr());
        }
        let bytes = u64::from(num) * SECTOR;
        *r = (data_range(vol, sector, bytes)?, bytes, unmap);
    }
    for &(off, bytes, unmap) in &ranges[..count as usize] {
        let r = if discard {
            vol.trim(off, bytes, false)
        } else {
            vol.write_zeroes(off, bytes, unmap, false)
        };
        r.map_err(|_| Refused::ioerr())?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
