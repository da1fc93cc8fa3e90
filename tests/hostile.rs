//! The real daemon against a malicious frontend: every descriptor, length, address, index and
//! header field the guest controls, bent out of shape. For each case the daemon must stay up (same
//! PID), count the bad chain, give it back with used length 0 when its id names a descriptor,
//! never touch bytes outside what the guest offered (or in the wrong direction), not spin, and
//! afterwards serve the same connection (a ping both ways) and a new one.
//!
//! Needs root (namespaces); under CI=true missing tools fail the test. Case names say what the
//! guest does; the runners (`tx_hostile`, `rx_hostile`) say what the daemon must do about it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::frontend::{
    feat, hdr as vhdr, vnet_header, FrontendConfig, Queue, RawDesc, TestFrontend, TxLayout,
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RX_POISON,
};
use common::netns::{require_root_and_tools, veth_pair, NetNs};
use common::packets::*;
use vhost_packet::packet::interface::Interface;
use vhost_packet::packet::socket::{PacketSocket, SocketOptions};

const T: Duration = Duration::from_secs(5);
/// Queue size of every test guest: small, so that "longer than the queue" is cheap to build.
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 64 << 20;
const HDR: usize = 12;

/// Offloads a Linux guest asks for.
const GUEST_FEATURES: u64 = feat::LINUX_GUEST;

/// Every frame a hostile chain carries starts its payload with this, so the peer can tell
/// whether any of it got out.
const HOSTILE_TAG: &[u8] = b"HOSTILE-CHAIN-";

// ---------------------------------------------------------------------------------------------
// Rig: a host namespace with the daemon on vh0, a peer namespace with a kernel stack on vp0.
// ---------------------------------------------------------------------------------------------

struct Rig {
    daemon: Daemon,
    peer_mac: [u8; 6],
    // Dropped last: the daemon dies before its namespaces go.
    peer: NetNs,
    host: NetNs,
}

fn rig() -> Option<Rig> {
    rig_with(&[])
}

/// A rig whose daemon gets `extra` options too.
fn rig_with(extra: &[&str]) -> Option<Rig> {
    if !require_root_and_tools(&["ip", "ethtool"]) {
        return None;
    }
    let host = NetNs::new("vhh");
    let peer = NetNs::new("vhp");
    veth_pair(&host, "vh0", &peer, "vp0");
    peer.add_addr("vp0", "198.18.0.2/24");
    peer.add_neigh("vp0", "198.18.0.1", "02:00:00:00:00:01");
    let peer_mac = peer.mac("vp0");
    let mut args = vec!["--mac", "02:00:00:00:00:01"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&host, "vh0", &args);
    Some(Rig {
        daemon,
        peer_mac,
        peer,
        host,
    })
}

/// A connected guest with `rx_buffers` 1536-byte RX buffers posted (re-posted as they are used).
fn guest(socket: &std::path::Path, features: u64, rx_buffers: usize) -> TestFrontend {
    let mut fe = TestFrontend::connect(socket, T);
    fe.start(FrontendConfig {
        features,
        queue_size: QSIZE,
        mem_size: MEM_SIZE,
    });
    fe.post_rx_buffers(rx_buffers, 1536);
    fe.set_rx_autorefill(true);
    fe.kick_rx();
    fe
}

/// A packet socket on the peer's vp0: injects frames towards the guest, captures what arrives.
fn peer_socket(rig: &Rig) -> PacketSocket {
    rig.peer.enter_thread(|| {
        let iface = Interface::by_name("vp0").unwrap();
        PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
    })
}

/// Sends `frame` from the peer towards the guest (zero virtio header).
fn inject(sock: &PacketSocket, frame: &[u8]) {
    sock.send_vectored(&[
        std::io::IoSlice::new(&[0u8; HDR]),
        std::io::IoSlice::new(frame),
    ])
    .expect("inject a frame at the peer");
}

