//! The destination side: accepts one source, checks its version and configuration (disks,
//! taps and memory must be there before any page moves), fills a fresh VM's memory with the
//! pages as they come, restores the state, and runs the guest only once the source has
//! stopped for good. Any failure discards the VM; nothing the source sends can write outside
//! guest memory or make this side allocate more than a frame's limit.

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{self, Frame, Kind};
use super::{update, MigrationError, SharedStatus};
use crate::controller::error_chain;
use crate::resources::{FullVmConfiguration, NetworkOverride, VmResources};
use crate::seccomp::SeccompLevel;
use crate::vmm::{RestoreTarget, Vmm};

/// What the destination is configured with.
#[derive(Debug, Clone)]
pub struct ReceiveSettings {
    /// The KVM device (None: /dev/kvm).
    pub kvm_device: Option<PathBuf>,
    /// Seccomp level for the received VM.
    pub seccomp_level: SeccompLevel,
    /// Taps replacing the source's.
    pub network_overrides: Vec<NetworkOverride>,
    /// A vsock socket path replacing the source's.
    pub vsock_override: Option<std::path::PathBuf>,
}

/// A received VM, ready to run.
#[derive(Debug)]
pub struct Incoming {
    /// The VM.
    pub vmm: Vmm,
    /// Its resources (`GET /vm/config`).
    pub resources: VmResources,
}

/// Counts the bytes read, for `GET /migration`.
struct Counting<'a, R> {
    inner: R,
    status: &'a SharedStatus,
    pending: u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pending += n as u64;
        if self.pending >= 1 << 20 {
            let add = std::mem::take(&mut self.pending);
            update(self.status, |s| s.bytes += add);
        }
        Ok(n)
    }
}

/// Serves one incoming migration on `stream` to its end.
pub fn receive(
    stream: super::Stream,
    settings: &ReceiveSettings,
    status: &SharedStatus,
    start: Instant,
) -> Result<Incoming, MigrationError> {
    stream
        .set_timeouts(Some(super::PEER_TIMEOUT))
        .map_err(protocol::ProtocolError::Io)?;
    let mut out = stream.try_clone().map_err(protocol::ProtocolError::Io)?;
    let mut input = Counting {
        // Small: a read larger than the buffer bypasses it, so page data is not copied twice.
        inner: BufReader::with_capacity(64 << 10, stream),
        status,
        pending: 0,
    };
    let result = serve(&mut input, &mut out, settings, status, start);
    update(status, |s| s.bytes += input.pending);
    if let Err(e) = &result {
        if !matches!(
            e,
            MigrationError::Protocol(protocol::ProtocolError::Refused(_))
        ) {
            let _ = protocol::write_error(&mut out, &error_chain(e));
        }
    }
    result
}

/// A `Config` frame checked against this host: the resources to build, the VM to fill.
fn accept_config(
    json: &str,
    settings: &ReceiveSettings,
) -> Result<(VmResources, crate::VmConfig, RestoreTarget), MigrationError> {
    let refuse = |why: String| MigrationError::Refused(why);
    let full: FullVmConfiguration = serde_json::from_str(json)
        .map_err(|e| refuse(format!("invalid VM configuration from the source: {e}")))?;
    let mut resources = VmResources::from_saved(full);
    for o in &settings.network_overrides {
        let index = resources
            .nets
            .iter()
            .position(|n| n.iface_id == o.iface_id)
            .ok_or_else(|| {
                refuse(format!(
                    "network_overrides: the VM has no network interface {:?}",
                    o.iface_id
                ))
            })?;
        let net = &mut resources.nets[index];
        if net.guest_mac.is_none() {
            // The guest keeps the address it was given from the source's tap name.
            let mac = crate::vmm::default_mac(&net.host_dev_name, index);
            net.guest_mac = Some(crate::config::format_mac(&mac));
        }
        net.host_dev_name = o.host_dev_name.clone();
    }
    if let Some(path) = &settings.vsock_override {
        let vsock = resources
            .vsock
            .as_mut()
            .ok_or_else(|| refuse("vsock_override: the VM has no vsock device".into()))?;
        vsock.uds_path = path.clone();
    }
    resources.kvm_device = settings.kvm_device.clone();
    resources.seccomp_level = settings.seccomp_level;
    let config = resources
        .vm_config()
        .map_err(|e| refuse(format!("the VM configuration is not valid here: {e}")))?;
    for disk in &config.disks {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|e| {
                refuse(format!(
                    "drive {:?}: cannot open {}: {e}",
                    disk.id,
                    disk.path.display()
                ))
            })?;
    }
    for net in &config.nets {
        if !std::path::Path::new("/sys/class/net")
            .join(&net.tap)
            .exists()
        {
            return Err(refuse(format!(
                "network interface: no tap {:?} here",
                net.tap
            )));
        }
    }
    if let Some(available) = available_mib() {
        if config.mem_size_mib > available {
            return Err(refuse(format!(
                "not enough memory: the guest has {} MiB, this host has {available} MiB available",
                config.mem_size_mib
            )));
        }
    }
    let memory = crate::memory::create_guest_memory(config.mem_size_mib)
        .map_err(|e| refuse(format!("cannot allocate guest memory: {}", error_chain(&e))))?;
    let target = RestoreTarget::new(
        &config.kvm_device,
        memory,
        None,
        resources.machine.track_dirty_pages,
    )
    .map_err(|e| refuse(format!("cannot create the VM: {}", error_chain(&e))))?;
    Ok((resources, config, target))
}

