//! The virtio-net device configuration space (`struct virtio_net_config`).

use crate::config::MacAddr;

/// Status bit: the link is up.
const VIRTIO_NET_S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;

mod field {
    use std::ops::Range;
    pub const MAC: Range<usize> = 0..6;
    pub const STATUS: Range<usize> = 6..8;
    pub const MAX_VIRTQUEUE_PAIRS: Range<usize> = 8..10;
    pub const MTU: Range<usize> = 10..12;
    /// speed (4), duplex (1) and the RSS fields follow; we offer none of their features, so
    /// they read as zero.
    pub const END: usize = 12;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfigSpace {
    pub mac: MacAddr,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

impl NetConfigSpace {
    fn bytes(&self) -> [u8; field::END] {
        let mut b = [0u8; field::END];
        b[field::MAC].copy_from_slice(&self.mac.0);
        b[field::STATUS].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        b[field::MAX_VIRTQUEUE_PAIRS].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[field::MTU].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// `size` bytes from `offset`; beyond the fields we define the space reads as zero (the
    /// frontend may ask for the whole, larger structure).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.bytes();
        (offset as usize..offset as usize + size as usize)
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }

    /// A frontend writes the MAC field (legacy drivers set the address this way). Returns the
    /// new MAC if it changed; writes elsewhere are refused.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<Option<MacAddr>, String> {
        let start = offset as usize;
        let end = start + data.len();
        if end > field::MAC.end {
            return Err(format!(
                "config space write at {offset}+{} outside the MAC field",
                data.len()
            ));
        }
        let mut mac = self.mac;
        mac.0[start..end].copy_from_slice(data);
        let changed = mac != self.mac;
        self.mac = mac;
        Ok(changed.then_some(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> NetConfigSpace {
        NetConfigSpace {
            mac: MacAddr([0x52, 0x54, 0, 1, 2, 3]),
            max_virtqueue_pairs: 1,
            mtu: 9000,
        }
    }

    #[test]
    fn layout_matches_virtio_net_config() {
        let b = space().read(0, 24);
        assert_eq!(b.len(), 24);
        assert_eq!(&b[0..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(&b[6..8], &[1, 0], "link up");
        assert_eq!(&b[8..10], &[1, 0]);
        assert_eq!(&b[10..12], &9000u16.to_le_bytes());
        assert!(b[12..].iter().all(|&x| x == 0));
        assert_eq!(space().read(10, 2), 9000u16.to_le_bytes());
        assert_eq!(space().read(1000, 4), vec![0; 4]);
    }

    #[test]
    fn only_the_mac_is_writable() {
        let mut s = space();
        assert_eq!(
            s.write(4, &[9, 9]).unwrap(),
            Some(MacAddr([0x52, 0x54, 0, 1, 9, 9]))
        );
        assert_eq!(s.write(0, &[0x52]).unwrap(), None);
        assert!(s.write(5, &[0, 0]).is_err());
        assert!(s.write(10, &[0, 0]).is_err());
    }
}
