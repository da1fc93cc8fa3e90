//! Booted guests: the Debian test guest (qemu/build-guest.sh) under QEMU (qemu/boot.sh) on a
//! vhost-packet socket, driven through its serial console, plus the namespaces around it.
//!
//! One guest runs at a time per test binary: under TCG a guest takes a whole core of this
//! two-core machine, and two at once would only make both slow.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::daemon::Daemon;
use super::netns::{require_root_and_tools, veth_pair, ChildGuard, NetNs};

pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const GUEST_IP: &str = "198.18.0.1";
pub const PEER_IP: &str = "198.18.0.2";
pub const GUEST_IP6: &str = "2001:2::1";
pub const PEER_IP6: &str = "2001:2::2";

/// virtio-net feature bits, as the guest reports them.
pub mod bit {
    pub const CSUM: u32 = 0;
    pub const GUEST_CSUM: u32 = 1;
    pub const MTU: u32 = 3;
    pub const GUEST_TSO4: u32 = 7;
    pub const GUEST_TSO6: u32 = 8;
    pub const HOST_TSO4: u32 = 11;
    pub const HOST_TSO6: u32 = 12;
    pub const MRG_RXBUF: u32 = 15;
    pub const STATUS: u32 = 16;
    pub const MQ: u32 = 22;
    pub const VERSION_1: u32 = 32;
}

static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Serialises booted guests within a test binary (a failed test must not block the others).
pub fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    ONE_GUEST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True if booted-guest tests can run: root, the tools, and the guest image (built by
/// qemu/build-guest.sh on first use, then reused). Under CI=true anything missing panics.
pub fn require_guest() -> bool {
    let tools = [
        "qemu-system-x86_64",
        "iperf3",
        "ethtool",
        "ping",
        "cpio",
        "xz",
        "apt-get",
        "dpkg-deb",
    ];
    if !require_root_and_tools(&tools) {
        return false;
    }
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let out = Command::new(repo().join("qemu/build-guest.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running qemu/build-guest.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "qemu/build-guest.sh failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    });
    match built {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("{e}"),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            false
        }
    }
}

/// How to boot the guest (qemu/boot.sh options).
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// Extra virtio-net-pci options, e.g. `mrg_rxbuf=off`.
    pub nic: String,
    pub mtu: Option<u32>,
    pub queues: u32,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            nic: String::new(),
            mtu: None,
            queues: 1,
        }
    }
}

impl GuestOptions {
    pub fn nic(nic: &str) -> Self {
        GuestOptions {
            nic: nic.to_owned(),
            ..Default::default()
        }
    }
}

#[derive(Default)]
struct ConsoleText {
    text: String,
    closed: bool,
}

/// The serial console as text, filled by a reader thread.
#[derive(Default)]
struct Console {
    state: Mutex<ConsoleText>,
    changed: Condvar,
}

impl Console {
    fn text(&self) -> String {
        self.state.lock().unwrap().text.clone()
    }

