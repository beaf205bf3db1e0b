//! TCP repair: an ESTABLISHED or half-closed connection checkpointed on the source and rebuilt on
//! the destination without the peer noticing. The sequences follow CRIU's soccr (soccr/soccr.c),
//! rewritten here; /work/shared/probes/tcp_repair.py is the standalone experiment.
//!
//! ```text
//! sequence space  (TCP_QUEUE_SEQ; a FIN takes one sequence number)
//!
//!        send side                             receive side
//!   snd_una   snd_nxt   write_seq           copied_seq   rcv_nxt
//!      |--unacked--|--unsent--|[FIN]            |--unread--|[FIN]
//!
//!   TCP_QUEUE_SEQ(SEND) = write_seq: after our FIN once shutdown(SHUT_WR) queued it
//!   TCP_QUEUE_SEQ(RECV) = rcv_nxt:   after the peer's FIN once it was received
//!   SIOCOUTQ   = write_seq - snd_una: counts our FIN until it is acked
//!   SIOCOUTQNSD= write_seq - snd_nxt: counts our FIN until it is transmitted
//!   SIOCINQ    = rcv_nxt - copied_seq, minus 1 for a received FIN: data bytes only
//!   recv(MSG_PEEK) in repair mode returns data only (a FIN has no payload) on both queues
//!
//!   state        our FIN            peer FIN   image: send_seq   recv_seq   queue lengths
//!   ESTABLISHED  -                  -          write_seq         rcv_nxt    OUTQ, INQ
//!   FIN_WAIT1    queued, unacked    -          data end + 1      rcv_nxt    OUTQ-1, INQ
//!   FIN_WAIT2    acked              -          data end + 1      rcv_nxt    0, INQ
//!   CLOSE_WAIT   -                  received   write_seq         FIN + 1    OUTQ, INQ
//!   LAST_ACK     queued, unacked    received   data end + 1      FIN + 1    OUTQ-1, INQ
//!   CLOSING      queued, unacked    received   data end + 1      FIN + 1    OUTQ-1, INQ
//!   (our FIN never transmitted: SIOCOUTQNSD >= 1, `fin_unsent`; unsent data = NSD - 1)
//!   Refused: SYN_SENT/SYN_RECV (mid-handshake), TIME_WAIT/CLOSE (no fd holds a live one), and a
//!   listener with connections in its accept queue (see check.rs: they are not carried).
//!
//! dump     (process frozen, its traffic dropped by the network lock, on the fd stolen with
//!          pidfd_getfd — the same socket the process holds)
//!          TCP_INFO: state (one of the six above), options, window scales;
//!          SIOCOUTQ, SIOCOUTQNSD, SIOCINQ, each corrected for FINs as in the table;
//!          TCP_REPAIR=1 (allowed in any state but LISTEN);
//!          TCP_REPAIR_QUEUE=SEND: TCP_QUEUE_SEQ (write_seq), recv(MSG_PEEK) = the send queue;
//!          TCP_REPAIR_QUEUE=RECV: TCP_QUEUE_SEQ (rcv_nxt), recv(MSG_PEEK) = the receive queue;
//!          TCP_REPAIR_WINDOW, TCP_MAXSEG, TCP_TIMESTAMP, TCP_KEEPIDLE/INTVL/CNT; then
//!          TCP_REPAIR_OFF_NO_WP (nothing sent, nothing changed) and SO_REUSEADDR put back
//!          (leaving repair mode clears sk_reuse).
//! silence  (commit, just before the original is killed) TCP_REPAIR=1 on every connected TCP
//!          socket of the process: its close is then silent (no FIN, no RST: tcp_disconnect in
//!          repair mode only sets ECONNABORTED locally).
//! restore  (destination agent, in the destination netns, the service address already there)
//!          socket + options (reuse, keepalive, nodelay, v6only, buffers); TCP_REPAIR=1 (forces
//!          address reuse). data_end = send_seq - [our FIN], rcv_data = recv_seq - [peer FIN].
//!          QUEUE_SEQ send = data_end - len(send queue), recv = rcv_data - len(recv queue);
//!          TCP_TIMESTAMP; bind(local); connect(peer) (no SYN: straight to ESTABLISHED);
//!          RECV queue refilled; SEND queue refilled with the sent-but-unacked part only;
//!          TCP_REPAIR_OPTIONS (MSS, window scale, SACK, timestamps); TCP_REPAIR_WINDOW (rcv_wup
//!          pulled back to rcv_data and rcv_wnd grown by as much, when the dumped rcv_wup counted
//!          the peer's FIN: the kernel refuses rcv_wup after rcv_nxt); keepalive timers.
//!          Then the FINs, in the order the state was reached, still in repair mode:
//!            our FIN, transmitted (FIN_WAIT1/2, CLOSING; LAST_ACK after the peer's):
//!              TCP_REPAIR_QUEUE=SEND + shutdown(SHUT_WR): tcp_send_fin queues it and the repair
//!              path of tcp_write_xmit marks it sent without transmitting -> FIN_WAIT1
//!              (LAST_ACK from CLOSE_WAIT); the retransmit timer is armed for it.
//!            peer's FIN (CLOSE_WAIT, LAST_ACK, CLOSING): a FIN|ACK forged from the peer's address
//!              (raw socket, IP header included, seq = rcv_data, ack = snd_una, window = snd_wnd
//!              >> snd_wscale, TCP timestamps option when negotiated: TSval 0, which PAWS always
//!              accepts on a socket that has not stored a ts_recent, TSecr = our TCP_TIMESTAMP),
//!              delivered over loopback -> CLOSE_WAIT (CLOSING from FIN_WAIT1). If a real peer
//!              segment stored a ts_recent first, PAWS rejects TSval 0: we resend without the
//!              option. The socket ACKs it to the real peer: a harmless duplicate.
//!            our FIN acked (FIN_WAIT2): a forged ACK of send_seq -> FIN_WAIT2.
//!          Each forged segment is checked to have taken effect (TCP_INFO state). They carry
//!          SO_MARK [`REPAIR_PACKET_MARK`]: a network lock on the destination must accept it.
//!          TCP_REPAIR=0: in ESTABLISHED it sends a window probe (the peer answers with an ACK
//!          at once); SO_REUSEADDR again; the unsent tail written as an application write (the
//!          send buffer forced larger when the fresh socket's cannot hold it yet); then
//!          an untransmitted FIN (fin_unsent) is replayed by a plain shutdown(SHUT_WR) after it
//!          (so CLOSING with an untransmitted FIN comes back as LAST_ACK: same FINs, same
//!          sequence numbers, only the TIME_WAIT at the very end is skipped).
//! nudge    (after the restored process runs; [`nudge_peers`], module `nudge`) ICMP host
//!          unreachable / ICMPv6 no-route errors to each peer quoting its own segment at seq =
//!          our rcv_nxt: RFC 6069 makes a peer in RTO backoff retransmit at once.
//! ```

