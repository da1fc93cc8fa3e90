//! The counters as Prometheus text exposition (format 0.0.4): `vhost-packet stats --format
//! prometheus` prints it, and with `--metrics ADDR:PORT` a small HTTP responder serves it at
//! `/metrics`. Every series carries the interface, so that the files of several instances can
//! sit side by side in node_exporter's textfile directory.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, warn};

use crate::control::Snapshot;
use crate::stats::Direction;
use crate::virtio::features;

/// How long a scrape may take to send its request and to read the answer: a client that
/// connects and says nothing holds only its own thread, and only this long.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more are closed unanswered, so idle connections cannot pile up
/// threads.
const MAX_CONNECTIONS: usize = 16;
/// Longest request head read.
const MAX_REQUEST: usize = 8192;

/// HELP text of a counter, by direction and name as `PairStats::counters` names them.
fn help(direction: Direction, name: &str, drop: bool) -> String {
    let what = match (direction, name, drop) {
        (Direction::Rx, "packets", false) => "Frames delivered to the guest",
        (Direction::Rx, "bytes", false) => "Bytes of frames delivered to the guest",
        (Direction::Rx, "gso", false) => {
            "Frames delivered with a GSO header (segmentation left to the guest)"
        }
        (Direction::Rx, "multi_buffer", false) => "Frames spread over more than one guest buffer",
        (Direction::Rx, "csum_completed", false) => {
            "Checksums finished in software for a guest without GUEST_CSUM"
        }
        (Direction::Rx, "segmented", false) => {
            "GSO frames the guest could not take whole, delivered as software segments"
        }
        (Direction::Tx, "packets", false) => "Frames the guest sent",
        (Direction::Tx, "bytes", false) => "Bytes of frames the guest sent",
        (Direction::Tx, "gso", false) => "Frames sent with a GSO header",
        (Direction::Tx, "backpressure", false) => {
            "Times the packet socket pushed back and TX waited for room"
        }
        (_, "notifications", false) => "Interrupts sent to the guest",
        (_, "kicks", false) => "Kicks received from the guest",
        (Direction::Rx, _, true) => "Frames not delivered to the guest, by reason",
        (Direction::Tx, _, true) => "Frames the guest sent that were not sent on, by reason",
        _ => "",
    };
    if what.is_empty() {
        format!("{} {name}", direction.name())
    } else {
        format!("{what} ({}).", direction.name())
    }
}

/// Escapes a label value (backslash, double quote, line feed).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: HELP, TYPE and its samples (`labels` without braces, then the value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The snapshot as Prometheus text exposition.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let iface = format!("interface=\"{}\"", label(&s.interface));
    family(
        &mut out,
        "vhost_packet_build_info",
        "gauge",
        "vhost-packet's version; always 1.",
        &[(format!("version=\"{}\"", env!("CARGO_PKG_VERSION")), 1)],
    );
    family(
        &mut out,
        "vhost_packet_device_info",
        "gauge",
        "The virtio-net device served: host interface and guest MAC (empty while it is being learned); always 1.",
        &[(format!("{iface},guest_mac=\"{}\"", label(s.guest_mac.as_deref().unwrap_or(""))), 1)],
    );
    family(
        &mut out,
        "vhost_packet_frontend_connected",
        "gauge",
        "1 while a frontend is connected and has negotiated features.",
        &[(iface.clone(), u64::from(s.acked_features.is_some()))],
    );
    if let Some(f) = s.acked_features {
        family(
            &mut out,
            "vhost_packet_features_info",
            "gauge",
            "Virtio features the connected frontend acked; always 1.",
            &[(
                format!(
                    "{iface},features=\"{f:#x}\",names=\"{}\"",
                    label(&features::describe(f))
                ),
                1,
            )],
        );
    }
    let pair_labels = |i: usize| format!("{iface},queue_pair=\"{i}\"");
    let rings: Vec<(String, u64)> = (0..s.pairs.len())
        .flat_map(|i| {
            let (rx, tx) = s.enabled.get(i).copied().unwrap_or_default();
            [
                (format!("{},ring=\"rx\"", pair_labels(i)), u64::from(rx)),
                (format!("{},ring=\"tx\"", pair_labels(i)), u64::from(tx)),
            ]
        })
        .collect();
    family(
        &mut out,
        "vhost_packet_ring_enabled",
        "gauge",
        "1 while the frontend has the queue pair's ring enabled.",
        &rings,
    );
    let counters: Vec<_> = s.pairs.iter().map(|p| p.counters()).collect();
    let Some(first) = counters.first() else {
        return out;
    };
    for direction in [Direction::Rx, Direction::Tx] {
        for (k, c) in first.iter().enumerate() {
            if c.direction != direction || c.drop {
                continue;
            }
            let samples: Vec<_> = counters
                .iter()
                .enumerate()
                .map(|(i, p)| (pair_labels(i), p[k].value))
                .collect();
            family(
                &mut out,
                &format!("vhost_packet_{}_{}_total", direction.name(), c.name),
                "counter",
                &help(direction, c.name, false),
                &samples,
            );
        }
        let mut drops = Vec::new();
        for (i, p) in counters.iter().enumerate() {
            for c in p.iter().filter(|c| c.direction == direction && c.drop) {
                drops.push((format!("{},reason=\"{}\"", pair_labels(i), c.name), c.value));
            }
        }
        family(
            &mut out,
            &format!("vhost_packet_{}_drops_total", direction.name()),
            "counter",
            &help(direction, "", true),
            &drops,
        );
    }
    out
}

