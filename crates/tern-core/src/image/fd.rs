//! Open files in the image: one [`FdImage`] per descriptor of the process.
//!
//! Written by [`crate::files::dump`] on the source and consumed by [`crate::files::restore`] on the
//! destination; [`crate::files`] documents the per-kind sequences. Everything here is plain data
//! (msgpack through rmp-serde, JSON for tests and `migrate image show`), so the shape is part of the
//! image format: field names are camelCase, the kind tag is kebab-case, byte payloads are
//! [`Blob`]s (msgpack `bin`, not arrays of numbers).
//!
//! Kernel objects shared by several fds of the process (a pipe's two ends, a socketpair's two
//! sides, a FIFO) carry a stable id (the source inode) so the destination builds each object once;
//! their buffered data travels once, on the first fd of the object (lowest fd number). Two fds on
//! ONE open file description (dup(2), fork inheritance) are [`FdKindImage::Dup`]: the destination
//! dup()s, so they keep sharing offset and status flags.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest file content carried in an image (deleted-but-open files, memfds). Larger ones are
/// refused at dump time with a reason rather than silently truncated.
pub const MAX_CARRIED_CONTENT: u64 = 64 << 20;

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FdImage {
    /// The descriptor number in the process.
    pub fd: i32,
    /// FD_CLOEXEC (a property of the fd, not of the open file: the stub sets it after dup2).
    pub cloexec: bool,
    /// F_GETFL of the open file: access mode (O_RDONLY/O_WRONLY/O_RDWR, or O_PATH) and status flags
    /// (O_APPEND, O_NONBLOCK, O_DIRECT, O_NOATIME, ...). O_CLOEXEC is never in here.
    pub flags: u32,
    pub kind: FdKindImage,
}

/// Which end of a pipe an fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipeEnd {
    Read,
    Write,
}

/// Which of the two sockets a socketpair made (the lower source inode is `A`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairSide {
    A,
    B,
}

impl PairSide {
    pub fn other(self) -> PairSide {
        match self {
            PairSide::A => PairSide::B,
            PairSide::B => PairSide::A,
        }
    }
}

/// SOCK_* type of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnixSocketType {
    Stream,
    Dgram,
    Seqpacket,
}

impl UnixSocketType {
    pub fn raw(self) -> i32 {
        match self {
            UnixSocketType::Stream => libc::SOCK_STREAM,
            UnixSocketType::Dgram => libc::SOCK_DGRAM,
            UnixSocketType::Seqpacket => libc::SOCK_SEQPACKET,
        }
    }

    pub fn from_raw(raw: i32) -> Option<UnixSocketType> {
        match raw {
            libc::SOCK_STREAM => Some(UnixSocketType::Stream),
            libc::SOCK_DGRAM => Some(UnixSocketType::Dgram),
            libc::SOCK_SEQPACKET => Some(UnixSocketType::Seqpacket),
            _ => None,
        }
    }
}

/// AF_INET or AF_INET6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InetFamily {
    Inet,
    Inet6,
}

impl InetFamily {
    pub fn raw(self) -> i32 {
        match self {
            InetFamily::Inet => libc::AF_INET,
            InetFamily::Inet6 => libc::AF_INET6,
        }
    }
}

/// An IP socket address, kept as text so TypeScript reads it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InetAddr {
    /// Dotted quad or RFC 5952 IPv6 text (an IPv4-mapped address stays in its `::ffff:` form).
    pub address: String,
    pub port: u16,
    /// IPv6 scope id (link-local addresses); 0 otherwise.
    #[serde(default)]
    pub scope_id: u32,
}

impl fmt::Display for InetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.address.contains(':') {
            write!(f, "[{}]:{}", self.address, self.port)
        } else {
            write!(f, "{}:{}", self.address, self.port)
        }
    }
}

/// Socket options that change how an inet socket behaves and are rebuilt on the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SocketOptions {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub broadcast: bool,
    /// TCP_NODELAY (TCP only).
    pub nodelay: Option<bool>,
    /// IPV6_V6ONLY (AF_INET6 only).
    pub v6only: Option<bool>,
    /// SO_SNDBUF / SO_RCVBUF as getsockopt reports them (the kernel's doubled value). Only applied
    /// on the destination when they differ from a fresh socket's, so that untouched sockets keep
    /// buffer autotuning (setting SO_*BUF locks the size).
    pub sndbuf: u32,
    pub rcvbuf: u32,
}

