//! End to end through the real binary: a Rust virtio driver (tests/common/frontend.rs) over
//! vhost-user on one side, a veth whose peer sits in a namespace with a real kernel TCP/IP stack
//! on the other. Needs root; under CI=true missing tools fail the test.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::daemon::Daemon;
use common::frontend::{
    feat, hdr as vhdr, raw_message, raw_reply, vnet_header, FrontendConfig, Queue, TestFrontend,
    TxLayout,
};
use common::netns::{format_mac, require_root_and_tools, veth_pair, NetNs};
use common::packets::*;
use vhost_packet::packet::interface::Interface;
use vhost_packet::packet::socket::{PacketSocket, SocketOptions};

const T: Duration = Duration::from_secs(5);

/// Offloads a Linux guest asks for.
const GUEST_FEATURES: u64 = feat::LINUX_GUEST;

/// A host namespace (vhost-packet on `vh0`) and a peer namespace (`vp0`, 198.18.0.2, a real
/// kernel stack that knows the guest's MAC for 198.18.0.1).
struct Rig {
    daemon: Daemon,
    peer_mac: [u8; 6],
    // Dropped last: the daemon dies before its namespace goes.
    peer: NetNs,
    host: NetNs,
}

fn rig(extra: &[&str]) -> Option<Rig> {
    rig_with_mac(Some("02:00:00:00:00:01"), extra)
}

/// `mac`: vhost-packet's `--mac`; `None`: it learns the guest's (`GUEST_MAC` in these tests).
fn rig_with_mac(mac: Option<&str>, extra: &[&str]) -> Option<Rig> {
    if !require_root_and_tools(&["ip", "ethtool", "bridge"]) {
        return None;
    }
    let host = NetNs::new("vph");
    let peer = NetNs::new("vpp");
    veth_pair(&host, "vh0", &peer, "vp0");
    peer.add_addr("vp0", "198.18.0.2/24");
    peer.add_neigh("vp0", "198.18.0.1", "02:00:00:00:00:01");
    let peer_mac = peer.mac("vp0");
    let mut args: Vec<&str> = mac.iter().flat_map(|m| ["--mac", m]).collect();
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&host, "vh0", &args);
    Some(Rig {
        daemon,
        peer_mac,
        peer,
        host,
    })
}

fn guest(rig: &Rig, features: u64, rx_buffers: &[(usize, u32)]) -> TestFrontend {
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.start(FrontendConfig {
        features,
        queue_size: 1024,
        mem_size: 64 << 20,
    });
    for &(count, size) in rx_buffers {
        fe.post_rx_buffers(count, size);
    }
    fe.set_rx_autorefill(true);
    fe.kick_rx();
    fe
}

/// A packet socket in the peer namespace: injects frames into vp0 and captures what arrives.
fn peer_socket(rig: &Rig) -> PacketSocket {
    rig.peer.enter_thread(|| {
        let iface = Interface::by_name("vp0").unwrap();
        PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
    })
}

/// Next frame on a peer capture socket that satisfies `want`, without its vnet header.
fn capture(sock: &PacketSocket, mut want: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = std::time::Instant::now() + T;
    let mut buf = vec![0u8; 70000];
    while std::time::Instant::now() < deadline {
        match sock.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
            Ok(r) => {
                let frame = &buf[12..r.len.min(buf.len())];
                if want(frame) {
                    return Some(frame.to_vec());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("capture: {e}"),
        }
    }
    None
}

/// Receives until `want` matches a frame (answering ARP on the way).
fn recv_matching(
    fe: &mut TestFrontend,
    want: impl Fn(&[u8]) -> bool,
) -> Option<common::frontend::RxPacket> {
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        if let Some(p) = fe.recv(Duration::from_millis(100)) {
            if want(&p.frame) {
                return Some(p);
            }
            answer_arp(fe, &p.frame);
        }
    }
    None
}

fn ping(fe: &mut TestFrontend, peer_mac: [u8; 6], seq: u16) {
    let data = pattern(56, u32::from(seq));
    let echo = ethernet(
        peer_mac,
        GUEST_MAC,
        ETH_IPV4,
        &ipv4(GUEST_IP, PEER_IP, 1, seq, &icmp_echo(0x77, seq, &data)),
    );
    let h = plain_header(fe);
    send_frame(fe, &h, &echo);
    let reply = recv_matching(fe, |f| {
        f.len() >= 42
            && f[12..14] == [8, 0]
            && f[23] == 1
            && f[34] == 0
            && f[38..40] == 0x77u16.to_be_bytes()
            && f[40..42] == seq.to_be_bytes()
    })
    .unwrap_or_else(|| panic!("no echo reply for seq {seq}"));
    assert_eq!(&reply.frame[42..42 + 56], &data[..], "echo data comes back");
    assert_eq!(
        ipv4_l4_checksums_ok(&reply.frame),
        None,
        "ICMP: not TCP/UDP"
    );
}

#[test]
fn a_frames_both_ways_byte_exact_and_ping() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(256, 1536)]);
    let acked = fe.acked_features();
    eprintln!(
        "negotiated features: {}",
        vhost_packet::virtio::features::describe(acked)
    );
    assert_eq!(
        acked & GUEST_FEATURES,
        GUEST_FEATURES,
        "everything a Linux guest asks for is offered"
    );
    let cfg = fe.get_config(0, 12);
    assert_eq!(&cfg[0..6], &GUEST_MAC, "config space MAC");
    assert_eq!(&cfg[6..8], &[1, 0], "link up");
    assert_eq!(
        u16::from_le_bytes([cfg[10], cfg[11]]),
        1500,
        "MTU defaults to the interface's"
    );

    let cap = peer_socket(&rig);
    // Guest to peer, for every descriptor layout.
    let layouts = [
        TxLayout::Combined,
        TxLayout::Separate,
        TxLayout::SplitAt(vec![5, 11, 13, 40]),
        TxLayout::Indirect,
    ];
    for (i, layout) in layouts.into_iter().enumerate() {
        let frame = ethernet(
            rig.peer_mac,
            GUEST_MAC,
            ETH_EXPERIMENTAL,
            &pattern(100 + i * 333, i as u32),
        );
        fe.send(&plain_header(&fe), &frame, layout);
        fe.kick_tx();
        assert_eq!(fe.wait_tx_used(1, T).len(), 1);
        let got = capture(&cap, |f| {
            f.len() > 14 && f[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
        })
        .expect("frame reaches the peer");
        assert_eq!(got, frame, "guest-to-peer frame {i} arrives byte for byte");
    }
    // Peer to guest.
    let frame = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(1000, 9));
    cap.send_vectored(&[
        std::io::IoSlice::new(&[0u8; 12]),
        std::io::IoSlice::new(&frame),
    ])
    .unwrap();
    let p = recv_matching(&mut fe, |f| f == &frame[..]).expect("frame reaches the guest");
    assert_eq!(p.hdr().flags, 0);
    assert_eq!(p.num_buffers, 1);

    // ARP and ping against the peer's kernel.
    let h = plain_header(&fe);
    send_frame(&mut fe, &h, &arp_request(GUEST_MAC, GUEST_IP, PEER_IP));
    let reply = recv_matching(&mut fe, |f| {
        f.len() >= 42 && f[12..14] == ETH_ARP.to_be_bytes() && f[20..22] == [0, 2]
    })
    .expect("ARP reply");
    assert_eq!(
        &reply.frame[22..28],
        &rig.peer_mac,
        "peer answers with its MAC"
    );
    for seq in 1..=5 {
        ping(&mut fe, rig.peer_mac, seq);
    }
    let s = rig.daemon.stats();
    // 4 layouts + ARP + 5 echo requests; 1 injected frame + ARP reply + 5 echo replies.
    assert!(s["tx.packets"] >= 10 && s["rx.packets"] >= 7, "{s:?}");
}

#[test]
fn b_tso_frame_from_guest_reaches_a_kernel_listener() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(256, 4096)]);
    tso_frame_to_kernel_listener(&rig, &mut fe);
    let s = rig.daemon.stats();
    assert_eq!(s["tx.gso"], 1, "{s:?}");
}

