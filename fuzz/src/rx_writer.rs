//! `rx_writer`: `RxPath::process`, the code that writes into guest RX buffers, driven in-process
//! by a scripted `FrameSource` against a split ring in guest memory, with any negotiated
//! features. Frames (vnet header, bytes, a stripped VLAN tag, socket errors) and guest chains
//! (sizes, count, malformed ones) come from the input, over up to three passes (chains and
//! frames added before each, so segments left waiting for buffers are exercised).
//!
//! Guest memory and the ring are [`crate::ring`]'s, with device-writable chains.
//!
//! Checks after every pass:
//! - every used element names a chain consumed in this pass (no unknown, repeated or lost
//!   head), a refused chain comes back with length 0, an accepted one with 0 < length <= its
//!   capacity;
//! - good chains are used in avail order; each packet's elements are adjacent, `num_buffers` in
//!   its first buffer counts them (1 without MRG_RXBUF), all but its last buffer are full; its
//!   header's flags, csum fields and gso_type are ones the guest negotiated;
//! - `used.idx` in guest memory is the queue's `next_used`; `rx_packets` counts the packets;
//! - no frame is refused (as the kernel does with more than `UIO_MAXIOV` iovecs, before it
//!   takes the frame off its queue) more than `MAX_REFUSALS` times in a row.
//!
//! Around every pass, the descriptor table, the avail ring and the indirect tables are
//! unchanged. After the last pass, in the buffer area: a byte within the used length of a used
//! chain may be anything; any other byte of an accepted chain (past its used length, or in a
//! chain not used) is still poison or zero (the drop paths zero what they received); every
//! other byte (the guards between buffers, refused chains, the page after the buffers) is as
//! the guest left it.
//!
//! Input (see [`RxInput::parse`]): features (8), cfg (1: bit 0 kernel header 10 bytes for a
//! 12-byte guest header, bit 1 the socket woke the worker (RX looks at frames before staging
//! chains), bits 4-7 queue size 2^(n mod 9)), start (2: initial ring indices),
//! used_event (2), avail_flags (2), rounds (1: 1 + n mod 3), then per round: chain count (1),
//! chains, frame count (1, mod 17), frames. A chain is kind (1: bits 0-1 descriptors - 1,
//! bits 2-4 kind, see [`ChainKind`], bit 5 sixteen times as many descriptors, so that the
//! chains staged for one frame can hold more iovecs than one recvmsg takes) and a 2-byte length
//! per descriptor. A frame is kind (1:
//! bits 0-1: 0/1 frame, 2 frame with VLAN tag, 3 socket error `n >> 2`), then for a frame the
//! 12-byte vnet header, VLAN TPID and TCI (2 + 2, if tagged), data length (2), data, and a
//! 2-byte count of pattern bytes appended.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;

use libc::iovec;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, VolatileSlice};

use vhost_packet::datapath::rx::{FrameSource, RxContext, RxPath, MAX_REFUSALS};
use vhost_packet::packet::socket::{RecvLen, VlanTag, UIO_MAXIOV};
use vhost_packet::stats::PairStats;
use vhost_packet::virtio::chain::{Access, Scatter};
use vhost_packet::virtio::features::Negotiated;
use vhost_packet::virtio::header::{GsoKind, NetHeader, FLAG_DATA_VALID, FLAG_NEEDS_CSUM};

