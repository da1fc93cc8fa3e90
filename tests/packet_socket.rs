//! Integration tests for `vhost_packet::packet` on a veth pair between two private network
//! namespaces (198.18.0.0/15 only).
//!
//! Side A holds the `PacketSocket` under test; side B captures or injects frames with a plain
//! AF_PACKET socket. They need root and `ip` (some also `ethtool`); without them they print
//! `SKIPPED: ...` and pass, unless `CI=true`.

mod common;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::netns::{self, NetNs};
use vhost_packet::packet::probe::{USO_ACCEPTED_ON_LO, USO_BY_KERNEL_RELEASE};
use vhost_packet::packet::{
    probe_uso, Interface, PacketError, PacketSocket, SocketOptions, UsoSupport, VnetMode,
};

const A_IF: &str = "vpa0";
const B_IF: &str = "vpb0";
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x5e, 0x00, 0x0a];
const GUEST_IP: [u8; 4] = [198, 18, 0, 10];
const B_IP: [u8; 4] = [198, 18, 0, 2];
/// IEEE 802 local experimental ethertype: no stack reacts to these frames.
const ETH_P_EXPERIMENTAL: u16 = 0x88b5;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;

/// Big enough for `12 + 65549`, the largest IPv4 GSO packet.
const RX_BUF: usize = 128 * 1024;

// ---------------------------------------------------------------------------------------------
// Topology

struct Topo {
    a: NetNs,
    b: NetNs,
    b_mac: [u8; 6],
}

/// Two namespaces joined by `vpa0` (198.18.0.1/24) <-> `vpb0` (198.18.0.2/24). B knows the
/// guest address statically so its stack never ARPs for it.
fn topology(tools: &[&str]) -> Option<Topo> {
    if !netns::require_root_and_tools(tools) {
        return None;
    }
    let a = NetNs::new("vpkt-a");
    let b = NetNs::new("vpkt-b");
    let pair = netns::veth_pair(&a, A_IF, &b, B_IF);
    a.add_addr(A_IF, "198.18.0.1/24");
    b.add_addr(B_IF, "198.18.0.2/24");
    b.add_neigh(B_IF, "198.18.0.10", &netns::format_mac(&GUEST_MAC));
    let b_mac = pair.b_mac();
    drop(pair);
    Some(Topo { a, b, b_mac })
}

fn opts() -> SocketOptions {
    SocketOptions {
        guest_mac: GUEST_MAC,
        ..SocketOptions::default()
    }
}

fn open_in(ns: &NetNs, ifname: &str, opts: &SocketOptions) -> PacketSocket {
    ns.enter_thread(|| {
        let iface = Interface::by_name(ifname).unwrap_or_else(|e| panic!("{e}"));
        PacketSocket::open(&iface, opts).unwrap_or_else(|e| panic!("{e}"))
    })
}

// ---------------------------------------------------------------------------------------------
// A plain AF_PACKET socket (no vnet header) for capturing and injecting on the other side.

struct RawSock {
    fd: OwnedFd,
}

impl RawSock {
    /// Must run inside the namespace of `ifname` (e.g. in `NetNs::enter_thread`).
    fn open(ifname: &str, ignore_outgoing: bool) -> RawSock {
        let ifindex = Interface::by_name(ifname).unwrap().index();
        // SAFETY: plain socket(2) call with constant arguments.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if ignore_outgoing {
            setsockopt(
                fd.as_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                1,
            );
        }
        setsockopt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20);
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_ALL as u16).to_be(),
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `addr` is an initialised sockaddr_ll and the length is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        RawSock { fd }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a live buffer of `frame.len()` bytes.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame and its `sll_pkttype`, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, u8)> {
        if !wait_readable(self.fd.as_fd(), timeout) {
            return None;
        }
        let mut buf = vec![0u8; RX_BUF];
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is writable for its length; `from`/`from_len` are a valid address
        // buffer and its in/out length.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        assert!(n >= 0, "recvfrom: {}", io::Error::last_os_error());
        buf.truncate(n as usize);
        Some((buf, from.sll_pkttype))
    }

    /// All frames matching `keep` until `done` says so or `timeout` passes.
    fn collect(
        &self,
        timeout: Duration,
        mut keep: impl FnMut(&[u8]) -> bool,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        while !done(&frames) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.recv(left) {
                Some((f, _)) if keep(&f) => frames.push(f),
                Some(_) => {}
                None => break,
            }
        }
        frames
    }
}

fn setsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) {
    // SAFETY: `value` is a live c_int and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({name}): {}", io::Error::last_os_error());
}

fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0
}

