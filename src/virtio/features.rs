//! Feature bits: what we offer, and what the datapath must do for what the guest acked.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::header::{GsoKind, LEN_BASE, LEN_MRG};

const fn bit(n: u32) -> u64 {
    1 << n
}

/// What the running kernel and configuration allow us to offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferOptions {
    /// The kernel accepts `VIRTIO_NET_HDR_GSO_UDP_L4` on packet sockets.
    pub uso: bool,
    /// More than one queue pair is served: offer `VIRTIO_NET_F_MQ`.
    pub mq: bool,
}

/// The virtio feature bits offered to the frontend.
///
/// Every bit here is honoured by the datapath for whatever subset the guest acks; see
/// [`Negotiated`]. Nothing whose vhost-user messages vhost 0.18 cannot process is offered.
///
/// `VIRTIO_NET_F_MQ` comes with more than one pair; QEMU masks it out of what the guest sees
/// unless the backend offers it. `VIRTIO_NET_F_CTRL_VQ`, which a guest needs to change the
/// number of pairs, is never offered: the control queue is the frontend's (QEMU and DPDK's
/// virtio-user answer it themselves and turn `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` into
/// `SET_VRING_ENABLE`), and QEMU exposes it without asking the backend (it is not among
/// the bits QEMU's vhost-user netdev takes from the backend, `user_feature_bits`).
pub fn offered(opts: OfferOptions) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if opts.uso {
        f |= bit(VIRTIO_NET_F_HOST_USO)
            | bit(VIRTIO_NET_F_GUEST_USO4)
            | bit(VIRTIO_NET_F_GUEST_USO6);
    }
    if opts.mq {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    f
}

/// The vhost-user protocol features offered. All of them are handled by vhost-user-backend 0.24.
///
/// CONFIGURE_MEM_SLOTS with any number of pairs: QEMU before 8.0 drives each pair as a vhost
/// device of its own on the one connection, and each adds (and removes) every region; the
/// relay answers the repeats (`relay.rs`), which the request handler would refuse as
/// overlapping and end the session.
pub fn offered_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        // SEND_RARP after a migration, for guests without GUEST_ANNOUNCE (the relay takes it).
        | VhostUserProtocolFeatures::RARP
}

/// The datapath's view of an acked feature set: one query per decision it has to make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    bits: u64,
}

