//! Open file descriptors: /proc/PID/fd/N (readlink + stat) and /proc/PID/fdinfo/N.
//!
//! Sequence per fd, after listing /proc/PID/fd:
//! 1. readlink /proc/PID/fd/N. The target says what the fd is for everything that is not a path:
//!    `pipe:[INO]`, `socket:[INO]`, `anon_inode:[eventfd]` (or `anon_inode:inotify`, without
//!    brackets), ...
//! 2. read /proc/PID/fdinfo/N: `pos`, `flags` (octal O_* bits), `mnt_id`, `ino`, then lines that
//!    depend on the file type (eventfd-count, epoll `tfd:` lines, timerfd, signalfd, inotify).
//! 3. for a path, stat /proc/PID/fd/N (following the magic link, which works even for deleted
//!    files) to tell regular files, directories, FIFOs (a named pipe's link is its path, not
//!    `pipe:[…]`) and devices apart, and get the size / device number.
//! 4. for a socket, look its inode up in the target's socket tables ([`super::net`]); a socket
//!    that is in no table is named by its `system.sockprotoname` xattr (sockfs answers it).
//!
//! An fd closed between the listing and its own files is skipped (ENOENT), as the process is
//! running while we read. fdinfo number formats (from the kernel's show_fdinfo functions):
//! eventfd-count is hex (`%16llx`); epoll `events`, `data`, `ino`, `sdev` are hex, `tfd` and
//! `pos` decimal; timerfd `settime flags` is octal; inotify `ino`, `sdev`, `mask` are hex.

use super::net::{
    read_socket_tables, InetSocket, InetTable, NetError, SocketState, SocketTables, TableEntry,
    UnixSocket,
};
use super::{hex_u64, is_gone_error, proc_path, read_link_string, ParseError};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One open file descriptor of the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fd {
    pub fd: i32,
    /// readlink of /proc/PID/fd/N, verbatim.
    pub link: String,
    /// File position (fdinfo `pos`).
    pub pos: u64,
    /// open(2) flags (fdinfo `flags`, printed in octal by the kernel), O_CLOEXEC included.
    pub flags: u32,
    pub mnt_id: i32,
    /// Inode number of the open file (fdinfo `ino`).
    pub ino: u64,
    #[serde(flatten)]
    pub kind: FdKind,
}

/// What the socket behind a `socket:[INODE]` fd is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "protocol",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum SocketKind {
    Tcp(InetSocket),
    Tcp6(InetSocket),
    Udp(InetSocket),
    Udp6(InetSocket),
    Unix(UnixSocket),
    Netlink {
        /// NETLINK_* number (0 = NETLINK_ROUTE); None for a socket not yet bound, which the
        /// netlink table does not list.
        netlink_protocol: Option<u32>,
    },
    /// Any other family (packet, raw, ...): the protocol name sockfs reports, lowercased, or
    /// "unknown".
    Other {
        name: String,
    },
}

/// One target of an epoll instance (an fdinfo `tfd:` line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EpollTarget {
    /// The watched fd number (in the process that added it, at the time it was added).
    pub tfd: i32,
    /// EPOLL* event mask.
    pub events: u32,
    /// The user's epoll_data, opaque.
    #[serde(with = "hex_u64")]
    pub data: u64,
    pub pos: u64,
    pub ino: u64,
    pub sdev: u32,
}

/// A timespec as fdinfo prints it: `(sec, nsec)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// The state of a timerfd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimerfdState {
    pub clockid: i32,
    /// Expirations not yet read.
    pub ticks: u64,
    /// TFD_TIMER_* flags of the last timerfd_settime.
    pub settime_flags: u32,
    /// Time left until the next expiration (zero: disarmed).
    pub it_value: Timespec,
    pub it_interval: Timespec,
}

/// One inotify watch (an fdinfo `inotify` line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InotifyWatch {
    pub wd: i32,
    pub ino: u64,
    pub sdev: u32,
    pub mask: u32,
}

