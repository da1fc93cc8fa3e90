//! `segment`: software GSO (`segment::plan` and `Plan::emit`) on any frame and parameters.
//!
//! Input: the 12-byte virtio net header the frame came with (kind, ECN bit, gso_size are taken
//! from it, as the RX path does), mode (1: bit 0 partial checksums, bit 1 `max_segments` from
//! the next field instead of the default), max_segments (2), stop_at (2: the emit callback fails
//! at that segment, 1-based; 0 never), then the frame (the rest).
//!
//! Checks, when the plan succeeds: headers fit `MAX_HEADERS` and the frame; the segments' payload
//! ranges lie in the frame, start right after the headers, follow each other without gap or
//! overlap and end at the frame's end, none longer than gso_size and all but the last exactly
//! that; the count is what `segments()` said and within `max_segments`; emit stops at the first
//! error. For the first and last few segments, the segment as a frame of its own is a valid
//! one-segment GSO frame (lengths rewritten right), its IPv4 header checksum verifies, and its
//! L4 checksum verifies (full) or is the pseudo-header sum (partial).

use vhost_packet::datapath::segment::{
    plan, GsoParams, Segment, SegmentCsum, SegmentError, DEFAULT_MAX_SEGMENTS, MAX_HEADERS,
};
use vhost_packet::virtio::header::{GsoKind, NetHeader, LEN_MRG};
use vhost_packet::wire::checksum::{pseudo_header_v4, pseudo_header_v6, Checksum};
use vhost_packet::wire::ethernet::{EthernetFrame, ETHERTYPE_IPV4};

use crate::input::{Reader, Writer};

/// Segments at each end of the frame that are rebuilt and checked in depth.
const DEEP: usize = 4;

pub fn encode(vnet: &[u8; 12], partial: bool, max_segments: Option<u16>, frame: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(vnet)
        .u8(u8::from(partial) | (u8::from(max_segments.is_some()) << 1))
        .u16(max_segments.unwrap_or(0))
        .u16(0)
        .bytes(frame);
    w.out
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let vnet = r.array::<12>();
    let mode = r.u8();
    let max = r.u16();
    let stop_at = usize::from(r.u16());
    let frame = r.rest();

    let hdr = NetHeader::new_checked(&vnet[..], LEN_MRG).expect("12 bytes");
    let csum = if mode & 1 != 0 {
        SegmentCsum::Partial
    } else {
        SegmentCsum::Full
    };
    let mut params = GsoParams::from_header(&hdr, csum);
    if mode & 2 != 0 {
        params.max_segments = usize::from(max);
    }
    assert_eq!(
        GsoParams::new(params.kind, params.gso_size, params.ecn, csum).max_segments,
        DEFAULT_MAX_SEGMENTS
    );

    let p = match plan(frame, &params) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            if let SegmentError::TooManySegments { segments, max } = e {
                assert!(segments > max && max == params.max_segments);
            }
            return;
        }
    };
    assert!(matches!(
        params.kind,
        GsoKind::TcpV4 | GsoKind::TcpV6 | GsoKind::UdpL4
    ));
    let hl = p.headers_len();
    let gso = usize::from(params.gso_size);
    assert!(gso > 0);
    assert!(hl <= MAX_HEADERS && hl <= frame.len());
    assert_eq!(p.payload_len(), frame.len() - hl);
    let n = p.segments();
    assert!(n >= 1 && n <= params.max_segments);
    assert_eq!(n, p.payload_len().div_ceil(gso).max(1));

    let mut index = 0usize;
    let mut next = hl;
    let result = p.emit(|seg: &Segment| {
        index += 1;
        assert!(seg.headers_len <= MAX_HEADERS);
        assert_eq!(seg.headers_len, hl);
        assert_eq!(seg.headers().len(), hl);
        assert_eq!(
            seg.payload.start, next,
            "segment {index} does not follow the last"
        );
        assert!(seg.payload.start <= seg.payload.end && seg.payload.end <= frame.len());
        let len = seg.payload.len();
        assert!(len <= gso);
        if index < n {
            assert_eq!(len, gso, "segment {index} of {n} is short");
        }
        assert_eq!(seg.payload_of(frame), &frame[seg.payload.clone()]);
        assert_eq!(seg.len(), hl + len);
        assert!(!seg.is_empty());
        next = seg.payload.end;
        if index <= DEEP || index + DEEP > n {
            check_segment(seg, frame, &params);
        }
        if index == stop_at {
            return Err(index);
        }
        Ok(())
    });
    if (1..=n).contains(&stop_at) {
        assert_eq!(result, Err(stop_at));
        assert_eq!(index, stop_at, "emit went on after an error");
    } else {
        assert_eq!(result, Ok(n));
        assert_eq!(index, n);
        assert_eq!(
            next,
            frame.len(),
            "the segments do not end at the frame's end"
        );
    }
}

/// One segment as a frame: a valid one-segment GSO frame with verifying checksums.
fn check_segment(seg: &Segment, frame: &[u8], params: &GsoParams) {
    let mut bytes = seg.headers().to_vec();
    bytes.extend_from_slice(seg.payload_of(frame));
    let again = plan(&bytes, params)
        .unwrap_or_else(|e| panic!("a segment is not a valid frame of its own: {e}"));
    assert_eq!(again.segments(), 1);
    assert_eq!(again.headers_len(), seg.headers_len);

    let (ethertype, l3) = EthernetFrame::new_checked(&bytes[..])
        .and_then(|f| f.network_offset())
        .expect("re-planned");
    let l4 = usize::from(seg.csum_start);
    let l4_len = (bytes.len() - l4) as u32;
    let proto = if params.kind == GsoKind::UdpL4 { 17 } else { 6 };
    let pseudo = if ethertype == ETHERTYPE_IPV4 {
        let ip = &bytes[l3..l4];
        let mut sum = Checksum::new();
        sum.add_bytes(ip);
        assert_eq!(sum.fold(), 0xffff, "IPv4 header checksum");
        let a = |at: usize| [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]];
        pseudo_header_v4(a(12), a(16), proto, l4_len)
    } else {
        let ip = &bytes[l3..l4];
        let a = |at: usize| -> [u8; 16] { ip[at..at + 16].try_into().unwrap() };
        pseudo_header_v6(a(8), a(24), proto, l4_len)
    };
    let field = l4 + usize::from(seg.csum_offset);
    let stored = u16::from_be_bytes([bytes[field], bytes[field + 1]]);
    match params.csum {
        SegmentCsum::Partial => assert_eq!(stored, pseudo.fold(), "partial checksum seed"),
        SegmentCsum::Full => {
            let mut sum = pseudo;
            sum.add_bytes(&bytes[l4..]);
            assert_eq!(sum.fold(), 0xffff, "L4 checksum does not verify");
            if proto == 17 {
                assert_ne!(stored, 0, "a UDP checksum of 0 means none");
            }
        }
    }
}
