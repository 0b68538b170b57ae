//! A tap device opened by name, with the 12-byte virtio-net header on every frame
//! (IFF_VNET_HDR), as virtio-net's data path wants it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::GuestSlice;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors of opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No network interface of that name exists.
    #[error(
        "tap device {0:?} does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap`)"
    )]
    Missing(String),
    /// The interface exists but is not a tap.
    #[error("network interface {0:?} is not a tap device")]
    NotATap(String),
    /// The name cannot be an interface name.
    #[error("invalid tap name {0:?}")]
    BadName(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl on the tap failed.
    #[error("cannot set up tap {name:?}: {what}")]
    Ioctl {
        /// The tap's name.
        name: String,
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (linux/if_tun.h), as the c_short ifr_flags takes them.
const TAP_FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000;

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// The most guest-memory pieces [`Tap::write_frame_slices`] takes (Linux's own virtio-net
/// driver uses at most MAX_SKB_FRAGS + 2 = 19 descriptors per frame).
pub const MAX_FRAME_PIECES: usize = 64;

/// Size of `struct virtio_net_hdr_v1`, which the tap reads and writes in front of each frame
/// (the 12 given to TUNSETVNETHDRSZ in [`Tap::open`]).
pub const VNET_HDR_LEN: usize = 12;

impl Tap {
    /// Opens the existing tap `name` (non-blocking, with virtio-net headers).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
            return Err(TapError::BadName(name.to_string()));
        }
        // TUNSETIFF would create a missing tap; a VMM must attach to the one the user made.
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(TapError::Missing(name.to_string()));
        }
        if !sys.join("tun_flags").exists() {
            return Err(TapError::NotATap(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: TAP_FLAGS,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Self {
            file,
            name: name.to_string(),
        };
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is (name, flags, padding to its size),
        // and the fd is an open /dev/net/tun.
        let ret = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        tap.check(ret, "attach (TUNSETIFF)")?;
        let hdr_len: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `hdr_len`.
        let ret =
            unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        tap.check(ret, "set the virtio-net header size")?;
        Ok(tap)
    }

    fn check(&self, ret: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets the offloads the tap may hand us (TUN_F_* flags); 0 turns them all off.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is an attached tap.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        self.check(ret, "set offloads")
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    /// Writes one frame (header included) gathered straight from guest memory, at most
    /// [`MAX_FRAME_PIECES`] slices (`InvalidInput` beyond that).
    pub fn write_frame_slices(&mut self, slices: &[GuestSlice<'_>]) -> std::io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_FRAME_PIECES];
        if slices.len() > MAX_FRAME_PIECES {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        for (v, s) in iov.iter_mut().zip(slices) {
            v.iov_base = s.ptr_guard().as_ptr().cast_mut().cast();
            v.iov_len = s.len();
        }
        let count = libc::c_int::try_from(slices.len()).unwrap_or(0);
        // SAFETY: the first `count` iovecs each cover one slice of guest memory, which
        // vm-memory checked against the mapping and which stays mapped while the device runs;
        // the kernel only reads them (and copies the frame before this returns).
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
