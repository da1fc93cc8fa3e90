//! `tx_reader`: `TxPath::process` (and `discard`, a disabled ring), the code that reads guest
//! TX chains and hands them to the packet socket, driven in-process against a split ring in
//! guest memory with any negotiated features and a scripted `FrameSink`: the input says, call by
//! call, whether the sink takes messages (all, or only some: a partial send), refuses the first
//! one (EINVAL, EMSGSIZE, ENOBUFS, ENETDOWN), is full (EAGAIN) or is interrupted (EINTR), and
//! what it does once the script runs out (takes everything, or is full). Chains (sizes, count,
//! malformed ones, their header and frame bytes) come from the input, over up to three passes
//! (chains added before each, so chains held back by EAGAIN are taken again).
//!
//! Guest memory and the ring are [`crate::ring`]'s, with device-readable chains.
//!
//! Checks after every pass:
//! - nothing in guest memory but the used ring changed: descriptor table, avail ring, indirect
//!   tables, buffers, guards and the page after them are as the guest left them;
//! - every used element names, in avail order, a chain taken in this pass, with length 0; every
//!   chain taken (`next_avail` moved past it) is used, except entries naming no descriptor: so
//!   `next_avail` (what GET_VRING_BASE returns) is exact, chains held back by EAGAIN are still
//!   in the avail ring, and none is used twice over all passes;
//! - `used.idx` in guest memory is the queue's `next_used`; a drained pass took everything
//!   posted;
//! - every message the sink took is, byte for byte, a chain of this pass (its header cut to the
//!   kernel's length, then its frame), in avail order, each at most once; its first iovec is
//!   the host copy, not guest memory; its header asks only for offloads the guest negotiated;
//! - counters: `tx_packets` is the messages taken, `tx_bytes` their frame bytes, kernel and
//!   oversize drops the sink's refusals, and packets plus drops the entries completed.
//!
//! Input (see [`TxInput::parse`]): features (8), cfg (1: bit 0 kernel header 10 bytes for a
//! 12-byte guest header, bit 1 source MAC checked (learned from the first unicast frame), bits
//! 4-7 queue size 2^(n mod 9)), start (2: initial ring indices), used_event (2), avail_flags
//! (2), rounds (1: 1 + n mod 3), then per round: mode (1: bit 0 the sink is full once its
//! script runs out, bit 1 the ring is disabled (`discard`)), chain count (1), chains, sink step
//! count (1, mod 17), steps (1 each: bits 0-1: 0 take at most `n >> 2` messages (0: all), 1
//! refuse with errno `(n >> 2) mod 4`, 2 EAGAIN, 3 EINTR). A chain is kind (1: as `rx_writer`'s)
//! and a 2-byte length per descriptor, the 12-byte virtio header, data length (2) and data; the
//! chain holds the header (cut to the guest's length), the data, then a pattern.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;

use libc::mmsghdr;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use vhost_packet::datapath::mac::{GuestMac, MacPolicy};
use vhost_packet::datapath::tx::{FrameSink, TxContext, TxOutcome, TxPath};
use vhost_packet::packet::socket::UIO_MAXIOV;
use vhost_packet::stats::PairStats;
use vhost_packet::virtio::chain::Access;
use vhost_packet::virtio::features::Negotiated;
use vhost_packet::virtio::header::{GsoKind, NetHeader};

use crate::input::{Reader, Writer};
use crate::ring::{
    fixed_areas, ChainKind, ChainSpec, Guest, BUFFERS, MEMORY, MEM_END, PAGE, REGION_SPLIT, USED,
};

/// What the sink does on one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Takes at most this many messages (0: all).
    Take(u8),
    /// Refuses the first message: 0 EINVAL, 1 EMSGSIZE, 2 ENOBUFS, 3 ENETDOWN.
    Refuse(u8),
    Full,
    Interrupted,
}

