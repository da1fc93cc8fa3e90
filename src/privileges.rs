//! Least privilege: who may connect to the vhost-user socket, and dropping root once the
//! sockets that need it are open.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::path::Path;

/// A user to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Why privileges could not be set up as asked.
#[derive(Debug)]
pub enum PrivilegeError {
    UnknownUser(String),
    UnknownGroup(String),
    /// Setting the socket's owner or mode failed.
    SocketPermissions {
        path: String,
        source: io::Error,
    },
    /// A step of dropping privileges failed.
    Drop {
        step: &'static str,
        source: io::Error,
    },
    /// Capabilities remained after switching user.
    CapabilitiesKept(String),
}

impl fmt::Display for PrivilegeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivilegeError::UnknownUser(u) => write!(f, "looking up user {u}: no such user"),
            PrivilegeError::UnknownGroup(g) => write!(f, "looking up group {g}: no such group"),
            PrivilegeError::SocketPermissions { path, source } => {
                write!(f, "setting owner and mode of {path}: {source}")
            }
            PrivilegeError::Drop { step, source } => {
                write!(f, "dropping privileges ({step}): {source}")
            }
            PrivilegeError::CapabilitiesKept(caps) => {
                write!(f, "dropping privileges: capabilities remain ({caps})")
            }
        }
    }
}

impl std::error::Error for PrivilegeError {}

/// Size of the buffer getpwnam_r/getgrnam_r fill with strings.
const NSS_BUFFER: usize = 16 * 1024;

/// A user by name or numeric id.
pub fn lookup_user(name: &str) -> Result<User, PrivilegeError> {
    let unknown = || PrivilegeError::UnknownUser(name.to_string());
    let cname = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: passwd is plain data; getpwnam_r/getpwuid_r fill it in.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; NSS_BUFFER];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `pw` and `buf`
    // are writable for their sizes, `result` is a valid out-pointer.
    let rc = unsafe {
        match name.parse::<u32>() {
            Ok(uid) => libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result),
            Err(_) => libc::getpwnam_r(
                cname.as_ptr(),
                &mut pw,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            ),
        }
    };
    if rc != 0 || result.is_null() {
        return Err(unknown());
    }
    // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`.
    let pw_name = unsafe { CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(User {
        name: pw_name,
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// A group id by name or number.
pub fn lookup_group(name: &str) -> Result<u32, PrivilegeError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || PrivilegeError::UnknownGroup(name.to_string());
    let cname = CString::new(name).map_err(|_| unknown())?;
    // SAFETY: group is plain data; getgrnam_r fills it in.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; NSS_BUFFER];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in lookup_user.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(unknown());
    }
    Ok(gr.gr_gid)
}

/// Runs `f` with a umask that leaves at most `mode`, so that a socket bound in it is never
/// more open than asked, not even for a moment. Call while no other thread creates files.
pub fn with_umask<R>(mode: u32, f: impl FnOnce() -> R) -> R {
    // SAFETY: umask has no failure mode; it only swaps the process's file creation mask.
    let old = unsafe { libc::umask(!mode & 0o777) };
    let r = f();
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    r
}

/// Sets the socket's mode and, if given, its owner and group.
pub fn set_socket_permissions(
    path: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> Result<(), PrivilegeError> {
    let err = |source| PrivilegeError::SocketPermissions {
        path: path.display().to_string(),
        source,
    };
    use std::os::unix::fs::PermissionsExt;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Switches to `user` for good: no supplementary groups, its group and user ids, no
/// capabilities left, and no way to regain privileges through exec.
pub fn drop_to(user: &User) -> Result<(), PrivilegeError> {
    let step = |step: &'static str, rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(PrivilegeError::Drop {
                step,
                source: io::Error::last_os_error(),
            })
        }
    };
    // SAFETY: each call takes plain integers (and a null list for no groups); failures are
    // checked right after.
    unsafe {
        step("setgroups", libc::setgroups(0, std::ptr::null()))?;
        step("setgid", libc::setgid(user.gid))?;
        step("setuid", libc::setuid(user.uid))?;
        step(
            "no_new_privs",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
    }
    // Leaving uid 0 clears the capability sets unless something asked to keep them; check.
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| PrivilegeError::Drop {
            step: "reading /proc/self/status",
            source,
        })?;
    let held: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("CapPrm:") || l.starts_with("CapEff:"))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|v| !v.trim_start_matches('0').is_empty())
        })
        .collect();
    if !held.is_empty() {
        return Err(PrivilegeError::CapabilitiesKept(held.join(", ")));
    }
    Ok(())
}

/// Parses an octal mode such as `0600` or `660`.
pub fn parse_mode(s: &str) -> Option<u32> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8).ok()?;
    (m <= 0o777).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_by_name_and_number() {
        let root = lookup_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_user("0").unwrap().name, "root");
        assert!(lookup_user("no-such-user-vhost-packet").is_err());
        assert_eq!(lookup_group("root").unwrap(), 0);
        assert_eq!(lookup_group("1234").unwrap(), 1234);
        let e = lookup_group("no-such-group-vhost-packet")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "looking up group no-such-group-vhost-packet: no such group"
        );
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0600"), Some(0o600));
        assert_eq!(parse_mode("660"), Some(0o660));
        assert_eq!(parse_mode("0o666"), Some(0o666));
        assert_eq!(parse_mode("0800"), None);
        assert_eq!(parse_mode("1777"), None);
    }
}
