//! Checked, zero-copy views over packet bytes (in the style of smoltcp's `wire`).
//!
//! Each view wraps a buffer `T: AsRef<[u8]>` (plus `AsMut<[u8]>` for setters).
//! `new_unchecked` never looks at the bytes and its accessors may panic on a
//! short buffer; `new_checked` validates lengths once so that every accessor
//! on the returned view is panic-free for any buffer contents. That lets the
//! datapath parse untrusted guest frames without a bounds check per field.
//!
//! The views assume `AsRef`/`AsMut` return the same slice on every call, as
//! every slice, `Vec` and array type does.

pub mod checksum;
pub mod ethernet;
pub mod ipv4;
pub mod ipv6;
pub mod rarp;
pub mod tcp;
pub mod udp;

use core::fmt;

/// Byte range of a fixed-size header field.
pub type Field = core::ops::Range<usize>;

/// Why a buffer was rejected by a `new_checked` constructor or a header walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireError {
    /// The buffer ends before the header (or the length it declares) does.
    Truncated,
    /// A header field holds a value that cannot be valid (wrong version,
    /// length smaller than the header, ...).
    Malformed,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => f.write_str("truncated packet"),
            WireError::Malformed => f.write_str("malformed packet header"),
        }
    }
}

impl std::error::Error for WireError {}

/// Result alias for the wire views.
pub type Result<T> = core::result::Result<T, WireError>;

/// Copies a fixed-size field out of `data`. Panics if `field` is out of
/// bounds or not `N` bytes long; callers only pass ranges their
/// `new_checked` has already validated.
#[inline]
pub(crate) fn read_array<const N: usize>(data: &[u8], field: Field) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&data[field]);
    out
}

#[inline]
pub(crate) fn read_u16(data: &[u8], field: Field) -> u16 {
    u16::from_be_bytes(read_array(data, field))
}

#[inline]
pub(crate) fn read_u32(data: &[u8], field: Field) -> u32 {
    u32::from_be_bytes(read_array(data, field))
}

#[inline]
pub(crate) fn write_u16(data: &mut [u8], field: Field, value: u16) {
    data[field].copy_from_slice(&value.to_be_bytes());
}

#[inline]
pub(crate) fn write_u32(data: &mut [u8], field: Field, value: u32) {
    data[field].copy_from_slice(&value.to_be_bytes());
}

/// Returns `start..end` clamped into `0..len` (and `start <= end`), so that
/// slicing with it cannot panic even if header fields were changed by a
/// setter after the view was checked.
#[inline]
pub(crate) fn clamp_range(start: usize, end: usize, len: usize) -> core::ops::Range<usize> {
    let start = start.min(len);
    start..end.clamp(start, len)
}

/// Hand-built frames shared by the unit tests. Checksums were computed
/// independently (Python, RFC 1071 reference sum), not with this crate.
#[cfg(test)]
pub(crate) mod testdata {
    /// Ethernet / IPv4 / TCP: 52:54:00:ab:cd:ef -> 52:54:00:12:34:56,
    /// 192.168.1.10:49152 -> 192.168.1.20:80, IP id 0x1c46, DF, TTL 64,
    /// IP checksum 0x9b02. TCP seq 0x01020304 ack 0x0a0b0c0d, PSH|ACK,
    /// window 502, 12 bytes of options (NOP NOP timestamp), checksum 0x713c,
    /// payload "hello, world!" (13 bytes, so the L4 length 45 is odd).
    pub static FRAME_V4_TCP: [u8; 79] = [
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x41, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0x9b, 0x02, 0xc0, 0xa8, 0x01, 0x0a,
        0xc0, 0xa8, 0x01, 0x14, 0xc0, 0x00, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, 0x0a, 0x0b, 0x0c,
        0x0d, 0x80, 0x18, 0x01, 0xf6, 0x71, 0x3c, 0x00, 0x00, 0x01, 0x01, 0x08, 0x0a, 0x00, 0x01,
        0xe2, 0x40, 0x00, 0xbc, 0x61, 0x4e, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x2c, 0x20, 0x77, 0x6f,
        0x72, 0x6c, 0x64, 0x21,
    ];
    pub const V4_IP_OFFSET: usize = 14;
    pub const V4_TCP_OFFSET: usize = 34;
    pub const V4_SRC: [u8; 4] = [192, 168, 1, 10];
    pub const V4_DST: [u8; 4] = [192, 168, 1, 20];
    pub const V4_IP_CHECKSUM: u16 = 0x9b02;
    pub const V4_TCP_CHECKSUM: u16 = 0x713c;
    pub const V4_TCP_LEN: u32 = 45;
    /// Folded pseudo-header sum, by hand:
    /// c0a8 + 010a + c0a8 + 0114 + 0006 + 002d = 0x183a1 -> 0x83a1 + 1.
    pub const V4_PSEUDO_FOLDED: u16 = 0x83a2;

