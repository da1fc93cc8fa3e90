//! Software segmentation of one GSO frame, for guests that cannot take it whole (no
//! GUEST_TSO4/6, GUEST_USO4/6 or GUEST_ECN for the frame's kind).
//!
//! The output matches Linux's own software GSO (`tcp_gso_segment`, `__udp_gso_segment`,
//! `inet_gso_segment`, `ipv6_gso_segment`) byte for byte; `tests/fixtures/gso/` holds frames
//! segmented by the kernel and the unit tests compare against them. What Linux does, and so
//! what this does:
//!
//! - Every segment gets a copy of all headers in front of the payload: Ethernet, VLAN tags,
//!   IP (options included), TCP (options included) or UDP.
//! - IPv4: total length per segment, ID = original ID + segment index (mod 2^16, DF or not),
//!   header checksum recomputed. IPv6: payload length per segment.
//! - TCP: sequence number advanced by the payload offset; CWR kept only on the first segment
//!   (whether or not the frame is flagged ECN), FIN and PSH only on the last; everything else
//!   (ACK, window, urgent pointer, options) copied.
//! - UDP (USO): one datagram per `gso_size` bytes, each with its own length; a checksum that
//!   computes to 0 is sent as 0xFFFF (TCP sends 0).
//!
//! Segments are described, not built: a [`Segment`] holds the rewritten headers and the range
//! of the input frame that is its payload, so the caller copies each payload byte once, from
//! the frame straight to wherever the segment goes. Nothing is allocated.
//!
//! The input comes from the host kernel but is checked as if it came from anyone: every length
//! is validated by the `wire` views before anything is emitted, and no input makes this panic.
//!
//! Where this knowingly differs from Linux (none of it arises for frames the kernel hands over):
//! - Linux adjusts the seed found in the L4 checksum field, so a wrong seed gives every segment
//!   a wrong checksum (kernel-facts §2a). Here the seed is ignored and each pseudo-header is
//!   computed from the addresses.
//! - Linux cuts by skb length and never reads the IP length fields. Here they must describe the
//!   frame exactly. IPv6 extension headers and IPv4 fragments are refused rather than walked.
//! - A TCP payload that fits `gso_size` while payload + options do not: Linux's software GSO
//!   drops the frame (fixtures README, `tcp4_options_edge`). Here it becomes one segment.

use std::fmt;
use std::ops::Range;

use crate::virtio::header::{GsoKind, NetHeader};
use crate::wire::checksum::{pseudo_header_v4, pseudo_header_v6};
use crate::wire::ethernet::{self, EthernetFrame, ETHERTYPE_IPV4, ETHERTYPE_IPV6};
use crate::wire::ipv4::{Ipv4Packet, PROTO_TCP, PROTO_UDP};
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::{self, TcpSegment};
use crate::wire::udp::{self, UdpDatagram};
use crate::wire::WireError;

/// Longest IPv4 header (IHL 15) and longest TCP header (data offset 15).
const MAX_IP_OR_TCP_HEADER: usize = 60;

/// Room for the headers of any segment: Ethernet, two VLAN tags, a 60-byte IPv4 header and a
/// 60-byte TCP header (IPv6 without extension headers and UDP are shorter).
pub const MAX_HEADERS: usize = ethernet::HEADER_LEN
    + ethernet::MAX_VLAN_TAGS * ethernet::VLAN_TAG_LEN
    + 2 * MAX_IP_OR_TCP_HEADER;

/// Linux's `GSO_MAX_SEGS`: no skb is ever split into more.
pub const DEFAULT_MAX_SEGMENTS: usize = 65535;

/// How each segment's L4 checksum is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentCsum {
    /// The complete checksum, for guests without GUEST_CSUM.
    Full,
    /// The folded pseudo-header sum for the segment's L4 length, not inverted, for guests with
    /// GUEST_CSUM: deliver with NEEDS_CSUM and the segment's `csum_start`/`csum_offset`.
    Partial,
}

/// What to segment into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GsoParams {
    /// TcpV4, TcpV6 or UdpL4 (UdpL4 over IPv4 or IPv6).
    pub kind: GsoKind,
    /// Payload bytes per segment (the virtio header's `gso_size`).
    pub gso_size: u16,
    /// The virtio header's ECN bit. It does not change the output: Linux clears CWR on all but
    /// the first segment either way (checked against the kernel, fixture `tcp4_cwr_no_ecn`).
    pub ecn: bool,
    pub csum: SegmentCsum,
    /// Refuse frames that would make more segments than this (e.g. more than the guest can
    /// possibly take); [`DEFAULT_MAX_SEGMENTS`] by default.
    pub max_segments: usize,
}

impl GsoParams {
    pub fn new(kind: GsoKind, gso_size: u16, ecn: bool, csum: SegmentCsum) -> GsoParams {
        GsoParams {
            kind,
            gso_size,
            ecn,
            csum,
            max_segments: DEFAULT_MAX_SEGMENTS,
        }
    }

    /// The parameters a received frame's virtio header asks for.
    pub fn from_header<T: AsRef<[u8]>>(hdr: &NetHeader<T>, csum: SegmentCsum) -> GsoParams {
        GsoParams::new(hdr.gso_kind(), hdr.gso_size(), hdr.gso_ecn(), csum)
    }
}

