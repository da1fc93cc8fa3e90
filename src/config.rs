//! Validated configuration: everything the daemon needs, checked before anything is opened.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::activation::InheritedSocket;
use crate::cli::Cli;
use crate::error::Error;

/// How the vhost-user connection is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Listen on this path; the frontend (QEMU, DPDK) connects. Accepts again after disconnects.
    Server(PathBuf),
    /// Connect to a frontend listening on this path, retrying until it appears.
    Client(PathBuf),
    /// Accept on a listening socket handed in (`--fd`, systemd socket activation). Its owner
    /// made it and removes it; the `Daemon` takes over the descriptor.
    Inherited(InheritedSocket),
}

impl Endpoint {
    /// The socket's path; `None` for an inherited socket without one (abstract, unnamed).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Endpoint::Server(p) | Endpoint::Client(p) => Some(p),
            Endpoint::Inherited(s) => s.path.as_deref(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Server(p) | Endpoint::Client(p) => p.display().fmt(f),
            Endpoint::Inherited(s) => s.fmt(f),
        }
    }
}

/// Which virtio net header the packet socket carries (`--vnet-hdr auto|10`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VnetHeaderMode {
    /// `PACKET_VNET_HDR_SZ` when the kernel has it (`packet::socket::VNET_HDR_SZ_SINCE`),
    /// else the 10-byte fallback.
    Auto,
    /// Force the 10-byte `PACKET_VNET_HDR` with `num_buffers` handled in userspace, as on
    /// kernels without `PACKET_VNET_HDR_SZ`.
    #[value(name = "10")]
    Legacy10,
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast address derived from `seed` (the socket path), so
    /// that a guest keeps its MAC across backend restarts.
    pub fn derived_from(seed: &[u8]) -> MacAddr {
        // FNV-1a: small, stable across versions and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in seed {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        // 0x02: locally administered, unicast.
        MacAddr([0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad =
            || format!("invalid MAC address '{s}': expected six hex bytes like 52:54:00:12:34:56");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Smallest and largest MTU a virtio-net device may advertise (IPv4 minimum; u16 field).
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;
/// Largest virtqueue size we accept (and offer).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queue pairs served (`--queues`). vhost-user-backend assigns queues to worker threads
/// by bit masks of one u64 (`queues_per_thread`), so it serves at most 64 queues: 32 pairs.
pub const MAX_QUEUE_PAIRS: u16 = 32;
/// Longest `--busy-poll-us`: one second.
pub const MAX_BUSY_POLL_US: u32 = 1_000_000;

/// The daemon's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub endpoint: Endpoint,
    pub interface: String,
    /// `--mac`: the guest's MAC from the start. `None`: it is learned from the guest's first
    /// frame, and the config space reports [`Config::derived_mac`].
    pub mac: Option<MacAddr>,
    /// `None`: the interface's MTU.
    pub mtu: Option<u16>,
    pub queue_size: u16,
    /// RX/TX queue pairs, each with its worker thread and packet socket.
    pub queue_pairs: u16,
    /// CPUs the workers run on: pair i on `cpu_affinity[i % len]`; `None`: the scheduler
    /// decides.
    pub cpu_affinity: Option<Vec<usize>>,
    pub qdisc_bypass: bool,
    /// How long a worker keeps polling after its last work before it sleeps; `None`: it
    /// sleeps at once.
    pub busy_poll: Option<Duration>,
    pub promisc: bool,
    /// Let the guest send frames with any source MAC.
    pub allow_mac_spoofing: bool,
    pub vnet_header: VnetHeaderMode,
    /// Permission bits of the vhost-user socket.
    pub socket_mode: u32,
    /// Group to give the vhost-user socket.
    pub socket_group: Option<String>,
    /// User to switch to once the sockets are open.
    pub user: Option<String>,
}

impl Config {
    /// The MAC the device's config space reports at the start of each connection: `--mac`,
    /// or one derived from the socket path. Without `--mac` it is only a suggestion: QEMU
    /// gives its device its own MAC and never reads ours, and the guest's is learned.
    pub fn config_mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| self.derived_mac())
    }

    /// A stable MAC derived from the socket path (see [`MacAddr::derived_from`]).
    /// Without a path (an inherited socket), from the endpoint's description.
    pub fn derived_mac(&self) -> MacAddr {
        match self.endpoint.path() {
            Some(p) => MacAddr::derived_from(p.as_os_str().as_encoded_bytes()),
            None => MacAddr::derived_from(self.endpoint.to_string().as_bytes()),
        }
    }
}

/// Parses a CPU list as `taskset -c` and cpusets take it: `0,1`, `0-3`, `0-3,8,10-11`. The
/// order is kept (pair i runs on the i-th CPU listed); a CPU may appear more than once.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = |why: &str| format!("invalid CPU list '{s}': {why} (expected e.g. 0,1 or 0-3)");
    let number = |t: &str| -> Result<usize, String> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("'{t}' is not a CPU number")));
        }
        match t.parse::<usize>() {
            Ok(n) if n < CPU_SETSIZE => Ok(n),
            _ => Err(bad(&format!("CPU {t} is not below {CPU_SETSIZE}"))),
        }
    };
    let mut cpus = Vec::new();
    for item in s.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(bad(&format!("range {a}-{b} runs backwards")));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(number(item)?),
        }
        if cpus.len() > CPU_SETSIZE {
            return Err(bad("too many CPUs"));
        }
    }
    Ok(cpus)
}

