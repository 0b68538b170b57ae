//! The virtio-mmio transport's register file and state machine, in front of a real device
//! (virtio-blk read-write, virtio-blk read-only, or virtio-rng) whose worker thread runs the
//! rings the input writes into guest memory.
//!
//! Input: `device:u8` (bits 0-1: 0 blk, 1 read-only blk, 2 or 3 rng; bits 2-7: disk sectors
//! modulo 17) then up to `MAX_OPS` operations `opcode:u8 payload` (see `Op::decode`).
//! After every operation the checks below run; at the end the device is reset (status 0),
//! which stops and joins its worker thread.
//!
//! Asserts: no panic and no hang (a hang shows as a libFuzzer timeout); identification
//! registers are constant; narrow or misaligned register accesses read as zero; the
//! configuration space reads as the device's (capacity for blk, nothing for rng) zero-padded
//! at any offset and size; DeviceFeatures matches the offered features for the selected half;
//! status bits never clear except by a reset; FEATURES_OK implies DRIVER; DRIVER_OK without
//! FEATURES_OK implies DEVICE_NEEDS_RESET; InterruptStatus only shows defined bits; a reset
//! reads back as status 0 and interrupt status 0; QueueNumMax is 256 for queue 0 and 0 for
//! others (while the queues are the transport's, i.e. until activation); the disk's size never
//! changes and a read-only disk's content never changes.

#![no_main]
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anvil_fuzz::{fingerprint, guest_memory, Cursor, AVAIL, DATA, DESC, USED};
use devices::virtio::block::Block;
use devices::virtio::mmio::{
    MmioTransport, MMIO_MAGIC, MMIO_VERSION, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FEATURES_OK, VENDOR_ID,
};
use devices::virtio::rng::Rng;
use devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use devices::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const MAX_OPS: usize = 48;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_FLUSH: u64 = 1 << 9;

/// Registers a driver writes, for the `WriteReg` operation.
const REGS: [u64; 20] = [
    0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
    0x0a0, 0x0a4, 0x000, 0x010, 0x034, 0x060, 0x0fc,
];

#[derive(Debug)]
enum Op {
    Read { offset: u64, size: usize },
    Write { offset: u64, bytes: Vec<u8> },
    WriteReg { offset: u64, value: u32 },
    Negotiate { features_lo: u32 },
    SetupQueue { size: u32 },
    PutDesc { index: u8, desc: [u8; 16] },
    Publish { head: u16 },
    WriteMem { offset: u16, bytes: Vec<u8> },
    Settle,
}

impl Op {
    fn decode(c: &mut Cursor<'_>) -> Self {
        match c.u8() % 9 {
            0 => Op::Read {
                offset: u64::from(c.u16()),
                size: usize::from(c.u8() % 9),
            },
            1 => {
                let offset = u64::from(c.u16());
                let size = usize::from(c.u8() % 9);
                Op::Write {
                    offset,
                    bytes: c.take(size).to_vec(),
                }
            }
            2 => Op::WriteReg {
                offset: REGS[usize::from(c.u8()) % REGS.len()],
                value: c.u32(),
            },
            3 => Op::Negotiate {
                features_lo: c.u32(),
            },
            4 => Op::SetupQueue {
                size: 1 << (c.u8() % 10),
            },
            5 => Op::PutDesc {
                index: c.u8(),
                desc: c.array(),
            },
            6 => Op::Publish { head: c.u16() },
            7 => {
                let offset = c.u16();
                let len = usize::from(c.u8() % 33);
                Op::WriteMem {
                    offset,
                    bytes: c.take(len).to_vec(),
                }
            }
            _ => Op::Settle,
        }
    }
}

/// What the checks remember between operations.
struct Rig {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    config: Vec<u8>,
    features: u64,
    device_type: u32,
    /// Status read after the last operation; None right after a reset.
    last_status: Option<u32>,
    device_features_sel: u32,
    queue_sel: u32,
    avail_idx: u16,
}

fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

impl Rig {
    fn write(&mut self, offset: u64, bytes: &[u8]) {
        self.t.write(offset, bytes);
        if offset >= 0x100 || bytes.len() != 4 || offset % 4 != 0 {
            return;
        }
        let value = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        match offset {
            0x014 => self.device_features_sel = value,
            0x030 => self.queue_sel = value,
            0x070 if value == 0 => {
                self.last_status = None;
                self.device_features_sel = 0;
                self.queue_sel = 0;
                assert_eq!(rd(&mut self.t, 0x070), 0, "status after reset");
                assert_eq!(rd(&mut self.t, 0x060), 0, "interrupt status after reset");
            }
            _ => {}
        }
    }

    fn wr(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    fn read(&mut self, offset: u64, size: usize) {
        let mut data = vec![0xeeu8; size];
        self.t.read(offset, &mut data);
        if offset >= 0x100 {
            let start = offset - 0x100;
            for (i, b) in data.iter().enumerate() {
                let want = usize::try_from(start + i as u64)
                    .ok()
                    .and_then(|j| self.config.get(j))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(*b, want, "config byte {} of a {size}-byte read at {offset:#x}", i);
            }
            return;
        }
        if size != 4 || offset % 4 != 0 {
            assert!(data.iter().all(|&b| b == 0), "narrow read at {offset:#x}: {data:?}");
            return;
        }
        let v = u32::from_le_bytes(data[..].try_into().expect("4 bytes"));
        let features = self.features | VIRTIO_F_VERSION_1;
        match offset {
            0x000 => assert_eq!(v, MMIO_MAGIC),
            0x004 => assert_eq!(v, MMIO_VERSION),
            0x008 => assert_eq!(v, self.device_type),
            0x00c => assert_eq!(v, VENDOR_ID),
            0x010 => {
                let want = match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                };
                assert_eq!(v, want, "DeviceFeatures[{}]", self.device_features_sel);
            }
            0x034 => {
                let activated = self.t.status() & STATUS_DRIVER_OK != 0;
                match self.queue_sel {
                    0 if !activated => assert_eq!(v, 256, "QueueNumMax of queue 0"),
                    0 => {}
                    s => assert_eq!(v, 0, "QueueNumMax of absent queue {s}"),
                }
            }
            0x060 => assert_eq!(v & !3, 0, "InterruptStatus {v:#x}"),
            _ => {}
        }
    }

