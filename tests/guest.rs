//! Booted guests end to end: a Debian kernel under QEMU (TCG unless KVM really works) with
//! virtio-net on vhost-packet, a veth to a peer namespace with a kernel stack and iperf3.
//! Built and booted by qemu/build-guest.sh and qemu/boot.sh; needs root. Under CI=true a
//! missing tool or image fails the test.
//!
//! Figures (accelerator, boot time, RTT, Gbit/s) are printed; run with `--nocapture` to see
//! them. Nothing here asserts on timing.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::guest::{
    bit, guest_iperf, one_guest_at_a_time, ping_both_ways, require_guest, tcp_both_ways, Guest,
    GuestNet, GuestOptions, GUEST_IP, GUEST_MAC, PEER_IP, PEER_IP6,
};

const CMD: Duration = Duration::from_secs(60);

/// Counters that only a bug (or a hostile guest) moves.
fn assert_no_error_drops(stats: &HashMap<String, u64>) {
    for key in [
        "tx.drops.malformed",
        "tx.drops.unnegotiated",
        "tx.drops.spoofed",
        "rx.drops.oversize",
        "rx.drops.offload",
        "rx.drops.bad_chain",
    ] {
        assert_eq!(stats.get(key).copied(), Some(0), "{key} in {stats:?}");
    }
}

/// a) Boot, link up, ping the peer and back.
#[test]
fn guest_boots_and_pings_peer_and_back() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::default());
    assert!(guest.has(bit::VERSION_1) && guest.has(bit::STATUS));
    let rtt = ping_both_ways(&net, &mut guest);
    eprintln!(
        "accelerator {}; eth0 up {:.2} s after boot; {rtt}",
        guest.accelerator(),
        guest.link_up_secs
    );
}

/// A new user's first contact: vhost-packet started without `--mac`, QEMU's device given its
/// own `mac=` (QEMU never tells a vhost-user backend that MAC). vhost-packet learns it from the
/// guest's first frame: ping and TCP both ways, nothing dropped as spoofed.
#[test]
fn guest_without_mac_option_learns_its_mac() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::without_mac(&[]);
    let mut guest = net.boot(&GuestOptions::default());
    ping_both_ways(&net, &mut guest);
    let (up, down) = tcp_both_ways(&mut guest);
    let log = net.daemon().log();
    assert_eq!(
        log.matches(&format!("guest MAC is {GUEST_MAC} (learned)"))
            .count(),
        1,
        "{log}"
    );
    assert_no_error_drops(&net.stats());
    eprintln!("learned MAC: guest->peer {up:.2} Gbit/s, peer->guest {down:.2} Gbit/s");
}

/// b) TCP bulk both ways with offloads on: TSO/GSO frames both ways, multi-buffer RX.
#[test]
fn guest_tcp_bulk_both_ways_with_offloads() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::default());
    for b in [
        bit::MRG_RXBUF,
        bit::GUEST_TSO4,
        bit::HOST_TSO4,
        bit::CSUM,
        bit::GUEST_CSUM,
    ] {
        assert!(
            guest.has(b),
            "feature bit {b} not acked: {:#x}",
            guest.features
        );
    }
    let (up, down) = tcp_both_ways(&mut guest);
    let stats = net.stats();
    eprintln!("guest->peer {up:.2} Gbit/s, peer->guest {down:.2} Gbit/s; {stats:?}");
    assert!(
        stats["tx.gso"] > 0,
        "no GSO frames from the guest: {stats:?}"
    );
    assert!(stats["rx.gso"] > 0, "no GSO frames to the guest: {stats:?}");
    assert!(
        stats["rx.multi_buffer"] > 0,
        "no multi-buffer RX: {stats:?}"
    );
    assert_no_error_drops(&stats);
}