    /// Waits until `pred` finds something in the text from `from` on; returns it.
    fn wait<T>(
        &self,
        from: usize,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(found) = pred(&state.text[from.min(state.text.len())..]) {
                return Ok(found);
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                let why = if state.closed {
                    "QEMU exited"
                } else {
                    "timed out"
                };
                return Err(format!("{why}; console:\n{}", state.text));
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// A booted guest. QEMU, if this process started it, is ended by its PID on drop.
pub struct Guest {
    /// `None` for a guest whose QEMU someone else runs (libvirt).
    child: Option<Child>,
    console_in: Box<dyn Write + Send>,
    console: Arc<Console>,
    /// QEMU's messages: its stderr (removed on drop) or the log libvirt keeps.
    qemu_log: PathBuf,
    /// boot.sh's copy of the console, kept when a test fails.
    serial_log: Option<PathBuf>,
    next_command: usize,
    /// Console offset after the last command's end marker.
    consumed: usize,
    /// Seconds from boot to eth0 configured (the guest's uptime at `VP-LINK`).
    pub link_up_secs: f64,
    /// The virtio-net feature bits the guest driver acked.
    pub features: u64,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

impl Guest {
    /// Boots the guest on `socket` and waits for its shell (eth0 configured).
    pub fn boot(socket: &Path, opts: &GuestOptions) -> Guest {
        let tag = format!(
            "{}-{}",
            std::process::id(),
            socket.file_stem().unwrap().to_string_lossy()
        );
        let serial_log = std::env::temp_dir().join(format!("vp-guest-{tag}.serial.log"));
        let stderr_log = std::env::temp_dir().join(format!("vp-guest-{tag}.qemu.log"));
        let mut cmd = Command::new(repo().join("qemu/boot.sh"));
        cmd.arg("--socket")
            .arg(socket)
            .args(["--mac", GUEST_MAC, "--console", "--serial-log"])
            .arg(&serial_log)
            .args(["--addr", &format!("{GUEST_IP}/24")])
            .args(["--addr6", &format!("{GUEST_IP6}/64")])
            .args(["--queues", &opts.queues.to_string()]);
        if let Some(mtu) = opts.mtu {
            cmd.args(["--mtu", &mtu.to_string()]);
        }
        if !opts.nic.is_empty() {
            cmd.args(["--nic", &opts.nic]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("create QEMU log"))
            .spawn()
            .expect("spawn qemu/boot.sh");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        Guest::attach(
            Some(child),
            Box::new(stdin),
            stdout,
            stderr_log,
            Some(serial_log),
        )
    }

    /// Drives a guest someone else started (libvirt) through its serial console, connected
    /// before the guest's CPU runs so that no marker is missed; `qemu_log` is QEMU's log.
    pub fn attach_console(console: UnixStream, qemu_log: PathBuf) -> Guest {
        let output = console.try_clone().expect("clone the console socket");
        Guest::attach(None, Box::new(console), output, qemu_log, None)
    }

    /// Reads the console on a thread and waits for the guest's shell (eth0 configured).
    fn attach(
        child: Option<Child>,
        console_in: Box<dyn Write + Send>,
        mut output: impl Read + Send + 'static,
        qemu_log: PathBuf,
        serial_log: Option<PathBuf>,
    ) -> Guest {
        let console = Arc::new(Console::default());
        let sink = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = output.read(&mut buf).unwrap_or(0);
                let mut state = sink.state.lock().unwrap();
                if n == 0 {
                    state.closed = true;
                    sink.changed.notify_all();
                    return;
                }
                let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                state.text.push_str(&chunk);
                sink.changed.notify_all();
            }
        });
        let mut guest = Guest {
            child,
            console_in,
            console,
            qemu_log,
            serial_log,
            next_command: 0,
            consumed: 0,
            link_up_secs: 0.0,
            features: 0,
        };
        let ready = guest.console.wait(0, BOOT_TIMEOUT, |t| {
            t.find("VP-SHELL\n").map(|i| i + "VP-SHELL\n".len())
        });
        let consumed = match ready {
            Ok(end) => end,
            Err(e) => panic!("guest did not boot: {e}\nQEMU: {}", guest.qemu_log()),
        };
        guest.consumed = consumed;
        let text = guest.console.text();
        let field = |marker: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(marker))
                .unwrap_or_else(|| panic!("no {marker} on the console:\n{text}"))
                .trim()
                .to_owned()
        };
        guest.features = field("VP-FEATURES ")
            .chars()
            .enumerate()
            .filter(|(_, c)| *c == '1')
            .fold(0u64, |acc, (i, _)| acc | 1 << i);
        guest.link_up_secs = field("VP-LINK ").parse().expect("VP-LINK uptime");
        guest
    }

