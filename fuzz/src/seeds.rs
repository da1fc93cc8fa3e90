//! The seed corpus: a handful of small, meaningful inputs per target, built from the project's
//! own test data (the kernel header from header.rs's tests, the GSO fixtures Linux segmented in
//! tests/fixtures/gso). `cargo test --lib -- --ignored write_seed_corpus` (in fuzz/) writes
//! them to corpus/<target>/; the files are checked in.

use std::path::{Path, PathBuf};

use crate::chain::{Desc, F_INDIRECT, F_NEXT, F_WRITE};
use crate::input::Writer;
use crate::rx_writer::{ChainKind, ChainSpec, FrameSpec, Round, RxInput};
use crate::tx_reader::{Step, TxChain, TxInput, TxRound};

// Feature bits (virtio 1.2, 5.1.3).
const CSUM: u64 = 1 << 0;
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const GUEST_TSO6: u64 = 1 << 8;
const GUEST_ECN: u64 = 1 << 9;
const HOST_TSO4: u64 = 1 << 11;
const HOST_TSO6: u64 = 1 << 12;
const MRG_RXBUF: u64 = 1 << 15;
const EVENT_IDX: u64 = 1 << 29;
const VERSION_1: u64 = 1 << 32;
const GUEST_USO4: u64 = 1 << 54;

/// The header the kernel produced for a 30000-byte TCP GSO frame (src/virtio/header.rs tests,
/// kernel-facts.md §2b): NEEDS_CSUM, TCPV4, hdr_len 54, gso_size 1448, csum 34/16.
pub const KERNEL_HEADER: [u8; 12] = [
    0x01, 0x01, 0x36, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00, 0x00, 0x00,
];

/// One GSO fixture: the vnet header and the frame Linux segmented.
pub struct Fixture {
    pub name: String,
    pub vnet: [u8; 12],
    pub input: Vec<u8>,
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gso")
}

fn hex(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
        .collect()
}

pub fn fixture(name: &str) -> Fixture {
    let path = fixtures_dir().join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut f = Fixture {
        name: name.to_owned(),
        vnet: [0; 12],
        input: Vec::new(),
    };
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("vnet", h)) => f.vnet.copy_from_slice(&hex(h.trim())),
            Some(("in", h)) => f.input = hex(h.trim()),
            _ => {}
        }
    }
    assert!(!f.input.is_empty(), "{name}: no input frame");
    f
}

pub const FIXTURES: [&str; 14] = [
    "tcp4",
    "tcp4_cwr_no_ecn",
    "tcp4_ecn",
    "tcp4_ipopts",
    "tcp4_nodf",
    "tcp4_odd",
    "tcp4_options",
    "tcp4_single",
    "tcp4_vlan",
    "tcp6",
    "tcp6_options_qinq",
    "udp4",
    "udp4_vlan",
    "udp6",
];

/// (target, file name, bytes) of every seed.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, data) in header() {
        out.push(("header", name, data));
    }
    for (name, data) in chain() {
        out.push(("chain", name, data));
    }
    for (name, data) in rx_writer() {
        out.push(("rx_writer", name, data));
    }
    for (name, data) in segment() {
        out.push(("segment", name, data));
    }
    for (name, data) in tx_reader() {
        out.push(("tx_reader", name, data));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn header_input(
    sel: u8,
    view: &[u8],
    tx: [u8; 12],
    frame_len: u32,
    features: u64,
    frame_offset: u8,
    cuts: [u8; 4],
    frame: &[u8],
) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(sel)
        .u8(view.len() as u8)
        .bytes(view)
        .bytes(&[
            0x02, 0x84, 0x34, 0x12, 0x78, 0x56, 0xbc, 0x9a, 0xf0, 0xde, 0x02, 0x01,
        ])
        .bytes(&tx)
        .u32(frame_len)
        .u64(features)
        .u8(frame_offset)
        .bytes(&cuts)
        .bytes(frame);
    w.out
}

