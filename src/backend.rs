//! The `VhostUserBackend` implementation: features, configuration space, memory, and event
//! dispatch to the queue pairs.
//!
//! The backend itself holds no lock on the hot path: each queue pair has its own mutex, taken
//! by that pair's worker thread (and briefly by the protocol thread on configuration changes).

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringEpollHandler, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::affinity;
use crate::config::MacAddr;
use crate::datapath::{EventRegistry, GuestMac, GuestMemory, QueuePair, BUSY_SLICE};
use crate::packet::fanout::{FanoutHandle, Steering};
use crate::packet::socket::VNET_HDR_MRG_LEN;
use crate::relay::RingSwitch;
use crate::stats::PairStats;
use crate::virtio::config_space::NetConfigSpace;
use crate::virtio::features::{self, Negotiated};
use crate::wire::rarp;

impl EventRegistry for VringEpollHandler<NetBackend> {
    fn register(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.register_listener(fd, events, data)
    }

    fn unregister(&self, fd: RawFd, events: EventSet, data: u64) -> io::Result<()> {
        self.unregister_listener(fd, events, data)
    }
}

struct Shared {
    /// parking_lot's mutex for `unlock_fair` (see `poll_busily`).
    pairs: Vec<parking_lot::Mutex<QueuePair>>,
    /// Which pairs receive. Only the control path takes this lock (the relay and protocol
    /// threads), always before a pair's; workers never do.
    steering: Mutex<Steering>,
    features: u64,
    queue_size: usize,
    config: Mutex<NetConfigSpace>,
    /// The config space's MAC at start (`--mac` or the derived one): each connection starts
    /// from it, whatever the last one set.
    config_mac: MacAddr,
    /// The MAC TX enforces and RX filters by: one per device, for every pair.
    guest_mac: Arc<GuestMac>,
    acked: AtomicU64,
    /// `--cpu-affinity`: CPUs for the workers, pair i on `cpus[i % len]`.
    affinity: Option<Vec<usize>>,
    /// Ends the current connection from a worker (see `handle_event`); `None` between
    /// connections and once a worker used it.
    connection: Mutex<Option<ShutdownHandle>>,
}

/// The vhost-user net backend. Cloning shares it: one instance serves every connection in turn,
/// keeping its packet sockets.
#[derive(Clone)]
pub struct NetBackend {
    shared: Arc<Shared>,
}

impl NetBackend {
    /// `group`: the pairs' fanout group, when there is more than one pair. `guest_mac`: the
    /// one the pairs share. `affinity`: CPUs for the workers, pair i on `affinity[i % len]`.
    pub fn new(
        pairs: Vec<QueuePair>,
        group: Option<FanoutHandle>,
        guest_mac: Arc<GuestMac>,
        features: u64,
        queue_size: u16,
        config: NetConfigSpace,
        affinity: Option<Vec<usize>>,
    ) -> NetBackend {
        let steering = Steering::new(group, pairs.len());
        NetBackend {
            shared: Arc::new(Shared {
                pairs: pairs.into_iter().map(parking_lot::Mutex::new).collect(),
                steering: Mutex::new(steering),
                features,
                queue_size: queue_size.into(),
                config_mac: config.mac,
                config: Mutex::new(config),
                guest_mac,
                acked: AtomicU64::new(0),
                affinity,
                connection: Mutex::new(None),
            }),
        }
    }

