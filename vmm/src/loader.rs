//! Loading the guest kernel (ELF vmlinux or bzImage), the initrd and the command line into
//! guest memory, and choosing the boot protocol.

use std::fs::File;
use std::path::{Path, PathBuf};

use arch::boot::{BootProtocol, InitrdConfig};
use arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use devices::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config::BootProtocolChoice;
use crate::file_pages::{FileMappings, MappingReader};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel
/// (Linux boot protocol, "64-bit BOOT PROTOCOL").
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `initrd_addr_max` when the kernel states none (an ELF vmlinux).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// Errors of kernel, initrd and command-line loading.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .path.display())]
    KernelOpen {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("kernel {} is not a kernel: neither an ELF vmlinux nor a bzImage", .0.display())]
    NotAKernel(PathBuf),
    /// The kernel image is malformed or does not fit in guest memory.
    #[error("cannot load kernel {}", .path.display())]
    KernelLoad {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: loader::Error,
    },
    /// PVH was asked for but the kernel has no PVH entry.
    #[error("kernel {} has no PVH entry note; use the linux64 boot protocol", .0.display())]
    NoPvhEntry(PathBuf),
    /// PVH needs an ELF kernel.
    #[error("kernel {} is a bzImage, which has no PVH entry", .0.display())]
    PvhNeedsElf(PathBuf),
    /// The initrd cannot be read.
    #[error("cannot read initrd {}", .path.display())]
    InitrdOpen {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory.
    #[error("initrd {} ({size} bytes) does not fit in guest memory", .path.display())]
    InitrdTooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Why it does not fit.
        #[source]
        source: arch::memory::MemoryError,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {} into guest memory", .path.display())]
    InitrdCopy {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is invalid (too long, or contains bytes a kernel cannot take).
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line cannot be written to guest memory.
    #[error("cannot write the kernel command line to guest memory")]
    CmdlineLoad(#[source] loader::Error),
}

/// What was loaded and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Where the boot vCPU starts.
    pub entry: GuestAddress,
    /// The boot protocol the entry expects.
    pub protocol: BootProtocol,
    /// The bzImage setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// First byte past the kernel image.
    pub kernel_end: u64,
}

/// Checks that the kernel and initrd files can be read, before any host resource is taken,
/// so that a mistyped path is reported as such.
pub fn check_files(kernel: &Path, initrd: Option<&Path>) -> Result<(), LoaderError> {
    let check = |path: &Path| -> std::io::Result<()> {
        let file = File::open(path)?;
        if file.metadata()?.is_dir() {
            return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
        }
        Ok(())
    };
    check(kernel).map_err(|source| LoaderError::KernelOpen {
        path: kernel.to_path_buf(),
        source,
    })?;
    if let Some(initrd) = initrd {
        check(initrd).map_err(|source| LoaderError::InitrdOpen {
            path: initrd.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Loads the kernel at `path`, trying ELF first and then bzImage. Whole pages of the
/// image may be mapped from the file rather than copied; they are added to `mapped` (see
/// [`crate::file_pages`]).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    choice: BootProtocolChoice,
    mapped: &mut FileMappings,
) -> Result<LoadedKernel, LoaderError> {
    let open_error = |source| LoaderError::KernelOpen {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_error)?;
    let load_error = |source| LoaderError::KernelLoad {
        path: path.to_path_buf(),
        source,
    };
    let highmem = Some(GuestAddress(HIMEM_START));
    let elf = Elf::load(
        mem,
        None,
        &mut MappingReader::new(&file, path, mem, mapped).map_err(open_error)?,
        highmem,
    );
    match elf {
        Ok(result) => {
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
                _ => None,
            };
            let (entry, protocol) = match (choice, pvh_entry) {
                (BootProtocolChoice::Auto | BootProtocolChoice::Pvh, Some(addr)) => {
                    (addr, BootProtocol::Pvh)
                }
                (BootProtocolChoice::Pvh, None) => {
                    return Err(LoaderError::NoPvhEntry(path.to_path_buf()))
                }
                _ => (result.kernel_load, BootProtocol::Linux64),
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                setup_header: None,
                kernel_end: result.kernel_end,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            match BzImage::load(
                mem,
                None,
                &mut MappingReader::new(&file, path, mem, mapped).map_err(open_error)?,
                highmem,
            ) {
                Ok(_) if choice == BootProtocolChoice::Pvh => {
                    Err(LoaderError::PvhNeedsElf(path.to_path_buf()))
                }
                Ok(result) => Ok(LoadedKernel {
                    entry: result
                        .kernel_load
                        .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
                        .ok_or_else(|| load_error(loader::Error::MemoryOverflow))?,
                    protocol: BootProtocol::Linux64,
                    setup_header: result.setup_header,
                    kernel_end: result.kernel_end,
                }),
                Err(loader::Error::Bzimage(
                    loader::bzimage::Error::InvalidBzImage
                    | loader::bzimage::Error::ReadBzImageHeader
                    | loader::bzimage::Error::SeekBzImageHeader,
                )) => Err(LoaderError::NotAKernel(path.to_path_buf())),
                Err(e) => Err(load_error(e)),
            }
        }
        Err(loader::Error::Elf(loader::elf::Error::ReadElfHeader)) => {
            Err(LoaderError::NotAKernel(path.to_path_buf()))
        }
        Err(e) => Err(load_error(e)),
    }
}

/// Reads the initrd at `path` into guest memory, placed where the kernel can reach it;
/// whole pages may be mapped from the file, and are then added to `mapped`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mapped: &mut FileMappings,
) -> Result<InitrdConfig, LoaderError> {
    let open_error = |source| LoaderError::InitrdOpen {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let too_large = |source| LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        source,
    };
    // Lossless on 64-bit hosts; a size that saturates is refused by the placement below.
    let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
    let address = arch::memory::initrd_load_addr(mem, size_usize, kernel.kernel_end, addr_max)
        .map_err(too_large)?;
    let mut reader = MappingReader::new(&file, path, mem, mapped).map_err(open_error)?;
    mem.read_exact_volatile_from(address, &mut reader, size_usize)
        .map_err(|source| LoaderError::InitrdCopy {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(InitrdConfig {
        address,
        size: size_usize,
    })
}

/// Writes `text` as the kernel command line; returns its address and size (NUL included).
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    text: &str,
) -> Result<(GuestAddress, usize), LoaderError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    if !text.trim().is_empty() {
        cmdline
            .insert_str(text.trim())
            .map_err(LoaderError::Cmdline)?;
    }
    let addr = GuestAddress(CMDLINE_START);
    loader::load_cmdline(mem, addr, &cmdline).map_err(LoaderError::CmdlineLoad)?;
    let len = cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    Ok((addr, len))
}