/// Why a frame cannot be segmented. Nothing has been emitted when one of these is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentError {
    /// The kind is not one this segments (None, UFO, unknown).
    UnsupportedKind(GsoKind),
    ZeroGsoSize,
    /// Shorter than an Ethernet header, or a VLAN tag is cut off.
    Ethernet(WireError),
    /// The ethertype after the VLAN tags (up to two) is neither IPv4 nor IPv6.
    NotIp {
        ethertype: u16,
    },
    /// TcpV4 on an IPv6 frame or TcpV6 on an IPv4 frame.
    IpVersionMismatch {
        kind: GsoKind,
        ethertype: u16,
    },
    Ipv4(WireError),
    Ipv6(WireError),
    /// The IPv4 total length or IPv6 payload length does not describe exactly the rest of the
    /// frame (trailing bytes, or an IPv6 jumbogram's 0).
    IpLength {
        declared: usize,
        in_frame: usize,
    },
    /// An IPv4 fragment (MF or a fragment offset): no L4 header to segment by.
    Fragment,
    /// The IP protocol (IPv6: next header, so also any extension header) is not the kind's.
    L4Protocol {
        kind: GsoKind,
        protocol: u8,
    },
    Tcp(WireError),
    Udp(WireError),
    /// The UDP length field is not the length of the datagram in the frame.
    UdpLength {
        declared: usize,
        in_frame: usize,
    },
    /// The headers do not fit [`MAX_HEADERS`] (cannot happen with the checks above).
    HeadersTooLong {
        len: usize,
    },
    TooManySegments {
        segments: usize,
        max: usize,
    },
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SegmentError::UnsupportedKind(kind) => {
                write!(f, "GSO kind {kind:?} cannot be segmented in software")
            }
            SegmentError::ZeroGsoSize => f.write_str("GSO frame with gso_size 0"),
            SegmentError::Ethernet(e) => write!(f, "GSO frame: Ethernet header or VLAN tag: {e}"),
            SegmentError::NotIp { ethertype } => {
                write!(
                    f,
                    "GSO frame is neither IPv4 nor IPv6 (ethertype {ethertype:#06x})"
                )
            }
            SegmentError::IpVersionMismatch { kind, ethertype } => write!(
                f,
                "GSO kind {kind:?} does not match the frame's ethertype {ethertype:#06x}"
            ),
            SegmentError::Ipv4(e) => write!(
                f,
                "GSO frame: IPv4 header ({e}: header or total length beyond the frame, or bad \
                 version/IHL)"
            ),
            SegmentError::Ipv6(e) => write!(
                f,
                "GSO frame: IPv6 header ({e}: header or payload length beyond the frame, or bad \
                 version)"
            ),
            SegmentError::IpLength { declared, in_frame } => write!(
                f,
                "GSO frame: IP length field says {declared} bytes, the frame holds {in_frame}"
            ),
            SegmentError::Fragment => f.write_str("GSO frame is an IPv4 fragment"),
            SegmentError::L4Protocol { kind, protocol } => write!(
                f,
                "GSO kind {kind:?} but IP protocol/next header {protocol} (extension headers are \
                 not segmented)"
            ),
            SegmentError::Tcp(e) => write!(f, "GSO frame: TCP header: {e}"),
            SegmentError::Udp(e) => write!(f, "GSO frame: UDP header: {e}"),
            SegmentError::UdpLength { declared, in_frame } => write!(
                f,
                "GSO frame: UDP length field says {declared} bytes, the frame holds {in_frame}"
            ),
            SegmentError::HeadersTooLong { len } => {
                write!(
                    f,
                    "GSO frame: {len} bytes of headers (at most {MAX_HEADERS})"
                )
            }
            SegmentError::TooManySegments { segments, max } => write!(
                f,
                "GSO frame would make {segments} segments (at most {max})"
            ),
        }
    }
}

impl std::error::Error for SegmentError {}

/// [`segment`] failed: the frame was refused before anything was emitted, or `emit` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentFailure<E> {
    Invalid(SegmentError),
    Emit(E),
}

impl<E: fmt::Display> fmt::Display for SegmentFailure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentFailure::Invalid(e) => e.fmt(f),
            SegmentFailure::Emit(e) => write!(f, "delivering a segment: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for SegmentFailure<E> {}

/// One output segment: its headers, already final (lengths, IP ID and header checksum, TCP
/// sequence number and flags, L4 checksum or its seed), and the input frame's bytes that
/// follow them.
#[derive(Clone, Debug)]
pub struct Segment {
    pub headers: [u8; MAX_HEADERS],
    pub headers_len: usize,
    /// The payload: a range of the frame given to [`plan`] or [`segment`].
    pub payload: Range<usize>,
    /// Where the L4 header starts in the segment, and its checksum field from there (16 for
    /// TCP, 6 for UDP): the virtio header's fields for [`SegmentCsum::Partial`].
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl Segment {
    /// The headers in front of the payload.
    pub fn headers(&self) -> &[u8] {
        &self.headers[..self.headers_len.min(MAX_HEADERS)]
    }

    /// The segment's frame length: headers plus payload.
    pub fn len(&self) -> usize {
        self.headers_len + self.payload.len()
    }

    /// Never true: a segment has at least its headers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload bytes within `frame`, the frame this segment was planned from (empty if it
    /// is some other, shorter buffer).
    pub fn payload_of<'f>(&self, frame: &'f [u8]) -> &'f [u8] {
        frame.get(self.payload.clone()).unwrap_or(&[])
    }
}

/// The network layer as the plan needs it.
#[derive(Clone, Copy, Debug)]
enum L3 {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        ident: u16,
        header_len: usize,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
    },
}

#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp { seq: u32, flags: u8 },
    Udp,
}

/// A frame checked and ready to be cut: how many segments, where its headers end.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    frame: &'a [u8],
    l3_offset: usize,
    l4_offset: usize,
    headers_len: usize,
    l3: L3,
    l4: L4,
    gso_size: usize,
    segments: usize,
    csum: SegmentCsum,
}

