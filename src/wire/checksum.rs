//! RFC 1071 Internet checksum with a streaming accumulator.
//!
//! The accumulator is byte-position aware, so feeding a frame in arbitrary
//! pieces (descriptor chains split anywhere, including mid-word) gives the
//! same result as one call over the whole buffer.

/// Bytes summed per inner block. Summing `u32` words into a `u64` cannot
/// overflow for fewer than 2^32 words; blocks keep that bound explicit for
/// any input size while staying long enough to amortise the per-block fold.
const BLOCK_LEN: usize = 1 << 20;

/// Ones'-complement addition of two 16-bit values (end-around carry).
///
/// Never returns 0 unless both inputs are 0, so "all-zero data" (0) stays
/// distinct from "non-zero data summing to negative zero" (0xFFFF), exactly
/// like the classic 32-bit accumulate-then-fold implementation.
#[inline]
fn add16(a: u16, b: u16) -> u16 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u16::from(carry)
}

/// Folds a 64-bit partial sum into 16 bits, preserving the residue modulo
/// 0xFFFF and non-zeroness.
#[inline]
fn fold64(x: u64) -> u16 {
    let (sum, carry) = (x as u32).overflowing_add((x >> 32) as u32);
    let x = sum + u32::from(carry);
    add16(x as u16, (x >> 16) as u16)
}

/// Ones'-complement sum of `data` as if it started at an even offset (a
/// trailing odd byte is the high byte of a zero-padded word).
///
/// Words are loaded in native byte order and summed as `u32` into `u64`,
/// which LLVM vectorises; by RFC 1071's byte-order independence the native
/// sum is the big-endian sum byte-swapped, fixed once at the end.
fn sum_be(data: &[u8]) -> u16 {
    let mut total = 0u16;
    for block in data.chunks(BLOCK_LEN) {
        let mut words = block.chunks_exact(4);
        let mut acc = 0u64;
        for word in &mut words {
            let mut w = [0u8; 4];
            w.copy_from_slice(word);
            acc += u64::from(u32::from_ne_bytes(w));
        }
        let rest = words.remainder();
        let mut w = [0u8; 4];
        w[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_ne_bytes(w));
        total = add16(total, fold64(acc));
    }
    u16::from_be(total)
}

/// Streaming Internet checksum accumulator.
///
/// Holds the folded ones'-complement sum so far and whether an odd number of
/// bytes has been consumed (the next byte is then the low byte of a word).
#[derive(Debug, Clone, Copy, Default)]
pub struct Checksum {
    sum: u16,
    odd: bool,
}

impl Checksum {
    /// An empty sum (identical to `Checksum::default()`).
    pub const fn new() -> Self {
        Checksum { sum: 0, odd: false }
    }

    /// Adds a folded sum that was computed as if at an even offset.
    #[inline]
    fn add_even_sum(&mut self, sum: u16) {
        let sum = if self.odd { sum.swap_bytes() } else { sum };
        self.sum = add16(self.sum, sum);
    }

    /// Appends bytes to the stream. Any split of the same byte sequence over
    /// several calls yields the same result.
    pub fn add_bytes(&mut self, data: &[u8]) -> &mut Self {
        self.add_even_sum(sum_be(data));
        self.odd ^= data.len() & 1 == 1;
        self
    }

    /// Appends `value` in network byte order; same as
    /// `add_bytes(&value.to_be_bytes())`.
    pub fn add_u16(&mut self, value: u16) -> &mut Self {
        self.add_even_sum(value);
        self
    }

    /// Appends `value` in network byte order; same as
    /// `add_bytes(&value.to_be_bytes())`.
    pub fn add_u32(&mut self, value: u32) -> &mut Self {
        self.add_u16((value >> 16) as u16);
        self.add_u16(value as u16)
    }

    /// Appends the byte stream summed by `other`, as if its bytes had been
    /// passed to `add_bytes` on `self` (lets independently summed pieces,
    /// e.g. a header and a shared payload, be combined).
    pub fn append(&mut self, other: &Checksum) -> &mut Self {
        self.add_even_sum(other.sum);
        self.odd ^= other.odd;
        self
    }

    /// Whether an odd number of bytes has been added so far.
    pub fn is_odd(&self) -> bool {
        self.odd
    }

