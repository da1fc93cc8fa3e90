//! Classic BPF: one assembler for the programs the packet sockets load (the RX destination
//! filter, [`super::filter`], and the fanout steering program, [`super::fanout`]) and, for
//! their tests, one interpreter that runs them as the kernel would.
//!
//! Opcodes are composed from libc's `BPF_*` constants (linux/filter.h, linux/bpf_common.h) by
//! the builder's methods, so no opcode is spelled as a number here.

use libc::{
    sock_filter, BPF_ABS, BPF_ALU, BPF_B, BPF_IND, BPF_JA, BPF_JMP, BPF_K, BPF_LD, BPF_LDX,
    BPF_LEN, BPF_MEM, BPF_MISC, BPF_MSH, BPF_RET, BPF_ST, BPF_TAX, BPF_W, BPF_X,
};

/// `SKF_AD_OFF + SKF_AD_PROTOCOL` as a load offset: an absolute word load from it gives the
/// frame's EtherType (`skb->protocol`, host order).
pub const AD_PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;

/// A place in a program that jumps go to, bound with [`Asm::bind`].
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

/// Where a conditional jump goes: the next instruction or a label.
#[derive(Debug, Clone, Copy)]
pub enum To {
    Next,
    Label(Label),
}

/// Shorthand for [`To::Next`].
pub const NEXT: To = To::Next;

impl From<Label> for To {
    fn from(label: Label) -> To {
        To::Label(label)
    }
}

struct Pending {
    code: u32,
    k: u32,
    jt: To,
    jf: To,
}

/// Forward-only assembler: jumps name labels, their offsets are filled in by [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<Pending>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    /// A new label, to be bound once with [`Asm::bind`].
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction.
    pub fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.insns.len());
    }

    fn op(&mut self, code: u32, k: u32) {
        self.insns.push(Pending {
            code,
            k,
            jt: NEXT,
            jf: NEXT,
        });
    }

    /// `A = P[k:size]`, `size` one of `BPF_W`, `BPF_H`, `BPF_B`; `k` may be [`AD_PROTOCOL`].
    pub fn ld_abs(&mut self, size: u32, k: u32) {
        self.op(BPF_LD | size | BPF_ABS, k);
    }

    /// `A = P[X + k:size]`.
    pub fn ld_ind(&mut self, size: u32, k: u32) {
        self.op(BPF_LD | size | BPF_IND, k);
    }

    /// `A = len` (the bytes the program sees).
    pub fn ld_len(&mut self) {
        self.op(BPF_LD | BPF_W | BPF_LEN, 0);
    }

    /// `A = k`.
    pub fn ld_imm(&mut self, k: u32) {
        self.op(BPF_LD | BPF_W | libc::BPF_IMM, k);
    }

    /// `A = M[k]`.
    pub fn ld_mem(&mut self, k: u32) {
        self.op(BPF_LD | BPF_W | BPF_MEM, k);
    }

    /// `X = 4 * (P[k:1] & 0xf)`: the IPv4 header length.
    pub fn ldx_msh(&mut self, k: u32) {
        self.op(BPF_LDX | BPF_B | BPF_MSH, k);
    }

    /// `M[k] = A`.
    pub fn st(&mut self, k: u32) {
        self.op(BPF_ST, k);
    }

    /// `A = A op k`, `op` one of libc's `BPF_ADD` .. `BPF_XOR`.
    pub fn alu_k(&mut self, op: u32, k: u32) {
        self.op(BPF_ALU | op | BPF_K, k);
    }

    /// `A = A op X`.
    pub fn alu_x(&mut self, op: u32) {
        self.op(BPF_ALU | op | BPF_X, 0);
    }

    /// `X = A`.
    pub fn tax(&mut self) {
        self.op(BPF_MISC | BPF_TAX, 0);
    }

    /// Ends the program with `k` (a filter: bytes to keep; fanout: the member).
    pub fn ret_k(&mut self, k: u32) {
        self.op(BPF_RET | BPF_K, k);
    }

    /// `if A op k` (`op` one of `BPF_JEQ`, `BPF_JGT`, `BPF_JGE`, `BPF_JSET`) go to `jt`, else `jf`.
    pub fn jmp_k(&mut self, op: u32, k: u32, jt: impl Into<To>, jf: impl Into<To>) {
        self.insns.push(Pending {
            code: BPF_JMP | op | BPF_K,
            k,
            jt: jt.into(),
            jf: jf.into(),
        });
    }

    /// `if A op X` go to `jt`, else `jf`.
    pub fn jmp_x(&mut self, op: u32, jt: impl Into<To>, jf: impl Into<To>) {
        self.insns.push(Pending {
            code: BPF_JMP | op | BPF_X,
            k: 0,
            jt: jt.into(),
            jf: jf.into(),
        });
    }

    /// Unconditional jump (`BPF_JA`, whose offset is `k`).
    pub fn goto(&mut self, label: Label) {
        self.insns.push(Pending {
            code: BPF_JMP | BPF_JA,
            k: 0,
            jt: label.into(),
            jf: label.into(),
        });
    }

    /// The program, with every jump resolved to an offset from the next instruction.
    ///
    /// # Panics
    ///
    /// If a label is unbound or behind its jump, or a conditional jump spans more than 255
    /// instructions: mistakes in a program's text, not in its input.
    pub fn finish(self) -> Vec<sock_filter> {
        let labels = self.labels;
        self.insns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let offset = |to: To| -> usize {
                    match to {
                        To::Next => 0,
                        To::Label(l) => {
                            let at = labels[l.0].expect("every label is bound");
                            at.checked_sub(i + 1).expect("jumps go forward")
                        }
                    }
                };
                let code = u16::try_from(p.code).expect("opcodes fit in 16 bits");
                if p.code == BPF_JMP | BPF_JA {
                    let k = u32::try_from(offset(p.jt)).expect("jump within a program");
                    return sock_filter {
                        code,
                        jt: 0,
                        jf: 0,
                        k,
                    };
                }
                let jt = u8::try_from(offset(p.jt)).expect("jump within 255 instructions");
                let jf = u8::try_from(offset(p.jf)).expect("jump within 255 instructions");
                sock_filter {
                    code,
                    jt,
                    jf,
                    k: p.k,
                }
            })
            .collect()
    }
}

