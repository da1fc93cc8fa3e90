#![allow(dead_code)]
//! A virtio-net "guest driver" speaking vhost-user, for integration tests.
//!
//! `TestFrontend` connects to a vhost-user backend's UNIX socket, negotiates features the way
//! QEMU does, lays out two split virtqueues (queue 0 = RX, queue 1 = TX) in a memfd that plays
//! the role of guest RAM, and then lets a test post RX buffers, send TX frames and observe the
//! used rings. Guest physical address (GPA) == offset into the memfd; the vring addresses sent
//! with SET_VRING_ADDR are this process's virtual addresses of the same bytes (as vhost-user
//! requires).
//!
//! # API overview
//!
//! ```text
//! FrontendConfig { features: u64, queue_size: u16, mem_size: usize }   // Default: SUPPORTED, 256, 64 MiB
//!
//! TestFrontend::connect(path: &Path, timeout: Duration) -> TestFrontend          (retries until the socket appears)
//! TestFrontend::try_connect(path, timeout) -> Result<TestFrontend, String>
//! TestFrontend::from_stream(UnixStream) -> TestFrontend / try_from_stream   (an accepted connection)
//!   .backend_features() -> u64                     GET_FEATURES (cached)
//!   .backend_protocol_features() -> u64            GET_PROTOCOL_FEATURES (0 if PROTOCOL_FEATURES not offered)
//!   .set_wanted_protocol_features(u64)             before start; default MQ|REPLY_ACK|CONFIG|CONFIGURE_MEM_SLOTS
//!   .set_without_protocol_features()               before start; a frontend that never acks PROTOCOL_FEATURES
//!   .set_ring_base(u16)                            before start; initial avail/used index (test 16-bit wrap)
//!   .set_queue_pairs(n)                            before start; n RX/TX pairs (acks MQ when n > 1)
//!   .select_pair(i)                                every queue operation below acts on pair i (default 0)
//!   .set_pair_enabled(i, bool) / try_set_pair_enabled   SET_VRING_ENABLE for both rings of pair i
//!   .start(cfg) -> u64 / .try_start(cfg) -> Result<u64, String>   full bring-up; returns acked virtio features
//!      = try_negotiate(features) + try_setup_memory(mem_size) + try_setup_rings(queue_size) + try_enable_rings()
//!   .get_config(offset: u32, len: u32) -> Vec<u8>  / try_get_config
//!   .header_len() -> usize                         12 if VERSION_1 or MRG_RXBUF acked, else 10
//!   .acked_features() / .acked_protocol_features() / .has_feature(mask) / .queue_num() / .queue_size()
//!
//!   RX:  .post_rx(&[u32]) -> u16 (head) / .try_post_rx(&[u32]) -> Option<u16>
//!        .post_rx_buffers(count, size) / .kick_rx() / .kick_rx_if_needed() -> bool
//!        .recv(timeout) -> Option<RxPacket>        RxPacket { header, frame, used_lens, num_buffers, heads }
//!        .set_rx_autorefill(bool)                  re-post each consumed chain (same shape) and kick
//!        .rx_used_idx() -> u16 (device's used.idx)  .rx_calls() -> u64  .rx_kicks() -> u64
//!        .rx_outstanding() -> usize                chains posted and not yet returned
//!        .rx_partial_entries() / .discard_rx_partial()   a packet still missing buffers after a timeout
//!   TX:  .send(header, frame, TxLayout) -> u16 (head) / .try_send(..) -> Option<u16>
//!        TxLayout::{Combined, Separate, SplitAt(Vec<usize>), Indirect, IndirectSplitAt(Vec<usize>)}
//!        .kick_tx() / .kick_tx_if_needed() -> bool
//!        .wait_tx_used(n, timeout) -> Vec<(u32, u32)>   (id, len); partial on timeout
//!        .tx_used_idx() -> u16  .tx_calls() -> u64  .tx_kicks() -> u64  .tx_outstanding() -> usize
//!   Generic: .used_idx(Queue) .consumed_idx(Queue) .avail_idx(Queue) .calls(Queue) .kick(Queue)
//!        .wait_used(Queue, n, timeout) -> Vec<(u32, u32)>   (frees tracked chains, RX data dropped)
//!        .unknown_used(Queue) -> u64               used entries whose id was not an outstanding head
//!   Raw escape hatches (hostile tests):
//!        .raw_add_descriptor(Queue, RawDesc) -> u16     take a free slot and write it
//!        .raw_alloc_desc / raw_free_desc / raw_write_desc(Queue, index, RawDesc) / raw_read_desc
//!        .raw_push_avail(Queue, head)              write avail slot + publish idx+1 (tracked as "raw")
//!        .raw_write_avail_slot(Queue, slot, head) / raw_set_avail_idx(Queue, idx) / raw_set_avail_flags
//!        .raw_set_used_event(Queue, v)  .raw_fill_call(Queue)  (the backend's next signal fails: EAGAIN)
//!        .alloc_buffer(size) -> u64 / free_buffer(gpa, size) / write_guest(gpa, &[u8]) / read_guest(gpa, len)
//!        .ring_layout(Queue) -> RingLayout  .guest_mem_size()  .raw_frontend() -> &mut vhost Frontend
//!   .stop(self) -> (u16, u16)                      GET_VRING_BASE for RX and TX of the selected pair, then disconnect
//!
//! raw_message(&mut UnixStream, request, flags, payload) / raw_reply(&mut UnixStream, timeout)
//!   a request the vhost crate would not send (keep a `try_clone` of the stream given to the frontend)
//! memfd_region(name, gpa, size) -> MemfdRegion { info, .. }   an extra region for ADD/REM_MEM_REG
//!
//! vnet_header(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers, len) -> Vec<u8>
//! Hdr { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers: Option<u16> }, Hdr::parse(&[u8])
//! ```
//!
//! # Behaviour worth knowing
//!
//! * Every wait has a deadline: `recv` returns `None` on timeout (a packet whose `num_buffers`
//!   entries are only partly there is kept and completed by the next `recv`), `wait_*_used`
//!   return what arrived. Waiting polls `used.idx` and sleeps on the call eventfds (epoll, 1 ms
//!   slices), draining them non-blockingly; the drained counter values are summed into
//!   `rx_calls()` / `tx_calls()`.
//! * With EVENT_IDX acked, `used_event` is kept equal to the driver's consumed used index, so
//!   the backend is asked to signal for every new entry. `kick_*` always kicks; `kick_*_if_needed`
//!   honours `avail_event` / `VRING_USED_F_NO_NOTIFY` like a guest driver would.
//! * Once REPLY_ACK is negotiated every message carries NEED_REPLY, so each SET_* call returns
//!   only after the backend processed it (and reports the backend's failure as an error).
//! * RX buffers are filled with `RX_POISON` before being posted; data read back is truncated to
//!   what was posted if a backend claims a longer `used.len` (the claimed length stays visible
//!   in `used_lens`). `recv` panics on a used id that is not an outstanding RX chain.
//! * Panics only happen with descriptive messages; `try_*` variants return `Err(String)`.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Virtio feature bits (as masks) that tests commonly need.
pub mod feat {
    use virtio_bindings::virtio_config as cfg;
    use virtio_bindings::virtio_net as net;
    use virtio_bindings::virtio_ring as ring;

