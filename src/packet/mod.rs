//! AF_PACKET raw sockets carrying frames with a virtio net header.
//!
//! - [`Interface`]: look up the host interface and read its MTU, flags and MAC.
//! - [`PacketSocket`]: the per-queue socket (`PACKET_VNET_HDR_SZ=12`, or the 10-byte legacy
//!   header on older kernels) with non-blocking `recv`/`send`/`send_batch`.
//! - [`probe_uso`]: does the kernel accept `VIRTIO_NET_HDR_GSO_UDP_L4` on TX?
//! - [`steering`]: the fanout program that spreads incoming flows over the enabled queue pairs.
//!
//! Everything here is tied to the network namespace of the calling thread at the time a socket
//! is opened or an interface is queried.

pub mod error;
pub mod interface;
pub mod probe;
pub mod socket;
pub mod steering;

pub use error::{Membership, PacketError};
pub use interface::{Interface, LinkFlags};
pub use probe::{probe_uso, UsoSupport};
pub use socket::{
    PacketSocket, RecvLen, SocketOptions, VnetMode, SOCKET_BUFFER_BYTES, VNET_HDR_LEN,
    VNET_HDR_MRG_LEN,
};
