//! RX: frames from the packet socket into guest buffers, mergeable (`num_buffers`) or not.
//!
//! One pass: stage guest chains until they can hold the largest frame (or, with fewer buffers,
//! until the next frame fits), `recvmsg` straight into them, fix the header in guest memory
//! (num_buffers, checksum completion, flags), write the used elements of the chains the frame
//! filled, and publish them with one `used.idx` store per batch. Staged chains the pass did not
//! fill are given back (`next_avail` rewound), so nothing refers to guest memory between passes.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use libc::iovec;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap, VolatileSlice};

use super::offload::{self, RxVerdict};
use super::segment::{self, GsoParams, SegmentCsum};
use crate::packet::socket::{PacketSocket, RecvLen, VlanTag, UIO_MAXIOV};
use crate::stats::{PairStats, RateLimit};
use crate::virtio::chain::{self, Access, Chain, Scatter};
use crate::virtio::features::Negotiated;
use crate::virtio::header::{GsoKind, NetHeader, FLAG_NEEDS_CSUM, LEN_BASE, LEN_MRG};
use crate::virtio::used::{NotifyState, RingAddrs, UsedRing};

/// The largest frame AF_PACKET hands over: IPv4 total length 65535 + Ethernet 14 (kernel-facts
/// §3); VLAN reinsertion adds 4 more.
pub const MAX_FRAME: usize = 65535 + 14 + 4;
/// Packets per pass before other events get a turn.
const BUDGET: usize = 256;
/// Destination and source MAC: where a VLAN tag goes.
const ETH_ADDRS_LEN: usize = 12;
const VLAN_TAG_LEN: usize = 4;
/// Used elements written before an intermediate publish, so the guest can start early.
const PUBLISH_BATCH: u16 = 64;
/// Receives refused in a row with the same frame first in the socket's queue before that frame
/// is taken off and dropped, so that a frame the kernel never hands over cannot wedge the queue.
pub const MAX_REFUSALS: u32 = 3;

/// How a pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// The socket is empty.
    Drained,
    /// The guest has no (or too few) buffers: stop polling the socket until it kicks.
    NeedBuffers,
    /// The budget ran out with packets left; the socket stays readable.
    Budget,
}

/// A GSO frame (held in `RxPath::bounce`) whose segments are partly delivered.
#[derive(Clone, Copy, Debug)]
struct PendingGso {
    params: GsoParams,
    /// Where the frame starts in `bounce`, and its length.
    start: usize,
    len: usize,
    /// Segments already delivered.
    done: usize,
}

/// The guest has posted chains not taken yet (a broken index counts as none).
fn guest_has_chains<S: FrameSource + ?Sized>(ctx: &RxContext<'_, S>) -> bool {
    ctx.queue
        .avail_idx(ctx.mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != ctx.queue.next_avail())
}

/// Makes `buf` hold at least `len` bytes; it only ever grows, so it is zeroed once.
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// Counts a frame delivered whole.
fn count_delivered(stats: &mut PairStats, frame_len: usize, gso: bool, filled: usize) {
    stats.rx_packets += 1;
    stats.rx_bytes += frame_len as u64;
    stats.rx_gso += u64::from(gso);
    stats.rx_multi_buffer += u64::from(filled > 1);
}

/// What becomes of a received frame once adapted to the guest.
enum Adapted {
    /// Deliver it whole; the header is final but for `num_buffers`.
    Deliver,
    /// Deliver its segments instead.
    Segment(SegmentCsum),
    /// Dropped (counted and logged).
    Dropped,
}

/// A received frame in a view: where it starts, its length (counting a VLAN tag to put back),
/// and that tag, which the interface stripped.
#[derive(Clone, Copy, Debug)]
struct FrameSpan {
    at: usize,
    len: usize,
    vlan: Option<VlanTag>,
}

/// Where a frame delivered whole lies.
enum Landed {
    /// Already in the staged guest buffers, after the header: this many bytes.
    InGuest(usize),
    /// In `RxPath::bounce`, this range: copied in after the header.
    InBounce(std::ops::Range<usize>),
}

/// What shapes every packet of a pass, fixed by the negotiated features and the socket:
/// worked out once per pass.
#[derive(Clone, Copy, Debug)]
struct RxGeometry {
    /// The guest's virtio header: 10 or 12 bytes.
    hdr_len: usize,
    /// The header the socket writes before each frame: 10 or 12 bytes.
    kernel_hdr: usize,
    /// MRG_RXBUF: a packet may fill several chains.
    mergeable: bool,
    /// Receive into `RxPath::bounce` first, not straight into guest buffers.
    bounce_first: bool,
}

impl RxGeometry {
    fn new<S: FrameSource + ?Sized>(ctx: &RxContext<'_, S>) -> Self {
        RxGeometry {
            hdr_len: ctx.features.header_len(),
            kernel_hdr: ctx.socket.kernel_vnet_header_len(),
            mergeable: ctx.features.mrg_rxbuf(),
            // A guest without TCP segmentation gets most of a TSO peer's traffic as segments:
            // receive into our own buffer first, so that only what the guest is handed, at its
            // final size, is ever written into its memory.
            bounce_first: !ctx.features.guest_accepts_gso(GsoKind::TcpV4, false)
                || !ctx.features.guest_accepts_gso(GsoKind::TcpV6, false)
                || !ctx.features.guest_csum(),
        }
    }
}

/// Adapts a received frame to the guest, wherever it lies (in `view`): puts back a VLAN tag the
/// interface stripped, decides from the guest's features, completes a partial checksum it
/// cannot take, and clears what it may not see.
fn adapt_frame<T: AsRef<[u8]> + AsMut<[u8]>>(
    view: &Scatter<'_>,
    frame: FrameSpan,
    hdr: &mut NetHeader<T>,
    features: Negotiated,
    stats: &mut PairStats,
    log: &mut RateLimit,
) -> Adapted {
    let FrameSpan {
        at: frame_at,
        len: frame_len,
        vlan,
    } = frame;
    if let Some(tag) = vlan {
        // After the MAC addresses, where the interface took it from.
        let tag_at = frame_at + ETH_ADDRS_LEN;
        view.shift_right(
            tag_at,
            frame_len - VLAN_TAG_LEN - ETH_ADDRS_LEN,
            VLAN_TAG_LEN,
        );
        view.write_at(tag_at, &tag.to_bytes());
        // csum_start and hdr_len count from the start of the frame: they move with it.
        if hdr.needs_csum() {
            hdr.set_csum_start(hdr.csum_start().saturating_add(VLAN_TAG_LEN as u16));
        }
        if hdr.hdr_len() != 0 {
            hdr.set_hdr_len(hdr.hdr_len().saturating_add(VLAN_TAG_LEN as u16));
        }
    }
    let mut head = [0u8; 64];
    let head_len = view.read_at(frame_at, &mut head[..frame_len.min(64)]);
    match offload::rx_verdict(hdr, features, &head[..head_len]) {
        RxVerdict::Segment(csum) => return Adapted::Segment(csum),
        RxVerdict::RefuseGso => {
            stats.rx_drop_offload += 1;
            log.warn(format_args!(
                "RX: dropped a {frame_len}-byte GSO frame (gso_type {:#x}) the guest did not negotiate",
                hdr.gso_type()
            ));
            return Adapted::Dropped;
        }
        RxVerdict::Deliver {
            complete_csum: true,
        } => {
            let (start, offset) = (hdr.csum_start(), hdr.csum_offset());
            if offload::complete_checksum(view, frame_at, frame_len, start, offset).is_err() {
                stats.rx_drop_offload += 1;
                log.warn(format_args!(
                    "RX: dropped a frame with csum_start {start} csum_offset {offset} outside its {frame_len} bytes"
                ));
                return Adapted::Dropped;
            }
            stats.rx_csum_completed += 1;
        }
        RxVerdict::Deliver {
            complete_csum: false,
        } => {}
    }
    let flags = offload::guest_flags(hdr.flags(), features);
    hdr.set_flags(flags);
    if flags == 0 {
        // Without NEEDS_CSUM the checksum fields mean nothing; keep them clean.
        hdr.set_csum_start(0);
        hdr.set_csum_offset(0);
    }
    Adapted::Deliver
}