/// Handshake with the peer's listener as 198.18.0.1, then one 60000-byte TSO frame.
fn tso_frame_to_kernel_listener(rig: &Rig, fe: &mut TestFrontend) {
    let listener = rig
        .peer
        .enter_thread(|| TcpListener::bind("198.18.0.2:5001").unwrap());
    let payload = pattern(60000, 7);
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.set_read_timeout(Some(T)).unwrap();
        while got.len() < 60000 {
            let mut buf = [0u8; 65536];
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let mac = (rig.peer_mac, GUEST_MAC);
    let (me, them) = ((GUEST_IP, 40000), (PEER_IP, 5001));
    let h = plain_header(fe);
    let syn = Tcp {
        src: me,
        dst: them,
        seq: 1000,
        ack: 0,
        flags: TCP_SYN,
        window: 65535,
    };
    send_frame(fe, &h, &tcp_frame(mac, syn, &[], Csum::Full));
    let synack = recv_matching(fe, |f| {
        parse_tcp(f).is_some_and(|t| t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
    })
    .expect("SYN-ACK");
    let peer_isn = parse_tcp(&synack.frame).unwrap().seq;
    let ack = Tcp {
        src: me,
        dst: them,
        seq: 1001,
        ack: peer_isn.wrapping_add(1),
        flags: TCP_ACK,
        window: 65535,
    };
    send_frame(fe, &h, &tcp_frame(mac, ack, &[], Csum::Full));

    // One 60000-byte TSO frame: NEEDS_CSUM with the pseudo-header seed, gso_size 1448.
    let data = Tcp {
        src: me,
        dst: them,
        seq: 1001,
        ack: peer_isn.wrapping_add(1),
        flags: TCP_ACK | TCP_PSH,
        window: 65535,
    };
    let frame = tcp_frame(mac, data, &payload, Csum::Partial);
    let gso_hdr = vnet_header(
        vhdr::F_NEEDS_CSUM,
        vhdr::GSO_TCPV4,
        54,
        1448,
        34,
        16,
        0,
        fe.header_len(),
    );
    send_frame(fe, &gso_hdr, &frame);
    let acked_all =
        recv_matching(fe, |f| parse_tcp(f).is_some_and(|t| t.ack == 1001 + 60000)).is_some();
    assert!(acked_all, "the peer's TCP acknowledges all 60000 bytes");
    assert_eq!(
        reader.join().unwrap(),
        payload,
        "the listener received the bytes intact"
    );
    let s = rig.daemon.stats();
    assert_eq!(s["tx.gso"], 1, "{s:?}");
}

/// The peer's kernel sends a bulk TCP flow to the guest; returns what the guest saw.
fn peer_bulk_flow(rig: &Rig, fe: &mut TestFrontend, len: usize) -> FlowReport {
    let payload = pattern(len, 3);
    let sent = payload.clone();
    std::thread::scope(|s| {
        let peer = &rig.peer;
        let writer = s.spawn(move || {
            peer.enter_thread(|| {
                let mut c = TcpStream::connect_timeout(&"198.18.0.1:5002".parse().unwrap(), T)
                    .expect("connect to the guest");
                c.write_all(&sent).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                // Wait for the guest's FIN so the last data is known to be acked.
                let mut b = [0u8; 16];
                let _ = c.set_read_timeout(Some(T));
                let _ = c.read(&mut b);
            })
        });
        let report = tcp_receive(fe, rig.peer_mac, 5002, Duration::from_secs(30));
        writer.join().unwrap();
        assert!(
            report.fin,
            "the flow completed ({} of {len} bytes)",
            report.data.len()
        );
        assert!(
            report.data == payload,
            "reassembled stream equals what the peer sent"
        );
        report
    })
}

#[test]
fn c_kernel_tcp_flow_arrives_as_gso_over_mergeable_buffers() {
    let Some(rig) = rig(&[]) else { return };
    // A mix of small and page-sized buffers, as a Linux guest posts them.
    let mut fe = guest(&rig, GUEST_FEATURES, &[(300, 1536), (200, 4096)]);
    let r = peer_bulk_flow(&rig, &mut fe, 4 << 20);
    let s = rig.daemon.stats();
    eprintln!(
        "peer->guest flow: {} frames, {} GSO, {} multi-buffer, largest {} bytes over up to {} buffers; daemon counters: {s:?}",
        r.frames, r.gso_frames, r.multi_buffer, r.max_frame, r.max_num_buffers
    );
    assert!(
        r.gso_frames > 0,
        "the peer's TSO frames arrive as GSO frames"
    );
    assert!(
        r.multi_buffer > 0 && r.max_num_buffers > 1,
        "large frames span several buffers"
    );
    assert!(r.max_frame > 4096);
    assert_eq!(s["rx.gso"], r.gso_frames);
    assert!(s["rx.multi_buffer"] >= r.multi_buffer);
    assert_eq!(s["rx.drops.offload"], 0);
}

#[test]
fn d_without_guest_csum_every_frame_has_a_valid_checksum() {
    let Some(rig) = rig(&[]) else { return };
    // The peer's kernel keeps TSO on: its 64 KiB frames reach this guest as segments made in
    // software, each with a complete checksum. Checksums stay partial (tx-checksumming on).
    let features = GUEST_FEATURES
        & !(feat::GUEST_CSUM | feat::GUEST_TSO4 | feat::GUEST_TSO6 | feat::GUEST_ECN);
    let mut fe = guest(&rig, features, &[(512, 1536)]);
    assert_eq!(fe.acked_features() & feat::GUEST_CSUM, 0);

    // UDP datagrams of several sizes (partial checksums from the peer's stack).
    let udp = rig
        .peer
        .enter_thread(|| UdpSocket::bind("198.18.0.2:7000").unwrap());
    let sizes = [1usize, 17, 100, 1000, 1472];
    for (i, &n) in sizes.iter().enumerate() {
        udp.send_to(&pattern(n, i as u32), "198.18.0.1:7001")
            .unwrap();
        let p = recv_matching(&mut fe, |f| {
            f.len() > 23 && f[12..14] == [8, 0] && f[23] == 17
        })
        .expect("UDP datagram");
        assert_eq!(
            p.hdr().flags,
            0,
            "no NEEDS_CSUM/DATA_VALID without GUEST_CSUM"
        );
        assert_eq!(
            ipv4_l4_checksums_ok(&p.frame),
            Some(true),
            "UDP datagram of {n} bytes has a valid checksum"
        );
    }
    // A TCP flow.
    let r = peer_bulk_flow(&rig, &mut fe, 1 << 20);
    assert_eq!(r.needs_csum_frames, 0);
    assert_eq!(r.bad_checksums, 0, "every TCP frame verifies");
    let s = rig.daemon.stats();
    eprintln!(
        "guest without GUEST_CSUM/TSO: {} frames, counters {s:?}",
        r.frames
    );
    assert!(s["rx.segmented"] > 0, "TSO frames were segmented: {s:?}");
    assert!(
        s["rx.csum_completed"] > 0,
        "checksums were finished in software: {s:?}"
    );
    assert_eq!(s["rx.drops.offload"], 0, "{s:?}");
}

#[test]
fn guest_with_guest_csum_but_no_tso_gets_segments_with_partial_checksums() {
    let Some(rig) = rig(&[]) else { return };
    let features = GUEST_FEATURES & !(feat::GUEST_TSO4 | feat::GUEST_TSO6 | feat::GUEST_ECN);
    let mut fe = guest(&rig, features, &[(512, 1536)]);
    let r = peer_bulk_flow(&rig, &mut fe, 1 << 20);
    assert_eq!(
        r.gso_frames, 0,
        "no GSO metadata for a guest without GUEST_TSO4"
    );
    assert!(
        r.needs_csum_frames > 0,
        "segments keep partial checksums for the guest"
    );
    assert_eq!(r.bad_checksums, 0);
    let s = rig.daemon.stats();
    assert!(s["rx.segmented"] > 0, "{s:?}");
}

#[test]
fn e_malformed_tx_headers_are_counted_and_the_queue_keeps_flowing() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    let cap = peer_socket(&rig);
    let frame = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(200, 1));
    let (v6, _, _) = partial_csum_frame(
        (rig.peer_mac, GUEST_MAC),
        L3::V6,
        6,
        TCP_ACK,
        &pattern(3000, 3),
    );
    let hl = fe.header_len();
    let malformed = [
        // hdr_len beyond the frame.
        (
            vnet_header(vhdr::F_NEEDS_CSUM, 0, 2000, 0, 14, 4, 0, hl),
            &frame,
        ),
        // csum_start beyond the frame.
        (
            vnet_header(vhdr::F_NEEDS_CSUM, 0, 0, 0, 5000, 0, 0, hl),
            &frame,
        ),
        // GSO with gso_size 0.
        (
            vnet_header(vhdr::F_NEEDS_CSUM, vhdr::GSO_TCPV4, 54, 0, 34, 16, 0, hl),
            &frame,
        ),
        // TCPV4 segmentation asked for an IPv6 frame (the kernel would answer ENOMEM).
        (
            vnet_header(vhdr::F_NEEDS_CSUM, vhdr::GSO_TCPV4, 74, 1448, 54, 16, 0, hl),
            &v6,
        ),
    ];
    for (h, f) in &malformed {
        send_frame(&mut fe, h, f);
    }
    // An unnegotiated GSO type (UFO) is refused before the kernel sees it.
    let ufo = vnet_header(vhdr::F_NEEDS_CSUM, vhdr::GSO_UDP, 42, 1000, 34, 6, 0, hl);
    send_frame(&mut fe, &ufo, &frame);
    // What only the kernel can refuse: a frame over the MTU...
    let big = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(3000, 4));
    let h = plain_header(&fe);
    send_frame(&mut fe, &h, &big);
    // ...and anything while the link is down.
    rig.host.ip(&["link", "set", "vh0", "down"]);
    send_frame(&mut fe, &h, &frame);
    rig.host.ip(&["link", "set", "vh0", "up"]);

    let good = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(300, 2));
    let deadline = std::time::Instant::now() + T;
    let got = loop {
        // The link needs a moment to carry traffic again after coming up.
        send_frame(&mut fe, &h, &good);
        if let Some(f) = capture(&cap, |f| {
            f.len() > 14 && f[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
        }) {
            break f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the good frame never went through"
        );
    };
    assert_eq!(got, good, "only the good frame reached the peer");
    let s = rig.daemon.stats();
    assert_eq!(s["tx.drops.malformed"], 4, "{s:?}");
    assert_eq!(s["tx.drops.unnegotiated"], 1, "{s:?}");
    assert_eq!(s["tx.drops.oversize"], 1, "{s:?}");
    assert!(s["tx.drops.kernel"] >= 1, "ENETDOWN while down: {s:?}");
    assert!(s["tx.packets"] >= 1, "{s:?}");
}

#[test]
fn f_frontend_reconnects_with_new_memory_and_traffic_resumes() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    ping(&mut fe, rig.peer_mac, 1);
    let pid = rig.daemon.pid();
    let (rx_base, tx_base) = fe.stop();
    assert!(
        tx_base >= 1 && rx_base >= 1,
        "vring bases reflect the traffic: rx {rx_base} tx {tx_base}"
    );
    rig.daemon.wait_for_log("frontend disconnected", T);
    // A new connection, new memory table and rings, with different buffer sizes.
    for round in 0..2u16 {
        let mut fe = guest(&rig, GUEST_FEATURES, &[(32, 4096)]);
        ping(&mut fe, rig.peer_mac, 10 + round);
        drop(fe); // abrupt: no GET_VRING_BASE, like a crashed QEMU
        rig.daemon
            .wait_for_log_count("frontend disconnected", usize::from(round) + 2, T);
    }
    let mut fe = guest(&rig, GUEST_FEATURES, &[(32, 2048)]);
    ping(&mut fe, rig.peer_mac, 20);
    assert_eq!(
        rig.daemon.pid(),
        pid,
        "the same process served every connection"
    );
}

