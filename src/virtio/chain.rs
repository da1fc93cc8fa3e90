//! Descriptor chains resolved to host iovecs, and a scatter view over them.
//!
//! The iovecs point straight into guest memory so that the packet socket reads and writes guest
//! buffers with no copy. They are only valid while the guest memory mapping they were resolved
//! against is alive: the datapath resolves, uses and forgets them within one processing pass,
//! holding the memory guard throughout.

use std::fmt;
use std::ops::Range;

use libc::iovec;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

/// Who writes the buffers of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// RX: the device writes, every descriptor must be write-only.
    DeviceWrites,
    /// TX: the device reads, every descriptor must be read-only.
    DeviceReads,
}

/// Why a chain was refused. Each is the guest's fault and costs it that chain only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor's direction does not match the queue (read-only on RX, write-only on TX).
    WrongDirection { index: u16 },
    /// A descriptor points outside guest memory.
    BadAddress { addr: u64, len: u32 },
    /// The chain has more segments than one system call can carry.
    TooManySegments,
    /// The chain ended before any usable byte.
    Empty,
    /// The head descriptor refers to an indirect table and also says NEXT (virtio 2.7.5.3.1
    /// forbids it; virtio-queue would silently ignore the NEXT).
    IndirectWithNext,
    /// The chain has more descriptors than the queue has entries (virtio 2.7.5.2), possible
    /// through an indirect table.
    TooLong,
    /// The chain never ends properly: it loops, runs longer than the queue, names a descriptor
    /// outside the queue, or an indirect table is bad. virtio-queue stops such a chain
    /// silently; its last descriptor still says NEXT.
    Unterminated,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::WrongDirection { index } => {
                write!(
                    f,
                    "descriptor {index} has the wrong direction for this queue"
                )
            }
            ChainError::BadAddress { addr, len } => {
                write!(f, "descriptor {addr:#x}+{len} is outside guest memory")
            }
            ChainError::TooManySegments => write!(f, "chain has too many segments"),
            ChainError::Empty => write!(f, "chain is empty"),
            ChainError::TooLong => write!(f, "chain is longer than the queue"),
            ChainError::IndirectWithNext => {
                write!(f, "indirect descriptor also chains to a next one")
            }
            ChainError::Unterminated => {
                write!(
                    f,
                    "chain does not end (loop, too long, or bad next or indirect)"
                )
            }
        }
    }
}

/// Most iovecs one chain may resolve to; sendmsg/recvmsg take at most `UIO_MAXIOV` (1024).
pub const MAX_SEGMENTS: usize = 1024;

/// One resolved chain: its head id, its iovecs in the arena, and its byte length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub iovs: (u32, u32),
    pub len: u32,
}

impl Chain {
    pub fn iov_range(&self) -> Range<usize> {
        self.iovs.0 as usize..self.iovs.1 as usize
    }
}

/// Resolves the descriptors of one chain into host iovecs appended to `arena`.
///
/// Zero-length descriptors are skipped. A descriptor that spans two guest memory regions becomes
/// two iovecs. A chain may have at most `max_descriptors` (the queue size). On error the arena
/// is left as it was.
pub fn resolve<M: GuestMemoryBackend>(
    mem: &M,
    head: u16,
    descriptors: impl Iterator<Item = Descriptor>,
    access: Access,
    arena: &mut Vec<iovec>,
    max_descriptors: usize,
) -> Result<Chain, ChainError> {
    let start = arena.len();
    let result = resolve_into(
        mem,
        descriptors.take(max_descriptors + 1),
        access,
        arena,
        max_descriptors,
    );
    match result {
        Ok(len) if len > 0 => Ok(Chain {
            head,
            iovs: (start as u32, arena.len() as u32),
            len,
        }),
        Ok(_) => {
            arena.truncate(start);
            Err(ChainError::Empty)
        }
        Err(e) => {
            arena.truncate(start);
            Err(e)
        }
    }
}