fn header() -> Vec<(String, Vec<u8>)> {
    let tcp4 = fixture("tcp4");
    let udp4 = fixture("udp4");
    let tcp6 = fixture("tcp6");
    let vlan = fixture("tcp4_vlan");
    let prefix = |f: &Fixture| f.input[..96].to_vec();
    let len = |f: &Fixture| f.input.len() as u32;
    // A NEEDS_CSUM-only header for the first segment-sized piece of tcp4 (a frame the guest
    // sends without TSO): csum 34/16 over 1502 bytes.
    let mut plain = KERNEL_HEADER;
    plain[1] = 0;
    let mut single = fixture("tcp4_single").input;
    single.truncate(1000);
    vec![
        (
            "kernel_header_tcp4_gso".into(),
            header_input(
                3,
                &KERNEL_HEADER,
                KERNEL_HEADER,
                len(&tcp4),
                GUEST_CSUM | GUEST_TSO4 | MRG_RXBUF | VERSION_1,
                0,
                [14, 20, 20, 0],
                &prefix(&tcp4),
            ),
        ),
        (
            "legacy_10_byte_header".into(),
            header_input(
                0,
                &KERNEL_HEADER[..10],
                tcp4.vnet,
                len(&tcp4),
                0,
                0,
                [0; 4],
                &prefix(&tcp4),
            ),
        ),
        (
            "udp_l4_header".into(),
            header_input(
                2,
                &udp4.vnet,
                udp4.vnet,
                len(&udp4),
                GUEST_CSUM | GUEST_USO4,
                12,
                [40, 1, 7, 3],
                &prefix(&udp4),
            ),
        ),
        (
            "tcp6_header_vlan_prefix".into(),
            header_input(
                3,
                &tcp6.vnet,
                tcp6.vnet,
                len(&tcp6),
                GUEST_CSUM | GUEST_TSO6 | GUEST_ECN,
                0,
                [0; 4],
                &prefix(&tcp6),
            ),
        ),
        (
            "tcp4_vlan_header".into(),
            header_input(
                3,
                &vlan.vnet,
                vlan.vnet,
                len(&vlan),
                GUEST_CSUM,
                2,
                [18, 38, 0, 0],
                &prefix(&vlan),
            ),
        ),
        (
            "needs_csum_split_field".into(),
            header_input(
                3,
                &plain,
                plain,
                single.len() as u32,
                0,
                10,
                [60, 1, 200, 0],
                &single,
            ),
        ),
        (
            "short_view".into(),
            header_input(
                1,
                &KERNEL_HEADER[..11],
                KERNEL_HEADER,
                20,
                0,
                0,
                [0; 4],
                &[],
            ),
        ),
    ]
}

/// A chain input; `table` and `indirect` as descriptors, `ops` as (code, a, b, c).
fn chain_input(
    cfg: u8,
    start: u16,
    count: u8,
    heads: &[u8],
    table: &[Desc],
    indirect: &[Desc],
    ops: &[(u8, u16, u16, u8)],
) -> Vec<u8> {
    let size = 1usize << ((cfg & 7) % 6);
    let mut w = Writer::default();
    w.u8(cfg).u16(start).u8(count);
    let mut h = heads.to_vec();
    h.resize(size, 0);
    w.bytes(&h);
    for i in 0..size {
        table.get(i).copied().unwrap_or_default().encode(&mut w);
    }
    w.u8(indirect.len() as u8);
    for d in indirect {
        d.encode(&mut w);
    }
    for &(code, a, b, c) in ops {
        w.u8(code).u16(a).u16(b).u8(c).u16(0x41);
    }
    w.out
}

fn d(addr: u16, len: u16, flags: u8, next: u8) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
        mode: 0,
    }
}

