//! The RBD entry points of a build without the `rbd` feature: same signatures, each refusing with
//! [`RbdError::NotBuilt`], so the data directory can list and describe RBD volumes without Ceph.

use std::io;

use super::{Access, RbdError, RbdLink, RbdLocation, RbdSnapshot};
use crate::backend::Backend;

fn not_built(loc: &RbdLocation) -> RbdError {
    RbdError::NotBuilt {
        location: loc.to_string(),
    }
}

pub fn create_image(loc: &RbdLocation, _size: u64) -> Result<(), RbdError> {
    Err(not_built(loc))
}

pub fn remove_image(loc: &RbdLocation) -> Result<(), RbdError> {
    Err(not_built(loc))
}

pub fn list_snapshots(loc: &RbdLocation) -> Result<Vec<RbdSnapshot>, RbdError> {
    Err(not_built(loc))
}

pub fn create_snapshot_online(loc: &RbdLocation, _snap: &str) -> Result<(), RbdError> {
    Err(not_built(loc))
}

pub fn remove_snapshot(loc: &RbdLocation, _snap: &str) -> Result<(), RbdError> {
    Err(not_built(loc))
}

pub fn clone_image(
    parent: &RbdLocation,
    _snap: &str,
    _child: &RbdLocation,
) -> Result<(), RbdError> {
    Err(not_built(parent))
}

/// Never constructed in this build (no variants).
#[derive(Debug)]
pub enum RbdBackend {}

impl RbdBackend {
    pub fn open(loc: &RbdLocation, _access: Access) -> Result<RbdBackend, RbdError> {
        Err(not_built(loc))
    }

    pub fn location(&self) -> &RbdLocation {
        match *self {}
    }

    pub fn holds_lock(&self) -> io::Result<bool> {
        match *self {}
    }

    pub fn allocated_bytes(&self) -> io::Result<u64> {
        match *self {}
    }

    pub fn open_snapshot(loc: &RbdLocation, _snap: &str) -> Result<RbdBackend, RbdError> {
        Err(not_built(loc))
    }

    pub fn create_snapshot(&self, _snap: &str) -> Result<(), RbdError> {
        match *self {}
    }

    pub fn parent(&self) -> Result<Option<RbdLink>, RbdError> {
        match *self {}
    }

    pub fn children(&self) -> Result<Vec<RbdLink>, RbdError> {
        match *self {}
    }

    pub fn flatten(&self, _progress: &mut dyn FnMut(u64, u64)) -> Result<(), RbdError> {
        match *self {}
    }
}

impl Backend for RbdBackend {
    fn len(&self) -> io::Result<u64> {
        match *self {}
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        match *self {}
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        match *self {}
    }
    fn sync(&self) -> io::Result<()> {
        match *self {}
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        match *self {}
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        match *self {}
    }
    fn seek_data(&self, _offset: u64) -> io::Result<Option<u64>> {
        match *self {}
    }
    fn seek_hole(&self, _offset: u64) -> io::Result<u64> {
        match *self {}
    }
    fn describe(&self) -> String {
        match *self {}
    }
}
