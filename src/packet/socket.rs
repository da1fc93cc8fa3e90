//! The AF_PACKET raw socket that carries frames with a virtio net header in front.
//!
//! Wire format in both directions with the native 12-byte header (`PACKET_VNET_HDR_SZ=12`):
//! `[virtio_net_hdr_mrg_rxbuf: 12 bytes][Ethernet frame]`. On TX the kernel reads bytes 0..10 and
//! ignores `num_buffers`; on RX it writes all 12 bytes with `num_buffers = 0`. The header is in
//! host byte order (legacy virtio endianness). See docs/kernel-facts.md.

use std::ffi::{c_int, c_uint};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::{Membership, PacketError};
pub use super::filter::DestinationFilter;
use super::interface::Interface;
use super::sys::{
    bind_to, getsockopt_int, open_raw, packet_statistics, set_membership, set_program,
    setsockopt_int,
};
use crate::config::MacAddr;

/// `struct virtio_net_hdr`: what the kernel reads/writes in [`VnetMode::Legacy10`].
pub const VNET_HDR_LEN: usize = 10;
/// `struct virtio_net_hdr_mrg_rxbuf` / `virtio_net_hdr_v1`: the header a modern guest uses.
pub const VNET_HDR_MRG_LEN: usize = 12;

/// Requested socket buffer size for each direction.
///
/// One 64 KiB GSO packet costs about 66–80 KiB of `truesize` against the buffer, and a
/// 60-byte frame about 0.7–1 KiB, so 4 MiB holds ~50 maximal GSO packets or a few thousand small
/// frames: enough to ride out one scheduling delay of the backend thread. The kernel doubles the
/// value for bookkeeping, so `getsockopt(SO_RCVBUF)` reports 8 MiB. `SO_*BUFFORCE` (needs
/// CAP_NET_ADMIN) ignores `net.core.rmem_max`/`wmem_max`; without it the plain option is used and
/// the kernel silently clamps to those sysctls.
pub const SOCKET_BUFFER_BYTES: c_int = 4 << 20;

/// The first Linux release with `PACKET_VNET_HDR_SZ`: commit dfc39d4026fb ("net/packet:
/// support mergeable feature of virtio"), in that release's networking pull. Older kernels get
/// the 10-byte `PACKET_VNET_HDR` ([`VnetMode::Legacy10`]). The one place this version is stated in the
/// code; docs/architecture.md ("Packet socket setup") is the one in the docs.
pub const VNET_HDR_SZ_SINCE: &str = "6.4";

/// How the kernel handles the virtio net header on this socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VnetMode {
    /// The kernel has `PACKET_VNET_HDR_SZ` ([`VNET_HDR_SZ_SINCE`]): it reads/writes 10 or 12
    /// bytes as set.
    Native,
    /// Only `PACKET_VNET_HDR` (older kernel, or forced): the kernel always uses the 10-byte
    /// header; the caller inserts `num_buffers` on RX and strips it on TX itself.
    Legacy10,
}

/// Options for [`PacketSocket::open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketOptions {
    /// Set `PACKET_QDISC_BYPASS`: faster, but no qdisc shaping and no tap visibility, and GSO
    /// frames the device cannot offload are dropped with `ENOBUFS` instead of being segmented.
    pub qdisc_bypass: bool,
    /// Add a `PACKET_MR_PROMISC` membership (the interface goes promiscuous while the socket
    /// lives).
    pub promisc: bool,
    /// The guest's MAC, added as a `PACKET_MR_UNICAST` membership so the NIC accepts frames for
    /// it. All zeros means "not known yet": no membership is added.
    pub guest_mac: [u8; 6],
    /// Use `PACKET_VNET_HDR` (10 bytes) even if `PACKET_VNET_HDR_SZ` is available.
    pub force_legacy_vnet_hdr: bool,
}

/// Result of [`PacketSocket::recv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvLen {
    /// Length of the packet *including* the kernel's vnet header, even if it did not fit
    /// (`MSG_TRUNC` semantics).
    pub len: usize,
    /// The packet was longer than the buffers; only the first part was copied.
    pub truncated: bool,
    /// The 802.1Q/802.1ad tag the interface stripped from this frame, if any.
    pub vlan: Option<VlanTag>,
}

/// A VLAN tag as it goes on the wire: TPID then TCI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    pub tpid: u16,
    pub tci: u16,
}

