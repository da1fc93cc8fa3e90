//! Used-ring publisher: write any number of used elements, then make them visible with a single
//! store of `used.idx`, then decide whether the guest wants an interrupt.
//!
//! virtio-queue's `add_used` stores `used.idx` after every element. A mergeable RX packet spread
//! over k buffers must appear at once (the guest reads `num_buffers` from the first and expects
//! the rest to be there), and one store per burst is cheaper anyway.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// `avail.flags` bit: the driver does not want interrupts (without EVENT_IDX).
// The bindings declare u32; the avail ring's flags field is u16.
const VRING_AVAIL_F_NO_INTERRUPT: u16 =
    virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
/// Offsets inside the split rings.
const USED_IDX_OFFSET: u64 = 2;
const USED_RING_OFFSET: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;
const AVAIL_RING_OFFSET: u64 = 4;

/// Where one queue's rings are, as the frontend configured them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub size: u16,
}

/// Error: the used ring lies (partly) outside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedRingUnreachable(pub GuestAddress);

impl std::fmt::Display for UsedRingUnreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "used ring at {:#x} is outside guest memory", self.0 .0)
    }
}

/// Used-ring state that lives across processing passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyState {
    /// `used.idx` at the last check, and whether that check interrupted; `None` before the
    /// first. EVENT_IDX asks whether `used_event` lies in what was published since the last
    /// *check* (as Linux, DPDK and virtio-queue do): measured from the last interrupt instead,
    /// the range would wrap after 64K completions without one and miss every later wish.
    last_check: Option<(Wrapping<u16>, bool)>,
}

