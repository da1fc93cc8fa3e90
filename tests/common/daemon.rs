//! Runs the real vhost-packet binary inside a test namespace, with its log in a file so that
//! tests can read its counters (SIGUSR1) and connection events.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::netns::NetNs;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running vhost-packet process; killed (by its PID) and its socket removed on drop.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
    /// Queue pairs it serves (`--queues`).
    pairs: usize,
}

/// A unique socket path for this process and test.
pub fn socket_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "vhost-packet-{tag}-{}-{n}.sock",
        std::process::id()
    ))
}

impl Daemon {
    /// Starts `vhost-packet --socket <unique> --interface iface <extra...>` in `ns` and waits
    /// until it listens.
    pub fn start(ns: &NetNs, iface: &str, extra: &[&str]) -> Daemon {
        let socket = socket_path("test");
        Daemon::start_at(ns, iface, &socket, extra)
    }

    pub fn start_at(ns: &NetNs, iface: &str, socket: &Path, extra: &[&str]) -> Daemon {
        let d = Daemon::spawn(ns, "--socket", iface, socket, extra);
        d.wait_for_log("listening on", Duration::from_secs(10));
        d
    }

    /// Starts `vhost-packet --client <path> --interface iface <extra...>` in `ns` and waits
    /// until it logs that it waits for a frontend, so nothing may listen on `path` yet. Drop
    /// removes `path` too (the test's own listener socket).
    pub fn start_client(ns: &NetNs, iface: &str, path: &Path, extra: &[&str]) -> Daemon {
        let d = Daemon::spawn(ns, "--client", iface, path, extra);
        d.wait_for_log("waiting for a frontend", Duration::from_secs(10));
        d
    }

    /// Like `start_at`, with the binary run through `wrapper` (e.g. setpriv), which must exec
    /// it so that the PID stays the daemon's.
    pub fn start_wrapped(
        ns: &NetNs,
        wrapper: &[&str],
        iface: &str,
        socket: &Path,
        extra: &[&str],
    ) -> Daemon {
        let d = Daemon::spawn_wrapped(ns, wrapper, "--socket", iface, socket, extra);
        d.wait_for_log("listening on", Duration::from_secs(10));
        d
    }

    /// Runs `wrapper... vhost-packet args...` in `ns` with `env` added, exactly as given (no
    /// socket option of its own), without waiting (a socket activator starts it only at the
    /// first connection). `socket` is the vhost-user socket it serves (removed on drop with its
    /// `.stats` socket).
    pub fn spawn_args(
        ns: &NetNs,
        wrapper: &[&str],
        env: &[(&str, &str)],
        socket: &Path,
        args: &[&str],
    ) -> Daemon {
        let log = socket.with_extension("log");
        let mut full = wrapper.to_vec();
        full.push(env!("CARGO_BIN_EXE_vhost-packet"));
        full.extend_from_slice(args);
        let mut cmd = ns.command(&full);
        cmd.envs(env.iter().copied());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create daemon log"))
            .spawn()
            .expect("spawn vhost-packet");
        Daemon {
            child,
            socket: socket.to_path_buf(),
            log,
            pairs: 1,
        }
    }

    fn spawn(ns: &NetNs, mode: &str, iface: &str, socket: &Path, extra: &[&str]) -> Daemon {
        Daemon::spawn_wrapped(ns, &[], mode, iface, socket, extra)
    }

