//! The command line of the real binary: user errors end with exactly one line on stderr
//! (`vhost-packet: <what failed>`) and a non-zero exit, never a panic or a backtrace; `--help`,
//! `--version`, stale sockets, a down interface and client mode behave as documented.
//!
//! Validation errors run without privileges. Everything that needs an interface, a second
//! process on a socket or a capability drop runs in namespaces created here and needs root;
//! without it those tests print `SKIPPED: ...` and pass, unless `CI=true`.

mod common;

use std::io::{IoSlice, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::frontend::{FrontendConfig, TestFrontend};
use common::netns::{require_root_and_tools, veth_pair, NetNs};
use common::packets::{ethernet, pattern, plain_header, send_frame, ETH_EXPERIMENTAL, GUEST_MAC};
use vhost_packet::packet::interface::Interface;
use vhost_packet::packet::socket::{PacketSocket, SocketOptions};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-packet");
const T: Duration = Duration::from_secs(5);
/// Generous: an erroring run takes milliseconds.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);
const GUEST_MAC_STR: &str = "02:00:00:00:00:01";

// ---------------------------------------------------------------------------------------------
// Running the binary to completion

/// A process of ours that is killed (by its PID) and reaped on drop, also when a test panics.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
struct Exited {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` until it exits; panics (killing it) if it is still running after
/// `EXIT_DEADLINE`, e.g. because a bad argument was accepted and the daemon started serving.
fn run_to_exit(mut cmd: Command) -> Exited {
    cmd.env("RUST_BACKTRACE", "1")
        .env_remove("VHOST_PACKET_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Reaped(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}")),
    );
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.0.stderr.take().unwrap()));
    let deadline = Instant::now() + EXIT_DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            drop(child);
            panic!(
                "{cmd:?} still running after {EXIT_DEADLINE:?}; stderr so far:\n{}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Exited {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `vhost-packet <args>` in the current namespace.
fn vhost_packet(args: &[&str]) -> Exited {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    run_to_exit(cmd)
}

/// `vhost-packet <args>` inside `ns`.
fn vhost_packet_in(ns: &NetNs, args: &[&str]) -> Exited {
    let mut full = vec![BIN];
    full.extend_from_slice(args);
    run_to_exit(ns.command(&full))
}

/// Asserts a failed run that said exactly one line, `vhost-packet: ...`, on stderr and nothing
/// on stdout; returns that line.
fn one_line_error(out: &Exited) -> &str {
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "expected a non-zero exit code, got {}; stderr: {:?}",
        out.status,
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("backtrace"),
        "a user error must not panic: {:?}",
        out.stderr
    );
    let line = out.stderr.strip_suffix('\n').unwrap_or(&out.stderr);
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "expected exactly one line on stderr, got {} lines: {:?}",
        out.stderr.lines().count(),
        out.stderr
    );
    assert!(
        line.starts_with("vhost-packet: "),
        "the line starts with the program name: {line:?}"
    );
    assert_eq!(out.stdout, "", "nothing on stdout");
    line
}

fn assert_mentions(line: &str, needles: &[&str]) {
    for n in needles {
        assert!(line.contains(n), "{line:?} should mention {n:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A fresh directory under the temp dir, removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vhost-packet-cli-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A host namespace with `vh0` (for the daemon) and a peer namespace with `vp0`, both up.
fn host_and_peer(tag: &str) -> (NetNs, NetNs) {
    let host = NetNs::new(&format!("{tag}h"));
    let peer = NetNs::new(&format!("{tag}p"));
    veth_pair(&host, "vh0", &peer, "vp0");
    (host, peer)
}

/// A packet socket on `vp0` in the peer namespace, to inject and capture frames.
fn peer_socket(peer: &NetNs) -> PacketSocket {
    peer.enter_thread(|| {
        let iface = Interface::by_name("vp0").unwrap();
        PacketSocket::open(&iface, &SocketOptions::default()).unwrap()
    })
}

/// Negotiates, maps memory and rings, posts RX buffers that are re-posted as they are used.
fn bring_up(fe: &mut TestFrontend) {
    fe.start(FrontendConfig::default());
    fe.post_rx_buffers(64, 2048);
    fe.set_rx_autorefill(true);
    fe.kick_rx();
}

/// One frame guest -> peer and one peer -> guest, each compared byte for byte.
fn exchange(fe: &mut TestFrontend, peer: &PacketSocket, peer_mac: [u8; 6], round: u32) {
    let out = ethernet(peer_mac, GUEST_MAC, ETH_EXPERIMENTAL, &pattern(200, round));
    let h = plain_header(fe);
    send_frame(fe, &h, &out);
    let deadline = Instant::now() + T;
    let mut buf = vec![0u8; 4096];
    let mut arrived = false;
    while !arrived && Instant::now() < deadline {
        match peer.recv_vectored(&mut [std::io::IoSliceMut::new(&mut buf)]) {
            // The peer socket carries a 12-byte virtio net header in front of the frame.
            Ok(r) => arrived = buf.get(12..r.len) == Some(&out[..]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("peer capture: {e}"),
        }
    }
    assert!(arrived, "round {round}: the guest's frame reaches the peer");

    let back = ethernet(
        GUEST_MAC,
        peer_mac,
        ETH_EXPERIMENTAL,
        &pattern(300, round + 1000),
    );
    peer.send_vectored(&[IoSlice::new(&[0u8; 12]), IoSlice::new(&back)])
        .expect("peer injects a frame");
    let deadline = Instant::now() + T;
    let mut received = false;
    while !received && Instant::now() < deadline {
        if let Some(p) = fe.recv(Duration::from_millis(100)) {
            received = p.frame == back;
        }
    }
    assert!(
        received,
        "round {round}: the peer's frame reaches the guest"
    );
}

/// Waits until `ifname` in `ns` has its carrier (LOWER_UP).
fn wait_lower_up(ns: &NetNs, ifname: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.ip(&["link", "show", "dev", ifname]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("LOWER_UP") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ifname} in {} has no carrier: {text}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Accepts one connection on a non-blocking `listener` within `T`.
fn accept_within(listener: &UnixListener) -> UnixStream {
    let deadline = Instant::now() + T;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "the daemon did not connect within {T:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Help and version

#[test]
fn help_lists_every_option_and_version_prints_it() {
    let out = vhost_packet(&["--help"]);
    assert!(out.status.success(), "--help exits 0: {out:?}");
    assert_eq!(out.stderr, "", "--help writes only to stdout");
    for opt in [
        "--socket",
        "--client",
        "--interface",
        "--mac",
        "--mtu",
        "--queue-size",
        "--queues",
        "--cpu-affinity",
        "--qdisc-bypass",
        "--promisc",
        "--vnet-hdr",
        "--verbose",
    ] {
        assert!(
            out.stdout.contains(opt),
            "--help mentions {opt}:\n{}",
            out.stdout
        );
    }

    let out = vhost_packet(&["--version"]);
    assert!(out.status.success(), "--version exits 0: {out:?}");
    assert_eq!(
        out.stdout,
        format!("vhost-packet {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(out.stderr, "");
}

// ---------------------------------------------------------------------------------------------
// 2. Unknown interface

#[test]
fn unknown_interface_is_one_line_naming_it() {
    let dir = TempDir::new("noif");
    let sock = dir.join("x.sock");
    let out = vhost_packet(&["--socket", s(&sock), "--interface", "nosuch0"]);
    let line = one_line_error(&out);
    assert_mentions(line, &["nosuch0", "No such device"]);
    assert!(!sock.exists(), "a failed start leaves no socket file");
}

// ---------------------------------------------------------------------------------------------
// 3. MTU

#[test]
fn mtu_out_of_range_is_one_line() {
    let dir = TempDir::new("mtu");
    let sock = dir.join("x.sock");
    for mtu in ["70000", "10"] {
        // A non-existent interface: validation must fail before it is looked up.
        let out = vhost_packet(&["--socket", s(&sock), "--interface", "nosuch0", "--mtu", mtu]);
        let line = one_line_error(&out);
        assert_mentions(line, &[&format!("--mtu {mtu}"), "out of range"]);
    }
}

#[test]
fn mtu_above_the_interface_mtu_names_interface_and_its_mtu() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, _peer) = host_and_peer("vpcm");
    let dir = TempDir::new("mtu9000");
    let sock = dir.join("x.sock");
    let out = vhost_packet_in(
        &host,
        &["--socket", s(&sock), "--interface", "vh0", "--mtu", "9000"],
    );
    let line = one_line_error(&out);
    assert_mentions(line, &["9000", "vh0", "1500"]);
    assert!(!sock.exists(), "a failed start leaves no socket file");
}

// ---------------------------------------------------------------------------------------------
// 4. Socket path

#[test]
fn socket_in_a_missing_directory_is_one_line() {
    let dir = TempDir::new("nodir");
    let missing = dir.join("missing");
    let sock = missing.join("x.sock");
    let out = vhost_packet(&["--socket", s(&sock), "--interface", "nosuch0"]);
    let line = one_line_error(&out);
    assert_mentions(line, &[s(&missing), "does not exist"]);
}

#[test]
fn socket_served_by_a_running_daemon_is_refused_and_the_first_keeps_serving() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, _peer) = host_and_peer("vpcu");
    let first = Daemon::start(&host, "vh0", &[]);
    let out = vhost_packet_in(&host, &["--socket", s(&first.socket), "--interface", "vh0"]);
    let line = one_line_error(&out);
    assert_mentions(line, &[s(&first.socket), "already serves this socket"]);

    assert!(
        first.is_running(),
        "the first daemon still runs:\n{}",
        first.log()
    );
    assert!(first.socket.exists(), "its socket file is still there");
    // And it still serves: a full bring-up with acknowledged messages.
    let mut fe = TestFrontend::connect(&first.socket, T);
    fe.start(FrontendConfig::default());
    assert_eq!(&fe.get_config(0, 6)[..], &first_mac(&first.socket)[..]);
    assert!(first.is_running(), "{}", first.log());
}

/// The MAC a daemon derives from its socket path when `--mac` is not given.
fn first_mac(socket: &Path) -> [u8; 6] {
    vhost_packet::config::MacAddr::derived_from(socket.as_os_str().as_encoded_bytes()).0
}

#[test]
fn stale_socket_file_is_removed_and_the_daemon_starts() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let dir = TempDir::new("stale");
    let sock = dir.join("x.sock");
    drop(UnixListener::bind(&sock).expect("bind a listener"));
    assert!(sock.exists(), "the dropped listener leaves its socket file");
    assert!(
        UnixStream::connect(&sock).is_err(),
        "nobody listens on the stale socket"
    );

    let (host, _peer) = host_and_peer("vpcs");
    let d = Daemon::start_at(&host, "vh0", &sock, &[]);
    assert!(
        d.log().contains("removing stale socket"),
        "the stale socket is reported:\n{}",
        d.log()
    );
    let mut fe = TestFrontend::connect(&sock, T);
    fe.start(FrontendConfig::default());
    assert!(d.is_running(), "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// 5. Missing CAP_NET_RAW

#[test]
fn missing_cap_net_raw_is_one_line_naming_it() {
    if !require_root_and_tools(&["ip", "setpriv"]) {
        return;
    }
    let ns = NetNs::new("vpcc");
    // The socket directory must be usable by the unprivileged user, or the socket path check
    // (which runs first) would fail instead.
    let dir = TempDir::new("cap");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("x.sock");
    let unprivileged = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ];

    // The precondition: the process really runs without uid 0 and without capabilities.
    let mut cmd = unprivileged.to_vec();
    cmd.extend_from_slice(&["cat", "/proc/self/status"]);
    let status = run_to_exit(ns.command(&cmd));
    assert!(status.status.success(), "{status:?}");
    for field in ["CapEff:", "CapPrm:", "CapAmb:"] {
        let line = status
            .stdout
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
        assert!(
            line.ends_with("0000000000000000"),
            "setpriv drops all capabilities: {line}"
        );
    }
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("65534")),
        "setpriv switches to uid 65534:\n{}",
        status.stdout
    );

    let mut cmd = unprivileged.to_vec();
    cmd.extend_from_slice(&[BIN, "--socket", s(&sock), "--interface", "lo"]);
    let out = run_to_exit(ns.command(&cmd));
    let line = one_line_error(&out);
    assert_mentions(line, &["packet socket", "CAP_NET_RAW"]);
    assert!(!sock.exists(), "a failed start leaves no socket file");
}

// ---------------------------------------------------------------------------------------------
// 6. Interface down at start

#[test]
fn interface_down_at_start_warns_and_traffic_flows_once_it_is_up() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, peer) = host_and_peer("vpcd");
    let peer_mac = peer.mac("vp0");
    host.ip(&["link", "set", "vh0", "down"]);
    let d = Daemon::start(&host, "vh0", &["--mac", GUEST_MAC_STR]);
    let log = d.log();
    let warning = log
        .lines()
        .find(|l| l.contains("vh0 is down"))
        .unwrap_or_else(|| panic!("a warning says vh0 is down:\n{log}"));
    assert!(warning.contains("WARN"), "logged as a warning: {warning}");

    // Still serving while the interface is down.
    let mut fe = TestFrontend::connect(&d.socket, T);
    bring_up(&mut fe);
    assert!(d.is_running(), "{}", d.log());

    host.ip(&["link", "set", "vh0", "up"]);
    wait_lower_up(&host, "vh0");
    wait_lower_up(&peer, "vp0");
    let peer_sock = peer_socket(&peer);
    exchange(&mut fe, &peer_sock, peer_mac, 1);
    exchange(&mut fe, &peer_sock, peer_mac, 2);
    assert!(d.is_running(), "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// 7. Bad values

#[test]
fn bad_mac_is_one_line() {
    let dir = TempDir::new("mac");
    let sock = dir.join("x.sock");
    for (mac, needles) in [
        (
            "zz:54:00:12:34:56",
            &["zz:54:00:12:34:56", "invalid MAC"][..],
        ),
        ("01:00:5e:00:00:01", &["01:00:5e:00:00:01", "multicast"][..]),
    ] {
        let out = vhost_packet(&["--socket", s(&sock), "--interface", "nosuch0", "--mac", mac]);
        assert_mentions(one_line_error(&out), needles);
    }
}

#[test]
fn bad_queue_size_is_one_line() {
    let dir = TempDir::new("qs");
    let sock = dir.join("x.sock");
    for q in ["1000", "2048"] {
        let out = vhost_packet(&[
            "--socket",
            s(&sock),
            "--interface",
            "nosuch0",
            "--queue-size",
            q,
        ]);
        assert_mentions(
            one_line_error(&out),
            &[&format!("--queue-size {q}"), "power of two"],
        );
    }
}

#[test]
fn bad_queue_count_is_a_one_line_usage_error() {
    let dir = TempDir::new("queues");
    let sock = dir.join("x.sock");
    for (q, why) in [
        ("0", "0 is not in 1..=32"),
        ("33", "33 is not in 1..=32"),
        ("two", "invalid digit"),
        ("1.5", "invalid digit"),
    ] {
        let out = vhost_packet(&[
            "--socket",
            s(&sock),
            "--interface",
            "nosuch0",
            "--queues",
            q,
        ]);
        let line = one_line_error(&out);
        assert_eq!(out.status.code(), Some(2), "a usage error: {line}");
        assert_mentions(line, &["--queues", why]);
    }
}

#[test]
fn bad_cpu_affinity_is_one_line() {
    let dir = TempDir::new("cpus");
    let sock = dir.join("x.sock");
    let run = |list: &str| {
        vhost_packet(&[
            "--socket",
            s(&sock),
            "--interface",
            "nosuch0",
            "--cpu-affinity",
            list,
        ])
    };
    // Not a CPU list: a usage error.
    for (list, why) in [
        ("a", "'a' is not a CPU number"),
        ("3-1", "range 3-1 runs backwards"),
        ("0,,1", "'' is not a CPU number"),
        ("4096", "CPU 4096 is not below 1024"),
    ] {
        let out = run(list);
        let line = one_line_error(&out);
        assert_eq!(out.status.code(), Some(2), "a usage error: {line}");
        assert_mentions(line, &["--cpu-affinity", list, why]);
    }
    // A CPU this process may not use: refused before anything is opened.
    let out = run("1023");
    let line = one_line_error(&out);
    assert_mentions(
        line,
        &[
            "--cpu-affinity",
            "CPU 1023 is not available to this process",
        ],
    );
}

#[test]
fn socket_with_client_is_one_line() {
    let dir = TempDir::new("both");
    let out = vhost_packet(&[
        "--socket",
        s(&dir.join("a.sock")),
        "--client",
        s(&dir.join("b.sock")),
        "--interface",
        "nosuch0",
    ]);
    assert_mentions(one_line_error(&out), &["--socket", "--client"]);
}

// ---------------------------------------------------------------------------------------------
// 8. Client mode

#[test]
fn client_mode_waits_for_a_frontend_and_reconnects_after_a_disconnect() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let dir = TempDir::new("client");
    let path = dir.join("frontend.sock");
    let (host, peer) = host_and_peer("vpcl");
    let peer_mac = peer.mac("vp0");
    let d = Daemon::start_client(&host, "vh0", &path, &["--mac", GUEST_MAC_STR]);
    // A few retry periods with nobody listening: it keeps waiting.
    std::thread::sleep(Duration::from_millis(800));
    assert!(d.is_running(), "keeps retrying:\n{}", d.log());
    assert!(!path.exists(), "client mode creates no socket file");

    let listener = UnixListener::bind(&path).expect("bind the frontend socket");
    listener.set_nonblocking(true).unwrap();
    let peer_sock = peer_socket(&peer);

    let mut fe = TestFrontend::from_stream(accept_within(&listener));
    bring_up(&mut fe);
    exchange(&mut fe, &peer_sock, peer_mac, 1);
    drop(fe); // abrupt, like a QEMU that goes away
    d.wait_for_log("frontend disconnected", T);

    let mut fe = TestFrontend::from_stream(accept_within(&listener));
    bring_up(&mut fe);
    exchange(&mut fe, &peer_sock, peer_mac, 2);
    assert!(d.is_running(), "{}", d.log());
    assert_eq!(
        d.log().matches("frontend connected").count(),
        2,
        "two connections served by one process:\n{}",
        d.log()
    );
}

/// Uid line and capability sets of a running process.
fn proc_identity(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    (field("Uid:"), field("CapPrm:"), field("CapEff:"))
}

#[test]
fn socket_is_private_by_default_and_widened_on_request() {
    use std::os::unix::fs::MetadataExt;
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, _peer) = host_and_peer("vpm");
    let d = Daemon::start(&host, "vh0", &["--mac", GUEST_MAC_STR]);
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "0600 by default");
    drop(d);
    let d = Daemon::start(
        &host,
        "vh0",
        &[
            "--mac",
            GUEST_MAC_STR,
            "--socket-mode",
            "0660",
            "--socket-group",
            "4242",
        ],
    );
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4242));
    let out = vhost_packet(&[
        "--socket",
        "/tmp/x.sock",
        "--interface",
        "lo",
        "--socket-mode",
        "0999",
    ]);
    assert_mentions(one_line_error(&out), &["--socket-mode 0999"]);
    let out = vhost_packet(&[
        "--socket",
        "/tmp/x.sock",
        "--interface",
        "lo",
        "--user",
        "no-such-user-vp",
    ]);
    assert_mentions(one_line_error(&out), &["no-such-user-vp", "no such user"]);
}

#[test]
fn user_switch_keeps_no_capabilities_and_traffic_flows() {
    use std::os::unix::fs::MetadataExt;
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, peer) = host_and_peer("vpu");
    let d = Daemon::start(&host, "vh0", &["--mac", GUEST_MAC_STR, "--user", "nobody"]);
    let (uid, prm, eff) = proc_identity(d.pid());
    assert_eq!(
        uid, "65534 65534 65534 65534",
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        (prm.as_str(), eff.as_str()),
        ("0000000000000000", "0000000000000000")
    );
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().uid(),
        65534,
        "the socket is the user's"
    );
    let mut fe = TestFrontend::connect(&d.socket, T);
    bring_up(&mut fe);
    let peer_sock = peer_socket(&peer);
    exchange(&mut fe, &peer_sock, peer.mac("vp0"), 1);
}

#[test]
fn runs_unprivileged_with_cap_net_raw_only() {
    if !require_root_and_tools(&["ip", "setpriv"]) {
        return;
    }
    let (host, peer) = host_and_peer("vpc");
    // A directory the unprivileged user may create its socket in.
    let dir = std::env::temp_dir().join(format!("vp-capraw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.join("net.sock");
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+net_raw",
        "--ambient-caps=+net_raw",
    ];
    let d = Daemon::start_wrapped(&host, &wrapper, "vh0", &socket, &["--mac", GUEST_MAC_STR]);
    let (uid, _, eff) = proc_identity(d.pid());
    assert!(uid.starts_with("65534"), "{uid}");
    assert_eq!(eff, "0000000000002000", "CAP_NET_RAW only");
    let mut fe = TestFrontend::connect(&d.socket, T);
    bring_up(&mut fe);
    let peer_sock = peer_socket(&peer);
    exchange(&mut fe, &peer_sock, peer.mac("vp0"), 1);
    drop(fe);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stats_command_reads_live_counters() {
    use std::os::unix::fs::MetadataExt;
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, peer) = host_and_peer("vps");
    let d = Daemon::start(&host, "vh0", &["--mac", GUEST_MAC_STR]);
    let stats_socket = vhost_packet::control::control_path(&d.socket);
    assert_eq!(
        std::fs::metadata(&stats_socket).unwrap().mode() & 0o777,
        0o600
    );
    let sock = d.socket.to_str().unwrap().to_string();

    let out = vhost_packet(&["stats", "--socket", &sock, "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("\"connected\":false"), "{}", out.stdout);

    let mut fe = TestFrontend::connect(&d.socket, T);
    bring_up(&mut fe);
    let peer_sock = peer_socket(&peer);
    for round in 0..3 {
        exchange(&mut fe, &peer_sock, peer.mac("vp0"), round);
    }
    let out = vhost_packet(&["stats", "--socket", &sock, "--json"]);
    assert!(out.stdout.contains("\"connected\":true"), "{}", out.stdout);
    assert!(
        out.stdout.contains("\"tx\":{\"packets\":3,"),
        "three frames out: {}",
        out.stdout
    );
    let table = vhost_packet(&["stats", "--socket", &sock]);
    assert!(table.status.success());
    let line = table
        .stdout
        .lines()
        .find(|l| l.starts_with("tx packets"))
        .expect("tx packets row");
    assert_eq!(
        line.split_whitespace().last(),
        Some("3"),
        "{}",
        table.stdout
    );
    assert!(
        table.stdout.contains("frontend    connected, features"),
        "{}",
        table.stdout
    );

    drop(fe);
    let (status, _) = d.terminate();
    assert!(status.success());
    assert!(
        !stats_socket.exists(),
        "the stats socket is removed at exit"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. QEMU's backend program conventions (docs/interop/vhost-user.rst), systemd, Prometheus

/// The repository's `qemu/` directory.
fn qemu_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu")
}

/// Checks a `VHostUserBackendCapabilities` for type `net`: `type` and nothing else (the
/// schema's union has no members for `net`).
fn assert_net_capabilities(json: &str) {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json:?}"));
    let obj = v.as_object().expect("a JSON object");
    assert_eq!(
        obj.get("type").and_then(|t| t.as_str()),
        Some("net"),
        "{json}"
    );
    assert_eq!(obj.len(), 1, "only `type` for net: {json}");
}

/// SIGTERM, then a bounded wait for the exit (the process stays a zombie for `terminate`).
fn sigterm_and_wait_for_exit(d: &Daemon) {
    d.signal(libc::SIGTERM);
    let deadline = Instant::now() + T;
    while d.is_running() {
        assert!(
            Instant::now() < deadline,
            "still running {T:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn print_capabilities_prints_the_schemas_json_and_ignores_other_options() {
    for args in [
        &["--print-capabilities"][..],
        // "Other options and arguments should be ignored": even a bad one.
        &[
            "--interface",
            "nosuch0",
            "--mtu",
            "1",
            "--print-capabilities",
        ][..],
    ] {
        let out = vhost_packet(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(out.stderr, "", "{args:?}");
        assert_net_capabilities(&out.stdout);
    }
}

#[test]
fn the_vhost_user_descriptor_carries_what_the_schema_requires() {
    let path = qemu_dir().join("50-vhost-packet.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("the descriptor is JSON");
    let obj = v.as_object().expect("one VhostUserBackend object");
    for key in obj.keys() {
        assert!(
            ["description", "type", "binary", "tags"].contains(&key.as_str()),
            "{key} is not a VhostUserBackend member"
        );
    }
    assert!(obj["description"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(obj["type"].as_str(), Some("net"));
    let binary = obj["binary"].as_str().expect("binary is a string");
    assert!(binary.starts_with('/'), "an absolute path: {binary}");
    assert!(
        binary.ends_with("/vhost-packet"),
        "names the binary: {binary}"
    );
    // The systemd unit starts the same binary.
    let unit = std::fs::read_to_string(qemu_dir().join("systemd/vhost-packet@.service")).unwrap();
    assert!(unit.contains(&format!("ExecStart={binary} ")), "{unit}");
}

#[test]
fn socket_path_fd_and_client_exclude_each_other_and_a_bad_fd_is_one_line() {
    let dir = TempDir::new("fd");
    let sock = dir.join("a.sock");
    for (args, needles) in [
        (
            vec!["--socket-path", s(&sock), "--fd", "3"],
            &["--socket-path", "--fd"][..],
        ),
        (
            vec!["--fd", "3", "--client", s(&sock)],
            &["--fd", "--client"][..],
        ),
        // run_to_exit gives it /dev/null as stdin.
        (vec!["--fd", "0"], &["--fd 0", "not a socket"][..]),
        (vec!["--fd", "77"], &["--fd 77", "is not open"][..]),
        (
            vec![],
            &["one of --socket-path PATH, --fd N or --client PATH"][..],
        ),
    ] {
        let mut full = args.clone();
        full.extend_from_slice(&["--interface", "nosuch0"]);
        let out = vhost_packet(&full);
        assert_mentions(one_line_error(&out), needles);
    }
}

#[test]
fn follows_the_backend_program_conventions_stdio_no_daemonizing_sigterm() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, peer) = host_and_peer("vpbc");
    let dir = TempDir::new("conv");
    let sock = dir.join("net.sock");
    let d = Daemon::spawn_args(
        &host,
        &[],
        &[],
        &sock,
        &[
            "--socket-path",
            s(&sock),
            "--interface",
            "vh0",
            "--mac",
            GUEST_MAC_STR,
        ],
    );
    d.wait_for_log("listening on", T);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // Fields 4 (ppid) and 6 (session): still our child, in our session (ip netns exec execs).
    assert_eq!(fields[1], std::process::id().to_string(), "not daemonized");
    // SAFETY: getsid(0) has no preconditions.
    let our_session = unsafe { libc::getsid(0) };
    assert_eq!(fields[3], our_session.to_string(), "no new session");
    // stdin /dev/null, stdout /dev/null, stderr the log file: as given.
    let fd = |n: u32| std::fs::read_link(format!("/proc/{}/fd/{n}", d.pid())).unwrap();
    assert_eq!(fd(0), Path::new("/dev/null"));
    assert_eq!(fd(1), Path::new("/dev/null"));
    assert_eq!(fd(2), sock.with_extension("log"));
    // It serves on --socket-path.
    let mut fe = TestFrontend::connect(&sock, T);
    bring_up(&mut fe);
    exchange(&mut fe, &peer_socket(&peer), peer.mac("vp0"), 1);
    // SIGTERM while a frontend is connected: a clean exit within the bound.
    sigterm_and_wait_for_exit(&d);
    let (status, log) = d.terminate();
    assert!(status.success(), "{status}:\n{log}");
    assert!(!sock.exists(), "its socket is removed");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !require_root_and_tools(&["systemd-analyze"]) {
        return;
    }
    // The units as installed, for instance vh0, with ExecStart pointing at this build (verify
    // checks that the binary exists).
    let dir = TempDir::new("units");
    for kind in ["service", "socket"] {
        let text =
            std::fs::read_to_string(qemu_dir().join(format!("systemd/vhost-packet@.{kind}")))
                .unwrap();
        let text = text.replace("/usr/local/bin/vhost-packet", BIN);
        std::fs::write(dir.join(&format!("vhost-packet@.{kind}")), text).unwrap();
    }
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["verify", "--man=no"])
        .arg(dir.join("vhost-packet@vh0.service"))
        .arg(dir.join("vhost-packet@vh0.socket"));
    let out = run_to_exit(cmd);
    assert!(out.status.success(), "{out:?}");
    // Unknown or misspelt settings are only warnings: there must be none.
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
}

#[test]
fn systemd_socket_activation_serves_a_frontend_through_the_inherited_socket() {
    if !require_root_and_tools(&["ip", "systemd-socket-activate", "setpriv"]) {
        return;
    }
    let (host, peer) = host_and_peer("vpsa");
    let dir = TempDir::new("activate");
    for (sock, fd_arg) in [
        (dir.join("a.sock"), None),
        (dir.join("b.sock"), Some("--fd=3")),
    ] {
        // systemd-socket-activate listens, and at the first connection execs vhost-packet
        // with the socket as descriptor 3 (LISTEN_FDS=1, LISTEN_PID its own pid). Under the
        // unit's capability bounding set: root's uid, CAP_NET_RAW only.
        let mut args = vec!["--interface", "vh0", "--mac", GUEST_MAC_STR];
        args.extend(fd_arg);
        let d = Daemon::spawn_args(
            &host,
            &[
                "setpriv",
                "--bounding-set=-all,+net_raw",
                "--no-new-privs",
                "systemd-socket-activate",
                "--listen",
                s(&sock),
            ],
            &[],
            &sock,
            &args,
        );
        let deadline = Instant::now() + T;
        while !sock.exists() {
            assert!(Instant::now() < deadline, "the activator does not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut fe = TestFrontend::connect(&sock, T);
        d.wait_for_log("listening on", T);
        assert!(
            d.log().contains(&format!(
                "listening on {} (inherited descriptor 3)",
                s(&sock)
            )),
            "{}",
            d.log()
        );
        let (_, _, eff) = proc_identity(d.pid());
        assert_eq!(eff, "0000000000002000", "CAP_NET_RAW only");
        bring_up(&mut fe);
        let peer_sock = peer_socket(&peer);
        exchange(&mut fe, &peer_sock, peer.mac("vp0"), 1);
        // The same socket takes the next connection.
        drop(fe);
        d.wait_for_log("frontend disconnected", T);
        let mut fe = TestFrontend::connect(&sock, T);
        bring_up(&mut fe);
        exchange(&mut fe, &peer_sock, peer.mac("vp0"), 2);
        // The live counters sit next to the inherited socket.
        let out = vhost_packet(&["stats", "--socket", s(&sock), "--json"]);
        assert!(out.stdout.contains("\"connected\":true"), "{out:?}");
        drop(fe);
        sigterm_and_wait_for_exit(&d);
        assert!(
            sock.exists(),
            "the socket is its owner's to remove, not ours"
        );
        let (status, log) = d.terminate();
        assert!(status.success(), "{log}");
    }
}

#[test]
fn notify_socket_gets_ready_once_serving_and_stopping_on_sigterm() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let (host, _peer) = host_and_peer("vpnt");
    // An abstract name (systemd writes them with a leading '@'); abstract names belong to
    // the network namespace, so the receiver is bound inside the daemon's.
    let name = format!("vhost-packet-notify-{}", std::process::id());
    let receiver = host.enter_thread(|| {
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap()
    });
    receiver.set_read_timeout(Some(T)).unwrap();
    let dir = TempDir::new("notify");
    let sock = dir.join("n.sock");
    let notify_socket = format!("@{name}");
    let d = Daemon::spawn_args(
        &host,
        &[],
        &[("NOTIFY_SOCKET", &notify_socket)],
        &sock,
        &["--socket-path", s(&sock), "--interface", "vh0"],
    );
    let mut buf = [0u8; 256];
    let n = receiver
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 within {T:?} ({e}):\n{}", d.log()));
    assert_eq!(std::str::from_utf8(&buf[..n]), Ok("READY=1"));
    // Ready means serving: the socket takes a frontend at once.
    let mut fe = TestFrontend::connect(&sock, T);
    fe.start(FrontendConfig::default());
    sigterm_and_wait_for_exit(&d);
    let n = receiver.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(std::str::from_utf8(&buf[..n]), Ok("STOPPING=1"));
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
}

/// systemd booted as PID 1 in a container (`systemd-nspawn --volatile=yes`: a fresh root on
/// tmpfs over the host's /usr), in the test's host namespace. Killed by its PID on drop: a
/// SIGTERM first, which nspawn turns into a clean halt of the container, then SIGKILL.
struct BootedSystemd {
    nspawn: Child,
    leader: u32,
}

impl BootedSystemd {
    /// Boots `target` with the repository's units, the test binary as /opt/vhost-packet (a
    /// drop-in changes only ExecStart) and `run` as /run/vhost-packet.
    fn boot(host: &NetNs, units: &Path, run: &Path, target: &str, log: &Path) -> BootedSystemd {
        let bind_ro = |from: &Path, to: &str| format!("--bind-ro={}:{to}", s(from));
        let etc = "/etc/systemd/system";
        let nspawn = Command::new("systemd-nspawn")
            .args(["--directory=/", "--volatile=yes", "--boot", "--register=no"])
            .args(["--keep-unit", "--console=read-only", "--quiet"])
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                host.name()
            ))
            // The socket unit's group (kvm) must resolve.
            .args(["--bind-ro=/etc/passwd", "--bind-ro=/etc/group"])
            .arg(bind_ro(Path::new(BIN), "/opt/vhost-packet"))
            .arg(bind_ro(
                &units.join("vhost-packet@.service"),
                &format!("{etc}/vhost-packet@.service"),
            ))
            .arg(bind_ro(
                &units.join("vhost-packet@.socket"),
                &format!("{etc}/vhost-packet@.socket"),
            ))
            .arg(bind_ro(
                &units.join("dropin"),
                &format!("{etc}/vhost-packet@.service.d"),
            ))
            .arg(bind_ro(
                &units.join("test.target"),
                &format!("{etc}/{target}"),
            ))
            .arg(format!("--bind={}:/run/vhost-packet", s(run)))
            .args([
                "--",
                &format!("systemd.unit={target}"),
                "systemd.firstboot=no",
            ])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("run systemd-nspawn");
        let mut booted = BootedSystemd { nspawn, leader: 0 };
        // The container's PID 1 is nspawn's child.
        let deadline = Instant::now() + Duration::from_secs(30);
        while booted.leader == 0 {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", booted.nspawn.id()))
                    .unwrap_or_default();
            booted.leader = children
                .split_whitespace()
                .next()
                .map_or(0, |p| p.parse().unwrap());
            assert!(
                booted.nspawn.try_wait().unwrap().is_none(),
                "systemd-nspawn exited: {}",
                std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "no container after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        booted
    }

    /// `cmd` run inside the container (all its namespaces).
    fn run(&self, cmd: &[&str]) -> String {
        let out = Command::new("nsenter")
            .args(["--target", &self.leader.to_string(), "--all", "--"])
            .args(cmd)
            .output()
            .expect("run nsenter");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// One property of a unit, as `systemctl show` gives it.
    fn property(&self, unit: &str, name: &str) -> String {
        self.run(&["systemctl", "show", "--value", "-p", name, unit])
    }

    fn journal(&self, unit: &str) -> String {
        self.run(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }
}

impl Drop for BootedSystemd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of our own unreaped child.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The units as shipped, under systemd as PID 1: socket activation, Type=notify, the
/// sandboxing (capabilities, no_new_privs, seccomp, address families) and a clean stop.
#[test]
fn the_units_serve_a_frontend_under_systemd_as_pid_1() {
    if !require_root_and_tools(&["ip", "systemd-nspawn", "nsenter"]) {
        return;
    }
    let (host, peer) = host_and_peer("vpsd");
    let dir = TempDir::new("systemd");
    let units = dir.join("units");
    let run = dir.join("run");
    std::fs::create_dir_all(units.join("dropin")).unwrap();
    std::fs::create_dir(&run).unwrap();
    for unit in ["vhost-packet@.service", "vhost-packet@.socket"] {
        std::fs::copy(qemu_dir().join("systemd").join(unit), units.join(unit)).unwrap();
    }
    // What an operator who installs the binary elsewhere writes: only ExecStart changes.
    std::fs::write(
        units.join("dropin/binary.conf"),
        "[Service]\nExecStart=\nExecStart=/opt/vhost-packet --interface %i $VHOST_PACKET_ARGS\n",
    )
    .unwrap();
    // `systemctl enable --now vhost-packet@vh0.socket`, as a boot target.
    std::fs::write(
        units.join("test.target"),
        "[Unit]\nRequires=vhost-packet@vh0.socket\nAfter=vhost-packet@vh0.socket\n",
    )
    .unwrap();
    let systemd = BootedSystemd::boot(
        &host,
        &units,
        &run,
        "vhost-packet-test.target",
        &dir.join("console.log"),
    );
    let sock = run.join("vh0.sock");
    let service = "vhost-packet@vh0.service";
    let deadline = Instant::now() + Duration::from_secs(60);
    while systemd.property("vhost-packet@vh0.socket", "ActiveState") != "active" {
        assert!(
            Instant::now() < deadline,
            "the socket unit does not listen: {}",
            systemd.journal("vhost-packet@vh0.socket")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(systemd.property(service, "ActiveState"), "inactive");

    // The first connection starts the service with the socket handed in.
    let mut fe = TestFrontend::connect(&sock, T);
    // Type=notify: "active" only after READY=1.
    let deadline = Instant::now() + T;
    loop {
        let state = systemd.property(service, "ActiveState");
        if state == "active" {
            break;
        }
        assert!(
            state != "failed" && Instant::now() < deadline,
            "{service} is {state}: {}",
            systemd.journal(service)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    bring_up(&mut fe);
    let peer_sock = peer_socket(&peer);
    exchange(&mut fe, &peer_sock, peer.mac("vp0"), 1);
    assert!(
        systemd
            .journal(service)
            .contains("listening on /run/vhost-packet/vh0.sock (inherited descriptor 3)"),
        "{}",
        systemd.journal(service)
    );
    let pid = systemd.property(service, "MainPID");
    let status = systemd.run(&["cat", &format!("/proc/{pid}/status")]);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_string()
    };
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(cap), "0000000000002000", "{cap}: CAP_NET_RAW only");
    }
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(
        field("Seccomp"),
        "2",
        "SystemCallFilter is a seccomp filter"
    );

    // A stop is a clean exit: SIGTERM, STOPPING=1, status 0.
    drop(fe);
    systemd.run(&["systemctl", "stop", service]);
    assert_eq!(systemd.property(service, "ActiveState"), "inactive");
    assert_eq!(
        systemd.property(service, "Result"),
        "success",
        "{}",
        systemd.journal(service)
    );
    assert_eq!(systemd.property(service, "ExecMainStatus"), "0");
}

/// `promtool check metrics` on `text`: passes, with nothing to say.
fn assert_promtool_passes(text: &str) {
    use std::io::Write;
    // promtool reads until end of input, so it cannot outlive the write.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let written = child.stdin.take().unwrap().write_all(text.as_bytes());
    let out = child.wait_with_output().unwrap();
    written.expect("write to promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.is_empty(),
        "promtool: {said}\n{text}"
    );
}

/// Samples of a text exposition, `name{labels}` to value.
fn samples(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("name{labels} value");
            (series.to_string(), value.parse().expect("an integer value"))
        })
        .collect()
}

/// `curl` inside `ns`: the body of `url`, or the failure.
fn curl(ns: &NetNs, url: &str) -> Result<String, String> {
    let out = ns.exec(&[
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "4",
        url,
    ]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn prometheus_metrics_pass_promtool_match_stats_json_and_survive_idle_and_garbage_clients() {
    use std::io::Write;
    if !require_root_and_tools(&["ip", "promtool", "curl"]) {
        return;
    }
    let (host, peer) = host_and_peer("vppm");
    let d = Daemon::start(
        &host,
        "vh0",
        &["--mac", GUEST_MAC_STR, "--metrics", "127.0.0.1:9870"],
    );
    d.wait_for_log("serving metrics at http://127.0.0.1:9870/metrics", T);
    let sock = s(&d.socket).to_string();
    let url = "http://127.0.0.1:9870/metrics";
    // Before any frontend, both forms are valid too.
    let idle = vhost_packet(&["stats", "--socket", &sock, "--format", "prometheus"]);
    assert!(idle.status.success(), "{idle:?}");
    assert_promtool_passes(&idle.stdout);
    assert_promtool_passes(&curl(&host, url).unwrap());

    let mut fe = TestFrontend::connect(&d.socket, T);
    bring_up(&mut fe);
    let peer_sock = peer_socket(&peer);
    for round in 0..3 {
        exchange(&mut fe, &peer_sock, peer.mac("vp0"), round);
    }
    let text = vhost_packet(&["stats", "--socket", &sock, "--format", "prometheus"]).stdout;
    assert_promtool_passes(&text);
    let scraped = curl(&host, url).unwrap();
    assert_promtool_passes(&scraped);
    let json = vhost_packet(&["stats", "--socket", &sock, "--json"]).stdout;

    // Every counter of `stats --json`, by the same number, in both expositions (the link is
    // quiet, so nothing moves between the three reads).
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for exposition in [samples(&text), samples(&scraped)] {
        let mut compared = 0;
        for (i, pair) in v["queue_pairs"].as_array().unwrap().iter().enumerate() {
            let labels = format!("interface=\"vh0\",queue_pair=\"{i}\"");
            for dir in ["rx", "tx"] {
                for (name, value) in pair[dir].as_object().unwrap() {
                    let (series, want) = if name == "drops" {
                        for (reason, value) in value.as_object().unwrap() {
                            let series = format!(
                                "vhost_packet_{dir}_drops_total{{{labels},reason=\"{reason}\"}}"
                            );
                            assert_eq!(
                                exposition.get(&series),
                                value.as_u64().as_ref(),
                                "{series}"
                            );
                            compared += 1;
                        }
                        continue;
                    } else {
                        (
                            format!("vhost_packet_{dir}_{name}_total{{{labels}}}"),
                            value.as_u64(),
                        )
                    };
                    assert_eq!(exposition.get(&series), want.as_ref(), "{series}\n{json}");
                    compared += 1;
                }
            }
        }
        assert_eq!(
            compared,
            vhost_packet::stats::PairStats::default().counters().len(),
            "every counter compared"
        );
        assert_eq!(
            exposition.get("vhost_packet_tx_packets_total{interface=\"vh0\",queue_pair=\"0\"}"),
            Some(&3)
        );
        assert_eq!(
            exposition.get("vhost_packet_frontend_connected{interface=\"vh0\"}"),
            Some(&1)
        );
        assert_eq!(
            exposition.get(&format!(
                "vhost_packet_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            Some(&1)
        );
        assert!(
            exposition
                .keys()
                .any(|k| k.starts_with("vhost_packet_features_info{") && k.contains("MRG_RXBUF")),
            "the negotiated features as an info metric"
        );
    }

    // Clients that connect and send nothing, or half a request, or garbage, hold nothing up:
    // scrapes and traffic go on while they stay connected.
    let connect =
        || host.enter_thread(|| std::net::TcpStream::connect("127.0.0.1:9870").expect("connect"));
    let silent: Vec<_> = (0..3).map(|_| connect()).collect();
    let mut half = connect();
    half.write_all(b"GET /metr").unwrap();
    let mut garbage = connect();
    garbage
        .write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .unwrap();
    garbage.set_read_timeout(Some(T)).unwrap();
    let mut answer = String::new();
    let _ = garbage.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.0 400 "), "{answer:?}");
    for round in 3..6 {
        let body = curl(&host, url)
            .unwrap_or_else(|e| panic!("a scrape while idle clients are connected fails: {e}"));
        assert!(body.contains("vhost_packet_rx_packets_total{"), "{body}");
        exchange(&mut fe, &peer_sock, peer.mac("vp0"), round);
    }
    assert!(
        curl(&host, "http://127.0.0.1:9870/other")
            .unwrap_err()
            .contains("404"),
        "another path is 404"
    );
    drop((silent, half));
    assert!(d.is_running(), "{}", d.log());
}

#[test]
fn metrics_address_in_use_is_a_one_line_start_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("metrics");
    let sock = dir.join("x.sock");
    let out = vhost_packet(&[
        "--socket-path",
        s(&sock),
        "--interface",
        "lo",
        "--metrics",
        &addr,
    ]);
    let line = one_line_error(&out);
    assert_mentions(line, &[&format!("serving metrics on {addr}"), "in use"]);
    assert!(!sock.exists(), "a failed start leaves no socket file");
    let out = vhost_packet(&["--socket-path", s(&sock), "-i", "lo", "--metrics", "9870"]);
    assert_mentions(one_line_error(&out), &["--metrics"]);
}

#[test]
fn listen_fds_are_taken_only_when_listen_pid_is_ours() {
    // For another process: ignored, so no endpoint at all.
    let mut cmd = Command::new(BIN);
    cmd.args(["--interface", "nosuch0"])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1");
    assert_mentions(
        one_line_error(&run_to_exit(cmd)),
        &["one of --socket-path PATH, --fd N or --client PATH"],
    );
    // For us (sh execs, so $$ is the daemon's pid), but descriptor 3 was never passed.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!("LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} --interface nosuch0"),
    ]);
    assert_mentions(
        one_line_error(&run_to_exit(cmd)),
        &["LISTEN_FDS", "descriptor 3 is not open"],
    );
    // Two sockets: vhost-packet serves one.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "LISTEN_PID=$$ LISTEN_FDS=2 exec {BIN} --interface nosuch0 3</dev/null 4</dev/null"
        ),
    ]);
    assert_mentions(
        one_line_error(&run_to_exit(cmd)),
        &["socket activation passed 2 sockets"],
    );
}
