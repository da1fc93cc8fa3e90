//! `chain`: descriptor chains from a guest-written split ring, resolved to iovecs
//! (`chain::resolve` and `chain::resolve_from_queue`, both directions), then used through
//! `Scatter` and `carve`.
//!
//! Guest memory is one region [0, 0x2000) or two (the second adjacent at 0x2000 or after a gap
//! at 0x3000, 0x2000 bytes). The descriptor table is at 0, the avail ring at 0x200, the used ring
//! at 0x300 and a table of descriptors the input may point indirect descriptors at at 0x500.
//!
//! Input:
//!
//! | field | bytes | meaning |
//! |---|---|---|
//! | cfg | 1 | bits 0-2: queue size 2^(n mod 6); bit 3: second region; bit 4: it is adjacent |
//! | start | 2 | the queue's `next_avail` (wrap-around) |
//! | count | 1 | chains the avail index announces (more than the queue size is an error) |
//! | heads | size | avail ring entries, one byte each (values >= size are invalid heads) |
//! | table | 8 x size | the descriptor table, encoded as below |
//! | indirect | 1 + 8 x n | n mod 33 descriptors at 0x500 |
//! | ops | 8 each, rest | operations on the resolved chains, see [`op`] |
//!
//! A descriptor is 8 bytes: addr (2), len (2), flags (1, raw), next (1), mode (1), spare (1).
//! `mode` bits 0-1 pick the address: addr, u64::MAX - addr, 4 GiB + addr, addr * 16; bits 2-3
//! the length: len, u32::MAX - len, len * 256, len mod 256.
//!
//! Checks: `resolve` agrees with a model walk of the descriptors (more than the queue size,
//! first wrong direction, first address outside memory, too many segments, last descriptor
//! still saying NEXT, empty), and `resolve_from_queue` agrees with `resolve` but for an indirect
//! head that also says NEXT, which it refuses; a resolved chain's iovecs are exactly the
//! descriptors' guest ranges, split at region boundaries, so every one lies in guest memory; a
//! failed resolution leaves the arena as it was. `Scatter` reads, writes, shifts and chunks agree
//! with a flat model of the chain's bytes and never change guest memory outside the chain;
//! `carve` only produces pieces of its input and covers what it says.

use libc::iovec;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use vhost_packet::virtio::chain::{
    self, Access, Chain, ChainError, QueueGeometry, Scatter, MAX_SEGMENTS,
};

use crate::input::Reader;

pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x200;
pub const USED: u64 = 0x300;
pub const INDIRECT: u64 = 0x500;
pub const REGION_LEN: usize = 0x2000;
const MAX_QUEUE: u16 = 32;
const MAX_CHAINS: usize = 64;
const MAX_OPS: usize = 64;

pub const F_NEXT: u8 = 1;
pub const F_WRITE: u8 = 2;
pub const F_INDIRECT: u8 = 4;

/// Guest memory of each layout (its (start, length) ranges) seen so far.
type MemoryCache = Vec<(Vec<(u64, usize)>, std::rc::Rc<Memory>)>;