    /// A pair, for its worker or the control path. A worker that panicked while holding the
    /// lock leaves the pair usable (parking_lot does not poison): its state is plain data,
    /// rebuilt on the next connection.
    fn pair(&self, index: usize) -> Option<parking_lot::MutexGuard<'_, QueuePair>> {
        self.shared.pairs.get(index).map(|m| m.lock())
    }

    /// `--busy-poll-us`: the worker polls its pair until it is idle, taking the pair's lock
    /// for one round at a time. A mutex is not fair, and a worker that took it straight back
    /// could keep the control path (vhost-user messages, counters) out for as long as it
    /// polls; so each round ends with a fair unlock, which hands the lock to a waiting
    /// thread first.
    fn poll_busily(&self, index: usize, vrings: &[VringRwLock]) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        let slice_end = Instant::now() + BUSY_SLICE;
        loop {
            let Some(mut pair) = self.pair(index) else {
                return Ok(());
            };
            if !pair.poll_once(rx, tx, slice_end)? {
                return Ok(());
            }
            parking_lot::MutexGuard::unlock_fair(pair);
            std::hint::spin_loop();
        }
    }

    /// A frontend connected: hand each pair its worker's epoll handler.
    pub fn attach(&self, handlers: &[Arc<VringEpollHandler<NetBackend>>]) {
        for (i, h) in handlers.iter().enumerate() {
            let weak: Weak<dyn EventRegistry> =
                Arc::downgrade(h) as Weak<VringEpollHandler<NetBackend>>;
            if let Some(mut p) = self.pair(i) {
                p.attach(weak);
            }
        }
    }

    fn steering(&self) -> MutexGuard<'_, Steering> {
        self.shared
            .steering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The frontend went away: forget its memory, rings and registrations.
    pub fn detach(&self) {
        {
            let mut steering = self.steering();
            steering.set_all(false);
            steering.set_mq(false);
        }
        for i in 0..self.shared.pairs.len() {
            if let Some(mut p) = self.pair(i) {
                p.detach();
            }
        }
        self.config().mac = self.shared.config_mac;
        self.shared.guest_mac.connection_ended();
        self.shared.acked.store(0, Ordering::Relaxed);
    }

    /// The MTU the config space offers, read when the guest probes the device (each
    /// connection); the interface's MTU changed.
    pub fn set_offered_mtu(&self, mtu: u16) {
        self.shared
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mtu = mtu;
    }

    /// A connection started: how a failing worker ends it.
    pub fn connected(&self, handle: Option<ShutdownHandle>) {
        *self.connection() = handle;
    }

    /// The connection ended. True if a failing worker ended it.
    pub fn disconnected(&self) -> bool {
        self.connection().take().is_none()
    }

    fn connection(&self) -> MutexGuard<'_, Option<ShutdownHandle>> {
        self.shared
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// One event for pair `index`'s worker.
    fn handle_pair_event(
        &self,
        index: usize,
        device_event: u16,
        vrings: &[VringRwLock],
    ) -> io::Result<()> {
        let Some(mut pair) = self.pair(index) else {
            return Ok(());
        };
        pair.handle_event(device_event, vrings)?;
        if pair.busy_polling() {
            drop(pair);
            self.poll_busily(index, vrings)?;
        }
        Ok(())
    }

    fn config(&self) -> MutexGuard<'_, NetConfigSpace> {
        self.shared.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The MAC the guest sends from and receives for; `None` while it is being learned.
    pub fn guest_mac(&self) -> Option<MacAddr> {
        self.shared.guest_mac.current().map(MacAddr)
    }

    /// Whether each pair's (RX, TX) rings are enabled.
    pub fn rings_enabled(&self) -> Vec<(bool, bool)> {
        (0..self.shared.pairs.len())
            .filter_map(|i| self.pair(i).map(|p| p.rings_enabled()))
            .collect()
    }

    pub fn stats(&self) -> Vec<PairStats> {
        (0..self.shared.pairs.len())
            .filter_map(|i| self.pair(i).map(|mut p| p.stats()))
            .collect()
    }

    /// Features the current frontend acked (0 when none is connected).
    pub fn acked_features(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// One line per pair, then (with several) one for all of them.
    pub fn log_stats(&self, why: &str) {
        let stats = self.stats();
        for (i, s) in stats.iter().enumerate() {
            info!("{why}: queue pair {i}: {s}");
        }
        if stats.len() > 1 {
            let n = stats.len();
            let total: PairStats = stats.into_iter().sum();
            info!("{why}: all {n} queue pairs: {total}");
        }
    }
}

impl RingSwitch for NetBackend {
    fn ring_count(&self) -> u32 {
        2 * self.shared.pairs.len() as u32
    }

    fn queue_size_limit(&self) -> u32 {
        self.shared.queue_size as u32
    }

    fn reset(&self) {
        info!("RESET_OWNER: the pairs forget the acked features and ring states");
        let mut steering = self.steering();
        steering.set_all(false);
        steering.set_mq(false);
        for i in 0..self.shared.pairs.len() {
            if let Some(mut p) = self.pair(i) {
                p.set_ring_enabled(true, false);
                p.set_ring_enabled(false, false);
                if let Err(e) = p.set_features(Negotiated::default()) {
                    warn!("queue pair {i}: {e}");
                }
            }
        }
        self.shared.acked.store(0, Ordering::Relaxed);
    }