/// One of each scatter operation on chain `which`.
fn every_op(which: u8) -> Vec<(u8, u16, u16, u8)> {
    let w = which << 3;
    vec![
        (w, 0, 12, 0),
        (w | 1, 10, 40, 0),
        (w | 2, 12, 100, 4),
        (w | 3, 5, 3000, 0),
        (w | 4, 400, 2, 10),
        (w | 5, 0, 0, 0),
        (w, 1000, 5000, 0),
    ]
}

fn chain() -> Vec<(String, Vec<u8>)> {
    let (w, n) = (F_WRITE, F_NEXT);
    let mut out = Vec::new();
    // Queue of 8, four RX chains of one to three descriptors.
    out.push((
        "rx_chains".into(),
        chain_input(
            3,
            0,
            4,
            &[0, 1, 3, 6],
            &[
                d(0x800, 1536, w, 0),
                d(0x1000, 12, w | n, 2),
                d(0x1100, 1500, w, 0),
                d(0x1800, 100, w | n, 4),
                d(0x1900, 0, w | n, 5),
                d(0x1a00, 200, w, 0),
                d(0x700, 64, w, 0),
            ],
            &[],
            &[every_op(0), every_op(1), every_op(2)].concat(),
        ),
    ));
    // TX chains (device-readable) with the header in a descriptor of its own, and one that
    // straddles two adjacent regions.
    out.push((
        "tx_chains_two_regions".into(),
        chain_input(
            2 | 8 | 16,
            0xfffe,
            3,
            &[0, 2, 3],
            &[
                d(0x900, 12, n, 1),
                d(0x1000, 1514, 0, 0),
                d(0x1ff0, 0x40, 0, 0),
                d(0x2f00, 0x200, 0, 0),
            ],
            &[],
            &[every_op(0), every_op(1), every_op(2)].concat(),
        ),
    ));
    // An indirect chain (three descriptors in the table at 0x500), and one in a second region
    // after a gap.
    out.push((
        "indirect".into(),
        chain_input(
            1 | 8,
            7,
            2,
            &[0, 1],
            &[d(0x500, 48, F_INDIRECT, 0), d(0x3100, 256, w, 0)],
            &[
                d(0x800, 12, w | n, 1),
                d(0x900, 500, w | n, 2),
                d(0x3000, 1000, w, 0),
            ],
            &every_op(0),
        ),
    ));
    // Broken chains: wrong direction, outside memory, in the gap, wrapping, a loop, a next
    // outside the table, an indirect table inside an indirect table, a bad table length, a
    // head outside the table.
    let mut wrap = d(4, 16, w, 0);
    wrap.mode = 1;
    let mut far = d(0, 16, w, 0);
    far.mode = 2;
    let mut huge = d(0x800, 0, w, 0);
    huge.mode = 4;
    out.push((
        "malformed".into(),
        chain_input(
            4 | 8,
            0,
            16,
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 200, 12, 13, 14],
            &[
                d(0x800, 100, 0, 0),
                d(0x800, 100, w | n, 15),
                d(0x2800, 16, w, 0),
                wrap,
                far,
                d(0x800, 64, w | n, 5),
                d(0x900, 64, w | n, 6),
                d(0x900, 64, w | n, 40),
                d(0x500, 32, F_INDIRECT, 0),
                d(0x500, 24, F_INDIRECT, 0),
                huge,
                d(0x1ff8, 16, w, 0),
                d(0, 0, w, 0),
                d(0x4000, 1, w, 0),
                d(0x700, 16, w | n, 0),
                d(0x700, 16, n, 0),
            ],
            &[d(0x500, 16, F_INDIRECT, 0), d(0x800, 10, w, 0)],
            &[],
        ),
    ));
    // An indirect head that also says NEXT (refused by resolve_from_queue).
    out.push((
        "indirect_head_with_next".into(),
        chain_input(
            1,
            0,
            2,
            &[0, 1],
            &[d(0x500, 32, F_INDIRECT | n, 1), d(0x900, 64, w, 0)],
            &[d(0x800, 16, w | n, 1), d(0x810, 16, w, 0)],
            &every_op(0),
        ),
    ));
    // The avail index more than a ring ahead: nothing may be popped.
    out.push((
        "avail_index_too_far".into(),
        chain_input(2, 0, 5, &[0, 1, 2, 3], &[d(0x800, 100, w, 0)], &[], &[]),
    ));
    out
}

