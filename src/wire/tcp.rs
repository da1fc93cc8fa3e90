//! TCP segment headers (RFC 9293).

use crate::wire::checksum::Checksum;
use crate::wire::{clamp_range, read_u16, read_u32, write_u16, write_u32, Result, WireError};

/// Minimum (option-less) header length.
pub const HEADER_LEN: usize = 20;
/// Checksum field offset from the start of the TCP header (virtio
/// `csum_offset` for TCP).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM.start;

/// Flag bits of the flags byte (header byte 13).
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

mod field {
    use crate::wire::Field;

    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const SEQ: Field = 4..8;
    pub const ACK: Field = 8..12;
    /// Data offset in 32-bit words (high nibble); low nibble reserved.
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: Field = 14..16;
    pub const CHECKSUM: Field = 16..18;
    pub const URGENT: Field = 18..20;
}

/// A view of one TCP segment: the buffer must be exactly the segment (e.g.
/// an IP payload), since its length is the L4 length used for checksums.
#[derive(Debug, Clone)]
pub struct TcpSegment<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpSegment<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        TcpSegment { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let segment = Self::new_unchecked(buffer);
        segment.check_len()?;
        Ok(segment)
    }

    /// Checks that 20 bytes fit (`Truncated`), the data offset is at least
    /// 5 words (`Malformed`) and the header it declares fits (`Truncated`).
    /// Options and the checksum are not checked.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if self.header_len() < HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if self.header_len() > len {
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

    pub fn seq(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::SEQ)
    }

    /// Acknowledgment number (meaningful only with the [`ACK`] flag).
    pub fn ack(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::ACK)
    }

    /// Header length in bytes (data offset * 4, 0..=60).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFFSET] >> 4) * 4
    }

    /// The flags byte: a mask of [`FIN`] ... [`CWR`].
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether every bit of `mask` is set.
    pub fn has_flags(&self, mask: u8) -> bool {
        self.flags() & mask == mask
    }

    pub fn window(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::WINDOW)
    }

    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    pub fn urgent_ptr(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::URGENT)
    }

    /// Option bytes between the fixed header and the payload.
    pub fn options(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[clamp_range(HEADER_LEN, self.header_len(), data.len())]
    }

    /// Bytes after the header (to the end of the buffer).
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[self.header_len().min(data.len())..]
    }

    /// True if the checksum is correct. `pseudo` is the IP pseudo-header
    /// sum for a length equal to this buffer's length.
    pub fn verify_checksum(&self, pseudo: Checksum) -> bool {
        let mut sum = pseudo;
        sum.add_bytes(self.buffer.as_ref()).finish() == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpSegment<T> {
    pub fn set_src_port(&mut self, port: u16) {
        write_u16(self.buffer.as_mut(), field::SRC_PORT, port);
    }

    pub fn set_dst_port(&mut self, port: u16) {
        write_u16(self.buffer.as_mut(), field::DST_PORT, port);
    }

    pub fn set_seq(&mut self, seq: u32) {
        write_u32(self.buffer.as_mut(), field::SEQ, seq);
    }

    pub fn set_ack(&mut self, ack: u32) {
        write_u32(self.buffer.as_mut(), field::ACK, ack);
    }

    /// Replaces the whole flags byte (the data offset is untouched).
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    /// Sets or clears the bits of `mask`, e.g. clearing [`FIN`] | [`PSH`]
    /// on all but the last segment when segmenting.
    pub fn set_flag(&mut self, mask: u8, on: bool) {
        let flags = self.flags();
        self.set_flags(if on { flags | mask } else { flags & !mask });
    }

    pub fn set_window(&mut self, window: u16) {
        write_u16(self.buffer.as_mut(), field::WINDOW, window);
    }

    pub fn set_checksum(&mut self, checksum: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    /// Computes and stores the checksum over `pseudo` plus the whole buffer.
    pub fn fill_checksum(&mut self, pseudo: Checksum) {
        self.set_checksum(0);
        let mut sum = pseudo;
        let checksum = sum.add_bytes(self.buffer.as_ref()).finish();
        self.set_checksum(checksum);
    }

    /// Bytes after the header, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len().min(self.buffer.as_ref().len());
        &mut self.buffer.as_mut()[start..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for TcpSegment<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::pseudo_header_v4;
    use crate::wire::ipv4::PROTO_TCP;
    use crate::wire::testdata::*;

    fn segment_bytes() -> &'static [u8] {
        &FRAME_V4_TCP[V4_TCP_OFFSET..]
    }

    fn pseudo() -> Checksum {
        pseudo_header_v4(V4_SRC, V4_DST, PROTO_TCP, V4_TCP_LEN)
    }

    #[test]
    fn checksum_offset_matches_field() {
        assert_eq!(CHECKSUM_OFFSET, 16);
    }

    #[test]
    fn parse() {
        let tcp = TcpSegment::new_checked(segment_bytes()).unwrap();
        assert_eq!(tcp.src_port(), 49152);
        assert_eq!(tcp.dst_port(), 80);
        assert_eq!(tcp.seq(), 0x0102_0304);
        assert_eq!(tcp.ack(), 0x0a0b_0c0d);
        assert_eq!(tcp.header_len(), 32);
        assert_eq!(tcp.flags(), PSH | ACK);
        assert!(tcp.has_flags(PSH | ACK));
        assert!(!tcp.has_flags(SYN));
        assert!(!tcp.has_flags(ACK | FIN));
        assert_eq!(tcp.window(), 502);
        assert_eq!(tcp.checksum(), V4_TCP_CHECKSUM);
        assert_eq!(tcp.urgent_ptr(), 0);
        assert_eq!(
            tcp.options(),
            &[1, 1, 8, 10, 0x00, 0x01, 0xe2, 0x40, 0x00, 0xbc, 0x61, 0x4e]
        );
        assert_eq!(tcp.payload(), b"hello, world!");
        assert!(tcp.verify_checksum(pseudo()));
    }

    #[test]
    fn setters_round_trip() {
        let mut bytes = segment_bytes().to_vec();
        let mut tcp = TcpSegment::new_checked(&mut bytes[..]).unwrap();
        tcp.set_src_port(1);
        tcp.set_dst_port(2);
        tcp.set_seq(0xdead_beef);
        tcp.set_ack(0xfeed_f00d);
        tcp.set_flags(FIN | SYN | RST | URG | ECE | CWR);
        tcp.set_window(7);
        tcp.set_checksum(0xabcd);
        assert_eq!((tcp.src_port(), tcp.dst_port()), (1, 2));
        assert_eq!((tcp.seq(), tcp.ack()), (0xdead_beef, 0xfeed_f00d));
        assert_eq!(tcp.flags(), 0xe7);
        assert_eq!(tcp.header_len(), 32, "flags must not touch data offset");
        assert_eq!((tcp.window(), tcp.checksum()), (7, 0xabcd));
        tcp.set_flag(FIN | SYN | RST | URG | ECE | CWR, false);
        assert_eq!(tcp.flags(), 0);
        tcp.set_flag(PSH, true);
        tcp.set_flag(ACK, true);
        tcp.set_src_port(49152);
        tcp.set_dst_port(80);
        tcp.set_seq(0x0102_0304);
        tcp.set_ack(0x0a0b_0c0d);
        tcp.set_window(502);
        assert!(!tcp.verify_checksum(pseudo()));
        tcp.fill_checksum(pseudo());
        assert!(tcp.verify_checksum(pseudo()));
        assert_eq!(tcp.checksum(), V4_TCP_CHECKSUM);
        tcp.payload_mut()[0] = b'h';
        assert_eq!(bytes, segment_bytes());
    }

    /// Segment the frame's payload as software TSO would, then check that
    /// each piece gets a valid checksum for its own length.
    #[test]
    fn fill_checksum_per_segment() {
        let header = &segment_bytes()[..32];
        for chunk in b"hello, world!".chunks(5) {
            let mut bytes = header.to_vec();
            bytes.extend_from_slice(chunk);
            let pseudo = pseudo_header_v4(V4_SRC, V4_DST, PROTO_TCP, bytes.len() as u32);
            let mut tcp = TcpSegment::new_checked(&mut bytes[..]).unwrap();
            tcp.fill_checksum(pseudo);
            assert!(tcp.verify_checksum(pseudo));
            assert_eq!(tcp.payload(), chunk);
        }
    }

    #[test]
    fn truncated_and_malformed_rejected() {
        let good = segment_bytes();
        for len in 0..32 {
            assert_eq!(
                TcpSegment::new_checked(&good[..len]).unwrap_err(),
                WireError::Truncated,
                "len {len}"
            );
        }
        assert!(TcpSegment::new_checked(&good[..32])
            .unwrap()
            .payload()
            .is_empty());
        for offset in 0..5u8 {
            let mut bytes = good.to_vec();
            bytes[12] = offset << 4;
            assert_eq!(
                TcpSegment::new_checked(&bytes[..]).unwrap_err(),
                WireError::Malformed
            );
        }
        let mut bytes = good.to_vec();
        bytes[12] = 0xf0; // 60-byte header, 45 bytes present.
        assert_eq!(
            TcpSegment::new_checked(&bytes[..]).unwrap_err(),
            WireError::Truncated
        );
    }

    #[test]
    fn checked_view_accessors_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in prop::collection::vec(any::<u8>(), 0..80), flags in any::<u8>())| {
            if let Ok(mut tcp) = TcpSegment::new_checked(bytes) {
                let _ = (tcp.src_port(), tcp.dst_port(), tcp.seq(), tcp.ack());
                let _ = (tcp.window(), tcp.checksum(), tcp.urgent_ptr());
                let _ = (tcp.options(), tcp.payload(), tcp.verify_checksum(Checksum::new()));
                tcp.set_flags(flags);
                tcp.fill_checksum(Checksum::new());
                let _ = tcp.payload_mut();
            }
        });
    }
}