/// struct tcp_repair_window (TCP_REPAIR_WINDOW), as the kernel reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpWindowImage {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// The state of a carried TCP connection: ESTABLISHED or one of the half-closed states.
///
/// Which FIN each state holds (the FIN takes one sequence number, see [`TcpRepairImage`]):
///
/// | state       | our FIN        | peer's FIN |
/// | ----------- | -------------- | ---------- |
/// | established | -              | -          |
/// | fin-wait1   | queued, unacked| -          |
/// | fin-wait2   | acked          | -          |
/// | close-wait  | -              | received   |
/// | last-ack    | queued, unacked| received   |
/// | closing     | queued, unacked| received   |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcpConnState {
    #[default]
    Established,
    FinWait1,
    FinWait2,
    CloseWait,
    LastAck,
    Closing,
}

impl TcpConnState {
    /// From TCP_INFO's tcpi_state (include/net/tcp_states.h); None for states not carried.
    pub fn from_code(code: u8) -> Option<TcpConnState> {
        Some(match code {
            1 => TcpConnState::Established,
            4 => TcpConnState::FinWait1,
            5 => TcpConnState::FinWait2,
            8 => TcpConnState::CloseWait,
            9 => TcpConnState::LastAck,
            11 => TcpConnState::Closing,
            _ => return None,
        })
    }

    /// tcpi_state value.
    pub fn code(self) -> u8 {
        match self {
            TcpConnState::Established => 1,
            TcpConnState::FinWait1 => 4,
            TcpConnState::FinWait2 => 5,
            TcpConnState::CloseWait => 8,
            TcpConnState::LastAck => 9,
            TcpConnState::Closing => 11,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpConnState::Established => "ESTABLISHED",
            TcpConnState::FinWait1 => "FIN_WAIT1",
            TcpConnState::FinWait2 => "FIN_WAIT2",
            TcpConnState::CloseWait => "CLOSE_WAIT",
            TcpConnState::LastAck => "LAST_ACK",
            TcpConnState::Closing => "CLOSING",
        }
    }

    /// This side has shut down writing: its FIN is at the end of the send sequence space.
    pub fn our_fin(self) -> bool {
        matches!(
            self,
            TcpConnState::FinWait1
                | TcpConnState::FinWait2
                | TcpConnState::LastAck
                | TcpConnState::Closing
        )
    }

    /// Our FIN has been acknowledged by the peer (only FIN_WAIT2 among the carried states).
    pub fn our_fin_acked(self) -> bool {
        self == TcpConnState::FinWait2
    }

    /// The peer's FIN has been received: it ends the receive sequence space.
    pub fn peer_fin(self) -> bool {
        matches!(
            self,
            TcpConnState::CloseWait | TcpConnState::LastAck | TcpConnState::Closing
        )
    }
}

/// Everything TCP repair needs to rebuild a connection (see [`crate::files::tcp`]).
///
/// The two sequence numbers are what TCP_QUEUE_SEQ reports, so they count FINs: a FIN takes one
/// sequence number. `send_seq` includes our FIN when [`TcpConnState::our_fin`], `recv_seq` the
/// peer's when [`TcpConnState::peer_fin`]; the queues and `unsent` hold data bytes only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpRepairImage {
    /// The connection's state. Images written before half-closed states were carried lack the
    /// field: they are ESTABLISHED.
    #[serde(default)]
    pub state: TcpConnState,
    /// TCP_QUEUE_SEQ of the send queue: write_seq, the sequence after the last queued byte (our
    /// FIN included).
    pub send_seq: u32,
    /// TCP_QUEUE_SEQ of the receive queue: rcv_nxt, the sequence after the last received byte
    /// (the peer's FIN included).
    pub recv_seq: u32,
    /// The whole send queue, data only (sent-but-unacked bytes, then not-yet-sent bytes).
    pub send_queue: Blob,
    /// How many data bytes at the END of `send_queue` were never sent (SIOCOUTQNSD without our
    /// FIN): written after repair mode is left, like an application write.
    pub unsent: u32,
    /// Our FIN was queued but never transmitted (it waits behind unsent data or a closed
    /// window): the destination replays it with a plain shutdown(SHUT_WR) after the unsent data.
    #[serde(default)]
    pub fin_unsent: bool,
    /// Received bytes the application has not read yet.
    pub recv_queue: Blob,
    pub window: TcpWindowImage,
    /// TCP_MAXSEG.
    pub mss: u32,
    /// tcpi_options: 1 timestamps, 2 SACK, 4 window scaling.
    pub tcp_options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// TCP_TIMESTAMP (the socket's timestamp clock).
    pub timestamp: u32,
    /// TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT.
    pub keep_idle: u32,
    pub keep_intvl: u32,
    pub keep_cnt: u32,
}

/// What the destination compares before reopening a regular file by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

/// A timespec (seconds, nanoseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeSpec {
    pub sec: i64,
    pub nsec: i64,
}

