//! Command line, logging and signals; everything else lives in the library.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;

use clap::Parser;
use log::{error, info, warn};

use vhost_packet::activation::{self, InheritedSocket};
use vhost_packet::control::{Format, Snapshot};
use vhost_packet::metrics;

use vhost_packet::config::{
    parse_cpu_list, Config, RawConfig, MAX_BUSY_POLL_US, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE,
};
use vhost_packet::daemon::Daemon;
use vhost_packet::signals::{self, Signal};

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
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Listen on this vhost-user UNIX socket (server mode); the frontend connects to it.
    /// Reconnections are accepted forever. `--socket` is the same option.
    #[arg(
        long = "socket-path",
        visible_alias = "socket",
        value_name = "PATH",
        conflicts_with_all = ["client", "fd"]
    )]
    socket_path: Option<PathBuf>,

    /// Serve the listening vhost-user socket inherited as this file descriptor (the caller
    /// made it and removes it). Without --socket-path, --fd or --client, a socket passed by
    /// systemd socket activation (LISTEN_FDS) is served.
    #[arg(long, value_name = "FDNUM", conflicts_with = "client")]
    fd: Option<i32>,

    /// Print the backend's capabilities as JSON (QEMU's vhost-user.json schema, type "net")
    /// and exit; every other option is ignored.
    #[arg(long)]
    print_capabilities: bool,

    /// Serve the counters at http://ADDR:PORT/metrics in Prometheus text format (off by
    /// default; e.g. 127.0.0.1:9870).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,

    /// Connect to a frontend listening on this socket (QEMU `server=on`), retrying until it
    /// appears and again after each disconnect.
    #[arg(long, value_name = "PATH")]
    client: Option<PathBuf>,

    /// Host interface to attach to (NIC, VF, macvlan, veth).
    #[arg(long, short = 'i', value_name = "IFNAME", required = true)]
    interface: Option<String>,

    /// The guest's MAC: the only source it may send from and the unicast address it receives
    /// for, from the start [default: learned from the first frame the guest sends (until then
    /// it receives broadcast and multicast only); the config space then offers a stable
    /// locally administered address derived from the socket path, which QEMU ignores].
    #[arg(long, value_name = "MAC")]
    mac: Option<String>,

    /// MTU advertised to the guest, 68 to 65535 and at most the interface MTU
    /// [default: the interface MTU].
    #[arg(long, value_name = "BYTES")]
    mtu: Option<u32>,

    /// Largest virtqueue size the frontend may configure (a power of two).
    #[arg(long, value_name = "N", default_value_t = u32::from(MAX_QUEUE_SIZE))]
    queue_size: u32,

    /// RX/TX queue pairs (1 to 32), each with its own worker thread and packet socket; with
    /// more than one the guest gets VIRTIO_NET_F_MQ and incoming flows are spread over the
    /// pairs it enables. Give QEMU `-netdev vhost-user,...,queues=N` and
    /// `-device virtio-net-pci,...,mq=on`.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_QUEUE_PAIRS)))]
    queues: u32,

    /// CPUs for the queue pairs' workers, as `taskset -c` takes them (`0,1`, `0-3`): the
    /// worker of pair i runs on the i-th CPU listed, round robin [default: wherever the
    /// scheduler puts them].
    #[arg(long, value_name = "LIST", value_parser = cpu_list)]
    cpu_affinity: Option<CpuList>,

    /// After each burst, keep polling the guest's TX ring and the packet socket for this
    /// long before sleeping again (0: never poll). Lower latency at the cost of CPU: a
    /// worker spins while traffic is at most this far apart, and the guest need not kick
    /// meanwhile. Up to 1000000 (one second).
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_BUSY_POLL_US)))]
    busy_poll_us: u32,

    /// Send with PACKET_QDISC_BYPASS: faster, but skips the interface's qdisc, and GSO frames
    /// the device cannot segment itself are dropped.
    #[arg(long)]
    qdisc_bypass: bool,

    /// Put the interface in promiscuous mode and hand the guest every frame, instead of only
    /// those for its MAC, broadcast and multicast.
    #[arg(long)]
    promisc: bool,

    /// Let the guest send frames whose source MAC is not its own (dropped and counted
    /// otherwise).
    #[arg(long)]
    allow_mac_spoofing: bool,

    /// Permission bits of the vhost-user socket (octal).
    #[arg(long, value_name = "MODE", default_value = "0600")]
    socket_mode: String,

    /// Group of the vhost-user socket (name or number), e.g. the one QEMU runs as, with
    /// `--socket-mode 0660`.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

    /// Once the sockets are open, switch to this user (name or number) and keep no
    /// capabilities. The vhost-user socket is given to it.
    #[arg(long, value_name = "USER")]
    user: Option<String>,

    /// Virtio net header on the packet socket: `auto` uses PACKET_VNET_HDR_SZ where the
    /// kernel has it and falls back to 10 bytes where not; `10` forces that fallback.
    #[arg(long, value_name = "auto|10", default_value = "auto", value_parser = ["auto", "10"])]
    vnet_hdr: String,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
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
enum StatsFormat {
    Table,
    Json,
    Prometheus,
}

