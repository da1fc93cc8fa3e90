//! Network namespaces and veth pairs for integration tests.
//!
//! Every test creates its own uniquely named namespaces (pid + counter), so tests run in
//! parallel without interfering, and everything is deleted on drop, also when a test panics.
//! Rules enforced here: IPv4 addresses only from 198.18.0.0/15 (RFC 2544 benchmarking), IPv6
//! disabled inside the namespaces (no ND/MLD chatter in captures), veth ends created directly
//! inside their namespaces (never visible in the root namespace).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Returns true if the test can run: effective uid 0 and every tool in `tools` on `PATH`.
///
/// Otherwise, with `CI=true` in the environment it panics (a missing dependency is a failure
/// under CI); without it, it prints `SKIPPED: <reason>` to stderr and returns false, and the test
/// should return early.
pub fn require_root_and_tools(tools: &[&str]) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut missing = Vec::new();
    if euid != 0 {
        missing.push(format!("not running as root (euid {euid})"));
    }
    for tool in tools {
        if !on_path(tool) {
            missing.push(format!("tool `{tool}` not found on PATH"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("test requirements not met under CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Command resolves bare names through PATH, so check exactly what it will find.
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(tool))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Runs a command, panicking with its stderr if it cannot start or fails.
fn run(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out
}

/// A network namespace owned by the test; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<n>` with `lo` up and IPv6 disabled.
    pub fn new(prefix: &str) -> NetNs {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        // From here on, drop cleans up even if the rest panics.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // Interfaces created later inherit `default`; ignore failure if IPv6 is not built in.
        for knob in ["default", "all"] {
            let _ = ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{knob}.disable_ipv6=1"),
            ]);
        }
        ns
    }

    /// The namespace name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME <args>`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        run(&cmd)
    }

    /// A `Command` for `ip netns exec NAME <cmd...>`, for callers that need to set up stdio.
    pub fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(cmd);
        c
    }

    /// Runs `cmd` inside the namespace and returns its output (no check of the exit status).
    pub fn exec(&self, cmd: &[&str]) -> Output {
        self.command(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} in {}: {e}", self.name))
    }

    /// Starts `cmd` inside the namespace (stdin null, stdout piped, stderr inherited). The
    /// returned guard kills that process by PID and reaps it on drop.
    pub fn spawn(&self, cmd: &[&str]) -> ChildGuard {
        let child = self
            .command(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?} in {}: {e}", self.name));
        ChildGuard { child }
    }

    /// Runs `f` on a new thread that has joined this namespace (`setns(CLONE_NEWNET)`), and
    /// returns its result. Sockets opened in `f` stay in this namespace when used elsewhere.
    /// A panic in `f` is propagated.
    pub fn enter_thread<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = Path::new("/run/netns").join(&self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                // SAFETY: `file` is an open descriptor of a network namespace; setns only
                // changes the network namespace of this (new, otherwise unused) thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    panic!(
                        "setns({}): {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                drop(file);
                f()
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Adds an IPv4 address (CIDR) to `ifname`. Only 198.18.0.0/15 is allowed.
    pub fn add_addr(&self, ifname: &str, cidr: &str) {
        assert!(
            in_benchmark_range(cidr),
            "address {cidr} is outside 198.18.0.0/15; tests may only use that range"
        );
        self.ip(&["addr", "add", cidr, "dev", ifname]);
    }

    /// Turns IPv6 back on in this namespace (off by default, see [`NetNs::new`]) for `ifname`
    /// and adds `cidr`, which must be inside 2001:2::/48 (RFC 5180 benchmarking), without DAD.
    pub fn add_addr6(&self, ifname: &str, cidr: &str) {
        assert!(
            in_benchmark_range6(cidr),
            "address {cidr} is outside 2001:2::/48; tests may only use that range"
        );
        for knob in ["all", "default", ifname] {
            let _ = self.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{knob}.disable_ipv6=0"),
            ]);
        }
        self.ip(&["-6", "addr", "add", cidr, "dev", ifname, "nodad"]);
    }

    /// A counter from `/sys/class/net/IFNAME/statistics/NAME` (e.g. `rx_packets`).
    pub fn link_counter(&self, ifname: &str, name: &str) -> u64 {
        let path = format!("/sys/class/net/{ifname}/statistics/{name}");
        let out = self.exec(&["cat", &path]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("read {path} in {}", self.name))
    }

    /// Adds a permanent neighbour entry (so the stack does not ARP for it). 198.18.0.0/15 only.
    pub fn add_neigh(&self, ifname: &str, ip: &str, mac: &str) {
        assert!(
            in_benchmark_range(ip),
            "address {ip} is outside 198.18.0.0/15"
        );
        self.ip(&[
            "neigh",
            "replace",
            ip,
            "lladdr",
            mac,
            "dev",
            ifname,
            "nud",
            "permanent",
        ]);
    }

    /// `ethtool -K ifname feature on|off ...` inside the namespace; panics on failure.
    pub fn ethtool_k(&self, ifname: &str, features: &[(&str, &str)]) {
        let mut cmd = vec!["ethtool", "-K", ifname];
        for (feature, value) in features {
            cmd.push(feature);
            cmd.push(value);
        }
        let out = self.exec(&cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// Sets the MTU of `ifname`.
    pub fn set_mtu(&self, ifname: &str, mtu: u32) {
        self.ip(&["link", "set", "dev", ifname, "mtu", &mtu.to_string()]);
    }

    /// The MAC address of `ifname` as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self, ifname: &str) -> String {
        let out = self.ip(&["link", "show", "dev", ifname]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether in: {text}"))
            .to_owned()
    }

    /// The device's promiscuity counter (`ip -d link`): packet-socket `PACKET_MR_PROMISC`
    /// members and unicast-filter overflow count here, but not in `SIOCGIFFLAGS`.
    pub fn promiscuity(&self, ifname: &str) -> u32 {
        let out = self.ip(&["-d", "link", "show", "dev", ifname]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "promiscuity")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no promiscuity in: {text}"))
    }

    /// The MAC address of `ifname` as bytes.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        parse_mac(&self.mac_string(ifname))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veth ends inside it (and their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair with one end in each namespace.
#[derive(Debug)]
pub struct VethPair<'a> {
    /// Namespace of end A.
    pub a: &'a NetNs,
    /// Name of end A (inside `a`).
    pub a_if: String,
    /// Namespace of end B.
    pub b: &'a NetNs,
    /// Name of end B (inside `b`).
    pub b_if: String,
}

impl VethPair<'_> {
    /// Sets the MTU on both ends.
    pub fn set_mtu(&self, mtu: u32) {
        self.a.set_mtu(&self.a_if, mtu);
        self.b.set_mtu(&self.b_if, mtu);
    }

    /// MAC of end A.
    pub fn a_mac(&self) -> [u8; 6] {
        self.a.mac(&self.a_if)
    }

    /// MAC of end B.
    pub fn b_mac(&self) -> [u8; 6] {
        self.b.mac(&self.b_if)
    }
}

