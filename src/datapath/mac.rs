//! The guest's MAC: the only source TX lets the guest send from, and the destination the RX
//! filter and the interface's unicast filter let through besides broadcast and multicast. It
//! belongs to the device, not to a queue pair: one `GuestMac` is shared by every pair.
//!
//! With `--mac` the MAC is known from the start. Without it, vhost-packet learns it from the
//! first frame with a unicast source the guest sends: QEMU never tells a vhost-user backend
//! the MAC its device was given, and DPDK's virtio-user without `mac=` makes one up. Until
//! then the guest receives broadcast and multicast only. A learned MAC is forgotten when the
//! frontend stops the rings (GET_VRING_BASE: the device is reset, and the guest may come back
//! with another MAC) and when the connection ends. A MAC the frontend sets (SET_CONFIG) holds
//! like `--mac` until the connection ends; then `--mac` (or learning) applies again.
//!
//! The pairs read the MAC with one atomic load per TX pass. The lock is taken only to change
//! it (learning, SET_CONFIG, a reset) and is a leaf: nothing else is locked under it, so a
//! worker may take it while holding its pair's lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};

use crate::config::MacAddr;
use crate::packet::error::PacketError;
use crate::packet::socket::{DestinationFilter, PacketSocket};

/// Which frames a guest may send and receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacPolicy {
    /// `--mac`; `None`: learned from the guest's frames.
    pub guest_mac: Option<[u8; 6]>,
    /// Deliver every frame, not only those for the guest, broadcast and multicast.
    pub promisc: bool,
    /// Let the guest send from any source MAC.
    pub allow_spoofing: bool,
}

/// Where the current MAC came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// `--mac`.
    Configured,
    /// SET_CONFIG.
    Frontend,
    /// The guest's first unicast-source frame.
    Learned,
}

struct State {
    /// Every pair's socket: each holds a unicast membership for `mac` and filters by it.
    sockets: Vec<Arc<PacketSocket>>,
    mac: Option<([u8; 6], Origin)>,
}

/// The device's guest MAC, shared by its queue pairs (see the module documentation).
pub struct GuestMac {
    policy: MacPolicy,
    /// `mac` of `State` as `KNOWN | mac`, 0 while not known: what TX reads without the lock.
    current: AtomicU64,
    state: Mutex<State>,
}

const KNOWN: u64 = 1 << 48;

fn pack(mac: Option<[u8; 6]>) -> u64 {
    mac.map_or(0, |m| {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&m);
        KNOWN | u64::from_be_bytes(b)
    })
}

fn unpack(v: u64) -> Option<[u8; 6]> {
    (v & KNOWN != 0).then(|| {
        let b = v.to_be_bytes();
        [b[2], b[3], b[4], b[5], b[6], b[7]]
    })
}

impl GuestMac {
    /// Gives every socket the membership and filter of the starting state (`--mac`, or none
    /// known yet).
    pub fn new(
        policy: MacPolicy,
        sockets: Vec<Arc<PacketSocket>>,
    ) -> Result<GuestMac, PacketError> {
        let mac = GuestMac {
            policy,
            current: AtomicU64::new(0),
            state: Mutex::new(State { sockets, mac: None }),
        };
        let start = policy.guest_mac.map(|m| (m, Origin::Configured));
        mac.apply(&mut mac.lock(), start)?;
        Ok(mac)
    }

    pub fn policy(&self) -> MacPolicy {
        self.policy
    }

    /// The MAC the guest sends from and receives for; `None` until it is learned.
    pub fn current(&self) -> Option<[u8; 6]> {
        unpack(self.current.load(Ordering::Acquire))
    }