    /// True if the guest acked feature `bit`.
    pub fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// The accelerator boot.sh chose, as it printed it.
    pub fn accelerator(&self) -> String {
        self.qemu_log()
            .lines()
            .find_map(|l| l.strip_prefix("boot: accelerator "))
            .unwrap_or("unknown")
            .to_owned()
    }

    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(&self.qemu_log).unwrap_or_default()
    }

    pub fn console_text(&self) -> String {
        self.console.text()
    }

    /// Runs `script` in the guest shell; returns its exit status and output (stdout and
    /// stderr). Panics if it does not finish within `timeout`.
    pub fn sh(&mut self, script: &str, timeout: Duration) -> (i32, String) {
        self.next_command += 1;
        let marker = format!("@@VP-RC-{}@@", self.next_command);
        // One line per command (the guest reads lines), in a subshell so that `exit` ends
        // only the command, with stdin /dev/null so that nothing eats the following commands.
        // The marker is printed by the guest, never typed: with echo off the input is not on
        // the console, and the command text does not contain the marker as one word.
        assert!(
            !script.contains('\n'),
            "one line per guest command: {script:?}"
        );
        let line = format!(
            "( {script} ) </dev/null 2>&1; echo \"@@VP-RC-{}@@ $?\"\n",
            self.next_command
        );
        self.console_in
            .write_all(line.as_bytes())
            .and_then(|()| self.console_in.flush())
            .expect("write to the guest console");
        let from = self.consumed;
        let found = self.console.wait(from, timeout, |t| {
            let at = t.find(&marker)?;
            let rest = &t[at + marker.len()..];
            let eol = rest.find('\n')?;
            Some((
                at,
                at + marker.len() + eol + 1,
                rest[..eol].trim().to_owned(),
            ))
        });
        let (at, end, status) = found.unwrap_or_else(|e| panic!("guest command {script:?}: {e}"));
        let text = self.console.text();
        let output = text[from..from + at].to_owned();
        self.consumed = from + end;
        (status.parse().unwrap_or(-1), output)
    }

    /// Like [`Guest::sh`], panicking (with the output) unless the status is 0.
    pub fn sh_ok(&mut self, script: &str, timeout: Duration) -> String {
        let (status, out) = self.sh(script, timeout);
        assert_eq!(status, 0, "guest command {script:?} failed:\n{out}");
        out
    }

    /// Ends QEMU (SIGTERM, then SIGKILL) and reaps it.
    pub fn stop(mut self) {
        self.end_qemu();
    }

    fn end_qemu(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on the PID of our unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.end_qemu();
        if std::thread::panicking() {
            let kept = self
                .serial_log
                .as_ref()
                .map_or(String::new(), |p| format!(" ({})", p.display()));
            eprintln!(
                "guest console{kept}:\n{}\nQEMU: {}",
                self.console.text(),
                self.qemu_log()
            );
        } else if let Some(serial_log) = &self.serial_log {
            let _ = std::fs::remove_file(serial_log);
        }
        if self.child.is_some() {
            let _ = std::fs::remove_file(&self.qemu_log);
        }
    }
}

/// The network around a guest: a host namespace with vhost-packet on `vh0`, a peer namespace
/// with `vp0` (198.18.0.2/24, 2001:2::2/64) and an iperf3 server.
pub struct GuestNet {
    pub peer: NetNs,
    pub host: NetNs,
    pub daemon: Option<Daemon>,
    pub socket: PathBuf,
    /// `--mac` for vhost-packet; `None`: it learns the MAC QEMU's device was given.
    mac: Option<&'static str>,
    extra: Vec<String>,
    _iperf: ChildGuard,
}

impl GuestNet {
    /// Namespaces, veth (MTU `mtu` if given), iperf3 server, and vhost-packet started with the
    /// guest's MAC plus `extra` arguments.
    pub fn new(mtu: Option<u32>, extra: &[&str]) -> GuestNet {
        GuestNet::with_mac(Some(GUEST_MAC), mtu, extra)
    }

    /// Like [`GuestNet::new`], with vhost-packet not told the MAC (no `--mac`), as a new user
    /// starts it: QEMU's device still has `mac=GUEST_MAC`.
    pub fn without_mac(extra: &[&str]) -> GuestNet {
        GuestNet::with_mac(None, None, extra)
    }

    fn with_mac(mac: Option<&'static str>, mtu: Option<u32>, extra: &[&str]) -> GuestNet {
        let host = NetNs::new("vpg-host");
        let peer = NetNs::new("vpg-peer");
        let pair = veth_pair(&host, "vh0", &peer, "vp0");
        if let Some(mtu) = mtu {
            pair.set_mtu(mtu);
        }
        peer.add_addr("vp0", &format!("{PEER_IP}/24"));
        peer.add_addr6("vp0", &format!("{PEER_IP6}/64"));
        let iperf = peer.spawn(&["iperf3", "-s"]);
        let socket = super::daemon::socket_path("guest");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut net = GuestNet {
            peer,
            host,
            daemon: None,
            socket,
            mac,
            extra,
            _iperf: iperf,
        };
        net.start_daemon();
        net
    }

