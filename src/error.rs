//! The daemon's errors. Each message names the action and the object, so that a user sees one
//! clear line ("binding packet socket to eth3: No such device").

use std::io;
use std::path::PathBuf;

use crate::packet::error::PacketError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value is wrong; the message says which and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// Setting up the interface or the packet socket failed.
    #[error("{0}")]
    Packet(#[from] PacketError),
    /// The requested MTU is larger than the interface can carry.
    #[error("--mtu {mtu} exceeds the MTU of {interface} ({interface_mtu}); raise the interface MTU first")]
    MtuAboveInterface {
        mtu: u16,
        interface: String,
        interface_mtu: u32,
    },
    /// A live backend already serves this socket path.
    #[error("listening on {}: a running backend already serves this socket", .0.display())]
    SocketInUse(PathBuf),
    /// The socket's directory does not exist.
    #[error(
        "listening on {}: directory {} does not exist",
        .0.display(),
        .0.parent().map(|d| d.display().to_string()).unwrap_or_default()
    )]
    SocketDirectoryMissing(PathBuf),
    /// Anything else about the socket path (not a socket, no permission to remove, ...).
    #[error("preparing socket {}: {source}", path.display())]
    SocketPath { path: PathBuf, source: io::Error },
    /// The vhost-user daemon could not be created.
    #[error("creating the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    /// The private socket between the relay and the request handler failed.
    #[error("setting up the internal vhost-user socket: {0}")]
    Internal(#[source] io::Error),
    /// Preparing a queue pair's descriptors (dup, eventfd) failed.
    #[error("setting up queue pair {pair}: {source}")]
    QueueSetup { pair: usize, source: io::Error },
    /// Socket permissions or dropping privileges failed.
    #[error("{0}")]
    Privileges(#[source] crate::privileges::PrivilegeError),
    /// Blocking or waiting for signals failed.
    #[error("setting up signal handling: {0}")]
    Signals(#[source] io::Error),
    /// A thread of the daemon could not be started.
    #[error("starting the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: io::Error,
    },
    /// Subscribing to the namespace's link changes (netlink) failed.
    #[error("watching link changes of {interface} (netlink): {source}")]
    WatchInterface {
        interface: String,
        source: io::Error,
    },
    /// The interface was deleted (or moved to another namespace): the packet sockets are
    /// unhooked for good, and only a new process can open new ones.
    #[error("interface {interface} disappeared (ifindex {ifindex}): exiting so the service manager restarts it")]
    InterfaceGone { interface: String, ifindex: u32 },
    /// The socket handed in (`--fd`, systemd) is not one we can serve; the message says why.
    #[error("{0}")]
    Inherited(String),
    /// `--metrics ADDR:PORT` could not be bound or served.
    #[error("serving metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}
