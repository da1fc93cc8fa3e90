//! The command line: clap parses it straight into typed values; `Config::try_from` adds the
//! checks that span several options.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::activation::InheritedSocket;
use crate::config::{
    parse_cpu_list, parse_interface, parse_mtu, parse_queue_size, parse_socket_mode,
    parse_unicast_mac, MacAddr, VnetHeaderMode, MAX_BUSY_POLL_US, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE,
};

/// A vhost-user virtio-net backend over an AF_PACKET socket.
///
/// Serves a virtio-net device to QEMU (`-netdev vhost-user`) or a DPDK virtio-user port and
/// moves its frames through IFNAME, keeping checksum and segmentation offloads end to end.
/// Needs CAP_NET_RAW. Never daemonizes; SIGINT/SIGTERM end it, SIGUSR1 logs the counters.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Listen on this vhost-user UNIX socket (server mode); the frontend connects to it.
    /// Reconnections are accepted forever. `--socket` is the same option.
    #[arg(
        long = "socket-path",
        visible_alias = "socket",
        value_name = "PATH",
        conflicts_with_all = ["client", "fd"]
    )]
    pub socket_path: Option<PathBuf>,

    /// Serve the listening vhost-user socket inherited as this file descriptor (the caller
    /// made it and removes it). Without --socket-path, --fd or --client, a socket passed by
    /// systemd socket activation (LISTEN_FDS) is served.
    #[arg(long, value_name = "FDNUM", conflicts_with = "client")]
    pub fd: Option<i32>,

    /// Print the backend's capabilities as JSON (QEMU's vhost-user.json schema, type "net")
    /// and exit; every other option is ignored.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Serve the counters at http://ADDR:PORT/metrics in Prometheus text format (off by
    /// default; e.g. 127.0.0.1:9870).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,

    /// Connect to a frontend listening on this socket (QEMU `server=on`), retrying until it
    /// appears and again after each disconnect.
    #[arg(long, value_name = "PATH")]
    pub client: Option<PathBuf>,

    /// Host interface to attach to (NIC, VF, macvlan, veth).
    #[arg(long, short = 'i', value_name = "IFNAME", required = true,
          value_parser = parse_interface)]
    pub interface: Option<String>,

    /// The guest's MAC: the only source it may send from and the unicast address it receives
    /// for, from the start [default: learned from the first frame the guest sends (until then
    /// it receives broadcast and multicast only); the config space then offers a stable
    /// locally administered address derived from the socket path, which QEMU ignores].
    #[arg(long, value_name = "MAC", value_parser = parse_unicast_mac)]
    pub mac: Option<MacAddr>,

    /// MTU advertised to the guest, 68 to 65535 and at most the interface MTU
    /// [default: the interface MTU].
    #[arg(long, value_name = "BYTES", value_parser = parse_mtu)]
    pub mtu: Option<u16>,

    /// Largest virtqueue size the frontend may configure (a power of two).
    #[arg(long, value_name = "N", default_value_t = MAX_QUEUE_SIZE, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// RX/TX queue pairs (1 to 32), each with its own worker thread and packet socket; with
    /// more than one the guest gets VIRTIO_NET_F_MQ and incoming flows are spread over the
    /// pairs it enables. Give QEMU `-netdev vhost-user,...,queues=N` and
    /// `-device virtio-net-pci,...,mq=on`.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUE_PAIRS)))]
    pub queues: u16,

    /// CPUs for the queue pairs' workers, as `taskset -c` takes them (`0,1`, `0-3`): the
    /// worker of pair i runs on the i-th CPU listed, round robin [default: wherever the
    /// scheduler puts them].
    #[arg(long, value_name = "LIST", value_parser = cpu_list)]
    pub cpu_affinity: Option<CpuList>,

    /// After each burst, keep polling the guest's TX ring and the packet socket for this
    /// long before sleeping again (0: never poll). Lower latency at the cost of CPU: a
    /// worker spins while traffic is at most this far apart, and the guest need not kick
    /// meanwhile. Up to 1000000 (one second).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_BUSY_POLL_US)))]
    pub busy_poll_us: u32,

    /// Send with PACKET_QDISC_BYPASS: faster, but skips the interface's qdisc, and GSO frames
    /// the device cannot segment itself are dropped.
    #[arg(long)]
    pub qdisc_bypass: bool,

    /// Put the interface in promiscuous mode and hand the guest every frame, instead of only
    /// those for its MAC, broadcast and multicast.
    #[arg(long)]
    pub promisc: bool,

    /// Let the guest send frames whose source MAC is not its own (dropped and counted
    /// otherwise).
    #[arg(long)]
    pub allow_mac_spoofing: bool,

    /// Permission bits of the vhost-user socket (octal).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_socket_mode)]
    pub socket_mode: u32,

    /// Group of the vhost-user socket (name or number), e.g. the one QEMU runs as, with
    /// `--socket-mode 0660`.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Once the sockets are open, switch to this user (name or number) and keep no
    /// capabilities. The vhost-user socket is given to it.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Virtio net header on the packet socket: `auto` uses PACKET_VNET_HDR_SZ where the
    /// kernel has it and falls back to 10 bytes where not; `10` forces that fallback.
    #[arg(long, value_name = "auto|10", value_enum, default_value_t = VnetHeaderMode::Auto,
          hide_possible_values = true)]
    pub vnet_hdr: VnetHeaderMode,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// `--fd N` or the socket systemd passed, as the caller found it (not an option: see
    /// `activation`).
    #[arg(skip)]
    pub inherited: Option<InheritedSocket>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Print the counters of a running vhost-packet (per queue pair: packets, bytes, GSO,
    /// drops by reason, notifications, kicks).
    Stats {
        /// The vhost-user socket (or --client path) the daemon serves.
        #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
        socket: PathBuf,
        /// JSON instead of a table (`--format json`).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Output format; `prometheus` is the text exposition node_exporter's textfile
        /// collector reads.
        #[arg(long, value_enum, default_value = "table")]
        format: StatsFormat,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum StatsFormat {
    Table,
    Json,
    Prometheus,
}

/// A parsed `--cpu-affinity` (a newtype: clap would take a bare `Vec` for a repeated option).
#[derive(Clone, Debug)]
pub struct CpuList(pub Vec<usize>);

fn cpu_list(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}
