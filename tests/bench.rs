//! The guest-less parts of the benchmark (qemu/bench.sh; docs/performance.md). Both tests are
//! `#[ignore]`d: they only measure and print machine-readable lines on stdout (`BENCH <name>
//! key=value ...`), and never assert on a rate.
//!
//! ```text
//! cargo test --release --test bench -- --ignored --nocapture
//! ```
//!
//! - `bulk_gso_64k`: the project's TestFrontend sends 64 KiB TCP GSO frames to vhost-packet as
//!   fast as the daemon takes them and counts what arrives at the veth peer; then the same
//!   frames go from a packet socket straight onto the veth, without virtio, for comparison.
//!   qemu/bench.sh points it at a daemon it started (`BENCH_SOCKET`, `BENCH_HOST_NS`,
//!   `BENCH_PEER_NS`, `BENCH_BACKEND_PID`); without those it makes its own namespaces and
//!   daemon. `BENCH_SECONDS` (default 10) per part.
//! - `rtt_icmp`: request/response latency without a guest: the TestFrontend sends an ICMP echo
//!   request to the peer's kernel, waits for the reply, and sends the next (`BENCH_PINGS`,
//!   default 5000, after 200 unmeasured). Same `BENCH_*` variables as `bulk_gso_64k`.
//! - `inject_64`: a 64-byte frame generator (sendmmsg on a packet socket, qdisc bypassed) for
//!   the peer->frontend packet rate; qemu/bench.sh runs it inside the peer namespace with
//!   `BENCH_INJECT_IF`, `BENCH_INJECT_DST` and `BENCH_SECONDS`. Without them it does nothing.

mod common;

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::frontend::TxLayout;
use common::frontend::{
    feat, hdr as vhdr, vnet_header, FrontendConfig, Queue, RawDesc, TestFrontend, DESC_F_INDIRECT,
    DESC_F_NEXT,
};
use common::netns::{parse_mac, require_root_and_tools, veth_pair, NetNs};
use common::packets::{
    ethernet, icmp_echo, ipv4, pattern, tcp_frame, Csum, Tcp, ETH_IPV4, GUEST_IP, PEER_IP, TCP_ACK,
    TCP_PSH,
};
use vhost_packet::packet::interface::Interface;
use vhost_packet::packet::socket::{PacketSocket, SocketOptions};

/// The frontend's MAC: the one qemu/bench.sh gives vhost-packet with `--mac`.
const MAC: &str = "52:54:00:12:34:56";
/// Where the bulk frames go: not the peer's MAC, so the peer's stack drops them at once
/// (PACKET_OTHERHOST) after the veth counted them; the backend's work is what is measured.
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// QEMU's default queue size, as the booted guests have it.
const QUEUE_SIZE: u16 = 256;
/// TCP payload of one GSO frame: 45 segments of 1448 bytes, the largest TSO frame a Linux guest
/// sends (its TCP keeps a frame under the device's 64 KiB gso_max_size). The host kernel
/// segments a frame of 64 KiB or more in software before the veth: not what to measure.
const MSS: u16 = 1448;
const PAYLOAD: usize = 45 * MSS as usize;
/// The payload is spread over page-sized descriptors, as a Linux guest's skb frags are.
const CHUNK: usize = 4096;
const WARMUP: Duration = Duration::from_secs(1);

fn seconds() -> Duration {
    let s: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    Duration::from_secs_f64(s)
}

/// Counters of `ifname` in namespace `ns`, in the order asked (`ip netns exec` remounts /sys).
fn link_counters(ns: &str, ifname: &str, names: &[&str]) -> Vec<u64> {
    let paths: Vec<String> = names
        .iter()
        .map(|n| format!("/sys/class/net/{ifname}/statistics/{n}"))
        .collect();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .args(&paths)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} cat: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let values: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(values.len(), names.len(), "{paths:?} in {ns}: {text:?}");
    values
}

/// User + system CPU time from a `/proc/PID/stat` (a process: all its threads, also those that
/// ended) or `/proc/PID/task/TID/stat` (one thread).
fn cpu_time(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    // Fields after the command name's closing parenthesis start with field 3.
    let fields: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((fields[14 - 3] + fields[15 - 3]) * 1000 / hz)
}