/// Sends `frames` from the peer and lets the kernel queue them on the daemon's socket, so that
/// buffers posted afterwards take them in one pass. (If the wait were too short the burst would
/// split; the test using it could then miss its bug, never fail wrongly.)
fn queue_for_guest(peer: &PacketSocket, frames: &[Vec<u8>]) {
    for f in frames {
        peer.send_vectored(&[std::io::IoSlice::new(&[0u8; 12]), std::io::IoSlice::new(f)])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Waits (bounded) for a call on the RX ring; returns the calls seen.
fn wait_rx_call(fe: &mut TestFrontend) -> u64 {
    let deadline = std::time::Instant::now() + T;
    while fe.rx_calls() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    fe.rx_calls()
}

#[test]
fn g_after_a_ring_restart_the_first_burst_interrupts_even_ending_at_the_old_index() {
    // A guest reboot or driver reload on the same connection: the rings start again from 0.
    let Some(rig) = rig(&[]) else { return };
    let peer = peer_socket(&rig);
    let cfg = FrontendConfig {
        features: GUEST_FEATURES & !feat::EVENT_IDX,
        ..FrontendConfig::default()
    };
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.start(cfg.clone());
    for round in 0..2u32 {
        let frames: Vec<_> = (0..3)
            .map(|i| marked(GUEST_MAC, rig.peer_mac, 0x10 * round + i))
            .collect();
        queue_for_guest(&peer, &frames);
        fe.post_rx_buffers(3, 1536);
        fe.kick_rx();
        let got: Vec<_> = (0..3)
            .map(|_| fe.recv(T).and_then(|p| marker(&p.frame)))
            .collect();
        let want: Vec<_> = (0..3).map(|i| Some(0x10 * round + i)).collect();
        assert_eq!(got, want, "round {round}");
        assert_eq!(fe.rx_used_idx(), 3, "round {round}");
        assert!(
            wait_rx_call(&mut fe) >= 1,
            "round {round}: no interrupt for the burst that took used.idx to 3"
        );
        if round == 0 {
            fe.restart_rings(cfg.clone());
        }
    }
}

/// Leaves a 14-segment TSO frame half delivered (one segment) to a guest without GUEST_TSO,
/// then runs `reset` (which must leave RX buffers posted and autorefill on) and checks that no
/// segment of that frame reaches the guest afterwards: the next frame is a fresh marker.
/// `reset` returns whether the guest has GUEST_CSUM afterwards.
fn pending_segments_do_not_survive(reset: impl FnOnce(&mut TestFrontend) -> bool) {
    let Some(rig) = rig(&[]) else { return };
    let peer = peer_socket(&rig);
    let no_tso = feat::GUEST_TSO4 | feat::GUEST_TSO6 | feat::GUEST_ECN | feat::GUEST_UFO;
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.start(FrontendConfig {
        features: GUEST_FEATURES & !no_tso,
        ..FrontendConfig::default()
    });
    let payload = pattern(20000, 7);
    let (frame, csum_start, hdr_len) =
        partial_csum_frame((GUEST_MAC, rig.peer_mac), L3::V4, 6, TCP_ACK, &payload);
    let h = vnet_header(
        vhdr::F_NEEDS_CSUM,
        vhdr::GSO_TCPV4,
        hdr_len,
        1448,
        csum_start,
        16,
        0,
        12,
    );
    // One buffer that takes the whole frame: it is received, and its first segment fills it.
    fe.post_rx(&[32768]);
    fe.kick_rx();
    peer.send_vectored(&[std::io::IoSlice::new(&h), std::io::IoSlice::new(&frame)])
        .unwrap();
    let first = fe.recv(T).expect("the first segment");
    assert_eq!(
        first.hdr().flags & vhdr::F_NEEDS_CSUM,
        vhdr::F_NEEDS_CSUM,
        "with GUEST_CSUM a segment keeps its partial checksum"
    );
    assert_eq!(&first.frame[usize::from(hdr_len)..], &payload[..1448]);
    let before = rig.daemon.stats();

    let guest_csum = reset(&mut fe);

    let fresh = marked(GUEST_MAC, rig.peer_mac, 0x500);
    peer.send_vectored(&[
        std::io::IoSlice::new(&[0u8; 12]),
        std::io::IoSlice::new(&fresh),
    ])
    .unwrap();
    let mut got = Vec::new();
    loop {
        let p = fe.recv(T).expect("the fresh frame never came");
        if !guest_csum {
            assert_eq!(
                p.hdr().flags & vhdr::F_NEEDS_CSUM,
                0,
                "NEEDS_CSUM for a guest without GUEST_CSUM"
            );
        }
        if p.frame == fresh {
            break;
        }
        got.push(p.frame.len());
    }
    assert!(
        got.is_empty(),
        "segments of the old frame reached the guest: {got:?}"
    );
    let after = rig.daemon.stats();
    assert_eq!(
        after["rx.drops.disabled"] - before["rx.drops.disabled"],
        13,
        "the 13 undelivered segments are counted: {after:?}"
    );
}

#[test]
fn h_a_ring_restart_drops_a_half_delivered_gso_frame() {
    pending_segments_do_not_survive(|fe| {
        // The new driver has neither TSO nor checksum offload.
        let features = GUEST_FEATURES
            & !(feat::GUEST_TSO4
                | feat::GUEST_TSO6
                | feat::GUEST_ECN
                | feat::GUEST_UFO
                | feat::GUEST_CSUM);
        fe.restart_rings(FrontendConfig {
            features,
            ..FrontendConfig::default()
        });
        fe.post_rx_buffers(64, 1536);
        fe.set_rx_autorefill(true);
        fe.kick_rx();
        false
    });
}

#[test]
fn i_disabling_the_rx_ring_drops_a_half_delivered_gso_frame() {
    pending_segments_do_not_survive(|fe| {
        fe.set_queue_enabled(Queue::Rx, false);
        fe.set_queue_enabled(Queue::Rx, true);
        fe.post_rx_buffers(64, 1536);
        fe.set_rx_autorefill(true);
        fe.kick_rx();
        true
    });
}

#[test]
fn sigterm_exits_promptly_and_removes_the_socket() {
    let Some(rig) = rig(&[]) else { return };
    let socket = rig.daemon.socket.clone();
    let _fe = guest(&rig, GUEST_FEATURES, &[(8, 1536)]);
    let started = std::time::Instant::now();
    let (status, log) = rig.daemon.terminate();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        started.elapsed()
    );
    assert!(!socket.exists(), "socket file removed");
    assert!(
        log.contains("exit: queue pair 0: rx packets="),
        "counters logged at exit:\n{log}"
    );
}

#[test]
fn forced_ten_byte_socket_header_inserts_and_strips_num_buffers() {
    // What a kernel without PACKET_VNET_HDR_SZ offers: PACKET_VNET_HDR (10 bytes) with a
    // 12-byte guest header.
    let Some(rig) = rig(&["--vnet-hdr", "10"]) else {
        return;
    };
    assert!(
        rig.daemon.log().contains("10-byte PACKET_VNET_HDR"),
        "{}",
        rig.daemon.log()
    );
    let mut fe = guest(&rig, GUEST_FEATURES, &[(300, 1536), (200, 4096)]);
    assert_eq!(fe.header_len(), 12);
    tso_frame_to_kernel_listener(&rig, &mut fe);
    let r = peer_bulk_flow(&rig, &mut fe, 2 << 20);
    assert!(r.gso_frames > 0 && r.multi_buffer > 0, "{r:?}");
    ping(&mut fe, rig.peer_mac, 1);
}

#[test]
fn legacy_guest_without_version_1_uses_ten_byte_headers() {
    let Some(rig) = rig(&[]) else { return };
    // disable-modern=on, mrg_rxbuf=off: 10-byte headers, "big packets" buffers.
    let features = GUEST_FEATURES & !(feat::VERSION_1 | feat::MRG_RXBUF);
    let mut fe = guest(&rig, features, &[(64, 65562)]);
    assert_eq!(fe.header_len(), 10);
    ping(&mut fe, rig.peer_mac, 1);
    tso_frame_to_kernel_listener(&rig, &mut fe);
    let r = peer_bulk_flow(&rig, &mut fe, 2 << 20);
    assert!(r.gso_frames > 0, "{r:?}");
    assert_eq!(
        r.multi_buffer, 0,
        "without MRG_RXBUF a frame uses one chain"
    );
}

#[test]
fn without_mrg_rxbuf_frames_use_one_big_chain() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES & !feat::MRG_RXBUF, &[(64, 65562)]);
    assert_eq!(fe.header_len(), 12);
    let r = peer_bulk_flow(&rig, &mut fe, 2 << 20);
    assert!(r.gso_frames > 0 && r.max_frame > 4096, "{r:?}");
    assert_eq!(r.max_num_buffers, 1);
}

#[test]
fn rx_starts_when_the_ring_is_enabled_even_without_a_kick() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.try_negotiate(GUEST_FEATURES).unwrap();
    fe.try_setup_memory(64 << 20).unwrap();
    fe.try_setup_rings(256).unwrap();
    // Buffers are there before the rings are enabled, and the guest never kicks RX: a driver
    // that posted its buffers to a previous backend instance behaves like this.
    fe.post_rx_buffers(64, 1536);
    fe.try_enable_rings(true).unwrap();
    let cap = peer_socket(&rig);
    let frame = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(500, 4));
    cap.send_vectored(&[
        std::io::IoSlice::new(&[0u8; 12]),
        std::io::IoSlice::new(&frame),
    ])
    .unwrap();
    let p = recv_matching(&mut fe, |f| f == &frame[..]).expect("frame delivered with no RX kick");
    assert_eq!(p.num_buffers, 1);
    assert_eq!(fe.rx_kicks(), 0, "the test frontend never kicked RX");
}