    /// The folded ones'-complement sum, not inverted. This is what Linux and
    /// virtio `CHECKSUM_PARTIAL` expect in the checksum field (the
    /// pseudo-header sum) before completion.
    pub fn fold(&self) -> u16 {
        self.sum
    }

    /// The inverted sum: the value to store in a checksum field, or 0 when
    /// verifying a buffer that already includes its checksum field.
    pub fn finish(&self) -> u16 {
        !self.sum
    }

    /// Like [`finish`](Self::finish) but maps 0 to 0xFFFF, because a UDP
    /// checksum of 0 means "no checksum" (RFC 768, RFC 8200 8.1).
    pub fn finish_udp(&self) -> u16 {
        match self.finish() {
            0 => 0xFFFF,
            sum => sum,
        }
    }
}

/// Sum of the IPv4 TCP/UDP pseudo-header (RFC 793/768): source, destination,
/// zero byte, protocol, L4 length. `l4_len` is added as a 32-bit value,
/// which is identical for any length that fits the 16-bit wire field.
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u32) -> Checksum {
    let mut sum = Checksum::new();
    sum.add_bytes(&src)
        .add_bytes(&dst)
        .add_u16(u16::from(proto))
        .add_u32(l4_len);
    sum
}

/// Sum of the IPv6 upper-layer pseudo-header (RFC 8200 8.1): source,
/// destination, 32-bit upper-layer length, three zero bytes, next header.
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, l4_len: u32) -> Checksum {
    let mut sum = Checksum::new();
    sum.add_bytes(&src)
        .add_bytes(&dst)
        .add_u32(l4_len)
        .add_u32(u32::from(next_header));
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testdata::*;
    use proptest::prelude::*;

    /// Textbook reference: big-endian byte pairs into a wide integer, fold
    /// with end-around carry at the end.
    fn naive(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for pair in data.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u64::from);
            sum += hi | lo;
        }
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum as u16
    }

    fn one_shot(data: &[u8]) -> u16 {
        Checksum::new().add_bytes(data).fold()
    }

    #[test]
    fn empty_and_zero() {
        assert_eq!(Checksum::new().fold(), 0);
        assert_eq!(Checksum::new().finish(), 0xFFFF);
        assert_eq!(one_shot(&[0; 7]), 0);
        assert_eq!(Checksum::default().finish_udp(), 0xFFFF);
    }

    /// RFC 1071 section 3 worked example.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(one_shot(&data), 0xddf2);
        assert_eq!(naive(&data), 0xddf2);
    }

    /// Non-zero data whose sum is negative zero must fold to 0xFFFF, and
    /// `finish_udp` must then map the resulting 0 to 0xFFFF.
    #[test]
    fn negative_zero() {
        let data = [0xff, 0xff, 0x00, 0x00, 0xff, 0xff];
        assert_eq!(one_shot(&data), 0xFFFF);
        let mut sum = Checksum::new();
        sum.add_bytes(&[0x12, 0x34]).add_u16(!0x1234);
        assert_eq!(sum.fold(), 0xFFFF);
        assert_eq!(sum.finish(), 0);
        assert_eq!(sum.finish_udp(), 0xFFFF);
    }

    #[test]
    fn odd_split_mid_word() {
        let mut sum = Checksum::new();
        sum.add_bytes(&[0x12])
            .add_bytes(&[0x34, 0x56])
            .add_bytes(&[0x78]);
        assert!(!sum.is_odd());
        assert_eq!(sum.fold(), 0x1234 + 0x5678);
    }

    #[test]
    fn large_buffer_matches_naive() {
        let data: Vec<u8> = (0..(3 * BLOCK_LEN + 5))
            .map(|i| (i * 7 + 3) as u8)
            .collect();
        assert_eq!(one_shot(&data), naive(&data));
        let all_ff = vec![0xffu8; 65536 + 3];
        assert_eq!(one_shot(&all_ff), naive(&all_ff));
    }

    #[test]
    fn pseudo_header_v4_by_hand() {
        let sum = pseudo_header_v4(V4_SRC, V4_DST, 6, V4_TCP_LEN);
        assert_eq!(sum.fold(), V4_PSEUDO_FOLDED);
        assert!(!sum.is_odd());
    }

    #[test]
    fn pseudo_header_v6_by_hand() {
        let sum = pseudo_header_v6(V6_SRC, V6_DST, 17, V6_UDP_LEN);
        assert_eq!(sum.fold(), V6_PSEUDO_FOLDED);
        assert!(!sum.is_odd());
    }

    #[test]
    fn frame_checksums_verify() {
        let ip = &FRAME_V4_TCP[V4_IP_OFFSET..V4_TCP_OFFSET];
        assert_eq!(Checksum::new().add_bytes(ip).finish(), 0);
        let mut tcp = pseudo_header_v4(V4_SRC, V4_DST, 6, V4_TCP_LEN);
        tcp.add_bytes(&FRAME_V4_TCP[V4_TCP_OFFSET..]);
        assert_eq!(tcp.finish(), 0);
        let mut udp = pseudo_header_v6(V6_SRC, V6_DST, 17, V6_UDP_LEN);
        udp.add_bytes(&FRAME_V6_UDP[V6_UDP_OFFSET..]);
        assert_eq!(udp.finish(), 0);
    }

    /// Buffer plus sorted cut points inside it.
    fn buffer_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        prop::collection::vec(any::<u8>(), 0..2048).prop_flat_map(|data| {
            let len = data.len();
            let cuts = prop::collection::vec(0..=len, 0..12);
            (Just(data), cuts)
        })
    }

    fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts = cuts.to_vec();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts {
            out.push(&data[start..cut]);
            start = cut;
        }
        out.push(&data[start..]);
        out
    }

    proptest! {
        #[test]
        fn streaming_equals_one_shot_and_naive((data, cuts) in buffer_and_cuts()) {
            let mut streamed = Checksum::new();
            for piece in pieces(&data, &cuts) {
                streamed.add_bytes(piece);
            }
            prop_assert_eq!(streamed.fold(), one_shot(&data));
            prop_assert_eq!(streamed.fold(), naive(&data));
            prop_assert_eq!(streamed.is_odd(), data.len() % 2 == 1);
        }

        #[test]
        fn append_equals_streaming((data, cuts) in buffer_and_cuts()) {
            let mut combined = Checksum::new();
            for piece in pieces(&data, &cuts) {
                combined.append(Checksum::new().add_bytes(piece));
            }
            prop_assert_eq!(combined.fold(), naive(&data));
            prop_assert_eq!(combined.is_odd(), data.len() % 2 == 1);
        }

        #[test]
        fn add_uint_equals_add_bytes(
            prefix in prop::collection::vec(any::<u8>(), 0..5),
            a in any::<u16>(),
            b in any::<u32>(),
        ) {
            let mut words = Checksum::new();
            words.add_bytes(&prefix).add_u16(a).add_u32(b);
            let mut bytes = prefix.clone();
            bytes.extend_from_slice(&a.to_be_bytes());
            bytes.extend_from_slice(&b.to_be_bytes());
            prop_assert_eq!(words.fold(), naive(&bytes));
            prop_assert_eq!(words.is_odd(), bytes.len() % 2 == 1);
        }

        #[test]
        fn pseudo_headers_match_byte_layout(
            src in any::<[u8; 16]>(),
            dst in any::<[u8; 16]>(),
            proto in any::<u8>(),
            len in any::<u16>(),
        ) {
            let src4 = [src[0], src[1], src[2], src[3]];
            let dst4 = [dst[0], dst[1], dst[2], dst[3]];
            let mut v4 = Vec::new();
            v4.extend_from_slice(&src4);
            v4.extend_from_slice(&dst4);
            v4.extend_from_slice(&[0, proto]);
            v4.extend_from_slice(&len.to_be_bytes());
            prop_assert_eq!(
                pseudo_header_v4(src4, dst4, proto, u32::from(len)).fold(),
                naive(&v4)
            );
            let mut v6 = Vec::new();
            v6.extend_from_slice(&src);
            v6.extend_from_slice(&dst);
            v6.extend_from_slice(&u32::from(len).to_be_bytes());
            v6.extend_from_slice(&[0, 0, 0, proto]);
            prop_assert_eq!(
                pseudo_header_v6(src, dst, proto, u32::from(len)).fold(),
                naive(&v6)
            );
        }
    }
}