/// Receives the next packet on the socket under test: (bytes incl. vnet header, result).
fn recv_packet(sock: &PacketSocket, timeout: Duration) -> Option<(Vec<u8>, bool, usize)> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; RX_BUF];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !wait_readable(sock.as_fd(), left) {
            return None;
        }
        match sock.recv_vectored(&mut [IoSliceMut::new(&mut buf)]) {
            Ok(r) => {
                let copied = r.len.min(buf.len());
                return Some((buf[..copied].to_vec(), r.truncated, r.len));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Receives packets until one whose frame (after `hdr_len` bytes) satisfies `pred`.
fn recv_matching(
    sock: &PacketSocket,
    hdr_len: usize,
    timeout: Duration,
    pred: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (pkt, _, _) = recv_packet(sock, left)?;
        if pkt.len() >= hdr_len && pred(&pkt[hdr_len..]) {
            return Some(pkt);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

fn vnet_hdr(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; 12] {
    // Host byte order: legacy virtio endianness on the AF_PACKET path.
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_ne_bytes());
    h[4..6].copy_from_slice(&gso_size.to_ne_bytes());
    h[6..8].copy_from_slice(&csum_start.to_ne_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
    h
}

fn field16(h: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([h[off], h[off + 1]])
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn experimental_frame(dst: [u8; 6], src: [u8; 6], marker: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(60)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETH_P_EXPERIMENTAL.to_be_bytes());
    f[14..18].copy_from_slice(&marker.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7);
    }
    f
}

fn marker_of(frame: &[u8]) -> Option<u32> {
    (frame.len() >= 18 && frame[12..14] == ETH_P_EXPERIMENTAL.to_be_bytes())
        .then(|| u32::from_be_bytes([frame[14], frame[15], frame[16], frame[17]]))
}

const SPORT: u16 = 41000;
const DPORT: u16 = 5001;

/// Ethernet/IPv4/TCP guest -> B with a correct IP checksum and the TCP check field holding the
/// pseudo-header seed (what a guest sends with NEEDS_CSUM).
fn tcp_frame(dst_mac: [u8; 6], seq: u32, payload: &[u8]) -> Vec<u8> {
    let l4_len = 20 + payload.len();
    let mut f = vec![0u8; 14 + 20 + l4_len];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&GUEST_MAC);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&GUEST_IP);
    ip[16..20].copy_from_slice(&B_IP);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&SPORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&DPORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH|ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let seed = fold(sum16(&GUEST_IP) + sum16(&B_IP) + 6 + l4_len as u32);
    tcp[16..18].copy_from_slice(&seed.to_be_bytes());
    f[54..].copy_from_slice(payload);
    f
}

/// (seq, payload) if `frame` is a TCP segment of our guest -> B flow.
fn our_tcp(frame: &[u8]) -> Option<(u32, &[u8])> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    if frame[26..30] != GUEST_IP || frame[30..34] != B_IP {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let tcp = &frame[14 + ihl..];
    if tcp[0..2] != SPORT.to_be_bytes() || tcp[2..4] != DPORT.to_be_bytes() {
        return None;
    }
    let doff = usize::from(tcp[12] >> 4) * 4;
    let ip_total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let end = (14 + ip_total).min(frame.len());
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some((seq, &frame[14 + ihl + doff..end]))
}

fn tcp_csum_ok(frame: &[u8]) -> bool {
    let ip_total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4 = &frame[34..14 + ip_total];
    fold(sum16(&frame[26..34]) + 6 + l4.len() as u32 + sum16(l4)) == 0xffff
}

fn ip_csum_ok(frame: &[u8]) -> bool {
    fold(sum16(&frame[14..34])) == 0xffff
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn send_all(sock: &PacketSocket, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    sock.send_vectored(&iov)
}

/// Collects B's copies of our flow until `total` payload bytes arrived; returns the frames.
fn collect_flow(cap: &RawSock, total: usize) -> Vec<Vec<u8>> {
    cap.collect(
        Duration::from_secs(3),
        |f| our_tcp(f).is_some(),
        |frames| {
            frames
                .iter()
                .map(|f| our_tcp(f).map_or(0, |(_, p)| p.len()))
                .sum::<usize>()
                >= total
        },
    )
}

/// Reassembles the flow's payload by sequence number relative to `isn`.
fn reassemble(frames: &[Vec<u8>], isn: u32, total: usize) -> Vec<u8> {
    let mut out = vec![0u8; total];
    for f in frames {
        let (seq, p) = our_tcp(f).unwrap();
        let off = seq.wrapping_sub(isn) as usize;
        out[off..off + p.len()].copy_from_slice(p);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn missing_interface_gives_documented_error() {
    // Needs no privilege: the name is looked up in the current namespace.
    let err = Interface::by_name("vpnoexist0").unwrap_err();
    assert!(matches!(err, PacketError::LookupInterface { .. }));
    assert_eq!(
        err.to_string(),
        "looking up interface vpnoexist0: No such device (os error 19)"
    );
    assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    let err = Interface::by_name("much-too-long-name0").unwrap_err();
    assert!(matches!(err, PacketError::InvalidInterfaceName { .. }));
}

#[test]
fn interface_queries() {
    let Some(t) = topology(&["ip"]) else { return };
    let (index, mtu, mac, flags) = t.a.enter_thread(|| {
        let i = Interface::by_name(A_IF).unwrap();
        (
            i.index(),
            i.mtu().unwrap(),
            i.mac().unwrap(),
            i.flags().unwrap(),
        )
    });
    assert!(index > 1);
    assert_eq!(mtu, 1500);
    assert_eq!(mac, t.a.mac(A_IF));
    assert!(flags.up && flags.running && !flags.loopback, "{flags:?}");
    t.a.set_mtu(A_IF, 9000);
    t.a.ip(&["link", "set", A_IF, "down"]);
    let (mtu, up, flags) = t.a.enter_thread(|| {
        let i = Interface::by_name(A_IF).unwrap();
        (i.mtu().unwrap(), i.is_up().unwrap(), i.flags().unwrap())
    });
    assert_eq!(mtu, 9000);
    assert!(!up && !flags.running);
}

#[test]
fn open_without_cap_net_raw_names_the_capability() {
    if !netns::require_root_and_tools(&[]) {
        return;
    }
    // Capabilities are per thread: drop CAP_NET_RAW from the effective set of a fresh thread.
    let err = std::thread::spawn(|| {
        drop_effective_cap(13 /* CAP_NET_RAW */);
        let lo = Interface::by_name("lo").unwrap();
        PacketSocket::open(&lo, &SocketOptions::default()).unwrap_err()
    })
    .join()
    .unwrap();
    assert!(matches!(err, PacketError::OpenSocket { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "opening packet socket: Operation not permitted (CAP_NET_RAW is required)"
    );
    assert!(err.is_permission_denied());
}

/// Clears capability `cap` from the calling thread's effective set (raw capget/capset).
fn drop_effective_cap(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3: two Data elements
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and a two-element data array of the layout the v3 ABI expects.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
    data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    // SAFETY: as above; pid 0 = the calling thread only.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
}

#[test]
fn open_on_vanished_interface_fails_at_bind() {
    let Some(t) = topology(&["ip"]) else { return };
    t.a.ip(&[
        "link", "add", "vpgone0", "type", "veth", "peer", "name", "vpgone1",
    ]);
    let iface = t.a.enter_thread(|| Interface::by_name("vpgone0").unwrap());
    t.a.ip(&["link", "del", "vpgone0"]);
    let err =
        t.a.enter_thread(|| PacketSocket::open(&iface, &opts()).unwrap_err());
    assert!(matches!(err, PacketError::Bind { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "binding packet socket to vpgone0: No such device (os error 19)"
    );
}

#[test]
fn socket_setup_defaults() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(&t.a, A_IF, &opts());
    assert_eq!(sock.vnet_mode(), VnetMode::Native);
    assert_eq!(sock.kernel_vnet_header_len(), 12);
    assert_eq!(sock.query_kernel_vnet_header_len().unwrap(), 12);
    assert_eq!(sock.interface_name(), A_IF);
    // As root SO_RCVBUFFORCE applies; the kernel reports twice the request.
    let (rcv, snd) = sock.buffer_sizes().unwrap();
    assert!(rcv >= 8 << 20 && snd >= 8 << 20, "rcv {rcv} snd {snd}");

    let dup = sock.try_clone().unwrap();
    assert_ne!(dup.as_raw_fd(), sock.as_raw_fd());
    // SAFETY: F_GETFD on a descriptor we own.
    let fdflags = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETFD) };
    assert!(fdflags & libc::FD_CLOEXEC != 0);

    // Nothing queued: non-blocking recv says WouldBlock.
    let mut buf = [0u8; 64];
    let err = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut buf)])
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

    assert!(sock.set_vnet_header_len(11).is_err());
    sock.set_vnet_header_len(10).unwrap();
    assert_eq!(sock.kernel_vnet_header_len(), 10);
    assert_eq!(sock.query_kernel_vnet_header_len().unwrap(), 10);
    sock.set_vnet_header_len(12).unwrap();
    assert_eq!(sock.query_kernel_vnet_header_len().unwrap(), 12);
}

#[test]
fn tx_needs_csum_frame_reaches_peer() {
    let Some(t) = topology(&["ip", "ethtool"]) else {
        return;
    };
    let sock = open_in(&t.a, A_IF, &opts());
    let cap = t.b.enter_thread(|| RawSock::open(B_IF, true));
    let hdr = vnet_hdr(F_NEEDS_CSUM, GSO_NONE, 54, 0, 34, 16);
    let data = payload(1000);

    // Default veth offloads: the CHECKSUM_PARTIAL skb crosses the veth as is.
    let frame = tcp_frame(t.b_mac, 1000, &data);
    assert_eq!(send_all(&sock, &[&hdr, &frame]).unwrap(), 12 + frame.len());
    let got = collect_flow(&cap, data.len());
    assert_eq!(got.len(), 1, "expected one frame");
    let rx = &got[0];
    assert_eq!(rx.len(), frame.len());
    assert_eq!(rx[..50], frame[..50], "headers differ");
    assert_eq!(rx[54..], frame[54..], "payload differs");
    assert!(ip_csum_ok(rx));
    assert!(
        rx[50..52] == frame[50..52] || tcp_csum_ok(rx),
        "TCP check is neither the seed nor valid"
    );

    // tx checksumming off on A: the kernel must complete the checksum in software.
    t.a.ethtool_k(A_IF, &[("tx", "off")]);
    let frame = tcp_frame(t.b_mac, 5000, &data);
    assert_eq!(send_all(&sock, &[&hdr, &frame]).unwrap(), 12 + frame.len());
    let got = collect_flow(&cap, data.len());
    assert_eq!(got.len(), 1);
    assert!(tcp_csum_ok(&got[0]), "checksum not completed");
    assert_eq!(got[0][54..], frame[54..]);
}

#[test]
fn tx_gso_frame_reaches_peer() {
    let Some(t) = topology(&["ip", "ethtool"]) else {
        return;
    };
    let sock = open_in(&t.a, A_IF, &opts());
    let cap = t.b.enter_thread(|| RawSock::open(B_IF, true));
    let hdr = vnet_hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
    let data = payload(30000);

    for (offloads_on, isn) in [(true, 100_000u32), (false, 200_000u32)] {
        if !offloads_on {
            t.a.ethtool_k(A_IF, &[("tx", "off")]);
        }
        let frame = tcp_frame(t.b_mac, isn, &data);
        assert_eq!(send_all(&sock, &[&hdr, &frame]).unwrap(), 12 + 30054);
        let got = collect_flow(&cap, data.len());
        let total: usize = got.iter().map(|f| our_tcp(f).unwrap().1.len()).sum();
        assert_eq!(
            total,
            30000,
            "offloads_on={offloads_on}: {} frames",
            got.len()
        );
        assert_eq!(reassemble(&got, isn, data.len()), data);
        if offloads_on {
            // veth passes the GSO skb through unsegmented (kernel-facts §2a).
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].len(), 30054);
        } else {
            assert_eq!(got.len(), 21, "1448-byte segments expected");
            for f in &got {
                assert!(f.len() <= 1514);
                assert!(ip_csum_ok(f) && tcp_csum_ok(f), "bad segment checksum");
            }
        }
    }
}