    pub const CSUM: u64 = 1 << net::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << net::VIRTIO_NET_F_GUEST_CSUM;
    pub const MTU: u64 = 1 << net::VIRTIO_NET_F_MTU;
    pub const MAC: u64 = 1 << net::VIRTIO_NET_F_MAC;
    pub const GUEST_TSO4: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_ECN: u64 = 1 << net::VIRTIO_NET_F_GUEST_ECN;
    pub const GUEST_UFO: u64 = 1 << net::VIRTIO_NET_F_GUEST_UFO;
    pub const HOST_TSO4: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_ECN: u64 = 1 << net::VIRTIO_NET_F_HOST_ECN;
    pub const HOST_UFO: u64 = 1 << net::VIRTIO_NET_F_HOST_UFO;
    pub const MRG_RXBUF: u64 = 1 << net::VIRTIO_NET_F_MRG_RXBUF;
    pub const STATUS: u64 = 1 << net::VIRTIO_NET_F_STATUS;
    pub const CTRL_VQ: u64 = 1 << net::VIRTIO_NET_F_CTRL_VQ;
    pub const MQ: u64 = 1 << net::VIRTIO_NET_F_MQ;
    pub const GUEST_USO4: u64 = 1 << net::VIRTIO_NET_F_GUEST_USO4;
    pub const GUEST_USO6: u64 = 1 << net::VIRTIO_NET_F_GUEST_USO6;
    pub const HOST_USO: u64 = 1 << net::VIRTIO_NET_F_HOST_USO;
    pub const NOTIFY_ON_EMPTY: u64 = 1 << cfg::VIRTIO_F_NOTIFY_ON_EMPTY;
    pub const ANY_LAYOUT: u64 = 1 << cfg::VIRTIO_F_ANY_LAYOUT;
    pub const INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
    pub const EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
    /// VHOST_USER_F_PROTOCOL_FEATURES (bit 30).
    pub const PROTOCOL_FEATURES: u64 =
        vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    pub const VERSION_1: u64 = 1 << cfg::VIRTIO_F_VERSION_1;
    pub const ACCESS_PLATFORM: u64 = 1 << cfg::VIRTIO_F_ACCESS_PLATFORM;
    pub const RING_PACKED: u64 = 1 << cfg::VIRTIO_F_RING_PACKED;
    pub const IN_ORDER: u64 = 1 << cfg::VIRTIO_F_IN_ORDER;

    /// Everything this driver can honour: split rings, two queues, no control queue, no IOMMU,
    /// no in-order completion. Offloads are just header contents, so they are all fine.
    pub const SUPPORTED: u64 = CSUM
        | GUEST_CSUM
        | MTU
        | MAC
        | GUEST_TSO4
        | GUEST_TSO6
        | GUEST_ECN
        | GUEST_UFO
        | HOST_TSO4
        | HOST_TSO6
        | HOST_ECN
        | HOST_UFO
        | MRG_RXBUF
        | STATUS
        | GUEST_USO4
        | GUEST_USO6
        | HOST_USO
        | INDIRECT_DESC
        | EVENT_IDX
        | VERSION_1;

    /// What a Linux guest acks by default (no USO, no MQ).
    pub const LINUX_GUEST: u64 = VERSION_1
        | MRG_RXBUF
        | EVENT_IDX
        | INDIRECT_DESC
        | CSUM
        | GUEST_CSUM
        | HOST_TSO4
        | HOST_TSO6
        | HOST_ECN
        | GUEST_TSO4
        | GUEST_TSO6
        | GUEST_ECN
        | MAC
        | MTU
        | STATUS
        | PROTOCOL_FEATURES;
}

/// virtio-net header flag and GSO constants.
pub mod hdr {
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    pub const F_RSC_INFO: u8 = 4;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    pub const GSO_UDP_L4: u8 = 5;
    pub const GSO_ECN: u8 = 0x80;
}

/// Split-ring descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// `used.flags` bit by which the device asks not to be kicked.
pub const USED_F_NO_NOTIFY: u16 = 1;
/// `avail.flags` bit by which the driver asks not to be signalled.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Byte pattern RX buffers are filled with before they are posted.
pub const RX_POISON: u8 = 0xa5;

/// Protocol features acked by default (when offered).
pub const DEFAULT_PROTOCOL_FEATURES: u64 = VhostUserProtocolFeatures::MQ.bits()
    | VhostUserProtocolFeatures::REPLY_ACK.bits()
    | VhostUserProtocolFeatures::CONFIG.bits()
    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits();

const RING_ALIGN: u64 = 4096;
const BUF_ALIGN: u64 = 64;
/// Guest memory below this address is never handed out (GPA 0 stays unused).
const FIRST_GPA: u64 = 0x1000;
const POLL_SLICE_MS: i32 = 1;

/// Build a virtio-net header of `len` bytes (10 = legacy without num_buffers, 12 = v1/mergeable;
/// other lengths truncate or zero-pad the 12-byte layout). All fields little endian.
#[allow(clippy::too_many_arguments)]
pub fn vnet_header(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
    num_buffers: u16,
    len: usize,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(len.max(12));
    h.push(flags);
    h.push(gso_type);
    h.extend_from_slice(&hdr_len.to_le_bytes());
    h.extend_from_slice(&gso_size.to_le_bytes());
    h.extend_from_slice(&csum_start.to_le_bytes());
    h.extend_from_slice(&csum_offset.to_le_bytes());
    h.extend_from_slice(&num_buffers.to_le_bytes());
    h.resize(len, 0);
    h
}

/// Parsed virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Present when the header is at least 12 bytes long.
    pub num_buffers: Option<u16>,
}

impl Hdr {
    /// Parse the first 10 (or 12, if available) bytes. Panics if `b` is shorter than 10 bytes.
    pub fn parse(b: &[u8]) -> Hdr {
        assert!(
            b.len() >= 10,
            "virtio-net header needs at least 10 bytes, got {}: {:02x?}",
            b.len(),
            b
        );
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Hdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: (b.len() >= 12).then(|| u16_at(10)),
        }
    }

    /// Serialize into `len` bytes (see [`vnet_header`]); a missing num_buffers is written as 0.
    pub fn to_bytes(self, len: usize) -> Vec<u8> {
        vnet_header(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers.unwrap_or(0),
            len,
        )
    }
}

/// What to negotiate and how big to make things.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// Virtio features to ack, masked with what the backend offers. PROTOCOL_FEATURES is added
    /// automatically when offered.
    pub features: u64,
    /// Entries per virtqueue (both queues).
    pub queue_size: u16,
    /// Size of the memfd used as guest RAM.
    pub mem_size: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            features: feat::SUPPORTED,
            queue_size: 256,
            mem_size: 64 << 20,
        }
    }
}

/// The two virtqueues of a single-pair virtio-net device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Queue {
    Rx,
    Tx,
}

impl Queue {
    pub fn index(self) -> usize {
        match self {
            Queue::Rx => 0,
            Queue::Tx => 1,
        }
    }
}

/// How `send` lays header + frame bytes out in descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxLayout {
    /// Header and frame in one descriptor.
    Combined,
    /// Header in its own descriptor, frame in a second one (one descriptor if the frame is empty).
    Separate,
    /// Split the concatenated header+frame bytes at these offsets (non-decreasing, each at most
    /// the total length). Repeated offsets make zero-length descriptors, on purpose.
    SplitAt(Vec<usize>),
    /// Like `Separate`, but through an indirect descriptor table (one ring descriptor with
    /// VRING_DESC_F_INDIRECT). Not checked against the negotiated features.
    Indirect,
    /// Like `SplitAt`, but through an indirect table.
    IndirectSplitAt(Vec<usize>),
}

/// One received packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// The first `header_len()` bytes the device wrote (fewer if it wrote fewer).
    pub header: Vec<u8>,
    /// Everything after the header, across all gathered buffers.
    pub frame: Vec<u8>,
    /// `used.len` of every gathered used entry, in order.
    pub used_lens: Vec<u32>,
    /// Number of used entries gathered: the header's num_buffers with MRG_RXBUF (a 0 counts as
    /// 1), otherwise 1. The raw header value is in `hdr().num_buffers`.
    pub num_buffers: u16,
    /// Descriptor head ids of the gathered used entries.
    pub heads: Vec<u16>,
}

impl RxPacket {
    pub fn hdr(&self) -> Hdr {
        Hdr::parse(&self.header)
    }
}

/// A raw split-ring descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> RawDesc {
        RawDesc {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        }
    }
}

/// Guest physical addresses of one split ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    /// Descriptor table (16 * size bytes, page aligned).
    pub desc: u64,
    /// Available ring: flags, idx, ring[size], used_event (2-byte aligned, right after desc).
    pub avail: u64,
    /// Used ring: flags, idx, ring[size] of (id u32, len u32), avail_event (4-byte aligned).
    pub used: u64,
}

impl RingLayout {
    fn new(desc: u64, size: u16) -> RingLayout {
        let n = u64::from(size);
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        RingLayout {
            size,
            desc,
            avail,
            used,
        }
    }