/// MemAvailable plus free swap, in MiB.
fn available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("MemAvailable:")? + field("SwapFree:").unwrap_or(0)) / 1024)
}

fn serve(
    input: &mut impl Read,
    out: &mut impl Write,
    settings: &ReceiveSettings,
    status: &SharedStatus,
    start: Instant,
) -> Result<Incoming, MigrationError> {
    let peer = protocol::expect_hello(input)?;
    protocol::write_hello(out, crate::controller::VMM_VERSION)?;
    tracing::info!(peer_version = %peer, "migration: a source connected");
    let json = match protocol::read_frame(input)? {
        Frame::Config(json) => json,
        Frame::Error(why) => return Err(protocol::ProtocolError::Refused(why).into()),
        other => return Err(protocol::unexpected("Config", &other).into()),
    };
    let (resources, config, target) = accept_config(&json, settings)?;
    protocol::write_frame(out, Kind::Ok, &[])?;
    let zeros = vec![0u8; protocol::MAX_PAGES_BYTES];
    let mut target = Some(target);
    let mut vmm = None;
    let mut spare = Vec::new();
    loop {
        match protocol::read_frame_reusing(input, &mut spare)? {
            Frame::Pages(p) => {
                let Some(t) = &target else {
                    return Err(
                        protocol::ProtocolError::Violation("pages after the state".into()).into(),
                    );
                };
                apply_pages(t.memory(), &p, &zeros)?;
                update(status, |s| s.pages += u64::from(p.count));
                spare = p.data;
            }
            Frame::State(bytes) => {
                let Some(t) = target.take() else {
                    return Err(protocol::ProtocolError::Violation("a second state".into()).into());
                };
                let state = crate::snapshot::decode_state(&bytes)
                    .map_err(|e| MigrationError::Refused(error_chain(&e)))?;
                if state.mem_size_mib != config.mem_size_mib
                    || state.vcpu_count != config.vcpu_count
                {
                    return Err(MigrationError::Refused(format!(
                        "the state is for {} vCPUs and {} MiB, the configuration for {} and {}",
                        state.vcpu_count,
                        state.mem_size_mib,
                        config.vcpu_count,
                        config.mem_size_mib
                    )));
                }
                let mut restored = Vmm::restore_into(t, &state, &config, start)
                    .map_err(|e| MigrationError::Refused(error_chain(&e)))?;
                restored.set_seccomp_level(settings.seccomp_level);
                vmm = Some(restored);
                protocol::write_frame(out, Kind::Ok, &[])?;
            }
            Frame::Complete => {
                let Some(vmm) = vmm.take() else {
                    return Err(protocol::ProtocolError::Violation(
                        "Complete before the state".into(),
                    )
                    .into());
                };
                // The guest runs here only if the source heard that it may stop for good.
                protocol::write_frame(out, Kind::Ok, &[])?;
                return Ok(Incoming { vmm, resources });
            }
            Frame::Error(why) => return Err(protocol::ProtocolError::Refused(why).into()),
            other => return Err(protocol::unexpected("Pages, State or Complete", &other).into()),
        }
    }
}