#[test]
fn rx_frames_carry_vnet_header() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(&t.a, A_IF, &opts());
    let inject = t.b.enter_thread(|| RawSock::open(B_IF, true));

    // A plain frame: header all zero except nothing to report; num_buffers = 0.
    let frame = experimental_frame(GUEST_MAC, t.b_mac, 0xabc1, 200);
    inject.send(&frame);
    let pkt = recv_matching(&sock, 12, Duration::from_secs(2), |f| {
        marker_of(f) == Some(0xabc1)
    })
    .expect("frame from B");
    assert_eq!(pkt.len(), 12 + frame.len());
    assert_eq!(pkt[1], GSO_NONE);
    assert_eq!(field16(&pkt, 10), 0, "num_buffers");
    assert_eq!(pkt[12..], frame[..]);

    // A GSO frame from a vnet socket on B arrives as one packet with a GSO header.
    let b_sock = open_in(&t.b, B_IF, &SocketOptions::default());
    let data = payload(30000);
    let mut frame = tcp_frame(GUEST_MAC, 7, &data);
    frame[6..12].copy_from_slice(&t.b_mac);
    let hdr = vnet_hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
    let is_ours = |f: &[u8]| f.len() > 34 && f[12..14] == [8, 0] && f[26..30] == GUEST_IP;
    assert_eq!(send_all(&b_sock, &[&hdr, &frame]).unwrap(), 12 + 30054);
    let pkt = recv_matching(&sock, 12, Duration::from_secs(2), is_ours).expect("GSO frame");
    assert_eq!(pkt.len(), 12 + 30054);
    assert_eq!(pkt[0], F_NEEDS_CSUM);
    assert_eq!(pkt[1], GSO_TCPV4);
    assert_eq!(field16(&pkt, 4), 1448, "gso_size");
    assert_eq!(field16(&pkt, 6), 34, "csum_start");
    assert_eq!(field16(&pkt, 8), 16, "csum_offset");
    assert_eq!(field16(&pkt, 10), 0, "num_buffers");
    assert_eq!(pkt[12..], frame[..]);

    // Too small a buffer: truncated, but the length and the header describe the whole packet.
    assert_eq!(send_all(&b_sock, &[&hdr, &frame]).unwrap(), 12 + 30054);
    assert!(wait_readable(sock.as_fd(), Duration::from_secs(2)));
    let mut small = [0u8; 112];
    let r = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut small)])
        .unwrap();
    assert!(r.truncated);
    assert_eq!(r.len, 12 + 30054);
    assert_eq!(small[1], GSO_TCPV4);

    // Smaller than the vnet header: EINVAL, and that packet is gone.
    inject.send(&experimental_frame(GUEST_MAC, t.b_mac, 0xabc2, 60));
    assert!(wait_readable(sock.as_fd(), Duration::from_secs(2)));
    let mut tiny = [0u8; 8];
    let err = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut tiny)])
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    assert!(recv_matching(&sock, 12, Duration::from_millis(200), |f| {
        marker_of(f) == Some(0xabc2)
    })
    .is_none());
}

