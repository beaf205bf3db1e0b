//! Dump side: every fd of a frozen process into an [`FdImage`] (sequence per kind: [`super`]).

use super::os;
use crate::image::fd::{
    Blob, EpollTargetImage, FdImage, FdKindImage, FileIdentity, InetAddr, InetFamily, PairSide,
    PipeEnd, SocketOptions, TimeSpec, UnixSocketType, MAX_CARRIED_CONTENT,
};
use crate::pidfd::{PidFd, PidFdError};
use crate::proc::fd::{
    parse_epoll, parse_eventfd, parse_fdinfo_header, parse_signalfd, parse_timerfd,
};
use crate::proc::fd::{Fd, FdKind, SocketKind};
use crate::proc::{ParseError, ProcessInventory};
use crate::sys::{Errno, Pid};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Character devices reopened by path: they hold no state.
const STATELESS_DEVICES: [(u32, u32); 5] = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)];

/// A failure dumping the fds of a process.
#[derive(Debug, thiserror::Error)]
pub enum FilesDumpError {
    #[error(transparent)]
    PidFd(#[from] PidFdError),
    #[error("fd {fd}: reading {path}: {source}")]
    Read {
        fd: i32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fd {fd}: parsing {path}: {source}")]
    Parse {
        fd: i32,
        path: PathBuf,
        source: ParseError,
    },
    #[error("fd {fd} ({kind}): {what} failed: {errno}")]
    Syscall {
        fd: i32,
        kind: &'static str,
        what: &'static str,
        errno: Errno,
    },
    #[error("fd {fd} ({kind}) cannot be migrated: {reason}")]
    Unsupported {
        fd: i32,
        kind: String,
        reason: String,
    },
    #[error("fd {fd}: {what} holds {size} bytes, more than the {cap}-byte limit for content carried in the image")]
    TooLarge {
        fd: i32,
        what: String,
        size: u64,
        cap: u64,
    },
    #[error("fd {fd}: the inventory says inode {expected}, the process now holds inode {found}; take the inventory while the process is frozen")]
    Stale { fd: i32, expected: u64, found: u64 },
    #[error("fd {fd} ({kind}): {reason}")]
    Inconsistent {
        fd: i32,
        kind: &'static str,
        reason: String,
    },
}

fn sys(fd: i32, kind: &'static str, what: &'static str) -> impl Fn(Errno) -> FilesDumpError {
    move |errno| FilesDumpError::Syscall {
        fd,
        kind,
        what,
        errno,
    }
}

fn unsupported(fd: i32, kind: &str, reason: impl Into<String>) -> FilesDumpError {
    FilesDumpError::Unsupported {
        fd,
        kind: kind.to_owned(),
        reason: reason.into(),
    }
}

/// Dumps every fd of `pid`, which the caller holds frozen, in ascending fd order.
///
/// `inventory` must have been taken while the process was frozen (its fd list is the list
/// dumped; an fd whose inode changed since is refused as [`FilesDumpError::Stale`]). Kind-specific
/// state (eventfd count, timer, epoll targets, ...) is re-read now, not taken from the inventory.
pub fn dump_fds(pid: Pid, inventory: &ProcessInventory) -> Result<Vec<FdImage>, FilesDumpError> {
    let pidfd = PidFd::open(pid)?;
    let mut stolen = BTreeMap::new();
    for fd in &inventory.fds {
        let file = pidfd.get_fd(fd.fd)?;
        let st = os::fstat(file.as_fd()).map_err(sys(fd.fd, fd.kind.name(), "fstat"))?;
        if fd.ino != 0 && st.st_ino != fd.ino {
            return Err(FilesDumpError::Stale {
                fd: fd.fd,
                expected: fd.ino,
                found: st.st_ino,
            });
        }
        stolen.insert(fd.fd, (file, st));
    }
    let mut dumper = Dumper {
        pid,
        inventory,
        stolen: &stolen,
        pipes_seen: HashSet::new(),
        netlink: None,
        socket_fds: inventory
            .fds
            .iter()
            .filter_map(|f| match f.kind {
                FdKind::Socket { inode, .. } => Some((inode, f.fd)),
                _ => None,
            })
            .collect(),
    };
    let mut images = Vec::with_capacity(inventory.fds.len());
    for (index, fd) in inventory.fds.iter().enumerate() {
        images.push(dumper.dump_one(index, fd)?);
    }
    Ok(images)
}

struct Dumper<'a> {
    pid: Pid,
    inventory: &'a ProcessInventory,
    stolen: &'a BTreeMap<i32, (OwnedFd, libc::stat)>,
    /// Pipe / FIFO ids whose data is already in the image.
    pipes_seen: HashSet<u64>,
    /// The sock_diag socket, opened at the first unix socket.
    netlink: Option<OwnedFd>,
    /// Socket inode → fd number, for every socket of the process.
    socket_fds: HashMap<u64, i32>,
}

impl<'a> Dumper<'a> {
    fn file(&self, fd: i32) -> (BorrowedFd<'a>, &'a libc::stat) {
        let stolen: &'a BTreeMap<i32, (OwnedFd, libc::stat)> = self.stolen;
        let (file, st) = &stolen[&fd];
        (file.as_fd(), st)
    }

