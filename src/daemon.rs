//! Serve frontends one connection after another, forever, keeping the packet sockets.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
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
use crate::datapath::{EventIds, GuestMac, MacPolicy, QueuePair};
use crate::error::Error;
use crate::packet::fanout::FanoutHandle;
use crate::packet::interface::{Interface, LinkChanges};
use crate::packet::probe::{fanout_ignores_outgoing, probe_uso, UsoSupport};
use crate::packet::socket::{PacketSocket, SocketOptions, VnetMode};
use crate::privileges;
use crate::relay::{self, InternalSocket};
use crate::virtio::config_space::NetConfigSpace;
use crate::virtio::features::{self, OfferOptions};

/// How often client mode retries while the frontend's socket is absent.
const CLIENT_RETRY: Duration = Duration::from_millis(200);

/// How often the interface is looked at when netlink reports no change (its messages can be
/// lost when the socket is full): the bound on noticing that it disappeared.
const LINK_CHECK: Duration = Duration::from_secs(1);

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
    /// The interface and its MTU at start, followed while serving (see `InterfaceWatch`).
    iface: Interface,
    iface_mtu: u32,
    /// Taken by the watch when serving starts.
    links: Option<LinkChanges>,
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
        // Subscribed before the MTU is read, so that no change goes unseen.
        let links = LinkChanges::open().map_err(|source| Error::WatchInterface {
            interface: config.interface.clone(),
            source,
        })?;
        let iface_mtu = iface.mtu()?;
        if let Some(m) = config.mtu.filter(|&m| u32::from(m) > iface_mtu) {
            return Err(Error::MtuAboveInterface {
                mtu: m,
                interface: config.interface.clone(),
                interface_mtu: iface_mtu,
            });
        }
        let mtu = offered_mtu(config.mtu, iface_mtu);
        if !iface.is_up()? {
            warn!(
                "{} is down: serving anyway, traffic flows once it comes up",
                config.interface
            );
        }

        let opts = SocketOptions {
            qdisc_bypass: config.qdisc_bypass,
            promisc: config.promisc,
            // The device's `GuestMac` adds the membership (and moves it when the MAC changes).
            guest_mac: [0; 6],
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
        let mut sockets = Vec::with_capacity(queue_pairs);
        // With several pairs their sockets form one fanout group, joined in pair order so that
        // member i is pair i (the steering program returns member indices).
        let mut group: Option<(u16, FanoutHandle)> = None;
        for i in 0..queue_pairs {
            let socket = Arc::new(PacketSocket::open(&iface, &opts)?);
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
            sockets.push(socket);
        }
        let policy = MacPolicy {
            guest_mac: config.mac.map(|m| m.0),
            promisc: config.promisc,
            allow_spoofing: config.allow_mac_spoofing,
        };
        let guest_mac = Arc::new(GuestMac::new(policy, sockets.clone())?);
        let mut pairs = Vec::with_capacity(queue_pairs);
        for (i, socket) in sockets.into_iter().enumerate() {
            let pair = QueuePair::new(i, socket, ids, guest_mac.clone(), config.busy_poll)
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
            mac: config.config_mac(),
            max_virtqueue_pairs: config.queue_pairs,
            mtu,
        };
        let backend = NetBackend::new(
            pairs,
            group.map(|(_, handle)| handle),
            guest_mac,
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
        let whose = match config.mac {
            Some(mac) => format!("guest MAC {mac}"),
            None => "the guest MAC it learns from the guest's first frame".to_owned(),
        };
        info!(
            "serving {} for {whose} (MTU {mtu}, {} queue pair{}, queue size {}, features {})",
            config.interface,
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
            iface,
            iface_mtu,
            links: Some(links),
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

    /// Serves one frontend after another. Returns only on an error that retrying cannot fix:
    /// one of the serving thread's, or the interface disappearing.
    pub fn run(mut self) -> Result<(), Error> {
        if let Some(listener) = self.stats.take() {
            control::serve(
                listener,
                self.backend.clone(),
                self.config.interface.clone(),
            );
        }
        let (fatal, failed) = mpsc::channel();
        let watch = InterfaceWatch {
            links: self.links.take().expect("run takes the link changes once"),
            iface: self.iface.clone(),
            mtu: self.iface_mtu,
            wanted_mtu: self.config.mtu,
            backend: self.backend.clone(),
        };
        spawn_essential("interface watch", fatal.clone(), move || Err(watch.run()))?;
        spawn_essential("vhost-user accept", fatal, move || self.serve_forever())?;
        // Both threads send before they end; a closed channel cannot happen.
        failed.recv().unwrap_or(Ok(()))
    }

    fn serve_forever(mut self) -> Result<(), Error> {
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
            Ok(()) => {
                self.backend.connected(daemon.shutdown_handle());
                self.internal.accept().map_err(Error::Internal)?
            }
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
        let waited = daemon.wait();
        match waited {
            // A worker failed and said so; the frontend sees a disconnection.
            _ if self.backend.disconnected() => {
                info!("connection ended after a worker failure, waiting for the frontend to reconnect")
            }
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

/// The MTU the guest is offered: the interface's, or `--mtu` while the interface carries it.
fn offered_mtu(wanted: Option<u16>, interface_mtu: u32) -> u16 {
    let carried = interface_mtu.min(u32::from(u16::MAX)) as u16;
    wanted.map_or(carried, |m| m.min(carried))
}

/// Starts a thread whose end ends the daemon: its result goes to `fatal`, for `run` to return.
/// A panic (which the panic hook has reported) ends the process, as one on the main thread
/// would: a daemon that no longer serves must not stay up.
fn spawn_essential(
    what: &'static str,
    fatal: mpsc::Sender<Result<(), Error>>,
    body: impl FnOnce() -> Result<(), Error> + Send + 'static,
) -> Result<(), Error> {
    thread::Builder::new()
        .name(what.into())
        .spawn(
            move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                Ok(result) => {
                    let _ = fatal.send(result);
                }
                Err(_) => std::process::exit(101),
            },
        )
        .map(drop)
        .map_err(|source| Error::Thread { what, source })
}

/// Follows the interface while the daemon serves. Deleted (`ip link del`, a VF reset, moved to
/// another namespace): the packet sockets are unhooked for good and, once privileges are
/// dropped, cannot be reopened, so the daemon exits and the service manager starts a new one.
/// Its MTU changed: said in one warning line, and offered to the next connection (a guest reads
/// the MTU only when it probes the device; see docs/architecture.md).
struct InterfaceWatch {
    links: LinkChanges,
    iface: Interface,
    /// The interface MTU last seen.
    mtu: u32,
    wanted_mtu: Option<u16>,
    backend: NetBackend,
}

impl InterfaceWatch {
    /// Returns when the interface is gone: the error to exit with.
    fn run(mut self) -> Error {
        let mut warned = false;
        loop {
            if let Err(e) = self.links.wait(LINK_CHECK) {
                if !std::mem::replace(&mut warned, true) {
                    warn!(
                        "watching link changes of {}: {e}; looking every {LINK_CHECK:?} instead",
                        self.iface.name()
                    );
                }
                thread::sleep(LINK_CHECK);
            }
            let now = match Interface::by_index(self.iface.index()) {
                Ok(Some(now)) => now,
                Ok(None) => {
                    return Error::InterfaceGone {
                        interface: self.iface.name().to_owned(),
                        ifindex: self.iface.index(),
                    }
                }
                Err(e) => {
                    debug!("looking at {}: {e}", self.iface.name());
                    continue;
                }
            };
            // An error here is the interface going away meanwhile: seen at the next look.
            if let Ok(mtu) = now.mtu() {
                self.mtu_now(mtu);
            }
        }
    }

    fn mtu_now(&mut self, mtu: u32) {
        if mtu == self.mtu {
            return;
        }
        let offered = offered_mtu(self.wanted_mtu, mtu);
        self.backend.set_offered_mtu(offered);
        let drops = if mtu < self.mtu {
            format!(", and what it sends above {mtu} is dropped (counted in tx drops oversize)")
        } else {
            String::new()
        };
        warn!(
            "MTU of {} changed from {} to {mtu}: a connected guest keeps the MTU it was offered until it reconnects{drops}; the next connection is offered {offered}",
            self.iface.name(),
            self.mtu
        );
        self.mtu = mtu;
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

#[cfg(test)]
mod tests {
    use super::offered_mtu;

    #[test]
    fn the_offered_mtu_is_the_interface_one_or_mtu_while_the_interface_carries_it() {
        assert_eq!(offered_mtu(None, 1500), 1500);
        assert_eq!(offered_mtu(None, 70000), 65535);
        assert_eq!(offered_mtu(Some(1400), 1500), 1400);
        assert_eq!(offered_mtu(Some(1400), 1300), 1300);
        assert_eq!(offered_mtu(Some(9000), 65536), 9000);
    }
}
