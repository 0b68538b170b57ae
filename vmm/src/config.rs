//! The configuration of one VM, shared by the CLI (and later the API and config files), and
//! the one place where it is validated.

use std::path::PathBuf;

use arch::layout::MAX_VCPUS;
use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

/// The kernel command line used when the user gives none: a serial console, reset through
/// the i8042 on reboot, reboot at once on panic, and no time spent probing hardware a microVM
/// does not have.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd \
     tsc=reliable no_timer_check quiet";

/// Which boot protocol to use for the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocolChoice {
    /// PVH when the ELF kernel has a PVH note, else the 64-bit Linux boot protocol.
    #[default]
    Auto,
    /// The 64-bit Linux boot protocol (zero page), even if a PVH note exists.
    Linux64,
    /// PVH; refused when the kernel has no PVH note.
    Pvh,
}

/// Where a custom CPU template comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuTemplateSource {
    /// A JSON file (`--cpu-template`).
    File(PathBuf),
    /// JSON text (`PUT /cpu-config`, the configuration file).
    Inline(String),
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Optional Firecracker-style custom CPU template (JSON).
    pub cpu_template: Option<CpuTemplateSource>,
    /// Boot protocol selection.
    pub boot_protocol: BootProtocolChoice,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Give the guest a virtio-rng device.
    pub rng: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// How strictly seccomp filters the VMM's threads (on by default).
    pub seccomp_level: crate::seccomp::SeccompLevel,
    /// A file or named pipe for Firecracker-style metrics lines.
    pub metrics_path: Option<PathBuf>,
    /// KVM logs the pages the guest dirties (for diff snapshots).
    pub track_dirty_pages: bool,
}

/// A virtio-vsock device in Firecracker's hybrid style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// Host Unix socket path; guest connections to host port P go to `<path>_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Parses `cid=N,socket=PATH`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::VsockSyntax {
            text: text.to_string(),
            why,
        };
        let mut cid = None;
        let mut path = None;
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("cid", c)) => {
                    cid = Some(
                        c.parse::<u64>()
                            .map_err(|_| bad(format!("bad cid {c:?}")))?,
                    )
                }
                Some(("socket", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                _ => return Err(bad(format!("unknown or empty option {part:?}"))),
            }
        }
        let guest_cid = cid.ok_or_else(|| bad("cid=N is missing".into()))?;
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(bad(format!(
                "cid {guest_cid} is reserved: it must be 3 to 4294967295"
            )));
        }
        let uds_path = path.ok_or_else(|| bad("socket=PATH is missing".into()))?;
        Ok(Self {
            guest_cid,
            uds_path,
        })
    }
}

