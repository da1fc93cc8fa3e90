//! TX: guest chains to the packet socket, copying only their headers.
//!
//! One batch: pop up to [`BATCH`] chains, resolve each to iovecs over guest memory (the virtio
//! header may share a descriptor with the frame or be split anywhere), copy the virtio header
//! and the first [`HEAD_COPY`] bytes of the frame into a host buffer, check that copy against
//! what the guest negotiated and may send, and hand the batch to `sendmmsg`: each message is the
//! copy followed by the rest of the frame in guest memory. The guest can change its memory at
//! any time (another vCPU); what was decided on is what the kernel reads. A frame the kernel
//! refuses is a counted drop; `EAGAIN` keeps the unsent chains (rewound into the avail ring) and
//! waits for the socket to become writable. Used elements are published once per batch.
//!
//! The socket is reached through [`FrameSink`], so that tests and the `tx_reader` fuzz target
//! drive the same code with a scripted sink.

use std::io;
use std::time::Duration;

use libc::{iovec, mmsghdr};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::offload;
use crate::packet::socket::PacketSocket;
use crate::stats::{PairStats, RateLimit};
use crate::virtio::chain::{self, Access, Scatter};
use crate::virtio::features::Negotiated;
use crate::virtio::header::{GsoKind, NetHeader, LEN_BASE, LEN_MRG};
use crate::virtio::used::{NotifyState, RingAddrs, UsedRing};

/// Chains per sendmmsg.
pub const BATCH: usize = 64;
/// Batches per pass before other events get a turn.
const BUDGET_BATCHES: usize = 4;
/// An Ethernet header: the shortest frame the kernel takes.
const MIN_FRAME: usize = 14;
/// Bytes of each frame copied (with its virtio header) before anything is decided: every header
/// a check reads (Ethernet, two VLAN tags, the largest IPv4 header: 82 bytes) and the L2-L4
/// headers of any frame a real stack sends (14 + 8 + 60 + 60 for IPv4 and TCP, 200-odd for
/// IPv6 with extension headers). Longer frames send the rest from guest memory.
pub const HEAD_COPY: usize = 256;
/// One message's share of [`TxPath::heads`].
const HEAD_SLOT: usize = LEN_MRG + HEAD_COPY;

/// How a pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// The avail ring is empty.
    Drained,
    /// The socket is full: wait for it to become writable.
    Blocked,
    /// The budget ran out with chains left.
    Budget,
}

/// What happens to one popped avail entry. Drops are counted when the entry is completed, not
/// when it is popped: an entry behind a chain that `EAGAIN` holds back is popped again later.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Send message `msg` of the batch.
    Send { msg: usize, bytes: usize, gso: bool },
    /// Return it unsent: the guest gets it back with a drop counted as `Refusal`.
    Drop(Refusal),
    /// The entry names no descriptor: nothing to give back; counted as malformed.
    Skip,
}

/// Why a chain is returned unsent.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    Malformed,
    Unnegotiated,
    Spoofed,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    head: u16,
    fate: Fate,
}

/// TX state of one queue pair.
pub struct TxPath {
    /// Each chain's iovecs over guest memory.
    arena: Vec<iovec>,
    /// Each message's iovecs: its head copy in `heads`, then the rest of its chain.
    carved: Vec<iovec>,
    entries: Vec<Entry>,
    /// (start, end) of each message's iovecs in `carved`.
    msg_iov: Vec<(usize, usize)>,
    msgs: Vec<mmsghdr>,
    /// Message i's copy of its virtio header and frame head is at `i * HEAD_SLOT`. Allocated
    /// once and never resized: the iovecs point into it.
    heads: Box<[u8]>,
    pub notify: NotifyState,
    log_limit: RateLimit,
}

// SAFETY: the raw pointers in the iovec and mmsghdr scratch buffers (into guest memory and into
// `heads`) are only dereferenced during a pass, which runs on one thread under the pair's lock
// with the guest memory guard held; each pass rebuilds them before use.
unsafe impl Send for TxPath {}