/// Next frame on a peer capture socket that satisfies `want`, without its vnet header.
fn capture(sock: &PacketSocket, mut want: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + T;
    let mut buf = vec![0u8; 70000];
    while Instant::now() < deadline {
        match sock.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
            Ok(r) => {
                let frame = &buf[HDR..r.len.min(buf.len())];
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

fn is_hostile(frame: &[u8]) -> bool {
    frame.len() >= 14 + HOSTILE_TAG.len()
        && frame[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
        && &frame[14..14 + HOSTILE_TAG.len()] == HOSTILE_TAG
}

/// The frame a hostile TX chain carries: valid in itself, from the guest's MAC, tagged.
fn hostile_frame(peer_mac: [u8; 6], len: usize) -> Vec<u8> {
    let mut payload = HOSTILE_TAG.to_vec();
    payload.extend_from_slice(&pattern(len - 14 - HOSTILE_TAG.len(), len as u32));
    ethernet(peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &payload)
}

/// Receives until `want` matches a frame (answering ARP on the way).
fn recv_matching(
    fe: &mut TestFrontend,
    want: impl Fn(&[u8]) -> bool,
) -> Option<common::frontend::RxPacket> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if let Some(p) = fe.recv(Duration::from_millis(100)) {
            if want(&p.frame) {
                return Some(p);
            }
            answer_arp(fe, &p.frame);
        }
    }
    None
}

/// ICMP echo to the peer's kernel and its reply back: both directions of this connection.
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
}

/// The last `n` lines of the daemon's log, for failure messages (a flood would be unreadable).
fn log_tail(rig: &Rig, n: usize) -> String {
    let log = rig.daemon.log();
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(n);
    format!(
        "--- last {} of {} log lines ---\n{}",
        lines.len() - from,
        lines.len(),
        lines[from..].join("\n")
    )
}

/// Counters that changed, except the ones that move with any traffic.
fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> BTreeMap<String, i64> {
    after
        .iter()
        .filter(|(k, _)| !k.ends_with("kicks") && !k.ends_with("notifications"))
        .map(|(k, &v)| {
            (
                k.clone(),
                v as i64 - before.get(k).copied().unwrap_or(0) as i64,
            )
        })
        .filter(|&(_, d)| d != 0)
        .collect()
}

/// Polls the counters until `key` reaches `at_least`; for chains that leave no used entry.
fn wait_counter(rig: &Rig, key: &str, at_least: u64) -> HashMap<String, u64> {
    let deadline = Instant::now() + T;
    loop {
        let s = rig.daemon.stats();
        if s[key] >= at_least || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The spin detector. A daemon with nothing to do sleeps in epoll_wait and uses next to no CPU;
/// one that loops over a wedged queue burns a CPU. This looks at how much CPU the daemon
/// *consumed* over two seconds in which it has no work, not at how long anything took, so the
/// rule "tests never assert on timings" is kept: a slow machine makes nothing here fail. The
/// bound, a quarter of one CPU, is generous against an idle daemon (a few ms at most) and still
/// catches a spinning worker when parallel tests leave it only part of a CPU (on two CPUs a
/// spinning worker was measured at 1.3 s of 2 s).
fn assert_not_spinning(rig: &Rig, what: &str) {
    let before = rig.daemon.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let used = rig.daemon.cpu_time().saturating_sub(before);
    assert!(
        used < Duration::from_millis(500),
        "{what}: the idle daemon used {used:?} of CPU in 2 s: it spins\n{}",
        log_tail(rig, 15)
    );
}

/// The daemon survived: same process, not spinning, no panic logged, and this connection still
/// carries traffic both ways.
fn still_serving(rig: &Rig, fe: &mut TestFrontend, pid: u32, what: &str) {
    assert!(
        rig.daemon.is_running(),
        "{what}: the daemon died\n{}",
        log_tail(rig, 30)
    );
    assert_eq!(rig.daemon.pid(), pid, "{what}: same process");
    assert_not_spinning(rig, what);
    ping(fe, rig.peer_mac, 1);
    assert!(
        !rig.daemon.log().contains("panicked"),
        "{what}: a thread panicked\n{}",
        log_tail(rig, 30)
    );
}

/// Drops `fe` and waits until the daemon has let go of the connection's rings and memory (it
/// logs that), failing at once if it died.
fn disconnect(rig: &Rig, fe: TestFrontend, what: &str) {
    let connected = rig.daemon.log().matches("frontend connected").count();
    drop(fe);
    let deadline = Instant::now() + T;
    while rig
        .daemon
        .log()
        .matches("connection closed: queue pair 0")
        .count()
        < connected
    {
        assert!(
            Instant::now() < deadline && rig.daemon.is_running(),
            "{what}: the daemon never finished closing the connection\n{}",
            log_tail(rig, 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drops the hostile connection and checks a new one works, without hanging the test if the
/// daemon is wedged.
fn new_connection_works(rig: &Rig, fe: TestFrontend, pid: u32, what: &str) {
    disconnect(rig, fe, what);
    let socket = rig.daemon.socket.clone();
    let peer_mac = rig.peer_mac;
    // On its own thread: a wedged daemon would leave the vhost-user handshake blocked forever.
    let fresh = std::thread::spawn(move || {
        let mut fe = guest(&socket, GUEST_FEATURES, 64);
        ping(&mut fe, peer_mac, 2);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fresh.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what}: a new connection did not get a ping through in 30 s\n{}",
            log_tail(rig, 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(panic) = fresh.join() {
        eprintln!("{what}: new connection failed\n{}", log_tail(rig, 30));
        std::panic::resume_unwind(panic);
    }
    assert_eq!(rig.daemon.pid(), pid, "{what}: same process");
    assert!(rig.daemon.is_running(), "{what}: still running");
}

// ---------------------------------------------------------------------------------------------
// Building hostile chains
// ---------------------------------------------------------------------------------------------

fn rd(addr: u64, len: u32, flags: u16) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags,
        next: 0,
    }
}

fn encode(d: &RawDesc) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    b
}

/// Links table entries in order: NEXT to entry i + 1 on all but the last.
fn linked(descs: &[RawDesc]) -> Vec<RawDesc> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut d = *d;
            if i + 1 < n {
                d.flags |= DESC_F_NEXT;
                d.next = (i + 1) as u16;
            }
            d
        })
        .collect()
}

/// Writes descriptors, buffers and indirect tables straight into guest memory, and remembers
/// every buffer it wrote so that the test can check the daemon left them alone.
struct Build<'a> {
    fe: &'a mut TestFrontend,
    q: Queue,
    watched: Vec<(u64, Vec<u8>)>,
}

impl<'a> Build<'a> {
    fn new(fe: &'a mut TestFrontend, q: Queue) -> Build<'a> {
        Build {
            fe,
            q,
            watched: Vec::new(),
        }
    }

    fn mem_end(&self) -> u64 {
        self.fe.guest_mem_size()
    }

    /// A buffer holding `data`.
    fn buf(&mut self, data: &[u8]) -> u64 {
        let gpa = self.fe.alloc_buffer(data.len().max(1) as u32);
        self.fe.write_guest(gpa, data);
        self.watched.push((gpa, data.to_vec()));
        gpa
    }

    /// A buffer of `len` poison bytes (what RX buffers hold before the device writes).
    fn poison(&mut self, len: u32) -> u64 {
        self.buf(&vec![RX_POISON; len as usize])
    }

    /// A descriptor whose buffer holds `data` (read-only).
    fn readable(&mut self, data: &[u8]) -> RawDesc {
        rd(self.buf(data), data.len() as u32, 0)
    }

    /// A write-only descriptor over `len` poison bytes.
    fn writable(&mut self, len: u32) -> RawDesc {
        rd(self.poison(len), len, DESC_F_WRITE)
    }

    fn slot(&mut self) -> u16 {
        self.fe
            .raw_alloc_desc(self.q)
            .expect("a free descriptor slot")
    }

    /// Writes `d` into a fresh slot; returns its index.
    fn put(&mut self, d: RawDesc) -> u16 {
        self.fe.raw_add_descriptor(self.q, d)
    }

    /// Writes `d` into slot `index`.
    fn put_at(&mut self, index: u16, d: RawDesc) {
        self.fe.raw_write_desc(self.q, index, d);
    }

    /// The descriptors as one chain in the ring, linked with NEXT in order; returns the head.
    fn chain(&mut self, descs: &[RawDesc]) -> u16 {
        let slots: Vec<u16> = descs.iter().map(|_| self.slot()).collect();
        for (i, d) in descs.iter().enumerate() {
            let mut d = *d;
            if let Some(&next) = slots.get(i + 1) {
                d.flags |= DESC_F_NEXT;
                d.next = next;
            }
            self.put_at(slots[i], d);
        }
        slots[0]
    }

    /// An indirect table holding exactly `entries` (no links added); returns (address, length).
    fn table(&mut self, entries: &[RawDesc]) -> (u64, u32) {
        let bytes: Vec<u8> = entries.iter().flat_map(encode).collect();
        let gpa = self.buf(&bytes);
        (gpa, bytes.len() as u32)
    }

    /// One ring descriptor pointing at an indirect table of `entries`, linked in order.
    fn indirect(&mut self, entries: &[RawDesc]) -> u16 {
        let (gpa, len) = self.table(&linked(entries));
        self.put(rd(gpa, len, DESC_F_INDIRECT))
    }
}

/// Every buffer a refused chain named still holds what the guest put there.
fn assert_untouched(fe: &TestFrontend, watched: &[(u64, Vec<u8>)], what: &str) {
    for (gpa, data) in watched {
        let now = fe.read_guest(*gpa, data.len());
        let changed = now.iter().zip(data).filter(|(a, b)| a != b).count();
        assert_eq!(
            changed, 0,
            "{what}: the daemon changed {changed} bytes of the guest buffer at {gpa:#x}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------------------------

/// A hostile TX chain. `build` gets the bytes a well-formed chain would carry (header and a
/// tagged frame) and returns the id to put in the avail ring.
///
/// The daemon must: count it in `tx.drops.malformed` (once, and nothing else), give it back with
/// used length 0 if the id names a descriptor (nothing otherwise), send none of it (checked at the
/// peer up to a marker frame sent after it), write none of its buffers, and stay healthy.
fn tx_hostile(what: &str, build: impl FnOnce(&mut Build, &[u8]) -> u16) {
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    let before = rig.daemon.stats();

    let mut bytes = plain_header(&fe);
    bytes.extend_from_slice(&hostile_frame(rig.peer_mac, 100));
    let mut b = Build::new(&mut fe, Queue::Tx);
    let head = build(&mut b, &bytes);
    let watched = std::mem::take(&mut b.watched);
    fe.raw_push_avail(Queue::Tx, head);
    fe.kick_tx();

    let after = if head < QSIZE {
        let used = fe.wait_tx_used(1, T);
        let s = rig.daemon.stats();
        assert_eq!(
            used,
            [(u32::from(head), 0)],
            "{what}: the chain comes back with used length 0; counters moved {:?}\n{}",
            delta(&before, &s),
            log_tail(&rig, 10)
        );
        s
    } else {
        wait_counter(&rig, "tx.drops.malformed", before["tx.drops.malformed"] + 1)
    };
    let d = delta(&before, &after);
    assert_eq!(
        d,
        BTreeMap::from([("tx.drops.malformed".to_string(), 1)]),
        "{what}: counted once as malformed, and nothing else (no packet, no other drop)\n{}",
        log_tail(&rig, 10)
    );

    // Nothing of it left: the peer sees no tagged frame before a marker sent after it.
    let marker = ethernet(
        rig.peer_mac,
        GUEST_MAC,
        ETH_EXPERIMENTAL,
        b"MARKER-after-the-hostile-chain",
    );
    let h = plain_header(&fe);
    send_frame(&mut fe, &h, &marker);
    let mut leaked = 0;
    capture(&cap, |f| {
        leaked += usize::from(is_hostile(f));
        f == &marker[..]
    })
    .unwrap_or_else(|| panic!("{what}: a good frame after the hostile chain reaches the peer"));
    assert_eq!(
        leaked, 0,
        "{what}: bytes of the refused chain reached the wire"
    );
    assert_untouched(&fe, &watched, what);

    still_serving(&rig, &mut fe, pid, what);
    new_connection_works(&rig, fe, pid, what);
}

/// A hostile RX chain, posted as the only RX buffer. `build` returns the id for the avail ring.
///
/// The daemon must: count it in `rx.drops.bad_chain` (once), give it back with used length 0 if
/// the id names a descriptor, never write into it (a frame arriving later goes to the good
/// buffers posted after it), and stay healthy.
fn rx_hostile(what: &str, build: impl FnOnce(&mut Build) -> u16) {
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 0);
    let pid = rig.daemon.pid();
    let before = rig.daemon.stats();

    let mut b = Build::new(&mut fe, Queue::Rx);
    let head = build(&mut b);
    let watched = std::mem::take(&mut b.watched);
    fe.raw_push_avail(Queue::Rx, head);
    fe.kick_rx();

    let after = if head < QSIZE {
        let used = fe.wait_used(Queue::Rx, 1, T);
        let s = rig.daemon.stats();
        if used.is_empty() {
            // Kept as a good buffer. Show what the daemon then does with it.
            let frame = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(986, 1));
            inject(&peer_socket(&rig), &frame);
            let then = fe.wait_used(Queue::Rx, 1, T);
            panic!(
                "{what}: the chain was not refused (no used entry, counters moved {:?}); a \
                 1000-byte frame injected next came back as used entries {then:?} \
                 (id, len), counters then moved {:?}\n{}",
                delta(&before, &s),
                delta(&before, &rig.daemon.stats()),
                log_tail(&rig, 10)
            );
        }
        assert_eq!(
            used,
            [(u32::from(head), 0)],
            "{what}: the chain comes back with used length 0; counters moved {:?}\n{}",
            delta(&before, &s),
            log_tail(&rig, 10)
        );
        s
    } else {
        wait_counter(&rig, "rx.drops.bad_chain", before["rx.drops.bad_chain"] + 1)
    };
    let d = delta(&before, &after);
    assert_eq!(
        d,
        BTreeMap::from([("rx.drops.bad_chain".to_string(), 1)]),
        "{what}: counted once as a bad chain, and nothing else\n{}",
        log_tail(&rig, 10)
    );

    // Good buffers after it; the ping's reply must land there, not in the refused chain.
    fe.post_rx_buffers(64, 1536);
    fe.kick_rx();
    still_serving(&rig, &mut fe, pid, what);
    assert_untouched(&fe, &watched, what);
    new_connection_works(&rig, fe, pid, what);
}

// ---------------------------------------------------------------------------------------------
// TX: addresses and lengths
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_descriptor_outside_guest_memory() {
    tx_hostile("TX descriptor outside guest memory", |b, bytes| {
        let end = b.mem_end();
        b.put(rd(end + 0x10000, bytes.len() as u32, 0))
    });
}

#[test]
fn tx_descriptor_straddling_the_end_of_guest_memory() {
    tx_hostile("TX descriptor straddling the end of memory", |b, bytes| {
        // The first 64 bytes are real guest memory holding the start of the frame.
        let at = b.mem_end() - 64;
        b.fe.write_guest(at, &bytes[..64]);
        b.put(rd(at, bytes.len() as u32, 0))
    });
}

#[test]
fn tx_descriptor_after_a_good_one_outside_memory() {
    tx_hostile("TX second descriptor outside memory", |b, bytes| {
        let first = b.readable(&bytes[..40]);
        let end = b.mem_end();
        b.chain(&[first, rd(end + 4096, (bytes.len() - 40) as u32, 0)])
    });
}

#[test]
fn tx_descriptor_address_near_u64_max() {
    tx_hostile("TX address u64::MAX - 63 (wraps past zero)", |b, bytes| {
        b.put(rd(u64::MAX - 63, bytes.len() as u32, 0))
    });
}

#[test]
fn tx_descriptor_address_and_length_at_their_maximum() {
    tx_hostile("TX address u64::MAX, length u32::MAX", |b, _| {
        b.put(rd(u64::MAX, u32::MAX, 0))
    });
}

#[test]
fn tx_descriptor_length_u32_max() {
    tx_hostile("TX length u32::MAX at a valid address", |b, bytes| {
        let d = b.readable(bytes);
        b.put(rd(d.addr, u32::MAX, 0))
    });
}

#[test]
fn tx_two_descriptors_of_two_gib() {
    tx_hostile("TX 2 GiB + 2 GiB (sum is 2^32)", |b, bytes| {
        let d = b.readable(bytes);
        b.chain(&[rd(d.addr, 0x8000_0000, 0), rd(d.addr, 0x8000_0000, 0)])
    });
}

#[test]
fn tx_lengths_summing_past_u32_max_after_a_complete_frame() {
    // The first descriptor alone is a valid frame; the second makes the chain's total overflow
    // u32. Sending the first alone would be sending a chain the guest never built.
    tx_hostile(
        "TX frame, then a descriptor whose length overflows the total",
        |b, bytes| {
            let first = b.readable(bytes);
            let second = b.readable(&[0u8; 64]);
            b.chain(&[first, rd(second.addr, u32::MAX - 64, 0)])
        },
    );
}

// ---------------------------------------------------------------------------------------------
// TX: chain structure
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_chain_looping_onto_itself() {
    tx_hostile(
        "TX chain whose last descriptor points at itself",
        |b, bytes| {
            let first = b.readable(bytes);
            let tail = b.readable(&[0x55]);
            let (h, t) = (b.slot(), b.slot());
            b.put_at(
                h,
                RawDesc {
                    next: t,
                    flags: DESC_F_NEXT,
                    ..first
                },
            );
            b.put_at(
                t,
                RawDesc {
                    next: t,
                    flags: DESC_F_NEXT,
                    ..tail
                },
            );
            h
        },
    );
}

#[test]
fn tx_chain_looping_back_to_an_earlier_descriptor() {
    tx_hostile("TX chain a -> b -> c -> b", |b, bytes| {
        let first = b.readable(bytes);
        let x = b.readable(&[0x55]);
        let y = b.readable(&[0x66]);
        let (h, s1, s2) = (b.slot(), b.slot(), b.slot());
        let link = |d: RawDesc, next| RawDesc {
            next,
            flags: DESC_F_NEXT,
            ..d
        };
        b.put_at(h, link(first, s1));
        b.put_at(s1, link(x, s2));
        b.put_at(s2, link(y, s1));
        h
    });
}

#[test]
fn tx_chain_looping_back_to_its_head() {
    tx_hostile("TX chain a -> b -> a", |b, bytes| {
        let head = b.readable(bytes);
        let back = b.readable(&[0x55]);
        let (h, s) = (b.slot(), b.slot());
        b.put_at(
            h,
            RawDesc {
                next: s,
                flags: DESC_F_NEXT,
                ..head
            },
        );
        b.put_at(
            s,
            RawDesc {
                next: h,
                flags: DESC_F_NEXT,
                ..back
            },
        );
        h
    });
}

#[test]
fn tx_chain_longer_than_the_queue() {
    // Only an indirect table can hold more descriptors than the queue without a loop; the spec
    // forbids it all the same ("A driver MUST NOT create a descriptor chain longer than the
    // Queue Size of the device", 2.7.5.3.1).
    tx_hostile(
        "TX chain of queue size + 1 descriptors (indirect)",
        |b, bytes| {
            let mut entries = vec![b.readable(bytes)];
            let one = b.readable(&[0x77]);
            entries.extend(vec![one; usize::from(QSIZE)]);
            b.indirect(&entries)
        },
    );
}

#[test]
fn tx_next_index_beyond_the_queue() {
    tx_hostile("TX descriptor whose next is queue size + 5", |b, bytes| {
        let d = b.readable(bytes);
        b.put(RawDesc {
            next: QSIZE + 5,
            flags: DESC_F_NEXT,
            ..d
        })
    });
}

#[test]
fn tx_next_index_u16_max() {
    tx_hostile("TX descriptor whose next is 65535", |b, bytes| {
        let d = b.readable(bytes);
        b.put(RawDesc {
            next: u16::MAX,
            flags: DESC_F_NEXT,
            ..d
        })
    });
}

#[test]
fn tx_chain_of_zero_length_descriptors_only() {
    tx_hostile("TX chain of three zero-length descriptors", |b, bytes| {
        let d = b.readable(bytes);
        b.chain(&[rd(d.addr, 0, 0), rd(d.addr, 0, 0), rd(u64::MAX, 0, 0)])
    });
}

#[test]
fn tx_chain_shorter_than_header_and_ethernet_header() {
    tx_hostile("TX chain of 12 + 13 bytes", |b, bytes| {
        let h = b.readable(&bytes[..HDR]);
        let f = b.readable(&bytes[HDR..HDR + 13]);
        b.chain(&[h, f])
    });
}

#[test]
fn tx_chain_shorter_than_the_header() {
    tx_hostile("TX chain of 11 bytes", |b, bytes| {
        let d = b.readable(&bytes[..11]);
        b.put(d)
    });
}

// ---------------------------------------------------------------------------------------------
// TX: direction
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_write_only_descriptor() {
    tx_hostile("TX chain of one write-only descriptor", |b, bytes| {
        let d = b.readable(bytes);
        b.put(RawDesc {
            flags: DESC_F_WRITE,
            ..d
        })
    });
}

#[test]
fn tx_readable_then_write_only() {
    // The header and the start of the frame are readable, the rest is marked write-only: the
    // daemon must not read (and so not send) any of it.
    tx_hostile("TX readable descriptor then write-only", |b, bytes| {
        let first = b.readable(&bytes[..40]);
        let rest = b.readable(&bytes[40..]);
        b.chain(&[
            first,
            RawDesc {
                flags: DESC_F_WRITE,
                ..rest
            },
        ])
    });
}

#[test]
fn tx_write_only_then_readable() {
    tx_hostile("TX write-only descriptor then readable", |b, bytes| {
        let first = b.readable(&bytes[..HDR]);
        let rest = b.readable(&bytes[HDR..]);
        b.chain(&[
            RawDesc {
                flags: DESC_F_WRITE,
                ..first
            },
            rest,
        ])
    });
}

#[test]
fn tx_write_only_zero_length_descriptor_in_a_good_chain() {
    tx_hostile(
        "TX readable, write-only zero-length, readable",
        |b, bytes| {
            let first = b.readable(&bytes[..HDR]);
            let rest = b.readable(&bytes[HDR..]);
            b.chain(&[first, rd(rest.addr, 0, DESC_F_WRITE), rest])
        },
    );
}

// ---------------------------------------------------------------------------------------------
// TX: indirect tables
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_indirect_table_length_not_a_multiple_of_16() {
    tx_hostile("TX indirect table of 24 bytes", |b, bytes| {
        let d = b.readable(bytes);
        let (gpa, _) = b.table(&[d, d]);
        b.put(rd(gpa, 24, DESC_F_INDIRECT))
    });
}

#[test]
fn tx_indirect_table_of_zero_length() {
    tx_hostile("TX indirect table of 0 bytes", |b, bytes| {
        let d = b.readable(bytes);
        let (gpa, _) = b.table(&[d]);
        b.put(rd(gpa, 0, DESC_F_INDIRECT))
    });
}

#[test]
fn tx_indirect_table_outside_guest_memory() {
    tx_hostile("TX indirect table outside memory", |b, _| {
        let end = b.mem_end();
        b.put(rd(end + 0x1000, 32, DESC_F_INDIRECT))
    });
}

#[test]
fn tx_indirect_table_at_u64_max() {
    tx_hostile("TX indirect table at u64::MAX - 15", |b, _| {
        b.put(rd(u64::MAX - 15, 32, DESC_F_INDIRECT))
    });
}

#[test]
fn tx_indirect_table_straddling_the_end_of_guest_memory() {
    // Entry 0 (a complete frame, NEXT -> 1) is the last 16 bytes of guest memory; entry 1 is
    // past the end.
    tx_hostile(
        "TX indirect table straddling the end of memory",
        |b, bytes| {
            let d = b.readable(bytes);
            let at = b.mem_end() - 16;
            b.fe.write_guest(
                at,
                &encode(&RawDesc {
                    flags: DESC_F_NEXT,
                    next: 1,
                    ..d
                }),
            );
            b.put(rd(at, 32, DESC_F_INDIRECT))
        },
    );
}

#[test]
fn tx_indirect_entry_outside_guest_memory() {
    tx_hostile("TX indirect table entry outside memory", |b, bytes| {
        let first = b.readable(&bytes[..HDR]);
        let end = b.mem_end();
        b.indirect(&[first, rd(end, (bytes.len() - HDR) as u32, 0)])
    });
}

#[test]
fn tx_indirect_entry_write_only() {
    tx_hostile("TX indirect table with a write-only entry", |b, bytes| {
        let first = b.readable(&bytes[..HDR]);
        let rest = b.readable(&bytes[HDR..]);
        b.indirect(&[
            first,
            RawDesc {
                flags: DESC_F_WRITE,
                ..rest
            },
        ])
    });
}

#[test]
fn tx_nested_indirect_table_first() {
    tx_hostile(
        "TX indirect table whose first entry is indirect",
        |b, bytes| {
            let d = b.readable(bytes);
            let (inner, len) = b.table(&[d]);
            b.indirect(&[rd(inner, len, DESC_F_INDIRECT)])
        },
    );
}

#[test]
fn tx_nested_indirect_table_after_a_complete_frame() {
    tx_hostile(
        "TX indirect table: frame, then a nested table",
        |b, bytes| {
            let d = b.readable(bytes);
            let one = b.readable(&[0x77]);
            let (inner, len) = b.table(&[one]);
            b.indirect(&[d, rd(inner, len, DESC_F_INDIRECT)])
        },
    );
}

#[test]
fn tx_indirect_descriptor_with_next_flag() {
    // "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT" (2.7.5.3.1).
    tx_hostile("TX indirect descriptor with NEXT set", |b, bytes| {
        let d = b.readable(bytes);
        let (table, len) = b.table(&[d]);
        let one = b.readable(&[0x77]);
        let tail = b.put(one);
        b.put(RawDesc {
            addr: table,
            len,
            flags: DESC_F_INDIRECT | DESC_F_NEXT,
            next: tail,
        })
    });
}

#[test]
fn tx_direct_descriptors_then_an_indirect_table_go_through() {
    // Valid, however odd: "The device MUST handle the case of zero or more normal chained
    // descriptors followed by a single descriptor with flags&VIRTQ_DESC_F_INDIRECT" (2.7.5.3.2),
    // and must ignore the WRITE flag of the descriptor that refers to the table.
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    let frame = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(400, 8));
    let mut bytes = plain_header(&fe);
    bytes.extend_from_slice(&frame);
    let mut b = Build::new(&mut fe, Queue::Tx);
    let h1 = b.readable(&bytes[..5]);
    let h2 = b.readable(&bytes[5..HDR + 2]);
    let f1 = b.readable(&bytes[HDR + 2..100]);
    let f2 = b.readable(&bytes[100..]);
    let (table, len) = b.table(&linked(&[f1, f2]));
    let head = b.chain(&[h1, h2, rd(table, len, DESC_F_INDIRECT | DESC_F_WRITE)]);
    fe.raw_push_avail(Queue::Tx, head);
    fe.kick_tx();
    assert_eq!(fe.wait_tx_used(1, T), [(u32::from(head), 0)]);
    let got = capture(&cap, |f| {
        f.len() > 30 && f[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
    })
    .unwrap_or_else(|| panic!("never reached the peer: {:?}", rig.daemon.stats()));
    assert_eq!(got, frame, "byte for byte at the peer");
    still_serving(&rig, &mut fe, pid, "direct then indirect");
}

// ---------------------------------------------------------------------------------------------
// TX: the avail ring
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_avail_entry_naming_the_queue_size() {
    tx_hostile("TX avail entry = queue size", |_, _| QSIZE);
}

#[test]
fn tx_avail_entry_naming_u16_max() {
    tx_hostile("TX avail entry = 65535", |_, _| u16::MAX);
}

// ---------------------------------------------------------------------------------------------
// TX: layouts that are odd but valid must go through byte for byte
// ---------------------------------------------------------------------------------------------

/// Sends each (frame, layout) and checks the peer receives exactly that frame.
fn tx_goes_through(
    rig: &Rig,
    fe: &mut TestFrontend,
    cap: &PacketSocket,
    cases: &[(Vec<u8>, TxLayout)],
) {
    let h = plain_header(fe);
    for (frame, layout) in cases {
        fe.send(&h, frame, layout.clone());
        fe.kick_tx();
        let used = fe.wait_tx_used(1, T);
        assert_eq!(used.len(), 1, "{layout:?}: chain returned");
        let got = capture(cap, |f| {
            f.len() > 30 && f[12..14] == ETH_EXPERIMENTAL.to_be_bytes()
        })
        .unwrap_or_else(|| {
            panic!(
                "{layout:?}: the frame never reached the peer; counters {:?}",
                rig.daemon.stats()
            )
        });
        assert_eq!(&got, frame, "{layout:?}: byte for byte at the peer");
    }
}

#[test]
fn tx_header_split_at_every_byte_offset_goes_through() {
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    let mut cases = Vec::new();
    for k in 1..HDR {
        let frame = |n: u32| {
            ethernet(
                rig.peer_mac,
                GUEST_MAC,
                ETH_EXPERIMENTAL,
                &pattern(200 + k, 1000 * n + k as u32),
            )
        };
        // Header split at k, frame glued to the rest of the header.
        cases.push((frame(1), TxLayout::SplitAt(vec![k])));
        // Header split at k and ending its own descriptor.
        cases.push((frame(2), TxLayout::SplitAt(vec![k, HDR])));
        // Header split at k, then the frame split inside its MAC addresses.
        cases.push((frame(3), TxLayout::SplitAt(vec![k, HDR + 3, HDR + 9])));
        // The same through an indirect table.
        cases.push((frame(4), TxLayout::IndirectSplitAt(vec![k])));
    }
    tx_goes_through(&rig, &mut fe, &cap, &cases);
    let s = rig.daemon.stats();
    assert_eq!(s["tx.packets"], cases.len() as u64, "{s:?}");
    assert_eq!(s["tx.drops.malformed"], 0, "{s:?}");
    still_serving(&rig, &mut fe, pid, "header split");
}

#[test]
fn tx_zero_length_descriptors_inside_a_frame_go_through() {
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    let frame = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(300, 5));
    let total = HDR + frame.len();
    // Repeated offsets make zero-length descriptors: first, between header bytes, at the
    // header's end, inside the frame, and last.
    let cuts = vec![0, 0, 5, 5, HDR, HDR, 40, 40, total, total];
    tx_goes_through(
        &rig,
        &mut fe,
        &cap,
        &[
            (frame.clone(), TxLayout::SplitAt(cuts.clone())),
            (frame.clone(), TxLayout::IndirectSplitAt(cuts)),
        ],
    );
    still_serving(&rig, &mut fe, pid, "zero-length descriptors");
}

#[test]
fn tx_zero_length_descriptor_with_a_wild_address_never_garbles_a_frame() {
    // A zero-length descriptor names no byte, so its address is never accessed. Whether the
    // daemon ignores it (the frame goes out whole) or refuses the chain (counted, nothing goes
    // out) is its choice; a partial or altered frame, or a crash, is not.
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    let frame = hostile_frame(rig.peer_mac, 100);
    let mut bytes = plain_header(&fe);
    bytes.extend_from_slice(&frame);
    let before = rig.daemon.stats();
    let mut b = Build::new(&mut fe, Queue::Tx);
    let h = b.readable(&bytes[..HDR]);
    let f = b.readable(&bytes[HDR..]);
    let head = b.chain(&[h, rd(u64::MAX - 3, 0, 0), rd(b.mem_end() + 4096, 0, 0), f]);
    fe.raw_push_avail(Queue::Tx, head);
    fe.kick_tx();
    assert_eq!(fe.wait_tx_used(1, T), [(u32::from(head), 0)]);
    let d = delta(&before, &rig.daemon.stats());
    let marker = ethernet(
        rig.peer_mac,
        GUEST_MAC,
        ETH_EXPERIMENTAL,
        b"MARKER-zero-length",
    );
    let ph = plain_header(&fe);
    send_frame(&mut fe, &ph, &marker);
    let mut seen = Vec::new();
    capture(&cap, |f| {
        if is_hostile(f) {
            seen.push(f.to_vec());
        }
        f == &marker[..]
    })
    .expect("marker");
    eprintln!("zero-length descriptors with wild addresses: counters moved {d:?}");
    if d.get("tx.packets") == Some(&1) {
        assert_eq!(seen, [frame], "sent whole and unchanged");
    } else {
        assert_eq!(d.get("tx.drops.malformed"), Some(&1), "{d:?}");
        assert!(seen.is_empty(), "refused, so nothing of it leaves");
    }
    still_serving(&rig, &mut fe, pid, "zero-length wild descriptors");
}

// ---------------------------------------------------------------------------------------------
// RX: hostile chains
// ---------------------------------------------------------------------------------------------

#[test]
fn rx_descriptor_outside_guest_memory() {
    rx_hostile("RX descriptor outside memory", |b| {
        let end = b.mem_end();
        b.put(rd(end + 0x10000, 1536, DESC_F_WRITE))
    });
}

#[test]
fn rx_descriptor_straddling_the_end_of_guest_memory() {
    rx_hostile("RX descriptor straddling the end of memory", |b| {
        let at = b.mem_end() - 64;
        b.fe.write_guest(at, &[RX_POISON; 64]);
        b.watched.push((at, vec![RX_POISON; 64]));
        b.put(rd(at, 1536, DESC_F_WRITE))
    });
}

#[test]
fn rx_good_descriptor_then_one_outside_memory() {
    rx_hostile("RX good descriptor, then one outside memory", |b| {
        let first = b.writable(1536);
        let end = b.mem_end();
        b.chain(&[first, rd(end, 1536, DESC_F_WRITE)])
    });
}

#[test]
fn rx_descriptor_address_near_u64_max() {
    rx_hostile("RX address u64::MAX - 63", |b| {
        b.put(rd(u64::MAX - 63, 1536, DESC_F_WRITE))
    });
}

#[test]
fn rx_descriptor_length_u32_max() {
    rx_hostile("RX length u32::MAX at a valid address", |b| {
        let d = b.writable(1536);
        b.put(rd(d.addr, u32::MAX, DESC_F_WRITE))
    });
}

#[test]
fn rx_lengths_summing_past_u32_max() {
    rx_hostile(
        "RX good buffer, then a length that overflows the total",
        |b| {
            let first = b.writable(1536);
            let second = b.writable(64);
            b.chain(&[first, rd(second.addr, u32::MAX - 64, DESC_F_WRITE)])
        },
    );
}

#[test]
fn rx_read_only_descriptor() {
    rx_hostile("RX read-only descriptor", |b| {
        let d = b.writable(1536);
        b.put(RawDesc { flags: 0, ..d })
    });
}

#[test]
fn rx_write_only_then_read_only() {
    rx_hostile("RX write-only descriptor, then read-only", |b| {
        let first = b.writable(1536);
        let second = b.writable(1536);
        b.chain(&[first, RawDesc { flags: 0, ..second }])
    });
}

#[test]
fn rx_read_only_then_write_only() {
    rx_hostile("RX read-only descriptor, then write-only", |b| {
        let first = b.writable(HDR as u32);
        let second = b.writable(1536);
        b.chain(&[RawDesc { flags: 0, ..first }, second])
    });
}

#[test]
fn rx_chain_shorter_than_the_header() {
    rx_hostile("RX chain of 11 bytes (5 + 6)", |b| {
        let x = b.writable(5);
        let y = b.writable(6);
        b.chain(&[x, y])
    });
}

#[test]
fn rx_chain_of_zero_length_descriptors_only() {
    rx_hostile("RX chain of zero-length descriptors", |b| {
        let d = b.writable(64);
        b.chain(&[rd(d.addr, 0, DESC_F_WRITE), rd(u64::MAX, 0, DESC_F_WRITE)])
    });
}

#[test]
fn rx_chain_looping_onto_itself() {
    rx_hostile("RX chain whose last descriptor points at itself", |b| {
        let first = b.writable(1536);
        let tail = b.writable(64);
        let (h, t) = (b.slot(), b.slot());
        b.put_at(
            h,
            RawDesc {
                next: t,
                flags: DESC_F_WRITE | DESC_F_NEXT,
                ..first
            },
        );
        b.put_at(
            t,
            RawDesc {
                next: t,
                flags: DESC_F_WRITE | DESC_F_NEXT,
                ..tail
            },
        );
        h
    });
}

#[test]
fn rx_chain_longer_than_the_queue() {
    rx_hostile("RX chain of queue size + 1 descriptors (indirect)", |b| {
        let d = b.writable(1536);
        let one = b.writable(64);
        let mut entries = vec![d];
        entries.extend(vec![one; usize::from(QSIZE)]);
        b.indirect(&entries)
    });
}

#[test]
fn rx_next_index_beyond_the_queue() {
    rx_hostile("RX descriptor whose next is queue size + 5", |b| {
        let d = b.writable(1536);
        b.put(RawDesc {
            next: QSIZE + 5,
            flags: DESC_F_WRITE | DESC_F_NEXT,
            ..d
        })
    });
}

#[test]
fn rx_indirect_table_length_not_a_multiple_of_16() {
    rx_hostile("RX indirect table of 20 bytes", |b| {
        let d = b.writable(1536);
        let (gpa, _) = b.table(&[d, d]);
        b.put(rd(gpa, 20, DESC_F_INDIRECT))
    });
}

#[test]
fn rx_indirect_table_outside_guest_memory() {
    rx_hostile("RX indirect table outside memory", |b| {
        let end = b.mem_end();
        b.put(rd(end + 0x1000, 32, DESC_F_INDIRECT))
    });
}

#[test]
fn rx_nested_indirect_table() {
    rx_hostile("RX indirect table: buffer, then a nested table", |b| {
        let d = b.writable(1536);
        let inner_buf = b.writable(1536);
        let (inner, len) = b.table(&[inner_buf]);
        b.indirect(&[d, rd(inner, len, DESC_F_INDIRECT)])
    });
}

#[test]
fn rx_indirect_table_with_a_read_only_entry() {
    rx_hostile("RX indirect table with a read-only entry", |b| {
        let d = b.writable(1536);
        let e = b.writable(1536);
        b.indirect(&[d, RawDesc { flags: 0, ..e }])
    });
}

#[test]
fn rx_avail_entry_naming_the_queue_size() {
    rx_hostile("RX avail entry = queue size", |_| QSIZE);
}

#[test]
fn rx_avail_entry_naming_u16_max() {
    rx_hostile("RX avail entry = 65535", |_| u16::MAX);
}

// ---------------------------------------------------------------------------------------------
// A flood of hostile chains: every one counted, the log rate-limited
// ---------------------------------------------------------------------------------------------

/// Posts `rounds` x 100 one-descriptor chains made by `bad` on `q` (the same 100 slots again each
/// round, once the daemon gave them back), and checks each is counted under `counter` while the
/// log gets at most a couple of lines about them.
fn flood(q: Queue, counter: &str, log_needle: &str, bad: impl Fn(&mut Build) -> RawDesc) {
    let Some(rig) = rig() else { return };
    let rx_buffers = if q == Queue::Rx { 0 } else { 64 };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, rx_buffers);
    let pid = rig.daemon.pid();
    let before = rig.daemon.stats();
    let lines_before = rig.daemon.log().lines().count();
    let mut b = Build::new(&mut fe, q);
    let heads: Vec<u16> = (0..100)
        .map(|_| {
            let d = bad(&mut b);
            b.put(d)
        })
        .collect();
    let rounds = 5;
    for round in 0..rounds {
        for &h in &heads {
            fe.raw_push_avail(q, h);
        }
        fe.kick(q);
        let used = fe.wait_used(q, heads.len(), T);
        assert_eq!(
            used.len(),
            heads.len(),
            "round {round}: every chain comes back"
        );
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    }
    let after = rig.daemon.stats();
    let n = (rounds * heads.len()) as u64;
    assert_eq!(after[counter] - before[counter], n, "every chain counted");
    let log = rig.daemon.log();
    let new_lines: Vec<&str> = log.lines().skip(lines_before).collect();
    let about = new_lines.iter().filter(|l| l.contains(log_needle)).count();
    assert!(
        (1..=2).contains(&about),
        "{n} bad chains logged {about} lines about them (rate-limited: one, maybe two); \
         {} new lines in all\n{}",
        new_lines.len(),
        log_tail(&rig, 10)
    );
    if q == Queue::Rx {
        fe.post_rx_buffers(64, 1536);
        fe.kick_rx();
    }
    still_serving(&rig, &mut fe, pid, "flood");
}

#[test]
fn tx_flood_of_write_only_chains_is_counted_and_logged_sparingly() {
    flood(Queue::Tx, "tx.drops.malformed", "TX: guest chain", |b| {
        let d = b.readable(&[0u8; 64]);
        RawDesc {
            flags: DESC_F_WRITE,
            ..d
        }
    });
}

#[test]
fn rx_flood_of_read_only_chains_is_counted_and_logged_sparingly() {
    flood(Queue::Rx, "rx.drops.bad_chain", "RX: guest chain", |b| {
        let d = b.writable(1536);
        RawDesc { flags: 0, ..d }
    });
}

// ---------------------------------------------------------------------------------------------
// The avail index jumping by more than the queue size
// ---------------------------------------------------------------------------------------------

/// The driver claims more new chains than the ring holds (virtio 2.7.13.3: it never may). The
/// spec lets a device treat that as fatal (DEVICE_NEEDS_RESET), so this demands only that the
/// daemon does not crash, spin or wedge (its counters stay readable, a new connection works).
/// What it does with the connection meanwhile (the other direction; the ring once the index is
/// put back) is printed, not asserted.
fn avail_index_jump(q: Queue, daemon_args: &[&str]) {
    let Some(rig) = rig_with(daemon_args) else {
        return;
    };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    ping(&mut fe, rig.peer_mac, 1);
    let before = rig.daemon.stats();
    let idx = fe.avail_idx(q);
    fe.raw_set_avail_idx(q, idx.wrapping_add(QSIZE + 1));
    fe.kick(q);
    let what = format!("{q:?} avail index jumped by queue size + 1 {daemon_args:?}");
    let lines_before = rig.daemon.log().lines().count();
    assert!(rig.daemon.is_running(), "{what}: {}", log_tail(&rig, 30));
    assert_not_spinning(&rig, &what);
    let lines = rig.daemon.log().lines().count() - lines_before;
    assert!(
        lines < 20,
        "{what}: {lines} log lines for one kick (a flood)\n{}",
        log_tail(&rig, 5)
    );
    let s = rig.daemon.stats();
    eprintln!("{what}: counters moved {:?}", delta(&before, &s));

    // The other direction, on this connection.
    let other = match q {
        Queue::Tx => {
            let f = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(100, 3));
            inject(&cap, &f);
            recv_matching(&mut fe, |g| g == &f[..]).is_some()
        }
        Queue::Rx => {
            let f = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(100, 4));
            let h = plain_header(&fe);
            fe.send(&h, &f, TxLayout::Combined);
            fe.kick_tx();
            fe.wait_tx_used(1, T);
            capture(&cap, |g| g == &f[..]).is_some()
        }
    };
    eprintln!("{what}: the other direction still works on this connection: {other}");
    // Put the index back where it was and kick: does the ring come back?
    fe.raw_set_avail_idx(q, idx);
    fe.kick(q);
    let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ping(&mut fe, rig.peer_mac, 3)
    }))
    .is_ok();
    eprintln!("{what}: a ping works once the index is put back: {recovered}");
    eprintln!("{}", log_tail(&rig, 6));
    assert_not_spinning(&rig, &what);
    assert_eq!(rig.daemon.pid(), pid);
    new_connection_works(&rig, fe, pid, &what);
}

