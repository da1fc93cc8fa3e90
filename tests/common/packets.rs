//! Frames built and checked by hand for the integration tests, and a guest-side "stack" just
//! big enough to answer ARP and to be the receiving end of a TCP flow.

use std::time::{Duration, Instant};

use vhost_packet::wire::checksum::{pseudo_header_v4, Checksum};
use vhost_packet::wire::ethernet::EthernetFrame;
use vhost_packet::wire::ipv4::Ipv4Packet;
use vhost_packet::wire::tcp::TcpSegment;
use vhost_packet::wire::udp::UdpDatagram;

use super::frontend::{vnet_header, TestFrontend, TxLayout};

pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const GUEST_IP: [u8; 4] = [198, 18, 0, 1];
pub const PEER_IP: [u8; 4] = [198, 18, 0, 2];
pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
/// IEEE "local experimental" ethertype: ignored by the peer's stack.
pub const ETH_EXPERIMENTAL: u16 = 0x88b5;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet with a correct header checksum.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, ident: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let mut c = Checksum::new();
    c.add_bytes(&p);
    p[10..12].copy_from_slice(&c.finish().to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&src_ip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip);
    ethernet([0xff; 6], src_mac, ETH_ARP, &a)
}

pub fn arp_reply(src_mac: [u8; 6], src_ip: [u8; 4], dst_mac: [u8; 6], dst_ip: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 2];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&src_ip);
    a.extend_from_slice(&dst_mac);
    a.extend_from_slice(&dst_ip);
    ethernet(dst_mac, src_mac, ETH_ARP, &a)
}

pub fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let mut c = Checksum::new();
    c.add_bytes(&m);
    m[2..4].copy_from_slice(&c.finish().to_be_bytes());
    m
}

/// The fields of a TCP segment we send.
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
}

/// How the TCP checksum field is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    /// Complete checksum.
    Full,
    /// The pseudo-header seed only, for a NEEDS_CSUM header (what a guest with CSUM sends).
    Partial,
}

/// An Ethernet/IPv4/TCP frame.
pub fn tcp_frame(mac: ([u8; 6], [u8; 6]), t: Tcp, payload: &[u8], csum: Csum) -> Vec<u8> {
    let mut seg = vec![0u8; 20];
    seg[0..2].copy_from_slice(&t.src.1.to_be_bytes());
    seg[2..4].copy_from_slice(&t.dst.1.to_be_bytes());
    seg[4..8].copy_from_slice(&t.seq.to_be_bytes());
    seg[8..12].copy_from_slice(&t.ack.to_be_bytes());
    seg[12] = 5 << 4;
    seg[13] = t.flags;
    seg[14..16].copy_from_slice(&t.window.to_be_bytes());
    seg.extend_from_slice(payload);
    let pseudo = pseudo_header_v4(t.src.0, t.dst.0, 6, seg.len() as u32);
    let value = match csum {
        Csum::Partial => pseudo.fold(),
        Csum::Full => {
            let mut c = pseudo;
            c.add_bytes(&seg);
            c.finish()
        }
    };
    seg[16..18].copy_from_slice(&value.to_be_bytes());
    ethernet(mac.0, mac.1, ETH_IPV4, &ipv4(t.src.0, t.dst.0, 6, 0, &seg))
}

/// A frame's IPv4 and L4 checksums, verified. `None` if it is not IPv4 TCP/UDP.
pub fn ipv4_l4_checksums_ok(frame: &[u8]) -> Option<bool> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != ETH_IPV4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
    let pseudo = ip.pseudo_header();
    let l4 = ip.payload();
    let ok = match ip.protocol() {
        6 => TcpSegment::new_checked(l4).ok()?.verify_checksum(pseudo),
        17 => UdpDatagram::new_checked(l4).ok()?.verify_checksum(pseudo),
        _ => return None,
    };
    Some(ok && ip.verify_checksum())
}

/// Parsed view of a received IPv4 TCP frame.
#[derive(Clone, Debug)]
pub struct TcpSeen {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
}

