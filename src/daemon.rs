//! Serve frontends one connection after another, forever, keeping the packet sockets.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::affinity;
use crate::backend::NetBackend;
use crate::config::{Config, Endpoint, VnetHeaderMode};
use crate::control;
use crate::datapath::{EventIds, MacPolicy, QueuePair};
use crate::error::Error;
use crate::packet::interface::Interface;
use crate::packet::probe::{fanout_ignores_outgoing, probe_uso, UsoSupport};
use crate::packet::socket::{FanoutHandle, PacketSocket, SocketOptions, VnetMode};
use crate::privileges;
use crate::relay::{self, InternalSocket};
use crate::virtio::config_space::NetConfigSpace;
use crate::virtio::features::{self, OfferOptions};

/// How often client mode retries while the frontend's socket is absent.
const CLIENT_RETRY: Duration = Duration::from_millis(200);

/// A configured daemon: interface and packet sockets open, vhost-user endpoint ready.
pub struct Daemon {
    config: Config,
    backend: NetBackend,
    /// The frontend's socket in server mode.
    listener: Option<UnixListener>,
    /// Where vhost-user-backend's request handler connects, behind the relay.
    internal: InternalSocket,
    /// Where `vhost-packet stats` asks for the counters.
    stats: Option<UnixListener>,
}

