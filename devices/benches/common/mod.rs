//! What the device benches share: guest memory, a split virtqueue laid out by hand in it, and
//! a driver side that publishes batches of chains and waits for the device to use them.

#![allow(dead_code)] // Each bench uses its own part.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Queue size used by every bench (the devices' maximum).
pub const QUEUE_SIZE: u16 = 256;
/// VRING_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;
/// VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = 1 << 32;

/// Where queue `index`'s rings live: 16 KiB per queue from 0.
fn ring_base(index: usize) -> u64 {
    0x4000 * index as u64
}

/// The low 32 bits of a ring address (the rings sit in the first 4 GiB).
fn low(addr: u64) -> u32 {
    u32::try_from(addr).expect("rings are below 4 GiB")
}

/// One queue as the driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    base: u64,
    /// Next available index the driver publishes.
    avail_idx: u16,
}

impl DriverQueue {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// Writes descriptor `index`.
    pub fn put_desc(
        &self,
        m: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = GuestAddress(self.desc() + 16 * u64::from(index));
        m.write_obj(addr, d).expect("descriptor in memory");
        m.write_obj(len, GuestAddress(d.0 + 8))
            .expect("descriptor in memory");
        m.write_obj(flags, GuestAddress(d.0 + 12))
            .expect("descriptor in memory");
        m.write_obj(next, GuestAddress(d.0 + 14))
            .expect("descriptor in memory");
    }

    /// Makes the chains starting at `heads` available (without notifying).
    pub fn publish(&mut self, m: &GuestMemoryMmap, heads: impl Iterator<Item = u16>) {
        for head in heads {
            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            m.write_obj(head, GuestAddress(self.avail() + 4 + 2 * slot))
                .expect("avail ring in memory");
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        m.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .expect("avail ring in memory");
    }

    /// The device's used index.
    pub fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(self.used() + 2))
            .expect("used ring in memory")
    }

    /// The used length of used-ring entry `n` (counting from 0 since activation).
    pub fn used_len(&self, m: &GuestMemoryMmap, n: u16) -> u32 {
        let slot = u64::from(n % QUEUE_SIZE);
        m.read_obj(GuestAddress(self.used() + 4 + 8 * slot + 4))
            .expect("used ring in memory")
    }

    /// True when the device has used everything published.
    pub fn all_used(&self, m: &GuestMemoryMmap) -> bool {
        self.used_idx(m) == self.avail_idx
    }

    /// The device-side queue over these rings.
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).expect("valid queue size");
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(low(self.desc())), Some(0));
        q.set_avail_ring_address(Some(low(self.avail())), Some(0));
        q.set_used_ring_address(Some(low(self.used())), Some(0));
        q.set_ready(true);
        q
    }
}

/// A device activated on hand-made queues, with the driver's view of them.
#[derive(Debug)]
pub struct Rig {
    /// Guest memory (rings at 0, 16 KiB per queue; the rest is for buffers).
    pub mem: GuestMemoryMmap,
    /// The driver side of each queue.
    pub queues: Vec<DriverQueue>,
    notify: Vec<EventFd>,
    irq: EventFd,
}

impl Rig {
    /// Activates `device` with `queue_count` queues over `mem_bytes` of guest memory.
    pub fn activate(
        device: &mut dyn VirtioDevice,
        queue_count: usize,
        mem_bytes: usize,
        acked_features: u64,
    ) -> Self {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes)]).expect("guest memory");
        let queues: Vec<DriverQueue> = (0..queue_count)
            .map(|i| DriverQueue {
                base: ring_base(i),
                avail_idx: 0,
            })
            .collect();
        let notify: Vec<EventFd> = (0..queue_count)
            .map(|_| EventFd::new(0).expect("eventfd"))
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        device
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Interrupt::new(irq.try_clone().expect("eventfd clone")),
                queues: queues.iter().map(DriverQueue::queue).collect(),
                queue_evts: notify
                    .iter()
                    .map(|e| e.try_clone().expect("eventfd clone"))
                    .collect(),
                acked_features,
                restored: false,
            })
            .expect("device activates");
        Self {
            mem,
            queues,
            notify,
            irq,
        }
    }

    /// Notifies queue `index`.
    pub fn kick(&self, index: usize) {
        self.notify[index].write(1).expect("notify");
    }

    /// Waits (on the interrupt) until the device used everything published on queue `index`.
    pub fn wait_all_used(&self, index: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.queues[index].all_used(&self.mem) {
            assert!(
                Instant::now() < deadline,
                "the device stopped using buffers"
            );
            // Sleeps until the device's next interrupt; a stale count only costs a re-check.
            let mut pfd = libc::pollfd {
                fd: self.irq.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 1000) } > 0 {
                let _ = self.irq.read();
            }
        }
    }
}
