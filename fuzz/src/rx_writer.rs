//! `rx_writer`: `RxPath::process`, the code that writes into guest RX buffers, driven in-process
//! by a scripted `FrameSource` against a split ring in guest memory, with any negotiated
//! features. Frames (vnet header, bytes, a stripped VLAN tag, socket errors) and guest chains
//! (sizes, count, malformed ones) come from the input, over up to three passes (chains and
//! frames added before each, so segments left waiting for buffers are exercised).
//!
//! Guest memory is two regions. Descriptor table at 0, avail ring at 0x1000, used ring at
//! 0x2000, indirect tables from 0x3000; buffers (up to 352 KiB of them) each followed by a
//! 16-byte guard, centred on the region boundary so that some straddle it. Buffers are filled
//! with a poison byte before they are posted. (The mapping is reused from run to run, zeroed.)
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
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, VolatileSlice};

use vhost_packet::datapath::rx::{FrameSource, RxContext, RxPath, MAX_REFUSALS};
use vhost_packet::packet::socket::{RecvLen, VlanTag, UIO_MAXIOV};
use vhost_packet::stats::PairStats;
use vhost_packet::virtio::chain::{self, Access, QueueGeometry, Scatter};
use vhost_packet::virtio::features::Negotiated;
use vhost_packet::virtio::header::{GsoKind, NetHeader, FLAG_DATA_VALID, FLAG_NEEDS_CSUM};

use crate::chain::{all_eq, Memory};
use crate::input::{Reader, Writer};

pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const INDIRECT: u64 = 0x3000;
pub const INDIRECT_END: u64 = 0x8000;
/// Where the buffer area may start; it is centred on the region boundary.
pub const BUFFERS: u64 = 0x8000;
/// The most buffer space an input gets.
pub const BUF_MAX: u64 = 0x58000;
const PAGE: u64 = 0x1000;
/// The boundary between the two guest memory regions.
const REGION_SPLIT: u64 = BUFFERS + BUF_MAX / 2;
/// The end of guest memory.
const MEM_END: u64 = BUFFERS + BUF_MAX + PAGE;

/// Guest memory, reused from run to run (page faults are most of the cost of a fresh
/// mapping), and the ranges the last run may have touched, which the next one zeroes.
type MemoryCache = Option<(Memory, [(u64, u64); 2])>;

thread_local! {
    static MEMORY: RefCell<MemoryCache> = const { RefCell::new(None) };
}

/// Guest memory as a fresh mapping would be (all zero).
fn take_memory() -> Memory {
    let (m, dirty) = MEMORY.with(|c| c.borrow_mut().take()).unwrap_or_else(|| {
        let m = Memory::new(&[
            (0, REGION_SPLIT as usize),
            (REGION_SPLIT, (MEM_END - REGION_SPLIT) as usize),
        ]);
        (m, [(0, 0); 2])
    });
    for (from, to) in dirty {
        m.fill(from, to, 0);
    }
    m
}

const GUARD: u64 = 16;
const POISON: u8 = 0xa5;
/// Where an out-of-memory descriptor points.
const NOWHERE: u64 = 1 << 32;
const MAX_QUEUE: u16 = 256;

/// What a posted chain looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainKind {
    /// Well-formed, write-only descriptors (kinds 0 and 1).
    Direct,
    /// Well-formed, through an indirect table (2).
    Indirect,
    /// The last descriptor is device-readable (3).
    ReadOnly,
    /// The last descriptor points outside guest memory (4).
    OutOfMemory,
    /// The last descriptor says NEXT: back to the head (a loop) with an even descriptor count,
    /// to a descriptor outside the table with an odd one (5).
    Unterminated,
    /// An indirect descriptor whose length is not a whole number of descriptors (6).
    BadIndirect,
    /// The avail ring names a descriptor outside the table (7).
    HeadOutOfRange,
}

impl ChainKind {
    fn from_bits(b: u8) -> ChainKind {
        match b & 7 {
            0 | 1 => ChainKind::Direct,
            2 => ChainKind::Indirect,
            3 => ChainKind::ReadOnly,
            4 => ChainKind::OutOfMemory,
            5 => ChainKind::Unterminated,
            6 => ChainKind::BadIndirect,
            _ => ChainKind::HeadOutOfRange,
        }
    }

