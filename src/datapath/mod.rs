//! The datapath of one queue pair: its packet socket, RX and TX state, counters, and the events
//! that drive them. Each pair is owned by one worker thread; nothing here is shared between
//! pairs.

pub mod mac;
pub mod offload;
pub mod rx;
pub mod segment;
#[cfg(test)]
mod test_ring;
pub mod tx;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::packet::error::PacketError;
use crate::packet::socket::PacketSocket;
use crate::stats::PairStats;
use crate::virtio::features::Negotiated;
pub use mac::{GuestMac, MacPolicy};
use rx::{RxContext, RxOutcome, RxPath};
use tx::{TxContext, TxOutcome, TxPath};

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

/// One RX/TX queue pair.
pub struct QueuePair {
    index: usize,
    /// Shared with the device's `GuestMac`, which sets its membership and filter.
    socket: Arc<PacketSocket>,
    /// A second descriptor for the socket, registered for EPOLLOUT only while TX is blocked
    /// (one epoll registration per descriptor, and readability is registered separately).
    writable_fd: OwnedFd,
    /// Self-notification when TX stops for fairness with work left.
    resched: EventFd,
    ids: EventIds,
    registry: Option<Weak<dyn EventRegistry>>,
    rx_armed: bool,
    tx_armed: bool,
    /// The frontend's SET_VRING_ENABLE state of each ring. vhost-user-backend's own flag is
    /// kept set once the frontend said anything (see `relay.rs`), so that kicks of a disabled
    /// TX ring still reach us: its chains must be consumed and discarded.
    rx_enabled: bool,
    tx_enabled: bool,
    mem: Option<GuestMemory>,
    features: Negotiated,
    rx: RxPath,
    tx: TxPath,
    stats: PairStats,
    guest_mac: Arc<GuestMac>,
    /// The guest broke a ring (avail index beyond reach): logged and counted once.
    rx_broken: bool,
    tx_broken: bool,
    /// RX waits for the guest to add buffers beyond this avail index (the socket is not
    /// polled meanwhile).
    rx_wants_beyond: Option<u16>,
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

/// Most frames thrown away at once when an RX ring is disabled. With one pair nothing steers
/// frames away from its socket, so under a flood the queue would never end; what is left is
/// dropped by the kernel once the socket buffer is full, as for any pair without buffers.
const DISCARD_LIMIT: usize = 1 << 16;

/// What a worker was doing when it failed (see `worker_failure`).
const CALL_RX: &str = "signalling the guest (RX call eventfd)";
const CALL_TX: &str = "signalling the guest (TX call eventfd)";
const RESCHEDULE: &str = "waking itself (reschedule eventfd)";

/// A failure that ends the worker, and with it the connection (see
/// `NetBackend::handle_event`): counted, and named by what it interrupted. A frontend that
/// never reads its call eventfd gets EAGAIN here once the counter is full.
fn worker_failure(counter: &mut u64, action: &str, source: io::Error) -> io::Error {
    *counter += 1;
    io::Error::new(source.kind(), format!("{action}: {source}"))
}

/// A ring whose avail index is more than a queue size ahead of what was consumed cannot be
/// used (virtio-queue refuses every chain, yet keeps reporting work: a busy loop otherwise).
fn ring_broken(queue: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> bool {
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx.0.wrapping_sub(queue.next_avail()) > queue.size(),
        Err(_) => true,
    }
}

impl QueuePair {
    /// Errors are those of `dup(2)` and `eventfd(2)`.
    pub fn new(
        index: usize,
        socket: Arc<PacketSocket>,
        ids: EventIds,
        guest_mac: Arc<GuestMac>,
        busy_poll: Option<Duration>,
    ) -> io::Result<QueuePair> {
        let writable_fd = socket.try_clone()?;
        let resched = EventFd::new(EFD_NONBLOCK)?;
        Ok(QueuePair {
            index,
            socket,
            writable_fd,
            resched,
            ids,
            registry: None,
            rx_armed: false,
            tx_armed: false,
            rx_enabled: false,
            tx_enabled: false,
            mem: None,
            features: Negotiated::default(),
            rx: RxPath::default(),
            tx: TxPath::default(),
            stats: PairStats::default(),
            guest_mac,
            rx_broken: false,
            tx_broken: false,
            rx_wants_beyond: None,
            busy_poll: busy_poll.map(|idle| BusyPoll {
                idle,
                last_work: Instant::now(),
            }),
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn socket(&self) -> &PacketSocket {
        &self.socket
    }

    /// Counters, with the kernel's drop count for this socket folded in.
    pub fn stats(&mut self) -> PairStats {
        if let Ok((_, drops)) = self.socket.drops() {
            self.stats.rx_drop_no_buffers += u64::from(drops);
        }
        self.stats
    }

    /// A new frontend connection: its worker's epoll handler.
    pub fn attach(&mut self, registry: Weak<dyn EventRegistry>) {
        self.detach();
        if let Some(r) = registry.upgrade() {
            if let Err(e) = r.register(
                self.resched.as_raw_fd(),
                EventSet::IN,
                self.ids.resched.into(),
            ) {
                warn!(
                    "queue pair {}: registering the reschedule event: {e}",
                    self.index
                );
            }
        }
        self.registry = Some(registry);
    }

    /// The connection is gone: forget its rings, memory and registrations.
    pub fn detach(&mut self) {
        self.disarm_rx();
        self.disarm_tx();
        if let Some(r) = self.registry.take().and_then(|w| w.upgrade()) {
            let _ = r.unregister(
                self.resched.as_raw_fd(),
                EventSet::IN,
                self.ids.resched.into(),
            );
        }
        self.mem = None;
        self.features = Negotiated::default();
        self.rx_enabled = false;
        self.tx_enabled = false;
        self.rx_broken = false;
        self.tx_broken = false;
        self.rx_wants_beyond = None;
        self.stats.rx_drop_disabled += self.rx.reset();
        self.tx.reset();
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
    /// them at SET_FEATURES without PROTOCOL_FEATURES).
    ///
    /// A disabled RX ring gets no frames: the socket is no longer polled, and what it holds
    /// when the ring is disabled or enabled again is thrown away (counted), and so is the rest
    /// of a half-delivered GSO frame. Frames that came
    /// while the ring was off are not for the guest (a disabled NIC queue drops them), and
    /// the first could otherwise arrive after later frames of the same flows that the fanout
    /// handed to other pairs meanwhile. A disabled TX ring is drained and its chains
    /// discarded, now and on every kick. Enabling either direction lets the worker look at
    /// once, so nothing waits for the next kick. Repeating the current state changes nothing.
    pub fn set_ring_enabled(&mut self, rx: bool, enabled: bool) {
        if rx {
            if std::mem::replace(&mut self.rx_enabled, enabled) != enabled {
                let n = self.socket.discard_queued(DISCARD_LIMIT);
                self.stats.rx_drop_disabled += n as u64 + self.rx.drop_pending();
            }
            if enabled {
                self.arm_rx();
            } else {
                self.disarm_rx();
            }
        } else {
            self.tx_enabled = enabled;
            if let Err(e) = self.resched.write(1) {
                warn!("queue pair {}: waking the worker: {e}", self.index);
            }
        }
    }

    /// Whether the frontend has the RX and TX rings enabled.
    pub fn rings_enabled(&self) -> (bool, bool) {
        (self.rx_enabled, self.tx_enabled)
    }

    /// GET_VRING_BASE stopped one of our rings. Nothing is staged between passes (every pass
    /// gives back the chains it did not fill), so `next_avail` is already exact. The frontend
    /// may set the ring up again on this connection from index 0 for a new driver (guest
    /// reboot, driver reload, kexec): stop listening for what fed it, and forget everything
    /// about the old ring (interrupt state, broken flag, a half-delivered GSO frame).
    pub fn stop_ring(&mut self, rx: bool) {
        if rx {
            self.disarm_rx();
            self.rx_broken = false;
            self.rx_wants_beyond = None;
            self.stats.rx_drop_disabled += self.rx.reset();
        } else {
            self.disarm_tx();
            self.tx_broken = false;
            self.tx.reset();
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
                self.disarm_tx();
                self.process_tx(tx_vring)
            }
            e if e == self.ids.resched => {
                let _ = self.resched.read();
                self.process_tx(tx_vring)
            }
            other => {
                debug!("queue pair {}: ignoring event {other}", self.index);
                Ok(())
            }
        }
    }

    /// `look_first`: the socket has frames (rather than the guest new buffers); see
    /// `RxContext::look_first`.
    fn process_rx(&mut self, vring: &VringRwLock, look_first: bool) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            self.disarm_rx();
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() || !self.rx_enabled {
            drop(state);
            self.disarm_rx();
            return Ok(());
        }
        // Whatever woke us, the guest need not kick RX while we are consuming its buffers.
        let _ = state.get_queue_mut().disable_notification(&*mem);
        loop {
            if ring_broken(state.get_queue(), &mem) {
                if !std::mem::replace(&mut self.rx_broken, true) {
                    self.stats.rx_drop_bad_chain += 1;
                    warn!("queue pair {}: the guest broke its RX ring (avail index beyond the queue); not using it until it is put right", self.index);
                }
                drop(state);
                self.disarm_rx();
                return Ok(());
            }
            self.rx_broken = false;
            let pass = self.rx.process(&mut RxContext {
                queue: state.get_queue_mut(),
                mem: &mem,
                socket: &*self.socket,
                features: self.features,
                stats: &mut self.stats,
                look_first,
            });
            if pass.notify {
                state
                    .signal_used_queue()
                    .map_err(|e| worker_failure(&mut self.stats.rx_worker_errors, CALL_RX, e))?;
            }
            match pass.outcome {
                RxOutcome::Drained | RxOutcome::Budget => {
                    drop(state);
                    self.arm_rx();
                    return Ok(());
                }
                RxOutcome::NeedBuffers => {
                    // Ask for a kick when the guest adds buffers beyond those we have seen;
                    // if it added some meanwhile, carry on.
                    let queue = state.get_queue_mut();
                    let rewound = queue.next_avail();
                    queue.set_next_avail(pass.avail_seen);
                    let more = queue.enable_notification(&*mem).unwrap_or(false);
                    queue.set_next_avail(rewound);
                    if !more {
                        drop(state);
                        // Stop polling: the kernel queues (then drops and counts) meanwhile.
                        self.disarm_rx();
                        self.rx_wants_beyond = Some(pass.avail_seen);
                        return Ok(());
                    }
                    let _ = queue.disable_notification(&*mem);
                }
            }
        }
    }

    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        if !self.tx_enabled {
            drop(state);
            self.disarm_tx();
            return self.discard_tx(vring);
        }
        if self.tx_armed {
            return Ok(());
        }
        loop {
            if !self.tx_ring_usable(state.get_queue(), &mem) {
                return Ok(());
            }
            let _ = state.get_queue_mut().disable_notification(&*mem);
            let pass = self.tx.process(&mut TxContext {
                queue: state.get_queue_mut(),
                mem: &mem,
                socket: &*self.socket,
                features: self.features,
                stats: &mut self.stats,
                source_mac: self.guest_mac.source_check(),
            });
            if pass.notify {
                state
                    .signal_used_queue()
                    .map_err(|e| worker_failure(&mut self.stats.tx_worker_errors, CALL_TX, e))?;
            }
            match pass.outcome {
                // A busy-polling worker looks again without being kicked; it turns
                // notifications back on when it stops polling.
                TxOutcome::Drained if self.busy_poll.is_some() => return Ok(()),
                TxOutcome::Drained => {
                    if !state
                        .get_queue_mut()
                        .enable_notification(&*mem)
                        .unwrap_or(false)
                    {
                        return Ok(());
                    }
                }
                TxOutcome::Blocked => {
                    drop(state);
                    self.arm_tx();
                    return Ok(());
                }
                TxOutcome::Budget => {
                    // Let RX and other pairs' events run; come back through the eventfd.
                    self.reschedule()?;
                    return Ok(());
                }
            }
        }
    }

    /// False while the guest's TX ring is broken (avail index beyond the queue); counted and
    /// logged once each time it breaks.
    fn tx_ring_usable(&mut self, queue: &virtio_queue::Queue, mem: &GuestMemoryMmap) -> bool {
        if ring_broken(queue, mem) {
            if !std::mem::replace(&mut self.tx_broken, true) {
                self.stats.tx_drop_malformed += 1;
                warn!("queue pair {}: the guest broke its TX ring (avail index beyond the queue); not using it until it is put right", self.index);
            }
            return false;
        }
        self.tx_broken = false;
        true
    }

    /// Consumes and discards what the guest put on its disabled TX ring.
    fn discard_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !self.tx_ring_usable(state.get_queue(), &mem) {
            return Ok(());
        }
        let _ = state.get_queue_mut().disable_notification(&*mem);
        let pass = self.tx.discard(&mut TxContext {
            queue: state.get_queue_mut(),
            mem: &mem,
            socket: &*self.socket,
            features: self.features,
            stats: &mut self.stats,
            source_mac: None,
        });
        if pass.notify {
            state
                .signal_used_queue()
                .map_err(|e| worker_failure(&mut self.stats.tx_worker_errors, CALL_TX, e))?;
        }
        if pass.outcome == TxOutcome::Budget {
            self.reschedule()?;
        } else if state
            .get_queue_mut()
            .enable_notification(&*mem)
            .unwrap_or(false)
        {
            // The guest added chains while notifications were off: come back for them.
            self.reschedule()?;
        }
        Ok(())
    }

