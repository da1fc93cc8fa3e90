//! Several queue pairs (`--queues 2`) through the real binary: the test frontend drives both
//! pairs over vhost-user, a peer namespace with a real kernel stack sends and captures. Needs
//! root; under CI=true missing tools fail the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::frontend::{
    feat, hdr as vhdr, raw_message, raw_reply, vnet_header, FrontendConfig, TestFrontend, TxLayout,
};
use common::netns::{require_root_and_tools, veth_pair, NetNs};
use common::packets::*;
use vhost_packet::packet::interface::Interface;
use vhost_packet::packet::socket::{PacketSocket, SocketOptions};

const T: Duration = Duration::from_secs(5);
const PAIRS: usize = 2;
/// The UDP port the peer's flows go to in the guest.
const FLOW_PORT: u16 = 7000;

const GUEST_FEATURES: u64 = feat::VERSION_1
    | feat::MRG_RXBUF
    | feat::EVENT_IDX
    | feat::CSUM
    | feat::GUEST_CSUM
    | feat::HOST_TSO4
    | feat::GUEST_TSO4
    | feat::MAC
    | feat::STATUS
    | feat::PROTOCOL_FEATURES;

struct Rig {
    daemon: Daemon,
    peer_mac: [u8; 6],
    peer: NetNs,
    host: NetNs,
}

fn rig(extra: &[&str]) -> Option<Rig> {
    if !require_root_and_tools(&["ip", "ethtool"]) {
        return None;
    }
    let host = NetNs::new("vmqh");
    let peer = NetNs::new("vmqp");
    veth_pair(&host, "vh0", &peer, "vp0");
    peer.add_addr("vp0", "198.18.0.2/24");
    peer.add_neigh("vp0", "198.18.0.1", "02:00:00:00:00:01");
    let peer_mac = peer.mac("vp0");
    let mut args = vec!["--mac", "02:00:00:00:00:01", "--queues", "2"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&host, "vh0", &args);
    Some(Rig {
        daemon,
        peer_mac,
        peer,
        host,
    })
}

/// A guest driving both pairs, with RX buffers posted (and re-posted as they fill) on each.
fn guest(rig: &Rig) -> TestFrontend {
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.set_queue_pairs(PAIRS);
    fe.start(FrontendConfig {
        features: GUEST_FEATURES,
        queue_size: 256,
        mem_size: 64 << 20,
    });
    for p in 0..PAIRS {
        fe.select_pair(p);
        fe.post_rx_buffers(128, 2048);
        fe.kick_rx();
    }
    fe.set_rx_autorefill(true);
    fe.select_pair(0);
    fe
}

/// A packet socket in the peer namespace, to capture what the guest sends.
fn peer_socket(rig: &Rig) -> PacketSocket {
    rig.peer.enter_thread(|| {
        let iface = Interface::by_name("vp0").unwrap();
        PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
    })
}

/// `n` UDP sockets of the peer's kernel stack, one flow each (distinct source ports).
fn peer_flows(rig: &Rig, n: usize) -> Vec<UdpSocket> {
    rig.peer.enter_thread(|| {
        (0..n)
            .map(|_| UdpSocket::bind("198.18.0.2:0").unwrap())
            .collect()
    })
}

/// Sends datagram `marker` on every flow, each with its own marker (`base + flow`).
fn send_round(flows: &[UdpSocket], base: u32) {
    for (i, s) in flows.iter().enumerate() {
        let marker = base + i as u32;
        s.send_to(&marker.to_be_bytes(), ("198.18.0.1", FLOW_PORT))
            .unwrap();
    }
}

/// (source port, marker) of a datagram from a peer flow.
fn flow_datagram(frame: &[u8]) -> Option<(u16, u32)> {
    (frame.len() >= 46
        && frame[12..14] == ETH_IPV4.to_be_bytes()
        && frame[23] == 17
        && frame[26..30] == PEER_IP
        && frame[36..38] == FLOW_PORT.to_be_bytes())
    .then(|| {
        (
            u16::from_be_bytes([frame[34], frame[35]]),
            u32::from_be_bytes([frame[42], frame[43], frame[44], frame[45]]),
        )
    })
}

