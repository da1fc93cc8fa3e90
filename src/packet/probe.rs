//! Feature probes for the running kernel.

use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd};

use super::interface::Interface;
use super::socket::{VNET_HDR_LEN, VNET_HDR_MRG_LEN};
use super::sys::{bind_to, open_raw, setsockopt_int};
use crate::wire::checksum::{pseudo_header_v4, Checksum};

/// Whether AF_PACKET TX accepts `VIRTIO_NET_HDR_GSO_UDP_L4` (USO) in the vnet header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsoSupport {
    /// Supported; the text says how we know.
    Supported(&'static str),
    /// Not supported, or not determinable; the text says why.
    Unsupported(String),
}

impl UsoSupport {
    /// True for [`UsoSupport::Supported`].
    pub fn is_supported(&self) -> bool {
        matches!(self, UsoSupport::Supported(_))
    }
}

/// What [`probe_uso`] returns when the kernel took the probe frame.
pub const USO_ACCEPTED_ON_LO: &str = "UDP_L4 vnet header accepted on lo";
/// What [`probe_uso`] returns when it had to fall back to the kernel version.
pub const USO_BY_KERNEL_RELEASE: &str = "kernel release (uname) >= 6.2";

/// `virtio_net_hdr_to_skb()` learned `VIRTIO_NET_HDR_GSO_UDP_L4` in Linux 6.2.
const USO_MIN_KERNEL: (u32, u32) = (6, 2);

/// Finds out whether the running kernel accepts `VIRTIO_NET_HDR_GSO_UDP_L4` (5) in vnet headers
/// on AF_PACKET TX.
///
/// Method: send one small USO frame (Ethernet/IPv4/UDP 127.0.0.1:9 -> 127.0.0.1:9, the discard
/// port, 300 bytes payload in 100-byte segments) through a packet socket bound to `lo` of the
/// caller's network namespace. The frame goes nowhere but the local stack of that namespace.
/// Success means supported; `EINVAL` means the header was rejected. If `lo` is down or the probe
/// cannot run (no CAP_NET_RAW, ...), the kernel release from uname(2) decides.
pub fn probe_uso() -> UsoSupport {
    match probe_on_loopback() {
        Ok(()) => UsoSupport::Supported(USO_ACCEPTED_ON_LO),
        Err(Probe::Rejected(e)) => UsoSupport::Unsupported(format!(
            "the kernel rejected a UDP_L4 vnet header on lo: {e}"
        )),
        Err(Probe::CouldNotRun(why)) => {
            log::debug!("USO probe on lo could not run ({why}); using the kernel release");
            by_kernel_release(&why)
        }
    }
}

enum Probe {
    Rejected(io::Error),
    CouldNotRun(String),
}

fn probe_on_loopback() -> Result<(), Probe> {
    let lo = Interface::by_name("lo").map_err(|e| Probe::CouldNotRun(e.to_string()))?;
    match lo.flags() {
        Ok(f) if f.up && f.loopback => {}
        Ok(f) if !f.loopback => return Err(Probe::CouldNotRun("\"lo\" is not loopback".into())),
        Ok(_) => return Err(Probe::CouldNotRun("lo is down".into())),
        Err(e) => return Err(Probe::CouldNotRun(e.to_string())),
    }

    let fd = open_raw().map_err(|e| Probe::CouldNotRun(format!("opening packet socket: {e}")))?;

    let hdr_len = if setsockopt_int(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_VNET_HDR_SZ,
        VNET_HDR_MRG_LEN as c_int,
    )
    .is_ok()
    {
        VNET_HDR_MRG_LEN
    } else if let Err(e) = setsockopt_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1) {
        return Err(Probe::CouldNotRun(format!("setting PACKET_VNET_HDR: {e}")));
    } else {
        VNET_HDR_LEN
    };

    // Protocol 0 in bind: the socket gets a device for sending but never receives anything.
    bind_to(fd.as_fd(), lo.index(), 0)
        .map_err(|e| Probe::CouldNotRun(format!("binding to lo: {e}")))?;

    let packet = uso_probe_packet(hdr_len);
    // SAFETY: `packet` is a live, initialised buffer of `packet.len()` bytes; send only reads it.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            packet.as_ptr().cast::<c_void>(),
            packet.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EINVAL) {
            Probe::Rejected(e)
        } else {
            Probe::CouldNotRun(format!("sending the probe frame on lo: {e}"))
        });
    }
    Ok(())
}

const PAYLOAD_LEN: usize = 300;
const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const L4_OFF: usize = ETH_LEN + IP_LEN;
const HDRS_LEN: usize = L4_OFF + UDP_LEN;

