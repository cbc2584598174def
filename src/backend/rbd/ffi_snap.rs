//! librbd's snapshot, clone and flatten calls behind a safe API (a child of `ffi`, sharing its
//! bindings and handles): opening an image at a snapshot, creating, listing and removing
//! snapshots, the clones (children) of a snapshot, an image's parent, clone v2 and flatten.
//! Every `unsafe` block here has a SAFETY note, as in `ffi`.

use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::ptr;
use std::sync::Arc;

use super::{check, cstring, sys, Image, IoCtx, IMAGE_FEATURES, IMAGE_OPTION_FEATURES};

/// `RBD_IMAGE_OPTION_CLONE_FORMAT` from librbd.h's option enum.
const IMAGE_OPTION_CLONE_FORMAT: c_int = 12;
/// `RBD_SNAP_NAMESPACE_TYPE_USER` / `_TRASH` from librbd.h.
const NAMESPACE_USER: sys::rbd_snap_namespace_type_t = 0;
const NAMESPACE_TRASH: sys::rbd_snap_namespace_type_t = 2;
/// Most snapshots or children listed (a guard against a misbehaving size hint).
const MAX_LISTED: usize = 1 << 16;

/// A user snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    /// The image size when the snapshot was taken.
    pub size: u64,
    pub name: String,
}

/// An image linked to another (a clone of a snapshot), as librbd names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedImage {
    pub pool: String,
    pub image: String,
    /// The image was moved to RBD's trash (it still holds its parent).
    pub trash: bool,
}

/// The snapshot a clone reads its unwritten data from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    pub pool: String,
    pub image: String,
    pub snapshot: String,
    /// The parent snapshot was removed while clones still needed it: librbd keeps it in its
    /// trash namespace until the last clone is flattened or removed.
    pub snapshot_in_trash: bool,
}

/// A C string librbd owns, copied out (null reads as empty).
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn owned(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: per the function's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl IoCtx {
    /// Opens image `name` read-only at snapshot `snap` (no lock: a snapshot never changes).
    pub fn open_snapshot(self: &Arc<Self>, name: &str, snap: &str) -> io::Result<Image> {
        let n = cstring("the image name", name)?;
        let s = cstring("the snapshot name", snap)?;
        let mut handle: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: valid context, NUL-terminated names, valid out-pointer.
        let rc =
            unsafe { sys::rbd_open_read_only(self.handle, n.as_ptr(), &mut handle, s.as_ptr()) };
        check(rc as i64)?;
        Ok(Image {
            handle,
            _io: Arc::clone(self),
        })
    }

    /// Clones snapshot `snap` of image `parent` (in this pool) as image `child` in `child_io`'s
    /// pool: clone format 2 (no protected snapshot needed), with [`IMAGE_FEATURES`].
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child_io: &IoCtx,
        child: &str,
    ) -> io::Result<()> {
        let p = cstring("the image name", parent)?;
        let s = cstring("the snapshot name", snap)?;
        let c = cstring("the image name", child)?;
        let mut opts: sys::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer; destroyed below on every path.
        unsafe { sys::rbd_image_options_create(&mut opts) };
        // SAFETY: opts was just created; both option ids are ones librbd defines.
        let mut rc = unsafe {
            sys::rbd_image_options_set_uint64(opts, IMAGE_OPTION_FEATURES, IMAGE_FEATURES)
        };
        if rc == 0 {
            // SAFETY: as above.
            rc = unsafe { sys::rbd_image_options_set_uint64(opts, IMAGE_OPTION_CLONE_FORMAT, 2) };
        }
        if rc == 0 {
            // SAFETY: valid contexts, NUL-terminated names, live options.
            rc = unsafe {
                sys::rbd_clone3(
                    self.handle,
                    p.as_ptr(),
                    s.as_ptr(),
                    child_io.handle,
                    c.as_ptr(),
                    opts,
                )
            };
        }
        // SAFETY: created above, not used afterwards.
        unsafe { sys::rbd_image_options_destroy(opts) };
        check(rc as i64).map(|_| ())
    }
}

/// Progress callback state for [`Image::flatten`].
struct Progress<'a>(&'a mut dyn FnMut(u64, u64));

