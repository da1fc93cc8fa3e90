//! Per-queue-pair counters. Owned by the pair's worker (plain integers, no atomics on the hot
//! path); read under the pair's lock for logs.

use std::fmt;

/// Counters of one queue pair. "rx" is interface to guest, "tx" guest to interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets delivered with a GSO header (segmentation left to the guest).
    pub rx_gso: u64,
    /// Packets spread over more than one guest buffer.
    pub rx_multi_buffer: u64,
    /// Checksums finished in software for a guest without GUEST_CSUM.
    pub rx_csum_completed: u64,
    /// GSO frames the guest could not take whole, delivered as segments made in software.
    pub rx_segmented: u64,
    /// Frames larger than the guest buffers could take.
    pub rx_drop_oversize: u64,
    /// Frames the kernel dropped while the guest had no buffers (PACKET_STATISTICS), and
    /// software segments the guest had no buffers for.
    pub rx_drop_no_buffers: u64,
    /// GSO or checksum metadata the guest did not negotiate.
    pub rx_drop_offload: u64,
    /// Guest RX chains that were malformed.
    pub rx_drop_bad_chain: u64,
    /// recvmsg errors (the kernel could not express a packet's metadata, link down).
    pub rx_drop_kernel: u64,
    /// Frames queued for this pair when the frontend disabled its RX ring, thrown away so
    /// that they do not arrive late, after frames of the same flows on other pairs; and the
    /// undelivered segments of a GSO frame whose RX ring was disabled or stopped.
    pub rx_drop_disabled: u64,
    pub rx_notifications: u64,
    pub rx_kicks: u64,
    /// Times the worker failed while receiving (signalling the guest): each ends the
    /// connection, so that the frontend reconnects.
    pub rx_worker_errors: u64,

    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames sent with a GSO header.
    pub tx_gso: u64,
    /// Malformed chains or headers too short for their frame.
    pub tx_drop_malformed: u64,
    /// Offload metadata the guest did not negotiate.
    pub tx_drop_unnegotiated: u64,
    /// Frames whose source MAC is not the guest's.
    pub tx_drop_spoofed: u64,
    /// Frames over the interface MTU (EMSGSIZE).
    pub tx_drop_oversize: u64,
    /// Other send errors: EINVAL (bad header), ENOBUFS (device dropped), ENETDOWN, ...
    pub tx_drop_kernel: u64,
    /// Chains the guest put on a disabled TX ring: consumed and given back unsent.
    pub tx_drop_disabled: u64,
    /// Times the socket pushed back (EAGAIN) and TX waited for room.
    pub tx_backpressure: u64,
    pub tx_notifications: u64,
    pub tx_kicks: u64,
    /// Times the worker failed while sending (signalling the guest, waking itself): each ends
    /// the connection, so that the frontend reconnects.
    pub tx_worker_errors: u64,
}

impl std::ops::AddAssign for PairStats {
    fn add_assign(&mut self, o: PairStats) {
        // Destructured without `..`: a new counter must be added here to compile.
        let PairStats {
            rx_packets,
            rx_bytes,
            rx_gso,
            rx_multi_buffer,
            rx_csum_completed,
            rx_segmented,
            rx_drop_oversize,
            rx_drop_no_buffers,
            rx_drop_offload,
            rx_drop_bad_chain,
            rx_drop_kernel,
            rx_drop_disabled,
            rx_notifications,
            rx_kicks,
            rx_worker_errors,
            tx_packets,
            tx_bytes,
            tx_gso,
            tx_drop_malformed,
            tx_drop_unnegotiated,
            tx_drop_spoofed,
            tx_drop_oversize,
            tx_drop_kernel,
            tx_drop_disabled,
            tx_backpressure,
            tx_notifications,
            tx_kicks,
            tx_worker_errors,
        } = o;
        self.rx_packets += rx_packets;
        self.rx_bytes += rx_bytes;
        self.rx_gso += rx_gso;
        self.rx_multi_buffer += rx_multi_buffer;
        self.rx_csum_completed += rx_csum_completed;
        self.rx_segmented += rx_segmented;
        self.rx_drop_oversize += rx_drop_oversize;
        self.rx_drop_no_buffers += rx_drop_no_buffers;
        self.rx_drop_offload += rx_drop_offload;
        self.rx_drop_bad_chain += rx_drop_bad_chain;
        self.rx_drop_kernel += rx_drop_kernel;
        self.rx_drop_disabled += rx_drop_disabled;
        self.rx_notifications += rx_notifications;
        self.rx_kicks += rx_kicks;
        self.rx_worker_errors += rx_worker_errors;
        self.tx_packets += tx_packets;
        self.tx_bytes += tx_bytes;
        self.tx_gso += tx_gso;
        self.tx_drop_malformed += tx_drop_malformed;
        self.tx_drop_unnegotiated += tx_drop_unnegotiated;
        self.tx_drop_spoofed += tx_drop_spoofed;
        self.tx_drop_oversize += tx_drop_oversize;
        self.tx_drop_kernel += tx_drop_kernel;
        self.tx_drop_disabled += tx_drop_disabled;
        self.tx_backpressure += tx_backpressure;
        self.tx_notifications += tx_notifications;
        self.tx_kicks += tx_kicks;
        self.tx_worker_errors += tx_worker_errors;
    }
}