/// What the guest received, per pair: (source port, marker) of each flow datagram.
#[derive(Default, Debug)]
struct Received {
    by_pair: Vec<Vec<(u16, u32)>>,
}

impl Received {
    fn new() -> Received {
        Received {
            by_pair: vec![Vec::new(); PAIRS],
        }
    }

    fn total(&self) -> usize {
        self.by_pair.iter().map(Vec::len).sum()
    }

    /// No marker twice.
    fn check_once(&self) {
        let mut markers = BTreeSet::new();
        for &(_, marker) in self.by_pair.iter().flatten() {
            assert!(markers.insert(marker), "marker {marker} arrived twice");
        }
    }

    /// No marker twice, and every flow on one pair only; returns flow -> pair.
    fn check(&self) -> BTreeMap<u16, usize> {
        self.check_once();
        let mut pair_of = BTreeMap::new();
        for (p, got) in self.by_pair.iter().enumerate() {
            for &(sport, _) in got {
                let first = *pair_of.entry(sport).or_insert(p);
                assert_eq!(first, p, "flow {sport} arrived on pairs {first} and {p}");
            }
        }
        pair_of
    }
}

/// Receives on every pair until `done` or `timeout`, keeping the flow datagrams.
fn receive(
    fe: &mut TestFrontend,
    into: &mut Received,
    timeout: Duration,
    done: impl Fn(&Received) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(into) && Instant::now() < deadline {
        for p in 0..fe.queue_pairs() {
            fe.select_pair(p);
            // A bounded turn per pair: under continuous traffic a ring is never empty.
            for _ in 0..64 {
                let Some(pkt) = fe.recv(Duration::from_millis(1)) else {
                    break;
                };
                if let Some(flow) = flow_datagram(&pkt.frame) {
                    into.by_pair[p].push(flow);
                }
            }
        }
    }
    fe.select_pair(0);
}

/// Takes what pair `p` has already published, without waiting for more.
fn take_published(fe: &mut TestFrontend, p: usize, into: &mut Received) {
    fe.select_pair(p);
    while let Some(pkt) = fe.recv(Duration::ZERO) {
        if let Some(flow) = flow_datagram(&pkt.frame) {
            into.by_pair[p].push(flow);
        }
    }
    fe.select_pair(0);
}

/// An experimental-EtherType frame carrying `marker`.
fn marked(dst: [u8; 6], marker: u32) -> Vec<u8> {
    let mut payload = marker.to_be_bytes().to_vec();
    payload.extend_from_slice(&pattern(100, marker));
    ethernet(dst, GUEST_MAC, ETH_EXPERIMENTAL, &payload)
}

fn marker_of(frame: &[u8]) -> Option<u32> {
    (frame.len() >= 18 && frame[12..14] == ETH_EXPERIMENTAL.to_be_bytes())
        .then(|| u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]]))
}

/// Markers of the experimental frames a peer capture socket gets until `window` passes.
fn captured_markers(sock: &PacketSocket, window: Duration) -> Vec<u32> {
    let deadline = Instant::now() + window;
    let mut buf = vec![0u8; 70000];
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match sock.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
            Ok(r) => out.extend(marker_of(&buf[12..r.len.min(buf.len())])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("capture: {e}"),
        }
    }
    out
}

/// Sends `markers` on the active pair and waits until the backend returned every chain.
fn send_marked(fe: &mut TestFrontend, dst: [u8; 6], markers: std::ops::Range<u32>) {
    let h = plain_header(fe);
    let n = markers.len();
    for m in markers {
        fe.send(&h, &marked(dst, m), TxLayout::Combined);
    }
    fe.kick_tx();
    assert_eq!(
        fe.wait_tx_used(n, T).len(),
        n,
        "the backend returns every chain"
    );
}

/// The CPUs each worker thread (vhost-user-backend names them `vring_worker`) may run on, as
/// /proc shows them (`0-1`, `1`), sorted.
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "vring_worker" {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            lists.push(l.trim().to_string());
        }
    }
    lists.sort();
    lists
}

