//! Offload fallbacks on RX: what the guest did not negotiate is done here in software, or the
//! frame is refused. Never is a frame delivered with metadata the guest cannot interpret.

use super::segment::SegmentCsum;
use crate::virtio::chain::Scatter;
use crate::virtio::features::Negotiated;
use crate::virtio::header::{GsoKind, NetHeader, FLAG_DATA_VALID, FLAG_NEEDS_CSUM};
use crate::wire::checksum::Checksum;
use crate::wire::ethernet::{EthernetFrame, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use crate::wire::ipv4::{self, Ipv4Packet, PROTO_TCP, PROTO_UDP};
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::CHECKSUM_OFFSET as TCP_CHECKSUM_OFFSET;
use crate::wire::udp::CHECKSUM_OFFSET as UDP_CHECKSUM_OFFSET;

/// What to do with a received frame, given its header and the guest's features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxVerdict {
    /// Deliver; `complete_csum` asks for the checksum to be finished in software first.
    Deliver { complete_csum: bool },
    /// The frame is GSO and the guest cannot take it whole: deliver its segments, with full
    /// checksums or (for a guest with GUEST_CSUM) partial ones.
    Segment(SegmentCsum),
    /// A GSO kind nobody segments (UFO, unknown): dropped and counted.
    RefuseGso,
}

/// Decides how a received frame reaches this guest. `frame_head` is the start of the frame
/// (enough for the Ethernet header and VLAN tags), used only to tell IPv4 from IPv6 for USO.
pub fn rx_verdict<T: AsRef<[u8]>>(
    hdr: &NetHeader<T>,
    features: Negotiated,
    frame_head: &[u8],
) -> RxVerdict {
    let kind = hdr.gso_kind();
    if kind != GsoKind::None {
        let mut ok = features.guest_accepts_gso(kind, hdr.gso_ecn());
        if ok && kind == GsoKind::UdpL4 {
            ok = features.guest_accepts_uso(is_ipv6(frame_head));
        }
        // A GSO frame always has a partial checksum; a guest without GUEST_CSUM cannot have
        // negotiated GUEST_TSO (the spec makes TSO depend on it), but check anyway.
        if !ok || !features.guest_csum() {
            return match kind {
                GsoKind::TcpV4 | GsoKind::TcpV6 | GsoKind::UdpL4 => {
                    RxVerdict::Segment(if features.guest_csum() {
                        SegmentCsum::Partial
                    } else {
                        SegmentCsum::Full
                    })
                }
                _ => RxVerdict::RefuseGso,
            };
        }
    }
    RxVerdict::Deliver {
        complete_csum: hdr.needs_csum() && !features.guest_csum(),
    }
}

fn is_ipv6(frame_head: &[u8]) -> bool {
    EthernetFrame::new_checked(frame_head)
        .ok()
        .and_then(|f| f.network_offset().ok())
        .map(|(ethertype, _)| ethertype == crate::wire::ethernet::ETHERTYPE_IPV6)
        .unwrap_or(false)
}

/// Why a guest's TX header contradicts its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxHeaderError {
    /// `hdr_len`, `csum_start` or the checksum field lie beyond the frame.
    OutOfFrame,
    /// GSO with `gso_size` 0.
    ZeroGsoSize,
    /// GSO that would be cut into more segments than any real stack asks for: TCP with
    /// `gso_size` under [`MIN_TCP_GSO_SIZE`], UDP_L4 into more than [`MAX_UDP_GSO_SEGMENTS`].
    TinySegments,
    /// The GSO type names another IP version or transport than the frame carries.
    WrongProtocol,
    /// For GSO, the checksum must be the transport header's own.
    WrongChecksumPlace,
}

impl std::fmt::Display for TxHeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxHeaderError::OutOfFrame => "header offsets point beyond the frame",
            TxHeaderError::ZeroGsoSize => "GSO with gso_size 0",
            TxHeaderError::TinySegments => {
                "GSO segments smaller than any real stack sends (the host would make thousands)"
            }
            TxHeaderError::WrongProtocol => "GSO type does not match the frame's protocols",
            TxHeaderError::WrongChecksumPlace => {
                "GSO checksum offsets are not the transport header's"
            }
        })
    }
}