#[test]
fn busy_polling_sends_without_kicks_then_asks_for_them_again() {
    // Polling for the longest window the option allows, one second after the last frame: every
    // frame below follows the one before within milliseconds, so even a loaded machine keeps
    // them inside it.
    let Some(rig) = rig(&["--busy-poll-us", "1000000"]) else {
        return;
    };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
    assert!(fe.has_feature(feat::EVENT_IDX));
    let cap = peer_socket(&rig);
    let h = plain_header(&fe);
    let frame = |i: u32| ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, i));
    // The first frame is kicked: that wakes the worker, which then polls.
    send_frame(&mut fe, &h, &frame(0));
    capture(&cap, |f| f == &frame(0)[..]).expect("the kicked frame");
    for i in 1..=20 {
        fe.send(&h, &frame(i), TxLayout::Combined);
        assert!(
            !fe.kick_tx_if_needed(),
            "frame {i}: a polling worker does not ask for kicks"
        );
        assert_eq!(fe.wait_tx_used(1, T).len(), 1, "frame {i} sent unkicked");
        capture(&cap, |f| f == &frame(i)[..]).unwrap_or_else(|| panic!("frame {i} at the peer"));
    }
    // Idle: the worker stops polling and asks for a kick at the next frame again.
    let deadline = std::time::Instant::now() + 2 * T;
    while fe.avail_event(Queue::Tx) != fe.avail_idx(Queue::Tx) {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never asked for kicks again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fe.send(&h, &frame(21), TxLayout::Combined);
    assert!(
        fe.kick_tx_if_needed(),
        "the guest kicks once polling stopped"
    );
    assert_eq!(fe.wait_tx_used(1, T).len(), 1);
    capture(&cap, |f| f == &frame(21)[..]).expect("the frame after polling stopped");
}

#[test]
fn tx_backpressure_loses_nothing() {
    let Some(rig) = rig(&[]) else { return };
    // A qdisc that holds everything: queued frames keep the socket's send buffer full, so the
    // backend must see EAGAIN and wait instead of dropping. Once it has, the qdisc lets go.
    let tbf = |rate: &str, op: &str| {
        let out = rig.host.exec(&[
            "tc", "qdisc", op, "dev", "vh0", "root", "tbf", "rate", rate, "burst", "64k", "limit",
            "100mb",
        ]);
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tbf("1kbit", "add");
    let mut fe = guest(&rig, GUEST_FEATURES, &[(16, 1536)]);
    let cap = peer_socket(&rig);
    const N: u32 = 8_000; // 11 MB: more than the 8 MiB send buffer
    let seen = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut seqs = Vec::with_capacity(N as usize);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut buf = vec![0u8; 4096];
            while seqs.len() < N as usize && std::time::Instant::now() < deadline {
                match cap.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
                    Ok(r)
                        if r.len >= 12 + 18
                            && buf[12 + 12..12 + 14] == ETH_EXPERIMENTAL.to_be_bytes() =>
                    {
                        seqs.push(u32::from_be_bytes(buf[26..30].try_into().unwrap()));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Err(e) => panic!("capture: {e}"),
                }
            }
            seqs
        });
        let release = s.spawn(|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while rig.daemon.stats()["tx.backpressure"] == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the send buffer never filled up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // Fast enough to finish soon, slow enough for the capture below to keep up.
            tbf("200mbit", "change");
        });
        let h = plain_header(&fe);
        let mut payload = pattern(1400, 5);
        let mut sent = 0u32;
        while sent < N {
            while sent < N {
                payload[..4].copy_from_slice(&sent.to_be_bytes());
                let frame = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &payload);
                if fe.try_send(&h, &frame, TxLayout::Combined).is_none() {
                    break;
                }
                sent += 1;
            }
            fe.kick_tx();
            fe.wait_tx_used(1, Duration::from_secs(60));
        }
        while fe.tx_outstanding() > 0 {
            assert!(
                !fe.wait_tx_used(1, Duration::from_secs(60)).is_empty(),
                "TX stalled with {} chains outstanding",
                fe.tx_outstanding()
            );
        }
        release.join().unwrap();
        reader.join().unwrap()
    });
    let s = rig.daemon.stats();
    eprintln!(
        "backpressure: {} frames sent, peer saw {}, counters {s:?}",
        N,
        seen.len()
    );
    let (_, capture_drops) = cap.drops().unwrap();
    assert_eq!(
        capture_drops, 0,
        "the test's own capture socket overflowed: it proves nothing"
    );
    assert!(s["tx.backpressure"] > 0, "{s:?}");
    assert_eq!(s["tx.packets"], u64::from(N), "{s:?}");
    assert_eq!(s["tx.drops.kernel"], 0, "{s:?}");
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every frame arrived, in order"
    );
}

/// One GSO kind: how to build its frame and the feature bit that governs it per direction.
struct GsoCase {
    name: &'static str,
    gso_type: u8,
    l3: L3,
    proto: u8,
    tcp_flags: u8,
    gso_size: u16,
    guest_bit: u64,
    host_bit: u64,
}

const TCP_CWR: u8 = 0x80;

fn gso_cases() -> Vec<GsoCase> {
    let tcp = |name, gso_type, l3, tcp_flags, guest_bit, host_bit| GsoCase {
        name,
        gso_type,
        l3,
        proto: 6,
        tcp_flags,
        // The MSS a 1500-byte MTU allows: 1460 minus 12 for timestamps over IPv4, 1440 over IPv6.
        gso_size: if l3 == L3::V6 { 1440 } else { 1448 },
        guest_bit,
        host_bit,
    };
    let mut cases = vec![
        tcp(
            "TCPv4",
            vhdr::GSO_TCPV4,
            L3::V4,
            TCP_ACK,
            feat::GUEST_TSO4,
            feat::HOST_TSO4,
        ),
        tcp(
            "TCPv6",
            vhdr::GSO_TCPV6,
            L3::V6,
            TCP_ACK,
            feat::GUEST_TSO6,
            feat::HOST_TSO6,
        ),
        tcp(
            "TCPv4+ECN",
            vhdr::GSO_TCPV4 | vhdr::GSO_ECN,
            L3::V4,
            TCP_ACK | TCP_CWR,
            feat::GUEST_ECN,
            feat::HOST_ECN,
        ),
    ];
    for (name, l3, guest_bit) in [
        ("UDPv4 (USO)", L3::V4, feat::GUEST_USO4),
        ("UDPv6 (USO)", L3::V6, feat::GUEST_USO6),
    ] {
        cases.push(GsoCase {
            name,
            gso_type: vhdr::GSO_UDP_L4,
            l3,
            proto: 17,
            tcp_flags: 0,
            gso_size: 1400,
            guest_bit,
            host_bit: feat::HOST_USO,
        });
    }
    cases
}

const ALL_OFFLOADS: u64 = GUEST_FEATURES | feat::GUEST_USO4 | feat::GUEST_USO6 | feat::HOST_USO;

#[test]
fn every_gso_kind_reaches_exactly_the_guests_that_negotiated_it() {
    let Some(rig) = rig(&[]) else { return };
    let offered = TestFrontend::connect(&rig.daemon.socket, T).backend_features();
    let peer = peer_socket(&rig);
    for (n, case) in gso_cases().into_iter().enumerate() {
        if offered & case.guest_bit == 0 {
            // USO is offered only where the kernel takes it; the probe said no here.
            assert_eq!(
                case.gso_type,
                vhdr::GSO_UDP_L4,
                "{} must be offered",
                case.name
            );
            eprintln!("{}: not offered by this kernel", case.name);
            continue;
        }
        for with in [true, false] {
            let features = if with {
                ALL_OFFLOADS
            } else {
                ALL_OFFLOADS & !case.guest_bit
            };
            let mut fe = guest(&rig, features, &[(128, 1536)]);
            let (frame, csum_start, hdr_len) = partial_csum_frame(
                (GUEST_MAC, rig.peer_mac),
                case.l3,
                case.proto,
                case.tcp_flags,
                &pattern(20000, 3),
            );
            let csum_offset = if case.proto == 6 { 16 } else { 6 };
            let h = vnet_header(
                vhdr::F_NEEDS_CSUM,
                case.gso_type,
                hdr_len,
                case.gso_size,
                csum_start,
                csum_offset,
                0,
                12,
            );
            let before = rig.daemon.stats();
            peer.send_vectored(&[std::io::IoSlice::new(&h), std::io::IoSlice::new(&frame)])
                .unwrap();
            // A plain frame after it shows the queue kept flowing either way.
            let marker = ethernet(
                GUEST_MAC,
                rig.peer_mac,
                ETH_EXPERIMENTAL,
                &pattern(64, 200 + 2 * n as u32 + u32::from(with)),
            );
            peer.send_vectored(&[
                std::io::IoSlice::new(&[0u8; 12]),
                std::io::IoSlice::new(&marker),
            ])
            .unwrap();
            // Everything up to the marker: the GSO frame whole, or its segments.
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + T;
            loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}: the marker never came",
                    case.name
                );
                let Some(p) = fe.recv(Duration::from_millis(100)) else {
                    continue;
                };
                if p.frame == marker {
                    break;
                }
                got.push(p);
            }
            let after = rig.daemon.stats();
            let delta = |k: &str| after[k] - before[k];
            assert_eq!(
                delta("rx.drops.offload"),
                0,
                "{}: nothing dropped",
                case.name
            );
            if with {
                assert_eq!(got.len(), 1, "{}: one GSO frame", case.name);
                let hdr = got[0].hdr();
                assert_eq!(got[0].frame, frame, "{}", case.name);
                assert_eq!(
                    (hdr.gso_type, hdr.gso_size),
                    (case.gso_type, case.gso_size),
                    "{}",
                    case.name
                );
                assert_eq!(
                    hdr.flags & vhdr::F_NEEDS_CSUM,
                    vhdr::F_NEEDS_CSUM,
                    "{}",
                    case.name
                );
                assert_eq!(delta("rx.segmented"), 0, "{}", case.name);
            } else {
                // Never the GSO frame itself: its segments, made in software.
                let want = 20000usize.div_ceil(usize::from(case.gso_size));
                assert_eq!(got.len(), want, "{}: one packet per segment", case.name);
                let mut payload = Vec::new();
                for p in &got {
                    let hdr = p.hdr();
                    assert_eq!(hdr.gso_type, 0, "{}: no GSO metadata", case.name);
                    assert!(
                        p.frame.len() <= 1514,
                        "{}: {} bytes",
                        case.name,
                        p.frame.len()
                    );
                    payload.extend_from_slice(&p.frame[usize::from(hdr_len)..]);
                }
                assert!(
                    payload == pattern(20000, 3),
                    "{}: segments carry the payload in order",
                    case.name
                );
                assert_eq!(delta("rx.segmented"), 1, "{}", case.name);
            }
            drop(fe);
            rig.daemon.wait_for_log_count(
                "frontend disconnected",
                rig.daemon.log().matches("frontend connected").count(),
                T,
            );
        }
    }
}