#[test]
fn two_pairs_share_the_peers_flows_and_the_peer_gets_exactly_what_the_guest_sent() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig);
    // Without --cpu-affinity the scheduler decides: the workers may run where the process may.
    let all = vhost_packet::affinity::format_cpus(&vhost_packet::affinity::allowed_cpus().unwrap());
    assert_eq!(worker_cpus(rig.daemon.pid()), vec![all; PAIRS]);
    assert!(!rig.daemon.log().contains("worker runs on CPU"));
    assert!(fe.has_feature(feat::MQ), "MQ is offered with two pairs");
    assert_eq!(fe.queue_num(), Some(4), "GET_QUEUE_NUM: four virtqueues");
    let cfg = fe.get_config(8, 2);
    assert_eq!(
        u16::from_le_bytes([cfg[0], cfg[1]]),
        2,
        "max_virtqueue_pairs"
    );

    // 32 flows of the peer's stack, 3 datagrams each.
    let flows = peer_flows(&rig, 32);
    for round in 0..3 {
        send_round(&flows, round * 1000);
    }
    let mut got = Received::new();
    receive(&mut fe, &mut got, T, |r| r.total() >= 96);
    let pair_of = got.check();
    assert_eq!(got.total(), 96, "every datagram arrived once: {got:?}");
    let used: BTreeSet<usize> = pair_of.values().copied().collect();
    assert_eq!(used, [0, 1].into(), "both pairs carry flows: {pair_of:?}");
    let s = rig.daemon.stats_by_pair();
    for (p, stats) in s.iter().enumerate() {
        let flows_here = got.by_pair[p].len() as u64;
        assert!(stats["rx.packets"] >= flows_here, "pair {p}: {stats:?}");
    }

    // Each pair sends its own frames; the peer sees each exactly once.
    let cap = peer_socket(&rig);
    for p in 0..PAIRS {
        fe.select_pair(p);
        let base = 100 * p as u32;
        send_marked(&mut fe, rig.peer_mac, base..base + 10);
    }
    let mut seen = captured_markers(&cap, Duration::from_millis(500));
    seen.sort_unstable();
    let want: Vec<u32> = (0..10).chain(100..110).collect();
    assert_eq!(seen, want, "the peer sees exactly what the guest sent");
    let s = rig.daemon.stats_by_pair();
    assert_eq!((s[0]["tx.packets"], s[1]["tx.packets"]), (10, 10), "{s:?}");
}

