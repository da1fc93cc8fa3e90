//! A vhost-user relay between the frontend and vhost-user-backend's request handler.
//!
//! QEMU's virtio-net sends `SET_VRING_ENABLE` when it resets the device, before the guest driver
//! has negotiated and so before `SET_FEATURES`. vhost 0.18's request handler refuses
//! `SET_VRING_ENABLE` until PROTOCOL_FEATURES is acked, and a refused message ends the session:
//! QEMU could never stay connected. The relay passes every message and file descriptor through
//! unchanged, except `SET_VRING_ENABLE`:
//!
//! - an early one is acknowledged by the relay itself when asked to, and the last requested
//!   state of each ring is replayed right after the `SET_FEATURES` that acks PROTOCOL_FEATURES;
//! - every requested state goes to the backend ([`RingSwitch`]) before the handler sees the
//!   message, and the handler is always told to *enable* the ring. vhost-user-backend stops
//!   listening to the kicks of a disabled ring, but the spec wants a started, disabled ring
//!   processed: "the back-end must not supply any new RX packets, but must process and discard
//!   any TX packets". So the crate's flag only means "the frontend has spoken about this ring"
//!   and the backend keeps the real state.
//!
//! Only control messages pass here; guest memory and eventfds are handed on as descriptors,
//! never copied.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use log::debug;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (all u32, little-endian).
const HEADER_LEN: usize = 12;
/// Largest payload vhost 0.18 accepts.
const MAX_PAYLOAD: usize = 0x1000;
/// Most descriptors one message carries (vhost's `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_NUM: u32 = 8;
const REQ_SET_VRING_KICK: u32 = 12;
const REQ_SET_VRING_ERR: u32 = 14;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// One vhost-user message with the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn field(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.header[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    /// The `i`-th little-endian u32 of the payload.
    fn field_at(&self, i: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.payload.get(4 * i..4 * i + 4)?.try_into().ok()?,
        ))
    }

    fn u64_payload(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.payload.get(..8)?.try_into().ok()?))
    }

    fn new(request: u32, flags: u32, payload: Vec<u8>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Message {
            header,
            payload,
            fds: Vec::new(),
        }
    }

    /// Reads one message; `None` at a clean end of stream.
    fn read(stream: &UnixStream) -> io::Result<Option<Message>> {
        let mut header = [0u8; HEADER_LEN];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        }];
        // SAFETY: the iovec points at `header`, writable for HEADER_LEN bytes and alive for the
        // call. The descriptors it returns are owned below.
        let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let fds: Vec<OwnedFd> = raw_fds[..nfds]
            .iter()
            // SAFETY: recvmsg just installed these descriptors in our table; nothing else owns
            // them.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Ok(None);
        }
        // A header split across reads: the rest carries no descriptors.
        let mut reader = stream;
        reader.read_exact(&mut header[n..])?;
        let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message of {size} bytes exceeds {MAX_PAYLOAD}"),
            ));
        }
        let mut payload = vec![0u8; size];
        reader.read_exact(&mut payload)?;
        Ok(Some(Message {
            header,
            payload,
            fds,
        }))
    }

    fn write(&self, stream: &UnixStream) -> io::Result<()> {
        let fds: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        // The descriptors travel with the header; the payload follows.
        let header: &[u8] = &self.header;
        let sent = stream
            .send_with_fds(&[header], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let mut writer = stream;
        writer.write_all(&self.header[sent..])?;
        writer.write_all(&self.payload)
    }
}

/// Where the relay reports the ring states the frontend asks for.
pub trait RingSwitch: Send {
    /// How many rings the device has; requests for others go to the handler, which refuses
    /// them.
    fn ring_count(&self) -> u32;
    /// The frontend enabled or disabled ring `index` (< `ring_count`).
    fn set_ring_enabled(&self, index: u32, enabled: bool);
}

