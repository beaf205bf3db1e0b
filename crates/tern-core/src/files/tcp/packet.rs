//! Hand-built IP packets for TCP repair: segments forged from the peer's address and delivered to
//! a restored socket of this host (its FIN, the ACK of our FIN), and ICMP / ICMPv6 errors sent to
//! peers (the RFC 6069 nudge, [`super::nudge`]).
//!
//! Forged TCP segments go through a raw socket with the IP header included (IPPROTO_RAW implies
//! IP_HDRINCL / IPV6_HDRINCL): the source address is the peer's, which is not an address of this
//! host, so the kernel must not pick it. The destination is local, so the packet is looped back
//! and reaches the socket like any segment from the wire (no rp_filter on the loopback path: the
//! output route is kept). IPv4 fills in the IP checksum, the total length and the id; the TCP
//! checksum is ours. ICMP errors go through plain raw ICMP sockets (the kernel picks our source
//! address); ICMPv6 raw sockets get their checksum from the kernel, ICMPv4 ones do not.
//!
//! Every packet is sent with SO_MARK [`REPAIR_PACKET_MARK`], so a network lock can let exactly
//! these through (CRIU's soccr marks its forged FIN the same way).

use crate::sys::Errno;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// SO_MARK of every packet Tern forges; a network lock should accept packets with this mark.
pub const REPAIR_PACKET_MARK: u32 = 0x7e4e_0001;

pub(super) const TCP_FLAG_FIN: u8 = 0x01;
pub(super) const TCP_FLAG_ACK: u8 = 0x10;

const IPPROTO_TCP: u8 = 6;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_HOST_UNREACH: u8 = 1;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_NOROUTE: u8 = 0;

/// A raw packet could not be built or sent.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("socket(AF_INET{v6}, SOCK_RAW, {proto}) failed: {errno}", v6 = if *.v6 { "6" } else { "" })]
    Socket {
        v6: bool,
        proto: &'static str,
        errno: Errno,
    },
    #[error("setsockopt(SO_MARK) on the raw socket failed: {0}")]
    Mark(Errno),
    #[error("sendto({to}) of a {len}-byte raw packet failed: {errno}")]
    Send {
        to: IpAddr,
        len: usize,
        errno: Errno,
    },
    #[error("sendto({to}) sent {sent} of {len} bytes")]
    Short { to: IpAddr, sent: usize, len: usize },
    #[error("{local} and {peer} are not of one address family")]
    Family { local: SocketAddr, peer: SocketAddr },
}

/// The IP version a connection really uses: an IPv4-mapped IPv6 socket talks IPv4 on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wire {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr, u32),
}