#[test]
fn pairs_are_disabled_and_enabled_again_while_traffic_flows() {
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig);
    let flows = peer_flows(&rig, 16);
    let cap = peer_socket(&rig);
    let stop = AtomicBool::new(false);
    let mut got = Received::new();

    /// Stops the sender however the scope ends: the scope waits for it, even on a panic.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    std::thread::scope(|s| {
        let _stop_sender = StopOnDrop(&stop);
        // The peer sends round after round until told to stop.
        let sender = s.spawn(|| {
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                send_round(&flows, round * 100);
                round += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            round
        });

        // Both pairs enabled: both receive.
        receive(&mut fe, &mut got, T, |r| {
            r.by_pair.iter().all(|p| p.len() >= 5)
        });
        assert!(got.by_pair.iter().all(|p| !p.is_empty()), "{got:?}");
        got.check();

        // Pair 1 off. What it delivered before the reply is in its ring now; after that,
        // every flow arrives on pair 0.
        fe.set_pair_enabled(1, false);
        let mut before = Received::new();
        take_published(&mut fe, 1, &mut before);
        let mut off = Received::new();
        receive(&mut fe, &mut off, T, |r| r.by_pair[0].len() >= 16 * 10);
        assert!(
            off.by_pair[1].is_empty(),
            "pair 1 received while disabled: {off:?}"
        );
        off.check();
        let flows_on_0: BTreeSet<u16> = off.by_pair[0].iter().map(|f| f.0).collect();
        assert_eq!(flows_on_0.len(), 16, "every flow moved to pair 0");
        let json = rig.daemon.stats_json();
        for want in [
            "{\"index\":0,\"rx_enabled\":true,\"tx_enabled\":true,",
            "{\"index\":1,\"rx_enabled\":false,\"tx_enabled\":false,",
        ] {
            assert!(json.contains(want), "{want} in {json}");
        }

        // TX on the disabled pair is consumed and discarded; pair 0 still sends.
        fe.select_pair(1);
        send_marked(&mut fe, rig.peer_mac, 500..505);
        fe.select_pair(0);
        send_marked(&mut fe, rig.peer_mac, 600..602);

        // Pair 1 on again: both receive again.
        fe.set_pair_enabled(1, true);
        let mut on = Received::new();
        receive(&mut fe, &mut on, T, |r| {
            r.by_pair.iter().all(|p| p.len() >= 5)
        });
        assert!(on.by_pair.iter().all(|p| !p.is_empty()), "{on:?}");
        // Flows the new program gives pair 1 may still have older datagrams queued on pair 0,
        // but none newer: a flow moves once and stays.
        on.check_once();
        for &(flow, first_on_1) in &on.by_pair[1] {
            let later_on_0 = on.by_pair[0]
                .iter()
                .filter(|&&(f, m)| f == flow && m > first_on_1)
                .count();
            assert_eq!(later_on_0, 0, "flow {flow} went back to pair 0: {on:?}");
        }

        stop.store(true, Ordering::Relaxed);
        let rounds = sender.join().unwrap();
        assert!(rounds > 0);
        for part in [before, off, on] {
            for (p, flows) in part.by_pair.into_iter().enumerate() {
                got.by_pair[p].extend(flows);
            }
        }
    });
    // Across the changes flows move between pairs, but nothing arrives twice.
    got.check_once();

    let mut seen = captured_markers(&cap, Duration::from_millis(500));
    seen.sort_unstable();
    assert_eq!(seen, [600, 601], "nothing of the disabled pair left");
    let s = rig.daemon.stats_by_pair();
    assert_eq!(s[1]["tx.drops.disabled"], 5, "{s:?}");
    assert_eq!(s[0]["tx.drops.disabled"], 0, "{s:?}");
    assert_eq!(s[0]["tx.packets"], 2, "{s:?}");
}

#[test]
fn what_the_guest_and_the_host_send_never_comes_back_on_any_pair() {
    // --promisc: the guest would get any frame the group gets, whatever its destination.
    let Some(rig) = rig(&["--promisc"]) else {
        return;
    };
    // The host's end segments TCP in software: the segments of the guest's TSO frame are new
    // skbs that no longer name our socket as their sender.
    rig.host.ethtool_k("vh0", &[("tso", "off"), ("gso", "off")]);
    let mut fe = guest(&rig);
    let cap = peer_socket(&rig);
    let host_sock = rig.host.enter_thread(|| {
        let iface = Interface::by_name("vh0").unwrap();
        PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
    });

    // Pair 0: broadcast frames and a 20000-byte TSO frame to the peer.
    send_marked(&mut fe, [0xff; 6], 0..8);
    let t = Tcp {
        src: (GUEST_IP, 40000),
        dst: (PEER_IP, 5009),
        seq: 1,
        ack: 0,
        flags: TCP_ACK,
        window: 1000,
    };
    let tso = tcp_frame(
        (rig.peer_mac, GUEST_MAC),
        t,
        &pattern(20000, 9),
        Csum::Partial,
    );
    let h = vnet_header(
        vhdr::F_NEEDS_CSUM,
        vhdr::GSO_TCPV4,
        54,
        1448,
        34,
        16,
        0,
        fe.header_len(),
    );
    send_frame(&mut fe, &h, &tso);
    // The host: frames to the guest's MAC and to everyone, leaving by the same interface.
    for m in 0..8u32 {
        let dst = if m % 2 == 0 { GUEST_MAC } else { [0xff; 6] };
        let f = marked(dst, 0x100 + m);
        host_sock
            .send_vectored(&[std::io::IoSlice::new(&[0u8; 12]), std::io::IoSlice::new(&f)])
            .unwrap();
    }
    // The peer: frames that must arrive.
    for m in 0..8u32 {
        let f = ethernet(
            GUEST_MAC,
            rig.peer_mac,
            ETH_EXPERIMENTAL,
            &[&(0x200 + m).to_be_bytes()[..], &pattern(50, m)].concat(),
        );
        cap.send_vectored(&[std::io::IoSlice::new(&[0u8; 12]), std::io::IoSlice::new(&f)])
            .unwrap();
    }

    let mut markers = Vec::new();
    let mut guest_tcp = 0;
    let deadline = Instant::now() + T;
    // Until the peer's frames are in, then a little longer for anything that should not come.
    let mut quiet_until = None;
    while quiet_until.is_none_or(|q| Instant::now() < q) && Instant::now() < deadline {
        for p in 0..PAIRS {
            fe.select_pair(p);
            while let Some(pkt) = fe.recv(Duration::from_millis(1)) {
                markers.extend(marker_of(&pkt.frame));
                if parse_tcp(&pkt.frame).is_some_and(|t| t.src_port == 40000) {
                    guest_tcp += 1;
                }
            }
        }
        if quiet_until.is_none() && markers.iter().filter(|&&m| m >= 0x200).count() == 8 {
            quiet_until = Some(Instant::now() + Duration::from_millis(300));
        }
    }
    markers.sort_unstable();
    let want: Vec<u32> = (0x200..0x208).collect();
    assert_eq!(markers, want, "only the peer's frames reach the guest");
    assert_eq!(
        guest_tcp, 0,
        "segments of the guest's own TSO frame came back"
    );
    // The TSO frame did leave, in segments.
    let s = rig.daemon.stats();
    assert_eq!((s["tx.gso"], s["tx.packets"]), (1, 9), "{s:?}");
}