thread_local! {
    static MEMORY: std::cell::RefCell<MemoryCache> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Guest memory and where each region is mapped in this process.
pub struct Memory {
    pub mem: GuestMemoryMmap,
    /// (guest start, host start, length)
    pub regions: Vec<(u64, usize, usize)>,
}

impl Memory {
    pub fn new(ranges: &[(u64, usize)]) -> Memory {
        let spec: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&spec).expect("guest memory");
        let regions = ranges
            .iter()
            .map(|&(a, l)| {
                let host = mem.get_host_address(GuestAddress(a)).expect("mapped") as usize;
                (a, host, l)
            })
            .collect();
        Memory { mem, regions }
    }

    /// The guest address of host range [host, host + len), if it lies inside one region.
    pub fn guest_of(&self, host: usize, len: usize) -> Option<u64> {
        self.regions.iter().find_map(|&(g, h, l)| {
            (host >= h && host.checked_add(len)? <= h + l).then(|| g + (host - h) as u64)
        })
    }

    /// [addr, addr + len) split at region boundaries, and whether all of it is memory.
    pub fn pieces(&self, addr: u64, len: u64) -> (Vec<(u64, usize)>, bool) {
        let mut out = Vec::new();
        let Some(end) = addr.checked_add(len) else {
            // vm-memory refuses a range that wraps before looking at regions.
            return (out, false);
        };
        let mut at = addr;
        while at < end {
            let Some(&(g, _, l)) = self
                .regions
                .iter()
                .find(|&&(g, _, l)| at >= g && at < g + l as u64)
            else {
                return (out, false);
            };
            let take = (end.min(g + l as u64) - at) as usize;
            out.push((at, take));
            at += take as u64;
        }
        (out, true)
    }

    /// Sets guest range [from, to) to `byte` (parts outside memory are ignored).
    pub fn fill(&self, from: u64, to: u64, byte: u8) {
        for &(g, h, l) in &self.regions {
            let (a, b) = (from.max(g), to.min(g + l as u64));
            if a < b {
                // SAFETY: [a, b) lies inside this region, mapped at `h` for `l` bytes for as
                // long as `self.mem` lives; nothing else accesses it meanwhile.
                unsafe {
                    std::ptr::write_bytes((h + (a - g) as usize) as *mut u8, byte, (b - a) as usize)
                };
            }
        }
    }

    /// Whether every byte of guest range [from, to) that is memory is `byte`.
    pub fn all(&self, from: u64, to: u64, byte: u8) -> bool {
        self.regions.iter().all(|&(g, _, l)| {
            let (a, b) = (from.max(g), to.min(g + l as u64));
            a >= b || all_eq(self.bytes(a, b), byte)
        })
    }

    /// The bytes of guest range [from, to), which must lie inside one region.
    pub fn bytes(&self, from: u64, to: u64) -> &[u8] {
        let &(g, h, _) = self
            .regions
            .iter()
            .find(|&&(g, _, l)| from >= g && to <= g + l as u64)
            .expect("range inside one region");
        // SAFETY: the range lies inside this region, mapped for as long as `self.mem` lives;
        // the caller reads it while nothing writes guest memory.
        unsafe {
            std::slice::from_raw_parts((h + (from - g) as usize) as *const u8, (to - from) as usize)
        }
    }

    /// Copies of every region.
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.regions
            .iter()
            .map(|&(g, _, l)| {
                let mut v = vec![0u8; l];
                self.mem
                    .read_slice(&mut v, GuestAddress(g))
                    .expect("region");
                v
            })
            .collect()
    }
}

/// Whether every byte of `s` is `byte`, compared a block at a time (per-byte comparisons are
/// traced by the fuzzer's instrumentation, which makes them slow).
pub fn all_eq(s: &[u8], byte: u8) -> bool {
    let block = [byte; 256];
    s.chunks(block.len()).all(|c| c == &block[..c.len()])
}

/// One encoded descriptor (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u16,
    pub len: u16,
    pub flags: u8,
    pub next: u8,
    pub mode: u8,
}

impl Desc {
    pub fn read(r: &mut Reader<'_>) -> Desc {
        let d = Desc {
            addr: r.u16(),
            len: r.u16(),
            flags: r.u8(),
            next: r.u8(),
            mode: r.u8(),
        };
        r.u8();
        d
    }

    pub fn encode(&self, w: &mut crate::input::Writer) {
        w.u16(self.addr)
            .u16(self.len)
            .u8(self.flags)
            .u8(self.next)
            .u8(self.mode)
            .u8(0);
    }

