//! TCP repair: an ESTABLISHED connection checkpointed on the source and rebuilt on the destination
//! without the peer noticing (the sequence CRIU's soccr uses; /work/shared/probes/tcp_repair.py).
//!
//! ```text
//! dump     (process frozen, its traffic dropped by the network lock, on the fd stolen with
//!          pidfd_getfd — the same socket the process holds)
//!          TCP_INFO state must be ESTABLISHED (half-closed states are refused: not carried yet);
//!          SIOCOUTQ, SIOCOUTQNSD (unsent tail), SIOCINQ; TCP_REPAIR=1;
//!          TCP_REPAIR_QUEUE=SEND: TCP_QUEUE_SEQ (write_seq), recv(MSG_PEEK) = the send queue;
//!          TCP_REPAIR_QUEUE=RECV: TCP_QUEUE_SEQ (rcv_nxt), recv(MSG_PEEK) = the receive queue;
//!          TCP_REPAIR_WINDOW, TCP_MAXSEG, TCP_INFO options + window scales, TCP_TIMESTAMP,
//!          TCP_KEEPIDLE/INTVL/CNT; then TCP_REPAIR_OFF_NO_WP (nothing sent, nothing changed) and
//!          SO_REUSEADDR put back (leaving repair mode clears sk_reuse).
//! silence  (commit, just before the original is killed) TCP_REPAIR=1 on every connected TCP
//!          socket of the process: its close is then silent (no FIN, no RST).
//! restore  (destination agent, in the destination netns, the service address already there)
//!          socket + options (reuse, keepalive, nodelay, v6only, buffers); TCP_REPAIR=1 (forces
//!          address reuse); QUEUE_SEQ send = write_seq - len(send queue), recv = rcv_nxt -
//!          len(recv queue); TCP_TIMESTAMP; bind(local); connect(peer) (no SYN: straight to
//!          ESTABLISHED); RECV queue refilled; SEND queue refilled with the sent-but-unacked part
//!          only; TCP_REPAIR_OPTIONS (MSS, window scale, SACK, timestamps); TCP_REPAIR_WINDOW;
//!          keepalive timers; TCP_REPAIR=0, which sends a window probe (the peer answers with an
//!          ACK at once: the "resend now" prompt); SO_REUSEADDR again; the unsent tail written
//!          as an application write.
//! ```

use super::os;
use crate::image::fd::{Blob, TcpRepairImage, TcpWindowImage};
use crate::sys::{Errno, Pid};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

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

/// A failed repair step: what was being done and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpStepError {
    pub what: &'static str,
    pub errno: Option<Errno>,
    pub detail: String,
}

impl std::fmt::Display for TcpStepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.errno {
            Some(e) => write!(f, "{} failed: {}{}", self.what, e, self.detail),
            None => write!(f, "{}: {}", self.what, self.detail),
        }
    }
}