impl Default for TxPath {
    fn default() -> Self {
        TxPath {
            arena: Vec::with_capacity(BATCH * 4),
            carved: Vec::with_capacity(BATCH * 4),
            entries: Vec::with_capacity(BATCH),
            msg_iov: Vec::with_capacity(BATCH),
            msgs: Vec::with_capacity(BATCH),
            heads: vec![0u8; BATCH * HEAD_SLOT].into_boxed_slice(),
            notify: NotifyState::default(),
            log_limit: RateLimit::new(Duration::from_secs(5)),
        }
    }
}

/// Where sent frames go: the packet socket, or a scripted sink in tests.
pub trait FrameSink {
    /// Bytes of virtio header the sink expects before each frame (10 or 12).
    fn kernel_vnet_header_len(&self) -> usize;
    /// Sends messages in order, as `sendmmsg` does: `Ok(n)` with `1 <= n <= msgs.len()`, the
    /// first `n` went (message `n`, if any, failed and its error is lost); `Err(e)`, the first
    /// message failed with `e` (`WouldBlock`: the sink is full, nothing went). `Ok(0)` only for
    /// an empty `msgs`.
    ///
    /// # Safety
    ///
    /// Every message's iovecs must point to memory valid for reads of their lengths for the
    /// duration of the call.
    unsafe fn send_batch(&self, msgs: &mut [mmsghdr]) -> io::Result<usize>;
}

impl FrameSink for PacketSocket {
    fn kernel_vnet_header_len(&self) -> usize {
        PacketSocket::kernel_vnet_header_len(self)
    }

    unsafe fn send_batch(&self, msgs: &mut [mmsghdr]) -> io::Result<usize> {
        // SAFETY: the caller upholds the same contract as `PacketSocket::send_batch`'s.
        unsafe { PacketSocket::send_batch(self, msgs) }
    }
}

/// What one pass needs besides its own state.
pub struct TxContext<'a, S: FrameSink + ?Sized = PacketSocket> {
    pub queue: &'a mut Queue,
    pub mem: &'a GuestMemoryMmap,
    pub socket: &'a S,
    pub features: Negotiated,
    pub stats: &'a mut PairStats,
    /// What the guest's source MAC is checked against (and learned from); `None` allows any.
    pub source_mac: Option<super::mac::SourceCheck<'a>>,
}

/// Result of a pass.
pub struct TxPass {
    pub outcome: TxOutcome,
    pub notify: bool,
}

impl TxPath {
    pub fn reset(&mut self) {
        self.notify = NotifyState::default();
    }

    pub fn process<S: FrameSink + ?Sized>(&mut self, ctx: &mut TxContext<'_, S>) -> TxPass {
        let addrs = RingAddrs {
            avail: GuestAddress(ctx.queue.avail_ring()),
            used: GuestAddress(ctx.queue.used_ring()),
            size: ctx.queue.size(),
        };
        let mut notify = false;
        let mut outcome = TxOutcome::Budget;
        for _ in 0..BUDGET_BATCHES {
            let mut used = UsedRing::new(addrs, ctx.queue.next_used());
            let (popped, unsent) = self.send_batch(ctx, &mut used);
            ctx.queue
                .set_next_avail(ctx.queue.next_avail().wrapping_sub(unsent as u16));
            notify |= self.publish(ctx, &mut used);
            if unsent > 0 {
                ctx.stats.tx_backpressure += 1;
                outcome = TxOutcome::Blocked;
                break;
            }
            if popped < BATCH {
                outcome = TxOutcome::Drained;
                break;
            }
        }
        TxPass { outcome, notify }
    }