/// One virtio-net interface on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the tap device on the host (it must exist).
    pub tap: String,
    /// The guest's MAC address; a locally administered one is made up when absent.
    pub mac: Option<[u8; 6]>,
    /// Limits on what the guest receives.
    pub rx_rate: RateLimiterConfig,
    /// Limits on what the guest sends.
    pub tx_rate: RateLimiterConfig,
    /// The interface's ID (the API's `iface_id`), naming it in metrics; `eth<index>` when
    /// absent.
    pub id: Option<String>,
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub(crate) fn format_mac(mac: &[u8; 6]) -> String {
    let text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    text.join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::NetSyntax {
            text: text.to_string(),
            why,
        };
        let mut tap = None;
        let mut mac = None;
        let mut rx_rate = RateLimiterConfig::default();
        let mut tx_rate = RateLimiterConfig::default();
        let bucket = |value: &str| parse_limit(value).map_err(bad);
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("rx_bw", b)) => rx_rate.bandwidth = bucket(b)?,
                Some(("rx_ops", b)) => rx_rate.ops = bucket(b)?,
                Some(("tx_bw", b)) => tx_rate.bandwidth = bucket(b)?,
                Some(("tx_ops", b)) => tx_rate.ops = bucket(b)?,
                Some(("mac", m)) => {
                    let parsed =
                        parse_mac(m).ok_or_else(|| bad(format!("bad MAC address {m:?}")))?;
                    if parsed[0] & 1 != 0 {
                        return Err(bad(format!("MAC address {m} is a multicast address")));
                    }
                    mac = Some(parsed);
                }
                _ => return Err(bad(format!("unknown or empty option {part:?}"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("tap=NAME is missing".into()))?;
        Ok(Self {
            tap,
            mac,
            rx_rate,
            tx_rate,
            id: None,
        })
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// The guest's root file system (`root=/dev/vdX` is added to the command line).
    pub root: bool,
    /// Name of the disk; also the serial the guest reads with GET_ID (first 20 bytes).
    pub id: String,
    /// Limits on the disk's bandwidth and operations.
    pub rate_limit: RateLimiterConfig,
}

/// [`parse_bucket`] with the message a `--disk` or `--net` option gives when it fails.
fn parse_limit(value: &str) -> Result<TokenBucketConfig, String> {
    parse_bucket(value)
        .ok_or_else(|| format!("bad rate limit {value:?}: expected SIZE:REFILL_MS[:BURST]"))
}

/// Parses a token bucket `SIZE:REFILL_MS[:BURST]`; SIZE and BURST take K, M and G suffixes
/// (powers of 1024).
pub fn parse_bucket(text: &str) -> Option<TokenBucketConfig> {
    let number = |t: &str| -> Option<u64> {
        let (digits, mult) = match t.char_indices().last()? {
            (i, 'K' | 'k') => (&t[..i], 1u64 << 10),
            (i, 'M' | 'm') => (&t[..i], 1 << 20),
            (i, 'G' | 'g') => (&t[..i], 1 << 30),
            _ => (t, 1),
        };
        digits.parse::<u64>().ok()?.checked_mul(mult)
    };
    let mut parts = text.split(':');
    let size = number(parts.next()?)?;
    let refill_time_ms = parts.next()?.parse().ok()?;
    let one_time_burst = match parts.next() {
        Some(b) => number(b)?,
        None => 0,
    };
    if parts.next().is_some() || size == 0 || refill_time_ms == 0 {
        return None;
    }
    Some(TokenBucketConfig {
        size,
        one_time_burst,
        refill_time_ms,
    })
}

/// Parses `--disk` values in order (the default IDs follow their positions).
pub fn parse_disks(texts: &[String]) -> Result<Vec<DiskConfig>, ConfigError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| DiskConfig::parse(text, i))
        .collect()
}

/// Parses `--net` values in order.
pub fn parse_nets(texts: &[String]) -> Result<Vec<NetConfig>, ConfigError> {
    texts.iter().map(|text| NetConfig::parse(text)).collect()
}

/// Longest disk ID accepted.
pub const MAX_DISK_ID_LEN: usize = 64;

impl DiskConfig {
    /// Parses `path=PATH[,ro][,root][,id=ID]`; the ID defaults to `disk<index>`.
    pub fn parse(text: &str, index: usize) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::DiskSyntax {
            text: text.to_string(),
            why,
        };
        let mut path = None;
        let mut read_only = false;
        let mut root = false;
        let mut id = None;
        let mut rate_limit = RateLimiterConfig::default();
        let bucket = |value: &str| parse_limit(value).map_err(bad);
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("id", i)) => id = Some(i.to_string()),
                Some(("bw", b)) => rate_limit.bandwidth = bucket(b)?,
                Some(("ops", b)) => rate_limit.ops = bucket(b)?,
                None if part == "ro" => read_only = true,
                None if part == "root" => root = true,
                _ => return Err(bad(format!("unknown or empty option {part:?}"))),
            }
        }
        let path = path.ok_or_else(|| bad("path=PATH is missing".into()))?;
        let id = id.unwrap_or_else(|| format!("disk{index}"));
        if id.is_empty()
            || id.len() > MAX_DISK_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad(format!(
                "id {id:?} must be 1 to {MAX_DISK_ID_LEN} letters, digits, '_' or '-'"
            )));
        }
        Ok(Self {
            path,
            read_only,
            root,
            id,
            rate_limit,
        })
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpu_count: 1,
            mem_size_mib: 128,
            cpu_template: None,
            boot_protocol: BootProtocolChoice::Auto,
            kvm_device: PathBuf::from("/dev/kvm"),
            rng: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            seccomp_level: crate::seccomp::SeccompLevel::default(),
            metrics_path: None,
            track_dirty_pages: false,
        }
    }
}