fn step(what: &'static str) -> impl Fn(Errno) -> TcpStepError {
    move |errno| TcpStepError {
        what,
        errno: Some(errno),
        detail: String::new(),
    }
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

fn tcp_set(fd: BorrowedFd<'_>, name: i32, value: i32) -> Result<(), Errno> {
    os::setsockopt_int(fd, libc::IPPROTO_TCP, name, value)
}

fn tcp_get(fd: BorrowedFd<'_>, name: i32) -> Result<i32, Errno> {
    os::getsockopt_int(fd, libc::IPPROTO_TCP, name)
}

/// recv(MSG_PEEK | MSG_DONTWAIT) of exactly `len` bytes (repair mode: the selected queue).
fn peek_exact(fd: BorrowedFd<'_>, len: usize, what: &'static str) -> Result<Vec<u8>, TcpStepError> {
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
    let n = Errno::result(n).map_err(step(what))? as usize;
    if n != len {
        return Err(TcpStepError {
            what,
            errno: None,
            detail: format!("peeked {n} bytes, the queue holds {len}"),
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

/// Reads the repair state of the ESTABLISHED socket `fd` (the process is frozen and its traffic
/// locked). The socket is left as it was (repair mode off again, no window probe sent).
pub fn dump_established(fd: BorrowedFd<'_>) -> Result<TcpRepairImage, TcpStepError> {
    let (state, tcp_options, snd_wscale, rcv_wscale) =
        info_head(fd).map_err(step("getsockopt(TCP_INFO)"))?;
    if state != TCP_ESTABLISHED {
        return Err(TcpStepError {
            what: "TCP state",
            errno: None,
            detail: format!(
                "connection in state {}: only ESTABLISHED connections are carried (half-closed states are not yet)",
                crate::proc::net::SocketState::from_code(state).name()
            ),
        });
    }
    let reuseaddr = os::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(step("getsockopt(SO_REUSEADDR)"))?;
    let outq = ioctl_int(fd, SIOCOUTQ).map_err(step("ioctl(SIOCOUTQ)"))?;
    let unsent = ioctl_int(fd, SIOCOUTQNSD).map_err(step("ioctl(SIOCOUTQNSD)"))?;
    let inq = ioctl_int(fd, SIOCINQ).map_err(step("ioctl(SIOCINQ)"))?;
    tcp_set(fd, TCP_REPAIR, TCP_REPAIR_ON).map_err(step("setsockopt(TCP_REPAIR, 1)"))?;
    let read = (|| {
        tcp_set(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(step("TCP_REPAIR_QUEUE=SEND"))?;
        let send_seq =
            tcp_get(fd, TCP_QUEUE_SEQ).map_err(step("getsockopt(TCP_QUEUE_SEQ) send"))? as u32;
        let send_queue = peek_exact(fd, outq as usize, "peeking the send queue")?;
        tcp_set(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(step("TCP_REPAIR_QUEUE=RECV"))?;
        let recv_seq =
            tcp_get(fd, TCP_QUEUE_SEQ).map_err(step("getsockopt(TCP_QUEUE_SEQ) recv"))? as u32;
        let recv_queue = peek_exact(fd, inq as usize, "peeking the receive queue")?;
        tcp_set(fd, TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(step("TCP_REPAIR_QUEUE=NONE"))?;
        let mut w = [0u8; 20];
        getsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &mut w)
            .map_err(step("getsockopt(TCP_REPAIR_WINDOW)"))?;
        let word = |i: usize| u32::from_ne_bytes([w[i], w[i + 1], w[i + 2], w[i + 3]]);
        let window = TcpWindowImage {
            snd_wl1: word(0),
            snd_wnd: word(4),
            max_window: word(8),
            rcv_wnd: word(12),
            rcv_wup: word(16),
        };
        Ok(TcpRepairImage {
            send_seq,
            recv_seq,
            send_queue: Blob(send_queue),
            unsent: unsent.min(outq),
            recv_queue: Blob(recv_queue),
            window,
            mss: tcp_get(fd, libc::TCP_MAXSEG).map_err(step("getsockopt(TCP_MAXSEG)"))? as u32,
            tcp_options,
            snd_wscale,
            rcv_wscale,
            timestamp: tcp_get(fd, TCP_TIMESTAMP).map_err(step("getsockopt(TCP_TIMESTAMP)"))?
                as u32,
            keep_idle: tcp_get(fd, libc::TCP_KEEPIDLE).map_err(step("getsockopt(TCP_KEEPIDLE)"))?
                as u32,
            keep_intvl: tcp_get(fd, libc::TCP_KEEPINTVL)
                .map_err(step("getsockopt(TCP_KEEPINTVL)"))? as u32,
            keep_cnt: tcp_get(fd, libc::TCP_KEEPCNT).map_err(step("getsockopt(TCP_KEEPCNT)"))?
                as u32,
        })
    })();
    // Back to normal without a window probe; leaving repair mode clears sk_reuse.
    let off = tcp_set(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        .map_err(step("setsockopt(TCP_REPAIR, off)"))
        .and_then(|()| {
            if reuseaddr != 0 {
                os::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
                    .map_err(step("setsockopt(SO_REUSEADDR)"))
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
            Ok((state, ..)) if state != 10 && state != 7 => {
                silence(f).map_err(|e| format!("fd {n}: setsockopt(TCP_REPAIR, 1): {e}"))?;
                count += 1;
            }
            _ => {}
        }
    }
    Ok(count)
}

fn send_all_repair(
    fd: BorrowedFd<'_>,
    data: &[u8],
    what: &'static str,
) -> Result<(), TcpStepError> {
    let mut off = 0;
    while off < data.len() {
        let end = data.len().min(off + 65536);
        let n = os::send(fd, &data[off..end]).map_err(|e| TcpStepError {
            what,
            errno: Some(e),
            detail: format!(" at byte {off} of {}", data.len()),
        })?;
        if n == 0 {
            return Err(TcpStepError {
                what,
                errno: None,
                detail: format!("stalled at byte {off} of {}", data.len()),
            });
        }
        off += n;
    }
    Ok(())
}

/// Rebuilds the connection on `s` (a fresh TCP socket with the socket options already set):
/// see the module header. `local` must be an address of this host.
pub fn restore_established(
    s: &OwnedFd,
    local: &SocketAddr,
    peer: &SocketAddr,
    reuseaddr: bool,
    image: &TcpRepairImage,
) -> Result<(), TcpStepError> {
    let f = s.as_fd();
    let sendq = &image.send_queue.0;
    let recvq = &image.recv_queue.0;
    let unsent = (image.unsent as usize).min(sendq.len());
    let unacked = sendq.len() - unsent;
    tcp_set(f, TCP_REPAIR, TCP_REPAIR_ON).map_err(step("setsockopt(TCP_REPAIR, 1)"))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(step("TCP_REPAIR_QUEUE=SEND"))?;
    // Only the sent part goes in through repair mode: the queue starts at write_seq - unsent -
    // unacked and grows by `unacked`; the unsent bytes follow as normal writes.
    let send_start = image.send_seq.wrapping_sub(sendq.len() as u32);
    tcp_set(f, TCP_QUEUE_SEQ, send_start as i32).map_err(step("setsockopt(TCP_QUEUE_SEQ) send"))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(step("TCP_REPAIR_QUEUE=RECV"))?;
    let recv_start = image.recv_seq.wrapping_sub(recvq.len() as u32);
    tcp_set(f, TCP_QUEUE_SEQ, recv_start as i32).map_err(step("setsockopt(TCP_QUEUE_SEQ) recv"))?;
    if image.tcp_options & TCPI_OPT_TIMESTAMPS != 0 {
        tcp_set(f, TCP_TIMESTAMP, image.timestamp as i32)
            .map_err(step("setsockopt(TCP_TIMESTAMP)"))?;
    }
    os::bind(f, local).map_err(step("bind (repair mode)"))?;
    os::connect(f, peer).map_err(step("connect (repair mode)"))?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE).map_err(step("TCP_REPAIR_QUEUE=RECV"))?;
    send_all_repair(f, recvq, "refilling the receive queue")?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE).map_err(step("TCP_REPAIR_QUEUE=SEND"))?;
    send_all_repair(
        f,
        &sendq[..unacked],
        "refilling the send queue (sent, unacked)",
    )?;
    tcp_set(f, TCP_REPAIR_QUEUE, TCP_NO_QUEUE).map_err(step("TCP_REPAIR_QUEUE=NONE"))?;
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
        .map_err(step("setsockopt(TCP_REPAIR_OPTIONS)"))?;
    let w = image.window;
    let mut win = Vec::with_capacity(20);
    for v in [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup] {
        win.extend_from_slice(&v.to_ne_bytes());
    }
    setsockopt_bytes(f, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &win)
        .map_err(step("setsockopt(TCP_REPAIR_WINDOW)"))?;
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
            tcp_set(f, name, value as i32).map_err(step(what))?;
        }
    }
    // Leaving repair mode sends a window probe: the peer ACKs at once.
    tcp_set(f, TCP_REPAIR, TCP_REPAIR_OFF).map_err(step("setsockopt(TCP_REPAIR, 0)"))?;
    if reuseaddr {
        os::setsockopt_int(f, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
            .map_err(step("setsockopt(SO_REUSEADDR)"))?;
    }
    send_all_repair(
        f,
        &sendq[unacked..],
        "writing the unsent tail of the send queue",
    )?;
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
        let image = dump_established(server.as_fd()).unwrap();
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
        restore_established(&fresh, &local, &peer, false, &image).unwrap();
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
}
