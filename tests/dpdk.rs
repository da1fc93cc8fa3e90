//! DPDK interop: dpdk-testpmd's virtio-user PMD as the vhost-user frontend. Needs root and
//! dpdk-testpmd (Debian: dpdk-dev, with the dpdk PMDs); under CI=true missing tools fail.
//!
//! Every check is an exact count: frames testpmd sent = frames vhost-packet sent + its drops =
//! frames the peer saw + the veth's drops; frames injected = frames testpmd received + drops
//! that vhost-packet and the veth counted. Rates are printed, never asserted.

mod common;

use std::collections::HashMap;
use std::io::IoSlice;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::dpdk::{one_testpmd_at_a_time, require_testpmd, Port, Testpmd};
use common::netns::{parse_mac, veth_pair, NetNs};
use common::packets::{ethernet, ipv4, ETH_IPV4};
use vhost_packet::packet::interface::Interface;
use vhost_packet::packet::socket::{PacketSocket, SocketOptions};

const MAC: &str = "52:54:00:aa:bb:01";
const RUN: Duration = Duration::from_secs(2);

/// A host namespace (vhost-packet on vh0) and a peer namespace (vp0).
struct Rig {
    peer: NetNs,
    host: NetNs,
    daemon: Daemon,
}

impl Rig {
    /// `mac`: vhost-packet's `--mac` and testpmd's `mac=`; `None`: neither is given.
    fn new(mac: Option<&str>, extra: &[&str]) -> Rig {
        let host = NetNs::new("vpd-host");
        let peer = NetNs::new("vpd-peer");
        veth_pair(&host, "vh0", &peer, "vp0");
        let mut args: Vec<&str> = mac.iter().flat_map(|m| ["--mac", m]).collect();
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&host, "vh0", &args);
        Rig { peer, host, daemon }
    }
}

fn link_counter(ns: &NetNs, ifname: &str, name: &str) -> u64 {
    ns.link_counter(ifname, name)
}