impl std::iter::Sum for PairStats {
    fn sum<I: Iterator<Item = PairStats>>(iter: I) -> PairStats {
        iter.fold(PairStats::default(), |mut acc, s| {
            acc += s;
            acc
        })
    }
}

/// Direction of a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Rx,
    Tx,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

/// One counter, named as in logs, JSON and tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub direction: Direction,
    pub name: &'static str,
    /// A count of frames or chains lost, by reason.
    pub drop: bool,
    pub value: u64,
}

impl PairStats {
    /// Every counter, in the order logs and tables show them.
    pub fn counters(&self) -> [Counter; 28] {
        use Direction::{Rx, Tx};
        let c = |direction, name, drop, value| Counter {
            direction,
            name,
            drop,
            value,
        };
        [
            c(Rx, "packets", false, self.rx_packets),
            c(Rx, "bytes", false, self.rx_bytes),
            c(Rx, "gso", false, self.rx_gso),
            c(Rx, "multi_buffer", false, self.rx_multi_buffer),
            c(Rx, "csum_completed", false, self.rx_csum_completed),
            c(Rx, "segmented", false, self.rx_segmented),
            c(Rx, "notifications", false, self.rx_notifications),
            c(Rx, "kicks", false, self.rx_kicks),
            c(Rx, "worker_errors", false, self.rx_worker_errors),
            c(Rx, "oversize", true, self.rx_drop_oversize),
            c(Rx, "no_buffers", true, self.rx_drop_no_buffers),
            c(Rx, "offload", true, self.rx_drop_offload),
            c(Rx, "bad_chain", true, self.rx_drop_bad_chain),
            c(Rx, "kernel", true, self.rx_drop_kernel),
            c(Rx, "disabled", true, self.rx_drop_disabled),
            c(Tx, "packets", false, self.tx_packets),
            c(Tx, "bytes", false, self.tx_bytes),
            c(Tx, "gso", false, self.tx_gso),
            c(Tx, "backpressure", false, self.tx_backpressure),
            c(Tx, "notifications", false, self.tx_notifications),
            c(Tx, "kicks", false, self.tx_kicks),
            c(Tx, "worker_errors", false, self.tx_worker_errors),
            c(Tx, "malformed", true, self.tx_drop_malformed),
            c(Tx, "unnegotiated", true, self.tx_drop_unnegotiated),
            c(Tx, "spoofed", true, self.tx_drop_spoofed),
            c(Tx, "oversize", true, self.tx_drop_oversize),
            c(Tx, "kernel", true, self.tx_drop_kernel),
            c(Tx, "disabled", true, self.tx_drop_disabled),
        ]
    }
}

