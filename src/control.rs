//! Live counters over a small control socket next to the vhost-user socket:
//! `vhost-packet stats --socket PATH` connects to `PATH.stats`, asks for `json` or `table`,
//! and prints the answer.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use indexmap::IndexMap;
use log::warn;
use serde::{Deserialize, Serialize};

use crate::backend::NetBackend;
use crate::stats::{Direction, PairStats};
use crate::virtio::features;

/// Where the control socket of the daemon serving `vhost_socket` listens.
pub fn control_path(vhost_socket: &Path) -> PathBuf {
    let mut p = vhost_socket.as_os_str().to_owned();
    p.push(".stats");
    PathBuf::from(p)
}

/// What the daemon reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub interface: String,
    /// `None` while vhost-packet is learning it.
    pub guest_mac: Option<String>,
    /// Features the connected frontend acked; `None` when no frontend is connected.
    pub acked_features: Option<u64>,
    pub pairs: Vec<PairStats>,
    /// Whether each pair's RX and TX rings are enabled (SET_VRING_ENABLE).
    pub enabled: Vec<(bool, bool)>,
}

/// What `vhost-packet stats` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    /// Prometheus text exposition (for node_exporter's textfile collector).
    Prometheus,
}

impl Format {
    /// The request line on the control socket.
    fn request(self) -> &'static [u8] {
        match self {
            Format::Table => b"table\n",
            Format::Json => b"json\n",
            Format::Prometheus => b"prometheus\n",
        }
    }
}

impl Snapshot {
    /// The counters and state of `backend` now.
    pub fn take(backend: &NetBackend, interface: &str) -> Snapshot {
        Snapshot {
            interface: interface.to_owned(),
            guest_mac: backend.guest_mac().map(|m| m.to_string()),
            acked_features: Some(backend.acked_features()).filter(|&f| f != 0),
            pairs: backend.stats(),
            enabled: backend.rings_enabled(),
        }
    }

    fn enabled(&self, pair: usize) -> (bool, bool) {
        self.enabled.get(pair).copied().unwrap_or_default()
    }
}

impl Snapshot {
    /// `stats --json`: one line of [`StatsJson`].
    pub fn to_json(&self) -> String {
        let mut j = serde_json::to_string(&StatsJson::from(self))
            .expect("serializing strings, numbers and maps cannot fail");
        j.push('\n');
        j
    }

    pub fn to_table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "interface   {}", self.interface);
        let _ = writeln!(
            t,
            "guest MAC   {}",
            self.guest_mac
                .as_deref()
                .unwrap_or("not known yet (learned from the guest's first frame)")
        );
        match self.acked_features {
            Some(f) => {
                let _ = writeln!(
                    t,
                    "frontend    connected, features {}",
                    features::describe(f)
                );
            }
            None => {
                let _ = writeln!(t, "frontend    not connected");
            }
        }
        let _ = write!(t, "\n{:<28}", "counter");
        for i in 0..self.pairs.len() {
            let _ = write!(t, "{:>16}", format!("pair {i}"));
        }
        // With several pairs, a last column adds them up.
        let total = (self.pairs.len() > 1).then(|| self.pairs.iter().copied().sum::<PairStats>());
        if total.is_some() {
            let _ = write!(t, "{:>16}", "total");
        }
        t.push('\n');
        let _ = write!(t, "{:<28}", "rings enabled");
        for i in 0..self.pairs.len() {
            let state = match self.enabled(i) {
                (true, true) => "rx tx",
                (true, false) => "rx",
                (false, true) => "tx",
                (false, false) => "none",
            };
            let _ = write!(t, "{state:>16}");
        }
        t.push('\n');
        let rows: Vec<_> = self
            .pairs
            .iter()
            .chain(total.iter())
            .map(PairStats::counters)
            .collect();
        if let Some(first) = rows.first() {
            for (r, c) in first.iter().enumerate() {
                let label = if c.drop {
                    format!("{} drops {}", c.direction.name(), c.name)
                } else {
                    format!("{} {}", c.direction.name(), c.name)
                };
                let _ = write!(t, "{label:<28}");
                for row in &rows {
                    let _ = write!(t, "{:>16}", row[r].value);
                }
                t.push('\n');
            }
        }
        t
    }
}