    fn fdinfo(&self, fd: i32) -> Result<(String, PathBuf), FilesDumpError> {
        let path = PathBuf::from(format!("/proc/{}/fdinfo/{fd}", self.pid));
        let text = std::fs::read_to_string(&path).map_err(|source| FilesDumpError::Read {
            fd,
            path: path.clone(),
            source,
        })?;
        Ok((text, path))
    }

    fn parse<T>(
        &self,
        fd: i32,
        parser: fn(&str) -> Result<T, ParseError>,
    ) -> Result<T, FilesDumpError> {
        let (text, path) = self.fdinfo(fd)?;
        parser(&text).map_err(|source| FilesDumpError::Parse { fd, path, source })
    }

    /// An earlier fd on the same open file description, by kcmp(KCMP_FILE).
    fn dup_of(&self, index: usize, fd: &Fd) -> Result<Option<i32>, FilesDumpError> {
        let (_, st) = self.file(fd.fd);
        for earlier in &self.inventory.fds[..index] {
            let (_, est) = self.file(earlier.fd);
            if est.st_ino != st.st_ino || est.st_dev != st.st_dev {
                continue;
            }
            let same = os::same_file(self.pid, earlier.fd, fd.fd).map_err(sys(
                fd.fd,
                fd.kind.name(),
                "kcmp(KCMP_FILE)",
            ))?;
            match same {
                Some(true) => return Ok(Some(earlier.fd)),
                Some(false) => {}
                None => {
                    return Err(unsupported(
                        fd.fd,
                        fd.kind.name(),
                        "this kernel has no kcmp (CONFIG_KCMP), so fds sharing an open file cannot be told apart",
                    ))
                }
            }
        }
        Ok(None)
    }

    fn dump_one(&mut self, index: usize, fd: &Fd) -> Result<FdImage, FilesDumpError> {
        let n = fd.fd;
        let kind_name = fd.kind.name();
        let (text, path) = self.fdinfo(n)?;
        let header = parse_fdinfo_header(&text).map_err(|source| FilesDumpError::Parse {
            fd: n,
            path,
            source,
        })?;
        let cloexec = header.flags & libc::O_CLOEXEC as u32 != 0;
        let (file, _) = self.file(n);
        let flags =
            os::fcntl_int(file, libc::F_GETFL, 0).map_err(sys(n, kind_name, "F_GETFL"))? as u32;
        if flags & libc::O_ASYNC as u32 != 0 {
            return Err(unsupported(
                n,
                kind_name,
                "O_ASYNC (signal-driven I/O) is set; its owner and signal are not migrated",
            ));
        }
        let kind = match self.dup_of(index, fd)? {
            Some(of) => FdKindImage::Dup { of },
            None => self.dump_kind(fd, flags)?,
        };
        Ok(FdImage {
            fd: n,
            cloexec,
            flags,
            kind,
        })
    }