impl TimeSpec {
    pub fn is_zero(self) -> bool {
        self.sec == 0 && self.nsec == 0
    }

    pub fn as_nanos(self) -> i128 {
        i128::from(self.sec) * 1_000_000_000 + i128::from(self.nsec)
    }

    pub fn from_nanos(nanos: i128) -> TimeSpec {
        TimeSpec {
            sec: nanos.div_euclid(1_000_000_000) as i64,
            nsec: nanos.rem_euclid(1_000_000_000) as i64,
        }
    }
}

/// One registration of an epoll instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EpollTargetImage {
    /// The watched fd number in the process.
    pub tfd: i32,
    /// EPOLL* mask (EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE, EPOLLWAKEUP included).
    pub events: u32,
    /// The user's epoll_data, opaque.
    pub data: u64,
}

/// What the fd is, with everything needed to rebuild it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum FdKindImage {
    /// The same open file description as fd `of` (a lower number): dup(2) it.
    Dup {
        of: i32,
    },
    /// A file reopened by path; the destination refuses it if it is missing or changed.
    Regular {
        path: String,
        offset: u64,
        identity: FileIdentity,
    },
    /// A regular file unlinked while open: its content travels with the image.
    Deleted {
        /// The path it had (without " (deleted)"); the destination creates it there, or as an
        /// O_TMPFILE in that directory when the name is taken, and unlinks it at once.
        path: String,
        offset: u64,
        size: u64,
        /// st_mode permission bits, owner and group.
        mode: u32,
        uid: u32,
        gid: u32,
        content: Blob,
    },
    Directory {
        path: String,
        offset: u64,
    },
    /// A stateless character device (/dev/null, zero, full, random, urandom).
    Device {
        path: String,
        major: u32,
        minor: u32,
    },
    Pipe {
        /// The source pipe inode: every fd with this id is an end of one pipe.
        id: u64,
        end: PipeEnd,
        /// F_GETPIPE_SZ.
        pipe_size: u32,
        /// Buffered bytes, on the first fd of the pipe only.
        data: Option<Blob>,
    },
    Fifo {
        path: String,
        id: u64,
        pipe_size: u32,
        /// Buffered bytes, on the first fd of the FIFO only.
        data: Option<Blob>,
    },
    Eventfd {
        count: u64,
        semaphore: bool,
    },
    /// An epoll instance; its registrations are [`crate::files::FdFixup::EpollAdd`]s run after
    /// every fd sits at its final number.
    Epoll {
        targets: Vec<EpollTargetImage>,
    },
    Signalfd {
        /// Bit n-1 = signal n.
        sigmask: u64,
    },
    Timerfd {
        clockid: i32,
        /// TFD_TIMER_ABSTIME / TFD_TIMER_CANCEL_ON_SET of the last timerfd_settime.
        settime_flags: u32,
        /// Time left to the next expiration (zero: disarmed), at dump time.
        value: TimeSpec,
        interval: TimeSpec,
        /// Expirations not read yet.
        ticks: u64,
        /// For an absolute CLOCK_REALTIME(_ALARM) timer: the deadline on the wall clock, which
        /// means the same on every host; re-armed absolute. Other clocks are re-armed relative.
        realtime_deadline: Option<TimeSpec>,
    },
    Memfd {
        /// The name given to memfd_create (without the "memfd:" prefix).
        name: String,
        offset: u64,
        size: u64,
        /// F_GET_SEALS (a memfd made without MFD_ALLOW_SEALING reports F_SEAL_SEAL).
        seals: u32,
        content: Blob,
    },
    /// One side of a connected unix socket pair held entirely by the process.
    UnixPair {
        /// Lower source inode of the two: both sides carry the same id.
        pair: u64,
        socket_type: UnixSocketType,
        side: PairSide,
        /// This socket's receive queue (what the OTHER side sent): one entry per datagram or
        /// record; stream sockets carry one entry holding every queued byte.
        queue: Vec<Blob>,
        sndbuf: u32,
        rcvbuf: u32,
    },
    /// A listening TCP socket. Its accept queue is not carried: a listener holding connections
    /// the process has not accept()ed yet is refused at dump (and by `migrate check`).
    TcpListen {
        family: InetFamily,
        local: InetAddr,
        backlog: u32,
        options: SocketOptions,
        /// Connections waiting in the accept queue at dump time: always 0 in images written since
        /// such listeners are refused (older images: informational, they were lost).
        #[serde(default)]
        pending: u32,
    },
    /// A TCP socket that is neither listening nor connected (fresh, or bound only).
    TcpClosed {
        family: InetFamily,
        local: Option<InetAddr>,
        options: SocketOptions,
    },
    /// A connected TCP socket, ESTABLISHED or half-closed (`repair.state`), checkpointed with TCP
    /// repair ([`crate::files::tcp`]). The tag keeps its old name for image compatibility.
    TcpEstablished {
        family: InetFamily,
        local: InetAddr,
        peer: InetAddr,
        options: SocketOptions,
        repair: TcpRepairImage,
    },
    /// A UDP socket, bound and/or connected. Queued datagrams are not carried.
    Udp {
        family: InetFamily,
        local: Option<InetAddr>,
        peer: Option<InetAddr>,
        options: SocketOptions,
    },
}

