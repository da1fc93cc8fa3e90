//! The virtio net header (`virtio_net_hdr`, 10 bytes, and `virtio_net_hdr_mrg_rxbuf` /
//! `virtio_net_hdr_v1`, 12 bytes) as a checked view over a byte buffer.
//!
//! All multi-byte fields are little-endian: VERSION_1 devices are little-endian by definition and
//! legacy devices use the guest's native order, which is little-endian on every host we build for.

use std::fmt;

use virtio_bindings::virtio_net as vn;

/// Length of the header without `num_buffers`.
pub const LEN_BASE: usize = 10;
/// Length of the header with `num_buffers` (MRG_RXBUF or VERSION_1).
pub const LEN_MRG: usize = 12;

// The header's u8 fields take virtio-bindings' u32 constants.
/// `flags`: the checksum from `csum_start` on still has to be computed.
pub const FLAG_NEEDS_CSUM: u8 = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `flags`: the checksum has been validated (receive side only).
pub const FLAG_DATA_VALID: u8 = vn::VIRTIO_NET_HDR_F_DATA_VALID as u8;

/// `gso_type` values.
pub const GSO_NONE: u8 = vn::VIRTIO_NET_HDR_GSO_NONE as u8;
pub const GSO_TCPV4: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
pub const GSO_UDP: u8 = vn::VIRTIO_NET_HDR_GSO_UDP as u8;
pub const GSO_TCPV6: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
pub const GSO_UDP_L4: u8 = vn::VIRTIO_NET_HDR_GSO_UDP_L4 as u8;
/// `gso_type` flag: the TCP stream carries ECN (CWR set on the first segment).
pub const GSO_ECN: u8 = vn::VIRTIO_NET_HDR_GSO_ECN as u8;

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
    pub const NUM_BUFFERS: Range<usize> = 10..12;
}

/// The kind of segmentation a header asks for, without the ECN bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoKind {
    None,
    TcpV4,
    TcpV6,
    /// Legacy UDP fragmentation offload (UFO); never offered, so always refused.
    Ufo,
    /// UDP segmentation offload (USO).
    UdpL4,
    /// Anything else: invalid.
    Unknown(u8),
}

impl GsoKind {
    fn from_raw(gso_type: u8) -> GsoKind {
        match gso_type & !GSO_ECN {
            GSO_NONE => GsoKind::None,
            GSO_TCPV4 => GsoKind::TcpV4,
            GSO_TCPV6 => GsoKind::TcpV6,
            GSO_UDP => GsoKind::Ufo,
            GSO_UDP_L4 => GsoKind::UdpL4,
            other => GsoKind::Unknown(other),
        }
    }
}

/// Why a buffer cannot be viewed as a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderTooShort {
    pub needed: usize,
    pub got: usize,
}

impl fmt::Display for HeaderTooShort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "virtio net header needs {} bytes, buffer has {}",
            self.needed, self.got
        )
    }
}

impl std::error::Error for HeaderTooShort {}