/// One staged guest chain; `bad` chains are returned with length 0 once they reach the front.
#[derive(Clone, Copy, Debug)]
struct Staged {
    chain: Chain,
    bad: bool,
    /// Its position in the avail ring (`next_avail` when it was popped).
    at: u16,
}

/// RX state of one queue pair. The buffers are reused across passes; their contents are not.
pub struct RxPath {
    arena: Vec<iovec>,
    staged: VecDeque<Staged>,
    staged_bytes: usize,
    recv_iov: Vec<iovec>,
    skipped_bad: Vec<u16>,
    /// Avail positions of bad chains already counted and given back (they were staged behind
    /// good ones): the pass that takes them again does not count them again.
    counted_bad: Vec<u16>,
    /// Receives that failed in a row with the same frame length first in the queue (SIOCINQ
    /// after each): that length and how many. The whole run counts as one frame lost.
    refused: Option<(usize, u32)>,
    signal_due: bool,
    /// A GSO frame being segmented, moved out of the guest buffers that take its segments.
    bounce: Vec<u8>,
    /// The frame in `bounce` still has segments to deliver.
    pending: Option<PendingGso>,
    pub notify: NotifyState,
    log_limit: RateLimit,
}

// SAFETY: the raw pointers in the iovec scratch buffers are only dereferenced during a pass,
// which runs on one thread under the pair's lock with the guest memory guard held; between
// passes they are cleared and never read.
unsafe impl Send for RxPath {}

impl Default for RxPath {
    fn default() -> Self {
        RxPath {
            arena: Vec::with_capacity(256),
            staged: VecDeque::with_capacity(64),
            staged_bytes: 0,
            recv_iov: Vec::with_capacity(256),
            skipped_bad: Vec::new(),
            counted_bad: Vec::new(),
            refused: None,
            signal_due: false,
            bounce: Vec::new(),
            pending: None,
            notify: NotifyState::default(),
            log_limit: RateLimit::new(Duration::from_secs(5)),
        }
    }
}

/// Where received frames come from: the packet socket, or a scripted source in tests.
pub trait FrameSource {
    /// Bytes of virtio header the source writes before each frame (10 or 12).
    fn kernel_vnet_header_len(&self) -> usize;
    /// Length of the next frame without its header; 0 when none is queued.
    fn pending_len(&self) -> io::Result<usize>;
    /// Takes a pending error (one a receive would report instead of a frame).
    fn take_error(&self) -> io::Result<Option<io::Error>>;
    /// Writes `[header][frame]` of the next frame over `iov`.
    ///
    /// # Safety
    ///
    /// Every iovec must point to memory valid for writes of its length.
    unsafe fn recv(&self, iov: &mut [iovec]) -> io::Result<RecvLen>;
}

impl FrameSource for PacketSocket {
    fn kernel_vnet_header_len(&self) -> usize {
        PacketSocket::kernel_vnet_header_len(self)
    }

    fn pending_len(&self) -> io::Result<usize> {
        PacketSocket::pending_len(self)
    }

    fn take_error(&self) -> io::Result<Option<io::Error>> {
        PacketSocket::take_error(self)
    }

    unsafe fn recv(&self, iov: &mut [iovec]) -> io::Result<RecvLen> {
        // SAFETY: the caller upholds the same contract as `PacketSocket::recv`'s.
        unsafe { PacketSocket::recv(self, iov) }
    }
}

/// What one pass needs besides its own state.
pub struct RxContext<'a, S: FrameSource + ?Sized = PacketSocket> {
    pub queue: &'a mut Queue,
    pub mem: &'a GuestMemoryMmap,
    pub socket: &'a S,
    pub features: Negotiated,
    pub stats: &'a mut PairStats,
    /// The socket woke us, not new guest buffers: look at the first frames' sizes before
    /// taking chains. After a kick the new chains are taken (and judged) at once.
    pub look_first: bool,
}

/// Result of a pass: how it ended and whether the guest must be interrupted.
pub struct RxPass {
    pub outcome: RxOutcome,
    pub notify: bool,
    /// The avail index the pass had looked up to, before giving back unfilled chains: the
    /// guest must kick once it adds beyond it.
    pub avail_seen: u16,
}

impl RxPath {
    /// Forgets the state of the ring it served (the ring stopped, or the connection is gone):
    /// interrupt state, staging, and a half-delivered GSO frame. Returns how many segments of
    /// that frame are dropped.
    #[must_use]
    pub fn reset(&mut self) -> u64 {
        self.notify = NotifyState::default();
        self.counted_bad.clear();
        self.clear_staging();
        self.drop_pending()
    }

    /// Drops the rest of a half-delivered GSO frame. Its segments must never reach a new
    /// driver (their checksum mode was fixed under the old features) nor a ring enabled again
    /// later (they would come after newer frames of their flow). Returns how many are dropped.
    #[must_use]
    pub fn drop_pending(&mut self) -> u64 {
        let Some(p) = self.pending.take() else {
            return 0;
        };
        let frame = &self.bounce[p.start..p.start + p.len];
        segment::plan(frame, &p.params).map_or(1, |plan| plan.segments().saturating_sub(p.done))
            as u64
    }

    fn clear_staging(&mut self) {
        self.arena.clear();
        self.staged.clear();
        self.staged_bytes = 0;
        self.recv_iov.clear();
    }

    pub fn process<S: FrameSource + ?Sized>(&mut self, ctx: &mut RxContext<'_, S>) -> RxPass {
        let addrs = RingAddrs {
            avail: GuestAddress(ctx.queue.avail_ring()),
            used: GuestAddress(ctx.queue.used_ring()),
            size: ctx.queue.size(),
        };
        let mut used = UsedRing::new(addrs, ctx.queue.next_used());
        let first = ctx.queue.next_avail();
        let outcome = self.receive_loop(ctx, &mut used);
        self.end_refusals(ctx);

        // Give back what was staged but not filled. Bad chains among them are judged again
        // next time, but were counted: remember them so that they are not counted again
        // (those this pass took were either returned now or are staged again).
        let avail_seen = ctx.queue.next_avail();
        let taken = avail_seen.wrapping_sub(first);
        self.counted_bad
            .retain(|&at| at.wrapping_sub(first) >= taken);
        self.counted_bad
            .extend(self.staged.iter().filter(|s| s.bad).map(|s| s.at));
        let unfilled = self.staged.len() as u16;
        let next_avail = ctx.queue.next_avail().wrapping_sub(unfilled);
        ctx.queue.set_next_avail(next_avail);
        self.clear_staging();

        let notify = self.publish(&mut used, ctx) | std::mem::take(&mut self.signal_due);
        ctx.queue.set_next_used(used.next_used());
        RxPass {
            outcome,
            notify,
            avail_seen,
        }
    }

    fn publish<S: FrameSource + ?Sized>(
        &mut self,
        used: &mut UsedRing,
        ctx: &mut RxContext<'_, S>,
    ) -> bool {
        match used.publish(ctx.mem) {
            Ok(true) => {
                let n =
                    used.needs_notification(ctx.mem, ctx.features.event_idx(), &mut self.notify);
                ctx.stats.rx_notifications += u64::from(n);
                n
            }
            Ok(false) => false,
            Err(e) => {
                self.log(format_args!("RX: {e}"));
                false
            }
        }
    }

