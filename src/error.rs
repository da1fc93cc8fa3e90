//! The daemon's errors. Each message names the action and the object, so that a user sees one
//! clear line ("binding packet socket to eth3: No such device").

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::packet::error::PacketError;

#[derive(Debug)]
pub enum Error {
    /// A command-line value is wrong; the message says which and why.
    InvalidArgument(String),
    /// Setting up the interface or the packet socket failed.
    Packet(PacketError),
    /// The requested MTU is larger than the interface can carry.
    MtuAboveInterface {
        mtu: u16,
        interface: String,
        interface_mtu: u32,
    },
    /// A live backend already serves this socket path.
    SocketInUse(PathBuf),
    /// The socket's directory does not exist.
    SocketDirectoryMissing(PathBuf),
    /// Anything else about the socket path (not a socket, no permission to remove, ...).
    SocketPath { path: PathBuf, source: io::Error },
    /// The vhost-user daemon could not be created.
    Daemon(vhost_user_backend::Error),
    /// The private socket between the relay and the request handler failed.
    Internal(io::Error),
    /// Preparing a queue pair's descriptors (dup, eventfd) failed.
    QueueSetup { pair: usize, source: io::Error },
    /// Socket permissions or dropping privileges failed.
    Privileges(crate::privileges::PrivilegeError),
    /// Blocking or waiting for signals failed.
    Signals(io::Error),
    /// A thread of the daemon could not be started.
    Thread {
        what: &'static str,
        source: io::Error,
    },
    /// Subscribing to the namespace's link changes (netlink) failed.
    WatchInterface {
        interface: String,
        source: io::Error,
    },
    /// The interface was deleted (or moved to another namespace): the packet sockets are
    /// unhooked for good, and only a new process can open new ones.
    InterfaceGone { interface: String, ifindex: u32 },
    /// The socket handed in (`--fd`, systemd) is not one we can serve; the message says why.
    Inherited(String),
    /// `--metrics ADDR:PORT` could not be bound or served.
    Metrics {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) => f.write_str(msg),
            Error::Packet(e) => e.fmt(f),
            Error::MtuAboveInterface { mtu, interface, interface_mtu } => write!(
                f,
                "--mtu {mtu} exceeds the MTU of {interface} ({interface_mtu}); raise the interface MTU first"
            ),
            Error::SocketInUse(p) => write!(
                f,
                "listening on {}: a running backend already serves this socket",
                p.display()
            ),
            Error::SocketDirectoryMissing(p) => write!(
                f,
                "listening on {}: directory {} does not exist",
                p.display(),
                p.parent().map(|d| d.display().to_string()).unwrap_or_default()
            ),
            Error::SocketPath { path, source } => write!(f, "preparing socket {}: {source}", path.display()),
            Error::Daemon(e) => write!(f, "creating the vhost-user daemon: {e}"),
            Error::Internal(e) => write!(f, "setting up the internal vhost-user socket: {e}"),
            Error::QueueSetup { pair, source } => write!(f, "setting up queue pair {pair}: {source}"),
            Error::Privileges(e) => e.fmt(f),
            Error::Signals(e) => write!(f, "setting up signal handling: {e}"),
            Error::Thread { what, source } => write!(f, "starting the {what} thread: {source}"),
            Error::WatchInterface { interface, source } => {
                write!(f, "watching link changes of {interface} (netlink): {source}")
            }
            Error::InterfaceGone { interface, ifindex } => write!(
                f,
                "interface {interface} disappeared (ifindex {ifindex}): exiting so the service manager restarts it"
            ),
            Error::Inherited(why) => f.write_str(why),
            Error::Metrics { addr, source } => write!(f, "serving metrics on {addr}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Packet(e) => Some(e),
            Error::SocketPath { source, .. } => Some(source),
            Error::Internal(e) => Some(e),
            Error::QueueSetup { source, .. } => Some(source),
            Error::Signals(e) => Some(e),
            Error::WatchInterface { source, .. } => Some(source),
            Error::Thread { source, .. } => Some(source),
            Error::Privileges(e) => Some(e),
            Error::Metrics { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<PacketError> for Error {
    fn from(e: PacketError) -> Error {
        Error::Packet(e)
    }
}
