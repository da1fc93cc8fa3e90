//! Per-queue-pair counters. Owned by the pair's worker (plain integers, no atomics on the hot
//! path); read under the pair's lock for logs.

use std::fmt;

/// Defines `PairStats` and everything derived from its list of counters (the sum, `counters()`,
/// and so every rendering) from one table: field, direction, name, whether it counts drops.
/// The table's order is the order logs, tables, JSON and Prometheus show.
macro_rules! pair_stats {
    ($($(#[$doc:meta])* $field:ident: $dir:ident, $name:literal, $drop:literal;)*) => {
        /// Counters of one queue pair. "rx" is interface to guest, "tx" guest to interface.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct PairStats {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl std::ops::AddAssign for PairStats {
            fn add_assign(&mut self, o: PairStats) {
                $(self.$field += o.$field;)*
            }
        }

        impl PairStats {
            /// Every counter, in the order logs and tables show them.
            pub fn counters(&self) -> [Counter; pair_stats!(@count $($field)*)] {
                [$(Counter {
                    direction: Direction::$dir,
                    name: $name,
                    drop: $drop,
                    value: self.$field,
                },)*]
            }
        }
    };
    (@count $($f:ident)*) => { 0 $(+ pair_stats!(@one $f))* };
    (@one $f:ident) => { 1 };
}

pair_stats! {
    rx_packets: Rx, "packets", false;
    rx_bytes: Rx, "bytes", false;
    /// Packets delivered with a GSO header (segmentation left to the guest).
    rx_gso: Rx, "gso", false;
    /// Packets spread over more than one guest buffer.
    rx_multi_buffer: Rx, "multi_buffer", false;
    /// Checksums finished in software for a guest without GUEST_CSUM.
    rx_csum_completed: Rx, "csum_completed", false;
    /// GSO frames the guest could not take whole, delivered as segments made in software.
    rx_segmented: Rx, "segmented", false;
    rx_notifications: Rx, "notifications", false;
    rx_kicks: Rx, "kicks", false;
    /// Times the worker failed while receiving (signalling the guest): each ends the
    /// connection, so that the frontend reconnects.
    rx_worker_errors: Rx, "worker_errors", false;
    /// Frames larger than the guest buffers could take.
    rx_drop_oversize: Rx, "oversize", true;
    /// Frames the kernel dropped while the guest had no buffers (PACKET_STATISTICS), and
    /// software segments the guest had no buffers for.
    rx_drop_no_buffers: Rx, "no_buffers", true;
    /// GSO or checksum metadata the guest did not negotiate.
    rx_drop_offload: Rx, "offload", true;
    /// Guest RX chains that were malformed.
    rx_drop_bad_chain: Rx, "bad_chain", true;
    /// recvmsg errors (the kernel could not express a packet's metadata, link down).
    rx_drop_kernel: Rx, "kernel", true;
    /// Frames queued for this pair when the frontend disabled its RX ring, thrown away so
    /// that they do not arrive late, after frames of the same flows on other pairs; and the
    /// undelivered segments of a GSO frame whose RX ring was disabled or stopped.
    rx_drop_disabled: Rx, "disabled", true;
    tx_packets: Tx, "packets", false;
    tx_bytes: Tx, "bytes", false;
    /// Frames sent with a GSO header.
    tx_gso: Tx, "gso", false;
    /// Times the socket pushed back (EAGAIN) and TX waited for room.
    tx_backpressure: Tx, "backpressure", false;
    tx_notifications: Tx, "notifications", false;
    tx_kicks: Tx, "kicks", false;
    /// Times the worker failed while sending (signalling the guest, waking itself): each ends
    /// the connection, so that the frontend reconnects.
    tx_worker_errors: Tx, "worker_errors", false;
    /// Malformed chains or headers too short for their frame.
    tx_drop_malformed: Tx, "malformed", true;
    /// Offload metadata the guest did not negotiate.
    tx_drop_unnegotiated: Tx, "unnegotiated", true;
    /// Frames whose source MAC is not the guest's.
    tx_drop_spoofed: Tx, "spoofed", true;
    /// Frames over the interface MTU (EMSGSIZE).
    tx_drop_oversize: Tx, "oversize", true;
    /// Other send errors: EINVAL (bad header), ENOBUFS (device dropped), ENETDOWN, ...
    tx_drop_kernel: Tx, "kernel", true;
    /// Chains the guest put on a disabled TX ring: consumed and given back unsent.
    tx_drop_disabled: Tx, "disabled", true;
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