/// The least `gso_size` a TCP GSO frame may have. Linux never sends less: its sender MSS has
/// the floor `TCP_MIN_SND_MSS` (48, also the least `net.ipv4.tcp_min_snd_mss` takes), and
/// TCP options take at most `MAX_TCP_OPTION_SPACE` (40) of it: `TCP_MIN_GSO_SIZE` 8 in
/// include/net/tcp.h. Below it the host would cut a 64 KiB frame into up to 65 000 skbs.
pub const MIN_TCP_GSO_SIZE: u16 = 8;

/// The most segments a UDP_L4 GSO frame may be cut into. Linux's UDP_SEGMENT takes any
/// `gso_size` but refuses more than `UDP_MAX_SEGMENTS` segments per send (64, 128 in newer
/// kernels: the larger is allowed).
pub const MAX_UDP_GSO_SEGMENTS: usize = 128;

/// Checks that a TX header describes its frame, so that the kernel gets only consistent
/// requests (it rejects some inconsistencies with misleading errors, ENOMEM for TCPV4 on an
/// IPv6 frame, and would silently mis-segment others). `frame_head` holds the first bytes of
/// the frame, at least its headers when they fit in it.
pub fn check_tx_header<T: AsRef<[u8]>>(
    hdr: &NetHeader<T>,
    frame_head: &[u8],
    frame_len: usize,
) -> Result<(), TxHeaderError> {
    let kind = hdr.gso_kind();
    if !hdr.needs_csum() && kind == GsoKind::None {
        return Ok(());
    }
    if usize::from(hdr.hdr_len()) > frame_len {
        return Err(TxHeaderError::OutOfFrame);
    }
    if hdr.needs_csum() {
        let field_end = usize::from(hdr.csum_start()) + usize::from(hdr.csum_offset()) + 2;
        if field_end > frame_len {
            return Err(TxHeaderError::OutOfFrame);
        }
    }
    if kind == GsoKind::None {
        return Ok(());
    }
    if hdr.gso_size() == 0 {
        return Err(TxHeaderError::ZeroGsoSize);
    }
    let (l4_at, proto, ipv6) = transport_of(frame_head).ok_or(TxHeaderError::WrongProtocol)?;
    let (want_proto, csum_offset) = match kind {
        GsoKind::TcpV4 if !ipv6 => (PROTO_TCP, TCP_CHECKSUM_OFFSET),
        GsoKind::TcpV6 if ipv6 => (PROTO_TCP, TCP_CHECKSUM_OFFSET),
        GsoKind::UdpL4 => (PROTO_UDP, UDP_CHECKSUM_OFFSET),
        _ => return Err(TxHeaderError::WrongProtocol),
    };
    if proto != want_proto {
        return Err(TxHeaderError::WrongProtocol);
    }
    if usize::from(hdr.csum_start()) != l4_at || usize::from(hdr.csum_offset()) != csum_offset {
        return Err(TxHeaderError::WrongChecksumPlace);
    }
    let tiny = match kind {
        GsoKind::UdpL4 => {
            let payload = frame_len.saturating_sub(l4_at + crate::wire::udp::HEADER_LEN);
            payload > usize::from(hdr.gso_size()) * MAX_UDP_GSO_SEGMENTS
        }
        _ => hdr.gso_size() < MIN_TCP_GSO_SIZE,
    };
    if tiny {
        return Err(TxHeaderError::TinySegments);
    }
    Ok(())
}

/// Offset of the transport header, its protocol, and whether the frame is IPv6. Works on a
/// prefix of the frame: only the IP header must be in it.
fn transport_of(frame: &[u8]) -> Option<(usize, u8, bool)> {
    let (ethertype, l3) = EthernetFrame::new_checked(frame)
        .ok()?
        .network_offset()
        .ok()?;
    let ip = frame.get(l3..)?;
    match ethertype {
        ETHERTYPE_IPV4 if ip.len() >= ipv4::HEADER_LEN => {
            // Unchecked: the prefix does not hold the whole packet; the fixed header does fit.
            let p = Ipv4Packet::new_unchecked(ip);
            let header_len = p.header_len();
            (p.version() == 4 && header_len >= ipv4::HEADER_LEN && header_len <= ip.len())
                .then(|| (l3 + header_len, p.protocol(), false))
        }
        ETHERTYPE_IPV6 if ip.len() >= ipv6::HEADER_LEN => {
            let p = Ipv6Packet::new_unchecked(ip);
            (p.version() == 6).then(|| (l3 + ipv6::HEADER_LEN, p.next_header(), true))
        }
        _ => None,
    }
}