#[test]
fn cpu_affinity_pins_each_pairs_worker_in_list_order() {
    let allowed = vhost_packet::affinity::allowed_cpus().unwrap();
    // In reverse, so that list order and CPU order differ where there are two CPUs.
    let list: Vec<usize> = allowed.iter().take(2).rev().copied().collect();
    let arg = list
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let Some(rig) = rig(&["--cpu-affinity", &arg]) else {
        return;
    };
    let mut fe = guest(&rig);
    let want: Vec<usize> = (0..PAIRS).map(|p| list[p % list.len()]).collect();
    for (p, cpu) in want.iter().enumerate() {
        rig.daemon
            .wait_for_log(&format!("queue pair {p}: worker runs on CPU {cpu}"), T);
    }
    let mut want_lists: Vec<String> = want.iter().map(|c| c.to_string()).collect();
    want_lists.sort();
    assert_eq!(worker_cpus(rig.daemon.pid()), want_lists);

    // And traffic flows on both pairs.
    let flows = peer_flows(&rig, 32);
    send_round(&flows, 0);
    let mut got = Received::new();
    receive(&mut fe, &mut got, T, |r| r.total() >= 32);
    assert_eq!(got.check().len(), 32);
}

#[test]
fn a_guest_without_mq_gets_every_flow_on_its_one_pair() {
    // A frontend without PROTOCOL_FEATURES: SET_FEATURES enables every ring, also those of
    // pair 1, which it never sets up. Without MQ the device has one pair, so pair 0 must get
    // every flow; half of them would otherwise wait on a ring that never comes.
    let Some(rig) = rig(&[]) else { return };
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.set_without_protocol_features();
    fe.start(FrontendConfig {
        features: GUEST_FEATURES,
        queue_size: 256,
        mem_size: 64 << 20,
    });
    assert!(!fe.has_feature(feat::MQ) && !fe.has_feature(feat::PROTOCOL_FEATURES));
    // Without REPLY_ACK nothing above waited for the backend; a request with a reply does,
    // since the backend answers in order.
    use vhost::VhostBackend;
    fe.raw_frontend().get_features().unwrap();
    fe.post_rx_buffers(128, 2048);
    fe.set_rx_autorefill(true);
    fe.kick_rx();
    let flows = peer_flows(&rig, 32);
    send_round(&flows, 0);
    let mut got = Received::new();
    receive(&mut fe, &mut got, T, |r| r.total() >= 32);
    assert_eq!(got.check().len(), 32, "every flow arrives: {got:?}");
}

// ---- protocol: queue counts and sizes ------------------------------------------------------

