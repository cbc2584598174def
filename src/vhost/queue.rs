//! One worker thread per started virtqueue: it waits on the queue's kick eventfd (epoll, with an
//! exit eventfd beside it), takes the chains the guest made available and answers them one at a
//! time, in order, each put on the used ring only once done. Before new chains it redoes those the
//! inflight region says a previous backend took but never answered (`inflight`), oldest first.
//!
//! In-order, one-at-a-time answering is what makes a restart safe even without inflight tracking:
//! QEMU rewinds a queue whose backend vanished to its used index, so exactly the chains not yet
//! answered are offered again. With the inflight region the backend itself knows them, as the
//! protocol expects, and a chain that reached the used ring just before a crash is not redone.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::BlkDevice;
use super::inflight::{QueueInflight, Region};
use super::request::{self, Scratch, Target};

/// The call eventfd of a queue: QEMU may replace it while the queue runs (interrupt masking).
pub(crate) type Call = Arc<RwLock<Option<File>>>;

/// What a worker needs to run one queue.
pub(crate) struct Setup {
    pub index: u16,
    pub queue: Queue,
    pub mem: Arc<GuestMemoryMmap>,
    pub kick: File,
    pub call: Call,
    pub inflight: Option<Arc<Region>>,
    pub device: Arc<BlkDevice>,
}

/// A running queue; [`Worker::stop`] hands the queue back once the chain in hand is answered.
pub(crate) struct Worker {
    exit: EventFd,
    thread: JoinHandle<Queue>,
}

const KICK: u64 = 0;
const EXIT: u64 = 1;

impl Worker {
    pub(crate) fn start(setup: Setup) -> std::io::Result<Worker> {
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            setup.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KICK),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            exit.as_raw_fd(),
            EpollEvent::new(EventSet::IN, EXIT),
        )?;
        let thread = std::thread::Builder::new()
            .name(format!("vhost-q{}", setup.index))
            .spawn(move || run(setup, &epoll))?;
        Ok(Worker { exit, thread })
    }

    /// Stops the worker between chains; `None` if it died (the queue is then lost).
    pub(crate) fn stop(self) -> Option<Queue> {
        let _ = self.exit.write(1);
        self.thread.join().ok()
    }
}

fn run(mut s: Setup, epoll: &Epoll) -> Queue {
    let mem = s.mem.clone();
    let mut scratch = Scratch::default();
    // The used ring may have moved since the queue was last stopped (a guest reset).
    if let Ok(used) = s.queue.used_idx(&*mem, Ordering::Acquire) {
        s.queue.set_next_used(used.0);
    }
    let region = s.inflight.clone();
    let track = region
        .as_deref()
        .and_then(|r| r.queue(s.index, s.queue.size()));
    let mut counter = 0u64;
    if let Some(t) = &track {
        let used = s.queue.next_used();
        let (redo, next) = t.recover(used);
        counter = next;
        if !redo.is_empty() {
            warn!(socket = %s.device.socket, queue = s.index, count = redo.len(),
                "redoing requests a previous server took but did not answer");
            s.queue.set_next_avail(used.wrapping_add(redo.len() as u16));
            for head in redo {
                redo_one(&mut s, &mem, t, head, &mut scratch);
            }
        }
    }
    let mut events = [EpollEvent::default(); 2];
    loop {
        drain(&mut s, &mem, track.as_ref(), &mut counter, &mut scratch);
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(socket = %s.device.socket, queue = s.index, "queue worker stops: {e}");
                return s.queue;
            }
        };
        if events[..n].iter().any(|e| e.data() == EXIT) {
            return s.queue;
        }
        let mut b = [0u8; 8];
        let _ = (&s.kick).read(&mut b);
    }
}

/// Answers what the guest made available; with EVENT_IDX, re-arms the notification and drains
/// again if the guest added chains meanwhile (else a kick could be lost).
fn drain(
    s: &mut Setup,
    mem: &GuestMemoryMmap,
    track: Option<&QueueInflight<'_>>,
    counter: &mut u64,
    scratch: &mut Scratch,
) {
    let event_idx = s.queue.event_idx_enabled();
    loop {
        if event_idx {
            let _ = s.queue.disable_notification(mem);
        }
        while let Some(chain) = s.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Some(t) = track {
                t.start(head, *counter);
                *counter = counter.wrapping_add(1);
            }
            let len = answer(&s.device, mem, chain, scratch);
            if !put_used(s, mem, track, head, len) {
                return;
            }
        }
        if !event_idx || !s.queue.enable_notification(mem).unwrap_or(false) {
            return;
        }
    }
}

/// Redoes chain `head`, found in the avail ring (the guest cannot have reused the slot of a
/// chain it has not had back within the last ring's worth of entries).
fn redo_one(
    s: &mut Setup,
    mem: &GuestMemoryMmap,
    t: &QueueInflight<'_>,
    head: u16,
    scratch: &mut Scratch,
) {
    let Some(pos) = avail_position(&s.queue, mem, head) else {
        warn!(socket = %s.device.socket, queue = s.index, head,
            "a request left in flight is no longer in the avail ring; dropped");
        t.before_used(head);
        t.after_used(head, s.queue.next_used());
        return;
    };
    let mut state = s.queue.state();
    state.next_avail = pos;
    let Some(chain) = Queue::try_from(state)
        .ok()
        .and_then(|mut q| q.pop_descriptor_chain(mem))
    else {
        return;
    };
    let len = answer(&s.device, mem, chain, scratch);
    put_used(s, mem, Some(t), head, len);
}

/// The avail-ring position holding `head`, searching back from the guest's avail index.
fn avail_position(q: &Queue, mem: &GuestMemoryMmap, head: u16) -> Option<u16> {
    let avail = q.avail_idx(mem, Ordering::Acquire).ok()?.0;
    let size = q.size();
    (1..=size).map(|back| avail.wrapping_sub(back)).find(|pos| {
        let at = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(pos % size));
        at.and_then(|a| mem.read_obj::<u16>(a).ok())
            .is_some_and(|h| u16::from_le(h) == head)
    })
}

fn answer<M>(
    dev: &BlkDevice,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    scratch: &mut Scratch,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let head = chain.head_index();
    let target = Target {
        volume: &dev.volume,
        serial: &dev.serial,
    };
    match request::process(mem, chain, &target, scratch) {
        Ok(done) => done.used_len,
        Err(why) => {
            warn!(socket = %dev.socket, head, "malformed request from the VM, returned unanswered: {why}");
            0
        }
    }
}

/// Puts `head` on the used ring (recorded in the inflight region around it) and notifies the
/// guest if it asked to be; `false` if the ring cannot be written (the worker then waits for
/// the next kick rather than spin).
fn put_used(
    s: &mut Setup,
    mem: &GuestMemoryMmap,
    track: Option<&QueueInflight<'_>>,
    head: u16,
    len: u32,
) -> bool {
    if let Some(t) = track {
        t.before_used(head);
    }
    if let Err(e) = s.queue.add_used(mem, head, len) {
        warn!(socket = %s.device.socket, queue = s.index, "cannot return a request to the VM: {e}");
        return false;
    }
    if let Some(t) = track {
        t.after_used(head, s.queue.next_used());
    }
    if s.queue.needs_notification(mem).unwrap_or(true) {
        if let Some(call) = &*s.call.read().unwrap_or_else(|p| p.into_inner()) {
            let _ = (&*call).write(&1u64.to_ne_bytes());
        }
    }
    true
}
