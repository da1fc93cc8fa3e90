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
use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::offload::{self, RxVerdict};
use crate::packet::socket::PacketSocket;
use crate::stats::{PairStats, RateLimit};
use crate::virtio::chain::{self, Access, Chain, Scatter};
use crate::virtio::features::Negotiated;
use crate::virtio::header::{GsoKind, NetHeader, LEN_BASE, LEN_MRG};
use crate::virtio::used::{NotifyState, RingAddrs, UsedRing};

/// The largest frame AF_PACKET hands over: IPv4 total length 65535 + Ethernet 14 (kernel-facts
/// §3); VLAN reinsertion adds 4 more.
pub const MAX_FRAME: usize = 65535 + 14 + 4;
/// Packets per pass before other events get a turn.
const BUDGET: usize = 256;
/// Used elements written before an intermediate publish, so the guest can start early.
const PUBLISH_BATCH: u16 = 64;

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

/// One staged guest chain; `bad` chains are returned with length 0 once they reach the front.
#[derive(Clone, Copy, Debug)]
struct Staged {
    chain: Chain,
    bad: bool,
}

/// RX state of one queue pair. The buffers are reused across passes; their contents are not.
pub struct RxPath {
    arena: Vec<iovec>,
    staged: VecDeque<Staged>,
    staged_bytes: usize,
    recv_iov: Vec<iovec>,
    skipped_bad: Vec<u16>,
    signal_due: bool,
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
            signal_due: false,
            notify: NotifyState::default(),
            log_limit: RateLimit::new(Duration::from_secs(5)),
        }
    }
}

