//! Ethernet II frames with optional 802.1Q / 802.1ad VLAN tags.

use crate::wire::{read_array, read_u16, write_u16, Field, Result, WireError};

/// Untagged Ethernet header length (no FCS: AF_PACKET and virtio strip it).
pub const HEADER_LEN: usize = 14;
/// Bytes one 802.1Q/802.1ad tag adds (TPID + TCI).
pub const VLAN_TAG_LEN: usize = 4;
/// Tags walked by [`EthernetFrame::network_offset`]: single tag or QinQ.
pub const MAX_VLAN_TAGS: usize = 2;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// 802.1Q customer VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// 802.1ad service (outer QinQ) VLAN tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

mod field {
    use crate::wire::Field;

    pub const DST: Field = 0..6;
    pub const SRC: Field = 6..12;
    /// Outer ethertype, or the TPID of the first VLAN tag.
    pub const ETHERTYPE: Field = 12..14;
    /// TCI of a VLAN tag whose TPID sits in `ETHERTYPE`; the next ethertype
    /// (or TPID) follows at `ETHERTYPE` shifted by `VLAN_TAG_LEN`.
    pub const VLAN_TCI: Field = 14..16;
    pub const PAYLOAD: usize = 14;
}

/// `field` moved `by` bytes further into the frame (one slot per VLAN tag).
fn shifted(field: Field, by: usize) -> Field {
    field.start + by..field.end + by
}

/// Whether `ethertype` is the TPID of a VLAN tag we walk through.
pub fn is_vlan_tpid(ethertype: u16) -> bool {
    ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ
}

/// One 802.1Q/802.1ad tag as found on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VlanTag {
    /// Tag protocol identifier: [`ETHERTYPE_VLAN`] or [`ETHERTYPE_QINQ`].
    pub tpid: u16,
    /// Tag control information: PCP(3) | DEI(1) | VID(12).
    pub tci: u16,
}

impl VlanTag {
    /// VLAN identifier (low 12 bits of the TCI).
    pub fn vid(&self) -> u16 {
        self.tci & 0x0fff
    }

    /// Priority code point (top 3 bits of the TCI).
    pub fn pcp(&self) -> u8 {
        (self.tci >> 13) as u8
    }

    /// Drop eligible indicator.
    pub fn dei(&self) -> bool {
        self.tci & 0x1000 != 0
    }
}

/// Up to [`MAX_VLAN_TAGS`] tags, outermost first, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VlanTags {
    tags: [VlanTag; MAX_VLAN_TAGS],
    count: usize,
}

impl VlanTags {
    /// The tags present, outermost first.
    pub fn as_slice(&self) -> &[VlanTag] {
        &self.tags[..self.count]
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A view of an Ethernet II frame. The buffer is the whole frame without FCS.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than
    /// [`HEADER_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Checks only that the untagged header (14 bytes) fits. VLAN tags are
    /// validated lazily by [`vlan_tags`](Self::vlan_tags) and
    /// [`network_offset`](Self::network_offset), which never panic.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn dst_addr(&self) -> [u8; 6] {
        read_array(self.buffer.as_ref(), field::DST)
    }

    pub fn src_addr(&self) -> [u8; 6] {
        read_array(self.buffer.as_ref(), field::SRC)
    }