use crate::chain::all_eq;
use crate::input::{Reader, Writer};
use crate::ring::{
    fixed_areas, Guest, Posted, BUFFERS, MEMORY, MEM_END, PAGE, POISON, REGION_SPLIT, USED,
};
pub use crate::ring::{ChainKind, ChainSpec};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameSpec {
    Frame {
        header: [u8; 12],
        vlan: Option<(u16, u16)>,
        data: Vec<u8>,
        pad: u16,
    },
    /// 0 WouldBlock, 1 EINTR, 2 ENETDOWN, 3 EINVAL.
    Fail(u8),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub chains: Vec<ChainSpec>,
    pub frames: Vec<FrameSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RxInput {
    pub features: u64,
    /// Kernel header of 10 bytes under a 12-byte guest header (a pre-6.4 kernel).
    pub legacy_kernel_hdr: bool,
    /// The pass was started by the socket, not by a kick (`RxContext::look_first`).
    pub look_first: bool,
    /// Queue size 2^queue_log2, 0..=8.
    pub queue_log2: u8,
    pub start: u16,
    pub used_event: u16,
    pub avail_flags: u16,
    pub rounds: Vec<Round>,
}

impl RxInput {
    pub fn parse(data: &[u8]) -> RxInput {
        let mut r = Reader::new(data);
        let features = r.u64();
        let cfg = r.u8();
        let mut input = RxInput {
            features,
            legacy_kernel_hdr: cfg & 1 != 0,
            look_first: cfg & 2 != 0,
            queue_log2: (cfg >> 4) % 9,
            start: r.u16(),
            used_event: r.u16(),
            avail_flags: r.u16(),
            rounds: Vec::new(),
        };
        let rounds = 1 + r.u8() % 3;
        for _ in 0..rounds {
            let mut round = Round::default();
            for _ in 0..r.u8() {
                let b = r.u8();
                let n = (usize::from(b & 3) + 1) * if b & 0x20 != 0 { 16 } else { 1 };
                let lens = (0..n).map(|_| r.u16()).collect();
                round.chains.push(ChainSpec {
                    kind: ChainKind::from_bits(b >> 2),
                    lens,
                });
            }
            for _ in 0..r.u8() % 17 {
                let b = r.u8();
                let spec = if b & 3 == 3 {
                    FrameSpec::Fail((b >> 2) % 4)
                } else {
                    let header = r.array::<12>();
                    let vlan = (b & 3 == 2).then(|| (r.u16(), r.u16()));
                    let len = usize::from(r.u16());
                    let data = r.bytes(len).to_vec();
                    let pad = r.u16();
                    FrameSpec::Frame {
                        header,
                        vlan,
                        data,
                        pad,
                    }
                };
                round.frames.push(spec);
            }
            input.rounds.push(round);
        }
        input
    }

    /// The bytes [`parse`](Self::parse) reads back as `self` (for the seed corpus).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.features)
            .u8(u8::from(self.legacy_kernel_hdr)
                | u8::from(self.look_first) << 1
                | (self.queue_log2 << 4))
            .u16(self.start)
            .u16(self.used_event)
            .u16(self.avail_flags)
            .u8(self.rounds.len() as u8 - 1);
        for round in &self.rounds {
            w.u8(round.chains.len() as u8);
            for c in &round.chains {
                let n = c.lens.len();
                let count = if n > 4 {
                    assert!(n % 16 == 0 && n <= 64, "{n} descriptors cannot be encoded");
                    0x20 | (n / 16 - 1) as u8
                } else {
                    n as u8 - 1
                };
                w.u8(count | (c.kind.bits() << 2));
                for &l in &c.lens {
                    w.u16(l);
                }
            }
            w.u8(round.frames.len() as u8);
            for f in &round.frames {
                match f {
                    FrameSpec::Fail(e) => {
                        w.u8(3 | (e << 2));
                    }
                    FrameSpec::Frame {
                        header,
                        vlan,
                        data,
                        pad,
                    } => {
                        w.u8(if vlan.is_some() { 2 } else { 0 }).bytes(header);
                        if let Some((tpid, tci)) = vlan {
                            w.u16(*tpid).u16(*tci);
                        }
                        w.u16(data.len() as u16).bytes(data).u16(*pad);
                    }
                }
            }
        }
        w.out
    }
}

enum Item {
    Frame {
        bytes: Vec<u8>,
        vlan: Option<VlanTag>,
    },
    Fail(u8),
}

/// A packet socket as the datapath sees it: frames written over the iovecs with the kernel's
/// header in front, truncated (and flagged) when they do not fit; more iovecs than the kernel
/// takes are refused, the frame left queued.
struct Scripted {
    hdr_len: usize,
    items: RefCell<VecDeque<Item>>,
    /// Calls refused in a row with the same item first, and the most of that seen.
    refused: Cell<u32>,
    most_refused: Cell<u32>,
}

impl FrameSource for Scripted {
    fn kernel_vnet_header_len(&self) -> usize {
        self.hdr_len
    }