#[test]
fn every_gso_kind_from_the_guest_leaves_only_when_negotiated() {
    let Some(rig) = rig(&[]) else { return };
    let cap = peer_socket(&rig);
    let offered = TestFrontend::connect(&rig.daemon.socket, T).backend_features();
    for (n, case) in gso_cases().into_iter().enumerate() {
        if offered & case.host_bit == 0 {
            assert_eq!(
                case.gso_type,
                vhdr::GSO_UDP_L4,
                "{} must be offered",
                case.name
            );
            continue;
        }
        for with in [true, false] {
            let features = if with {
                ALL_OFFLOADS
            } else {
                ALL_OFFLOADS & !case.host_bit
            };
            let mut fe = guest(&rig, features, &[(16, 1536)]);
            let (frame, csum_start, hdr_len) = partial_csum_frame(
                (rig.peer_mac, GUEST_MAC),
                case.l3,
                case.proto,
                case.tcp_flags,
                &pattern(20000, 4),
            );
            let csum_offset = if case.proto == 6 { 16 } else { 6 };
            let h = vnet_header(
                vhdr::F_NEEDS_CSUM,
                case.gso_type,
                hdr_len,
                case.gso_size,
                csum_start,
                csum_offset,
                0,
                12,
            );
            let before = rig.daemon.stats();
            send_frame(&mut fe, &h, &frame);
            // A marker unique to this round: everything before it belongs to this round.
            let marker = ethernet(
                rig.peer_mac,
                GUEST_MAC,
                ETH_EXPERIMENTAL,
                &pattern(64, 100 + 2 * n as u32 + u32::from(with)),
            );
            let plain = plain_header(&fe);
            send_frame(&mut fe, &plain, &marker);
            // The peer's capture sees the GSO frame whole (veth passes GSO skbs on), then the marker.
            let mut gso_seen = false;
            capture(&cap, |f| {
                gso_seen |= f == &frame[..];
                f == &marker[..]
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} (with: {with}): the marker never arrived; counters {:?}",
                    case.name,
                    rig.daemon.stats()
                )
            });
            let after = rig.daemon.stats();
            let refused = after["tx.drops.unnegotiated"] - before["tx.drops.unnegotiated"];
            if with {
                assert!(
                    gso_seen,
                    "{}: the GSO frame leaves through the interface",
                    case.name
                );
                assert_eq!(refused, 0, "{}", case.name);
                assert_eq!(after["tx.gso"] - before["tx.gso"], 1, "{}", case.name);
            } else {
                assert!(
                    !gso_seen,
                    "{}: a frame with an unnegotiated GSO type never leaves",
                    case.name
                );
                assert_eq!(refused, 1, "{}: counted", case.name);
            }
            drop(fe);
            rig.daemon.wait_for_log_count(
                "frontend disconnected",
                rig.daemon.log().matches("frontend connected").count(),
                T,
            );
        }
    }
}

/// Sends a raw vhost-user `SET_VRING_ENABLE` (request 18) with the given flags.
fn raw_vring_enable(stream: &mut std::os::unix::net::UnixStream, index: u32, on: u32, flags: u32) {
    let payload: Vec<u8> = [index, on].iter().flat_map(|w| w.to_le_bytes()).collect();
    raw_message(stream, 18, flags, &payload);
}

#[test]
fn vring_enable_before_set_features_as_qemu_sends_it() {
    // QEMU's virtio-net enables the rings when it resets the device, before the guest driver
    // negotiates: SET_VRING_ENABLE arrives before SET_FEATURES. vhost 0.18 alone would end the
    // session there.
    let Some(rig) = rig(&[]) else { return };
    let mut stream = std::os::unix::net::UnixStream::connect(&rig.daemon.socket).unwrap();
    raw_vring_enable(&mut stream, 0, 1, 0x1);
    raw_vring_enable(&mut stream, 1, 1, 0x1);
    // And one asking for an acknowledgement (REPLY_ACK style): it must get one.
    raw_vring_enable(&mut stream, 1, 1, 0x1 | 0x8);
    let mut reply = [0u8; 20];
    stream.set_read_timeout(Some(T)).unwrap();
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0..4], 18u32.to_le_bytes(), "a SET_VRING_ENABLE reply");
    assert_eq!(reply[4..8], 0x5u32.to_le_bytes(), "version | reply");
    assert_eq!(reply[12..20], 0u64.to_le_bytes(), "success");
    stream.set_read_timeout(None).unwrap();
    full_setup_pings(&rig, stream);
}

/// A full setup on a connection that so far took raw messages, then a ping both ways; the
/// connection must stay up throughout.
fn full_setup_pings(rig: &Rig, stream: std::os::unix::net::UnixStream) {
    let mut fe = TestFrontend::from_stream(stream);
    fe.start(FrontendConfig {
        features: GUEST_FEATURES,
        queue_size: 256,
        mem_size: 64 << 20,
    });
    fe.post_rx_buffers(64, 1536);
    fe.set_rx_autorefill(true);
    fe.kick_rx();
    ping(&mut fe, rig.peer_mac, 1);
    assert!(
        !rig.daemon.log().contains("connection ended"),
        "{}",
        rig.daemon.log()
    );
}

// ---- protocol: RESET_OWNER ----------------------------------------------------------------

#[test]
fn vring_enable_after_reset_owner_and_before_set_features_is_answered() {
    // RESET_OWNER makes the request handler forget the acked features, PROTOCOL_FEATURES
    // among them. The relay must forget them too: a SET_VRING_ENABLE before the next
    // SET_FEATURES is then an early one, answered by the relay, not forwarded to a handler
    // that refuses it and ends the session.
    let Some(rig) = rig(&[]) else { return };
    let mut stream = std::os::unix::net::UnixStream::connect(&rig.daemon.socket).unwrap();
    raw_message(&mut stream, 3, 0x1, &[]); // SET_OWNER
    raw_message(&mut stream, 2, 0x1, &feat::PROTOCOL_FEATURES.to_le_bytes()); // SET_FEATURES
    raw_vring_enable(&mut stream, 1, 1, 0x1); // forwarded: PROTOCOL_FEATURES is acked
    let tx_on = "\"index\":0,\"rx_enabled\":false,\"tx_enabled\":true";
    let deadline = std::time::Instant::now() + T;
    while !rig.daemon.stats_json().contains(tx_on) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(rig.daemon.stats_json().contains(tx_on), "TX ring enabled");
    raw_message(&mut stream, 4, 0x1, &[]); // RESET_OWNER
    raw_vring_enable(&mut stream, 0, 1, 0x1 | 0x8);
    let reply = raw_reply(&mut stream, T).unwrap_or_else(|| {
        panic!(
            "no reply to SET_VRING_ENABLE after RESET_OWNER: {}",
            rig.daemon.log()
        )
    });
    assert_eq!((reply.0, reply.1), (18, 0x5), "a SET_VRING_ENABLE reply");
    assert_eq!(reply.2, 0u64.to_le_bytes(), "success");
    // The reset reached the pairs: no ring enabled, no features acked (the relay resets the
    // backend before it forwards RESET_OWNER, so this holds once the reply came).
    let json = rig.daemon.stats_json();
    assert!(
        json.contains("\"acked_features\":null")
            && json.contains("\"index\":0,\"rx_enabled\":false,\"tx_enabled\":false"),
        "after RESET_OWNER: {json}"
    );
    // A full setup on the same connection then carries frames.
    full_setup_pings(&rig, stream);
}

// ---- protocol: SEND_RARP ----------------------------------------------------------------

#[test]
fn send_rarp_announces_the_guest_mac_on_the_interface_and_the_session_goes_on() {
    // QEMU sends SEND_RARP on the destination after a migration when the guest cannot
    // announce itself (no GUEST_ANNOUNCE). vhost 0.18's handler has no case for it and would
    // end the session. Without --mac, the announced MAC becomes the guest's.
    let Some(rig) = rig_with_mac(None, &[]) else {
        return;
    };
    let peer = peer_socket(&rig);
    let mut stream = std::os::unix::net::UnixStream::connect(&rig.daemon.socket).unwrap();
    let mut mac_payload = GUEST_MAC.to_vec();
    mac_payload.extend_from_slice(&[0, 0]);
    let send_rarp = |stream: &mut std::os::unix::net::UnixStream, payload: &[u8]| {
        raw_message(stream, 19, 0x1 | 0x8, payload);
        let reply = raw_reply(stream, T)
            .unwrap_or_else(|| panic!("no reply to SEND_RARP: {}", rig.daemon.log()));
        assert_eq!((reply.0, reply.1), (19, 0x5), "a SEND_RARP reply");
        u64::from_le_bytes(reply.2.try_into().expect("a u64 reply"))
    };
    // No SET_OWNER: the test frontend sends it in the full setup below, and only once.
    assert_eq!(
        send_rarp(&mut stream, &mac_payload),
        1,
        "refused before PROTOCOL_FEATURES is acked"
    );
    raw_message(&mut stream, 2, 0x1, &feat::PROTOCOL_FEATURES.to_le_bytes()); // SET_FEATURES
    assert_eq!(send_rarp(&mut stream, &[1, 2, 3, 4]), 1, "no MAC: refused");
    assert_eq!(send_rarp(&mut stream, &mac_payload), 0, "announced");

    // Broadcast, from the MAC, a RARP reverse request (3) for it, padded to 60 bytes.
    let mut want = vec![0xff; 6];
    want.extend_from_slice(&GUEST_MAC);
    want.extend_from_slice(&[0x80, 0x35, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]);
    want.extend_from_slice(&GUEST_MAC);
    want.extend_from_slice(&[0; 4]);
    want.extend_from_slice(&GUEST_MAC);
    want.extend_from_slice(&[0; 4]);
    want.resize(60, 0);
    let got = capture(&peer, |f| f.get(12..14) == Some(&[0x80, 0x35]))
        .unwrap_or_else(|| panic!("no RARP frame on the peer: {}", rig.daemon.log()));
    assert_eq!(got, want);
    let json = rig.daemon.stats_json();
    assert!(
        json.contains(&format!("\"guest_mac\":\"{}\"", format_mac(&GUEST_MAC))),
        "the announced MAC is the guest's: {json}"
    );
    full_setup_pings(&rig, stream);
}