#[test]
fn tx_avail_index_jump_beyond_queue_size() {
    avail_index_jump(Queue::Tx, &[]);
}

#[test]
fn rx_avail_index_jump_beyond_queue_size() {
    avail_index_jump(Queue::Rx, &[]);
}

// A busy-polling worker must not take a broken ring for work that never ends.
#[test]
fn tx_avail_index_jump_while_busy_polling() {
    avail_index_jump(Queue::Tx, &["--busy-poll-us", "1000"]);
}

#[test]
fn rx_avail_index_jump_while_busy_polling() {
    avail_index_jump(Queue::Rx, &["--busy-poll-us", "1000"]);
}

// ---------------------------------------------------------------------------------------------
// RX never writes past the used length it reports
// ---------------------------------------------------------------------------------------------

/// RX chains posted raw, so that the test can look at every byte of them after the daemon is
/// done: each is filled with RX_POISON when posted (and re-posted).
struct PoisonRx {
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

impl PoisonRx {
    fn post(fe: &mut TestFrontend, shapes: &[Vec<u32>]) -> PoisonRx {
        let mut rx = PoisonRx {
            chains: HashMap::new(),
        };
        for shape in shapes {
            let mut b = Build::new(fe, Queue::Rx);
            let descs: Vec<RawDesc> = shape.iter().map(|&len| b.writable(len)).collect();
            let head = b.chain(&descs);
            let bufs = descs.iter().map(|d| (d.addr, d.len)).collect();
            fe.raw_push_avail(Queue::Rx, head);
            rx.chains.insert(head, bufs);
        }
        fe.kick_rx();
        rx
    }

