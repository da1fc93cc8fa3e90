//! The pairs' fanout group: joining it, its steering program (which queue pair receives a
//! frame), and the steering state (which pairs' RX rings are enabled) that picks the program.
//!
//! With more than one queue pair, every pair's packet socket joins one `PACKET_FANOUT_CBPF`
//! group and the kernel runs this program on each incoming frame; its result is the index of the
//! member (= the pair, members join in pair order and never leave) that gets the frame. The
//! program hashes the flow (IPv4/IPv6 addresses, plus TCP/UDP/SCTP ports when the datagram is
//! not a fragment), takes the hash modulo the number of *enabled* pairs and maps the result
//! through the table of enabled pairs. A flow therefore stays on one pair, and a disabled pair
//! gets nothing. When the set of enabled pairs changes, a new program replaces the old one
//! (`PACKET_FANOUT_DATA`, swapped by the kernel under RCU: no frame is lost or duplicated).
//!
//! The kernel runs fanout programs before the frame is handed to a member, with `skb->data` at
//! the network header (the Ethernet header is already pulled, and a VLAN tag the stack
//! untagged is gone), so offsets below are relative to the IP header and the EtherType comes
//! from `SKF_AD_PROTOCOL`. Every load is preceded by a length check (`BPF_LEN` is the length
//! from the network header), because a failed load ends a classic BPF program with 0, which
//! would hand the frame to pair 0 even when it is disabled. Frames that are neither IPv4 nor
//! IPv6 (ARP, ...) hash to 0 and go to the first enabled pair.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use libc::{
    sock_filter, BPF_B, BPF_H, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_MOD, BPF_MUL, BPF_RSH, BPF_SUB,
    BPF_W, BPF_XOR,
};
use log::{info, warn};

use super::bpf::{Asm, AD_PROTOCOL, NEXT};
use super::error::PacketError;
use super::socket::PacketSocket;
use super::sys::{getsockopt_int, set_program, setsockopt_int};

/// The most pairs a program maps (the table is two instructions per pair).
pub const MAX_PAIRS: usize = 64;

const ETH_P_IP: u32 = libc::ETH_P_IP as u32;
const ETH_P_IPV6: u32 = libc::ETH_P_IPV6 as u32;
const IPPROTO_TCP: u32 = libc::IPPROTO_TCP as u32;
const IPPROTO_UDP: u32 = libc::IPPROTO_UDP as u32;
const IPPROTO_SCTP: u32 = libc::IPPROTO_SCTP as u32;