#[test]
fn recv_scatters_over_iovecs() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(&t.a, A_IF, &opts());
    let inject = t.b.enter_thread(|| RawSock::open(B_IF, true));
    let frame = experimental_frame(GUEST_MAC, t.b_mac, 0x5ca7, 300);
    inject.send(&frame);
    assert!(wait_readable(sock.as_fd(), Duration::from_secs(2)));
    let mut hdr = [0xffu8; 12];
    let mut part1 = [0u8; 100];
    let mut part2 = vec![0u8; 4096];
    let iov = &mut [
        libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: part1.as_mut_ptr().cast(),
            iov_len: part1.len(),
        },
        libc::iovec {
            iov_base: part2.as_mut_ptr().cast(),
            iov_len: part2.len(),
        },
    ];
    // SAFETY: the three iovecs point to live local buffers of exactly their lengths.
    let r = unsafe { sock.recv(iov) }.unwrap();
    assert_eq!(r.len, 12 + 300);
    assert!(!r.truncated);
    assert_eq!(hdr, [0; 12]);
    assert_eq!(part1[..], frame[..100]);
    assert_eq!(part2[..200], frame[100..]);
}

#[test]
fn own_transmissions_are_not_looped_back() {
    let Some(t) = topology(&["ip"]) else { return };
    let s1 = open_in(&t.a, A_IF, &opts());
    let s2 = open_in(&t.a, A_IF, &opts());
    // Control: a tap without PACKET_IGNORE_OUTGOING on the same device sees the frame leave.
    let tap = t.a.enter_thread(|| RawSock::open(A_IF, false));
    let frame = experimental_frame(t.b_mac, GUEST_MAC, 0x1007, 100);
    assert_eq!(send_all(&s1, &[&[0u8; 12], &frame]).unwrap(), 112);

    let seen = tap.collect(
        Duration::from_secs(2),
        |f| marker_of(f) == Some(0x1007),
        |v| !v.is_empty(),
    );
    assert_eq!(seen.len(), 1, "tap did not see the frame leave");
    for (name, s) in [("sender", &s1), ("sibling", &s2)] {
        let got = recv_matching(s, 12, Duration::from_millis(300), |f| {
            marker_of(f) == Some(0x1007)
        });
        assert!(got.is_none(), "{name} socket saw our own transmission");
    }
}

