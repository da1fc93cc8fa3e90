//! A split ring in guest memory built in-process, for the RX and TX unit tests: chains posted
//! the way a driver posts them, device-writable (RX buffers) or device-readable (TX frames).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const QSIZE: u16 = 256;
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x4000;
pub const USED: u64 = 0x5000;
pub const BUFFERS: u64 = 0x10000;
const MEM_SIZE: usize = 16 << 20;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    /// Descriptors (addr, len) of each posted chain, by head.
    pub chains: Vec<Vec<(u64, u32)>>,
    next_desc: u16,
    next_addr: u64,
    avail: u16,
    /// WRITE for RX buffers, 0 for TX frames.
    access: u16,
}

impl Guest {
    /// Posts one device-writable chain (an RX buffer) per entry of `chains` (descriptor
    /// lengths), in order.
    pub fn new(chains: &[Vec<u32>]) -> Guest {
        let mut guest = Guest::empty(WRITE);
        guest.post(chains);
        guest
    }

    /// A ring whose chains are device-readable (TX frames); post them with [`Guest::post_bytes`].
    pub fn device_reads() -> Guest {
        Guest::empty(0)
    }

    fn empty(access: u16) -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        Guest {
            mem,
            queue,
            chains: Vec::new(),
            next_desc: 0,
            next_addr: BUFFERS,
            avail: 0,
            access,
        }
    }

    /// Adds chains to the avail ring after those already there; returns their heads.
    pub fn post(&mut self, chains: &[Vec<u32>]) -> Vec<u16> {
        let mem = &self.mem;
        let mut heads = Vec::new();
        for lens in chains {
            let head = self.next_desc;
            assert!(
                usize::from(head) + lens.len() <= usize::from(QSIZE),
                "the descriptor table is full"
            );
            let mut descs = Vec::new();
            for (j, &len) in lens.iter().enumerate() {
                let last = j + 1 == lens.len();
                let flags = self.access | if last { 0 } else { NEXT };
                let d = DESC + 16 * u64::from(self.next_desc);
                mem.write_obj(self.next_addr, GuestAddress(d)).unwrap();
                mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                mem.write_obj(self.next_desc + 1, GuestAddress(d + 14))
                    .unwrap();
                descs.push((self.next_addr, len));
                self.next_addr += u64::from(len).next_multiple_of(16);
                self.next_desc += 1;
            }
            let slot = u64::from(self.avail % QSIZE);
            mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail += 1;
            self.chains.resize(usize::from(self.next_desc), Vec::new());
            self.chains[usize::from(head)] = descs;
            heads.push(head);
        }
        mem.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
        heads
    }

    /// Posts `bytes` as one chain split at `splits` (descriptor lengths; the last descriptor
    /// takes what is left); returns its head.
    pub fn post_bytes(&mut self, bytes: &[u8], splits: &[u32]) -> u16 {
        let mut lens = Vec::new();
        let mut left = bytes.len() as u32;
        for &s in splits {
            let take = s.min(left);
            lens.push(take);
            left -= take;
        }
        if left > 0 || lens.is_empty() {
            lens.push(left);
        }
        let head = self.post(&[lens])[0];
        self.write_chain(head, bytes);
        head
    }

    /// Writes `bytes` over chain `head`'s descriptors in order.
    pub fn write_chain(&self, head: u16, bytes: &[u8]) {
        let mut at = 0;
        for &(addr, len) in &self.chains[usize::from(head)] {
            let take = (len as usize).min(bytes.len() - at);
            self.mem
                .write_slice(&bytes[at..at + take], GuestAddress(addr))
                .unwrap();
            at += take;
        }
        assert_eq!(at, bytes.len(), "chain {head} is too short");
    }

    /// Adds an avail entry naming `head` as is (possibly no descriptor at all).
    pub fn post_raw_head(&mut self, head: u16) {
        let slot = u64::from(self.avail % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail += 1;
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Makes descriptor `index` read-only: a broken RX buffer.
    pub fn make_read_only(&self, index: u16) {
        self.mem
            .write_obj(0u16, GuestAddress(DESC + 16 * u64::from(index) + 12))
            .unwrap();
    }

    /// Every used element (id, len) from the start of the ring.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let slot = i % u64::from(QSIZE);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(USED + 4 + 8 * slot))
                    .unwrap();
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(USED + 8 + 8 * slot))
                    .unwrap();
                (id, len)
            })
            .collect()
    }

    /// The first `len` bytes of chain `head`.
    pub fn read_chain(&self, head: u32, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, dlen) in &self.chains[head as usize] {
            let take = left.min(dlen as usize);
            let mut buf = vec![0u8; take];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&buf);
            left -= take;
        }
        out
    }

    /// Everything the driver owns: the descriptor table, the avail ring (with used_event) and
    /// the buffers. A device that only reads must leave it as it was.
    pub fn driver_area(&self) -> Vec<u8> {
        let mut out = vec![0u8; (USED - DESC) as usize];
        self.mem.read_slice(&mut out, GuestAddress(DESC)).unwrap();
        let mut bufs = vec![0u8; (self.next_addr - BUFFERS) as usize];
        self.mem
            .read_slice(&mut bufs, GuestAddress(BUFFERS))
            .unwrap();
        out.extend_from_slice(&bufs);
        out
    }

    /// Whether `ptr` points into guest memory.
    pub fn in_guest_memory(&self, ptr: *const u8) -> bool {
        let base = self.mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        (base..base + MEM_SIZE).contains(&(ptr as usize))
    }
}