/// Each pair sends ten marked frames; the peer must see all of them (the connection works).
fn both_pairs_carry_frames(rig: &Rig, fe: &mut TestFrontend, base: u32) {
    let cap = peer_socket(rig);
    for p in 0..PAIRS {
        fe.select_pair(p);
        let from = base + 100 * p as u32;
        send_marked(fe, rig.peer_mac, from..from + 10);
    }
    fe.select_pair(0);
    let mut seen = captured_markers(&cap, Duration::from_millis(500));
    seen.sort_unstable();
    let want: Vec<u32> = (base..base + 10).chain(base + 100..base + 110).collect();
    assert_eq!(seen, want, "the peer sees what both pairs sent");
}

/// A request with a reply: it returns only once the backend processed everything before it,
/// and fails if the connection is gone.
fn assert_connected(rig: &Rig, fe: &mut TestFrontend) {
    use vhost::VhostBackend;
    fe.raw_frontend()
        .get_features()
        .unwrap_or_else(|e| panic!("the connection is gone ({e}): {}", rig.daemon.log()));
    assert!(
        !rig.daemon.log().contains("frontend disconnected"),
        "{}",
        rig.daemon.log()
    );
}

#[test]
fn a_frontend_asking_for_more_pairs_than_served_is_refused_at_the_first_ring_beyond() {
    // GET_QUEUE_NUM answers in rings (4 for two pairs). QEMU compares the answer with its
    // pairs, so `queues=3` passes its check and goes on to set up rings 4 and 5. The relay
    // refuses the first of them with a failure reply and a log line; the connection and the
    // two pairs the device has keep working.
    let Some(rig) = rig(&[]) else { return };
    let stream = std::os::unix::net::UnixStream::connect(&rig.daemon.socket).unwrap();
    let mut raw = stream.try_clone().unwrap();
    let mut fe = TestFrontend::from_stream(stream);
    fe.set_queue_pairs(PAIRS);
    fe.start(FrontendConfig {
        features: GUEST_FEATURES,
        queue_size: 256,
        mem_size: 64 << 20,
    });
    assert_eq!(fe.queue_num(), Some(4), "GET_QUEUE_NUM: four virtqueues");
    // The third pair's first ring (the vhost crate's frontend refuses ring indices beyond
    // GET_QUEUE_NUM itself, so this one goes raw). REPLY_ACK is acked: NEED_REPLY.
    let state: Vec<u8> = [4u32, 256].iter().flat_map(|w| w.to_le_bytes()).collect();
    raw_message(&mut raw, 8, 0x1 | 0x8, &state);
    let reply = raw_reply(&mut raw, T).expect("an answer to SET_VRING_NUM for ring 4");
    assert_eq!(reply.0, 8, "a SET_VRING_NUM reply");
    assert_ne!(reply.2, 0u64.to_le_bytes(), "a failure");
    assert_connected(&rig, &mut fe);
    rig.daemon.wait_for_log(
        "the frontend addresses ring 4, but this device has 4 rings (2 queue pairs, --queues 2)",
        T,
    );
    both_pairs_carry_frames(&rig, &mut fe, 0);
}

/// Sets up both pairs with `size`-descriptor rings, which the backend must refuse with a
/// failure reply and `log`; a setup with 256 then carries frames on the same connection.
fn refused_queue_size(extra: &[&str], size: u16, log: &str) {
    let Some(rig) = rig(extra) else { return };
    let mut fe = TestFrontend::connect(&rig.daemon.socket, T);
    fe.set_queue_pairs(PAIRS);
    fe.try_negotiate(GUEST_FEATURES).unwrap();
    fe.try_setup_memory(64 << 20).unwrap();
    let err = fe
        .try_setup_rings(size)
        .expect_err("the backend refuses the ring size");
    assert!(err.contains("SET_VRING_NUM for queue 0"), "{err}");
    assert_connected(&rig, &mut fe);
    rig.daemon.wait_for_log(log, T);
    fe.try_setup_rings(256).unwrap();
    fe.try_enable_rings(true).unwrap();
    both_pairs_carry_frames(&rig, &mut fe, 0);
}