/// What an fd is, with the details moving it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum FdKind {
    RegularFile {
        /// Without the " (deleted)" suffix.
        path: String,
        size: u64,
        /// Unlinked while open: its content must travel with the process.
        deleted: bool,
    },
    Directory {
        path: String,
    },
    Pipe {
        inode: u64,
    },
    Fifo {
        path: String,
        inode: u64,
    },
    Socket {
        inode: u64,
        socket: SocketKind,
    },
    Eventfd {
        count: u64,
        id: Option<u64>,
        semaphore: Option<bool>,
    },
    Epoll {
        targets: Vec<EpollTarget>,
    },
    Signalfd {
        #[serde(with = "hex_u64")]
        sigmask: u64,
    },
    Timerfd(TimerfdState),
    Inotify {
        watches: Vec<InotifyWatch>,
    },
    Fanotify,
    IoUring,
    Memfd {
        name: String,
        size: u64,
    },
    CharDevice {
        path: String,
        major: u32,
        minor: u32,
    },
    BlockDevice {
        path: String,
        major: u32,
        minor: u32,
    },
    /// Any other anon inode (pidfd, userfaultfd, perf_event, bpf-map, ...) by name.
    AnonInodeOther {
        name: String,
    },
    Unknown,
}

impl FdKind {
    /// The `kind` tag as serialized (stable, kebab-case).
    pub fn name(&self) -> &'static str {
        match self {
            FdKind::RegularFile { .. } => "regular-file",
            FdKind::Directory { .. } => "directory",
            FdKind::Pipe { .. } => "pipe",
            FdKind::Fifo { .. } => "fifo",
            FdKind::Socket { .. } => "socket",
            FdKind::Eventfd { .. } => "eventfd",
            FdKind::Epoll { .. } => "epoll",
            FdKind::Signalfd { .. } => "signalfd",
            FdKind::Timerfd(_) => "timerfd",
            FdKind::Inotify { .. } => "inotify",
            FdKind::Fanotify => "fanotify",
            FdKind::IoUring => "io-uring",
            FdKind::Memfd { .. } => "memfd",
            FdKind::CharDevice { .. } => "char-device",
            FdKind::BlockDevice { .. } => "block-device",
            FdKind::AnonInodeOther { .. } => "anon-inode-other",
            FdKind::Unknown => "unknown",
        }
    }
}

/// Failure reading a process's fds.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: ParseError },
    #[error("reading socket tables: {0}")]
    Net(#[from] NetError),
}

/// What a /proc/PID/fd/N link target alone says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTarget<'a> {
    Path(&'a str),
    Pipe(u64),
    Socket(u64),
    /// Name inside `anon_inode:` with the brackets removed (`eventfd`, `inotify`, `io_uring`...).
    AnonInode(&'a str),
    Other,
}

/// Classifies a link target by its text.
pub fn parse_link(link: &str) -> LinkTarget<'_> {
    let bracketed = |prefix: &str| -> Option<u64> {
        link.strip_prefix(prefix)?
            .strip_prefix('[')?
            .strip_suffix(']')?
            .parse()
            .ok()
    };
    if link.starts_with('/') {
        LinkTarget::Path(link)
    } else if let Some(inode) = bracketed("pipe:") {
        LinkTarget::Pipe(inode)
    } else if let Some(inode) = bracketed("socket:") {
        LinkTarget::Socket(inode)
    } else if let Some(name) = link.strip_prefix("anon_inode:") {
        LinkTarget::AnonInode(
            name.strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .unwrap_or(name),
        )
    } else {
        LinkTarget::Other
    }
}

/// The lines every fdinfo file starts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FdInfoHeader {
    pub pos: u64,
    pub flags: u32,
    pub mnt_id: i32,
    pub ino: u64,
}

