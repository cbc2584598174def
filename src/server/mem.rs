//! An in-memory export and provider: the model the server is tested against, and a reference for
//! what an [`Export`] must do (sector-granular allocation, holes that read as zeroes, trim,
//! write-zeroes, block status). Not encrypted; not for production data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::export::{
    AttachError, Export, ExportError, ExportInfo, ExportProvider, Extent, ReadOutcome,
};
use crate::nbd::EIO;

struct Inner {
    data: Vec<u8>,
    /// One flag per sector: written since creation or the last trim.
    allocated: Vec<bool>,
}

/// A RAM disk with the [`Export`] semantics of an encrypted volume.
pub struct MemExport {
    name: String,
    description: String,
    sector_size: u32,
    read_only: bool,
    inner: RwLock<Inner>,
    flushes: AtomicU64,
    /// Reads at exactly this offset sleep `slow_ms` first (tests of out-of-order replies and of
    /// shutdown with requests in flight). `u64::MAX` = none.
    slow_offset: AtomicU64,
    slow_ms: AtomicU64,
}

impl MemExport {
    /// A zeroed, unallocated export. `size` is rounded down to a whole sector.
    pub fn new(name: &str, size: u64, sector_size: u32) -> Self {
        let sector = u64::from(sector_size.max(1));
        let size = size - size % sector;
        Self {
            name: name.to_string(),
            description: format!("in-memory export {name}"),
            sector_size,
            read_only: false,
            inner: RwLock::new(Inner {
                data: vec![0; size as usize],
                allocated: vec![false; (size / sector) as usize],
            }),
            flushes: AtomicU64::new(0),
            slow_offset: AtomicU64::new(u64::MAX),
            slow_ms: AtomicU64::new(0),
        }
    }

    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    pub fn with_description(mut self, d: &str) -> Self {
        self.description = d.to_string();
        self
    }

    /// Makes reads at `offset` take `delay`.
    pub fn set_slow_read(&self, offset: u64, delay: Duration) {
        self.slow_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.slow_offset.store(offset, Ordering::SeqCst);
    }

    /// How many times [`Export::flush`] ran.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// A copy of `len` bytes at `offset` (tests).
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let start = (offset as usize).min(g.data.len());
        let end = start.saturating_add(len).min(g.data.len());
        g.data[start..end].to_vec()
    }

    fn range(&self, offset: u64, len: u64, size: usize) -> Result<(usize, usize), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= size as u64 => Ok((offset as usize, end as usize)),
            _ => Err(ExportError::new(
                crate::nbd::EINVAL,
                format!(
                    "range {offset}+{len} is beyond the end of export {}",
                    self.name
                ),
            )),
        }
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> Result<(), ExportError> {
        let mut g = self.inner.write().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, len, g.data.len())?;
        g.data[s..e].fill(0);
        let ss = self.sector_size as usize;
        for sec in s / ss..e.div_ceil(ss) {
            let whole = sec * ss >= s && (sec + 1) * ss <= e;
            if punch && whole {
                g.allocated[sec] = false;
            } else if !punch {
                g.allocated[sec] = true;
            }
        }
        Ok(())
    }
}

