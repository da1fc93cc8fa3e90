//! A vhost-user relay between the frontend and vhost-user-backend's request handler.
//!
//! QEMU's virtio-net sends `SET_VRING_ENABLE` when it resets the device, before the guest driver
//! has negotiated and so before `SET_FEATURES`. vhost 0.18's request handler refuses
//! `SET_VRING_ENABLE` until PROTOCOL_FEATURES is acked, and a refused message ends the session:
//! QEMU could never stay connected. The relay passes every message and file descriptor through
//! unchanged, except these:
//!
//! - `SET_VRING_ENABLE`: an early one is acknowledged by the relay itself when asked to, and
//!   the last requested state of each ring is replayed right after the `SET_FEATURES` that
//!   acks PROTOCOL_FEATURES. Every requested state goes to the backend ([`RingSwitch`]) before
//!   the handler sees the message, and the handler is always told to *enable* the ring.
//!   vhost-user-backend stops listening to the kicks of a disabled ring, but the spec wants a
//!   started, disabled ring processed: "the back-end must not supply any new RX packets, but
//!   must process and discard any TX packets". So the crate's flag only means "the frontend
//!   has spoken about this ring" and the backend keeps the real state.
//! - `RESET_OWNER`: the handler forgets the acked features; the relay forgets that
//!   PROTOCOL_FEATURES was acked, and the backend its features and ring states.
//! - A request for a ring the device does not have, and a `SET_VRING_NUM` that is not a power
//!   of two up to `--queue-size`, are refused by the relay (see `refuse`): the handler would
//!   end the session on the first, and accept the second for virtio-queue to ignore.
//! - `ADD_MEM_REG` of a region already added, and `REM_MEM_REG` of a region added more often
//!   than removed, are answered by the relay: QEMU before 8.0 sends both once per queue pair.
//!
//! Only control messages pass here; guest memory and eventfds are handed on as descriptors,
//! never copied.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use log::{debug, warn};
use vhost::vhost_user::message::{
    self, FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures, VhostUserVringState,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (all u32, little-endian). vhost 0.18
/// keeps its `VhostUserMsgHeader` crate-private, so the layout is spelled out here.
const HEADER_LEN: usize = 12;
/// Largest payload vhost 0.18 accepts.
const MAX_PAYLOAD: usize = message::MAX_MSG_SIZE;
/// Most descriptors one message carries.
const MAX_FDS: usize = message::MAX_ATTACHED_FD_ENTRIES;

// The request codes the relay looks at, as they travel in the header.
const REQ_SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
const REQ_RESET_OWNER: u32 = FrontendReq::RESET_OWNER as u32;
const REQ_SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const REQ_SET_VRING_NUM: u32 = FrontendReq::SET_VRING_NUM as u32;
const REQ_GET_VRING_BASE: u32 = FrontendReq::GET_VRING_BASE as u32;
const REQ_SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
const REQ_SET_VRING_ERR: u32 = FrontendReq::SET_VRING_ERR as u32;
const REQ_SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
const REQ_ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
const REQ_REM_MEM_REG: u32 = FrontendReq::REM_MEM_REG as u32;
const REQ_SEND_RARP: u32 = FrontendReq::SEND_RARP as u32;
/// Protocol version 1, in the header's VERSION bits (the only version there is).
const FLAG_VERSION: u32 = 0x1 & VhostUserHeaderFlag::VERSION.bits();
const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

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

    /// The (index, num) of a ring-state payload, read through vhost's own type.
    fn vring_state(&self) -> Option<(u32, u32)> {
        let size = std::mem::size_of::<VhostUserVringState>();
        let state = VhostUserVringState::from_slice(self.payload.get(..size)?)?;
        Some((state.index, state.num))
    }

    /// SEND_RARP's payload: a MAC in the low six bytes of a u64, nothing else.
    fn mac_payload(&self) -> Option<[u8; 6]> {
        let bytes: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        (bytes[6..] == [0, 0]).then(|| bytes[..6].try_into().expect("six bytes"))
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

/// Where the relay reports the ring states the frontend asks for, and learns the device's
/// limits.
pub trait RingSwitch: Send {
    /// How many rings the device has; the relay refuses requests for others.
    fn ring_count(&self) -> u32;
    /// `--queue-size`: the largest ring; the relay refuses larger ones and sizes that are not
    /// a power of two.
    fn queue_size_limit(&self) -> u32;
    /// The frontend enabled or disabled ring `index` (< `ring_count`).
    fn set_ring_enabled(&self, index: u32, enabled: bool);
    /// RESET_OWNER: forget the acked features and every ring's state, as the handler forgets
    /// its acked features.
    fn reset(&self);
    /// SEND_RARP (after a migration): announce the guest's MAC on the host's network.
    fn announce(&self, mac: [u8; 6]);
}

/// The private socket the request handler connects to, one hop behind the relay.
pub struct InternalSocket {
    dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
}

impl InternalSocket {
    /// Listens in a new directory only this user can enter, so no other process can take the
    /// handler's place. Only this process's own directory is ever removed (at drop, and by the
    /// daemon's exit cleanup): a PID seen from here says nothing about an instance in another
    /// PID namespace sharing $TMPDIR, so a directory left by a killed instance stays.
    pub fn new() -> io::Result<InternalSocket> {
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

/// Answers `msg` in the handler's place, if the frontend asked for a reply: 0 is success.
fn answer(msg: &Message, value: u64, to_frontend: &Mutex<UnixStream>) -> io::Result<()> {
    if msg.flags() & FLAG_NEED_REPLY == 0 {
        return Ok(());
    }
    let reply = Message::new(
        msg.request(),
        FLAG_VERSION | FLAG_REPLY,
        value.to_le_bytes().to_vec(),
    );
    reply.write(&to_frontend.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Refuses a request the handler must not see (it would end the session, or accept what the
/// queue then ignores). A frontend waiting for a reply gets a failure and the connection
/// stays. One that waits for none could not tell and would drive a device other than the one
/// it set up, so the connection ends, with the reason in the log.
fn refuse(msg: &Message, why: &str, to_frontend: &Mutex<UnixStream>) -> io::Result<()> {
    // GET_VRING_BASE's reply is a ring state, which has no way to say "refused".
    if msg.flags() & FLAG_NEED_REPLY != 0 && msg.request() != REQ_GET_VRING_BASE {
        warn!("{why}: refused");
        return answer(msg, 1, to_frontend);
    }
    warn!("{why}: ending the connection, since the frontend waits for no reply");
    Err(io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()))
}

/// The ring a ring request is about: the payload's first u32 (its low byte for KICK, CALL and
/// ERR, whose other bits are flags).
fn ring_index(msg: &Message) -> Option<u32> {
    let request = msg.request();
    let is_ring = (REQ_SET_VRING_NUM..=REQ_SET_VRING_ERR).contains(&request)
        || request == REQ_SET_VRING_ENABLE;
    let v = msg.field_at(0).filter(|_| is_ring)?;
    Some(
        if (REQ_SET_VRING_KICK..=REQ_SET_VRING_ERR).contains(&request) {
            v & 0xff
        } else {
            v
        },
    )
}

/// One region of an `ADD_MEM_REG`/`REM_MEM_REG` payload: (GPA, size) and where it comes from
/// (frontend address, offset, file).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Region {
    gpa: u64,
    size: u64,
    user_addr: u64,
    mmap_offset: u64,
    /// (st_dev, st_ino) of the file that came with ADD_MEM_REG.
    file: Option<(u64, u64)>,
}

impl Region {
    /// The payload is a u64 of padding, then GPA, size, frontend address and offset.
    fn of(msg: &Message) -> Option<Region> {
        let u64_at = |i: usize| {
            Some(u64::from_le_bytes(
                msg.payload.get(8 * i..8 * i + 8)?.try_into().ok()?,
            ))
        };
        let file = msg.fds.first().and_then(|fd| {
            let meta = fs::File::from(fd.try_clone().ok()?).metadata().ok()?;
            Some((meta.dev(), meta.ino()))
        });
        Some(Region {
            gpa: u64_at(1)?,
            size: u64_at(2)?,
            user_addr: u64_at(3)?,
            mmap_offset: u64_at(4)?,
            file,
        })
    }
}

/// What the relay remembers of one connection.
#[derive(Default)]
struct Session {
    /// PROTOCOL_FEATURES is acked (RESET_OWNER makes the handler forget it, and us too).
    protocol_acked: bool,
    /// Ring index -> last requested state, in ring order for the replay.
    held: BTreeMap<u32, u32>,
    /// Regions added with ADD_MEM_REG, by (GPA, size), with how many adds are not yet
    /// matched by a REM_MEM_REG. QEMU before 8.0 drives each queue pair as a vhost device of
    /// its own on the one connection, and each adds and removes every region; the handler
    /// must see the first add and the last remove only (a second add overlaps, a second
    /// remove finds nothing, and either would end the session).
    regions: BTreeMap<(u64, u64), (Region, u32)>,
}

/// Frontend to handler: requests, with early SET_VRING_ENABLE held back until SET_FEATURES.
fn forward_requests(
    frontend: &UnixStream,
    handler: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    rings: &dyn RingSwitch,
) -> io::Result<()> {
    let mut session = Session::default();
    let count = rings.ring_count();
    let pairs = count / 2;
    let max_size = rings.queue_size_limit();
    while let Some(msg) = Message::read(frontend)? {
        log::trace!(
            "vhost-user request {} flags {:#x}",
            msg.request(),
            msg.flags()
        );
        let request = msg.request();
        if let Some(index) = ring_index(&msg).filter(|&i| i >= count) {
            let why = format!(
                "the frontend addresses ring {index}, but this device has {count} rings ({pairs} queue pairs, --queues {pairs})"
            );
            refuse(&msg, &why, to_frontend)?;
            continue;
        }
        match request {
            REQ_SET_VRING_NUM => {
                let num = msg.field_at(1).unwrap_or(0);
                if num == 0 || !num.is_power_of_two() || num > max_size {
                    let why = format!(
                        "the frontend asks for a queue of {num} descriptors, but sizes must be a power of two up to --queue-size {max_size}"
                    );
                    refuse(&msg, &why, to_frontend)?;
                } else {
                    msg.write(handler)?;
                }
            }
            REQ_SET_VRING_ENABLE if !session.protocol_acked && msg.vring_state().is_some() => {
                let (index, state) = msg.vring_state().expect("checked by the guard");
                debug!("holding SET_VRING_ENABLE({index}, {state}) until SET_FEATURES");
                session.held.insert(index, state);
                answer(&msg, 0, to_frontend)?;
            }
            REQ_SET_VRING_ENABLE if msg.vring_state().is_some() => {
                let (index, state) = msg.vring_state().expect("checked by the guard");
                // Before the handler answers, so that a frontend waiting for the reply finds
                // the backend already following the new state.
                rings.set_ring_enabled(index, state != 0);
                enable_for_handler(index, msg.flags()).write(handler)?;
            }
            REQ_SET_FEATURES => {
                let acks_protocol = msg.u64_payload().unwrap_or(0) & PROTOCOL_FEATURES != 0;
                msg.write(handler)?;
                if acks_protocol && !session.protocol_acked {
                    session.protocol_acked = true;
                    for (index, state) in std::mem::take(&mut session.held) {
                        rings.set_ring_enabled(index, state != 0);
                        // No NEED_REPLY: the frontend was already answered.
                        enable_for_handler(index, FLAG_VERSION).write(handler)?;
                    }
                }
            }
            REQ_RESET_OWNER => {
                // The handler forgets the acked features, PROTOCOL_FEATURES among them: so do
                // we, and the backend its features and ring states, before the handler can
                // answer.
                session.protocol_acked = false;
                session.held.clear();
                rings.reset();
                msg.write(handler)?;
            }
            // vhost 0.18's handler has no case for it and would end the session.
            REQ_SEND_RARP => match msg.mac_payload() {
                Some(mac) if session.protocol_acked => {
                    rings.announce(mac);
                    answer(&msg, 0, to_frontend)?;
                }
                Some(_) => refuse(
                    &msg,
                    "SEND_RARP before the frontend acked PROTOCOL_FEATURES",
                    to_frontend,
                )?,
                None => {
                    let why = format!(
                        "SEND_RARP with a {}-byte payload (a MAC padded to 8 bytes expected)",
                        msg.payload.len()
                    );
                    refuse(&msg, &why, to_frontend)?;
                }
            },
            REQ_SET_MEM_TABLE => {
                session.regions.clear();
                msg.write(handler)?;
            }
            REQ_ADD_MEM_REG => match Region::of(&msg) {
                Some(region) => match session.regions.get_mut(&(region.gpa, region.size)) {
                    Some((known, adds)) if *known == region => {
                        *adds += 1;
                        debug!(
                            "ADD_MEM_REG of the region at GPA {:#x} again ({} adds): answered, not mapped twice",
                            region.gpa, adds
                        );
                        answer(&msg, 0, to_frontend)?;
                    }
                    // A different region at that place: the handler refuses the overlap.
                    Some(_) => msg.write(handler)?,
                    None => {
                        session
                            .regions
                            .insert((region.gpa, region.size), (region, 1));
                        msg.write(handler)?;
                    }
                },
                None => msg.write(handler)?,
            },
            REQ_REM_MEM_REG => {
                let key = Region::of(&msg).map(|r| (r.gpa, r.size));
                match key.and_then(|k| session.regions.get_mut(&k)) {
                    Some((_, adds)) if *adds > 1 => {
                        *adds -= 1;
                        debug!(
                            "REM_MEM_REG of a region added {} more times: answered, kept mapped",
                            adds
                        );
                        answer(&msg, 0, to_frontend)?;
                    }
                    _ => {
                        if let Some(k) = key {
                            session.regions.remove(&k);
                        }
                        msg.write(handler)?;
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

        fn queue_size_limit(&self) -> u32 {
            1024
        }

        fn set_ring_enabled(&self, index: u32, enabled: bool) {
            self.calls.lock().unwrap().push((index, enabled));
        }

        fn reset(&self) {
            self.calls.lock().unwrap().push((u32::MAX, false));
        }

        // tests/datapath.rs covers SEND_RARP end to end.
        fn announce(&self, _mac: [u8; 6]) {}
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
        // A ring the device does not have: refused by the relay, the handler never sees it.
        enable(7, 0, FLAG_VERSION | FLAG_NEED_REPLY)
            .write(&qemu)
            .unwrap();
        let refused = Message::read(&qemu).unwrap().unwrap();
        assert_eq!(refused.u64_payload(), Some(1), "a failure reply");
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

    fn vring_num(index: u32, num: u32, flags: u32) -> Message {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        Message::new(REQ_SET_VRING_NUM, flags, p)
    }

    #[test]
    fn bad_ring_sizes_and_absent_rings_get_a_failure_reply_or_end_the_connection() {
        let (qemu, relay_front) = pair();
        let (relay_back, handler) = pair();
        let (t, _) = spawn_relay(relay_front, relay_back);
        let asked = FLAG_VERSION | FLAG_NEED_REPLY;
        for (index, num) in [(0, 1000), (0, 2048), (0, 0), (4, 256)] {
            vring_num(index, num, asked).write(&qemu).unwrap();
            let got = Message::read(&qemu).unwrap().unwrap();
            assert_eq!(
                (got.request(), got.flags(), got.u64_payload()),
                (REQ_SET_VRING_NUM, FLAG_VERSION | FLAG_REPLY, Some(1)),
                "ring {index}, {num} descriptors"
            );
        }
        // A good one passes.
        vring_num(1, 512, asked).write(&qemu).unwrap();
        let got = Message::read(&handler).unwrap().unwrap();
        assert_eq!(got.payload[4..8], 512u32.to_le_bytes());
        // Without NEED_REPLY the frontend could not learn of the refusal: the relay ends.
        vring_num(0, 1000, FLAG_VERSION).write(&qemu).unwrap();
        assert!(t.join().unwrap().is_err());
        assert!(
            Message::read(&handler).unwrap().is_none(),
            "handler side closed"
        );
    }

    #[test]
    fn reset_owner_forgets_protocol_features_and_resets_the_backend() {
        let (qemu, relay_front) = pair();
        let (relay_back, handler) = pair();
        let (t, calls) = spawn_relay(relay_front, relay_back);
        let features = Message::new(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            PROTOCOL_FEATURES.to_le_bytes().to_vec(),
        );
        features.write(&qemu).unwrap();
        assert_eq!(Message::read(&handler).unwrap().unwrap().request(), 2);
        Message::new(REQ_RESET_OWNER, FLAG_VERSION, Vec::new())
            .write(&qemu)
            .unwrap();
        assert_eq!(Message::read(&handler).unwrap().unwrap().request(), 4);
        assert_eq!(
            *calls.lock().unwrap(),
            [(u32::MAX, false)],
            "reset reported"
        );
        // Early again: answered by the relay, held until the next SET_FEATURES.
        enable(0, 1, FLAG_VERSION | FLAG_NEED_REPLY)
            .write(&qemu)
            .unwrap();
        assert_eq!(
            Message::read(&qemu).unwrap().unwrap().u64_payload(),
            Some(0)
        );
        features.write(&qemu).unwrap();
        assert_eq!(Message::read(&handler).unwrap().unwrap().request(), 2);
        let replayed = Message::read(&handler).unwrap().unwrap();
        assert_eq!(replayed.request(), REQ_SET_VRING_ENABLE);
        assert_eq!(calls.lock().unwrap().last(), Some(&(0, true)));
        drop(qemu);
        t.join().unwrap().unwrap();
    }

    /// An ADD_MEM_REG/REM_MEM_REG payload for (gpa, size), with `file`'s descriptor on ADD.
    fn mem_reg(request: u32, gpa: u64, size: u64, file: Option<&fs::File>) -> Message {
        let payload = [0, gpa, size, 0x7f00_0000_0000 + gpa, 0]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let mut m = Message::new(request, FLAG_VERSION | FLAG_NEED_REPLY, payload);
        if let Some(f) = file {
            m.fds.push(OwnedFd::from(f.try_clone().unwrap()));
        }
        m
    }

    #[test]
    fn duplicate_memory_regions_reach_the_handler_once_and_go_with_the_last_remove() {
        let (qemu, relay_front) = pair();
        let (relay_back, handler) = pair();
        let (t, _) = spawn_relay(relay_front, relay_back);
        let file = fs::File::open("/dev/null").unwrap();
        let other = fs::File::open("/proc/self/exe").unwrap();
        let gpa = 1 << 32;
        // First add: forwarded with its descriptor. Second, identical: answered here.
        mem_reg(REQ_ADD_MEM_REG, gpa, 4096, Some(&file))
            .write(&qemu)
            .unwrap();
        let got = Message::read(&handler).unwrap().unwrap();
        assert_eq!((got.request(), got.fds.len()), (REQ_ADD_MEM_REG, 1));
        mem_reg(REQ_ADD_MEM_REG, gpa, 4096, Some(&file))
            .write(&qemu)
            .unwrap();
        assert_eq!(
            Message::read(&qemu).unwrap().unwrap().u64_payload(),
            Some(0)
        );
        // The same place from another file is no duplicate: the handler decides.
        mem_reg(REQ_ADD_MEM_REG, gpa, 4096, Some(&other))
            .write(&qemu)
            .unwrap();
        assert_eq!(Message::read(&handler).unwrap().unwrap().request(), 37);
        // Two removes: the first answered here, the last forwarded.
        mem_reg(REQ_REM_MEM_REG, gpa, 4096, None)
            .write(&qemu)
            .unwrap();
        assert_eq!(
            Message::read(&qemu).unwrap().unwrap().u64_payload(),
            Some(0)
        );
        mem_reg(REQ_REM_MEM_REG, gpa, 4096, None)
            .write(&qemu)
            .unwrap();
        assert_eq!(Message::read(&handler).unwrap().unwrap().request(), 38);
        // Gone: another remove is the handler's to judge.
        mem_reg(REQ_REM_MEM_REG, gpa, 4096, None)
            .write(&qemu)
            .unwrap();
        assert_eq!(Message::read(&handler).unwrap().unwrap().request(), 38);
        drop(qemu);
        t.join().unwrap().unwrap();
    }

    /// A handler socket whose PID this process cannot see (another instance in another PID
    /// namespace, sharing $TMPDIR) belongs to someone else: starting must not remove it.
    #[test]
    fn starting_leaves_other_instances_handler_sockets_alone() {
        // PIDs are below 2^22 on Linux: this one is not visible here, as a PID of another
        // namespace would not be.
        let other = std::env::temp_dir().join("vhost-packet-4294967-0000beef");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("handler.sock"), b"").unwrap();
        let ours = InternalSocket::new().unwrap();
        let survived = other.join("handler.sock").exists();
        let _ = fs::remove_dir_all(&other);
        assert!(survived, "another instance's handler socket was removed");
        drop(ours);
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