impl Negotiated {
    pub fn new(bits: u64) -> Negotiated {
        Negotiated { bits }
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    fn has(&self, n: u32) -> bool {
        self.bits & bit(n) != 0
    }

    pub fn version_1(&self) -> bool {
        self.has(VIRTIO_F_VERSION_1)
    }

    pub fn mrg_rxbuf(&self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    pub fn event_idx(&self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }

    /// The guest may use more than the first queue pair.
    pub fn mq(&self) -> bool {
        self.has(VIRTIO_NET_F_MQ)
    }

    /// The header length both sides use: 12 with VERSION_1 or MRG_RXBUF, else 10.
    pub fn header_len(&self) -> usize {
        if self.version_1() || self.mrg_rxbuf() {
            LEN_MRG
        } else {
            LEN_BASE
        }
    }

    /// The guest takes partially checksummed frames (NEEDS_CSUM) and DATA_VALID.
    pub fn guest_csum(&self) -> bool {
        self.has(VIRTIO_NET_F_GUEST_CSUM)
    }

    /// The guest may send partially checksummed frames.
    pub fn host_csum(&self) -> bool {
        self.has(VIRTIO_NET_F_CSUM)
    }

    /// Can the guest receive a GSO frame of this kind (and with this ECN bit)?
    ///
    /// GSO frames are partially checksummed, so GUEST_TSO/USO count only with GUEST_CSUM (the
    /// spec makes them depend on it). QEMU 7.2 with `guest_csum=off` still offers GUEST_TSO4/6
    /// and Linux acks them; such a guest gets segmented, checksummed frames.
    pub fn guest_accepts_gso(&self, kind: GsoKind, ecn: bool) -> bool {
        if kind != GsoKind::None && !self.guest_csum() {
            return false;
        }
        let kind_ok = match kind {
            GsoKind::None => return true,
            GsoKind::TcpV4 => self.has(VIRTIO_NET_F_GUEST_TSO4),
            GsoKind::TcpV6 => self.has(VIRTIO_NET_F_GUEST_TSO6),
            // Receive-side USO is per IP version; the frame's version is checked by the caller
            // through `guest_accepts_uso`.
            GsoKind::UdpL4 => {
                self.has(VIRTIO_NET_F_GUEST_USO4) || self.has(VIRTIO_NET_F_GUEST_USO6)
            }
            GsoKind::Ufo | GsoKind::Unknown(_) => false,
        };
        kind_ok && (!ecn || self.has(VIRTIO_NET_F_GUEST_ECN))
    }

    /// USO to the guest, by IP version of the frame (and only with GUEST_CSUM, as above).
    pub fn guest_accepts_uso(&self, ipv6: bool) -> bool {
        if !self.guest_csum() {
            false
        } else if ipv6 {
            self.has(VIRTIO_NET_F_GUEST_USO6)
        } else {
            self.has(VIRTIO_NET_F_GUEST_USO4)
        }
    }

    /// May the guest send a GSO frame of this kind? Anything not negotiated is a driver bug,
    /// and so is GSO without CSUM (a GSO frame's checksum is always partial).
    pub fn host_accepts_gso(&self, kind: GsoKind, ecn: bool) -> bool {
        if kind != GsoKind::None && !self.host_csum() {
            return false;
        }
        let kind_ok = match kind {
            GsoKind::None => return true,
            GsoKind::TcpV4 => self.has(VIRTIO_NET_F_HOST_TSO4),
            GsoKind::TcpV6 => self.has(VIRTIO_NET_F_HOST_TSO6),
            GsoKind::UdpL4 => self.has(VIRTIO_NET_F_HOST_USO),
            GsoKind::Ufo | GsoKind::Unknown(_) => false,
        };
        kind_ok && (!ecn || self.has(VIRTIO_NET_F_HOST_ECN))
    }
}

/// Names of the feature bits we know, for logs and the test frontend's report.
pub fn describe(bits: u64) -> String {
    const NAMES: &[(u32, &str)] = &[
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_MTU, "MTU"),
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
        (VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
        (VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_STATUS, "STATUS"),
        (VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
        (VIRTIO_NET_F_MQ, "MQ"),
        (VIRTIO_NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (30, "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_NET_F_GUEST_USO4, "GUEST_USO4"),
        (VIRTIO_NET_F_GUEST_USO6, "GUEST_USO6"),
        (VIRTIO_NET_F_HOST_USO, "HOST_USO"),
    ];
    let mut names: Vec<String> = Vec::new();
    let mut known = 0u64;
    for &(n, name) in NAMES {
        known |= bit(n);
        if bits & bit(n) != 0 {
            names.push(name.to_string());
        }
    }
    if bits & !known != 0 {
        names.push(format!("other({:#x})", bits & !known));
    }
    names.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uso_is_offered_only_when_the_kernel_takes_it() {
        let with = offered(OfferOptions {
            uso: true,
            mq: false,
        });
        let without = offered(OfferOptions {
            uso: false,
            mq: false,
        });
        let uso = bit(VIRTIO_NET_F_HOST_USO)
            | bit(VIRTIO_NET_F_GUEST_USO4)
            | bit(VIRTIO_NET_F_GUEST_USO6);
        assert_eq!(with & uso, uso);
        assert_eq!(without & uso, 0);
        assert_eq!(with & !uso, without);
    }

    #[test]
    fn nothing_unhandled_is_offered() {
        let f = offered(OfferOptions {
            uso: true,
            mq: false,
        });
        // Packed ring, IN_ORDER, control queue, MQ (with one pair), UFO, NOTIFY_ON_EMPTY and
        // LOG_ALL all need datapath or protocol support we do not have.
        for n in [34, 35, 17, 22, 10, 14, 24, 26] {
            assert_eq!(f & bit(n), 0, "feature bit {n} must not be offered");
        }
        let mq = offered(OfferOptions {
            uso: true,
            mq: true,
        });
        assert_eq!(
            mq,
            f | bit(VIRTIO_NET_F_MQ),
            "MQ with several pairs, and only MQ"
        );
        assert_eq!(
            mq & bit(VIRTIO_NET_F_CTRL_VQ),
            0,
            "the control queue is the VMM's"
        );
        let p = offered_protocol();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert!(!p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        assert!(!p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(!p.contains(VhostUserProtocolFeatures::BACKEND_REQ));
        assert!(!p.contains(VhostUserProtocolFeatures::STATUS));
    }

    #[test]
    fn header_length_follows_version_1_and_mrg_rxbuf() {
        assert_eq!(Negotiated::new(0).header_len(), 10);
        assert_eq!(
            Negotiated::new(bit(VIRTIO_NET_F_MRG_RXBUF)).header_len(),
            12
        );
        assert_eq!(Negotiated::new(bit(VIRTIO_F_VERSION_1)).header_len(), 12);
    }

    #[test]
    fn gso_acceptance_follows_acked_bits() {
        let csum = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_CSUM);
        let n = Negotiated::new(bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6) | csum);
        assert!(n.guest_accepts_gso(GsoKind::None, false));
        assert!(n.guest_accepts_gso(GsoKind::TcpV4, false));
        assert!(
            !n.guest_accepts_gso(GsoKind::TcpV4, true),
            "ECN needs GUEST_ECN"
        );
        assert!(!n.guest_accepts_gso(GsoKind::TcpV6, false));
        assert!(!n.guest_accepts_gso(GsoKind::UdpL4, false));
        assert!(!n.guest_accepts_gso(GsoKind::Ufo, false));
        assert!(n.host_accepts_gso(GsoKind::TcpV6, false));
        assert!(!n.host_accepts_gso(GsoKind::TcpV4, false));
        assert!(!n.host_accepts_gso(GsoKind::Unknown(9), false));
        let ecn =
            Negotiated::new(bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_ECN) | csum);
        assert!(ecn.guest_accepts_gso(GsoKind::TcpV6, true));
    }

    #[test]
    fn gso_without_checksum_offload_does_not_count() {
        // What QEMU 7.2 negotiates with csum=off,guest_csum=off: TSO bits without CSUM bits.
        let n = Negotiated::new(
            bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_USO4)
                | bit(VIRTIO_NET_F_HOST_TSO4),
        );
        assert!(!n.guest_accepts_gso(GsoKind::TcpV4, false));
        assert!(!n.guest_accepts_gso(GsoKind::TcpV6, false));
        assert!(!n.guest_accepts_uso(false));
        assert!(!n.host_accepts_gso(GsoKind::TcpV4, false));
        assert!(n.guest_accepts_gso(GsoKind::None, false));
    }

    #[test]
    fn describe_names_bits() {
        let s = describe(bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_F_VERSION_1) | bit(63));
        assert_eq!(s, "MRG_RXBUF VERSION_1 other(0x8000000000000000)");
    }
}