    /// What a TX pass checks each frame's source against; `None`: nothing (spoofing allowed
    /// and nothing left to learn).
    pub fn source_check(&self) -> Option<SourceCheck<'_>> {
        let expected = self.current();
        if self.policy.allow_spoofing && expected.is_some() {
            return None;
        }
        Some(SourceCheck {
            expected,
            learner: self,
            enforce: !self.policy.allow_spoofing,
        })
    }

    /// The guest sent from `source` (unicast) while no MAC was known: it becomes the guest's
    /// MAC, unless another pair learned one first. Returns the MAC now in force.
    fn learn(&self, source: [u8; 6]) -> Option<[u8; 6]> {
        let mut state = self.lock();
        if let Some((mac, _)) = state.mac {
            return Some(mac);
        }
        if let Err(e) = self.apply(&mut state, Some((source, Origin::Learned))) {
            warn!("following the guest MAC {}: {e}", MacAddr(source));
        }
        info!("guest MAC is {} (learned)", MacAddr(source));
        Some(source)
    }

    /// The frontend announced the guest's MAC (SEND_RARP, after a migration): learned, unless
    /// a MAC is already in force.
    pub fn announced(&self, mac: [u8; 6]) {
        self.learn(mac);
    }

    /// The frontend set the MAC (SET_CONFIG): it holds until the connection ends.
    pub fn set_by_frontend(&self, mac: [u8; 6]) -> Result<(), PacketError> {
        let mut state = self.lock();
        self.apply(&mut state, Some((mac, Origin::Frontend)))
    }

    /// The frontend stopped a ring (GET_VRING_BASE): a learned MAC is learned again from the
    /// guest's next frame.
    pub fn rings_stopped(&self) {
        let mut state = self.lock();
        if let Some((mac, Origin::Learned)) = state.mac {
            info!(
                "the frontend stopped the rings: learning the guest MAC (was {}) again",
                MacAddr(mac)
            );
            if let Err(e) = self.apply(&mut state, None) {
                warn!("forgetting the guest MAC {}: {e}", MacAddr(mac));
            }
        }
    }

    /// The connection ended: back to `--mac`, or to learning.
    pub fn connection_ended(&self) {
        let mut state = self.lock();
        let start = self.policy.guest_mac.map(|m| (m, Origin::Configured));
        if let Err(e) = self.apply(&mut state, start) {
            warn!("resetting the guest MAC: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data, consistent after every statement: usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves every socket's membership and filter to `new`. A MAC change adds the new
    /// membership and drops the old one, so the interface's unicast list holds only the
    /// current MAC (each left behind would take a slot of the NIC's filter, until it falls
    /// back to promiscuous mode). Goes through every socket even if one fails; returns the
    /// first error. TX follows `new` in any case.
    fn apply(&self, state: &mut State, new: Option<([u8; 6], Origin)>) -> Result<(), PacketError> {
        let old = state.mac.map(|(m, _)| m);
        let mac = new.map(|(m, _)| m);
        state.mac = new;
        let mut first_error = None;
        if mac != old || old.is_none() {
            let filter = match mac {
                _ if self.policy.promisc => DestinationFilter::Everything,
                Some(m) => DestinationFilter::GroupAnd(m),
                None => DestinationFilter::Group,
            };
            for socket in &state.sockets {
                let step = || -> Result<(), PacketError> {
                    if mac != old {
                        if let Some(m) = mac {
                            socket.add_membership(m)?;
                        }
                        if let Some(o) = old {
                            socket.drop_membership(o)?;
                        }
                    }
                    socket.set_destination_filter(filter)
                };
                if let Err(e) = step() {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.current.store(pack(mac), Ordering::Release);
        first_error.map_or(Ok(()), Err)
    }
}

/// The source check of one TX pass (see [`GuestMac::source_check`]).
pub struct SourceCheck<'a> {
    /// The guest's MAC; `None` until it is learned.
    expected: Option<[u8; 6]>,
    learner: &'a GuestMac,
    /// Drop frames from other sources (false: `--allow-mac-spoofing`, learning only for RX).
    enforce: bool,
}

impl SourceCheck<'_> {
    /// Whether a frame from `source` may go out. While no MAC is known, a unicast `source`
    /// (not all zeros) is learned first.
    pub fn allows(&mut self, source: [u8; 6]) -> bool {
        if self.expected.is_none() && MacAddr(source).is_unicast() && source != [0; 6] {
            self.expected = self.learner.learn(source);
        }
        !self.enforce || self.expected == Some(source)
    }

    /// Why a frame from `source` was refused, for the log.
    pub fn refusal(&self, source: [u8; 6]) -> impl std::fmt::Display {
        Refusal {
            source,
            expected: self.expected,
        }
    }
}

struct Refusal {
    source: [u8; 6],
    expected: Option<[u8; 6]>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.expected {
            Some(mac) => write!(
                f,
                "dropped a frame from {} that is not the guest's MAC {} \
                 (--allow-mac-spoofing lets it through)",
                MacAddr(self.source),
                MacAddr(mac)
            ),
            None => write!(
                f,
                "dropped a frame from {}, not a unicast MAC the guest's could be",
                MacAddr(self.source)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_keeps_every_mac_and_unknown_apart() {
        for mac in [[0; 6], [0xff; 6], [0x52, 0x54, 0, 0x12, 0x34, 0x56]] {
            assert_eq!(unpack(pack(Some(mac))), Some(mac));
        }
        assert_eq!(unpack(pack(None)), None);
    }

    fn learning(allow_spoofing: bool) -> GuestMac {
        GuestMac::new(
            MacPolicy {
                guest_mac: None,
                promisc: false,
                allow_spoofing,
            },
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn the_first_unicast_source_is_learned_and_then_enforced() {
        let g = learning(false);
        let mut check = g.source_check().unwrap();
        assert!(!check.allows([0xff; 6]), "broadcast source");
        assert!(!check.allows([0x01, 0, 0x5e, 0, 0, 1]), "multicast source");
        assert!(!check.allows([0; 6]), "all zeros");
        assert_eq!(g.current(), None);
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert!(check.allows(mac));
        assert!(!check.allows([0x52, 0x54, 0, 0x12, 0x34, 0x57]));
        assert_eq!(g.current(), Some(mac));
        // Another pair's pass sees it without learning.
        let mut other = g.source_check().unwrap();
        assert!(other.allows(mac) && !other.allows([0x02, 0, 0, 0, 0, 9]));
        g.rings_stopped();
        assert_eq!(g.current(), None, "forgotten at a device reset");
        assert!(g.source_check().unwrap().allows([0x02, 0, 0, 0, 0, 9]));
        g.connection_ended();
        assert_eq!(g.current(), None);
    }

    #[test]
    fn a_frontend_mac_survives_a_reset_and_not_the_connection() {
        let g = learning(false);
        let mac = [0x52, 0x54, 0, 0xaa, 0xbb, 1];
        g.set_by_frontend(mac).unwrap();
        g.rings_stopped();
        assert_eq!(g.current(), Some(mac));
        g.connection_ended();
        assert_eq!(g.current(), None);
    }

    #[test]
    fn spoofing_allowed_learns_for_rx_and_checks_nothing() {
        let g = learning(true);
        let mut check = g.source_check().unwrap();
        assert!(check.allows([0xff; 6]));
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert!(check.allows(mac));
        assert!(check.allows([0x02, 0, 0, 0, 0, 9]));
        assert_eq!(g.current(), Some(mac));
        assert!(g.source_check().is_none(), "nothing left to check");
    }
}