impl VlanTag {
    pub fn to_bytes(self) -> [u8; 4] {
        let [a, b] = self.tpid.to_be_bytes();
        let [c, d] = self.tci.to_be_bytes();
        [a, b, c, d]
    }
}

/// Room for one `tpacket_auxdata` control message, aligned as cmsg headers require.
#[repr(C, align(8))]
struct AuxBuffer([u8; 64]);

/// The stripped VLAN tag reported in a `PACKET_AUXDATA` control message, if any.
fn vlan_from_control(msg: &libc::msghdr) -> Option<VlanTag> {
    // SAFETY: `msg` was filled in by recvmsg; its control pointer and length describe the
    // buffer we supplied, which the CMSG_* macros walk within bounds.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points at a cmsghdr inside the control buffer.
        let hdr = unsafe { &*cmsg };
        let want = mem::size_of::<libc::tpacket_auxdata>();
        if hdr.cmsg_level == libc::SOL_PACKET
            && hdr.cmsg_type == libc::PACKET_AUXDATA
            // SAFETY: computing the length of a cmsg of `want` bytes has no preconditions.
            && hdr.cmsg_len as usize >= unsafe { libc::CMSG_LEN(want as u32) } as usize
        {
            // SAFETY: the cmsg carries at least `want` bytes of data (checked above); the data
            // may be unaligned, hence read_unaligned.
            let aux: libc::tpacket_auxdata = unsafe {
                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::tpacket_auxdata>())
            };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                return None;
            }
            let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                aux.tp_vlan_tpid
            } else {
                0x8100
            };
            return Some(VlanTag {
                tpid,
                tci: aux.tp_vlan_tci,
            });
        }
        // SAFETY: `msg` and `cmsg` come from the walk above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// An AF_PACKET `SOCK_RAW` socket bound to one interface, with a virtio net header.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    vnet_mode: VnetMode,
    /// Bytes of vnet header the kernel reads/writes: 10 or 12. Atomic so that
    /// `set_vnet_header_len` can take `&self` (the socket is shared between threads).
    kernel_hdr_len: AtomicUsize,
    iface_name: String,
    ifindex: u32,
}

impl PacketSocket {
    /// Opens a packet socket on `iface` and configures it, in this order:
    ///
    /// 1. `socket(AF_PACKET, SOCK_RAW|SOCK_NONBLOCK|SOCK_CLOEXEC, 0)`: protocol 0, so nothing is
    ///    queued before `bind`;
    /// 2. `PACKET_VNET_HDR_SZ=12` ([`VnetMode::Native`]), or `PACKET_VNET_HDR=1`
    ///    ([`VnetMode::Legacy10`]) if forced or the kernel answers `ENOPROTOOPT`/`EINVAL`;
    /// 3. `PACKET_IGNORE_OUTGOING=1`: other sockets' and the host stack's transmissions on the
    ///    interface are not delivered to us (our own never are);
    /// 4. `PACKET_QDISC_BYPASS=1` if requested;
    /// 5. `SO_RCVBUF`/`SO_SNDBUF` (see [`SOCKET_BUFFER_BYTES`]);
    /// 6. `bind` to the ifindex with `ETH_P_ALL`;
    /// 7. `PACKET_ADD_MEMBERSHIP`: unicast for `guest_mac` (unless zero), promisc if requested.
    ///
    /// The socket lives in the network namespace of the calling thread; `iface` must be from
    /// that namespace. Binding an interface that is down succeeds: the next `recv` fails once
    /// with `ENETDOWN` (a pending socket error), `send` fails with `ENETDOWN` while it is down,
    /// and frames flow once it comes up.
    pub fn open(iface: &Interface, opts: &SocketOptions) -> Result<PacketSocket, PacketError> {
        let fd = open_raw().map_err(|source| PacketError::OpenSocket { source })?;
        let name = iface.name();
        let set = |option: &'static str, level: c_int, opt: c_int, value: c_int| {
            setsockopt_int(fd.as_fd(), level, opt, value).map_err(|source| PacketError::SetOption {
                iface: name.to_owned(),
                option,
                value,
                source,
            })
        };

