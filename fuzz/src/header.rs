//! `header`: the virtio net header view (`NetHeader`, both sizes, every getter and setter) and
//! the checks the datapath makes on headers: `check_tx_header` (TX), `rx_verdict` and
//! `guest_flags` (RX), and `complete_checksum` over a scattered frame.
//!
//! Input:
//!
//! | field | bytes | meaning |
//! |---|---|---|
//! | sel | 1 | bit 0: view length 12 (else 10); bit 1: TX header length 12 (else 10) |
//! | view_len | 1 | length of the buffer given to `new_checked`, mod 25 |
//! | view | view_len | that buffer |
//! | setters | 12 | flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers |
//! | tx_header | 12 | the header checked against the frame |
//! | frame_len | 4 | the frame length `check_tx_header` is told (any value) |
//! | features | 8 | negotiated feature bits for `rx_verdict`/`guest_flags` |
//! | frame_offset | 1 | where the frame starts in the scatter view (`complete_checksum`), mod 16 |
//! | cuts | 4 | iovec lengths the scatter view is cut into (the rest is a fifth iovec) |
//! | frame | rest | the frame's first bytes |

use vhost_packet::datapath::offload::{
    check_tx_header, complete_checksum, guest_flags, rx_verdict, RxVerdict, TxHeaderError,
};
use vhost_packet::datapath::segment::{GsoParams, SegmentCsum};
use vhost_packet::virtio::chain::Scatter;
use vhost_packet::virtio::features::Negotiated;
use vhost_packet::virtio::header::{
    GsoKind, NetHeader, FLAG_DATA_VALID, FLAG_NEEDS_CSUM, LEN_BASE, LEN_MRG,
};
use vhost_packet::wire::checksum::Checksum;
use vm_memory::VolatileSlice;

use crate::input::{split_owned, Reader};

fn le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let sel = r.u8();
    let view_len = usize::from(r.u8() % 25);
    let view = r.bytes(view_len);
    let setters = r.array::<12>();
    let tx_header = r.array::<12>();
    let frame_len = r.u32() as usize;
    let features = Negotiated::new(r.u64());
    let frame_offset = usize::from(r.u8() % 16);
    let cuts = r.array::<4>().map(usize::from);
    let frame = r.rest();

    let len = if sel & 1 != 0 { LEN_MRG } else { LEN_BASE };
    view_getters(view, len);
    view_setters(view, len, &setters);

    let tx_len = if sel & 2 != 0 { LEN_MRG } else { LEN_BASE };
    let hdr = NetHeader::new_checked(&tx_header[..tx_len], tx_len).expect("sized by tx_len");
    tx_check(&hdr, frame, frame_len);
    rx_checks(&hdr, features, frame);
    checksum(frame, frame_offset, &cuts, frame_len, &hdr);
}

/// Every getter reads the documented little-endian field; a short buffer is refused with the
/// right numbers.
fn view_getters(view: &[u8], len: usize) {
    let h = match NetHeader::new_checked(view, len) {
        Err(e) => {
            assert!(view.len() < len);
            assert_eq!((e.needed, e.got), (len, view.len()));
            let _ = e.to_string();
            return;
        }
        Ok(h) => h,
    };
    assert!(view.len() >= len);
    // The view's length decides the form: a 10-byte view of a 12-byte buffer reads as 12
    // (the datapath always slices the buffer to exactly the header length).
    let hl = h.header_len();
    assert!(hl == LEN_BASE || hl == LEN_MRG);
    assert!(hl >= len && hl <= view.len());
    assert_eq!(h.flags(), view[0]);
    assert_eq!(h.needs_csum(), view[0] & FLAG_NEEDS_CSUM != 0);
    assert_eq!(h.data_valid(), view[0] & FLAG_DATA_VALID != 0);
    assert_eq!(h.gso_type(), view[1]);
    assert_eq!(h.gso_ecn(), view[1] & 0x80 != 0);
    let kind = h.gso_kind();
    match view[1] & 0x7f {
        0 => assert_eq!(kind, GsoKind::None),
        1 => assert_eq!(kind, GsoKind::TcpV4),
        3 => assert_eq!(kind, GsoKind::Ufo),
        4 => assert_eq!(kind, GsoKind::TcpV6),
        5 => assert_eq!(kind, GsoKind::UdpL4),
        other => assert_eq!(kind, GsoKind::Unknown(other)),
    }
    assert_eq!(h.hdr_len(), le(view, 2));
    assert_eq!(h.gso_size(), le(view, 4));
    assert_eq!(h.csum_start(), le(view, 6));
    assert_eq!(h.csum_offset(), le(view, 8));
    assert_eq!(h.num_buffers(), (hl == LEN_MRG).then(|| le(view, 10)));
}

/// Setters write their field and nothing else, and read back; the 10-byte form has no
/// `num_buffers`.
fn view_setters(view: &[u8], len: usize, s: &[u8; 12]) {
    let mut buf = view.to_vec();
    let Ok(mut h) = NetHeader::new_checked(&mut buf[..], len) else {
        return;
    };
    let hl = h.header_len();
    h.set_flags(s[0]);
    h.set_gso_type(s[1]);
    h.set_hdr_len(le(s, 2));
    h.set_gso_size(le(s, 4));
    h.set_csum_start(le(s, 6));
    h.set_csum_offset(le(s, 8));
    h.set_num_buffers(le(s, 10));
    assert_eq!(h.flags(), s[0]);
    assert_eq!(h.gso_type(), s[1]);
    assert_eq!(h.hdr_len(), le(s, 2));
    assert_eq!(h.gso_size(), le(s, 4));
    assert_eq!(h.csum_start(), le(s, 6));
    assert_eq!(h.csum_offset(), le(s, 8));
    assert_eq!(h.num_buffers(), (hl == LEN_MRG).then(|| le(s, 10)));
    assert_eq!(buf[..10], s[..10]);
    if hl == LEN_MRG {
        assert_eq!(buf[10..12], s[10..12]);
    }
    assert_eq!(buf[hl..], view[hl..], "a setter wrote past the header");
}