    /// Poison again and give back to the device.
    fn repost(&self, fe: &mut TestFrontend, head: u16) {
        for &(gpa, len) in &self.chains[&head] {
            fe.write_guest(gpa, &vec![RX_POISON; len as usize]);
        }
        fe.raw_push_avail(Queue::Rx, head);
    }

    /// Next packet: its used entries (num_buffers of them), each checked for poison past its
    /// used length; returns the header and frame bytes. `None` on timeout.
    fn recv(&self, fe: &mut TestFrontend, what: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut data = Vec::new();
        let mut entries = 0usize;
        let mut want = 1usize;
        while entries < want {
            let used = fe.wait_used(Queue::Rx, 1, T);
            let &[(id, len)] = used.as_slice() else {
                assert_eq!(entries, 0, "{what}: buffers {entries}..{want} never came");
                return None;
            };
            let head = u16::try_from(id).expect("used id fits u16");
            let bufs = self
                .chains
                .get(&head)
                .unwrap_or_else(|| panic!("{what}: used id {id} is no chain of ours"));
            let total: u32 = bufs.iter().map(|b| b.1).sum();
            assert!(
                len <= total,
                "{what}: used length {len} exceeds the {total}-byte chain {head}"
            );
            let mut pos = 0u32;
            for &(gpa, blen) in bufs {
                let bytes = fe.read_guest(gpa, blen as usize);
                let written = len.saturating_sub(pos).min(blen) as usize;
                data.extend_from_slice(&bytes[..written]);
                let past = &bytes[written..];
                if let Some(off) = past.iter().position(|&b| b != RX_POISON) {
                    let bad = past.iter().filter(|&&b| b != RX_POISON).count();
                    let zeros = past.iter().filter(|&&b| b == 0).count();
                    let kind = if zeros == bad {
                        "all of them zeros: nothing leaks, but the buffer was written"
                    } else {
                        "holding data"
                    };
                    panic!(
                        "{what}: chain {head} (used length {len}): {bad} bytes past the used \
                         length were written ({kind}), the first at chain offset {}",
                        pos as usize + written + off
                    );
                }
                pos += blen;
            }
            if entries == 0 {
                assert!(data.len() >= HDR, "{what}: {len}-byte first buffer");
                want = usize::from(u16::from_le_bytes([data[10], data[11]]).max(1));
            }
            entries += 1;
            self.repost(fe, head);
        }
        fe.kick_rx();
        let frame = data.split_off(HDR);
        Some((data, frame))
    }
}

/// Buffer shapes a guest might post: single buffers, a chain split inside the header, tiny ones.
fn poison_shapes(n: usize) -> Vec<Vec<u32>> {
    let shapes: [&[u32]; 6] = [
        &[1536],
        &[7, 5, 100, 1424],
        &[64, 4000],
        &[HDR as u32 + 1],
        &[2048],
        &[1, 11, 0, 500],
    ];
    (0..n).map(|i| shapes[i % shapes.len()].to_vec()).collect()
}

#[test]
fn rx_never_writes_past_the_used_length() {
    let Some(rig) = rig() else { return };
    // Frames up to 9014 bytes, so that they span several buffers.
    rig.host.set_mtu("vh0", 9000);
    rig.peer.set_mtu("vp0", 9000);
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 0);
    let pid = rig.daemon.pid();
    let peer = peer_socket(&rig);
    // 90 chains of these shapes take 195 of the 256 descriptors and hold ~145 KB.
    let rx = PoisonRx::post(&mut fe, &poison_shapes(90));