#[test]
fn malformed_header_is_rejected() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(&t.a, A_IF, &opts());
    let cap = t.b.enter_thread(|| RawSock::open(B_IF, true));
    let data = payload(1000);
    let good_hdr = vnet_hdr(F_NEEDS_CSUM, GSO_NONE, 54, 0, 34, 16);
    let bad_hdr = vnet_hdr(F_NEEDS_CSUM, GSO_NONE, 2000, 0, 34, 16);

    let f0 = tcp_frame(t.b_mac, 10_000, &data);
    let err = send_all(&sock, &[&bad_hdr, &f0]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    let err = send_all(&sock, &[&good_hdr, &f0[..10]]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "short frame: {err}");

    // sendmmsg: [good, bad, good] -> 1 sent, the bad one's error is discarded; retrying from
    // the bad one returns its error; then the rest goes out.
    let frames = [
        tcp_frame(t.b_mac, 20_000, &data),
        tcp_frame(t.b_mac, 30_000, &data),
        tcp_frame(t.b_mac, 40_000, &data),
    ];
    let hdrs = [&good_hdr, &bad_hdr, &good_hdr];
    let mut iovs: Vec<[libc::iovec; 2]> = frames
        .iter()
        .zip(hdrs)
        .map(|(f, h)| {
            [
                libc::iovec {
                    iov_base: h.as_ptr() as *mut _,
                    iov_len: h.len(),
                },
                libc::iovec {
                    iov_base: f.as_ptr() as *mut _,
                    iov_len: f.len(),
                },
            ]
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: all-zero is a valid mmsghdr (no name, no control data).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov.as_mut_ptr();
            m.msg_hdr.msg_iovlen = 2;
            m
        })
        .collect();
    // SAFETY: each mmsghdr points to two iovecs of live buffers (`hdrs`, `frames`), which the
    // kernel only reads.
    let n = unsafe { sock.send_batch(&mut msgs) }.unwrap();
    assert_eq!(n, 1);
    assert_eq!(msgs[0].msg_len as usize, 12 + frames[0].len());
    // SAFETY: as above.
    let err = unsafe { sock.send_batch(&mut msgs[1..]) }.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    // SAFETY: as above.
    let n = unsafe { sock.send_batch(&mut msgs[2..]) }.unwrap();
    assert_eq!(n, 1);

    let got = cap.collect(
        Duration::from_millis(1500),
        |f| our_tcp(f).is_some(),
        |_| false,
    );
    let seqs: Vec<u32> = got.iter().map(|f| our_tcp(f).unwrap().0).collect();
    assert_eq!(seqs, [20_000, 40_000], "only the good frames may arrive");
}

