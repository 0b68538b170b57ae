//! `anvil-uffd-handler`: an example page-fault handler for snapshot loads with the Uffd memory
//! backend (Firecracker's protocol). It listens on a Unix socket, receives the VM's
//! userfaultfd and region layout from anvil-vmm, and fills each guest page on first touch
//! from the snapshot's memory file. It exits when the VMM closes the connection.
//!
//!     anvil-uffd-handler SOCKET MEMORY_FILE
//!
//! Real handlers can do more (fetch pages over the network, prefetch, share pages between
//! clones); this one shows the protocol.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use userfaultfd::{Event, Uffd};
use vmm::snapshot::uffd::GuestRegionUffdMapping;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, mem_file] = args.as_slice() else {
        eprintln!("usage: anvil-uffd-handler SOCKET MEMORY_FILE");
        return ExitCode::from(2);
    };
    match serve(socket, mem_file) {
        Ok(pages) => {
            eprintln!("anvil-uffd-handler: served {pages} pages");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("anvil-uffd-handler: {why}");
            ExitCode::from(1)
        }
    }
}

/// The memory file, mapped read-only.
struct Mapped {
    ptr: *const u8,
    len: usize,
}

impl Mapped {
    fn new(file: &File) -> Result<Self, String> {
        let len = usize::try_from(file.metadata().map_err(|e| e.to_string())?.len())
            .map_err(|e| e.to_string())?;
        // SAFETY: a fresh read-only private mapping of a file we hold open; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "cannot map the memory file: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

fn serve(socket: &str, mem_file: &str) -> Result<u64, String> {
    let file = File::open(mem_file).map_err(|e| format!("cannot open {mem_file}: {e}"))?;
    let memory = Mapped::new(&file)?;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| format!("cannot bind {socket}: {e}"))?;
    let (stream, _) = listener
        .accept()
        .map_err(|e| format!("accept failed: {e}"))?;
    let mut buf = vec![0u8; 64 * 1024];
    let (n, fd) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("cannot receive the userfaultfd: {e}"))?;
    let fd = fd.ok_or("the VMM sent no userfaultfd")?;
    let regions: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("bad region list: {e}"))?;
    for r in &regions {
        let end = usize::try_from(r.offset)
            .ok()
            .and_then(|o| o.checked_add(r.size));
        if end.is_none_or(|e| e > memory.len) || r.page_size == 0 {
            return Err(format!("region {r:?} is outside the memory file"));
        }
    }
    // SAFETY: the descriptor was just received over SCM_RIGHTS and is owned by nobody else.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    let mut served = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {e}"));
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLIN) != 0 {
            // The VMM closed the connection: it is gone.
            return Ok(served);
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        while let Some(event) = uffd.read_event().map_err(|e| format!("read_event: {e}"))? {
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let addr = addr as u64;
            let Some(r) = regions.iter().find(|r| {
                addr >= r.base_host_virt_addr && addr - r.base_host_virt_addr < r.size as u64
            }) else {
                return Err(format!("fault at {addr:#x} outside every region"));
            };
            let page = r.page_size as u64;
            let page_addr = addr & !(page - 1);
            let offset = r.offset + (page_addr - r.base_host_virt_addr);
            // SAFETY: `offset + page` is inside the mapped file (regions were checked against
            // its length and pages lie inside regions); the destination is the faulting page
            // of a region registered with this userfaultfd.
            let result = unsafe {
                uffd.copy(
                    memory.ptr.add(usize::try_from(offset).unwrap_or(0)).cast(),
                    page_addr as *mut libc::c_void,
                    r.page_size,
                    true,
                )
            };
            match result {
                Ok(_) => served += 1,
                // Another fault on the same page was served first.
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {}
                Err(e) => return Err(format!("cannot fill page {page_addr:#x}: {e}")),
            }
        }
    }
}