/// c) MTU 9000 end to end: the device's host_mtu, the veth, and DF pings at full size.
#[test]
fn guest_mtu_9000_end_to_end() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(Some(9000), &["--mtu", "9000"]);
    let mut guest = net.boot(&GuestOptions {
        mtu: Some(9000),
        ..Default::default()
    });
    assert!(guest.has(bit::MTU), "MTU not acked: {:#x}", guest.features);
    let mtu = guest.sh_ok("cat /sys/class/net/eth0/mtu", CMD);
    assert_eq!(mtu.trim(), "9000");
    let out = guest.sh_ok(&format!("ping -M do -s 8972 -c 3 -W 5 {PEER_IP}"), CMD);
    assert!(out.contains(" 0% packet loss"), "{out}");
    let back = net.peer_ping(&["-M", "do", "-s", "8972", "-c", "3", "-W", "5", GUEST_IP]);
    assert!(back.contains(" 0% packet loss"), "{back}");
    // One byte more than the MTU must not pass with DF set.
    let (status, too_big) = guest.sh(&format!("ping -M do -s 8973 -c 1 -W 2 {PEER_IP}"), CMD);
    assert_ne!(status, 0, "a 9001-byte DF packet went out:\n{too_big}");
    assert_no_error_drops(&net.stats());
}

/// Waits until the guest can ping the peer again; returns how long it took.
fn wait_for_ping(guest: &mut Guest) -> Duration {
    let start = Instant::now();
    guest.sh_ok(
        &format!(
            "i=0; until ping -c 1 -W 1 {PEER_IP} >/dev/null; do \
             i=$((i + 1)); [ $i -lt 60 ] || exit 1; done"
        ),
        Duration::from_secs(120),
    );
    start.elapsed()
}

/// d) vhost-packet is killed (SIGKILL) in the middle of a TCP flow and started again: QEMU
/// reconnects, the flow and ping resume, the guest does not reboot.
#[test]
fn backend_killed_mid_flow_and_restarted() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let mut net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::default());
    guest.sh_ok(
        &format!("iperf3 -c {PEER_IP} -t 20 -f m >/tmp/flow.log 2>&1 & echo started"),
        CMD,
    );
    // Kill only once the flow is carrying data.
    let deadline = Instant::now() + Duration::from_secs(30);
    while net.stats()["tx.packets"] < 2000 {
        assert!(Instant::now() < deadline, "the flow never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = net.daemon.take().unwrap().kill();
    assert!(log.contains("connected"), "{log}");
    net.start_daemon();
    let resumed = wait_for_ping(&mut guest);
    // The flow that was cut resumes on the new backend and finishes cleanly.
    let flow = guest.sh_ok(
        "while pidof iperf3 >/dev/null; do sleep 1; done; cat /tmp/flow.log",
        Duration::from_secs(90),
    );
    assert!(!flow.contains("error"), "{flow}");
    assert!(flow.lines().any(|l| l.ends_with("receiver")), "{flow}");
    let stats = net.stats();
    assert!(
        stats["tx.packets"] > 1000,
        "no traffic after restart: {stats:?}"
    );
    let after = guest_iperf(&mut guest, PEER_IP, 2, true);
    assert_eq!(
        guest.console_text().matches("VP-INIT").count(),
        1,
        "the guest rebooted"
    );
    eprintln!(
        "ping resumed {:.1} s after restart; new flow {:.2} Gbit/s",
        resumed.as_secs_f64(),
        after.gbits
    );
}

/// d2) The guest reloads virtio_net three times: each time QEMU stops the rings
/// (GET_VRING_BASE) and sets them up again from index 0 on the same vhost-user connection.
/// eth0 is configured again after each reload; ping and TCP both ways work afterwards.
#[test]
fn guest_reloads_virtio_net_three_times() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::default());
    ping_both_ways(&net, &mut guest);
    let acks = |net: &GuestNet| {
        net.daemon()
            .log()
            .matches("frontend acked features")
            .count()
    };
    let acked_at_boot = acks(&net);
    let mut back = Vec::new();
    for round in 1..=3 {
        // `load` and `eth0_up` are /init's (qemu/guest-init.sh).
        guest.sh_ok("rmmod virtio_net && load virtio_net && eth0_up", CMD);
        back.push(wait_for_ping(&mut guest).as_secs_f64());
        assert!(
            acks(&net) > acked_at_boot + round - 1,
            "reload {round}: the rings were not set up again"
        );
    }
    let rtt = ping_both_ways(&net, &mut guest);
    let (up, down) = tcp_both_ways(&mut guest);
    let stats = net.stats();
    let log = net.daemon().log();
    assert_eq!(
        log.matches("frontend disconnected").count(),
        0,
        "the connection was kept: {log}"
    );
    assert_no_error_drops(&stats);
    eprintln!(
        "3 reloads: ping back after {back:.1?} s; {rtt}; guest->peer {up:.2} Gbit/s, \
         peer->guest {down:.2} Gbit/s; rx drops disabled {}",
        stats["rx.drops.disabled"]
    );
}