    /// (Re)starts vhost-packet on the same socket path.
    pub fn start_daemon(&mut self) {
        let mut args: Vec<&str> = self.mac.iter().flat_map(|m| ["--mac", m]).collect();
        args.extend(self.extra.iter().map(String::as_str));
        self.daemon = Some(Daemon::start_at(&self.host, "vh0", &self.socket, &args));
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("vhost-packet is running")
    }

    pub fn stats(&self) -> HashMap<String, u64> {
        self.daemon().stats()
    }

    pub fn boot(&self, opts: &GuestOptions) -> Guest {
        Guest::boot(&self.socket, opts)
    }

    /// Runs `ping` in the peer namespace towards `dst`; returns its output, panicking on
    /// failure.
    pub fn peer_ping(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ping"];
        cmd.extend_from_slice(args);
        let out = self.peer.exec(&cmd);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "peer {cmd:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

/// An iperf3 result line: the receiver's rate in Gbit/s.
#[derive(Debug)]
pub struct Iperf {
    pub gbits: f64,
    pub retransmits: Option<u64>,
    pub output: String,
}

/// Runs iperf3 in the guest against the peer (`reverse`: peer to guest) for `secs`.
/// Panics if iperf3 reports an error or no receiver line.
pub fn guest_iperf(guest: &mut Guest, server: &str, secs: u32, reverse: bool) -> Iperf {
    let r = if reverse { " -R" } else { "" };
    let out = guest.sh_ok(
        &format!("iperf3 -c {server} -t {secs}{r} -f m"),
        Duration::from_secs(u64::from(secs) + 60),
    );
    assert!(!out.contains("error"), "iperf3 reported an error:\n{out}");
    let field_before = |line: &str, unit: &str| -> Option<f64> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == unit)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    let receiver = out
        .lines()
        .find(|l| l.ends_with("receiver"))
        .unwrap_or_else(|| panic!("no receiver line from iperf3:\n{out}"));
    let sender = out.lines().find(|l| l.ends_with("sender"));
    let mbits = field_before(receiver, "Mbits/sec").expect("receiver rate");
    // "... 1.50 Gbits/sec  0  sender": the word after the rate is the retransmit count.
    let retransmits = sender.and_then(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "Mbits/sec")?;
        words.get(i + 1)?.parse().ok()
    });
    Iperf {
        gbits: mbits / 1000.0,
        retransmits,
        output: out,
    }
}

/// How long one guest shell command (a short ping) may take.
const GUEST_CMD: Duration = Duration::from_secs(60);

/// Pings the peer from the guest (IPv4 and IPv6) and the guest from the peer; every echo
/// must come back. Returns the guest's IPv4 summary line.
pub fn ping_both_ways(net: &GuestNet, guest: &mut Guest) -> String {
    let out = guest.sh_ok(&format!("ping -c 3 -W 5 {PEER_IP}"), GUEST_CMD);
    assert!(out.contains(" 0% packet loss"), "guest -> peer:\n{out}");
    let out6 = guest.sh_ok(&format!("ping -c 3 -W 5 {PEER_IP6}"), GUEST_CMD);
    assert!(
        out6.contains(" 0% packet loss"),
        "guest -> peer (IPv6):\n{out6}"
    );
    let back = net.peer_ping(&["-c", "3", "-W", "5", GUEST_IP]);
    assert!(back.contains(" 0% packet loss"), "peer -> guest:\n{back}");
    let back6 = net.peer_ping(&["-c", "3", "-W", "5", GUEST_IP6]);
    assert!(
        back6.contains(" 0% packet loss"),
        "peer -> guest (IPv6):\n{back6}"
    );
    out.lines()
        .find(|l| l.starts_with("rtt"))
        .unwrap_or_default()
        .to_owned()
}

/// TCP both ways with iperf3 (3 s each); returns (guest->peer, peer->guest) Gbit/s.
pub fn tcp_both_ways(guest: &mut Guest) -> (f64, f64) {
    let up = guest_iperf(guest, PEER_IP, 3, false);
    let down = guest_iperf(guest, PEER_IP, 3, true);
    assert!(up.gbits > 0.0 && down.gbits > 0.0, "{up:?} {down:?}");
    (up.gbits, down.gbits)
}
