//! AF_PACKET raw sockets carrying frames with a virtio net header.
//!
//! - [`Interface`]: look up the host interface and read its MTU, flags and MAC.
//! - [`PacketSocket`]: the per-queue socket (`PACKET_VNET_HDR_SZ=12`, or the 10-byte legacy
//!   header on older kernels) with non-blocking `recv`/`send`/`send_batch`.
//! - [`probe_uso`]: does the kernel accept `VIRTIO_NET_HDR_GSO_UDP_L4` on TX?
//! - [`fanout`]: the queue pairs' fanout group, its steering program (which spreads incoming
//!   flows over the enabled pairs) and the steering state that picks it.
//!
//! Inside: `bpf` (the classic BPF assembler both programs use, and their test interpreter),
//! `filter` (the RX destination filter), `sys` (the raw socket system calls).
//!
//! Everything here is tied to the network namespace of the calling thread at the time a socket
//! is opened or an interface is queried.

mod bpf;
pub mod error;
pub mod fanout;
mod filter;
pub mod interface;
pub mod probe;
pub mod socket;
mod sys;

pub use error::{Membership, PacketError};
pub use interface::{Interface, LinkFlags};
pub use probe::{probe_uso, UsoSupport};
pub use socket::{
    PacketSocket, RecvLen, SocketOptions, VnetMode, SOCKET_BUFFER_BYTES, VNET_HDR_LEN,
    VNET_HDR_MRG_LEN,
};
