//! The split ring the `rx_writer` and `tx_reader` harnesses post their chains on: guest
//! memory of two regions, well-formed and malformed chains as the input describes them,
//! device-writable for RX or device-readable for TX.
//!
//! Guest memory layout: descriptor table at 0, avail ring at 0x1000, used ring at 0x2000,
//! indirect tables from 0x3000; buffers (up to 352 KiB of them) each followed by a 16-byte
//! guard, centred on the region boundary so that some straddle it. Buffers are filled with a
//! poison byte when they are posted. (The mapping is reused from run to run, zeroed.)

use std::cell::RefCell;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use vhost_packet::virtio::chain::{self, Access, QueueGeometry};

use crate::chain::Memory;

pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const INDIRECT: u64 = 0x3000;
pub const INDIRECT_END: u64 = 0x8000;
/// Where the buffer area may start; it is centred on the region boundary.
pub const BUFFERS: u64 = 0x8000;
/// The most buffer space an input gets.
pub const BUF_MAX: u64 = 0x58000;
pub const PAGE: u64 = 0x1000;
/// The boundary between the two guest memory regions.
pub const REGION_SPLIT: u64 = BUFFERS + BUF_MAX / 2;
/// The end of guest memory.
pub const MEM_END: u64 = BUFFERS + BUF_MAX + PAGE;

/// Guest memory, reused from run to run (page faults are most of the cost of a fresh
/// mapping), and the ranges the last run may have touched, which the next one zeroes.
pub type MemoryCache = Option<(Memory, [(u64, u64); 2])>;

thread_local! {
    pub static MEMORY: RefCell<MemoryCache> = const { RefCell::new(None) };
}

/// Guest memory as a fresh mapping would be (all zero).
pub fn take_memory() -> Memory {
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

pub const GUARD: u64 = 16;
pub const POISON: u8 = 0xa5;
/// Where an out-of-memory descriptor points.
pub const NOWHERE: u64 = 1 << 32;
pub const MAX_QUEUE: u16 = 256;

/// What a posted chain looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainKind {
    /// Well-formed descriptors, device-writable for RX, device-readable for TX (kinds 0 and 1).
    Direct,
    /// Well-formed, through an indirect table (2).
    Indirect,
    /// The last descriptor goes the wrong way: device-readable for RX, device-writable for
    /// TX (3).
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
    pub fn from_bits(b: u8) -> ChainKind {
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

    pub fn bits(self) -> u8 {
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

/// One avail ring entry the harness posted.
#[derive(Clone, Debug)]
pub struct Posted {
    pub head: u16,
    /// The descriptors virtio-queue yields for it.
    pub descs: Vec<Descriptor>,
    /// The chain's length, if `resolve_from_queue` accepts it (for RX: as a buffer of at least
    /// a header's worth).
    pub capacity: Option<u32>,
}

pub struct Guest {
    pub m: Memory,
    pub queue: Queue,
    pub size: u16,
    pub start: u16,
    pub next_desc: u16,
    pub next_indirect: u64,
    pub next_buf: u64,
    /// End of the buffer area.
    pub buf_end: u64,
    /// Start of the buffer area.
    pub buf_start: u64,
    /// Avail index (what `avail.idx` says).
    pub avail: u16,
    pub posted: Vec<Posted>,
    pub full: bool,
    /// Which way the chains go.
    pub access: Access,
}

impl Guest {
    /// The ring a harness input asks for: `size` entries from index `start`, a buffer area
    /// as large as the buffers of `lens` may need (scanning it is much of the cost of a run)
    /// and centred on the region boundary, so that buffers straddle it; the avail flags, the
    /// used index and `used_event` written as the input says.
    pub fn for_input(
        lens: impl Iterator<Item = u64>,
        size: u16,
        start: u16,
        avail_flags: u16,
        used_event: u16,
        access: Access,
    ) -> Guest {
        let need: u64 = lens
            .map(|l| l.next_multiple_of(16) + GUARD)
            .sum::<u64>()
            .min(BUF_MAX);
        let buf_start = (REGION_SPLIT - need / 2) / 16 * 16;
        let guest = Guest::new(
            take_memory(),
            size,
            start,
            (buf_start, buf_start + need),
            access,
        );
        let mem = &guest.m.mem;
        mem.write_obj(avail_flags, GuestAddress(AVAIL)).unwrap();
        mem.write_obj(start, GuestAddress(USED + 2)).unwrap();
        // used_event, after the avail ring.
        mem.write_obj(used_event, GuestAddress(AVAIL + 4 + 2 * u64::from(size)))
            .unwrap();
        guest
    }

    /// A ring of `size` entries whose indices start at `start`, with buffers in
    /// `buf_start..buf_end` of `m`.
    pub fn new(m: Memory, size: u16, start: u16, buf: (u64, u64), access: Access) -> Guest {
        Guest {
            m,
            queue: new_queue(size, start),
            size,
            start,
            next_desc: 0,
            next_indirect: INDIRECT,
            next_buf: buf.0,
            buf_end: buf.1,
            buf_start: buf.0,
            avail: start,
            posted: Vec::new(),
            full: false,
            access,
        }
    }

    pub fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.m.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// A fresh buffer of `len` bytes, poisoned, followed by a guard; `None` when the buffer
    /// area is full.
    pub fn buffer(&mut self, len: u16) -> Option<u64> {
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
    pub fn post(&mut self, spec: &ChainSpec) -> bool {
        if self.full || self.posted.len() >= usize::from(self.size) {
            return false;
        }
        let n = spec.lens.len() as u16;
        let head = self.next_desc;
        let write: u16 = if self.access == Access::DeviceWrites {
            2
        } else {
            0
        };
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
                    let flags = write | if last { 0 } else { NEXT };
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
                    let mut flags = write | if last { 0 } else { NEXT };
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
                        flags ^= 2;
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
    pub fn publish(&mut self, from: usize, hdr_len: usize) {
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
                self.access,
                &mut arena,
            );
            p.capacity = match resolved {
                Ok(c) if c.len as usize >= hdr_len && p.head < self.size => Some(c.len),
                _ => None,
            };
            if p.capacity.is_some() {
                // `chain` checks resolution in depth; here only that it is plausible.
                for d in &p.descs {
                    assert_eq!(d.is_write_only(), self.access == Access::DeviceWrites);
                    assert!(self.m.pieces(d.addr().0, u64::from(d.len())).1 || d.len() == 0);
                }
            }
        }
    }

    /// The guest addresses of chain bytes [0, len).
    pub fn chain_bytes(&self, p: &Posted, len: usize) -> Vec<(u64, usize)> {
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

    pub fn read_chain(&self, p: &Posted, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (addr, n) in self.chain_bytes(p, len) {
            let mut b = vec![0u8; n];
            self.m.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
        }
        out
    }
}

pub fn new_queue(size: u16, next: u16) -> Queue {
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

/// The descriptor table, the avail ring and the indirect tables.
pub fn fixed_areas(g: &Guest) -> Vec<u8> {
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