    /// The 16 bytes the device reads.
    pub fn raw(&self) -> [u8; 16] {
        let a = u64::from(self.addr);
        let addr = match self.mode & 3 {
            0 => a,
            1 => u64::MAX - a,
            2 => (1 << 32) + a,
            _ => a * 16,
        };
        let l = u32::from(self.len);
        let len = match (self.mode >> 2) & 3 {
            0 => l,
            1 => u32::MAX - l,
            2 => l * 256,
            _ => l % 256,
        };
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&addr.to_le_bytes());
        out[8..12].copy_from_slice(&len.to_le_bytes());
        out[12..14].copy_from_slice(&u16::from(self.flags).to_le_bytes());
        out[14..16].copy_from_slice(&u16::from(self.next).to_le_bytes());
        out
    }
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let cfg = r.u8();
    let size = 1u16 << ((cfg & 7) % 6);
    let start = r.u16();
    let count = r.u8();
    let heads = r.bytes(usize::from(size)).to_vec();
    let table: Vec<Desc> = (0..size).map(|_| Desc::read(&mut r)).collect();
    let n_indirect = r.u8() % 33;
    let indirect: Vec<Desc> = (0..n_indirect).map(|_| Desc::read(&mut r)).collect();

    let mut ranges = vec![(0u64, REGION_LEN)];
    if cfg & 8 != 0 {
        let at = if cfg & 16 != 0 { 0x2000 } else { 0x3000 };
        ranges.push((at, REGION_LEN));
    }
    // Each layout is mapped once per process (page faults are much of the cost of a fresh
    // mapping) and fully rewritten for every run: recognisable contents, so that the scatter
    // checks see something other than zeros.
    let m = MEMORY.with(|c| {
        let mut cache = c.borrow_mut();
        let i = match cache.iter().position(|(r, _)| *r == ranges) {
            Some(i) => i,
            None => {
                cache.push((ranges.clone(), std::rc::Rc::new(Memory::new(&ranges))));
                cache.len() - 1
            }
        };
        cache[i].1.clone()
    });
    let fill: Vec<u8> = (0..REGION_LEN).map(|i| (i * 7 + (i >> 8)) as u8).collect();
    for &(g, _, _) in &m.regions {
        m.mem.write_slice(&fill, GuestAddress(g)).unwrap();
    }
    for (i, d) in table.iter().enumerate() {
        m.mem
            .write_slice(&d.raw(), GuestAddress(DESC + 16 * i as u64))
            .unwrap();
    }
    for (i, d) in indirect.iter().enumerate() {
        m.mem
            .write_slice(&d.raw(), GuestAddress(INDIRECT + 16 * i as u64))
            .unwrap();
    }
    m.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    let avail_idx = start.wrapping_add(u16::from(count));
    m.mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    for i in 0..size {
        let slot = start.wrapping_add(i) % size;
        let head = u16::from(heads.get(usize::from(i)).copied().unwrap_or(0));
        m.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
    }

    let mut queue = Queue::new(MAX_QUEUE).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_next_avail(start);
    queue.set_next_used(start);
    queue.set_ready(true);
    assert_eq!(queue.size(), size);

    let mut arena: Vec<iovec> = Vec::new();
    let mut resolved: Vec<Chain> = Vec::new();
    let mut popped = 0usize;
    while popped < MAX_CHAINS {
        let Some(dc) = queue.pop_descriptor_chain(&m.mem) else {
            break;
        };
        popped += 1;
        let head = dc.head_index();
        let descs: Vec<Descriptor> = dc.clone().collect();
        // The head descriptor as the ring holds it (the iterator hides an indirect head's NEXT).
        let ring_flags = DESC
            .checked_add(16 * u64::from(head) + 12)
            .and_then(|a| m.mem.read_obj::<u16>(GuestAddress(a)).ok());
        let geometry = QueueGeometry {
            desc_table: GuestAddress(DESC),
            size,
        };
        for access in [Access::DeviceWrites, Access::DeviceReads] {
            let before = arena.len();
            let max = usize::from(size);
            let result = chain::resolve(&m.mem, head, dc.clone(), access, &mut arena, max);
            check_resolution(&m, &descs, access, head, max, before, &result, &arena);
            // The arena as it was, so that the second resolution lands where the first did.
            arena.truncate(before);
            let expect = match result {
                _ if ring_flags.is_some_and(|f| f & 5 == 5) => Err(ChainError::IndirectWithNext),
                other => other,
            };
            let from_queue =
                chain::resolve_from_queue(&m.mem, geometry, head, dc.clone(), access, &mut arena);
            assert_eq!(
                from_queue, expect,
                "resolve_from_queue, descriptors {descs:?}"
            );
            match from_queue {
                Ok(c) => resolved.push(c),
                Err(_) => assert_eq!(arena.len(), before),
            }
        }
    }
    if u16::from(count) > size {
        // virtio-queue refuses an avail index more than a ring ahead.
        assert_eq!(popped, 0);
    } else {
        assert_eq!(popped, usize::from(count));
    }
    // Going back is what the RX path does with chains it does not fill.
    for _ in 0..popped {
        queue.go_to_previous_position();
    }
    assert_eq!(queue.next_avail(), start);

    if resolved.is_empty() {
        return;
    }
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        let code = r.u8();
        let a = usize::from(r.u16());
        let b = usize::from(r.u16());
        let c = usize::from(r.u8());
        let seed = r.u16() as u8;
        let which = &resolved[usize::from(code >> 3) % resolved.len()];
        op(&m, &arena[which.iov_range()], code & 7, a, b, c, seed);
    }
}