fn resolve_into<M: GuestMemoryBackend>(
    mem: &M,
    descriptors: impl Iterator<Item = Descriptor>,
    access: Access,
    arena: &mut Vec<iovec>,
    max_descriptors: usize,
) -> Result<u32, ChainError> {
    let start = arena.len();
    let mut total: u32 = 0;
    let mut wants_more = false;
    for (index, desc) in descriptors.enumerate() {
        if index >= max_descriptors {
            return Err(ChainError::TooLong);
        }
        wants_more = desc.has_next();
        let wants_write = access == Access::DeviceWrites;
        if desc.is_write_only() != wants_write {
            return Err(ChainError::WrongDirection {
                index: index as u16,
            });
        }
        if desc.len() == 0 {
            continue;
        }
        let bad = ChainError::BadAddress {
            addr: desc.addr().0,
            len: desc.len(),
        };
        // The descriptor iterator already refuses chains whose total exceeds u32.
        total = total.checked_add(desc.len()).ok_or(bad)?;
        let mut covered = 0usize;
        for slice in
            GuestMemoryBackend::get_slices(mem, GuestAddress(desc.addr().0), desc.len() as usize)
        {
            let slice = slice.map_err(|_| bad)?;
            if arena.len() - start >= MAX_SEGMENTS {
                return Err(ChainError::TooManySegments);
            }
            covered += slice.len();
            arena.push(iovec {
                // The guard is dropped at once: with the mmap backend it holds nothing (see
                // the assertion below), and the pointer is valid for as long as the region
                // is mapped, which the caller's memory guard ensures.
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        if covered != desc.len() as usize {
            return Err(bad);
        }
    }
    if wants_more {
        return Err(ChainError::Unterminated);
    }
    Ok(total)
}

/// The iovecs outlive the `PtrGuardMut` they were taken from. That is sound only while the guard
/// keeps nothing mapped: true of the mmap backend, false with vm-memory's `xen` feature, whose
/// guard unmaps on drop. Enabling it must fail to build here rather than leave dangling iovecs.
const _: () = assert!(!std::mem::needs_drop::<
    vm_memory::volatile_memory::PtrGuardMut,
>());

/// Where a queue's chains come from: what [`resolve_from_queue`] needs besides the chain.
#[derive(Clone, Copy, Debug)]
pub struct QueueGeometry {
    pub desc_table: GuestAddress,
    pub size: u16,
}

/// [`resolve`] for a chain popped from a queue, refusing first what the descriptor iterator
/// hides (an indirect head that also says NEXT).
pub fn resolve_from_queue<M: GuestMemoryBackend>(
    mem: &M,
    queue: QueueGeometry,
    head: u16,
    descriptors: impl Iterator<Item = Descriptor>,
    access: Access,
    arena: &mut Vec<iovec>,
) -> Result<Chain, ChainError> {
    if head_is_indirect_with_next(mem, queue.desc_table, head) {
        return Err(ChainError::IndirectWithNext);
    }
    resolve(
        mem,
        head,
        descriptors,
        access,
        arena,
        usize::from(queue.size),
    )
}

/// Whether the ring descriptor `head` both refers to an indirect table and says NEXT, which
/// the descriptor iterator cannot show: it switches to the table and drops the flag.
pub fn head_is_indirect_with_next<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    head: u16,
) -> bool {
    const FLAGS_OFFSET: u64 = 12;
    const NEXT_AND_INDIRECT: u16 = 1 | 4;
    desc_table
        .0
        .checked_add(16 * u64::from(head) + FLAGS_OFFSET)
        .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
        .is_some_and(|flags| u16::from_le(flags) & NEXT_AND_INDIRECT == NEXT_AND_INDIRECT)
}

/// Appends to `out` the iovecs covering bytes `[0, limit)` of `src`, minus the bytes in `hole`.
///
/// This is how a 10-byte kernel header meets a 12-byte guest header: the two `num_buffers` bytes
/// are a hole the socket skips over. Returns the number of bytes covered.
pub fn carve(src: &[iovec], limit: usize, hole: Range<usize>, out: &mut Vec<iovec>) -> usize {
    let mut pos = 0usize;
    let mut covered = 0usize;
    for iov in src {
        if pos >= limit {
            break;
        }
        let seg = pos..(pos + iov.iov_len).min(limit);
        // The part of `seg` before the hole, and the part after it.
        for part in [
            seg.start..seg.end.min(hole.start),
            seg.start.max(hole.end)..seg.end,
        ] {
            if part.start < part.end {
                out.push(iovec {
                    // Pointer arithmetic inside the iovec's own range; nothing is dereferenced.
                    iov_base: iov
                        .iov_base
                        .cast::<u8>()
                        .wrapping_add(part.start - pos)
                        .cast(),
                    iov_len: part.end - part.start,
                });
                covered += part.end - part.start;
            }
        }
        pos += iov.iov_len;
    }
    covered
}

/// Where a [`Scatter`] view's bytes are.
#[derive(Clone, Copy)]
enum Backing<'a> {
    /// Iovecs into guest memory, as [`resolve`] makes them.
    Guest {
        mem: &'a GuestMemoryMmap,
        iovs: &'a [iovec],
    },
    /// Host memory (a bounce buffer), or anything else already a volatile slice.
    Slices(&'a [VolatileSlice<'a>]),
}

