//! Which queue pair receives a frame: the classic BPF program of the pairs' fanout group.
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

use libc::sock_filter;

/// The most pairs a program maps (the table is two instructions per pair).
pub const MAX_PAIRS: usize = 64;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20; // A = P[k:4]
const LD_H_ABS: u16 = 0x28; // A = P[k:2]
const LD_B_ABS: u16 = 0x30; // A = P[k:1]
const LD_W_IND: u16 = 0x40; // A = P[X+k:4]
const LD_W_LEN: u16 = 0x80; // A = len
const LD_IMM: u16 = 0x00; // A = k
const LD_MEM: u16 = 0x60; // A = M[k]
const LDX_B_MSH: u16 = 0xb1; // X = 4 * (P[k:1] & 0xf)
const ST: u16 = 0x02; // M[k] = A
const ALU_SUB_X: u16 = 0x1c;
const ALU_MUL_K: u16 = 0x24;
const ALU_RSH_K: u16 = 0x74;
const ALU_MOD_K: u16 = 0x94;
const ALU_XOR_X: u16 = 0xac;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JGE_X: u16 = 0x3d;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;
const TAX: u16 = 0x07;

/// `SKF_AD_OFF + SKF_AD_PROTOCOL`: loads the frame's EtherType (host order).
const AD_PROTOCOL: u32 = (-0x1000i32) as u32;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_SCTP: u32 = 132;

/// Where a conditional jump goes.
#[derive(Clone, Copy)]
enum To {
    Next,
    Label(usize),
}

struct Pending {
    code: u16,
    k: u32,
    jt: To,
    jf: To,
}

