//! The peer nudge: after restore, make each peer retransmit what the switchover dropped at once,
//! instead of at the end of its (backed-off) retransmission timeout.
//!
//! During the switchover the source host drops the process's traffic. A peer that sent data then
//! got no ACK, retransmitted on RTO, doubled its RTO each time (icsk_backoff), and may now wait
//! seconds before it tries again, although the restored socket would ACK at once. TCP-LD (RFC
//! 6069) lets an ICMP unreachable error undo one backoff step; Linux implements it in
//! tcp_ld_RTO_revert() (net/ipv4/tcp_ipv4.c), called from tcp_v4_err() and tcp_v6_err().
//!
//! Conditions, from the kernel source (6.x):
//! - ICMPv4: type 3 (destination unreachable), code 0 (net) or 1 (host). ICMPv6: type 1
//!   (destination unreachable), code 0 (no route). Other codes never revert.
//! - The quoted packet (inner IP header + first 8 bytes of TCP) must name the peer's socket as if
//!   the peer had sent it: inner source = the peer, inner destination = us, TCP source port = the
//!   peer's port. The established-socket lookup uses exactly these.
//! - Not a TIME_WAIT / request socket; no TCP Fast Open request pending; on IPv4 the socket is not
//!   in SYN_SENT/SYN_RECV handling, on IPv6 not SYN_SENT/SYN_RECV/LISTEN.
//! - The quoted seq must lie in [snd_una, snd_nxt] (else OUTOFWINDOWICMPS, ignored) AND equal
//!   snd_una exactly: the peer's oldest unacknowledged byte, which is our rcv_nxt as the peer
//!   last heard it (TCP_QUEUE_SEQ of the receive queue at dump, or rcv_wup when our last ACK
//!   carried an older value).
//! - icsk_retransmits > 0 and icsk_backoff > 0: the peer is in RTO backoff; else nothing happens.
//! - The peer's socket is not owned by a user context at that instant (sock_owned_by_user): the
//!   ICMP is then dropped, not deferred. Hence several ICMPs, spaced.
//! - Effect: backoff -= 1; rto = base RTO << backoff; if that RTO has already elapsed since the
//!   head segment was last sent, tcp_retransmit_timer() runs now (retransmission at once), else
//!   the retransmit timer is re-armed for the remainder. Each ICMP undoes one step, so sending N
//!   undoes up to N doublings; at backoff 0 further ICMPs do nothing. Once our ACK moved
//!   snd_una, they no longer match and are ignored.
//! - Side effect: the error becomes the peer socket's sk_err_soft (seen only if the connection
//!   later times out); a peer socket with IP_RECVERR / IPV6_RECVERR set gets it as sk_err, i.e. one
//!   failed read or write with EHOSTUNREACH / ENETUNREACH. TCP applications rarely set RECVERR.

use super::packet::{IcmpSockets, PacketError};
use crate::image::fd::{FdImage, FdKindImage};
use std::net::SocketAddr;
use std::time::Duration;

/// One restored connection whose peer may be waiting on a retransmission timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NudgeTarget {
    /// Our address (the restored socket's local address).
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Candidates for the peer's snd_una: our rcv_nxt at dump, and rcv_wup if it differs (the
    /// ack value of the last segment we sent). Each gets its own ICMPs; the wrong one is ignored.
    pub seqs: Vec<u32>,
}

/// How many ICMP errors to send per target and sequence, and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NudgeOptions {
    /// One backoff step undone per accepted ICMP. 8 covers a peer that doubled its RTO 8 times
    /// (200 ms base: ~51 s), far beyond any switchover.
    pub count: u32,
    /// Gap between rounds, so that a peer socket briefly locked by its application still sees
    /// most of them.
    pub spacing: Duration,
}

impl Default for NudgeOptions {
    fn default() -> Self {
        NudgeOptions {
            count: 8,
            spacing: Duration::from_millis(1),
        }
    }
}

/// What a nudge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NudgeReport {
    /// ICMP / ICMPv6 errors sent.
    pub sent: usize,
    /// Sends that failed (unreachable peer, no raw socket...): the nudge is best effort.
    pub failures: Vec<String>,
}

/// The targets of every ESTABLISHED or half-closed connection in a restored process's fds.
/// Connections whose peer already closed its side (CLOSE_WAIT, LAST_ACK, CLOSING) are included:
/// the peer may still be retransmitting its FIN or data.
pub fn nudge_targets(fds: &[FdImage]) -> Vec<NudgeTarget> {
    let mut out = Vec::new();
    for fd in fds {
        let FdKindImage::TcpEstablished {
            local,
            peer,
            repair,
            ..
        } = &fd.kind
        else {
            continue;
        };
        let (Some(local), Some(peer)) = (parse(local), parse(peer)) else {
            continue;
        };
        let mut seqs = vec![repair.recv_seq];
        let wup = repair.window.rcv_wup;
        if wup != repair.recv_seq && wup != 0 {
            seqs.push(wup);
        }
        out.push(NudgeTarget { local, peer, seqs });
    }
    out
}

fn parse(a: &crate::image::fd::InetAddr) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = a.address.parse().ok()?;
    Some(match ip {
        std::net::IpAddr::V4(v4) => SocketAddr::new(v4.into(), a.port),
        std::net::IpAddr::V6(v6) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, a.port, 0, a.scope_id))
        }
    })
}

/// Sends each target's peer `options.count` rounds of ICMP unreachable errors quoting a segment
/// of the peer at each candidate sequence (see the module header for why this makes a peer in
/// RTO backoff retransmit at once). Call it from the destination host's network namespace once
/// the restored process runs and its address answers. Best effort: failed sends are reported,
/// not fatal; only failing to open a raw socket at all is an error.
pub fn nudge_peers(
    targets: &[NudgeTarget],
    options: NudgeOptions,
) -> Result<NudgeReport, PacketError> {
    let mut sockets = IcmpSockets::new();
    let mut report = NudgeReport::default();
    for round in 0..options.count {
        if round > 0 && !options.spacing.is_zero() {
            std::thread::sleep(options.spacing);
        }
        for t in targets {
            for &seq in &t.seqs {
                match sockets.send_unreachable(&t.local, &t.peer, seq) {
                    Ok(()) => report.sent += 1,
                    Err(e @ PacketError::Socket { .. }) | Err(e @ PacketError::Mark(_)) => {
                        return Err(e)
                    }
                    Err(e) => {
                        if report.failures.len() < 16 {
                            report
                                .failures
                                .push(format!("{} -> {}: {e}", t.local, t.peer));
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}
