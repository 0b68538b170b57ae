//! Transport and device tests: a driver's register sequence against [`MmioTransport`], with
//! split rings written by hand into guest memory.

#![allow(clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::*;
use super::rng::Rng;
use super::*;
use crate::bus::BusDevice;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x10000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn evt() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

#[derive(Default)]
struct Record {
    activated: Option<(usize, u64)>,
    resets: u32,
}

struct MockDevice {
    record: Arc<Mutex<Record>>,
    config: [u8; 8],
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn avail_features(&self) -> u64 {
        0b101
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.record.lock().unwrap().activated = Some((ctx.queues.len(), ctx.acked_features));
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
    }
    fn quiesce(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        None
    }
}

fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

fn mock_transport() -> (MmioTransport, Arc<Mutex<Record>>, EventFd, Vec<EventFd>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let dev = MockDevice {
        record: record.clone(),
        config: *b"anvil!!!",
    };
    let irq = evt();
    let evts = vec![evt(), evt()];
    let clones = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let t = MmioTransport::new(
        Box::new(dev),
        mem(),
        Interrupt::new(irq.try_clone().unwrap()),
        clones,
    )
    .unwrap();
    (t, record, irq, evts)
}

/// Negotiates features (VERSION_1 plus `extra`) up to FEATURES_OK.
fn negotiate(t: &mut MmioTransport, extra: u32) {
    wr(t, 0x70, STATUS_ACKNOWLEDGE);
    wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(t, 0x24, 0);
    wr(t, 0x20, extra);
    wr(t, 0x24, 1);
    wr(t, 0x20, 1); // VIRTIO_F_VERSION_1 is bit 0 of the high half
    wr(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    wr(t, 0x30, index);
    wr(t, 0x38, size);
    wr(t, 0x80, (base + DESC) as u32);
    wr(t, 0x84, 0);
    wr(t, 0x90, (base + AVAIL) as u32);
    wr(t, 0x94, 0);
    wr(t, 0xa0, (base + USED) as u32);
    wr(t, 0xa4, 0);
    wr(t, 0x44, 1);
}

const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn identification_registers() {
    let (mut t, ..) = mock_transport();
    assert_eq!(rd(&mut t, 0x0), MMIO_MAGIC);
    assert_eq!(rd(&mut t, 0x4), 2);
    assert_eq!(rd(&mut t, 0x8), 42);
    wr(&mut t, 0x14, 0);
    assert_eq!(rd(&mut t, 0x10), 0b101);
    wr(&mut t, 0x14, 1);
    assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 is always offered");
    wr(&mut t, 0x14, 7);
    assert_eq!(rd(&mut t, 0x10), 0);
    let mut cfg = [0u8; 4];
    t.read(0x100 + 4, &mut cfg);
    assert_eq!(&cfg, b"l!!!");
    t.read(0x100 + 6, &mut cfg);
    assert_eq!(&cfg, b"!!\0\0", "config reads past the end are zero-filled");
}

#[test]
fn misaligned_or_narrow_register_accesses_are_ignored() {
    let (mut t, ..) = mock_transport();
    let mut b = [0xffu8; 2];
    t.read(0x0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(0x2, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(0x70, &[1]);
    assert_eq!(rd(&mut t, 0x70), 0);
}

#[test]
fn features_ok_needs_version_1() {
    let (mut t, ..) = mock_transport();
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(
        rd(&mut t, 0x70) & STATUS_FEATURES_OK,
        0,
        "legacy drivers are refused"
    );
}

#[test]
fn a_full_setup_activates_the_device_with_the_acked_features() {
    let (mut t, record, ..) = mock_transport();
    // Bit 1 is not offered and must not be accepted.
    negotiate(&mut t, 0b111);
    assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    wr(&mut t, 0x30, 0);
    assert_eq!(rd(&mut t, 0x34), 16);
    setup_queue(&mut t, 0, 16, 0);
    setup_queue(&mut t, 1, 8, 0x4000);
    wr(&mut t, 0x70, ALL_OK);
    assert_eq!(
        record.lock().unwrap().activated,
        Some((2, 0b101 | VIRTIO_F_VERSION_1))
    );
    assert_eq!(rd(&mut t, 0x70), ALL_OK);
    // Resetting stops the device and clears the status.
    wr(&mut t, 0x70, 0);
    assert_eq!(record.lock().unwrap().resets, 1);
    assert_eq!(rd(&mut t, 0x70), 0);
}

#[test]
fn bogus_queues_make_the_device_need_a_reset() {
    let (mut t, record, irq, _) = mock_transport();
    negotiate(&mut t, 0);
    // Queue 0 outside guest memory, queue 1 never made ready.
    wr(&mut t, 0x30, 0);
    wr(&mut t, 0x38, 16);
    wr(&mut t, 0x80, 0xf000_0000);
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, ALL_OK);
    assert!(record.lock().unwrap().activated.is_none());
    assert_ne!(rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        rd(&mut t, 0x60) & INTERRUPT_CONFIG_CHANGE,
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(irq.read().unwrap(), 1);
    // The driver acknowledges and resets; the device is usable again.
    wr(&mut t, 0x64, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(rd(&mut t, 0x60), 0);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
}

#[test]
fn bad_queue_sizes_are_not_accepted() {
    let (mut t, record, ..) = mock_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    setup_queue(&mut t, 1, 12, 0x4000); // not a power of two
    wr(&mut t, 0x70, ALL_OK);
    assert!(record.lock().unwrap().activated.is_none());
    assert_ne!(rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_registers_are_frozen_outside_setup() {
    let (mut t, ..) = mock_transport();
    // Before FEATURES_OK nothing sticks.
    wr(&mut t, 0x30, 0);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    // An out-of-range queue selector reads as absent.
    wr(&mut t, 0x30, 99);
    assert_eq!(rd(&mut t, 0x34), 0);
}

#[test]
fn status_bits_cannot_be_cleared_without_a_reset() {
    let (mut t, ..) = mock_transport();
    negotiate(&mut t, 0);
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let (mut t, _, _, evts) = mock_transport();
    wr(&mut t, 0x50, 1);
    assert_eq!(evts[1].read().unwrap(), 1);
    assert!(evts[0].read().is_err());
    // A queue index that does not exist is ignored.
    wr(&mut t, 0x50, 1000);
}

/// Writes descriptor `index` of a ring at `base`.
fn put_desc(
    m: &GuestMemoryMmap,
    base: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let d = GuestAddress(base + DESC + 16 * u64::from(index));
    m.write_obj(addr, d).unwrap();
    m.write_obj(len, d.unchecked_add(8)).unwrap();
    m.write_obj(flags, d.unchecked_add(12)).unwrap();
    m.write_obj(next, d.unchecked_add(14)).unwrap();
}

/// Publishes chain heads in the available ring.
fn publish(m: &GuestMemoryMmap, base: u64, heads: &[u16]) {
    for (i, h) in heads.iter().enumerate() {
        m.write_obj(*h, GuestAddress(base + AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    m.write_obj(heads.len() as u16, GuestAddress(base + AVAIL + 2))
        .unwrap();
}

fn used_idx(m: &GuestMemoryMmap, base: u64) -> u16 {
    m.read_obj(GuestAddress(base + USED + 2)).unwrap()
}

fn wait_used(m: &GuestMemoryMmap, base: u64, n: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if used_idx(m, base) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

fn rng_transport() -> (MmioTransport, GuestMemoryMmap, EventFd, EventFd) {
    let m = mem();
    let irq = evt();
    let notify = evt();
    let t = MmioTransport::new(
        Box::new(Rng::new()),
        m.clone(),
        Interrupt::new(irq.try_clone().unwrap()),
        vec![notify.try_clone().unwrap()],
    )
    .unwrap();
    (t, m, irq, notify)
}

#[test]
fn rng_fills_writable_buffers() {
    let (mut t, m, irq, _) = rng_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    // One chain of two writable buffers, then one with a readable buffer only.
    put_desc(
        &m,
        0,
        0,
        BUF,
        100,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        1,
    );
    put_desc(&m, 0, 1, BUF + 0x1000, 28, VRING_DESC_F_WRITE, 0);
    put_desc(&m, 0, 2, BUF + 0x2000, 64, 0, 0);
    publish(&m, 0, &[0, 2]);
    wr(&mut t, 0x70, ALL_OK);
    assert!(wait_used(&m, 0, 2), "the device must use both chains");
    let len0: u32 = m.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
    let len1: u32 = m.read_obj(GuestAddress(USED + 4 + 8 + 4)).unwrap();
    assert_eq!((len0, len1), (128, 0));
    let mut data = [0u8; 100];
    m.read_slice(&mut data, GuestAddress(BUF)).unwrap();
    assert!(data.iter().any(|&b| b != 0));
    assert!(irq.read().unwrap() >= 1);
    assert_ne!(rd(&mut t, 0x60) & INTERRUPT_USED_BUFFER, 0);
    wr(&mut t, 0x70, 0);
}

#[test]
fn rng_survives_hostile_chains() {
    let (mut t, m, _, notify) = rng_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    wr(&mut t, 0x70, ALL_OK);
    // A loop, a buffer outside memory, and a huge length.
    put_desc(&m, 0, 0, BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
    put_desc(&m, 0, 1, BUF, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
    put_desc(&m, 0, 2, 0xdead_0000_0000, 4096, VRING_DESC_F_WRITE, 0);
    put_desc(&m, 0, 3, BUF, u32::MAX, VRING_DESC_F_WRITE, 0);
    put_desc(
        &m,
        0,
        4,
        BUF,
        8,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        200,
    );
    publish(&m, 0, &[0, 2, 3, 4, 77]);
    notify.write(1).unwrap();
    // The worker keeps going or declares the device broken; either way nothing hangs and
    // the transport answers.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && used_idx(&m, 0) < 4
        && rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET == 0
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(used_idx(&m, 0) >= 4 || rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET != 0);
    // A reset brings it back.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
}

mod block {
    use super::*;
    use crate::virtio::block::request::{STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
    use crate::virtio::block::Block;

    const HDR: u64 = 0x20000;
    const DATA: u64 = 0x30000;
    const STATUS: u64 = 0x40000;

    struct Rig {
        t: MmioTransport,
        m: GuestMemoryMmap,
        notify: EventFd,
        path: std::path::PathBuf,
        requests: u16,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            wr(&mut self.t, 0x70, 0);
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn rig(tag: &str, content: &[u8], read_only: bool) -> Rig {
        let path = std::env::temp_dir().join(format!("anvil-blk-{tag}-{}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        let m = mem();
        let notify = evt();
        let dev = Block::open(&path, read_only, "serial-123", 0).unwrap();
        let mut t = MmioTransport::new(
            Box::new(dev),
            m.clone(),
            Interrupt::new(evt()),
            vec![notify.try_clone().unwrap()],
        )
        .unwrap();
        negotiate(&mut t, 0);
        setup_queue(&mut t, 0, 16, 0);
        wr(&mut t, 0x70, ALL_OK);
        Rig {
            t,
            m,
            notify,
            path,
            requests: 0,
        }
    }

    impl Rig {
        /// Submits header + data (`data_flags` says its direction) + status; returns
        /// (status byte, used length).
        fn submit(&mut self, kind: u32, sector: u64, data_len: u32, data_flags: u16) -> (u8, u32) {
            self.m.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            put_desc(&self.m, 0, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
            if data_len > 0 {
                put_desc(
                    &self.m,
                    0,
                    1,
                    DATA,
                    data_len,
                    data_flags | VRING_DESC_F_NEXT,
                    2,
                );
                put_desc(&self.m, 0, 2, STATUS, 1, VRING_DESC_F_WRITE, 0);
            } else {
                put_desc(&self.m, 0, 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
            }
            let slot = self.requests % 16;
            self.m
                .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.requests += 1;
            self.m
                .write_obj(self.requests, GuestAddress(AVAIL + 2))
                .unwrap();
            self.notify.write(1).unwrap();
            assert!(
                wait_used(&self.m, 0, self.requests),
                "request not completed"
            );
            let used_len: u32 = self
                .m
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(slot) + 4))
                .unwrap();
            (self.m.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
        }
    }

    #[test]
    fn writes_reach_the_file_and_read_back() {
        let mut r = rig("rw", &[0u8; 8192], false);
        r.m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(1, 2, 1024, 0), (STATUS_OK, 1));
        assert_eq!(r.submit(4, 0, 0, 0), (STATUS_OK, 1), "flush");
        let file = std::fs::read(&r.path).unwrap();
        assert!(file[1024..2048].iter().all(|&b| b == 0xab));
        assert!(file[..1024].iter().all(|&b| b == 0));
        r.m.write_slice(&[0u8; 2048], GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(0, 1, 2048, VRING_DESC_F_WRITE), (STATUS_OK, 2049));
        let mut back = [0u8; 2048];
        r.m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0));
        assert!(back[512..1536].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn read_only_disks_refuse_writes_and_still_read() {
        let content: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut r = rig("ro", &content, true);
        assert_ne!(rd(&mut r.t, 0x10) & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
        r.m.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(1, 0, 512, 0).0, STATUS_IOERR);
        assert_eq!(r.submit(0, 0, 512, VRING_DESC_F_WRITE), (STATUS_OK, 513));
        let mut back = [0u8; 512];
        r.m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(&back[..], &content[..512]);
        assert_eq!(
            std::fs::read(&r.path).unwrap(),
            content,
            "the file is untouched"
        );
    }

    #[test]
    fn bad_requests_fail_with_the_right_status() {
        let mut r = rig("bad", &[0u8; 4096], false);
        // Capacity in the config space.
        let mut cap = [0u8; 8];
        r.t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(
            r.submit(0, 8, 512, VRING_DESC_F_WRITE).0,
            STATUS_IOERR,
            "past the end"
        );
        assert_eq!(
            r.submit(0, u64::MAX, 512, VRING_DESC_F_WRITE).0,
            STATUS_IOERR
        );
        assert_eq!(
            r.submit(0, 0, 100, VRING_DESC_F_WRITE).0,
            STATUS_IOERR,
            "unaligned"
        );
        assert_eq!(r.submit(77, 0, 0, 0).0, STATUS_UNSUPP);
        // GET_ID returns the serial.
        assert_eq!(r.submit(8, 0, 20, VRING_DESC_F_WRITE), (STATUS_OK, 21));
        let mut id = [0u8; 20];
        r.m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..10], b"serial-123");
        assert!(id[10..].iter().all(|&b| b == 0));
        // The device still works afterwards.
        assert_eq!(rd(&mut r.t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(r.submit(0, 0, 512, VRING_DESC_F_WRITE).0, STATUS_OK);
    }

    #[test]
    fn unaligned_images_are_refused() {
        let path = std::env::temp_dir().join(format!("anvil-blk-odd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 1000]).unwrap();
        let err = Block::open(&path, false, "x", 0).unwrap_err();
        assert!(err.to_string().contains("not a multiple of 512"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn the_driver_cannot_set_needs_reset() {
    let (mut t, ..) = mock_transport();
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET);
    assert_eq!(rd(&mut t, 0x70), STATUS_ACKNOWLEDGE);
}

#[test]
fn misaligned_rings_are_refused() {
    let (mut t, record, ..) = mock_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    setup_queue(&mut t, 1, 16, 0x4000);
    wr(&mut t, 0x30, 1);
    wr(&mut t, 0x80, (0x4000 + DESC + 8) as u32); // descriptor table needs 16-byte alignment
    wr(&mut t, 0x70, ALL_OK);
    assert!(record.lock().unwrap().activated.is_none());
    assert_ne!(rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn an_available_index_far_ahead_makes_the_device_need_a_reset() {
    let (mut t, m, _, notify) = rng_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    wr(&mut t, 0x70, ALL_OK);
    // 100 buffers announced on a 16-entry queue.
    m.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
    notify.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rd(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET == 0 {
        assert!(
            Instant::now() < deadline,
            "the device went quiet instead of failing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
}

/// Found by the virtio_mmio fuzz target: FEATURES_OK and DRIVER_OK in one write without
/// VERSION_1 used to leave the status reading DRIVER_OK with the device never started.
#[test]
fn driver_ok_without_accepted_features_fails_visibly() {
    let (mut t, record, ..) = mock_transport();
    wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(&mut t, 0x70, ALL_OK);
    let status = rd(&mut t, 0x70);
    assert_eq!(
        status & (STATUS_DRIVER_OK | STATUS_FEATURES_OK),
        0,
        "{status:#x}"
    );
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0, "{status:#x}");
    assert!(record.lock().unwrap().activated.is_none());
}

mod vsock {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::virtio::vsock::packet::*;
    use crate::virtio::vsock::Vsock;

    const RX: u64 = 0;
    const TX: u64 = 0x4000;
    const EVT: u64 = 0x8000;
    const RX_BUF: u64 = 0x20000;
    const TX_BUF: u64 = 0x40000;
    const GUEST_CID: u64 = 3;

    struct Rig {
        t: MmioTransport,
        m: GuestMemoryMmap,
        notify_tx: EventFd,
        path: std::path::PathBuf,
        tx_count: u16,
        rx_seen: u16,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            wr(&mut self.t, 0x70, 0);
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn rig() -> Rig {
        rig_with_rx_buffers(0x1000)
    }

    fn rig_with_rx_buffers(rx_len: u32) -> Rig {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("anvil-vsock-unit-{}-{n}", std::process::id()));
        let m = mem();
        let evts = [evt(), evt(), evt()];
        let notify_tx = evts[1].try_clone().unwrap();
        let dev = Vsock::new(GUEST_CID, &path).unwrap();
        let mut t = MmioTransport::new(
            Box::new(dev),
            m.clone(),
            Interrupt::new(evt()),
            evts.into_iter().collect(),
        )
        .unwrap();
        negotiate(&mut t, 0);
        setup_queue(&mut t, 0, 16, RX);
        setup_queue(&mut t, 1, 16, TX);
        setup_queue(&mut t, 2, 16, EVT);
        // Eight 4 KiB receive buffers.
        for i in 0..8u16 {
            put_desc(
                &m,
                RX,
                i,
                RX_BUF + 0x1000 * u64::from(i),
                rx_len,
                VRING_DESC_F_WRITE,
                0,
            );
        }
        publish(&m, RX, &[0, 1, 2, 3, 4, 5, 6, 7]);
        wr(&mut t, 0x70, ALL_OK);
        Rig {
            t,
            m,
            notify_tx,
            path,
            tx_count: 0,
            rx_seen: 0,
        }
    }

    impl Rig {
        /// Waits for the next packet the device put in a receive buffer.
        fn next_rx(&mut self) -> (Header, Vec<u8>) {
            assert!(
                wait_used(&self.m, RX, self.rx_seen + 1),
                "no packet for the guest"
            );
            let slot = u64::from(self.rx_seen % 16);
            let id: u32 = self
                .m
                .read_obj(GuestAddress(RX + USED + 4 + 8 * slot))
                .unwrap();
            self.rx_seen += 1;
            let addr = GuestAddress(RX_BUF + 0x1000 * u64::from(id));
            let hdr: Header = self.m.read_obj(addr).unwrap();
            let mut payload = vec![0u8; hdr.len as usize];
            self.m
                .read_slice(&mut payload, addr.unchecked_add(HEADER_LEN as u64))
                .unwrap();
            (hdr, payload)
        }

        /// Sends a packet from the guest.
        fn send(&mut self, hdr: Header, payload: &[u8]) {
            let slot = self.tx_count % 16;
            let addr = TX_BUF + 0x1000 * u64::from(slot);
            self.m.write_obj(hdr, GuestAddress(addr)).unwrap();
            self.m
                .write_slice(payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            put_desc(
                &self.m,
                TX,
                slot,
                addr,
                (HEADER_LEN + payload.len()) as u32,
                0,
                0,
            );
            self.m
                .write_obj(slot, GuestAddress(TX + AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.tx_count += 1;
            self.m
                .write_obj(self.tx_count, GuestAddress(TX + AVAIL + 2))
                .unwrap();
            self.notify_tx.write(1).unwrap();
            assert!(wait_used(&self.m, TX, self.tx_count));
        }
    }

    fn guest_hdr(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID_FOR_TESTS,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    const HOST_CID_FOR_TESTS: u64 = crate::virtio::vsock::HOST_CID;

    #[test]
    fn a_host_program_reaches_a_guest_port_and_data_flows_both_ways() {
        let mut r = rig();
        let mut host = UnixStream::connect(&r.path).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let (req, _) = r.next_rx();
        let (op, dst_cid, dst_port, src_port) = (req.op, req.dst_cid, req.dst_port, req.src_port);
        assert_eq!((op, dst_cid, dst_port), (OP_REQUEST, GUEST_CID, 1234));
        r.send(guest_hdr(1234, src_port, OP_RESPONSE, 0), &[]);
        let mut line = String::new();
        BufReader::new(host.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, format!("OK {src_port}\n"));
        host.write_all(b"hello guest").unwrap();
        let (rw, data) = r.next_rx();
        let op = rw.op;
        assert_eq!(op, OP_RW);
        assert_eq!(data, b"hello guest");
        r.send(guest_hdr(1234, src_port, OP_RW, 10), b"hello host");
        let mut back = [0u8; 10];
        host.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello host");
    }

    #[test]
    fn host_data_is_split_to_fit_small_receive_buffers() {
        let mut r = rig_with_rx_buffers(100);
        let mut host = UnixStream::connect(&r.path).unwrap();
        host.write_all(b"CONNECT 7\n").unwrap();
        let (req, _) = r.next_rx();
        let src_port = req.src_port;
        r.send(guest_hdr(7, src_port, OP_RESPONSE, 0), &[]);
        let data: Vec<u8> = (0..150u8).collect();
        host.write_all(&data).unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            let (hdr, payload) = r.next_rx();
            let (op, len) = (hdr.op, hdr.len);
            assert_eq!(op, OP_RW);
            assert!(
                len as usize <= 100 - HEADER_LEN,
                "packet of {len} bytes in a 100-byte buffer"
            );
            got.extend(payload);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn a_guest_connection_to_a_missing_host_port_is_reset() {
        let mut r = rig();
        r.send(guest_hdr(5000, 4321, OP_REQUEST, 0), &[]);
        let (rst, _) = r.next_rx();
        let (op, dst_port, src_port) = (rst.op, rst.dst_port, rst.src_port);
        assert_eq!((op, dst_port, src_port), (OP_RST, 5000, 4321));
    }

    #[test]
    fn packets_with_foreign_cids_or_oversized_payloads_are_refused() {
        let mut r = rig();
        let mut forged = guest_hdr(5000, 4321, OP_REQUEST, 0);
        forged.src_cid = 99;
        r.send(forged, &[]);
        // RW for a connection that does not exist, claiming more payload than it carries.
        r.send(guest_hdr(5001, 4321, OP_RW, 1 << 30), b"x");
        let (rst, _) = r.next_rx();
        let (op, dst_port) = (rst.op, rst.dst_port);
        assert_eq!((op, dst_port), (OP_RST, 5001), "only the RW gets an answer");
        assert_eq!(rd(&mut r.t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    }
}

#[test]
fn a_vsock_socket_in_use_is_refused_and_a_stale_one_replaced() {
    let path = std::env::temp_dir().join(format!("anvil-vsock-inuse-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let err = crate::virtio::vsock::Vsock::new(3, &path).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    drop(live);
    // The file stays behind with nobody listening: it is replaced.
    assert!(crate::virtio::vsock::Vsock::new(3, &path).is_ok());
    assert!(!path.exists(), "the device removes its socket when dropped");
}

#[test]
fn transport_state_round_trips_with_queue_positions() {
    let (mut t, m, _irq, _notify) = rng_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    put_desc(&m, 0, 0, BUF, 64, VRING_DESC_F_WRITE, 0);
    publish(&m, 0, &[0]);
    wr(&mut t, 0x70, ALL_OK);
    assert!(wait_used(&m, 0, 1));
    let state = t.save_state();
    assert!(state.activated);
    assert_eq!(state.queues[0].next_avail, 1);
    assert_eq!(state.queues[0].next_used, 1);
    assert_eq!(
        state.device_type,
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    );

    // A new transport (another process) takes the state; the next request is served from
    // where the first left off.
    let notify = evt();
    let mut restored = MmioTransport::new(
        Box::new(Rng::new()),
        m.clone(),
        Interrupt::new(evt()),
        vec![notify.try_clone().unwrap()],
    )
    .unwrap();
    restored.restore_state(&state).unwrap();
    assert_eq!(restored.status(), ALL_OK);
    put_desc(&m, 0, 1, BUF + 0x1000, 64, VRING_DESC_F_WRITE, 0);
    m.write_obj(1u16, GuestAddress(AVAIL + 4 + 2)).unwrap();
    m.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
    notify.write(1).unwrap();
    assert!(
        wait_used(&m, 0, 2),
        "the restored device must serve the next chain"
    );
    // The original resumes too (after a snapshot the source VM may go on).
    t.resume_after_save(&state);
}

#[test]
fn hostile_transport_states_are_refused_or_fail_the_device() {
    let (mut t, m, ..) = rng_transport();
    negotiate(&mut t, 0);
    setup_queue(&mut t, 0, 16, 0);
    wr(&mut t, 0x70, ALL_OK);
    let good = t.save_state();
    let fresh = || {
        MmioTransport::new(
            Box::new(Rng::new()),
            m.clone(),
            Interrupt::new(evt()),
            vec![evt()],
        )
        .unwrap()
    };
    let mut bad = good.clone();
    bad.device_type = 2;
    assert!(fresh()
        .restore_state(&bad)
        .unwrap_err()
        .contains("device type"));
    let mut bad = good.clone();
    bad.queues.push(bad.queues[0]);
    assert!(fresh().restore_state(&bad).unwrap_err().contains("queues"));
    let mut bad = good.clone();
    bad.queues[0].size = 3;
    assert!(
        fresh().restore_state(&bad).is_err(),
        "a size that is not a power of two"
    );
    // Rings outside guest memory: accepted as state, but the device needs a reset and
    // nothing touches memory.
    let mut bad = good.clone();
    bad.queues[0].desc_table = 1 << 40;
    let mut t2 = fresh();
    t2.restore_state(&bad).unwrap();
    assert_ne!(t2.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}