    /// A disabled ring (vhost-user: started but disabled, "process and discard any TX
    /// packets"): every chain the guest made available is given back unsent and counted in
    /// `tx_drop_disabled`; nothing reaches the socket. At most one ring's worth per pass, so a
    /// guest that keeps adding cannot hold the worker.
    pub fn discard<S: FrameSink + ?Sized>(&mut self, ctx: &mut TxContext<'_, S>) -> TxPass {
        let size = ctx.queue.size();
        let addrs = RingAddrs {
            avail: GuestAddress(ctx.queue.avail_ring()),
            used: GuestAddress(ctx.queue.used_ring()),
            size,
        };
        let mut used = UsedRing::new(addrs, ctx.queue.next_used());
        let mut outcome = TxOutcome::Budget;
        for _ in 0..size {
            let Some(desc_chain) = ctx.queue.pop_descriptor_chain(ctx.mem) else {
                outcome = TxOutcome::Drained;
                break;
            };
            let head = desc_chain.head_index();
            if head >= size {
                ctx.stats.tx_drop_malformed += 1;
                continue;
            }
            let _ = used.push(ctx.mem, head, 0);
            ctx.stats.tx_drop_disabled += 1;
        }
        let notify = self.publish(ctx, &mut used);
        TxPass { outcome, notify }
    }

    /// Makes the pushed used elements visible; returns whether the guest wants an interrupt.
    fn publish<S: FrameSink + ?Sized>(
        &mut self,
        ctx: &mut TxContext<'_, S>,
        used: &mut UsedRing,
    ) -> bool {
        let mut notify = false;
        match used.publish(ctx.mem) {
            Ok(true) => {
                notify =
                    used.needs_notification(ctx.mem, ctx.features.event_idx(), &mut self.notify);
                ctx.stats.tx_notifications += u64::from(notify);
            }
            Ok(false) => {}
            Err(e) => self.log(format_args!("TX: {e}")),
        }
        ctx.queue.set_next_used(used.next_used());
        notify
    }

    /// Pops, checks and sends one batch. Returns (chains popped, chains left unsent by EAGAIN).
    fn send_batch<S: FrameSink + ?Sized>(
        &mut self,
        ctx: &mut TxContext<'_, S>,
        used: &mut UsedRing,
    ) -> (usize, usize) {
        self.arena.clear();
        self.carved.clear();
        self.entries.clear();
        self.msg_iov.clear();
        let hdr_len = ctx.features.header_len();
        let kernel_hdr = ctx.socket.kernel_vnet_header_len();
        let size = ctx.queue.size();

        while self.entries.len() < BATCH {
            let Some(desc_chain) = ctx.queue.pop_descriptor_chain(ctx.mem) else {
                break;
            };
            let head = desc_chain.head_index();
            if head >= size {
                // Not a slot the used ring can name; nothing to give back or send. Still an
                // entry: rewinding past it must count it.
                self.log(format_args!(
                    "TX: avail ring names descriptor {head} of {size}"
                ));
                self.entries.push(Entry {
                    head,
                    fate: Fate::Skip,
                });
                continue;
            }
            let resolved = chain::resolve_from_queue(
                ctx.mem,
                chain::QueueGeometry {
                    desc_table: GuestAddress(ctx.queue.desc_table()),
                    size: ctx.queue.size(),
                },
                head,
                desc_chain,
                Access::DeviceReads,
                &mut self.arena,
            );
            let fate = match resolved {
                Ok(c) => self.check(ctx, c.iov_range(), c.len as usize, hdr_len, kernel_hdr),
                Err(e) => {
                    self.log(format_args!("TX: guest chain {head}: {e}"));
                    Fate::Drop(Refusal::Malformed)
                }
            };
            self.entries.push(Entry { head, fate });
        }
        let popped = self.entries.len();

        self.msgs.clear();
        for &(start, end) in &self.msg_iov {
            let iovs = &self.carved[start..end];
            // SAFETY: an all-zero msghdr is valid (null name and control, no flags).
            let mut m: mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iovs.as_ptr().cast_mut();
            m.msg_hdr.msg_iovlen = iovs.len();
            self.msgs.push(m);
        }

        // Send; `sent` counts messages the kernel has dealt with (sent or refused).
        let mut sent = 0usize;
        let mut refused: Vec<(usize, io::Error)> = Vec::new();
        while sent < self.msgs.len() {
            // SAFETY: every message's iovecs point into `heads` or into guest memory resolved
            // for reading against the mapping the caller keeps alive for this pass.
            match unsafe { ctx.socket.send_batch(&mut self.msgs[sent..]) } {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    refused.push((sent, e));
                    sent += 1;
                }
            }
        }

