//! Fuzz harnesses for vhost-packet: the code that parses what an untrusted guest (or the host
//! kernel) hands over must never panic, read or write out of range, or break the virtio
//! contract. Each module's `run` is one libFuzzer target (fuzz_targets/ wraps it); the same
//! functions replay the checked-in corpus under `cargo test` on any toolchain.
//!
//! docs/reliability.md lists the targets, what each checks and how to run them.

pub mod chain;
pub mod header;
pub mod input;
pub mod ring;
pub mod rx_writer;
pub mod seeds;
pub mod segment;
pub mod tx_reader;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target by name.
pub const TARGETS: [(&str, Target); 5] = [
    ("header", header::run),
    ("chain", chain::run),
    ("rx_writer", rx_writer::run),
    ("segment", segment::run),
    ("tx_reader", tx_reader::run),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        inputs("corpus", target)
    }

    /// The files in `<kind>/<target>/` (none if it does not exist).
    fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(kind)
            .join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .into_iter()
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect()
    }

    /// Every checked-in seed passes its target (what `cargo fuzz run` does first).
    #[test]
    fn corpus_replays_clean() {
        for (target, run) in TARGETS {
            let files = corpus(target);
            assert!(!files.is_empty(), "{target}: empty corpus");
            for (name, data) in files {
                eprintln!("{name}");
                run(&data);
            }
        }
    }

    /// Inputs that once failed (fuzz/crashes/, bugs since fixed) pass: regression tests.
    #[test]
    fn crashes_replay_clean() {
        for (target, run) in TARGETS {
            for (name, data) in inputs("crashes", target) {
                eprintln!("{name}");
                run(&data);
            }
        }
    }

    /// The checked-in seeds are the generated ones (regenerate with
    /// `cargo test --lib -- --ignored write_seed_corpus`).
    #[test]
    fn corpus_is_generated() {
        for (target, name, data) in seeds::all() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("corpus")
                .join(target)
                .join(&name);
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == data,
                "{target}/{name} is stale: regenerate the corpus"
            );
        }
    }

    #[test]
    #[ignore = "writes fuzz/corpus/"]
    fn write_seed_corpus() {
        seeds::write_all(&Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")).unwrap();
    }

    #[test]
    fn rx_input_round_trips() {
        for (target, name, data) in seeds::all() {
            if target == "rx_writer" {
                let parsed = rx_writer::RxInput::parse(&data);
                assert_eq!(parsed.encode(), data, "{name}");
            }
            if target == "tx_reader" {
                let parsed = tx_reader::TxInput::parse(&data);
                assert_eq!(parsed.encode(), data, "{name}");
            }
        }
    }

    /// Empty, short and uniform inputs are inputs too.
    #[test]
    fn degenerate_inputs() {
        for (_, run) in TARGETS {
            for data in [&[][..], &[0xff; 1], &[0; 64], &[0xff; 300]] {
                run(data);
            }
        }
    }
}

#[cfg(test)]
mod seed_paths {
    use crate::{rx_writer, seeds};

    /// What each RX seed is for actually happens.
    #[test]
    fn rx_seeds_reach_their_paths() {
        for (target, name, data) in seeds::all() {
            if target != "rx_writer" {
                continue;
            }
            let s = rx_writer::run_input(&rx_writer::RxInput::parse(&data));
            eprintln!(
                "{name}: packets {} segmented {} gso {} multi {} csum {} bad {} oversize {} offload {} kernel {}",
                s.rx_packets,
                s.rx_segmented,
                s.rx_gso,
                s.rx_multi_buffer,
                s.rx_csum_completed,
                s.rx_drop_bad_chain,
                s.rx_drop_oversize,
                s.rx_drop_offload,
                s.rx_drop_kernel
            );
        }
    }
}

#[cfg(test)]
mod tx_seed_paths {
    use crate::{seeds, tx_reader};

    /// What each TX seed is for actually happens.
    #[test]
    fn tx_seeds_reach_their_paths() {
        for (target, name, data) in seeds::all() {
            if target != "tx_reader" {
                continue;
            }
            let s = tx_reader::run_input(&tx_reader::TxInput::parse(&data));
            eprintln!(
                "{name}: packets {} gso {} malformed {} unnegotiated {} spoofed {} oversize {} kernel {} disabled {} backpressure {}",
                s.tx_packets,
                s.tx_gso,
                s.tx_drop_malformed,
                s.tx_drop_unnegotiated,
                s.tx_drop_spoofed,
                s.tx_drop_oversize,
                s.tx_drop_kernel,
                s.tx_drop_disabled,
                s.tx_backpressure
            );
            let reached = match name.as_str() {
                "eagain_then_resumed" => s.tx_backpressure > 0,
                "refusals_and_partial_sends" => s.tx_drop_kernel > 0 && s.tx_drop_oversize > 0,
                "malformed_chains_wrapping_indices" => s.tx_drop_malformed > 0,
                "offloads_not_negotiated" => s.tx_drop_unnegotiated > 0,
                "disabled_then_enabled" => s.tx_drop_disabled > 0,
                "source_checked" => s.tx_drop_spoofed > 0,
                _ => true,
            };
            assert!(reached && s.tx_packets > 0, "{name} misses its path");
            if name == "well_formed_mix" {
                assert!(s.tx_gso > 0, "{name} sends no GSO frame");
            }
        }
    }
}

#[cfg(test)]
mod debug {
    /// Prints how the target named by FUZZ_TARGET reads the input in FUZZ_INPUT, then runs it:
    /// `FUZZ_TARGET=rx_writer FUZZ_INPUT=crash-... cargo test --lib describe -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a debugging aid"]
    fn describe() {
        let target = std::env::var("FUZZ_TARGET").expect("FUZZ_TARGET");
        let data = std::fs::read(std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT")).unwrap();
        if target == "rx_writer" {
            let input = crate::rx_writer::RxInput::parse(&data);
            eprintln!(
                "features {:#x} legacy_kernel_hdr {} queue {} start {} used_event {} avail_flags {:#x}",
                input.features,
                input.legacy_kernel_hdr,
                1u32 << input.queue_log2,
                input.start,
                input.used_event,
                input.avail_flags
            );
            for (i, r) in input.rounds.iter().enumerate() {
                eprintln!("round {i}:");
                for c in &r.chains {
                    eprintln!("  chain {:?} {:?}", c.kind, c.lens);
                }
                for f in &r.frames {
                    match f {
                        crate::rx_writer::FrameSpec::Frame {
                            header,
                            vlan,
                            data,
                            pad,
                        } => eprintln!(
                            "  frame header {header:02x?} vlan {vlan:x?} {} bytes + {pad} pattern, starts {:02x?}",
                            data.len(),
                            &data[..data.len().min(40)]
                        ),
                        crate::rx_writer::FrameSpec::Fail(e) => eprintln!("  socket error {e}"),
                    }
                }
            }
        }
        let run = crate::TARGETS
            .iter()
            .find(|(n, _)| *n == target)
            .expect("target")
            .1;
        run(&data);
    }
}

#[cfg(test)]
mod timing {
    /// Microseconds per run of each seed: `cargo test --release --lib seed_timing -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a measurement"]
    fn seed_timing() {
        for (target, name, data) in crate::seeds::all() {
            let run = crate::TARGETS.iter().find(|(n, _)| *n == target).unwrap().1;
            let t = std::time::Instant::now();
            for _ in 0..20 {
                run(&data);
            }
            eprintln!("{target}/{name}: {} us", t.elapsed().as_micros() / 20);
        }
    }
}