/// The steering program for these enabled pairs (indices of fanout members, in any order).
///
/// With none enabled every frame goes to member 0: a disabled pair's socket is not read, so
/// the kernel queues and then drops (and counts) them there, as it would with one pair.
///
/// # Panics
///
/// If more than [`MAX_PAIRS`] pairs are given or an index does not fit in a u32.
pub fn program(enabled: &[usize]) -> Vec<sock_filter> {
    assert!(enabled.len() <= MAX_PAIRS, "at most {MAX_PAIRS} pairs");
    let member = |k: usize| u32::try_from(k).expect("pair index fits in u32");
    let mut a = Asm::default();
    match enabled {
        [] | [_] => {
            a.ret_k(member(enabled.first().copied().unwrap_or(0)));
            return a.finish();
        }
        _ => {}
    }

    let (v4, v4_ports, v6, v6_ports, hash, other, mix) = (
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
    );

    a.ld_abs(BPF_W, AD_PROTOCOL);
    a.jmp_k(BPF_JEQ, ETH_P_IP, v4, NEXT);
    a.jmp_k(BPF_JEQ, ETH_P_IPV6, v6, other);

    // IPv4: M[0] = saddr ^ daddr, then ^ ports unless the datagram is a fragment (every
    // fragment of a datagram must take the same pair, and only the first carries ports).
    a.bind(v4);
    a.ld_len();
    a.jmp_k(BPF_JGE, 20, NEXT, other);
    a.ld_abs(BPF_W, 12);
    a.tax();
    a.ld_abs(BPF_W, 16);
    a.alu_x(BPF_XOR);
    a.st(0);
    a.ld_abs(BPF_H, 6);
    a.jmp_k(BPF_JSET, 0x3fff, hash, NEXT); // MF or a fragment offset
    a.ld_abs(BPF_B, 9);
    a.jmp_k(BPF_JEQ, IPPROTO_TCP, v4_ports, NEXT);
    a.jmp_k(BPF_JEQ, IPPROTO_UDP, v4_ports, NEXT);
    a.jmp_k(BPF_JEQ, IPPROTO_SCTP, v4_ports, hash);
    a.bind(v4_ports);
    a.ldx_msh(0); // X = IP header length
    a.ld_len();
    a.jmp_x(BPF_JGE, NEXT, hash); // len >= X, so that len - X does not wrap
    a.alu_x(BPF_SUB);
    a.jmp_k(BPF_JGE, 4, NEXT, hash);
    a.ld_ind(BPF_W, 0); // source and destination port
    a.tax();
    a.ld_mem(0);
    a.alu_x(BPF_XOR);
    a.st(0);
    a.goto(hash);

    // IPv6: M[0] = the eight address words folded, then ^ ports if the next header is L4.
    a.bind(v6);
    a.ld_len();
    a.jmp_k(BPF_JGE, 40, NEXT, other);
    a.ld_abs(BPF_W, 8);
    for word in 1..8 {
        a.tax();
        a.ld_abs(BPF_W, 8 + 4 * word);
        a.alu_x(BPF_XOR);
    }
    a.st(0);
    a.ld_abs(BPF_B, 6);
    a.jmp_k(BPF_JEQ, IPPROTO_TCP, v6_ports, NEXT);
    a.jmp_k(BPF_JEQ, IPPROTO_UDP, v6_ports, NEXT);
    a.jmp_k(BPF_JEQ, IPPROTO_SCTP, v6_ports, hash);
    a.bind(v6_ports);
    a.ld_len();
    a.jmp_k(BPF_JGE, 44, NEXT, hash);
    a.ld_abs(BPF_W, 40);
    a.tax();
    a.ld_mem(0);
    a.alu_x(BPF_XOR);
    a.st(0);

    a.bind(hash);
    a.ld_mem(0);
    a.goto(mix);

    a.bind(other);
    a.ld_imm(0);

    // Mix the bits (XOR folding alone leaves the low bits of similar flows alike), then pick
    // an enabled pair: h ^= h >> 16; h *= 0x45d9f3b; h ^= h >> 16; A = h % n.
    a.bind(mix);
    a.tax();
    a.alu_k(BPF_RSH, 16);
    a.alu_x(BPF_XOR);
    a.alu_k(BPF_MUL, 0x045d_9f3b);
    a.tax();
    a.alu_k(BPF_RSH, 16);
    a.alu_x(BPF_XOR);
    a.alu_k(BPF_MOD, enabled.len() as u32);
    // A is an index into `enabled`: map it to the member.
    for (i, &pair) in enabled.iter().enumerate() {
        if i + 1 < enabled.len() {
            let next_entry = a.label();
            a.jmp_k(BPF_JEQ, i as u32, NEXT, next_entry);
            a.ret_k(member(pair));
            a.bind(next_entry);
        } else {
            a.ret_k(member(pair));
        }
    }
    a.finish()
}

impl PacketSocket {
    /// Joins fanout group `group` on this socket's interface, or with `None` creates one with
    /// an id the kernel picks among those unused in this network namespace
    /// (`PACKET_FANOUT_FLAG_UNIQUEID`). Returns the group's id, for the other members.
    ///
    /// A fixed id, or one derived from the pid and the interface, could be the id of another
    /// program's group of the same kind on the same interface; joining it would split both
    /// programs' traffic between them. A kernel-picked id cannot collide.
    ///
    /// The group is `PACKET_FANOUT_CBPF` (the program comes later, see
    /// [`PacketSocket::set_fanout_program`]; until then every frame goes to the first member)
    /// with `PACKET_FANOUT_FLAG_IGNORE_OUTGOING`: once in a group, a member's own
    /// `PACKET_IGNORE_OUTGOING` no longer applies (the group's hook receives for all members),
    /// so without the flag whatever the host, another socket or a software-segmented GSO frame
    /// of ours sends on the interface would reach a guest. The flag is honoured since Linux 6.2;
    /// older kernels accept and ignore it. Never `PACKET_FANOUT_FLAG_DEFRAG`: it reassembles IP
    /// fragments into datagrams larger than the MTU, which a guest would get as one frame it
    /// never asked for.
    ///
    /// Members keep their place in join order (the kernel also re-adds them in creation order
    /// after the interface goes down and up). A socket leaves its group only when it is closed.
    pub fn join_fanout(&self, group: Option<u16>) -> Result<u16, PacketError> {
        let unique = if group.is_none() {
            libc::PACKET_FANOUT_FLAG_UNIQUEID
        } else {
            0
        };
        let type_flags =
            libc::PACKET_FANOUT_CBPF | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING | unique;
        // `id | type_flags << 16`; without DEFRAG (0x8000) it stays below i32::MAX.
        let value = (u32::from(group.unwrap_or(0)) | (type_flags << 16)) as c_int;
        let err = |source| PacketError::SetOption {
            iface: self.interface_name().to_owned(),
            option: "PACKET_FANOUT",
            value,
            source,
        };
        setsockopt_int(self.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT, value).map_err(err)?;
        match self.fanout_group() {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(err(io::Error::other(
                "the kernel reports no fanout group after joining one",
            ))),
            Err(e) => Err(err(e)),
        }
    }