/// The flags byte the guest may see: NEEDS_CSUM and DATA_VALID only with GUEST_CSUM.
pub fn guest_flags(flags: u8, features: Negotiated) -> u8 {
    if features.guest_csum() {
        flags & (FLAG_NEEDS_CSUM | FLAG_DATA_VALID)
    } else {
        0
    }
}

/// Why a checksum could not be completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsumError {
    /// `csum_start`/`csum_offset` point outside the frame.
    OutOfFrame,
}

/// Finishes a partial checksum (NEEDS_CSUM) in place: the ones-complement sum from `csum_start`
/// to the end of the frame, which already includes the pseudo-header seed the sender stored in
/// the checksum field, is folded, inverted and written at `csum_start + csum_offset`.
///
/// `frame` views the frame only (not the virtio header); `frame_len` is its length.
pub fn complete_checksum(
    frame: &Scatter<'_>,
    frame_offset: usize,
    frame_len: usize,
    csum_start: u16,
    csum_offset: u16,
) -> Result<(), CsumError> {
    let start = usize::from(csum_start);
    let field = start + usize::from(csum_offset);
    if field + 2 > frame_len || start >= frame_len {
        return Err(CsumError::OutOfFrame);
    }
    let mut sum = Checksum::new();
    frame.for_each_chunk(frame_offset + start, frame_len - start, |chunk| {
        sum.add_bytes(chunk);
    });
    let mut value = !sum.fold();
    // UDP (its checksum field is 6 bytes in): 0 means "no checksum", so send all-ones instead.
    if csum_offset == 6 && value == 0 {
        value = 0xffff;
    }
    frame.write_at(frame_offset + field, &value.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::header::{GSO_TCPV4, GSO_UDP_L4, LEN_MRG};
    use virtio_bindings::virtio_net::*;
    use vm_memory::VolatileSlice;

    const fn bit(n: u32) -> u64 {
        1 << n
    }

    /// Ethernet + IPv4 + TCP, 198.18.0.1:1234 -> 198.18.0.2:80, payload "hello world!",
    /// with the pseudo-header seed in the TCP checksum field (what the kernel hands over
    /// with NEEDS_CSUM), and the full checksum it must become.
    fn tcp_frame() -> (Vec<u8>, u16) {
        let payload = b"hello world!";
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        let total = (20 + 20 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
        ip[16..20].copy_from_slice(&[198, 18, 0, 2]);
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;
        f.extend_from_slice(payload);
        // Pseudo header: src, dst, proto, TCP length.
        let l4_len = 20 + payload.len() as u32;
        let mut seed = Checksum::new();
        seed.add_bytes(&[198, 18, 0, 1, 198, 18, 0, 2, 0, 6]);
        seed.add_bytes(&(l4_len as u16).to_be_bytes());
        let seed = seed.fold();
        // Reference full checksum over pseudo header + segment with a zero check field.
        let mut full = Checksum::new();
        full.add_bytes(&[198, 18, 0, 1, 198, 18, 0, 2, 0, 6]);
        full.add_bytes(&(l4_len as u16).to_be_bytes());
        full.add_bytes(&f[34..]);
        let expected = !full.fold();
        f[34 + 16..34 + 18].copy_from_slice(&seed.to_be_bytes());
        (f, expected)
    }

    #[test]
    fn completes_a_tcp_checksum_across_any_buffer_split() {
        let (frame, expected) = tcp_frame();
        for split in 1..frame.len() {
            let mut data = frame.clone();
            let (a, b) = data.split_at_mut(split);
            let slices = [VolatileSlice::from(a), VolatileSlice::from(b)];
            complete_checksum(&Scatter::slices(&slices), 0, frame.len(), 34, 16).unwrap();
            assert_eq!(
                u16::from_be_bytes([data[50], data[51]]),
                expected,
                "split {split}"
            );
        }
    }

    #[test]
    fn refuses_offsets_outside_the_frame() {
        let (mut frame, _) = tcp_frame();
        let len = frame.len();
        let slices = [VolatileSlice::from(&mut frame[..])];
        let s = Scatter::slices(&slices);
        assert_eq!(
            complete_checksum(&s, 0, len, 34, 65535),
            Err(CsumError::OutOfFrame)
        );
        assert_eq!(
            complete_checksum(&s, 0, len, len as u16, 0),
            Err(CsumError::OutOfFrame)
        );
        assert_eq!(
            complete_checksum(&s, 0, len, 34, (len - 35) as u16),
            Err(CsumError::OutOfFrame)
        );
    }

    fn header(flags: u8, gso: u8) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso;
        h
    }

    #[test]
    fn verdicts_follow_the_acked_features() {
        let ipv4_frame = tcp_frame().0;
        let hdr = header(FLAG_NEEDS_CSUM, GSO_TCPV4);
        let hdr = NetHeader::new_checked(&hdr[..], LEN_MRG).unwrap();
        let full = Negotiated::new(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        let csum_only = Negotiated::new(bit(VIRTIO_NET_F_GUEST_CSUM));
        let none = Negotiated::new(0);
        assert_eq!(
            rx_verdict(&hdr, full, &ipv4_frame),
            RxVerdict::Deliver {
                complete_csum: false
            }
        );
        assert_eq!(
            rx_verdict(&hdr, csum_only, &ipv4_frame),
            RxVerdict::Segment(SegmentCsum::Partial)
        );
        assert_eq!(
            rx_verdict(&hdr, none, &ipv4_frame),
            RxVerdict::Segment(SegmentCsum::Full)
        );
        let ufo = header(FLAG_NEEDS_CSUM, crate::virtio::header::GSO_UDP);
        let ufo = NetHeader::new_checked(&ufo[..], LEN_MRG).unwrap();
        assert_eq!(rx_verdict(&ufo, full, &ipv4_frame), RxVerdict::RefuseGso);

        let plain = header(FLAG_NEEDS_CSUM, 0);
        let plain = NetHeader::new_checked(&plain[..], LEN_MRG).unwrap();
        assert_eq!(
            rx_verdict(&plain, none, &ipv4_frame),
            RxVerdict::Deliver {
                complete_csum: true
            }
        );
        assert_eq!(
            rx_verdict(&plain, csum_only, &ipv4_frame),
            RxVerdict::Deliver {
                complete_csum: false
            }
        );

        // USO is per IP version.
        let uso = header(FLAG_NEEDS_CSUM, GSO_UDP_L4);
        let uso = NetHeader::new_checked(&uso[..], LEN_MRG).unwrap();
        let uso6 = Negotiated::new(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_USO6));
        assert_eq!(
            rx_verdict(&uso, uso6, &ipv4_frame),
            RxVerdict::Segment(SegmentCsum::Partial)
        );
        let mut ipv6_frame = ipv4_frame.clone();
        ipv6_frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(
            rx_verdict(&uso, uso6, &ipv6_frame),
            RxVerdict::Deliver {
                complete_csum: false
            }
        );
    }

    fn tx_header(
        flags: u8,
        gso: u8,
        hdr_len: u16,
        gso_size: u16,
        start: u16,
        offset: u16,
    ) -> [u8; 12] {
        let mut h = [0u8; 12];
        let mut v = NetHeader::new_checked(&mut h[..], LEN_MRG).unwrap();
        v.set_flags(flags);
        v.set_gso_type(gso);
        v.set_hdr_len(hdr_len);
        v.set_gso_size(gso_size);
        v.set_csum_start(start);
        v.set_csum_offset(offset);
        h
    }

    #[test]
    fn tx_headers_must_describe_their_frame() {
        use crate::virtio::header::{GSO_TCPV6, GSO_UDP_L4};
        let (v4, _) = tcp_frame();
        let len = v4.len();
        let mut v6 = v4.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6[14] = 0x60;
        v6[14 + 6] = 6;
        // The IPv6 header is 20 bytes longer than the IPv4 one it replaces.
        v6.extend_from_slice(&[0; 20]);
        let check = |h: [u8; 12], frame: &[u8]| {
            check_tx_header(
                &NetHeader::new_checked(&h[..], LEN_MRG).unwrap(),
                frame,
                frame.len(),
            )
        };
        let n = FLAG_NEEDS_CSUM;
        assert_eq!(
            check(tx_header(0, 0, 9999, 0, 9999, 9999), &v4),
            Ok(()),
            "plain frames are not looked at"
        );
        assert_eq!(check(tx_header(n, 0, 0, 0, 34, 16), &v4), Ok(()));
        assert_eq!(
            check(tx_header(n, GSO_TCPV4, 54, 1448, 34, 16), &v4),
            Ok(())
        );
        assert_eq!(
            check(tx_header(n, GSO_TCPV4, 54, 1448, 34, 16), &v4[..60]),
            Ok(()),
            "a prefix is enough"
        );
        assert_eq!(
            check(tx_header(n, GSO_TCPV4, 54, MIN_TCP_GSO_SIZE, 34, 16), &v4),
            Ok(()),
            "the least gso_size a Linux sender uses"
        );
        let bad = [
            (
                tx_header(n, 0, 0, 0, len as u16, 0),
                TxHeaderError::OutOfFrame,
            ),
            (
                tx_header(n, 0, 0, 0, 34, (len - 35) as u16),
                TxHeaderError::OutOfFrame,
            ),
            (
                tx_header(n, GSO_TCPV4, 2000, 1448, 34, 16),
                TxHeaderError::OutOfFrame,
            ),
            (
                tx_header(n, GSO_TCPV4, 54, 0, 34, 16),
                TxHeaderError::ZeroGsoSize,
            ),
            (
                tx_header(n, GSO_TCPV4, 54, MIN_TCP_GSO_SIZE - 1, 34, 16),
                TxHeaderError::TinySegments,
            ),
            (
                tx_header(n, GSO_TCPV6, 54, 1448, 34, 16),
                TxHeaderError::WrongProtocol,
            ),
            (
                tx_header(n, GSO_UDP_L4, 42, 1448, 34, 6),
                TxHeaderError::WrongProtocol,
            ),
            (
                tx_header(n, GSO_TCPV4, 54, 1448, 30, 16),
                TxHeaderError::WrongChecksumPlace,
            ),
            (
                tx_header(n, GSO_TCPV4, 54, 1448, 34, 6),
                TxHeaderError::WrongChecksumPlace,
            ),
        ];
        for (h, want) in bad {
            assert_eq!(check(h, &v4), Err(want), "{h:?}");
        }
        assert_eq!(
            check(tx_header(n, GSO_TCPV4, 74, 1448, 54, 16), &v6),
            Err(TxHeaderError::WrongProtocol)
        );
        assert_eq!(
            check(tx_header(n, GSO_TCPV6, 74, 1448, 54, 16), &v6),
            Ok(())
        );
        // UDP_L4: 224 bytes of payload take gso_size 2 (112 segments), not 1 (224).
        let mut udp = v4.clone();
        udp[14 + 9] = 17;
        udp.extend_from_slice(&[0; 200]);
        assert_eq!(udp.len() - 42, 224);
        assert_eq!(check(tx_header(n, GSO_UDP_L4, 42, 2, 34, 6), &udp), Ok(()));
        assert_eq!(
            check(tx_header(n, GSO_UDP_L4, 42, 1, 34, 6), &udp),
            Err(TxHeaderError::TinySegments)
        );
        let h = tx_header(n, GSO_TCPV4, 54, 1448, 34, 16);
        let h = NetHeader::new_checked(&h[..], LEN_MRG).unwrap();
        assert_eq!(
            check_tx_header(&h, &v4[..20], len),
            Err(TxHeaderError::WrongProtocol),
            "IP header not in the prefix"
        );
    }

    #[test]
    fn flags_are_cleared_without_guest_csum() {
        let with = Negotiated::new(bit(VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(guest_flags(FLAG_DATA_VALID, with), FLAG_DATA_VALID);
        assert_eq!(guest_flags(FLAG_DATA_VALID | 0x40, with), FLAG_DATA_VALID);
        assert_eq!(guest_flags(FLAG_DATA_VALID, Negotiated::new(0)), 0);
    }
}