mod nudge;
mod packet;

pub use nudge::{nudge_peers, nudge_targets, NudgeOptions, NudgeReport, NudgeTarget};
pub use packet::{PacketError, REPAIR_PACKET_MARK};

use super::os;
use crate::image::fd::{Blob, TcpConnState, TcpRepairImage, TcpWindowImage};
use crate::sys::{Errno, Pid};
use packet::{Segment, TCP_FLAG_ACK, TCP_FLAG_FIN};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF: i32 = 0;
const TCP_REPAIR_OFF_NO_WP: i32 = -1;
const TCP_NO_QUEUE: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// TCP_ESTABLISHED in TCP_INFO's tcpi_state.
pub const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSE: u8 = 7;

/// How long a forged segment may take to be processed by the restored socket (loopback: µs).
const FORGED_SEGMENT_TIMEOUT: Duration = Duration::from_millis(500);

/// Dumping a connection's repair state failed.
#[derive(Debug, thiserror::Error)]
pub enum TcpDumpError {
    #[error("connection in state {state}: {reason}")]
    State {
        state: &'static str,
        reason: &'static str,
    },
    #[error("{what} failed: {errno}")]
    Syscall { what: &'static str, errno: Errno },
    #[error("{what}: peeked {got} bytes, the queue holds {expected}")]
    Peek {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("in state {state} {what} is {value}, which cannot hold our FIN")]
    Inconsistent {
        state: &'static str,
        what: &'static str,
        value: u32,
    },
}

/// Rebuilding a connection failed (the new socket is left to be closed by the caller).
#[derive(Debug, thiserror::Error)]
pub enum TcpRestoreError {
    #[error("{what} failed: {errno}")]
    Syscall { what: &'static str, errno: Errno },
    #[error("{what} failed at byte {offset} of {len}: {errno}")]
    Write {
        what: &'static str,
        offset: usize,
        len: usize,
        errno: Errno,
    },
    #[error("{what} stalled at byte {offset} of {len}")]
    Stalled {
        what: &'static str,
        offset: usize,
        len: usize,
    },
    #[error("sending the forged {segment} for a {state} connection: {source}")]
    Forge {
        segment: &'static str,
        state: &'static str,
        #[source]
        source: PacketError,
    },
    #[error("the forged {segment} was not taken within {timeout:?}: the socket stayed in state {got}, {expected} expected")]
    NotTaken {
        segment: &'static str,
        got: String,
        expected: &'static str,
        timeout: Duration,
    },
    #[error("rebuilt a {expected} connection but the socket is in state {got}")]
    WrongState { expected: &'static str, got: String },
}

impl TcpRestoreError {
    /// The errno behind the failure, when a syscall failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            TcpRestoreError::Syscall { errno, .. } | TcpRestoreError::Write { errno, .. } => {
                Some(*errno)
            }
            TcpRestoreError::Forge {
                source: PacketError::Socket { errno, .. } | PacketError::Send { errno, .. },
                ..
            } => Some(*errno),
            _ => None,
        }
    }
}

