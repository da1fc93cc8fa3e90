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

/// What one pass needs besides its own state.
pub struct TxContext<'a> {
    pub queue: &'a mut Queue,
    pub mem: &'a GuestMemoryMmap,
    pub socket: &'a PacketSocket,
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

    pub fn process(&mut self, ctx: &mut TxContext<'_>) -> TxPass {
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
    pub fn discard(&mut self, ctx: &mut TxContext<'_>) -> TxPass {
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
    fn publish(&mut self, ctx: &mut TxContext<'_>, used: &mut UsedRing) -> bool {
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
    fn send_batch(&mut self, ctx: &mut TxContext<'_>, used: &mut UsedRing) -> (usize, usize) {
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
    fn check(
        &mut self,
        ctx: &mut TxContext<'_>,
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
fn source_allowed(ctx: &mut TxContext<'_>, log: &mut RateLimit, source: [u8; 6]) -> bool {
    let Some(check) = &mut ctx.source_mac else {
        return true;
    };
    if check.allows(source) {
        return true;
    }
    log.warn(format_args!("TX: {}", check.refusal(source)));
    false
}