    fn dump_kind(&mut self, fd: &Fd, flags: u32) -> Result<FdKindImage, FilesDumpError> {
        let n = fd.fd;
        let (file, st) = self.file(n);
        let kind_name = fd.kind.name();
        let offset = || os::lseek(file, 0, libc::SEEK_CUR).map_err(sys(n, kind_name, "lseek"));
        Ok(match &fd.kind {
            FdKind::RegularFile { path, deleted, .. } => {
                if flags & libc::O_PATH as u32 != 0 && *deleted {
                    return Err(unsupported(n, kind_name, "O_PATH fd on a deleted file"));
                }
                if *deleted {
                    let size = st.st_size as u64;
                    check_cap(n, &format!("deleted file {path}"), size)?;
                    let content =
                        os::pread_all(file, size as usize).map_err(sys(n, kind_name, "pread"))?;
                    FdKindImage::Deleted {
                        path: path.clone(),
                        offset: offset()?,
                        size,
                        mode: st.st_mode & 0o7777,
                        uid: st.st_uid,
                        gid: st.st_gid,
                        content: Blob(content),
                    }
                } else {
                    let offset = if flags & libc::O_PATH as u32 != 0 {
                        0
                    } else {
                        offset()?
                    };
                    FdKindImage::Regular {
                        path: path.clone(),
                        offset,
                        identity: identity(st),
                    }
                }
            }
            FdKind::Directory { path } => FdKindImage::Directory {
                path: path.clone(),
                offset: if flags & libc::O_PATH as u32 != 0 {
                    0
                } else {
                    offset()?
                },
            },
            FdKind::CharDevice { path, major, minor } => {
                if !STATELESS_DEVICES.contains(&(*major, *minor)) {
                    return Err(unsupported(
                        n,
                        kind_name,
                        format!("character device {path} ({major}:{minor}) may hold state; only null, zero, full, random and urandom are reopened"),
                    ));
                }
                FdKindImage::Device {
                    path: path.clone(),
                    major: *major,
                    minor: *minor,
                }
            }
            FdKind::Pipe { inode } => {
                let end = match flags as i32 & libc::O_ACCMODE {
                    libc::O_RDONLY => PipeEnd::Read,
                    libc::O_WRONLY => PipeEnd::Write,
                    _ => return Err(inconsistent(n, kind_name, "a pipe end open read-write")),
                };
                let (pipe_size, data) =
                    self.pipe_data(n, kind_name, *inode, end == PipeEnd::Read)?;
                FdKindImage::Pipe {
                    id: *inode,
                    end,
                    pipe_size,
                    data,
                }
            }
            FdKind::Fifo { path, inode } => {
                let readable = flags as i32 & libc::O_ACCMODE != libc::O_WRONLY;
                let (pipe_size, data) = self.pipe_data(n, kind_name, *inode, readable)?;
                FdKindImage::Fifo {
                    path: path.clone(),
                    id: *inode,
                    pipe_size,
                    data,
                }
            }
            FdKind::Eventfd { .. } => match self.parse(n, parse_eventfd)? {
                FdKind::Eventfd {
                    count, semaphore, ..
                } => FdKindImage::Eventfd {
                    count,
                    semaphore: semaphore.unwrap_or(false),
                },
                _ => unreachable!("parse_eventfd returns an eventfd"),
            },
            FdKind::Epoll { .. } => match self.parse(n, parse_epoll)? {
                FdKind::Epoll { targets } => FdKindImage::Epoll {
                    targets: self.epoll_targets(n, &targets)?,
                },
                _ => unreachable!("parse_epoll returns an epoll"),
            },
            FdKind::Signalfd { .. } => match self.parse(n, parse_signalfd)? {
                FdKind::Signalfd { sigmask } => FdKindImage::Signalfd { sigmask },
                _ => unreachable!("parse_signalfd returns a signalfd"),
            },
            FdKind::Timerfd(_) => {
                let FdKind::Timerfd(state) = self.parse(n, parse_timerfd)? else {
                    unreachable!("parse_timerfd returns a timerfd")
                };
                let now =
                    os::timerfd_gettime(file).map_err(sys(n, kind_name, "timerfd_gettime"))?;
                let value = timespec(now.it_value);
                let realtime = matches!(
                    state.clockid,
                    libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_ALARM
                );
                let realtime_deadline = if realtime
                    && state.settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0
                    && !value.is_zero()
                {
                    let wall = os::clock_now(libc::CLOCK_REALTIME).map_err(sys(
                        n,
                        kind_name,
                        "clock_gettime",
                    ))?;
                    Some(TimeSpec::from_nanos(
                        timespec(wall).as_nanos() + value.as_nanos(),
                    ))
                } else {
                    None
                };
                FdKindImage::Timerfd {
                    clockid: state.clockid,
                    settime_flags: state.settime_flags,
                    value,
                    interval: timespec(now.it_interval),
                    ticks: state.ticks,
                    realtime_deadline,
                }
            }
            FdKind::Memfd { name, .. } => {
                let size = st.st_size as u64;
                check_cap(n, &format!("memfd {name}"), size)?;
                let content =
                    os::pread_all(file, size as usize).map_err(sys(n, kind_name, "pread"))?;
                let seals = os::fcntl_int(file, libc::F_GET_SEALS, 0).map_err(sys(
                    n,
                    kind_name,
                    "F_GET_SEALS",
                ))? as u32;
                FdKindImage::Memfd {
                    name: name.clone(),
                    offset: offset()?,
                    size,
                    seals,
                    content: Blob(content),
                }
            }
            FdKind::Socket { inode, socket } => self.dump_socket(n, *inode, socket)?,
            FdKind::Inotify { .. } => {
                return Err(unsupported(
                    n,
                    kind_name,
                    "inotify watches and queued events cannot be checkpointed",
                ))
            }
            FdKind::Fanotify => {
                return Err(unsupported(
                    n,
                    kind_name,
                    "fanotify marks and queued events cannot be checkpointed",
                ))
            }
            FdKind::IoUring => {
                return Err(unsupported(
                    n,
                    kind_name,
                    "io_uring rings and in-flight requests cannot be checkpointed",
                ))
            }
            FdKind::BlockDevice { path, .. } => {
                return Err(unsupported(
                    n,
                    kind_name,
                    format!("block device {path} is local to this host"),
                ))
            }
            FdKind::AnonInodeOther { name } => {
                return Err(unsupported(
                    n,
                    kind_name,
                    format!("anonymous inode '{name}'"),
                ))
            }
            FdKind::Unknown => {
                return Err(unsupported(
                    n,
                    kind_name,
                    format!("unrecognised file '{}'", fd.link),
                ))
            }
        })
    }