/// Checks `frame` (a whole Ethernet frame as the kernel handed it: lengths describing the whole
/// frame, usually a checksum seed in the L4 field, which is ignored) against `params` and
/// works out its segments.
pub fn plan<'a>(frame: &'a [u8], params: &GsoParams) -> Result<Plan<'a>, SegmentError> {
    let is_tcp = match params.kind {
        GsoKind::TcpV4 | GsoKind::TcpV6 => true,
        GsoKind::UdpL4 => false,
        other => return Err(SegmentError::UnsupportedKind(other)),
    };
    if params.gso_size == 0 {
        return Err(SegmentError::ZeroGsoSize);
    }
    let eth = EthernetFrame::new_checked(frame).map_err(SegmentError::Ethernet)?;
    let (ethertype, l3_offset) = eth.network_offset().map_err(SegmentError::Ethernet)?;
    let version_ok = match ethertype {
        ETHERTYPE_IPV4 => params.kind != GsoKind::TcpV6,
        ETHERTYPE_IPV6 => params.kind != GsoKind::TcpV4,
        _ => return Err(SegmentError::NotIp { ethertype }),
    };
    if !version_ok {
        return Err(SegmentError::IpVersionMismatch {
            kind: params.kind,
            ethertype,
        });
    }
    let protocol_wanted = if is_tcp { PROTO_TCP } else { PROTO_UDP };
    // Everything after the L2 header; the IP length fields must describe exactly this.
    let rest = frame.get(l3_offset..).unwrap_or(&[]);
    let (l3, ip_header_len, protocol, declared) = if ethertype == ETHERTYPE_IPV4 {
        let ip = Ipv4Packet::new_checked(rest).map_err(SegmentError::Ipv4)?;
        if ip.is_fragment() {
            return Err(SegmentError::Fragment);
        }
        let l3 = L3::V4 {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            ident: ip.ident(),
            header_len: ip.header_len(),
        };
        (
            l3,
            ip.header_len(),
            ip.protocol(),
            usize::from(ip.total_len()),
        )
    } else {
        let ip = Ipv6Packet::new_checked(rest).map_err(SegmentError::Ipv6)?;
        let l3 = L3::V6 {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
        };
        let declared = ipv6::HEADER_LEN + usize::from(ip.payload_len());
        (l3, ipv6::HEADER_LEN, ip.next_header(), declared)
    };
    if protocol != protocol_wanted {
        return Err(SegmentError::L4Protocol {
            kind: params.kind,
            protocol,
        });
    }
    if declared != rest.len() {
        return Err(SegmentError::IpLength {
            declared,
            in_frame: rest.len(),
        });
    }
    // The IP views checked that the IP header fits in `rest`.
    let l4_bytes = rest.get(ip_header_len..).unwrap_or(&[]);
    let (l4, l4_header_len) = if is_tcp {
        let tcp = TcpSegment::new_checked(l4_bytes).map_err(SegmentError::Tcp)?;
        let l4 = L4::Tcp {
            seq: tcp.seq(),
            flags: tcp.flags(),
        };
        (l4, tcp.header_len())
    } else {
        let udp = UdpDatagram::new_checked(l4_bytes).map_err(SegmentError::Udp)?;
        if usize::from(udp.len()) != l4_bytes.len() {
            return Err(SegmentError::UdpLength {
                declared: udp.len().into(),
                in_frame: l4_bytes.len(),
            });
        }
        (L4::Udp, udp::HEADER_LEN)
    };
    let l4_offset = l3_offset + ip_header_len;
    let headers_len = l4_offset + l4_header_len;
    if headers_len > MAX_HEADERS {
        return Err(SegmentError::HeadersTooLong { len: headers_len });
    }
    let gso_size = usize::from(params.gso_size);
    // `headers_len <= frame.len()`: the L4 view checked its header fits in the frame.
    let payload_len = frame.len().saturating_sub(headers_len);
    // Like Linux, a frame whose payload fits one segment becomes one (unchanged) segment.
    let segments = payload_len.div_ceil(gso_size).max(1);
    if segments > params.max_segments {
        return Err(SegmentError::TooManySegments {
            segments,
            max: params.max_segments,
        });
    }
    Ok(Plan {
        frame,
        l3_offset,
        l4_offset,
        headers_len,
        l3,
        l4,
        gso_size,
        segments,
        csum: params.csum,
    })
}

impl Plan<'_> {
    /// How many segments [`emit`](Self::emit) will produce.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Length of the headers every segment carries.
    pub fn headers_len(&self) -> usize {
        self.headers_len
    }

    /// Payload bytes of the whole frame.
    pub fn payload_len(&self) -> usize {
        self.frame.len() - self.headers_len
    }

    /// Produces the segments in order, calling `emit` once for each; stops at the first error
    /// from `emit`. Returns the number of segments.
    pub fn emit<E>(&self, mut emit: impl FnMut(&Segment) -> Result<(), E>) -> Result<usize, E> {
        let frame = self.frame;
        let hl = self.headers_len;
        let l4_off = self.l4_offset;
        let l4_header_len = hl - l4_off;
        let (proto, csum_offset) = match self.l4 {
            L4::Tcp { .. } => (PROTO_TCP, tcp::CHECKSUM_OFFSET),
            L4::Udp => (PROTO_UDP, udp::CHECKSUM_OFFSET),
        };
        let mut seg = Segment {
            headers: [0; MAX_HEADERS],
            headers_len: hl,
            payload: hl..hl,
            // At most MAX_HEADERS, so it fits.
            csum_start: l4_off as u16,
            csum_offset: csum_offset as u16,
        };
        // The fields rewritten below are set from the original values for every segment, so
        // one copy of the headers serves them all.
        seg.headers[..hl].copy_from_slice(&frame[..hl]);
        // The pseudo-header without its length, which is added per segment (ones'-complement
        // addition is order-independent).
        let pseudo_base = match self.l3 {
            L3::V4 { src, dst, .. } => pseudo_header_v4(src, dst, proto, 0),
            L3::V6 { src, dst } => pseudo_header_v6(src, dst, proto, 0),
        };
        let last = self.segments - 1;
        for i in 0..self.segments {
            let start = hl + i * self.gso_size;
            let end = (start + self.gso_size).min(frame.len());
            seg.payload = start..end;
            // No more than the original lengths, which fit their 16-bit fields.
            let l4_len = l4_header_len + (end - start);
            let headers = &mut seg.headers[..hl];
            match self.l3 {
                L3::V4 {
                    ident, header_len, ..
                } => {
                    let mut ip = Ipv4Packet::new_unchecked(&mut headers[self.l3_offset..l4_off]);
                    ip.set_total_len((header_len + l4_len) as u16);
                    // inet_gso_segment: id + i whatever DF says (virtio has no FIXEDID).
                    ip.set_ident(ident.wrapping_add(i as u16));
                    ip.fill_checksum();
                }
                L3::V6 { .. } => {
                    let mut ip = Ipv6Packet::new_unchecked(&mut headers[self.l3_offset..l4_off]);
                    ip.set_payload_len(l4_len as u16);
                }
            }
            let mut pseudo = pseudo_base;
            pseudo.add_u32(l4_len as u32);
            let l4_header = &mut headers[l4_off..];
            match self.l4 {
                L4::Tcp { seq, flags } => {
                    let mut th = TcpSegment::new_unchecked(&mut *l4_header);
                    th.set_seq(seq.wrapping_add((i * self.gso_size) as u32));
                    let mut f = flags;
                    if i > 0 {
                        f &= !tcp::CWR;
                    }
                    if i < last {
                        f &= !(tcp::FIN | tcp::PSH);
                    }
                    th.set_flags(f);
                }
                L4::Udp => {
                    UdpDatagram::new_unchecked(&mut *l4_header).set_len(l4_len as u16);
                }
            }
            let check = match self.csum {
                SegmentCsum::Partial => pseudo.fold(),
                SegmentCsum::Full => {
                    l4_header[csum_offset..csum_offset + 2].copy_from_slice(&[0, 0]);
                    let mut sum = pseudo;
                    sum.add_bytes(l4_header).add_bytes(&frame[start..end]);
                    match self.l4 {
                        L4::Tcp { .. } => sum.finish(),
                        // CSUM_MANGLED_0: 0 means "no checksum" in UDP.
                        L4::Udp => sum.finish_udp(),
                    }
                }
            };
            l4_header[csum_offset..csum_offset + 2].copy_from_slice(&check.to_be_bytes());
            emit(&seg)?;
        }
        Ok(self.segments)
    }
}