impl FdKindImage {
    /// The kind tag as serialized.
    pub fn name(&self) -> &'static str {
        match self {
            FdKindImage::Dup { .. } => "dup",
            FdKindImage::Regular { .. } => "regular",
            FdKindImage::Deleted { .. } => "deleted",
            FdKindImage::Directory { .. } => "directory",
            FdKindImage::Device { .. } => "device",
            FdKindImage::Pipe { .. } => "pipe",
            FdKindImage::Fifo { .. } => "fifo",
            FdKindImage::Eventfd { .. } => "eventfd",
            FdKindImage::Epoll { .. } => "epoll",
            FdKindImage::Signalfd { .. } => "signalfd",
            FdKindImage::Timerfd { .. } => "timerfd",
            FdKindImage::Memfd { .. } => "memfd",
            FdKindImage::UnixPair { .. } => "unix-pair",
            FdKindImage::TcpListen { .. } => "tcp-listen",
            FdKindImage::TcpClosed { .. } => "tcp-closed",
            FdKindImage::TcpEstablished { .. } => "tcp-established",
            FdKindImage::Udp { .. } => "udp",
        }
    }
}

/// A byte payload: msgpack `bin` (and a JSON array of numbers), never a msgpack array of ints.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = &self.0[..self.0.len().min(16)];
        write!(
            f,
            "Blob({} bytes: {:?}",
            self.0.len(),
            String::from_utf8_lossy(head)
        )?;
        f.write_str(if self.0.len() > 16 { "…)" } else { ")" })
    }
}

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Blob, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(Blob(bytes))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<FdImage> {
        vec![
            FdImage {
                fd: 3,
                cloexec: false,
                flags: libc::O_RDONLY as u32,
                kind: FdKindImage::Pipe {
                    id: 77,
                    end: PipeEnd::Read,
                    pipe_size: 65536,
                    data: Some(Blob(b"pipe!".to_vec())),
                },
            },
            FdImage {
                fd: 4,
                cloexec: true,
                flags: libc::O_WRONLY as u32,
                kind: FdKindImage::Dup { of: 3 },
            },
            FdImage {
                fd: 9,
                cloexec: true,
                flags: 0o2,
                kind: FdKindImage::Timerfd {
                    clockid: 1,
                    settime_flags: 0,
                    value: TimeSpec { sec: 9, nsec: 5 },
                    interval: TimeSpec { sec: 5, nsec: 0 },
                    ticks: 0,
                    realtime_deadline: None,
                },
            },
        ]
    }

    #[test]
    fn msgpack_roundtrip_uses_bin_for_blobs() {
        let images = sample();
        let bytes = rmp_serde::to_vec_named(&images).unwrap();
        // "pipe!" as msgpack bin 8: 0xc4 0x05 followed by the bytes.
        assert!(bytes
            .windows(7)
            .any(|w| w == [0xc4, 5, b'p', b'i', b'p', b'e', b'!']));
        let back: Vec<FdImage> = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, images);
    }

    #[test]
    fn json_shape() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json[0]["kind"]["kind"], "pipe");
        assert_eq!(json[0]["kind"]["pipeSize"], 65536);
        assert_eq!(
            json[0]["kind"]["data"],
            serde_json::json!([112, 105, 112, 101, 33])
        );
        assert_eq!(json[1]["kind"], serde_json::json!({"kind": "dup", "of": 3}));
        assert_eq!(json[2]["kind"]["realtimeDeadline"], serde_json::Value::Null);
        let back: Vec<FdImage> = serde_json::from_value(json).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn timespec_nanos() {
        let t = TimeSpec { sec: 2, nsec: 500 };
        assert_eq!(TimeSpec::from_nanos(t.as_nanos()), t);
        assert_eq!(
            TimeSpec::from_nanos(-1),
            TimeSpec {
                sec: -1,
                nsec: 999_999_999
            }
        );
        assert_eq!(
            InetAddr {
                address: "::1".into(),
                port: 80,
                scope_id: 0
            }
            .to_string(),
            "[::1]:80"
        );
    }
}
