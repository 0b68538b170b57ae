//! A polling virtio-mmio driver (virtio 1.2, section 4.2: modern transport only) with split
//! virtqueues (section 2.7) in guest RAM from the DMA arena.
//!
//! Devices are found through the `virtio_mmio.device=<size>@<addr>:<irq>` words of the command
//! line, as Linux finds them. [`Device::init`] resets the device, negotiates features
//! (VIRTIO_F_VERSION_1 is required), [`Device::queue`] sets up one queue and
//! [`Device::driver_ok`] starts it. [`Queue::submit`] places a [`Chain`] of readable and then
//! writable buffers, [`Queue::notify`] kicks the device and [`Queue::wait`] polls the used ring
//! with a TSC deadline, checking DEVICE_NEEDS_RESET while it waits. Used-buffer interrupts are
//! suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT) unless asked for.

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::cmdline::{self, Params};
use crate::dma::Arena;
use crate::{io, phys};

// MMIO register offsets (virtio 1.2, 4.2.2).
pub const MAGIC: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;

/// "virt" in little-endian (4.2.2).
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) transport's Version register value.
pub const VERSION_MODERN: u32 = 2;

// Device status bits (2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1 (6): the device complies with virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;

// Split virtqueue layout (2.7).
pub const DESC_SIZE: u64 = 16;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
const PAGE: u64 = 4096;

/// Largest queue this driver sets up.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most buffers in one chain.
pub const MAX_CHAIN: usize = 64;

/// Why a virtio operation failed: a short phrase and the value involved.
#[derive(Debug, Clone, Copy)]
pub struct VirtioError {
    what: &'static str,
    value: u64,
}

impl VirtioError {
    fn new(what: &'static str, value: u64) -> Self {
        VirtioError { what, value }
    }
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:#x})", self.what, self.value)
    }
}

/// Result of this module.
pub type Result<T, E = VirtioError> = core::result::Result<T, E>;

/// One virtio-mmio device found on the command line.
#[derive(Debug, Clone)]
pub struct Device {
    base: u64,
    /// The ISA IRQ from the command line.
    pub irq: u64,
    /// Features the device offered.
    pub offered: u64,
    /// Features both sides agreed on.
    pub features: u64,
}

impl Device {
    /// The `index`-th device (counting from 0) with `device_id` among the `virtio_mmio.device=`
    /// words, after checking its magic and version.
    pub fn find(params: &Params<'_>, device_id: u32, index: u64) -> Result<Device> {
        let mut seen = 0;
        for value in params.values("virtio_mmio.device") {
            let Some(d) = cmdline::parse_virtio_mmio(value) else {
                return Err(VirtioError::new("malformed virtio_mmio.device", 0));
            };
            if d.addr % 4 != 0
                || d.size < CONFIG + 0x100
                || d.addr.saturating_add(d.size) > phys::STATIC_MAP_END
            {
                return Err(VirtioError::new(
                    "virtio_mmio.device window out of range",
                    d.addr,
                ));
            }
            let dev = Device {
                base: d.addr,
                irq: d.irq,
                offered: 0,
                features: 0,
            };
            let magic = dev.read(MAGIC);
            if magic != MAGIC_VALUE {
                return Err(VirtioError::new("bad virtio-mmio magic", u64::from(magic)));
            }
            let version = dev.read(VERSION);
            if version != VERSION_MODERN {
                return Err(VirtioError::new(
                    "virtio-mmio version is not 2",
                    u64::from(version),
                ));
            }
            if dev.read(DEVICE_ID) == device_id {
                if seen == index {
                    return Ok(dev);
                }
                seen += 1;
            }
        }
        Err(VirtioError::new(
            "no such virtio device",
            u64::from(device_id),
        ))
    }