    fn spawn_wrapped(
        ns: &NetNs,
        wrapper: &[&str],
        mode: &str,
        iface: &str,
        socket: &Path,
        extra: &[&str],
    ) -> Daemon {
        let log = socket.with_extension("log");
        let socket_s = socket.to_str().unwrap().to_string();
        let mut args = wrapper.to_vec();
        args.extend_from_slice(&[
            env!("CARGO_BIN_EXE_vhost-packet"),
            mode,
            &socket_s,
            "--interface",
            iface,
        ]);
        args.extend_from_slice(extra);
        let child = ns
            .command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create daemon log"))
            .spawn()
            .expect("spawn vhost-packet");
        let pairs = extra
            .iter()
            .position(|a| *a == "--queues")
            .and_then(|i| extra.get(i + 1))
            .map_or(1, |n| n.parse().expect("--queues N"));
        Daemon {
            child,
            socket: socket.to_path_buf(),
            log,
            pairs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True until the process exits (it is only reaped on drop, so a dead one is a zombie).
    pub fn is_running(&self) -> bool {
        matches!(self.child_status(), Ok(None))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times; panics with the log otherwise.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            if let Ok(Some(status)) = self.child_status() {
                panic!(
                    "vhost-packet exited ({status}) while waiting for {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {needle:?} in the vhost-packet log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout);
    }

    fn child_status(&self) -> std::io::Result<Option<std::process::ExitStatus>> {
        // try_wait needs &mut; peek through /proc instead to keep &self.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        Ok(if state == Some("Z") {
            Some(std::process::ExitStatus::default())
        } else {
            None
        })
    }

    /// CPU time (user + system, all threads) the process has consumed so far, from
    /// `/proc/<pid>/stat` (fields 14 and 15, in clock ticks).
    pub fn cpu_time(&self) -> Duration {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        // The command name may contain spaces; the fields after its closing parenthesis start
        // with field 3 (state), so field n is at index n - 3.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let ticks = |n: usize| -> u64 {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("no field {n} in {path}: {stat}"))
        };
        // SAFETY: sysconf(3) has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis((ticks(14) + ticks(15)) * 1000 / hz)
    }

    /// Sends a signal to this process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Asks for the counters (SIGUSR1) and returns them summed over all pairs, by name:
    /// `rx.packets`, `rx.drops.oversize`, `tx.drops.kernel`, ...
    pub fn stats(&self) -> HashMap<String, u64> {
        let mut total: HashMap<String, u64> = HashMap::new();
        for pair in self.stats_by_pair() {
            for (k, v) in pair {
                *total.entry(k).or_default() += v;
            }
        }
        total
    }

    /// Asks for the counters (SIGUSR1) and parses the newest line of each pair.
    pub fn stats_by_pair(&self) -> Vec<HashMap<String, u64>> {
        // The pairs' lines come in order: once the last one is there, all are.
        let last = format!("SIGUSR1: queue pair {}:", self.pairs - 1);
        let before = self.log().matches(&last).count();
        self.signal(libc::SIGUSR1);
        self.wait_for_log_count(&last, before + 1, Duration::from_secs(5));
        let log = self.log();
        (0..self.pairs)
            .map(|i| {
                let tag = format!("SIGUSR1: queue pair {i}:");
                let line = log
                    .lines()
                    .rev()
                    .find(|l| l.contains(&tag))
                    .expect("stats line");
                parse_stats(line)
            })
            .collect()
    }

    /// Waits up to `timeout` for the process to exit on its own: its status and log, or `None`
    /// if it is still running (it is then killed on drop as usual).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, self.log()));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vhost-packet stats --json` for this daemon.
    pub fn stats_json(&self) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-packet"))
            .args(["stats", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().expect("wait for vhost-packet");
        (status, self.log())
    }
}

impl Daemon {
    /// The socket, its `.stats` control socket (left behind by a SIGKILL) and the log.
    fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(vhost_packet::control::control_path(&self.socket));
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only a child not yet reaped may be signalled by PID (std caches a reaped status).
        if !matches!(self.child.try_wait(), Ok(None)) {
            self.remove_files();
            return;
        }
        // SIGTERM lets it clean up; SIGKILL if it does not exit promptly.
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.remove_files();
    }
}

/// Parses a counters line into `rx.packets`-style keys.
pub fn parse_stats(line: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    // `... SIGUSR1: queue pair N: rx packets=...; tx ...`
    let body = line.find(": rx ").map_or(line, |at| &line[at + 2..]);
    for section in body.split("; ") {
        let mut words = section.split_whitespace();
        let Some(dir) = words.next() else { continue };
        let mut prefix = dir.to_string();
        for w in words {
            let mut w = w;
            if let Some(rest) = w.strip_prefix("drops[") {
                prefix = format!("{dir}.drops");
                w = rest;
            }
            let w = w.trim_end_matches(']');
            if let Some((k, v)) = w.split_once('=') {
                if let Ok(v) = v.parse() {
                    out.insert(format!("{prefix}.{k}"), v);
                }
            }
        }
    }
    out
}