    fn bits(self) -> u8 {
        match self {
            ChainKind::Direct => 0,
            ChainKind::Indirect => 2,
            ChainKind::ReadOnly => 3,
            ChainKind::OutOfMemory => 4,
            ChainKind::Unterminated => 5,
            ChainKind::BadIndirect => 6,
            ChainKind::HeadOutOfRange => 7,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSpec {
    pub kind: ChainKind,
    /// 1 to 4 descriptor lengths, or 16 times that.
    pub lens: Vec<u16>,
}

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

/// One avail ring entry the harness posted.
#[derive(Clone, Debug)]
struct Posted {
    head: u16,
    /// The descriptors virtio-queue yields for it.
    descs: Vec<Descriptor>,
    /// Bytes the device may fill, if `resolve_from_queue` accepts the chain as an RX buffer
    /// (at least a header's worth).
    capacity: Option<u32>,
}

struct Guest {
    m: Memory,
    queue: Queue,
    size: u16,
    start: u16,
    next_desc: u16,
    next_indirect: u64,
    next_buf: u64,
    /// End of the buffer area.
    buf_end: u64,
    /// Start of the buffer area.
    buf_start: u64,
    /// Avail index (what `avail.idx` says).
    avail: u16,
    posted: Vec<Posted>,
    full: bool,
}

impl Guest {
    fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.m.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// A fresh buffer of `len` bytes, poisoned, followed by a guard; `None` when the buffer
    /// area is full.
    fn buffer(&mut self, len: u16) -> Option<u64> {
        let addr = self.next_buf;
        let end = (addr + u64::from(len)).next_multiple_of(16) + GUARD;
        if end > self.buf_end {
            return None;
        }
        assert!(
            self.m.all(addr, end, 0),
            "the device wrote to memory the guest had not posted"
        );
        self.m.fill(addr, end, POISON);
        self.next_buf = end;
        Some(addr)
    }

    /// Posts one chain; false when the ring, table or buffer area is full.
    fn post(&mut self, spec: &ChainSpec) -> bool {
        if self.full || self.posted.len() >= usize::from(self.size) {
            return false;
        }
        let n = spec.lens.len() as u16;
        let head = self.next_desc;
        const W: u16 = 2;
        const NEXT: u16 = 1;
        const IND: u16 = 4;
        let avail_head = match spec.kind {
            ChainKind::HeadOutOfRange => self.size + spec.lens[0] % 100,
            ChainKind::Indirect | ChainKind::BadIndirect => {
                let table = self.next_indirect;
                if head >= self.size || table + 16 * u64::from(n) > INDIRECT_END {
                    self.full = true;
                    return false;
                }
                for (j, &len) in spec.lens.iter().enumerate() {
                    let Some(addr) = self.buffer(len) else {
                        self.full = true;
                        return false;
                    };
                    let last = j + 1 == spec.lens.len();
                    let flags = W | if last { 0 } else { NEXT };
                    self.write_desc(
                        table + 16 * j as u64,
                        addr,
                        u32::from(len),
                        flags,
                        j as u16 + 1,
                    );
                }
                let mut table_len = 16 * u32::from(n);
                if spec.kind == ChainKind::BadIndirect {
                    table_len += 8;
                }
                self.write_desc(DESC + 16 * u64::from(head), table, table_len, IND, 0);
                self.next_indirect = table + 16 * u64::from(n);
                self.next_desc += 1;
                head
            }
            _ => {
                if self.next_desc + n > self.size {
                    self.full = true;
                    return false;
                }
                for (j, &len) in spec.lens.iter().enumerate() {
                    let last = j + 1 == spec.lens.len();
                    let slot = head + j as u16;
                    let mut flags = W | if last { 0 } else { NEXT };
                    let mut next = slot + 1;
                    let addr = if last && spec.kind == ChainKind::OutOfMemory {
                        NOWHERE
                    } else {
                        let Some(a) = self.buffer(len) else {
                            self.full = true;
                            return false;
                        };
                        a
                    };
                    if last && spec.kind == ChainKind::ReadOnly {
                        flags &= !W;
                    }
                    if last && spec.kind == ChainKind::Unterminated {
                        flags |= NEXT;
                        next = if n & 1 == 0 { head } else { u16::MAX };
                    }
                    self.write_desc(
                        DESC + 16 * u64::from(slot),
                        addr,
                        u32::from(len),
                        flags,
                        next,
                    );
                }
                self.next_desc += n;
                head
            }
        };
        let slot = u64::from(self.avail % self.size);
        self.m
            .mem
            .write_obj(avail_head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.posted.push(Posted {
            head: avail_head,
            descs: Vec::new(),
            capacity: None,
        });
        true
    }

    /// Publishes the avail index and works out, with a queue of its own, what the device will
    /// see for each new entry.
    fn publish(&mut self, from: usize, hdr_len: usize) {
        self.m
            .mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
        let mut shadow = new_queue(self.size, self.start.wrapping_add(from as u16));
        let mut arena = Vec::new();
        for p in &mut self.posted[from..] {
            let dc = shadow
                .pop_descriptor_chain(&self.m.mem)
                .expect("posted entry");
            assert_eq!(dc.head_index(), p.head);
            p.descs = dc.clone().collect();
            let resolved = chain::resolve_from_queue(
                &self.m.mem,
                QueueGeometry {
                    desc_table: GuestAddress(DESC),
                    size: self.size,
                },
                p.head,
                p.descs.iter().copied(),
                Access::DeviceWrites,
                &mut arena,
            );
            p.capacity = match resolved {
                Ok(c) if c.len as usize >= hdr_len && p.head < self.size => Some(c.len),
                _ => None,
            };
            if p.capacity.is_some() {
                // `chain` checks resolution in depth; here only that it is plausible.
                for d in &p.descs {
                    assert!(d.is_write_only());
                    assert!(self.m.pieces(d.addr().0, u64::from(d.len())).1 || d.len() == 0);
                }
            }
        }
    }

    /// The guest addresses of chain bytes [0, len).
    fn chain_bytes(&self, p: &Posted, len: usize) -> Vec<(u64, usize)> {
        let mut out = Vec::new();
        let mut left = len;
        for d in &p.descs {
            if left == 0 {
                break;
            }
            let take = left.min(d.len() as usize);
            if take > 0 {
                out.push((d.addr().0, take));
            }
            left -= take;
        }
        out
    }

    fn read_chain(&self, p: &Posted, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (addr, n) in self.chain_bytes(p, len) {
            let mut b = vec![0u8; n];
            self.m.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
        }
        out
    }
}

fn new_queue(size: u16, next: u16) -> Queue {
    let mut q = Queue::new(MAX_QUEUE).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_next_avail(next);
    q.set_next_used(next);
    q.set_ready(true);
    assert_eq!(q.size(), size);
    q
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

    // The buffer area is as large as the buffers this input may post (scanning it is much of
    // the cost of a run) and centred on the region boundary, so that buffers straddle it.
    let need: u64 = input
        .rounds
        .iter()
        .flat_map(|r| &r.chains)
        .flat_map(|c| &c.lens)
        .map(|&l| u64::from(l).next_multiple_of(16) + GUARD)
        .sum::<u64>()
        .min(BUF_MAX);
    let buf_start = (REGION_SPLIT - need / 2) / 16 * 16;
    let buf_end = buf_start + need;
    let m = take_memory();
    let mut guest = Guest {
        m,
        queue: new_queue(size, input.start),
        size,
        start: input.start,
        next_desc: 0,
        next_indirect: INDIRECT,
        next_buf: buf_start,
        buf_end,
        buf_start,
        avail: input.start,
        posted: Vec::new(),
        full: false,
    };
    let mem = &guest.m.mem;
    mem.write_obj(input.avail_flags, GuestAddress(AVAIL))
        .unwrap();
    mem.write_obj(input.start, GuestAddress(USED + 2)).unwrap();
    // used_event, after the avail ring.
    mem.write_obj(
        input.used_event,
        GuestAddress(AVAIL + 4 + 2 * u64::from(size)),
    )
    .unwrap();

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

/// The descriptor table, the avail ring and the indirect tables.
fn fixed_areas(g: &Guest) -> Vec<u8> {
    let size = u64::from(g.size);
    let mut out = Vec::new();
    for (from, to) in [
        (DESC, DESC + 16 * size),
        (AVAIL, AVAIL + 6 + 2 * size),
        (INDIRECT, g.next_indirect),
    ] {
        let mut v = vec![0u8; (to - from) as usize];
        g.m.mem.read_slice(&mut v, GuestAddress(from)).unwrap();
        out.extend_from_slice(&v);
    }
    out
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