    /// The outer ethertype (a VLAN TPID on tagged frames).
    pub fn ethertype(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    /// Everything after the outer 14-byte header (VLAN tags included).
    pub fn payload(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[field::PAYLOAD.min(data.len())..]
    }

    /// Walks up to [`MAX_VLAN_TAGS`] tags. Uses only checked slice access,
    /// so it cannot panic even on an unchecked view.
    fn walk(&self) -> Result<(VlanTags, u16, usize)> {
        let data = self.buffer.as_ref();
        let read = |field: Field| {
            data.get(field)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or(WireError::Truncated)
        };
        let mut tags = VlanTags::default();
        let mut shift = 0;
        loop {
            let ethertype = read(shifted(field::ETHERTYPE, shift))?;
            if !is_vlan_tpid(ethertype) || tags.count == MAX_VLAN_TAGS {
                return Ok((tags, ethertype, field::PAYLOAD + shift));
            }
            let tci = read(shifted(field::VLAN_TCI, shift))?;
            tags.tags[tags.count] = VlanTag {
                tpid: ethertype,
                tci,
            };
            tags.count += 1;
            shift += VLAN_TAG_LEN;
        }
    }

    /// The VLAN tags in front of the network header, outermost first.
    ///
    /// Fails with [`WireError::Truncated`] if a tag or the ethertype after it
    /// does not fit in the buffer.
    pub fn vlan_tags(&self) -> Result<VlanTags> {
        self.walk().map(|(tags, _, _)| tags)
    }

    /// The ethertype after skipping up to [`MAX_VLAN_TAGS`] tags, and the
    /// offset of the bytes it describes (the L3 header).
    ///
    /// The offset is not checked against the buffer length: a frame may end
    /// right after its ethertype (the L3 parser reports truncation). With
    /// more than two tags the returned ethertype is the third TPID and the
    /// offset points at that tag's TCI, i.e. an unsupported L3 protocol.
    pub fn network_offset(&self) -> Result<(u16, usize)> {
        self.walk()
            .map(|(_, ethertype, offset)| (ethertype, offset))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_dst_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr);
    }