#[test]
fn legacy10_mode() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(
        &t.a,
        A_IF,
        &SocketOptions {
            force_legacy_vnet_hdr: true,
            ..opts()
        },
    );
    assert_eq!(sock.vnet_mode(), VnetMode::Legacy10);
    assert_eq!(sock.kernel_vnet_header_len(), 10);
    assert_eq!(sock.query_kernel_vnet_header_len().unwrap(), 10);
    // The guest may use 12 bytes; the kernel side stays at 10 and the caller adapts.
    sock.set_vnet_header_len(12).unwrap();
    assert_eq!(sock.kernel_vnet_header_len(), 10);
    assert!(sock.set_vnet_header_len(0).is_err());

    let cap = t.b.enter_thread(|| RawSock::open(B_IF, true));
    let hdr = vnet_hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
    let data = payload(5000);
    let frame = tcp_frame(t.b_mac, 77, &data);
    assert_eq!(
        send_all(&sock, &[&hdr[..10], &frame]).unwrap(),
        10 + frame.len()
    );
    let got = collect_flow(&cap, data.len());
    assert_eq!(reassemble(&got, 77, data.len()), data);

    let frame = experimental_frame(GUEST_MAC, t.b_mac, 0x1e6a, 150);
    cap.send(&frame);
    let pkt = recv_matching(&sock, 10, Duration::from_secs(2), |f| {
        marker_of(f) == Some(0x1e6a)
    })
    .expect("frame from B");
    assert_eq!(pkt.len(), 10 + frame.len());
    assert_eq!(pkt[..10], [0; 10]);
    assert_eq!(pkt[10..], frame[..]);
}

#[test]
fn memberships_and_promisc() {
    let Some(t) = topology(&["ip"]) else { return };
    // veth has no unicast filter, so the guest MAC membership alone already counts as one
    // promiscuity reference; measure relative to a socket without promisc.
    let base = open_in(&t.a, A_IF, &opts());
    let with_guest_mac = t.a.promiscuity(A_IF);
    let sock = open_in(
        &t.a,
        A_IF,
        &SocketOptions {
            promisc: true,
            ..opts()
        },
    );
    assert!(t.a.promiscuity(A_IF) > with_guest_mac);
    sock.set_promisc(false).unwrap();
    assert_eq!(t.a.promiscuity(A_IF), with_guest_mac);
    let other = [0x02, 0, 0, 0x5e, 0, 0x0b];
    sock.add_membership(other).unwrap();
    sock.drop_membership(other).unwrap();
    // The kernel accepts dropping a membership the socket does not hold.
    sock.drop_membership(other).unwrap();
    sock.set_promisc(true).unwrap();
    drop(sock);
    assert_eq!(
        t.a.promiscuity(A_IF),
        with_guest_mac,
        "promiscuity must go with the socket"
    );
    drop(base);
}

#[test]
fn statistics_count_and_reset() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(&t.a, A_IF, &opts());
    let inject = t.b.enter_thread(|| RawSock::open(B_IF, true));
    for m in 0..3 {
        inject.send(&experimental_frame(GUEST_MAC, t.b_mac, 0x5000 + m, 100));
    }
    assert!(wait_readable(sock.as_fd(), Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    let (packets, drops) = sock.drops().unwrap();
    assert!(packets >= 3, "packets {packets}");
    assert_eq!(drops, 0);
    let (again, _) = sock.drops().unwrap();
    assert!(again < packets, "PACKET_STATISTICS must reset on read");
}

#[test]
fn bound_while_down_reports_enetdown_once() {
    let Some(t) = topology(&["ip"]) else { return };
    t.a.ip(&["link", "set", A_IF, "down"]);
    let sock = open_in(&t.a, A_IF, &opts());
    let mut buf = [0u8; 128];
    let err = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut buf)])
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENETDOWN), "{err}");
    let err = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut buf)])
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    let frame = experimental_frame(t.b_mac, GUEST_MAC, 2, 60);
    let err = send_all(&sock, &[&[0u8; 12], &frame]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENETDOWN), "{err}");

    t.a.ip(&["link", "set", A_IF, "up"]);
    let inject = t.b.enter_thread(|| RawSock::open(B_IF, true));
    // The veth carrier needs a moment after the link comes up.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        inject.send(&experimental_frame(GUEST_MAC, t.b_mac, 0xd0e, 80));
        got = recv_matching(&sock, 12, Duration::from_millis(200), |f| {
            marker_of(f) == Some(0xd0e)
        });
    }
    assert!(got.is_some(), "no traffic after the link came up");
}