/// The answer to `stats --json`, field for field (tests read it back with these types).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsJson {
    pub interface: String,
    /// `None` while vhost-packet is learning it.
    pub guest_mac: Option<String>,
    pub connected: bool,
    /// In hex (`0x8000`); `None` when no frontend is connected.
    pub acked_features: Option<String>,
    pub acked_feature_names: Option<String>,
    pub queue_pairs: Vec<PairJson>,
}

/// One queue pair in [`StatsJson`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairJson {
    pub index: usize,
    pub rx_enabled: bool,
    pub tx_enabled: bool,
    pub rx: DirectionJson,
    pub tx: DirectionJson,
}

/// One direction's counters by name, in [`PairStats::counters`] order, drops apart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionJson {
    #[serde(flatten)]
    pub counters: IndexMap<String, u64>,
    pub drops: IndexMap<String, u64>,
}

impl From<&Snapshot> for StatsJson {
    fn from(s: &Snapshot) -> StatsJson {
        StatsJson {
            interface: s.interface.clone(),
            guest_mac: s.guest_mac.clone(),
            connected: s.acked_features.is_some(),
            acked_features: s.acked_features.map(|f| format!("{f:#x}")),
            acked_feature_names: s.acked_features.map(features::describe),
            queue_pairs: s
                .pairs
                .iter()
                .enumerate()
                .map(|(index, pair)| {
                    let (rx_enabled, tx_enabled) = s.enabled(index);
                    let mut rx = DirectionJson::default();
                    let mut tx = DirectionJson::default();
                    for c in pair.counters() {
                        let direction = match c.direction {
                            Direction::Rx => &mut rx,
                            Direction::Tx => &mut tx,
                        };
                        let map = if c.drop {
                            &mut direction.drops
                        } else {
                            &mut direction.counters
                        };
                        map.insert(c.name.to_owned(), c.value);
                    }
                    PairJson {
                        index,
                        rx_enabled,
                        tx_enabled,
                        rx,
                        tx,
                    }
                })
                .collect(),
        }
    }
}

/// Answers counter requests on `listener` for as long as the process lives.
pub fn serve(listener: UnixListener, backend: NetBackend, interface: String) {
    let spawned = thread::Builder::new().name("stats".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let snapshot = Snapshot::take(&backend, &interface);
            if let Err(e) = answer(conn, &snapshot) {
                log::debug!("stats request: {e}");
            }
        }
    });
    if let Err(e) = spawned {
        warn!("starting the stats thread: {e}");
    }
}

fn answer(conn: UnixStream, snapshot: &Snapshot) -> io::Result<()> {
    // A client that never sends its request must not hold the thread.
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    conn.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut request = String::new();
    BufReader::new(&conn).take(64).read_line(&mut request)?;
    let body = match request.trim() {
        "table" => snapshot.to_table(),
        "prometheus" => crate::metrics::render(snapshot),
        _ => snapshot.to_json(),
    };
    (&conn).write_all(body.as_bytes())
}

/// The client side: asks the daemon serving `vhost_socket` for its counters.
pub fn query(vhost_socket: &Path, format: Format) -> io::Result<String> {
    let path = control_path(vhost_socket);
    let mut conn = UnixStream::connect(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display())))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(format.request())?;
    let mut out = String::new();
    conn.read_to_string(&mut out)?;
    Ok(out)
}