    let sizes = [
        14usize, 15, 42, 59, 60, 61, 64, 100, 127, 128, 333, 1000, 1499, 1500, 1514, 1524, 2000,
        4000, 8999, 9014,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        let frame = ethernet(
            GUEST_MAC,
            rig.peer_mac,
            ETH_EXPERIMENTAL,
            &pattern(n - 14, 77 + i as u32),
        );
        inject(&peer, &frame);
        let what = format!("{n}-byte frame");
        let (hdr, got) = rx
            .recv(&mut fe, &what)
            .unwrap_or_else(|| panic!("{what} never arrived: {:?}", rig.daemon.stats()));
        assert_eq!(hdr[..10], [0u8; 10], "{what}: plain header");
        assert_eq!(got, frame, "{what}: delivered byte for byte");
    }

    // A 20000-byte GSO frame delivered whole (the guest has GUEST_TSO4) over many buffers.
    let (frame, _) = inject_tcpv4_gso(&peer, &rig, &pattern(20000, 3));
    let (_, got) = rx
        .recv(&mut fe, "GSO frame")
        .expect("the GSO frame arrives");
    assert_eq!(got, frame, "GSO frame byte for byte");
    assert_eq!(rig.daemon.pid(), pid);
    assert_not_spinning(&rig, "poison");
}