    fn check_status(&mut self) {
        let s = rd(&mut self.t, 0x070);
        // The worker may set DEVICE_NEEDS_RESET between the two reads, never clear a bit.
        let again = self.t.status();
        assert_eq!(again & s, s, "status {s:#x} then {again:#x}");
        if let Some(prev) = self.last_status {
            assert_eq!(s & prev, prev, "status went from {prev:#x} to {s:#x} without a reset");
        }
        if s & STATUS_FEATURES_OK != 0 {
            assert_ne!(s & STATUS_DRIVER, 0, "FEATURES_OK without DRIVER: {s:#x}");
        }
        // Found by this target and fixed: DRIVER_OK never shows without FEATURES_OK.
        if s & STATUS_DRIVER_OK != 0 {
            assert_ne!(s & STATUS_FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK: {s:#x}");
        }
        self.last_status = Some(s);
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Read { offset, size } => self.read(offset, size),
            Op::Write { offset, bytes } => self.write(offset, &bytes),
            Op::WriteReg { offset, value } => self.wr(offset, value),
            Op::Negotiate { features_lo } => {
                self.wr(0x070, 1);
                self.wr(0x070, 1 | 2);
                self.wr(0x024, 0);
                self.wr(0x020, features_lo);
                self.wr(0x024, 1);
                self.wr(0x020, 1);
                self.wr(0x070, 1 | 2 | 8);
            }
            Op::SetupQueue { size } => {
                self.wr(0x030, 0);
                self.wr(0x038, size);
                self.wr(0x080, DESC as u32);
                self.wr(0x084, 0);
                self.wr(0x090, AVAIL as u32);
                self.wr(0x094, 0);
                self.wr(0x0a0, USED as u32);
                self.wr(0x0a4, 0);
                self.wr(0x044, 1);
            }
            Op::PutDesc { index, desc } => {
                let at = GuestAddress(DESC + 16 * u64::from(index));
                self.mem.write_slice(&desc, at).expect("descriptor");
            }
            Op::Publish { head } => {
                let slot = u64::from(self.avail_idx % 256);
                self.mem
                    .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                    .expect("avail ring");
                self.avail_idx = self.avail_idx.wrapping_add(1);
                self.mem
                    .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                    .expect("avail idx");
            }
            Op::WriteMem { offset, bytes } => {
                let at = GuestAddress(DATA + u64::from(offset));
                self.mem.write_slice(&bytes, at).expect("data");
            }
            Op::Settle => {
                // Give the worker a moment to catch up; bounded, never asserted on.
                let deadline = Instant::now() + Duration::from_millis(10);
                while Instant::now() < deadline {
                    let s = self.t.status();
                    let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
                    if s & STATUS_DRIVER_OK == 0
                        || s & STATUS_DEVICE_NEEDS_RESET != 0
                        || used == self.avail_idx
                    {
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        }
    }
}

fn disk_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("anvil-fuzz-mmio-{}.img", std::process::id()))
}

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    let sel = c.u8();
    let kind = (sel & 3) % 3;
    let sectors = u64::from(sel >> 2) % 17;
    let content: Vec<u8> = (0..sectors * 512).map(|i| (i % 253) as u8).collect();
    let path = disk_path();
    std::fs::write(&path, &content).expect("disk image");

    let device: Box<dyn VirtioDevice> = match kind {
        0 | 1 => Box::new(Block::open(&path, kind == 1, "fuzz", 0).expect("open disk")),
        _ => Box::new(Rng::new()),
    };
    let (config, features, device_type) = match kind {
        0 => (sectors.to_le_bytes().to_vec(), BLK_F_FLUSH, 2),
        1 => (sectors.to_le_bytes().to_vec(), BLK_F_FLUSH | BLK_F_RO, 2),
        _ => (Vec::new(), 0, 4),
    };
    let mem = guest_memory();
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let t = MmioTransport::new(
        device,
        mem.clone(),
        Interrupt::new(irq),
        vec![notify.try_clone().expect("eventfd clone")],
    )
    .expect("transport");
    let mut rig = Rig {
        t,
        mem,
        config,
        features,
        device_type,
        last_status: None,
        device_features_sel: 0,
        queue_sel: 0,
        avail_idx: 0,
    };

    for _ in 0..MAX_OPS {
        if c.is_empty() {
            break;
        }
        let op = Op::decode(&mut c);
        rig.run(op);
        rig.check_status();
    }
    rig.wr(0x070, 0);

    let file = std::fs::File::open(&path).expect("reopen disk");
    assert_eq!(
        file.metadata().expect("metadata").len(),
        content.len() as u64,
        "the disk changed size"
    );
    if kind == 1 {
        let mut now = vec![0u8; content.len()];
        file.read_exact_at(&mut now, 0).expect("read disk");
        assert_eq!(fingerprint(&now), fingerprint(&content), "a read-only disk was modified");
    }
});