/// The daemon the bulk test drives: qemu/bench.sh's, or one of its own.
struct Target {
    socket: PathBuf,
    host_ns: String,
    host_if: String,
    peer_ns: String,
    peer_if: String,
    pid: u32,
    // Dropped in this order: the daemon before its namespaces.
    own: Option<(Daemon, NetNs, NetNs)>,
}

impl Target {
    fn get() -> Option<Target> {
        if let Ok(socket) = std::env::var("BENCH_SOCKET") {
            let var = |name: &str| {
                std::env::var(name).unwrap_or_else(|_| panic!("BENCH_SOCKET needs {name} too"))
            };
            return Some(Target {
                socket: socket.into(),
                host_ns: var("BENCH_HOST_NS"),
                host_if: std::env::var("BENCH_HOST_IF").unwrap_or_else(|_| "vh0".into()),
                peer_ns: var("BENCH_PEER_NS"),
                peer_if: std::env::var("BENCH_PEER_IF").unwrap_or_else(|_| "vp0".into()),
                pid: var("BENCH_BACKEND_PID").parse().expect("BENCH_BACKEND_PID"),
                own: None,
            });
        }
        if !require_root_and_tools(&["ip"]) {
            return None;
        }
        let host = NetNs::new("vpb-host");
        let peer = NetNs::new("vpb-peer");
        veth_pair(&host, "vh0", &peer, "vp0");
        peer.add_addr("vp0", "198.18.0.2/24");
        let daemon = Daemon::start(&host, "vh0", &["--mac", MAC]);
        Some(Target {
            socket: daemon.socket.clone(),
            host_ns: host.name().to_owned(),
            host_if: "vh0".into(),
            peer_ns: peer.name().to_owned(),
            peer_if: "vp0".into(),
            pid: daemon.pid(),
            own: Some((daemon, peer, host)),
        })
    }
}

/// One 64 KiB TCPv4 GSO frame per chain, each in its own guest memory: an indirect table of
/// [virtio header + Ethernet/IPv4/TCP headers] and 16 page-sized payload pieces. The chains
/// are written once and posted again as soon as the daemon returns them, so the frontend
/// costs next to nothing per frame.
fn post_gso_chains(fe: &mut TestFrontend) -> Vec<u16> {
    let frame = gso_frame(fe.header_len());
    let (head, body) = frame.split_at(fe.header_len() + 54);
    let mut heads = Vec::new();
    for _ in 0..QUEUE_SIZE {
        let head_gpa = fe.alloc_buffer(head.len() as u32);
        fe.write_guest(head_gpa, head);
        let body_gpa = fe.alloc_buffer(body.len() as u32);
        fe.write_guest(body_gpa, body);
        let mut pieces = vec![(head_gpa, head.len())];
        pieces.extend(
            (0..body.len())
                .step_by(CHUNK)
                .map(|off| (body_gpa + off as u64, CHUNK.min(body.len() - off))),
        );
        let mut table = Vec::with_capacity(16 * pieces.len());
        for (i, &(addr, len)) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&(len as u32).to_le_bytes());
            table.extend_from_slice(&(if last { 0 } else { DESC_F_NEXT }).to_le_bytes());
            table.extend_from_slice(&(if last { 0 } else { i as u16 + 1 }).to_le_bytes());
        }
        let table_gpa = fe.alloc_buffer(table.len() as u32);
        fe.write_guest(table_gpa, &table);
        heads.push(fe.raw_add_descriptor(
            Queue::Tx,
            RawDesc {
                addr: table_gpa,
                len: table.len() as u32,
                flags: DESC_F_INDIRECT,
                next: 0,
            },
        ));
    }
    heads
}