/// The private socket the request handler connects to, one hop behind the relay.
pub struct InternalSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl InternalSocket {
    /// Listens in a new directory only this user can enter, so no other process can take the
    /// handler's place.
    pub fn new() -> io::Result<InternalSocket> {
        remove_stale_dirs(&std::env::temp_dir());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("vhost-packet-{}-{nanos:08x}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let path = dir.join("handler.sock");
        let listener = UnixListener::bind(&path)?;
        Ok(InternalSocket {
            dir,
            path,
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection the handler just made (it connects, then we accept).
    pub fn accept(&self) -> io::Result<UnixStream> {
        Ok(self.listener.accept()?.0)
    }

    /// The directory to remove at exit.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Removes the directories of earlier instances that were killed before they could clean up
/// (named `vhost-packet-<pid>-<suffix>`, for a pid that no longer runs).
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("vhost-packet-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let dir = entry.path();
        let _ = fs::remove_file(dir.join("handler.sock"));
        let _ = fs::remove_dir(&dir);
    }
}

impl Drop for InternalSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Relays one connection until either side closes, then closes the other.
pub fn relay(frontend: UnixStream, handler: UnixStream, rings: &dyn RingSwitch) -> io::Result<()> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let handler_reader = handler.try_clone()?;
    let replies = {
        let to_frontend = Arc::clone(&to_frontend);
        let frontend = frontend.try_clone()?;
        let handler = handler.try_clone()?;
        thread::Builder::new()
            .name("vhost-user-replies".into())
            .spawn(move || {
                // Handler to frontend: replies, passed on whole.
                while let Ok(Some(msg)) = Message::read(&handler_reader) {
                    let out = to_frontend.lock().unwrap_or_else(|p| p.into_inner());
                    if msg.write(&out).is_err() {
                        break;
                    }
                }
                let _ = frontend.shutdown(Shutdown::Both);
                let _ = handler.shutdown(Shutdown::Both);
            })?
    };
    let result = forward_requests(&frontend, &handler, &to_frontend, rings);
    let _ = handler.shutdown(Shutdown::Both);
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = replies.join();
    result
}

/// A `SET_VRING_ENABLE` for the handler: always "enable" (see the module documentation).
fn enable_for_handler(index: u32, flags: u32) -> Message {
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend_from_slice(&1u32.to_le_bytes());
    Message::new(REQ_SET_VRING_ENABLE, flags, payload)
}

/// Frontend to handler: requests, with early SET_VRING_ENABLE held back until SET_FEATURES.
fn forward_requests(
    frontend: &UnixStream,
    handler: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    rings: &dyn RingSwitch,
) -> io::Result<()> {
    let mut protocol_acked = false;
    // Ring index -> last requested state, in ring order for the replay.
    let mut held: BTreeMap<u32, u32> = BTreeMap::new();
    let count = rings.ring_count();
    let mut warned_beyond = false;
    while let Some(msg) = Message::read(frontend)? {
        log::trace!(
            "vhost-user request {} flags {:#x}",
            msg.request(),
            msg.flags()
        );
        let request = msg.request();
        if (REQ_SET_VRING_NUM..=REQ_SET_VRING_ERR).contains(&request)
            || request == REQ_SET_VRING_ENABLE
        {
            // Every ring message starts with the index (the low byte for KICK/CALL/ERR).
            let index = msg.field_at(0).map(|v| {
                if (REQ_SET_VRING_KICK..=REQ_SET_VRING_ERR).contains(&request) {
                    v & 0xff
                } else {
                    v
                }
            });
            if let Some(index) = index.filter(|&i| i >= count && !warned_beyond) {
                warned_beyond = true;
                log::warn!(
                    "the frontend addresses ring {index}, but this device has {count} rings ({} queue pairs, --queues): it asks for more queues than served",
                    count / 2
                );
            }
        }
        match request {
            REQ_SET_VRING_ENABLE if !protocol_acked && msg.payload.len() >= 8 => {
                let index = u32::from_le_bytes(msg.payload[0..4].try_into().expect("4 bytes"));
                let state = u32::from_le_bytes(msg.payload[4..8].try_into().expect("4 bytes"));
                debug!("holding SET_VRING_ENABLE({index}, {state}) until SET_FEATURES");
                held.insert(index, state);
                if msg.flags() & FLAG_NEED_REPLY != 0 {
                    let ack = Message::new(
                        REQ_SET_VRING_ENABLE,
                        FLAG_VERSION | FLAG_REPLY,
                        0u64.to_le_bytes().to_vec(),
                    );
                    ack.write(&to_frontend.lock().unwrap_or_else(|p| p.into_inner()))?;
                }
            }
            REQ_SET_VRING_ENABLE if msg.payload.len() >= 8 => {
                let index = u32::from_le_bytes(msg.payload[0..4].try_into().expect("4 bytes"));
                let state = u32::from_le_bytes(msg.payload[4..8].try_into().expect("4 bytes"));
                if index < count {
                    // Before the handler answers, so that a frontend waiting for the reply
                    // finds the backend already following the new state.
                    rings.set_ring_enabled(index, state != 0);
                    enable_for_handler(index, msg.flags()).write(handler)?;
                } else {
                    msg.write(handler)?;
                }
            }
            REQ_SET_FEATURES => {
                let acks_protocol = msg.u64_payload().unwrap_or(0) & PROTOCOL_FEATURES != 0;
                msg.write(handler)?;
                if acks_protocol && !protocol_acked {
                    protocol_acked = true;
                    for (index, state) in std::mem::take(&mut held) {
                        if index < count {
                            rings.set_ring_enabled(index, state != 0);
                        }
                        // No NEED_REPLY: the frontend was already answered.
                        enable_for_handler(index, FLAG_VERSION).write(handler)?;
                    }
                }
            }
            _ => msg.write(handler)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    /// Records what the relay reports, for a device of `rings` rings.
    struct Recorder {
        rings: u32,
        calls: Record,
    }

    impl RingSwitch for Recorder {
        fn ring_count(&self) -> u32 {
            self.rings
        }

        fn set_ring_enabled(&self, index: u32, enabled: bool) {
            self.calls.lock().unwrap().push((index, enabled));
        }
    }

    type Record = Arc<Mutex<Vec<(u32, bool)>>>;

    /// Runs the relay on its own thread; returns it and the switch's record.
    fn spawn_relay(
        front: UnixStream,
        back: UnixStream,
    ) -> (thread::JoinHandle<io::Result<()>>, Record) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder {
            rings: 4,
            calls: Arc::clone(&calls),
        };
        (thread::spawn(move || relay(front, back, &rec)), calls)
    }

    fn enable(index: u32, state: u32, flags: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&state.to_le_bytes());
        Message::new(REQ_SET_VRING_ENABLE, flags, p)
    }

    #[test]
    fn early_vring_enable_is_acked_held_and_replayed_after_set_features() {
        let (qemu, relay_front) = pair();
        let (relay_back, handler) = pair();
        let (t, calls) = spawn_relay(relay_front, relay_back);

        // Early enables, one asking for a reply; then a message with a descriptor.
        enable(0, 1, FLAG_VERSION | FLAG_NEED_REPLY)
            .write(&qemu)
            .unwrap();
        let ack = Message::read(&qemu).unwrap().unwrap();
        assert_eq!(
            (ack.request(), ack.flags()),
            (REQ_SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY)
        );
        assert_eq!(ack.u64_payload(), Some(0));
        enable(1, 1, FLAG_VERSION).write(&qemu).unwrap();
        enable(0, 0, FLAG_VERSION).write(&qemu).unwrap();
        let (file, _) = UnixStream::pair().unwrap();
        let mut with_fd = Message::new(13, FLAG_VERSION, 0u64.to_le_bytes().to_vec());
        with_fd.fds.push(OwnedFd::from(file));
        with_fd.write(&qemu).unwrap();
        let got = Message::read(&handler).unwrap().unwrap();
        assert_eq!(
            (got.request(), got.fds.len()),
            (13, 1),
            "passed through with its descriptor"
        );

        assert!(calls.lock().unwrap().is_empty(), "nothing reported early");

        // SET_FEATURES with PROTOCOL_FEATURES: forwarded, then the held states in ring order:
        // reported to the switch, and the handler told to enable each ring.
        Message::new(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            (PROTOCOL_FEATURES | 1).to_le_bytes().to_vec(),
        )
        .write(&qemu)
        .unwrap();
        let got = Message::read(&handler).unwrap().unwrap();
        assert_eq!(got.request(), REQ_SET_FEATURES);
        for index in [0u32, 1] {
            let got = Message::read(&handler).unwrap().unwrap();
            assert_eq!(
                (got.request(), got.flags()),
                (REQ_SET_VRING_ENABLE, FLAG_VERSION)
            );
            assert_eq!(got.payload[..4], index.to_le_bytes());
            assert_eq!(got.payload[4..8], 1u32.to_le_bytes());
        }
        assert_eq!(*calls.lock().unwrap(), [(0, false), (1, true)]);

        // Later requests are reported before the handler gets them, as "enable", with the
        // frontend's flags; replies flow back.
        enable(1, 0, FLAG_VERSION | FLAG_NEED_REPLY)
            .write(&qemu)
            .unwrap();
        let got = Message::read(&handler).unwrap().unwrap();
        assert_eq!(got.flags(), FLAG_VERSION | FLAG_NEED_REPLY);
        assert_eq!(got.payload[..8], [1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(calls.lock().unwrap().last(), Some(&(1, false)));
        // A ring the device does not have passes unchanged, for the handler to refuse.
        enable(7, 0, FLAG_VERSION).write(&qemu).unwrap();
        let got = Message::read(&handler).unwrap().unwrap();
        assert_eq!(got.payload[..8], [7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(calls.lock().unwrap().len(), 3, "not reported");
        Message::new(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_REPLY,
            1u64.to_le_bytes().to_vec(),
        )
        .write(&handler)
        .unwrap();
        assert_eq!(
            Message::read(&qemu).unwrap().unwrap().u64_payload(),
            Some(1)
        );

        // The frontend leaves: the handler sees the end of the stream, the relay returns.
        drop(qemu);
        assert!(Message::read(&handler).unwrap().is_none());
        t.join().unwrap().unwrap();
    }

    #[test]
    fn stale_directories_of_dead_processes_are_removed() {
        let tmp = std::env::temp_dir().join(format!("vp-stale-test-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        // PIDs are below 2^22 on Linux: this one cannot run.
        let dead = tmp.join("vhost-packet-4294967-0000beef");
        let alive = tmp.join(format!("vhost-packet-{}-0000cafe", std::process::id()));
        let other = tmp.join("vhost-packet-notapid");
        for d in [&dead, &alive, &other] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(dead.join("handler.sock"), b"").unwrap();
        remove_stale_dirs(&tmp);
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists());
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn oversized_message_ends_the_relay() {
        let (qemu, relay_front) = pair();
        let (relay_back, handler) = pair();
        let (t, _) = spawn_relay(relay_front, relay_back);
        let mut m = Message::new(1, FLAG_VERSION, Vec::new());
        m.header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        m.write(&qemu).unwrap();
        assert!(t.join().unwrap().is_err());
        assert!(
            Message::read(&handler).unwrap().is_none(),
            "the handler side is closed"
        );
    }
}