impl Daemon {
    /// Opens everything that can fail because of the user's input, so that errors surface
    /// before the daemon starts serving.
    pub fn new(config: Config) -> Result<Daemon, Error> {
        if let Some(cpus) = &config.cpu_affinity {
            affinity::check_available(cpus).map_err(Error::InvalidArgument)?;
        }
        let user = config
            .user
            .as_deref()
            .map(privileges::lookup_user)
            .transpose()
            .map_err(Error::Privileges)?;
        let socket_gid = config
            .socket_group
            .as_deref()
            .map(privileges::lookup_group)
            .transpose()
            .map_err(Error::Privileges)?;
        if let Endpoint::Server(path) = &config.endpoint {
            prepare_socket_path(path)?;
        }
        let iface = Interface::by_name(&config.interface)?;
        let iface_mtu = iface.mtu()?;
        let mtu = match config.mtu {
            Some(m) if u32::from(m) > iface_mtu => {
                return Err(Error::MtuAboveInterface {
                    mtu: m,
                    interface: config.interface.clone(),
                    interface_mtu: iface_mtu,
                })
            }
            Some(m) => m,
            None => iface_mtu.min(65535) as u16,
        };
        if !iface.is_up()? {
            warn!(
                "{} is down: serving anyway, traffic flows once it comes up",
                config.interface
            );
        }

        let opts = SocketOptions {
            qdisc_bypass: config.qdisc_bypass,
            promisc: config.promisc,
            guest_mac: config.mac.0,
            force_legacy_vnet_hdr: config.vnet_header == VnetHeaderMode::Legacy10,
        };
        let queue_pairs = usize::from(config.queue_pairs);
        if queue_pairs > 1 {
            if let Err(why) = fanout_ignores_outgoing() {
                warn!(
                    "{why}: PACKET_FANOUT_FLAG_IGNORE_OUTGOING may be ignored, and frames the host sends on {} reach the guest",
                    config.interface
                );
            }
        }
        let ids = EventIds::for_queue_count(2 * queue_pairs);
        let mut pairs = Vec::with_capacity(queue_pairs);
        // With several pairs their sockets form one fanout group, joined in pair order so that
        // member i is pair i (the steering program returns member indices).
        let mut group: Option<(u16, FanoutHandle)> = None;
        for i in 0..queue_pairs {
            let socket = PacketSocket::open(&iface, &opts)?;
            if i == 0 {
                match socket.vnet_mode() {
                    VnetMode::Native => info!("packet socket on {}: PACKET_VNET_HDR_SZ (10 or 12 bytes, as the guest negotiates)", config.interface),
                    VnetMode::Legacy10 => info!("packet socket on {}: 10-byte PACKET_VNET_HDR, num_buffers handled in userspace", config.interface),
                }
            }
            if queue_pairs > 1 {
                match &group {
                    None => {
                        let id = socket.join_fanout(None)?;
                        let handle = socket
                            .fanout_handle()
                            .map_err(|e| Error::QueueSetup { pair: i, source: e })?;
                        info!(
                            "{} queue pairs: fanout group {id} on {}",
                            queue_pairs, config.interface
                        );
                        group = Some((id, handle));
                    }
                    Some((id, _)) => {
                        socket.join_fanout(Some(*id))?;
                    }
                }
            }
            let policy = MacPolicy {
                guest_mac: config.mac.0,
                promisc: config.promisc,
                allow_spoofing: config.allow_mac_spoofing,
            };
            let pair = QueuePair::new(i, socket, ids, policy, config.busy_poll)
                .map_err(|e| Error::QueueSetup { pair: i, source: e })?;
            pairs.push(pair);
        }

        let uso = probe_uso();
        match &uso {
            UsoSupport::Supported(how) => info!("USO offered: {how}"),
            UsoSupport::Unsupported(why) => info!("USO not offered: {why}"),
        }
        let offered = features::offered(OfferOptions {
            uso: uso.is_supported(),
            mq: queue_pairs > 1,
        });
        let space = NetConfigSpace {
            mac: config.mac,
            max_virtqueue_pairs: config.queue_pairs,
            mtu,
        };
        let backend = NetBackend::new(
            pairs,
            group.map(|(_, handle)| handle),
            offered,
            config.queue_size,
            space,
            config.cpu_affinity.clone(),
        );

        let listener = match &config.endpoint {
            Endpoint::Server(path) => Some(bind_socket(path, &config, user.as_ref(), socket_gid)?),
            Endpoint::Client(_) => None,
            Endpoint::Inherited(s) => {
                // SAFETY: main made this endpoint from a descriptor nothing else owns, and
                // only this one Daemon is made from its configuration.
                let listener = unsafe { s.clone().into_listener() };
                Some(listener.map_err(Error::Internal)?)
            }
        };
        let stats = match config.endpoint.path().map(control::control_path) {
            Some(stats_path) => prepare_socket_path(&stats_path)
                .and_then(|()| bind_socket(&stats_path, &config, user.as_ref(), socket_gid)),
            None => Err(Error::InvalidArgument(format!(
                "{} has no path to put the stats socket next to",
                config.endpoint
            ))),
        };
        let stats = match stats {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("no live counters: {e}");
                None
            }
        };
        let internal = InternalSocket::new().map_err(Error::Internal)?;
        if let Some(user) = &user {
            // The request handler connects through this socket after the switch.
            for p in [internal.dir(), internal.path()] {
                std::os::unix::fs::chown(p, Some(user.uid), Some(user.gid))
                    .map_err(Error::Internal)?;
            }
            privileges::drop_to(user).map_err(Error::Privileges)?;
            info!(
                "running as {} (uid {}), no capabilities",
                user.name, user.uid
            );
        }
        info!(
            "serving {} for guest MAC {} (MTU {mtu}, {} queue pair{}, queue size {}, features {})",
            config.interface,
            config.mac,
            queue_pairs,
            if queue_pairs == 1 { "" } else { "s" },
            config.queue_size,
            features::describe(offered)
        );
        Ok(Daemon {
            config,
            backend,
            listener,
            internal,
            stats,
        })
    }

    pub fn backend(&self) -> &NetBackend {
        &self.backend
    }

    /// Files and directories to remove at exit, in order.
    pub fn paths_to_remove(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if let Endpoint::Server(p) = &self.config.endpoint {
            paths.push(p.clone());
        }
        if let (true, Some(p)) = (self.stats.is_some(), self.config.endpoint.path()) {
            paths.push(control::control_path(p));
        }
        paths.push(self.internal.path().to_path_buf());
        paths.push(self.internal.dir().to_path_buf());
        paths
    }

    /// Serves one frontend after another. Returns only on an error that retrying cannot fix.
    pub fn run(mut self) -> Result<(), Error> {
        if let Some(listener) = self.stats.take() {
            control::serve(
                listener,
                self.backend.clone(),
                self.config.interface.clone(),
                self.config.mac.to_string(),
            );
        }
        match self.config.endpoint.clone() {
            Endpoint::Server(_) | Endpoint::Inherited(_) => {
                let path = self.config.endpoint.to_string();
                info!("listening on {path}");
                loop {
                    let accepted = self
                        .listener
                        .as_ref()
                        .expect("server mode has a listener")
                        .accept();
                    match accepted {
                        Ok((stream, _)) => self.serve(stream)?,
                        Err(e) => {
                            warn!("accepting on {path}: {e}");
                            // Do not spin on a persistent error.
                            thread::sleep(CLIENT_RETRY);
                        }
                    }
                }
            }
            Endpoint::Client(path) => {
                let mut waiting_logged = false;
                loop {
                    match UnixStream::connect(&path) {
                        Ok(stream) => {
                            waiting_logged = false;
                            self.serve(stream)?;
                        }
                        Err(e) => {
                            if !waiting_logged {
                                info!(
                                    "waiting for a frontend to listen on {} ({e})",
                                    path.display()
                                );
                                waiting_logged = true;
                            }
                            thread::sleep(CLIENT_RETRY);
                        }
                    }
                }
            }
        }
    }

    /// One connection, start to end: the frontend talks to vhost-user-backend's request handler
    /// through the relay.
    fn serve(&mut self, frontend: UnixStream) -> Result<(), Error> {
        let mut daemon = VhostUserDaemon::new(
            "vhost-packet".to_string(),
            self.backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(Error::Daemon)?;
        // The workers exist from here on; give the pairs their epoll handlers before any
        // message arrives, so that a ring enabled early can start polling at once.
        self.backend.attach(&daemon.get_epoll_handlers());
        let internal_path = self.internal.path().to_string_lossy().into_owned();
        let handler_side = match daemon.start_client(&internal_path) {
            Ok(()) => self.internal.accept().map_err(Error::Internal)?,
            Err(e) => {
                warn!("starting the vhost-user request handler: {e}");
                self.backend.detach();
                return Ok(());
            }
        };
        let rings = self.backend.clone();
        let relay = thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || relay::relay(frontend, handler_side, &rings))
            .map_err(Error::Internal)?;
        info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        match relay.join() {
            Ok(Err(e)) => debug!("relay ended: {e}"),
            Err(_) => warn!("the vhost-user relay panicked"),
            Ok(Ok(())) => {}
        }
        self.backend.detach();
        self.backend.log_stats("connection closed");
        // Dropping the daemon ends and joins this connection's workers.
        drop(daemon);
        Ok(())
    }
}

/// Binds a UNIX socket never more open than `--socket-mode`, then gives it its owner and group.
fn bind_socket(
    path: &Path,
    config: &Config,
    user: Option<&privileges::User>,
    gid: Option<u32>,
) -> Result<UnixListener, Error> {
    let listener = privileges::with_umask(config.socket_mode, || UnixListener::bind(path))
        .map_err(|e| Error::SocketPath {
            path: path.to_path_buf(),
            source: e,
        })?;
    privileges::set_socket_permissions(path, config.socket_mode, user.map(|u| u.uid), gid)
        .map_err(Error::Privileges)?;
    Ok(listener)
}

/// Refuses a socket path a live backend serves or whose directory is missing; removes a stale
/// socket left by a crashed process.
fn prepare_socket_path(path: &Path) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::SocketDirectoryMissing(path.to_path_buf()));
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::SocketPath {
            path: path.to_path_buf(),
            source: e,
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_path_buf()));
            }
            info!("removing stale socket {}", path.display());
            fs::remove_file(path).map_err(|e| Error::SocketPath {
                path: path.to_path_buf(),
                source: e,
            })
        }
        Ok(_) => Err(Error::SocketPath {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
        }),
    }
}