/// `[vnet header (hdr_len bytes)][Ethernet][IPv4][UDP][payload]` with a USO vnet header.
fn uso_probe_packet(vnet_len: usize) -> Vec<u8> {
    use crate::virtio::header::{FLAG_NEEDS_CSUM, GSO_UDP_L4};
    const GSO_SIZE: u16 = 100;
    // offsetof(struct udphdr, check)
    const UDP_CSUM_OFFSET: u16 = 6;

    let mut p = vec![0u8; vnet_len + HDRS_LEN + PAYLOAD_LEN];
    // The vnet header uses legacy virtio endianness here, i.e. host order.
    let (hdr, frame) = p.split_at_mut(vnet_len);
    hdr[0] = FLAG_NEEDS_CSUM;
    hdr[1] = GSO_UDP_L4;
    hdr[2..4].copy_from_slice(&(HDRS_LEN as u16).to_ne_bytes());
    hdr[4..6].copy_from_slice(&GSO_SIZE.to_ne_bytes());
    hdr[6..8].copy_from_slice(&(L4_OFF as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&UDP_CSUM_OFFSET.to_ne_bytes());
    // num_buffers (bytes 10..12, if present) stays 0; the kernel ignores it on TX.

    // Ethernet: lo's address is all zeros, so a zero destination is PACKET_HOST there.
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());

    let loopback = [127, 0, 0, 1];
    let ip = &mut frame[ETH_LEN..L4_OFF];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_LEN + UDP_LEN + PAYLOAD_LEN) as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&loopback);
    ip[16..20].copy_from_slice(&loopback);
    let ip_csum = Checksum::new().add_bytes(ip).finish();
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());

    let udp_len = (UDP_LEN + PAYLOAD_LEN) as u16;
    let udp = &mut frame[L4_OFF..HDRS_LEN];
    udp[0..2].copy_from_slice(&9u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // NEEDS_CSUM: the check field holds the folded pseudo-header sum over the full L4 length,
    // not inverted; the kernel adds the rest per segment.
    let seed = pseudo_header_v4(loopback, loopback, 17, u32::from(udp_len)).fold();
    udp[6..8].copy_from_slice(&seed.to_be_bytes());

    for (i, b) in frame[HDRS_LEN..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// `PACKET_FANOUT_FLAG_IGNORE_OUTGOING` works since Linux 6.2. Older kernels accept the flag
/// and ignore it, so setting it tells nothing.
const FANOUT_IGNORE_OUTGOING_MIN_KERNEL: (u32, u32) = (6, 2);

/// Whether the running kernel keeps outgoing frames from a fanout group with
/// `PACKET_FANOUT_FLAG_IGNORE_OUTGOING`, by its release: `Err` says why not or why unknown.
pub fn fanout_ignores_outgoing() -> Result<(), String> {
    let release = kernel_release().map_err(|e| format!("uname failed: {e}"))?;
    match parse_release(&release) {
        Some(v) if v >= FANOUT_IGNORE_OUTGOING_MIN_KERNEL => Ok(()),
        Some(_) => Err(format!("kernel {release} is older than 6.2")),
        None => Err(format!("cannot parse kernel release {release:?}")),
    }
}

fn by_kernel_release(why_no_probe: &str) -> UsoSupport {
    let release = match kernel_release() {
        Ok(r) => r,
        Err(e) => {
            return UsoSupport::Unsupported(format!(
                "probe on lo could not run ({why_no_probe}) and uname failed: {e}"
            ))
        }
    };
    match parse_release(&release) {
        Some(v) if v >= USO_MIN_KERNEL => {
            log::info!("kernel {release} >= 6.2: assuming USO in vnet headers is supported");
            UsoSupport::Supported(USO_BY_KERNEL_RELEASE)
        }
        Some(_) => UsoSupport::Unsupported(format!(
            "kernel {release} < 6.2 (probe on lo could not run: {why_no_probe})"
        )),
        None => UsoSupport::Unsupported(format!(
            "cannot parse kernel release {release:?} (probe on lo could not run: {why_no_probe})"
        )),
    }
}

fn kernel_release() -> io::Result<String> {
    let mut uts = mem::MaybeUninit::<libc::utsname>::zeroed();
    // SAFETY: `uts` is writable memory of the size uname(2) fills in.
    if unsafe { libc::uname(uts.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: uname succeeded and the struct was zeroed before, so every field is initialised
    // and `release` is NUL-terminated within its array (the kernel writes a terminated string).
    let uts = unsafe { uts.assume_init() };
    // SAFETY: `release` is a NUL-terminated C string inside the array (see above) that lives
    // as long as `uts`.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// "6.18.44-fc-v657" -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_parsing() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("6.2.0"), Some((6, 2)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release("abc"), None);
        assert!((6, 18) >= USO_MIN_KERNEL && (5, 19) < USO_MIN_KERNEL);
    }

    #[test]
    fn probe_packet_layout() {
        use crate::wire::ipv4::Ipv4Packet;
        use crate::wire::udp::UdpDatagram;

        let p = uso_probe_packet(12);
        assert_eq!(p.len(), 12 + 42 + 300);
        assert_eq!(&p[..2], &[1, 5]);
        assert_eq!(u16::from_ne_bytes([p[2], p[3]]), 42);
        assert_eq!(u16::from_ne_bytes([p[4], p[5]]), 100);
        assert_eq!(u16::from_ne_bytes([p[6], p[7]]), 34);
        assert_eq!(u16::from_ne_bytes([p[8], p[9]]), 6);
        let frame = &p[12..];
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum());
        // Completing the seeded UDP checksum over the L4 bytes gives a valid UDP checksum.
        let l4 = &frame[34..];
        let full = Checksum::new().add_bytes(l4).finish();
        let mut check = l4.to_vec();
        check[6..8].copy_from_slice(&full.to_be_bytes());
        let udp = UdpDatagram::new_checked(&check[..]).unwrap();
        assert!(udp.verify_checksum(ip.pseudo_header()));
        assert_eq!(uso_probe_packet(10).len(), 10 + 42 + 300);
    }
}