unsafe extern "C" fn on_progress(done: u64, total: u64, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&mut Progress` passed to the synchronous flatten call below.
    let p = unsafe { &mut *(arg as *mut Progress<'_>) };
    (p.0)(done, total);
    0
}

impl Image {
    /// Takes snapshot `snap` of the image (librbd flushes and blocks writes meanwhile).
    pub fn snap_create(&self, snap: &str) -> io::Result<()> {
        let s = cstring("the snapshot name", snap)?;
        // SAFETY: open image, NUL-terminated name.
        check(unsafe { sys::rbd_snap_create(self.handle, s.as_ptr()) } as i64).map(|_| ())
    }

    /// Removes snapshot `snap`. With clone v2, a snapshot that still has clones is moved to
    /// librbd's trash namespace instead: callers refuse that case first.
    pub fn snap_remove(&self, snap: &str) -> io::Result<()> {
        let s = cstring("the snapshot name", snap)?;
        // SAFETY: open image, NUL-terminated name.
        check(unsafe { sys::rbd_snap_remove(self.handle, s.as_ptr()) } as i64).map(|_| ())
    }

    /// The user snapshots of the image (not those in the trash or other namespaces), in
    /// librbd's order (creation).
    pub fn snap_list(&self) -> io::Result<Vec<SnapInfo>> {
        let mut cap: c_int = 16;
        loop {
            // SAFETY: plain old data (integers and a pointer); zero is a valid empty value.
            let mut snaps: Vec<sys::rbd_snap_info_t> =
                vec![unsafe { std::mem::zeroed() }; cap as usize + 1];
            let mut n = cap;
            // SAFETY: `snaps` has room for `n` entries (plus the terminator librbd writes).
            let rc = unsafe { sys::rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE && n > cap && (n as usize) <= MAX_LISTED {
                cap = n;
                continue;
            }
            let count = check(rc as i64)? as usize;
            let all: Vec<SnapInfo> = snaps[..count.min(cap as usize)]
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    size: s.size,
                    // SAFETY: librbd filled `name` with a NUL-terminated string (or null).
                    name: unsafe { owned(s.name) },
                })
                .collect();
            // SAFETY: frees the names librbd allocated in this array (terminated by a null
            // name, which the extra zeroed entry guarantees).
            unsafe { sys::rbd_snap_list_end(snaps.as_mut_ptr()) };
            let mut out = Vec::with_capacity(all.len());
            for s in all {
                let mut ns = std::mem::MaybeUninit::zeroed();
                // SAFETY: open image, valid out-pointer.
                let rc =
                    unsafe { sys::rbd_snap_get_namespace_type(self.handle, s.id, ns.as_mut_ptr()) };
                check(rc as i64)?;
                // SAFETY: written by the successful call above.
                if unsafe { ns.assume_init() } == NAMESPACE_USER {
                    out.push(s);
                }
            }
            return Ok(out);
        }
    }

    /// The images cloned from the snapshot this image is open at.
    pub fn children(&self) -> io::Result<Vec<LinkedImage>> {
        let mut cap = 8usize;
        loop {
            // SAFETY: plain old data; zero is a valid empty value librbd overwrites.
            let mut specs: Vec<sys::rbd_linked_image_spec_t> =
                vec![unsafe { std::mem::zeroed() }; cap];
            let mut n = cap;
            // SAFETY: `specs` has room for `n` entries.
            let rc = unsafe { sys::rbd_list_children3(self.handle, specs.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE && n > cap && n <= MAX_LISTED {
                cap = n;
                continue;
            }
            check(rc as i64)?;
            let n = n.min(cap);
            let out = specs[..n]
                .iter()
                .map(|s| LinkedImage {
                    // SAFETY: librbd filled these with NUL-terminated strings (or null).
                    pool: unsafe { owned(s.pool_name) },
                    // SAFETY: as above.
                    image: unsafe { owned(s.image_name) },
                    trash: s.trash,
                })
                .collect();
            // SAFETY: the `n` entries librbd filled.
            unsafe { sys::rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// The snapshot this image (a clone) reads its unwritten data from; `None` when it has no
    /// parent (never cloned, or flattened).
    pub fn parent(&self) -> io::Result<Option<ParentSpec>> {
        // SAFETY: plain old data; zero is a valid empty value librbd overwrites.
        let mut image: sys::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: sys::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image, valid out-pointers.
        let rc = unsafe { sys::rbd_get_parent(self.handle, &mut image, &mut snap) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(rc as i64)?;
        let out = ParentSpec {
            // SAFETY: librbd filled these with NUL-terminated strings (or null).
            pool: unsafe { owned(image.pool_name) },
            // SAFETY: as above.
            image: unsafe { owned(image.image_name) },
            // SAFETY: as above.
            snapshot: unsafe { owned(snap.name) },
            snapshot_in_trash: snap.namespace_type == NAMESPACE_TRASH,
        };
        // SAFETY: both specs were filled by the successful call above and are freed once.
        unsafe {
            sys::rbd_linked_image_spec_cleanup(&mut image);
            sys::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(out))
    }

    /// Copies every object the clone still reads from its parent into it and drops the link
    /// (`progress(done, total)` in objects). Interrupted, it resumes where it stopped.
    pub fn flatten(&self, progress: &mut dyn FnMut(u64, u64)) -> io::Result<()> {
        let mut p = Progress(progress);
        // SAFETY: synchronous call; the callback only touches `p`, which outlives it.
        check(unsafe {
            sys::rbd_flatten_with_progress(
                self.handle,
                Some(on_progress),
                (&mut p as *mut Progress<'_>).cast(),
            )
        } as i64)
        .map(|_| ())
    }
}
