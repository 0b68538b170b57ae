//! The Uffd memory backend of snapshot loads, with Firecracker's protocol: guest memory is
//! anonymous and registered with a userfaultfd; the fd and the region layout go to a
//! page-fault handler process over the Unix socket at `backend_path`, and that process fills
//! each page on first touch (from the memory file, or however it likes).
//!
//! The message is JSON, a list of regions
//! `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}` (`offset` is the
//! region's offset in the memory file), sent with the userfaultfd as SCM_RIGHTS.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use devices::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use userfaultfd::{Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::state::MemoryRegionState;
use super::SnapshotError;

/// One region as the handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Where the region is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Its size in bytes.
    pub size: usize,
    /// Its offset in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: usize,
    /// Page size in KiB (Firecracker sends both).
    pub page_size_kib: usize,
}

/// Guest memory served by a page-fault handler; the userfaultfd and the connection stay
/// open for the VM's lifetime (closing the fd would turn missing pages into zero pages).
#[derive(Debug)]
pub struct UffdMemory {
    /// The guest memory.
    pub memory: GuestMemoryMmap,
    /// The userfaultfd.
    pub uffd: Uffd,
    /// The connection to the handler.
    pub stream: UnixStream,
}

fn fail(path: &Path, why: String) -> SnapshotError {
    SnapshotError::Memory {
        path: path.to_path_buf(),
        why,
    }
}

/// Maps anonymous guest memory for `layout`, registers it with a new userfaultfd and hands
/// that to the handler listening at `socket`.
pub fn connect(socket: &Path, layout: &[MemoryRegionState]) -> Result<UffdMemory, SnapshotError> {
    let ranges: Vec<(vm_memory::GuestAddress, usize)> = layout
        .iter()
        .map(|r| {
            usize::try_from(r.len)
                .map(|len| (vm_memory::GuestAddress(r.guest_addr), len))
                .map_err(|_| fail(socket, "region too large".into()))
        })
        .collect::<Result<_, _>>()?;
    let memory = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| fail(socket, format!("cannot map guest memory: {e}")))?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // KVM touches guest memory from the kernel: faults there must reach the handler too.
        .user_mode_only(false)
        .create()
        .map_err(|e| fail(socket, format!("cannot create a userfaultfd: {e}")))?;
    // SAFETY: a page size query has no side effects.
    let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut mappings = Vec::new();
    for (region, saved) in memory.iter().zip(layout) {
        let size = usize::try_from(region.len()).unwrap_or(usize::MAX);
        uffd.register(region.as_ptr().cast(), size)
            .map_err(|e| fail(socket, format!("cannot register guest memory: {e}")))?;
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: region.as_ptr() as u64,
            size,
            offset: saved.file_offset,
            page_size,
            page_size_kib: page_size / 1024,
        });
    }
    let stream = UnixStream::connect(socket).map_err(|e| {
        fail(
            socket,
            format!("cannot connect to the page-fault handler: {e}"),
        )
    })?;
    let message = serde_json::to_vec(&mappings)
        .map_err(|e| fail(socket, format!("cannot encode the regions: {e}")))?;
    stream
        .send_with_fd(message.as_slice(), uffd.as_raw_fd())
        .map_err(|e| fail(socket, format!("cannot send the userfaultfd: {e}")))?;
    Ok(UffdMemory {
        memory,
        uffd,
        stream,
    })
}