/// Injects at the peer a TCPv4 GSO frame (gso_size 1448, partial checksum) carrying
/// `payload` to the guest; returns the frame and its header length.
fn inject_tcpv4_gso(peer: &PacketSocket, rig: &Rig, payload: &[u8]) -> (Vec<u8>, u16) {
    let (frame, csum_start, hdr_len) =
        partial_csum_frame((GUEST_MAC, rig.peer_mac), L3::V4, 6, TCP_ACK, payload);
    let h = vnet_header(
        vhdr::F_NEEDS_CSUM,
        vhdr::GSO_TCPV4,
        hdr_len,
        1448,
        csum_start,
        16,
        0,
        HDR,
    );
    peer.send_vectored(&[std::io::IoSlice::new(&h), std::io::IoSlice::new(&frame)])
        .unwrap();
    (frame, hdr_len)
}

#[test]
fn rx_segmented_gso_frame_never_writes_past_the_used_length() {
    // Without GUEST_TSO4 a GSO frame is cut into segments in software. The frame is received
    // into the guest's buffers first and the segments are then written over it: whatever the
    // segments do not cover must not keep bytes of the frame.
    let Some(rig) = rig() else { return };
    let features = GUEST_FEATURES & !(feat::GUEST_TSO4 | feat::GUEST_TSO6 | feat::GUEST_ECN);
    let mut fe = guest(&rig.daemon.socket, features, 0);
    let peer = peer_socket(&rig);
    let rx = PoisonRx::post(&mut fe, &vec![vec![1536]; 100]);
    let (_, hdr_len) = inject_tcpv4_gso(&peer, &rig, &pattern(20000, 3));
    let mut payload = Vec::new();
    for seg in 0..20000usize.div_ceil(1448) {
        let (_, got) = rx
            .recv(&mut fe, &format!("segment {seg}"))
            .unwrap_or_else(|| panic!("segment {seg} never came"));
        payload.extend_from_slice(&got[usize::from(hdr_len)..]);
    }
    assert!(payload == pattern(20000, 3), "segments carry the payload");
}