    pub fn set_src_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr);
    }

    /// Sets the outer ethertype (or first TPID).
    pub fn set_ethertype(&mut self, ethertype: u16) {
        write_u16(self.buffer.as_mut(), field::ETHERTYPE, ethertype);
    }

    /// Everything after the outer 14-byte header, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let data = self.buffer.as_mut();
        let start = field::PAYLOAD.min(data.len());
        &mut data[start..]
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for EthernetFrame<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::*;

    const DST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SRC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

    /// FRAME_V4_TCP with one 802.1Q tag (PCP 1, DEI 0, VID 100).
    fn one_tag() -> Vec<u8> {
        let mut frame = FRAME_V4_TCP[..12].to_vec();
        frame.extend_from_slice(&[0x81, 0x00, 0x20, 0x64]);
        frame.extend_from_slice(&FRAME_V4_TCP[12..]);
        frame
    }

    /// FRAME_V6_UDP with an 802.1ad outer tag (VID 200, DEI set) and an
    /// 802.1Q inner tag (PCP 7, VID 4095).
    fn two_tags() -> Vec<u8> {
        let mut frame = FRAME_V6_UDP[..12].to_vec();
        frame.extend_from_slice(&[0x88, 0xa8, 0x10, 0xc8, 0x81, 0x00, 0xef, 0xff]);
        frame.extend_from_slice(&FRAME_V6_UDP[12..]);
        frame
    }

    #[test]
    fn parse_untagged() {
        let frame = EthernetFrame::new_checked(&FRAME_V4_TCP[..]).unwrap();
        assert_eq!(frame.dst_addr(), DST);
        assert_eq!(frame.src_addr(), SRC);
        assert_eq!(frame.ethertype(), ETHERTYPE_IPV4);
        assert!(frame.vlan_tags().unwrap().is_empty());
        assert_eq!(frame.network_offset(), Ok((ETHERTYPE_IPV4, HEADER_LEN)));
        assert_eq!(frame.payload(), &FRAME_V4_TCP[HEADER_LEN..]);
    }

    #[test]
    fn parse_one_vlan_tag() {
        let bytes = one_tag();
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(frame.ethertype(), ETHERTYPE_VLAN);
        let tags = frame.vlan_tags().unwrap();
        assert_eq!(tags.len(), 1);
        let tag = tags.as_slice()[0];
        assert_eq!(tag.tpid, ETHERTYPE_VLAN);
        assert_eq!((tag.pcp(), tag.dei(), tag.vid()), (1, false, 100));
        let (ethertype, offset) = frame.network_offset().unwrap();
        assert_eq!(ethertype, ETHERTYPE_IPV4);
        assert_eq!(offset, HEADER_LEN + VLAN_TAG_LEN);
        assert_eq!(&bytes[offset..], &FRAME_V4_TCP[V4_IP_OFFSET..]);
    }

    #[test]
    fn parse_two_vlan_tags() {
        let bytes = two_tags();
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(frame.ethertype(), ETHERTYPE_QINQ);
        let tags = frame.vlan_tags().unwrap();
        let expected = [
            VlanTag {
                tpid: ETHERTYPE_QINQ,
                tci: 0x10c8,
            },
            VlanTag {
                tpid: ETHERTYPE_VLAN,
                tci: 0xefff,
            },
        ];
        assert_eq!(tags.as_slice(), &expected);
        assert_eq!((expected[0].dei(), expected[0].vid()), (true, 200));
        assert_eq!((expected[1].pcp(), expected[1].vid()), (7, 4095));
        let (ethertype, offset) = frame.network_offset().unwrap();
        assert_eq!(ethertype, ETHERTYPE_IPV6);
        assert_eq!(offset, HEADER_LEN + 2 * VLAN_TAG_LEN);
        assert_eq!(&bytes[offset..], &FRAME_V6_UDP[V6_IP_OFFSET..]);
    }

    /// A third tag is not walked; it is reported as the L3 "ethertype".
    #[test]
    fn three_tags_stop_at_two() {
        let mut bytes = FRAME_V4_TCP[..12].to_vec();
        for _ in 0..3 {
            bytes.extend_from_slice(&[0x81, 0x00, 0x00, 0x01]);
        }
        bytes.extend_from_slice(&FRAME_V4_TCP[12..]);
        let frame = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(frame.vlan_tags().unwrap().len(), 2);
        assert_eq!(
            frame.network_offset(),
            Ok((ETHERTYPE_VLAN, HEADER_LEN + 2 * VLAN_TAG_LEN))
        );
    }

    #[test]
    fn truncated_rejected() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                EthernetFrame::new_checked(&FRAME_V4_TCP[..len]).unwrap_err(),
                WireError::Truncated
            );
        }
        // Header only, no L3 bytes: fine, the offset is simply the end.
        let frame = EthernetFrame::new_checked(&FRAME_V4_TCP[..HEADER_LEN]).unwrap();
        assert_eq!(frame.network_offset(), Ok((ETHERTYPE_IPV4, HEADER_LEN)));
        assert!(frame.payload().is_empty());
    }

    /// Every prefix of a tagged frame either walks or reports truncation.
    #[test]
    fn truncated_vlan_tags_rejected() {
        let bytes = two_tags();
        for len in HEADER_LEN..bytes.len() {
            let frame = EthernetFrame::new_checked(&bytes[..len]).unwrap();
            let walked = frame.network_offset();
            if len < HEADER_LEN + 2 * VLAN_TAG_LEN {
                assert_eq!(walked, Err(WireError::Truncated), "len {len}");
                assert_eq!(frame.vlan_tags(), Err(WireError::Truncated));
            } else {
                assert_eq!(walked, Ok((ETHERTYPE_IPV6, 22)), "len {len}");
            }
        }
    }

    /// The walk uses checked access, so even unchecked views cannot panic.
    #[test]
    fn walk_on_unchecked_short_buffer() {
        let frame = EthernetFrame::new_unchecked(&FRAME_V4_TCP[..5]);
        assert_eq!(frame.network_offset(), Err(WireError::Truncated));
        assert!(frame.payload().is_empty());
    }

    #[test]
    fn setters_round_trip() {
        let mut bytes = FRAME_V4_TCP;
        let mut frame = EthernetFrame::new_checked(&mut bytes[..]).unwrap();
        frame.set_dst_addr(SRC);
        frame.set_src_addr(DST);
        frame.set_ethertype(ETHERTYPE_ARP);
        frame.payload_mut()[0] = 0xAA;
        assert_eq!(frame.dst_addr(), SRC);
        assert_eq!(frame.src_addr(), DST);
        assert_eq!(frame.ethertype(), ETHERTYPE_ARP);
        assert_eq!(frame.payload()[0], 0xAA);
        frame.set_dst_addr(DST);
        frame.set_src_addr(SRC);
        frame.set_ethertype(ETHERTYPE_IPV4);
        frame.payload_mut()[0] = 0x45;
        assert_eq!(bytes, FRAME_V4_TCP);
    }
}
