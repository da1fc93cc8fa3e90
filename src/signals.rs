//! Signals are taken synchronously by one thread (`sigwait`), never by asynchronous handlers:
//! they are blocked in every thread before any is spawned.

use std::io;

/// The signals the daemon acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM: exit promptly.
    Terminate,
    /// SIGUSR1: log the counters.
    DumpStats,
}

const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1];

fn handled_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for sig in HANDLED {
        // SAFETY: as above; `sig` is a valid signal number.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Blocks the handled signals in the calling thread and every thread it spawns afterwards.
/// Call first thing in `main`.
pub fn block() -> io::Result<()> {
    let set = handled_set()?;
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Waits for the next handled signal.
pub fn wait() -> io::Result<Signal> {
    let set = handled_set()?;
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        match sig {
            libc::SIGUSR1 => return Ok(Signal::DumpStats),
            libc::SIGINT | libc::SIGTERM => return Ok(Signal::Terminate),
            _ => continue,
        }
    }
}