/// `frame` with an 802.1Q tag (VID `vid`) after the MAC addresses.
fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

#[test]
fn vlan_tags_the_interface_strips_are_put_back() {
    let Some(rig) = rig(&[]) else { return };
    let peer = peer_socket(&rig);
    for guest_csum in [true, false] {
        let features = if guest_csum {
            GUEST_FEATURES
        } else {
            GUEST_FEATURES
                & !(feat::GUEST_CSUM | feat::GUEST_TSO4 | feat::GUEST_TSO6 | feat::GUEST_ECN)
        };
        let mut fe = guest(&rig, features, &[(64, 1536)]);
        // A plain tagged frame, byte for byte.
        let plain = tagged(
            &ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(300, 1)),
            42,
        );
        peer.send_vectored(&[
            std::io::IoSlice::new(&[0u8; 12]),
            std::io::IoSlice::new(&plain),
        ])
        .unwrap();
        let p = recv_matching(&mut fe, |f| {
            f.len() == plain.len() && f[12..14] == [0x81, 0x00]
        })
        .expect("tagged frame arrives");
        assert_eq!(p.frame, plain, "the guest sees the tag the kernel stripped");

        // A tagged TCP segment with a partial checksum: csum_start counts the tag.
        let (untagged, _, _) = partial_csum_frame(
            (GUEST_MAC, rig.peer_mac),
            L3::V4,
            6,
            TCP_ACK,
            &pattern(700, 2),
        );
        let frame = tagged(&untagged, 42);
        let h = vnet_header(vhdr::F_NEEDS_CSUM, 0, 0, 0, 38, 16, 0, 12);
        peer.send_vectored(&[std::io::IoSlice::new(&h), std::io::IoSlice::new(&frame)])
            .unwrap();
        let p = recv_matching(&mut fe, |f| f.len() == frame.len() && f[16..18] == [8, 0])
            .expect("tagged TCP frame arrives");
        assert_eq!(p.frame[..16], frame[..16], "tag in place");
        let inner: Vec<u8> = p.frame[..12]
            .iter()
            .chain(&p.frame[16..])
            .copied()
            .collect();
        if guest_csum {
            let hdr = p.hdr();
            assert_eq!(
                (hdr.flags, hdr.csum_start, hdr.csum_offset),
                (vhdr::F_NEEDS_CSUM, 38, 16)
            );
            assert_eq!(p.frame, frame, "partial checksum left to the guest");
        } else {
            assert_eq!(p.hdr().flags, 0);
            assert_eq!(
                ipv4_l4_checksums_ok(&inner),
                Some(true),
                "checksum completed in software behind the tag"
            );
        }
        drop(fe);
        rig.daemon.wait_for_log_count(
            "frontend disconnected",
            rig.daemon.log().matches("frontend connected").count(),
            T,
        );
    }
}

#[test]
fn a_tagged_frame_waits_for_room_for_the_tag_the_interface_stripped() {
    // The socket reports the frame's length without the tag the interface stripped; the guest
    // gets it back. Buffers summing to exactly frame + header without the tag are 4 bytes short:
    // a mergeable guest must get the frame once it posts one more buffer, not lose it.
    let Some(rig) = rig(&[]) else { return };
    let peer = peer_socket(&rig);
    let mut fe = guest(&rig, GUEST_FEATURES, &[]);
    let frame = tagged(
        &ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(300, 7)),
        42,
    );
    let untagged = (frame.len() - 4) as u32;
    fe.post_rx(&[200]);
    fe.post_rx(&[untagged + 12 - 200]);
    fe.kick_rx();
    let before = rig.daemon.stats();
    peer.send_vectored(&[
        std::io::IoSlice::new(&[0u8; 12]),
        std::io::IoSlice::new(&frame),
    ])
    .unwrap();
    // Until the daemon has looked at the frame: it either drops it or, waiting for buffers,
    // asks for a kick beyond the two it has (EVENT_IDX avail_event).
    let deadline = std::time::Instant::now() + T;
    let after = loop {
        let s = rig.daemon.stats();
        if s["rx.drops.oversize"] > before["rx.drops.oversize"]
            || fe.avail_event(Queue::Rx) == fe.avail_idx(Queue::Rx)
            || std::time::Instant::now() > deadline
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        after["rx.drops.oversize"] - before["rx.drops.oversize"],
        0,
        "the frame waits for buffers instead of being dropped as oversize"
    );
    fe.post_rx(&[64]);
    fe.kick_rx();
    let p = recv_matching(&mut fe, |f| f.len() == frame.len())
        .expect("the tagged frame arrives after one more buffer");
    assert_eq!(p.frame, frame, "byte for byte, tag put back");
}

#[test]
fn guests_send_only_from_their_own_mac_unless_allowed() {
    for allow in [false, true] {
        let extra: &[&str] = if allow {
            &["--allow-mac-spoofing"]
        } else {
            &[]
        };
        let Some(rig) = rig(extra) else { return };
        let mut fe = guest(&rig, GUEST_FEATURES, &[(16, 1536)]);
        let cap = peer_socket(&rig);
        let spoofed = ethernet(
            rig.peer_mac,
            [0x02, 0, 0, 0, 0, 0x99],
            ETH_EXPERIMENTAL,
            &pattern(100, 1),
        );
        let own = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 2));
        let h = plain_header(&fe);
        send_frame(&mut fe, &h, &spoofed);
        send_frame(&mut fe, &h, &own);
        let mut seen = Vec::new();
        capture(&cap, |f| {
            seen.push(f.to_vec());
            f == &own[..]
        })
        .expect("the guest's own frame goes out");
        let s = rig.daemon.stats();
        assert_eq!(
            seen.contains(&spoofed),
            allow,
            "spoofed frame sent only when allowed"
        );
        assert_eq!(s["tx.drops.spoofed"], u64::from(!allow), "{s:?}");
    }
}

#[test]
fn guests_receive_only_their_own_broadcast_and_multicast_frames_unless_promisc() {
    for promisc in [false, true] {
        let extra: &[&str] = if promisc { &["--promisc"] } else { &[] };
        let Some(rig) = rig(extra) else { return };
        let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
        let peer = peer_socket(&rig);
        let send = |dst: [u8; 6], seed: u32| {
            let f = ethernet(dst, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(80, seed));
            peer.send_vectored(&[std::io::IoSlice::new(&[0u8; 12]), std::io::IoSlice::new(&f)])
                .unwrap();
            f
        };
        let other = send([0x02, 0, 0, 0, 0, 0x77], 1);
        let bcast = send([0xff; 6], 2);
        let mcast = send([0x01, 0x00, 0x5e, 0, 0, 0x42], 3);
        let own = send(GUEST_MAC, 4);
        let mut got = Vec::new();
        while let Some(p) = recv_matching(&mut fe, |f| {
            f.len() > 14 && f[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
        }) {
            let done = p.frame == own;
            got.push(p.frame);
            if done {
                break;
            }
        }
        assert!(
            got.contains(&bcast) && got.contains(&mcast) && got.contains(&own),
            "promisc {promisc}"
        );
        assert_eq!(
            got.contains(&other),
            promisc,
            "a frame for another MAC only with --promisc"
        );
    }
}

/// Frames on a peer capture socket that satisfy `want`, until `window` passes.
fn capture_all(
    sock: &PacketSocket,
    window: Duration,
    mut want: impl FnMut(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    let deadline = std::time::Instant::now() + window;
    let mut buf = vec![0u8; 70000];
    let mut out = Vec::new();
    while std::time::Instant::now() < deadline {
        match sock.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
            Ok(r) => {
                let frame = &buf[12..r.len.min(buf.len())];
                if want(frame) {
                    out.push(frame.to_vec());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("capture: {e}"),
        }
    }
    out
}

/// An experimental-EtherType frame whose first four payload bytes are `marker`.
fn marked(dst: [u8; 6], src: [u8; 6], marker: u32) -> Vec<u8> {
    let mut payload = marker.to_be_bytes().to_vec();
    payload.extend_from_slice(&pattern(60, marker));
    ethernet(dst, src, ETH_EXPERIMENTAL, &payload)
}

fn marker(frame: &[u8]) -> Option<u32> {
    (frame.len() >= 18 && frame[12..14] == ETH_EXPERIMENTAL.to_be_bytes())
        .then(|| u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]]))
}