/// A 10- or 12-byte virtio net header. The length of the view decides which.
#[derive(Clone, Copy, Debug)]
pub struct NetHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> NetHeader<T> {
    /// Views `buffer` as a header after checking it holds at least `len` (10 or 12) bytes.
    /// The form follows the buffer's length (12 bytes or more: with `num_buffers`), so callers
    /// pass a buffer cut to the header they mean.
    ///
    /// Panics unless `len` is 10 or 12: that value comes from negotiated features, never from
    /// the guest.
    pub fn new_checked(buffer: T, len: usize) -> Result<NetHeader<T>, HeaderTooShort> {
        assert!(
            len == LEN_BASE || len == LEN_MRG,
            "virtio net header length must be 10 or 12"
        );
        let got = buffer.as_ref().len();
        if got < len {
            return Err(HeaderTooShort { needed: len, got });
        }
        Ok(NetHeader { buffer })
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn u16_at(&self, range: std::ops::Range<usize>) -> u16 {
        let b = &self.bytes()[range];
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Header length in bytes: 10 or 12.
    pub fn header_len(&self) -> usize {
        if self.bytes().len() >= LEN_MRG {
            LEN_MRG
        } else {
            LEN_BASE
        }
    }

    pub fn flags(&self) -> u8 {
        self.bytes()[field::FLAGS]
    }

    pub fn needs_csum(&self) -> bool {
        self.flags() & FLAG_NEEDS_CSUM != 0
    }

    pub fn data_valid(&self) -> bool {
        self.flags() & FLAG_DATA_VALID != 0
    }

    /// The raw `gso_type` byte, including the ECN bit.
    pub fn gso_type(&self) -> u8 {
        self.bytes()[field::GSO_TYPE]
    }

    pub fn gso_kind(&self) -> GsoKind {
        GsoKind::from_raw(self.gso_type())
    }

    pub fn gso_ecn(&self) -> bool {
        self.gso_type() & GSO_ECN != 0
    }

    pub fn hdr_len(&self) -> u16 {
        self.u16_at(field::HDR_LEN)
    }

    pub fn gso_size(&self) -> u16 {
        self.u16_at(field::GSO_SIZE)
    }

    pub fn csum_start(&self) -> u16 {
        self.u16_at(field::CSUM_START)
    }

    pub fn csum_offset(&self) -> u16 {
        self.u16_at(field::CSUM_OFFSET)
    }

    /// `num_buffers`, present only in the 12-byte form.
    pub fn num_buffers(&self) -> Option<u16> {
        (self.header_len() == LEN_MRG).then(|| self.u16_at(field::NUM_BUFFERS))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> NetHeader<T> {
    fn set_u16_at(&mut self, range: std::ops::Range<usize>, value: u16) {
        self.buffer.as_mut()[range].copy_from_slice(&value.to_le_bytes());
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    pub fn set_gso_type(&mut self, gso_type: u8) {
        self.buffer.as_mut()[field::GSO_TYPE] = gso_type;
    }

    pub fn set_hdr_len(&mut self, value: u16) {
        self.set_u16_at(field::HDR_LEN, value);
    }

    pub fn set_gso_size(&mut self, value: u16) {
        self.set_u16_at(field::GSO_SIZE, value);
    }

    pub fn set_csum_start(&mut self, value: u16) {
        self.set_u16_at(field::CSUM_START, value);
    }

    pub fn set_csum_offset(&mut self, value: u16) {
        self.set_u16_at(field::CSUM_OFFSET, value);
    }

    /// Sets `num_buffers`; a no-op on the 10-byte form, which has no such field.
    pub fn set_num_buffers(&mut self, value: u16) {
        if self.header_len() == LEN_MRG {
            self.set_u16_at(field::NUM_BUFFERS, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header the kernel produced for a 30000-byte TCP GSO frame (kernel-facts.md §2b).
    static WIRE: [u8; 12] = [
        0x01, 0x01, 0x36, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn parses_every_field_of_a_kernel_header() {
        let h = NetHeader::new_checked(&WIRE[..], LEN_MRG).unwrap();
        assert_eq!(h.header_len(), 12);
        assert_eq!(h.flags(), FLAG_NEEDS_CSUM);
        assert!(h.needs_csum());
        assert!(!h.data_valid());
        assert_eq!(h.gso_kind(), GsoKind::TcpV4);
        assert!(!h.gso_ecn());
        assert_eq!(h.hdr_len(), 54);
        assert_eq!(h.gso_size(), 1448);
        assert_eq!(h.csum_start(), 34);
        assert_eq!(h.csum_offset(), 16);
        assert_eq!(h.num_buffers(), Some(0));
    }

    #[test]
    fn ten_byte_form_has_no_num_buffers() {
        let mut buf = WIRE;
        let mut h = NetHeader::new_checked(&mut buf[..10], LEN_BASE).unwrap();
        assert_eq!(h.header_len(), 10);
        assert_eq!(h.num_buffers(), None);
        h.set_num_buffers(7);
        assert_eq!(buf[10..], [0, 0]);
    }

    #[test]
    fn rejects_short_buffers() {
        assert_eq!(
            NetHeader::new_checked(&WIRE[..11], LEN_MRG).unwrap_err(),
            HeaderTooShort {
                needed: 12,
                got: 11
            }
        );
        assert!(NetHeader::new_checked(&WIRE[..9], LEN_BASE).is_err());
    }

    #[test]
    fn setters_round_trip_both_sizes() {
        for len in [LEN_BASE, LEN_MRG] {
            let mut buf = [0u8; 12];
            let mut h = NetHeader::new_checked(&mut buf[..len], len).unwrap();
            h.set_flags(FLAG_DATA_VALID);
            h.set_gso_type(GSO_TCPV6 | GSO_ECN);
            h.set_hdr_len(0x1234);
            h.set_gso_size(0x5678);
            h.set_csum_start(0x9abc);
            h.set_csum_offset(0xdef0);
            h.set_num_buffers(0x0102);
            assert!(h.data_valid());
            assert_eq!(h.gso_kind(), GsoKind::TcpV6);
            assert!(h.gso_ecn());
            assert_eq!(h.hdr_len(), 0x1234);
            assert_eq!(h.gso_size(), 0x5678);
            assert_eq!(h.csum_start(), 0x9abc);
            assert_eq!(h.csum_offset(), 0xdef0);
            assert_eq!(h.num_buffers(), (len == LEN_MRG).then_some(0x0102));
            assert_eq!(buf[2..4], [0x34, 0x12], "little-endian on the wire");
        }
    }

    #[test]
    fn gso_kinds() {
        let kinds = [
            (0, GsoKind::None),
            (1, GsoKind::TcpV4),
            (3, GsoKind::Ufo),
            (4, GsoKind::TcpV6),
            (5, GsoKind::UdpL4),
            (0x81, GsoKind::TcpV4),
            (2, GsoKind::Unknown(2)),
            (7, GsoKind::Unknown(7)),
        ];
        for (raw, kind) in kinds {
            assert_eq!(GsoKind::from_raw(raw), kind, "gso_type {raw:#x}");
        }
    }
}