fn dump_sys(what: &'static str) -> impl Fn(Errno) -> TcpDumpError {
    move |errno| TcpDumpError::Syscall { what, errno }
}

fn restore_sys(what: &'static str) -> impl Fn(Errno) -> TcpRestoreError {
    move |errno| TcpRestoreError::Syscall { what, errno }
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> Result<u32, Errno> {
    let mut value: libc::c_int = 0;
    // SAFETY: these ioctls write one int to `value`.
    Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut value as *mut libc::c_int) })?;
    Ok(value.max(0) as u32)
}

fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    buf: &mut [u8],
) -> Result<usize, Errno> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes to `buf` and updates `len`.
    Errno::result(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    Ok(len as usize)
}

fn setsockopt_bytes(fd: BorrowedFd<'_>, level: i32, name: i32, buf: &[u8]) -> Result<(), Errno> {
    // SAFETY: the kernel reads `buf.len()` bytes from `buf`, alive for the call.
    Errno::result(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_ptr().cast(),
            buf.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn shutdown_write(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

fn tcp_set(fd: BorrowedFd<'_>, name: i32, value: i32) -> Result<(), Errno> {
    os::setsockopt_int(fd, libc::IPPROTO_TCP, name, value)
}

fn tcp_get(fd: BorrowedFd<'_>, name: i32) -> Result<i32, Errno> {
    os::getsockopt_int(fd, libc::IPPROTO_TCP, name)
}

/// recv(MSG_PEEK | MSG_DONTWAIT) of exactly `len` bytes (repair mode: the selected queue). One
/// byte more is asked for, to prove the queue holds no more than `len`.
fn peek_exact(fd: BorrowedFd<'_>, len: usize, what: &'static str) -> Result<Vec<u8>, TcpDumpError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len + 1];
    // SAFETY: `buf` is valid for writes of buf.len() bytes for the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let n = Errno::result(n).map_err(dump_sys(what))? as usize;
    if n != len {
        return Err(TcpDumpError::Peek {
            what,
            got: n,
            expected: len,
        });
    }
    buf.truncate(n);
    Ok(buf)
}

/// TCP_INFO bytes 0 (state), 5 (tcpi_options), 6 (snd_wscale:4, rcv_wscale:4).
fn info_head(fd: BorrowedFd<'_>) -> Result<(u8, u8, u8, u8), Errno> {
    let mut buf = [0u8; 104];
    getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
    Ok((buf[0], buf[5], buf[6] & 0xf, buf[6] >> 4))
}

/// The TCP state of `fd` (tcpi_state).
pub fn tcp_state(fd: BorrowedFd<'_>) -> Result<u8, Errno> {
    info_head(fd).map(|(state, ..)| state)
}

fn state_name(code: u8) -> String {
    match TcpConnState::from_code(code) {
        Some(s) => s.name().to_owned(),
        None => crate::proc::net::SocketState::from_code(code)
            .name()
            .to_uppercase()
            .replace('-', "_"),
    }
}

/// Why a state is not carried.
pub(crate) fn refused_state(code: u8) -> TcpDumpError {
    let (state, reason) = match code {
        2 => ("SYN_SENT", "a connection mid-handshake cannot be restored"),
        3 | 12 => ("SYN_RECV", "a connection mid-handshake cannot be restored"),
        6 => ("TIME_WAIT", "the connection is over"),
        TCP_CLOSE => ("CLOSE", "the socket is not connected"),
        TCP_LISTEN => ("LISTEN", "a listener is not a connection"),
        _ => ("unknown", "unknown TCP state"),
    };
    TcpDumpError::State { state, reason }
}

/// Reads the repair state of the connected socket `fd` (ESTABLISHED or half-closed; the process
/// is frozen and its traffic locked). The socket is left as it was (repair mode off again, no
/// window probe sent).
pub fn dump_connection(fd: BorrowedFd<'_>) -> Result<TcpRepairImage, TcpDumpError> {
    let (code, tcp_options, snd_wscale, rcv_wscale) =
        info_head(fd).map_err(dump_sys("getsockopt(TCP_INFO)"))?;
    let state = TcpConnState::from_code(code).ok_or_else(|| refused_state(code))?;
    let reuseaddr = os::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(dump_sys("getsockopt(SO_REUSEADDR)"))?;
    let outq = ioctl_int(fd, SIOCOUTQ).map_err(dump_sys("ioctl(SIOCOUTQ)"))?;
    let nsd = ioctl_int(fd, SIOCOUTQNSD).map_err(dump_sys("ioctl(SIOCOUTQNSD)"))?;
    let inq = ioctl_int(fd, SIOCINQ).map_err(dump_sys("ioctl(SIOCINQ)"))?;
    // Take our FIN out of the byte counts: it is in write_seq but has no payload.
    let fin_unacked = state.our_fin() && !state.our_fin_acked();
    let data_outq = if fin_unacked {
        outq.checked_sub(1).ok_or(TcpDumpError::Inconsistent {
            state: state.name(),
            what: "SIOCOUTQ",
            value: outq,
        })?
    } else {
        outq
    };
    let fin_unsent = state.our_fin() && nsd > 0;
    let unsent = if fin_unsent { nsd - 1 } else { nsd }.min(data_outq);
    tcp_set(fd, TCP_REPAIR, TCP_REPAIR_ON).map_err(dump_sys("setsockopt(TCP_REPAIR, 1)"))?;
    let read = (|| {
        tcp_set(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(dump_sys("TCP_REPAIR_QUEUE=SEND"))?;
        let send_seq =
            tcp_get(fd, TCP_QUEUE_SEQ).map_err(dump_sys("getsockopt(TCP_QUEUE_SEQ) send"))? as u32;
        let send_queue = peek_exact(fd, data_outq as usize, "peeking the send queue")?;
        tcp_set(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(dump_sys("TCP_REPAIR_QUEUE=RECV"))?;
        let recv_seq =
            tcp_get(fd, TCP_QUEUE_SEQ).map_err(dump_sys("getsockopt(TCP_QUEUE_SEQ) recv"))? as u32;
        let recv_queue = peek_exact(fd, inq as usize, "peeking the receive queue")?;
        tcp_set(fd, TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(dump_sys("TCP_REPAIR_QUEUE=NONE"))?;
        let mut w = [0u8; 20];
        getsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &mut w)
            .map_err(dump_sys("getsockopt(TCP_REPAIR_WINDOW)"))?;
        let word = |i: usize| u32::from_ne_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]);
        let window = TcpWindowImage {
            snd_wl1: word(0),
            snd_wnd: word(4),
            max_window: word(8),
            rcv_wnd: word(12),
            rcv_wup: word(16),
        };
        let get = |name: i32, what: &'static str| {
            tcp_get(fd, name).map(|v| v as u32).map_err(dump_sys(what))
        };
        Ok(TcpRepairImage {
            state,
            send_seq,
            recv_seq,
            send_queue: Blob(send_queue),
            unsent,
            fin_unsent,
            recv_queue: Blob(recv_queue),
            window,
            mss: get(libc::TCP_MAXSEG, "getsockopt(TCP_MAXSEG)")?,
            tcp_options,
            snd_wscale,
            rcv_wscale,
            timestamp: get(TCP_TIMESTAMP, "getsockopt(TCP_TIMESTAMP)")?,
            keep_idle: get(libc::TCP_KEEPIDLE, "getsockopt(TCP_KEEPIDLE)")?,
            keep_intvl: get(libc::TCP_KEEPINTVL, "getsockopt(TCP_KEEPINTVL)")?,
            keep_cnt: get(libc::TCP_KEEPCNT, "getsockopt(TCP_KEEPCNT)")?,
        })
    })();
    // Back to normal without a window probe; leaving repair mode clears sk_reuse.
    let off = tcp_set(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        .map_err(dump_sys("setsockopt(TCP_REPAIR, off)"))
        .and_then(|()| {
            if reuseaddr != 0 {
                os::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
                    .map_err(dump_sys("setsockopt(SO_REUSEADDR)"))
            } else {
                Ok(())
            }
        });
    let image = read?;
    off?;
    Ok(image)
}

/// Puts the connected socket `fd` in repair mode so that closing it sends nothing.
pub fn silence(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    tcp_set(fd, TCP_REPAIR, TCP_REPAIR_ON)
}

/// Steals every fd of `pid` (frozen, about to be killed) and puts each connected TCP socket in
/// repair mode, so the kill sends no FIN or RST. Returns how many sockets were silenced. Fds that
/// are not TCP sockets, listeners and closed sockets are left alone.
pub fn silence_process(pid: Pid) -> Result<usize, String> {
    let pidfd = crate::pidfd::PidFd::open(pid).map_err(|e| e.to_string())?;
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| e.to_string())?;
    let mut count = 0;
    for entry in dir.flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(file) = pidfd.get_fd(n) else { continue };
        let f = file.as_fd();
        let is_tcp =
            os::getsockopt_int(f, libc::SOL_SOCKET, libc::SO_PROTOCOL) == Ok(libc::IPPROTO_TCP);
        if !is_tcp {
            continue;
        }
        match info_head(f) {
            // LISTEN (10) and CLOSE (7) send nothing when closed.
            Ok((state, ..)) if state != TCP_LISTEN && state != TCP_CLOSE => {
                silence(f).map_err(|e| format!("fd {n}: setsockopt(TCP_REPAIR, 1): {e}"))?;
                count += 1;
            }
            _ => {}
        }
    }
    Ok(count)
}

