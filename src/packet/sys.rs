//! The raw system calls behind the packet sockets: `socket`, `bind`, and `setsockopt`/
//! `getsockopt` with the few value types they take. Every `unsafe` block of socket setup is
//! here; errors are plain `io::Error`s, which callers wrap with the option's name.

use std::ffi::{c_int, c_void};
use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A raw packet socket that receives nothing until bound with a protocol.
pub(super) fn open_raw() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments; no pointers involved.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by socket(2), is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds a packet socket to an interface; `protocol` (host order) 0 means send-only.
pub(super) fn bind_to(fd: BorrowedFd<'_>, ifindex: u32, protocol: u16) -> io::Result<()> {
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: protocol.to_be(),
        sll_ifindex: ifindex as c_int,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: `addr` is a fully initialised sockaddr_ll that outlives the call, and the length
    // passed is exactly its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setsockopt` with `value` as the option's bytes.
///
/// # Safety
///
/// Any pointer inside `value` must point at memory readable for the length it states, alive
/// across the call (the kernel may follow it).
unsafe fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live reference of `size_of::<T>()` bytes, which the kernel only
    // reads; pointers inside it are valid per this function's contract.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast::<c_void>(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `getsockopt` into a `T`.
///
/// # Safety
///
/// Every bit pattern must be a valid `T` (the kernel may write fewer bytes than it has; the
/// rest stay zero).
unsafe fn getsockopt<T>(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is writable memory of `len` bytes and `len` is a valid in/out length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast::<c_void>(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and partly overwritten by the kernel, and every bit pattern is a
    // valid T per this function's contract.
    Ok(unsafe { value.assume_init() })
}

pub(super) fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    value: c_int,
) -> io::Result<()> {
    // SAFETY: a c_int holds no pointer.
    unsafe { setsockopt(fd, level, name, &value) }
}

pub(super) fn getsockopt_int(fd: BorrowedFd<'_>, level: c_int, name: c_int) -> io::Result<c_int> {
    // SAFETY: every bit pattern is a valid c_int.
    unsafe { getsockopt(fd, level, name) }
}

/// `PACKET_ADD_MEMBERSHIP` (`add`) or `PACKET_DROP_MEMBERSHIP`.
pub(super) fn set_membership(
    fd: BorrowedFd<'_>,
    add: bool,
    mreq: &libc::packet_mreq,
) -> io::Result<()> {
    let name = if add {
        libc::PACKET_ADD_MEMBERSHIP
    } else {
        libc::PACKET_DROP_MEMBERSHIP
    };
    // SAFETY: a packet_mreq holds no pointer.
    unsafe { setsockopt(fd, libc::SOL_PACKET, name, mreq) }
}

/// `PACKET_STATISTICS`: read and reset by the kernel.
pub(super) fn packet_statistics(fd: BorrowedFd<'_>) -> io::Result<libc::tpacket_stats> {
    // SAFETY: tpacket_stats is two u32: every bit pattern is valid.
    unsafe { getsockopt(fd, libc::SOL_PACKET, libc::PACKET_STATISTICS) }
}

/// Loads a classic BPF program with `setsockopt` (`SO_ATTACH_FILTER`, `PACKET_FANOUT_DATA`):
/// the kernel copies it, so it need not outlive the call.
pub(super) fn set_program(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    program: &[libc::sock_filter],
) -> io::Result<()> {
    let len = u16::try_from(program.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a classic BPF program has at most 4096 instructions",
        )
    })?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog.filter` points at `program`, `len` instructions borrowed across the call;
    // the kernel copies them and never writes through the pointer.
    unsafe { setsockopt(fd, level, name, &fprog) }
}