    /// Comes back to TX through the reschedule eventfd, after the other events.
    fn reschedule(&mut self) -> io::Result<()> {
        self.resched
            .write(1)
            .map_err(|e| worker_failure(&mut self.stats.tx_worker_errors, RESCHEDULE, e))
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
        if self.tx_has_work(tx_vring) {
            self.process_tx(tx_vring)?;
            worked = true;
        }
        if self.rx_has_work(rx_vring) {
            // Armed: the socket has frames; otherwise the guest added the buffers RX waited for.
            let look_first = self.rx_armed;
            self.process_rx(rx_vring, look_first)?;
            worked = true;
        }
        if worked {
            self.note_work();
        }
        let now = Instant::now();
        let last_work = self.busy_poll.map_or(now, |b| b.last_work);
        if now.duration_since(last_work) >= idle {
            if self.tx_notifications_on(tx_vring) && !self.tx_broken {
                // The guest added chains while it was not kicking: poll on.
                self.note_work();
                return Ok(true);
            }
            return Ok(false);
        }
        if now >= slice_end {
            self.reschedule()?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Chains wait on the TX ring and TX may send.
    fn tx_has_work(&self, vring: &VringRwLock) -> bool {
        // A broken ring is looked at again when the guest kicks.
        if self.tx_armed || !self.tx_enabled || self.tx_broken {
            return false;
        }
        self.avail_beyond(vring, None)
    }

    /// Frames wait on the socket for an RX ring with buffers, or the guest added the buffers
    /// RX was waiting for.
    fn rx_has_work(&self, vring: &VringRwLock) -> bool {
        if !self.rx_enabled || self.rx_broken {
            return false;
        }
        if self.rx_armed {
            return self.socket.readable().unwrap_or(false);
        }
        self.rx_wants_beyond
            .is_some_and(|seen| self.avail_beyond(vring, Some(seen)))
    }

    /// The ring's avail index differs from `seen` (default: what was consumed).
    fn avail_beyond(&self, vring: &VringRwLock, seen: Option<u16>) -> bool {
        let Some(atomic) = self.mem.as_ref() else {
            return false;
        };
        let state = vring.get_ref();
        let queue = state.get_queue();
        if !queue.ready() || !state.is_enabled() {
            return false;
        }
        let seen = seen.unwrap_or_else(|| queue.next_avail());
        queue
            .avail_idx(&*atomic.memory(), std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != seen)
    }

    /// Asks the guest to kick TX again; true if it added chains meanwhile.
    fn tx_notifications_on(&self, vring: &VringRwLock) -> bool {
        let Some(atomic) = self.mem.as_ref() else {
            return false;
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || self.tx_armed {
            return false;
        }
        state
            .get_queue_mut()
            .enable_notification(&*atomic.memory())
            .unwrap_or(false)
    }

    fn registry(&self) -> Option<std::sync::Arc<dyn EventRegistry>> {
        self.registry.as_ref().and_then(|w| w.upgrade())
    }

    fn arm_rx(&mut self) {
        self.rx_wants_beyond = None;
        self.watch(Watch::Readable, true);
    }

    fn disarm_rx(&mut self) {
        self.watch(Watch::Readable, false);
    }

    fn arm_tx(&mut self) {
        self.watch(Watch::Writable, true);
    }

    fn disarm_tx(&mut self) {
        self.watch(Watch::Writable, false);
    }

    /// Starts or stops polling the socket for one condition; a no-op if already so.
    fn watch(&mut self, which: Watch, on: bool) {
        let (armed, fd, events, id) = match which {
            Watch::Readable => (
                self.rx_armed,
                self.socket.as_raw_fd(),
                EventSet::IN,
                self.ids.socket_readable,
            ),
            Watch::Writable => (
                self.tx_armed,
                self.writable_fd.as_raw_fd(),
                EventSet::OUT,
                self.ids.socket_writable,
            ),
        };
        if armed == on {
            return;
        }
        let Some(registry) = self.registry() else {
            // No connection: nothing is polled, and that is the state to record.
            if !on {
                self.set_armed(which, false);
            }
            return;
        };
        let result = if on {
            registry.register(fd, events, id.into())
        } else {
            registry.unregister(fd, events, id.into())
        };
        match result {
            Ok(()) => self.set_armed(which, on),
            // Unregistering can only fail if the epoll set is gone with its connection.
            Err(_) if !on => self.set_armed(which, false),
            Err(e) => warn!("queue pair {}: polling the packet socket: {e}", self.index),
        }
    }

    fn set_armed(&mut self, which: Watch, on: bool) {
        match which {
            Watch::Readable => self.rx_armed = on,
            Watch::Writable => self.tx_armed = on,
        }
    }
}

/// What a queue pair may poll its packet socket for.
#[derive(Clone, Copy, Debug)]
enum Watch {
    /// Frames to receive (only while the guest has RX buffers).
    Readable,
    /// Room to send (only while TX is blocked).
    Writable,
}
