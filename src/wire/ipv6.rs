//! IPv6 fixed headers (RFC 8200).
//!
//! Extension headers are not parsed: [`Ipv6Packet::payload`] starts right
//! after the 40-byte header, so it is only a TCP/UDP header when
//! `next_header` is [`PROTO_TCP`] or [`PROTO_UDP`]. Callers must check that
//! before parsing L4 (anything else, e.g. hop-by-hop or jumbograms, is left
//! to the kernel/peer).

use crate::wire::checksum::{pseudo_header_v6, Checksum};
use crate::wire::{clamp_range, read_array, read_u16, read_u32, write_u16, Result, WireError};

/// IP protocol numbers double as IPv6 next-header values.
pub use crate::wire::ipv4::{PROTO_TCP, PROTO_UDP};

/// Fixed header length.
pub const HEADER_LEN: usize = 40;

/// Traffic class bits of the first 32-bit word.
const TRAFFIC_CLASS_MASK: u32 = 0x0ff0_0000;
const TRAFFIC_CLASS_SHIFT: u32 = 20;
/// Flow label bits of the first 32-bit word.
const FLOW_LABEL_MASK: u32 = 0x000f_ffff;

mod field {
    use crate::wire::Field;

    /// Version(4) | traffic class(8) | flow label(20).
    pub const VER_TC_FLOW: Field = 0..4;
    pub const PAYLOAD_LEN: Field = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: Field = 8..24;
    pub const DST: Field = 24..40;
    pub const PAYLOAD: usize = 40;
}