/// What `--print-capabilities` prints: `VHostUserBackendCapabilities` of QEMU's
/// docs/interop/vhost-user.json, whose `net` type has no members beyond `type`.
#[derive(serde::Serialize)]
struct Capabilities {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// A parsed `--cpu-affinity` (a newtype: clap would take a bare `Vec` for a repeated option).
#[derive(Clone, Debug)]
struct CpuList(Vec<usize>);

fn cpu_list(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}

fn main() -> ExitCode {
    // The backend program conventions: other options are ignored, even invalid ones.
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--print-capabilities")
    {
        let caps = Capabilities { kind: "net" };
        return match serde_json::to_string_pretty(&caps) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vhost-packet: printing capabilities: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Before any thread exists: this removes LISTEN_* from the environment.
    let activated = activation::listen_fds();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, like every other user error; the usage block is a --help away.
            let msg = e.to_string();
            let what: Vec<&str> = msg
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("tip:")
                        && !l.starts_with("For more information")
                })
                .collect();
            let what = what.join(" ");
            eprintln!(
                "vhost-packet: {} (see --help)",
                what.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let level = match cli.verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("VHOST_PACKET_LOG")
        .init();

    if let Some(Command::Stats {
        socket,
        json,
        format,
    }) = &cli.command
    {
        let format = match (json, format) {
            (true, _) | (false, StatsFormat::Json) => Format::Json,
            (false, StatsFormat::Table) => Format::Table,
            (false, StatsFormat::Prometheus) => Format::Prometheus,
        };
        return match vhost_packet::control::query(socket, format) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vhost-packet: reading counters: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = run(cli, activated);
    notify("STOPPING=1");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-packet: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Tells systemd (NOTIFY_SOCKET) about a state change; a failure is only worth a warning.
fn notify(state: &str) {
    if let Err(e) = activation::notify(state) {
        warn!("telling the service manager {state}: {e}");
    }
}

/// The listening socket handed in: `--fd N`, else the one systemd passed when no other
/// endpoint is given.
fn inherited(
    cli: &Cli,
    activated: Result<Vec<RawFd>, String>,
) -> Result<Option<InheritedSocket>, vhost_packet::Error> {
    use vhost_packet::Error::Inherited;
    if let Some(fd) = cli.fd {
        return InheritedSocket::inspect(fd, &format!("--fd {fd}"))
            .map(Some)
            .map_err(Inherited);
    }
    let fds = activated.map_err(Inherited)?;
    if cli.socket_path.is_some() || cli.client.is_some() {
        return Ok(None);
    }
    match fds[..] {
        [] => Ok(None),
        [fd] => InheritedSocket::inspect(fd, "socket activation (LISTEN_FDS)")
            .map(Some)
            .map_err(Inherited),
        _ => Err(Inherited(format!(
            "socket activation passed {} sockets; vhost-packet serves one",
            fds.len()
        ))),
    }
}

fn run(cli: Cli, activated: Result<Vec<RawFd>, String>) -> Result<(), vhost_packet::Error> {
    // Before any thread exists, so that all of them inherit the mask.
    signals::block().map_err(vhost_packet::Error::Signals)?;
    let inherited = inherited(&cli, activated)?;
    // Bound before privileges are dropped (Daemon::new), so a low port works as root.
    let metrics = cli
        .metrics
        .map(|addr| {
            TcpListener::bind(addr)
                .map(|l| (addr, l))
                .map_err(|source| vhost_packet::Error::Metrics { addr, source })
        })
        .transpose()?;
    let config = Config::validate(RawConfig {
        socket: cli.socket_path,
        client: cli.client,
        inherited,
        interface: cli.interface.unwrap_or_default(),
        mac: cli.mac,
        mtu: cli.mtu,
        queue_size: cli.queue_size,
        queues: cli.queues,
        cpu_affinity: cli.cpu_affinity.map(|l| l.0),
        qdisc_bypass: cli.qdisc_bypass,
        busy_poll_us: cli.busy_poll_us,
        promisc: cli.promisc,
        allow_mac_spoofing: cli.allow_mac_spoofing,
        socket_mode: cli.socket_mode,
        socket_group: cli.socket_group,
        user: cli.user,
        legacy_vnet_header: cli.vnet_hdr == "10",
    })?;
    let interface = config.interface.clone();
    let daemon = Daemon::new(config)?;
    if let Some((addr, listener)) = metrics {
        let backend = daemon.backend().clone();
        metrics::serve(listener, move || Snapshot::take(&backend, &interface))
            .map_err(|source| vhost_packet::Error::Metrics { addr, source })?;
        info!("serving metrics at http://{addr}/metrics");
    }

    let backend = daemon.backend().clone();
    let cleanup = daemon.paths_to_remove();
    let on_error = cleanup.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals::wait() {
                Ok(Signal::DumpStats) => backend.log_stats("SIGUSR1"),
                Ok(Signal::Terminate) => {
                    backend.log_stats("exit");
                    remove_paths(&cleanup);
                    info!("exiting on signal");
                    notify("STOPPING=1");
                    std::process::exit(0);
                }
                Err(e) => {
                    error!("waiting for signals: {e}");
                    std::process::exit(1);
                }
            }
        })
        .map_err(vhost_packet::Error::Signals)?;

    // Everything is open and the socket listens: connections are taken from here on.
    notify("READY=1");
    // Returns only on an error (the interface disappeared, ...): main prints it and exits
    // non-zero, so that a service manager restarts the daemon.
    let result = daemon.run();
    remove_paths(&on_error);
    notify("STOPPING=1");
    result
}

/// The daemon's sockets and directories, as at every exit.
fn remove_paths(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir(path));
    }
}