fn value_of<'a>(text: &'a str, key: &str) -> Option<(usize, &'a str)> {
    text.lines().enumerate().find_map(|(i, line)| {
        line.strip_prefix(key)?
            .strip_prefix(':')
            .map(|v| (i + 1, v.trim()))
    })
}

fn number<T: std::str::FromStr>(n: usize, key: &str, text: &str) -> Result<T, ParseError> {
    text.parse()
        .map_err(|_| ParseError::new(n, format!("{key}: {text:?} is not a number")))
}

fn radix<T>(
    n: usize,
    key: &str,
    text: &str,
    radix: u32,
    parse: fn(&str, u32) -> Result<T, std::num::ParseIntError>,
) -> Result<T, ParseError> {
    parse(text, radix)
        .map_err(|_| ParseError::new(n, format!("{key}: {text:?} is not base {radix}")))
}

fn required<'a>(text: &'a str, key: &str) -> Result<(usize, &'a str), ParseError> {
    value_of(text, key).ok_or_else(|| ParseError::new(0, format!("no {key} line")))
}

/// Parses the common fdinfo header (pos, flags, mnt_id; ino where the kernel shows it).
pub fn parse_fdinfo_header(text: &str) -> Result<FdInfoHeader, ParseError> {
    let (n, pos) = required(text, "pos")?;
    let pos = number(n, "pos", pos)?;
    let (n, flags) = required(text, "flags")?;
    let flags = radix(n, "flags", flags, 8, u32::from_str_radix)?;
    let (n, mnt_id) = required(text, "mnt_id")?;
    let mnt_id = number(n, "mnt_id", mnt_id)?;
    let ino = match value_of(text, "ino") {
        Some((n, ino)) => number(n, "ino", ino)?,
        None => 0,
    };
    Ok(FdInfoHeader {
        pos,
        flags,
        mnt_id,
        ino,
    })
}

/// eventfd fdinfo: count (hex), id and semaphore flag (newer kernels).
pub fn parse_eventfd(text: &str) -> Result<FdKind, ParseError> {
    let (n, count) = required(text, "eventfd-count")?;
    let count = radix(n, "eventfd-count", count, 16, u64::from_str_radix)?;
    let id = value_of(text, "eventfd-id")
        .map(|(n, v)| number(n, "eventfd-id", v))
        .transpose()?;
    let semaphore = value_of(text, "eventfd-semaphore")
        .map(|(n, v)| number::<u8>(n, "eventfd-semaphore", v).map(|v| v != 0))
        .transpose()?;
    Ok(FdKind::Eventfd {
        count,
        id,
        semaphore,
    })
}

/// Splits `key:value key:value ...` (values may be preceded by spaces, as in epoll's `tfd:  6`).
fn key_values(line: &str) -> Vec<(&str, &str)> {
    let mut pairs = Vec::new();
    let mut rest = line.trim();
    while let Some(colon) = rest.find(':') {
        let key = rest[..colon].trim();
        let after = rest[colon + 1..].trim_start();
        let end = after.find(' ').unwrap_or(after.len());
        pairs.push((key, &after[..end]));
        rest = after[end..].trim_start();
    }
    pairs
}

fn field<'a>(n: usize, pairs: &[(&str, &'a str)], key: &str) -> Result<&'a str, ParseError> {
    pairs
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| ParseError::new(n, format!("no {key} field")))
}

/// epoll fdinfo: one `tfd: N events: X data: Y pos: P ino: I sdev: D` line per target.
pub fn parse_epoll(text: &str) -> Result<FdKind, ParseError> {
    let mut targets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if !line.starts_with("tfd:") {
            continue;
        }
        let n = i + 1;
        let pairs = key_values(line);
        targets.push(EpollTarget {
            tfd: number(n, "tfd", field(n, &pairs, "tfd")?)?,
            events: radix(
                n,
                "events",
                field(n, &pairs, "events")?,
                16,
                u32::from_str_radix,
            )?,
            data: radix(
                n,
                "data",
                field(n, &pairs, "data")?,
                16,
                u64::from_str_radix,
            )?,
            pos: number(n, "pos", field(n, &pairs, "pos")?)?,
            ino: radix(n, "ino", field(n, &pairs, "ino")?, 16, u64::from_str_radix)?,
            sdev: radix(
                n,
                "sdev",
                field(n, &pairs, "sdev")?,
                16,
                u32::from_str_radix,
            )?,
        });
    }
    Ok(FdKind::Epoll { targets })
}

