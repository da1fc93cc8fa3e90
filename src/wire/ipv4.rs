//! IPv4 headers (RFC 791).

use crate::wire::checksum::{pseudo_header_v4, Checksum};
use crate::wire::{clamp_range, read_array, read_u16, write_u16, Result, WireError};

/// Minimum (option-less) header length.
pub const HEADER_LEN: usize = 20;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// "Don't fragment" bit of the flags/fragment-offset word.
const FLAG_DF: u16 = 0x4000;
/// "More fragments" bit of the flags/fragment-offset word.
const FLAG_MF: u16 = 0x2000;
/// Fragment offset (in 8-byte units) bits of the same word.
const FRAG_OFFSET_MASK: u16 = 0x1fff;

mod field {
    use crate::wire::Field;

    /// Version (high nibble) and IHL in 32-bit words (low nibble).
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const TOTAL_LEN: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLAGS_FRAG: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SRC: Field = 12..16;
    pub const DST: Field = 16..20;
}

/// A view of an IPv4 packet starting at its header.
///
/// The buffer may extend past `total_len` (Ethernet padding of short
/// frames); [`payload`](Self::payload) stops at `total_len`.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than
    /// [`HEADER_LEN`] (and `payload` if it is shorter than the IHL says).
    pub const fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks, in order:
    /// 1. the buffer holds 20 bytes (`Truncated`);
    /// 2. version is 4 and IHL >= 5 (`Malformed`);
    /// 3. the buffer holds IHL * 4 bytes (`Truncated`);
    /// 4. `total_len >= IHL * 4` (`Malformed`);
    /// 5. `total_len <= buffer length` (`Truncated`).
    ///
    /// The header checksum, fragmentation fields and options are not
    /// checked. A `total_len` of 0 (Linux BIG TCP GSO packets over 64 KiB)
    /// is rejected as malformed; virtio-net never produces those.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if self.version() != 4 || self.header_len() < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if data.len() < self.header_len() {
            return Err(WireError::Truncated);
        }
        let total_len = usize::from(self.total_len());
        if total_len < self.header_len() {
            return Err(WireError::Malformed);
        }
        if total_len > data.len() {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL * 4, 0..=60).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// The former TOS byte: DSCP (high 6 bits) and ECN (low 2 bits).
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    /// Header plus payload length in bytes.
    pub fn total_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::TOTAL_LEN)
    }

    pub fn ident(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::IDENT)
    }

    fn flags_frag(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::FLAGS_FRAG)
    }

    pub fn dont_frag(&self) -> bool {
        self.flags_frag() & FLAG_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        self.flags_frag() & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the wire field counts 8-byte units).
    pub fn frag_offset(&self) -> u16 {
        (self.flags_frag() & FRAG_OFFSET_MASK) << 3
    }

    /// Whether this is a fragment (MF set or non-zero offset); L4 headers
    /// and checksums only make sense on unfragmented packets.
    pub fn is_fragment(&self) -> bool {
        self.flags_frag() & (FLAG_MF | FRAG_OFFSET_MASK) != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    pub fn header_checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn src_addr(&self) -> [u8; 4] {
        read_array(self.buffer.as_ref(), field::SRC)
    }

    pub fn dst_addr(&self) -> [u8; 4] {
        read_array(self.buffer.as_ref(), field::DST)
    }

    /// The header bytes, options included.
    pub fn header(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[..self.header_len().min(data.len())]
    }

    /// Options between the fixed header and the payload.
    pub fn options(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[clamp_range(HEADER_LEN, self.header_len(), data.len())]
    }

    /// Bytes from the end of the header up to `total_len`. Clamped to the
    /// buffer, so it stays panic-free after any `set_total_len`.
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        let range = clamp_range(self.header_len(), usize::from(self.total_len()), data.len());
        &data[range]
    }

    /// True if the header checksum is correct (sum over the header is 0).
    pub fn verify_checksum(&self) -> bool {
        Checksum::new().add_bytes(self.header()).finish() == 0
    }

    /// The TCP/UDP pseudo-header sum for this packet's payload.
    pub fn pseudo_header(&self) -> Checksum {
        pseudo_header_v4(
            self.src_addr(),
            self.dst_addr(),
            self.protocol(),
            self.payload().len() as u32,
        )
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets the total length. Does not move data or update the checksum.
    pub fn set_total_len(&mut self, len: u16) {
        write_u16(self.buffer.as_mut(), field::TOTAL_LEN, len);
    }

    pub fn set_ident(&mut self, ident: u16) {
        write_u16(self.buffer.as_mut(), field::IDENT, ident);
    }

    pub fn set_header_checksum(&mut self, checksum: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    /// Recomputes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_header_checksum(0);
        let checksum = Checksum::new().add_bytes(self.header()).finish();
        self.set_header_checksum(checksum);
    }

    /// Mutable bytes from the end of the header up to `total_len` (clamped).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = clamp_range(
            self.header_len(),
            usize::from(self.total_len()),
            self.buffer.as_ref().len(),
        );
        &mut self.buffer.as_mut()[range]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Ipv4Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::*;

    fn packet_bytes() -> &'static [u8] {
        &FRAME_V4_TCP[V4_IP_OFFSET..]
    }

    #[test]
    fn parse() {
        let ip = Ipv4Packet::new_checked(packet_bytes()).unwrap();
        assert_eq!(ip.version(), 4);
        assert_eq!(ip.header_len(), 20);
        assert_eq!(ip.dscp_ecn(), 0);
        assert_eq!(ip.total_len(), 65);
        assert_eq!(ip.ident(), 0x1c46);
        assert!(ip.dont_frag());
        assert!(!ip.more_frags());
        assert_eq!(ip.frag_offset(), 0);
        assert!(!ip.is_fragment());
        assert_eq!(ip.ttl(), 64);
        assert_eq!(ip.protocol(), PROTO_TCP);
        assert_eq!(ip.header_checksum(), V4_IP_CHECKSUM);
        assert_eq!(ip.src_addr(), V4_SRC);
        assert_eq!(ip.dst_addr(), V4_DST);
        assert!(ip.options().is_empty());
        assert_eq!(ip.payload(), &FRAME_V4_TCP[V4_TCP_OFFSET..]);
        assert!(ip.verify_checksum());
        assert_eq!(ip.pseudo_header().fold(), V4_PSEUDO_FOLDED);
    }

    /// Ethernet pads short frames to 60 bytes; the payload must stop at
    /// total_len and the pseudo-header must use the real L4 length.
    #[test]
    fn trailing_padding_ignored() {
        let mut bytes = packet_bytes().to_vec();
        bytes.extend_from_slice(&[0; 9]);
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(ip.payload(), &FRAME_V4_TCP[V4_TCP_OFFSET..]);
        assert_eq!(ip.pseudo_header().fold(), V4_PSEUDO_FOLDED);
    }

    #[test]
    fn fragment_fields() {
        let mut bytes = packet_bytes().to_vec();
        // MF set, offset 185 * 8 = 1480 bytes.
        bytes[6..8].copy_from_slice(&(0x2000u16 | 185).to_be_bytes());
        let ip = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert!(!ip.dont_frag());
        assert!(ip.more_frags());
        assert_eq!(ip.frag_offset(), 1480);
        assert!(ip.is_fragment());
    }

    #[test]
    fn setters_round_trip() {
        let mut bytes = packet_bytes().to_vec();
        let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        ip.set_total_len(40);
        ip.set_ident(0xbeef);
        ip.fill_checksum();
        assert_eq!(ip.total_len(), 40);
        assert_eq!(ip.ident(), 0xbeef);
        assert!(ip.verify_checksum());
        assert_ne!(ip.header_checksum(), V4_IP_CHECKSUM);
        assert_eq!(ip.payload().len(), 20);
        ip.set_header_checksum(0x1234);
        assert_eq!(ip.header_checksum(), 0x1234);
        assert!(!ip.verify_checksum());
        ip.set_total_len(65);
        ip.set_ident(0x1c46);
        ip.fill_checksum();
        assert_eq!(ip.header_checksum(), V4_IP_CHECKSUM);
        ip.payload_mut()[0] = 0xc0;
        assert_eq!(bytes, packet_bytes());
    }

    /// Setters can make fields inconsistent with the buffer; payload
    /// accessors must clamp instead of panicking.
    #[test]
    fn payload_clamps_after_bad_total_len() {
        let mut bytes = packet_bytes().to_vec();
        let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        ip.set_total_len(u16::MAX);
        assert_eq!(ip.payload().len(), 45);
        ip.set_total_len(3);
        assert!(ip.payload().is_empty());
        assert!(ip.payload_mut().is_empty());
        assert_eq!(ip.pseudo_header().fold(), {
            pseudo_header_v4(V4_SRC, V4_DST, PROTO_TCP, 0).fold()
        });
    }

    #[test]
    fn options_are_exposed() {
        // IHL 6 with a 4-byte option (NOP NOP NOP EOL), total_len + 4.
        let mut bytes = packet_bytes()[..20].to_vec();
        bytes.extend_from_slice(&[1, 1, 1, 0]);
        bytes.extend_from_slice(&packet_bytes()[20..]);
        bytes[0] = 0x46;
        bytes[2..4].copy_from_slice(&69u16.to_be_bytes());
        let mut ip = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        ip.fill_checksum();
        assert!(ip.verify_checksum());
        assert_eq!(ip.header_len(), 24);
        assert_eq!(ip.options(), &[1, 1, 1, 0]);
        assert_eq!(ip.payload(), &FRAME_V4_TCP[V4_TCP_OFFSET..]);
    }

    #[test]
    fn truncated_and_malformed_rejected() {
        let good = packet_bytes();
        for len in 0..HEADER_LEN {
            assert_eq!(
                Ipv4Packet::new_checked(&good[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        // Shorter than total_len.
        for len in HEADER_LEN..good.len() {
            assert_eq!(
                Ipv4Packet::new_checked(&good[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        let mutate = |offset: usize, value: u8| {
            let mut bytes = good.to_vec();
            bytes[offset] = value;
            Ipv4Packet::new_checked(bytes).unwrap_err()
        };
        assert_eq!(mutate(0, 0x65), WireError::Malformed); // version 6
        assert_eq!(mutate(0, 0x44), WireError::Malformed); // IHL 4
        assert_eq!(mutate(3, 19), WireError::Malformed); // total_len < header
        assert_eq!(mutate(3, 0), WireError::Malformed); // total_len 0
        assert_eq!(mutate(3, 66), WireError::Truncated); // total_len > buffer

        // IHL 15 needs 60 header bytes; only 20 bytes present.
        let short_ihl = [
            0x4f, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        assert_eq!(
            Ipv4Packet::new_checked(&short_ihl[..]).unwrap_err(),
            WireError::Truncated
        );
    }

    /// Whatever the bytes, a view that passed new_checked never panics.
    #[test]
    fn checked_view_accessors_never_panic() {
        use proptest::prelude::*;
        proptest!(|(mut bytes in prop::collection::vec(any::<u8>(), 0..100), len in 0u16..120)| {
            // Mostly-plausible headers so that many inputs pass the check.
            if bytes.len() >= HEADER_LEN {
                bytes[0] = 0x40 | (bytes[0] & 0x0f);
                bytes[2..4].copy_from_slice(&len.to_be_bytes());
            }
            if let Ok(mut ip) = Ipv4Packet::new_checked(bytes) {
                let _ = (ip.version(), ip.dscp_ecn(), ip.ident(), ip.ttl());
                let _ = (ip.frag_offset(), ip.header_checksum(), ip.src_addr(), ip.dst_addr());
                let _ = (ip.options(), ip.payload(), ip.verify_checksum(), ip.pseudo_header());
                ip.set_total_len(u16::MAX);
                ip.fill_checksum();
                let _ = ip.payload_mut();
            }
        });
    }
}