    /// Base address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    fn read(&self, reg: u64) -> u32 {
        phys::mmio_read_u32(self.base + reg)
    }

    fn write(&self, reg: u64, value: u32) {
        phys::mmio_write_u32(self.base + reg, value);
    }

    /// Reads the 32-bit register at `reg` (an offset below 0x100, 4-byte aligned), for
    /// workloads that drive the transport by hand.
    pub fn reg(&self, reg: u64) -> u32 {
        self.read(reg & 0xffc)
    }

    /// Writes the 32-bit register at `reg` (masked to the window, 4-byte aligned).
    pub fn set_reg(&self, reg: u64, value: u32) {
        self.write(reg & 0xffc, value);
    }

    /// Resets the device and waits until the status reads 0 (4.2.3.1).
    pub fn reset(&self, timeout: u64) -> Result<()> {
        self.write(STATUS, 0);
        let deadline = io::rdtsc().wrapping_add(timeout);
        while self.read(STATUS) != 0 {
            if !before(deadline) {
                return Err(VirtioError::new("device reset did not complete", 0));
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Resets, acknowledges and negotiates: accepts VERSION_1 plus the offered bits of `wanted`,
    /// checks that FEATURES_OK stuck (3.1.1). Returns the accepted features.
    pub fn init(&mut self, wanted: u64, timeout: u64) -> Result<u64> {
        self.reset(timeout)?;
        self.write(STATUS, STATUS_ACKNOWLEDGE);
        self.write(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        self.offered = u64::from(low) | (u64::from(high) << 32);
        if self.offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(VirtioError::new(
                "device does not offer VIRTIO_F_VERSION_1",
                self.offered,
            ));
        }
        let accept = self.offered & (wanted | F_VERSION_1);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accept as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accept >> 32) as u32);
        let want_status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(STATUS, want_status);
        let status = self.read(STATUS);
        if status & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioError::new(
                "FEATURES_OK did not stick",
                u64::from(status),
            ));
        }
        self.features = accept;
        Ok(accept)
    }

    /// Tells the device we gave up (FAILED).
    fn fail(&self) {
        let s = self.read(STATUS);
        self.write(STATUS, s | STATUS_FAILED);
    }

    /// Sets up queue `index` with at most `max_size` entries (a power of two) in `arena`.
    pub fn queue(&self, arena: &mut Arena, index: u16, max_size: u16) -> Result<Queue> {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return Err(VirtioError::new("queue already ready", u64::from(index)));
        }
        let num_max = self.read(QUEUE_NUM_MAX);
        if num_max == 0 {
            return Err(VirtioError::new("queue not available", u64::from(index)));
        }
        // The largest power of two within both limits (split queues need not be a power of two
        // in virtio 1.x, but every device accepts one).
        let limit = num_max.min(u32::from(max_size.min(MAX_QUEUE_SIZE))).max(1);
        let size = 1u16 << (31 - limit.leading_zeros());
        let n = u64::from(size);
        let alloc = |arena: &mut Arena, len: u64| {
            arena
                .alloc(len.next_multiple_of(PAGE), PAGE)
                .ok_or(VirtioError::new("no memory for the virtqueue", len))
        };
        let desc = alloc(arena, DESC_SIZE * n)?;
        let avail = alloc(arena, 6 + 2 * n)?;
        let used = alloc(arena, 6 + 8 * n)?;
        phys::write_u16(avail, AVAIL_F_NO_INTERRUPT);
        self.write(QUEUE_NUM, u32::from(size));
        for (low, high, addr) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
        let mut next = [0u16; MAX_QUEUE_SIZE as usize];
        for (i, slot) in next.iter_mut().enumerate().take(size as usize) {
            *slot = (i + 1) as u16;
        }
        Ok(Queue {
            index,
            size,
            desc,
            avail,
            used,
            notify: self.base + QUEUE_NOTIFY,
            status: self.base + STATUS,
            free_head: 0,
            num_free: size,
            next,
            chain_len: [0; MAX_QUEUE_SIZE as usize],
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Sets DRIVER_OK: the device may use its queues from now on.
    pub fn driver_ok(&self) {
        let s = self.read(STATUS);
        self.write(STATUS, s | STATUS_DRIVER_OK);
    }

    /// Reads a byte of the device configuration space.
    pub fn config_u8(&self, offset: u64) -> u8 {
        phys::mmio_read(self.base + CONFIG + offset, 1) as u8
    }

    /// Reads a 32-bit field of the device configuration space.
    pub fn config_u32(&self, offset: u64) -> u32 {
        self.read(CONFIG + offset)
    }

    /// Reads a 64-bit field of the configuration space as two 32-bit reads, retrying while
    /// the configuration generation changes (4.2.2.2).
    pub fn config_u64(&self, offset: u64) -> u64 {
        loop {
            let gen = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            if self.read(CONFIG_GENERATION) == gen {
                return u64::from(low) | (u64::from(high) << 32);
            }
        }
    }

    /// Reads and acknowledges the interrupt status bits.
    pub fn ack_interrupt(&self) -> u32 {
        let isr = self.read(INTERRUPT_STATUS);
        if isr != 0 {
            self.write(INTERRUPT_ACK, isr);
        }
        isr
    }
}

/// A chain of buffers: device-readable ones first, then device-writable ones.
#[derive(Debug, Clone)]
pub struct Chain {
    bufs: [(u64, u32, bool); MAX_CHAIN],
    len: usize,
}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Self {
        Chain {
            bufs: [(0, 0, false); MAX_CHAIN],
            len: 0,
        }
    }

    fn push(&mut self, addr: u64, len: u32, writable: bool) -> Result<&mut Self> {
        if self.len == MAX_CHAIN {
            return Err(VirtioError::new("chain too long", MAX_CHAIN as u64));
        }
        if !writable && self.bufs[..self.len].iter().any(|b| b.2) {
            return Err(VirtioError::new(
                "readable buffer after a writable one",
                addr,
            ));
        }
        self.bufs[self.len] = (addr, len, writable);
        self.len += 1;
        Ok(self)
    }

    /// Appends a buffer the device reads.
    pub fn readable(&mut self, addr: u64, len: u32) -> Result<&mut Self> {
        self.push(addr, len, false)
    }

    /// Appends a buffer the device writes.
    pub fn writable(&mut self, addr: u64, len: u32) -> Result<&mut Self> {
        self.push(addr, len, true)
    }
}