pub fn parse_tcp(frame: &[u8]) -> Option<TcpSeen> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != ETH_IPV4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
    if ip.protocol() != 6 {
        return None;
    }
    let t = TcpSegment::new_checked(ip.payload()).ok()?;
    Some(TcpSeen {
        src_port: t.src_port(),
        dst_port: t.dst_port(),
        seq: t.seq(),
        ack: t.ack(),
        flags: t.flags(),
        payload: t.payload().to_vec(),
    })
}

/// Sends one frame with a zero (or given) header and waits until the backend returns it.
pub fn send_frame(fe: &mut TestFrontend, header: &[u8], frame: &[u8]) {
    fe.send(header, frame, TxLayout::Combined);
    fe.kick_tx();
    let used = fe.wait_tx_used(1, Duration::from_secs(5));
    assert_eq!(used.len(), 1, "backend did not return the TX chain");
}

pub fn plain_header(fe: &TestFrontend) -> Vec<u8> {
    vnet_header(0, 0, 0, 0, 0, 0, 0, fe.header_len())
}

/// Answers ARP requests for the guest's address; returns true if `frame` was one.
pub fn answer_arp(fe: &mut TestFrontend, frame: &[u8]) -> bool {
    if frame.len() < 42 || frame[12..14] != ETH_ARP.to_be_bytes() || frame[20..22] != [0, 1] {
        return false;
    }
    if frame[38..42] == GUEST_IP {
        let mut sender_mac = [0u8; 6];
        sender_mac.copy_from_slice(&frame[22..28]);
        let mut sender_ip = [0u8; 4];
        sender_ip.copy_from_slice(&frame[28..32]);
        let reply = arp_reply(GUEST_MAC, GUEST_IP, sender_mac, sender_ip);
        let h = plain_header(fe);
        send_frame(fe, &h, &reply);
    }
    true
}

/// What a guest-side TCP receive saw.
#[derive(Debug, Default)]
pub struct FlowReport {
    pub data: Vec<u8>,
    pub frames: u64,
    pub gso_frames: u64,
    pub multi_buffer: u64,
    pub max_frame: usize,
    pub max_num_buffers: u16,
    /// Frames whose checksums did not verify (only meaningful without NEEDS_CSUM).
    pub bad_checksums: u64,
    pub needs_csum_frames: u64,
    pub fin: bool,
}