impl Step {
    fn from_byte(b: u8) -> Step {
        match b & 3 {
            0 => Step::Take(b >> 2),
            1 => Step::Refuse((b >> 2) % 4),
            2 => Step::Full,
            _ => Step::Interrupted,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Step::Take(n) => n << 2,
            Step::Refuse(e) => 1 | e << 2,
            Step::Full => 2,
            Step::Interrupted => 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxChain {
    pub spec: ChainSpec,
    pub header: [u8; 12],
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxRound {
    /// Once the steps run out the sink is full, not taking everything.
    pub then_full: bool,
    /// The ring is disabled: the pass discards.
    pub disabled: bool,
    pub chains: Vec<TxChain>,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxInput {
    pub features: u64,
    pub legacy_kernel_hdr: bool,
    pub check_source: bool,
    /// Queue size 2^queue_log2, 0..=8.
    pub queue_log2: u8,
    pub start: u16,
    pub used_event: u16,
    pub avail_flags: u16,
    pub rounds: Vec<TxRound>,
}

impl TxInput {
    pub fn parse(data: &[u8]) -> TxInput {
        let mut r = Reader::new(data);
        let features = r.u64();
        let cfg = r.u8();
        let mut input = TxInput {
            features,
            legacy_kernel_hdr: cfg & 1 != 0,
            check_source: cfg & 2 != 0,
            queue_log2: (cfg >> 4) % 9,
            start: r.u16(),
            used_event: r.u16(),
            avail_flags: r.u16(),
            rounds: Vec::new(),
        };
        let rounds = 1 + r.u8() % 3;
        for _ in 0..rounds {
            let mode = r.u8();
            let mut round = TxRound {
                then_full: mode & 1 != 0,
                disabled: mode & 2 != 0,
                ..TxRound::default()
            };
            for _ in 0..r.u8() {
                let b = r.u8();
                let n = (usize::from(b & 3) + 1) * if b & 0x20 != 0 { 16 } else { 1 };
                let lens = (0..n).map(|_| r.u16()).collect();
                let header = r.array::<12>();
                let len = usize::from(r.u16());
                round.chains.push(TxChain {
                    spec: ChainSpec {
                        kind: ChainKind::from_bits(b >> 2),
                        lens,
                    },
                    header,
                    data: r.bytes(len).to_vec(),
                });
            }
            for _ in 0..r.u8() % 17 {
                round.steps.push(Step::from_byte(r.u8()));
            }
            input.rounds.push(round);
        }
        input
    }

    /// The bytes [`parse`](Self::parse) reads back as `self` (for the seed corpus).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.features)
            .u8(u8::from(self.legacy_kernel_hdr)
                | u8::from(self.check_source) << 1
                | (self.queue_log2 << 4))
            .u16(self.start)
            .u16(self.used_event)
            .u16(self.avail_flags)
            .u8(self.rounds.len() as u8 - 1);
        for round in &self.rounds {
            w.u8(u8::from(round.then_full) | u8::from(round.disabled) << 1);
            w.u8(round.chains.len() as u8);
            for c in &round.chains {
                let n = c.spec.lens.len();
                let count = if n > 4 {
                    assert!(n % 16 == 0 && n <= 64, "{n} descriptors cannot be encoded");
                    0x20 | (n / 16 - 1) as u8
                } else {
                    n as u8 - 1
                };
                w.u8(count | (c.spec.kind.bits() << 2));
                for &l in &c.spec.lens {
                    w.u16(l);
                }
                w.bytes(&c.header).u16(c.data.len() as u16).bytes(&c.data);
            }
            w.u8(round.steps.len() as u8);
            for s in &round.steps {
                w.u8(s.byte());
            }
        }
        w.out
    }
}

/// A packet socket as TX sees it, following a script: see the module comment. Like the kernel,
/// it refuses a message of more than `UIO_MAXIOV` iovecs (EMSGSIZE).
struct Sink {
    hdr_len: usize,
    steps: RefCell<VecDeque<Step>>,
    then_full: Cell<bool>,
    /// Host address and length of guest memory's regions: a first iovec inside is a header
    /// sent from guest memory rather than from the checked copy.
    regions: Vec<(usize, usize)>,
    /// The bytes of every message taken in this pass.
    taken: RefCell<Vec<Vec<u8>>>,
    /// Messages refused in this pass (EMSGSIZE, other errors).
    refused: Cell<(u64, u64)>,
    /// Whether the sink said EAGAIN in this pass.
    blocked: Cell<bool>,
}

impl Sink {
    fn refuse(&self, errno: i32) -> io::Error {
        let (oversize, other) = self.refused.get();
        self.refused.set(if errno == libc::EMSGSIZE {
            (oversize + 1, other)
        } else {
            (oversize, other + 1)
        });
        io::Error::from_raw_os_error(errno)
    }
}

impl FrameSink for Sink {
    fn kernel_vnet_header_len(&self) -> usize {
        self.hdr_len
    }

    unsafe fn send_batch(&self, msgs: &mut [mmsghdr]) -> io::Result<usize> {
        assert!(!msgs.is_empty(), "sendmmsg of no message");
        let step = self.steps.borrow_mut().pop_front();
        let most = match step {
            Some(Step::Take(0)) => usize::MAX,
            Some(Step::Take(n)) => usize::from(n),
            Some(Step::Refuse(e)) => {
                return Err(self.refuse(
                    [libc::EINVAL, libc::EMSGSIZE, libc::ENOBUFS, libc::ENETDOWN][usize::from(e)],
                ))
            }
            Some(Step::Full) => {
                self.blocked.set(true);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Some(Step::Interrupted) => return Err(io::ErrorKind::Interrupted.into()),
            None if self.then_full.get() => {
                self.blocked.set(true);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            None => usize::MAX,
        };
        let mut n = 0;
        for m in msgs.iter().take(most) {
            let count = m.msg_hdr.msg_iovlen;
            if count > UIO_MAXIOV {
                if n > 0 {
                    break;
                }
                return Err(self.refuse(libc::EMSGSIZE));
            }
            assert!(count > 0, "a message of no iovec");
            // SAFETY: the caller guarantees the message's iovecs are valid and readable.
            let iovs = unsafe { std::slice::from_raw_parts(m.msg_hdr.msg_iov, count) };
            let first = iovs[0].iov_base as usize;
            assert!(
                !self
                    .regions
                    .iter()
                    .any(|&(base, len)| (base..base + len).contains(&first)),
                "a message's header went from guest memory, not from the checked copy"
            );
            let mut bytes = Vec::new();
            for v in iovs {
                // SAFETY: as above.
                bytes.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                });
            }
            self.taken.borrow_mut().push(bytes);
            n += 1;
        }
        Ok(n)
    }
}

pub fn run(data: &[u8]) {
    run_input(&TxInput::parse(data));
}

/// The bytes of chain `spec` as posted: header, data, then a pattern.
fn chain_contents(c: &TxChain, hdr_len: usize) -> Vec<u8> {
    let total: usize = c.spec.lens.iter().map(|&l| usize::from(l)).sum();
    let mut bytes = c.header[..hdr_len].to_vec();
    bytes.extend_from_slice(&c.data);
    let n = bytes.len();
    bytes.extend((n..total.max(n)).map(|i| (i * 7 + i / 251) as u8));
    bytes.truncate(total);
    bytes
}

/// Runs the passes and checks them; returns the pair's counters.
pub fn run_input(input: &TxInput) -> PairStats {
    let features = Negotiated::new(input.features);
    let hdr_len = features.header_len();
    let kernel_hdr = if input.legacy_kernel_hdr { 10 } else { hdr_len };
    let size = 1u16 << input.queue_log2;

    let mut guest = Guest::for_input(
        input
            .rounds
            .iter()
            .flat_map(|r| &r.chains)
            .flat_map(|c| &c.spec.lens)
            .map(|&l| u64::from(l)),
        size,
        input.start,
        input.avail_flags,
        input.used_event,
        Access::DeviceReads,
    );
    let (buf_start, buf_end) = (guest.buf_start, guest.buf_end);

    let sink = Sink {
        hdr_len: kernel_hdr,
        steps: RefCell::new(VecDeque::new()),
        then_full: Cell::new(false),
        regions: guest
            .m
            .regions
            .iter()
            .map(|&(_, host, len)| (host, len))
            .collect(),
        taken: RefCell::new(Vec::new()),
        refused: Cell::new((0, 0)),
        blocked: Cell::new(false),
    };
    let mac = GuestMac::new(
        MacPolicy {
            guest_mac: None,
            promisc: false,
            allow_spoofing: false,
        },
        Vec::new(),
    )
    .expect("a guest MAC over no socket");
    let mut tx = TxPath::default();
    let mut stats = PairStats::default();
    // What each posted entry holds (its bytes), by position in `guest.posted`.
    let mut contents: Vec<Vec<u8>> = Vec::new();

    for round in &input.rounds {
        let from = guest.posted.len();
        for c in &round.chains {
            if !guest.post(&c.spec) {
                break;
            }
        }
        guest.publish(from, 0);
        for (p, c) in guest.posted[from..].iter().zip(&round.chains) {
            let bytes = chain_contents(c, hdr_len);
            let mut at = 0;
            for (addr, n) in guest.chain_bytes(p, bytes.len()) {
                // A descriptor outside guest memory holds nothing.
                let _ = guest
                    .m
                    .mem
                    .write_slice(&bytes[at..at + n], GuestAddress(addr));
                at += n;
            }
            contents.push(bytes);
        }
        *sink.steps.borrow_mut() = round.steps.iter().copied().collect();
        sink.then_full.set(round.then_full);
        sink.taken.borrow_mut().clear();
        sink.refused.set((0, 0));
        sink.blocked.set(false);

        let fixed = fixed_areas(&guest);
        let buffers_end = (buf_end + PAGE).min(MEM_END);
        let buffers = area(&guest, buf_start, buffers_end);
        let next_avail = guest.queue.next_avail();
        let next_used = guest.queue.next_used();
        let before = stats;
        let mut ctx = TxContext {
            queue: &mut guest.queue,
            mem: &guest.m.mem,
            socket: &sink,
            features,
            stats: &mut stats,
            source_mac: if input.check_source && !round.disabled {
                mac.source_check()
            } else {
                None
            },
        };
        let pass = if round.disabled {
            tx.discard(&mut ctx)
        } else {
            tx.process(&mut ctx)
        };
        assert!(
            fixed_areas(&guest) == fixed,
            "TX wrote to a descriptor table or the avail ring"
        );
        assert!(
            area(&guest, buf_start, buffers_end) == buffers,
            "TX wrote to guest buffers"
        );
        assert!(
            guest.m.all(BUFFERS, buf_start, 0),
            "TX wrote below the buffers"
        );

        // What the pass took and returned.
        let taken_n = guest.queue.next_avail().wrapping_sub(next_avail);
        let first = usize::from(next_avail.wrapping_sub(input.start));
        assert!(
            usize::from(taken_n) <= guest.posted.len() - first,
            "took {taken_n} entries of {} posted",
            guest.posted.len() - first
        );
        let taken = first..first + usize::from(taken_n);
        let used_idx: u16 = guest.m.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, guest.queue.next_used(), "used.idx not published");
        let elems: Vec<(u32, u32)> = (0..used_idx.wrapping_sub(next_used))
            .map(|i| {
                let slot = u64::from(next_used.wrapping_add(i) % size);
                let at = USED + 4 + 8 * slot;
                let id: u32 = guest.m.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = guest.m.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect();
        let want: Vec<(u32, u32)> = guest.posted[taken.clone()]
            .iter()
            .filter(|p| p.head < size)
            .map(|p| (u32::from(p.head), 0))
            .collect();
        assert_eq!(
            elems, want,
            "used elements are not the chains taken, in order, with length 0"
        );
        match pass.outcome {
            TxOutcome::Drained => assert_eq!(
                guest.queue.next_avail(),
                guest.avail,
                "a drained pass left chains in the avail ring"
            ),
            TxOutcome::Blocked => assert!(sink.blocked.get(), "blocked without EAGAIN"),
            TxOutcome::Budget => {}
        }
        if sink.blocked.get() && !round.disabled {
            assert_eq!(pass.outcome, TxOutcome::Blocked, "EAGAIN not reported");
        }

        // What the sink took: chains of this pass, in order, each once, checked.
        let sent = sink.taken.borrow();
        let mut candidates = taken.clone().filter(|&i| guest.posted[i].head < size);
        for msg in sent.iter() {
            assert!(
                candidates
                    .any(|i| wire(&contents[i], hdr_len, kernel_hdr).as_deref() == Some(&msg[..])),
                "the sink took a message that is no chain of this pass in order"
            );
            check_header(&msg[..kernel_hdr], kernel_hdr, features);
        }

        // Counters.
        let d = |f: fn(&PairStats) -> u64| f(&stats) - f(&before);
        assert_eq!(d(|s| s.tx_packets), sent.len() as u64, "tx_packets");
        let frame_bytes: usize = sent.iter().map(|m| m.len() - kernel_hdr).sum();
        assert_eq!(d(|s| s.tx_bytes), frame_bytes as u64, "tx_bytes");
        let (oversize, other) = sink.refused.get();
        assert_eq!(d(|s| s.tx_drop_oversize), oversize, "tx_drop_oversize");
        assert_eq!(d(|s| s.tx_drop_kernel), other, "tx_drop_kernel");
        let completed = d(|s| s.tx_packets)
            + d(|s| s.tx_drop_malformed)
            + d(|s| s.tx_drop_unnegotiated)
            + d(|s| s.tx_drop_spoofed)
            + oversize
            + other
            + d(|s| s.tx_drop_disabled);
        assert_eq!(
            completed,
            u64::from(taken_n),
            "packets and drops are not the entries taken"
        );
        if round.disabled {
            assert!(sent.is_empty(), "a disabled ring sent");
        }
    }

    let dirty = [(0, BUFFERS), (buf_start, (buf_end + PAGE).min(MEM_END))];
    MEMORY.with(|c| *c.borrow_mut() = Some((guest.m, dirty)));
    stats
}

/// Guest bytes `from..to` (across the region boundary).
fn area(g: &Guest, from: u64, to: u64) -> Vec<u8> {
    let split = REGION_SPLIT.clamp(from, to);
    [g.m.bytes(from, split), g.m.bytes(split, to)].concat()
}

/// What the kernel gets for a chain holding `bytes`: its header cut to the kernel's length,
/// then the frame; `None` for a chain too short to be sent.
fn wire(bytes: &[u8], hdr_len: usize, kernel_hdr: usize) -> Option<Vec<u8>> {
    if bytes.len() < hdr_len {
        return None;
    }
    let mut w = bytes[..kernel_hdr].to_vec();
    w.extend_from_slice(&bytes[hdr_len..]);
    Some(w)
}

/// A sent header asks only for what the guest negotiated.
fn check_header(header: &[u8], len: usize, features: Negotiated) {
    let h = NetHeader::new_checked(header, len).expect("header length");
    let kind = h.gso_kind();
    assert!(
        features.host_accepts_gso(kind, h.gso_ecn()),
        "gso_type {:#x} the guest did not negotiate",
        h.gso_type()
    );
    if h.needs_csum() || kind != GsoKind::None {
        assert!(
            features.host_csum(),
            "a partial checksum without HOST's CSUM"
        );
    }
}