#[test]
fn interface_removal_is_reported() {
    let Some(t) = topology(&["ip"]) else { return };
    let sock = open_in(&t.a, A_IF, &opts());
    t.a.ip(&["link", "del", A_IF]);
    let mut buf = [0u8; 128];
    let err = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut buf)])
        .unwrap_err();
    // The kernel reports removal like a link going down (ENETDOWN, once) ...
    assert_eq!(err.raw_os_error(), Some(libc::ENETDOWN), "{err}");
    let err = sock
        .recv_vectored(&mut [IoSliceMut::new(&mut buf)])
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    // ... and only sending tells them apart: the bound device is gone.
    let frame = experimental_frame(t.b_mac, GUEST_MAC, 1, 60);
    let err = send_all(&sock, &[&[0u8; 12], &frame]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "{err}");
}

#[test]
fn probe_uso_on_this_kernel() {
    if !netns::require_root_and_tools(&["ip"]) {
        return;
    }
    let ns = NetNs::new("vpkt-uso");
    let result = ns.enter_thread(probe_uso);
    assert_eq!(result, UsoSupport::Supported(USO_ACCEPTED_ON_LO));

    // With lo down the probe cannot run and falls back to the kernel release (6.18 here).
    ns.ip(&["link", "set", "lo", "down"]);
    let result = ns.enter_thread(probe_uso);
    assert_eq!(result, UsoSupport::Supported(USO_BY_KERNEL_RELEASE));
}

// ---------------------------------------------------------------------------------------------
// Fanout groups (one packet socket per queue pair)

/// UDP port the flows below go to; their source port names the flow.
const FLOW_DPORT: u16 = 7000;

/// Ethernet/IPv4/UDP B -> guest from `sport`, with `marker` as the first payload bytes.
fn udp_flow_frame(src_mac: [u8; 6], dst_mac: [u8; 6], sport: u16, marker: u32) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 32];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 8 + 32).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&B_IP);
    ip[16..20].copy_from_slice(&GUEST_IP);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&FLOW_DPORT.to_be_bytes());
    f[38..40].copy_from_slice(&(8u16 + 32).to_be_bytes());
    f[42..46].copy_from_slice(&marker.to_be_bytes());
    f
}

/// (source port, marker) of a frame made by `udp_flow_frame`.
fn flow_of(frame: &[u8]) -> Option<(u16, u32)> {
    (frame.len() >= 46
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 17
        && frame[36..38] == FLOW_DPORT.to_be_bytes())
    .then(|| {
        (
            u16::from_be_bytes([frame[34], frame[35]]),
            u32::from_be_bytes([frame[42], frame[43], frame[44], frame[45]]),
        )
    })
}

