//! Being started by a manager: a listening vhost-user socket handed in (`--fd N`, or systemd
//! socket activation through `LISTEN_FDS`/`LISTEN_PID`), and readiness told to systemd
//! (`NOTIFY_SOCKET`). Both protocols are a few lines each, so no systemd crate.

use std::ffi::OsString;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// A listening UNIX stream socket this process inherited, and the path it is bound to, if any
/// (an abstract or unnamed socket has none). The `Daemon` made from the configuration holding
/// it takes ownership of the descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InheritedSocket {
    pub fd: RawFd,
    pub path: Option<PathBuf>,
}

impl InheritedSocket {
    /// Checks that `fd` is a listening UNIX stream socket, marks it close-on-exec and learns
    /// its path. `what` names where it came from (`--fd 5`, `LISTEN_FDS`) for the message.
    pub fn inspect(fd: RawFd, what: &str) -> Result<InheritedSocket, String> {
        let bad = |why: String| format!("{what}: descriptor {fd} {why}");
        // SAFETY: F_GETFD only reads the descriptor's flags; an invalid fd gives EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(bad(format!("is not open ({})", io::Error::last_os_error())));
        }
        let opt = |name: libc::c_int| -> io::Result<libc::c_int> {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `v` and `len` are valid out-pointers of the sizes given.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(v)
            }
        };
        let domain = opt(libc::SO_DOMAIN).map_err(|e| bad(format!("is not a socket ({e})")))?;
        let kind = opt(libc::SO_TYPE).map_err(|e| bad(format!("is not a socket ({e})")))?;
        let listening = opt(libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))?;
        if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM || listening != 1 {
            return Err(bad("is not a listening UNIX stream socket".into()));
        }
        // SAFETY: as above; only the close-on-exec flag is added.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(bad(format!(
                "cannot be made close-on-exec ({})",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: the descriptor is an open socket (checked above); ManuallyDrop keeps this
        // temporary view from closing it.
        let view = ManuallyDrop::new(unsafe { UnixListener::from_raw_fd(fd) });
        let path = view
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(PathBuf::from));
        Ok(InheritedSocket { fd, path })
    }

    /// Takes ownership of the descriptor as a blocking listener (the accept loop blocks).
    ///
    /// # Safety
    /// Call at most once per inherited descriptor, and nothing else may own it.
    pub unsafe fn into_listener(self) -> io::Result<UnixListener> {
        // SAFETY: the caller guarantees sole ownership; `inspect` checked the socket's kind.
        let listener = unsafe { UnixListener::from_raw_fd(self.fd) };
        listener.set_nonblocking(false)?;
        Ok(listener)
    }
}

impl std::fmt::Display for InheritedSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{} (inherited descriptor {})", p.display(), self.fd),
            None => write!(f, "inherited descriptor {}", self.fd),
        }
    }
}

/// The descriptors systemd passed, as `sd_listen_fds(3)` finds them: only when `LISTEN_PID`
/// is this process, numbered from 3, each made close-on-exec. The variables are removed in any
/// case, so that nothing this process starts takes them for its own. Call before any thread
/// exists (it changes the environment).
pub fn listen_fds() -> Result<Vec<RawFd>, String> {
    let take = |name: &str| -> Option<OsString> {
        let v = std::env::var_os(name);
        std::env::remove_var(name);
        v
    };
    let pid = take("LISTEN_PID");
    let fds = take("LISTEN_FDS");
    let _ = take("LISTEN_FDNAMES");
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        // Meant for another process (e.g. our parent's).
        return Ok(Vec::new());
    }
    let n: RawFd = fds
        .to_str()
        .and_then(|n| n.parse().ok())
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| format!("LISTEN_FDS={fds:?} is not a descriptor count"))?;
    let fds: Vec<RawFd> = (LISTEN_FDS_START..LISTEN_FDS_START + n).collect();
    for &fd in &fds {
        // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) >= 0
        };
        if !ok {
            return Err(format!(
                "LISTEN_FDS: descriptor {fd} is not open ({})",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(fds)
}

/// Sends `state` (`READY=1`, `STOPPING=1`, ...) to the service manager if `NOTIFY_SOCKET`
/// names one (a path, or an abstract name written with a leading '@'); does nothing otherwise.
pub fn notify(state: &str) -> io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => notify_to(&target, state),
        None => Ok(()),
    }
}

/// Sends `state` to the notification socket `target` (a path, or '@' and an abstract name).
pub fn notify_to(target: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let bytes = target.as_encoded_bytes();
    let addr = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        Some(b'/') => SocketAddr::from_pathname(PathBuf::from(target))?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={target:?} is neither a path nor an abstract name"),
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn inspect_accepts_only_a_listening_unix_stream_socket() {
        let dir = std::env::temp_dir().join(format!("vp-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let s = InheritedSocket::inspect(listener.as_raw_fd(), "--fd").unwrap();
        assert_eq!(s.path.as_deref(), Some(path.as_path()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = InheritedSocket::inspect(a.as_raw_fd(), "--fd 9").unwrap_err();
        assert!(e.contains("is not a listening UNIX stream socket"), "{e}");
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = InheritedSocket::inspect(f.as_raw_fd(), "--fd 9").unwrap_err();
        assert!(e.contains("is not a socket"), "{e}");
        let e = InheritedSocket::inspect(1000, "--fd 1000").unwrap_err();
        assert!(
            e.starts_with("--fd 1000: descriptor 1000 is not open"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn notify_reaches_a_path_and_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vp-notify-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify_to(format!("@{name}").as_ref(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let dir = std::env::temp_dir().join(format!("vp-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "STOPPING=1").unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to("relative".as_ref(), "READY=1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