/// Serves `/metrics` on `listener` for as long as the process lives, each scrape on its own
/// short-lived thread, rendering what `snapshot` returns at the time of the request.
pub fn serve<F>(listener: TcpListener, snapshot: F) -> io::Result<()>
where
    F: Fn() -> Snapshot + Send + Sync + 'static,
{
    let snapshot = Arc::new(snapshot);
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        debug!("metrics: accepting: {e}");
                        // Out of descriptors, say: do not spin.
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    debug!("metrics: {MAX_CONNECTIONS} scrapes in progress, closing one more");
                    continue;
                }
                let (snapshot, active) = (snapshot.clone(), active.clone());
                let spawned =
                    thread::Builder::new()
                        .name("metrics-scrape".into())
                        .spawn(move || {
                            if let Err(e) = answer(&conn, &*snapshot) {
                                debug!("metrics scrape: {e}");
                            }
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    warn!("metrics: starting a scrape thread: {e}");
                }
            }
        })?;
    Ok(())
}

/// Reads one request head and answers it: `GET /metrics` (or `HEAD`), 404 for another path,
/// 405 for another method, 400 for anything that is not HTTP.
fn answer(conn: &TcpStream, snapshot: &dyn Fn() -> Snapshot) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = (&*conn).read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(conn, "400 Bad Request", "request too long\n", true);
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target, version) = (words.next(), words.next(), words.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/")) {
        return respond(conn, "400 Bad Request", "not an HTTP request\n", true);
    }
    let path = target
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default();
    match (method, path) {
        (Some(m @ ("GET" | "HEAD")), "/metrics") => {
            let body = render(&snapshot());
            respond(conn, "200 OK", &body, m == "GET")
        }
        (Some("GET" | "HEAD"), _) => respond(conn, "404 Not Found", "try /metrics\n", true),
        _ => respond(conn, "405 Method Not Allowed", "GET /metrics\n", true),
    }
}

fn respond(conn: &TcpStream, status: &str, body: &str, with_body: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        out.push_str(body);
    }
    (&*conn).write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::PairStats;

    /// The control socket's example, with a second pair.
    fn snapshot() -> Snapshot {
        Snapshot {
            pairs: vec![
                PairStats {
                    rx_packets: 7,
                    tx_drop_spoofed: 2,
                    ..Default::default()
                },
                PairStats {
                    tx_bytes: 9,
                    ..Default::default()
                },
            ],
            enabled: vec![(true, false), (false, false)],
            ..crate::control::example_snapshot()
        }
    }

    #[test]
    fn counters_are_named_and_labelled_by_convention() {
        let m = render(&snapshot());
        let i = "interface=\"eth\\\"3\"";
        for line in [
            format!("vhost_packet_rx_packets_total{{{i},queue_pair=\"0\"}} 7"),
            format!("vhost_packet_tx_bytes_total{{{i},queue_pair=\"1\"}} 9"),
            format!("vhost_packet_tx_drops_total{{{i},queue_pair=\"0\",reason=\"spoofed\"}} 2"),
            format!("vhost_packet_ring_enabled{{{i},queue_pair=\"0\",ring=\"rx\"}} 1"),
            format!("vhost_packet_features_info{{{i},features=\"0x8000\",names=\"MRG_RXBUF\"}} 1"),
            format!(
                "vhost_packet_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "# TYPE vhost_packet_rx_bytes_total counter".to_string(),
            "# HELP vhost_packet_rx_bytes_total Bytes of frames delivered to the guest (rx)."
                .to_string(),
        ] {
            assert!(m.lines().any(|l| l == line), "{line:?} missing from:\n{m}");
        }
        // Every counter of every pair appears once.
        let samples = m
            .lines()
            .filter(|l| l.starts_with("vhost_packet_") && l.contains("_total{"))
            .count();
        assert_eq!(samples, 2 * PairStats::default().counters().len());
        // Every family has its HELP and TYPE.
        assert_eq!(m.matches("# HELP ").count(), m.matches("# TYPE ").count());
        let none = render(&Snapshot {
            acked_features: None,
            ..snapshot()
        });
        assert!(!none.contains("vhost_packet_features_info"));
        assert!(none.contains("vhost_packet_frontend_connected{interface=\"eth\\\"3\"} 0"));
    }
}