/// signalfd fdinfo: `sigmask: HEX`.
pub fn parse_signalfd(text: &str) -> Result<FdKind, ParseError> {
    let (n, mask) = required(text, "sigmask")?;
    Ok(FdKind::Signalfd {
        sigmask: radix(n, "sigmask", mask, 16, u64::from_str_radix)?,
    })
}

fn parse_timespec(n: usize, key: &str, text: &str) -> Result<Timespec, ParseError> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .and_then(|t| t.split_once(','))
        .ok_or_else(|| ParseError::new(n, format!("{key}: {text:?} is not (sec, nsec)")))?;
    Ok(Timespec {
        sec: number(n, key, inner.0.trim())?,
        nsec: number(n, key, inner.1.trim())?,
    })
}

/// timerfd fdinfo: clockid, ticks, settime flags (octal), it_value, it_interval.
pub fn parse_timerfd(text: &str) -> Result<FdKind, ParseError> {
    let (n, clockid) = required(text, "clockid")?;
    let clockid = number(n, "clockid", clockid)?;
    let (n, ticks) = required(text, "ticks")?;
    let ticks = number(n, "ticks", ticks)?;
    let (n, flags) = required(text, "settime flags")?;
    let settime_flags = radix(n, "settime flags", flags, 8, u32::from_str_radix)?;
    let (n, value) = required(text, "it_value")?;
    let it_value = parse_timespec(n, "it_value", value)?;
    let (n, interval) = required(text, "it_interval")?;
    let it_interval = parse_timespec(n, "it_interval", interval)?;
    Ok(FdKind::Timerfd(TimerfdState {
        clockid,
        ticks,
        settime_flags,
        it_value,
        it_interval,
    }))
}

/// inotify fdinfo: one `inotify wd:N ino:HEX sdev:HEX mask:HEX ...` line per watch.
pub fn parse_inotify(text: &str) -> Result<FdKind, ParseError> {
    let mut watches = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("inotify ") else {
            continue;
        };
        let n = i + 1;
        let pairs = key_values(rest);
        watches.push(InotifyWatch {
            wd: number(n, "wd", field(n, &pairs, "wd")?)?,
            ino: radix(n, "ino", field(n, &pairs, "ino")?, 16, u64::from_str_radix)?,
            sdev: radix(
                n,
                "sdev",
                field(n, &pairs, "sdev")?,
                16,
                u32::from_str_radix,
            )?,
            mask: radix(
                n,
                "mask",
                field(n, &pairs, "mask")?,
                16,
                u32::from_str_radix,
            )?,
        });
    }
    Ok(FdKind::Inotify { watches })
}

/// Kind of an `anon_inode:` fd from its name and fdinfo.
pub fn classify_anon_inode(name: &str, fdinfo: &str) -> Result<FdKind, ParseError> {
    Ok(match name {
        "eventfd" => parse_eventfd(fdinfo)?,
        "eventpoll" => parse_epoll(fdinfo)?,
        "signalfd" => parse_signalfd(fdinfo)?,
        "timerfd" => parse_timerfd(fdinfo)?,
        "inotify" => parse_inotify(fdinfo)?,
        "fanotify" => FdKind::Fanotify,
        "io_uring" => FdKind::IoUring,
        other => FdKind::AnonInodeOther {
            name: other.to_owned(),
        },
    })
}

