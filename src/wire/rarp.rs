//! RARP packets (RFC 903): the ARP format with the reverse-request opcode, used to announce a
//! MAC address after a migration (a switch learns the port from the source address).

use crate::wire::ethernet::{self, EthernetFrame};
use crate::wire::{read_array, read_u16, write_u16, Result, WireError};

/// The RARP ethertype.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Length of a RARP packet for Ethernet and IPv4 addresses.
pub const PACKET_LEN: usize = 28;
/// The smallest Ethernet frame without its FCS; shorter announcements are padded to it.
pub const ANNOUNCEMENT_LEN: usize = 60;
/// Hardware type Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;
/// "Reverse request": who has this hardware address.
pub const OP_REVERSE_REQUEST: u16 = 3;

mod field {
    use crate::wire::Field;

    pub const HTYPE: Field = 0..2;
    pub const PTYPE: Field = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Field = 6..8;
    pub const SHA: Field = 8..14;
    pub const SPA: Field = 14..18;
    pub const THA: Field = 18..24;
    pub const TPA: Field = 24..28;
}

/// A view of a RARP packet for Ethernet hardware and IPv4 protocol addresses.
#[derive(Debug, Clone)]
pub struct RarpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> RarpPacket<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than [`PACKET_LEN`].
    pub const fn new_unchecked(buffer: T) -> Self {
        RarpPacket { buffer }
    }

    /// Wraps `buffer` after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that 28 bytes fit (`Truncated`) and that the address lengths are Ethernet's and
    /// IPv4's (`Malformed`): the field offsets assume them.
    pub fn check_len(&self) -> Result<()> {
        let data = self.buffer.as_ref();
        if data.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        if data[field::HLEN] != 6 || data[field::PLEN] != 4 {
            return Err(WireError::Malformed);
        }
        Ok(())
    }

    pub fn htype(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::HTYPE)
    }

    pub fn ptype(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::PTYPE)
    }

    pub fn operation(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::OPER)
    }

    pub fn sender_hw(&self) -> [u8; 6] {
        read_array(self.buffer.as_ref(), field::SHA)
    }

    pub fn sender_ip(&self) -> [u8; 4] {
        read_array(self.buffer.as_ref(), field::SPA)
    }

    pub fn target_hw(&self) -> [u8; 6] {
        read_array(self.buffer.as_ref(), field::THA)
    }

    pub fn target_ip(&self) -> [u8; 4] {
        read_array(self.buffer.as_ref(), field::TPA)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> RarpPacket<T> {
    /// A reverse request for `mac`: sender and target hardware address `mac`, no IPv4
    /// addresses (they are what a RARP server would answer).
    pub fn fill_reverse_request(&mut self, mac: [u8; 6]) {
        let data = self.buffer.as_mut();
        write_u16(data, field::HTYPE, HTYPE_ETHERNET);
        write_u16(data, field::PTYPE, ethernet::ETHERTYPE_IPV4);
        data[field::HLEN] = 6;
        data[field::PLEN] = 4;
        write_u16(data, field::OPER, OP_REVERSE_REQUEST);
        data[field::SHA].copy_from_slice(&mac);
        data[field::SPA].fill(0);
        data[field::THA].copy_from_slice(&mac);
        data[field::TPA].fill(0);
    }
}

/// The broadcast frame that announces `mac` after a migration, as DPDK's vhost library sends
/// it for SEND_RARP: from `mac`, RARP reverse request for `mac`, padded to the minimum length.
pub fn announcement(mac: [u8; 6]) -> [u8; ANNOUNCEMENT_LEN] {
    let mut frame = [0u8; ANNOUNCEMENT_LEN];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.set_dst_addr([0xff; 6]);
    eth.set_src_addr(mac);
    eth.set_ethertype(ETHERTYPE_RARP);
    RarpPacket::new_unchecked(&mut frame[ethernet::HEADER_LEN..]).fill_reverse_request(mac);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn the_announcement_is_a_broadcast_reverse_request_for_the_mac_padded_to_60_bytes() {
        let mut want = vec![0xff; 6];
        want.extend_from_slice(&MAC);
        want.extend_from_slice(&[0x80, 0x35]); // RARP
        want.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, reverse request
        want.extend_from_slice(&MAC);
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&MAC);
        want.extend_from_slice(&[0; 4]);
        want.resize(60, 0);
        assert_eq!(announcement(MAC)[..], want[..]);
    }

    #[test]
    fn the_view_reads_back_what_was_filled() {
        let frame = announcement(MAC);
        let rarp = RarpPacket::new_checked(&frame[ethernet::HEADER_LEN..]).unwrap();
        assert_eq!(
            (rarp.htype(), rarp.ptype(), rarp.operation()),
            (HTYPE_ETHERNET, ethernet::ETHERTYPE_IPV4, OP_REVERSE_REQUEST)
        );
        assert_eq!((rarp.sender_hw(), rarp.target_hw()), (MAC, MAC));
        assert_eq!((rarp.sender_ip(), rarp.target_ip()), ([0; 4], [0; 4]));
    }

    #[test]
    fn short_buffers_and_other_address_lengths_are_refused() {
        let frame = announcement(MAC);
        let rarp = &frame[ethernet::HEADER_LEN..];
        assert_eq!(
            RarpPacket::new_checked(&rarp[..PACKET_LEN - 1]).unwrap_err(),
            WireError::Truncated
        );
        let mut other = rarp.to_vec();
        other[4] = 8;
        assert_eq!(
            RarpPacket::new_checked(&other[..]).unwrap_err(),
            WireError::Malformed
        );
    }
}