/// Reads every member until `want` flow frames arrived in total or nothing came for a while;
/// returns the (source port, marker) pairs each member got. Skips the one `ENETDOWN` a link
/// flap leaves pending.
fn drain_members(members: &[PacketSocket], want: usize) -> Vec<Vec<(u16, u32)>> {
    let mut got = vec![Vec::new(); members.len()];
    let mut buf = vec![0u8; RX_BUF];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let total: usize = got.iter().map(Vec::len).sum();
        // Once everything is in, wait a little longer for strays (duplicates, wrong member).
        let quiet = if total >= want {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        if quiet_since.elapsed() > quiet {
            break;
        }
        let mut any = false;
        for (i, s) in members.iter().enumerate() {
            match s.recv_vectored(&mut [IoSliceMut::new(&mut buf)]) {
                Ok(r) => {
                    any = true;
                    if let Some(flow) = flow_of(&buf[12..r.len.min(buf.len())]) {
                        got[i].push(flow);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {}
                Err(e) => panic!("member {i}: {e}"),
            }
        }
        if any {
            quiet_since = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    got
}

/// `n` sockets on A joined into one fanout group, in member order.
fn fanout_members(t: &Topo, n: usize) -> Vec<PacketSocket> {
    let members: Vec<PacketSocket> = (0..n).map(|_| open_in(&t.a, A_IF, &opts())).collect();
    let id = members[0].join_fanout(None).unwrap();
    for m in &members[1..] {
        assert_eq!(m.join_fanout(Some(id)).unwrap(), id);
    }
    for m in &members {
        assert_eq!(m.fanout_group().unwrap(), Some(id));
    }
    members
}

/// Sends `per_flow` frames for each of `flows` source ports from B; markers count from `base`.
fn send_flows(
    inject: &RawSock,
    b_mac: [u8; 6],
    flows: std::ops::Range<u16>,
    per_flow: u32,
    base: u32,
) {
    for sport in flows {
        for k in 0..per_flow {
            let marker = base + u32::from(sport) * per_flow + k;
            inject.send(&udp_flow_frame(b_mac, GUEST_MAC, 40000 + sport, marker));
        }
    }
}

/// Checks that every frame arrived exactly once, each flow on one member, and returns the set
/// of members that got anything.
fn check_spread(got: &[Vec<(u16, u32)>], frames: usize) -> std::collections::BTreeSet<usize> {
    use std::collections::{BTreeSet, HashMap};
    let mut markers = BTreeSet::new();
    let mut member_of_flow: HashMap<u16, usize> = HashMap::new();
    for (i, flows) in got.iter().enumerate() {
        for &(sport, marker) in flows {
            assert!(markers.insert(marker), "marker {marker:#x} arrived twice");
            let first = *member_of_flow.entry(sport).or_insert(i);
            assert_eq!(first, i, "flow {sport} arrived on members {first} and {i}");
        }
    }
    assert_eq!(markers.len(), frames, "every frame arrived");
    got.iter()
        .enumerate()
        .filter(|(_, f)| !f.is_empty())
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn fanout_steers_each_flow_to_one_enabled_member_also_after_a_link_flap() {
    use vhost_packet::packet::fanout;
    let Some(t) = topology(&["ip"]) else { return };
    let members = fanout_members(&t, 3);
    let inject = t.b.enter_thread(|| RawSock::open(B_IF, true));

    // Members 0 and 2 enabled: 32 flows of 3 frames spread over both, none reaches 1.
    members[0]
        .set_fanout_program(&fanout::program(&[0, 2]))
        .unwrap();
    send_flows(&inject, t.b_mac, 0..32, 3, 0);
    let got = drain_members(&members, 96);
    let used = check_spread(&got, 96);
    assert_eq!(used, [0, 2].into(), "{got:?}");

    // Only member 1: everything goes there.
    members[2]
        .set_fanout_program(&fanout::program(&[1]))
        .unwrap();
    send_flows(&inject, t.b_mac, 0..32, 1, 1000);
    let used = check_spread(&drain_members(&members, 32), 32);
    assert_eq!(used, [1].into());

    // The kernel takes the members out of the group while the link is down and puts them
    // back when it comes up: the program's indices must still name the same sockets.
    members[0]
        .set_fanout_program(&fanout::program(&[2]))
        .unwrap();
    t.a.ip(&["link", "set", A_IF, "down"]);
    t.a.ip(&["link", "set", A_IF, "up"]);
    // The veth carrier needs a moment after the link comes up: send until a frame gets through.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = vec![Vec::new(); 3];
    while got.iter().all(Vec::is_empty) {
        assert!(
            Instant::now() < deadline,
            "no traffic after the link came up"
        );
        send_flows(&inject, t.b_mac, 0..1, 1, 5000);
        got = drain_members(&members, 1);
    }
    assert!(got[0].is_empty() && got[1].is_empty(), "{got:?}");
    send_flows(&inject, t.b_mac, 0..32, 1, 2000);
    let used = check_spread(&drain_members(&members, 32), 32);
    assert_eq!(used, [2].into());
}

/// Joins a raw socket to a fanout group with exactly these type and flags (no vnet header).
fn raw_join(sock: &RawSock, id: u16, type_flags: u32) {
    setsockopt(
        sock.fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_FANOUT,
        (u32::from(id) | (type_flags << 16)) as i32,
    );
}

#[test]
fn fanout_group_never_receives_what_leaves_the_interface() {
    use vhost_packet::packet::fanout;
    let Some(t) = topology(&["ip"]) else { return };
    let members = fanout_members(&t, 2);
    members[0]
        .set_fanout_program(&fanout::program(&[0, 1]))
        .unwrap();
    // Control: a group made without PACKET_FANOUT_FLAG_IGNORE_OUTGOING, whose members set
    // PACKET_IGNORE_OUTGOING themselves, does receive what the host sends: the option has no
    // effect inside a group, which is why the flag is needed.
    let control = t.a.enter_thread(|| {
        let socks = [RawSock::open(A_IF, true), RawSock::open(A_IF, true)];
        for s in &socks {
            raw_join(s, 0xbeef, libc::PACKET_FANOUT_HASH);
        }
        socks
    });
    let host = t.a.enter_thread(|| RawSock::open(A_IF, false));
    let inject = t.b.enter_thread(|| RawSock::open(B_IF, true));

    // Out of the interface: frames another socket (the host, in effect) sends, and frames a
    // member sends itself. In: frames from B, which must still arrive.
    for sport in 0..16u16 {
        host.send(&udp_flow_frame(
            GUEST_MAC,
            t.b_mac,
            40000 + sport,
            0x100 + u32::from(sport),
        ));
        let own = udp_flow_frame(GUEST_MAC, t.b_mac, 40000 + sport, 0x200 + u32::from(sport));
        send_all(&members[0], &[&[0u8; 12], &own]).unwrap();
    }
    send_flows(&inject, t.b_mac, 0..16, 1, 0x1000);

    let got = drain_members(&members, 16);
    let all: Vec<u32> = got.iter().flatten().map(|&(_, m)| m).collect();
    assert!(
        all.iter().all(|&m| m >= 0x1000),
        "outgoing frames reached the group: {all:x?}"
    );
    check_spread(&got, 16);

    let leaked = control
        .iter()
        .flat_map(|s| {
            s.collect(
                Duration::from_millis(500),
                |f| flow_of(f).is_some_and(|(_, m)| (0x100..0x110).contains(&m)),
                |_| false,
            )
        })
        .count();
    assert_eq!(leaked, 16, "the control group sees the host's 16 frames");
}