#[test]
fn a_disabled_pair_receives_nothing_and_discards_what_the_guest_sends() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    ping(&mut fe, rig.peer_mac, 1);
    let cap = peer_socket(&rig);
    let sent_before = rig.daemon.stats()["tx.packets"];

    fe.set_pair_enabled(0, false);
    // TX on the disabled ring: every chain comes back, nothing leaves.
    let h = plain_header(&fe);
    for m in 0..5 {
        fe.send(
            &h,
            &marked(rig.peer_mac, GUEST_MAC, 0x100 + m),
            TxLayout::Combined,
        );
    }
    fe.kick_tx();
    assert_eq!(fe.wait_tx_used(5, T).len(), 5, "the chains are consumed");
    // RX: what the peer sends meanwhile is not delivered.
    for m in 0..3 {
        let f = marked(GUEST_MAC, rig.peer_mac, 0x200 + m);
        cap.send_vectored(&[std::io::IoSlice::new(&[0u8; 12]), std::io::IoSlice::new(&f)])
            .unwrap();
    }
    let leaked = capture_all(&cap, Duration::from_millis(300), |f| marker(f).is_some());
    assert!(
        leaked.is_empty(),
        "frames of a disabled pair left: {leaked:?}"
    );
    assert!(
        fe.recv(Duration::from_millis(300)).is_none(),
        "delivered while disabled"
    );
    let s = rig.daemon.stats();
    assert_eq!(s["tx.drops.disabled"], 5, "{s:?}");
    assert_eq!(s["tx.packets"], sent_before, "{s:?}");

    // Enabled again: what came while it was off is thrown away, new traffic flows.
    fe.set_pair_enabled(0, true);
    let fresh = marked(GUEST_MAC, rig.peer_mac, 0x300);
    cap.send_vectored(&[
        std::io::IoSlice::new(&[0u8; 12]),
        std::io::IoSlice::new(&fresh),
    ])
    .unwrap();
    let p = recv_matching(&mut fe, |f| marker(f).is_some()).expect("traffic after enabling");
    assert_eq!(
        marker(&p.frame),
        Some(0x300),
        "the first frame is the fresh one"
    );
    ping(&mut fe, rig.peer_mac, 2);
    let s = rig.daemon.stats();
    assert!(s["rx.drops.disabled"] >= 3, "{s:?}");
    send_frame(&mut fe, &h, &marked(rig.peer_mac, GUEST_MAC, 0x400));
    assert_eq!(
        capture_all(&cap, Duration::from_millis(300), |f| marker(f).is_some())
            .iter()
            .map(|f| marker(f))
            .collect::<Vec<_>>(),
        [Some(0x400)]
    );
}

// ---- Operations: a worker that fails, the interface going away, its MTU changing ----

/// Polls until the backend has ended the frontend's connection (a request fails).
fn wait_disconnected(fe: &mut TestFrontend) -> bool {
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        if fe.try_get_config(0, 12).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The MTU the device's config space offers.
fn config_mtu(fe: &mut TestFrontend) -> u16 {
    let cfg = fe.get_config(0, 12);
    u16::from_le_bytes([cfg[10], cfg[11]])
}

#[test]
fn a_worker_that_fails_ends_the_connection_and_the_frontend_is_served_again() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
    ping(&mut fe, rig.peer_mac, 1);
    // A frontend that never reads its TX call eventfd: the worker's next signal fails (EAGAIN).
    fe.raw_fill_call(Queue::Tx);
    let frame = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 1));
    let h = plain_header(&fe);
    fe.send(&h, &frame, TxLayout::Combined);
    fe.kick_tx();
    assert!(
        wait_disconnected(&mut fe),
        "the connection outlived its failed worker:\n{}",
        rig.daemon.log()
    );
    rig.daemon
        .wait_for_log("queue pair 0: the worker failed signalling the guest", T);
    let s = rig.daemon.stats();
    assert_eq!(s["tx.worker_errors"], 1, "{s:?}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-packet"))
        .args(["stats", "--socket", rig.daemon.socket.to_str().unwrap()])
        .output()
        .expect("run vhost-packet stats");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["tx", "worker_errors", "1"]),
        "vhost-packet stats shows the failure:\n{table}"
    );
    drop(fe);
    // The next connection (QEMU's reconnect=N) is served.
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
    ping(&mut fe, rig.peer_mac, 2);
}

/// Deletes the veth under the daemon (with a frontend connected or none) and expects it to
/// exit non-zero with one clear line, its sockets removed.
fn deleting_the_interface_ends_the_daemon(with_frontend: bool) {
    let Some(mut rig) = rig(&[]) else { return };
    let fe = with_frontend.then(|| {
        let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
        ping(&mut fe, rig.peer_mac, 1);
        fe
    });
    let out = rig.host.ip(&["-o", "link", "show", "dev", "vh0"]);
    let ifindex: u32 = String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("ifindex of vh0");
    // The guest stays idle: nothing is sent or received that could notice.
    rig.peer.ip(&["link", "del", "dev", "vp0"]);
    let Some((status, log)) = rig.daemon.wait_exit(T) else {
        panic!(
            "vhost-packet still runs {T:?} after vh0 was deleted:\n{}",
            rig.daemon.log()
        );
    };
    assert!(!status.success(), "exit status {status}:\n{log}");
    let line = format!(
        "interface vh0 disappeared (ifindex {ifindex}): exiting so the service manager restarts it"
    );
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    assert!(!rig.daemon.socket.exists(), "the socket is removed");
    drop(fe);
}

#[test]
fn the_daemon_exits_when_its_interface_disappears_under_a_connected_frontend() {
    deleting_the_interface_ends_the_daemon(true);
}

#[test]
fn the_daemon_exits_when_its_interface_disappears_with_no_frontend() {
    deleting_the_interface_ends_the_daemon(false);
}

#[test]
fn an_mtu_change_is_logged_its_drops_counted_and_the_next_guest_offered_it() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
    assert_eq!(config_mtu(&mut fe), 1500);
    rig.host.set_mtu("vh0", 1400);
    rig.daemon
        .wait_for_log("MTU of vh0 changed from 1500 to 1400", T);
    // The connected guest keeps the 1500 it was given: a full-size frame is dropped, counted.
    let h = plain_header(&fe);
    let full = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(1500, 1));
    send_frame(&mut fe, &h, &full);
    let s = rig.daemon.stats();
    assert_eq!(s["tx.drops.oversize"], 1, "{s:?}");
    fe.stop();
    // The next connection is offered the new MTU, and traffic flows.
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
    assert_eq!(config_mtu(&mut fe), 1400);
    ping(&mut fe, rig.peer_mac, 1);
    // Raising it is followed too.
    rig.host.set_mtu("vh0", 1500);
    rig.daemon
        .wait_for_log("MTU of vh0 changed from 1400 to 1500", T);
    fe.stop();
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 2048)]);
    assert_eq!(config_mtu(&mut fe), 1500);
}

/// The guest's MAC as `vhost-packet stats` reports it (JSON; `null` while learning).
fn reported_mac(rig: &Rig) -> String {
    let json = rig.daemon.stats_json();
    let at = json.find("\"guest_mac\":").expect("guest_mac in the stats") + 12;
    json[at..]
        .split(',')
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

fn mac_text(mac: [u8; 6]) -> String {
    vhost_packet::config::MacAddr(mac).to_string()
}

/// Sends `frames` from the peer, then a broadcast marker, and returns every experimental
/// frame the guest received up to the marker (the socket keeps their order, so a frame sent
/// before the marker that is not among them was not delivered).
fn delivered_before_marker(rig: &Rig, fe: &mut TestFrontend, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let peer = peer_socket(rig);
    let marker = ethernet(
        [0xff; 6],
        rig.peer_mac,
        ETH_EXPERIMENTAL,
        &pattern(90, 0xbc),
    );
    for f in frames.iter().chain([&marker]) {
        peer.send_vectored(&[std::io::IoSlice::new(&[0u8; 12]), std::io::IoSlice::new(f)])
            .unwrap();
    }
    let mut got = Vec::new();
    loop {
        let p = recv_matching(fe, |f| {
            f.len() > 14 && f[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
        })
        .expect("the broadcast marker reaches the guest");
        if p.frame == marker {
            return got;
        }
        got.push(p.frame);
    }
}

/// Without `--mac`, until the guest has sent anything its MAC is not known: it receives
/// broadcast and multicast, and no unicast at all, not even for the MAC the config space
/// suggests or the one it will turn out to have.
#[test]
fn before_its_mac_is_learned_the_guest_receives_broadcast_and_multicast_only() {
    let Some(rig) = rig_with_mac(None, &[]) else {
        return;
    };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    let suggested: [u8; 6] = fe.get_config(0, 6).try_into().unwrap();
    assert_eq!(
        suggested[0] & 0x03,
        0x02,
        "a locally administered unicast MAC"
    );
    let to = |dst: [u8; 6], seed| ethernet(dst, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(80, seed));
    let (for_suggested, for_guest, for_other) = (
        to(suggested, 1),
        to(GUEST_MAC, 2),
        to([0x02, 0, 0, 0, 0, 0x77], 3),
    );
    let (bcast, mcast) = (to([0xff; 6], 4), to([0x01, 0, 0x5e, 0, 0, 0x42], 5));
    let got = delivered_before_marker(
        &rig,
        &mut fe,
        &[
            for_suggested.clone(),
            for_guest.clone(),
            for_other.clone(),
            bcast.clone(),
            mcast.clone(),
        ],
    );
    assert!(
        !got.contains(&for_suggested),
        "before learning, a frame for the config space's MAC reached the guest"
    );
    assert!(!got.contains(&for_guest) && !got.contains(&for_other));
    assert!(got.contains(&bcast) && got.contains(&mcast), "{got:?}");
    assert_eq!(reported_mac(&rig), "null", "stats report no MAC yet");
}

/// Without `--mac` the first frame's source becomes the guest's MAC (logged once), and from
/// then on it is enforced exactly as `--mac` would: another source is dropped and counted,
/// unicast for it is delivered and for others not. A device reset (GET_VRING_BASE, then the
/// rings started again) and a new connection learn again.
/// The guest sends a frame from another source MAC, then one from `GUEST_MAC`: its own goes
/// out, the spoofed one never does.
fn spoofed_then_own_frame(
    rig: &Rig,
    fe: &mut TestFrontend,
    cap: &PacketSocket,
    h: &[u8],
    what: &str,
) {
    let spoofed = ethernet(
        rig.peer_mac,
        [0x02, 0, 0, 0, 0, 0x99],
        ETH_EXPERIMENTAL,
        &pattern(100, 2),
    );
    let own = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 3));
    send_frame(fe, h, &spoofed);
    send_frame(fe, h, &own);
    let mut seen = Vec::new();
    capture(cap, |f| {
        seen.push(f.to_vec());
        f == &own[..]
    })
    .unwrap_or_else(|| panic!("{what}: the guest's own frame goes out"));
    assert!(!seen.contains(&spoofed), "{what}: a spoofed frame went out");
}

