//! Network interface lookup through the classic `SIOCGIF*` ioctls.
//!
//! Interfaces belong to a network namespace. All lookups and queries here run in the network
//! namespace of the *calling thread at the time of the call*, so an [`Interface`] found in one
//! namespace must be queried from a thread in that same namespace.

use std::ffi::c_int;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::error::PacketError;

/// Link state bits from `SIOCGIFFLAGS`.
///
/// `SIOCGIFFLAGS` only returns the low 16 bits of the device flags, so `IFF_LOWER_UP`
/// (0x10000) is not available here; `running` (`IFF_RUNNING`) reflects the operational state
/// (carrier and, for a veth, the peer being up), which is what matters for forwarding frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFlags {
    /// `IFF_UP`: administratively up.
    pub up: bool,
    /// `IFF_RUNNING`: operationally up.
    pub running: bool,
    /// `IFF_PROMISC` as set by the administrator (`ip link set promisc on`). The kernel does
    /// *not* report promiscuity requested by packet sockets (`PACKET_MR_PROMISC`) or by unicast
    /// filter overflow here; `ip -d link` shows that as the `promiscuity` count.
    pub promisc: bool,
    /// `IFF_LOOPBACK`.
    pub loopback: bool,
    /// All 16 bits as returned by the kernel.
    pub raw: u16,
}

/// A network interface, identified by name and index in the caller's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    name: String,
    index: u32,
}

impl Interface {
    /// Looks up `name` (`SIOCGIFINDEX`) in the calling thread's network namespace.
    ///
    /// The name must be 1 to 15 bytes (`IFNAMSIZ` - 1) without NUL bytes. A missing interface
    /// gives `looking up interface eth3: No such device (os error 19)`.
    pub fn by_name(name: &str) -> Result<Interface, PacketError> {
        let request = IfReq::new(name)?;
        let ctl = control_socket()?;
        let ifr = request.ioctl(&ctl, libc::SIOCGIFINDEX).map_err(|source| {
            PacketError::LookupInterface {
                name: name.to_owned(),
                source,
            }
        })?;
        // SAFETY: SIOCGIFINDEX succeeded, so the kernel filled in `ifru_ifindex`; every bit
        // pattern is a valid c_int anyway.
        let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
        let index = u32::try_from(index).map_err(|_| PacketError::LookupInterface {
            name: name.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("kernel returned negative ifindex {index}"),
            ),
        })?;
        Ok(Interface {
            name: name.to_owned(),
            index,
        })
    }

    /// The interface that has index `index` now (`SIOCGIFNAME`), under its current name;
    /// `None` if there is none (it was deleted, or moved to another network namespace).
    pub fn by_index(index: u32) -> Result<Option<Interface>, PacketError> {
        let ctl = control_socket()?;
        // SAFETY: all-zero bytes are a valid `ifreq` (see `IfReq::new`).
        let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
        ifr.ifr_ifru.ifru_ifindex = index as c_int;
        // SAFETY: SIOCGIFNAME reads `ifru_ifindex` from and writes the NUL-terminated name into
        // the `ifreq` we pass, which is valid, writable and lives across the call.
        let rc =
            unsafe { libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFNAME as libc::Ioctl, &mut ifr) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENODEV) {
                return Ok(None);
            }
            return Err(PacketError::LookupInterface {
                name: format!("with index {index}"),
                source,
            });
        }
        let name: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(Some(Interface {
            name: String::from_utf8_lossy(&name).into_owned(),
            index,
        }))
    }

    /// The interface index, as used in `sockaddr_ll` and `packet_mreq`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MTU (`SIOCGIFMTU`): the largest L3 packet, i.e. without the 14-byte Ethernet header.
    pub fn mtu(&self) -> Result<u32, PacketError> {
        let ifr = self.query("MTU", libc::SIOCGIFMTU)?;
        // SAFETY: SIOCGIFMTU succeeded, so the kernel wrote `ifru_mtu`; any c_int is valid.
        let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
        u32::try_from(mtu).map_err(|_| PacketError::QueryInterface {
            name: self.name.clone(),
            what: "MTU",
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("kernel returned negative MTU {mtu}"),
            ),
        })
    }

    /// The link flags (`SIOCGIFFLAGS`).
    pub fn flags(&self) -> Result<LinkFlags, PacketError> {
        let ifr = self.query("flags", libc::SIOCGIFFLAGS)?;
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote `ifru_flags`; any c_short is valid.
        let raw = unsafe { ifr.ifr_ifru.ifru_flags } as u16;
        let has = |flag: c_int| u32::from(raw) & (flag as u32) != 0;
        Ok(LinkFlags {
            up: has(libc::IFF_UP),
            running: has(libc::IFF_RUNNING),
            promisc: has(libc::IFF_PROMISC),
            loopback: has(libc::IFF_LOOPBACK),
            raw,
        })
    }

    /// True if the interface is administratively up (`IFF_UP`). See [`Interface::flags`] for
    /// the operational state.
    pub fn is_up(&self) -> Result<bool, PacketError> {
        Ok(self.flags()?.up)
    }

    /// The Ethernet hardware address (`SIOCGIFHWADDR`).
    ///
    /// Fails with `ErrorKind::Unsupported` for devices that are neither Ethernet nor loopback
    /// (e.g. tun in L3 mode, ipip), since an Ethernet-framed packet socket makes no sense there.
    pub fn mac(&self) -> Result<[u8; 6], PacketError> {
        let ifr = self.query("hardware address", libc::SIOCGIFHWADDR)?;
        // SAFETY: SIOCGIFHWADDR succeeded, so the kernel wrote `ifru_hwaddr`, a plain sockaddr
        // (integers and bytes only).
        let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        if hw.sa_family != libc::ARPHRD_ETHER && hw.sa_family != libc::ARPHRD_LOOPBACK {
            return Err(PacketError::QueryInterface {
                name: self.name.clone(),
                what: "hardware address",
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("not an Ethernet device (ARPHRD type {})", hw.sa_family),
                ),
            });
        }
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *dst = *src as u8;
        }
        Ok(mac)
    }

    fn query(&self, what: &'static str, request: IoctlRequest) -> Result<libc::ifreq, PacketError> {
        let err = |source| PacketError::QueryInterface {
            name: self.name.clone(),
            what,
            source,
        };
        let ctl = control_socket()?;
        IfReq::new(&self.name)?.ioctl(&ctl, request).map_err(err)
    }
}