/// A virtio net header (`header_len` bytes) and a TCPv4 GSO frame of PAYLOAD bytes of payload
/// from the frontend's MAC to SINK_MAC, checksum left to the device (NEEDS_CSUM).
fn gso_frame(header_len: usize) -> Vec<u8> {
    let tcp = Tcp {
        src: (GUEST_IP, 40000),
        dst: (PEER_IP, 5001),
        seq: 1,
        ack: 1,
        flags: TCP_ACK | TCP_PSH,
        window: 65535,
    };
    let src = parse_mac(MAC);
    let frame = tcp_frame((SINK_MAC, src), tcp, &pattern(PAYLOAD, 1), Csum::Partial);
    let mut out = vnet_header(
        vhdr::F_NEEDS_CSUM,
        vhdr::GSO_TCPV4,
        54,
        MSS,
        34,
        16,
        0,
        header_len,
    );
    out.extend_from_slice(&frame);
    out
}

/// A point in time: peer counters and the backend's CPU time.
struct Sample {
    at: Instant,
    bytes: u64,
    frames: u64,
    cpu: Duration,
}

fn sample(t: &Target, cpu_stat: &str) -> Sample {
    let c = link_counters(&t.peer_ns, &t.peer_if, &["rx_bytes", "rx_packets"]);
    Sample {
        at: Instant::now(),
        bytes: c[0],
        frames: c[1],
        cpu: cpu_time(cpu_stat),
    }
}

/// Runs `work` until told to stop, sampling after WARMUP and `run` later (from another
/// thread: sampling forks `ip`, and the work must not pause meanwhile). `cpu_stat` is the
/// /proc stat file of whatever does the work.
fn measure(
    t: &Target,
    run: Duration,
    cpu_stat: &str,
    work: impl FnOnce(&AtomicBool),
) -> (Sample, Sample) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            std::thread::sleep(WARMUP);
            let a = sample(t, cpu_stat);
            std::thread::sleep(run);
            let b = sample(t, cpu_stat);
            stop.store(true, Ordering::Relaxed);
            (a, b)
        });
        work(&stop);
        sampler.join().unwrap()
    })
}

fn report(name: &str, a: &Sample, b: &Sample, extra: &str) {
    let secs = (b.at - a.at).as_secs_f64();
    let bytes = b.bytes - a.bytes;
    println!(
        "BENCH {name} seconds={secs:.3} bytes={bytes} frames={} gbit={:.3} cpu_s={:.2} \
         frame_bytes={}{extra}",
        b.frames - a.frames,
        bytes as f64 * 8.0 / secs / 1e9,
        (b.cpu - a.cpu).as_secs_f64(),
        14 + 40 + PAYLOAD,
    );
}

/// The same frames from a packet socket on the host interface, in batches of 64 as the
/// daemon sends them: the kernel's part of the path alone.
fn direct(t: &Target, run: Duration) {
    let ns = std::fs::File::open(format!("/run/netns/{}", t.host_ns)).expect("host namespace");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open network namespace descriptor; setns only changes the
            // namespace of this new thread, which ends with this scope.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let iface = Interface::by_name(&t.host_if).expect("host interface");
            let sock = PacketSocket::open(&iface, &SocketOptions::default()).expect("socket");
            let frames: Vec<Vec<u8>> = (0..256)
                .map(|_| gso_frame(sock.kernel_vnet_header_len()))
                .collect();
            let iovs: Vec<IoSlice> = frames.iter().map(|f| IoSlice::new(f)).collect();
            let mut msgs = messages(iovs.chunks(1));
            // SAFETY: gettid(2) has no preconditions.
            let tid = unsafe { libc::gettid() };
            let stat = format!("/proc/self/task/{tid}/stat");
            let (a, b) = measure(t, run, &stat, |stop| {
                while !stop.load(Ordering::Relaxed) {
                    for batch in msgs.chunks_mut(64) {
                        // SAFETY: each message points at one live iovec of `iovs`, which
                        // points into `frames`; both outlive the call.
                        if unsafe { sock.send_batch(batch) }.is_err() {
                            std::thread::yield_now();
                        }
                    }
                }
            });
            report("bulk_direct", &a, &b, "");
        });
    });
}

/// One `mmsghdr` per group of iovecs (which must outlive the messages' use).
fn messages<'a>(groups: impl Iterator<Item = &'a [IoSlice<'a>]>) -> Vec<libc::mmsghdr> {
    groups
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all zeroes is a valid (empty) value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            // IoSlice is ABI-compatible with iovec on Unix; sendmmsg only reads through it.
            m.msg_hdr.msg_iov = iov.as_ptr().cast::<libc::iovec>().cast_mut();
            m.msg_hdr.msg_iovlen = iov.len() as _;
            m
        })
        .collect()
}