/// Writes a `Pages` frame into guest memory: the whole run must be guest RAM (no hole, no
/// overflow past the end), else nothing outside guest memory is touched and the frame is
/// refused. `zeros` holds at least a frame's worth of zero bytes.
pub fn apply_pages(
    memory: &devices::GuestMemoryMmap,
    p: &protocol::Pages,
    zeros: &[u8],
) -> Result<(), MigrationError> {
    let len = usize::try_from(p.len()).unwrap_or(usize::MAX);
    let data = if p.data.is_empty() {
        zeros.get(..len).ok_or_else(|| {
            protocol::ProtocolError::Violation(format!("{} zero pages in one frame", p.count))
        })?
    } else {
        &p.data[..]
    };
    let end = p
        .guest_addr
        .checked_add(p.len())
        .ok_or_else(|| protocol::ProtocolError::Violation("address overflow".into()))?;
    let inside = memory
        .to_region_addr(GuestAddress(p.guest_addr))
        .is_some_and(|(region, _)| end <= region.start_addr().raw_value() + region.len());
    if !inside {
        return Err(protocol::ProtocolError::Violation(format!(
            "{} pages at {:#x} are not guest memory",
            p.count, p.guest_addr
        ))
        .into());
    }
    memory
        .write_slice(data, GuestAddress(p.guest_addr))
        .map_err(|e| {
            protocol::ProtocolError::Violation(format!(
                "{} pages at {:#x}: {e}",
                p.count, p.guest_addr
            ))
            .into()
        })
}

/// What the fuzz target drives: frames from `bytes` as a destination reads them after the
/// configuration, pages written into `memory`, a state decoded and checked. Never panics;
/// ends at the first error or at the end of the input.
pub fn fuzz_frames(memory: &devices::GuestMemoryMmap, bytes: &[u8]) -> Result<(), MigrationError> {
    let zeros = vec![0u8; protocol::MAX_PAGES_BYTES];
    let mut input = bytes;
    while !input.is_empty() {
        match protocol::read_frame(&mut input)? {
            Frame::Pages(p) => apply_pages(memory, &p, &zeros)?,
            Frame::State(bytes) => {
                crate::snapshot::decode_state(&bytes)
                    .map_err(|e| MigrationError::Refused(error_chain(&e)))?;
            }
            Frame::Hello { version, .. } if version != protocol::PROTOCOL_VERSION => {
                return Err(protocol::ProtocolError::Version { peer: version }.into())
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Pages;

    fn memory() -> devices::GuestMemoryMmap {
        devices::GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap()
    }

    #[test]
    fn pages_land_only_inside_one_region() {
        let m = memory();
        let zeros = vec![0u8; 1 << 20];
        let page = |addr, count, fill: u8| Pages {
            guest_addr: addr,
            count,
            data: vec![fill; count as usize * 4096],
        };
        apply_pages(&m, &page(0x1000, 2, 7), &zeros).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 7);
        apply_pages(&m, &page(0x2f000, 1, 9), &zeros).unwrap();
        // Straddling a region's end, in the hole, past the end, overflowing: refused, and
        // nothing is written.
        for (addr, count) in [
            (0xf000u64, 2u32),
            (0x11000, 1),
            (0x30000, 1),
            (u64::MAX - 0xfff, 1),
        ] {
            assert!(
                apply_pages(&m, &page(addr, count, 1), &zeros).is_err(),
                "{addr:#x}"
            );
        }
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xf000)).unwrap(), 0);
        // Zero pages clear.
        let z = Pages {
            guest_addr: 0x1000,
            count: 1,
            data: Vec::new(),
        };
        apply_pages(&m, &z, &zeros).unwrap();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 7);
    }

    #[test]
    fn hostile_frame_streams_end_in_errors() {
        let m = memory();
        let mut f = Vec::new();
        protocol::write_pages_header(&mut f, 0xf000, 2, false).unwrap();
        f.extend_from_slice(&[1u8; 8192]);
        assert!(fuzz_frames(&m, &f).is_err());
        let mut f = Vec::new();
        protocol::write_frame(&mut f, Kind::State, &[0xff; 100]).unwrap();
        assert!(fuzz_frames(&m, &f).is_err());
    }
}