    /// Pipe size and, on the first fd of the pipe, its buffered bytes (tee'd, not consumed).
    fn pipe_data(
        &mut self,
        n: i32,
        kind: &'static str,
        id: u64,
        readable: bool,
    ) -> Result<(u32, Option<Blob>), FilesDumpError> {
        let (file, _) = self.file(n);
        let pipe_size =
            os::fcntl_int(file, libc::F_GETPIPE_SZ, 0).map_err(sys(n, kind, "F_GETPIPE_SZ"))?
                as u32;
        if !self.pipes_seen.insert(id) {
            return Ok((pipe_size, None));
        }
        // tee needs a readable end: reopen the pipe for reading when the process holds only the
        // write end (O_NONBLOCK: a FIFO open must not wait for a writer).
        let reopened;
        let reader = if readable {
            file
        } else {
            let path = format!("/proc/{}/fd/{n}", self.pid);
            reopened = os::open(Path::new(&path), libc::O_RDONLY | libc::O_NONBLOCK, 0)
                .map_err(sys(n, kind, "reopening the pipe for reading"))?;
            reopened.as_fd()
        };
        let data = os::peek_pipe(reader, pipe_size).map_err(|e| match e {
            os::PeekPipeError::Sys(what, errno) => FilesDumpError::Syscall {
                fd: n,
                kind,
                what,
                errno,
            },
            os::PeekPipeError::Short { queued, copied } => FilesDumpError::Inconsistent {
                fd: n,
                kind,
                reason: format!("tee copied {copied} of {queued} buffered bytes"),
            },
        })?;
        Ok((pipe_size, Some(Blob(data))))
    }

