//! The two directions of a queue pair, each owning its ring's state: whether the frontend has
//! it enabled, whether the socket is polled for it, whether the guest broke it, and its pass
//! scratch (`RxPath`, `TxPath`). Both are generic over the socket's I/O traits and over
//! `EventRegistry`, so that a pair can be driven in tests without a packet socket.
//!
//! vhost-user-backend's own per-ring flag (`VringT::is_enabled`) is not the enable state: the
//! relay keeps it set once the frontend spoke about the ring (see `relay.rs`), so that kicks of
//! a disabled TX ring still reach us. The `enabled` fields here are the only real one.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Weak;

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rx::{FrameSource, RxContext, RxOutcome, RxPath};
use super::tx::{FrameSink, TxContext, TxOutcome, TxPath};
use super::{EventRegistry, GuestMac, GuestMemory};
use crate::packet::error::PacketError;
use crate::packet::socket::PacketSocket;
use crate::stats::PairStats;
use crate::virtio::features::Negotiated;

/// Most frames thrown away at once when an RX ring is disabled. With one pair nothing steers
/// frames away from its socket, so under a flood the queue would never end; what is left is
/// dropped by the kernel once the socket buffer is full, as for any pair without buffers.
pub const DISCARD_LIMIT: usize = 1 << 16;

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

/// The packet socket as a pair uses it besides receiving and sending.
pub trait PairSocket: FrameSource + FrameSink + AsRawFd {
    /// A second descriptor for the same socket (see `TxQueue::writable`).
    fn try_clone(&self) -> io::Result<OwnedFd>;
    /// Frames are queued (or an error is pending).
    fn readable(&self) -> io::Result<bool>;
    /// Throws away up to `max` queued frames; returns how many.
    fn discard_queued(&self, max: usize) -> usize;
    /// The kernel's drop count since the last call.
    fn drops(&self) -> io::Result<u32>;
    fn set_vnet_header_len(&self, len: usize) -> Result<(), PacketError>;
}

impl PairSocket for PacketSocket {
    fn try_clone(&self) -> io::Result<OwnedFd> {
        PacketSocket::try_clone(self)
    }

    fn readable(&self) -> io::Result<bool> {
        PacketSocket::readable(self)
    }

    fn discard_queued(&self, max: usize) -> usize {
        PacketSocket::discard_queued(self, max)
    }

    fn drops(&self) -> io::Result<u32> {
        PacketSocket::drops(self).map(|(_, drops)| drops)
    }

    fn set_vnet_header_len(&self, len: usize) -> Result<(), PacketError> {
        PacketSocket::set_vnet_header_len(self, len)
    }
}

/// What both directions use of their pair for one call.
pub struct PairEnv<'a, S: ?Sized, R: ?Sized> {
    pub index: usize,
    pub socket: &'a S,
    pub registry: Option<&'a Weak<R>>,
    pub mem: Option<&'a GuestMemory>,
    pub features: Negotiated,
    pub stats: &'a mut PairStats,
}

/// One descriptor polled for one condition, registered only while wanted.
struct Watch {
    fd: RawFd,
    events: EventSet,
    id: u16,
    armed: bool,
}

impl Watch {
    /// Starts or stops polling; a no-op if already so.
    fn set<R: EventRegistry + ?Sized>(
        &mut self,
        registry: Option<&Weak<R>>,
        on: bool,
        pair: usize,
    ) {
        if self.armed == on {
            return;
        }
        let Some(registry) = registry.and_then(Weak::upgrade) else {
            // No connection: nothing is polled, and that is the state to record.
            self.armed = false;
            return;
        };
        let result = if on {
            registry.register(self.fd, self.events, self.id.into())
        } else {
            registry.unregister(self.fd, self.events, self.id.into())
        };
        match result {
            Ok(()) => self.armed = on,
            // Unregistering can only fail if the epoll set is gone with its connection.
            Err(_) if !on => self.armed = false,
            Err(e) => warn!("queue pair {pair}: polling the packet socket: {e}"),
        }
    }
}

/// Whether the guest broke a ring: logged and counted once each time it breaks.
#[derive(Default)]
struct RingHealth {
    broken: bool,
}

impl RingHealth {
    /// False while the ring's avail index is more than a queue size ahead of what was
    /// consumed: virtio-queue refuses every chain then, yet keeps reporting work (a busy loop
    /// otherwise). `counter` counts each break.
    fn usable(
        &mut self,
        queue: &Queue,
        mem: &GuestMemoryMmap,
        counter: &mut u64,
        pair: usize,
        ring: &str,
    ) -> bool {
        let broken = match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0.wrapping_sub(queue.next_avail()) > queue.size(),
            Err(_) => true,
        };
        if broken && !std::mem::replace(&mut self.broken, true) {
            *counter += 1;
            warn!("queue pair {pair}: the guest broke its {ring} ring (avail index beyond the queue); not using it until it is put right");
        }
        self.broken = broken;
        !broken
    }
}