/// What one pass needs besides its own state.
pub struct RxContext<'a> {
    pub queue: &'a mut Queue,
    pub mem: &'a GuestMemoryMmap,
    pub socket: &'a PacketSocket,
    pub features: Negotiated,
    pub stats: &'a mut PairStats,
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
    /// Forgets per-connection state (a new frontend starts with fresh rings).
    pub fn reset(&mut self) {
        self.notify = NotifyState::default();
        self.clear_staging();
    }

    fn clear_staging(&mut self) {
        self.arena.clear();
        self.staged.clear();
        self.staged_bytes = 0;
        self.recv_iov.clear();
    }

    pub fn process(&mut self, ctx: &mut RxContext<'_>) -> RxPass {
        let addrs = RingAddrs {
            avail: GuestAddress(ctx.queue.avail_ring()),
            used: GuestAddress(ctx.queue.used_ring()),
            size: ctx.queue.size(),
        };
        let mut used = UsedRing::new(addrs, ctx.queue.next_used());
        let outcome = self.receive_loop(ctx, &mut used);

        // Give back what was staged but not filled; bad chains among them are judged again
        // next time.
        let avail_seen = ctx.queue.next_avail();
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

    fn publish(&mut self, used: &mut UsedRing, ctx: &mut RxContext<'_>) -> bool {
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

    fn receive_loop(&mut self, ctx: &mut RxContext<'_>, used: &mut UsedRing) -> RxOutcome {
        let hdr_len = ctx.features.header_len();
        let mergeable = ctx.features.mrg_rxbuf();
        let kernel_hdr = ctx.socket.kernel_vnet_header_len();
        for _ in 0..BUDGET {
            self.stage(ctx, used, hdr_len, mergeable);
            let capacity = self.capacity(mergeable);
            if capacity == 0 {
                return RxOutcome::NeedBuffers;
            }
            if capacity < MAX_FRAME + hdr_len {
                // Not room for every possible frame: look at the next one before taking it.
                match ctx.socket.pending_len() {
                    Ok(0) => return RxOutcome::Drained,
                    Ok(len) if len + hdr_len > capacity => return RxOutcome::NeedBuffers,
                    Ok(_) => {}
                    Err(e) => {
                        self.log(format_args!("RX: SIOCINQ on packet socket: {e}"));
                        return RxOutcome::Drained;
                    }
                }
            }
            match self.receive_one(ctx, used, hdr_len, kernel_hdr, mergeable, capacity) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return RxOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EINVAL: the kernel could not express this packet's metadata and dropped it;
                    // ENETDOWN: the link went down. Either way one packet is gone.
                    ctx.stats.rx_drop_kernel += 1;
                    self.log(format_args!("RX: receiving from packet socket: {e}"));
                }
            }
            if used.pending() >= PUBLISH_BATCH {
                // Let the guest start on a long burst early; the caller signals once at the end.
                self.signal_due |= self.publish(used, ctx);
            }
        }
        RxOutcome::Budget
    }

    /// Bytes the next frame may use: every staged chain with MRG_RXBUF, else the first.
    fn capacity(&self, mergeable: bool) -> usize {
        if mergeable {
            self.staged_bytes
        } else {
            self.staged.front().map_or(0, |s| s.chain.len as usize)
        }
    }

    /// Pops guest chains until the staged ones can take a maximal frame (one chain without
    /// MRG_RXBUF) or the avail ring is empty.
    fn stage(
        &mut self,
        ctx: &mut RxContext<'_>,
        used: &mut UsedRing,
        hdr_len: usize,
        mergeable: bool,
    ) {
        let size = ctx.queue.size();
        loop {
            let enough = if mergeable {
                self.staged_bytes >= MAX_FRAME + hdr_len
            } else {
                !self.staged.is_empty()
            };
            if enough {
                return;
            }
            let Some(desc_chain) = ctx.queue.pop_descriptor_chain(ctx.mem) else {
                return;
            };
            let head = desc_chain.head_index();
            let resolved = chain::resolve(
                ctx.mem,
                head,
                desc_chain,
                Access::DeviceWrites,
                &mut self.arena,
            );
            let resolved = match resolved {
                // Every mergeable buffer must hold at least the header (virtio 5.1.6.3.1).
                Ok(c) if (c.len as usize) < hdr_len => Err(chain::ChainError::Empty),
                other => other,
            };
            match resolved {
                Ok(c) => {
                    self.staged_bytes += c.len as usize;
                    self.staged.push_back(Staged {
                        chain: c,
                        bad: false,
                    });
                }
                Err(e) => {
                    ctx.stats.rx_drop_bad_chain += 1;
                    self.log(format_args!("RX: guest chain {head}: {e}"));
                    if head >= size {
                        // Not a slot the used ring can name: nothing to give back.
                        continue;
                    }
                    let bad = Staged {
                        chain: Chain {
                            head,
                            iovs: (0, 0),
                            len: 0,
                        },
                        bad: true,
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

    #[allow(clippy::too_many_arguments)]
    fn receive_one(
        &mut self,
        ctx: &mut RxContext<'_>,
        used: &mut UsedRing,
        hdr_len: usize,
        kernel_hdr: usize,
        mergeable: bool,
        capacity: usize,
    ) -> io::Result<()> {
        let first = self.staged.front().map_or(0, |s| s.chain.iovs.0 as usize);
        let last = if mergeable {
            self.staged.back().map_or(0, |s| s.chain.iovs.1 as usize)
        } else {
            self.staged.front().map_or(0, |s| s.chain.iovs.1 as usize)
        };
        // Bad chains hold no iovecs, so the staged good chains are contiguous in the arena.
        let guest_iov = &self.arena[first..last];

        // A 10-byte kernel header in a 12-byte guest header leaves num_buffers as a hole.
        let hole = if kernel_hdr == LEN_BASE && hdr_len == LEN_MRG {
            LEN_BASE..LEN_MRG
        } else {
            0..0
        };
        self.recv_iov.clear();
        chain::carve(guest_iov, capacity, hole.clone(), &mut self.recv_iov);

        // SAFETY: every iovec was resolved from the current guest memory mapping, which the
        // caller keeps alive for the whole pass, and covers writable guest buffers only.
        let got = unsafe { ctx.socket.recv(&mut self.recv_iov)? };
        let frame_len = got.len.saturating_sub(kernel_hdr);
        let guest_len = frame_len + hdr_len;
        if got.truncated || guest_len > capacity || got.len < kernel_hdr {
            ctx.stats.rx_drop_oversize += 1;
            self.log(format_args!(
                "RX: dropped a {frame_len}-byte frame: guest buffers hold {capacity} bytes"
            ));
            return Ok(());
        }

        // SAFETY: as above; the view lives only within this call.
        let scatter = unsafe { Scatter::new(guest_iov) };
        let mut hdr_bytes = [0u8; LEN_MRG];
        scatter.read_at(0, &mut hdr_bytes[..hdr_len]);
        let mut frame_head = [0u8; 64];
        let head_len = scatter.read_at(hdr_len, &mut frame_head[..frame_len.min(64)]);
        let mut hdr = NetHeader::new_checked(&mut hdr_bytes[..hdr_len], hdr_len)
            .expect("header buffer sized by header_len");

        match offload::rx_verdict(&hdr, ctx.features, &frame_head[..head_len]) {
            RxVerdict::RefuseGso => {
                ctx.stats.rx_drop_offload += 1;
                self.log(format_args!(
                    "RX: dropped a {frame_len}-byte GSO frame (gso_type {:#x}) the guest did not negotiate",
                    hdr.gso_type()
                ));
                return Ok(());
            }
            RxVerdict::Deliver { complete_csum } => {
                if complete_csum {
                    let (start, offset) = (hdr.csum_start(), hdr.csum_offset());
                    if offload::complete_checksum(&scatter, hdr_len, frame_len, start, offset)
                        .is_err()
                    {
                        ctx.stats.rx_drop_offload += 1;
                        self.log(format_args!(
                            "RX: dropped a frame with csum_start {start} csum_offset {offset} outside its {frame_len} bytes"
                        ));
                        return Ok(());
                    }
                    ctx.stats.rx_csum_completed += 1;
                }
            }
        }
        let flags = offload::guest_flags(hdr.flags(), ctx.features);
        hdr.set_flags(flags);
        if flags == 0 {
            // Without NEEDS_CSUM the checksum fields mean nothing; keep them clean.
            hdr.set_csum_start(0);
            hdr.set_csum_offset(0);
        }

        // Which staged chains the frame filled, and their used lengths.
        let mut remaining = guest_len;
        let mut filled = 0usize;
        for s in self.staged.iter().filter(|s| !s.bad) {
            if remaining == 0 {
                break;
            }
            remaining -= remaining.min(s.chain.len as usize);
            filled += 1;
        }
        hdr.set_num_buffers(filled as u16);
        let gso = hdr.gso_kind() != GsoKind::None;
        scatter.write_at(0, &hdr_bytes[..hdr_len]);

        // The frame's used elements must be adjacent in the used ring (the guest takes the
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
            let _ = used.push(ctx.mem, head, 0);
        }

        ctx.stats.rx_packets += 1;
        ctx.stats.rx_bytes += frame_len as u64;
        ctx.stats.rx_gso += u64::from(gso);
        ctx.stats.rx_multi_buffer += u64::from(filled > 1);
        Ok(())
    }

    fn log(&mut self, args: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log_limit.check() {
            if suppressed > 0 {
                warn!("{args} ({suppressed} similar messages suppressed)");
            } else {
                warn!("{args}");
            }
        }
    }
}