/// A configuration value that is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The memory size text cannot be parsed.
    #[error("invalid memory size {0:?}: expected a number of MiB or a size such as 512M or 2G")]
    MemSizeSyntax(String),
    /// The memory size is zero.
    #[error("memory size must be at least 1 MiB")]
    MemSizeZero,
    /// The memory size is larger than anvil supports.
    #[error("memory size {mib} MiB is larger than the maximum of {max} MiB")]
    MemSizeTooLarge {
        /// Requested size.
        mib: u64,
        /// The limit.
        max: u64,
    },
    /// The vCPU count is zero.
    #[error("vCPU count must be at least 1")]
    VcpuCountZero,
    /// The vCPU count is beyond anvil's limit.
    #[error("vCPU count {count} is larger than the maximum of {max}")]
    VcpuCountTooLarge {
        /// Requested count.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// A `--disk` value cannot be parsed.
    #[error("invalid disk {text:?}: {why}")]
    DiskSyntax {
        /// The value.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// A `--net` value cannot be parsed.
    #[error("invalid network interface {text:?}: {why}")]
    NetSyntax {
        /// The value.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// A `--vsock` value cannot be parsed or is out of range.
    #[error("invalid vsock {text:?}: {why}")]
    VsockSyntax {
        /// The value.
        text: String,
        /// What is wrong.
        why: String,
    },
    /// Two interfaces use the same tap.
    #[error("tap {0:?} is used twice")]
    DuplicateTap(String),
    /// Two interfaces have the same MAC address.
    #[error("MAC address {0} is used twice")]
    DuplicateMac(String),
    /// Two disks have the same ID.
    #[error("disk id {0:?} is used twice")]
    DuplicateDiskId(String),
    /// More than one disk is marked as the root.
    #[error("more than one disk is marked root")]
    SeveralRootDisks,
    /// More virtio devices than the machine has slots and IRQs for.
    #[error("too many virtio devices: at most {0}")]
    TooManyDevices(usize),
    /// The command line has a byte a kernel command line cannot carry.
    #[error("kernel command line has a non-printable or non-ASCII character at byte {0}")]
    CmdlineCharacter(usize),
    /// The command line is too long for the boot protocol.
    #[error("kernel command line is {len} bytes, longer than the maximum of {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Largest guest RAM anvil accepts in a configuration (1 TiB); the host's own memory is
/// checked when the VM is built.
pub const MAX_MEM_SIZE_MIB: u64 = 1 << 20;

/// Parses a memory size: a plain number of MiB, or a number with a `K`, `M`, `G` or `T`
/// suffix (optionally followed by `i` and/or `B`). Returns MiB; sizes must be whole MiB.
pub fn parse_mem_size_mib(text: &str) -> Result<u64, ConfigError> {
    let syntax = || ConfigError::MemSizeSyntax(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let value: u64 = num.parse().map_err(|_| syntax())?;
    let unit = suffix.trim_end_matches(['B', 'b']).trim_end_matches('i');
    let kib: u64 = match unit {
        "" | "M" | "m" => value.checked_mul(1024),
        "K" | "k" => value.is_multiple_of(1024).then_some(value),
        "G" | "g" => value.checked_mul(1024 * 1024),
        "T" | "t" => value.checked_mul(1024 * 1024 * 1024),
        _ => None,
    }
    .ok_or_else(syntax)?;
    let mib = kib / 1024;
    if mib == 0 {
        return Err(ConfigError::MemSizeZero);
    }
    if mib > MAX_MEM_SIZE_MIB {
        return Err(ConfigError::MemSizeTooLarge {
            mib,
            max: MAX_MEM_SIZE_MIB,
        });
    }
    Ok(mib)
}

/// Checks a vCPU count against anvil's own limit (KVM's is checked when the VM is built).
pub fn validate_vcpu_count(count: u64) -> Result<u8, ConfigError> {
    match count {
        0 => Err(ConfigError::VcpuCountZero),
        n if n > u64::from(MAX_VCPUS) => Err(ConfigError::VcpuCountTooLarge {
            count: n,
            max: u64::from(MAX_VCPUS),
        }),
        n => u8::try_from(n).map_err(|_| ConfigError::VcpuCountTooLarge {
            count: n,
            max: u64::from(MAX_VCPUS),
        }),
    }
}

impl VmConfig {
    /// Checks the values that need no host resources.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_vcpu_count(u64::from(self.vcpu_count))?;
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        if self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(ConfigError::MemSizeTooLarge {
                mib: self.mem_size_mib,
                max: MAX_MEM_SIZE_MIB,
            });
        }
        let max = arch::layout::CMDLINE_MAX_SIZE - 1;
        if self.cmdline.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max,
            });
        }
        let mut ids = std::collections::HashSet::new();
        for disk in &self.disks {
            if !ids.insert(disk.id.as_str()) {
                return Err(ConfigError::DuplicateDiskId(disk.id.clone()));
            }
        }
        if self.disks.iter().filter(|d| d.root).count() > 1 {
            return Err(ConfigError::SeveralRootDisks);
        }
        let max_devices = (arch::layout::IRQ_MAX - arch::layout::IRQ_BASE + 1) as usize;
        let mut taps = std::collections::HashSet::new();
        let mut macs = std::collections::HashSet::new();
        for net in &self.nets {
            if !taps.insert(net.tap.as_str()) {
                return Err(ConfigError::DuplicateTap(net.tap.clone()));
            }
            if let Some(mac) = net.mac {
                if !macs.insert(mac) {
                    return Err(ConfigError::DuplicateMac(format_mac(&mac)));
                }
            }
        }
        let count = self.disks.len() + self.nets.len();
        if count + usize::from(self.rng) + usize::from(self.vsock.is_some()) > max_devices {
            return Err(ConfigError::TooManyDevices(max_devices));
        }
        if let Some(pos) = self
            .cmdline
            .bytes()
            .position(|b| !(b' '..=b'~').contains(&b))
        {
            return Err(ConfigError::CmdlineCharacter(pos));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_accept_mib_and_suffixes() {
        assert_eq!(parse_mem_size_mib("512"), Ok(512));
        assert_eq!(parse_mem_size_mib("512M"), Ok(512));
        assert_eq!(parse_mem_size_mib("512MiB"), Ok(512));
        assert_eq!(parse_mem_size_mib("2G"), Ok(2048));
        assert_eq!(parse_mem_size_mib("2g"), Ok(2048));
        assert_eq!(parse_mem_size_mib("1GB"), Ok(1024));
        assert_eq!(parse_mem_size_mib("4096K"), Ok(4));
    }

    #[test]
    fn malformed_memory_sizes_are_refused() {
        for bad in ["", "M", "12X", "-1", "1.5G", "0x10", "1 G G", "1000K"] {
            assert!(
                matches!(parse_mem_size_mib(bad), Err(ConfigError::MemSizeSyntax(_))),
                "{bad:?} must be refused"
            );
        }
        assert_eq!(parse_mem_size_mib("0"), Err(ConfigError::MemSizeZero));
        assert_eq!(parse_mem_size_mib("0G"), Err(ConfigError::MemSizeZero));
        assert!(matches!(
            parse_mem_size_mib("2T"),
            Err(ConfigError::MemSizeTooLarge { .. })
        ));
        assert!(matches!(
            parse_mem_size_mib("99999999999999999999"),
            Err(ConfigError::MemSizeSyntax(_))
        ));
        assert!(matches!(
            parse_mem_size_mib("18446744073709551615G"),
            Err(ConfigError::MemSizeSyntax(_))
        ));
    }

    #[test]
    fn vcpu_counts_are_bounded() {
        assert_eq!(validate_vcpu_count(0), Err(ConfigError::VcpuCountZero));
        assert_eq!(validate_vcpu_count(1), Ok(1));
        assert_eq!(validate_vcpu_count(254), Ok(254));
        assert!(matches!(
            validate_vcpu_count(255),
            Err(ConfigError::VcpuCountTooLarge { .. })
        ));
    }

    #[test]
    fn overlong_command_lines_are_refused() {
        let config = VmConfig {
            cmdline: "x".repeat(4096),
            ..VmConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        assert_eq!(VmConfig::default().validate(), Ok(()));
    }

    #[test]
    fn disks_parse_with_their_options() {
        assert_eq!(
            DiskConfig::parse("path=/a.img,ro,root,id=sys", 3),
            Ok(DiskConfig {
                path: "/a.img".into(),
                read_only: true,
                root: true,
                id: "sys".into(),
                rate_limit: RateLimiterConfig::default(),
            })
        );
        assert_eq!(
            DiskConfig::parse("path=/b", 2).map(|d| d.id),
            Ok("disk2".into())
        );
        for bad in [
            "",
            "ro",
            "path=",
            "path=/a,rw",
            "path=/a,id=",
            "path=/a,id=a b",
            "path=/a,x=1",
        ] {
            assert!(
                matches!(
                    DiskConfig::parse(bad, 0),
                    Err(ConfigError::DiskSyntax { .. })
                ),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn network_interfaces_parse_and_are_checked() {
        assert_eq!(
            NetConfig::parse("tap=tap0,mac=52:54:00:AA:bb:01"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 0xaa, 0xbb, 1]),
                rx_rate: RateLimiterConfig::default(),
                tx_rate: RateLimiterConfig::default(),
                id: None,
            })
        );
        assert_eq!(NetConfig::parse("tap=t").map(|n| n.mac), Ok(None));
        for bad in [
            "",
            "tap=",
            "mac=52:54:00:aa:bb:01",
            "tap=t,mac=52:54:00:aa:bb",
            "tap=t,mac=52:54:00:aa:bb:01:02",
            "tap=t,mac=5254.00aa.bb01",
            "tap=t,mac=zz:54:00:aa:bb:01",
            "tap=t,mac=01:00:5e:00:00:01",
            "tap=t,x=1",
        ] {
            assert!(
                matches!(NetConfig::parse(bad), Err(ConfigError::NetSyntax { .. })),
                "{bad:?} must be refused"
            );
        }
        let net = |tap: &str, mac: Option<[u8; 6]>| NetConfig {
            tap: tap.into(),
            mac,
            rx_rate: RateLimiterConfig::default(),
            tx_rate: RateLimiterConfig::default(),
            id: None,
        };
        let mut config = VmConfig {
            nets: vec![net("a", None), net("a", None)],
            ..VmConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateTap("a".into()))
        );
        config.nets = vec![
            net("a", Some([2, 0, 0, 0, 0, 1])),
            net("b", Some([2, 0, 0, 0, 0, 1])),
        ];
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DuplicateMac(_))
        ));
    }

    #[test]
    fn rate_limits_parse_as_token_buckets() {
        let bucket = |size, refill_time_ms, one_time_burst| TokenBucketConfig {
            size,
            one_time_burst,
            refill_time_ms,
        };
        assert_eq!(parse_bucket("1M:1000"), Some(bucket(1 << 20, 1000, 0)));
        assert_eq!(parse_bucket("100:10:4K"), Some(bucket(100, 10, 4096)));
        for bad in [
            "",
            "1M",
            "0:100",
            "1M:0",
            "x:1",
            "1M:1:2:3",
            "1T:1",
            "99999999999999999999G:1",
        ] {
            assert_eq!(parse_bucket(bad), None, "{bad:?}");
        }
        let disk = DiskConfig::parse("path=/d,bw=4M:1000:8M,ops=100:1000", 0).unwrap();
        assert_eq!(disk.rate_limit.bandwidth, bucket(4 << 20, 1000, 8 << 20));
        assert_eq!(disk.rate_limit.ops, bucket(100, 1000, 0));
        assert!(DiskConfig::parse("path=/d,bw=4M", 0).is_err());
        let net = NetConfig::parse("tap=t,rx_bw=1M:100,tx_ops=10:1000").unwrap();
        assert_eq!(net.rx_rate.bandwidth, bucket(1 << 20, 100, 0));
        assert_eq!(net.tx_rate.ops, bucket(10, 1000, 0));
        assert!(net.rx_rate.ops.size == 0 && net.tx_rate.bandwidth.size == 0);
    }

    #[test]
    fn vsock_parses_and_refuses_reserved_cids() {
        assert_eq!(
            VsockConfig::parse("cid=3,socket=/tmp/v.sock"),
            Ok(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into()
            })
        );
        for bad in [
            "cid=2,socket=/s",
            "cid=0,socket=/s",
            "cid=x,socket=/s",
            "socket=/s",
            "cid=3",
            "cid=3,socket=",
        ] {
            assert!(
                matches!(
                    VsockConfig::parse(bad),
                    Err(ConfigError::VsockSyntax { .. })
                ),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn disk_ids_and_roots_are_unique() {
        let disk = |id: &str, root: bool| DiskConfig {
            path: "/x".into(),
            read_only: false,
            root,
            id: id.into(),
            rate_limit: RateLimiterConfig::default(),
        };
        let mut config = VmConfig {
            disks: vec![disk("a", true), disk("a", false)],
            ..VmConfig::default()
        };
        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateDiskId("a".into()))
        );
        config.disks = vec![disk("a", true), disk("b", true)];
        assert_eq!(config.validate(), Err(ConfigError::SeveralRootDisks));
        config.disks = (0..20).map(|i| disk(&format!("d{i}"), false)).collect();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::TooManyDevices(_))
        ));
    }

    #[test]
    fn command_lines_must_be_printable_ascii() {
        for (text, pos) in [("a\u{2713}", 1), ("tab\there", 3), ("nl\n", 2)] {
            let config = VmConfig {
                cmdline: text.to_string(),
                ..VmConfig::default()
            };
            assert_eq!(
                config.validate(),
                Err(ConfigError::CmdlineCharacter(pos)),
                "{text:?}"
            );
        }
    }
}