        // Complete entries in order up to the first unsent message.
        let mut done = 0usize;
        for i in 0..self.entries.len() {
            let entry = self.entries[i];
            let fate = entry.fate;
            if let Fate::Send { msg, .. } = fate {
                if msg >= sent {
                    break;
                }
            }
            done += 1;
            if !matches!(fate, Fate::Skip) {
                let _ = used.push(ctx.mem, entry.head, 0);
            }
            let counter = match fate {
                Fate::Skip | Fate::Drop(Refusal::Malformed) => &mut ctx.stats.tx_drop_malformed,
                Fate::Drop(Refusal::Unnegotiated) => &mut ctx.stats.tx_drop_unnegotiated,
                Fate::Drop(Refusal::Spoofed) => &mut ctx.stats.tx_drop_spoofed,
                Fate::Send { msg, bytes, gso } => {
                    match refused.iter().find(|(m, _)| *m == msg) {
                        Some((_, e)) => {
                            match e.raw_os_error() {
                                Some(libc::EMSGSIZE) => ctx.stats.tx_drop_oversize += 1,
                                _ => ctx.stats.tx_drop_kernel += 1,
                            }
                            self.log(format_args!(
                                "TX: packet socket refused a {bytes}-byte frame: {e}"
                            ));
                        }
                        None => {
                            ctx.stats.tx_packets += 1;
                            ctx.stats.tx_bytes += bytes as u64;
                            ctx.stats.tx_gso += u64::from(gso);
                        }
                    }
                    continue;
                }
            };
            *counter += 1;
        }
        (popped, popped - done)
    }

    /// Copies a chain's header and frame head, checks the copy and prepares its message (the
    /// copy, then the rest of the chain), or decides to drop it.
    fn check<S: FrameSink + ?Sized>(
        &mut self,
        ctx: &mut TxContext<'_, S>,
        iovs: std::ops::Range<usize>,
        len: usize,
        hdr_len: usize,
        kernel_hdr: usize,
    ) -> Fate {
        if len < hdr_len + MIN_FRAME {
            self.log(format_args!(
                "TX: {len}-byte chain is shorter than a header and a frame"
            ));
            return Fate::Drop(Refusal::Malformed);
        }
        let msg = self.msg_iov.len();
        let slot = &mut self.heads[msg * HEAD_SLOT..(msg + 1) * HEAD_SLOT];
        let scatter = Scatter::guest(ctx.mem, &self.arena[iovs.clone()]);
        let copied = scatter.read_at(0, &mut slot[..len.min(HEAD_SLOT)]);
        if copied < len.min(HEAD_SLOT) {
            // Only iovecs from another mapping come short (a bug, not the guest): refuse the
            // chain rather than decide on part of its header.
            return Fate::Drop(Refusal::Malformed);
        }
        // From here on only the copy is looked at, and the copy is what the kernel reads.
        let (hdr_bytes, frame_head) = slot[..copied].split_at(hdr_len);
        let hdr =
            NetHeader::new_checked(hdr_bytes, hdr_len).expect("header buffer sized by header_len");
        let kind = hdr.gso_kind();
        // Segmentation implies a partial checksum, so GSO needs CSUM as well as HOST_TSO/USO.
        let wants_csum = hdr.needs_csum() || kind != GsoKind::None;
        if !ctx.features.host_accepts_gso(kind, hdr.gso_ecn())
            || (wants_csum && !ctx.features.host_csum())
        {
            self.log_limit.warn(format_args!(
                "TX: dropped a frame with flags {:#x} gso_type {:#x} the guest did not negotiate",
                hdr.flags(),
                hdr.gso_type()
            ));
            return Fate::Drop(Refusal::Unnegotiated);
        }
        if wants_csum {
            if let Err(e) = offload::check_tx_header(&hdr, frame_head, len - hdr_len) {
                self.log_limit.warn(format_args!(
                    "TX: dropped a frame whose header does not match it: {e}"
                ));
                return Fate::Drop(Refusal::Malformed);
            }
        }
        let mut source = [0u8; 6];
        source.copy_from_slice(&frame_head[6..12]);
        if !source_allowed(ctx, &mut self.log_limit, source) {
            return Fate::Drop(Refusal::Spoofed);
        }

        let start = self.carved.len();
        let copy = slot.as_mut_ptr();
        if kernel_hdr == hdr_len {
            self.carved.push(iovec {
                iov_base: copy.cast(),
                iov_len: copied,
            });
        } else {
            // A 12-byte guest header on a 10-byte kernel header: skip num_buffers.
            debug_assert_eq!((hdr_len, kernel_hdr), (LEN_MRG, LEN_BASE));
            self.carved.push(iovec {
                iov_base: copy.cast(),
                iov_len: LEN_BASE,
            });
            self.carved.push(iovec {
                // Inside the slot: `copied` > LEN_MRG (checked above).
                iov_base: copy.wrapping_add(LEN_MRG).cast(),
                iov_len: copied - LEN_MRG,
            });
        }
        // The rest of the frame, past the copy, straight from guest memory.
        chain::carve(&self.arena[iovs], len, 0..copied, &mut self.carved);
        if self.carved.len() - start > chain::MAX_SEGMENTS {
            // The copy's iovecs came on top of a chain already at the kernel's limit (no real
            // driver comes near it: Linux uses some 20 descriptors a frame).
            self.carved.truncate(start);
            self.log(format_args!(
                "TX: chain has too many segments to send with its header copy"
            ));
            return Fate::Drop(Refusal::Malformed);
        }
        self.msg_iov.push((start, self.carved.len()));
        Fate::Send {
            msg,
            bytes: len - hdr_len,
            gso: kind != GsoKind::None,
        }
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        self.log_limit.warn(args);
    }
}