/// e) QEMU goes away and a new QEMU connects to the same vhost-packet.
#[test]
fn new_qemu_connects_to_running_backend() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let mut first = net.boot(&GuestOptions::default());
    ping_both_ways(&net, &mut first);
    first.stop();
    net.daemon()
        .wait_for_log("frontend disconnected", Duration::from_secs(10));
    let mut second = net.boot(&GuestOptions::default());
    ping_both_ways(&net, &mut second);
    let flow = guest_iperf(&mut second, PEER_IP, 2, false);
    let log = net.daemon().log();
    assert_eq!(log.matches("frontend disconnected").count(), 1, "{log}");
    eprintln!("second QEMU: {:.2} Gbit/s", flow.gbits);
}

/// f) A guest without mergeable RX buffers (big buffers): ping and TCP both ways; 64 KiB
/// frames still reach it, each in one chain.
#[test]
fn guest_without_mergeable_buffers() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::nic("mrg_rxbuf=off"));
    assert!(!guest.has(bit::MRG_RXBUF) && guest.has(bit::GUEST_TSO4));
    ping_both_ways(&net, &mut guest);
    let (up, down) = tcp_both_ways(&mut guest);
    let stats = net.stats();
    eprintln!("mrg_rxbuf=off: guest->peer {up:.2} Gbit/s, peer->guest {down:.2} Gbit/s");
    assert_eq!(stats["rx.multi_buffer"], 0, "{stats:?}");
    assert!(stats["rx.gso"] > 0, "{stats:?}");
    assert_no_error_drops(&stats);
}

/// f) A guest without checksum offload either way: the backend segments and checksums the
/// peer's GSO frames in software. QEMU 7.2 still offers GUEST_TSO4/6 here and Linux acks them,
/// but without GUEST_CSUM they do not count (a GSO frame's checksum is partial).
#[test]
fn guest_without_checksum_offload() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::nic("csum=off,guest_csum=off"));
    for b in [bit::CSUM, bit::GUEST_CSUM] {
        assert!(
            !guest.has(b),
            "feature bit {b} acked: {:#x}",
            guest.features
        );
    }
    ping_both_ways(&net, &mut guest);
    let (up, down) = tcp_both_ways(&mut guest);
    let stats = net.stats();
    eprintln!("csum=off,guest_csum=off: guest->peer {up:.2} Gbit/s, peer->guest {down:.2} Gbit/s");
    assert!(stats["rx.segmented"] > 0, "nothing segmented: {stats:?}");
    assert_eq!(stats["tx.gso"], 0, "{stats:?}");
    assert_no_error_drops(&stats);
}

/// TCP both ways over IPv4 and IPv6 (2 s each); returns the four rates in Gbit/s.
fn tcp_both_ways_v4_v6(guest: &mut Guest) -> [f64; 4] {
    let mut rates = [0.0; 4];
    for (i, (server, reverse)) in [
        (PEER_IP, false),
        (PEER_IP, true),
        (PEER_IP6, false),
        (PEER_IP6, true),
    ]
    .into_iter()
    .enumerate()
    {
        rates[i] = guest_iperf(guest, server, 2, reverse).gbits;
    }
    rates
}

/// Boots a guest with `nic` options, checks ping and TCP (IPv4 and IPv6) both ways, and
/// returns the guest and vhost-packet's counters.
fn offload_case(nic: &str) -> (Guest, GuestNet, HashMap<String, u64>) {
    let net = GuestNet::new(None, &[]);
    let mut guest = net.boot(&GuestOptions::nic(nic));
    ping_both_ways(&net, &mut guest);
    let rates = tcp_both_ways_v4_v6(&mut guest);
    let stats = net.stats();
    eprintln!(
        "{nic}: IPv4 up {:.2} down {:.2}, IPv6 up {:.2} down {:.2} Gbit/s; segmented {} csum_completed {}",
        rates[0], rates[1], rates[2], rates[3], stats["rx.segmented"], stats["rx.csum_completed"]
    );
    assert_no_error_drops(&stats);
    (guest, net, stats)
}