#[test]
fn a_queue_size_that_is_not_a_power_of_two_is_refused_not_ignored() {
    // vhost-user-backend accepts 1000 and virtio-queue then ignores it: the backend would
    // keep a 1024-entry layout under the frontend's 1000-entry ring.
    refused_queue_size(
        &[],
        1000,
        "the frontend asks for a queue of 1000 descriptors, but sizes must be a power of two up to --queue-size 1024",
    );
}

#[test]
fn a_queue_larger_than_queue_size_is_refused_with_a_reply_not_a_disconnect() {
    refused_queue_size(
        &["--queue-size", "1024"],
        2048,
        "the frontend asks for a queue of 2048 descriptors, but sizes must be a power of two up to --queue-size 1024",
    );
}

// ---- protocol: memory slots with several pairs ---------------------------------------------

/// How many mappings of the memfd `name` the daemon has.
fn daemon_mappings(rig: &Rig, name: &str) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", rig.daemon.pid())).unwrap();
    let tag = format!("/memfd:{name} ");
    maps.lines().filter(|l| l.contains(&tag)).count()
}

#[test]
fn memory_slots_with_two_pairs_take_each_region_once_per_pair_as_qemu_7_2_sends_it() {
    // QEMU 7.2 drives each pair as a vhost device of its own on the one connection, and each
    // sends ADD_MEM_REG for every region and, on unplug, REM_MEM_REG: twice the same request
    // with two pairs. The first ADD maps the region, the second is answered without a second
    // mapping; the first REM is answered while the other pair still has the region, the
    // second unmaps it.
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    use vhost::vhost_user::VhostUserFrontend;
    let Some(rig) = rig(&[]) else { return };
    let mut fe = guest(&rig);
    let slots = P::CONFIGURE_MEM_SLOTS.bits();
    assert_ne!(
        fe.backend_protocol_features() & slots,
        0,
        "CONFIGURE_MEM_SLOTS offered with two pairs"
    );
    assert_ne!(fe.acked_protocol_features() & slots, 0);
    assert!(fe.raw_frontend().get_max_mem_slots().unwrap() >= 10);
    // Nine regions beyond the guest RAM: with the RAM that is more than SET_MEM_TABLE's 8.
    let names: Vec<String> = (0..9).map(|i| format!("vp-slot-{i}")).collect();
    let regions: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let name = std::ffi::CString::new(n.as_str()).unwrap();
            common::frontend::memfd_region(&name, (1 << 32) + (i as u64) * (2 << 20), 2 << 20)
                .unwrap()
        })
        .collect();
    for pair in 0..PAIRS {
        for (r, n) in regions.iter().zip(&names) {
            fe.raw_frontend()
                .add_mem_region(&r.info)
                .unwrap_or_else(|e| panic!("pair {pair}: ADD_MEM_REG {n}: {e}"));
        }
    }
    assert_connected(&rig, &mut fe);
    for n in &names {
        assert_eq!(daemon_mappings(&rig, n), 1, "{n} mapped once");
    }
    both_pairs_carry_frames(&rig, &mut fe, 0);

    // Unplug, as pair 0 sends it: the region stays, pair 1 still has it.
    for (r, n) in regions.iter().zip(&names) {
        fe.raw_frontend()
            .remove_mem_region(&r.info)
            .unwrap_or_else(|e| panic!("pair 0: REM_MEM_REG {n}: {e}"));
    }
    assert_connected(&rig, &mut fe);
    for n in &names {
        assert_eq!(daemon_mappings(&rig, n), 1, "{n} still mapped for pair 1");
    }
    // Pair 1's REM_MEM_REG: now the region goes.
    for (r, n) in regions.iter().zip(&names) {
        fe.raw_frontend()
            .remove_mem_region(&r.info)
            .unwrap_or_else(|e| panic!("pair 1: REM_MEM_REG {n}: {e}"));
    }
    assert_connected(&rig, &mut fe);
    // Unmapped once the last pass holding the old table ends: a bounded wait.
    let deadline = Instant::now() + T;
    while names.iter().any(|n| daemon_mappings(&rig, n) > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for n in &names {
        assert_eq!(daemon_mappings(&rig, n), 0, "{n} unmapped");
    }
    both_pairs_carry_frames(&rig, &mut fe, 1000);
}