/// Whether the guest may send from `source` (the frame's source MAC, as copied); logs a refusal,
/// which the caller counts.
fn source_allowed<S: FrameSink + ?Sized>(
    ctx: &mut TxContext<'_, S>,
    log: &mut RateLimit,
    source: [u8; 6],
) -> bool {
    let Some(check) = &mut ctx.source_mac else {
        return true;
    };
    if check.allows(source) {
        return true;
    }
    log.warn(format_args!("TX: {}", check.refusal(source)));
    false
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::{Cell, RefCell};

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    use super::*;
    use crate::datapath::test_ring::{Guest, QSIZE};

    /// A packet socket as TX sees it, scripted: message `seq` (counting every message the sink
    /// dealt with, sent or refused) is refused with `refuse`'s errno, `room` messages go before
    /// it is full (EAGAIN), at most `per_call` go in one call (a partial send).
    pub(crate) struct Sink {
        hdr_len: usize,
        refuse: Vec<(usize, i32)>,
        pub(crate) room: Cell<usize>,
        per_call: usize,
        /// Interrupted (EINTR) before the next call does anything.
        interrupt: Cell<bool>,
        seq: Cell<usize>,
        /// The bytes of every message sent, and whether its first iovec was in guest memory.
        pub(crate) sent: RefCell<Vec<(Vec<u8>, *const u8)>>,
        /// Called before each send: stands for another vCPU writing guest memory meanwhile.
        meddle: Option<Box<dyn Fn()>>,
    }

    pub(crate) fn sink(hdr_len: usize) -> Sink {
        Sink {
            hdr_len,
            refuse: Vec::new(),
            room: Cell::new(usize::MAX),
            per_call: usize::MAX,
            interrupt: Cell::new(false),
            seq: Cell::new(0),
            sent: RefCell::new(Vec::new()),
            meddle: None,
        }
    }

    impl FrameSink for Sink {
        fn kernel_vnet_header_len(&self) -> usize {
            self.hdr_len
        }

        unsafe fn send_batch(&self, msgs: &mut [mmsghdr]) -> io::Result<usize> {
            assert!(!msgs.is_empty(), "an empty batch");
            if self.interrupt.take() {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if let Some(meddle) = &self.meddle {
                meddle();
            }
            let mut n = 0;
            for m in msgs.iter().take(self.per_call) {
                let seq = self.seq.get();
                if let Some(&(_, errno)) = self.refuse.iter().find(|(k, _)| *k == seq) {
                    if n > 0 {
                        break;
                    }
                    self.seq.set(seq + 1);
                    return Err(io::Error::from_raw_os_error(errno));
                }
                if self.room.get() == 0 {
                    if n > 0 {
                        break;
                    }
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                // SAFETY: the caller guarantees the message's iovecs are readable.
                let iovs =
                    unsafe { std::slice::from_raw_parts(m.msg_hdr.msg_iov, m.msg_hdr.msg_iovlen) };
                let mut bytes = Vec::new();
                for v in iovs {
                    // SAFETY: as above.
                    bytes.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                    });
                }
                self.sent
                    .borrow_mut()
                    .push((bytes, iovs[0].iov_base.cast::<u8>().cast_const()));
                self.room.set(self.room.get() - 1);
                self.seq.set(seq + 1);
                n += 1;
            }
            Ok(n)
        }
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// A guest header (all zero: no offload) and an Ethernet frame of `len` bytes whose bytes
    /// say which frame `tag` it is.
    fn packet(hdr_len: usize, len: usize, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; hdr_len];
        p.extend((0..len).map(|i| (i as u8).wrapping_mul(7) ^ tag));
        // A unicast source MAC.
        p[hdr_len + 6] &= !1;
        p
    }

    /// What the kernel must receive for `packet`: its header cut to the sink's length (a
    /// 12-byte header loses num_buffers), then the frame.
    fn on_the_wire(packet: &[u8], hdr_len: usize, kernel_hdr: usize) -> Vec<u8> {
        let mut w = packet[..kernel_hdr].to_vec();
        w.extend_from_slice(&packet[hdr_len..]);
        w
    }

    fn pass(guest: &mut Guest, tx: &mut TxPath, sink: &Sink, features: u64) -> (TxPass, PairStats) {
        let mut stats = PairStats::default();
        let pass = tx.process(&mut TxContext {
            queue: &mut guest.queue,
            mem: &guest.mem,
            socket: sink,
            features: Negotiated::new(features),
            stats: &mut stats,
            source_mac: None,
        });
        (pass, stats)
    }

    /// Chains of several shapes (header alone, header split, header with the frame, frames
    /// longer than the copy, across several descriptors) for the first 30, then one descriptor
    /// each (the table has room for 256 descriptors).
    fn post_mix(guest: &mut Guest, hdr_len: usize, n: usize) -> Vec<(u16, Vec<u8>)> {
        let shapes: [&[u32]; 6] = [
            &[],
            &[hdr_len as u32],
            &[4],
            &[3, 9, 30],
            &[100, 2000],
            &[1; 8],
        ];
        (0..n)
            .map(|i| {
                let p = packet(hdr_len, 60 + 97 * i % 3000, i as u8);
                let shape = if i < 30 {
                    shapes[i % shapes.len()]
                } else {
                    &[]
                };
                let head = guest.post_bytes(&p, shape);
                (head, p)
            })
            .collect()
    }

    /// The used ring holds `heads`, each once, with length 0.
    fn assert_used(guest: &Guest, heads: &[u16]) {
        let used = guest.used();
        let want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
        assert_eq!(used, want, "used elements");
    }

    #[test]
    fn every_chain_goes_once_as_the_header_copy_then_guest_bytes() {
        for (features, hdr_len, kernel_hdr) in [(0, 10, 10), (V1, 12, 12), (V1, 12, 10)] {
            let mut guest = Guest::device_reads();
            let posted = post_mix(&mut guest, hdr_len, 100);
            let before = guest.driver_area();
            let s = sink(kernel_hdr);
            let (pass, stats) = pass(&mut guest, &mut TxPath::default(), &s, features);
            assert_eq!(pass.outcome, TxOutcome::Drained);
            assert!(pass.notify);
            assert_eq!(guest.driver_area(), before, "TX wrote to guest memory");
            assert_eq!(guest.queue.next_avail(), 100);
            let heads: Vec<u16> = posted.iter().map(|p| p.0).collect();
            assert_used(&guest, &heads);
            let sent = s.sent.borrow();
            assert_eq!(sent.len(), 100);
            for ((bytes, first), (head, p)) in sent.iter().zip(&posted) {
                assert!(
                    bytes[..] == on_the_wire(p, hdr_len, kernel_hdr)[..],
                    "chain {head}: the kernel got other bytes"
                );
                assert!(
                    !guest.in_guest_memory(*first),
                    "chain {head}: the header went from guest memory, not the checked copy"
                );
            }
            assert_eq!(stats.tx_packets, 100);
            let frames: usize = posted.iter().map(|p| p.1.len() - hdr_len).sum();
            assert_eq!(stats.tx_bytes, frames as u64);
            assert_eq!(stats.tx_drop_kernel + stats.tx_drop_malformed, 0);
        }
    }

    #[test]
    fn a_message_the_kernel_refuses_is_dropped_once_and_the_rest_go() {
        for (errno, oversize) in [
            (libc::EINVAL, false),
            (libc::EMSGSIZE, true),
            (libc::ENOBUFS, false),
        ] {
            let mut guest = Guest::device_reads();
            let posted = post_mix(&mut guest, 12, 10);
            let before = guest.driver_area();
            let mut s = sink(12);
            s.refuse = vec![(0, errno), (4, errno), (5, errno), (9, errno)];
            let (pass, stats) = pass(&mut guest, &mut TxPath::default(), &s, V1);
            assert_eq!(pass.outcome, TxOutcome::Drained, "errno {errno}");
            assert_eq!(guest.driver_area(), before);
            assert_eq!(guest.queue.next_avail(), 10);
            let heads: Vec<u16> = posted.iter().map(|p| p.0).collect();
            assert_used(&guest, &heads);
            let sent: Vec<Vec<u8>> = s.sent.borrow().iter().map(|m| m.0.clone()).collect();
            let want: Vec<Vec<u8>> = [1, 2, 3, 6, 7, 8]
                .iter()
                .map(|&i| on_the_wire(&posted[i].1, 12, 12))
                .collect();
            assert!(sent == want, "errno {errno}: the messages after a refusal");
            assert_eq!(stats.tx_packets, 6);
            assert_eq!(stats.tx_drop_oversize, if oversize { 4 } else { 0 });
            assert_eq!(stats.tx_drop_kernel, if oversize { 0 } else { 4 });
        }
    }

    #[test]
    fn eagain_leaves_the_unsent_chains_in_the_avail_ring_exactly() {
        let mut guest = Guest::device_reads();
        let mut posted = post_mix(&mut guest, 12, 6);
        // Behind the chain EAGAIN holds back: a short chain and an entry naming no
        // descriptor, which are dropped once, when their turn comes.
        let short = guest.post_bytes(&[0u8; 20], &[]);
        guest.post_raw_head(QSIZE + 3);
        posted.extend(post_mix(&mut guest, 12, 4));
        let before = guest.driver_area();
        let mut s = sink(12);
        s.room.set(4);
        s.per_call = 3;
        let mut tx = TxPath::default();

        let (first, stats) = pass(&mut guest, &mut tx, &s, V1);
        assert_eq!(first.outcome, TxOutcome::Blocked);
        assert_eq!(
            guest.queue.next_avail(),
            4,
            "the unsent chains are given back"
        );
        let heads: Vec<u16> = posted.iter().map(|p| p.0).collect();
        assert_used(&guest, &heads[..4]);
        assert_eq!(stats.tx_packets, 4);
        assert_eq!(stats.tx_backpressure, 1);
        assert_eq!(
            stats.tx_drop_malformed, 0,
            "nothing counted before its turn"
        );

        // Still full: nothing moves.
        let (again, stats) = pass(&mut guest, &mut tx, &s, V1);
        assert_eq!(again.outcome, TxOutcome::Blocked);
        assert_eq!(guest.queue.next_avail(), 4);
        assert_eq!((stats.tx_packets, stats.tx_drop_malformed), (0, 0));

        // Writable again.
        s.room.set(usize::MAX);
        s.interrupt.set(true);
        let (last, stats) = pass(&mut guest, &mut tx, &s, V1);
        assert_eq!(last.outcome, TxOutcome::Drained);
        assert_eq!(guest.queue.next_avail(), 12);
        let mut all = heads[..6].to_vec();
        all.push(short);
        all.extend_from_slice(&heads[6..]);
        assert_used(&guest, &all);
        assert_eq!(stats.tx_packets, 6);
        assert_eq!(
            stats.tx_drop_malformed, 2,
            "the short chain and the stray entry"
        );
        assert_eq!(guest.driver_area(), before);
        let sent: Vec<Vec<u8>> = s.sent.borrow().iter().map(|m| m.0.clone()).collect();
        let want: Vec<Vec<u8>> = posted.iter().map(|p| on_the_wire(&p.1, 12, 12)).collect();
        assert!(sent == want, "each frame sent once, in order");
    }

    #[test]
    fn partial_sends_resume_where_the_kernel_stopped() {
        let mut guest = Guest::device_reads();
        // More than a batch, so that later batches follow partial ones.
        let posted = post_mix(&mut guest, 12, 150);
        let mut s = sink(12);
        s.per_call = 7;
        s.refuse = vec![(13, libc::EINVAL), (64, libc::ENOBUFS)];
        let (pass, stats) = pass(&mut guest, &mut TxPath::default(), &s, V1);
        assert_eq!(pass.outcome, TxOutcome::Drained);
        assert_eq!(guest.queue.next_avail(), 150);
        let heads: Vec<u16> = posted.iter().map(|p| p.0).collect();
        assert_used(&guest, &heads);
        assert_eq!((stats.tx_packets, stats.tx_drop_kernel), (148, 2));
        let sent: Vec<Vec<u8>> = s.sent.borrow().iter().map(|m| m.0.clone()).collect();
        let want: Vec<Vec<u8>> = posted
            .iter()
            .enumerate()
            .filter(|(i, _)| ![13, 64].contains(i))
            .map(|(_, p)| on_the_wire(&p.1, 12, 12))
            .collect();
        assert!(sent == want, "each frame sent once, in order");
    }

    #[test]
    fn the_kernel_reads_the_copy_that_was_checked_not_guest_memory() {
        let mut guest = Guest::device_reads();
        let p = packet(12, 1000, 1);
        let head = guest.post_bytes(&p, &[]);
        let (addr, _) = guest.chains[usize::from(head)][0];
        let mem = guest.mem.clone();
        let mut s = sink(12);
        // Between the check and the send the guest asks for GSO it did not negotiate and
        // rewrites its source MAC and the frame's first bytes.
        s.meddle = Some(Box::new(move || {
            use vm_memory::Bytes;
            mem.write_slice(&[0x01, 0x01], GuestAddress(addr)).unwrap();
            mem.write_slice(&[0xff; 100], GuestAddress(addr + 12))
                .unwrap();
        }));
        let (_, stats) = pass(&mut guest, &mut TxPath::default(), &s, V1);
        assert_eq!(stats.tx_packets, 1);
        let sent = s.sent.borrow();
        assert!(sent[0].0 == p[..], "the kernel read what was checked");
    }
}