        let mut vnet_mode = VnetMode::Native;
        if !opts.force_legacy_vnet_hdr {
            match setsockopt_int(
                fd.as_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR_SZ,
                VNET_HDR_MRG_LEN as c_int,
            ) {
                Ok(()) => {}
                // ENOPROTOOPT: a kernel before VNET_HDR_SZ_SINCE does not know the option.
                // EINVAL is not expected
                // for SOCK_RAW with a valid size, but fall back rather than fail.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => {
                    log::info!(
                        "{name}: PACKET_VNET_HDR_SZ unavailable ({e}; Linux {VNET_HDR_SZ_SINCE} has it); using the 10-byte PACKET_VNET_HDR"
                    );
                    vnet_mode = VnetMode::Legacy10;
                }
                Err(source) => {
                    return Err(PacketError::SetOption {
                        iface: name.to_owned(),
                        option: "PACKET_VNET_HDR_SZ",
                        value: VNET_HDR_MRG_LEN as c_int,
                        source,
                    })
                }
            }
        } else {
            vnet_mode = VnetMode::Legacy10;
        }
        let kernel_hdr_len = match vnet_mode {
            VnetMode::Native => VNET_HDR_MRG_LEN,
            VnetMode::Legacy10 => {
                set(
                    "PACKET_VNET_HDR",
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    1,
                )?;
                VNET_HDR_LEN
            }
        };

        // VLAN tags the interface stripped come only as auxiliary data; the guest must get
        // them back in the frame.
        set("PACKET_AUXDATA", libc::SOL_PACKET, libc::PACKET_AUXDATA, 1)?;

        set(
            "PACKET_IGNORE_OUTGOING",
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            1,
        )?;
        if opts.qdisc_bypass {
            set(
                "PACKET_QDISC_BYPASS",
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                1,
            )?;
        }
        set_buffer_size(fd.as_fd(), name, true)?;
        set_buffer_size(fd.as_fd(), name, false)?;

        bind_to(fd.as_fd(), iface.index(), libc::ETH_P_ALL as u16).map_err(|source| {
            PacketError::Bind {
                iface: name.to_owned(),
                source,
            }
        })?;

        let sock = PacketSocket {
            fd,
            vnet_mode,
            kernel_hdr_len: AtomicUsize::new(kernel_hdr_len),
            iface_name: name.to_owned(),
            ifindex: iface.index(),
        };
        if opts.guest_mac != [0; 6] {
            sock.add_membership(opts.guest_mac)?;
        }
        if opts.promisc {
            sock.membership(true, Membership::Promisc)?;
        }
        log::debug!(
            "{name}: packet socket fd {} open, {:?}, vnet header {} bytes, qdisc bypass {}, guest MAC {}",
            sock.fd.as_raw_fd(),
            sock.vnet_mode,
            kernel_hdr_len,
            opts.qdisc_bypass,
            MacAddr(opts.guest_mac)
        );
        Ok(sock)
    }

    /// Sets the header length the guest uses: 10 or 12.
    ///
    /// In [`VnetMode::Native`] this sets `PACKET_VNET_HDR_SZ` so the kernel reads/writes exactly
    /// that many bytes. In [`VnetMode::Legacy10`] the kernel side stays at 10 bytes and this only
    /// validates `len`; the caller handles `num_buffers`. Do not change it while another thread
    /// is in `recv`/`send` on this socket: a packet in flight may be framed with either length.
    pub fn set_vnet_header_len(&self, len: usize) -> Result<(), PacketError> {
        let err = |source| PacketError::SetOption {
            iface: self.iface_name.clone(),
            option: "PACKET_VNET_HDR_SZ",
            value: c_int::try_from(len).unwrap_or(c_int::MAX),
            source,
        };
        if len != VNET_HDR_LEN && len != VNET_HDR_MRG_LEN {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "virtio net header length must be 10 or 12",
            )));
        }
        if self.vnet_mode == VnetMode::Legacy10 {
            return Ok(());
        }
        setsockopt_int(
            self.fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR_SZ,
            len as c_int,
        )
        .map_err(err)?;
        self.kernel_hdr_len.store(len, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of virtio net header the kernel currently reads on TX and writes on RX: 10 or 12.
    pub fn kernel_vnet_header_len(&self) -> usize {
        self.kernel_hdr_len.load(Ordering::Relaxed)
    }

    /// Asks the kernel for the header length (`PACKET_VNET_HDR_SZ`, or `PACKET_VNET_HDR` in
    /// legacy mode). Should always equal [`PacketSocket::kernel_vnet_header_len`].
    pub fn query_kernel_vnet_header_len(&self) -> io::Result<usize> {
        match self.vnet_mode {
            VnetMode::Native => {
                getsockopt_int(self.fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR_SZ)
                    .map(|v| v as usize)
            }
            VnetMode::Legacy10 => {
                getsockopt_int(self.fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR).map(|v| {
                    if v != 0 {
                        VNET_HDR_LEN
                    } else {
                        0
                    }
                })
            }
        }
    }

    /// How the kernel handles the vnet header on this socket.
    pub fn vnet_mode(&self) -> VnetMode {
        self.vnet_mode
    }

    /// The interface name the socket is bound to.
    pub fn interface_name(&self) -> &str {
        &self.iface_name
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Length of the next queued frame (without the vnet header), 0 when none is queued:
    /// `SIOCINQ` on a packet socket reports the head skb's length, so RX can tell whether the
    /// guest buffers at hand hold the next frame before it is taken off the queue.
    pub fn pending_len(&self) -> io::Result<usize> {
        let mut len: c_int = 0;
        // SAFETY: SIOCINQ writes one int through the pointer, which points at `len`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::FIONREAD, &mut len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len.max(0) as usize)
    }

    /// Takes the socket's pending error (`SO_ERROR`), if any: e.g. `ENETDOWN` once the link
    /// went down. It keeps the socket readable until taken or met by a receive.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let err = getsockopt_int(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_ERROR)?;
        Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
    }

    /// Whether a frame (or an error) is queued, without waiting: `poll(2)` with no timeout,
    /// cheaper than `SIOCINQ` (no queue lock), for callers that poll in a loop.
    pub fn readable(&self) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, alive for the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc > 0 && pfd.revents != 0)
    }

    /// Receives one packet without blocking: `[kernel vnet header][Ethernet frame]`, scattered
    /// over `iov` in order.
    ///
    /// Returns `WouldBlock` when the queue is empty. The total length of `iov` must be at least
    /// [`PacketSocket::kernel_vnet_header_len`]; with less the kernel fails with `EINVAL` and
    /// **the packet is lost**. A packet longer than the buffers is truncated (the header still
    /// describes the whole packet) and also consumed; size buffers for 12 + 65549 bytes to hold
    /// any IPv4 GSO packet. `num_buffers` is always written as 0 in [`VnetMode::Native`] with
    /// 12 bytes. `ENETDOWN` is reported once (a pending socket error) when the interface goes
    /// down *or is removed*; after removal `send` fails with `ENXIO` and nothing arrives again
    /// even if an interface of the same name reappears, so reopen the socket.
    ///
    /// # Safety
    ///
    /// Every `iovec` in `iov` must point to memory that is valid for writes of `iov_len` bytes
    /// for the duration of the call and not accessed by anyone else meanwhile (for guest memory:
    /// mapped, and not concurrently used by the guest for anything the caller relies on).
    pub unsafe fn recv(&self, iov: &mut [libc::iovec]) -> io::Result<RecvLen> {
        let mut aux = AuxBuffer([0; 64]);
        let mut msg = empty_msghdr();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        msg.msg_control = aux.0.as_mut_ptr().cast();
        msg.msg_controllen = aux.0.len() as _;
        // SAFETY: `msg` is a valid msghdr without a name; its control buffer is `aux`, alive
        // and writable for its length; its iovecs point to writable memory of the stated
        // lengths per this function's contract, and the iovec array lives across the call.
        let n = unsafe {
            libc::recvmsg(
                self.fd.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RecvLen {
            len: n as usize,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            vlan: vlan_from_control(&msg),
        })
    }

    /// Safe form of [`PacketSocket::recv`] for memory the caller already borrows as slices.
    pub fn recv_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<RecvLen> {
        // SAFETY: std guarantees `IoSliceMut` is ABI-compatible with `iovec` on Unix, and each
        // one is a live `&mut [u8]` borrow, so the memory is valid for writes of its length and
        // exclusively ours for the duration of the call.
        unsafe {
            let iov =
                std::slice::from_raw_parts_mut(bufs.as_mut_ptr().cast::<libc::iovec>(), bufs.len());
            self.recv(iov)
        }
    }

    /// Sends one packet without blocking: `[kernel vnet header][Ethernet frame]`, gathered from
    /// `iov` in order. Returns the bytes sent *including* the header.
    ///
    /// Errors (see docs/kernel-facts.md, "TX"): `EINVAL` for a malformed header (hdr_len,
    /// csum_start/offset beyond the frame, gso_size 0, unknown or mismatched gso_type) or a
    /// packet shorter than header + 14 bytes; `EMSGSIZE` for a non-GSO frame over MTU + 14;
    /// `ENOBUFS` when the device dropped it; `WouldBlock` when the send buffer is full. In
    /// every error case nothing was sent.
    ///
    /// # Safety
    ///
    /// Every `iovec` in `iov` must point to memory valid for reads of `iov_len` bytes for the
    /// duration of the call.
    pub unsafe fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut msg = empty_msghdr();
        // sendmsg never writes through msg_iov; the field is `*mut` only because msghdr is
        // shared with recvmsg.
        msg.msg_iov = iov.as_ptr().cast_mut();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` is a valid msghdr without name or control data; its iovecs point to
        // readable memory of the stated lengths per this function's contract.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Safe form of [`PacketSocket::send`].
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: std guarantees `IoSlice` is ABI-compatible with `iovec` on Unix, and each one
        // is a live `&[u8]` borrow, valid for reads of its length during the call.
        unsafe {
            let iov = std::slice::from_raw_parts(bufs.as_ptr().cast::<libc::iovec>(), bufs.len());
            self.send(iov)
        }
    }

    /// Sends several packets with one `sendmmsg(MSG_DONTWAIT)` call. Each `mmsghdr` describes one
    /// packet as in [`PacketSocket::send`]; `msg_name` must be null (the socket is bound).
    ///
    /// Semantics (Linux `__sys_sendmmsg`):
    /// - Messages are sent in order and the call stops at the first one that fails.
    /// - `Ok(n)` with `n >= 1`: messages `0..n` were sent and their `msg_len` holds the bytes sent
    ///   (including the header). If `n < msgs.len()`, message `n` failed and **its error is
    ///   discarded** by the kernel; nothing after it was attempted. Retry from `msgs[n]`: a
    ///   persistent error (e.g. `EINVAL` for a bad header) then comes back as `Err` because it is
    ///   the first message, and the caller should drop that packet and continue after it.
    /// - `Err(e)`: the first message failed with `e`; nothing was sent.
    /// - At most `UIO_MAXIOV` (1024) messages are attempted per call.
    /// - `Ok(0)` only for an empty `msgs`.
    ///
    /// # Safety
    ///
    /// For every message, `msg_hdr.msg_iov` must point to `msg_iovlen` valid `iovec`s, each
    /// pointing to memory valid for reads of `iov_len` bytes for the duration of the call;
    /// `msg_name`/`msg_control` must be null or valid for their stated lengths.
    pub unsafe fn send_batch(&self, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
        if msgs.is_empty() {
            return Ok(0);
        }
        // The kernel silently caps vlen at UIO_MAXIOV; do it here so the count is explicit.
        let vlen = msgs.len().min(UIO_MAXIOV) as c_uint;
        // SAFETY: `msgs` is a valid, writable array of at least `vlen` mmsghdr (the kernel
        // writes `msg_len`), and the buffers they reference are readable per the contract.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT as _,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Adds a `PACKET_MR_UNICAST` membership for `mac` (e.g. the guest changed its MAC).
    ///
    /// Memberships are reference-counted per socket and removed when the socket closes. On a
    /// device without unicast filtering the kernel turns promiscuous mode on instead.
    pub fn add_membership(&self, mac: [u8; 6]) -> Result<(), PacketError> {
        self.membership(true, Membership::Unicast(mac))
    }

    /// Drops one reference of a membership added with [`PacketSocket::add_membership`].
    ///
    /// The kernel returns success even if this socket holds no such membership (nothing
    /// happens then), so this cannot detect unbalanced calls.
    pub fn drop_membership(&self, mac: [u8; 6]) -> Result<(), PacketError> {
        self.membership(false, Membership::Unicast(mac))
    }

    /// Which frames the kernel queues on this socket (a classic BPF filter, so unwanted
    /// frames cost nothing in userspace). The kernel swaps filters atomically.
    pub fn set_destination_filter(&self, filter: DestinationFilter) -> Result<(), PacketError> {
        let err = |source| PacketError::SetOption {
            iface: self.iface_name.clone(),
            option: "SO_ATTACH_FILTER",
            value: i32::from(filter != DestinationFilter::Everything),
            source,
        };
        let fd = self.fd.as_fd();
        match filter.program() {
            Some(program) => {
                set_program(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program).map_err(err)
            }
            // ENOENT: there was no filter, which is what was asked for.
            None => match setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(err(e)),
                _ => Ok(()),
            },
        }
    }

    /// Turns the promiscuous membership on or off (counted like the unicast ones).
    pub fn set_promisc(&self, on: bool) -> Result<(), PacketError> {
        self.membership(on, Membership::Promisc)
    }

    fn membership(&self, add: bool, membership: Membership) -> Result<(), PacketError> {
        let mut mreq = libc::packet_mreq {
            mr_ifindex: self.ifindex as c_int,
            mr_type: 0,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        match membership {
            Membership::Unicast(mac) => {
                mreq.mr_type = libc::PACKET_MR_UNICAST as u16;
                mreq.mr_alen = 6;
                mreq.mr_address[..6].copy_from_slice(&mac);
            }
            Membership::Promisc => mreq.mr_type = libc::PACKET_MR_PROMISC as u16,
        }
        if let Err(source) = set_membership(self.fd.as_fd(), add, &mreq) {
            let iface = self.iface_name.clone();
            return Err(if add {
                PacketError::AddMembership {
                    iface,
                    membership,
                    source,
                }
            } else {
                PacketError::DropMembership {
                    iface,
                    membership,
                    source,
                }
            });
        }
        Ok(())
    }

    /// Duplicates the descriptor (`F_DUPFD_CLOEXEC`), e.g. to register it a second time with
    /// epoll for `EPOLLOUT` under a different token. Both refer to the same socket.
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Reads and **resets** the kernel's counters (`PACKET_STATISTICS`): `(tp_packets, tp_drops)`.
    ///
    /// `tp_packets` counts every packet that reached the socket since the last read, *including*
    /// the dropped ones; `tp_drops` counts those dropped because the receive buffer was full
    /// (or a vnet header could not be built).
    pub fn drops(&self) -> io::Result<(u32, u32)> {
        let stats = packet_statistics(self.fd.as_fd())?;
        Ok((stats.tp_packets, stats.tp_drops))
    }

    /// The effective `(SO_RCVBUF, SO_SNDBUF)` as reported by the kernel (twice the requested
    /// value, see [`SOCKET_BUFFER_BYTES`]).
    pub fn buffer_sizes(&self) -> io::Result<(usize, usize)> {
        let rcv = getsockopt_int(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF)?;
        let snd = getsockopt_int(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF)?;
        Ok((rcv.max(0) as usize, snd.max(0) as usize))
    }

    /// Receives and discards up to `max` queued frames without blocking; returns how many.
    /// Stops early at an empty queue or any error (a pending `ENETDOWN`, ...).
    pub fn discard_queued(&self, max: usize) -> usize {
        // Larger than any vnet header (a smaller buffer fails with EINVAL); frames are cut.
        let mut scratch = [0u8; 64];
        let mut n = 0;
        while n < max {
            match self.recv_vectored(&mut [IoSliceMut::new(&mut scratch)]) {
                Ok(_) => n += 1,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::debug!("{}: discarding queued frames: {e}", self.iface_name);
                    }
                    break;
                }
            }
        }
        n
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Linux's per-call limit for iovecs and for sendmmsg's vlen (`UIO_MAXIOV`). A recvmsg with more
/// iovecs fails with EMSGSIZE before the kernel looks at its queue: the frame stays there.
pub const UIO_MAXIOV: usize = 1024;

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is a C struct of integers and raw pointers (plus padding on some
    // targets); all-zero is a valid "no name, no iovecs, no control data" value.
    unsafe { mem::zeroed() }
}

/// Tries `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` first (not capped by the sysctl maxima) and falls
/// back to the plain option when the caller lacks CAP_NET_ADMIN.
fn set_buffer_size(fd: BorrowedFd<'_>, iface: &str, rcv: bool) -> Result<(), PacketError> {
    let (force, plain, force_name, plain_name) = if rcv {
        (
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            "SO_RCVBUFFORCE",
            "SO_RCVBUF",
        )
    } else {
        (
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            "SO_SNDBUFFORCE",
            "SO_SNDBUF",
        )
    };
    let err = |option, source| PacketError::SetOption {
        iface: iface.to_owned(),
        option,
        value: SOCKET_BUFFER_BYTES,
        source,
    };
    match setsockopt_int(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER_BYTES) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            log::debug!(
                "{iface}: {force_name} not permitted, using {plain_name} (clamped by sysctl)"
            );
            setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)
                .map_err(|e| err(plain_name, e))
        }
        Err(e) => Err(err(force_name, e)),
    }
}