#[test]
#[ignore = "benchmark: qemu/bench.sh runs it (cargo test --release --test bench -- --ignored)"]
fn bulk_gso_64k() {
    let Some(target) = Target::get() else { return };
    let mut fe = TestFrontend::connect(&target.socket, Duration::from_secs(10));
    let acked = fe.start(FrontendConfig {
        features: feat::LINUX_GUEST,
        queue_size: QUEUE_SIZE,
        mem_size: 64 << 20,
    });
    let need = feat::CSUM | feat::HOST_TSO4 | feat::INDIRECT_DESC;
    assert_eq!(
        acked & need,
        need,
        "the backend does not offer TSO: {acked:#x}"
    );
    let heads = post_gso_chains(&mut fe);
    let first = link_counters(&target.peer_ns, &target.peer_if, &["rx_packets"])[0];
    for &h in &heads {
        fe.raw_push_avail(Queue::Tx, h);
    }
    fe.kick_tx();
    let run = seconds();
    let mut completed = 0u64;
    let stat = format!("/proc/{}/stat", target.pid);
    let (a, b) = measure(&target, run, &stat, |stop| {
        while !stop.load(Ordering::Relaxed) {
            let ready = fe
                .used_idx(Queue::Tx)
                .wrapping_sub(fe.consumed_idx(Queue::Tx));
            let wait = if ready > 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(20)
            };
            let done = fe.wait_tx_used(usize::from(ready).max(1), wait);
            completed += done.len() as u64;
            for (id, _) in done {
                fe.raw_push_avail(Queue::Tx, id as u16);
            }
            fe.kick_tx_if_needed();
        }
    });
    // Let the daemon finish what is in flight before counting the totals.
    let outstanding = fe.tx_outstanding();
    completed += fe.wait_tx_used(outstanding, Duration::from_secs(10)).len() as u64;
    std::thread::sleep(Duration::from_millis(100));
    let arrived = link_counters(&target.peer_ns, &target.peer_if, &["rx_packets"])[0] - first;
    // Frames the frontend had returned that never reached the peer: dropped on the way.
    report(
        "bulk_gso",
        &a,
        &b,
        &format!(" completed={completed} arrived={arrived}"),
    );
    drop(fe);
    direct(&target, run);
    if let Some((daemon, _, _)) = &target.own {
        eprintln!("vhost-packet counters: {:?}", daemon.stats());
    }
}

