//! Command line, logging and signals; everything else lives in the library.

use std::net::TcpListener;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;

use clap::Parser;
use log::{error, info, warn};

use vhost_packet::activation::{self, InheritedSocket};
use vhost_packet::control::{Format, Snapshot};
use vhost_packet::metrics;

use vhost_packet::cli::{Cli, Command, StatsFormat};
use vhost_packet::config::Config;
use vhost_packet::daemon::Daemon;
use vhost_packet::signals::{self, Signal};

/// What `--print-capabilities` prints: `VHostUserBackendCapabilities` of QEMU's
/// docs/interop/vhost-user.json, whose `net` type has no members beyond `type`.
#[derive(serde::Serialize)]
struct Capabilities {
    #[serde(rename = "type")]
    kind: &'static str,
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

fn run(mut cli: Cli, activated: Result<Vec<RawFd>, String>) -> Result<(), vhost_packet::Error> {
    // Before any thread exists, so that all of them inherit the mask.
    signals::block().map_err(vhost_packet::Error::Signals)?;
    cli.inherited = inherited(&cli, activated)?;
    // Bound before privileges are dropped (Daemon::new), so a low port works as root.
    let metrics = cli
        .metrics
        .map(|addr| {
            TcpListener::bind(addr)
                .map(|l| (addr, l))
                .map_err(|source| vhost_packet::Error::Metrics { addr, source })
        })
        .transpose()?;
    let config = Config::try_from(cli)?;
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