/// What a program sees, and an interpreter that runs it as the kernel would.
#[cfg(test)]
pub(crate) mod interp {
    use libc::{
        sock_filter, BPF_A, BPF_ABS, BPF_ADD, BPF_ALU, BPF_AND, BPF_B, BPF_DIV, BPF_H, BPF_IMM,
        BPF_IND, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_LEN, BPF_LSH, BPF_MEM, BPF_MISC, BPF_MOD, BPF_MSH, BPF_MUL, BPF_NEG, BPF_OR, BPF_RET,
        BPF_RSH, BPF_ST, BPF_STX, BPF_SUB, BPF_TAX, BPF_TXA, BPF_W, BPF_X, BPF_XOR,
    };

    use super::AD_PROTOCOL;

    /// The input of a program: `skb->protocol` and the bytes from where the kernel starts it
    /// (a socket filter: the Ethernet header; a fanout program: the network header).
    pub struct Packet<'a> {
        pub protocol: u16,
        pub data: &'a [u8],
    }

    /// What the kernel's checker (`bpf_check_classic`) would refuse: an empty or too long
    /// program, a jump out of it, a last instruction that is not a return.
    fn check(prog: &[sock_filter]) {
        assert!(
            !prog.is_empty() && prog.len() <= libc::BPF_MAXINSNS as usize,
            "{} instructions",
            prog.len()
        );
        for (pc, i) in prog.iter().enumerate() {
            let code = u32::from(i.code);
            if code & 0x07 != BPF_JMP {
                continue;
            }
            let targets = if code & 0xf0 == BPF_JA {
                vec![i.k as usize]
            } else {
                vec![usize::from(i.jt), usize::from(i.jf)]
            };
            for t in targets {
                assert!(pc + 1 + t < prog.len(), "instruction {pc} jumps out");
            }
        }
        let last = u32::from(prog[prog.len() - 1].code);
        assert_eq!(last & 0x07, BPF_RET, "the last instruction returns");
    }

    /// Runs `prog` on `pkt`: its result (a load beyond the data ends the program with 0, as in
    /// the kernel).
    ///
    /// # Panics
    ///
    /// On what the kernel would refuse to load (see `check`), a scratch word read before it is
    /// written, an ancillary load other than the protocol, or an opcode outside classic BPF.
    pub fn run(prog: &[sock_filter], pkt: &Packet<'_>) -> u32 {
        check(prog);
        let (mut a, mut x) = (0u32, 0u32);
        let mut mem: [Option<u32>; 16] = [None; 16];
        let load = |off: u32, size: u32| -> Option<u32> {
            let n = match size {
                BPF_W => 4,
                BPF_H => 2,
                BPF_B => 1,
                other => panic!("load size {other:#x}"),
            };
            let off = off as usize;
            let bytes = pkt.data.get(off..off.checked_add(n)?)?;
            Some(bytes.iter().fold(0u32, |acc, &v| (acc << 8) | u32::from(v)))
        };
        let len = u32::try_from(pkt.data.len()).expect("packet fits in u32");
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            pc += 1;
            let code = u32::from(i.code);
            let (class, size, mode) = (code & 0x07, code & 0x18, code & 0xe0);
            let src = if code & 0x08 == BPF_X { x } else { i.k };
            match class {
                BPF_LD => {
                    a = match mode {
                        BPF_ABS if i.k >= libc::SKF_AD_OFF as u32 => {
                            assert!(i.k == AD_PROTOCOL && size == BPF_W, "ancillary {:#x}", i.k);
                            u32::from(pkt.protocol)
                        }
                        BPF_ABS => match load(i.k, size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        BPF_IND => match load(x.wrapping_add(i.k), size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        BPF_LEN => len,
                        BPF_IMM => i.k,
                        BPF_MEM => mem[i.k as usize].expect("M[k] read before written"),
                        other => panic!("load mode {other:#x}"),
                    }
                }
                BPF_LDX => {
                    x = match mode {
                        BPF_IMM => i.k,
                        BPF_LEN => len,
                        BPF_MEM => mem[i.k as usize].expect("M[k] read before written"),
                        BPF_MSH => match load(i.k, BPF_B) {
                            Some(v) => 4 * (v & 0xf),
                            None => return 0,
                        },
                        other => panic!("ldx mode {other:#x}"),
                    }
                }
                BPF_ST => mem[i.k as usize] = Some(a),
                BPF_STX => mem[i.k as usize] = Some(x),
                BPF_ALU => {
                    a = match code & 0xf0 {
                        BPF_ADD => a.wrapping_add(src),
                        BPF_SUB => a.wrapping_sub(src),
                        BPF_MUL => a.wrapping_mul(src),
                        BPF_DIV | BPF_MOD if src == 0 => return 0,
                        BPF_DIV => a / src,
                        BPF_MOD => a % src,
                        BPF_OR => a | src,
                        BPF_AND => a & src,
                        BPF_LSH => a.checked_shl(src).unwrap_or(0),
                        BPF_RSH => a.checked_shr(src).unwrap_or(0),
                        BPF_NEG => a.wrapping_neg(),
                        BPF_XOR => a ^ src,
                        other => panic!("alu op {other:#x}"),
                    }
                }
                BPF_JMP => {
                    let taken = match code & 0xf0 {
                        BPF_JA => {
                            pc += i.k as usize;
                            continue;
                        }
                        BPF_JEQ => a == src,
                        BPF_JGT => a > src,
                        BPF_JGE => a >= src,
                        BPF_JSET => a & src != 0,
                        other => panic!("jump op {other:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                BPF_RET => {
                    return match code & 0x18 {
                        BPF_K => i.k,
                        BPF_A => a,
                        other => panic!("return source {other:#x}"),
                    }
                }
                BPF_MISC => match code & 0xf8 {
                    BPF_TAX => x = a,
                    BPF_TXA => a = x,
                    other => panic!("misc op {other:#x}"),
                },
                _ => unreachable!("the class is three bits"),
            }
        }
    }

    /// One line per instruction, `code jt jf k` (code and k in hex, the jump offsets in
    /// decimal): how tests pin a program's bytes.
    pub fn dump(prog: &[sock_filter]) -> String {
        prog.iter()
            .map(|i| format!("{:02x} {} {} {:x}\n", i.code, i.jt, i.jf, i.k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::interp::{run, Packet};
    use super::*;
    use libc::{BPF_ADD, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_SUB};

    fn pkt(data: &[u8]) -> Packet<'_> {
        Packet {
            protocol: 0x86dd,
            data,
        }
    }

    #[test]
    fn jumps_resolve_to_offsets_from_the_next_instruction() {
        let mut a = Asm::default();
        let (skip, end) = (a.label(), a.label());
        a.ld_abs(BPF_B, 0);
        a.jmp_k(BPF_JEQ, 1, skip, NEXT);
        a.goto(end);
        a.bind(skip);
        a.ld_imm(7);
        a.bind(end);
        a.ret_k(9);
        let prog = a.finish();
        assert_eq!(
            interp::dump(&prog),
            "30 0 0 0\n15 1 0 1\n05 0 0 1\n00 0 0 7\n06 0 0 9\n"
        );
        assert_eq!(run(&prog, &pkt(&[1])), 9);
        assert_eq!(run(&prog, &pkt(&[2])), 9);
    }

    #[test]
    fn loads_beyond_the_data_end_the_program_with_zero() {
        let mut a = Asm::default();
        a.ld_abs(BPF_W, 0);
        a.ret_k(1);
        let prog = a.finish();
        assert_eq!(run(&prog, &pkt(&[0; 4])), 1);
        assert_eq!(run(&prog, &pkt(&[0; 3])), 0);

        let mut a = Asm::default();
        a.ldx_msh(0);
        a.ld_ind(BPF_B, 0);
        a.ret_k(1);
        let prog = a.finish();
        assert_eq!(run(&prog, &pkt(&[0x41, 0, 0, 0, 9])), 1, "X = 4: byte 4");
        assert_eq!(run(&prog, &pkt(&[0x41, 0, 0, 0])), 0);
    }

    #[test]
    fn arithmetic_scratch_and_the_protocol() {
        let mut a = Asm::default();
        let (ipv6, other) = (a.label(), a.label());
        a.ld_abs(BPF_W, AD_PROTOCOL);
        a.jmp_k(BPF_JEQ, 0x86dd, ipv6, other);
        a.bind(ipv6);
        a.ld_len();
        a.st(0);
        a.tax();
        a.ld_imm(10);
        a.alu_x(BPF_ADD); // 10 + len
        a.alu_k(BPF_SUB, 1);
        a.jmp_x(BPF_JGE, NEXT, other); // taken: 12 >= 3
        a.jmp_k(BPF_JSET, 0x8000_0000, other, NEXT);
        a.ld_mem(0);
        a.alu_k(BPF_ADD, 2);
        a.jmp_k(BPF_JEQ, 5, NEXT, other);
        a.ret_k(5);
        a.bind(other);
        a.ret_k(0);
        let prog = a.finish();
        assert_eq!(run(&prog, &pkt(&[0; 3])), 5);
    }

    #[test]
    #[should_panic(expected = "read before written")]
    fn scratch_read_before_written_is_a_mistake() {
        let mut a = Asm::default();
        a.ld_mem(3);
        a.ret_k(0);
        run(&a.finish(), &pkt(&[]));
    }
}