#[test]
#[ignore = "benchmark: qemu/bench.sh runs it (cargo test --release --test bench -- --ignored)"]
fn rtt_icmp() {
    let Some(target) = Target::get() else { return };
    let pings: usize = std::env::var("BENCH_PINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let mac = parse_mac(MAC);
    let peer = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &target.peer_ns])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // The peer answers at once, without asking ARP first.
    peer(&[
        "ip",
        "neigh",
        "replace",
        "198.18.0.1",
        "lladdr",
        MAC,
        "dev",
        &target.peer_if,
    ]);
    let peer_mac = parse_mac(&peer(&[
        "cat",
        &format!("/sys/class/net/{}/address", target.peer_if),
    ]));
    let mut fe = TestFrontend::connect(&target.socket, Duration::from_secs(10));
    fe.start(FrontendConfig {
        features: feat::LINUX_GUEST,
        queue_size: QUEUE_SIZE,
        mem_size: 64 << 20,
    });
    fe.post_rx_buffers(usize::from(QUEUE_SIZE), 2048);
    fe.kick_rx();
    let header = vnet_header(0, 0, 0, 0, 0, 0, 0, fe.header_len());
    let data = pattern(56, 7);
    const ID: u16 = 0x5254;
    const WARMUP_PINGS: usize = 200;
    let mut rtts = Vec::with_capacity(pings);
    let stat = format!("/proc/{}/stat", target.pid);
    let cpu0 = cpu_time(&stat);
    let start = Instant::now();
    for i in 0..WARMUP_PINGS + pings {
        let seq = i as u16;
        let request = ethernet(
            peer_mac,
            mac,
            ETH_IPV4,
            &ipv4(GUEST_IP, PEER_IP, 1, seq, &icmp_echo(ID, seq, &data)),
        );
        let t = Instant::now();
        fe.send(&header, &request, TxLayout::Combined);
        fe.kick_tx_if_needed();
        let reply = loop {
            let p = fe
                .recv(Duration::from_secs(5))
                .unwrap_or_else(|| panic!("no echo reply for seq {seq}"));
            // Re-post the buffer and kick only if asked, as a virtio-net driver does.
            fe.post_rx_buffers(p.num_buffers.into(), 2048);
            fe.kick_rx_if_needed();
            let f = &p.frame;
            let echo_reply = f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0;
            if echo_reply && f[38..40] == ID.to_be_bytes() && f[40..42] == seq.to_be_bytes() {
                break p;
            }
        };
        let rtt = t.elapsed();
        drop(reply);
        assert_eq!(fe.wait_tx_used(1, Duration::from_secs(5)).len(), 1);
        if i >= WARMUP_PINGS {
            rtts.push(rtt);
        }
    }
    let wall = start.elapsed();
    let cpu = cpu_time(&stat) - cpu0;
    rtts.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let avg = rtts.iter().map(|&d| us(d)).sum::<f64>() / rtts.len().max(1) as f64;
    let pct = |p: usize| {
        rtts.get((rtts.len() * p).div_ceil(100).saturating_sub(1))
            .map_or(0.0, |&d| us(d))
    };
    println!(
        "BENCH rtt_icmp pings={} avg_us={avg:.1} p50_us={:.1} p99_us={:.1} backend_cpu_s={:.3} seconds={:.3}",
        rtts.len(),
        pct(50),
        pct(99),
        cpu.as_secs_f64(),
        wall.as_secs_f64()
    );
}

#[test]
#[ignore = "generator for qemu/bench.sh: needs BENCH_INJECT_IF and BENCH_INJECT_DST"]
fn inject_64() {
    let Ok(ifname) = std::env::var("BENCH_INJECT_IF") else {
        eprintln!("SKIPPED: inject_64 is qemu/bench.sh's generator (set BENCH_INJECT_IF)");
        return;
    };
    let dst = parse_mac(&std::env::var("BENCH_INJECT_DST").unwrap_or_else(|_| MAC.into()));
    let iface = Interface::by_name(&ifname).expect("the interface to inject on");
    let src = iface.mac().expect("its MAC");
    let opts = SocketOptions {
        qdisc_bypass: true,
        ..SocketOptions::default()
    };
    let sock = PacketSocket::open(&iface, &opts).expect("a packet socket");
    const BATCH: usize = 256;
    // 64-byte frames (no FCS), as testpmd's txonly sends: an IEEE experimental ethertype that
    // no stack on the way takes for itself, and a sequence number.
    let header = vec![0u8; sock.kernel_vnet_header_len()];
    let frames: Vec<[u8; 64]> = (0..BATCH)
        .map(|i| {
            let mut f = [0u8; 64];
            f[..6].copy_from_slice(&dst);
            f[6..12].copy_from_slice(&src);
            f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            f[14..22].copy_from_slice(&(i as u64).to_be_bytes());
            f
        })
        .collect();
    let iovs: Vec<IoSlice> = frames
        .iter()
        .flat_map(|f| [IoSlice::new(&header), IoSlice::new(f)])
        .collect();
    let mut msgs = messages(iovs.chunks(2));
    let run = seconds();
    let start = Instant::now();
    let (mut sent, mut refused) = (0u64, 0u64);
    while start.elapsed() < run {
        // SAFETY: every message points at two live iovecs (`iovs`), which point at `header`
        // and one of `frames`; all outlive the call and no name or control data is set.
        match unsafe { sock.send_batch(&mut msgs) } {
            Ok(n) => sent += n as u64,
            // The veth or its peer's backlog is full: the frame is lost, as on a wire.
            Err(_) => {
                refused += 1;
                std::thread::yield_now();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "BENCH inject sent={sent} seconds={secs:.3} pps={:.0} refused_calls={refused}",
        sent as f64 / secs
    );
}
