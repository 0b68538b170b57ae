//! Opening KVM and checking what the host can give a VM.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// KVM API version every supported kernel reports.
const KVM_API_VERSION: i32 = 12;

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error("{} does not exist: is the kvm module loaded and is this a machine with hardware virtualization?", .0.display())]
    Missing(PathBuf),
    /// The device node exists but cannot be opened.
    #[error("no permission to open {}: add the user to the kvm group or run as root", .0.display())]
    PermissionDenied(PathBuf),
    /// Opening failed for another reason.
    #[error("cannot open {}", .path.display())]
    Open {
        /// The device node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a KVM device.
    #[error("{} is not a KVM device", .0.display())]
    NotKvm(PathBuf),
    /// KVM lacks a capability anvil needs.
    #[error("KVM lacks the {0} capability")]
    MissingCapability(&'static str),
}

/// Opens the KVM device at `path` and checks the API version and the capabilities the VMM
/// relies on.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| KvmError::Missing(path.to_path_buf()))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing(path.to_path_buf()),
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied(path.to_path_buf()),
        _ => KvmError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        },
    })?;
    // A file that is not /dev/kvm fails the version ioctl (ENOTTY), which kvm-ioctls reports
    // as a negative value.
    if kvm.get_api_version() != KVM_API_VERSION {
        return Err(KvmError::NotKvm(path.to_path_buf()));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// True when the host's KVM is PVM in a mode that emulates guest kernel code (the kvm_pvm
/// module), on which a Linux guest boots very slowly.
pub fn host_emulates_guest_kernel() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The host's physical memory in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_named() {
        let err = open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::Missing(_)), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/kvm"));
    }

    #[test]
    fn a_regular_file_is_not_kvm() {
        let err = open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, KvmError::NotKvm(_)), "{err:?}");
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib().unwrap_or(0) > 0);
    }
}
