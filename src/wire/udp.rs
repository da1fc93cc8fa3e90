//! UDP datagram headers (RFC 768).

use crate::wire::checksum::Checksum;
use crate::wire::{clamp_range, read_u16, write_u16, Result, WireError};

/// UDP header length.
pub const HEADER_LEN: usize = 8;
/// Checksum field offset from the start of the UDP header (virtio
/// `csum_offset` for UDP).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

mod field {
    use crate::wire::Field;

    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    /// Header plus payload length.
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
}

/// A view of a UDP datagram starting at its header.
///
/// The buffer may extend past the length field (IP or Ethernet padding);
/// [`payload`](Self::payload) and the checksum helpers stop at `len`.
#[derive(Debug, Clone)]
pub struct UdpDatagram<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpDatagram<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpDatagram { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let datagram = Self::new_unchecked(buffer);
        datagram.check_len()?;
        Ok(datagram)
    }

    /// Checks that 8 bytes fit (`Truncated`), the length field is at least 8
    /// (`Malformed`) and at most the buffer length (`Truncated`). The
    /// checksum is not checked.
    pub fn check_len(&self) -> Result<()> {
        let buffer_len = self.buffer.as_ref().len();
        if buffer_len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = usize::from(self.len());
        if len < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if len > buffer_len {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn src_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// The length field: header plus payload bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::LENGTH)
    }

    /// The checksum field; 0 means "not computed" (IPv4 only).
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Header and payload, i.e. the buffer cut at the length field (clamped).
    fn datagram(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[..usize::from(self.len()).min(data.len())]
    }

    /// Bytes after the header up to the length field. Clamped to the
    /// buffer, so it stays panic-free after any `set_len`.
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[clamp_range(HEADER_LEN, usize::from(self.len()), data.len())]
    }

    /// True if the checksum is correct. `pseudo` is the IP pseudo-header
    /// sum for a length equal to the length field. A zero checksum field
    /// ("none" over IPv4) does not verify; callers check for it first.
    pub fn verify_checksum(&self, pseudo: Checksum) -> bool {
        let mut sum = pseudo;
        sum.add_bytes(self.datagram()).finish() == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpDatagram<T> {
    pub fn set_src_port(&mut self, port: u16) {
        write_u16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    pub fn set_dst_port(&mut self, port: u16) {
        write_u16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    /// Sets the length field. Does not move data or update the checksum.
    pub fn set_len(&mut self, len: u16) {
        write_u16(self.buffer.as_mut(), field::LENGTH, len);
    }

    pub fn set_checksum(&mut self, checksum: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    /// Computes and stores the checksum over `pseudo` plus the datagram,
    /// storing a computed 0 as 0xFFFF since 0 means "no checksum".
    pub fn fill_checksum(&mut self, pseudo: Checksum) {
        self.set_checksum(0);
        let mut sum = pseudo;
        let checksum = sum.add_bytes(self.datagram()).finish_udp();
        self.set_checksum(checksum);
    }

    /// Mutable bytes after the header up to the length field (clamped).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = clamp_range(
            HEADER_LEN,
            usize::from(self.len()),
            self.buffer.as_ref().len(),
        );
        &mut self.buffer.as_mut()[range]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for UdpDatagram<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::{pseudo_header_v4, pseudo_header_v6};
    use crate::wire::ipv4::PROTO_UDP;
    use crate::wire::testdata::*;

    fn datagram_bytes() -> &'static [u8] {
        &FRAME_V6_UDP[V6_UDP_OFFSET..]
    }

    fn pseudo() -> Checksum {
        pseudo_header_v6(V6_SRC, V6_DST, PROTO_UDP, V6_UDP_LEN)
    }

    #[test]
    fn checksum_offset_matches_field() {
        assert_eq!(CHECKSUM_OFFSET, 6);
    }

    #[test]
    fn parse() {
        let udp = UdpDatagram::new_checked(datagram_bytes()).unwrap();
        assert_eq!(udp.src_port(), 5353);
        assert_eq!(udp.dst_port(), 53);
        assert_eq!(udp.len(), 21);
        assert_eq!(udp.checksum(), V6_UDP_CHECKSUM);
        assert_eq!(udp.payload(), b"vhost-packet!");
        assert!(udp.verify_checksum(pseudo()));
    }

    #[test]
    fn trailing_padding_ignored() {
        let mut bytes = datagram_bytes().to_vec();
        bytes.extend_from_slice(&[0xee; 5]);
        let mut udp = UdpDatagram::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(udp.payload(), b"vhost-packet!");
        assert!(udp.verify_checksum(pseudo()));
        udp.fill_checksum(pseudo());
        assert_eq!(udp.checksum(), V6_UDP_CHECKSUM);
    }

    #[test]
    fn setters_round_trip() {
        let mut bytes = datagram_bytes().to_vec();
        let mut udp = UdpDatagram::new_checked(&mut bytes[..]).unwrap();
        udp.set_src_port(1);
        udp.set_dst_port(2);
        udp.set_len(9);
        udp.set_checksum(0x1234);
        assert_eq!((udp.src_port(), udp.dst_port()), (1, 2));
        assert_eq!((udp.len(), udp.checksum()), (9, 0x1234));
        assert_eq!(udp.payload(), b"v");
        udp.set_len(u16::MAX);
        assert_eq!(udp.payload().len(), 13);
        udp.set_len(3);
        assert!(udp.payload().is_empty());
        assert!(udp.payload_mut().is_empty());
        udp.set_src_port(5353);
        udp.set_dst_port(53);
        udp.set_len(21);
        udp.fill_checksum(pseudo());
        assert_eq!(udp.checksum(), V6_UDP_CHECKSUM);
        udp.payload_mut()[0] = b'v';
        assert_eq!(bytes, datagram_bytes());
    }

    /// A datagram whose checksum computes to 0 must be sent as 0xFFFF.
    /// The payload word is chosen so the ones'-complement sum is 0xFFFF.
    #[test]
    fn fill_checksum_zero_becomes_ffff() {
        let src = [10, 0, 0, 1];
        let dst = [10, 0, 0, 2];
        let mut bytes = vec![0u8; 10];
        bytes[4..6].copy_from_slice(&10u16.to_be_bytes());
        let pseudo = pseudo_header_v4(src, dst, PROTO_UDP, 10);
        let mut partial = pseudo;
        partial.add_bytes(&bytes);
        bytes[8..10].copy_from_slice(&(!partial.fold()).to_be_bytes());
        let mut udp = UdpDatagram::new_checked(&mut bytes[..]).unwrap();
        udp.fill_checksum(pseudo);
        assert_eq!(udp.checksum(), 0xFFFF);
        assert!(udp.verify_checksum(pseudo));
    }

    #[test]
    fn truncated_and_malformed_rejected() {
        let good = datagram_bytes();
        for len in 0..good.len() {
            assert_eq!(
                UdpDatagram::new_checked(&good[..len]).unwrap_err(),
                WireError::Truncated,
                "len {len}"
            );
        }
        for bad_len in 0..8u16 {
            let mut bytes = good.to_vec();
            bytes[4..6].copy_from_slice(&bad_len.to_be_bytes());
            assert_eq!(
                UdpDatagram::new_checked(&bytes[..]).unwrap_err(),
                WireError::Malformed
            );
        }
    }

    #[test]
    fn checked_view_accessors_never_panic() {
        use proptest::prelude::*;
        proptest!(|(mut bytes in prop::collection::vec(any::<u8>(), 0..40), len in any::<u16>())| {
            // Mostly-plausible length fields so that many inputs pass the check.
            if bytes.len() >= HEADER_LEN {
                bytes[4] = 0;
                bytes[5] %= 48;
            }
            if let Ok(mut udp) = UdpDatagram::new_checked(bytes) {
                let _ = (udp.src_port(), udp.dst_port(), udp.checksum());
                let _ = (udp.payload(), udp.verify_checksum(Checksum::new()));
                udp.set_len(len);
                udp.fill_checksum(Checksum::new());
                let _ = udp.payload();
                let _ = udp.payload_mut();
            }
        });
    }
}