/// CPUs a `cpu_set_t` can name.
pub const CPU_SETSIZE: usize = libc::CPU_SETSIZE as usize;

/// `--mac`: a MAC a guest can have (unicast).
pub fn parse_unicast_mac(s: &str) -> Result<MacAddr, String> {
    let mac: MacAddr = s.parse()?;
    if !mac.is_unicast() {
        return Err(format!(
            "--mac {mac} is a multicast address; a guest needs a unicast one"
        ));
    }
    Ok(mac)
}

/// `--mtu`, within [`MTU_RANGE`].
pub fn parse_mtu(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(m) if MTU_RANGE.contains(&m) => Ok(m as u16),
        _ => Err(format!(
            "--mtu {s} is out of range ({}..={})",
            MTU_RANGE.start(),
            MTU_RANGE.end()
        )),
    }
}

/// `--queue-size`: a power of two up to [`MAX_QUEUE_SIZE`].
pub fn parse_queue_size(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(q) if (2..=MAX_QUEUE_SIZE).contains(&q) && q.is_power_of_two() => Ok(q),
        _ => Err(format!(
            "--queue-size {s} must be a power of two from 2 to {MAX_QUEUE_SIZE}"
        )),
    }
}

/// `--socket-mode`: octal permission bits.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    crate::privileges::parse_mode(s)
        .ok_or_else(|| format!("--socket-mode {s} is not an octal permission mode like 0660"))
}

/// `--interface`: a name the kernel could have given.
pub fn parse_interface(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() >= libc::IFNAMSIZ || s.contains('/') {
        return Err(format!(
            "invalid interface name '{s}': 1 to {} characters, no '/'",
            libc::IFNAMSIZ - 1
        ));
    }
    Ok(s.to_owned())
}

impl TryFrom<Cli> for Config {
    type Error = Error;