fn frame(header: [u8; 12], data: &[u8]) -> FrameSpec {
    FrameSpec::Frame {
        header,
        vlan: None,
        data: data.to_vec(),
        pad: 0,
    }
}

fn chains(n: usize, lens: &[u16]) -> Vec<ChainSpec> {
    vec![
        ChainSpec {
            kind: ChainKind::Direct,
            lens: lens.to_vec(),
        };
        n
    ]
}

/// A small Ethernet frame (IPv4 header and a few bytes).
fn small_frame(len: usize) -> Vec<u8> {
    let mut f = fixture("tcp4_single").input;
    f.truncate(len);
    f
}

fn rx_writer() -> Vec<(String, Vec<u8>)> {
    let tcp4 = fixture("tcp4");
    let udp4 = fixture("udp4");
    let mrg = MRG_RXBUF | VERSION_1;
    let plain = [0u8; 12];
    let base = RxInput {
        features: mrg,
        queue_log2: 5,
        start: 0,
        look_first: true,
        ..RxInput::default()
    };
    let with = |features: u64, rounds: Vec<Round>| RxInput {
        features,
        rounds,
        ..base.clone()
    };
    let mut out = Vec::new();
    out.push((
        "mergeable_small_frames",
        with(
            mrg | EVENT_IDX,
            vec![Round {
                chains: chains(8, &[1536]),
                frames: vec![
                    frame(plain, &small_frame(60)),
                    frame(plain, &small_frame(1000)),
                    frame(plain, &small_frame(14)),
                ],
            }],
        ),
    ));
    out.push((
        "gso_segmented_full_csum",
        with(
            mrg,
            vec![Round {
                chains: chains(12, &[1536]),
                frames: vec![frame(tcp4.vnet, &tcp4.input)],
            }],
        ),
    ));
    out.push((
        "gso_segmented_partial_csum",
        with(
            mrg | GUEST_CSUM,
            vec![Round {
                chains: chains(8, &[12, 2000]),
                frames: vec![frame(udp4.vnet, &udp4.input)],
            }],
        ),
    ));
    // A guest with every TSO feature gets frames received straight into its buffers.
    let tso = mrg | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6;
    let mut ufo = tcp4.vnet;
    ufo[1] = 3;
    out.push((
        "direct_vlan_refused_and_short",
        with(
            tso,
            vec![Round {
                chains: chains(6, &[1000, 1000]),
                frames: vec![
                    FrameSpec::Frame {
                        header: tcp4.vnet,
                        vlan: Some((0x8100, 5)),
                        data: small_frame(1054),
                        pad: 0,
                    },
                    frame(ufo, &small_frame(800)),
                    frame(plain, &small_frame(11)),
                    frame(plain, &small_frame(1000)),
                ],
            }],
        ),
    ));
    out.push((
        "gso_delivered_whole",
        with(
            tso,
            vec![Round {
                chains: chains(4, &[4096]),
                frames: vec![frame(tcp4.vnet, &tcp4.input)],
            }],
        ),
    ));
    // A stripped VLAN tag put back, and a NEEDS_CSUM frame completed for a guest without
    // GUEST_CSUM.
    let mut needs = KERNEL_HEADER;
    needs[1] = 0;
    out.push((
        "vlan_and_checksum_completion",
        with(
            mrg,
            vec![Round {
                chains: vec![
                    ChainSpec {
                        kind: ChainKind::Direct,
                        lens: vec![20, 30, 1500],
                    },
                    ChainSpec {
                        kind: ChainKind::Indirect,
                        lens: vec![12, 700],
                    },
                ],
                frames: vec![
                    FrameSpec::Frame {
                        header: needs,
                        vlan: Some((0x8100, 0x2abc)),
                        data: small_frame(400),
                        pad: 0,
                    },
                    FrameSpec::Frame {
                        header: needs,
                        vlan: None,
                        data: small_frame(300),
                        pad: 0,
                    },
                ],
            }],
        ),
    ));
    out.push((
        "legacy_ten_byte_header",
        with(
            0,
            vec![Round {
                chains: chains(3, &[100, 1500]),
                frames: vec![
                    frame(plain, &small_frame(200)),
                    frame(plain, &small_frame(1590)),
                ],
            }],
        ),
    ));
    out.push((
        "kernel_header_10_guest_12",
        RxInput {
            legacy_kernel_hdr: true,
            ..with(
                mrg,
                vec![Round {
                    chains: chains(4, &[11, 600]),
                    frames: vec![
                        frame(plain, &small_frame(1000)),
                        FrameSpec::Frame {
                            header: plain,
                            vlan: Some((0x88a8, 7)),
                            data: small_frame(100),
                            pad: 0,
                        },
                    ],
                }],
            )
        },
    ));
    // Every kind of broken chain among good ones, and every socket error.
    let broken = [
        ChainKind::Direct,
        ChainKind::ReadOnly,
        ChainKind::Direct,
        ChainKind::OutOfMemory,
        ChainKind::Unterminated,
        ChainKind::Direct,
        ChainKind::BadIndirect,
        ChainKind::HeadOutOfRange,
        ChainKind::Direct,
        ChainKind::Unterminated,
        ChainKind::Indirect,
    ]
    .iter()
    .enumerate()
    .map(|(i, &kind)| ChainSpec {
        kind,
        lens: vec![700; 1 + i % 2],
    })
    .collect();
    out.push((
        "malformed_chains_and_errors",
        RxInput {
            start: 0xfff0,
            used_event: 0xfff2,
            ..with(
                mrg | EVENT_IDX,
                vec![Round {
                    chains: broken,
                    frames: vec![
                        frame(plain, &small_frame(1400)),
                        FrameSpec::Fail(1),
                        frame(plain, &small_frame(600)),
                        FrameSpec::Fail(3),
                        frame(plain, &small_frame(10)),
                        FrameSpec::Fail(2),
                        frame(plain, &small_frame(100)),
                    ],
                }],
            )
        },
    ));
    // Segments wait for buffers the guest posts later.
    out.push((
        "segments_wait_for_buffers",
        with(
            mrg,
            vec![
                Round {
                    chains: chains(3, &[4096]),
                    frames: vec![frame(tcp4.vnet, &tcp4.input)],
                },
                Round {
                    chains: chains(10, &[1536]),
                    frames: vec![],
                },
            ],
        ),
    ));
    out.push((
        "no_mrg_rxbuf_oversize",
        with(
            VERSION_1,
            vec![Round {
                chains: vec![
                    ChainSpec {
                        kind: ChainKind::Direct,
                        lens: vec![1000],
                    },
                    ChainSpec {
                        kind: ChainKind::Direct,
                        lens: vec![12, 3000],
                    },
                ],
                frames: vec![
                    frame(plain, &small_frame(1500)),
                    frame(plain, &small_frame(900)),
                ],
            }],
        ),
    ));
    // A maximal frame (65549 bytes) into 64 KiB of buffers and more.
    out.push((
        "maximal_frame",
        RxInput {
            queue_log2: 6,
            ..with(
                mrg,
                vec![Round {
                    chains: chains(40, &[2048]),
                    frames: vec![
                        FrameSpec::Frame {
                            header: plain,
                            vlan: Some((0x8100, 1)),
                            data: small_frame(64),
                            pad: (65549 - 64) as u16,
                        },
                        frame(plain, &small_frame(64)),
                    ],
                }],
            )
        },
    ));
    // Chains of 64 tiny buffers: the chains staged for a burst hold more iovecs than one
    // recvmsg takes (20 x 64 = 1280 > 1024).
    out.push((
        "tiny_buffers_beyond_uio_maxiov",
        RxInput {
            queue_log2: 8,
            ..with(
                mrg | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6,
                vec![Round {
                    chains: vec![
                        ChainSpec {
                            kind: ChainKind::Indirect,
                            lens: vec![16; 64],
                        };
                        20
                    ],
                    frames: vec![
                        frame(plain, &small_frame(100)),
                        frame(plain, &small_frame(60)),
                        frame(plain, &small_frame(100)),
                        FrameSpec::Frame {
                            header: plain,
                            vlan: None,
                            data: small_frame(64),
                            pad: 3000,
                        },
                    ],
                }],
            )
        },
    ));
    out.into_iter()
        .map(|(name, input)| (name.to_owned(), input.encode()))
        .collect()
}