#[test]
fn rx_frame_too_big_for_the_buffer_leaves_no_trace_in_it() {
    // Without MRG_RXBUF a frame must fit one chain; a bigger one is dropped. Its bytes must not
    // stay in the buffer that the next, smaller frame is delivered into.
    let Some(rig) = rig() else { return };
    rig.host.set_mtu("vh0", 9000);
    rig.peer.set_mtu("vp0", 9000);
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES & !feat::MRG_RXBUF, 0);
    let peer = peer_socket(&rig);
    let rx = PoisonRx::post(&mut fe, &[vec![1536]]);
    let before = rig.daemon.stats();
    let big = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(3000, 1));
    inject(&peer, &big);
    wait_counter(&rig, "rx.drops.oversize", before["rx.drops.oversize"] + 1);
    let small = ethernet(GUEST_MAC, rig.peer_mac, ETH_EXPERIMENTAL, &pattern(100, 2));
    inject(&peer, &small);
    let (_, got) = rx
        .recv(&mut fe, "small frame after a dropped big one")
        .expect("the small frame arrives");
    assert_eq!(got, small);
}

// ---------------------------------------------------------------------------------------------
// RX: staging limits (issue 12: iovecs per receive, bad chains counted once)
// ---------------------------------------------------------------------------------------------

/// Posts `chains` indirect RX chains of `descs` write-only descriptors of `len` bytes; returns
/// each chain's head and its buffer addresses, in order.
fn post_indirect_rx(
    fe: &mut TestFrontend,
    chains: usize,
    descs: usize,
    len: u32,
) -> Vec<(u16, Vec<u64>)> {
    let mut posted = Vec::new();
    for _ in 0..chains {
        let mut b = Build::new(fe, Queue::Rx);
        let entries: Vec<RawDesc> = (0..descs).map(|_| b.writable(len)).collect();
        let head = b.indirect(&entries);
        fe.raw_push_avail(Queue::Rx, head);
        posted.push((head, entries.iter().map(|d| d.addr).collect()));
    }
    posted
}

#[test]
fn rx_chains_of_many_tiny_buffers_beyond_uio_maxiov_do_not_spin() {
    // 128 chains of 64 x 16 bytes: the chains staged for a maximal frame (65 of them) hold
    // 4160 iovecs, those for a 20000-byte frame 1280: more than the 1024 one recvmsg takes.
    // The kernel refuses such a call before it takes the frame off its queue.
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 0);
    let pid = rig.daemon.pid();
    let peer = peer_socket(&rig);
    let chains = post_indirect_rx(&mut fe, 128, 64, 16);
    fe.kick_rx();
    let before = rig.daemon.stats();
    let small = |seed| {
        ethernet(
            GUEST_MAC,
            rig.peer_mac,
            ETH_EXPERIMENTAL,
            &pattern(100, seed),
        )
    };
    let mut frames = vec![small(40)];
    inject(&peer, &frames[0]);
    frames.push(inject_tcpv4_gso(&peer, &rig, &pattern(20000, 41)).0);
    frames.push(small(42));
    inject(&peer, &frames[2]);

    // Every used entry until the three frames are back (or the wait runs out), gathered into
    // packets by the num_buffers of each one's first buffer.
    let bufs: HashMap<u16, &Vec<u64>> = chains.iter().map(|(h, b)| (*h, b)).collect();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut used = Vec::new();
    let mut more = 0u16;
    while got.len() < frames.len() || more > 0 {
        let Some(&(id, len)) = fe.wait_used(Queue::Rx, 1, T).first() else {
            break;
        };
        used.push((id, len));
        let mut bytes = Vec::new();
        for &addr in bufs[&(id as u16)] {
            bytes.extend(fe.read_guest(addr, 16));
        }
        bytes.truncate(len as usize);
        if more == 0 {
            assert!(
                bytes.len() >= HDR,
                "a packet's first buffer holds its header: {used:?}"
            );
            more = u16::from_le_bytes([bytes[10], bytes[11]]).max(1);
            got.push(bytes.split_off(HDR));
        } else {
            got.last_mut().unwrap().extend_from_slice(&bytes);
        }
        more -= 1;
    }
    assert_not_spinning(&rig, "RX chains of 64 x 16 bytes");
    let d = delta(&before, &rig.daemon.stats());
    let drops: i64 = d
        .iter()
        .filter(|(k, _)| k.starts_with("rx.drops."))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        got.len() as i64 + drops,
        frames.len() as i64,
        "each frame delivered or counted once as a drop: used {used:?}, counters moved {d:?}\n{}",
        log_tail(&rig, 10)
    );
    for (p, want) in got.iter().zip(&frames) {
        assert!(p == want, "a {}-byte frame byte for byte", want.len());
    }
    assert_eq!(got.len(), frames.len(), "all delivered: {d:?}");
    assert_eq!(rig.daemon.pid(), pid);
}

/// Kicks RX and waits until the daemon has handled the kick: the counters are read under the
/// queue pair's lock, which the pass holds, so a counted kick is a finished pass.
fn kick_rx_and_wait(rig: &Rig, fe: &mut TestFrontend) {
    let kicks = rig.daemon.stats()["rx.kicks"];
    fe.kick_rx();
    wait_counter(rig, "rx.kicks", kicks + 1);
}

#[test]
fn rx_bad_chain_staged_behind_good_ones_is_counted_once() {
    // A read-only chain between good ones is staged (and judged) behind the first good chain
    // when a pass after a kick stages for a maximal frame, given back with the good ones when
    // no frame takes them, and judged again by the next pass: it must be counted once.
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 0);
    let peer = peer_socket(&rig);
    let before = rig.daemon.stats();
    let mut good = vec![fe.post_rx(&[1536])];
    let bad = {
        let mut b = Build::new(&mut fe, Queue::Rx);
        let d = b.writable(1536);
        b.put(RawDesc { flags: 0, ..d })
    };
    fe.raw_push_avail(Queue::Rx, bad);
    good.push(fe.post_rx(&[1536]));
    good.push(fe.post_rx(&[1536]));
    kick_rx_and_wait(&rig, &mut fe);
    let mut used = Vec::new();
    for i in 0..3 {
        let frame = ethernet(
            GUEST_MAC,
            rig.peer_mac,
            ETH_EXPERIMENTAL,
            &pattern(100, 60 + i),
        );
        inject(&peer, &frame);
        // Until this frame's buffer comes back (the bad chain may come back on the way).
        let deadline = Instant::now() + T;
        while used.iter().filter(|&&(_, len)| len != 0).count() <= i as usize
            && Instant::now() < deadline
        {
            used.extend(fe.wait_used(Queue::Rx, 1, Duration::from_millis(100)));
        }
        // A guest kicks after refilling: the next pass stages from the front again.
        good.push(fe.post_rx(&[1536]));
        kick_rx_and_wait(&rig, &mut fe);
    }
    let d = delta(&before, &rig.daemon.stats());
    let data: Vec<(u32, u32)> = used.iter().copied().filter(|&(_, l)| l != 0).collect();
    assert_eq!(
        data,
        good[..3]
            .iter()
            .map(|&h| (u32::from(h), (HDR + 114) as u32))
            .collect::<Vec<_>>(),
        "the frames land in the good chains, in order; counters moved {d:?}"
    );
    assert_eq!(
        d.get("rx.drops.bad_chain"),
        Some(&1),
        "the read-only chain is counted exactly once; used {used:?}, counters moved {d:?}\n{}",
        log_tail(&rig, 10)
    );
}

// TX: what the backend decides on must be what the kernel sends, a bad avail entry amid chains
// held back by a full socket, and GSO frames cut into tiny segments
// ---------------------------------------------------------------------------------------------

/// A MAC the guest has no right to send from.
const SPOOFED_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x66];

