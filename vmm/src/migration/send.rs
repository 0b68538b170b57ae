//! The source side: a thread that sends memory in pre-copy rounds while the guest runs, then
//! asks the event loop to stop the guest and hand over its state ([`SourceEvent::Stop`]),
//! sends the last dirty pages and the state, and waits for the destination's
//! acknowledgements. The event loop hears how it ended ([`SourceEvent::Finished`]) and, on
//! failure, resumes the guest.

use std::io::{BufWriter, Write};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::GuestMemoryMmap;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{self, Kind, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::{update, MigrationError, MigrationSendParams, MigrationUrl, SharedStatus};
use crate::controller::error_chain;

/// What the migration thread tells the event loop.
#[derive(Debug)]
pub enum SourceEvent {
    /// Pre-copy is done: stop the guest and its devices and answer with the encoded state.
    Stop {
        /// Where the state (or why it cannot be saved) goes.
        reply: Sender<Result<Vec<u8>, String>>,
    },
    /// The migration ended: `Ok` once the destination runs the guest.
    Finished(Result<(), String>),
}

/// The thread's way to the event loop: a channel and an eventfd the loop watches.
#[derive(Debug)]
pub struct SourceLink {
    /// Events.
    pub tx: Sender<SourceEvent>,
    /// Written after each event.
    pub evt: EventFd,
}

impl SourceLink {
    fn send(&self, event: SourceEvent) {
        // The loop is gone only when the VMM stops; nothing is left to tell then.
        if self.tx.send(event).is_ok() {
            let _ = self.evt.write(1);
        }
    }
}

/// Everything the migration thread needs.
#[derive(Debug)]
pub struct SendJob {
    /// Where to.
    pub url: MigrationUrl,
    /// The request.
    pub params: MigrationSendParams,
    /// The VM (for KVM's dirty log).
    pub vm: Arc<VmFd>,
    /// Guest memory (its bitmaps hold the devices' writes).
    pub memory: GuestMemoryMmap,
    /// The VM's configuration as `GET /vm/config` gives it.
    pub config_json: String,
    /// KVM already logs dirty pages (diff snapshots are on).
    pub logging: bool,
    /// Anonymous guest memory the guest never touched is zero (not so when a userfaultfd
    /// handler fills pages on first touch).
    pub untouched_is_zero: bool,
    /// Progress for `GET /migration`.
    pub status: SharedStatus,
    /// The event loop.
    pub link: SourceLink,
}

/// Tells the event loop the migration failed if the thread ends without saying how it
/// ended (a panic), so the guest is never left stopped.
struct FinishGuard<'a> {
    link: &'a SourceLink,
    done: bool,
}

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.link.send(SourceEvent::Finished(Err(
                "the migration thread failed".into()
            )));
        }
    }
}

/// Runs a migration to its end and reports it to the event loop.
pub fn run(job: SendJob) {
    let mut guard = FinishGuard {
        link: &job.link,
        done: false,
    };
    let started = Instant::now();
    let result = migrate(&job, started);
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    update(&job.status, |s| {
        s.total_ms = Some(total_ms);
        match &result {
            Ok(()) => s.state = super::MigrationState::Completed,
            Err(e) => {
                s.state = super::MigrationState::Failed;
                s.error = Some(error_chain(e));
            }
        }
    });
    match &result {
        Ok(()) => tracing::info!(total_ms, "migration completed"),
        Err(e) => tracing::warn!("migration failed: {}", error_chain(e)),
    }
    guard.done = true;
    job.link
        .send(SourceEvent::Finished(result.map_err(|e| error_chain(&e))));
}

/// Writes pages and frames, counting bytes and keeping to the bandwidth limit.
struct PageWriter<'a> {
    out: BufWriter<super::Stream>,
    status: &'a SharedStatus,
    limit: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
    buf: Vec<u8>,
}