const DELETED_SUFFIX: &str = " (deleted)";

/// Linux's dev_t split (glibc's gnu_dev_major/minor).
pub fn dev_major_minor(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Kind of a path-like fd from its link text and the stat of the file it is open on.
pub fn classify_path(link: &str, metadata: &std::fs::Metadata) -> FdKind {
    let path = link.strip_suffix(DELETED_SUFFIX).unwrap_or(link).to_owned();
    let file_type = metadata.file_type();
    if file_type.is_file() {
        if let Some(name) = path.strip_prefix("/memfd:") {
            return FdKind::Memfd {
                name: name.to_owned(),
                size: metadata.len(),
            };
        }
        // nlink, not the suffix, is the truth: a file may really be called "x (deleted)".
        FdKind::RegularFile {
            path,
            size: metadata.len(),
            deleted: metadata.nlink() == 0,
        }
    } else if file_type.is_dir() {
        FdKind::Directory { path }
    } else if file_type.is_fifo() {
        FdKind::Fifo {
            path,
            inode: metadata.ino(),
        }
    } else if file_type.is_char_device() || file_type.is_block_device() {
        let (major, minor) = dev_major_minor(metadata.rdev());
        if file_type.is_char_device() {
            FdKind::CharDevice { path, major, minor }
        } else {
            FdKind::BlockDevice { path, major, minor }
        }
    } else {
        FdKind::Unknown
    }
}

/// Names a socket that is in no table by what sockfs calls its protocol ("TCP", "PACKET", ...).
fn socket_from_protocol_name(name: Option<String>) -> SocketKind {
    let unlisted = InetSocket {
        local: None,
        remote: None,
        state: SocketState::Close,
        tx_queue: 0,
        rx_queue: 0,
        uid: 0,
    };
    match name.as_deref() {
        Some("TCP") => SocketKind::Tcp(unlisted),
        Some("TCPv6") => SocketKind::Tcp6(unlisted),
        Some("UDP") => SocketKind::Udp(unlisted),
        Some("UDPv6") => SocketKind::Udp6(unlisted),
        Some("NETLINK") => SocketKind::Netlink {
            netlink_protocol: None,
        },
        Some(other) => SocketKind::Other {
            name: other.to_ascii_lowercase(),
        },
        None => SocketKind::Other {
            name: "unknown".to_owned(),
        },
    }
}

/// getxattr(path, "system.sockprotoname"): sockfs's name for the socket's protocol.
fn socket_protocol_name(path: &Path) -> Option<String> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and live across the call; buf is valid for writes of
    // buf.len() bytes and the kernel writes at most that many.
    let len = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c"system.sockprotoname".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let len = usize::try_from(len).ok()?;
    let name = buf[..len].split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}

fn socket_kind(tables: &SocketTables, inode: u64, fd_path: &Path) -> SocketKind {
    match tables.by_inode.get(&inode) {
        Some(TableEntry::Inet(InetTable::Tcp, s)) => SocketKind::Tcp(s.clone()),
        Some(TableEntry::Inet(InetTable::Tcp6, s)) => SocketKind::Tcp6(s.clone()),
        Some(TableEntry::Inet(InetTable::Udp, s)) => SocketKind::Udp(s.clone()),
        Some(TableEntry::Inet(InetTable::Udp6, s)) => SocketKind::Udp6(s.clone()),
        Some(TableEntry::Unix(s)) => SocketKind::Unix(s.clone()),
        Some(TableEntry::Netlink(protocol)) => SocketKind::Netlink {
            netlink_protocol: Some(*protocol),
        },
        None => socket_from_protocol_name(socket_protocol_name(fd_path)),
    }
}

