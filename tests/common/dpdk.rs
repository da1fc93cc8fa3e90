//! dpdk-testpmd as a vhost-user frontend (virtio-user PMD), driven through its interactive
//! prompt: no hugepages, no PCI, a private file prefix per run.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::netns::require_root_and_tools;

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static ONE_TESTPMD: Mutex<()> = Mutex::new(());

/// testpmd busy-polls both cores; one at a time per test binary.
pub fn one_testpmd_at_a_time() -> MutexGuard<'static, ()> {
    ONE_TESTPMD.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn require_testpmd() -> bool {
    require_root_and_tools(&["dpdk-testpmd", "stdbuf", "ip"])
}

/// One virtio-user port: `--vdev net_virtio_user<N>,path=...,<devargs>`.
pub struct Port<'a> {
    pub socket: &'a Path,
    /// `mac=`; `None`: virtio-user asks the backend (GET_CONFIG) or makes one up.
    pub mac: Option<&'a str>,
    /// More devargs, e.g. `mrg_rxbuf=0,queues=1`.
    pub devargs: &'a str,
}

#[derive(Default)]
struct Output {
    text: String,
    closed: bool,
}

/// A running dpdk-testpmd; quit (then killed by PID) on drop.
pub struct Testpmd {
    child: Child,
    stdin: ChildStdin,
    out: Arc<(Mutex<Output>, Condvar)>,
    prefix: String,
    consumed: usize,
}

/// Forward statistics of one port, as `stop` prints them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

impl Testpmd {
    /// Starts testpmd with `ports` and `app_args` (after `--`, e.g. `--forward-mode=txonly`),
    /// and waits for its prompt.
    pub fn start(ports: &[Port], app_args: &[&str]) -> Testpmd {
        let prefix = format!(
            "vhost-packet-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // stdbuf: testpmd prints with stdio, fully buffered into a pipe; line buffering makes
        // each command's output arrive when it is printed. stdbuf execs, so the PID is testpmd's.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "dpdk-testpmd"]);
        cmd.args(["-l", "0-1", "--no-huge", "-m", "512", "--no-pci"])
            .args([
                "--file-prefix",
                &prefix,
                "--log-level",
                "pmd.net.virtio.*:error",
            ]);
        for (i, p) in ports.iter().enumerate() {
            let mut vdev = format!("net_virtio_user{i},path={}", p.socket.display());
            if let Some(mac) = p.mac {
                vdev.push_str(&format!(",mac={mac}"));
            }
            if !p.devargs.is_empty() {
                vdev.push(',');
                vdev.push_str(p.devargs);
            }
            cmd.args(["--vdev", &vdev]);
        }
        // 16384 mbufs: the default pool is too small for 512 MB without hugepages.
        cmd.args(["--", "-i", "--total-num-mbufs=16384"])
            .args(app_args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dpdk-testpmd");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = stdout.read(&mut buf).unwrap_or(0);
                let mut o = sink.0.lock().unwrap_or_else(|p| p.into_inner());
                if n == 0 {
                    o.closed = true;
                    sink.1.notify_all();
                    return;
                }
                o.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                sink.1.notify_all();
            }
        });
        let mut t = Testpmd {
            child,
            stdin,
            out,
            prefix,
            consumed: 0,
        };
        t.wait_for("testpmd> ", Duration::from_secs(60));
        t
    }

    pub fn output(&self) -> String {
        self.out
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .text
            .clone()
    }

    /// Waits for `needle` after what earlier waits consumed; returns the text up to it.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(at) = o.text[self.consumed..].find(needle) {
                let text = o.text[self.consumed..self.consumed + at].to_owned();
                self.consumed += at + needle.len();
                return text;
            }
            let now = Instant::now();
            if o.closed || now >= deadline {
                let text = o.text.clone();
                drop(o);
                panic!("testpmd: no {needle:?}; output:\n{text}");
            }
            o = cv
                .wait_timeout(o, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends one command and returns the output up to `until` (testpmd prints its prompt
    /// before a command's output when stdin is not a terminal, so the prompt marks nothing).
    pub fn command(&mut self, line: &str, until: &str) -> String {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .expect("write to testpmd");
        self.wait_for(until, Duration::from_secs(60))
    }

    /// `stop`: forwarding ends; returns each port's forward statistics.
    pub fn stop(&mut self) -> HashMap<u16, PortStats> {
        let text = self.command("stop", "Accumulated forward statistics");
        parse_forward_stats(&text)
    }

    /// `show port stats PORT`: the PMD's packet counters (RX-packets, TX-packets), which
    /// count what testpmd has dequeued so far.
    pub fn port_packets(&mut self, port: u16) -> (u64, u64) {
        let text = self.command(&format!("show port stats {port}"), "Tx-pps:");
        let after = |key: &str| -> u64 {
            text.split(key)
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
        };
        (after("RX-packets:"), after("TX-packets:"))
    }

    pub fn start_forwarding(&mut self) {
        self.command("start", "packet forwarding - ports=");
    }
}

/// Parses the "Forward statistics for port N" blocks.
pub fn parse_forward_stats(text: &str) -> HashMap<u16, PortStats> {
    let mut out = HashMap::new();
    let mut current: Option<u16> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Forward statistics for port").nth(1) {
            current = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            continue;
        }
        if line.contains("Accumulated forward statistics") {
            current = None;
        }
        let Some(port) = current else { continue };
        let stats: &mut PortStats = out.entry(port).or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let v = pair[1].parse().unwrap_or(0);
            match pair[0] {
                "RX-packets:" => stats.rx_packets = v,
                "RX-dropped:" => stats.rx_dropped = v,
                "TX-packets:" => stats.tx_packets = v,
                "TX-dropped:" => stats.tx_dropped = v,
                _ => {}
            }
        }
    }
    out
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit").and_then(|()| self.stdin.flush());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // --no-huge still leaves its runtime directory behind.
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
        if std::thread::panicking() {
            eprintln!("testpmd output:\n{}", self.output());
        }
    }
}