/// A split virtqueue the driver owns.
#[derive(Debug)]
pub struct Queue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    status: u64,
    free_head: u16,
    num_free: u16,
    /// Our copy of every descriptor's `next` (the device may not change the table, but we do
    /// not depend on it).
    next: [u16; MAX_QUEUE_SIZE as usize],
    /// Length of the chain headed by each in-flight head (0 when not in flight).
    chain_len: [u16; MAX_QUEUE_SIZE as usize],
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not in flight.
    pub fn free(&self) -> u16 {
        self.num_free
    }

    /// Asks the device for (or stops asking for) used-buffer interrupts.
    pub fn set_interrupts(&mut self, enable: bool) {
        let flags = if enable { 0 } else { AVAIL_F_NO_INTERRUPT };
        phys::write_u16(self.avail, flags);
    }

    /// Writes `chain` into free descriptors and makes it available; returns its head.
    /// The device sees it after [`Queue::notify`].
    pub fn submit(&mut self, chain: &Chain) -> Result<u16> {
        let n = chain.len as u16;
        if n == 0 || n > self.num_free {
            return Err(VirtioError::new(
                "no room in the queue for the chain",
                u64::from(n),
            ));
        }
        let head = self.free_head;
        let mut d = head;
        for (i, &(addr, len, writable)) in chain.bufs[..chain.len].iter().enumerate() {
            let at = self.desc + u64::from(d) * DESC_SIZE;
            let last = i + 1 == chain.len;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let next = self.next[usize::from(d)];
            phys::write_u64(at, addr);
            phys::write_u32(at + 8, len);
            phys::write_u16(at + 12, flags);
            phys::write_u16(at + 14, if last { 0 } else { next });
            if last {
                self.free_head = next;
            }
            d = next;
        }
        self.num_free -= n;
        self.chain_len[usize::from(head)] = n;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        phys::write_u16(slot, head);
        // The ring entry and descriptors before the index (2.7.13).
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        phys::write_u16(self.avail + 2, self.avail_idx);
        Ok(head)
    }

    /// Tells the device the queue has new buffers.
    pub fn notify(&self) {
        // The avail index must be visible before the device looks (2.7.13.4).
        fence(Ordering::SeqCst);
        phys::mmio_write_u32(self.notify, u32::from(self.index));
    }

    /// The next used element `(head, len)`, if the device returned one; frees its descriptors.
    pub fn poll(&mut self) -> Result<Option<(u16, u32)>> {
        let used_idx = phys::load_u16(self.used + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        // Read the element only after seeing the index (2.7.14).
        fence(Ordering::Acquire);
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = phys::load_u32(elem);
        let len = phys::load_u32(elem + 4);
        let n = match usize::try_from(id).ok().and_then(|i| self.chain_len.get(i)) {
            Some(&n) if id < u32::from(self.size) && n != 0 => n,
            _ => {
                return Err(VirtioError::new(
                    "device used a descriptor not in flight",
                    u64::from(id),
                ))
            }
        };
        let head = id as u16;
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain to the free list: walk our copy of the links to its tail.
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[usize::from(tail)];
        }
        self.next[usize::from(tail)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.chain_len[usize::from(head)] = 0;
        Ok(Some((head, len)))
    }

    /// Waits until the device returns `head`, failing after `timeout` TSC ticks or when the
    /// device sets DEVICE_NEEDS_RESET. Returns the used length.
    pub fn wait(&mut self, head: u16, timeout: u64) -> Result<u32> {
        let start = io::rdtsc();
        let deadline = start.wrapping_add(timeout);
        let mut spins = 0u32;
        loop {
            if let Some((id, len)) = self.poll()? {
                if id != head {
                    return Err(VirtioError::new(
                        "device completed another chain",
                        u64::from(id),
                    ));
                }
                return Ok(len);
            }
            spins = spins.wrapping_add(1);
            // A status read is an exit to the VMM: look only now and then.
            if spins & 0xfff == 0 {
                let status = phys::mmio_read_u32(self.status);
                if status & STATUS_NEEDS_RESET != 0 {
                    return Err(VirtioError::new("device needs reset", u64::from(status)));
                }
            }
            if !before(deadline) {
                let status = phys::mmio_read_u32(self.status);
                return Err(VirtioError::new(
                    "request timed out; status",
                    u64::from(status),
                ));
            }
            core::hint::spin_loop();
        }
    }

    /// Submits `chain`, notifies and waits for it; returns the used length.
    pub fn transact(&mut self, chain: &Chain, timeout: u64) -> Result<u32> {
        let head = self.submit(chain)?;
        self.notify();
        self.wait(head, timeout)
    }
}

/// True while the TSC is before `deadline`.
fn before(deadline: u64) -> bool {
    (io::rdtsc().wrapping_sub(deadline) as i64) < 0
}