/// One pair with a few counters, for the tests of every rendering (here and `metrics`).
#[cfg(test)]
pub(crate) fn example_snapshot() -> Snapshot {
    Snapshot {
        interface: "eth\"3".into(),
        guest_mac: Some("02:00:00:00:00:01".into()),
        acked_features: Some(1 << 15),
        pairs: vec![PairStats {
            rx_packets: 7,
            tx_drop_spoofed: 2,
            ..Default::default()
        }],
        enabled: vec![(true, false)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        example_snapshot()
    }

    #[test]
    fn json_has_every_counter() {
        let j = snapshot().to_json();
        assert!(j.starts_with(
            "{\"interface\":\"eth\\\"3\",\"guest_mac\":\"02:00:00:00:00:01\",\"connected\":true,"
        ));
        assert!(j.contains("\"acked_feature_names\":\"MRG_RXBUF\""));
        assert!(j.contains(
            "{\"index\":0,\"rx_enabled\":true,\"tx_enabled\":false,\"rx\":{\"packets\":7,"
        ));
        assert!(j.contains("\"drops\":{\"malformed\":0,\"unnegotiated\":0,\"spoofed\":2,"));
        let names = PairStats::default().counters().len();
        // Every counter but the two set above reads 0, and so does the pair's index.
        assert_eq!(
            j.matches("\":0").count(),
            names - 2 + 1,
            "one value per counter"
        );
        let none = Snapshot {
            acked_features: None,
            ..snapshot()
        }
        .to_json();
        assert!(none.contains("\"connected\":false,\"acked_features\":null"));
        let learning = Snapshot {
            guest_mac: None,
            ..snapshot()
        };
        assert!(learning.to_json().contains("\"guest_mac\":null,"));
        assert!(learning.to_table().contains("guest MAC   not known yet"));
    }

    #[test]
    fn several_pairs_are_listed_in_order_with_a_total_in_the_table() {
        let mut two = snapshot();
        two.pairs.push(PairStats {
            rx_packets: 5,
            ..Default::default()
        });
        two.enabled.push((false, false));
        let j = two.to_json();
        let first = j
            .find("{\"index\":0,\"rx_enabled\":true,\"tx_enabled\":false,")
            .unwrap();
        let second = j
            .find("{\"index\":1,\"rx_enabled\":false,\"tx_enabled\":false,\"rx\":{\"packets\":5,")
            .unwrap();
        assert!(first < second, "{j}");
        let t = two.to_table();
        let words = |prefix: &str| -> Vec<String> {
            let line = t.lines().find(|l| l.starts_with(prefix)).unwrap();
            line[28..].split_whitespace().map(str::to_owned).collect()
        };
        assert_eq!(words("counter"), ["pair", "0", "pair", "1", "total"]);
        assert_eq!(words("rings enabled"), ["rx", "none"]);
        assert_eq!(words("rx packets"), ["7", "5", "12"]);
        assert_eq!(words("tx drops spoofed"), ["2", "0", "2"]);
        assert!(
            !snapshot().to_table().contains("total"),
            "no total for one pair"
        );
    }

    #[test]
    fn table_lists_counters_by_pair() {
        let t = snapshot().to_table();
        assert!(t.contains("frontend    connected, features MRG_RXBUF"));
        assert!(t
            .lines()
            .any(|l| l.starts_with("rx packets") && l.trim_end().ends_with(" 7")));
        assert!(t
            .lines()
            .any(|l| l.starts_with("tx drops spoofed") && l.trim_end().ends_with(" 2")));
    }

    #[test]
    fn control_path_sits_next_to_the_socket() {
        assert_eq!(
            control_path(Path::new("/run/vp/net0.sock")),
            Path::new("/run/vp/net0.sock.stats")
        );
    }
}

/// Byte-exact renderings of `example_snapshot` (and the metrics test's two-pair variant), kept
/// in src/golden so that a change to how counters are defined cannot change what users parse.
#[cfg(test)]
mod golden {
    use super::*;

    fn two_pairs() -> Snapshot {
        let mut s = example_snapshot();
        s.pairs.push(PairStats {
            tx_bytes: 9,
            ..Default::default()
        });
        s.enabled.push((false, false));
        s
    }

    fn check(name: &str, got: &str, want: &str) {
        assert_eq!(got, want, "src/golden/{name} changed");
    }

    #[test]
    fn json_is_unchanged() {
        check(
            "stats.json",
            &two_pairs().to_json(),
            include_str!("golden/stats.json"),
        );
    }

    #[test]
    fn json_reads_back_into_the_typed_answer() {
        let two = two_pairs();
        let read: StatsJson = serde_json::from_str(&two.to_json()).unwrap();
        assert_eq!(read, StatsJson::from(&two));
        assert_eq!(read.queue_pairs[1].tx.counters["bytes"], 9);
        assert_eq!(read.queue_pairs[0].tx.drops["spoofed"], 2);
        assert!(!read.queue_pairs[0].rx.counters.contains_key("drops"));
    }

    #[test]
    fn table_is_unchanged() {
        check(
            "stats.table",
            &two_pairs().to_table(),
            include_str!("golden/stats.table"),
        );
    }

    #[test]
    fn log_line_is_unchanged() {
        let line = example_snapshot().pairs[0].to_string() + "\n";
        check("sigusr1.txt", &line, include_str!("golden/sigusr1.txt"));
    }

    #[test]
    fn prometheus_is_unchanged() {
        check(
            "metrics.prom",
            &crate::metrics::render(&two_pairs()),
            include_str!("golden/metrics.prom"),
        );
    }
}
