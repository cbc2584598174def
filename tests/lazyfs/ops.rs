//! The FUSE requests of [`LazyFs`](super::LazyFs): each locks the state, does its work on the
//! "now" versions (only `fsync`/`fsyncdir` touch the durable ones) and replies.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use fuser::{
    FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

use super::{Data, Kind, LazyFs, BLOCK, FOPEN_DIRECT_IO, TTL};

/// The FUSE side: every call locks the state, does its work and replies.
pub(super) struct Handler(pub(super) LazyFs);

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for Handler {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut g = self.0.lock();
        let ino = match g.dir(parent) {
            Ok(d) => d.get(name).copied(),
            Err(e) => return reply.error(e),
        };
        match ino.and_then(|i| g.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.0.lock().attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut g = self.0.lock();
        if let Some(len) = size {
            match g.file(ino) {
                Ok(d) => d.set_len(len),
                Err(e) => return reply.error(e),
            }
        }
        let Some(n) = g.nodes.get_mut(&ino) else {
            return reply.error(libc::ENOENT);
        };
        if let Some(m) = mode {
            n.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(gi) = gid {
            n.gid = gi;
        }
        if let Some(t) = mtime {
            n.mtime = time(t);
        }
        match g.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut g = self.0.lock();
        let kind = Kind::Dir {
            now: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        match g.add(parent, name, kind, req, mode & !umask) {
            Ok(ino) => reply.entry(&TTL, &g.attr(ino).expect("just added"), 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut g = self.0.lock();
        let kind = Kind::File {
            now: Data::default(),
            durable: Data::default(),
        };
        match g.add(parent, name, kind, req, mode & !umask) {
            Ok(ino) => reply.created(
                &TTL,
                &g.attr(ino).expect("just added"),
                0,
                0,
                FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut g = self.0.lock();
        if !matches!(g.nodes.get(&ino).map(|n| &n.kind), Some(Kind::File { .. })) {
            return reply.error(libc::EPERM);
        }
        match g.dir(newparent) {
            Ok(d) if d.contains_key(newname) => return reply.error(libc::EEXIST),
            Ok(d) => {
                d.insert(newname.to_owned(), ino);
            }
            Err(e) => return reply.error(e),
        }
        reply.entry(&TTL, &g.attr(ino).expect("linked"), 0)
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut g = self.0.lock();
        match g.dir(parent) {
            Ok(d) => match d.remove(name) {
                Some(_) => reply.ok(),
                None => reply.error(libc::ENOENT),
            },
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut g = self.0.lock();
        let ino = match g.dir(parent) {
            Ok(d) => d.get(name).copied(),
            Err(e) => return reply.error(e),
        };
        match ino {
            None => reply.error(libc::ENOENT),
            Some(i) if !g.is_empty_dir(i) => reply.error(libc::ENOTEMPTY),
            Some(_) => {
                let _ = g.dir(parent).map(|d| d.remove(name));
                reply.ok()
            }
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut g = self.0.lock();
        let ino = match g.dir(parent) {
            Ok(d) => d.get(name).copied(),
            Err(e) => return reply.error(e),
        };
        let Some(ino) = ino else {
            return reply.error(libc::ENOENT);
        };
        let target = match g.dir(newparent) {
            Ok(d) => d.get(newname).copied(),
            Err(e) => return reply.error(e),
        };
        if let Some(t) = target {
            if matches!(g.nodes.get(&t).map(|n| &n.kind), Some(Kind::Dir { .. }))
                && !g.is_empty_dir(t)
            {
                return reply.error(libc::ENOTEMPTY);
            }
        }
        let _ = g.dir(parent).map(|d| d.remove(name));
        let _ = g.dir(newparent).map(|d| d.insert(newname.to_owned(), ino));
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut g = self.0.lock();
        match g.file(ino) {
            Ok(d) => {
                if flags & libc::O_TRUNC != 0 {
                    d.set_len(0);
                }
                reply.opened(0, FOPEN_DIRECT_IO)
            }
            Err(libc::EISDIR) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut g = self.0.lock();
        let (start, end) = (offset.max(0) as u64, offset.max(0) as u64 + size as u64);
        if g.bad_reads.iter().any(|&(s, e)| start < e && s < end) {
            g.eio_reads += 1;
            return reply.error(libc::EIO);
        }
        match g.file(ino) {
            Ok(d) => reply.data(&d.read(start, size as u64)),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut g = self.0.lock();
        match g.file(ino) {
            Ok(d) => {
                d.write(offset.max(0) as u64, data);
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut g = self.0.lock();
        g.stats.fsyncs += 1;
        match g.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File { now, durable }) => *durable = now.clone(),
            Some(Kind::Dir { now, durable }) => *durable = now.clone(),
            None => return reply.error(libc::ENOENT),
        }
        reply.ok()
    }

    fn fsyncdir(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        fh: u64,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync(req, ino, fh, datasync, reply)
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.0.lock().dir(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let g = &mut *self.0.lock();
        let entries: Vec<(u64, FileType, OsString)> = match g.dir(ino) {
            Ok(d) => d
                .iter()
                .map(|(n, i)| (*i, FileType::RegularFile, n.clone()))
                .collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino, FileType::Directory, ".".into()),
            (ino, FileType::Directory, "..".into()),
        ];
        for (i, _, n) in entries {
            let kind = match g.nodes.get(&i).map(|n| &n.kind) {
                Some(Kind::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((i, kind, n));
        }
        for (k, (i, kind, n)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(i, k as i64 + 1, kind, n) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(
            1 << 22,
            1 << 21,
            1 << 21,
            1 << 20,
            1 << 19,
            BLOCK as u32,
            255,
            BLOCK as u32,
        )
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut g = self.0.lock();
        let d = match g.file(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let (off, len) = (offset.max(0) as u64, length.max(0) as u64);
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            let end = (off + len).min(d.size);
            if end > off {
                d.zero(off, end - off);
            }
        } else if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && off + len > d.size {
            d.size = off + len;
        }
        reply.ok()
    }

    fn lseek(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let mut g = self.0.lock();
        let d = match g.file(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let off = offset.max(0) as u64;
        if off >= d.size {
            return reply.error(libc::ENXIO);
        }
        let first_block = off / BLOCK;
        let found = match whence {
            libc::SEEK_DATA => d
                .blocks
                .range(first_block..)
                .next()
                .map(|(b, _)| (b * BLOCK).max(off)),
            libc::SEEK_HOLE => {
                let mut b = first_block;
                while d.blocks.contains_key(&b) {
                    b += 1;
                }
                Some((b * BLOCK).max(off).min(d.size))
            }
            _ => return reply.error(libc::EINVAL),
        };
        match found {
            Some(o) if o < d.size || whence == libc::SEEK_HOLE => reply.offset(o as i64),
            _ => reply.error(libc::ENXIO),
        }
    }
}