    /// Bytes from `desc` to the end of the used ring.
    fn total_len(size: u16) -> u64 {
        let l = RingLayout::new(0, size);
        l.used + 6 + 8 * u64::from(size)
    }

    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }
    pub fn avail_slot_addr(&self, slot: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(slot)
    }
    pub fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }
    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }
    pub fn used_elem_addr(&self, slot: u16) -> u64 {
        self.used + 4 + 8 * u64::from(slot)
    }
    pub fn avail_event_addr(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
    pub fn desc_addr(&self, index: u16) -> u64 {
        self.desc + 16 * u64::from(index)
    }
    fn slot(&self, idx: u16) -> u16 {
        idx % self.size.max(1)
    }
}

/// The memfd-backed guest RAM.
struct GuestMem {
    mem: GuestMemoryMmap<()>,
    size: u64,
    region_info: VhostUserMemoryRegionInfo,
}

/// A memfd mapped in this process and described as guest memory at `gpa`: the guest RAM, or
/// an extra region for ADD_MEM_REG/REM_MEM_REG. The backend maps the same file; keep this alive
/// while it may use the region.
pub struct MemfdRegion {
    mem: GuestMemoryMmap<()>,
    pub info: VhostUserMemoryRegionInfo,
}

/// A `size`-byte memfd named `name` (it shows as `/memfd:<name>` in `/proc/<pid>/maps`).
pub fn memfd_region(name: &std::ffi::CStr, gpa: u64, size: usize) -> Result<MemfdRegion, String> {
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call, and the flags
    // are a valid combination; memfd_create does not touch any other memory.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "memfd_create failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: memfd_create just returned this descriptor, so it is open and owned by nobody
    // else; the OwnedFd takes over closing it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size as u64)
        .map_err(|e| format!("ftruncate(memfd, {size}) failed: {e}"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(gpa),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| format!("mapping {size} bytes of guest memory failed: {e}"))?;
    let region: &GuestRegionMmap<()> = mem
        .find_region(GuestAddress(gpa))
        .ok_or(format!("guest memory region at GPA {gpa:#x} missing"))?;
    let info = VhostUserMemoryRegionInfo::from_guest_region(region)
        .map_err(|e| format!("describing guest memory region failed: {e}"))?;
    Ok(MemfdRegion { mem, info })
}

/// Writes one vhost-user message (header and payload) straight onto the connection, for what
/// the vhost crate's frontend would not send (too early, or for a ring it was told is absent).
pub fn raw_message(stream: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    use std::io::Write;
    let mut msg = Vec::new();
    for word in [request, flags, payload.len() as u32] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    msg.extend_from_slice(payload);
    stream
        .write_all(&msg)
        .unwrap_or_else(|e| panic!("writing vhost-user request {request}: {e}"));
}

/// Reads one vhost-user reply (request, flags, payload) from the connection; `None` if the
/// backend closed it or nothing came within `timeout`.
pub fn raw_reply(stream: &mut UnixStream, timeout: Duration) -> Option<(u32, u32, Vec<u8>)> {
    use std::io::Read;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let mut header = [0u8; 12];
    let got = stream.read_exact(&mut header).ok().and_then(|()| {
        let word = |i: usize| u32::from_le_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(2) as usize];
        stream.read_exact(&mut payload).ok()?;
        Some((word(0), word(1), payload))
    });
    stream.set_read_timeout(None).ok()?;
    got
}

impl GuestMem {
    fn new(size: usize) -> Result<GuestMem, String> {
        let MemfdRegion { mem, info } = memfd_region(c"vhost-packet-test-guest", 0, size)?;
        Ok(GuestMem {
            mem,
            size: size as u64,
            region_info: info,
        })
    }

    fn hva(&self, gpa: u64) -> u64 {
        self.region_info.userspace_addr + gpa
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .unwrap_or_else(|e| {
                panic!(
                    "writing {} bytes at GPA {gpa:#x} failed (guest memory is {:#x} bytes): {e}",
                    data.len(),
                    self.size
                )
            });
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap_or_else(|e| {
                panic!(
                    "reading {len} bytes at GPA {gpa:#x} failed (guest memory is {:#x} bytes): {e}",
                    self.size
                )
            });
        v
    }

    fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    fn load_u16(&self, gpa: u64, order: Ordering) -> u16 {
        self.mem
            .load(GuestAddress(gpa), order)
            .unwrap_or_else(|e| panic!("atomic load of u16 at GPA {gpa:#x} failed: {e}"))
    }