    /// The id of the fanout group this socket is in, if any (`getsockopt(PACKET_FANOUT)`).
    pub fn fanout_group(&self) -> io::Result<Option<u16>> {
        let v = getsockopt_int(self.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT)?;
        // id in bits 0..16, type in 16..24, flags in 24..32; 0 when in no group.
        Ok((v != 0).then_some((v as u32 & 0xffff) as u16))
    }

    /// Replaces the program of this socket's fanout group (`PACKET_FANOUT_DATA`; the kernel
    /// swaps it atomically for all members). Its result is the index of the member, in join
    /// order, that gets the frame.
    pub fn set_fanout_program(&self, program: &[libc::sock_filter]) -> Result<(), PacketError> {
        set_fanout_program(self.as_fd(), self.interface_name(), program)
    }

    /// A handle on this socket's fanout group, to change its program from another thread
    /// without sharing the socket (a duplicate of the descriptor).
    pub fn fanout_handle(&self) -> io::Result<FanoutHandle> {
        Ok(FanoutHandle {
            fd: self.try_clone()?,
            iface_name: self.interface_name().to_owned(),
        })
    }
}

/// A duplicate descriptor of a fanout group member, to replace the group's program.
#[derive(Debug)]
pub struct FanoutHandle {
    fd: OwnedFd,
    iface_name: String,
}

impl FanoutHandle {
    /// See [`PacketSocket::set_fanout_program`].
    pub fn set_program(&self, program: &[sock_filter]) -> Result<(), PacketError> {
        set_fanout_program(self.fd.as_fd(), &self.iface_name, program)
    }
}

fn set_fanout_program(
    fd: BorrowedFd<'_>,
    iface: &str,
    program: &[sock_filter],
) -> Result<(), PacketError> {
    set_program(fd, libc::SOL_PACKET, libc::PACKET_FANOUT_DATA, program).map_err(|source| {
        PacketError::SetOption {
            iface: iface.to_owned(),
            option: "PACKET_FANOUT_DATA",
            value: c_int::try_from(program.len()).unwrap_or(c_int::MAX),
            source,
        }
    })
}

/// The pairs whose RX ring is enabled, and the fanout program that hands frames to them alone.
#[derive(Debug)]
pub struct Steering {
    /// The pairs' fanout group; `None` with a single pair, which needs none.
    group: Option<FanoutHandle>,
    rx_enabled: Vec<bool>,
    /// The guest acked VIRTIO_NET_F_MQ. Without it the device has one pair (virtio 1.x,
    /// 5.1.2), whatever the rings' states: a frontend without PROTOCOL_FEATURES has every
    /// ring enabled, used or not.
    mq: bool,
}

impl Steering {
    /// Steering for `pairs` pairs, none enabled, and the group programmed accordingly: until a
    /// frontend enables a pair, every frame goes to pair 0, as with one pair.
    pub fn new(group: Option<FanoutHandle>, pairs: usize) -> Steering {
        let steering = Steering {
            group,
            rx_enabled: vec![false; pairs],
            mq: false,
        };
        steering.apply();
        steering
    }

    /// Records pair `pair`'s RX state and, if the set changed, reprograms the group.
    pub fn set(&mut self, pair: usize, enabled: bool) {
        let Some(slot) = self.rx_enabled.get_mut(pair) else {
            return;
        };
        if std::mem::replace(slot, enabled) == enabled {
            return;
        }
        self.apply();
    }

    /// Records every pair's RX state as `enabled`, reprogramming the group if that changed it.
    pub fn set_all(&mut self, enabled: bool) {
        if self.rx_enabled.iter().all(|&e| e == enabled) {
            return;
        }
        self.rx_enabled.iter_mut().for_each(|e| *e = enabled);
        self.apply();
    }

    /// Records whether the guest acked VIRTIO_NET_F_MQ, reprogramming the group if it changed.
    pub fn set_mq(&mut self, mq: bool) {
        if std::mem::replace(&mut self.mq, mq) != mq {
            self.apply();
        }
    }