fn sum_prefix(stats: &HashMap<String, u64>, prefix: &str) -> u64 {
    stats
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// Polls the daemon's counters until `done` holds (the daemon drains what testpmd queued).
fn wait_stats(
    daemon: &Daemon,
    what: &str,
    mut done: impl FnMut(&HashMap<String, u64>) -> bool,
) -> HashMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = daemon.stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "{what}: {stats:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// txonly: every frame testpmd sent is accounted for at the peer.
/// Queue pairs: vhost-packet `--queues`, testpmd `--rxq/--txq` (devargs carry `queues=`).
fn queue_args(queues: u16) -> (Vec<String>, Vec<String>) {
    let daemon = vec!["--queues".to_owned(), queues.to_string()];
    let app = vec![format!("--rxq={queues}"), format!("--txq={queues}")];
    (daemon, app)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `mac`: given to both sides, or (`None`) to neither, as a new user starts them.
fn txonly(devargs: &str, queues: u16, mac: Option<&str>) {
    if !require_testpmd() {
        return;
    }
    let _one = one_testpmd_at_a_time();
    let (daemon_args, app_args) = queue_args(queues);
    let rig = Rig::new(mac, &strs(&daemon_args));
    let peer_mac = rig.peer.mac_string("vp0");
    let before = link_counter(&rig.peer, "vp0", "rx_packets");
    let mut pmd = Testpmd::start(
        &[Port {
            socket: &rig.daemon.socket,
            mac,
            devargs,
        }],
        &[
            &["--forward-mode=txonly", &format!("--eth-peer=0,{peer_mac}")][..],
            &strs(&app_args),
        ]
        .concat(),
    );
    pmd.start_forwarding();
    std::thread::sleep(RUN);
    let sent = pmd.stop()[&0].tx_packets;
    assert!(sent > 0, "testpmd sent nothing:\n{}", pmd.output());
    let stats = wait_stats(&rig.daemon, "vhost-packet did not take every frame", |s| {
        s["tx.packets"] + sum_prefix(s, "tx.drops.") >= sent
    });
    assert_eq!(stats["tx.packets"] + sum_prefix(&stats, "tx.drops."), sent);
    assert_eq!(sum_prefix(&stats, "tx.drops."), 0, "{stats:?}");
    let arrived = link_counter(&rig.peer, "vp0", "rx_packets") - before;
    let lost_on_veth =
        link_counter(&rig.host, "vh0", "tx_dropped") + link_counter(&rig.peer, "vp0", "rx_dropped");
    assert_eq!(arrived + lost_on_veth, stats["tx.packets"], "{stats:?}");
    let per_pair: Vec<u64> = rig
        .daemon
        .stats_by_pair()
        .iter()
        .map(|s| s["tx.packets"])
        .collect();
    assert!(
        per_pair.iter().all(|&n| n > 0),
        "a pair sent nothing: {per_pair:?}"
    );
    eprintln!(
        "txonly {devargs}: testpmd sent {sent} in {RUN:?}, the peer received {arrived}, veth drops {lost_on_veth}"
    );
}

/// rxonly: frames injected at the peer reach testpmd, or are counted as dropped.
fn rxonly(devargs: &str, queues: u16) {
    if !require_testpmd() {
        return;
    }
    let _one = one_testpmd_at_a_time();
    let (daemon_args, app_args) = queue_args(queues);
    let rig = Rig::new(Some(MAC), &strs(&daemon_args));
    let mut pmd = Testpmd::start(
        &[Port {
            socket: &rig.daemon.socket,
            mac: Some(MAC),
            devargs,
        }],
        &[&["--forward-mode=rxonly"][..], &strs(&app_args)].concat(),
    );
    pmd.start_forwarding();
    // testpmd's port is started (features acked, RX buffers posted) once its prompt is back.
    rig.daemon
        .wait_for_log("frontend acked features", Duration::from_secs(10));
    let injected: u64 = 20_000;
    let src = rig.peer.mac("vp0");
    let sock = rig.peer.enter_thread(|| {
        let iface = Interface::by_name("vp0").unwrap();
        PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
    });
    let vnet = [0u8; 12];
    for i in 0..injected {
        // UDP from 64 source ports: flows the fanout spreads over the queue pairs.
        let mut udp = vec![0u8; 26];
        udp[0..2].copy_from_slice(&(10_000 + (i % 64) as u16).to_be_bytes());
        udp[2..4].copy_from_slice(&9u16.to_be_bytes());
        udp[4..6].copy_from_slice(&26u16.to_be_bytes());
        udp[8..16].copy_from_slice(&i.to_be_bytes());
        let ip = ipv4([198, 18, 0, 2], [198, 18, 0, 1], 17, i as u16, &udp);
        let frame = ethernet(parse_mac(MAC), src, ETH_IPV4, &ip);
        sock.send_vectored(&[IoSlice::new(&vnet), IoSlice::new(&frame)])
            .expect("inject a frame");
    }
    let lost_on_veth = || {
        link_counter(&rig.peer, "vp0", "tx_dropped") + link_counter(&rig.host, "vh0", "rx_dropped")
    };
    let stats = wait_stats(&rig.daemon, "frames unaccounted for", |s| {
        s["rx.packets"] + sum_prefix(s, "rx.drops.") + lost_on_veth() >= injected
    });
    // The PMD's own counter (what testpmd dequeued); testpmd busy-polls, so it catches up
    // with what vhost-packet delivered almost at once.
    let delivered = stats["rx.packets"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let received = loop {
        let (rx, _) = pmd.port_packets(0);
        if rx >= delivered || Instant::now() > deadline {
            break rx;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    pmd.stop();
    let dropped = sum_prefix(&stats, "rx.drops.");
    assert_eq!(received, stats["rx.packets"], "{stats:?}");
    assert_eq!(received + dropped + lost_on_veth(), injected, "{stats:?}");
    assert!(received > 0);
    let per_pair: Vec<u64> = rig
        .daemon
        .stats_by_pair()
        .iter()
        .map(|s| s["rx.packets"])
        .collect();
    assert!(
        per_pair.iter().all(|&n| n > 0),
        "a pair received nothing: {per_pair:?}"
    );
    // Only "no guest buffers" may drop here: anything else is a bug.
    assert_eq!(dropped, stats["rx.drops.no_buffers"], "{stats:?}");
    eprintln!(
        "rxonly {devargs}: injected {injected}, testpmd received {received}, no_buffers {dropped}, veth drops {}",
        lost_on_veth()
    );
}

#[test]
fn testpmd_txonly_mergeable() {
    txonly("queues=1,mrg_rxbuf=1", 1, Some(MAC));
}

/// Neither vhost-packet's `--mac` nor virtio-user's `mac=`, as a new user starts them: the
/// MAC testpmd sends from is learned from its first frame, and every frame reaches the peer.
#[test]
fn testpmd_txonly_without_any_mac() {
    txonly("queues=1,mrg_rxbuf=1", 1, None);
}

#[test]
fn testpmd_txonly_without_mergeable() {
    txonly("queues=1,mrg_rxbuf=0", 1, Some(MAC));
}

#[test]
fn testpmd_rxonly_mergeable() {
    rxonly("queues=1,mrg_rxbuf=1", 1);
}

#[test]
fn testpmd_rxonly_without_mergeable() {
    rxonly("queues=1,mrg_rxbuf=0", 1);
}

/// Two queue pairs (virtio-user needs its control queue, `cq=1`, to enable the second).
#[test]
fn testpmd_txonly_two_queue_pairs() {
    txonly("queues=2,cq=1,mrg_rxbuf=1", 2, Some(MAC));
}

#[test]
fn testpmd_rxonly_two_queue_pairs() {
    rxonly("queues=2,cq=1,mrg_rxbuf=1", 2);
}

/// DPDK's virtio-user with its default features (no GUEST_TSO or GUEST_CSUM unless the app
/// asks for LRO or checksum offload, which testpmd does not) forwarding a kernel TCP flow
/// between two namespaces: testpmd's io mode bridges two vhost-packet instances, each on a
/// veth to a namespace with a kernel stack. The senders' 64 KiB GSO frames must reach DPDK
/// segmented and checksummed, or TCP fails; the receivers count checksum errors.
#[test]
fn testpmd_default_features_forward_kernel_tcp() {
    if !require_testpmd() || !common::netns::require_root_and_tools(&["iperf3"]) {
        return;
    }
    let _one = one_testpmd_at_a_time();
    let host = NetNs::new("vpd-host");
    let a = NetNs::new("vpd-a");
    let b = NetNs::new("vpd-b");
    veth_pair(&host, "ha", &a, "va");
    veth_pair(&host, "hb", &b, "vb");
    a.add_addr("va", "198.18.1.1/24");
    b.add_addr("vb", "198.18.1.2/24");
    // The namespaces' frames pass through as they are: testpmd is a bridge here, not a guest.
    let bridge = ["--promisc", "--allow-mac-spoofing"];
    let da = Daemon::start(&host, "ha", &bridge);
    let db = Daemon::start(&host, "hb", &bridge);
    let mut pmd = Testpmd::start(
        &[
            Port {
                socket: &da.socket,
                mac: Some("52:54:00:aa:bb:0a"),
                devargs: "",
            },
            Port {
                socket: &db.socket,
                mac: Some("52:54:00:aa:bb:0b"),
                devargs: "",
            },
        ],
        &["--forward-mode=io"],
    );
    pmd.start_forwarding();
    let _server = b.spawn(&["iperf3", "-s"]);
    let mut results = Vec::new();
    for reverse in [false, true] {
        let mut args = vec!["iperf3", "-c", "198.18.1.2", "-t", "3", "-f", "m"];
        if reverse {
            args.push("-R");
        }
        // The server needs a moment to listen; iperf3 has no wait-for-server option.
        let deadline = Instant::now() + Duration::from_secs(15);
        let out = loop {
            let out = a.exec(&args);
            if out.status.success() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "iperf3 {args:?} through testpmd failed:\n{text}{}\nvhost-packet a: {}\nb: {}",
            String::from_utf8_lossy(&out.stderr),
            da.log(),
            db.log()
        );
        let rate = text
            .lines()
            .find(|l| l.ends_with("receiver"))
            .unwrap_or_default()
            .to_owned();
        results.push(rate);
    }
    let ports = pmd.stop();
    for (ns, name) in [(&a, "a"), (&b, "b")] {
        let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
        let errors = tcp_in_csum_errors(&String::from_utf8_lossy(&snmp.stdout));
        assert_eq!(errors, 0, "TCP checksum errors in namespace {name}");
    }
    let (sa, sb) = (da.stats(), db.stats());
    // Both directions carried GSO frames from a kernel to a guest without GUEST_TSO.
    assert!(sa["rx.segmented"] > 0, "a: {sa:?}");
    assert!(sb["rx.segmented"] > 0, "b: {sb:?}");
    for s in [&sa, &sb] {
        assert_eq!(s["rx.drops.oversize"] + s["rx.drops.offload"], 0, "{s:?}");
        assert_eq!(sum_prefix(s, "tx.drops."), 0, "{s:?}");
    }
    for (port, st) in &ports {
        assert_eq!(st.rx_dropped, 0, "port {port}: {st:?}");
    }
    eprintln!("through testpmd io: {results:?}; ports {ports:?}");
}

/// `Tcp: ... InCsumErrors` from /proc/net/snmp.
fn tcp_in_csum_errors(snmp: &str) -> u64 {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        panic!("no Tcp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InCsumErrors")
        .and_then(|(_, v)| v.parse().ok())
        .expect("InCsumErrors")
}