/// A view of an IPv6 packet starting at its fixed header.
///
/// The buffer may extend past the payload (Ethernet padding);
/// [`payload`](Self::payload) stops at `payload_len`.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv6Packet { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks, in order: the buffer holds 40 bytes (`Truncated`); version
    /// is 6 (`Malformed`); the buffer holds `40 + payload_len` bytes
    /// (`Truncated`). A zero `payload_len` (jumbogram) is accepted and gives
    /// an empty payload.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if self.version() != 6 {
            return Err(WireError::Malformed);
        }
        if data.len() < HEADER_LEN + usize::from(self.payload_len()) {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn ver_tc_flow(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::VER_TC_FLOW)
    }

    pub fn version(&self) -> u8 {
        (self.ver_tc_flow() >> 28) as u8
    }

    /// DSCP (high 6 bits) and ECN (low 2 bits).
    pub fn traffic_class(&self) -> u8 {
        ((self.ver_tc_flow() & TRAFFIC_CLASS_MASK) >> TRAFFIC_CLASS_SHIFT) as u8
    }

    pub fn flow_label(&self) -> u32 {
        self.ver_tc_flow() & FLOW_LABEL_MASK
    }

    /// Length of everything after the fixed header, extension headers
    /// included.
    pub fn payload_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::PAYLOAD_LEN)
    }

    /// Protocol of the bytes after the fixed header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_HEADER]
    }

    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    pub fn src_addr(&self) -> [u8; 16] {
        read_array(self.buffer.as_ref(), field::SRC)
    }

    pub fn dst_addr(&self) -> [u8; 16] {
        read_array(self.buffer.as_ref(), field::DST)
    }

    fn payload_range(&self) -> core::ops::Range<usize> {
        let end = field::PAYLOAD + usize::from(self.payload_len());
        clamp_range(field::PAYLOAD, end, self.buffer.as_ref().len())
    }

    /// The `payload_len` bytes after the fixed header. Clamped to the
    /// buffer, so it stays panic-free after any `set_payload_len`.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.payload_range()]
    }

    /// The upper-layer pseudo-header sum for the payload, taking
    /// `next_header` as the upper-layer protocol (valid only without
    /// extension headers, see the module docs).
    pub fn pseudo_header(&self) -> Checksum {
        pseudo_header_v6(
            self.src_addr(),
            self.dst_addr(),
            self.next_header(),
            self.payload().len() as u32,
        )
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets the payload length. Does not move data.
    pub fn set_payload_len(&mut self, len: u16) {
        write_u16(self.buffer.as_mut(), field::PAYLOAD_LEN, len);
    }

    /// Mutable `payload_len` bytes after the fixed header (clamped).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = self.payload_range();
        &mut self.buffer.as_mut()[range]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv6Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::*;

    fn packet_bytes() -> &'static [u8] {
        &FRAME_V6_UDP[V6_IP_OFFSET..]
    }

    #[test]
    fn parse() {
        let ip = Ipv6Packet::new_checked(packet_bytes()).unwrap();
        assert_eq!(ip.version(), 6);
        assert_eq!(ip.traffic_class(), 0);
        assert_eq!(ip.flow_label(), 0x12345);
        assert_eq!(ip.payload_len(), 21);
        assert_eq!(ip.next_header(), PROTO_UDP);
        assert_eq!(ip.hop_limit(), 64);
        assert_eq!(ip.src_addr(), V6_SRC);
        assert_eq!(ip.dst_addr(), V6_DST);
        assert_eq!(ip.payload(), &FRAME_V6_UDP[V6_UDP_OFFSET..]);
        assert_eq!(ip.pseudo_header().fold(), V6_PSEUDO_FOLDED);
    }

    #[test]
    fn traffic_class_bits() {
        let mut bytes = packet_bytes().to_vec();
        // Version 6, traffic class 0xb8 (EF), flow label 0xfffff.
        bytes[..4].copy_from_slice(&0x6b8f_ffffu32.to_be_bytes());
        let ip = Ipv6Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.version(), 6);
        assert_eq!(ip.traffic_class(), 0xb8);
        assert_eq!(ip.flow_label(), 0xfffff);
    }

    #[test]
    fn trailing_padding_ignored() {
        let mut bytes = packet_bytes().to_vec();
        bytes.extend_from_slice(&[0; 7]);
        let ip = Ipv6Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.payload(), &FRAME_V6_UDP[V6_UDP_OFFSET..]);
        assert_eq!(ip.pseudo_header().fold(), V6_PSEUDO_FOLDED);
    }

    #[test]
    fn setters_round_trip() {
        let mut bytes = packet_bytes().to_vec();
        let mut ip = Ipv6Packet::new_checked(&mut bytes[..]).unwrap();
        ip.set_payload_len(8);
        assert_eq!(ip.payload_len(), 8);
        assert_eq!(ip.payload().len(), 8);
        ip.set_payload_len(u16::MAX);
        assert_eq!(ip.payload().len(), 21);
        assert_eq!(ip.payload_mut().len(), 21);
        ip.set_payload_len(21);
        ip.payload_mut()[0] = 0x14;
        assert_eq!(bytes, packet_bytes());
    }

    #[test]
    fn truncated_and_malformed_rejected() {
        let good = packet_bytes();
        for len in 0..good.len() {
            assert_eq!(
                Ipv6Packet::new_checked(&good[..len]).unwrap_err(),
                WireError::Truncated,
                "len {len}"
            );
        }
        let mut v4 = good.to_vec();
        v4[0] = 0x45;
        assert_eq!(
            Ipv6Packet::new_checked(&v4[..]).unwrap_err(),
            WireError::Malformed
        );
        let mut jumbo = good[..HEADER_LEN].to_vec();
        jumbo[4..6].copy_from_slice(&[0, 0]);
        let ip = Ipv6Packet::new_checked(&jumbo[..]).unwrap();
        assert!(ip.payload().is_empty());
    }

    #[test]
    fn checked_view_accessors_never_panic() {
        use proptest::prelude::*;
        proptest!(|(mut bytes in prop::collection::vec(any::<u8>(), 0..100), len in 0u16..80)| {
            // Mostly-plausible headers so that many inputs pass the check.
            if bytes.len() >= HEADER_LEN {
                bytes[0] = 0x60 | (bytes[0] & 0x0f);
                bytes[4..6].copy_from_slice(&len.to_be_bytes());
            }
            if let Ok(mut ip) = Ipv6Packet::new_checked(bytes) {
                let _ = (ip.traffic_class(), ip.flow_label(), ip.hop_limit());
                let _ = (ip.src_addr(), ip.dst_addr(), ip.payload(), ip.pseudo_header());
                ip.set_payload_len(u16::MAX);
                let _ = ip.payload_mut();
            }
        });
    }
}