/// Forward-only assembler: jumps name labels, offsets are filled in at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Pending>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }

    fn op(&mut self, code: u16, k: u32) {
        self.jump(code, k, To::Next, To::Next);
    }

    fn jump(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.insns.push(Pending { code, k, jt, jf });
    }

    fn goto(&mut self, label: usize) {
        // BPF_JA jumps by k; encoded like a conditional with both targets the same.
        self.jump(JA, 0, To::Label(label), To::Label(label));
    }

    fn finish(self) -> Vec<sock_filter> {
        let labels = self.labels;
        self.insns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let offset = |to: To| -> usize {
                    match to {
                        To::Next => 0,
                        To::Label(l) => {
                            let at = labels[l].expect("every label is bound");
                            at.checked_sub(i + 1).expect("jumps go forward")
                        }
                    }
                };
                if p.code == JA {
                    let k = offset(p.jt) as u32;
                    return sock_filter {
                        code: JA,
                        jt: 0,
                        jf: 0,
                        k,
                    };
                }
                let jt = u8::try_from(offset(p.jt)).expect("jump within 255 instructions");
                let jf = u8::try_from(offset(p.jf)).expect("jump within 255 instructions");
                sock_filter {
                    code: p.code,
                    jt,
                    jf,
                    k: p.k,
                }
            })
            .collect()
    }
}

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
    let ret = |k: usize| sock_filter {
        code: RET_K,
        jt: 0,
        jf: 0,
        k: u32::try_from(k).expect("pair index fits in u32"),
    };
    match enabled {
        [] => return vec![ret(0)],
        [only] => return vec![ret(*only)],
        _ => {}
    }

    let mut a = Asm::default();
    let (v4, v4_ports, v6, v6_ports, hash, other, mix) = (
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
    );
    let next = To::Next;

    a.op(LD_W_ABS, AD_PROTOCOL);
    a.jump(JEQ_K, ETH_P_IP, To::Label(v4), next);
    a.jump(JEQ_K, ETH_P_IPV6, To::Label(v6), To::Label(other));

    // IPv4: M[0] = saddr ^ daddr, then ^ ports unless the datagram is a fragment (every
    // fragment of a datagram must take the same pair, and only the first carries ports).
    a.bind(v4);
    a.op(LD_W_LEN, 0);
    a.jump(JGE_K, 20, next, To::Label(other));
    a.op(LD_W_ABS, 12);
    a.op(TAX, 0);
    a.op(LD_W_ABS, 16);
    a.op(ALU_XOR_X, 0);
    a.op(ST, 0);
    a.op(LD_H_ABS, 6);
    a.jump(JSET_K, 0x3fff, To::Label(hash), next); // MF or a fragment offset
    a.op(LD_B_ABS, 9);
    a.jump(JEQ_K, IPPROTO_TCP, To::Label(v4_ports), next);
    a.jump(JEQ_K, IPPROTO_UDP, To::Label(v4_ports), next);
    a.jump(JEQ_K, IPPROTO_SCTP, To::Label(v4_ports), To::Label(hash));
    a.bind(v4_ports);
    a.op(LDX_B_MSH, 0); // X = IP header length
    a.op(LD_W_LEN, 0);
    a.jump(JGE_X, 0, next, To::Label(hash)); // len >= X, so that len - X does not wrap
    a.op(ALU_SUB_X, 0);
    a.jump(JGE_K, 4, next, To::Label(hash));
    a.op(LD_W_IND, 0); // source and destination port
    a.op(TAX, 0);
    a.op(LD_MEM, 0);
    a.op(ALU_XOR_X, 0);
    a.op(ST, 0);
    a.goto(hash);

    // IPv6: M[0] = the eight address words folded, then ^ ports if the next header is L4.
    a.bind(v6);
    a.op(LD_W_LEN, 0);
    a.jump(JGE_K, 40, next, To::Label(other));
    a.op(LD_W_ABS, 8);
    for word in 1..8 {
        a.op(TAX, 0);
        a.op(LD_W_ABS, 8 + 4 * word);
        a.op(ALU_XOR_X, 0);
    }
    a.op(ST, 0);
    a.op(LD_B_ABS, 6);
    a.jump(JEQ_K, IPPROTO_TCP, To::Label(v6_ports), next);
    a.jump(JEQ_K, IPPROTO_UDP, To::Label(v6_ports), next);
    a.jump(JEQ_K, IPPROTO_SCTP, To::Label(v6_ports), To::Label(hash));
    a.bind(v6_ports);
    a.op(LD_W_LEN, 0);
    a.jump(JGE_K, 44, next, To::Label(hash));
    a.op(LD_W_ABS, 40);
    a.op(TAX, 0);
    a.op(LD_MEM, 0);
    a.op(ALU_XOR_X, 0);
    a.op(ST, 0);

    a.bind(hash);
    a.op(LD_MEM, 0);
    a.goto(mix);

    a.bind(other);
    a.op(LD_IMM, 0);

    // Mix the bits (XOR folding alone leaves the low bits of similar flows alike), then pick
    // an enabled pair: h ^= h >> 16; h *= 0x45d9f3b; h ^= h >> 16; A = h % n.
    a.bind(mix);
    a.op(TAX, 0);
    a.op(ALU_RSH_K, 16);
    a.op(ALU_XOR_X, 0);
    a.op(ALU_MUL_K, 0x045d_9f3b);
    a.op(TAX, 0);
    a.op(ALU_RSH_K, 16);
    a.op(ALU_XOR_X, 0);
    a.op(ALU_MOD_K, enabled.len() as u32);
    let mut prog = a.finish();
    for (i, &pair) in enabled.iter().enumerate() {
        if i + 1 < enabled.len() {
            prog.push(sock_filter {
                code: JEQ_K,
                jt: 0,
                jf: 1,
                k: i as u32,
            });
        }
        prog.push(ret(pair));
    }
    prog
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    /// What the kernel gives a fanout program: the bytes from the network header on.
    struct Skb<'a> {
        protocol: u16,
        net: &'a [u8],
    }

    /// Runs the classic BPF subset the program uses, as the kernel would: a load beyond the
    /// data ends the program with 0.
    fn run(prog: &[sock_filter], skb: &Skb<'_>) -> u32 {
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut written = [false; 16];
        let load = |off: usize, size: usize| -> Option<u32> {
            let b = skb.net.get(off..off.checked_add(size)?)?;
            Some(b.iter().fold(0u32, |acc, &v| (acc << 8) | u32::from(v)))
        };
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS if i.k == AD_PROTOCOL => a = u32::from(skb.protocol),
                LD_W_ABS | LD_H_ABS | LD_B_ABS => {
                    let size = match i.code {
                        LD_W_ABS => 4,
                        LD_H_ABS => 2,
                        _ => 1,
                    };
                    match load(i.k as usize, size) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                LD_W_IND => match load((x + i.k) as usize, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_W_LEN => a = skb.net.len() as u32,
                LD_IMM => a = i.k,
                LD_MEM => {
                    assert!(written[i.k as usize], "M[{}] read before written", i.k);
                    a = mem[i.k as usize];
                }
                LDX_B_MSH => match load(i.k as usize, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                ST => {
                    mem[i.k as usize] = a;
                    written[i.k as usize] = true;
                }
                ALU_SUB_X => a = a.wrapping_sub(x),
                ALU_MUL_K => a = a.wrapping_mul(i.k),
                ALU_RSH_K => a >>= i.k,
                ALU_MOD_K => a %= i.k,
                ALU_XOR_X => a ^= x,
                TAX => x = a,
                JA => pc += i.k as usize,
                JEQ_K | JGE_K | JGE_X | JSET_K => {
                    let taken = match i.code {
                        JEQ_K => a == i.k,
                        JGE_K => a >= i.k,
                        JGE_X => a >= x,
                        _ => a & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                RET_K => return i.k,
                other => panic!("opcode {other:#x} not in the subset"),
            }
        }
        panic!("program did not end");
    }

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

    fn v4(net: &[u8]) -> Skb<'_> {
        Skb {
            protocol: 0x0800,
            net,
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
                    &Skb {
                        protocol: 0x86dd,
                        net: &v6(6, port),
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
                    &Skb {
                        protocol: 0x86dd,
                        net: &v6(44, port),
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
        let arp = Skb {
            protocol: 0x0806,
            net: &[0; 28],
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
        let short_v6 = Skb {
            protocol: 0x86dd,
            net: &[0x60; 30],
        };
        assert_eq!(run(&prog, &short_v6), 2);
    }

    #[test]
    fn zero_or_one_enabled_pair_needs_no_hash() {
        assert_eq!(run(&program(&[]), &v4(&udp4(1))), 0);
        assert_eq!(program(&[3]).len(), 1);
        assert_eq!(run(&program(&[3]), &v4(&udp4(1))), 3);
    }
}