impl PageWriter<'_> {
    fn counted(&mut self, bytes: u64, pages: u64) -> Result<(), MigrationError> {
        update(self.status, |s| {
            s.bytes += bytes;
            s.pages += pages;
        });
        if let Some(limit) = self.limit {
            self.window_bytes += bytes;
            let due = Duration::from_secs_f64(self.window_bytes as f64 / limit as f64);
            let elapsed = self.window_start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
            if self.window_start.elapsed() > Duration::from_secs(1) {
                self.window_start = Instant::now();
                self.window_bytes = 0;
            }
        }
        Ok(())
    }

    fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), MigrationError> {
        protocol::write_frame(&mut self.out, kind, payload)?;
        self.counted(8 + payload.len() as u64, 0)
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.out.flush().map_err(protocol::ProtocolError::Io)?;
        Ok(())
    }

    /// Sends pages `first..first + count` of `region` (at most one frame's worth), split
    /// into runs of zero and non-zero pages; zero runs are skipped when `skip_zero` (the
    /// destination's memory starts zeroed).
    fn pages(
        &mut self,
        region: &devices::GuestRegionMmap,
        first: u64,
        count: u64,
        skip_zero: bool,
    ) -> Result<u64, MigrationError> {
        let len = usize::try_from(count * PAGE_SIZE).unwrap_or(usize::MAX);
        self.buf.resize(len, 0);
        let slice = region
            .get_slice(MemoryRegionAddress(first * PAGE_SIZE), len)
            .map_err(|e| MigrationError::Source(format!("cannot read guest memory: {e}")))?;
        slice.copy_to(&mut self.buf[..len]);
        let page = protocol::PAGE_BYTES;
        let zero: Vec<bool> = self.buf[..len]
            .chunks_exact(page)
            .map(|p| p.iter().all(|&b| b == 0))
            .collect();
        let base = region.start_addr().raw_value();
        let mut sent = 0;
        let mut i = 0usize;
        while i < zero.len() {
            let mut j = i + 1;
            while j < zero.len() && zero[j] == zero[i] {
                j += 1;
            }
            let n = u32::try_from(j - i).unwrap_or(MAX_PAGES_PER_FRAME);
            let addr = base + (first + i as u64) * PAGE_SIZE;
            if zero[i] {
                if !skip_zero {
                    protocol::write_pages_header(&mut self.out, addr, n, true)?;
                    self.counted(24, u64::from(n))?;
                    sent += u64::from(n);
                }
            } else {
                protocol::write_pages_header(&mut self.out, addr, n, false)?;
                self.out
                    .write_all(&self.buf[i * page..j * page])
                    .map_err(protocol::ProtocolError::Io)?;
                self.counted(24 + (j - i) as u64 * PAGE_SIZE, u64::from(n))?;
                sent += u64::from(n);
            }
            i = j;
        }
        Ok(sent)
    }

    /// Sends the pages set in `bitmaps` (one per region, a bit per page).
    fn dirty(
        &mut self,
        memory: &GuestMemoryMmap,
        bitmaps: &[Vec<u64>],
    ) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for (region, bitmap) in memory.iter().zip(bitmaps) {
            let pages = region.len() / PAGE_SIZE;
            let mut run: Option<(u64, u64)> = None;
            for page in crate::snapshot::set_pages(bitmap).filter(|&p| p < pages) {
                run = match run {
                    Some((start, n)) if start + n == page && n < u64::from(MAX_PAGES_PER_FRAME) => {
                        Some((start, n + 1))
                    }
                    Some((start, n)) => {
                        sent += self.pages(region, start, n, false)?;
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            }
            if let Some((start, n)) = run {
                sent += self.pages(region, start, n, false)?;
            }
        }
        Ok(sent)
    }
}