impl fmt::Display for PairStats {
    /// `rx packets=.. bytes=.. drops[oversize=.. ..]; tx packets=.. drops[..]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counters = self.counters();
        for (i, direction) in [Direction::Rx, Direction::Tx].into_iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(direction.name())?;
            let mine = counters.iter().filter(|c| c.direction == direction);
            for c in mine.clone().filter(|c| !c.drop) {
                write!(f, " {}={}", c.name, c.value)?;
            }
            f.write_str(" drops[")?;
            for (j, c) in mine.filter(|c| c.drop).enumerate() {
                write!(f, "{}{}={}", if j > 0 { " " } else { "" }, c.name, c.value)?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}

/// Logs at most one line per `interval` for a recurring event, counting what it suppressed.
#[derive(Debug)]
pub struct RateLimit {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(interval: std::time::Duration) -> RateLimit {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Returns `Some(suppressed_since_last)` when a line may be logged now.
    pub fn check(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl RateLimit {
    /// Logs a warning unless one was logged within the interval; says how many were not.
    pub fn warn(&mut self, args: fmt::Arguments<'_>) {
        match self.check() {
            Some(0) => log::warn!("{args}"),
            Some(n) => log::warn!("{args} ({n} similar messages suppressed)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limit_counts_what_it_suppresses() {
        let mut r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        r.last = Some(std::time::Instant::now() - Duration::from_secs(7200));
        assert_eq!(r.check(), Some(2));
    }

    #[test]
    fn display_keeps_the_log_format() {
        let s = PairStats {
            rx_packets: 1,
            rx_drop_kernel: 2,
            tx_kicks: 3,
            tx_drop_spoofed: 4,
            ..Default::default()
        }
        .to_string();
        assert_eq!(
            s,
            "rx packets=1 bytes=0 gso=0 multi_buffer=0 csum_completed=0 segmented=0 notifications=0 kicks=0 worker_errors=0 \
             drops[oversize=0 no_buffers=0 offload=0 bad_chain=0 kernel=2 disabled=0]; \
             tx packets=0 bytes=0 gso=0 backpressure=0 notifications=0 kicks=3 worker_errors=0 \
             drops[malformed=0 unnegotiated=0 spoofed=4 oversize=0 kernel=0 disabled=0]"
        );
    }

    #[test]
    fn totals_add_every_counter() {
        let one = PairStats {
            rx_packets: 1,
            rx_drop_disabled: 2,
            tx_kicks: 3,
            ..Default::default()
        };
        let total: PairStats = [one, one, PairStats::default()].into_iter().sum();
        for (t, o) in total.counters().iter().zip(one.counters()) {
            assert_eq!(t.value, 2 * o.value, "{}", t.name);
        }
        // Every counter takes part: set each one alone and see it in the total.
        let ones = PairStats::default().counters().len();
        let mut all = PairStats::default();
        all += PairStats {
            rx_packets: 1,
            rx_bytes: 1,
            rx_gso: 1,
            rx_multi_buffer: 1,
            rx_csum_completed: 1,
            rx_segmented: 1,
            rx_drop_oversize: 1,
            rx_drop_no_buffers: 1,
            rx_drop_offload: 1,
            rx_drop_bad_chain: 1,
            rx_drop_kernel: 1,
            rx_drop_disabled: 1,
            rx_notifications: 1,
            rx_kicks: 1,
            rx_worker_errors: 1,
            tx_packets: 1,
            tx_bytes: 1,
            tx_gso: 1,
            tx_drop_malformed: 1,
            tx_drop_unnegotiated: 1,
            tx_drop_spoofed: 1,
            tx_drop_oversize: 1,
            tx_drop_kernel: 1,
            tx_drop_disabled: 1,
            tx_backpressure: 1,
            tx_notifications: 1,
            tx_kicks: 1,
            tx_worker_errors: 1,
        };
        assert_eq!(all.counters().iter().filter(|c| c.value == 1).count(), ones);
    }

    #[test]
    fn display_names_every_counter() {
        let s = PairStats {
            rx_packets: 3,
            tx_drop_kernel: 2,
            ..Default::default()
        }
        .to_string();
        assert!(s.starts_with("rx packets=3 "));
        assert!(s.contains(" kernel=2 disabled=0]"));
        let names = PairStats::default().counters().len();
        assert_eq!(s.matches('=').count(), names, "{s}");
    }
}