    fn epoll_targets(
        &self,
        n: i32,
        targets: &[crate::proc::fd::EpollTarget],
    ) -> Result<Vec<EpollTargetImage>, FilesDumpError> {
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            if !self.stolen.contains_key(&t.tfd) {
                return Err(unsupported(
                    n,
                    "epoll",
                    format!("it watches fd {} which the process no longer has open (closed after a dup)", t.tfd),
                ));
            }
            let same = os::epoll_target_is_fd(self.pid, n, t.tfd).map_err(sys(
                n,
                "epoll",
                "kcmp(KCMP_EPOLL_TFD)",
            ))?;
            // None: no kcmp on this kernel; the fd list check above is all we can do.
            if same == Some(false) {
                return Err(unsupported(
                    n,
                    "epoll",
                    format!(
                        "its registration for fd {} is for a file that is no longer fd {}",
                        t.tfd, t.tfd
                    ),
                ));
            }
            out.push(EpollTargetImage {
                tfd: t.tfd,
                events: t.events,
                data: t.data,
            });
        }
        Ok(out)
    }

    fn dump_socket(
        &mut self,
        n: i32,
        inode: u64,
        socket: &SocketKind,
    ) -> Result<FdKindImage, FilesDumpError> {
        let (file, _) = self.file(n);
        let kind = "socket";
        let domain = os::getsockopt_int(file, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(sys(
            n,
            kind,
            "getsockopt(SO_DOMAIN)",
        ))?;
        let socket_type = os::getsockopt_int(file, libc::SOL_SOCKET, libc::SO_TYPE)
            .map_err(sys(n, kind, "getsockopt(SO_TYPE)"))?;
        match domain {
            libc::AF_UNIX => self.dump_unix(n, inode, socket_type, socket),
            libc::AF_INET | libc::AF_INET6 => {
                let family = if domain == libc::AF_INET {
                    InetFamily::Inet
                } else {
                    InetFamily::Inet6
                };
                let protocol = os::getsockopt_int(file, libc::SOL_SOCKET, libc::SO_PROTOCOL)
                    .map_err(sys(n, kind, "getsockopt(SO_PROTOCOL)"))?;
                match (socket_type, protocol) {
                    (libc::SOCK_STREAM, libc::IPPROTO_TCP) => dump_tcp(n, file, family),
                    (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => dump_udp(n, file, family),
                    _ => Err(unsupported(
                        n,
                        kind,
                        format!("inet socket of type {socket_type} protocol {protocol}: only TCP and UDP are migrated"),
                    )),
                }
            }
            other => Err(unsupported(
                n,
                kind,
                format!("socket family {other}: only unix, TCP and UDP sockets are migrated"),
            )),
        }
    }

    fn dump_unix(
        &mut self,
        n: i32,
        inode: u64,
        raw_type: i32,
        socket: &SocketKind,
    ) -> Result<FdKindImage, FilesDumpError> {
        let kind = "unix-socket";
        if let SocketKind::Unix(unix) = socket {
            if unix.listening || unix.path.is_some() {
                return Err(unsupported(
                    n,
                    kind,
                    format!(
                        "bound{} unix socket {}: only socketpairs are migrated yet",
                        if unix.listening { " listening" } else { "" },
                        unix.path.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
        let socket_type = UnixSocketType::from_raw(raw_type)
            .ok_or_else(|| unsupported(n, kind, format!("unix socket of type {raw_type}")))?;
        if self.netlink.is_none() {
            self.netlink = Some(os::sock_diag_socket_for(self.pid).map_err(sys(
                n,
                kind,
                "opening a sock_diag socket in the target's netns",
            ))?);
        }
        let netlink = self.netlink.as_ref().expect("just opened").as_fd();
        let peer = os::unix_peer_inode(netlink, inode)
            .map_err(sys(n, kind, "sock_diag lookup of the peer"))?
            .ok_or_else(|| {
                unsupported(
                    n,
                    kind,
                    "unconnected unix socket: only socketpairs are migrated yet",
                )
            })?;
        let peer_fd = *self.socket_fds.get(&peer).ok_or_else(|| {
            unsupported(
                n,
                kind,
                format!("its peer (socket inode {peer}) is held outside this process and would be disconnected"),
            )
        })?;
        let (file, _) = self.file(n);
        let (peer_file, _) = self.file(peer_fd);
        let sndbuf = buf_size(n, file, libc::SO_SNDBUF)?;
        let rcvbuf = buf_size(n, file, libc::SO_RCVBUF)?;
        // A datagram is at most the sender's SO_SNDBUF - 32; a stream peek is bounded by its
        // queue anyway.
        let cap = (buf_size(n, peer_file, libc::SO_SNDBUF)? as usize)
            .max(rcvbuf as usize)
            .max(64 << 10);
        let queue = os::peek_socket_queue(file, socket_type == UnixSocketType::Stream, cap)
            .map_err(|e| match e {
                os::PeekQueueError::Sys(what, errno) => FilesDumpError::Syscall {
                    fd: n,
                    kind,
                    what,
                    errno,
                },
                os::PeekQueueError::FdsInFlight => unsupported(
                    n,
                    kind,
                    "its queue carries file descriptors in flight (SCM_RIGHTS)",
                ),
                os::PeekQueueError::Truncated => FilesDumpError::Inconsistent {
                    fd: n,
                    kind,
                    reason: format!("a queued message is larger than {cap} bytes"),
                },
            })?;
        Ok(FdKindImage::UnixPair {
            pair: inode.min(peer),
            socket_type,
            side: if inode < peer {
                PairSide::A
            } else {
                PairSide::B
            },
            queue: queue.into_iter().map(Blob).collect(),
            sndbuf,
            rcvbuf,
        })
    }
}

fn check_cap(fd: i32, what: &str, size: u64) -> Result<(), FilesDumpError> {
    if size > MAX_CARRIED_CONTENT {
        return Err(FilesDumpError::TooLarge {
            fd,
            what: what.to_owned(),
            size,
            cap: MAX_CARRIED_CONTENT,
        });
    }
    Ok(())
}

fn inconsistent(fd: i32, kind: &'static str, reason: &str) -> FilesDumpError {
    FilesDumpError::Inconsistent {
        fd,
        kind,
        reason: reason.to_owned(),
    }
}

fn identity(st: &libc::stat) -> FileIdentity {
    FileIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec,
    }
}

fn timespec(ts: libc::timespec) -> TimeSpec {
    TimeSpec {
        sec: ts.tv_sec,
        nsec: ts.tv_nsec,
    }
}

fn buf_size(n: i32, file: BorrowedFd<'_>, name: i32) -> Result<u32, FilesDumpError> {
    os::getsockopt_int(file, libc::SOL_SOCKET, name)
        .map(|v| v.max(0) as u32)
        .map_err(sys(n, "socket", "getsockopt(SO_SNDBUF/SO_RCVBUF)"))
}

fn inet_addr(addr: SocketAddr) -> InetAddr {
    let scope_id = match addr {
        SocketAddr::V6(a) => a.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    InetAddr {
        address: addr.ip().to_string(),
        port: addr.port(),
        scope_id,
    }
}

/// The local address, None when the socket was never bound (port 0 on the wildcard address).
fn bound_address(n: i32, file: BorrowedFd<'_>) -> Result<Option<InetAddr>, FilesDumpError> {
    let local = os::getsockname(file).map_err(sys(n, "socket", "getsockname"))?;
    Ok(local
        .filter(|a| a.port() != 0 || !a.ip().is_unspecified())
        .map(inet_addr))
}

fn inet_options(
    n: i32,
    file: BorrowedFd<'_>,
    family: InetFamily,
    tcp: bool,
) -> Result<SocketOptions, FilesDumpError> {
    let get =
        |level, name, what| os::getsockopt_int(file, level, name).map_err(sys(n, "socket", what));
    Ok(SocketOptions {
        reuseaddr: get(
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            "getsockopt(SO_REUSEADDR)",
        )? != 0,
        reuseport: get(
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            "getsockopt(SO_REUSEPORT)",
        )? != 0,
        keepalive: get(
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            "getsockopt(SO_KEEPALIVE)",
        )? != 0,
        broadcast: get(
            libc::SOL_SOCKET,
            libc::SO_BROADCAST,
            "getsockopt(SO_BROADCAST)",
        )? != 0,
        nodelay: if tcp {
            Some(
                get(
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    "getsockopt(TCP_NODELAY)",
                )? != 0,
            )
        } else {
            None
        },
        v6only: if family == InetFamily::Inet6 {
            Some(
                get(
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    "getsockopt(IPV6_V6ONLY)",
                )? != 0,
            )
        } else {
            None
        },
        sndbuf: buf_size(n, file, libc::SO_SNDBUF)?,
        rcvbuf: buf_size(n, file, libc::SO_RCVBUF)?,
    })
}

const TCP_CLOSE: u8 = 7;

fn dump_tcp(
    n: i32,
    file: BorrowedFd<'_>,
    family: InetFamily,
) -> Result<FdKindImage, FilesDumpError> {
    let info = os::tcp_info(file).map_err(sys(n, "tcp", "getsockopt(TCP_INFO)"))?;
    let listening = os::getsockopt_int(file, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
        .map_err(sys(n, "tcp", "getsockopt(SO_ACCEPTCONN)"))?
        != 0;
    let options = inet_options(n, file, family, true)?;
    if listening {
        let local = bound_address(n, file)?
            .ok_or_else(|| inconsistent(n, "tcp", "a listening socket without a local address"))?;
        // Connections the kernel accepted but the process has not accept()ed yet are sockets
        // no fd holds: they cannot be carried, and dropping them would reset their clients.
        // (tcpi_unacked of a listener is its accept queue length.)
        if info.unacked > 0 {
            return Err(unsupported(
                n,
                "tcp",
                format!(
                    "listening socket {local} has {} connection(s) in its accept queue, accepted by the kernel but not yet by the process: they cannot be carried; retry when the process has accepted them",
                    info.unacked
                ),
            ));
        }
        return Ok(FdKindImage::TcpListen {
            family,
            local,
            backlog: info.sacked,
            options,
            pending: info.unacked,
        });
    }
    if info.state == TCP_CLOSE {
        return Ok(FdKindImage::TcpClosed {
            family,
            local: bound_address(n, file)?,
            options,
        });
    }
    if crate::image::fd::TcpConnState::from_code(info.state).is_none() {
        return Err(unsupported(
            n,
            "tcp",
            format!("TCP {}", super::tcp::refused_state(info.state)),
        ));
    }
    let local = os::getsockname(file)
        .map_err(sys(n, "tcp", "getsockname"))?
        .map(inet_addr)
        .ok_or_else(|| inconsistent(n, "tcp", "a connected socket without a local address"))?;
    let peer = os::getpeername(file)
        .map_err(sys(n, "tcp", "getpeername"))?
        .map(inet_addr)
        .ok_or_else(|| inconsistent(n, "tcp", "a connected socket without a peer"))?;
    // ESTABLISHED and the half-closed states; the others are refused with their reason.
    let repair = super::tcp::dump_connection(file)
        .map_err(|e| unsupported(n, "tcp", format!("TCP repair of {local} <-> {peer}: {e}")))?;
    Ok(FdKindImage::TcpEstablished {
        family,
        local,
        peer,
        options,
        repair,
    })
}

fn dump_udp(
    n: i32,
    file: BorrowedFd<'_>,
    family: InetFamily,
) -> Result<FdKindImage, FilesDumpError> {
    let peer = os::getpeername(file)
        .map_err(sys(n, "udp", "getpeername"))?
        .map(inet_addr);
    Ok(FdKindImage::Udp {
        family,
        local: bound_address(n, file)?,
        peer,
        options: inet_options(n, file, family, false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_fd_and_reason() {
        let e = unsupported(7, "socket", "its peer is outside");
        assert_eq!(
            e.to_string(),
            "fd 7 (socket) cannot be migrated: its peer is outside"
        );
        let e = FilesDumpError::TooLarge {
            fd: 4,
            what: "deleted file /tmp/x".into(),
            size: 70 << 20,
            cap: MAX_CARRIED_CONTENT,
        };
        assert!(e
            .to_string()
            .contains("fd 4: deleted file /tmp/x holds 73400320 bytes"));
        assert!(check_cap(1, "x", MAX_CARRIED_CONTENT).is_ok());
        assert!(check_cap(1, "x", MAX_CARRIED_CONTENT + 1).is_err());
    }
}