fn segment() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in FIXTURES {
        let f = fixture(name);
        out.push((
            name.to_owned(),
            crate::segment::encode(&f.vnet, false, None, &f.input),
        ));
    }
    for name in ["tcp4_odd", "udp4_vlan"] {
        let f = fixture(name);
        out.push((
            format!("{name}_partial"),
            crate::segment::encode(&f.vnet, true, None, &f.input),
        ));
    }
    let f = fixture("tcp4_odd");
    out.push((
        "tcp4_odd_too_many_segments".into(),
        crate::segment::encode(&f.vnet, false, Some(5), &f.input),
    ));
    out
}

/// A TX chain of `kind` over descriptors `lens` holding `header` and `data`.
fn tx_chain(kind: ChainKind, lens: &[u16], header: [u8; 12], data: &[u8]) -> TxChain {
    TxChain {
        spec: ChainSpec {
            kind,
            lens: lens.to_vec(),
        },
        header,
        data: data.to_vec(),
    }
}

/// A well-formed chain holding exactly a header and `data`, split after the first `split`
/// bytes (0: one descriptor).
fn tx_frame(header: [u8; 12], data: &[u8], split: u16) -> TxChain {
    let total = 12 + data.len() as u16;
    let lens = if split == 0 || split >= total {
        vec![total]
    } else {
        vec![split, total - split]
    };
    tx_chain(ChainKind::Direct, &lens, header, data)
}