/// (source, destination) as they appear on the wire; the scope id is the destination's.
pub(super) fn wire(src: &SocketAddr, dst: &SocketAddr) -> Result<Wire, PacketError> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    match (src, dst) {
        (SocketAddr::V6(s), SocketAddr::V6(d))
            if s.ip().to_ipv4_mapped().is_none() && d.ip().to_ipv4_mapped().is_none() =>
        {
            Ok(Wire::V6(*s.ip(), *d.ip(), d.scope_id()))
        }
        _ => match (v4(src.ip()), v4(dst.ip())) {
            (Some(s), Some(d)) => Ok(Wire::V4(s, d)),
            _ => Err(PacketError::Family {
                local: *dst,
                peer: *src,
            }),
        },
    }
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts`.
pub(super) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/IP pseudo-header the TCP checksum covers.
fn pseudo_header(w: &Wire, tcp_len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match w {
        Wire::V4(s, d) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, IPPROTO_TCP]);
            p.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        }
        Wire::V6(s, d, _) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(tcp_len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
        }
    }
    p
}

/// One TCP segment without payload.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// (TSval, TSecr): adds NOP, NOP, TIMESTAMP (the aligned layout Linux's fast path parses).
    pub timestamps: Option<(u32, u32)>,
}

/// The TCP header of `seg`, checksum included.
pub(super) fn tcp_header(seg: &Segment, w: &Wire) -> Vec<u8> {
    let len = if seg.timestamps.is_some() { 32 } else { 20 };
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(&seg.src.port().to_be_bytes());
    h.extend_from_slice(&seg.dst.port().to_be_bytes());
    h.extend_from_slice(&seg.seq.to_be_bytes());
    h.extend_from_slice(&seg.ack.to_be_bytes());
    h.push(((len / 4) as u8) << 4);
    h.push(seg.flags);
    h.extend_from_slice(&seg.window.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    if let Some((tsval, tsecr)) = seg.timestamps {
        h.extend_from_slice(&[1, 1, 8, 10]);
        h.extend_from_slice(&tsval.to_be_bytes());
        h.extend_from_slice(&tsecr.to_be_bytes());
    }
    let sum = checksum(&[&pseudo_header(w, h.len()), &h]);
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    h
}

/// An IPv4 header (20 bytes, DF, TTL 64) in front of `payload`, with its checksum.
pub(super) fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(20 + payload.len());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 header (hop limit 64) in front of `payload`.
pub(super) fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A raw socket of `family`/`protocol`, marked [`REPAIR_PACKET_MARK`].
pub(super) fn raw_socket(v6: bool, protocol: i32) -> Result<OwnedFd, PacketError> {
    let proto = match protocol {
        libc::IPPROTO_RAW => "IPPROTO_RAW",
        libc::IPPROTO_ICMP => "IPPROTO_ICMP",
        _ => "IPPROTO_ICMPV6",
    };
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let s = super::os::socket(family, libc::SOCK_RAW, protocol)
        .map_err(|errno| PacketError::Socket { v6, proto, errno })?;
    super::os::setsockopt_int(
        s.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_MARK,
        REPAIR_PACKET_MARK as i32,
    )
    .map_err(PacketError::Mark)?;
    Ok(s)
}

fn sendto_raw(
    fd: BorrowedFd<'_>,
    packet: &[u8],
    to: IpAddr,
    scope_id: u32,
) -> Result<(), PacketError> {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        IpAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(a).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            // Port 0: a raw socket's "port" is the protocol; 0 means the socket's own.
            sin6.sin6_addr.s6_addr = a.octets();
            sin6.sin6_scope_id = scope_id;
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: the kernel reads packet.len() bytes of `packet` and `len` bytes of `storage`, both
    // alive for the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            libc::MSG_DONTWAIT,
            (&storage as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        )
    };
    let sent = Errno::result(n).map_err(|errno| PacketError::Send {
        to,
        len: packet.len(),
        errno,
    })? as usize;
    if sent != packet.len() {
        return Err(PacketError::Short {
            to,
            sent,
            len: packet.len(),
        });
    }
    Ok(())
}

/// Sends `seg` (from the peer, to a local address) through a raw socket, IP header included.
pub(super) fn inject(seg: &Segment) -> Result<(), PacketError> {
    let w = wire(&seg.src, &seg.dst)?;
    let tcp = tcp_header(seg, &w);
    match w {
        Wire::V4(s, d) => {
            let sock = raw_socket(false, libc::IPPROTO_RAW)?;
            sendto_raw(
                sock.as_fd(),
                &ipv4_packet(s, d, IPPROTO_TCP, &tcp),
                IpAddr::V4(d),
                0,
            )
        }
        Wire::V6(s, d, scope) => {
            let sock = raw_socket(true, libc::IPPROTO_RAW)?;
            // IPPROTO_RAW already implies it; say it so the intent does not hang on a default.
            super::os::setsockopt_int(sock.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 1)
                .map_err(|errno| PacketError::Socket {
                    v6: true,
                    proto: "IPPROTO_RAW (IPV6_HDRINCL)",
                    errno,
                })?;
            sendto_raw(
                sock.as_fd(),
                &ipv6_packet(s, d, IPPROTO_TCP, &tcp),
                IpAddr::V6(d),
                scope,
            )
        }
    }
}

/// Raw ICMP and ICMPv6 sockets for sending errors to peers, opened once per nudge.
pub(super) struct IcmpSockets {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
}

impl IcmpSockets {
    pub fn new() -> IcmpSockets {
        IcmpSockets { v4: None, v6: None }
    }

    fn get(&mut self, v6: bool) -> Result<BorrowedFd<'_>, PacketError> {
        let slot = if v6 { &mut self.v6 } else { &mut self.v4 };
        if slot.is_none() {
            let proto = if v6 {
                libc::IPPROTO_ICMPV6
            } else {
                libc::IPPROTO_ICMP
            };
            *slot = Some(raw_socket(v6, proto)?);
        }
        Ok(slot.as_ref().map(|s| s.as_fd()).expect("just set"))
    }

    /// Sends the peer an ICMP "host unreachable" (ICMPv6 "no route to destination") quoting a
    /// segment it sent to us: the peer's IP header and the first 8 bytes of its TCP header
    /// (ports and sequence number `seq`).
    pub fn send_unreachable(
        &mut self,
        local: &SocketAddr,
        peer: &SocketAddr,
        seq: u32,
    ) -> Result<(), PacketError> {
        let w = wire(peer, local)?;
        // The quoted segment as the peer sent it: peer -> us.
        let mut tcp8 = Vec::with_capacity(8);
        tcp8.extend_from_slice(&peer.port().to_be_bytes());
        tcp8.extend_from_slice(&local.port().to_be_bytes());
        tcp8.extend_from_slice(&seq.to_be_bytes());
        match w {
            Wire::V4(p, l) => {
                // The quoted header claims a 20-byte TCP header without payload; only the first
                // 8 bytes of it follow (RFC 792).
                let mut quoted = ipv4_packet(p, l, IPPROTO_TCP, &[0u8; 20]);
                quoted.truncate(20);
                let mut icmp = vec![ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0, 0, 0, 0, 0];
                icmp.extend_from_slice(&quoted);
                icmp.extend_from_slice(&tcp8);
                let sum = checksum(&[&icmp]);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                sendto_raw(self.get(false)?, &icmp, IpAddr::V4(p), 0)
            }
            Wire::V6(p, l, _) => {
                let mut quoted = ipv6_packet(p, l, IPPROTO_TCP, &[0u8; 20]);
                quoted.truncate(40);
                // The kernel computes ICMPv6 checksums of raw ICMPv6 sockets (RFC 3542 3.1).
                let mut icmp = vec![ICMPV6_DEST_UNREACH, ICMPV6_NOROUTE, 0, 0, 0, 0, 0, 0];
                icmp.extend_from_slice(&quoted);
                icmp.extend_from_slice(&tcp8);
                let scope = match peer {
                    SocketAddr::V6(a) => a.scope_id(),
                    SocketAddr::V4(_) => 0,
                };
                sendto_raw(self.get(true)?, &icmp, IpAddr::V6(p), scope)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2, checksum is its complement.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2], &[0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        // A buffer with its checksum in place sums to zero.
        let mut ip = ipv4_packet(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            6,
            &[],
        );
        assert_eq!(checksum(&[&ip]), 0);
        ip[8] = 1;
        assert_ne!(checksum(&[&ip]), 0);
    }

    #[test]
    fn tcp_header_layout_and_checksum() {
        let src: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let seg = Segment {
            src,
            dst,
            seq: 0x01020304,
            ack: 0x0a0b0c0d,
            flags: TCP_FLAG_FIN | TCP_FLAG_ACK,
            window: 512,
            timestamps: Some((0, 77)),
        };
        let w = wire(&src, &dst).unwrap();
        let h = tcp_header(&seg, &w);
        assert_eq!(h.len(), 32);
        assert_eq!(h[12] >> 4, 8);
        assert_eq!(h[13], 0x11);
        assert_eq!(&h[4..8], &[1, 2, 3, 4]);
        assert_eq!(&h[20..24], &[1, 1, 8, 10]);
        assert_eq!(checksum(&[&pseudo_header(&w, h.len()), &h]), 0);
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:80".parse().unwrap();
        assert!(matches!(wire(&src, &mapped), Ok(Wire::V4(..))));
        let v6: SocketAddr = "[fd00::2]:80".parse().unwrap();
        assert!(wire(&src, &v6).is_err());
    }
}
