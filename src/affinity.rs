//! `--cpu-affinity`: the worker of queue pair i runs on the i-th CPU listed (round robin).
//!
//! vhost-user-backend starts the workers itself, anew for every connection, and offers no
//! hook at thread start. A worker therefore pins itself the first time it handles an event
//! (enabling a ring always produces one, before any traffic), remembering in a thread-local
//! that it did; the cost on later events is one thread-local read.

use std::cell::Cell;
use std::io;
use std::mem;

use log::{info, warn};

use crate::config::CPU_SETSIZE;

thread_local! {
    /// Whether this thread has set its affinity already.
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

/// Pins the calling worker of pair `pair` to `cpus[pair % len]`, once per thread.
pub fn pin_worker_once(cpus: &[usize], pair: usize) {
    if cpus.is_empty() || PINNED.with(|p| p.replace(true)) {
        return;
    }
    let cpu = cpus[pair % cpus.len()];
    match pin_current_thread(cpu) {
        Ok(()) => info!("queue pair {pair}: worker runs on CPU {cpu}"),
        Err(e) => warn!("queue pair {pair}: pinning the worker to CPU {cpu}: {e}"),
    }
}

/// Restricts the calling thread to `cpu` (`sched_setaffinity(0, ...)` names the caller).
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= CPU_SETSIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is not below {CPU_SETSIZE}"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the bit lies inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its size; the kernel only
    // reads it.
    let rc = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is writable memory of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..CPU_SETSIZE)
        .filter(|&c| {
            // SAFETY: every index below CPU_SETSIZE lies inside `set`.
            unsafe { libc::CPU_ISSET(c, &set) }
        })
        .collect())
}

/// Formats CPUs as ranges: `0-3,8`.
pub fn format_cpus(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if j > i {
            format!("{}-{}", cpus[i], cpus[j])
        } else {
            cpus[i].to_string()
        });
        i = j + 1;
    }
    out.join(",")
}

/// Checks that every CPU of `--cpu-affinity` is one this process may run on.
pub fn check_available(cpus: &[usize]) -> Result<(), String> {
    let allowed = allowed_cpus().map_err(|e| format!("reading this process's CPUs: {e}"))?;
    match cpus.iter().find(|c| !allowed.contains(c)) {
        Some(cpu) => Err(format!(
            "--cpu-affinity: CPU {cpu} is not available to this process (it may run on {})",
            format_cpus(&allowed)
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_folded() {
        assert_eq!(format_cpus(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpus(&[5]), "5");
        assert_eq!(format_cpus(&[]), "");
    }

    #[test]
    fn a_thread_pins_itself_once() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let last = *allowed.last().unwrap();
        std::thread::spawn(move || {
            pin_worker_once(&[last], 0);
            assert_eq!(allowed_cpus().unwrap(), [last]);
            // A second call on the same thread changes nothing, whatever it asks.
            pin_worker_once(&[usize::MAX], 0);
            assert_eq!(allowed_cpus().unwrap(), [last]);
        })
        .join()
        .unwrap();
        assert!(check_available(&allowed).is_ok());
        let e = check_available(&[CPU_SETSIZE - 1]).unwrap_err();
        assert!(
            e.contains(&format!("CPU {} is not available", CPU_SETSIZE - 1)),
            "{e}"
        );
    }
}
