//! virtio-blk (virtio 1.2, 5.2) backed by a raw file: read, write, flush and get-id, with
//! read-only disks. Requests run on the device's worker thread, never on a vCPU.

pub mod request;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue};

use self::request::{Disk, Request, RequestError, RequestKind, SECTOR_SIZE, STATUS_OK};
use super::worker::{QueueHandler, Worker};
use super::QUEUE_MAX_SIZE;
use super::{
    driver_wants_interrupt, read_config_bytes, serve_queue, stop_worker, take_queues,
    ActivateContext, ActivateError, Interrupt, VirtioDevice,
};
use crate::metrics::BlockMetrics;
use crate::rate_limiter::{LimiterUpdate, RateLimiterConfig, Throttle};

/// Errors of opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open disk image {}", .path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The backing file is not a whole number of sectors.
    #[error("disk image {} is {len} bytes, not a multiple of 512", .path.display())]
    Unaligned {
        /// The path.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
}

/// Changes a block device while the VM runs: swap its backing file (the guest is told the
/// new capacity with a configuration interrupt) or its rate limits.
#[derive(Debug, Clone)]
pub struct BlockControl {
    disk: Arc<Mutex<Disk>>,
    /// Capacity in sectors, as the configuration space reports it.
    capacity: Arc<AtomicU64>,
    /// The interrupt, once the driver activated the device.
    interrupt: Arc<Mutex<Option<Interrupt>>>,
    limit: LimiterUpdate,
}

impl BlockControl {
    /// Replaces the backing file with the raw image at `path` (opened as the old one was,
    /// read-only or not). Requests in flight finish on the old file.
    pub fn swap_file(&self, path: &Path) -> Result<(), BlockError> {
        let read_only = self
            .disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_only;
        let (file, len) = open_image(path, read_only)?;
        {
            let mut disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
            disk.file = file;
            disk.capacity_bytes = len;
        }
        self.capacity.store(len / SECTOR_SIZE, Ordering::SeqCst);
        if let Some(interrupt) = &*self.interrupt.lock().unwrap_or_else(|p| p.into_inner()) {
            interrupt.signal_config_change();
        }
        tracing::info!(path = %path.display(), bytes = len, "virtio-blk backing file swapped");
        Ok(())
    }

    /// Replaces the rate limits.
    pub fn set_rate_limit(&self, config: RateLimiterConfig) {
        self.limit.request(config);
    }
}