#[test]
fn tx_source_mac_rewritten_by_another_vcpu_never_reaches_the_wire_spoofed() {
    // The guest posts one frame from its own MAC and, from a second vCPU, keeps flipping the
    // frame's source MAC between its own and another one while the device works. Whatever the
    // daemon checks must be what goes out: the peer never sees the other MAC.
    let Some(rig) = rig() else { return };
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let cap = peer_socket(&rig);
    let pid = rig.daemon.pid();
    const KICKS: usize = 10_000;
    let mut bytes = plain_header(&fe);
    bytes.extend_from_slice(&hostile_frame(rig.peer_mac, 100));
    let mut b = Build::new(&mut fe, Queue::Tx);
    let d = b.readable(&bytes);
    let head = b.put(d);
    let source_at = d.addr + HDR as u64 + 6;
    let before = rig.daemon.stats();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let marker = ethernet(
        rig.peer_mac,
        GUEST_MAC,
        ETH_EXPERIMENTAL,
        b"MARKER-after-the-flipped-frames",
    );
    let (seen, spoofed) = std::thread::scope(|s| {
        let mem = fe.shared_guest_memory();
        let stop = &stop;
        s.spawn(move || {
            use vm_memory::{Bytes, GuestAddress};
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for mac in [SPOOFED_MAC, GUEST_MAC] {
                    mem.write_slice(&mac, GuestAddress(source_at))
                        .expect("flip the source MAC in guest memory");
                }
            }
        });
        let reader = s.spawn(|| {
            let (mut seen, mut spoofed) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut buf = vec![0u8; 2048];
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the marker never reached the peer"
                );
                match cap.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
                    Ok(r) => {
                        let f = &buf[HDR..r.len.min(buf.len())];
                        if is_hostile(f) {
                            seen += 1;
                            spoofed += usize::from(f[6..12] != GUEST_MAC);
                        }
                        if f == &marker[..] {
                            return (seen, spoofed);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200))
                    }
                    Err(e) => panic!("capture: {e}"),
                }
            }
        });
        for i in 0..KICKS {
            fe.raw_push_avail(Queue::Tx, head);
            fe.kick_tx();
            let used = fe.wait_tx_used(1, T);
            assert_eq!(
                used,
                [(u32::from(head), 0)],
                "kick {i}: the chain comes back"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        fe.write_guest(source_at, &GUEST_MAC);
        let h = plain_header(&fe);
        send_frame(&mut fe, &h, &marker);
        reader.join().unwrap()
    });
    let d = delta(&before, &rig.daemon.stats());
    eprintln!(
        "source MAC flipped by another vCPU over {KICKS} sends: the peer got {seen} frames, \
         {spoofed} of them not from the guest's MAC; counters moved {d:?}"
    );
    let (_, capture_drops) = cap.drops().unwrap();
    assert_eq!(
        capture_drops, 0,
        "the capture socket overflowed: it proves nothing"
    );
    assert_eq!(
        d.get("tx.packets").copied().unwrap_or(0) + d.get("tx.drops.spoofed").copied().unwrap_or(0),
        KICKS as i64 + 1,
        "every send is either a packet or a counted spoof (the marker is one packet): {d:?}"
    );
    assert_eq!(
        spoofed, 0,
        "{spoofed} of {seen} frames reached the wire with a source MAC that is not the guest's"
    );
    still_serving(&rig, &mut fe, pid, "source MAC flipped");
}

/// `tc qdisc OP dev vh0 root ARGS...` in the host namespace; panics on failure.
fn host_qdisc(rig: &Rig, op: &str, args: &[&str]) {
    let mut cmd = vec!["tc", "qdisc", op, "dev", "vh0", "root"];
    cmd.extend_from_slice(args);
    let out = rig.host.exec(&cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 60000-byte TCPv4 TSO frame to the peer (gso_size `gso_size`, partial checksum), with the
/// guest's virtio header, its destination MAC `dst`.
fn tso_frame(fe: &TestFrontend, dst: [u8; 6], gso_size: u16, seed: u32) -> (Vec<u8>, Vec<u8>) {
    let (frame, csum_start, hdr_len) =
        partial_csum_frame((dst, GUEST_MAC), L3::V4, 6, TCP_ACK, &pattern(60000, seed));
    let h = vnet_header(
        vhdr::F_NEEDS_CSUM,
        vhdr::GSO_TCPV4,
        hdr_len,
        gso_size,
        csum_start,
        16,
        0,
        fe.header_len(),
    );
    (h, frame)
}

/// Posts A, an avail entry naming descriptor 300 of the 256-entry ring, and B, and kicks while
/// the packet socket is full; returns (A, B) once the daemon has been held back by it.
fn post_behind_a_full_socket(rig: &Rig, fe: &mut TestFrontend) -> (u16, u16) {
    let before = rig.daemon.stats()["tx.backpressure"];
    let h = plain_header(fe);
    let a = fe.send(&h, &hostile_frame(rig.peer_mac, 100), TxLayout::Combined);
    fe.raw_push_avail(Queue::Tx, 300);
    let b = fe.send(&h, &hostile_frame(rig.peer_mac, 120), TxLayout::Combined);
    fe.kick_tx();
    let s = wait_counter(rig, "tx.backpressure", before + 1);
    assert!(
        s["tx.backpressure"] > before,
        "the full socket did not hold the chains back: {s:?}"
    );
    (a, b)
}

#[test]
fn tx_bad_avail_entry_behind_a_chain_held_back_by_a_full_socket() {
    // avail = [A, 300 (beyond the 256-entry ring), B] while the socket is full: A is held back,
    // and so must everything after it be, exactly: A and B each sent and used once when the
    // socket drains, the bad entry counted once, GET_VRING_BASE naming A while it waits.
    if !require_root_and_tools(&["tc"]) {
        return;
    }
    let Some(rig) = rig() else { return };
    // A qdisc that holds what it gets: 64 KiB frames fill the socket's send buffer (8 MiB).
    host_qdisc(
        &rig,
        "add",
        &["tbf", "rate", "1kbit", "burst", "64k", "limit", "100mb"],
    );
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let other = [0x02, 0, 0, 0, 0, 0x99];
    let mut posted = 0;
    for i in 0..200 {
        let (h, f) = tso_frame(&fe, other, 1448, i);
        if fe.try_send(&h, &f, TxLayout::Combined).is_none() {
            break;
        }
        posted += 1;
    }
    fe.kick_tx();
    let s = wait_counter(&rig, "tx.backpressure", 1);
    assert!(
        s["tx.backpressure"] > 0,
        "{posted} TSO frames did not fill the send buffer: {s:?}"
    );
    eprintln!(
        "send buffer full after {} of {posted} TSO frames",
        s["tx.packets"]
    );
    // The chains still waiting go with the connection; the socket stays full.
    disconnect(&rig, fe, "full socket");

    // While the socket is full, GET_VRING_BASE names A: nothing from A on was consumed.
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let before = rig.daemon.stats();
    post_behind_a_full_socket(&rig, &mut fe);
    let base = fe.try_get_vring_base(Queue::Tx).unwrap();
    let d = delta(&before, &rig.daemon.stats());
    assert_eq!(
        base,
        0,
        "GET_VRING_BASE while A waits: A is avail entry 0; counters moved {d:?}\n{}",
        log_tail(&rig, 10)
    );
    disconnect(&rig, fe, "full socket");

    // Once the socket drains, A and B go out and come back once each; 300 is counted once.
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let before = rig.daemon.stats();
    let (a, b) = post_behind_a_full_socket(&rig, &mut fe);
    host_qdisc(&rig, "del", &[]);
    let mut used = fe.wait_tx_used(2, T);
    used.extend(fe.wait_tx_used(1, Duration::from_millis(500)));
    let s = rig.daemon.stats();
    let d = delta(&before, &s);
    used.sort();
    assert_eq!(
        used,
        [(u32::from(a), 0), (u32::from(b), 0)],
        "A ({a}) and B ({b}) come back once each; counters moved {d:?}\n{}",
        log_tail(&rig, 10)
    );
    assert_eq!(d.get("tx.drops.malformed"), Some(&1), "counted once: {d:?}");
    assert_eq!(d.get("tx.packets"), Some(&2), "A and B sent: {d:?}");
    let (_, tx_base) = fe.stop();
    assert_eq!(
        tx_base, 3,
        "GET_VRING_BASE: all three avail entries consumed"
    );
}

/// The least `gso_size` the daemon takes for TCP (datapath/offload.rs, docs/offloads.md).
const MIN_TCP_GSO_SIZE: u16 = 8;

#[test]
fn tx_tso_frame_with_gso_size_1_is_refused() {
    // A 60000-byte TSO frame with gso_size 1 would be cut into 60000 segments by the host
    // (software GSO here: vh0 has TSO off). Refused and counted; one at the bound goes out.
    let Some(rig) = rig() else { return };
    rig.host.ethtool_k("vh0", &[("tso", "off")]);
    let mut fe = guest(&rig.daemon.socket, GUEST_FEATURES, 64);
    let pid = rig.daemon.pid();
    // Not the peer's MAC: the peer's stack counts and ignores the segments.
    let other = [0x02, 0, 0, 0, 0, 0x99];
    // Segments the veth took, whether the peer's backlog kept them or dropped them.
    let rx_packets =
        || rig.peer.link_counter("vp0", "rx_packets") + rig.peer.link_counter("vp0", "rx_dropped");

    let before = rig.daemon.stats();
    let peer_before = rx_packets();
    let (h, f) = tso_frame(&fe, other, 1, 1);
    send_frame(&mut fe, &h, &f);
    // The peer's count settles once software GSO is done with whatever went out.
    let marker = ethernet(rig.peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, b"MARKER-gso-1");
    let cap = peer_socket(&rig);
    let ph = plain_header(&fe);
    send_frame(&mut fe, &ph, &marker);
    capture(&cap, |g| g == &marker[..]).expect("the marker reaches the peer");
    let segments = rx_packets() - peer_before - 1;
    let d = delta(&before, &rig.daemon.stats());
    eprintln!("TSO frame with gso_size 1: {segments} frames at the peer, counters moved {d:?}");
    assert_eq!(
        d,
        BTreeMap::from([
            ("tx.drops.malformed".to_string(), 1),
            ("tx.packets".to_string(), 1),
            ("tx.bytes".to_string(), marker.len() as i64),
        ]),
        "refused as malformed (only the marker sent); {segments} frames reached the peer"
    );
    assert!(segments < 64, "{segments} segments reached the peer");

    // At the bound it goes through (as 7500 segments).
    let before = rig.daemon.stats();
    let (h, f) = tso_frame(&fe, other, MIN_TCP_GSO_SIZE, 2);
    send_frame(&mut fe, &h, &f);
    let d = delta(&before, &rig.daemon.stats());
    assert_eq!(
        d.get("tx.gso"),
        Some(&1),
        "gso_size {MIN_TCP_GSO_SIZE} passes: {d:?}"
    );
    assert_eq!(d.get("tx.drops.malformed"), None, "{d:?}");
    still_serving(&rig, &mut fe, pid, "gso_size 1");
}
