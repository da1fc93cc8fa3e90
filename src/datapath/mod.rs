//! The datapath of one queue pair: its packet socket, RX and TX state, counters, and the events
//! that drive them. Each pair is owned by one worker thread; nothing here is shared between
//! pairs.

pub mod mac;
pub mod offload;
pub mod queue;
pub mod rx;
pub mod segment;
#[cfg(test)]
mod test_ring;
pub mod tx;

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use log::debug;
use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::packet::error::PacketError;
use crate::packet::socket::PacketSocket;
use crate::stats::PairStats;
use crate::virtio::features::Negotiated;
pub use mac::{GuestMac, MacPolicy};
pub use queue::PairSocket;
use queue::{PairEnv, RxQueue, TxQueue};

/// Guest memory as the vhost-user crates hand it over.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Where a worker registers the file descriptors it wants to hear about. Implemented by the
/// vhost-user crate's per-thread epoll handler.
pub trait EventRegistry: Send + Sync {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()>;
    fn unregister(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()>;
}

/// Event ids of one pair's worker. Kicks are 0 (RX) and 1 (TX), the positions of the pair's
/// vrings in its thread; our own descriptors must use ids above the queue count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventIds {
    pub socket_readable: u16,
    pub socket_writable: u16,
    pub resched: u16,
}

impl EventIds {
    pub const RX_KICK: u16 = 0;
    pub const TX_KICK: u16 = 1;

    pub fn for_queue_count(num_queues: usize) -> EventIds {
        let base = num_queues as u16;
        EventIds {
            socket_readable: base + 1,
            socket_writable: base + 2,
            resched: base + 3,
        }
    }
}

/// One RX/TX queue pair: the socket and what both directions share, dispatching each event to
/// its direction (see `queue.rs`). `S`: the socket; `R`: the worker's epoll handler.
pub struct QueuePair<S: ?Sized = PacketSocket, R: ?Sized = dyn EventRegistry> {
    index: usize,
    /// Shared with the device's `GuestMac`, which sets its membership and filter.
    socket: Arc<S>,
    ids: EventIds,
    registry: Option<Weak<R>>,
    mem: Option<GuestMemory>,
    features: Negotiated,
    rx: RxQueue,
    tx: TxQueue,
    stats: PairStats,
    guest_mac: Arc<GuestMac>,
    busy_poll: Option<BusyPoll>,
}

/// `--busy-poll-us`: the worker keeps polling for `idle` after its last work.
#[derive(Clone, Copy, Debug)]
struct BusyPoll {
    idle: Duration,
    last_work: Instant,
}

/// While busy polling, the worker returns to its epoll loop at least this often, so that the
/// exit event and other pairs' events on the same thread are not held up.
pub const BUSY_SLICE: Duration = Duration::from_millis(1);

/// Splits a pair into its directions and what they share, borrowing disjoint fields.
macro_rules! parts {
    ($pair:expr) => {
        (
            &mut $pair.rx,
            &mut $pair.tx,
            PairEnv {
                index: $pair.index,
                socket: &*$pair.socket,
                registry: $pair.registry.as_ref(),
                mem: $pair.mem.as_ref(),
                features: $pair.features,
                stats: &mut $pair.stats,
            },
        )
    };
}