/// A guest without GUEST_TSO4/6: the peer's TSO frames are segmented for it (TCPv4, TCPv6).
#[test]
fn guest_without_guest_tso() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let (guest, _net, stats) = offload_case("guest_tso4=off,guest_tso6=off");
    assert!(!guest.has(bit::GUEST_TSO4) && !guest.has(bit::GUEST_TSO6));
    assert!(guest.has(bit::GUEST_CSUM));
    assert!(stats["rx.segmented"] > 0, "{stats:?}");
    assert_eq!(stats["rx.multi_buffer"], 0, "{stats:?}");
}

/// A guest without GUEST_CSUM (QEMU keeps GUEST_TSO4/6, which then do not count): frames
/// reach it segmented and with full checksums.
#[test]
fn guest_without_guest_csum() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let (guest, _net, stats) = offload_case("guest_csum=off");
    assert!(!guest.has(bit::GUEST_CSUM) && guest.has(bit::CSUM));
    assert!(stats["rx.segmented"] > 0, "{stats:?}");
    assert!(stats["tx.gso"] > 0, "the guest still sends TSO: {stats:?}");
}

/// A legacy (virtio 0.9.5) guest: no VERSION_1; with MRG_RXBUF its header is 12 bytes.
#[test]
fn legacy_guest_disable_modern() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let (guest, _net, stats) = offload_case("disable-modern=on");
    assert!(!guest.has(bit::VERSION_1) && guest.has(bit::MRG_RXBUF));
    assert!(stats["rx.gso"] > 0 && stats["tx.gso"] > 0, "{stats:?}");
}

/// A legacy guest without mergeable buffers: the 10-byte header.
#[test]
fn legacy_guest_without_mergeable_buffers() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let (guest, _net, stats) = offload_case("disable-modern=on,mrg_rxbuf=off");
    assert!(!guest.has(bit::VERSION_1) && !guest.has(bit::MRG_RXBUF));
    assert!(stats["rx.gso"] > 0 && stats["tx.gso"] > 0, "{stats:?}");
}

/// A VLAN sub-interface in the guest talks to a peer on VLAN 10. This host's kernel has no
/// 8021q, so the peer is a raw-socket responder that answers ARP and ICMP echo on VLAN 10 and
/// tags its replies. On the way to the guest the veth strips the tag (it reaches vhost-packet
/// only as PACKET_AUXDATA): without the backend putting it back, eth0.10 never sees a reply.
#[test]
fn guest_vlan_subinterface() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &[]);
    let responder = vlan::Responder::start(&net.peer, "vp0", 10, [198, 19, 10, 2]);
    let mut guest = net.boot(&GuestOptions::default());
    guest.sh_ok(
        "load 8021q && ip link add link eth0 name eth0.10 type vlan id 10 && \
         ip link set eth0.10 up && ip addr add 198.19.10.1/24 dev eth0.10",
        CMD,
    );
    let out = guest.sh_ok("ping -c 3 -W 5 198.19.10.2", CMD);
    assert!(out.contains(" 0% packet loss"), "{out}");
    let big = guest.sh_ok("ping -c 2 -s 1400 -W 5 198.19.10.2", CMD);
    assert!(big.contains(" 0% packet loss"), "{big}");
    let seen = responder.stop();
    assert!(seen.echoes >= 5 && seen.arps >= 1, "{seen:?}");
    let stats = net.stats();
    assert_no_error_drops(&stats);
    eprintln!("VLAN 10: {seen:?}");
}

mod vlan {
    //! A host on one VLAN, made of a packet socket: answers ARP for its address and ICMP echo
    //! requests that arrive with the VLAN's tag, and tags what it sends.

    use std::io::{IoSlice, IoSliceMut};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use crate::common::netns::NetNs;
    use crate::common::packets::{arp_reply, ethernet, ipv4, ETH_ARP, ETH_IPV4};
    use vhost_packet::packet::interface::Interface;
    use vhost_packet::packet::socket::{PacketSocket, SocketOptions};
    use vhost_packet::wire::checksum::Checksum;