    fn pending_len(&self) -> io::Result<usize> {
        Ok(match self.items.borrow().front() {
            None => 0,
            Some(Item::Frame { bytes, .. }) => bytes.len() - self.hdr_len,
            Some(Item::Fail(_)) => 1,
        })
    }

    fn take_error(&self) -> io::Result<Option<io::Error>> {
        Ok(None)
    }

    unsafe fn recv(&self, iov: &mut [iovec]) -> io::Result<RecvLen> {
        if iov.len() > UIO_MAXIOV {
            // The kernel checks the iovec count before it looks at its queue.
            self.refused.set(self.refused.get() + 1);
            self.most_refused
                .set(self.most_refused.get().max(self.refused.get()));
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        self.refused.set(0);
        let Some(item) = self.items.borrow_mut().pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let (bytes, vlan) = match item {
            Item::Fail(e) => {
                return Err(match e {
                    0 => io::ErrorKind::WouldBlock.into(),
                    1 => io::ErrorKind::Interrupted.into(),
                    2 => io::Error::from_raw_os_error(libc::ENETDOWN),
                    _ => io::Error::from_raw_os_error(libc::EINVAL),
                });
            }
            Item::Frame { bytes, vlan } => (bytes, vlan),
        };
        let room: usize = iov.iter().map(|v| v.iov_len).sum();
        if room < self.hdr_len {
            // The kernel refuses buffers shorter than its header; the packet is lost.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let slices: Vec<VolatileSlice<'_>> = iov
            .iter()
            // SAFETY: the caller guarantees every iovec is valid for writes of its length.
            .map(|v| unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) })
            .collect();
        let done = Scatter::slices(&slices).write_at(0, &bytes);
        Ok(RecvLen {
            len: bytes.len(),
            truncated: done < bytes.len(),
            vlan,
        })
    }
}

pub fn run(data: &[u8]) {
    run_input(&RxInput::parse(data));
}