/// What resolving `descs` must give: the model of `resolve_into`.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Ok { len: u32, pieces: Vec<(u64, usize)> },
    Err(ChainError),
}

fn model(m: &Memory, descs: &[Descriptor], access: Access, max_descriptors: usize) -> Expect {
    let wants_write = access == Access::DeviceWrites;
    let mut total: u32 = 0;
    let mut all = Vec::new();
    for (index, d) in descs.iter().enumerate() {
        if index >= max_descriptors {
            return Expect::Err(ChainError::TooLong);
        }
        if d.is_write_only() != wants_write {
            return Expect::Err(ChainError::WrongDirection {
                index: index as u16,
            });
        }
        if d.len() == 0 {
            continue;
        }
        let bad = ChainError::BadAddress {
            addr: d.addr().0,
            len: d.len(),
        };
        let Some(t) = total.checked_add(d.len()) else {
            return Expect::Err(bad);
        };
        total = t;
        let (pieces, complete) = m.pieces(d.addr().0, u64::from(d.len()));
        for p in pieces {
            if all.len() >= MAX_SEGMENTS {
                return Expect::Err(ChainError::TooManySegments);
            }
            all.push(p);
        }
        if !complete {
            return Expect::Err(bad);
        }
    }
    // virtio-queue ends a chain silently (loop, next outside the table, bad indirect table):
    // its last descriptor still says NEXT.
    if descs.last().is_some_and(|d| d.has_next()) {
        return Expect::Err(ChainError::Unterminated);
    }
    if total == 0 {
        return Expect::Err(ChainError::Empty);
    }
    Expect::Ok {
        len: total,
        pieces: all,
    }
}

#[allow(clippy::too_many_arguments)]
fn check_resolution(
    m: &Memory,
    descs: &[Descriptor],
    access: Access,
    head: u16,
    max_descriptors: usize,
    before: usize,
    result: &Result<Chain, ChainError>,
    arena: &[iovec],
) {
    let expect = model(m, descs, access, max_descriptors);
    match result {
        Ok(c) => {
            assert_eq!(c.head, head);
            assert_eq!(c.iovs.0 as usize, before);
            assert_eq!(c.iovs.1 as usize, arena.len());
            let iovs = &arena[c.iov_range()];
            assert!(iovs.len() <= MAX_SEGMENTS);
            let got: Vec<(u64, usize)> = iovs
                .iter()
                .map(|v| {
                    let g = m
                        .guest_of(v.iov_base as usize, v.iov_len)
                        .unwrap_or_else(|| panic!("iovec {v:?} is not inside guest memory"));
                    (g, v.iov_len)
                })
                .collect();
            assert_eq!(
                expect,
                Expect::Ok {
                    len: c.len,
                    pieces: got
                },
                "descriptors {descs:?}"
            );
            let sum: usize = iovs.iter().map(|v| v.iov_len).sum();
            assert_eq!(sum, c.len as usize);
        }
        Err(e) => {
            assert_eq!(arena.len(), before, "a failed resolution left iovecs");
            let _ = e.to_string();
            assert_eq!(expect, Expect::Err(*e), "descriptors {descs:?}");
        }
    }
}

/// The bytes of a view, read through its iovecs.
fn flatten(iovs: &[iovec]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in iovs {
        // SAFETY: each iovec lies inside guest memory (checked at resolution), which stays
        // mapped; the bytes are copied out at once.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
    }
    out
}