    fn receive_loop<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
    ) -> RxOutcome {
        let geo = RxGeometry::new(ctx);
        let RxGeometry {
            hdr_len, mergeable, ..
        } = geo;
        for round in 0..BUDGET {
            if !self.deliver_segments(ctx, used, geo) {
                return RxOutcome::NeedBuffers;
            }
            // The first two frames of a pass are looked at before chains are taken for them:
            // a wake-up with nothing to receive, or a single small frame (request/response
            // traffic), would otherwise resolve a maximal frame's worth of chains only to
            // give them back. From the third on it is a burst: chains for a maximal frame
            // are staged and used without a look.
            let mut known_len = None;
            if ctx.look_first
                && round < 2
                && mergeable
                && !geo.bounce_first
                && self.staged_bytes < MAX_FRAME + hdr_len
            {
                let Some(len) = self.next_frame_len(ctx) else {
                    // With no buffers left either, wait for the guest rather than for frames
                    // it could not take.
                    if self.staged.is_empty() && !guest_has_chains(ctx) {
                        return RxOutcome::NeedBuffers;
                    }
                    return RxOutcome::Drained;
                };
                known_len = Some(len + hdr_len);
            }
            // Room for a VLAN tag to put back, if the guest has it.
            self.stage(ctx, used, geo, known_len.map(|n| n + VLAN_TAG_LEN));
            let capacity = self.capacity(mergeable);
            if capacity == 0 {
                return RxOutcome::NeedBuffers;
            }
            // The lengths the socket reports leave out a VLAN tag the interface stripped, which
            // the guest gets back: a frame that fits only without it waits for more buffers
            // rather than being received and dropped as oversize.
            if let Some(need) = known_len {
                if need + VLAN_TAG_LEN > capacity {
                    return RxOutcome::NeedBuffers;
                }
            } else if capacity < MAX_FRAME + hdr_len {
                // Not room for every possible frame: look at the next one before taking it.
                match self.next_frame_len(ctx) {
                    None => return RxOutcome::Drained,
                    // More buffers may come.
                    Some(len) if len + hdr_len + VLAN_TAG_LEN > capacity && mergeable => {
                        return RxOutcome::NeedBuffers
                    }
                    // Without MRG_RXBUF a frame must fit one chain, whatever the guest posts
                    // later: take it off the socket without letting it touch guest memory.
                    Some(len) if len + hdr_len > capacity => {
                        self.discard(ctx, len);
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let received = if geo.bounce_first {
                self.receive_via_bounce(ctx, used, geo, capacity)
            } else {
                self.receive_one(ctx, used, geo, capacity)
            };
            match received {
                Ok(()) => self.end_refusals(ctx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return RxOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                    self.socket_error(ctx, e);
                    return RxOutcome::Drained;
                }
                Err(e) => self.receive_failed(ctx, e),
            }
            if used.pending() >= PUBLISH_BATCH {
                // Let the guest start on a long burst early; the caller signals once at the end.
                self.signal_due |= self.publish(used, ctx);
            }
        }
        RxOutcome::Budget
    }

    /// Length of the next queued frame (`SIOCINQ`); `None` when nothing is queued or the socket
    /// cannot say. A pending error (the link went down) keeps the socket readable with nothing
    /// queued: it is taken here, or it would wake the worker for ever.
    fn next_frame_len<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
    ) -> Option<usize> {
        match ctx.socket.pending_len() {
            Ok(0) => {
                match ctx.socket.take_error() {
                    Ok(Some(e)) => self.socket_error(ctx, e),
                    Ok(None) => {}
                    Err(e) => self.log(format_args!("RX: SO_ERROR on packet socket: {e}")),
                }
                None
            }
            Ok(len) => Some(len),
            Err(e) => {
                self.log(format_args!("RX: SIOCINQ on packet socket: {e}"));
                None
            }
        }
    }

    /// A receive failed with an error other than EAGAIN, EINTR and ENETDOWN. Either the kernel
    /// took the frame and dropped it (EINVAL: its metadata cannot be expressed in a virtio
    /// header), or it refused the call before taking any (EMSGSIZE, EINVAL from the iovec import)
    /// and the frame is still first in the queue. SIOCINQ after each failure tells the two apart
    /// well enough: failures in a row with the same length first in the queue are one frame,
    /// counted once, and taken off explicitly after `MAX_REFUSALS`, or they would repeat for
    /// ever. (Same-length frames dropped one after another count as one: an undercount only.)
    fn receive_failed<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        e: io::Error,
    ) {
        let first_len = ctx.socket.pending_len().unwrap_or(0);
        match self.refused {
            Some((len, n)) if len == first_len && first_len != 0 => {
                if n + 1 < MAX_REFUSALS {
                    self.refused = Some((len, n + 1));
                    return;
                }
                self.refused = None;
                let mut scratch = [0u8; 64];
                // A plain buffer the kernel cannot refuse; the frame is truncated into it.
                let mut iov = [iovec {
                    iov_base: scratch.as_mut_ptr().cast(),
                    iov_len: scratch.len(),
                }];
                // SAFETY: the iovec points at `scratch`, writable for its length during the call.
                let taken = unsafe { ctx.socket.recv(&mut iov) };
                ctx.stats.rx_drop_kernel += 1;
                self.log(format_args!(
                    "RX: the packet socket refused a {len}-byte frame {} times ({e}); dropped it ({})",
                    n + 1,
                    match taken {
                        Ok(_) => "taken off".to_string(),
                        Err(e) => format!("taking it off failed too: {e}"),
                    }
                ));
            }
            _ => {
                // Another frame is first now: the previous run's frame went.
                self.end_refusals(ctx);
                if first_len == 0 {
                    self.socket_error(ctx, e);
                } else {
                    self.refused = Some((first_len, 1));
                    self.log(format_args!("RX: receiving from packet socket: {e}"));
                }
            }
        }
    }

    /// A run of failed receives ended (a frame came through, the queue emptied, or the pass
    /// ends): the frame they were about is gone, one frame lost.
    fn end_refusals<S: FrameSource + ?Sized>(&mut self, ctx: &mut RxContext<'_, S>) {
        if self.refused.take().is_some() {
            ctx.stats.rx_drop_kernel += 1;
        }
    }

    /// A receive failed, or the socket had an error pending.
    fn socket_error<S: FrameSource + ?Sized>(&mut self, ctx: &mut RxContext<'_, S>, e: io::Error) {
        if e.raw_os_error() == Some(libc::ENETDOWN) {
            // Reported once: the link went down (or was down when the socket was bound). No
            // packet is lost; frames flow again once it comes up. A deleted interface reports
            // the same, and the interface watch ends the daemon then.
            log::info!("RX: the interface is down; frames flow again when it comes up");
        } else {
            // One packet is gone (see `receive_failed`).
            ctx.stats.rx_drop_kernel += 1;
            self.log(format_args!("RX: receiving from packet socket: {e}"));
        }
    }

    /// Bytes the next frame may use: every staged chain with MRG_RXBUF, else the first.
    fn capacity(&self, mergeable: bool) -> usize {
        if mergeable {
            self.staged_bytes
        } else {
            self.staged.front().map_or(0, |s| s.chain.len as usize)
        }
    }

    /// Pops guest chains until the staged ones can take `want` bytes (default: a maximal
    /// frame; one chain without MRG_RXBUF) or the avail ring is empty.
    fn stage<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        geo: RxGeometry,
        want: Option<usize>,
    ) {
        let RxGeometry {
            hdr_len, mergeable, ..
        } = geo;
        let size = ctx.queue.size();
        let want = want.unwrap_or(MAX_FRAME + hdr_len);
        loop {
            let enough = if mergeable {
                self.staged_bytes >= want
            } else {
                !self.staged.is_empty()
            };
            if enough {
                return;
            }
            let at = ctx.queue.next_avail();
            let Some(desc_chain) = ctx.queue.pop_descriptor_chain(ctx.mem) else {
                return;
            };
            let head = desc_chain.head_index();
            let resolved = chain::resolve_from_queue(
                ctx.mem,
                chain::QueueGeometry {
                    desc_table: GuestAddress(ctx.queue.desc_table()),
                    size: ctx.queue.size(),
                },
                head,
                desc_chain,
                Access::DeviceWrites,
                &mut self.arena,
            );
            let resolved = match resolved {
                // Every mergeable buffer must hold at least the header (virtio 5.1.6.3.1).
                Ok(c) if (c.len as usize) < hdr_len => {
                    // Its iovecs must not stay in the arena: staged chains are contiguous there.
                    self.arena.truncate(c.iovs.0 as usize);
                    Err(chain::ChainError::Empty)
                }
                other => other,
            };
            match resolved {
                Ok(c) => {
                    self.staged_bytes += c.len as usize;
                    self.staged.push_back(Staged {
                        chain: c,
                        bad: false,
                        at,
                    });
                }
                Err(e) => {
                    // Counted once, though a pass that gives it back has it judged again.
                    if !self.counted_bad.contains(&at) {
                        ctx.stats.rx_drop_bad_chain += 1;
                        self.log(format_args!("RX: guest chain {head}: {e}"));
                    }
                    if head >= size && self.staged.is_empty() {
                        // Not a slot the used ring can name: nothing to give back. (Behind
                        // staged chains it is staged as bad all the same, so that giving them
                        // back rewinds past it exactly; it never gets a used element.)
                        continue;
                    }
                    let bad = Staged {
                        chain: Chain {
                            head,
                            iovs: (0, 0),
                            len: 0,
                        },
                        bad: true,
                        at,
                    };
                    if self.staged.is_empty() {
                        let _ = used.push(ctx.mem, head, 0);
                    } else {
                        self.staged.push_back(bad);
                    }
                }
            }
        }
    }

    /// Receives the next frame straight into the staged guest chains (through `bounce` when
    /// the chains need more iovecs than one receive takes).
    fn receive_one<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        geo: RxGeometry,
        capacity: usize,
    ) -> io::Result<()> {
        let RxGeometry {
            hdr_len,
            kernel_hdr,
            mergeable,
            ..
        } = geo;
        // A 10-byte kernel header in a 12-byte guest header leaves num_buffers as a hole.
        let hole = if kernel_hdr == LEN_BASE && hdr_len == LEN_MRG {
            LEN_BASE..LEN_MRG
        } else {
            0..0
        };
        self.recv_iov.clear();
        let staged = self.staged_iovs(mergeable);
        chain::carve(
            &self.arena[staged.clone()],
            capacity,
            hole,
            &mut self.recv_iov,
        );
        if self.recv_iov.len() > UIO_MAXIOV {
            // More than one recvmsg takes (many tiny guest buffers): the kernel would refuse
            // the call and keep the frame. Receive it whole into our own buffer instead, and
            // copy it into the guest's.
            return self.receive_via_bounce(ctx, used, geo, capacity);
        }
        let got = self.recv_into_guest(ctx)?;
        let scatter = Scatter::guest(ctx.mem, &self.arena[staged]);
        let tag_len = if got.vlan.is_some() { VLAN_TAG_LEN } else { 0 };
        let frame_len = got.len.saturating_sub(kernel_hdr) + tag_len;
        let guest_len = frame_len + hdr_len;
        if got.truncated || guest_len > capacity || got.len < kernel_hdr + ETH_ADDRS_LEN {
            // The buffers go to the next frame; none of this one may show past its used length.
            scatter.zero(0, guest_len.min(capacity));
            ctx.stats.rx_drop_oversize += 1;
            self.log(format_args!(
                "RX: dropped a {frame_len}-byte frame: guest buffers hold {capacity} bytes"
            ));
            return Ok(());
        }

        let mut hdr_bytes = [0u8; LEN_MRG];
        scatter.read_at(0, &mut hdr_bytes[..hdr_len]);
        let mut hdr = NetHeader::new_checked(&mut hdr_bytes[..hdr_len], hdr_len)
            .expect("header buffer sized by header_len");
        let frame = FrameSpan {
            at: hdr_len,
            len: frame_len,
            vlan: got.vlan,
        };
        let adapted = adapt_frame(
            &scatter,
            frame,
            &mut hdr,
            ctx.features,
            ctx.stats,
            &mut self.log_limit,
        );
        match adapted {
            Adapted::Dropped => {
                // The buffers go to the next frame: nothing of this one may show.
                scatter.zero(0, guest_len);
            }
            Adapted::Segment(csum) => {
                let params = GsoParams::from_header(&hdr, csum);
                // The segments go into the very buffers the frame was received into, so it
                // moves out first; what they do not overwrite must not show it past their
                // used lengths.
                grow(&mut self.bounce, frame_len);
                scatter.read_at(hdr_len, &mut self.bounce[..frame_len]);
                scatter.zero(0, guest_len);
                self.pending = Some(PendingGso {
                    params,
                    start: 0,
                    len: frame_len,
                    done: 0,
                });
                self.deliver_segments(ctx, used, geo);
            }
            Adapted::Deliver => self.deliver_whole(
                ctx,
                used,
                geo,
                &mut hdr_bytes[..hdr_len],
                Landed::InGuest(frame_len),
            ),
        }
        Ok(())
    }

    /// Receives the next frame over `recv_iov` (carved from the staged guest chains): the one
    /// receive that writes guest memory, so the one place to log the pages it dirties.
    fn recv_into_guest<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
    ) -> io::Result<RecvLen> {
        // SAFETY: every iovec was resolved from the current guest memory mapping, which the
        // caller keeps alive for the whole pass, and covers writable guest buffers only.
        let got = unsafe { ctx.socket.recv(&mut self.recv_iov)? };
        Ok(got)
    }

    /// Delivers an adapted frame whole into the staged chains: its header (`hdr_bytes`, final
    /// but for num_buffers), the frame itself if it is not there yet, and the used elements.
    fn deliver_whole<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        geo: RxGeometry,
        hdr_bytes: &mut [u8],
        frame: Landed,
    ) {
        let frame_len = match &frame {
            Landed::InGuest(len) => *len,
            Landed::InBounce(range) => range.len(),
        };
        let guest_len = geo.hdr_len + frame_len;
        let filled = self.chains_for(guest_len);
        let mut hdr = NetHeader::new_checked(&mut *hdr_bytes, geo.hdr_len)
            .expect("header buffer sized by header_len");
        hdr.set_num_buffers(filled as u16);
        let gso = hdr.gso_kind() != GsoKind::None;
        let scatter = Scatter::guest(ctx.mem, &self.arena[self.staged_iovs(geo.mergeable)]);
        scatter.write_at(0, hdr_bytes);
        if let Landed::InBounce(range) = frame {
            scatter.write_at(geo.hdr_len, &self.bounce[range]);
        }
        self.complete(ctx, used, guest_len, filled);
        count_delivered(ctx.stats, frame_len, gso, filled);
    }

    /// Delivers the segments of the pending GSO frame as packets of their own, each with its
    /// virtio header, as far as the guest has buffers. Returns whether it is done; if not, the
    /// rest waits in `pending` for the guest's next buffers (nothing is dropped for want of
    /// buffers, as with whole frames).
    fn deliver_segments<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        geo: RxGeometry,
    ) -> bool {
        let Some(pending) = self.pending else {
            return true;
        };
        let frame = std::mem::take(&mut self.bounce);
        let bytes = &frame[pending.start..pending.start + pending.len];
        let (finished, sent) = self.emit_segments(ctx, used, bytes, &pending, geo);
        self.bounce = frame;
        if finished {
            self.pending = None;
            ctx.stats.rx_segmented += 1;
        } else if let Some(p) = self.pending.as_mut() {
            p.done += sent;
        }
        finished
    }

    /// Writes the segments of `frame` from number `pending.done` on. Returns whether all are
    /// out, and how many this call wrote.
    fn emit_segments<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        frame: &[u8],
        pending: &PendingGso,
        geo: RxGeometry,
    ) -> (bool, usize) {
        let RxGeometry {
            hdr_len, mergeable, ..
        } = geo;
        let plan = match segment::plan(frame, &pending.params) {
            Ok(plan) => plan,
            Err(e) => {
                ctx.stats.rx_drop_offload += 1;
                self.log(format_args!(
                    "RX: cannot segment a {}-byte GSO frame: {e}",
                    frame.len()
                ));
                return (true, 0);
            }
        };
        let partial = pending.params.csum == SegmentCsum::Partial;
        let mut index = 0usize;
        let mut sent = 0usize;
        let result = plan.emit(|seg| {
            index += 1;
            if index <= pending.done {
                return Ok(());
            }
            let guest_len = hdr_len + seg.len();
            self.stage(ctx, used, geo, Some(guest_len));
            let capacity = self.capacity(mergeable);
            if guest_len > capacity {
                if !mergeable && capacity > 0 {
                    // One chain per packet and it is too small: more buffers will not help.
                    return Err(true);
                }
                return Err(false);
            }
            let filled = self.chains_for(guest_len);
            let mut vh = [0u8; LEN_MRG];
            let mut h = NetHeader::new_checked(&mut vh[..hdr_len], hdr_len)
                .expect("header buffer sized by header_len");
            if partial {
                h.set_flags(FLAG_NEEDS_CSUM);
                h.set_csum_start(seg.csum_start);
                h.set_csum_offset(seg.csum_offset);
            }
            h.set_num_buffers(filled as u16);
            let iovs = self.staged_iovs(mergeable);
            let scatter = Scatter::guest(ctx.mem, &self.arena[iovs]);
            scatter.write_at(0, &vh[..hdr_len]);
            scatter.write_at(hdr_len, seg.headers());
            scatter.write_at(hdr_len + seg.headers_len, seg.payload_of(frame));
            self.complete(ctx, used, guest_len, filled);
            ctx.stats.rx_packets += 1;
            ctx.stats.rx_bytes += seg.len() as u64;
            ctx.stats.rx_multi_buffer += u64::from(filled > 1);
            sent += 1;
            Ok(())
        });
        match result {
            Ok(_) => (true, sent),
            Err(false) => (false, sent),
            Err(true) => {
                let lost = plan.segments() - pending.done - sent;
                ctx.stats.rx_drop_oversize += lost as u64;
                self.log(format_args!(
                    "RX: dropped {lost} segments larger than the guest's buffers"
                ));
                (true, sent)
            }
        }
    }

    /// The arena range of the staged chains a packet may use: all of them with MRG_RXBUF,
    /// else the first. Broken chains hold no iovecs, so the range is contiguous.
    fn staged_iovs(&self, mergeable: bool) -> std::ops::Range<usize> {
        let first = self.staged.front().map_or(0, |s| s.chain.iovs.0 as usize);
        let last = if mergeable {
            // Broken chains have no iovecs: the range ends with the last good one.
            self.staged
                .iter()
                .rev()
                .find(|s| !s.bad)
                .map_or(first, |s| s.chain.iovs.1 as usize)
        } else {
            self.staged.front().map_or(0, |s| s.chain.iovs.1 as usize)
        };
        first..last
    }

    /// Takes a frame that can never fit the guest's buffers off the socket, through a small
    /// scratch buffer: nothing of it reaches guest memory.
    fn discard<S: FrameSource + ?Sized>(&mut self, ctx: &mut RxContext<'_, S>, len: usize) {
        let mut scratch = [0u8; 64];
        let mut iov = [iovec {
            iov_base: scratch.as_mut_ptr().cast(),
            iov_len: scratch.len(),
        }];
        // SAFETY: the iovec points at `scratch`, writable for its length during the call.
        let _ = unsafe { ctx.socket.recv(&mut iov) };
        ctx.stats.rx_drop_oversize += 1;
        self.log(format_args!(
            "RX: dropped a {len}-byte frame: the guest's buffers (no MRG_RXBUF) are smaller"
        ));
    }

    /// Receives the next frame into `bounce`, then hands the guest exactly what it may have:
    /// the frame (checksum completed if need be) or its segments. Nothing else touches guest
    /// memory.
    fn receive_via_bounce<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        geo: RxGeometry,
        capacity: usize,
    ) -> io::Result<()> {
        let RxGeometry {
            hdr_len,
            kernel_hdr,
            ..
        } = geo;
        // Room for the kernel header, the largest frame, and a VLAN tag put back.
        grow(&mut self.bounce, LEN_MRG + MAX_FRAME + VLAN_TAG_LEN);
        let mut iov = [iovec {
            iov_base: self.bounce.as_mut_ptr().cast(),
            iov_len: kernel_hdr + MAX_FRAME,
        }];
        // SAFETY: the iovec points into `bounce`, writable for that length during the call.
        let got = unsafe { ctx.socket.recv(&mut iov)? };
        let mut frame_len = got.len.saturating_sub(kernel_hdr);
        if got.truncated || got.len < kernel_hdr + ETH_ADDRS_LEN {
            ctx.stats.rx_drop_oversize += 1;
            self.log(format_args!("RX: dropped a {frame_len}-byte frame"));
            return Ok(());
        }
        let mut hdr_bytes = [0u8; LEN_MRG];
        let copied = kernel_hdr.min(hdr_len);
        hdr_bytes[..copied].copy_from_slice(&self.bounce[..copied]);
        let mut hdr = NetHeader::new_checked(&mut hdr_bytes[..hdr_len], hdr_len)
            .expect("header buffer sized by header_len");
        if got.vlan.is_some() {
            frame_len += VLAN_TAG_LEN;
        }
        let frame = FrameSpan {
            at: kernel_hdr,
            len: frame_len,
            vlan: got.vlan,
        };
        let bounce = [VolatileSlice::from(&mut self.bounce[..])];
        let adapted = adapt_frame(
            &Scatter::slices(&bounce),
            frame,
            &mut hdr,
            ctx.features,
            ctx.stats,
            &mut self.log_limit,
        );
        match adapted {
            Adapted::Dropped => {}
            Adapted::Segment(csum) => {
                self.pending = Some(PendingGso {
                    params: GsoParams::from_header(&hdr, csum),
                    start: frame.at,
                    len: frame_len,
                    done: 0,
                });
                self.deliver_segments(ctx, used, geo);
            }
            // Only a VLAN tag put back can make a frame outgrow what was checked before.
            Adapted::Deliver if hdr_len + frame_len > capacity => {
                ctx.stats.rx_drop_oversize += 1;
                self.log(format_args!(
                    "RX: dropped a {frame_len}-byte frame: guest buffers hold {capacity} bytes"
                ));
            }
            Adapted::Deliver => self.deliver_whole(
                ctx,
                used,
                geo,
                &mut hdr_bytes[..hdr_len],
                Landed::InBounce(frame.at..frame.at + frame_len),
            ),
        }
        Ok(())
    }

    /// How many staged good chains a packet of `guest_len` bytes fills, front to back.
    fn chains_for(&self, guest_len: usize) -> usize {
        let mut remaining = guest_len;
        let mut filled = 0usize;
        for s in self.staged.iter().filter(|s| !s.bad) {
            if remaining == 0 {
                break;
            }
            remaining -= remaining.min(s.chain.len as usize);
            filled += 1;
        }
        filled
    }

    /// Writes the used elements of a packet of `guest_len` bytes that fills the first `filled`
    /// good staged chains, and takes those chains off the staging queue.
    fn complete<S: FrameSource + ?Sized>(
        &mut self,
        ctx: &mut RxContext<'_, S>,
        used: &mut UsedRing,
        guest_len: usize,
        filled: usize,
    ) {
        // The packet's used elements must be adjacent in the used ring (the guest takes the
        // num_buffers elements that follow the first), so broken chains skipped over are
        // returned after them.
        let mut remaining = guest_len;
        let mut taken = 0usize;
        self.skipped_bad.clear();
        while taken < filled {
            let Some(s) = self.staged.pop_front() else {
                break;
            };
            if s.bad {
                self.skipped_bad.push(s.chain.head);
                continue;
            }
            let len = remaining.min(s.chain.len as usize);
            remaining -= len;
            self.staged_bytes -= s.chain.len as usize;
            let _ = used.push(ctx.mem, s.chain.head, len as u32);
            taken += 1;
        }
        // Broken chains now at the front were popped before every unfilled one; returning them
        // keeps the staged chains a suffix of what was popped, so rewinding stays exact.
        while let Some(s) = self.staged.front().filter(|s| s.bad) {
            self.skipped_bad.push(s.chain.head);
            self.staged.pop_front();
        }
        for &head in &self.skipped_bad {
            if head < ctx.queue.size() {
                let _ = used.push(ctx.mem, head, 0);
            }
        }
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        self.log_limit.warn(args);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use proptest::prelude::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    use vm_memory::{Bytes, GuestAddress};

    use crate::datapath::test_ring::{Guest, BUFFERS, DESC, QSIZE};

    /// Frames handed over as a packet socket would: header first, truncated if too long.
    struct Scripted {
        hdr_len: usize,
        /// The first `hdr_len` bytes are the header the source writes before every frame.
        header: [u8; 12],
        frames: RefCell<VecDeque<Vec<u8>>>,
        /// A tag "stripped by the interface" from every frame.
        vlan: Option<crate::packet::socket::VlanTag>,
        /// The first frame is refused (EINVAL, left queued) unless received into at most 64
        /// bytes: a frame the kernel will not put into the guest's buffers.
        refuse_first: std::cell::Cell<bool>,
        /// The next receive takes the first frame and fails (EINVAL): a frame the kernel drops.
        drop_first: std::cell::Cell<bool>,
    }

    fn scripted(hdr_len: usize, frames: Vec<Vec<u8>>) -> Scripted {
        Scripted {
            hdr_len,
            header: [0; 12],
            frames: RefCell::new(frames.into()),
            vlan: None,
            refuse_first: Default::default(),
            drop_first: Default::default(),
        }
    }

    impl FrameSource for Scripted {
        fn kernel_vnet_header_len(&self) -> usize {
            self.hdr_len
        }

        fn pending_len(&self) -> io::Result<usize> {
            Ok(self.frames.borrow().front().map_or(0, Vec::len))
        }

        fn take_error(&self) -> io::Result<Option<io::Error>> {
            Ok(None)
        }

        unsafe fn recv(&self, iov: &mut [iovec]) -> io::Result<RecvLen> {
            if iov.len() > UIO_MAXIOV {
                // As the kernel: refused before the frame is taken off the queue.
                return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
            }
            let room: usize = iov.iter().map(|v| v.iov_len).sum();
            if self.refuse_first.get() && room > 64 && !self.frames.borrow().is_empty() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.refuse_first.set(false);
            if self.drop_first.take() && self.frames.borrow_mut().pop_front().is_some() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let Some(frame) = self.frames.borrow_mut().pop_front() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let mut bytes = self.header[..self.hdr_len].to_vec();
            bytes.extend_from_slice(&frame);
            let slices: Vec<VolatileSlice<'_>> = iov
                .iter()
                // SAFETY: the caller guarantees each iovec is valid for writes of its length.
                .map(|v| unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) })
                .collect();
            let written = Scatter::slices(&slices).write_at(0, &bytes);
            Ok(RecvLen {
                len: bytes.len(),
                truncated: written < bytes.len(),
                vlan: self.vlan,
            })
        }
    }

    fn run(guest: &mut Guest, source: &Scripted, features: u64) -> (RxPass, PairStats) {
        let mut rx = RxPath::default();
        let mut stats = PairStats::default();
        let pass = rx.process(&mut RxContext {
            queue: &mut guest.queue,
            mem: &guest.mem,
            socket: source,
            features: Negotiated::new(features),
            stats: &mut stats,
            look_first: true,
        });
        (pass, stats)
    }

    const MRG: u64 = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_F_VERSION_1);

    fn frame_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any frame size against any mix of guest chains: the frame lands byte-exact in as
        /// many chains as it needs, num_buffers says how many, the used lengths add up to
        /// header + frame, and unused chains are given back.
        #[test]
        fn mergeable_rx_splits_and_reassembles(
            frame_len in 14usize..=65549,
            chains in prop::collection::vec(prop::collection::vec(1u32..6000, 1..4), 1..60),
            kernel_hdr_10 in any::<bool>(),
            // A guest with TSO takes frames straight into its buffers; one without, through
            // the bounce buffer: both paths must split alike.
            tso in any::<bool>(),
        ) {
            // Every mergeable buffer holds at least a header.
            let chains: Vec<Vec<u32>> = chains
                .into_iter()
                .map(|mut c| { if c.iter().sum::<u32>() < 12 { c[0] += 12; } c })
                .collect();
            let capacity: usize = chains.iter().flatten().map(|&l| l as usize).sum();
            let mut guest = Guest::new(&chains);
            let frame = frame_of(frame_len);
            let source = scripted(if kernel_hdr_10 { 10 } else { 12 }, vec![frame.clone()]);
            let features = if tso {
                MRG | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_CSUM)
                    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4)
                    | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO6)
            } else {
                MRG
            };
            let (pass, stats) = run(&mut guest, &source, features);
            let used = guest.used();
            // Room for a VLAN tag the interface may have stripped is kept too.
            if capacity < frame_len + 12 + VLAN_TAG_LEN {
                prop_assert_eq!(pass.outcome, RxOutcome::NeedBuffers);
                prop_assert!(used.is_empty());
                prop_assert_eq!(guest.queue.next_avail(), 0, "every chain given back");
                prop_assert_eq!(source.frames.borrow().len(), 1, "the frame waits for buffers");
                return Ok(());
            }
            let k = used.len();
            // With every chain filled the guest has none left: wait for it, not the socket.
            let expected = if k == chains.len() { RxOutcome::NeedBuffers } else { RxOutcome::Drained };
            prop_assert_eq!(pass.outcome, expected);
            prop_assert!(pass.notify);
            prop_assert!(k >= 1);
            prop_assert_eq!(guest.queue.next_avail() as usize, k, "unused chains given back");
            prop_assert_eq!(used.iter().map(|u| u.1 as usize).sum::<usize>(), 12 + frame_len);
            let mut bytes = Vec::new();
            let mut heads = Vec::new();
            for (i, &(id, len)) in used.iter().enumerate() {
                let chain_len: u32 = guest.chains[id as usize].iter().map(|d| d.1).sum();
                if i + 1 < k {
                    prop_assert_eq!(len, chain_len, "only the last chain is partly filled");
                }
                heads.push(id);
                bytes.extend(guest.read_chain(id, len));
            }
            let mut sorted = heads.clone();
            sorted.sort_unstable();
            prop_assert_eq!(heads, sorted, "chains used in avail order");
            prop_assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]) as usize, k, "num_buffers");
            prop_assert_eq!(&bytes[..10], &[0u8; 10][..]);
            prop_assert!(bytes[12..] == frame[..], "frame reassembles byte for byte");
            prop_assert_eq!(stats.rx_packets, 1);
            prop_assert_eq!(stats.rx_multi_buffer, u64::from(k > 1));
        }
    }

    #[test]
    fn broken_chain_among_staged_ones_is_returned_after_the_packet() {
        let mut guest = Guest::new(&[vec![1536], vec![1536], vec![4096], vec![4096]]);
        // Make chain 1 read-only: a driver bug on the RX queue.
        guest
            .mem
            .write_obj(0u16, GuestAddress(DESC + 16 + 12))
            .unwrap();
        let source = scripted(12, vec![frame_of(3000)]);
        let (pass, stats) = run(&mut guest, &source, MRG);
        assert_eq!(pass.outcome, RxOutcome::Drained);
        let used = guest.used();
        // The packet's two entries are adjacent; the broken chain follows with length 0.
        assert_eq!(used, vec![(0, 1536), (2, 1476), (1, 0)]);
        assert_eq!(guest.read_chain(0, 12)[10..12], [2, 0]);
        assert_eq!(
            guest.queue.next_avail(),
            3,
            "the fourth chain is given back"
        );
        assert_eq!(stats.rx_drop_bad_chain, 1);
    }

    #[test]
    fn without_mrg_rxbuf_a_frame_must_fit_one_chain() {
        // VERSION_1 without MRG_RXBUF: 12-byte header, num_buffers 1, one chain per frame.
        let mut guest = Guest::new(&[vec![1000], vec![12, 3000]]);
        let source = scripted(12, vec![frame_of(1500), frame_of(900)]);
        let (pass, stats) = run(&mut guest, &source, 1 << VIRTIO_F_VERSION_1);
        assert_eq!(pass.outcome, RxOutcome::Drained);
        assert_eq!(
            stats.rx_drop_oversize, 1,
            "1500 bytes do not fit the 1000-byte chain"
        );
        // The chain the dropped frame did not fit is reused for the next frame.
        assert_eq!(guest.used(), vec![(0, 912)]);
        let bytes = guest.read_chain(0, 912);
        assert_eq!(bytes[10..12], [1, 0], "num_buffers is 1 with VERSION_1");
        assert_eq!(bytes[12..], frame_of(900)[..]);
    }

    #[test]
    fn stripped_vlan_tag_is_put_back_and_csum_start_moves() {
        use crate::packet::socket::VlanTag;
        let mut guest = Guest::new(&[vec![2000]]);
        let frame = frame_of(100);
        // NEEDS_CSUM at 34/16 and hdr_len 54, as the kernel reports them for the untagged frame.
        let mut source = scripted(12, vec![frame.clone()]);
        source.header = [1, 0, 54, 0, 0, 0, 34, 0, 16, 0, 0, 0];
        source.vlan = Some(VlanTag {
            tpid: 0x8100,
            tci: 0x2abc,
        });
        let with_csum = MRG | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_CSUM);
        let (_, stats) = run(&mut guest, &source, with_csum);
        assert_eq!(stats.rx_packets, 1);
        assert_eq!(guest.used(), vec![(0, 12 + 104)]);
        let got = guest.read_chain(0, 116);
        let hdr = NetHeader::new_checked(&got[..12], 12).unwrap();
        assert_eq!(
            (hdr.csum_start(), hdr.csum_offset(), hdr.hdr_len()),
            (38, 16, 58)
        );
        assert_eq!(got[12..24], frame[..12], "MAC addresses first");
        assert_eq!(got[24..28], [0x81, 0x00, 0x2a, 0xbc], "then the tag");
        assert_eq!(got[28..], frame[12..], "then the rest of the frame");
    }

    /// (vnet header, GSO frame, Linux's segments) from a captured fixture.
    fn fixture(text: &str) -> ([u8; 12], Vec<u8>, Vec<Vec<u8>>) {
        let hex = |h: &str| -> Vec<u8> {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        };
        let (mut vnet, mut input, mut out) = ([0u8; 12], Vec::new(), Vec::new());
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("vnet", h)) => vnet.copy_from_slice(&hex(h.trim())),
                Some(("in", h)) => input = hex(h.trim()),
                Some(("out", h)) => out.push(hex(h.trim())),
                _ => {}
            }
        }
        (vnet, input, out)
    }

    #[test]
    fn gso_frames_reach_a_guest_without_tso_as_linux_would_segment_them() {
        let (vnet, frame, linux) = fixture(include_str!("../../tests/fixtures/gso/tcp4.txt"));
        let mut guest = Guest::new(&vec![vec![1536]; linux.len() + 2]);
        let mut source = scripted(12, vec![frame]);
        source.header = vnet;
        // No GUEST_CSUM, no GUEST_TSO4: full checksums, one plain packet per segment.
        let (_, stats) = run(&mut guest, &source, MRG);
        let used = guest.used();
        assert_eq!(used.len(), linux.len());
        for ((id, len), want) in used.iter().zip(&linux) {
            let got = guest.read_chain(*id, *len);
            assert_eq!(
                got[..12],
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                "plain header, one buffer"
            );
            assert_eq!(&got[12..], &want[..], "byte for byte what Linux makes");
        }
        assert_eq!(
            (stats.rx_segmented, stats.rx_packets),
            (1, linux.len() as u64)
        );
        assert_eq!(stats.rx_drop_offload + stats.rx_drop_no_buffers, 0);
    }

    #[test]
    fn segments_for_a_guest_with_guest_csum_keep_partial_checksums() {
        let (vnet, frame, linux) = fixture(include_str!("../../tests/fixtures/gso/tcp4.txt"));
        let mut guest = Guest::new(&vec![vec![4096]; linux.len()]);
        let mut source = scripted(12, vec![frame]);
        source.header = vnet;
        let with_csum = MRG | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_CSUM);
        let (_, stats) = run(&mut guest, &source, with_csum);
        let used = guest.used();
        assert_eq!((used.len(), stats.rx_segmented), (linux.len(), 1));
        for ((id, len), want) in used.iter().zip(&linux) {
            let got = guest.read_chain(*id, *len);
            let hdr = NetHeader::new_checked(&got[..12], 12).unwrap();
            assert_eq!((hdr.flags(), hdr.gso_type()), (FLAG_NEEDS_CSUM, 0));
            assert_eq!((hdr.csum_start(), hdr.csum_offset()), (34, 16));
            // Everything but the TCP checksum (left partial) is Linux's.
            assert_eq!(got[12..12 + 50], want[..50]);
            assert_eq!(got[12 + 52..], want[52..]);
        }
    }

    #[test]
    fn segments_wait_for_buffers_instead_of_being_dropped() {
        let (vnet, frame, linux) = fixture(include_str!("../../tests/fixtures/gso/tcp4.txt"));
        assert!(linux.len() > 3);
        // Room for the frame (3 x 4096 bytes) but not for its segments, one chain each.
        let mut guest = Guest::new(&[vec![4096], vec![4096], vec![4096]]);
        let mut source = scripted(12, vec![frame]);
        source.header = vnet;
        let mut rx = RxPath::default();
        let mut stats = PairStats::default();
        let mut pass = |guest: &mut Guest, stats: &mut PairStats| {
            rx.process(&mut RxContext {
                queue: &mut guest.queue,
                mem: &guest.mem,
                socket: &source,
                features: Negotiated::new(MRG),
                stats,
                look_first: false,
            })
        };
        assert_eq!(pass(&mut guest, &mut stats).outcome, RxOutcome::NeedBuffers);
        assert_eq!(guest.used().len(), 3, "as many segments as buffers");
        // The guest posts more buffers: the rest of the frame follows, nothing was lost.
        guest.post(&vec![vec![1536]; linux.len()]);
        pass(&mut guest, &mut stats);
        let used = guest.used();
        assert_eq!(used.len(), linux.len());
        for ((id, len), want) in used.iter().zip(&linux) {
            assert_eq!(&guest.read_chain(*id, *len)[12..], &want[..]);
        }
        assert_eq!((stats.rx_segmented, stats.rx_drop_no_buffers), (1, 0));
    }

    /// Cost of the segmentation fallback through the whole RX path, against delivering the same
    /// frame whole. `cargo test --release --lib rx_segmentation_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn rx_segmentation_cost() {
        let (vnet, small, _) = fixture(include_str!("../../tests/fixtures/gso/tcp4.txt"));
        // The fixture's headers around the largest IPv4 payload: a 65549-byte frame.
        let mut frame = small[..54].to_vec();
        frame.extend((0..65535 - 40).map(|i| i as u8));
        frame[16..18].copy_from_slice(&65535u16.to_be_bytes());
        let tso4 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4;
        let with_csum = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_CSUM;
        for (name, features) in [
            ("whole, GUEST_TSO4", MRG | with_csum | tso4),
            ("segmented, full checksums", MRG),
            ("segmented, partial checksums", MRG | with_csum),
        ] {
            let mut total = std::time::Duration::ZERO;
            let mut frames = 0u32;
            for _ in 0..100 {
                // 5 frames of 46 segments fill a 256-entry ring of 1536-byte buffers.
                let mut guest = Guest::new(&vec![vec![1536]; 250]);
                // Fault the buffers in first: a running guest's memory is already mapped.
                let zeros = vec![0u8; 250 * 1536];
                guest
                    .mem
                    .write_slice(&zeros, GuestAddress(BUFFERS))
                    .unwrap();
                let mut source = scripted(12, vec![frame.clone(); 5]);
                source.header = vnet;
                let mut rx = RxPath::default();
                let mut stats = PairStats::default();
                let t = std::time::Instant::now();
                rx.process(&mut RxContext {
                    queue: &mut guest.queue,
                    mem: &guest.mem,
                    socket: &source,
                    features: Negotiated::new(features),
                    stats: &mut stats,
                    look_first: false,
                });
                total += t.elapsed();
                frames += stats.rx_segmented.max(stats.rx_gso) as u32;
            }
            println!(
                "{name}: {} ns per 65549-byte frame ({frames} frames)",
                total.as_nanos() / u128::from(frames)
            );
        }
    }

    const TSO: u64 = MRG
        | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_CSUM)
        | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4)
        | (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO6);

    #[test]
    fn a_chain_too_short_for_the_header_among_good_ones_takes_no_data() {
        for features in [MRG, TSO] {
            let mut guest = Guest::new(&[vec![1536], vec![8], vec![1536]]);
            let frame = frame_of(2000);
            let source = scripted(12, vec![frame.clone()]);
            let (_, stats) = run(&mut guest, &source, features);
            let used = guest.used();
            assert_eq!(
                used,
                vec![(0, 1536), (2, 2012 - 1536), (1, 0)],
                "{features:#x}"
            );
            let mut got = guest.read_chain(0, 1536);
            got.extend(guest.read_chain(2, 476));
            assert_eq!(got[12..], frame[..]);
            assert_eq!(stats.rx_drop_bad_chain, 1);
        }
    }

    #[test]
    fn a_broken_chain_last_in_line_does_not_upset_the_next_frame() {
        for features in [MRG, TSO] {
            let mut guest = Guest::new(&[vec![1536], vec![1536], vec![1536]]);
            guest.make_read_only(2);
            let source = scripted(12, vec![frame_of(100), frame_of(200)]);
            let (_, stats) = run(&mut guest, &source, features);
            let used = guest.used();
            assert_eq!(&used[..2], &[(0, 112), (1, 212)], "{features:#x}");
            assert_eq!(guest.read_chain(1, 212)[12..], frame_of(200)[..]);
            assert_eq!((stats.rx_packets, stats.rx_drop_bad_chain), (2, 1));
        }
    }

    #[test]
    fn an_avail_entry_outside_the_ring_among_staged_chains_is_stepped_over_exactly() {
        for features in [MRG, TSO] {
            let mut guest = Guest::new(&[vec![1536]]);
            guest.post_raw_head(QSIZE + 44);
            guest.post(&[vec![1536]]);
            // Nothing to receive: every staged chain is given back, the good first one too.
            let (_, _) = run(&mut guest, &scripted(12, vec![]), features);
            assert_eq!(
                guest.queue.next_avail(),
                0,
                "{features:#x}: rewound to the first chain"
            );
            // A frame over both good chains: the bad entry gets no used element.
            let (_, stats) = run(&mut guest, &scripted(12, vec![frame_of(2000)]), features);
            assert_eq!(guest.used(), vec![(0, 1536), (1, 476)], "{features:#x}");
            assert_eq!(guest.queue.next_avail(), 3);
            assert_eq!(stats.rx_drop_bad_chain, 1);
        }
    }

    #[test]
    fn a_frame_the_socket_keeps_refusing_is_dropped_once_and_the_next_one_delivered() {
        for features in [MRG, TSO] {
            let mut guest = Guest::new(&[vec![1536], vec![1536]]);
            let source = scripted(12, vec![frame_of(100), frame_of(200)]);
            source.refuse_first.set(true);
            let (pass, stats) = run(&mut guest, &source, features);
            assert_eq!(pass.outcome, RxOutcome::Drained, "{features:#x}");
            assert_eq!(stats.rx_drop_kernel, 1, "{features:#x}: counted once");
            assert_eq!(guest.used(), vec![(0, 212)], "{features:#x}");
            assert_eq!(guest.read_chain(0, 212)[12..], frame_of(200)[..]);
        }
    }

    #[test]
    fn a_frame_the_kernel_drops_on_receive_is_counted_once() {
        for features in [MRG, TSO] {
            let mut guest = Guest::new(&[vec![1536], vec![1536]]);
            let source = scripted(12, vec![frame_of(100), frame_of(100), frame_of(300)]);
            source.drop_first.set(true);
            let (_, stats) = run(&mut guest, &source, features);
            assert_eq!(stats.rx_drop_kernel, 1, "{features:#x}");
            assert_eq!(
                guest.used(),
                vec![(0, 112), (1, 312)],
                "{features:#x}: the frames after it are delivered"
            );
        }
    }

    #[test]
    fn legacy_guest_gets_ten_byte_headers() {
        let mut guest = Guest::new(&[vec![2000]]);
        let source = scripted(10, vec![frame_of(100)]);
        let (_, stats) = run(&mut guest, &source, 0);
        assert_eq!(stats.rx_packets, 1);
        assert_eq!(guest.used(), vec![(0, 110)]);
        assert_eq!(guest.read_chain(0, 110)[10..], frame_of(100)[..]);
    }
}