    fn store_u16(&self, v: u16, gpa: u64, order: Ordering) {
        self.mem
            .store(v, GuestAddress(gpa), order)
            .unwrap_or_else(|e| panic!("atomic store of u16 at GPA {gpa:#x} failed: {e}"))
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Bump allocator with per-size free lists, so buffers recycle across long tests.
struct BufAlloc {
    next: u64,
    end: u64,
    free: HashMap<u64, Vec<u64>>,
}

impl BufAlloc {
    /// Size class: multiples of 64 up to 4 KiB, powers of two above, so a long test with many
    /// different frame sizes keeps reusing a bounded set of free lists.
    fn rounded(size: u32) -> u64 {
        let s = u64::from(size.max(1));
        if s <= 4096 {
            s.next_multiple_of(BUF_ALIGN)
        } else {
            s.next_power_of_two()
        }
    }

    fn alloc(&mut self, size: u32) -> Option<u64> {
        let r = Self::rounded(size);
        if let Some(gpa) = self.free.get_mut(&r).and_then(|l| l.pop()) {
            return Some(gpa);
        }
        self.bump(r, BUF_ALIGN)
    }

    fn bump(&mut self, size: u64, align: u64) -> Option<u64> {
        let start = self.next.next_multiple_of(align);
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    fn free(&mut self, gpa: u64, size: u32) {
        self.free.entry(Self::rounded(size)).or_default().push(gpa);
    }
}

/// A chain this driver made and still owns.
struct Chain {
    descs: Vec<u16>,
    /// (gpa, len) of each data segment, in chain order.
    bufs: Vec<(u64, u32)>,
    /// (gpa, len in bytes) of the indirect table, if any.
    indirect: Option<(u64, u32)>,
}

enum Inflight {
    Chain(Chain),
    /// Published through `raw_push_avail`; the test owns its descriptors and buffers.
    Raw,
}

struct UsedEntry {
    id: u32,
    len: u32,
    inflight: Option<Inflight>,
}

struct Vq {
    which: Queue,
    ring: RingLayout,
    free_desc: Vec<u16>,
    /// Shadow of avail.idx (next index the driver publishes).
    next_avail: u16,
    /// Driver's consumed used index.
    last_used: u16,
    last_kick_avail: u16,
    inflight: HashMap<u16, Inflight>,
    kick: EventFd,
    call: EventFd,
    calls: u64,
    kicks: u64,
    unknown_used: u64,
    /// RX: entries of a packet whose remaining buffers have not arrived yet.
    partial: Vec<(u16, u32, Vec<u8>)>,
    /// TX: completions reclaimed while looking for free descriptors, not yet handed out.
    backlog: VecDeque<(u32, u32)>,
}

/// A virtio-net driver + vhost-user frontend for tests. See the module docs.
pub struct TestFrontend {
    fe: Frontend,
    epoll: Epoll,
    offered: Option<u64>,
    offered_proto: Option<u64>,
    acked: u64,
    acked_proto: u64,
    wanted_proto: u64,
    /// Never ack PROTOCOL_FEATURES (rings are then enabled by SET_FEATURES).
    without_protocol: bool,
    queue_num: Option<u64>,
    ring_base: u16,
    mem: Option<GuestMem>,
    alloc: BufAlloc,
    /// RX and TX of pair 0, then of pair 1, ...
    vqs: Vec<Vq>,
    pairs: usize,
    /// The pair queue operations act on.
    active: usize,
    rx_autorefill: bool,
}

impl TestFrontend {
    /// Connect to a listening backend socket, retrying until it appears or `timeout` passes.
    pub fn connect(path: &Path, timeout: Duration) -> TestFrontend {
        Self::try_connect(path, timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_connect(path: &Path, timeout: Duration) -> Result<TestFrontend, String> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "could not connect to vhost-user socket {} within {timeout:?}: {e}",
                        path.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        Self::try_from_stream(sock)
    }

    /// Drive a connection made some other way, e.g. one a test accepted on its own listener
    /// (backend in client mode).
    pub fn from_stream(stream: UnixStream) -> TestFrontend {
        Self::try_from_stream(stream).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_from_stream(stream: UnixStream) -> Result<TestFrontend, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll_create failed: {e}"))?;
        Ok(TestFrontend {
            fe: Frontend::from_stream(stream, 2),
            epoll,
            offered: None,
            offered_proto: None,
            acked: 0,
            acked_proto: 0,
            wanted_proto: DEFAULT_PROTOCOL_FEATURES,
            without_protocol: false,
            queue_num: None,
            ring_base: 0,
            mem: None,
            alloc: BufAlloc {
                next: 0,
                end: 0,
                free: HashMap::new(),
            },
            vqs: Vec::new(),
            pairs: 1,
            active: 0,
            rx_autorefill: false,
        })
    }

    // ----------------------------------------------------------------------------------------
    // Negotiation and bring-up
    // ----------------------------------------------------------------------------------------

    /// Features the backend offers (GET_FEATURES; sent once, then cached).
    pub fn backend_features(&mut self) -> u64 {
        self.try_backend_features()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_backend_features(&mut self) -> Result<u64, String> {
        if let Some(f) = self.offered {
            return Ok(f);
        }
        let f = self
            .fe
            .get_features()
            .map_err(|e| format!("GET_FEATURES failed: {e}"))?;
        self.offered = Some(f);
        Ok(f)
    }

    /// Protocol features the backend offers (GET_PROTOCOL_FEATURES; cached). 0 when the backend
    /// does not offer VHOST_USER_F_PROTOCOL_FEATURES (the message may not be sent then).
    pub fn backend_protocol_features(&mut self) -> u64 {
        self.try_backend_protocol_features()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_backend_protocol_features(&mut self) -> Result<u64, String> {
        if let Some(p) = self.offered_proto {
            return Ok(p);
        }
        if self.try_backend_features()? & feat::PROTOCOL_FEATURES == 0 {
            return Ok(0);
        }
        let p = self
            .fe
            .get_protocol_features()
            .map_err(|e| format!("GET_PROTOCOL_FEATURES failed: {e}"))?
            .bits();
        self.offered_proto = Some(p);
        Ok(p)
    }

    /// Protocol features to ack (masked with the offer) during `start`. Call before `start`.
    pub fn set_wanted_protocol_features(&mut self, bits: u64) {
        self.wanted_proto = bits;
    }

    /// Behave like a frontend that does not know VHOST_USER_F_PROTOCOL_FEATURES: never ack
    /// it, never send protocol messages. Call before `start`.
    pub fn set_without_protocol_features(&mut self) {
        self.without_protocol = true;
    }

    /// Initial avail/used index of both rings (SET_VRING_BASE value). Call before `start`.
    pub fn set_ring_base(&mut self, base: u16) {
        self.ring_base = base;
    }

    /// Drive `n` queue pairs (rings 2i and 2i+1); with more than one, MQ is acked and the
    /// backend must report at least 2n queues. Call before `start`.
    pub fn set_queue_pairs(&mut self, n: usize) {
        assert!(n >= 1, "a net device has at least one queue pair");
        self.pairs = n;
    }

    /// Makes every queue operation (post_rx, recv, send, kicks, waits, raw access) act on
    /// pair `i` from now on.
    pub fn select_pair(&mut self, i: usize) {
        assert!(i < self.pairs, "pair {i} of {}", self.pairs);
        self.active = i;
    }

    /// How many queue pairs this frontend drives.
    pub fn queue_pairs(&self) -> usize {
        self.pairs
    }

    /// The pair queue operations act on.
    pub fn active_pair(&self) -> usize {
        self.active
    }

    /// SET_VRING_ENABLE for the RX and TX ring of pair `i`.
    pub fn set_pair_enabled(&mut self, i: usize, enable: bool) {
        self.try_set_pair_enabled(i, enable)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_set_pair_enabled(&mut self, i: usize, enable: bool) -> Result<(), String> {
        for ring in [2 * i, 2 * i + 1] {
            self.fe
                .set_vring_enable(ring, enable)
                .map_err(|e| format!("SET_VRING_ENABLE({ring}, {enable}) failed: {e}"))?;
        }
        Ok(())
    }

    /// SET_VRING_ENABLE for one ring of the active pair.
    pub fn set_queue_enabled(&mut self, q: Queue, enable: bool) {
        let ring = self.ring(q);
        self.fe
            .set_vring_enable(ring, enable)
            .unwrap_or_else(|e| panic!("SET_VRING_ENABLE({ring}, {enable}) failed: {e}"));
    }

    /// The vhost-user ring index of `q` in the active pair.
    fn ring(&self, q: Queue) -> usize {
        2 * self.active + q.index()
    }

    /// Full bring-up as QEMU does it; returns the acked virtio feature set (including
    /// PROTOCOL_FEATURES when negotiated). Panics with the failing step on error.
    pub fn start(&mut self, cfg: FrontendConfig) -> u64 {
        self.try_start(cfg)
            .unwrap_or_else(|e| panic!("vhost-user bring-up failed: {e}"))
    }

    pub fn try_start(&mut self, cfg: FrontendConfig) -> Result<u64, String> {
        let acked = self.try_negotiate(cfg.features)?;
        self.try_setup_memory(cfg.mem_size)?;
        self.try_setup_rings(cfg.queue_size)?;
        self.try_enable_rings(true)?;
        Ok(acked)
    }

    /// SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_FEATURES.
    pub fn try_negotiate(&mut self, features: u64) -> Result<u64, String> {
        self.fe
            .set_owner()
            .map_err(|e| format!("SET_OWNER failed: {e}"))?;
        // Always ask again after SET_OWNER, as QEMU does; refreshes the cache.
        self.offered = None;
        let offered = self.try_backend_features()?;
        if offered & feat::PROTOCOL_FEATURES != 0 && !self.without_protocol {
            let offered_proto = self.try_backend_protocol_features()?;
            let ack = offered_proto & self.wanted_proto;
            self.fe
                .set_protocol_features(VhostUserProtocolFeatures::from_bits_retain(ack))
                .map_err(|e| format!("SET_PROTOCOL_FEATURES({ack:#x}) failed: {e}"))?;
            self.acked_proto = ack;
            if ack & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
                self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if ack & VhostUserProtocolFeatures::MQ.bits() != 0 {
                let n = self
                    .fe
                    .get_queue_num()
                    .map_err(|e| format!("GET_QUEUE_NUM failed: {e}"))?;
                let need = 2 * self.pairs as u64;
                if n < need {
                    return Err(format!(
                        "backend reports {n} queues, {} queue pairs need {need}",
                        self.pairs
                    ));
                }
                self.queue_num = Some(n);
            } else if self.pairs > 1 {
                return Err("more than one queue pair needs the MQ protocol feature".into());
            }
        }
        self.try_set_features(features)
    }

    /// SET_FEATURES: `features` masked with the offer, MQ with more than one pair, and
    /// PROTOCOL_FEATURES when offered (unless told not to).
    fn try_set_features(&mut self, features: u64) -> Result<u64, String> {
        let offered = self.try_backend_features()?;
        let features = if self.pairs > 1 {
            features | feat::MQ
        } else {
            features
        };
        let acked = if self.without_protocol {
            features & offered & !feat::PROTOCOL_FEATURES
        } else {
            (features & offered) | (offered & feat::PROTOCOL_FEATURES)
        };
        self.fe
            .set_features(acked)
            .map_err(|e| format!("SET_FEATURES({acked:#x}) failed: {e}"))?;
        self.acked = acked;
        Ok(acked)
    }

    /// Create the memfd guest RAM and send it with SET_MEM_TABLE (one region, GPA 0).
    pub fn try_setup_memory(&mut self, mem_size: usize) -> Result<(), String> {
        if self.mem.is_some() {
            return Err("guest memory is already set up".into());
        }
        let mem = GuestMem::new(mem_size)?;
        self.fe
            .set_mem_table(&[mem.region_info])
            .map_err(|e| format!("SET_MEM_TABLE({mem_size:#x} bytes) failed: {e}"))?;
        self.alloc = BufAlloc {
            next: FIRST_GPA,
            end: mem.size,
            free: HashMap::new(),
        };
        self.mem = Some(mem);
        Ok(())
    }

    /// Lay out the rings and send SET_VRING_NUM/ADDR/BASE/CALL/KICK for each (RX and TX of
    /// every pair).
    pub fn try_setup_rings(&mut self, queue_size: u16) -> Result<(), String> {
        if !self.vqs.is_empty() {
            return Err("rings are already set up".into());
        }
        if self.mem.is_none() {
            return Err("set up guest memory before the rings".into());
        }
        let rings = (0..self.pairs).flat_map(|p| [(p, Queue::Rx), (p, Queue::Tx)]);
        for (pair, q) in rings.collect::<Vec<_>>() {
            let base = self
                .alloc
                .bump(RingLayout::total_len(queue_size), RING_ALIGN)
                .ok_or("guest memory too small for the rings")?;
            let ring = RingLayout::new(base, queue_size);
            let mem = self.mem.as_ref().unwrap();
            mem.store_u16(0, ring.avail, Ordering::Relaxed);
            mem.store_u16(self.ring_base, ring.avail_idx_addr(), Ordering::Relaxed);
            mem.store_u16(self.ring_base, ring.used_event_addr(), Ordering::Relaxed);
            // The driver zeroes the used ring before handing it over; with a non-zero base the
            // equivalent is used.idx = avail_event = base.
            mem.store_u16(0, ring.used, Ordering::Relaxed);
            mem.store_u16(self.ring_base, ring.used_idx_addr(), Ordering::Relaxed);
            mem.store_u16(self.ring_base, ring.avail_event_addr(), Ordering::Relaxed);
            fence(Ordering::SeqCst);

            let kick = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd for kick failed: {e}"))?;
            let call = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd for call failed: {e}"))?;
            self.epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, (2 * pair + q.index()) as u64),
                )
                .map_err(|e| format!("epoll_ctl(call fd) failed: {e}"))?;

            let i = 2 * pair + q.index();
            let what = |m: &str, e: vhost::Error| format!("{m} for queue {i} failed: {e}");
            self.fe
                .set_vring_num(i, queue_size)
                .map_err(|e| what("SET_VRING_NUM", e))?;
            let addrs = VringConfigData {
                queue_max_size: queue_size,
                queue_size,
                flags: 0,
                desc_table_addr: mem.hva(ring.desc),
                used_ring_addr: mem.hva(ring.used),
                avail_ring_addr: mem.hva(ring.avail),
                log_addr: None,
            };
            self.fe
                .set_vring_addr(i, &addrs)
                .map_err(|e| what("SET_VRING_ADDR", e))?;
            self.fe
                .set_vring_base(i, self.ring_base)
                .map_err(|e| what("SET_VRING_BASE", e))?;
            self.fe
                .set_vring_call(i, &call)
                .map_err(|e| what("SET_VRING_CALL", e))?;
            self.fe
                .set_vring_kick(i, &kick)
                .map_err(|e| what("SET_VRING_KICK", e))?;

            self.vqs.push(Vq {
                which: q,
                ring,
                free_desc: (0..queue_size).rev().collect(),
                next_avail: self.ring_base,
                last_used: self.ring_base,
                last_kick_avail: self.ring_base,
                inflight: HashMap::new(),
                kick,
                call,
                calls: 0,
                kicks: 0,
                unknown_used: 0,
                partial: Vec::new(),
                backlog: VecDeque::new(),
            });
        }
        Ok(())
    }

    /// SET_VRING_ENABLE for every queue (skipped when PROTOCOL_FEATURES was not negotiated,
    /// since rings are then enabled by SET_FEATURES).
    pub fn try_enable_rings(&mut self, enable: bool) -> Result<(), String> {
        if self.acked & feat::PROTOCOL_FEATURES == 0 {
            return Ok(());
        }
        for i in 0..2 * self.pairs {
            self.fe
                .set_vring_enable(i, enable)
                .map_err(|e| format!("SET_VRING_ENABLE({i}, {enable}) failed: {e}"))?;
        }
        Ok(())
    }

    /// Read `len` bytes of the device config space (GET_CONFIG; needs the CONFIG protocol
    /// feature).
    pub fn get_config(&mut self, offset: u32, len: u32) -> Vec<u8> {
        self.try_get_config(offset, len)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        let buf = vec![0u8; len as usize];
        let (_, data) = self
            .fe
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
            .map_err(|e| format!("GET_CONFIG(offset {offset}, len {len}) failed: {e}"))?;
        Ok(data)
    }

    pub fn acked_features(&self) -> u64 {
        self.acked
    }
    pub fn acked_protocol_features(&self) -> u64 {
        self.acked_proto
    }
    /// True if every bit of `mask` was acked.
    pub fn has_feature(&self, mask: u64) -> bool {
        self.acked & mask == mask
    }
    /// GET_QUEUE_NUM answer, if MQ was negotiated.
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }
    pub fn queue_size(&self) -> u16 {
        self.vq(Queue::Rx).ring.size
    }

    /// 12 if VERSION_1 or MRG_RXBUF was acked, else 10.
    pub fn header_len(&self) -> usize {
        if self.acked & (feat::VERSION_1 | feat::MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    fn event_idx(&self) -> bool {
        self.acked & feat::EVENT_IDX != 0
    }

    fn vq(&self, q: Queue) -> &Vq {
        self.vqs
            .get(self.ring(q))
            .unwrap_or_else(|| panic!("queue {q:?} used before start() set up the rings"))
    }

    fn vq_mut(&mut self, q: Queue) -> &mut Vq {
        let ring = self.ring(q);
        self.vqs
            .get_mut(ring)
            .unwrap_or_else(|| panic!("queue {q:?} used before start() set up the rings"))
    }

    fn mem(&self) -> &GuestMem {
        self.mem
            .as_ref()
            .expect("guest memory used before start() set it up")
    }

    // ----------------------------------------------------------------------------------------
    // Ring plumbing
    // ----------------------------------------------------------------------------------------

    fn write_desc(&self, q: Queue, index: u16, d: RawDesc) {
        let ring = self.vq(q).ring;
        assert!(
            index < ring.size,
            "descriptor index {index} out of range for {q:?} queue of size {}",
            ring.size
        );
        self.mem().write(ring.desc_addr(index), &d.to_bytes());
    }

    /// Put `head` into the next avail slot and publish the new avail.idx.
    fn publish_avail(&mut self, q: Queue, head: u16) {
        let vq = self.vq(q);
        let ring = vq.ring;
        let slot = ring.slot(vq.next_avail);
        let new_idx = vq.next_avail.wrapping_add(1);
        let mem = self.mem();
        mem.write(ring.avail_slot_addr(slot), &head.to_le_bytes());
        // The ring entry (and the descriptors/buffers written before it) must be visible
        // before the index that makes them available.
        fence(Ordering::Release);
        mem.store_u16(new_idx, ring.avail_idx_addr(), Ordering::Release);
        self.vq_mut(q).next_avail = new_idx;
    }

    fn alloc_or_panic(&mut self, size: u32) -> u64 {
        let a = &mut self.alloc;
        a.alloc(size).unwrap_or_else(|| {
            panic!(
                "guest memory exhausted allocating {size} bytes (bump at {:#x} of {:#x}); \
                 use a larger mem_size or recycle buffers",
                a.next, a.end
            )
        })
    }

    fn release_chain(&mut self, q: Queue, chain: Chain) {
        for (gpa, len) in chain.bufs {
            self.alloc.free(gpa, len);
        }
        if let Some((gpa, len)) = chain.indirect {
            self.alloc.free(gpa, len);
        }
        self.vq_mut(q).free_desc.extend(chain.descs);
    }

    /// Take the next used entry if the device published one.
    fn pop_used(&mut self, q: Queue) -> Option<UsedEntry> {
        let event_idx = self.event_idx();
        let vq = self.vq(q);
        let ring = vq.ring;
        let last = vq.last_used;
        let mem = self.mem();
        let used_idx = mem.load_u16(ring.used_idx_addr(), Ordering::Acquire);
        if used_idx == last {
            return None;
        }
        let elem = ring.used_elem_addr(ring.slot(last));
        let id = mem.read_u32(elem);
        let len = mem.read_u32(elem + 4);
        let next = last.wrapping_add(1);
        if event_idx {
            // Ask to be signalled when the entry after this one is published.
            mem.store_u16(next, ring.used_event_addr(), Ordering::Release);
            fence(Ordering::SeqCst);
        }
        let vq = self.vq_mut(q);
        vq.last_used = next;
        let inflight = u16::try_from(id)
            .ok()
            .filter(|&h| h < ring.size)
            .and_then(|h| vq.inflight.remove(&h));
        if inflight.is_none() {
            vq.unknown_used += 1;
        }
        Some(UsedEntry { id, len, inflight })
    }

    fn drain_calls(&mut self) {
        for vq in &mut self.vqs {
            while let Ok(n) = vq.call.read() {
                vq.calls += n;
            }
        }
    }

    /// Wait for the next used entry of `q` until `deadline`.
    fn wait_used_entry(&mut self, q: Queue, deadline: Instant) -> Option<UsedEntry> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            if let Some(e) = self.pop_used(q) {
                return Some(e);
            }
            self.drain_calls();
            if Instant::now() >= deadline {
                // One last look: the entry may have landed while we drained.
                return self.pop_used(q);
            }
            // Sleeps at most one slice; wakes early when a call eventfd fires.
            let _ = self.epoll.wait(POLL_SLICE_MS, &mut events);
        }
    }

    /// Device's used.idx as it is in guest memory now.
    pub fn used_idx(&self, q: Queue) -> u16 {
        let ring = self.vq(q).ring;
        self.mem().load_u16(ring.used_idx_addr(), Ordering::Acquire)
    }

    /// How far the driver has consumed the used ring.
    pub fn consumed_idx(&self, q: Queue) -> u16 {
        self.vq(q).last_used
    }

    /// The driver's avail.idx (last published value).
    pub fn avail_idx(&self, q: Queue) -> u16 {
        self.vq(q).next_avail
    }

    /// The device's avail_event (EVENT_IDX): the avail index past which it wants a kick.
    pub fn avail_event(&self, q: Queue) -> u16 {
        let ring = self.vq(q).ring;
        self.mem()
            .load_u16(ring.avail_event_addr(), Ordering::Acquire)
    }

    /// Signals received on the queue's call eventfd so far (drains it first).
    pub fn calls(&mut self, q: Queue) -> u64 {
        self.drain_calls();
        self.vq(q).calls
    }

    pub fn kicks(&self, q: Queue) -> u64 {
        self.vq(q).kicks
    }

    /// Used entries seen whose id was not an outstanding chain head (bogus or duplicate).
    pub fn unknown_used(&self, q: Queue) -> u64 {
        self.vq(q).unknown_used
    }

    /// Write the queue's kick eventfd unconditionally.
    pub fn kick(&mut self, q: Queue) {
        fence(Ordering::SeqCst);
        let vq = self.vq_mut(q);
        vq.kick
            .write(1)
            .unwrap_or_else(|e| panic!("writing {q:?} kick eventfd failed: {e}"));
        vq.kicks += 1;
        vq.last_kick_avail = vq.next_avail;
    }

    /// Kick only if the device asked for it (avail_event with EVENT_IDX, else the
    /// VRING_USED_F_NO_NOTIFY flag). Returns whether it kicked.
    pub fn kick_if_needed(&mut self, q: Queue) -> bool {
        // Publishing avail.idx must be ordered before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let vq = self.vq(q);
        let ring = vq.ring;
        let new = vq.next_avail;
        let old = vq.last_kick_avail;
        let mem = self.mem();
        let needed = if self.event_idx() {
            let event = mem.load_u16(ring.avail_event_addr(), Ordering::Acquire);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            mem.load_u16(ring.used, Ordering::Acquire) & USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.kick(q);
        } else {
            self.vq_mut(q).last_kick_avail = new;
        }
        needed
    }

    /// Consume up to `n` used entries of `q`, freeing the chains this driver made (RX data is
    /// dropped). Returns (id, len) pairs; fewer than `n` on timeout.
    pub fn wait_used(&mut self, q: Queue, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        if q == Queue::Tx {
            return self.wait_tx_used(n, timeout);
        }
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(e) = self.wait_used_entry(q, deadline) else {
                break;
            };
            if let Some(Inflight::Chain(c)) = e.inflight {
                self.release_chain(q, c);
            }
            out.push((e.id, e.len));
        }
        out
    }

    // ----------------------------------------------------------------------------------------
    // RX
    // ----------------------------------------------------------------------------------------

    /// Post one device-writable chain with these descriptor lengths. Returns its head id.
    /// Panics if the ring has too few free descriptors.
    pub fn post_rx(&mut self, chain: &[u32]) -> u16 {
        let free = self.vq(Queue::Rx).free_desc.len();
        self.try_post_rx(chain).unwrap_or_else(|| {
            panic!(
                "RX ring full: chain of {} descriptors does not fit, {free} free",
                chain.len()
            )
        })
    }

    /// Like `post_rx`, but `None` if the ring has too few free descriptors.
    pub fn try_post_rx(&mut self, chain: &[u32]) -> Option<u16> {
        assert!(
            !chain.is_empty(),
            "an RX chain needs at least one descriptor"
        );
        if self.vq(Queue::Rx).free_desc.len() < chain.len() {
            return None;
        }
        let bufs: Vec<(u64, u32)> = chain
            .iter()
            .map(|&len| (self.alloc_or_panic(len), len))
            .collect();
        let vq = self.vq_mut(Queue::Rx);
        let split = vq.free_desc.len() - chain.len();
        let mut descs = vq.free_desc.split_off(split);
        descs.reverse();
        for (i, &(gpa, len)) in bufs.iter().enumerate() {
            self.mem().fill(gpa, len as usize, RX_POISON);
            let last = i + 1 == bufs.len();
            let d = RawDesc {
                addr: gpa,
                len,
                flags: DESC_F_WRITE | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { descs[i + 1] },
            };
            self.write_desc(Queue::Rx, descs[i], d);
        }
        let head = descs[0];
        self.vq_mut(Queue::Rx).inflight.insert(
            head,
            Inflight::Chain(Chain {
                descs,
                bufs,
                indirect: None,
            }),
        );
        self.publish_avail(Queue::Rx, head);
        Some(head)
    }

    /// Post `count` single-descriptor chains of `size` bytes (does not kick).
    pub fn post_rx_buffers(&mut self, count: usize, size: u32) {
        for _ in 0..count {
            self.post_rx(&[size]);
        }
    }

    pub fn kick_rx(&mut self) {
        self.kick(Queue::Rx);
    }

    pub fn kick_rx_if_needed(&mut self) -> bool {
        self.kick_if_needed(Queue::Rx)
    }

    /// When on, `recv` re-posts every consumed chain with the same descriptor lengths and kicks.
    pub fn set_rx_autorefill(&mut self, on: bool) {
        self.rx_autorefill = on;
    }

    /// Chains posted on RX and not yet returned by the device.
    pub fn rx_outstanding(&self) -> usize {
        self.vq(Queue::Rx).inflight.len()
    }

    /// Read the data of one RX used entry, release (and maybe re-post) its chain.
    fn take_rx_entry(&mut self, e: UsedEntry) -> (u16, u32, Vec<u8>) {
        let chain = match e.inflight {
            Some(Inflight::Chain(c)) => c,
            Some(Inflight::Raw) => panic!(
                "RX used entry id={} len={} belongs to a raw chain; consume it with \
                 wait_used(Queue::Rx, ..) instead of recv",
                e.id, e.len
            ),
            None => panic!(
                "backend returned RX used entry id={} len={} which is not an outstanding \
                 RX chain head (bogus or duplicate id); outstanding heads: {:?}",
                e.id,
                e.len,
                {
                    let mut v: Vec<_> = self.vq(Queue::Rx).inflight.keys().copied().collect();
                    v.sort_unstable();
                    v
                }
            ),
        };
        let mut data = Vec::with_capacity(e.len as usize);
        let mut remaining = e.len as usize;
        for &(gpa, len) in &chain.bufs {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(len as usize);
            data.extend_from_slice(&self.mem().read(gpa, take));
            remaining -= take;
        }
        let shape: Vec<u32> = chain.bufs.iter().map(|b| b.1).collect();
        self.release_chain(Queue::Rx, chain);
        if self.rx_autorefill {
            self.post_rx(&shape);
        }
        (e.id as u16, e.len, data)
    }

    /// Wait for one complete packet. With MRG_RXBUF, gathers `num_buffers` used entries (read
    /// from the header in the first buffer); otherwise one entry. Frees the buffers (or re-posts
    /// them with autorefill). `None` on timeout; a partly gathered packet is kept for the next
    /// call.
    pub fn recv(&mut self, timeout: Duration) -> Option<RxPacket> {
        let deadline = Instant::now() + timeout;
        let refilled_before = self.vq(Queue::Rx).next_avail;
        let res = self.recv_inner(deadline);
        if self.rx_autorefill && self.vq(Queue::Rx).next_avail != refilled_before {
            self.kick_rx();
        }
        res
    }

    fn recv_inner(&mut self, deadline: Instant) -> Option<RxPacket> {
        let hlen = self.header_len();
        if self.vq(Queue::Rx).partial.is_empty() {
            let e = self.wait_used_entry(Queue::Rx, deadline)?;
            let entry = self.take_rx_entry(e);
            self.vq_mut(Queue::Rx).partial.push(entry);
        }
        let need = if self.acked & feat::MRG_RXBUF != 0 {
            let first = &self.vq(Queue::Rx).partial[0].2;
            if first.len() >= 12 {
                u16::from_le_bytes([first[10], first[11]]).max(1)
            } else {
                1
            }
        } else {
            1
        };
        while self.vq(Queue::Rx).partial.len() < usize::from(need) {
            let e = self.wait_used_entry(Queue::Rx, deadline)?;
            let entry = self.take_rx_entry(e);
            self.vq_mut(Queue::Rx).partial.push(entry);
        }
        let parts = std::mem::take(&mut self.vq_mut(Queue::Rx).partial);
        let mut all = Vec::new();
        let mut used_lens = Vec::with_capacity(parts.len());
        let mut heads = Vec::with_capacity(parts.len());
        for (head, len, data) in parts {
            heads.push(head);
            used_lens.push(len);
            all.extend_from_slice(&data);
        }
        let frame = all.split_off(hlen.min(all.len()));
        Some(RxPacket {
            header: all,
            frame,
            used_lens,
            num_buffers: need,
            heads,
        })
    }

    /// Used entries already taken for a packet whose remaining buffers have not arrived.
    pub fn rx_partial_entries(&self) -> usize {
        self.vq(Queue::Rx).partial.len()
    }

    /// Drop a partly gathered packet (its buffers were already freed or re-posted).
    pub fn discard_rx_partial(&mut self) {
        self.vq_mut(Queue::Rx).partial.clear();
    }

    pub fn rx_used_idx(&self) -> u16 {
        self.used_idx(Queue::Rx)
    }

    pub fn rx_calls(&mut self) -> u64 {
        self.calls(Queue::Rx)
    }

    pub fn rx_kicks(&self) -> u64 {
        self.kicks(Queue::Rx)
    }

    // ----------------------------------------------------------------------------------------
    // TX
    // ----------------------------------------------------------------------------------------

    /// Queue header+frame for transmission (does not kick). Returns the head id. Panics if the
    /// ring is full even after reclaiming completed entries.
    pub fn send(&mut self, header: &[u8], frame: &[u8], layout: TxLayout) -> u16 {
        let desc = format!("{layout:?}");
        self.try_send(header, frame, layout).unwrap_or_else(|| {
            panic!(
                "TX ring full sending {} bytes as {desc}: {} descriptors free, {} chains \
                 outstanding; call wait_tx_used first",
                header.len() + frame.len(),
                self.vq(Queue::Tx).free_desc.len(),
                self.tx_outstanding()
            )
        })
    }

    /// Like `send`, but `None` if the ring has no room.
    pub fn try_send(&mut self, header: &[u8], frame: &[u8], layout: TxLayout) -> Option<u16> {
        let mut bytes = Vec::with_capacity(header.len() + frame.len());
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(frame);
        let total = bytes.len();
        let separate = |h: usize| -> Vec<usize> {
            if h == 0 || h >= total {
                vec![]
            } else {
                vec![h]
            }
        };
        let (cuts, indirect) = match layout {
            TxLayout::Combined => (vec![], false),
            TxLayout::Separate => (separate(header.len()), false),
            TxLayout::SplitAt(v) => (v, false),
            TxLayout::Indirect => (separate(header.len()), true),
            TxLayout::IndirectSplitAt(v) => (v, true),
        };
        let mut bounds = Vec::with_capacity(cuts.len() + 2);
        bounds.push(0usize);
        for &c in &cuts {
            assert!(
                c <= total && c >= *bounds.last().unwrap(),
                "TxLayout split offsets {cuts:?} must be non-decreasing and at most {total}"
            );
            bounds.push(c);
        }
        bounds.push(total);
        let segs: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();

        let ring_descs = if indirect { 1 } else { segs.len() };
        if self.vq(Queue::Tx).free_desc.len() < ring_descs {
            self.reclaim_tx();
            if self.vq(Queue::Tx).free_desc.len() < ring_descs {
                return None;
            }
        }

        let mut bufs = Vec::with_capacity(segs.len());
        for &(s, e) in &segs {
            let len = (e - s) as u32;
            let gpa = self.alloc_or_panic(len);
            self.mem().write(gpa, &bytes[s..e]);
            bufs.push((gpa, len));
        }
        let chained = |i: usize, n: usize, next: u16| -> (u16, u16) {
            if i + 1 == n {
                (0, 0)
            } else {
                (DESC_F_NEXT, next)
            }
        };

        let vq = self.vq_mut(Queue::Tx);
        let split = vq.free_desc.len() - ring_descs;
        let mut descs = vq.free_desc.split_off(split);
        descs.reverse();
        let head = descs[0];
        let mut table = None;
        if indirect {
            let n = bufs.len();
            let tlen = (16 * n) as u32;
            let tgpa = self.alloc_or_panic(tlen);
            let mut raw = Vec::with_capacity(16 * n);
            for (i, &(gpa, len)) in bufs.iter().enumerate() {
                let (flags, next) = chained(i, n, (i + 1) as u16);
                raw.extend_from_slice(
                    &RawDesc {
                        addr: gpa,
                        len,
                        flags,
                        next,
                    }
                    .to_bytes(),
                );
            }
            self.mem().write(tgpa, &raw);
            self.write_desc(
                Queue::Tx,
                head,
                RawDesc {
                    addr: tgpa,
                    len: tlen,
                    flags: DESC_F_INDIRECT,
                    next: 0,
                },
            );
            table = Some((tgpa, tlen));
        } else {
            let n = descs.len();
            for (i, &(gpa, len)) in bufs.iter().enumerate() {
                let (flags, next) = chained(i, n, descs.get(i + 1).copied().unwrap_or(0));
                self.write_desc(
                    Queue::Tx,
                    descs[i],
                    RawDesc {
                        addr: gpa,
                        len,
                        flags,
                        next,
                    },
                );
            }
        }
        self.vq_mut(Queue::Tx).inflight.insert(
            head,
            Inflight::Chain(Chain {
                descs,
                bufs,
                indirect: table,
            }),
        );
        self.publish_avail(Queue::Tx, head);
        Some(head)
    }

    /// Move already-completed TX entries to the backlog `wait_tx_used` returns first.
    fn reclaim_tx(&mut self) {
        while let Some(e) = self.pop_used(Queue::Tx) {
            if let Some(Inflight::Chain(c)) = e.inflight {
                self.release_chain(Queue::Tx, c);
            }
            self.vq_mut(Queue::Tx).backlog.push_back((e.id, e.len));
        }
    }

    pub fn kick_tx(&mut self) {
        self.kick(Queue::Tx);
    }

    pub fn kick_tx_if_needed(&mut self) -> bool {
        self.kick_if_needed(Queue::Tx)
    }

    /// Wait until `n` more TX used entries appeared; returns (id, len) pairs (fewer on timeout)
    /// and frees their buffers.
    pub fn wait_tx_used(&mut self, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if let Some(e) = self.vq_mut(Queue::Tx).backlog.pop_front() {
                out.push(e);
                continue;
            }
            let Some(e) = self.wait_used_entry(Queue::Tx, deadline) else {
                break;
            };
            if let Some(Inflight::Chain(c)) = e.inflight {
                self.release_chain(Queue::Tx, c);
            }
            out.push((e.id, e.len));
        }
        out
    }

    pub fn tx_used_idx(&self) -> u16 {
        self.used_idx(Queue::Tx)
    }

    pub fn tx_calls(&mut self) -> u64 {
        self.calls(Queue::Tx)
    }

    pub fn tx_kicks(&self) -> u64 {
        self.kicks(Queue::Tx)
    }

    /// Chains sent on TX whose used entry has not been consumed yet.
    pub fn tx_outstanding(&self) -> usize {
        self.vq(Queue::Tx).inflight.len()
    }

    // ----------------------------------------------------------------------------------------
    // Raw escape hatches
    // ----------------------------------------------------------------------------------------

    /// Take a free descriptor slot out of the driver's free list (the test owns it from now).
    pub fn raw_alloc_desc(&mut self, q: Queue) -> Option<u16> {
        self.vq_mut(q).free_desc.pop()
    }

    /// Give a slot taken with `raw_alloc_desc`/`raw_add_descriptor` back to the free list.
    pub fn raw_free_desc(&mut self, q: Queue, index: u16) {
        self.vq_mut(q).free_desc.push(index);
    }

    /// Write any descriptor slot (index < queue size), whoever owns it.
    pub fn raw_write_desc(&mut self, q: Queue, index: u16, d: RawDesc) {
        self.write_desc(q, index, d);
    }

    pub fn raw_read_desc(&self, q: Queue, index: u16) -> RawDesc {
        let ring = self.vq(q).ring;
        assert!(index < ring.size, "descriptor index {index} out of range");
        RawDesc::from_bytes(&self.mem().read(ring.desc_addr(index), 16))
    }

    /// Take a free descriptor slot, write `d` into it and return its index. Panics if none is
    /// free. Link slots yourself via `next`/`DESC_F_NEXT`.
    pub fn raw_add_descriptor(&mut self, q: Queue, d: RawDesc) -> u16 {
        let index = self
            .raw_alloc_desc(q)
            .unwrap_or_else(|| panic!("no free descriptor slot on {q:?}"));
        self.write_desc(q, index, d);
        index
    }

    /// Write `head` into the next avail slot and publish avail.idx + 1 (no kick). The head may be
    /// anything, even out of range; in-range heads are tracked so their used entries are not
    /// counted as unknown (recv panics on them: use `wait_used`).
    pub fn raw_push_avail(&mut self, q: Queue, head: u16) {
        let size = self.vq(q).ring.size;
        if head < size {
            self.vq_mut(q).inflight.entry(head).or_insert(Inflight::Raw);
        }
        self.publish_avail(q, head);
    }

    /// Write avail.ring[slot] without publishing anything.
    pub fn raw_write_avail_slot(&mut self, q: Queue, slot: u16, head: u16) {
        let ring = self.vq(q).ring;
        assert!(slot < ring.size, "avail slot {slot} out of range");
        self.mem()
            .write(ring.avail_slot_addr(slot), &head.to_le_bytes());
    }

    /// Publish an arbitrary avail.idx (Release) and make it the driver's shadow index.
    pub fn raw_set_avail_idx(&mut self, q: Queue, idx: u16) {
        let ring = self.vq(q).ring;
        fence(Ordering::Release);
        self.mem()
            .store_u16(idx, ring.avail_idx_addr(), Ordering::Release);
        self.vq_mut(q).next_avail = idx;
    }

    /// Write avail.flags (e.g. `AVAIL_F_NO_INTERRUPT`).
    pub fn raw_set_avail_flags(&mut self, q: Queue, flags: u16) {
        let ring = self.vq(q).ring;
        self.mem().store_u16(flags, ring.avail, Ordering::Release);
    }

    /// Overwrite used_event (it is rewritten on every consumed entry while EVENT_IDX is on).
    pub fn raw_set_used_event(&mut self, q: Queue, v: u16) {
        let ring = self.vq(q).ring;
        self.mem()
            .store_u16(v, ring.used_event_addr(), Ordering::Release);
    }

    /// Fills the queue's call eventfd to its limit (0xffff_ffff_ffff_fffe), as a frontend that
    /// never reads it would: the backend's next signal on it fails with EAGAIN (the eventfd is
    /// non-blocking). Calls must not be waited for afterwards, which would drain it.
    pub fn raw_fill_call(&mut self, q: Queue) {
        self.drain_calls();
        self.vq(q)
            .call
            .write(u64::MAX - 1)
            .unwrap_or_else(|e| panic!("filling the {q:?} call eventfd: {e}"));
    }

    /// Allocate guest memory for a buffer (64-byte aligned). Panics when memory is exhausted.
    pub fn alloc_buffer(&mut self, size: u32) -> u64 {
        self.alloc_or_panic(size)
    }

    pub fn free_buffer(&mut self, gpa: u64, size: u32) {
        self.alloc.free(gpa, size);
    }

    pub fn write_guest(&self, gpa: u64, data: &[u8]) {
        self.mem().write(gpa, data);
    }

    pub fn read_guest(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.mem().read(gpa, len)
    }

    pub fn guest_mem_size(&self) -> u64 {
        self.mem().size
    }

    /// A handle on guest memory for another thread: a second vCPU that writes while the backend
    /// works (the same mapping; writes are plain volatile copies, as a guest's would be).
    pub fn shared_guest_memory(&self) -> GuestMemoryMmap<()> {
        self.mem().mem.clone()
    }

    pub fn ring_layout(&self, q: Queue) -> RingLayout {
        self.vq(q).ring
    }

    /// The underlying vhost-user connection, to send arbitrary messages.
    pub fn raw_frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    // ----------------------------------------------------------------------------------------
    // Shutdown
    // ----------------------------------------------------------------------------------------

    /// GET_VRING_BASE for one queue (stops it in the backend).
    pub fn try_get_vring_base(&mut self, q: Queue) -> Result<u16, String> {
        let v = self
            .fe
            .get_vring_base(self.ring(q))
            .map_err(|e| format!("GET_VRING_BASE({}) failed: {e}", self.ring(q)))?;
        u16::try_from(v).map_err(|_| format!("GET_VRING_BASE({}) returned {v:#x}", self.ring(q)))
    }

    /// Resets the device on the same connection and memory, as QEMU does when the guest
    /// reboots or reloads its driver: GET_VRING_BASE on every ring, SET_FEATURES with
    /// `cfg.features`, then fresh rings of `cfg.queue_size` from index 0 (new kick and call
    /// eventfds) and SET_VRING_ENABLE. What the old driver had posted is forgotten; its
    /// buffers go back to the allocator. Returns the acked features.
    pub fn restart_rings(&mut self, cfg: FrontendConfig) -> u64 {
        self.try_restart_rings(cfg)
            .unwrap_or_else(|e| panic!("ring restart failed: {e}"))
    }

    pub fn try_restart_rings(&mut self, cfg: FrontendConfig) -> Result<u64, String> {
        for i in 0..2 * self.pairs {
            self.fe
                .get_vring_base(i)
                .map_err(|e| format!("GET_VRING_BASE({i}) failed: {e}"))?;
        }
        for vq in std::mem::take(&mut self.vqs) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                vq.call.as_raw_fd(),
                EpollEvent::default(),
            );
            for inflight in vq.inflight.into_values() {
                if let Inflight::Chain(c) = inflight {
                    for (gpa, len) in c.bufs.into_iter().chain(c.indirect) {
                        self.alloc.free(gpa, len);
                    }
                }
            }
        }
        let acked = self.try_set_features(cfg.features)?;
        // A reset driver starts its rings from 0.
        self.ring_base = 0;
        self.try_setup_rings(cfg.queue_size)?;
        self.try_enable_rings(true)?;
        Ok(acked)
    }

    /// Stop the selected pair's rings as QEMU does on shutdown (GET_VRING_BASE for RX then TX)
    /// and close the connection. Returns (rx_base, tx_base): the backend's next avail index per
    /// ring.
    pub fn stop(mut self) -> (u16, u16) {
        let rx = self
            .try_get_vring_base(Queue::Rx)
            .unwrap_or_else(|e| panic!("{e}"));
        let tx = self
            .try_get_vring_base(Queue::Tx)
            .unwrap_or_else(|e| panic!("{e}"));
        (rx, tx)
    }
}