/// Accepts one TCP connection to `port` on the guest address and receives until FIN (or
/// `timeout`), acking in order. Every received packet's `num_buffers` is checked against the
/// used entries it took, and the used lengths against the header and frame.
pub fn tcp_receive(
    fe: &mut TestFrontend,
    peer_mac: [u8; 6],
    port: u16,
    timeout: Duration,
) -> FlowReport {
    let mut r = FlowReport::default();
    let deadline = Instant::now() + timeout;
    let iss: u32 = 0x1000_0000;
    let mut expected: Option<u32> = None;
    let mut peer_port = 0u16;
    let hdr_len = fe.header_len();
    while Instant::now() < deadline && !r.fin {
        let Some(p) = fe.recv(Duration::from_millis(200)) else {
            continue;
        };
        let total: u32 = p.used_lens.iter().sum();
        assert_eq!(
            total as usize,
            hdr_len + p.frame.len(),
            "used lengths must sum to header + frame"
        );
        assert_eq!(p.used_lens.len(), p.num_buffers as usize);
        if fe.has_feature(super::frontend::feat::MRG_RXBUF) {
            assert_eq!(
                p.hdr().num_buffers,
                Some(p.num_buffers),
                "num_buffers written by the backend"
            );
        }
        if answer_arp(fe, &p.frame) {
            continue;
        }
        let Some(t) = parse_tcp(&p.frame) else {
            continue;
        };
        if t.dst_port != port {
            continue;
        }
        let h = p.hdr();
        r.frames += 1;
        r.max_frame = r.max_frame.max(p.frame.len());
        r.max_num_buffers = r.max_num_buffers.max(p.num_buffers);
        r.multi_buffer += u64::from(p.num_buffers > 1);
        r.gso_frames += u64::from(h.gso_type != 0);
        if h.flags & 1 != 0 {
            r.needs_csum_frames += 1;
        } else if ipv4_l4_checksums_ok(&p.frame) != Some(true) {
            r.bad_checksums += 1;
        }
        let mac = (peer_mac, GUEST_MAC);
        let me = (GUEST_IP, port);
        if t.flags & TCP_SYN != 0 {
            peer_port = t.src_port;
            expected = Some(t.seq.wrapping_add(1));
            let syn_ack = Tcp {
                src: me,
                dst: (PEER_IP, peer_port),
                seq: iss,
                ack: t.seq.wrapping_add(1),
                flags: TCP_SYN | TCP_ACK,
                window: 65535,
            };
            let hdr = plain_header(fe);
            send_frame(fe, &hdr, &tcp_frame(mac, syn_ack, &[], Csum::Full));
            continue;
        }
        let Some(exp) = expected else { continue };
        if t.seq == exp && !t.payload.is_empty() {
            r.data.extend_from_slice(&t.payload);
            expected = Some(exp.wrapping_add(t.payload.len() as u32));
        }
        let mut ack_no = expected.unwrap();
        if t.flags & TCP_FIN != 0 && t.seq.wrapping_add(t.payload.len() as u32) == ack_no {
            ack_no = ack_no.wrapping_add(1);
            r.fin = true;
        }
        let ack = Tcp {
            src: me,
            dst: (PEER_IP, peer_port),
            seq: iss.wrapping_add(1),
            ack: ack_no,
            flags: TCP_ACK | if r.fin { TCP_FIN } else { 0 },
            window: 65535,
        };
        let hdr = plain_header(fe);
        send_frame(fe, &hdr, &tcp_frame(mac, ack, &[], Csum::Full));
    }
    r
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub const ETH_IPV6: u16 = 0x86dd;
/// RFC 5180 benchmarking addresses; these frames are only ever injected at layer 2.
pub const GUEST_IP6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const PEER_IP6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// The L3 part of a GSO test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L3 {
    V4,
    V6,
}

/// An Ethernet frame carrying TCP (proto 6) or UDP (17) with `payload`, its L4 checksum field
/// holding the pseudo-header seed (NEEDS_CSUM). Returns the frame and (csum_start, hdr_len).
pub fn partial_csum_frame(
    mac: ([u8; 6], [u8; 6]),
    l3: L3,
    proto: u8,
    tcp_flags: u8,
    payload: &[u8],
) -> (Vec<u8>, u16, u16) {
    let l4_hdr = if proto == 6 { 20 } else { 8 };
    let mut l4 = vec![0u8; l4_hdr];
    l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4[2..4].copy_from_slice(&5001u16.to_be_bytes());
    if proto == 6 {
        l4[4..8].copy_from_slice(&1u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = tcp_flags;
        l4[14..16].copy_from_slice(&65535u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    }
    l4.extend_from_slice(payload);
    let len = l4.len() as u32;
    let csum_at = if proto == 6 { 16 } else { 6 };
    match l3 {
        L3::V4 => {
            let seed = pseudo_header_v4(GUEST_IP, PEER_IP, proto, len).fold();
            l4[csum_at..csum_at + 2].copy_from_slice(&seed.to_be_bytes());
            let f = ethernet(
                mac.0,
                mac.1,
                ETH_IPV4,
                &ipv4(GUEST_IP, PEER_IP, proto, 0, &l4),
            );
            (f, 34, (34 + l4_hdr) as u16)
        }
        L3::V6 => {
            let seed =
                vhost_packet::wire::checksum::pseudo_header_v6(GUEST_IP6, PEER_IP6, proto, len)
                    .fold();
            l4[csum_at..csum_at + 2].copy_from_slice(&seed.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&GUEST_IP6);
            ip.extend_from_slice(&PEER_IP6);
            ip.extend_from_slice(&l4);
            (
                ethernet(mac.0, mac.1, ETH_IPV6, &ip),
                54,
                (54 + l4_hdr) as u16,
            )
        }
    }
}
