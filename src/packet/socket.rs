//! The AF_PACKET raw socket that carries frames with a virtio net header in front.
//!
//! Wire format in both directions with the native 12-byte header (`PACKET_VNET_HDR_SZ=12`):
//! `[virtio_net_hdr_mrg_rxbuf: 12 bytes][Ethernet frame]`. On TX the kernel reads bytes 0..10 and
//! ignores `num_buffers`; on RX it writes all 12 bytes with `num_buffers = 0`. The header is in
//! host byte order (legacy virtio endianness). See docs/kernel-facts.md.

use std::ffi::{c_int, c_uint, c_void};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::{MacDisplay, Membership, PacketError};
use super::interface::Interface;

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

/// Which frames a packet socket lets through, by destination MAC
/// ([`PacketSocket::set_destination_filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationFilter {
    /// Every frame (`--promisc`).
    Everything,
    /// Group addresses only: broadcast and multicast (the guest's MAC is not known yet).
    Group,
    /// Group addresses and frames for this MAC.
    GroupAnd([u8; 6]),
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
            MacDisplay(&opts.guest_mac)
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
        let mut err: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one int through the pointer, which points at `err`, and its
        // size through `len`.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
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
        let (unicast, group);
        let program: &[libc::sock_filter] = match filter {
            DestinationFilter::GroupAnd(mac) => {
                unicast = destination_filter(mac);
                &unicast
            }
            DestinationFilter::Group => {
                group = group_filter();
                &group
            }
            DestinationFilter::Everything => {
                // SAFETY: SO_DETACH_FILTER takes no argument; a zero int is a valid optval.
                let rc = unsafe {
                    libc::setsockopt(
                        self.fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_DETACH_FILTER,
                        (&0 as *const c_int).cast::<c_void>(),
                        mem::size_of::<c_int>() as libc::socklen_t,
                    )
                };
                // ENOENT: there was no filter, which is what was asked for.
                return match rc {
                    0 => Ok(()),
                    _ => match io::Error::last_os_error() {
                        e if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                        e => Err(err(e)),
                    },
                };
            }
        };
        let fprog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` points at `program`, alive across the call; the kernel copies it.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast::<c_void>(),
                mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(())
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
        let opt = if add {
            libc::PACKET_ADD_MEMBERSHIP
        } else {
            libc::PACKET_DROP_MEMBERSHIP
        };
        // SAFETY: `mreq` is a fully initialised packet_mreq that outlives the call, and the
        // length passed is exactly its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                opt,
                (&mreq as *const libc::packet_mreq).cast::<c_void>(),
                mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let source = io::Error::last_os_error();
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
        let mut stats = MaybeUninit::<libc::tpacket_stats>::zeroed();
        let mut len = mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` is writable memory of `len` bytes and `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                stats.as_mut_ptr().cast::<c_void>(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised and partly overwritten by the kernel: every bit pattern is a
        // valid pair of u32.
        let stats = unsafe { stats.assume_init() };
        Ok((stats.tp_packets, stats.tp_drops))
    }

    /// The effective `(SO_RCVBUF, SO_SNDBUF)` as reported by the kernel (twice the requested
    /// value, see [`SOCKET_BUFFER_BYTES`]).
    pub fn buffer_sizes(&self) -> io::Result<(usize, usize)> {
        let rcv = getsockopt_int(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF)?;
        let snd = getsockopt_int(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF)?;
        Ok((rcv.max(0) as usize, snd.max(0) as usize))
    }

    /// Joins fanout group `group` on this socket's interface, or with `None` creates one with
    /// an id the kernel picks among those unused in this network namespace
    /// (`PACKET_FANOUT_FLAG_UNIQUEID`). Returns the group's id, for the other members.
    ///
    /// A fixed id, or one derived from the pid and the interface, could be the id of another
    /// program's group of the same kind on the same interface; joining it would split both
    /// programs' traffic between them. A kernel-picked id cannot collide.
    ///
    /// The group is `PACKET_FANOUT_CBPF` (the program comes later, see
    /// [`PacketSocket::set_fanout_program`]; until then every frame goes to the first member)
    /// with `PACKET_FANOUT_FLAG_IGNORE_OUTGOING`: once in a group, a member's own
    /// `PACKET_IGNORE_OUTGOING` no longer applies (the group's hook receives for all members),
    /// so without the flag whatever the host, another socket or a software-segmented GSO frame
    /// of ours sends on the interface would reach a guest. The flag is honoured since Linux 6.2;
    /// older kernels accept and ignore it. Never `PACKET_FANOUT_FLAG_DEFRAG`: it reassembles IP
    /// fragments into datagrams larger than the MTU, which a guest would get as one frame it
    /// never asked for.
    ///
    /// Members keep their place in join order (the kernel also re-adds them in creation order
    /// after the interface goes down and up). A socket leaves its group only when it is closed.
    pub fn join_fanout(&self, group: Option<u16>) -> Result<u16, PacketError> {
        let unique = if group.is_none() {
            libc::PACKET_FANOUT_FLAG_UNIQUEID
        } else {
            0
        };
        let type_flags =
            libc::PACKET_FANOUT_CBPF | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING | unique;
        // `id | type_flags << 16`; without DEFRAG (0x8000) it stays below i32::MAX.
        let value = (u32::from(group.unwrap_or(0)) | (type_flags << 16)) as c_int;
        let err = |source| PacketError::SetOption {
            iface: self.iface_name.clone(),
            option: "PACKET_FANOUT",
            value,
            source,
        };
        setsockopt_int(
            self.fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            value,
        )
        .map_err(err)?;
        match self.fanout_group() {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(err(io::Error::other(
                "the kernel reports no fanout group after joining one",
            ))),
            Err(e) => Err(err(e)),
        }
    }

    /// The id of the fanout group this socket is in, if any (`getsockopt(PACKET_FANOUT)`).
    pub fn fanout_group(&self) -> io::Result<Option<u16>> {
        let v = getsockopt_int(self.fd.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT)?;
        // id in bits 0..16, type in 16..24, flags in 24..32; 0 when in no group.
        Ok((v != 0).then_some((v as u32 & 0xffff) as u16))
    }

    /// Replaces the program of this socket's fanout group (`PACKET_FANOUT_DATA`; the kernel
    /// swaps it atomically for all members). Its result is the index of the member, in join
    /// order, that gets the frame.
    pub fn set_fanout_program(&self, program: &[libc::sock_filter]) -> Result<(), PacketError> {
        set_fanout_program(self.fd.as_fd(), &self.iface_name, program)
    }

    /// A handle on this socket's fanout group, to change its program from another thread
    /// without sharing the socket (a duplicate of the descriptor).
    pub fn fanout_handle(&self) -> io::Result<FanoutHandle> {
        Ok(FanoutHandle {
            fd: self.fd.try_clone()?,
            iface_name: self.iface_name.clone(),
        })
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

/// A duplicate descriptor of a fanout group member, to replace the group's program.
#[derive(Debug)]
pub struct FanoutHandle {
    fd: OwnedFd,
    iface_name: String,
}

impl FanoutHandle {
    /// See [`PacketSocket::set_fanout_program`].
    pub fn set_program(&self, program: &[libc::sock_filter]) -> Result<(), PacketError> {
        set_fanout_program(self.fd.as_fd(), &self.iface_name, program)
    }
}

fn set_fanout_program(
    fd: BorrowedFd<'_>,
    iface: &str,
    program: &[libc::sock_filter],
) -> Result<(), PacketError> {
    let err = |source| PacketError::SetOption {
        iface: iface.to_owned(),
        option: "PACKET_FANOUT_DATA",
        value: c_int::try_from(program.len()).unwrap_or(c_int::MAX),
        source,
    };
    let len = u16::try_from(program.len()).map_err(|_| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a classic BPF program has at most 4096 instructions",
        ))
    })?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, alive across the call; the kernel copies it and
    // never writes through the pointer.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_FANOUT_DATA,
            (&fprog as *const libc::sock_fprog).cast::<c_void>(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
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

/// A raw packet socket that receives nothing until bound with a protocol.
pub(super) fn open_raw() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by socket(2), is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds a packet socket to an interface; `protocol` (host order) 0 means send-only.
pub(super) fn bind_to(fd: BorrowedFd<'_>, ifindex: u32, protocol: u16) -> io::Result<()> {
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: protocol.to_be(),
        sll_ifindex: ifindex as c_int,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: `addr` is a fully initialised sockaddr_ll that outlives the call, and the length
    // passed is exactly its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    value: c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int living across the call and the length is its size; the kernel
    // only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const c_int).cast::<c_void>(),
            mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<c_int> {
    let mut value: c_int = 0;
    let mut len = mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: `value` is writable memory of `len` bytes and `len` is a valid in/out length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut c_int).cast::<c_void>(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Classic BPF over the Ethernet header: accept a group address (I/G bit, broadcast included),
/// drop the rest.
fn group_filter() -> [libc::sock_filter; 4] {
    [
        bpf(LD_B, 0, 0, 0),       // 0: A = first octet of the destination
        bpf(JSET, 0, 1, 1),       // 1: group address -> 2, else 3
        bpf(RET, 0, 0, u32::MAX), // 2: accept the whole frame
        bpf(RET, 0, 0, 0),        // 3: drop
    ]
}

// Classic BPF opcodes the destination filters use.
const LD_B: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_H: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
const LD_W: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JSET: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const RET: u16 = 0x06; // BPF_RET | BPF_K

/// One instruction; jump offsets count from the next instruction.
fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Classic BPF over the Ethernet header: accept a group address (I/G bit, broadcast included)
/// or exactly `mac`, drop the rest.
fn destination_filter(mac: [u8; 6]) -> [libc::sock_filter; 8] {
    let op = bpf;
    let first4 = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let last2 = u32::from(u16::from_be_bytes([mac[4], mac[5]]));
    [
        op(LD_B, 0, 0, 0),       // 0: A = first octet of the destination
        op(JSET, 4, 0, 1),       // 1: group address -> 6 (accept)
        op(LD_W, 0, 0, 0),       // 2: A = octets 0..4
        op(JEQ, 0, 3, first4),   // 3: not ours -> 7 (drop)
        op(LD_H, 0, 0, 4),       // 4: A = octets 4..6
        op(JEQ, 0, 1, last2),    // 5: ours -> 6, else 7
        op(RET, 0, 0, u32::MAX), // 6: accept the whole frame
        op(RET, 0, 0, 0),        // 7: drop
    ]
}

#[cfg(test)]
mod filter_tests {
    use super::*;

    /// Runs the few classic BPF instructions the filter uses.
    fn run(prog: &[libc::sock_filter], frame: &[u8]) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            let k = i.k as usize;
            match i.code {
                0x30 => a = u32::from(frame[k]),
                0x28 => a = u32::from(u16::from_be_bytes([frame[k], frame[k + 1]])),
                0x20 => a = u32::from_be_bytes(frame[k..k + 4].try_into().unwrap()),
                0x45 | 0x15 => {
                    let taken = if i.code == 0x45 {
                        a & i.k != 0
                    } else {
                        a == i.k
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                0x06 => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn destination_filter_keeps_the_guest_broadcast_and_multicast() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let prog = destination_filter(mac);
        let frame = |dst: [u8; 6]| {
            let mut f = dst.to_vec();
            f.extend_from_slice(&[0; 8]);
            f
        };
        assert_eq!(run(&prog, &frame(mac)), u32::MAX);
        assert_eq!(run(&prog, &frame([0xff; 6])), u32::MAX, "broadcast");
        assert_eq!(
            run(&prog, &frame([0x01, 0, 0x5e, 0, 0, 1])),
            u32::MAX,
            "IPv4 multicast"
        );
        assert_eq!(
            run(&prog, &frame([0x33, 0x33, 0, 0, 0, 1])),
            u32::MAX,
            "IPv6 multicast"
        );
        assert_eq!(
            run(&prog, &frame([0x02, 0x11, 0x22, 0x33, 0x44, 0x56])),
            0,
            "last octet differs"
        );
        assert_eq!(
            run(&prog, &frame([0x02, 0x11, 0x22, 0x34, 0x44, 0x55])),
            0,
            "first four differ"
        );
        assert_eq!(
            run(&prog, &frame([0x52, 0x54, 0, 0, 0, 1])),
            0,
            "someone else"
        );
    }

    #[test]
    fn group_filter_keeps_broadcast_and_multicast_only() {
        let prog = group_filter();
        let frame = |dst: [u8; 6]| {
            let mut f = dst.to_vec();
            f.extend_from_slice(&[0; 8]);
            f
        };
        assert_eq!(run(&prog, &frame([0xff; 6])), u32::MAX, "broadcast");
        assert_eq!(run(&prog, &frame([0x33, 0x33, 0, 0, 0, 1])), u32::MAX);
        assert_eq!(run(&prog, &frame([0x01, 0, 0x5e, 0, 0, 1])), u32::MAX);
        assert_eq!(run(&prog, &frame([0x02, 0x11, 0x22, 0x33, 0x44, 0x55])), 0);
        assert_eq!(run(&prog, &frame([0x52, 0x54, 0, 0x12, 0x34, 0x56])), 0);
    }
}