/// Runs the passes and checks them; returns the pair's counters.
pub fn run_input(input: &RxInput) -> PairStats {
    let features = Negotiated::new(input.features);
    let hdr_len = features.header_len();
    let mergeable = features.mrg_rxbuf();
    // The socket's header length follows the guest's, except on a kernel without
    // PACKET_VNET_HDR_SZ, where it is 10 whatever the guest uses.
    let kernel_hdr = if input.legacy_kernel_hdr { 10 } else { hdr_len };
    let size = 1u16 << input.queue_log2;

    let mut guest = Guest::for_input(
        input
            .rounds
            .iter()
            .flat_map(|r| &r.chains)
            .flat_map(|c| &c.lens)
            .map(|&l| u64::from(l)),
        size,
        input.start,
        input.avail_flags,
        input.used_event,
        Access::DeviceWrites,
    );
    let (buf_start, buf_end) = (guest.buf_start, guest.buf_end);

    let source = Scripted {
        hdr_len: kernel_hdr,
        items: RefCell::new(VecDeque::new()),
        refused: Cell::new(0),
        most_refused: Cell::new(0),
    };
    let mut rx = RxPath::default();
    let mut stats = PairStats::default();
    let mut packets = 0u64;
    // Used (head, length) over all passes, and the accepted chains used, in order.
    let mut used_all: Vec<(u16, u32)> = Vec::new();
    let mut used_accepted: Vec<u16> = Vec::new();

    for round in &input.rounds {
        let from = guest.posted.len();
        for spec in &round.chains {
            if !guest.post(spec) {
                break;
            }
        }
        guest.publish(from, hdr_len);
        for f in &round.frames {
            source.items.borrow_mut().push_back(match f {
                FrameSpec::Fail(e) => Item::Fail(*e),
                FrameSpec::Frame {
                    header,
                    vlan,
                    data,
                    pad,
                } => {
                    let mut bytes = header[..kernel_hdr].to_vec();
                    bytes.extend_from_slice(data);
                    let n = data.len();
                    bytes.extend((n..n + usize::from(*pad)).map(|i| (i * 7 + i / 251) as u8));
                    Item::Frame {
                        bytes,
                        vlan: vlan.map(|(tpid, tci)| VlanTag { tpid, tci }),
                    }
                }
            });
        }

        let fixed = fixed_areas(&guest);
        let next_avail = guest.queue.next_avail();
        let next_used = guest.queue.next_used();
        let pass = rx.process(&mut RxContext {
            queue: &mut guest.queue,
            mem: &guest.m.mem,
            socket: &source,
            features,
            stats: &mut stats,
            look_first: input.look_first,
        });
        assert_eq!(
            fixed_areas(&guest),
            fixed,
            "the device wrote to a table or avail ring"
        );
        assert!(
            source.most_refused.get() <= MAX_REFUSALS,
            "a frame refused {} times in a row (more than {UIO_MAXIOV} iovecs): RX retries it \
             without end",
            source.most_refused.get()
        );

        // What the pass consumed and returned.
        let consumed_n = guest.queue.next_avail().wrapping_sub(next_avail);
        let first = usize::from(next_avail.wrapping_sub(input.start));
        let seen = pass.avail_seen.wrapping_sub(next_avail);
        assert!(consumed_n <= seen, "gave back chains it had not taken");
        assert!(
            usize::from(seen) <= guest.posted.len() - first,
            "took chains not posted"
        );
        let consumed = &guest.posted[first..first + usize::from(consumed_n)];
        let used_idx: u16 = guest.m.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, guest.queue.next_used(), "used.idx not published");
        let n = used_idx.wrapping_sub(next_used);
        assert!(n <= size, "{n} used elements from a ring of {size}");
        let elems: Vec<(u32, u32)> = (0..n)
            .map(|i| {
                let slot = u64::from(next_used.wrapping_add(i) % size);
                let at = USED + 4 + 8 * slot;
                let id: u32 = guest.m.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = guest.m.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect();

        let mut outstanding: HashMap<u16, &Posted> = consumed
            .iter()
            .filter(|p| p.head < size)
            .map(|p| (p.head, p))
            .collect();
        let mut entries = Vec::new();
        for &(id, len) in &elems {
            assert!(id < u32::from(size), "used element names descriptor {id}");
            let p = outstanding
                .remove(&(id as u16))
                .unwrap_or_else(|| panic!("used element {id} is not a chain this pass took"));
            match p.capacity {
                None => assert_eq!(len, 0, "refused chain {id} returned with length {len}"),
                Some(cap) => {
                    assert!(len > 0, "accepted chain {id} returned empty");
                    assert!(len <= cap, "chain {id}: used {len} of {cap} bytes");
                }
            }
            entries.push((p, len));
            used_all.push((id as u16, len));
        }
        let mut lost: Vec<u16> = outstanding.keys().copied().collect();
        lost.sort_unstable();
        assert!(lost.is_empty(), "chains taken but never returned: {lost:?}");

        // Accepted chains are used in avail order.
        used_accepted.extend(
            entries
                .iter()
                .filter(|(p, _)| p.capacity.is_some())
                .map(|(p, _)| p.head),
        );
        let accepted: Vec<u16> = guest
            .posted
            .iter()
            .filter(|p| p.capacity.is_some())
            .map(|p| p.head)
            .collect();
        assert!(
            accepted.starts_with(&used_accepted),
            "chains used out of order: {used_accepted:?}, posted {accepted:?}"
        );

        // Packets: adjacent elements, counted by num_buffers.
        let mut i = 0;
        while i < entries.len() {
            let (p, len) = entries[i];
            if len == 0 {
                i += 1;
                continue;
            }
            let header = guest.read_chain(p, hdr_len);
            check_header(&header, features);
            let nb = if hdr_len == 12 {
                let nb = usize::from(u16::from_le_bytes([header[10], header[11]]));
                if !mergeable {
                    assert_eq!(nb, 1, "num_buffers without MRG_RXBUF");
                }
                nb
            } else {
                1
            };
            assert!(nb >= 1 && i + nb <= entries.len(), "num_buffers {nb}");
            let mut total = 0usize;
            for (j, &(q, l)) in entries[i..i + nb].iter().enumerate() {
                assert!(l > 0, "a packet's buffers are adjacent");
                if j + 1 < nb {
                    assert_eq!(
                        Some(l),
                        q.capacity,
                        "only a packet's last buffer is partial"
                    );
                }
                total += l as usize;
            }
            assert!(total >= hdr_len + 12, "a {total}-byte packet");
            packets += 1;
            i += nb;
        }
        assert_eq!(stats.rx_packets, packets, "rx_packets");
    }

    check_untouched(&guest, &used_all);
    // What the next run must zero: the rings and tables, the buffers and a page after them.
    let dirty = [(0, BUFFERS), (buf_start, (buf_end + PAGE).min(MEM_END))];
    MEMORY.with(|c| *c.borrow_mut() = Some((guest.m, dirty)));
    stats
}

/// A packet's virtio header says only what the guest negotiated, and was written at all.
fn check_header(header: &[u8], features: Negotiated) {
    let h = NetHeader::new_checked(header, header.len()).expect("header length");
    let flags = h.flags();
    assert_eq!(
        flags & !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID),
        0,
        "header flags {flags:#x}"
    );
    if !features.guest_csum() {
        assert_eq!(flags, 0, "checksum flags for a guest without GUEST_CSUM");
    }
    if flags == 0 {
        assert_eq!(
            (h.csum_start(), h.csum_offset()),
            (0, 0),
            "stale csum fields"
        );
    }
    let kind = h.gso_kind();
    if kind != GsoKind::None {
        assert!(
            features.guest_csum() && features.guest_accepts_gso(kind, h.gso_ecn()),
            "gso_type {:#x} the guest did not negotiate",
            h.gso_type()
        );
        if kind == GsoKind::UdpL4 {
            assert!(features.guest_accepts_uso(false) || features.guest_accepts_uso(true));
        }
    }
}

