//! Which frames the kernel queues on an RX packet socket, by destination MAC: a classic BPF
//! socket filter (`SO_ATTACH_FILTER`, see [`super::PacketSocket::set_destination_filter`]),
//! so that frames for other hosts cost nothing in userspace. A socket filter starts at the
//! Ethernet header.

use libc::{sock_filter, BPF_B, BPF_H, BPF_JEQ, BPF_JSET, BPF_W};

use super::bpf::{Asm, NEXT};

/// Which frames a packet socket lets through, by destination MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationFilter {
    /// Every frame (`--promisc`).
    Everything,
    /// Group addresses only: broadcast and multicast (the guest's MAC is not known yet).
    Group,
    /// Group addresses and frames for this MAC.
    GroupAnd([u8; 6]),
}

impl DestinationFilter {
    /// The filter's program; `None` for [`DestinationFilter::Everything`], which needs none.
    ///
    /// Accepts a group address (the I/G bit, broadcast included) and, with a MAC, exactly that
    /// MAC; drops the rest.
    pub fn program(self) -> Option<Vec<sock_filter>> {
        let mac = match self {
            DestinationFilter::Everything => return None,
            DestinationFilter::Group => None,
            DestinationFilter::GroupAnd(mac) => Some(mac),
        };
        let mut a = Asm::default();
        let (accept, drop) = (a.label(), a.label());
        a.ld_abs(BPF_B, 0); // the first octet of the destination
        match mac {
            None => a.jmp_k(BPF_JSET, 1, accept, drop),
            Some(mac) => {
                a.jmp_k(BPF_JSET, 1, accept, NEXT);
                a.ld_abs(BPF_W, 0);
                a.jmp_k(
                    BPF_JEQ,
                    u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]),
                    NEXT,
                    drop,
                );
                a.ld_abs(BPF_H, 4);
                a.jmp_k(
                    BPF_JEQ,
                    u32::from(u16::from_be_bytes([mac[4], mac[5]])),
                    accept,
                    drop,
                );
            }
        }
        a.bind(accept);
        a.ret_k(u32::MAX); // the whole frame
        a.bind(drop);
        a.ret_k(0);
        Some(a.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::super::bpf::interp::{dump, run, Packet};
    use super::*;

    fn verdict(filter: DestinationFilter, dst: [u8; 6]) -> u32 {
        let mut frame = dst.to_vec();
        frame.extend_from_slice(&[0; 8]);
        let prog = filter.program().expect("a program");
        run(
            &prog,
            &Packet {
                protocol: 0x0800,
                data: &frame,
            },
        )
    }

    #[test]
    fn destination_filter_keeps_the_guest_broadcast_and_multicast() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let f = DestinationFilter::GroupAnd(mac);
        assert_eq!(verdict(f, mac), u32::MAX);
        assert_eq!(verdict(f, [0xff; 6]), u32::MAX, "broadcast");
        assert_eq!(
            verdict(f, [0x01, 0, 0x5e, 0, 0, 1]),
            u32::MAX,
            "IPv4 multicast"
        );
        assert_eq!(
            verdict(f, [0x33, 0x33, 0, 0, 0, 1]),
            u32::MAX,
            "IPv6 multicast"
        );
        assert_eq!(
            verdict(f, [0x02, 0x11, 0x22, 0x33, 0x44, 0x56]),
            0,
            "last octet differs"
        );
        assert_eq!(
            verdict(f, [0x02, 0x11, 0x22, 0x34, 0x44, 0x55]),
            0,
            "first four differ"
        );
        assert_eq!(verdict(f, [0x52, 0x54, 0, 0, 0, 1]), 0, "someone else");
    }

    #[test]
    fn group_filter_keeps_broadcast_and_multicast_only() {
        let f = DestinationFilter::Group;
        assert_eq!(verdict(f, [0xff; 6]), u32::MAX, "broadcast");
        assert_eq!(verdict(f, [0x33, 0x33, 0, 0, 0, 1]), u32::MAX);
        assert_eq!(verdict(f, [0x01, 0, 0x5e, 0, 0, 1]), u32::MAX);
        assert_eq!(verdict(f, [0x02, 0x11, 0x22, 0x33, 0x44, 0x55]), 0);
        assert_eq!(verdict(f, [0x52, 0x54, 0, 0x12, 0x34, 0x56]), 0);
    }

    #[test]
    fn everything_detaches_the_filter() {
        assert!(DestinationFilter::Everything.program().is_none());
    }

    /// The programs' bytes, as the kernel gets them: a change here is a change of behaviour.
    #[test]
    fn programs_are_pinned() {
        let group = DestinationFilter::Group.program().unwrap();
        assert_eq!(
            dump(&group),
            "30 0 0 0\n45 0 1 1\n06 0 0 ffffffff\n06 0 0 0\n"
        );
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let unicast = DestinationFilter::GroupAnd(mac).program().unwrap();
        assert_eq!(
            dump(&unicast),
            "30 0 0 0\n45 4 0 1\n20 0 0 0\n15 0 3 2112233\n28 0 0 4\n15 0 1 4455\n\
             06 0 0 ffffffff\n06 0 0 0\n"
        );
    }
}