/// Plans and produces the segments of `frame` (see [`plan`] and [`Plan::emit`]). Nothing is
/// emitted for a frame that is refused.
pub fn segment<E>(
    frame: &[u8],
    params: &GsoParams,
    emit: impl FnMut(&Segment) -> Result<(), E>,
) -> Result<usize, SegmentFailure<E>> {
    plan(frame, params)
        .map_err(SegmentFailure::Invalid)?
        .emit(emit)
        .map_err(SegmentFailure::Emit)
}

// Every offset in a segment's headers fits the u16 virtio fields.
const _: () = assert!(MAX_HEADERS <= u16::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::header::LEN_MRG;
    use crate::wire::checksum::Checksum;
    use crate::wire::ethernet::{ETHERTYPE_QINQ, ETHERTYPE_VLAN};
    use proptest::prelude::*;

    // ---- golden fixtures: segmented by Linux (tests/fixtures/gso/README.md) ----

    struct Fixture {
        name: &'static str,
        vnet: Vec<u8>,
        input: Vec<u8>,
        segments: Vec<Vec<u8>>,
    }

    fn parse_fixture(name: &'static str, text: &str) -> Fixture {
        let mut f = Fixture {
            name,
            vnet: Vec::new(),
            input: Vec::new(),
            segments: Vec::new(),
        };
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (tag, hex) = line.split_once(' ').expect("fixture line: tag hex");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            match tag {
                "vnet" => f.vnet = bytes,
                "in" => f.input = bytes,
                "out" => f.segments.push(bytes),
                other => panic!("{name}: unknown fixture line {other}"),
            }
        }
        assert_eq!(f.vnet.len(), LEN_MRG, "{name}");
        assert!(!f.input.is_empty() && !f.segments.is_empty(), "{name}");
        f
    }

    macro_rules! fixtures {
        ($($name:literal),* $(,)?) => {
            vec![$(parse_fixture(
                $name,
                include_str!(concat!("../../tests/fixtures/gso/", $name, ".txt")),
            )),*]
        };
    }

    fn golden() -> Vec<Fixture> {
        fixtures![
            "tcp4",
            "tcp4_ecn",
            "tcp4_cwr_no_ecn",
            "tcp4_options",
            "tcp4_nodf",
            "tcp4_ipopts",
            "tcp4_odd",
            "tcp4_single",
            "tcp4_vlan",
            "tcp6",
            "tcp6_options_qinq",
            "udp4",
            "udp6",
            "udp4_vlan",
        ]
    }

    #[test]
    fn segment_golden_list_names_every_fixture() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gso");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".txt").map(str::to_owned))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = golden().iter().map(|f| f.name.to_owned()).collect();
        listed.sort();
        assert_eq!(listed, on_disk);
    }

    /// The segments of `frame` as whole frames.
    fn segment_frames(frame: &[u8], params: &GsoParams) -> Result<Vec<Vec<u8>>, SegmentError> {
        let mut out = Vec::new();
        let n = segment(frame, params, |s| {
            let mut f = s.headers().to_vec();
            f.extend_from_slice(s.payload_of(frame));
            assert_eq!(f.len(), s.len());
            out.push((f, s.csum_start, s.csum_offset));
            Ok::<(), ()>(())
        })
        .map_err(|e| match e {
            SegmentFailure::Invalid(e) => e,
            SegmentFailure::Emit(()) => unreachable!(),
        })?;
        assert_eq!(n, out.len());
        Ok(out.into_iter().map(|(f, _, _)| f).collect())
    }

    /// Completes a partial checksum the way a guest (or `offload::complete_checksum`) does.
    fn complete(frame: &mut [u8], csum_start: u16, csum_offset: u16) {
        let start = usize::from(csum_start);
        let field = start + usize::from(csum_offset);
        let mut value = Checksum::new().add_bytes(&frame[start..]).finish();
        if csum_offset == 6 && value == 0 {
            value = 0xffff;
        }
        frame[field..field + 2].copy_from_slice(&value.to_be_bytes());
    }

    #[test]
    fn segment_full_matches_linux_byte_for_byte() {
        for fx in golden() {
            let hdr = NetHeader::new_checked(&fx.vnet[..], LEN_MRG).unwrap();
            let params = GsoParams::from_header(&hdr, SegmentCsum::Full);
            let ours = segment_frames(&fx.input, &params)
                .unwrap_or_else(|e| panic!("{}: refused: {e}", fx.name));
            assert_eq!(ours.len(), fx.segments.len(), "{}: segment count", fx.name);
            for (i, (a, b)) in ours.iter().zip(&fx.segments).enumerate() {
                assert!(
                    a == b,
                    "{} segment {i}:\n ours  {a:02x?}\n linux {b:02x?}",
                    fx.name
                );
            }
        }
    }

    #[test]
    fn segment_partial_completes_to_linux_bytes() {
        for fx in golden() {
            let hdr = NetHeader::new_checked(&fx.vnet[..], LEN_MRG).unwrap();
            let params = GsoParams::from_header(&hdr, SegmentCsum::Partial);
            let mut i = 0;
            segment(&fx.input, &params, |s| {
                // Partial segments point where the kernel's own NEEDS_CSUM header pointed.
                assert_eq!(s.csum_start, hdr.csum_start(), "{}", fx.name);
                assert_eq!(s.csum_offset, hdr.csum_offset(), "{}", fx.name);
                let mut f = s.headers().to_vec();
                f.extend_from_slice(s.payload_of(&fx.input));
                complete(&mut f, s.csum_start, s.csum_offset);
                assert!(f == fx.segments[i], "{} segment {i}", fx.name);
                i += 1;
                Ok::<(), ()>(())
            })
            .unwrap();
            assert_eq!(i, fx.segments.len());
        }
    }

    // ---- a frame builder for the property and malformed-input tests ----

    #[derive(Clone, Debug)]
    struct Spec {
        v6: bool,
        udp: bool,
        tags: usize,
        /// IPv4 option words (0..=10).
        ip_opt_words: usize,
        /// TCP option words (0..=10).
        tcp_opt_words: usize,
        payload_len: usize,
        gso_size: u16,
        flags: u8,
        seq: u32,
        ident: u16,
        df: bool,
        ecn: bool,
        partial: bool,
        salt: u8,
    }

    impl Spec {
        fn simple(v6: bool, udp: bool, payload_len: usize, gso_size: u16) -> Spec {
            Spec {
                v6,
                udp,
                tags: 0,
                ip_opt_words: 0,
                tcp_opt_words: 0,
                payload_len,
                gso_size,
                flags: tcp::ACK | tcp::PSH,
                seq: 1000,
                ident: 77,
                df: true,
                ecn: false,
                partial: false,
                salt: 0,
            }
        }

        fn kind(&self) -> GsoKind {
            match (self.udp, self.v6) {
                (true, _) => GsoKind::UdpL4,
                (false, false) => GsoKind::TcpV4,
                (false, true) => GsoKind::TcpV6,
            }
        }

        fn params(&self) -> GsoParams {
            let csum = if self.partial {
                SegmentCsum::Partial
            } else {
                SegmentCsum::Full
            };
            GsoParams::new(self.kind(), self.gso_size, self.ecn, csum)
        }

        fn ip_header_len(&self) -> usize {
            if self.v6 {
                40
            } else {
                20 + 4 * self.ip_opt_words
            }
        }

        fn l4_header_len(&self) -> usize {
            if self.udp {
                8
            } else {
                20 + 4 * self.tcp_opt_words
            }
        }

        /// The largest payload the IP length fields allow.
        fn max_payload(&self) -> usize {
            let ip = if self.v6 { 0 } else { self.ip_header_len() };
            65535 - ip - self.l4_header_len()
        }
    }

    const SRC4: [u8; 4] = [198, 18, 0, 1];
    const DST4: [u8; 4] = [198, 19, 255, 254];
    const SRC6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A GSO frame as the kernel hands it over: lengths for the whole frame and the
    /// pseudo-header seed (not inverted) in the L4 checksum field.
    fn build(spec: &Spec) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a];
        for t in 0..spec.tags {
            let tpid = if t == 0 && spec.tags == 2 {
                ETHERTYPE_QINQ
            } else {
                ETHERTYPE_VLAN
            };
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100 + t as u16).to_be_bytes());
        }
        let proto = if spec.udp { PROTO_UDP } else { PROTO_TCP };
        let l4_len = spec.l4_header_len() + spec.payload_len;
        let seed = if spec.v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x62, 0x81, 0x23, 0x45]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&SRC6);
            f.extend_from_slice(&DST6);
            pseudo_header_v6(SRC6, DST6, proto, l4_len as u32)
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let start = f.len();
            let ihl = spec.ip_header_len();
            f.push(0x40 | (ihl / 4) as u8);
            f.push(0x02);
            f.extend_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&spec.ident.to_be_bytes());
            f.extend_from_slice(&(if spec.df { 0x4000u16 } else { 0 }).to_be_bytes());
            f.extend_from_slice(&[64, proto, 0, 0]);
            f.extend_from_slice(&SRC4);
            f.extend_from_slice(&DST4);
            f.resize(start + ihl, 1); // NOP options
            let c = Checksum::new().add_bytes(&f[start..]).finish();
            f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
            pseudo_header_v4(SRC4, DST4, proto, l4_len as u32)
        };
        let seed = seed.fold().to_be_bytes();
        if spec.udp {
            f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&seed);
        } else {
            f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
            f.extend_from_slice(&spec.seq.to_be_bytes());
            f.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes());
            f.push(((5 + spec.tcp_opt_words) as u8) << 4);
            f.push(spec.flags);
            f.extend_from_slice(&[0x01, 0xf5]);
            f.extend_from_slice(&seed);
            f.extend_from_slice(&[0x00, 0x07]);
            f.resize(f.len() + 4 * spec.tcp_opt_words, 1);
        }
        f.extend((0..spec.payload_len).map(|i| (i as u8).wrapping_mul(131) ^ spec.salt));
        f
    }

    /// Offsets in a frame built from `spec`.
    fn offsets(spec: &Spec) -> (usize, usize, usize) {
        let l3 = 14 + 4 * spec.tags;
        let l4 = l3 + spec.ip_header_len();
        (l3, l4, l4 + spec.l4_header_len())
    }

    /// Every property of one segmented frame (see the module docs for the rules).
    fn check_segments(spec: &Spec) -> Result<(), TestCaseError> {
        let frame = build(spec);
        let params = spec.params();
        let (l3, l4, hl) = offsets(spec);
        let gso = usize::from(spec.gso_size);
        let expected = spec.payload_len.div_ceil(gso).max(1);
        let planned = plan(&frame, &params).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(planned.segments(), expected);
        prop_assert_eq!(planned.headers_len(), hl);
        prop_assert_eq!(planned.payload_len(), spec.payload_len);
        let mut next = hl;
        let mut i = 0usize;
        let result = planned.emit(|s| {
            let last = i + 1 == expected;
            prop_assert_eq!(s.headers_len, hl);
            prop_assert_eq!(s.payload.start, next);
            prop_assert!(s.payload.len() <= gso);
            prop_assert!(last || s.payload.len() == gso);
            next = s.payload.end;
            prop_assert_eq!(usize::from(s.csum_start), l4);
            prop_assert_eq!(usize::from(s.csum_offset), if spec.udp { 6 } else { 16 });
            let mut out = s.headers().to_vec();
            out.extend_from_slice(s.payload_of(&frame));
            let l4_len = out.len() - l4;

            // Ethernet and VLAN tags untouched.
            prop_assert_eq!(&out[..l3], &frame[..l3]);
            // Only the length/ID/checksum fields of IP and the seq/flags/len/checksum of L4
            // differ from the input headers.
            let mut changed: Vec<usize> = Vec::new();
            let pseudo = if spec.v6 {
                let ip = Ipv6Packet::new_checked(&out[l3..]).unwrap();
                prop_assert_eq!(usize::from(ip.payload_len()), l4_len);
                changed.extend(l3 + 4..l3 + 6);
                pseudo_header_v6(SRC6, DST6, ip.next_header(), l4_len as u32)
            } else {
                let ip = Ipv4Packet::new_checked(&out[l3..]).unwrap();
                prop_assert_eq!(usize::from(ip.total_len()), out.len() - l3);
                prop_assert!(ip.verify_checksum());
                prop_assert_eq!(ip.ident(), spec.ident.wrapping_add(i as u16));
                changed.extend((l3 + 2..l3 + 6).chain(l3 + 10..l3 + 12));
                ip.pseudo_header()
            };
            let check = u16::from_be_bytes([
                out[s.csum_start as usize + s.csum_offset as usize],
                out[s.csum_start as usize + s.csum_offset as usize + 1],
            ]);
            if spec.udp {
                let udp = UdpDatagram::new_checked(&out[l4..]).unwrap();
                prop_assert_eq!(usize::from(udp.len()), l4_len);
                changed.extend(l4 + 4..l4 + 8);
            } else {
                let th = TcpSegment::new_checked(&out[l4..]).unwrap();
                prop_assert_eq!(th.seq(), spec.seq.wrapping_add((i * gso) as u32));
                let mut flags = spec.flags;
                if i > 0 {
                    flags &= !tcp::CWR;
                }
                if !last {
                    flags &= !(tcp::FIN | tcp::PSH);
                }
                prop_assert_eq!(th.flags(), flags);
                changed.extend((l4 + 4..l4 + 8).chain([l4 + 13]).chain(l4 + 16..l4 + 18));
            }
            for (j, (a, b)) in out[..hl].iter().zip(&frame[..hl]).enumerate() {
                prop_assert!(a == b || changed.contains(&j), "byte {} changed", j);
            }
            match params.csum {
                SegmentCsum::Full => {
                    let mut sum = pseudo;
                    prop_assert_eq!(sum.add_bytes(&out[l4..]).finish(), 0);
                    prop_assert!(!spec.udp || check != 0);
                }
                SegmentCsum::Partial => {
                    prop_assert_eq!(check, pseudo.fold());
                    complete(&mut out, s.csum_start, s.csum_offset);
                    let mut sum = pseudo;
                    prop_assert_eq!(sum.add_bytes(&out[l4..]).finish(), 0);
                }
            }
            i += 1;
            Ok(())
        });
        prop_assert_eq!(result?, expected);
        prop_assert_eq!(i, expected);
        prop_assert_eq!(next, frame.len(), "payloads cover the frame");
        Ok(())
    }

    fn spec_strategy(
        gso: impl Strategy<Value = u16>,
        payload: impl Strategy<Value = usize>,
    ) -> impl Strategy<Value = Spec> {
        (
            (
                any::<bool>(),
                any::<bool>(),
                0..=2usize,
                0..=10usize,
                0..=10usize,
            ),
            (payload, gso, any::<u8>(), any::<u32>(), any::<u16>()),
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<u8>()),
        )
            .prop_map(
                |(
                    (v6, udp, tags, ip_opt_words, tcp_opt_words),
                    (payload_len, gso_size, flags, seq, ident),
                    (df, ecn, partial, salt),
                )| {
                    let mut spec = Spec {
                        v6,
                        udp,
                        tags,
                        ip_opt_words,
                        tcp_opt_words,
                        payload_len,
                        gso_size,
                        flags,
                        seq,
                        ident,
                        df,
                        ecn,
                        partial,
                        salt,
                    };
                    spec.payload_len = spec.payload_len.min(spec.max_payload());
                    spec
                },
            )
    }

    proptest! {
        #[test]
        fn segment_any_frame_follows_the_rules(spec in spec_strategy(1..=9000u16, 0..=65000usize)) {
            check_segments(&spec)?;
        }

        /// Tiny segments (many of them, odd lengths everywhere) on shorter frames.
        #[test]
        fn segment_small_gso_sizes(spec in spec_strategy(1..=64u16, 0..=3000usize)) {
            check_segments(&spec)?;
        }
    }

    #[test]
    fn segment_largest_frames() {
        for (v6, udp) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut spec = Spec::simple(v6, udp, 0, 1448);
            spec.payload_len = spec.max_payload();
            check_segments(&spec).unwrap();
            spec.partial = true;
            check_segments(&spec).unwrap();
        }
    }

    #[test]
    fn segment_payload_up_to_gso_size_is_one_unchanged_segment() {
        for len in [0, 1, 1447, 1448] {
            let spec = Spec::simple(false, false, len, 1448);
            let frame = build(&spec);
            let segs = segment_frames(&frame, &spec.params()).unwrap();
            assert_eq!(segs.len(), 1);
            // Identical but for the completed checksum.
            let mut expected = frame.clone();
            expected[50..52].copy_from_slice(&[0, 0]);
            let mut sum = pseudo_header_v4(SRC4, DST4, PROTO_TCP, (20 + len) as u32);
            sum.add_bytes(&expected[34..]);
            expected[50..52].copy_from_slice(&sum.finish().to_be_bytes());
            assert_eq!(segs[0], expected, "payload {len}");
        }
    }

    #[test]
    fn segment_stops_at_the_first_emit_error() {
        let spec = Spec::simple(false, false, 10000, 1000);
        let frame = build(&spec);
        let mut calls = 0;
        let r = segment(&frame, &spec.params(), |_| {
            calls += 1;
            if calls == 3 {
                Err("guest ring full")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err(SegmentFailure::Emit("guest ring full")));
        assert_eq!(calls, 3);
    }

    // ---- malformed input ----

    fn err_of(frame: &[u8], params: &GsoParams) -> SegmentError {
        let mut emitted = 0;
        match segment(frame, params, |_| {
            emitted += 1;
            Ok::<(), ()>(())
        }) {
            Err(SegmentFailure::Invalid(e)) => {
                assert_eq!(emitted, 0, "nothing is emitted for a refused frame");
                assert!(!e.to_string().is_empty());
                e
            }
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn segment_refuses_bad_params() {
        let spec = Spec::simple(false, false, 5000, 1448);
        let frame = build(&spec);
        for kind in [GsoKind::None, GsoKind::Ufo, GsoKind::Unknown(7)] {
            let mut p = spec.params();
            p.kind = kind;
            assert_eq!(err_of(&frame, &p), SegmentError::UnsupportedKind(kind));
        }
        let mut p = spec.params();
        p.gso_size = 0;
        assert_eq!(err_of(&frame, &p), SegmentError::ZeroGsoSize);
        let mut p = spec.params();
        p.max_segments = 3;
        assert_eq!(
            err_of(&frame, &p),
            SegmentError::TooManySegments {
                segments: 4,
                max: 3
            }
        );
        p.max_segments = 4;
        assert_eq!(segment_frames(&frame, &p).unwrap().len(), 4);
    }

    #[test]
    fn segment_refuses_kind_and_protocol_mismatches() {
        let v4 = build(&Spec::simple(false, false, 3000, 1000));
        let v6 = build(&Spec::simple(true, false, 3000, 1000));
        let udp4 = build(&Spec::simple(false, true, 3000, 1000));
        let p = |kind| GsoParams::new(kind, 1000, false, SegmentCsum::Full);
        assert_eq!(
            err_of(&v6, &p(GsoKind::TcpV4)),
            SegmentError::IpVersionMismatch {
                kind: GsoKind::TcpV4,
                ethertype: ETHERTYPE_IPV6
            }
        );
        assert_eq!(
            err_of(&v4, &p(GsoKind::TcpV6)),
            SegmentError::IpVersionMismatch {
                kind: GsoKind::TcpV6,
                ethertype: ETHERTYPE_IPV4
            }
        );
        assert_eq!(
            err_of(&udp4, &p(GsoKind::TcpV4)),
            SegmentError::L4Protocol {
                kind: GsoKind::TcpV4,
                protocol: PROTO_UDP
            }
        );
        assert_eq!(
            err_of(&v4, &p(GsoKind::UdpL4)),
            SegmentError::L4Protocol {
                kind: GsoKind::UdpL4,
                protocol: PROTO_TCP
            }
        );
        // An IPv6 extension header (hop-by-hop, 0) in front of TCP.
        let mut ext = v6.clone();
        ext[20] = 0;
        assert_eq!(
            err_of(&ext, &p(GsoKind::TcpV6)),
            SegmentError::L4Protocol {
                kind: GsoKind::TcpV6,
                protocol: 0
            }
        );
        // ARP, and three VLAN tags (the third TPID is not an IP ethertype).
        let mut arp = v4.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            err_of(&arp, &p(GsoKind::TcpV4)),
            SegmentError::NotIp { ethertype: 0x0806 }
        );
        let mut three = v4[..12].to_vec();
        for _ in 0..3 {
            three.extend_from_slice(&[0x81, 0x00, 0x00, 0x01]);
        }
        three.extend_from_slice(&v4[12..]);
        assert_eq!(
            err_of(&three, &p(GsoKind::TcpV4)),
            SegmentError::NotIp { ethertype: 0x8100 }
        );
    }

    #[test]
    fn segment_refuses_truncated_frames_at_every_length() {
        for spec in [
            Spec::simple(false, false, 100, 30),
            Spec::simple(true, false, 100, 30),
            Spec::simple(false, true, 100, 30),
            Spec::simple(true, true, 100, 30),
            Spec {
                tags: 2,
                tcp_opt_words: 3,
                ..Spec::simple(false, false, 100, 30)
            },
        ] {
            let frame = build(&spec);
            for len in 0..frame.len() {
                err_of(&frame[..len], &spec.params());
            }
            assert_eq!(segment_frames(&frame, &spec.params()).unwrap().len(), 4);
        }
    }

    #[test]
    fn segment_refuses_lying_lengths() {
        let spec = Spec::simple(false, false, 3000, 1000);
        let frame = build(&spec);
        let params = spec.params();
        // IPv4 total length one short (a trailing byte) and one long.
        let mut f = frame.clone();
        f[16..18].copy_from_slice(&(3039u16).to_be_bytes());
        assert_eq!(
            err_of(&f, &params),
            SegmentError::IpLength {
                declared: 3039,
                in_frame: 3040
            }
        );
        f[16..18].copy_from_slice(&(3041u16).to_be_bytes());
        assert_eq!(
            err_of(&f, &params),
            SegmentError::Ipv4(WireError::Truncated)
        );
        // IHL below 5, and an IHL past the frame.
        let mut f = frame.clone();
        f[14] = 0x44;
        assert_eq!(
            err_of(&f, &params),
            SegmentError::Ipv4(WireError::Malformed)
        );
        // TCP data offset below 5 words, and beyond the frame.
        let mut f = frame.clone();
        f[46] = 0x40;
        assert_eq!(err_of(&f, &params), SegmentError::Tcp(WireError::Malformed));
        let small = build(&Spec::simple(false, false, 10, 1000));
        let mut f = small.clone();
        f[46] = 0xf0;
        assert_eq!(err_of(&f, &params), SegmentError::Tcp(WireError::Truncated));
        // Fragments.
        let mut f = frame.clone();
        f[20] |= 0x20;
        assert_eq!(err_of(&f, &params), SegmentError::Fragment);
        let mut f = frame.clone();
        f[21] = 1;
        assert_eq!(err_of(&f, &params), SegmentError::Fragment);

        // IPv6 payload length: short, long, and the jumbogram 0.
        let spec6 = Spec::simple(true, true, 3000, 1000);
        let frame6 = build(&spec6);
        let params6 = spec6.params();
        let mut f = frame6.clone();
        f[18..20].copy_from_slice(&3007u16.to_be_bytes());
        assert_eq!(
            err_of(&f, &params6),
            SegmentError::IpLength {
                declared: 3047,
                in_frame: 3048
            }
        );
        f[18..20].copy_from_slice(&3009u16.to_be_bytes());
        assert_eq!(
            err_of(&f, &params6),
            SegmentError::Ipv6(WireError::Truncated)
        );
        f[18..20].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            err_of(&f, &params6),
            SegmentError::IpLength {
                declared: 40,
                in_frame: 3048
            }
        );
        // UDP length: short, long, below the header.
        let mut f = frame6.clone();
        f[58..60].copy_from_slice(&3007u16.to_be_bytes());
        assert_eq!(
            err_of(&f, &params6),
            SegmentError::UdpLength {
                declared: 3007,
                in_frame: 3008
            }
        );
        f[58..60].copy_from_slice(&3009u16.to_be_bytes());
        assert_eq!(
            err_of(&f, &params6),
            SegmentError::Udp(WireError::Truncated)
        );
        f[58..60].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            err_of(&f, &params6),
            SegmentError::Udp(WireError::Malformed)
        );
    }

    /// Whatever comes in, `segment` returns; an accepted frame's segments stay inside it.
    fn no_panic(frame: &[u8], params: &GsoParams) {
        let _ = segment(frame, params, |s| {
            assert!(s.payload.start >= s.headers_len && s.payload.end <= frame.len());
            assert!(s.headers_len <= MAX_HEADERS);
            assert!(usize::from(s.csum_start) < s.headers_len);
            Ok::<(), ()>(())
        });
    }

    fn kind_strategy() -> impl Strategy<Value = GsoKind> {
        prop_oneof![
            Just(GsoKind::TcpV4),
            Just(GsoKind::TcpV6),
            Just(GsoKind::UdpL4),
            Just(GsoKind::None),
            Just(GsoKind::Ufo),
        ]
    }

    proptest! {
        #[test]
        fn segment_never_panics_on_random_bytes(
            frame in prop::collection::vec(any::<u8>(), 0..400),
            kind in kind_strategy(),
            gso_size in any::<u16>(),
            ecn in any::<bool>(),
            partial in any::<bool>(),
        ) {
            let csum = if partial { SegmentCsum::Partial } else { SegmentCsum::Full };
            no_panic(&frame, &GsoParams::new(kind, gso_size, ecn, csum));
        }

        /// Valid frames with header bytes overwritten and the end cut anywhere: the checks
        /// are reached in every combination.
        #[test]
        fn segment_never_panics_on_damaged_frames(
            spec in spec_strategy(1..=200u16, 0..=600usize),
            damage in prop::collection::vec((0..160usize, any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            kind in kind_strategy(),
        ) {
            let mut frame = build(&spec);
            for (at, byte) in damage {
                if let Some(b) = frame.get_mut(at) {
                    *b = byte;
                }
            }
            let len = cut.index(frame.len() + 1);
            no_panic(&frame[..len], &spec.params());
            let mut params = spec.params();
            params.kind = kind;
            no_panic(&frame, &params);
        }
    }

    /// Time per 64 KiB TCPv4 frame cut at 1448 in Full mode. Run with
    /// `cargo test --release --lib segment_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn segment_timing_64k_tcp4() {
        let mut spec = Spec::simple(false, false, 0, 1448);
        spec.payload_len = spec.max_payload();
        let frame = build(&spec);
        let params = spec.params();
        let mut sink = 0u64;
        let mut run = |rounds: u32| {
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                segment(std::hint::black_box(&frame), &params, |s| {
                    sink = sink.wrapping_add(u64::from(s.headers[50]) + s.payload.len() as u64);
                    Ok::<(), ()>(())
                })
                .unwrap();
            }
            t.elapsed().as_nanos() / u128::from(rounds)
        };
        run(200);
        let ns = run(5000);
        // For scale: checksumming the same payload in one pass and in 1448-byte pieces.
        let mut floor = |piece: usize| {
            let t = std::time::Instant::now();
            for _ in 0..5000 {
                for c in std::hint::black_box(&frame[54..]).chunks(piece) {
                    sink = sink.wrapping_add(u64::from(Checksum::new().add_bytes(c).fold()));
                }
            }
            t.elapsed().as_nanos() / 5000
        };
        let (whole, pieces) = (floor(usize::MAX), floor(1448));
        println!(
            "segment: {ns} ns per {}-byte TCPv4 frame ({} segments of 1448, Full); checksum \
             alone: {whole} ns in one pass, {pieces} ns in 1448-byte pieces; sink {sink}",
            frame.len(),
            spec.payload_len.div_ceil(1448),
        );
    }
}