    /// The checks that span options; clap has checked each value.
    fn try_from(cli: Cli) -> Result<Config, Error> {
        let endpoint = match (cli.socket_path, cli.client, cli.inherited) {
            (Some(p), None, None) => Endpoint::Server(p),
            (None, Some(p), None) => Endpoint::Client(p),
            (None, None, Some(s)) => Endpoint::Inherited(s),
            (None, None, None) => {
                return Err(Error::InvalidArgument(
                    "one of --socket-path PATH, --fd N or --client PATH is required (or a socket from systemd)".into(),
                ))
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "--socket-path, --fd and --client exclude each other".into(),
                ))
            }
        };
        Ok(Config {
            endpoint,
            // clap requires it unless a subcommand runs instead.
            interface: cli.interface.unwrap_or_default(),
            mac: cli.mac,
            mtu: cli.mtu,
            queue_size: cli.queue_size,
            queue_pairs: cli.queues,
            cpu_affinity: cli.cpu_affinity.map(|l| l.0),
            qdisc_bypass: cli.qdisc_bypass,
            busy_poll: (cli.busy_poll_us > 0)
                .then(|| Duration::from_micros(u64::from(cli.busy_poll_us))),
            promisc: cli.promisc,
            allow_mac_spoofing: cli.allow_mac_spoofing,
            vnet_header: cli.vnet_hdr,
            socket_mode: cli.socket_mode,
            socket_group: cli.socket_group,
            user: cli.user,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    const BASE: &[&str] = &[
        "vhost-packet",
        "--socket",
        "/run/vhost-packet/net0.sock",
        "-i",
        "eth3",
    ];

    /// The configuration of `BASE` and `more`, or the one-line message of what is wrong.
    fn config(more: &[&str]) -> Result<Config, String> {
        config_with(more, None)
    }

    fn config_with(more: &[&str], inherited: Option<InheritedSocket>) -> Result<Config, String> {
        let mut cli = Cli::try_parse_from(BASE.iter().chain(more)).map_err(|e| e.to_string())?;
        cli.inherited = inherited;
        Config::try_from(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_validate() {
        let c = config(&[]).unwrap();
        assert_eq!(
            c.endpoint,
            Endpoint::Server("/run/vhost-packet/net0.sock".into())
        );
        assert_eq!(c.mtu, None);
        assert_eq!(c.queue_size, MAX_QUEUE_SIZE);
        assert_eq!(c.queue_pairs, 1);
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.vnet_header, VnetHeaderMode::Auto);
        assert_eq!(c.mac, None, "learned from the guest");
        assert!(c.config_mac().is_unicast());
        assert_eq!(c.config_mac().0[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn typed_values_arrive_typed() {
        let c = config(&[
            "--mac",
            "52:54:00:12:34:56",
            "--mtu",
            "9000",
            "--queue-size",
            "256",
            "--socket-mode",
            "0660",
            "--vnet-hdr",
            "10",
        ])
        .unwrap();
        assert_eq!(c.mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(
            (c.mtu, c.queue_size, c.socket_mode),
            (Some(9000), 256, 0o660)
        );
        assert_eq!(c.vnet_header, VnetHeaderMode::Legacy10);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,1").unwrap(), [0, 1]);
        assert_eq!(parse_cpu_list("0-3").unwrap(), [0, 1, 2, 3]);
        assert_eq!(parse_cpu_list("3,0-1,8").unwrap(), [3, 0, 1, 8]);
        assert_eq!(parse_cpu_list("5").unwrap(), [5]);
        assert_eq!(parse_cpu_list("2-2,2").unwrap(), [2, 2]);
        for (bad, why) in [
            ("", "'' is not a CPU number"),
            ("0,", "'' is not a CPU number"),
            ("a", "'a' is not a CPU number"),
            ("-1", "'' is not a CPU number"),
            ("1-", "'' is not a CPU number"),
            ("3-1", "range 3-1 runs backwards"),
            ("1024", "CPU 1024 is not below 1024"),
            ("+1", "'+1' is not a CPU number"),
            ("0-1023,0", "too many CPUs"),
        ] {
            let e = parse_cpu_list(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.starts_with(&format!("invalid CPU list '{bad}'")), "{e}");
        }
        let c = config(&["--queues", "4", "--cpu-affinity", "1,0"]).unwrap();
        assert_eq!((c.queue_pairs, c.cpu_affinity), (4, Some(vec![1, 0])));
    }

    #[test]
    fn busy_poll_is_off_at_zero_and_bounded() {
        assert_eq!(config(&[]).unwrap().busy_poll, None);
        let c = config(&["--busy-poll-us", "50"]).unwrap();
        assert_eq!(c.busy_poll, Some(Duration::from_micros(50)));
        let e = config(&["--busy-poll-us", "1000001"]).unwrap_err();
        assert!(e.contains("1000001 is not in 0..=1000000"), "{e}");
    }

    #[test]
    fn an_inherited_socket_is_an_endpoint_of_its_own_with_the_mac_of_its_path() {
        let inherited = InheritedSocket {
            fd: 3,
            path: Some("/run/vhost-packet/net0.sock".into()),
        };
        let mut cli = Cli::try_parse_from(["vhost-packet", "-i", "eth3"]).unwrap();
        cli.inherited = Some(inherited.clone());
        let c = Config::try_from(cli).unwrap();
        assert_eq!(c.endpoint, Endpoint::Inherited(inherited.clone()));
        assert_eq!(
            c.config_mac(),
            config(&[]).unwrap().config_mac(),
            "same path, same MAC"
        );
        let e = config_with(&[], Some(inherited)).unwrap_err();
        assert!(e.contains("exclude each other"), "{e}");
    }

    #[test]
    fn derived_mac_is_stable_and_depends_on_the_path() {
        let a = MacAddr::derived_from(b"/run/a.sock");
        assert_eq!(a, MacAddr::derived_from(b"/run/a.sock"));
        assert_ne!(a, MacAddr::derived_from(b"/run/b.sock"));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            "52:54:00:12:34:56".parse::<MacAddr>().unwrap().0,
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert_eq!(
            "52-54-00-12-34-5F".parse::<MacAddr>().unwrap().to_string(),
            "52:54:00:12:34:5f"
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(config(&["--mac", "01:00:5e:00:00:01"])
            .unwrap_err()
            .contains("multicast"));
    }

    #[test]
    fn bad_values_get_one_clear_message() {
        for (args, want) in [
            (
                &["--mtu", "67"][..],
                "--mtu 67 is out of range (68..=65535)",
            ),
            (&["--mtu", "70000"], "--mtu 70000 is out of range"),
            (
                &["--queue-size", "2048"],
                "--queue-size 2048 must be a power of two",
            ),
            (&["--queue-size", "1000"], "--queue-size 1000"),
            (&["--queues", "0"], "0 is not in 1..=32"),
            (&["--queues", "33"], "33 is not in 1..=32"),
            (
                &["--socket-mode", "0999"],
                "--socket-mode 0999 is not an octal permission mode",
            ),
            (&["--vnet-hdr", "12"], "invalid value '12' for '--vnet-hdr"),
            (&["--client", "/x"], "cannot be used with"),
        ] {
            let msg = config(args).unwrap_err();
            assert!(msg.contains(want), "{msg:?} should contain {want:?}");
        }
        for name in ["a-very-long-interface-name", "", "a/b"] {
            let e =
                Cli::try_parse_from(["vhost-packet", "--socket", "/x", "-i", name]).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("invalid interface name '{name}'")),
                "{msg}"
            );
        }
        let msg = Cli::try_parse_from(["vhost-packet", "-i", "eth3"])
            .map_err(|e| e.to_string())
            .and_then(|cli| Config::try_from(cli).map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(
            msg.contains("one of --socket-path PATH, --fd N or --client PATH"),
            "{msg}"
        );
    }
}