/// Lists the fd numbers of `pid`, ascending.
pub fn list_fds(pid: Pid) -> Result<Vec<i32>, FdError> {
    let path = proc_path(pid, "fd");
    let entries = std::fs::read_dir(&path).map_err(|source| FdError::Read {
        path: path.clone(),
        source,
    })?;
    let mut fds = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| FdError::Read {
            path: path.clone(),
            source,
        })?;
        let name = entry.file_name();
        match name.to_str().and_then(|n| n.parse::<i32>().ok()) {
            Some(fd) => fds.push(fd),
            None => {
                let source = ParseError::new(0, format!("entry {name:?} is not an fd number"));
                return Err(FdError::Parse {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

/// Reads and classifies one fd; Ok(None) when it was closed while we looked.
fn read_fd(pid: Pid, fd: i32, tables: &mut Option<SocketTables>) -> Result<Option<Fd>, FdError> {
    macro_rules! skip_if_closed {
        ($result:expr, $path:expr) => {
            match $result {
                Ok(value) => value,
                Err(e) if is_gone_error(&e) => return Ok(None),
                Err(source) => {
                    return Err(FdError::Read {
                        path: $path,
                        source,
                    })
                }
            }
        };
    }
    let fd_path = proc_path(pid, &format!("fd/{fd}"));
    let link = skip_if_closed!(read_link_string(&fd_path), fd_path);
    let info_path = proc_path(pid, &format!("fdinfo/{fd}"));
    let info = skip_if_closed!(std::fs::read_to_string(&info_path), info_path);
    let parse_error = |source| FdError::Parse {
        path: info_path.clone(),
        source,
    };
    let header = parse_fdinfo_header(&info).map_err(parse_error)?;
    let kind = match parse_link(&link) {
        LinkTarget::Path(path) => {
            let metadata = skip_if_closed!(std::fs::metadata(&fd_path), fd_path);
            classify_path(path, &metadata)
        }
        LinkTarget::Pipe(inode) => FdKind::Pipe { inode },
        LinkTarget::Socket(inode) => {
            if tables.is_none() {
                *tables = Some(read_socket_tables(pid)?);
            }
            let tables = tables.as_ref().expect("socket tables were just loaded");
            FdKind::Socket {
                inode,
                socket: socket_kind(tables, inode, &fd_path),
            }
        }
        LinkTarget::AnonInode(name) => classify_anon_inode(name, &info).map_err(parse_error)?,
        LinkTarget::Other => FdKind::Unknown,
    };
    Ok(Some(Fd {
        fd,
        link,
        pos: header.pos,
        flags: header.flags,
        mnt_id: header.mnt_id,
        ino: header.ino,
        kind,
    }))
}

/// Every open fd of `pid`, ascending by number.
pub fn read_fds(pid: Pid) -> Result<Vec<Fd>, FdError> {
    // Socket tables are read once, and only if the process has a socket.
    let mut tables = None;
    let mut fds = Vec::new();
    for fd in list_fds(pid)? {
        if let Some(entry) = read_fd(pid, fd, &mut tables)? {
            fds.push(entry);
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Errno;

    // fdinfo files of tests/workloads/fd_zoo.c captured on the development machine (6.18).
    const EVENTFD: &str = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\neventfd-count:               2a\neventfd-id: 1\neventfd-semaphore: 0\n";
    const EPOLL: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\ntfd:        6 events:       19 data:             1111  pos:0 ino:40e sdev:10\ntfd:        3 events:       1d data:             2222  pos:0 ino:2361 sdev:f\n";
    const TIMERFD: &str = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 0\nsettime flags: 00\nit_value: (999, 389296664)\nit_interval: (2, 500000000)\n";
    const SIGNALFD: &str =
        "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000000000a00\n";
    const INOTIFY: &str = "pos:\t0\nflags:\t04000\nmnt_id:\t17\nino:\t1038\ninotify wd:1 ino:98a481 sdev:fe00000 mask:300 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:81a49800e4cad6c6\n";
    const IO_URING: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t9067\nSqMask:\t0x3\nSqHead:\t0\nSqTail:\t0\nCachedSqHead:\t0\nCqMask:\t0x7\nCqHead:\t0\nCqTail:\t0\nCachedCqTail:\t0\nSQEs:\t0\nCQEs:\t0\nSqThread:\t-1\nSqThreadCpu:\t-1\nSqTotalTime:\t0\nSqWorkTime:\t0\nUserFiles:\t0\nUserBufs:\t0\nPollList:\nCqOverflowList:\nNAPI:\tdisabled\n";
    const REGULAR: &str = "pos:\t1234\nflags:\t0102002\nmnt_id:\t27\nino:\t10003588\n";

    #[test]
    fn links() {
        assert_eq!(parse_link("pipe:[9057]"), LinkTarget::Pipe(9057));
        assert_eq!(parse_link("socket:[9061]"), LinkTarget::Socket(9061));
        assert_eq!(
            parse_link("anon_inode:[eventpoll]"),
            LinkTarget::AnonInode("eventpoll")
        );
        assert_eq!(
            parse_link("anon_inode:inotify"),
            LinkTarget::AnonInode("inotify")
        );
        assert_eq!(
            parse_link("anon_inode:bpf-map"),
            LinkTarget::AnonInode("bpf-map")
        );
        assert_eq!(
            parse_link("/tmp/zoo/deleted (deleted)"),
            LinkTarget::Path("/tmp/zoo/deleted (deleted)")
        );
        assert_eq!(parse_link("net:[4026531833]"), LinkTarget::Other);
        assert_eq!(parse_link("pipe:[oops]"), LinkTarget::Other);
        assert_eq!(parse_link(""), LinkTarget::Other);
    }

    #[test]
    fn header() {
        let header = parse_fdinfo_header(REGULAR).unwrap();
        assert_eq!(
            header,
            FdInfoHeader {
                pos: 1234,
                flags: 0o102002,
                mnt_id: 27,
                ino: 10003588
            }
        );
        assert_ne!(header.flags & libc::O_APPEND as u32, 0);
        assert!(
            parse_fdinfo_header("pos:\t0\nflags:\t09\nmnt_id:\t1\n").is_err(),
            "9 is not octal"
        );
        assert!(parse_fdinfo_header("pos:\t0\n").is_err(), "truncated");
        assert!(parse_fdinfo_header("").is_err());
    }

    #[test]
    fn eventfd() {
        assert_eq!(
            classify_anon_inode("eventfd", EVENTFD).unwrap(),
            FdKind::Eventfd {
                count: 42,
                id: Some(1),
                semaphore: Some(false)
            }
        );
        let old_kernel = "pos:\t0\nflags:\t02\nmnt_id:\t9\neventfd-count:                0\n";
        assert_eq!(
            parse_eventfd(old_kernel).unwrap(),
            FdKind::Eventfd {
                count: 0,
                id: None,
                semaphore: None
            }
        );
        assert!(parse_eventfd("pos:\t0\n").is_err());
    }

    #[test]
    fn epoll_targets() {
        let FdKind::Epoll { targets } = classify_anon_inode("eventpoll", EPOLL).unwrap() else {
            panic!()
        };
        assert_eq!(
            targets,
            vec![
                EpollTarget {
                    tfd: 6,
                    events: 0x19,
                    data: 0x1111,
                    pos: 0,
                    ino: 0x40e,
                    sdev: 0x10
                },
                EpollTarget {
                    tfd: 3,
                    events: 0x1d,
                    data: 0x2222,
                    pos: 0,
                    ino: 0x2361,
                    sdev: 0xf
                },
            ]
        );
        assert!(
            parse_epoll("tfd:        6 events:       19\n").is_err(),
            "truncated target line"
        );
        assert!(parse_epoll("tfd: x events: 19 data: 1 pos:0 ino:1 sdev:1\n").is_err());
    }

    #[test]
    fn timerfd_signalfd_inotify() {
        assert_eq!(
            classify_anon_inode("timerfd", TIMERFD).unwrap(),
            FdKind::Timerfd(TimerfdState {
                clockid: libc::CLOCK_MONOTONIC,
                ticks: 0,
                settime_flags: 0,
                it_value: Timespec {
                    sec: 999,
                    nsec: 389296664
                },
                it_interval: Timespec {
                    sec: 2,
                    nsec: 500000000
                },
            })
        );
        assert!(parse_timerfd(&TIMERFD.replace("(2, 500000000)", "(2 500000000)")).is_err());
        assert!(parse_timerfd(&TIMERFD.replace("it_interval: (2, 500000000)\n", "")).is_err());
        let sigmask = (1u64 << (libc::SIGUSR1 - 1)) | (1u64 << (libc::SIGUSR2 - 1));
        assert_eq!(
            classify_anon_inode("signalfd", SIGNALFD).unwrap(),
            FdKind::Signalfd { sigmask }
        );
        assert_eq!(
            classify_anon_inode("inotify", INOTIFY).unwrap(),
            FdKind::Inotify {
                watches: vec![InotifyWatch {
                    wd: 1,
                    ino: 0x98a481,
                    sdev: 0xfe00000,
                    mask: 0x300
                }]
            }
        );
        assert!(parse_inotify("inotify wd:1 ino:zz sdev:0 mask:0\n").is_err());
        assert_eq!(
            classify_anon_inode("io_uring", IO_URING).unwrap(),
            FdKind::IoUring
        );
        assert_eq!(
            classify_anon_inode("pidfd", REGULAR).unwrap(),
            FdKind::AnonInodeOther {
                name: "pidfd".into()
            }
        );
    }

    #[test]
    fn device_numbers() {
        assert_eq!(dev_major_minor(libc::makedev(1, 3)), (1, 3));
        assert_eq!(dev_major_minor(libc::makedev(136, 2)), (136, 2));
        assert_eq!(
            dev_major_minor(libc::makedev(4095, 1 << 19)),
            (4095, 1 << 19)
        );
    }

    #[test]
    fn json_shape() {
        let fd = Fd {
            fd: 8,
            link: "anon_inode:[timerfd]".into(),
            pos: 0,
            flags: 0o4002,
            mnt_id: 17,
            ino: 1038,
            kind: parse_timerfd(TIMERFD).unwrap(),
        };
        let json = serde_json::to_value(&fd).unwrap();
        assert_eq!(json["kind"], "timerfd");
        assert_eq!(json["itInterval"]["nsec"], 500000000);
        assert_eq!(json["settimeFlags"], 0);
        let back: Fd = serde_json::from_value(json).unwrap();
        assert_eq!(back, fd);
        let socket = FdKind::Socket {
            inode: 7,
            socket: SocketKind::Netlink {
                netlink_protocol: Some(0),
            },
        };
        let json = serde_json::to_value(&socket).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind": "socket", "inode": 7, "socket": {"protocol": "netlink", "netlinkProtocol": 0}})
        );
    }

    #[test]
    fn reads_own_fds() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut ends = [0; 2];
        // SAFETY: pipe2 writes two fds into the 2-element array it is given.
        Errno::result(unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) }).unwrap();
        // SAFETY: both fds were just created by pipe2 and are owned by nothing else.
        let (reader, _writer) =
            unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let fds = read_fds(Pid::this()).unwrap();
        let find = |n: i32| fds.iter().find(|f| f.fd == n).expect("fd listed");
        assert_eq!(
            find(file.as_raw_fd()).kind,
            FdKind::CharDevice {
                path: "/dev/null".into(),
                major: 1,
                minor: 3
            }
        );
        assert!(matches!(find(reader.as_raw_fd()).kind, FdKind::Pipe { .. }));
        assert_ne!(find(reader.as_raw_fd()).flags & libc::O_CLOEXEC as u32, 0);
    }
}