/// Opens a raw image and checks it is whole sectors; returns it and its length.
fn open_image(path: &Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let fail = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file: File = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(fail)?;
    let len = file.metadata().map_err(fail)?.len();
    if len % SECTOR_SIZE != 0 {
        return Err(BlockError::Unaligned {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok((file, len))
}

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Mutex<Disk>>,
    control: BlockControl,
    features: u64,
    index: usize,
    rate_limit: RateLimiterConfig,
    worker: Option<Worker>,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// This device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// A handle to change the device while the VM runs.
    pub fn control(&self) -> BlockControl {
        self.control.clone()
    }

    /// Opens the raw image at `path` (read-only when `read_only`); `id` is what GET_ID
    /// returns, `index` names the worker thread.
    pub fn open(path: &Path, read_only: bool, id: &str, index: usize) -> Result<Self, BlockError> {
        Self::open_limited(path, read_only, id, index, RateLimiterConfig::default())
    }

    /// Like [`Block::open`], with requests limited by `rate_limit` (bytes and operations).
    pub fn open_limited(
        path: &Path,
        read_only: bool,
        id: &str,
        index: usize,
        rate_limit: RateLimiterConfig,
    ) -> Result<Self, BlockError> {
        let (file, len) = open_image(path, read_only)?;
        let mut features = 1u64 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let disk = Arc::new(Mutex::new(Disk {
            file,
            capacity_bytes: len,
            read_only,
            id: id.to_string(),
        }));
        Ok(Self {
            control: BlockControl {
                disk: disk.clone(),
                capacity: Arc::new(AtomicU64::new(len / SECTOR_SIZE)),
                interrupt: Arc::new(Mutex::new(None)),
                limit: LimiterUpdate::default(),
            },
            disk,
            features,
            index,
            rate_limit,
            worker: None,
            metrics: Arc::default(),
        })
    }
}

struct BlockHandler {
    queue: Queue,
    interrupt: Interrupt,
    io: BlockIo,
}

/// What a request needs besides its queue.
struct BlockIo {
    mem: GuestMemoryMmap,
    disk: Arc<Mutex<Disk>>,
    throttle: Option<Throttle>,
    limit_update: LimiterUpdate,
    metrics: Arc<BlockMetrics>,
}

impl BlockIo {
    fn count(&self, kind: Option<RequestKind>, result: &Result<usize, RequestError>, bytes: u64) {
        let m = &self.metrics;
        match (&kind, result) {
            (Some(RequestKind::In), Ok(_)) => {
                m.read_count.inc();
                m.read_bytes.add(bytes);
            }
            (Some(RequestKind::Out), Ok(_)) => {
                m.write_count.inc();
                m.write_bytes.add(bytes);
            }
            (Some(RequestKind::Flush), Ok(_)) => m.flush_count.inc(),
            (_, Err(RequestError::Io(_))) => m.execute_fails.inc(),
            (_, Err(_)) => m.invalid_reqs_count.inc(),
            _ => {}
        }
    }

    /// Runs one request; returns the used length (data written plus the status byte, 0 when
    /// the chain has no room for a status byte), or `None` when the rate limiter refused it.
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Option<u32> {
        let request = match Request::parse(&self.mem, chain) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("virtio-blk: {e}");
                return Some(0);
            }
        };
        if let Some(throttle) = &mut self.throttle {
            self.limit_update.apply(throttle);
            if !throttle.admit(request.data_bytes() as u64) {
                self.metrics.rate_limiter_throttled_events.inc();
                return None;
            }
        }
        let mut disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let kind = request.kind();
        let result = request.execute(&mut disk);
        drop(disk);
        self.count(kind, &result, request.data_bytes() as u64);
        let (status, written) = match result {
            Ok(n) => (STATUS_OK, n),
            Err(e) => {
                if !matches!(e, RequestError::ReadOnly) {
                    tracing::debug!("virtio-blk: request failed: {e}");
                }
                (e.status(), 0)
            }
        };
        Some(request.complete(status, written))
    }
}

impl QueueHandler for BlockHandler {
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        vec![self.queue.state()]
    }

    fn process_queue(&mut self, _index: usize) -> Result<(), String> {
        self.io.metrics.queue_event_count.inc();
        let mem = self.io.mem.clone();
        // A request the rate limiter refused is retried when its timer fires.
        if serve_queue(&mut self.queue, &mem, |chain| self.io.handle(chain))?
            && driver_wants_interrupt(&self.queue, &mem)
        {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn watched_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.io.throttle.iter().map(|t| t.as_raw_fd()).collect()
    }

    fn process_fd(&mut self, _index: usize) -> Result<(), String> {
        if let Some(throttle) = &mut self.io.throttle {
            throttle.on_timer();
        }
        self.process_queue(0)
    }

    fn wants_fd(&self, _index: usize) -> bool {
        true
    }

    fn failed(&mut self, why: &str) {
        crate::warn_limited!("virtio-blk stopped: {why}");
        self.interrupt.signal_needs_reset();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: capacity in 512-byte sectors (le64); nothing else is offered.
        let config = self.control.capacity.load(Ordering::SeqCst).to_le_bytes();
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: write to configuration offset {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let [queue] = take_queues::<1>(ctx.queues)?;
        *self
            .control
            .interrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(ctx.interrupt.clone());
        let handler = BlockHandler {
            queue,
            interrupt: ctx.interrupt,
            io: BlockIo {
                mem: ctx.mem,
                disk: self.disk.clone(),
                // Always present, so limits set while the VM runs have a timer to use.
                throttle: Some(Throttle::new(self.rate_limit).map_err(ActivateError::Worker)?),
                limit_update: self.control.limit.clone(),
                metrics: self.metrics.clone(),
            },
        };
        let worker = Worker::spawn(format!("anvil-blk{}", self.index), ctx.queue_evts, handler)
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn quiesce(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        super::quiesce_worker(&mut self.worker)
    }

    fn reset(&mut self) {
        stop_worker(&mut self.worker);
    }
}