    fn set_ring_enabled(&self, index: u32, enabled: bool) {
        let (pair, rx) = (index as usize / 2, index % 2 == 0);
        debug!(
            "queue pair {pair}: {} ring {}",
            if rx { "RX" } else { "TX" },
            if enabled { "enabled" } else { "disabled" }
        );
        // The pair empties its socket when its RX ring changes state. Steering changes around
        // that: a pair being disabled gets no more frames before, one being enabled gets new
        // ones only after, so that nothing fresh is thrown away.
        let mut steering = self.steering();
        if rx && !enabled {
            steering.set(pair, false);
        }
        if let Some(mut p) = self.pair(pair) {
            p.set_ring_enabled(rx, enabled);
        }
        if rx && enabled {
            steering.set(pair, true);
        }
    }

    fn announce(&self, mac: [u8; 6]) {
        self.shared.guest_mac.announced(mac);
        let Some(pair) = self.pair(0) else { return };
        let socket = pair.socket();
        // A header of zeros: no offload for a 60-byte frame.
        let header = [0u8; VNET_HDR_MRG_LEN];
        let frame = rarp::announcement(mac);
        let bufs = [
            IoSlice::new(&header[..socket.kernel_vnet_header_len()]),
            IoSlice::new(&frame),
        ];
        match socket.send_vectored(&bufs) {
            Ok(_) => info!(
                "SEND_RARP: announced {} on {} (RARP)",
                MacAddr(mac),
                socket.interface_name()
            ),
            Err(e) => warn!(
                "SEND_RARP: sending the RARP announcement of {} on {}: {e}",
                MacAddr(mac),
                socket.interface_name()
            ),
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.shared.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        self.shared.queue_size
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn acked_features(&self, acked: u64) {
        self.shared.acked.store(acked, Ordering::Relaxed);
        let negotiated = Negotiated::new(acked);
        info!(
            "frontend acked features {:#x}: {} ({}-byte headers)",
            acked,
            features::describe(acked),
            negotiated.header_len()
        );
        for i in 0..self.shared.pairs.len() {
            if let Some(mut p) = self.pair(i) {
                if let Err(e) = p.set_features(negotiated) {
                    warn!("queue pair {i}: {e}");
                }
            }
        }
        self.steering().set_mq(negotiated.mq());
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: every ring is enabled now
        // (vhost-user-backend does the same with its own flags).
        if acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for index in 0..self.ring_count() {
                self.set_ring_enabled(index, true);
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        features::offered_protocol()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Read from the acked features by the datapath (see `Negotiated::event_idx`).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let changed = self.config().write(offset, buf).map_err(io::Error::other)?;
        if let Some(mac) = changed {
            info!("frontend set the guest MAC to {mac}");
            if let Err(e) = self.shared.guest_mac.set_by_frontend(mac.0) {
                warn!("following the guest MAC {mac}: {e}");
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        {
            let guard = mem.memory();
            let regions = guard.num_regions();
            let bytes: u64 = guard.iter().map(|r| r.len()).sum();
            info!(
                "frontend memory table: {regions} regions, {} MiB",
                bytes >> 20
            );
        }
        for i in 0..self.shared.pairs.len() {
            if let Some(mut p) = self.pair(i) {
                p.set_memory(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per pair: RX queue 2i and TX queue 2i+1 (a u64 mask each, hence at most
        // 32 pairs, `config::MAX_QUEUE_PAIRS`).
        (0..self.shared.pairs.len())
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // The crate signals it when the connection's handler is dropped, ending that worker.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let q = queue_index as usize;
        if let Some(mut p) = self.pair(q / 2) {
            p.stop_ring(q % 2 == 0);
        }
        // The device is being reset: the guest may come back with another MAC.
        self.shared.guest_mac.rings_stopped();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if let Some(cpus) = &self.shared.affinity {
            affinity::pin_worker_once(cpus, thread_id);
        }
        let result = self.handle_pair_event(thread_id, device_event, vrings);
        if let Err(e) = &result {
            // The error ends this worker (vhost-user-backend's loop returns), and the pair
            // would stay dead for the rest of the connection. End the connection instead:
            // the frontend reconnects (QEMU's reconnect=N) and gets fresh workers.
            error!("queue pair {thread_id}: the worker failed {e}; ending the connection so that the frontend reconnects");
            if let Some(connection) = self.connection().take() {
                connection.shutdown();
            }
        }
        result
    }
}