fn send_all(fd: BorrowedFd<'_>, data: &[u8], what: &'static str) -> Result<(), TcpRestoreError> {
    let mut off = 0;
    while off < data.len() {
        let end = data.len().min(off + 65536);
        let n = os::send(fd, &data[off..end]).map_err(|errno| TcpRestoreError::Write {
            what,
            offset: off,
            len: data.len(),
            errno,
        })?;
        if n == 0 {
            return Err(TcpRestoreError::Stalled {
                what,
                offset: off,
                len: data.len(),
            });
        }
        off += n;
    }
    Ok(())
}

/// Writes the never-sent tail of the send queue as an application write. The fresh socket's
/// send buffer has not grown with the connection's congestion window the way the original's
/// did (autotuning starts again from ~10 segments), so a tail the original held may not fit:
/// then the buffer is grown with SO_SNDBUFFORCE to hold it, which also fixes the size of this
/// socket's send buffer from then on (as setting SO_SNDBUF does) — better than losing data.
fn write_unsent(fd: BorrowedFd<'_>, data: &[u8]) -> Result<(), TcpRestoreError> {
    const WHAT: &str = "writing the unsent tail of the send queue";
    let mut off = 0;
    let mut grown = false;
    while off < data.len() {
        let end = data.len().min(off + 65536);
        match os::send(fd, &data[off..end]) {
            Ok(0) => {
                return Err(TcpRestoreError::Stalled {
                    what: WHAT,
                    offset: off,
                    len: data.len(),
                })
            }
            Ok(n) => off += n,
            Err(Errno(libc::EAGAIN)) if !grown => {
                let current = os::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)
                    .map_err(restore_sys("getsockopt(SO_SNDBUF)"))?;
                // The kernel doubles the value for bookkeeping; skb overhead roughly doubles
                // the payload again.
                let want = (current as usize).saturating_add(2 * (data.len() - off));
                os::setsockopt_int(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUFFORCE,
                    i32::try_from(want).unwrap_or(i32::MAX),
                )
                .map_err(restore_sys(
                    "setsockopt(SO_SNDBUFFORCE) for the unsent tail",
                ))?;
                grown = true;
            }
            Err(errno) => {
                return Err(TcpRestoreError::Write {
                    what: WHAT,
                    offset: off,
                    len: data.len(),
                    errno,
                })
            }
        }
    }
    Ok(())
}