#[test]
fn the_learned_mac_is_enforced_until_a_reset_or_the_next_connection() {
    let Some(rig) = rig_with_mac(None, &[]) else {
        return;
    };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    let cap = peer_socket(&rig);
    let h = plain_header(&fe);
    let own = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 1));
    send_frame(&mut fe, &h, &own);
    capture(&cap, |f| f == &own[..]).expect("the guest's first frame goes out");
    let learned = format!("guest MAC is {} (learned)", mac_text(GUEST_MAC));
    rig.daemon.wait_for_log(&learned, T);
    assert_eq!(reported_mac(&rig), mac_text(GUEST_MAC));

    spoofed_then_own_frame(&rig, &mut fe, &cap, &h, "after learning");
    assert_eq!(rig.daemon.stats()["tx.drops.spoofed"], 1);

    let to = |dst: [u8; 6], seed| ethernet(dst, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(80, seed));
    let (for_guest, for_other) = (to(GUEST_MAC, 4), to([0x02, 0, 0, 0, 0, 0x77], 5));
    let got = delivered_before_marker(&rig, &mut fe, &[for_other.clone(), for_guest.clone()]);
    assert_eq!(got, [for_guest], "only unicast for the learned MAC");

    // A device reset (the guest reboots): it may come back with another MAC.
    fe.restart_rings(FrontendConfig {
        features: GUEST_FEATURES,
        queue_size: 1024,
        mem_size: 64 << 20,
    });
    fe.post_rx_buffers(64, 1536);
    fe.kick_rx();
    let reset_mac = [0x02, 0, 0, 0, 0, 0x03];
    let first = ethernet(rig.peer_mac, reset_mac, ETH_EXPERIMENTAL, &pattern(100, 9));
    let old = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 10));
    for f in [&first, &old, &first] {
        send_frame(&mut fe, &h, f);
    }
    let mut seen = Vec::new();
    capture_all(&cap, Duration::from_millis(500), |f| {
        seen.push(f.to_vec());
        false
    });
    assert_eq!(
        seen.iter().filter(|f| **f == first).count(),
        2,
        "learned again after the reset"
    );
    assert!(
        !seen.contains(&old),
        "the MAC before the reset is enforced no more"
    );
    rig.daemon.wait_for_log(
        &format!("guest MAC is {} (learned)", mac_text(reset_mac)),
        T,
    );
    assert_eq!(rig.daemon.stats()["tx.drops.spoofed"], 2);

    // A new connection: its guest may have another MAC.
    drop(fe);
    rig.daemon.wait_for_log("frontend disconnected", T);
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    let other_mac = [0x02, 0, 0, 0, 0, 0x02];
    let first = ethernet(rig.peer_mac, other_mac, ETH_EXPERIMENTAL, &pattern(100, 6));
    let old = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 7));
    let second = ethernet(rig.peer_mac, other_mac, ETH_EXPERIMENTAL, &pattern(100, 8));
    let h = plain_header(&fe);
    for f in [&first, &old, &second] {
        send_frame(&mut fe, &h, f);
    }
    let mut seen = Vec::new();
    capture(&cap, |f| {
        seen.push(f.to_vec());
        f == &second[..]
    })
    .expect("the new guest's frames go out");
    assert!(
        seen.contains(&first) && !seen.contains(&old),
        "learned again"
    );
    rig.daemon.wait_for_log(
        &format!("guest MAC is {} (learned)", mac_text(other_mac)),
        T,
    );
    assert_eq!(rig.daemon.stats()["tx.drops.spoofed"], 3);
}

/// The unicast addresses the interface is asked to accept (`bridge fdb show dev vh0`: its
/// unicast list, kept even where the device turns promiscuous instead of filtering).
fn unicast_list(rig: &Rig) -> String {
    let out = rig.host.exec(&["bridge", "fdb", "show", "dev", "vh0"]);
    assert!(out.status.success(), "bridge fdb show: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            // Unicast: the I/G bit of the first octet is clear.
            u8::from_str_radix(&l[..2], 16).is_ok_and(|b| b & 1 == 0)
        })
        .map(|l| l.split_whitespace().next().unwrap().to_owned() + "\n")
        .collect()
}

/// SET_CONFIG changes the MAC (DPDK virtio-user with `mac=`, legacy drivers): the interface's
/// unicast list keeps only the current MAC (each one left behind takes a slot of the NIC's
/// filter until it falls back to promiscuous mode), the stats report it, and TX follows it.
/// The next connection starts from `--mac` again.
#[test]
fn a_mac_change_through_set_config_leaves_only_the_current_mac_on_the_interface() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;

    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(16, 1536)]);
    assert_eq!(unicast_list(&rig), "02:00:00:00:00:01\n");
    for last in [0x0a, 0x0b] {
        let mac = [0x02, 0, 0, 0, 0, last];
        fe.raw_frontend()
            .set_config(0, VhostUserConfigFlags::WRITABLE, &mac)
            .expect("SET_CONFIG of the MAC");
    }
    assert_eq!(fe.get_config(0, 6), [0x02, 0, 0, 0, 0, 0x0b]);
    assert_eq!(
        unicast_list(&rig),
        "02:00:00:00:00:0b\n",
        "the old MACs' memberships are gone"
    );
    assert_eq!(reported_mac(&rig), "02:00:00:00:00:0b");
    let cap = peer_socket(&rig);
    let h = plain_header(&fe);
    let new = ethernet(
        rig.peer_mac,
        [0x02, 0, 0, 0, 0, 0x0b],
        ETH_EXPERIMENTAL,
        &pattern(100, 1),
    );
    send_frame(&mut fe, &h, &new);
    capture(&cap, |f| f == &new[..]).expect("a frame from the new MAC goes out");
    drop(fe);
    rig.daemon.wait_for_log("frontend disconnected", T);
    let deadline = std::time::Instant::now() + T;
    while unicast_list(&rig) != "02:00:00:00:00:01\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            unicast_list(&rig)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reported_mac(&rig), "02:00:00:00:00:01");
}

/// The MAC belongs to the device, not to a queue pair: learned from a frame on pair 1, it is
/// enforced on pair 0's TX, and pair 0 (where frames that are not IP are steered) receives
/// unicast for it.
#[test]
fn a_mac_learned_on_one_queue_pair_holds_for_every_pair() {
    let Some(rig) = rig_with_mac(None, &["--queues", "2"]) else {
        return;
    };
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.set_queue_pairs(2);
    fe.start(FrontendConfig {
        features: GUEST_FEATURES,
        queue_size: 256,
        mem_size: 64 << 20,
    });
    for p in 0..2 {
        fe.select_pair(p);
        fe.post_rx_buffers(64, 2048);
        fe.kick_rx();
    }
    fe.set_rx_autorefill(true);
    let cap = peer_socket(&rig);
    fe.select_pair(1);
    let h = plain_header(&fe);
    let first = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 1));
    send_frame(&mut fe, &h, &first);
    capture(&cap, |f| f == &first[..]).expect("the first frame goes out on pair 1");
    fe.select_pair(0);
    spoofed_then_own_frame(&rig, &mut fe, &cap, &h, "on pair 0");
    let per_pair: Vec<u64> = rig
        .daemon
        .stats_by_pair()
        .iter()
        .map(|s| s["tx.drops.spoofed"])
        .collect();
    assert_eq!(per_pair, [1, 0], "dropped on pair 0");
    let for_guest = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(80, 4));
    let got = delivered_before_marker(&rig, &mut fe, std::slice::from_ref(&for_guest));
    assert_eq!(
        got,
        [for_guest],
        "pair 0 receives for the MAC pair 1 learned"
    );
    assert_eq!(
        rig.daemon.log().matches("(learned)").count(),
        1,
        "learned once for the device"
    );
}

/// `--allow-mac-spoofing` without `--mac`: nothing the guest sends is dropped, but the RX
/// filter still follows the MAC learned from its first frame (unicast for it is delivered,
/// for others not).
#[test]
fn with_spoofing_allowed_the_rx_filter_still_follows_the_learned_mac() {
    let Some(rig) = rig_with_mac(None, &["--allow-mac-spoofing"]) else {
        return;
    };
    let mut fe = guest(&rig, GUEST_FEATURES, &[(64, 1536)]);
    let cap = peer_socket(&rig);
    let h = plain_header(&fe);
    let own = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 1));
    let other = ethernet(
        rig.peer_mac,
        [0x02, 0, 0, 0, 0, 0x99],
        ETH_EXPERIMENTAL,
        &pattern(100, 2),
    );
    send_frame(&mut fe, &h, &own);
    send_frame(&mut fe, &h, &other);
    let mut seen = Vec::new();
    capture(&cap, |f| {
        seen.push(f.to_vec());
        f == &other[..]
    })
    .expect("a frame from another source goes out");
    assert!(seen.contains(&own));
    assert_eq!(rig.daemon.stats()["tx.drops.spoofed"], 0);
    assert_eq!(reported_mac(&rig), mac_text(GUEST_MAC));
    let to = |dst: [u8; 6], seed| ethernet(dst, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(80, seed));
    let (for_guest, for_other) = (to(GUEST_MAC, 3), to([0x02, 0, 0, 0, 0, 0x99], 4));
    let got = delivered_before_marker(&rig, &mut fe, &[for_other.clone(), for_guest.clone()]);
    assert_eq!(got, [for_guest], "only unicast for the learned MAC");
}