/// The ring's avail index differs from `seen` (default: what was consumed).
fn avail_beyond(vring: &VringRwLock, mem: Option<&GuestMemory>, seen: Option<u16>) -> bool {
    let Some(atomic) = mem else {
        return false;
    };
    let state = vring.get_ref();
    let queue = state.get_queue();
    if !queue.ready() || !state.is_enabled() {
        return false;
    }
    let seen = seen.unwrap_or_else(|| queue.next_avail());
    queue
        .avail_idx(&*atomic.memory(), Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != seen)
}

/// The RX direction: frames from the socket into the guest's buffers.
pub struct RxQueue {
    /// The frontend's SET_VRING_ENABLE state of the ring.
    enabled: bool,
    /// The socket, polled for frames only while the guest has buffers.
    readable: Watch,
    health: RingHealth,
    /// RX waits for the guest to add buffers beyond this avail index (the socket is not
    /// polled meanwhile).
    wants_beyond: Option<u16>,
    path: RxPath,
}

impl RxQueue {
    pub fn new(socket_fd: RawFd, id: u16) -> RxQueue {
        RxQueue {
            enabled: false,
            readable: Watch {
                fd: socket_fd,
                events: EventSet::IN,
                id,
                armed: false,
            },
            health: RingHealth::default(),
            wants_beyond: None,
            path: RxPath::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn armed(&self) -> bool {
        self.readable.armed
    }

    /// A disabled ring gets no frames: the socket is no longer polled, and what it holds when
    /// the ring is disabled or enabled again is thrown away (counted), and so is the rest of a
    /// half-delivered GSO frame. Frames that came while the ring was off are not for the guest
    /// (a disabled NIC queue drops them), and the first could otherwise arrive after later
    /// frames of the same flows that the fanout handed to other pairs meanwhile.
    pub fn set_enabled<S: PairSocket + ?Sized, R: EventRegistry + ?Sized>(
        &mut self,
        env: PairEnv<'_, S, R>,
        enabled: bool,
    ) {
        if std::mem::replace(&mut self.enabled, enabled) != enabled {
            let n = env.socket.discard_queued(DISCARD_LIMIT);
            env.stats.rx_drop_disabled += n as u64 + self.path.drop_pending();
        }
        if enabled {
            self.arm(env.registry, env.index);
        } else {
            self.readable.set(env.registry, false, env.index);
        }
    }

    /// The ring was stopped (or its connection ended): forget everything about it but whether
    /// it is enabled (see `QueuePair::stop_ring`).
    pub fn stop<R: EventRegistry + ?Sized>(
        &mut self,
        registry: Option<&Weak<R>>,
        index: usize,
        stats: &mut PairStats,
    ) {
        self.readable.set(registry, false, index);
        self.health = RingHealth::default();
        self.wants_beyond = None;
        stats.rx_drop_disabled += self.path.reset();
    }

    /// The connection ended.
    pub fn detach<R: EventRegistry + ?Sized>(
        &mut self,
        registry: Option<&Weak<R>>,
        index: usize,
        stats: &mut PairStats,
    ) {
        self.stop(registry, index, stats);
        self.enabled = false;
    }

    fn arm<R: EventRegistry + ?Sized>(&mut self, registry: Option<&Weak<R>>, index: usize) {
        self.wants_beyond = None;
        self.readable.set(registry, true, index);
    }

    /// Frames wait on the socket for a ring with buffers, or the guest added the buffers RX
    /// was waiting for. Returns what to pass as `look_first`.
    pub fn has_work<S: PairSocket + ?Sized>(
        &self,
        vring: &VringRwLock,
        mem: Option<&GuestMemory>,
        socket: &S,
    ) -> Option<bool> {
        if !self.enabled || self.health.broken {
            return None;
        }
        if self.readable.armed {
            // Armed: the socket has frames; otherwise the guest added the buffers RX waited for.
            return socket.readable().unwrap_or(false).then_some(true);
        }
        self.wants_beyond
            .is_some_and(|seen| avail_beyond(vring, mem, Some(seen)))
            .then_some(false)
    }

    /// One turn of RX. `look_first`: the socket has frames (rather than the guest new
    /// buffers); see `RxContext::look_first`.
    pub fn process<S: PairSocket + ?Sized, R: EventRegistry + ?Sized>(
        &mut self,
        env: PairEnv<'_, S, R>,
        vring: &VringRwLock,
        look_first: bool,
    ) -> io::Result<()> {
        let Some(atomic) = env.mem else {
            self.readable.set(env.registry, false, env.index);
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() || !self.enabled {
            drop(state);
            self.readable.set(env.registry, false, env.index);
            return Ok(());
        }
        // Whatever woke us, the guest need not kick RX while we are consuming its buffers.
        let _ = state.get_queue_mut().disable_notification(&*mem);
        loop {
            if !self.health.usable(
                state.get_queue(),
                &mem,
                &mut env.stats.rx_drop_bad_chain,
                env.index,
                "RX",
            ) {
                drop(state);
                self.readable.set(env.registry, false, env.index);
                return Ok(());
            }
            let pass = self.path.process(&mut RxContext {
                queue: state.get_queue_mut(),
                mem: &mem,
                socket: env.socket,
                features: env.features,
                stats: env.stats,
                look_first,
            });
            if pass.notify {
                state
                    .signal_used_queue()
                    .map_err(|e| worker_failure(&mut env.stats.rx_worker_errors, CALL_RX, e))?;
            }
            match pass.outcome {
                RxOutcome::Drained | RxOutcome::Budget => {
                    drop(state);
                    self.arm(env.registry, env.index);
                    return Ok(());
                }
                RxOutcome::NeedBuffers => {
                    if !wait_for_buffers(state.get_queue_mut(), &mem, pass.avail_seen) {
                        drop(state);
                        // Stop polling: the kernel queues (then drops and counts) meanwhile.
                        self.readable.set(env.registry, false, env.index);
                        self.wants_beyond = Some(pass.avail_seen);
                        return Ok(());
                    }
                    let _ = state.get_queue_mut().disable_notification(&*mem);
                }
            }
        }
    }
}

/// Asks for a kick when the guest adds buffers beyond `avail_seen`, the avail index RX
/// looked up to (the pass gave back the chains it did not fill, so `next_avail` is behind
/// it). True if the guest added some meanwhile: carry on.
fn wait_for_buffers(queue: &mut Queue, mem: &GuestMemoryMmap, avail_seen: u16) -> bool {
    let rewound = queue.next_avail();
    queue.set_next_avail(avail_seen);
    let more = queue.enable_notification(mem).unwrap_or(false);
    queue.set_next_avail(rewound);
    more
}

/// The TX direction: the guest's chains onto the socket.
pub struct TxQueue {
    /// The frontend's SET_VRING_ENABLE state of the ring.
    enabled: bool,
    /// A second descriptor for the socket, registered for EPOLLOUT only while TX is blocked
    /// (one epoll registration per descriptor, and readability is registered separately).
    /// Owned here for as long as `writable` may register its number.
    _writable_fd: OwnedFd,
    writable: Watch,
    /// Self-notification when TX stops for fairness with work left.
    resched: EventFd,
    resched_id: u16,
    health: RingHealth,
    path: TxPath,
}

impl TxQueue {
    /// `writable_fd`: the socket's second descriptor. Errors are those of `eventfd(2)`.
    pub fn new(writable_fd: OwnedFd, writable_id: u16, resched_id: u16) -> io::Result<TxQueue> {
        Ok(TxQueue {
            enabled: false,
            writable: Watch {
                fd: writable_fd.as_raw_fd(),
                events: EventSet::OUT,
                id: writable_id,
                armed: false,
            },
            _writable_fd: writable_fd,
            resched: EventFd::new(EFD_NONBLOCK)?,
            resched_id,
            health: RingHealth::default(),
            path: TxPath::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn armed(&self) -> bool {
        self.writable.armed
    }

    /// Listens for its own reschedule event on a new connection.
    pub fn attach<R: EventRegistry + ?Sized>(&self, registry: &R, index: usize) {
        if let Err(e) = registry.register(
            self.resched.as_raw_fd(),
            EventSet::IN,
            self.resched_id.into(),
        ) {
            warn!("queue pair {index}: registering the reschedule event: {e}");
        }
    }

    /// The connection ended: forget the ring and the registrations.
    pub fn detach<R: EventRegistry + ?Sized>(&mut self, registry: Option<&Weak<R>>, index: usize) {
        self.stop(registry, index);
        if let Some(r) = registry.and_then(Weak::upgrade) {
            let _ = r.unregister(
                self.resched.as_raw_fd(),
                EventSet::IN,
                self.resched_id.into(),
            );
        }
        self.enabled = false;
    }

    /// A disabled ring is drained and its chains discarded, now and on every kick. Enabling
    /// lets the worker look at once, so nothing waits for the next kick.
    pub fn set_enabled(&mut self, enabled: bool, index: usize) {
        self.enabled = enabled;
        if let Err(e) = self.resched.write(1) {
            warn!("queue pair {index}: waking the worker: {e}");
        }
    }

    /// The ring was stopped: forget everything about it but whether it is enabled.
    pub fn stop<R: EventRegistry + ?Sized>(&mut self, registry: Option<&Weak<R>>, index: usize) {
        self.writable.set(registry, false, index);
        self.health = RingHealth::default();
        self.path.reset();
    }

    /// The socket became writable.
    pub fn writable<R: EventRegistry + ?Sized>(
        &mut self,
        registry: Option<&Weak<R>>,
        index: usize,
    ) {
        self.writable.set(registry, false, index);
    }

    /// Takes a pending reschedule; whether there was one.
    #[cfg(test)]
    pub fn take_rescheduled(&self) -> bool {
        self.resched.read().is_ok()
    }

    /// Our reschedule event came.
    pub fn rescheduled(&self) {
        let _ = self.resched.read();
    }

    /// Comes back to TX through the reschedule eventfd, after the other events.
    pub fn reschedule(&self, stats: &mut PairStats) -> io::Result<()> {
        self.resched
            .write(1)
            .map_err(|e| worker_failure(&mut stats.tx_worker_errors, RESCHEDULE, e))
    }

    /// Chains wait on the ring and TX may send. A broken ring is looked at again when the
    /// guest kicks.
    pub fn has_work(&self, vring: &VringRwLock, mem: Option<&GuestMemory>) -> bool {
        !self.writable.armed
            && self.enabled
            && !self.health.broken
            && avail_beyond(vring, mem, None)
    }

    /// Asks the guest to kick TX again; true if it added chains meanwhile (and the ring is
    /// usable).
    pub fn notifications_on(&self, vring: &VringRwLock, mem: Option<&GuestMemory>) -> bool {
        let Some(atomic) = mem else {
            return false;
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || self.writable.armed {
            return false;
        }
        state
            .get_queue_mut()
            .enable_notification(&*atomic.memory())
            .unwrap_or(false)
            && !self.health.broken
    }

    /// One turn of TX. `busy_poll`: the worker looks again without being kicked, and turns
    /// notifications back on when it stops polling.
    pub fn process<S: PairSocket + ?Sized, R: EventRegistry + ?Sized>(
        &mut self,
        env: PairEnv<'_, S, R>,
        vring: &VringRwLock,
        guest_mac: &GuestMac,
        busy_poll: bool,
    ) -> io::Result<()> {
        let Some(atomic) = env.mem else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        if !self.enabled {
            self.writable.set(env.registry, false, env.index);
            return self.discard(env, &mut state, &mem);
        }
        if self.writable.armed {
            return Ok(());
        }
        loop {
            if !self.health.usable(
                state.get_queue(),
                &mem,
                &mut env.stats.tx_drop_malformed,
                env.index,
                "TX",
            ) {
                return Ok(());
            }
            let _ = state.get_queue_mut().disable_notification(&*mem);
            let pass = self.path.process(&mut TxContext {
                queue: state.get_queue_mut(),
                mem: &mem,
                socket: env.socket,
                features: env.features,
                stats: env.stats,
                source_mac: guest_mac.source_check(),
            });
            if pass.notify {
                state
                    .signal_used_queue()
                    .map_err(|e| worker_failure(&mut env.stats.tx_worker_errors, CALL_TX, e))?;
            }
            match pass.outcome {
                TxOutcome::Drained if busy_poll => return Ok(()),
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
                    self.writable.set(env.registry, true, env.index);
                    return Ok(());
                }
                TxOutcome::Budget => {
                    // Let RX and other pairs' events run; come back through the eventfd.
                    return self.reschedule(env.stats);
                }
            }
        }
    }

    /// Consumes and discards what the guest put on its disabled ring.
    fn discard<S: PairSocket + ?Sized, R: ?Sized>(
        &mut self,
        env: PairEnv<'_, S, R>,
        state: &mut vhost_user_backend::VringState<GuestMemory>,
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        if !self.health.usable(
            state.get_queue(),
            mem,
            &mut env.stats.tx_drop_malformed,
            env.index,
            "TX",
        ) {
            return Ok(());
        }
        let _ = state.get_queue_mut().disable_notification(mem);
        let pass = self.path.discard(&mut TxContext {
            queue: state.get_queue_mut(),
            mem,
            socket: env.socket,
            features: env.features,
            stats: env.stats,
            source_mac: None,
        });
        if pass.notify {
            state
                .signal_used_queue()
                .map_err(|e| worker_failure(&mut env.stats.tx_worker_errors, CALL_TX, e))?;
        }
        if pass.outcome == TxOutcome::Budget
            || state
                .get_queue_mut()
                .enable_notification(mem)
                .unwrap_or(false)
        {
            // Budget, or the guest added chains while notifications were off: come back.
            self.reschedule(env.stats)?;
        }
        Ok(())
    }
}