impl<S: PairSocket + ?Sized, R: EventRegistry + ?Sized> QueuePair<S, R> {
    /// Errors are those of `dup(2)` and `eventfd(2)`.
    pub fn new(
        index: usize,
        socket: Arc<S>,
        ids: EventIds,
        guest_mac: Arc<GuestMac>,
        busy_poll: Option<Duration>,
    ) -> io::Result<QueuePair<S, R>> {
        let rx = RxQueue::new(socket.as_raw_fd(), ids.socket_readable);
        let tx = TxQueue::new(socket.try_clone()?, ids.socket_writable, ids.resched)?;
        Ok(QueuePair {
            index,
            socket,
            ids,
            registry: None,
            mem: None,
            features: Negotiated::default(),
            rx,
            tx,
            stats: PairStats::default(),
            guest_mac,
            busy_poll: busy_poll.map(|idle| BusyPoll {
                idle,
                last_work: Instant::now(),
            }),
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn socket(&self) -> &S {
        &self.socket
    }

    /// Counters, with the kernel's drop count for this socket folded in.
    pub fn stats(&mut self) -> PairStats {
        if let Ok(drops) = self.socket.drops() {
            self.stats.rx_drop_no_buffers += u64::from(drops);
        }
        self.stats
    }

    /// A new frontend connection: its worker's epoll handler.
    pub fn attach(&mut self, registry: Weak<R>) {
        self.detach();
        if let Some(r) = registry.upgrade() {
            self.tx.attach(&*r, self.index);
        }
        self.registry = Some(registry);
    }

    /// The connection is gone: forget its rings, memory and registrations.
    pub fn detach(&mut self) {
        let registry = self.registry.take();
        self.rx
            .detach(registry.as_ref(), self.index, &mut self.stats);
        self.tx.detach(registry.as_ref(), self.index);
        self.mem = None;
        self.features = Negotiated::default();
    }

    pub fn set_memory(&mut self, mem: GuestMemory) {
        self.mem = Some(mem);
    }

    /// The guest acked its features: match the socket's header length to the guest's.
    pub fn set_features(&mut self, features: Negotiated) -> Result<(), PacketError> {
        self.features = features;
        self.socket.set_vnet_header_len(features.header_len())
    }

    /// The frontend enabled or disabled one of this pair's rings (SET_VRING_ENABLE, or all of
    /// them at SET_FEATURES without PROTOCOL_FEATURES); see `RxQueue::set_enabled` and
    /// `TxQueue::set_enabled`. Repeating the current state changes nothing.
    pub fn set_ring_enabled(&mut self, rx: bool, enabled: bool) {
        let (rxq, txq, env) = parts!(self);
        if rx {
            rxq.set_enabled(env, enabled);
        } else {
            txq.set_enabled(enabled, env.index);
        }
    }

    /// Whether the frontend has the RX and TX rings enabled.
    pub fn rings_enabled(&self) -> (bool, bool) {
        (self.rx.enabled(), self.tx.enabled())
    }

    /// GET_VRING_BASE stopped one of our rings. Nothing is staged between passes (every pass
    /// gives back the chains it did not fill), so `next_avail` is already exact. The frontend
    /// may set the ring up again on this connection from index 0 for a new driver (guest
    /// reboot, driver reload, kexec): stop listening for what fed it, and forget everything
    /// about the old ring (interrupt state, broken flag, a half-delivered GSO frame).
    pub fn stop_ring(&mut self, rx: bool) {
        if rx {
            self.rx
                .stop(self.registry.as_ref(), self.index, &mut self.stats);
        } else {
            self.tx.stop(self.registry.as_ref(), self.index);
        }
    }

    pub fn handle_event(&mut self, event: u16, vrings: &[VringRwLock]) -> io::Result<()> {
        let (Some(rx_vring), Some(tx_vring)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        self.dispatch(event, rx_vring, tx_vring)?;
        if event != self.ids.resched {
            self.note_work();
        }
        Ok(())
    }

    /// `--busy-poll-us` is set: the worker calls `poll_once` after each event.
    pub fn busy_polling(&self) -> bool {
        self.busy_poll.is_some()
    }

    fn dispatch(
        &mut self,
        event: u16,
        rx_vring: &VringRwLock,
        tx_vring: &VringRwLock,
    ) -> io::Result<()> {
        match event {
            EventIds::RX_KICK => {
                self.stats.rx_kicks += 1;
                self.process_rx(rx_vring, false)
            }
            EventIds::TX_KICK => {
                self.stats.tx_kicks += 1;
                self.process_tx(tx_vring)
            }
            e if e == self.ids.socket_readable => self.process_rx(rx_vring, true),
            e if e == self.ids.socket_writable => {
                self.tx.writable(self.registry.as_ref(), self.index);
                self.process_tx(tx_vring)
            }
            e if e == self.ids.resched => {
                self.tx.rescheduled();
                self.process_tx(tx_vring)
            }
            other => {
                debug!("queue pair {}: ignoring event {other}", self.index);
                Ok(())
            }
        }
    }

    fn process_rx(&mut self, vring: &VringRwLock, look_first: bool) -> io::Result<()> {
        let (rx, _, env) = parts!(self);
        rx.process(env, vring, look_first)
    }

    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let busy_poll = self.busy_poll.is_some();
        let (_, tx, env) = parts!(self);
        tx.process(env, vring, &self.guest_mac, busy_poll)
    }

    fn note_work(&mut self) {
        if let Some(b) = &mut self.busy_poll {
            b.last_work = Instant::now();
        }
    }

    /// One round of `--busy-poll-us`: polls the TX ring and the socket (or the RX ring, while
    /// RX waits for buffers) and handles what it finds. Returns whether to go on polling:
    /// false once nothing came for the idle time (TX notifications are on again then, and the
    /// worker sleeps in epoll), or at `slice_end`, when the worker goes back to its epoll loop
    /// for a moment and returns through the reschedule event.
    pub fn poll_once(
        &mut self,
        rx_vring: &VringRwLock,
        tx_vring: &VringRwLock,
        slice_end: Instant,
    ) -> io::Result<bool> {
        let Some(idle) = self.busy_poll.map(|b| b.idle) else {
            return Ok(false);
        };
        let mut worked = false;
        if self.tx.has_work(tx_vring, self.mem.as_ref()) {
            self.process_tx(tx_vring)?;
            worked = true;
        }
        if let Some(look_first) = self.rx.has_work(rx_vring, self.mem.as_ref(), &*self.socket) {
            self.process_rx(rx_vring, look_first)?;
            worked = true;
        }
        if worked {
            self.note_work();
        }
        let now = Instant::now();
        let last_work = self.busy_poll.map_or(now, |b| b.last_work);
        if now.duration_since(last_work) >= idle {
            if self.tx.notifications_on(tx_vring, self.mem.as_ref()) {
                // The guest added chains while it was not kicking: poll on.
                self.note_work();
                return Ok(true);
            }
            return Ok(false);
        }
        if now >= slice_end {
            self.tx.reschedule(&mut self.stats)?;
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::sync::Mutex;

    use libc::{iovec, mmsghdr};
    use vhost_user_backend::VringT;

    use super::queue::DISCARD_LIMIT;
    use super::rx::FrameSource;
    use super::test_ring::{Guest, AVAIL, DESC, QSIZE, USED};
    use super::tx::tests::{sink, Sink};
    use super::tx::FrameSink;
    use super::*;
    use crate::packet::socket::RecvLen;

    /// A packet socket as the pair sees it: TX goes to the scripted [`Sink`]; RX has `queued`
    /// frames that only `discard_queued` takes (receiving finds none).
    struct Io {
        sink: Sink,
        queued: Cell<usize>,
        /// Stands for the socket's descriptor.
        fd: OwnedFd,
    }

    impl FrameSource for Io {
        fn kernel_vnet_header_len(&self) -> usize {
            HDR_LEN
        }
        fn pending_len(&self) -> io::Result<usize> {
            Ok(0)
        }
        fn take_error(&self) -> io::Result<Option<io::Error>> {
            Ok(None)
        }
        unsafe fn recv(&self, _iov: &mut [iovec]) -> io::Result<RecvLen> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    impl FrameSink for Io {
        fn kernel_vnet_header_len(&self) -> usize {
            HDR_LEN
        }
        unsafe fn send_batch(&self, msgs: &mut [mmsghdr]) -> io::Result<usize> {
            // SAFETY: the caller's guarantee is passed on unchanged.
            unsafe { self.sink.send_batch(msgs) }
        }
    }

    impl AsRawFd for Io {
        fn as_raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
    }

    impl PairSocket for Io {
        fn try_clone(&self) -> io::Result<OwnedFd> {
            self.fd.try_clone()
        }
        fn readable(&self) -> io::Result<bool> {
            Ok(self.queued.get() > 0)
        }
        fn discard_queued(&self, max: usize) -> usize {
            let n = self.queued.get().min(max);
            self.queued.set(self.queued.get() - n);
            n
        }
        fn drops(&self) -> io::Result<u32> {
            Ok(0)
        }
        fn set_vnet_header_len(&self, _len: usize) -> Result<(), PacketError> {
            Ok(())
        }
    }

    /// An epoll handler that records what was registered (true) and unregistered, by id.
    #[derive(Default)]
    struct Registry {
        calls: Mutex<Vec<(bool, u64)>>,
    }

    impl Registry {
        fn take(&self) -> Vec<(bool, u64)> {
            std::mem::take(&mut self.calls.lock().unwrap())
        }
    }

    impl EventRegistry for Registry {
        fn register(&self, _fd: RawFd, _events: EventSet, data: u64) -> io::Result<()> {
            self.calls.lock().unwrap().push((true, data));
            Ok(())
        }
        fn unregister(&self, _fd: RawFd, _events: EventSet, data: u64) -> io::Result<()> {
            self.calls.lock().unwrap().push((false, data));
            Ok(())
        }
    }

    /// The legacy header of a pair whose guest acked no features.
    const HDR_LEN: usize = 10;
    const IDS: EventIds = EventIds {
        socket_readable: 3,
        socket_writable: 4,
        resched: 5,
    };
    const READABLE: u64 = IDS.socket_readable as u64;
    const WRITABLE: u64 = IDS.socket_writable as u64;

    /// A connected pair over `guest`'s memory: `vrings[ring]` is `guest`'s ring (0 RX, 1 TX),
    /// the other one is not set up.
    struct Rig {
        pair: QueuePair<Io, Registry>,
        registry: Arc<Registry>,
        vrings: Vec<VringRwLock>,
        io: Arc<Io>,
    }

    // The pair shares its socket as a device does; these tests stay on one thread.
    #[allow(clippy::arc_with_non_send_sync)]
    fn rig(guest: &Guest, ring: usize, busy_poll: Option<Duration>) -> Rig {
        let io = Arc::new(Io {
            sink: sink(HDR_LEN),
            queued: Cell::new(0),
            fd: std::fs::File::open("/dev/null").unwrap().into(),
        });
        let mem = GuestMemory::new(guest.mem.clone());
        let vrings: Vec<VringRwLock> = (0..2)
            .map(|_| VringRwLock::new(mem.clone(), QSIZE).unwrap())
            .collect();
        let v = &vrings[ring];
        v.set_queue_size(QSIZE);
        v.set_queue_info(DESC, AVAIL, USED).unwrap();
        v.set_queue_ready(true);
        v.set_enabled(true);
        let policy = MacPolicy {
            guest_mac: None,
            promisc: false,
            allow_spoofing: true,
        };
        let mac = Arc::new(GuestMac::new(policy, Vec::new()).unwrap());
        let mut pair = QueuePair::new(0, io.clone(), IDS, mac, busy_poll).unwrap();
        let registry = Arc::new(Registry::default());
        pair.attach(Arc::downgrade(&registry));
        pair.set_memory(mem);
        registry.take();
        Rig {
            pair,
            registry,
            vrings,
            io,
        }
    }

    fn tx_guest(frames: usize) -> Guest {
        let mut guest = Guest::device_reads();
        for _ in 0..frames {
            guest.post_bytes(&[0u8; HDR_LEN + 60], &[HDR_LEN as u32 + 60]);
        }
        guest
    }

    #[test]
    fn an_rx_ring_disabled_while_armed_is_disarmed_and_re_armed_after_stop_ring() {
        let guest = Guest::new(&[vec![2048]]);
        let mut r = rig(&guest, 0, None);
        r.pair.set_ring_enabled(true, true);
        assert_eq!(r.registry.take(), [(true, READABLE)]);
        r.pair.set_ring_enabled(true, false);
        assert_eq!(r.registry.take(), [(false, READABLE)]);
        r.pair.set_ring_enabled(true, true);
        r.pair.stop_ring(true);
        assert_eq!(r.registry.take(), [(true, READABLE), (false, READABLE)]);
        // The frontend sets the ring up again and enables it: the socket is polled again.
        r.pair.set_ring_enabled(true, true);
        assert_eq!(r.registry.take(), [(true, READABLE)]);
        assert_eq!(r.pair.rings_enabled(), (true, false));
    }

    #[test]
    fn disabling_rx_throws_away_at_most_discard_limit_frames() {
        let guest = Guest::new(&[vec![2048]]);
        let mut r = rig(&guest, 0, None);
        r.pair.set_ring_enabled(true, true);
        r.io.queued.set(DISCARD_LIMIT + 5);
        r.pair.set_ring_enabled(true, false);
        assert_eq!(r.pair.stats().rx_drop_disabled, DISCARD_LIMIT as u64);
        assert_eq!(r.io.queued.get(), 5);
        // Repeating the state throws nothing more away.
        r.pair.set_ring_enabled(true, false);
        assert_eq!(r.io.queued.get(), 5);
    }

    #[test]
    fn a_disabled_tx_ring_is_consumed_and_discarded() {
        let guest = tx_guest(3);
        let mut r = rig(&guest, 1, None);
        r.pair.handle_event(EventIds::TX_KICK, &r.vrings).unwrap();
        assert_eq!(guest.used().len(), 3);
        assert!(r.io.sink.sent.borrow().is_empty());
        assert_eq!(r.registry.take(), []);
    }

    #[test]
    fn eagain_on_tx_arms_the_writable_watch_and_a_writable_event_disarms_it() {
        let guest = tx_guest(3);
        let mut r = rig(&guest, 1, None);
        r.pair.set_ring_enabled(false, true);
        r.io.sink.room.set(1);
        r.pair.handle_event(EventIds::TX_KICK, &r.vrings).unwrap();
        assert_eq!(r.registry.take(), [(true, WRITABLE)]);
        assert_eq!(r.io.sink.sent.borrow().len(), 1);
        // Kicks while blocked wait for the socket.
        r.pair.handle_event(EventIds::TX_KICK, &r.vrings).unwrap();
        assert_eq!(r.io.sink.sent.borrow().len(), 1);
        r.io.sink.room.set(usize::MAX);
        r.pair.handle_event(IDS.socket_writable, &r.vrings).unwrap();
        assert_eq!(r.registry.take(), [(false, WRITABLE)]);
        assert_eq!(r.io.sink.sent.borrow().len(), 3);
        assert_eq!(guest.used().len(), 3);
    }

    #[test]
    fn busy_polling_stops_once_idle_and_at_the_end_of_each_slice() {
        let guest = tx_guest(0);
        let mut r = rig(&guest, 1, Some(Duration::ZERO));
        r.pair.set_ring_enabled(false, true);
        r.pair.tx.take_rescheduled();
        let (rx, tx) = (&r.vrings[0], &r.vrings[1]);
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(!r.pair.poll_once(rx, tx, later).unwrap(), "idle");
        assert!(!r.pair.tx.take_rescheduled(), "idle: the worker sleeps");

        let mut r = rig(&guest, 1, Some(Duration::from_secs(3600)));
        let (rx, tx) = (&r.vrings[0], &r.vrings[1]);
        assert!(
            r.pair.poll_once(rx, tx, later).unwrap(),
            "neither idle nor at the slice end"
        );
        assert!(
            !r.pair.poll_once(rx, tx, Instant::now()).unwrap(),
            "slice end"
        );
        assert!(r.pair.tx.take_rescheduled(), "the worker comes back");
    }
}