/// Creates a veth pair `a_if` (in `a`) <-> `b_if` (in `b`) and sets both ends up.
///
/// The pair is created from inside `a` with the peer placed straight into `b`, so neither name
/// ever exists in the root namespace and the same names can be used by parallel tests.
pub fn veth_pair<'a>(a: &'a NetNs, a_if: &str, b: &'a NetNs, b_if: &str) -> VethPair<'a> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
    VethPair {
        a,
        a_if: a_if.to_owned(),
        b,
        b_if: b_if.to_owned(),
    }
}

/// Like [`veth_pair`], with an MTU on both ends.
pub fn veth_pair_mtu<'a>(
    a: &'a NetNs,
    a_if: &str,
    b: &'a NetNs,
    b_if: &str,
    mtu: u32,
) -> VethPair<'a> {
    let pair = veth_pair(a, a_if, b, b_if);
    pair.set_mtu(mtu);
    pair
}

/// Kills its child (by PID, SIGKILL) and reaps it on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// The child's PID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child process, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Child::kill signals exactly this PID, and is a no-op error if it already exited and
        // was reaped; wait() reaps it so the PID is not reused while we still hold it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `aa:bb:cc:dd:ee:ff` -> bytes; panics on malformed input.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    assert_eq!(parts.len(), 6, "bad MAC {s:?}");
    for (dst, part) in mac.iter_mut().zip(parts) {
        *dst = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("bad MAC {s:?}"));
    }
    mac
}

/// Bytes -> `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// True if `addr` (optionally with `/prefix`) is inside 2001:2::/48.
fn in_benchmark_range6(addr: &str) -> bool {
    let (ip, prefix) = match addr.split_once('/') {
        Some((ip, p)) => (ip, p.parse::<u8>().ok()),
        None => (addr, Some(128)),
    };
    let Ok(ip) = ip.parse::<std::net::Ipv6Addr>() else {
        return false;
    };
    let s = ip.segments();
    s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0 && matches!(prefix, Some(48..=128))
}

/// True if `addr` (optionally with `/prefix`) is inside 198.18.0.0/15.
fn in_benchmark_range(addr: &str) -> bool {
    let (ip, prefix) = match addr.split_once('/') {
        Some((ip, p)) => (ip, p.parse::<u8>().ok()),
        None => (addr, Some(32)),
    };
    let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() else {
        return false;
    };
    let o = ip.octets();
    // A prefix shorter than /15 would make the subnet (and its broadcast) leave the range.
    o[0] == 198 && (o[1] & 0xfe) == 18 && matches!(prefix, Some(15..=32))
}
