//! Errors of the AF_PACKET layer.
//!
//! Every variant names the action that failed and the object it was applied to, and carries the
//! `io::Error` the kernel returned, so a log line reads like
//! `binding packet socket to eth3: No such device (os error 19)` without any extra context.

use std::fmt;
use std::io;

use crate::config::MacAddr;

/// What a `PACKET_ADD_MEMBERSHIP` / `PACKET_DROP_MEMBERSHIP` request was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// `PACKET_MR_UNICAST` for this MAC address (the guest's).
    Unicast([u8; 6]),
    /// `PACKET_MR_PROMISC`.
    Promisc,
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Membership::Unicast(mac) => write!(f, "unicast membership for {}", MacAddr(*mac)),
            Membership::Promisc => f.write_str("promiscuous membership"),
        }
    }
}

/// A failed step while looking up an interface or setting up a packet socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// The interface name is empty, not shorter than `IFNAMSIZ` (16) or contains a NUL byte.
    #[error("checking interface name {name:?}: {source}")]
    InvalidInterfaceName {
        /// The rejected name.
        name: String,
        /// Always of kind `InvalidInput`, explaining the rule.
        source: io::Error,
    },
    /// `socket(AF_INET, SOCK_DGRAM)` for the interface ioctls failed.
    #[error("opening control socket for interface ioctls: {source}")]
    OpenControlSocket {
        /// The error from socket(2).
        source: io::Error,
    },
    /// `SIOCGIFINDEX` failed, typically `ENODEV`: no such interface in this network namespace.
    #[error("looking up interface {name}: {source}")]
    LookupInterface {
        /// The interface name.
        name: String,
        /// The error from ioctl(2).
        source: io::Error,
    },
    /// Reading an interface attribute (MTU, flags, hardware address) failed.
    #[error("reading {what} of interface {name}: {source}")]
    QueryInterface {
        /// The interface name.
        name: String,
        /// What was being read, e.g. `"MTU"`.
        what: &'static str,
        /// The error from ioctl(2), or `Unsupported` for a non-Ethernet hardware address.
        source: io::Error,
    },
    /// `socket(AF_PACKET, SOCK_RAW)` failed. `EPERM`/`EACCES` means CAP_NET_RAW is missing.
    #[error("opening packet socket: {}", open_socket_cause(source))]
    OpenSocket {
        /// The error from socket(2).
        source: io::Error,
    },
    /// A `setsockopt` on the packet socket failed.
    #[error("setting {option}={value} on packet socket for {iface}: {source}")]
    SetOption {
        /// The interface the socket is for.
        iface: String,
        /// The option name, e.g. `"PACKET_VNET_HDR_SZ"`.
        option: &'static str,
        /// The value that was being set.
        value: i32,
        /// The error from setsockopt(2).
        source: io::Error,
    },
    /// `bind` to the interface failed (`ENODEV`: it vanished since the lookup). A down
    /// interface is not an error here; see `PacketSocket::open`.
    #[error("binding packet socket to {iface}: {source}")]
    Bind {
        /// The interface name.
        iface: String,
        /// The error from bind(2).
        source: io::Error,
    },
    /// `PACKET_ADD_MEMBERSHIP` failed.
    #[error("adding {membership} on {iface}: {source}")]
    AddMembership {
        /// The interface name.
        iface: String,
        /// The requested membership.
        membership: Membership,
        /// The error from setsockopt(2).
        source: io::Error,
    },
    /// `PACKET_DROP_MEMBERSHIP` failed (rare: the kernel accepts dropping a membership the
    /// socket does not hold; only a malformed request such as a too-long address fails).
    #[error("dropping {membership} on {iface}: {source}")]
    DropMembership {
        /// The interface name.
        iface: String,
        /// The membership that was being dropped.
        membership: Membership,
        /// The error from setsockopt(2).
        source: io::Error,
    },
}

impl PacketError {
    /// The underlying I/O error.
    pub fn io_error(&self) -> &io::Error {
        match self {
            PacketError::InvalidInterfaceName { source, .. }
            | PacketError::OpenControlSocket { source }
            | PacketError::LookupInterface { source, .. }
            | PacketError::QueryInterface { source, .. }
            | PacketError::OpenSocket { source }
            | PacketError::SetOption { source, .. }
            | PacketError::Bind { source, .. }
            | PacketError::AddMembership { source, .. }
            | PacketError::DropMembership { source, .. } => source,
        }
    }

    /// The errno of the underlying error, if it came from the kernel.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io_error().raw_os_error()
    }

    /// True if the kernel refused for lack of privilege (`EPERM`/`EACCES`).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
    }
}

/// The cause of a failed `socket(AF_PACKET)`. For lack of privilege, std's " (os error N)"
/// suffix gives way to the capability hint so that the line stays readable; `source()` keeps
/// the errno.
fn open_socket_cause(err: &io::Error) -> String {
    let text = err.to_string();
    match err.raw_os_error() {
        Some(code @ (libc::EPERM | libc::EACCES)) => {
            let suffix = format!(" (os error {code})");
            let text = text.strip_suffix(&suffix).unwrap_or(&text);
            format!("{text} (CAP_NET_RAW is required)")
        }
        _ => text,
    }
}

impl From<PacketError> for io::Error {
    /// Keeps the `ErrorKind` of the cause; the message keeps action and object.
    fn from(err: PacketError) -> io::Error {
        io::Error::new(err.io_error().kind(), err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn bind_message_names_action_and_object() {
        let err = PacketError::Bind {
            iface: "eth3".into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert_eq!(
            err.to_string(),
            "binding packet socket to eth3: No such device (os error 19)"
        );
        let src = err.source().expect("source");
        assert_eq!(
            src.downcast_ref::<io::Error>().unwrap().raw_os_error(),
            Some(libc::ENODEV)
        );
    }

    #[test]
    fn eperm_names_the_capability() {
        for errno in [libc::EPERM, libc::EACCES] {
            let err = PacketError::OpenSocket {
                source: io::Error::from_raw_os_error(errno),
            };
            let text = err.to_string();
            assert!(text.ends_with("(CAP_NET_RAW is required)"), "{text}");
            assert!(!text.contains("os error"), "{text}");
        }
        let err = PacketError::OpenSocket {
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert_eq!(
            err.to_string(),
            "opening packet socket: Operation not permitted (CAP_NET_RAW is required)"
        );
        let err = PacketError::OpenSocket {
            source: io::Error::from_raw_os_error(libc::EMFILE),
        };
        assert!(!err.to_string().contains("CAP_NET_RAW"));
    }

    #[test]
    fn membership_message() {
        let err = PacketError::AddMembership {
            iface: "eth3".into(),
            membership: Membership::Unicast([2, 0, 0, 0, 0, 0xab]),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert_eq!(
            err.to_string(),
            "adding unicast membership for 02:00:00:00:00:ab on eth3: Invalid argument (os error 22)"
        );
    }

    #[test]
    fn into_io_error_keeps_kind() {
        let err = PacketError::LookupInterface {
            name: "eth3".into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        let io_err: io::Error = err.into();
        assert_eq!(
            io_err.to_string(),
            "looking up interface eth3: No such device (os error 19)"
        );
        assert_eq!(
            io_err.kind(),
            io::Error::from_raw_os_error(libc::ENODEV).kind()
        );
    }
}