    /// Ethernet / IPv6 / UDP: 52:54:00:ab:cd:ef -> 33:33:00:00:00:01,
    /// [2001:db8::1]:5353 -> [2001:db8::2]:53, flow label 0x12345, hop
    /// limit 64, UDP length 21, checksum 0xdae6, payload "vhost-packet!".
    pub static FRAME_V6_UDP: [u8; 75] = [
        0x33, 0x33, 0x00, 0x00, 0x00, 0x01, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0x86, 0xdd, 0x60,
        0x01, 0x23, 0x45, 0x00, 0x15, 0x11, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x14, 0xe9, 0x00, 0x35, 0x00, 0x15,
        0xda, 0xe6, 0x76, 0x68, 0x6f, 0x73, 0x74, 0x2d, 0x70, 0x61, 0x63, 0x6b, 0x65, 0x74, 0x21,
    ];
    pub const V6_IP_OFFSET: usize = 14;
    pub const V6_UDP_OFFSET: usize = 54;
    pub const V6_SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub const V6_DST: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    pub const V6_UDP_CHECKSUM: u16 = 0xdae6;
    pub const V6_UDP_LEN: u32 = 21;
    /// Folded pseudo-header sum, by hand:
    /// 2001 + 0db8 + 0001 + 2001 + 0db8 + 0002 + 0000 + 0015 + 0011 = 0x5b9b.
    pub const V6_PSEUDO_FOLDED: u16 = 0x5b9b;
}

#[cfg(test)]
mod tests {
    use super::checksum::Checksum;
    use super::ethernet::{EthernetFrame, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
    use super::ipv4::{Ipv4Packet, PROTO_TCP, PROTO_UDP};
    use super::ipv6::Ipv6Packet;
    use super::tcp::TcpSegment;
    use super::testdata::*;
    use super::udp::UdpDatagram;
    use super::*;

    #[test]
    fn error_display() {
        assert_eq!(WireError::Truncated.to_string(), "truncated packet");
        assert_eq!(WireError::Malformed.to_string(), "malformed packet header");
    }

    #[test]
    fn clamp_range_never_exceeds_len() {
        assert_eq!(clamp_range(2, 5, 10), 2..5);
        assert_eq!(clamp_range(2, 50, 10), 2..10);
        assert_eq!(clamp_range(20, 50, 10), 10..10);
        assert_eq!(clamp_range(6, 3, 10), 6..6);
    }

    /// Walks the whole IPv4/TCP frame the way checksum completion will.
    #[test]
    fn v4_tcp_end_to_end() {
        let eth = EthernetFrame::new_checked(&FRAME_V4_TCP[..]).unwrap();
        let (ethertype, l3) = eth.network_offset().unwrap();
        assert_eq!((ethertype, l3), (ETHERTYPE_IPV4, V4_IP_OFFSET));
        let ip = Ipv4Packet::new_checked(&FRAME_V4_TCP[l3..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.protocol(), PROTO_TCP);
        let tcp = TcpSegment::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(ip.pseudo_header()));
        assert_eq!(tcp.payload(), b"hello, world!");
    }

    /// Zeroes the TCP checksum in a copy and recomputes it from scratch.
    #[test]
    fn v4_tcp_fill_checksum() {
        let mut frame = FRAME_V4_TCP;
        let pseudo = Ipv4Packet::new_checked(&frame[V4_IP_OFFSET..])
            .unwrap()
            .pseudo_header();
        let mut tcp = TcpSegment::new_checked(&mut frame[V4_TCP_OFFSET..]).unwrap();
        tcp.set_checksum(0);
        tcp.fill_checksum(pseudo);
        assert_eq!(tcp.checksum(), V4_TCP_CHECKSUM);
        assert_eq!(frame, FRAME_V4_TCP);
    }

    #[test]
    fn v6_udp_end_to_end() {
        let eth = EthernetFrame::new_checked(&FRAME_V6_UDP[..]).unwrap();
        let (ethertype, l3) = eth.network_offset().unwrap();
        assert_eq!((ethertype, l3), (ETHERTYPE_IPV6, V6_IP_OFFSET));
        let ip = Ipv6Packet::new_checked(&FRAME_V6_UDP[l3..]).unwrap();
        assert_eq!(ip.next_header(), PROTO_UDP);
        let udp = UdpDatagram::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(ip.pseudo_header()));
        assert_eq!(udp.payload(), b"vhost-packet!");
    }

    #[test]
    fn v6_udp_fill_checksum() {
        let mut frame = FRAME_V6_UDP;
        let pseudo = Ipv6Packet::new_checked(&frame[V6_IP_OFFSET..])
            .unwrap()
            .pseudo_header();
        let mut udp = UdpDatagram::new_checked(&mut frame[V6_UDP_OFFSET..]).unwrap();
        udp.set_checksum(0);
        udp.fill_checksum(pseudo);
        assert_eq!(udp.checksum(), V6_UDP_CHECKSUM);
        assert_eq!(frame, FRAME_V6_UDP);
    }

    /// Virtio/Linux CHECKSUM_PARTIAL: the guest leaves the folded
    /// pseudo-header sum in the checksum field; summing from csum_start to the
    /// end and inverting yields the final checksum.
    #[test]
    fn complete_partial_checksum() {
        let mut frame = FRAME_V4_TCP;
        let csum_off = V4_TCP_OFFSET + tcp::CHECKSUM_OFFSET;
        frame[csum_off..csum_off + 2].copy_from_slice(&V4_PSEUDO_FOLDED.to_be_bytes());
        let sum = Checksum::new().add_bytes(&frame[V4_TCP_OFFSET..]).finish();
        frame[csum_off..csum_off + 2].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(frame, FRAME_V4_TCP);
    }
}