    #[derive(Clone, Copy, Debug, Default)]
    pub struct Seen {
        pub arps: u32,
        pub echoes: u32,
        /// Frames of this VLAN that were neither.
        pub other: u32,
    }

    pub struct Responder {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Seen>,
    }

    impl Responder {
        pub fn start(ns: &NetNs, ifname: &str, vid: u16, ip: [u8; 4]) -> Responder {
            let mac = ns.mac(ifname);
            let name = ifname.to_owned();
            let sock = ns.enter_thread(move || {
                let iface = Interface::by_name(&name).unwrap();
                PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
            });
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread = std::thread::spawn(move || serve(&sock, &flag, vid, mac, ip));
            Responder { stop, thread }
        }

        pub fn stop(self) -> Seen {
            self.stop.store(true, Ordering::Relaxed);
            self.thread.join().expect("VLAN responder")
        }
    }

    /// `frame` with an 802.1Q tag inserted after the MAC addresses.
    fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
        let mut out = frame[..12].to_vec();
        out.extend_from_slice(&0x8100u16.to_be_bytes());
        out.extend_from_slice(&vid.to_be_bytes());
        out.extend_from_slice(&frame[12..]);
        out
    }

    fn serve(sock: &PacketSocket, stop: &AtomicBool, vid: u16, mac: [u8; 6], ip: [u8; 4]) -> Seen {
        let mut seen = Seen::default();
        let mut buf = vec![0u8; 70_000];
        let vnet = [0u8; 12];
        while !stop.load(Ordering::Relaxed) {
            let r = match sock.recv_vectored(&mut [IoSliceMut::new(&mut buf)]) {
                Ok(r) => r,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
            };
            // Frames this socket sent come back as outgoing; only tagged ones for our VLAN
            // matter (the tag arrives out of band, stripped by the veth).
            let Some(tag) = r.vlan else { continue };
            if tag.tci & 0x0fff != vid || r.len < 12 + 14 {
                continue;
            }
            let frame = &buf[12..r.len.min(buf.len())];
            let src: [u8; 6] = frame[6..12].try_into().unwrap();
            if src == mac {
                continue;
            }
            let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
            let l3 = &frame[14..];
            let reply = if ethertype == ETH_ARP && l3.len() >= 28 && l3[7] == 1 && l3[24..28] == ip
            {
                seen.arps += 1;
                let sender_ip: [u8; 4] = l3[14..18].try_into().unwrap();
                Some(arp_reply(mac, ip, src, sender_ip))
            } else if ethertype == ETH_IPV4 && l3.len() >= 28 && l3[9] == 1 && l3[16..20] == ip {
                let ihl = usize::from(l3[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([l3[2], l3[3]])).min(l3.len());
                let icmp = &l3[ihl..total];
                if icmp.first() == Some(&8) {
                    seen.echoes += 1;
                    let mut answer = icmp.to_vec();
                    answer[0] = 0;
                    answer[2..4].fill(0);
                    let mut c = Checksum::new();
                    c.add_bytes(&answer);
                    answer[2..4].copy_from_slice(&c.finish().to_be_bytes());
                    let peer: [u8; 4] = l3[12..16].try_into().unwrap();
                    Some(ethernet(src, mac, ETH_IPV4, &ipv4(ip, peer, 1, 0, &answer)))
                } else {
                    None
                }
            } else {
                None
            };
            match reply {
                Some(frame) => {
                    let out = tagged(&frame, vid);
                    sock.send_vectored(&[IoSlice::new(&vnet), IoSlice::new(&out)])
                        .expect("send a tagged reply");
                }
                None => seen.other += 1,
            }
        }
        seen
    }
}

/// The guest's and the peer's packet counters, read until two reads agree (no frame in
/// flight between the two sides' reads).
fn quiet_counters(net: &GuestNet, guest: &mut Guest) -> [u64; 4] {
    let read = |guest: &mut Guest| -> [u64; 4] {
        let out = guest.sh_ok(
            "cat /sys/class/net/eth0/statistics/tx_packets /sys/class/net/eth0/statistics/rx_packets",
            CMD,
        );
        let mut g = out.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        let (gtx, grx) = (g.next().unwrap(), g.next().unwrap());
        [
            gtx,
            grx,
            net.peer.link_counter("vp0", "rx_packets"),
            net.peer.link_counter("vp0", "tx_packets"),
        ]
    };
    let mut last = read(guest);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let now = read(guest);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("counters never settled: {last:?}");
}