/// Nothing the guest has not been handed shows in its buffers: bytes of accepted chains past
/// their used lengths (or of chains not used at all) are poison or zero (the device zeroes
/// what it received for a frame it then drops), every other byte of the buffer area (guards,
/// refused chains) is still poison, and past the last posted buffer still zero.
fn check_untouched(g: &Guest, used: &[(u16, u32)]) {
    // The buffers and a page after them.
    let (start, end) = (g.buf_start, (g.buf_end + PAGE).min(MEM_END));
    // (address, level, +1/-1): level 1 for the bytes of accepted chains (poison or zero),
    // 2 for used lengths (anything); elsewhere bytes must be as posted.
    let mut events: Vec<(u64, usize, i32)> = Vec::new();
    let mut mark = |ranges: Vec<(u64, usize)>, level: usize| {
        for (addr, n) in ranges {
            events.push((addr, level, 1));
            events.push((addr + n as u64, level, -1));
        }
    };
    for p in g.posted.iter().filter(|p| p.capacity.is_some()) {
        mark(g.chain_bytes(p, usize::MAX), 1);
    }
    let by_head: HashMap<u16, &Posted> = g
        .posted
        .iter()
        .filter(|p| p.head < g.size)
        .map(|p| (p.head, p))
        .collect();
    for &(head, len) in used {
        mark(g.chain_bytes(by_head[&head], len as usize), 2);
    }
    // Everything the checks distinguish changes at these addresses.
    events.push((start, 0, 0));
    events.push((end, 0, 0));
    events.push((g.next_buf.clamp(start, end), 0, 0));
    events.push((REGION_SPLIT.clamp(start, end), 0, 0));
    events.sort_unstable();
    let mut depth = [0i32; 3];
    for (i, &(at, level, delta)) in events.iter().enumerate() {
        depth[level] += delta;
        let Some(&(next, _, _)) = events.get(i + 1) else {
            break;
        };
        let (lo, hi) = (at.max(start), next.min(end));
        if lo >= hi || depth[2] > 0 {
            continue;
        }
        let want = if lo < g.next_buf { POISON } else { 0 };
        let bytes = g.m.bytes(lo, hi);
        let ok = if depth[1] > 0 {
            all_eq(bytes, want) || all_eq(bytes, 0) || bytes.iter().all(|&b| b == want || b == 0)
        } else {
            all_eq(bytes, want)
        };
        if !ok {
            let (k, b) = bytes
                .iter()
                .enumerate()
                .find(|&(_, &b)| b != want && (depth[1] == 0 || b != 0))
                .map(|(k, &b)| (k, b))
                .unwrap();
            panic!(
                "guest byte {:#x} is {b:#04x}: written {}",
                lo + k as u64,
                if depth[1] == 0 {
                    "outside every buffer the device may use"
                } else {
                    "past the used length"
                }
            );
        }
    }
}