/// `check_tx_header` on any header, frame prefix and claimed length: never panics, and what it
/// lets through is consistent.
fn tx_check(hdr: &NetHeader<&[u8]>, frame: &[u8], frame_len: usize) {
    let result = check_tx_header(hdr, frame, frame_len);
    if let Err(e) = result {
        let _ = e.to_string();
    }
    let kind = hdr.gso_kind();
    if !hdr.needs_csum() && kind == GsoKind::None {
        assert_eq!(result, Ok(()), "plain frames are not looked at");
        return;
    }
    if result.is_err() {
        return;
    }
    assert!(usize::from(hdr.hdr_len()) <= frame_len);
    if hdr.needs_csum() {
        let field_end = usize::from(hdr.csum_start()) + usize::from(hdr.csum_offset()) + 2;
        assert!(field_end <= frame_len);
    }
    if kind != GsoKind::None {
        assert_ne!(hdr.gso_size(), 0);
        let want_offset = match kind {
            GsoKind::TcpV4 | GsoKind::TcpV6 => 16,
            GsoKind::UdpL4 => 6,
            other => panic!("check_tx_header let GSO kind {other:?} through"),
        };
        assert_eq!(hdr.csum_offset(), want_offset);
        // The transport header was found inside the prefix.
        assert!(usize::from(hdr.csum_start()) <= frame.len());
        assert!(usize::from(hdr.csum_start()) >= 14 + 20);
    }
    let _ = TxHeaderError::OutOfFrame;
}

/// `rx_verdict`, `guest_flags` and `GsoParams::from_header` agree with the features.
fn rx_checks(hdr: &NetHeader<&[u8]>, features: Negotiated, frame: &[u8]) {
    let kind = hdr.gso_kind();
    let segmentable = matches!(kind, GsoKind::TcpV4 | GsoKind::TcpV6 | GsoKind::UdpL4);
    match rx_verdict(hdr, features, frame) {
        RxVerdict::Deliver { complete_csum } => {
            assert_eq!(complete_csum, hdr.needs_csum() && !features.guest_csum());
            if kind != GsoKind::None {
                assert!(features.guest_csum());
                assert!(features.guest_accepts_gso(kind, hdr.gso_ecn()));
            }
        }
        RxVerdict::Segment(csum) => {
            assert!(segmentable);
            let want = if features.guest_csum() {
                SegmentCsum::Partial
            } else {
                SegmentCsum::Full
            };
            assert_eq!(csum, want);
            let p = GsoParams::from_header(hdr, csum);
            assert_eq!(
                (p.kind, p.gso_size, p.ecn),
                (kind, hdr.gso_size(), hdr.gso_ecn())
            );
        }
        RxVerdict::RefuseGso => assert!(kind != GsoKind::None && !segmentable),
    }
    let flags = guest_flags(hdr.flags(), features);
    assert_eq!(flags & !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID), 0);
    if !features.guest_csum() {
        assert_eq!(flags, 0);
    }
}

/// `complete_checksum` over the frame cut into pieces: it changes exactly the two checksum bytes
/// (as a flat model computes them) or nothing at all.
fn checksum(
    frame: &[u8],
    frame_offset: usize,
    cuts: &[usize],
    frame_len: usize,
    hdr: &NetHeader<&[u8]>,
) {
    let mut flat = vec![0x5a; frame_offset];
    flat.extend_from_slice(frame);
    let mut pieces = split_owned(&flat, cuts);
    let slices: Vec<VolatileSlice<'_>> = pieces
        .iter_mut()
        .map(|p| VolatileSlice::from(&mut p[..]))
        .collect();
    let (start, offset) = (hdr.csum_start(), hdr.csum_offset());
    let view = Scatter::slices(&slices);
    assert_eq!(view.len(), flat.len());
    let result = complete_checksum(&view, frame_offset, frame_len, start, offset);
    let after: Vec<u8> = pieces.concat();

    let (s, field) = (usize::from(start), usize::from(start) + usize::from(offset));
    if field + 2 > frame_len || s >= frame_len {
        assert!(result.is_err());
        assert_eq!(after, flat, "a refused checksum wrote");
        return;
    }
    assert!(result.is_ok());
    let mut want = flat.clone();
    let from = (frame_offset + s).min(flat.len());
    let to = (frame_offset + frame_len).min(flat.len());
    let mut sum = Checksum::new();
    sum.add_bytes(&flat[from..to.max(from)]);
    let mut value = !sum.fold();
    if offset == 6 && value == 0 {
        value = 0xffff;
    }
    for (i, b) in value.to_be_bytes().into_iter().enumerate() {
        if let Some(slot) = want.get_mut(frame_offset + field + i) {
            *slot = b;
        }
    }
    assert_eq!(after, want);
}