/// Parallel TCP streams each way (`iperf3 -P`); fails on an iperf3 error.
fn parallel_tcp(guest: &mut Guest, streams: u32) {
    for r in ["", " -R"] {
        let out = guest.sh_ok(
            &format!("iperf3 -c {PEER_IP} -t 2 -P {streams}{r} -f m"),
            Duration::from_secs(90),
        );
        assert!(!out.contains("error"), "{out}");
    }
}

fn pair_packets(net: &GuestNet) -> Vec<(u64, u64)> {
    net.daemon()
        .stats_by_pair()
        .iter()
        .map(|s| (s["rx.packets"], s["tx.packets"]))
        .collect()
}

/// Two queue pairs in a booted guest: `ethtool -L eth0 combined 2`, parallel TCP streams both
/// ways spread over both pairs, the peer gets exactly what the guest sent and the guest exactly
/// what the peer sent (no duplicates, no loops); back to one pair, traffic carries on and pair
/// 1 receives nothing more.
#[test]
fn guest_with_two_queue_pairs() {
    if !require_guest() {
        return;
    }
    let _one = one_guest_at_a_time();
    let net = GuestNet::new(None, &["--queues", "2"]);
    let mut guest = net.boot(&GuestOptions {
        queues: 2,
        ..Default::default()
    });
    assert!(guest.has(bit::MQ), "MQ not acked: {:#x}", guest.features);
    // IPv6 chatter (MLD, ND) at random moments would only blur the exact counts below.
    guest.sh_ok("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6", CMD);
    net.peer
        .exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    guest.sh_ok("ethtool -L eth0 combined 2", CMD);
    let before = quiet_counters(&net, &mut guest);
    let drops_before = net.stats();
    // Flows are hashed to pairs: with 8 streams each way both pairs get some unless the hash
    // puts all 8 on one (1 in 128); another round makes that vanishingly unlikely.
    for _ in 0..3 {
        parallel_tcp(&mut guest, 8);
        let per_pair = pair_packets(&net);
        if per_pair.iter().all(|&(rx, tx)| rx > 0 && tx > 0) {
            break;
        }
    }
    let per_pair = pair_packets(&net);
    assert!(
        per_pair.iter().all(|&(rx, tx)| rx > 0 && tx > 0),
        "a pair carried nothing: {per_pair:?}"
    );
    let after = quiet_counters(&net, &mut guest);
    let stats = net.stats();
    let d = |i: usize| after[i] - before[i];
    let veth_drops =
        net.host.link_counter("vh0", "tx_dropped") + net.peer.link_counter("vp0", "rx_dropped");
    let rx_drops: u64 = stats
        .iter()
        .filter(|(k, _)| k.starts_with("rx.drops."))
        .map(|(k, v)| v - drops_before[k.as_str()])
        .sum();
    assert_eq!(
        d(2) + veth_drops,
        d(0),
        "peer received != guest sent: {stats:?}"
    );
    assert_eq!(
        d(1) + rx_drops,
        d(3),
        "guest received != peer sent: {stats:?}"
    );
    assert_no_error_drops(&stats);
    eprintln!(
        "2 pairs (rx, tx) per pair: {per_pair:?}; guest sent {}, received {}",
        d(0),
        d(1)
    );

    // Back to one pair: QEMU disables pair 1 (SET_VRING_ENABLE); its flows move to pair 0.
    guest.sh_ok("ethtool -L eth0 combined 1", CMD);
    let one = pair_packets(&net);
    parallel_tcp(&mut guest, 8);
    let later = pair_packets(&net);
    assert_eq!(later[1].0, one[1].0, "a disabled pair received frames");
    assert!(
        later[0].0 > one[0].0 && later[0].1 > one[0].1,
        "{one:?} -> {later:?}"
    );
    eprintln!("1 pair: {one:?} -> {later:?}");
}