/// Whether two iovecs share a byte (a guest may point descriptors at the same memory).
fn overlapping(iovs: &[iovec]) -> bool {
    let mut r: Vec<(usize, usize)> = iovs
        .iter()
        .filter(|v| v.iov_len > 0)
        .map(|v| (v.iov_base as usize, v.iov_base as usize + v.iov_len))
        .collect();
    r.sort_unstable();
    r.windows(2).any(|w| w[1].0 < w[0].1)
}

/// Runs one operation on the view over `iovs` and checks it against a flat model.
///
/// `code`: 0 read_at(a, len b), 1 write_at(a, b bytes), 2 shift_right(a, b, by c),
/// 3 for_each_chunk(a, b), 4 carve(limit a, hole c..c + b mod 32), else len.
pub fn op(m: &Memory, iovs: &[iovec], code: u8, a: usize, b: usize, c: usize, seed: u8) {
    let view = Scatter::guest(&m.mem, iovs);
    let before = flatten(iovs);
    let total = before.len();
    assert_eq!(view.len(), total);
    assert_eq!(view.is_empty(), total == 0);
    let memory_before = m.snapshot();
    let mut model = before.clone();
    let clip = |off: usize, len: usize| off.min(total)..off.saturating_add(len).min(total);
    match code {
        0 => {
            let mut buf = vec![0xee; b];
            let n = view.read_at(a, &mut buf);
            let want = clip(a, b);
            assert_eq!(n, want.len());
            assert_eq!(buf[..n], before[want]);
            assert!(all_eq(&buf[n..], 0xee), "read_at wrote past n");
        }
        1 => {
            let buf: Vec<u8> = (0..b).map(|i| seed.wrapping_add(i as u8)).collect();
            let n = view.write_at(a, &buf);
            let want = clip(a, b);
            assert_eq!(n, want.len());
            model[want].copy_from_slice(&buf[..n]);
        }
        2 => {
            view.shift_right(a, b, c);
            // memmove, clipped to the view: bytes p in [a, a + b) with p + c inside it move.
            let end = (a + b).min(total.saturating_sub(c));
            if a < end {
                model[a + c..end + c].copy_from_slice(&before[a..end]);
            }
        }
        3 => {
            let mut seen = Vec::new();
            view.for_each_chunk(a, b, |chunk| {
                assert!(!chunk.is_empty() && chunk.len() <= 2048);
                seen.extend_from_slice(chunk);
            });
            assert_eq!(seen, before[clip(a, b)]);
        }
        4 => {
            let hole = c..c + b % 32;
            let mut out = Vec::new();
            let covered = chain::carve(iovs, a, hole.clone(), &mut out);
            assert_eq!(covered, out.iter().map(|v| v.iov_len).sum::<usize>());
            // Every piece lies inside one input iovec.
            for v in &out {
                assert!(v.iov_len > 0);
                assert!(iovs.iter().any(|s| {
                    let (s0, s1) = (s.iov_base as usize, s.iov_base as usize + s.iov_len);
                    v.iov_base as usize >= s0 && v.iov_base as usize + v.iov_len <= s1
                }));
            }
            let limit = a.min(total);
            let mut want = before[..hole.start.min(limit)].to_vec();
            want.extend_from_slice(&before[hole.end.min(limit)..limit]);
            assert_eq!(flatten(&out), want);
        }
        _ => {}
    }
    // Nothing outside the view's iovecs changed: put back what they cover and compare.
    let mut memory_after = m.snapshot();
    for v in iovs {
        for (i, &(_, host, len)) in m.regions.iter().enumerate() {
            let base = v.iov_base as usize;
            if base >= host && base < host + len {
                let r = base - host..(base - host + v.iov_len).min(len);
                memory_after[i][r.clone()].copy_from_slice(&memory_before[i][r]);
            }
        }
    }
    assert!(
        memory_after == memory_before,
        "scatter op {code} wrote outside its iovecs"
    );
    if !overlapping(iovs) {
        assert_eq!(
            flatten(iovs),
            model,
            "scatter op {code} disagrees with the model"
        );
    }
}
