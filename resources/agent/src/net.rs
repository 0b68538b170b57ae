//! Network interfaces of the guest: links up, an IPv4 address and a default route, through the
//! classic socket ioctls (no netlink needed for this much).

use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, OwnedFd};

use serde::Deserialize;

/// `run --ip ADDR/PREFIX [--gateway ADDR]`: the first `--net` interface's configuration.
#[derive(Debug, Deserialize)]
pub struct NetSpec {
    /// The interface (`eth0`).
    pub interface: String,
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// The prefix length of its subnet (0..=32).
    pub prefix_len: u8,
    /// The default route's gateway, if any.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
}

/// The kernel's `struct rtentry` (include/uapi/linux/route.h; glibc's libc crate lacks it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(format!("bad interface name {name:?}"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    Ok(req)
}

/// An AF_INET `sockaddr` holding `addr`.
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family =
        libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET (2) fits sa_family_t");
    sin.sin_addr.s_addr = u32::from(addr).to_be();
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data structs; the kernel reads an
    // AF_INET sockaddr as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: every caller passes the argument struct its request reads or writes (ifreq for
    // the SIOC*IF* requests, rtentry for SIOCADDRT), valid for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets IFF_UP on `name`.
pub fn link_up(name: &str) -> Result<(), String> {
    let fd = socket()?;
    let mut req = ifreq(name)?;
    ioctl(
        &fd,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("get flags of {name}"),
    )?;
    let up = libc::c_short::try_from(libc::IFF_UP).expect("IFF_UP is 1");
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= up };
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("set flags of {name}"),
    )
}

/// Gives the interface its address and netmask, brings it up and adds the default route.
pub fn configure(spec: &NetSpec) -> Result<(), String> {
    let name = spec.interface.as_str();
    if spec.prefix_len > 32 {
        return Err(format!("prefix length {} is over 32", spec.prefix_len));
    }
    let mask = Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(spec.prefix_len))
            .unwrap_or(0),
    );
    let fd = socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(spec.address);
    ioctl(
        &fd,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("set the address of {name}"),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(
        &fd,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("set the netmask of {name}"),
    )?;
    link_up(name)?;
    if let Some(gateway) = spec.gateway {
        // SAFETY: RtEntry is plain data (null pointers included); all-zero is a valid value.
        let mut route: RtEntry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(
            &fd,
            libc::SIOCADDRT,
            &mut route,
            &format!("add the default route via {gateway}"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn sockaddr_holds_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 0, 99, 2));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        assert_eq!(
            &sa.sa_data[2..6],
            &[10, 0, 99, 2].map(|b: u8| b as libc::c_char)
        );
    }
}