/// A byte-addressed view over a list of buffers (one chain, several chains of one packet, or a
/// host bounce buffer).
///
/// Every access goes through vm-memory's [`VolatileSlice`] (memcpy-based copies, no Rust
/// reference to the bytes), because the guest may write its memory at any time. A view over
/// guest iovecs finds each touched iovec's region again in `mem` and asks the region for the
/// slice, so it is safe code that needs nothing besides the iovec, and every byte the daemon
/// writes into guest memory passes through the region's `get_slice` (where a dirty bitmap would
/// see it). An iovec that does not lie inside one region of `mem` ends the view there; iovecs
/// from [`resolve`] against the same memory always do.
#[derive(Clone, Copy)]
pub struct Scatter<'a> {
    backing: Backing<'a>,
}

impl<'a> Scatter<'a> {
    /// A view over iovecs into `mem` (resolved against that mapping).
    pub fn guest(mem: &'a GuestMemoryMmap, iovs: &'a [iovec]) -> Scatter<'a> {
        Scatter {
            backing: Backing::Guest { mem, iovs },
        }
    }

    /// A view over volatile slices, in order; `VolatileSlice::from(&mut buf[..])` makes one of
    /// host memory.
    pub fn slices(slices: &'a [VolatileSlice<'a>]) -> Scatter<'a> {
        Scatter {
            backing: Backing::Slices(slices),
        }
    }

    pub fn len(&self) -> usize {
        match self.backing {
            Backing::Guest { iovs, .. } => iovs.iter().map(|v| v.iov_len).sum(),
            Backing::Slices(slices) => slices.iter().map(|s| s.len()).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with the slices covering `[offset, offset + len)`, in order, clipped to the
    /// view.
    fn for_each_segment(&self, offset: usize, len: usize, mut f: impl FnMut(VolatileSlice<'_>)) {
        let end = offset.saturating_add(len);
        let mut pos = 0usize;
        let count = match self.backing {
            Backing::Guest { iovs, .. } => iovs.len(),
            Backing::Slices(slices) => slices.len(),
        };
        for index in 0..count {
            let seg_end = pos
                + match self.backing {
                    Backing::Guest { iovs, .. } => iovs[index].iov_len,
                    Backing::Slices(slices) => slices[index].len(),
                };
            let from = offset.max(pos);
            let to = end.min(seg_end);
            if from < to {
                let Some(slice) = self.subslice(index, from - pos, to - from) else {
                    return;
                };
                f(slice);
            }
            if seg_end >= end {
                break;
            }
            pos = seg_end;
        }
    }

    /// `len` bytes at `at` in segment `index`, which holds them.
    fn subslice(&self, index: usize, at: usize, len: usize) -> Option<VolatileSlice<'a>> {
        match self.backing {
            Backing::Guest { mem, iovs } => {
                let host = (iovs[index].iov_base as usize).checked_add(at)?;
                mem.iter().find_map(|region| {
                    let base = region.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
                    let offset = host.checked_sub(base)? as u64;
                    // Bounds-checked: a range outside this region is refused.
                    region.get_slice(MemoryRegionAddress(offset), len).ok()
                })
            }
            Backing::Slices(slices) => slices[index].subslice(at, len).ok(),
        }
    }

    /// Copies bytes starting at `offset` into `buf`; returns how many were available.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> usize {
        let mut done = 0usize;
        self.for_each_segment(offset, buf.len(), |slice| {
            done += slice.copy_to(&mut buf[done..]);
        });
        done
    }

    /// Copies `buf` to `offset`; returns how many bytes fitted.
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> usize {
        let mut done = 0usize;
        self.for_each_segment(offset, buf.len(), |slice| {
            slice.copy_from(&buf[done..done + slice.len()]);
            done += slice.len();
        });
        done
    }

    /// Zeroes `[offset, offset + len)`, clipped to the view.
    pub fn zero(&self, offset: usize, len: usize) {
        const ZEROES: [u8; 2048] = [0; 2048];
        self.for_each_segment(offset, len, |slice| {
            let mut done = 0;
            while done < slice.len() {
                let n = (slice.len() - done).min(ZEROES.len());
                // In range: `done + n <= slice.len()`.
                if let Ok(part) = slice.subslice(done, n) {
                    part.copy_from(&ZEROES[..n]);
                }
                done += n;
            }
        });
    }

    /// Moves `[offset, offset + len)` to `offset + by`, as memmove would, clipped to the view.
    pub fn shift_right(&self, offset: usize, len: usize, by: usize) {
        let mut bounce = [0u8; 2048];
        let mut end = offset + len;
        // Back to front, so that nothing is overwritten before it is moved.
        while end > offset {
            let start = end.saturating_sub(bounce.len()).max(offset);
            let n = self.read_at(start, &mut bounce[..end - start]);
            self.write_at(start + by, &bounce[..n]);
            end = start;
        }
    }

    /// Feeds the bytes of `[offset, offset + len)` to `f` in chunks, through a small bounce buffer
    /// so that no Rust reference ever points at memory the guest may be writing.
    pub fn for_each_chunk(&self, offset: usize, len: usize, mut f: impl FnMut(&[u8])) {
        let mut bounce = [0u8; 2048];
        self.for_each_segment(offset, len, |slice| {
            let mut done = 0;
            while done < slice.len() {
                let take = (slice.len() - done).min(bounce.len());
                let Ok(part) = slice.subslice(done, take) else {
                    return;
                };
                let n = part.copy_to(&mut bounce[..take]);
                f(&bounce[..n]);
                done += take;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    fn iov(buf: &mut [u8]) -> iovec {
        iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn scatter_reads_and_writes_across_segments() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 1], [0u8; 5]);
        let slices = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
            VolatileSlice::from(&mut c[..]),
        ];
        let s = Scatter::slices(&slices);
        assert_eq!(s.len(), 9);
        assert_eq!(s.write_at(2, &[1, 2, 3, 4]), 4);
        assert_eq!(s.write_at(8, &[9, 9]), 1, "clipped at the end");
        let mut out = [0u8; 9];
        assert_eq!(s.read_at(0, &mut out), 9);
        assert_eq!(out, [0, 0, 1, 2, 3, 4, 0, 0, 9]);
        let mut seen = Vec::new();
        s.for_each_chunk(1, 6, |chunk| seen.extend_from_slice(chunk));
        assert_eq!(seen, [0, 1, 2, 3, 4, 0]);
        s.zero(3, 4);
        assert_eq!(s.read_at(0, &mut out), 9);
        assert_eq!(out, [0, 0, 1, 0, 0, 0, 0, 0, 9]);
        assert_eq!(s.read_at(20, &mut out), 0);
    }

    #[test]
    fn shift_right_moves_bytes_across_segments() {
        let mut data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
        let want: Vec<u8> = data[..12]
            .iter()
            .chain(&data[12..12 + 4])
            .chain(&data[12..9996])
            .copied()
            .collect();
        let (a, rest) = data.split_at_mut(13);
        let (b, c) = rest.split_at_mut(5000);
        let slices = [
            VolatileSlice::from(a),
            VolatileSlice::from(b),
            VolatileSlice::from(c),
        ];
        Scatter::slices(&slices).shift_right(12, 9984, 4);
        assert_eq!(data, want);
    }

    #[test]
    fn a_guest_view_reaches_memory_through_its_regions_only() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x3000), 0x1000),
        ])
        .unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        let mut arena = Vec::new();
        let descs = [
            Descriptor::new(0xffc, 4, w | VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(0x3000, 4, w, 0),
        ];
        let c = resolve(
            &mem,
            0,
            descs.into_iter(),
            Access::DeviceWrites,
            &mut arena,
            8,
        )
        .unwrap();
        let s = Scatter::guest(&mem, &arena[c.iov_range()]);
        assert_eq!(s.write_at(2, &[1, 2, 3, 4, 5, 6, 7]), 6);
        let mut got = [0u8; 8];
        mem.read_slice(&mut got[..4], GuestAddress(0xffc)).unwrap();
        mem.read_slice(&mut got[4..], GuestAddress(0x3000)).unwrap();
        assert_eq!(got, [0, 0, 1, 2, 3, 4, 5, 6]);
        // An iovec outside every region (here: host memory) ends the view where it starts.
        let mut host = [0xaau8; 4];
        let iovs = [arena[c.iovs.0 as usize], iov(&mut host)];
        let s = Scatter::guest(&mem, &iovs);
        assert_eq!(s.len(), 8);
        assert_eq!(s.write_at(0, &[9; 8]), 4);
        assert_eq!(s.read_at(0, &mut got), 4);
        assert_eq!(host, [0xaa; 4]);
    }

    #[test]
    fn carve_skips_the_hole_at_any_split() {
        let mut data: Vec<u8> = (0..40).collect();
        let base = data.as_ptr() as usize;
        for split in 1..20 {
            let (x, y) = data.split_at_mut(split);
            let src = [iov(x), iov(y)];
            let mut out = Vec::new();
            let covered = carve(&src, 30, 10..12, &mut out);
            assert_eq!(covered, 28);
            // carve only does pointer arithmetic: map each piece back to the indices of `data`.
            let got: Vec<usize> = out
                .iter()
                .flat_map(|v| {
                    let at = v.iov_base as usize - base;
                    at..at + v.iov_len
                })
                .collect();
            let want: Vec<usize> = (0..10).chain(12..30).collect();
            assert_eq!(got, want, "split at {split}");
        }
    }

    #[test]
    fn resolve_checks_direction_and_bounds() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        let mut arena = Vec::new();
        // Straddles the two regions: two iovecs.
        let descs = [
            Descriptor::new(0xff0, 0x20, w | VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(0x100, 0, w, 0),
        ];
        let c = resolve(
            &mem,
            3,
            descs.into_iter(),
            Access::DeviceWrites,
            &mut arena,
            256,
        )
        .unwrap();
        assert_eq!((c.head, c.len, c.iov_range()), (3, 0x20, 0..2));
        // Wrong direction.
        let descs = [Descriptor::new(0, 16, 0, 0)];
        let e = resolve(
            &mem,
            0,
            descs.into_iter(),
            Access::DeviceWrites,
            &mut arena,
            256,
        );
        assert_eq!(e, Err(ChainError::WrongDirection { index: 0 }));
        let descs = [Descriptor::new(0, 16, w, 0)];
        let e = resolve(
            &mem,
            0,
            descs.into_iter(),
            Access::DeviceReads,
            &mut arena,
            256,
        );
        assert_eq!(e, Err(ChainError::WrongDirection { index: 0 }));
        // Outside memory, and running off its end.
        for (addr, len) in [(0x5000u64, 16u32), (0x1ff0, 0x20), (u64::MAX - 4, 16)] {
            let descs = [Descriptor::new(addr, len, w, 0)];
            let e = resolve(
                &mem,
                0,
                descs.into_iter(),
                Access::DeviceWrites,
                &mut arena,
                256,
            );
            assert_eq!(e, Err(ChainError::BadAddress { addr, len }));
        }
        // More descriptors than the queue has entries.
        let descs = [
            Descriptor::new(0, 16, w | VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(16, 16, w, 0),
        ];
        let e = resolve(
            &mem,
            0,
            descs.into_iter(),
            Access::DeviceWrites,
            &mut arena,
            1,
        );
        assert_eq!(e, Err(ChainError::TooLong));
        // The iterator stopped on a descriptor that says NEXT: cut short, refused.
        let descs = [Descriptor::new(0, 16, w | VRING_DESC_F_NEXT as u16, 1)];
        let e = resolve(
            &mem,
            0,
            descs.into_iter(),
            Access::DeviceWrites,
            &mut arena,
            256,
        );
        assert_eq!(e, Err(ChainError::Unterminated));
        // Only zero-length descriptors.
        let descs = [Descriptor::new(0, 0, w, 0)];
        let e = resolve(
            &mem,
            0,
            descs.into_iter(),
            Access::DeviceWrites,
            &mut arena,
            256,
        );
        assert_eq!(e, Err(ChainError::Empty));
        assert_eq!(
            arena.len(),
            2,
            "failed resolutions leave the arena untouched"
        );
    }
}