/// The EVENT_IDX test (virtio 1.x, 2.7.10): interrupt iff `used_event` lies in `[old, new)`.
pub fn need_event(used_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Writes used elements of one queue and publishes them.
pub struct UsedRing {
    addrs: RingAddrs,
    /// Next slot to write.
    next: Wrapping<u16>,
    /// The `used.idx` the guest can currently see.
    published: Wrapping<u16>,
}

impl UsedRing {
    /// Starts from `next_used`, the used index the queue state holds (nothing unpublished).
    pub fn new(addrs: RingAddrs, next_used: u16) -> UsedRing {
        UsedRing {
            addrs,
            next: Wrapping(next_used),
            published: Wrapping(next_used),
        }
    }

    /// The index after the last written element (what `used.idx` becomes on `publish`).
    pub fn next_used(&self) -> u16 {
        self.next.0
    }

    /// Elements written but not yet visible.
    pub fn pending(&self) -> u16 {
        (self.next - self.published).0
    }

    /// Writes one used element; invisible to the guest until [`publish`](Self::publish).
    pub fn push<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        id: u16,
        len: u32,
    ) -> Result<(), UsedRingUnreachable> {
        let slot = u64::from(self.next.0 % self.addrs.size.max(1));
        let addr = self
            .addrs
            .used
            .0
            .checked_add(USED_RING_OFFSET + slot * USED_ELEM_SIZE)
            .ok_or(UsedRingUnreachable(self.addrs.used))?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(id).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(addr))
            .map_err(|_| UsedRingUnreachable(self.addrs.used))?;
        self.next += Wrapping(1);
        Ok(())
    }

    /// Makes every pushed element visible with one release store of `used.idx`.
    /// Returns whether anything new became visible.
    pub fn publish<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<bool, UsedRingUnreachable> {
        if self.next == self.published {
            return Ok(false);
        }
        let addr = self
            .addrs
            .used
            .0
            .checked_add(USED_IDX_OFFSET)
            .ok_or(UsedRingUnreachable(self.addrs.used))?;
        mem.store(self.next.0.to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(|_| UsedRingUnreachable(self.addrs.used))?;
        self.published = self.next;
        Ok(true)
    }

    /// Decides whether the guest wants an interrupt for what was published since the last
    /// check, and records the check. Call after every [`publish`](Self::publish) that made
    /// something visible.
    pub fn needs_notification<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        event_idx: bool,
        state: &mut NotifyState,
    ) -> bool {
        let new = self.published;
        if state.last_check == Some((new, true)) {
            // Nothing published since the last interrupt.
            return false;
        }
        // The used.idx store must be visible before we read the guest's wishes, or we could miss
        // an interrupt it asked for in between.
        fence(Ordering::SeqCst);
        let wanted = if event_idx {
            let size = u64::from(self.addrs.size);
            let used_event = self
                .addrs
                .avail
                .0
                .checked_add(AVAIL_RING_OFFSET + 2 * size)
                .and_then(|a| mem.load::<u16>(GuestAddress(a), Ordering::Acquire).ok())
                .map(u16::from_le);
            match (used_event, state.last_check) {
                (Some(ev), Some((old, _))) => need_event(ev, new.0, old.0),
                // Never checked yet, or unreadable: interrupt rather than risk a stall.
                _ => true,
            }
        } else {
            mem.load::<u16>(self.addrs.avail, Ordering::Acquire)
                .map(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
                .unwrap_or(true)
        };
        state.last_check = Some((new, wanted));
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn setup(size: u16) -> (GuestMemoryMmap<()>, RingAddrs) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let addrs = RingAddrs {
            avail: GuestAddress(AVAIL),
            used: GuestAddress(USED),
            size,
        };
        (mem, addrs)
    }

    fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn elements_become_visible_with_one_publish() {
        let (mem, addrs) = setup(4);
        let mut ring = UsedRing::new(addrs, 2);
        for (id, len) in [(7u16, 100u32), (1, 200), (3, 300)] {
            ring.push(&mem, id, len).unwrap();
            assert_eq!(used_idx(&mem), 0, "nothing visible before publish");
        }
        assert_eq!(ring.pending(), 3);
        assert!(ring.publish(&mem).unwrap());
        assert_eq!(used_idx(&mem), 5);
        assert!(!ring.publish(&mem).unwrap(), "nothing new");
        // Slots 2, 3, then wrapped to 0.
        let elem = |slot: u64| {
            let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap();
            (id, len)
        };
        assert_eq!([elem(2), elem(3), elem(0)], [(7, 100), (1, 200), (3, 300)]);
    }

    #[test]
    fn used_index_wraps_at_65535() {
        let (mem, addrs) = setup(256);
        let mut ring = UsedRing::new(addrs, 65534);
        for id in 0..3 {
            ring.push(&mem, id, 1).unwrap();
        }
        ring.publish(&mem).unwrap();
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(ring.next_used(), 1);
    }

    #[test]
    fn unreachable_used_ring_is_an_error_not_a_panic() {
        let (mem, mut addrs) = setup(4);
        addrs.used = GuestAddress(u64::MAX - 2);
        let mut ring = UsedRing::new(addrs, 0);
        assert!(ring.push(&mem, 0, 0).is_err());
        addrs.used = GuestAddress(0xfffc);
        let mut ring = UsedRing::new(addrs, 0);
        assert!(ring.push(&mem, 0, 0).is_err());
    }

    #[test]
    fn need_event_arithmetic() {
        // Interrupt iff used_event in [old, new).
        assert!(need_event(5, 6, 5));
        assert!(!need_event(6, 6, 5));
        assert!(need_event(0, 10, 0));
        assert!(need_event(9, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(!need_event(3, 10, 5), "event already passed before old");
        // Across the 65535 -> 0 wrap.
        assert!(need_event(65535, 2, 65534));
        assert!(need_event(0, 2, 65534));
        assert!(need_event(1, 2, 65534));
        assert!(!need_event(2, 2, 65534));
        assert!(!need_event(65533, 2, 65534));
    }

    #[test]
    fn event_idx_suppresses_and_wakes() {
        let (mem, addrs) = setup(8);
        let used_event_addr = GuestAddress(AVAIL + 4 + 2 * 8);
        let mut state = NotifyState::default();
        let mut ring = UsedRing::new(addrs, 0);
        ring.push(&mem, 0, 1).unwrap();
        ring.publish(&mem).unwrap();
        assert!(
            ring.needs_notification(&mem, true, &mut state),
            "first one always"
        );
        assert!(
            !ring.needs_notification(&mem, true, &mut state),
            "nothing new"
        );
        // The guest wants to hear when used.idx passes 3.
        mem.write_obj(3u16, used_event_addr).unwrap();
        ring.push(&mem, 1, 1).unwrap();
        ring.publish(&mem).unwrap(); // idx 2
        assert!(!ring.needs_notification(&mem, true, &mut state));
        for id in 2..4 {
            ring.push(&mem, id, 1).unwrap();
        }
        ring.publish(&mem).unwrap(); // idx 4: crossed 3
        assert!(ring.needs_notification(&mem, true, &mut state));
    }

    #[test]
    fn event_idx_after_64k_completions_without_an_interrupt() {
        // A guest polling through a long busy period leaves used_event behind; when it re-arms,
        // a publish that crosses the index of the last interrupt must still see the wish.
        let (mem, addrs) = setup(256);
        let used_event_addr = GuestAddress(AVAIL + 4 + 2 * 256);
        let mut state = NotifyState::default();
        let mut ring = UsedRing::new(addrs, 0);
        for id in 0..10 {
            ring.push(&mem, id, 1).unwrap();
        }
        ring.publish(&mem).unwrap();
        assert!(ring.needs_notification(&mem, true, &mut state), "idx 10");
        mem.write_obj(9u16, used_event_addr).unwrap();
        // One by one up to idx 65540 (4 mod 2^16): used_event 9 is never crossed again.
        for n in 11..=65540u32 {
            ring.push(&mem, (n % 256) as u16, 1).unwrap();
            ring.publish(&mem).unwrap();
            assert!(
                !ring.needs_notification(&mem, true, &mut state),
                "idx {n}: used_event 9 was not crossed"
            );
        }
        assert_eq!(ring.next_used(), 4);
        // The guest re-arms at the current index; one burst of 64 takes used.idx from 4 to 68,
        // across 10, the index of the last interrupt.
        mem.write_obj(4u16, used_event_addr).unwrap();
        for id in 0..64 {
            ring.push(&mem, id, 1).unwrap();
        }
        ring.publish(&mem).unwrap();
        assert!(
            ring.needs_notification(&mem, true, &mut state),
            "used_event 4 lies in [4, 68): an interrupt is due"
        );
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let (mem, addrs) = setup(8);
        let mut state = NotifyState::default();
        let mut ring = UsedRing::new(addrs, 0);
        mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        ring.push(&mem, 0, 1).unwrap();
        ring.publish(&mem).unwrap();
        assert!(!ring.needs_notification(&mem, false, &mut state));
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        assert!(ring.needs_notification(&mem, false, &mut state));
        assert!(
            !ring.needs_notification(&mem, false, &mut state),
            "nothing new since the interrupt"
        );
    }
}