/// `a` is after `b` in sequence space (RFC 793 modular comparison).
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The window to restore: when the dumped rcv_wup counted the peer's FIN (which the rebuilt
/// socket has not received yet), pull rcv_wup back to the restored rcv_nxt and grow rcv_wnd by
/// as much, so the right edge of the advertised window stays where the peer saw it.
fn restore_window(w: TcpWindowImage, rcv_nxt: u32) -> TcpWindowImage {
    if seq_after(w.rcv_wup, rcv_nxt) {
        let delta = w.rcv_wup.wrapping_sub(rcv_nxt);
        TcpWindowImage {
            rcv_wup: rcv_nxt,
            rcv_wnd: w.rcv_wnd.saturating_add(delta),
            ..w
        }
    } else {
        w
    }
}

/// What the rebuilt connection needs to forge segments from its peer.
struct Forger<'a> {
    fd: BorrowedFd<'a>,
    local: SocketAddr,
    peer: SocketAddr,
    image: &'a TcpRepairImage,
}

impl Forger<'_> {
    /// The peer's window as it would put it in a segment header (scaled by its shift, which is
    /// our snd_wscale).
    fn window_field(&self) -> u16 {
        let shift = if self.image.tcp_options & TCPI_OPT_WSCALE != 0 {
            u32::from(self.image.snd_wscale)
        } else {
            0
        };
        (self.image.window.snd_wnd >> shift).min(0xffff) as u16
    }

    /// Sends the segment and waits until the socket reaches `expected`. With timestamps
    /// negotiated the segment first carries TSval 0 (see the module header); if PAWS drops it,
    /// it is sent again without the option.
    fn deliver(
        &self,
        segment: &'static str,
        seq: u32,
        ack: u32,
        flags: u8,
        expected: TcpConnState,
    ) -> Result<(), TcpRestoreError> {
        let mut variants = Vec::with_capacity(2);
        if self.image.tcp_options & TCPI_OPT_TIMESTAMPS != 0 {
            let now = tcp_get(self.fd, TCP_TIMESTAMP)
                .map_err(restore_sys("getsockopt(TCP_TIMESTAMP)"))? as u32;
            variants.push(Some((0u32, now)));
        }
        variants.push(None);
        let mut got = String::new();
        for timestamps in variants {
            let seg = Segment {
                src: self.peer,
                dst: self.local,
                seq,
                ack,
                flags,
                window: self.window_field(),
                timestamps,
            };
            packet::inject(&seg).map_err(|source| TcpRestoreError::Forge {
                segment,
                state: self.image.state.name(),
                source,
            })?;
            let deadline = Instant::now() + FORGED_SEGMENT_TIMEOUT;
            loop {
                let code = tcp_state(self.fd).map_err(restore_sys("getsockopt(TCP_INFO)"))?;
                if code == expected.code() {
                    return Ok(());
                }
                got = state_name(code);
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Err(TcpRestoreError::NotTaken {
            segment,
            got,
            expected: expected.name(),
            timeout: FORGED_SEGMENT_TIMEOUT,
        })
    }
}

/// Queues our FIN as already transmitted: with TCP_REPAIR_QUEUE=SEND, tcp_write_xmit takes its
/// repair path (advance snd_nxt, arm the retransmit timer, send nothing).
fn queue_sent_fin(fd: BorrowedFd<'_>) -> Result<(), TcpRestoreError> {
    tcp_set(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=SEND"))?;
    shutdown_write(fd).map_err(restore_sys("shutdown(SHUT_WR) in repair mode (our FIN)"))?;
    tcp_set(fd, TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=NONE"))
}

fn expect_state(fd: BorrowedFd<'_>, expected: TcpConnState) -> Result<(), TcpRestoreError> {
    let code = tcp_state(fd).map_err(restore_sys("getsockopt(TCP_INFO)"))?;
    if code != expected.code() {
        return Err(TcpRestoreError::WrongState {
            expected: expected.name(),
            got: state_name(code),
        });
    }
    Ok(())
}

/// Rebuilds the connection on `s` (a fresh TCP socket with the socket options already set) in
/// the state of the image, ESTABLISHED or half-closed: see the module header. `local` must be an
/// address of this host.
pub fn restore_connection(
    s: &OwnedFd,
    local: &SocketAddr,
    peer: &SocketAddr,
    reuseaddr: bool,
    image: &TcpRepairImage,
) -> Result<(), TcpRestoreError> {
    let f = s.as_fd();
    let state = image.state;
    let sendq = &image.send_queue.0;
    let recvq = &image.recv_queue.0;
    let unsent = (image.unsent as usize).min(sendq.len());
    let unacked = sendq.len() - unsent;
    // Sequence numbers without the FINs: the FINs are replayed below and take their number then.
    let data_end = image.send_seq.wrapping_sub(u32::from(state.our_fin()));
    let rcv_data = image.recv_seq.wrapping_sub(u32::from(state.peer_fin()));
    let snd_una = data_end.wrapping_sub(sendq.len() as u32);
    let fin_sent = state.our_fin() && !image.fin_unsent;

    tcp_set(f, TCP_REPAIR, TCP_REPAIR_ON).map_err(restore_sys("setsockopt(TCP_REPAIR, 1)"))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=SEND"))?;
    // Only the sent part goes in through repair mode: the queue starts at snd_una and grows by
    // `unacked`; the unsent bytes follow as normal writes.
    tcp_set(f, TCP_QUEUE_SEQ, snd_una as i32)
        .map_err(restore_sys("setsockopt(TCP_QUEUE_SEQ) send"))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=RECV"))?;
    let recv_start = rcv_data.wrapping_sub(recvq.len() as u32);
    tcp_set(f, TCP_QUEUE_SEQ, recv_start as i32)
        .map_err(restore_sys("setsockopt(TCP_QUEUE_SEQ) recv"))?;
    if image.tcp_options & TCPI_OPT_TIMESTAMPS != 0 {
        tcp_set(f, TCP_TIMESTAMP, image.timestamp as i32)
            .map_err(restore_sys("setsockopt(TCP_TIMESTAMP)"))?;
    }
    os::bind(f, local).map_err(restore_sys("bind (repair mode)"))?;
    os::connect(f, peer).map_err(restore_sys("connect (repair mode)"))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=RECV"))?;
    send_all(f, recvq, "refilling the receive queue")?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=SEND"))?;
    send_all(
        f,
        &sendq[..unacked],
        "refilling the send queue (sent, unacked)",
    )?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(restore_sys("TCP_REPAIR_QUEUE=NONE"))?;
    let mut opts: Vec<u8> = Vec::with_capacity(32);
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MAXSEG, image.mss);
    if image.tcp_options & TCPI_OPT_WSCALE != 0 {
        opt(
            TCPOPT_WINDOW,
            u32::from(image.snd_wscale) | (u32::from(image.rcv_wscale) << 16),
        );
    }
    if image.tcp_options & TCPI_OPT_SACK != 0 {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if image.tcp_options & TCPI_OPT_TIMESTAMPS != 0 {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    setsockopt_bytes(f, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &opts)
        .map_err(restore_sys("setsockopt(TCP_REPAIR_OPTIONS)"))?;
    let w = restore_window(image.window, rcv_data);
    let mut win = Vec::with_capacity(20);
    for v in [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup] {
        win.extend_from_slice(&v.to_ne_bytes());
    }
    setsockopt_bytes(f, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &win)
        .map_err(restore_sys("setsockopt(TCP_REPAIR_WINDOW)"))?;
    for (name, value, what) in [
        (
            libc::TCP_KEEPIDLE,
            image.keep_idle,
            "setsockopt(TCP_KEEPIDLE)",
        ),
        (
            libc::TCP_KEEPINTVL,
            image.keep_intvl,
            "setsockopt(TCP_KEEPINTVL)",
        ),
        (libc::TCP_KEEPCNT, image.keep_cnt, "setsockopt(TCP_KEEPCNT)"),
    ] {
        if value > 0 {
            tcp_set(f, name, value as i32).map_err(restore_sys(what))?;
        }
    }

    // The FINs, in the order the dumped state was reached (ESTABLISHED -> FIN_WAIT1 -> CLOSING,
    // ESTABLISHED -> CLOSE_WAIT -> LAST_ACK).
    let forger = Forger {
        fd: f,
        local: *local,
        peer: *peer,
        image,
    };
    if fin_sent && state != TcpConnState::LastAck {
        queue_sent_fin(f)?;
    }
    if state.peer_fin() {
        let after = if fin_sent && state != TcpConnState::LastAck {
            TcpConnState::Closing
        } else {
            TcpConnState::CloseWait
        };
        forger.deliver(
            "FIN|ACK",
            rcv_data,
            snd_una,
            TCP_FLAG_FIN | TCP_FLAG_ACK,
            after,
        )?;
    }
    if fin_sent && state == TcpConnState::LastAck {
        queue_sent_fin(f)?;
    }
    if state.our_fin_acked() {
        forger.deliver(
            "ACK of our FIN",
            image.recv_seq,
            image.send_seq,
            TCP_FLAG_ACK,
            TcpConnState::FinWait2,
        )?;
    }
    let repaired = match state {
        // An untransmitted FIN is replayed after repair mode; until then the connection is in
        // the state it had before its FIN.
        TcpConnState::FinWait1 if !fin_sent => TcpConnState::Established,
        TcpConnState::LastAck | TcpConnState::Closing if !fin_sent => TcpConnState::CloseWait,
        other => other,
    };
    expect_state(f, repaired)?;

    // Leaving repair mode sends a window probe in ESTABLISHED: the peer ACKs at once.
    tcp_set(f, TCP_REPAIR, TCP_REPAIR_OFF).map_err(restore_sys("setsockopt(TCP_REPAIR, 0)"))?;
    if reuseaddr {
        os::setsockopt_int(f, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
            .map_err(restore_sys("setsockopt(SO_REUSEADDR)"))?;
    }
    write_unsent(f, &sendq[unacked..])?;
    if state.our_fin() && !fin_sent {
        shutdown_write(f).map_err(restore_sys("shutdown(SHUT_WR) (our untransmitted FIN)"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    fn peer_addr(s: &OwnedFd) -> (SocketAddr, SocketAddr) {
        (
            os::getsockname(s.as_fd()).unwrap().unwrap(),
            os::getpeername(s.as_fd()).unwrap().unwrap(),
        )
    }

    /// A server-side connection with data in both queues is dumped, silenced, closed and rebuilt
    /// on a new socket; the client sees every byte once, in order, and no reset.
    fn roundtrip(bind: &str) {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: TCP repair needs CAP_NET_ADMIN");
            return;
        }
        let listener = TcpListener::bind(bind).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        drop(listener);
        // Unread data in the server's receive queue; server data the client has not read.
        client.write_all(b"client->server unread").unwrap();
        let mut server_sent = Vec::new();
        for i in 0..2000u32 {
            server_sent.extend_from_slice(&i.to_le_bytes());
        }
        (&server).write_all(&server_sent).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let server: OwnedFd = server.into();
        let (local, peer) = peer_addr(&server);
        let image = dump_connection(server.as_fd()).unwrap();
        assert_eq!(image.state, TcpConnState::Established);
        assert_eq!(image.recv_queue.0, b"client->server unread");
        // Round trip through the image format.
        let bytes = rmp_serde::to_vec_named(&image).unwrap();
        let image: TcpRepairImage = rmp_serde::from_slice(&bytes).unwrap();
        silence(server.as_fd()).unwrap();
        drop(server);
        let fresh = os::socket(
            if local.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            },
            libc::SOCK_STREAM,
            libc::IPPROTO_TCP,
        )
        .unwrap();
        restore_connection(&fresh, &local, &peer, false, &image).unwrap();
        let mut restored = TcpStream::from(fresh);
        let mut got = vec![0u8; server_sent.len()];
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, server_sent);
        let mut unread = [0u8; 21];
        restored.read_exact(&mut unread).unwrap();
        assert_eq!(&unread, b"client->server unread");
        client.write_all(b"after").unwrap();
        let mut after = [0u8; 5];
        restored.read_exact(&mut after).unwrap();
        assert_eq!(&after, b"after");
        restored.write_all(b"reply").unwrap();
        client.read_exact(&mut after).unwrap();
        assert_eq!(&after, b"reply");
    }

    #[test]
    fn established_roundtrip_ipv4() {
        roundtrip("127.0.0.1:0");
    }

    #[test]
    fn established_roundtrip_ipv6() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("skipped: no IPv6 loopback");
            return;
        }
        roundtrip("[::1]:0");
    }

    #[test]
    fn window_keeps_its_right_edge_when_the_peer_fin_is_taken_out() {
        let w = TcpWindowImage {
            snd_wl1: 1,
            snd_wnd: 2,
            max_window: 3,
            rcv_wnd: 1000,
            rcv_wup: 5001,
        };
        let r = restore_window(w, 5000);
        assert_eq!((r.rcv_wup, r.rcv_wnd), (5000, 1001));
        assert_eq!(restore_window(w, 5001), w);
        // Across the wrap.
        let w = TcpWindowImage { rcv_wup: 0, ..w };
        let r = restore_window(w, u32::MAX);
        assert_eq!((r.rcv_wup, r.rcv_wnd), (u32::MAX, 1001));
        assert!(seq_after(1, u32::MAX));
        assert!(!seq_after(u32::MAX, 1));
    }
}