/// Link changes in the calling thread's network namespace: a `NETLINK_ROUTE` socket in the
/// `RTMGRP_LINK` group, which the kernel tells of every link added, changed (MTU, flags, name)
/// or deleted. Joining it needs no privilege. The messages are not parsed: a wake-up only
/// says "look again" (the kernel drops messages when the socket is full, and reports that as
/// ENOBUFS, which means the same).
#[derive(Debug)]
pub struct LinkChanges {
    fd: OwnedFd,
}

impl LinkChanges {
    pub fn open() -> io::Result<LinkChanges> {
        // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero bytes are a valid `sockaddr_nl` (integers only).
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid `sockaddr_nl` and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkChanges { fd })
    }

    /// Waits until a link changes or `timeout` passes, then takes every pending message.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: one valid `pollfd`, and the count passed is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: `buf` is valid and writable for its length for the duration of the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(()),
                // Messages were lost: the caller looks again anyway.
                Some(libc::ENOBUFS) | Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// libc declares the SIOCGIF* constants as `c_ulong`; `ioctl` itself takes `libc::Ioctl`, which
/// is `c_int` on musl, hence the cast at the call.
type IoctlRequest = libc::c_ulong;

/// A validated interface name in `ifreq` form.
struct IfReq {
    ifr: libc::ifreq,
}

impl IfReq {
    fn new(name: &str) -> Result<IfReq, PacketError> {
        let invalid = |why: &str| PacketError::InvalidInterfaceName {
            name: name.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()),
        };
        if name.is_empty() {
            return Err(invalid("interface name is empty"));
        }
        // The kernel needs room for the terminating NUL inside IFNAMSIZ.
        if name.len() >= libc::IFNAMSIZ {
            return Err(invalid(&format!(
                "interface name is {} bytes, the limit is {}",
                name.len(),
                libc::IFNAMSIZ - 1
            )));
        }
        if name.bytes().any(|b| b == 0) {
            return Err(invalid("interface name contains a NUL byte"));
        }
        // SAFETY: `ifreq` is a C struct of byte arrays and a union of integers, sockaddrs and a
        // raw pointer; all-zero bytes are a valid value for every one of them.
        let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(IfReq { ifr })
    }

    fn ioctl(mut self, ctl: &OwnedFd, request: IoctlRequest) -> io::Result<libc::ifreq> {
        // SAFETY: `ctl` is an open socket; every SIOCGIF* request used here reads the
        // NUL-terminated name from and writes its result into the `ifreq` we pass, which is
        // valid, writable and lives across the call.
        let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), request as libc::Ioctl, &mut self.ifr) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.ifr)
    }
}

/// Any socket accepts the SIOCGIF* ioctls; AF_INET/SOCK_DGRAM is the customary one and needs
/// no privilege.
fn control_socket() -> Result<OwnedFd, PacketError> {
    // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(PacketError::OpenControlSocket {
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found() {
        // Every network namespace has `lo` with ifindex 1.
        let lo = Interface::by_name("lo").expect("lo exists");
        assert_eq!(lo.index(), 1);
        assert_eq!(lo.name(), "lo");
        assert!(lo.flags().unwrap().loopback);
        assert_eq!(lo.mac().unwrap(), [0; 6]);
        assert!(lo.mtu().unwrap() >= 1500);
    }

    #[test]
    fn name_validation() {
        let err = Interface::by_name("").unwrap_err();
        assert!(
            matches!(err, PacketError::InvalidInterfaceName { .. }),
            "{err}"
        );
        let err = Interface::by_name("sixteen-chars-xx").unwrap_err();
        assert!(
            matches!(err, PacketError::InvalidInterfaceName { .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "checking interface name \"sixteen-chars-xx\": interface name is 16 bytes, the limit is 15"
        );
        let err = Interface::by_name("a\0b").unwrap_err();
        assert!(
            matches!(err, PacketError::InvalidInterfaceName { .. }),
            "{err}"
        );
    }

    #[test]
    fn an_index_names_its_interface_or_none() {
        let lo = Interface::by_index(1).unwrap().expect("lo has index 1");
        assert_eq!(lo, Interface::by_name("lo").unwrap());
        assert_eq!(Interface::by_index(u32::MAX >> 1).unwrap(), None);
    }

    #[test]
    fn missing_interface_message() {
        let err = Interface::by_name("vp-nonexist0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "looking up interface vp-nonexist0: No such device (os error 19)"
        );
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }
}
