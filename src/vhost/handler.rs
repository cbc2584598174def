//! The vhost-user frontend's messages for one connection (`vhost`'s `BackendReqHandler` parses
//! them and calls this): features and protocol features, the guest's memory table, each vring's
//! size, addresses, base, kick/call eventfds and enable state, the configuration space, and the
//! inflight region. A queue runs on its own worker (`queue`) once its memory, addresses and kick
//! are known and it is enabled; any message that changes what a running queue reads stops its
//! worker first (between two requests) and starts it again after.

use std::fs::File;
use std::sync::{Arc, RwLock};

use tracing::{info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::device::{BlkDevice, MAX_QUEUES, MAX_QUEUE_SIZE};
use super::inflight::{self, Region};
use super::queue::{Call, Setup, Worker};

/// Where a region of the frontend's address space lies in guest memory.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// One vring's settings, and its worker while it runs.
struct Slot {
    /// `None` only while a worker holds it.
    queue: Option<Queue>,
    kick: Option<File>,
    call: Call,
    enabled: bool,
    worker: Option<Worker>,
}

/// The state of one VM connection.
pub(crate) struct Handler {
    dev: Arc<BlkDevice>,
    owned: bool,
    acked_features: u64,
    mem: Option<Arc<GuestMemoryMmap>>,
    mappings: Vec<Mapping>,
    inflight: Option<Arc<Region>>,
    slots: Vec<Slot>,
    /// The VM set the device's features (it is starting the device).
    pub(crate) started: bool,
}

fn new_queue() -> Queue {
    // MAX_QUEUE_SIZE is a power of two below 2^15, which `Queue::new` accepts.
    Queue::new(MAX_QUEUE_SIZE as u16).expect("a valid queue size")
}

fn invalid() -> VuError {
    VuError::InvalidParam
}

impl Handler {
    pub(crate) fn new(dev: Arc<BlkDevice>) -> Self {
        let slots = (0..MAX_QUEUES)
            .map(|_| Slot {
                queue: Some(new_queue()),
                kick: None,
                call: Arc::new(RwLock::new(None)),
                enabled: false,
                worker: None,
            })
            .collect();
        Handler {
            dev,
            owned: false,
            acked_features: 0,
            mem: None,
            mappings: Vec::new(),
            inflight: None,
            slots,
            started: false,
        }
    }

    /// Whether the guest's memory was ever mapped on this connection.
    pub(crate) fn mapped(&self) -> bool {
        self.mem.is_some()
    }

    fn slot(&mut self, index: u32) -> Result<&mut Slot> {
        self.slots.get_mut(index as usize).ok_or_else(invalid)
    }

    /// Stops queue `index`'s worker, if it runs (waits for the request in hand).
    fn stop(&mut self, index: usize) {
        let s = &mut self.slots[index];
        if let Some(w) = s.worker.take() {
            s.queue = Some(w.stop().unwrap_or_else(new_queue));
        }
    }

    /// Stops every worker: before the memory changes, and when the VM goes away.
    pub(crate) fn stop_all(&mut self) {
        for i in 0..self.slots.len() {
            self.stop(i);
        }
    }

    /// Starts queue `index`'s worker if everything it needs is there.
    fn start(&mut self, index: usize) -> Result<()> {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let s = &mut self.slots[index];
        let (Some(mem), Some(kick), true, None) =
            (&self.mem, &s.kick, s.enabled, s.worker.as_ref())
        else {
            return Ok(());
        };
        let Some(mut queue) = s.queue.take() else {
            return Ok(());
        };
        if !queue.ready() || !queue.is_valid(&**mem) {
            s.queue = Some(queue);
            return Ok(());
        }
        queue.set_event_idx(event_idx);
        let setup = Setup {
            index: index as u16,
            queue,
            mem: mem.clone(),
            kick: kick.try_clone().map_err(VuError::ReqHandlerError)?,
            call: s.call.clone(),
            inflight: self.inflight.clone(),
            device: self.dev.clone(),
        };
        s.worker = Some(Worker::start(setup).map_err(VuError::ReqHandlerError)?);
        Ok(())
    }

    fn restart_all(&mut self) -> Result<()> {
        (0..self.slots.len()).try_for_each(|i| self.start(i))
    }

    /// Runs `f` on queue `index` with its worker stopped, then starts it again if it can run.
    fn with_queue<T>(&mut self, index: u32, f: impl FnOnce(&mut Slot) -> Result<T>) -> Result<T> {
        self.slot(index)?;
        let i = index as usize;
        self.stop(i);
        let r = f(&mut self.slots[i])?;
        self.start(i)?;
        Ok(r)
    }

    fn gpa(&self, vmm_addr: u64) -> Result<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| vmm_addr >= m.vmm_addr && vmm_addr - m.vmm_addr < m.size)
            .map(|m| GuestAddress(vmm_addr - m.vmm_addr + m.gpa))
            .ok_or_else(invalid)
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn unsupported<T>() -> Result<T> {
    Err(VuError::InvalidOperation("not supported by cryptnbd"))
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.reset_device()?;
        self.owned = false;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.stop_all();
        for s in &mut self.slots {
            s.enabled = false;
            s.queue = Some(new_queue());
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.dev.features() != 0 {
            return Err(invalid());
        }
        self.acked_features = features;
        self.started = true;
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start enabled.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for s in &mut self.slots {
                s.enabled = true;
            }
        }
        self.stop_all();
        self.restart_all()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return unsupported();
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (r, file) in ctx.iter().zip(files) {
            let region =
                GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
                    .ok_or_else(invalid)?;
            regions.push(region);
            mappings.push(Mapping {
                vmm_addr: r.user_addr,
                size: r.memory_size,
                gpa: r.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| VuError::ReqHandlerError(std::io::Error::other(e)))?;
        self.stop_all();
        self.mem = Some(Arc::new(mem));
        self.mappings = mappings;
        self.restart_all().map(|()| None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let size = u16::try_from(num).map_err(|_| invalid())?;
        self.with_queue(index, |s| {
            let q = s.queue.as_mut().ok_or_else(invalid)?;
            q.try_set_size(size).map_err(|_| invalid())
        })
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let (d, u, a) = (self.gpa(descriptor)?, self.gpa(used)?, self.gpa(available)?);
        self.with_queue(index, |s| {
            let q = s.queue.as_mut().ok_or_else(invalid)?;
            q.try_set_desc_table_address(d).map_err(|_| invalid())?;
            q.try_set_used_ring_address(u).map_err(|_| invalid())?;
            q.try_set_avail_ring_address(a).map_err(|_| invalid())
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let base = u16::try_from(base).map_err(|_| invalid())?;
        self.with_queue(index, |s| {
            s.queue.as_mut().ok_or_else(invalid)?.set_next_avail(base);
            Ok(())
        })
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        // The ring stops here (the spec): it starts again with the next SET_VRING_KICK.
        self.slot(index)?;
        self.stop(index as usize);
        let s = &mut self.slots[index as usize];
        let q = s.queue.as_mut().ok_or_else(invalid)?;
        q.set_ready(false);
        let next = q.next_avail();
        s.kick = None;
        *s.call.write().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.with_queue(u32::from(index), |s| {
            s.kick = fd;
            if let Some(q) = s.queue.as_mut() {
                q.set_ready(s.kick.is_some());
            }
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let s = self.slot(u32::from(index))?;
        *s.call.write().unwrap_or_else(|p| p.into_inner()) = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        // Nothing is reported through it: a guest's mistakes are answered per request.
        self.slot(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.dev.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        // `BackendReqHandler` keeps the acked set itself (REPLY_ACK, INFLIGHT_SHMFD checks).
        if features & !self.dev.protocol_features().bits() != 0 {
            return Err(invalid());
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(MAX_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.with_queue(index, |s| {
            s.enabled = enable;
            Ok(())
        })
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        Ok(self.dev.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> Result<()> {
        // virtio-blk's writable field (writeback) is not offered.
        unsupported()
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        unsupported()
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        unsupported()
    }

    fn get_inflight_fd(&mut self, req: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        if req.num_queues == 0
            || usize::from(req.num_queues) > MAX_QUEUES
            || req.queue_size == 0
            || usize::from(req.queue_size) > MAX_QUEUE_SIZE
        {
            return Err(invalid());
        }
        let (file, size) =
            inflight::create(req.num_queues, req.queue_size).map_err(VuError::ReqHandlerError)?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: req.num_queues,
            queue_size: req.queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        if usize::from(msg.num_queues) > MAX_QUEUES || usize::from(msg.queue_size) > MAX_QUEUE_SIZE
        {
            return Err(invalid());
        }
        let region = Region::map(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(|e| {
            warn!(socket = %self.dev.socket, "refusing the inflight region: {e}");
            invalid()
        })?;
        info!(
            socket = %self.dev.socket,
            queues = msg.num_queues,
            queue_size = msg.queue_size,
            "inflight region mapped: requests a previous server left in flight are redone"
        );
        self.stop_all();
        self.inflight = Some(Arc::new(region));
        self.restart_all()
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        unsupported()
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        unsupported()
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        unsupported()
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        unsupported()
    }

    fn check_device_state(&mut self) -> Result<()> {
        unsupported()
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        unsupported()
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        unsupported()
    }
}