/// The pages written since the last call, one bitmap per region (both logs cleared).
fn take_dirty(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, MigrationError> {
    crate::snapshot::take_dirty_pages(memory, vm).map_err(|e| MigrationError::Source(e.to_string()))
}

fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn merge(into: &mut [Vec<u64>], from: Vec<Vec<u64>>) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

fn migrate(job: &SendJob, started: Instant) -> Result<(), MigrationError> {
    let stream = job.url.connect()?;
    stream
        .set_timeouts(Some(super::PEER_TIMEOUT))
        .map_err(protocol::ProtocolError::Io)?;
    let mut input = stream.try_clone().map_err(protocol::ProtocolError::Io)?;
    let mut tx = PageWriter {
        // Small: page data larger than the buffer is written straight from the page buffer.
        out: BufWriter::with_capacity(64 << 10, stream),
        status: &job.status,
        limit: job.params.bandwidth_mib_s.map(|m| m << 20),
        window_start: Instant::now(),
        window_bytes: 0,
        buf: Vec::new(),
    };
    let result = precopy_and_finish(job, &mut tx, &mut input, started);
    if let Err(e) = &result {
        // Tell the destination to discard what it has; it may be gone already.
        if !matches!(
            e,
            MigrationError::Protocol(protocol::ProtocolError::Refused(_))
        ) {
            let _ = protocol::write_error(&mut tx.out, &error_chain(e));
            let _ = tx.out.flush();
        }
    }
    result
}

fn precopy_and_finish(
    job: &SendJob,
    tx: &mut PageWriter<'_>,
    input: &mut super::Stream,
    started: Instant,
) -> Result<(), MigrationError> {
    let vmm_version = crate::controller::VMM_VERSION;
    protocol::write_hello(&mut tx.out, vmm_version)?;
    tx.flush()?;
    let peer = protocol::expect_hello(input)?;
    tracing::info!(peer_version = %peer, url = ?job.url, "migration: connected");
    tx.frame(Kind::Config, job.config_json.as_bytes())?;
    tx.flush()?;
    protocol::expect_ok(input)?;

    // From here on every page the guest or a device writes is logged.
    if !job.logging {
        crate::memory::register_with_kvm(&job.vm, &job.memory, true)
            .map_err(|e| MigrationError::Source(error_chain(&e)))?;
    }
    take_dirty(&job.vm, &job.memory)?;

    let downtime =
        Duration::from_millis(job.params.downtime_ms.unwrap_or(super::DEFAULT_DOWNTIME_MS));
    let max_rounds = job.params.max_rounds.unwrap_or(super::DEFAULT_MAX_ROUNDS);
    // Round 1: every page that is not zero. Pages of anonymous memory the guest never
    // touched are zero without reading them (which would map them).
    let round_start = Instant::now();
    let before = super::snapshot(&job.status).bytes;
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .ok()
        .filter(|_| job.untouched_is_zero);
    for region in job.memory.iter() {
        let pages = region.len() / PAGE_SIZE;
        let anonymous = region.file_offset().is_none();
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(u64::from(MAX_PAGES_PER_FRAME));
            match pagemap.as_ref().filter(|_| anonymous) {
                Some(map) => {
                    for (start, count) in touched_runs(map, region, first, n) {
                        tx.pages(region, start, count, true)?;
                    }
                }
                None => {
                    tx.pages(region, first, n, true)?;
                }
            }
            first += n;
        }
    }
    tx.flush()?;
    let mut rounds = 1u32;
    update(&job.status, |s| s.rounds = rounds);
    let mut rate = rate_of(super::snapshot(&job.status).bytes - before, round_start);
    let mut pending = take_dirty(&job.vm, &job.memory)?;
    // Later rounds: what was dirtied during the previous one, until what is left fits in
    // the downtime (half of it: the state and the destination's restore take the rest).
    while rounds < max_rounds {
        let bytes = count(&pending) * PAGE_SIZE;
        let estimate = Duration::from_secs_f64(bytes as f64 / rate);
        tracing::debug!(
            rounds,
            dirty_bytes = bytes,
            ?estimate,
            "migration: pre-copy round"
        );
        if estimate <= downtime / 2 {
            break;
        }
        let round_start = Instant::now();
        let before = super::snapshot(&job.status).bytes;
        tx.dirty(&job.memory, &pending)?;
        tx.flush()?;
        rounds += 1;
        update(&job.status, |s| s.rounds = rounds);
        rate = rate_of(super::snapshot(&job.status).bytes - before, round_start);
        pending = take_dirty(&job.vm, &job.memory)?;
    }

    // Stop the guest: from here until the destination's acknowledgement is the downtime.
    let stopped = Instant::now();
    let (reply, answer) = channel();
    job.link.send(SourceEvent::Stop { reply });
    let state = answer
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| MigrationError::Source("the VMM did not stop the guest".into()))?
        .map_err(MigrationError::Source)?;
    merge(&mut pending, take_dirty(&job.vm, &job.memory)?);
    let final_pages = tx.dirty(&job.memory, &pending)?;
    tx.frame(Kind::State, &state)?;
    tx.flush()?;
    protocol::expect_ok(input)?;
    protocol::write_frame(&mut tx.out, Kind::Complete, &[])?;
    tx.flush()?;
    protocol::expect_ok(input)?;
    let downtime_ms = stopped.elapsed().as_secs_f64() * 1000.0;
    update(&job.status, |s| {
        s.final_pages = Some(final_pages);
        s.downtime_ms = Some(downtime_ms);
    });
    tracing::info!(
        rounds,
        final_pages,
        downtime_ms,
        total_ms = started.elapsed().as_secs_f64() * 1000.0,
        "migration: the destination runs the guest"
    );
    Ok(())
}

/// The runs of pages `first..first + count` of `region` that are present or swapped out
/// (per /proc/self/pagemap); untouched anonymous pages are left out. When the map cannot be
/// read, the whole range is one run.
fn touched_runs(
    pagemap: &std::fs::File,
    region: &devices::GuestRegionMmap,
    first: u64,
    count: u64,
) -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let vaddr = region.as_ptr() as u64 + first * PAGE_SIZE;
    let mut raw = vec![0u8; usize::try_from(count * 8).unwrap_or(0)];
    if pagemap
        .read_exact_at(&mut raw, vaddr / PAGE_SIZE * 8)
        .is_err()
    {
        return vec![(first, count)];
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, entry) in raw.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(entry);
        if u64::from_le_bytes(word) & (PRESENT | SWAPPED) == 0 {
            continue;
        }
        let page = first + i as u64;
        match runs.last_mut() {
            Some((start, n)) if *start + *n == page => *n += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

/// Bytes per second over a round (a round too short to measure counts as fast).
fn rate_of(bytes: u64, since: Instant) -> f64 {
    let secs = since.elapsed().as_secs_f64().max(1e-4);
    (bytes as f64 / secs).max(1.0 * 1024.0 * 1024.0)
}