fn tx_round(chains: Vec<TxChain>, steps: Vec<Step>) -> TxRound {
    TxRound {
        chains,
        steps,
        ..TxRound::default()
    }
}

fn tx_reader() -> Vec<(String, Vec<u8>)> {
    let tcp4 = fixture("tcp4");
    let udp4 = fixture("udp4");
    let plain = [0u8; 12];
    let offloads = VERSION_1 | CSUM | HOST_TSO4 | HOST_TSO6;
    let base = TxInput {
        features: offloads,
        queue_log2: 8,
        ..TxInput::default()
    };
    let with = |features: u64, rounds: Vec<TxRound>| TxInput {
        features,
        rounds,
        ..base.clone()
    };
    // Small frames, header split anywhere, a TSO frame longer than the header copy.
    let mix = || {
        vec![
            tx_frame(plain, &small_frame(60), 0),
            tx_frame(plain, &small_frame(100), 12),
            tx_frame(plain, &small_frame(100), 5),
            tx_frame(tcp4.vnet, &tcp4.input, 40),
            tx_frame(plain, &small_frame(300), 200),
            tx_chain(
                ChainKind::Indirect,
                &[6, 6, 100, 2000],
                plain,
                &small_frame(80),
            ),
        ]
    };
    let mut other = small_frame(100);
    other[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    let broken = [
        ChainKind::Direct,
        ChainKind::ReadOnly,
        ChainKind::Direct,
        ChainKind::OutOfMemory,
        ChainKind::Unterminated,
        ChainKind::Direct,
        ChainKind::BadIndirect,
        ChainKind::HeadOutOfRange,
        ChainKind::Direct,
        ChainKind::Unterminated,
        ChainKind::Indirect,
    ]
    .iter()
    .enumerate()
    .map(|(i, &kind)| tx_chain(kind, &vec![70; 1 + i % 2], plain, &small_frame(120)))
    .collect();
    let out: Vec<(&str, TxInput)> = vec![
        (
            "well_formed_mix",
            with(offloads, vec![tx_round(mix(), vec![])]),
        ),
        (
            "legacy_guest_ten_byte_header",
            with(0, vec![tx_round(mix(), vec![])]),
        ),
        (
            "kernel_header_10_guest_12",
            TxInput {
                legacy_kernel_hdr: true,
                ..with(offloads, vec![tx_round(mix(), vec![])])
            },
        ),
        (
            "eagain_then_resumed",
            with(
                offloads,
                vec![
                    TxRound {
                        then_full: true,
                        ..tx_round(mix(), vec![Step::Take(2), Step::Full])
                    },
                    TxRound {
                        then_full: true,
                        ..tx_round(vec![], vec![Step::Take(1)])
                    },
                    tx_round(mix(), vec![Step::Interrupted, Step::Take(3), Step::Take(0)]),
                ],
            ),
        ),
        (
            "refusals_and_partial_sends",
            with(
                offloads,
                vec![tx_round(
                    [mix(), mix()].concat(),
                    vec![
                        Step::Take(1),
                        Step::Refuse(0),
                        Step::Take(2),
                        Step::Refuse(1),
                        Step::Refuse(2),
                        Step::Take(1),
                        Step::Refuse(3),
                    ],
                )],
            ),
        ),
        (
            "malformed_chains_wrapping_indices",
            TxInput {
                start: 0xfff0,
                used_event: 0xfff2,
                ..with(
                    offloads | EVENT_IDX,
                    vec![
                        TxRound {
                            then_full: true,
                            ..tx_round(broken, vec![Step::Take(3), Step::Full])
                        },
                        tx_round(vec![tx_frame(plain, &[0; 10], 0)], vec![]),
                    ],
                )
            },
        ),
        (
            "offloads_not_negotiated",
            with(
                VERSION_1,
                vec![tx_round(
                    vec![
                        tx_frame(tcp4.vnet, &tcp4.input, 0),
                        tx_frame(udp4.vnet, &udp4.input, 0),
                        tx_frame(plain, &small_frame(100), 0),
                    ],
                    vec![],
                )],
            ),
        ),
        (
            "disabled_then_enabled",
            with(
                offloads,
                vec![
                    TxRound {
                        disabled: true,
                        ..tx_round(mix(), vec![])
                    },
                    tx_round(mix(), vec![]),
                ],
            ),
        ),
        (
            "source_checked",
            TxInput {
                check_source: true,
                ..with(
                    offloads,
                    vec![tx_round(
                        vec![
                            tx_frame(plain, &small_frame(100), 0),
                            tx_frame(plain, &other, 0),
                            tx_frame(plain, &small_frame(60), 0),
                        ],
                        vec![],
                    )],
                )
            },
        ),
        (
            "four_full_batches",
            with(
                VERSION_1,
                vec![
                    tx_round(
                        vec![tx_frame(plain, &small_frame(60), 0); 255],
                        vec![Step::Full],
                    ),
                    tx_round(
                        vec![tx_frame(plain, &small_frame(60), 0)],
                        vec![Step::Take(50)],
                    ),
                ],
            ),
        ),
    ];
    out.into_iter()
        .map(|(name, input)| (name.to_owned(), input.encode()))
        .collect()
}

/// Writes every seed to `corpus/<target>/<name>` under `dir`.
pub fn write_all(dir: &Path) -> std::io::Result<()> {
    for (target, name, data) in all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), data)?;
    }
    Ok(())
}