fn poisoned() -> ExportError {
    ExportError::new(EIO, "in-memory export lock poisoned by a panic")
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> String {
        self.description.clone()
    }
    fn size(&self) -> u64 {
        self.inner.read().map(|g| g.data.len() as u64).unwrap_or(0)
    }
    fn sector_size(&self) -> u32 {
        self.sector_size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadOutcome, ExportError> {
        if offset == self.slow_offset.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(self.slow_ms.load(Ordering::SeqCst)));
        }
        let g = self.inner.read().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, buf.len() as u64, g.data.len())?;
        buf.copy_from_slice(&g.data[s..e]);
        let ss = self.sector_size as usize;
        let all_zero = (s / ss..e.div_ceil(ss)).all(|sec| !g.allocated[sec]);
        Ok(ReadOutcome { all_zero })
    }

    /// Every read is "cached" except the slow one set with [`MemExport::set_slow_read`].
    fn try_read_cached(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<ReadOutcome, ExportError>> {
        if offset == self.slow_offset.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.read(offset, buf))
    }

    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> Result<(), ExportError> {
        let mut g = self.inner.write().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, data.len() as u64, g.data.len())?;
        g.data[s..e].copy_from_slice(data);
        let ss = self.sector_size as usize;
        for sec in s / ss..e.div_ceil(ss) {
            g.allocated[sec] = true;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        _fua: bool,
    ) -> Result<(), ExportError> {
        self.zero_range(offset, len, may_punch)
    }

    fn zeroing_is_fast(&self, may_punch: bool) -> bool {
        may_punch
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let g = self.inner.read().map_err(|_| poisoned())?;
        self.range(offset, len, g.data.len()).map(|_| ())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let g = self.inner.read().map_err(|_| poisoned())?;
        let (s, e) = self.range(offset, len, g.data.len())?;
        let ss = self.sector_size as usize;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = s;
        while pos < e {
            let sec = pos / ss;
            let end = ((sec + 1) * ss).min(e);
            let hole = !g.allocated[sec];
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += (end - pos) as u64,
                _ => out.push(Extent {
                    length: (end - pos) as u64,
                    hole,
                    zero: hole,
                }),
            }
            pos = end;
        }
        Ok(out)
    }
}

enum Entry {
    Ready(Arc<MemExport>),
    Refused { description: String, reason: String },
}

/// Serves a fixed list of [`MemExport`]s, plus names whose attach is refused with a reason (to
/// test how refusals reach clients).
#[derive(Default)]
pub struct MemProvider {
    entries: Vec<(String, Entry)>,
}

impl MemProvider {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_export(mut self, e: Arc<MemExport>) -> Self {
        self.entries.push((e.name.clone(), Entry::Ready(e)));
        self
    }

    pub fn with_refused(mut self, name: &str, reason: &str) -> Self {
        self.entries.push((
            name.to_string(),
            Entry::Refused {
                description: format!("export {name} (cannot be attached)"),
                reason: reason.to_string(),
            },
        ));
        self
    }
}

impl ExportProvider for MemProvider {
    fn list(&self) -> Vec<ExportInfo> {
        self.entries
            .iter()
            .map(|(name, e)| ExportInfo {
                name: name.clone(),
                description: match e {
                    Entry::Ready(x) => x.description.clone(),
                    Entry::Refused { description, .. } => description.clone(),
                },
            })
            .collect()
    }

    fn attach(&self, name: &str) -> Result<Arc<dyn Export>, AttachError> {
        match self.entries.iter().find(|(n, _)| n == name) {
            Some((_, Entry::Ready(e))) => Ok(e.clone()),
            Some((_, Entry::Refused { reason, .. })) => Err(AttachError::Refused {
                name: name.to_string(),
                reason: reason.clone(),
            }),
            None => Err(AttachError::NotFound(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_writes_trim_and_status() {
        let m = MemExport::new("m", 16 * 4096, 4096);
        let mut buf = vec![1u8; 4096];
        assert!(m.read(0, &mut buf).unwrap().all_zero);
        assert!(buf.iter().all(|b| *b == 0));
        let mut d = vec![7u8; 100];
        m.write(4096 + 10, &mut d, false).unwrap();
        let st = m.block_status(0, 3 * 4096).unwrap();
        assert_eq!(
            st,
            vec![
                Extent {
                    length: 4096,
                    hole: true,
                    zero: true
                },
                Extent {
                    length: 4096,
                    hole: false,
                    zero: false
                },
                Extent {
                    length: 4096,
                    hole: true,
                    zero: true
                },
            ]
        );
        assert!(!m.read(4096, &mut buf).unwrap().all_zero);
        m.trim(4096, 4096, false).unwrap();
        assert!(m.read(4096, &mut buf).unwrap().all_zero);
        m.write_zeroes(0, 4096, false, false).unwrap();
        assert!(!m.block_status(0, 4096).unwrap()[0].hole);
        assert!(m.read(16 * 4096, &mut buf).is_err());
    }
}