    /// The pairs that receive: enabled, and pair 0 alone without MQ.
    fn members(&self) -> Vec<usize> {
        (0..self.rx_enabled.len())
            .filter(|&i| self.rx_enabled[i] && (i == 0 || self.mq))
            .collect()
    }

    fn apply(&self) {
        let Some(group) = &self.group else {
            return;
        };
        let enabled = self.members();
        match group.set_program(&program(&enabled)) {
            Ok(()) => info!(
                "receiving on queue pairs {:?} of {}",
                enabled,
                self.rx_enabled.len()
            ),
            Err(e) => warn!("steering frames to queue pairs {enabled:?}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::bpf::interp::{dump, run, Packet};
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    fn ports(src: u16, dst: u16) -> Vec<u8> {
        let mut l4 = src.to_be_bytes().to_vec();
        l4.extend_from_slice(&dst.to_be_bytes());
        l4.extend_from_slice(&[0; 12]);
        l4
    }

    fn udp4(src_port: u16) -> Vec<u8> {
        ipv4(
            17,
            [198, 18, 0, 2],
            [198, 18, 0, 1],
            0,
            &ports(src_port, 7000),
        )
    }

    fn v4(net: &[u8]) -> Packet<'_> {
        Packet {
            protocol: 0x0800,
            data: net,
        }
    }

    #[test]
    fn flows_spread_over_the_enabled_pairs_only() {
        for enabled in [vec![0, 1], vec![1, 3], vec![0, 2, 5, 7], (0..64).collect()] {
            let prog = program(&enabled);
            assert!(prog.len() <= 4096, "within BPF_MAXINSNS");
            let mut seen = BTreeSet::new();
            for port in 0..512u16 {
                let pair = run(&prog, &v4(&udp4(40000 + port))) as usize;
                assert!(enabled.contains(&pair), "{pair} not in {enabled:?}");
                seen.insert(pair);
            }
            let want: BTreeSet<usize> = enabled.iter().copied().collect();
            assert_eq!(seen, want, "512 flows reach every enabled pair");
        }
    }

    #[test]
    fn spread_is_even_enough() {
        let prog = program(&[0, 1, 2, 3]);
        let mut count: HashMap<u32, usize> = HashMap::new();
        for port in 0..4000u16 {
            *count.entry(run(&prog, &v4(&udp4(port)))).or_default() += 1;
        }
        for (pair, n) in &count {
            assert!((700..1300).contains(n), "pair {pair} got {n} of 4000 flows");
        }
    }

    #[test]
    fn a_flow_keeps_its_pair_and_fragments_follow_their_datagram() {
        let prog = program(&[0, 1, 2]);
        let src = [198, 18, 0, 2];
        let dst = [198, 18, 0, 1];
        for port in 0..64u16 {
            let a = run(&prog, &v4(&udp4(port)));
            let mut longer = udp4(port);
            longer.extend_from_slice(&[0xab; 1000]);
            assert_eq!(run(&prog, &v4(&longer)), a, "payload does not matter");
        }
        // The first fragment (MF set) and a later one (offset 185) of one datagram.
        let first = ipv4(17, src, dst, 0x2000, &ports(1234, 7000));
        let later = ipv4(17, src, dst, 185, &[0x55; 40]);
        assert_eq!(run(&prog, &v4(&first)), run(&prog, &v4(&later)));
        // IP options move the ports; the hash still uses them (the IHL is honoured).
        let mut opts = ipv4(6, src, dst, 0, &[]);
        opts[0] = 0x46;
        opts.extend_from_slice(&[1, 1, 1, 1]);
        let results: BTreeSet<u32> = (0..64u16)
            .map(|p| {
                let mut pkt = opts.clone();
                pkt.extend_from_slice(&ports(p, 80));
                run(&prog, &v4(&pkt))
            })
            .collect();
        assert!(results.len() > 1, "ports after IP options are hashed");
    }

    #[test]
    fn ipv6_flows_hash_on_addresses_and_ports() {
        let prog = program(&[0, 1]);
        let v6 = |next: u8, src_port: u16| {
            let mut p = vec![0x60, 0, 0, 0, 0, 20, next, 64];
            p.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            p.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p.extend_from_slice(&ports(src_port, 443));
            p
        };
        let pairs: BTreeSet<u32> = (0..64u16)
            .map(|port| {
                run(
                    &prog,
                    &Packet {
                        protocol: 0x86dd,
                        data: &v6(6, port),
                    },
                )
            })
            .collect();
        assert_eq!(pairs.len(), 2, "TCP over IPv6 spreads by port");
        // A next header that is not L4 (here: a fragment header) hashes addresses only.
        let frag: BTreeSet<u32> = (0..64u16)
            .map(|port| {
                run(
                    &prog,
                    &Packet {
                        protocol: 0x86dd,
                        data: &v6(44, port),
                    },
                )
            })
            .collect();
        assert_eq!(frag.len(), 1);
    }

    #[test]
    fn short_malformed_and_non_ip_frames_go_to_the_first_enabled_pair() {
        // Pair 0 disabled: nothing may land there, not even what cannot be parsed.
        let prog = program(&[2, 1]);
        let arp = Packet {
            protocol: 0x0806,
            data: &[0; 28],
        };
        assert_eq!(run(&prog, &arp), 2);
        let short = udp4(1);
        for len in 0..short.len() {
            let pair = run(&prog, &v4(&short[..len]));
            assert!(pair == 1 || pair == 2, "{len} bytes: {pair}");
        }
        // An IHL pointing past the end of the packet.
        let mut bad = udp4(1);
        bad[0] = 0x4f;
        assert_ne!(run(&prog, &v4(&bad)), 0);
        let short_v6 = Packet {
            protocol: 0x86dd,
            data: &[0x60; 30],
        };
        assert_eq!(run(&prog, &short_v6), 2);
    }

    #[test]
    fn zero_or_one_enabled_pair_needs_no_hash() {
        assert_eq!(run(&program(&[]), &v4(&udp4(1))), 0);
        assert_eq!(program(&[3]).len(), 1);
        assert_eq!(run(&program(&[3]), &v4(&udp4(1))), 3);
    }

    #[test]
    fn steering_follows_the_enabled_rings_and_mq() {
        let mut s = Steering::new(None, 4);
        assert_eq!(s.members(), Vec::<usize>::new(), "nothing enabled yet");
        s.set(2, true);
        s.set(0, true);
        assert_eq!(s.members(), [0], "without MQ only pair 0 receives");
        s.set_mq(true);
        assert_eq!(s.members(), [0, 2]);
        s.set(9, true);
        s.set(0, false);
        assert_eq!(s.members(), [2], "a pair out of range changes nothing");
        s.set_all(true);
        assert_eq!(s.members(), [0, 1, 2, 3]);
        s.set_mq(false);
        assert_eq!(s.members(), [0]);
        s.set_all(false);
        assert_eq!(s.members(), Vec::<usize>::new());
    }

    /// The program's bytes, as the kernel gets them: a change here is a change of behaviour.
    #[test]
    fn program_is_pinned() {
        assert_eq!(dump(&program(&[])), "06 0 0 0\n");
        assert_eq!(dump(&program(&[3])), "06 0 0 3\n");
        let want = "\
20 0 0 fffff000
15 1 0 800
15 24 62 86dd
80 0 0 0
35 0 60 14
20 0 0 c
07 0 0 0
20 0 0 10
ac 0 0 0
02 0 0 0
28 0 0 6
45 51 0 3fff
30 0 0 9
15 2 0 6
15 1 0 11
15 0 47 84
b1 0 0 0
80 0 0 0
3d 0 44 0
1c 0 0 0
35 0 42 4
40 0 0 0
07 0 0 0
60 0 0 0
ac 0 0 0
02 0 0 0
05 0 0 24
80 0 0 0
35 0 36 28
20 0 0 8
07 0 0 0
20 0 0 c
ac 0 0 0
07 0 0 0
20 0 0 10
ac 0 0 0
07 0 0 0
20 0 0 14
ac 0 0 0
07 0 0 0
20 0 0 18
ac 0 0 0
07 0 0 0
20 0 0 1c
ac 0 0 0
07 0 0 0
20 0 0 20
ac 0 0 0
07 0 0 0
20 0 0 24
ac 0 0 0
02 0 0 0
30 0 0 6
15 2 0 6
15 1 0 11
15 0 7 84
80 0 0 0
35 0 5 2c
20 0 0 28
07 0 0 0
60 0 0 0
ac 0 0 0
02 0 0 0
60 0 0 0
05 0 0 1
00 0 0 0
07 0 0 0
74 0 0 10
ac 0 0 0
24 0 0 45d9f3b
07 0 0 0
74 0 0 10
ac 0 0 0
94 0 0 3
15 0 1 0
06 0 0 2
15 0 1 1
06 0 0 0
06 0 0 1
";
        assert_eq!(dump(&program(&[2, 0, 1])), want);
    }
}
