//! Recreate side: build every file object of an image in the destination agent (sequence per
//! kind: [`super`]). Everything created is an [`OwnedFd`]: on any error, what was built so far is
//! closed by the return (nothing leaks; a deleted file's temporary name is unlinked at once).

use super::{fixups_for, os, FdFixup};
use crate::image::fd::{
    FdImage, FdKindImage, FileIdentity, InetAddr, InetFamily, PairSide, PipeEnd, SocketOptions,
    TimeSpec,
};
use crate::sys::Errno;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

/// How strict the destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecreateOptions {
    /// Also require the same device and inode for regular files (true when source and
    /// destination share the filesystem, as lab hosts do; false across real hosts, where only
    /// size and mtime can match).
    pub check_inode: bool,
}

impl Default for RecreateOptions {
    fn default() -> Self {
        RecreateOptions { check_inode: true }
    }
}

/// One recreated descriptor, to be placed at `target_fd` by the stub.
#[derive(Debug)]
pub struct RecreatedFd {
    pub target_fd: i32,
    /// Close-on-exec here in the agent; the stub's dup2 clears it, and the stub sets FD_CLOEXEC
    /// on `target_fd` when this is true.
    pub fd: OwnedFd,
    pub cloexec: bool,
}

/// What [`recreate_fds`] built: fds in image order and the post-placement plan.
#[derive(Debug)]
pub struct RecreatedFds {
    pub fds: Vec<RecreatedFd>,
    /// Run by the stub after every fd is at its number (see [`super`] for the encoding).
    pub fixups: Vec<FdFixup>,
}

/// A failure recreating fds.
#[derive(Debug, thiserror::Error)]
pub enum FilesRestoreError {
    #[error("fd {fd}: {path} is missing on the destination")]
    Missing { fd: i32, path: String },
    #[error("fd {fd}: {path} changed since the dump: {what}")]
    FileChanged { fd: i32, path: String, what: String },
    #[error("fd {fd}: {path} is not the device {major}:{minor} it was on the source")]
    DeviceMismatch {
        fd: i32,
        path: String,
        major: u32,
        minor: u32,
    },
    #[error("fd {fd} ({kind}): address {address} is already in use on the destination")]
    AddressInUse {
        fd: i32,
        kind: &'static str,
        address: String,
    },
    #[error("fd {fd}: FIFO {path} already holds {queued} bytes that are not the dumped data")]
    FifoBusy {
        fd: i32,
        path: String,
        queued: usize,
    },
    #[error("fd {fd} ({kind}): {what} failed: {errno}")]
    Syscall {
        fd: i32,
        kind: &'static str,
        what: String,
        errno: Errno,
    },
    #[error("fd {fd}: invalid image: {reason}")]
    InvalidImage { fd: i32, reason: String },
    #[error("fd {fd} (tcp): TCP repair of {local} <-> {peer}: {source}")]
    TcpRepair {
        fd: i32,
        local: String,
        peer: String,
        #[source]
        source: Box<super::tcp::TcpRestoreError>,
    },
}

fn sys(
    fd: i32,
    kind: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(Errno) -> FilesRestoreError {
    let what = what.into();
    move |errno| FilesRestoreError::Syscall {
        fd,
        kind,
        what,
        errno,
    }
}

fn invalid(fd: i32, reason: impl Into<String>) -> FilesRestoreError {
    FilesRestoreError::InvalidImage {
        fd,
        reason: reason.into(),
    }
}

/// Status flags F_SETFL can change (O_ASYNC is refused at dump).
const SETFL_MASK: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME;
/// Flags given to open(2) when reopening by path (F_SETFL cannot set the O_SYNC family).
const OPEN_MASK: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_LARGEFILE
    | libc::O_PATH;

/// Recreates every fd of `images` in this process (the destination agent, in the destination's
/// namespaces). Errors name the fd and, for files, the path.
pub fn recreate_fds(
    images: &[FdImage],
    opts: &RecreateOptions,
) -> Result<RecreatedFds, FilesRestoreError> {
    validate(images)?;
    let mut builder = Builder {
        images,
        opts,
        built: Vec::with_capacity(images.len()),
        index: HashMap::new(),
        pipes: HashMap::new(),
        pairs: HashMap::new(),
        fifos_filled: HashSet::new(),
    };
    for image in images {
        let fd = builder.build(image)?;
        if !matches!(image.kind, FdKindImage::Dup { .. }) {
            apply_status_flags(image, fd.as_fd())?;
        }
        builder.index.insert(image.fd, builder.built.len());
        builder.built.push(RecreatedFd {
            target_fd: image.fd,
            fd,
            cloexec: image.cloexec,
        });
    }
    Ok(RecreatedFds {
        fds: builder.built,
        fixups: fixups_for(images),
    })
}

/// Unique fd numbers, Dup targets earlier in the list, epoll targets present.
fn validate(images: &[FdImage]) -> Result<(), FilesRestoreError> {
    let mut seen = HashSet::new();
    for image in images {
        if image.fd < 0 || !seen.insert(image.fd) {
            return Err(invalid(image.fd, "fd number negative or listed twice"));
        }
        if let FdKindImage::Dup { of } = image.kind {
            if !seen.contains(&of) || of == image.fd {
                return Err(invalid(
                    image.fd,
                    format!("dup of fd {of}, which is not listed before it"),
                ));
            }
        }
    }
    for image in images {
        if let FdKindImage::Epoll { targets } = &image.kind {
            if let Some(t) = targets.iter().find(|t| !seen.contains(&t.tfd)) {
                return Err(invalid(
                    image.fd,
                    format!("epoll target fd {} is not in the image", t.tfd),
                ));
            }
        }
    }
    Ok(())
}

fn apply_status_flags(image: &FdImage, fd: BorrowedFd<'_>) -> Result<(), FilesRestoreError> {
    if image.flags & libc::O_PATH as u32 != 0 {
        return Ok(());
    }
    let kind = image.kind.name();
    let current = os::fcntl_int(fd, libc::F_GETFL, 0).map_err(sys(image.fd, kind, "F_GETFL"))?;
    let wanted = image.flags as i32 & SETFL_MASK;
    if current & SETFL_MASK != wanted {
        os::fcntl_int(fd, libc::F_SETFL, (current & !SETFL_MASK) | wanted).map_err(sys(
            image.fd,
            kind,
            format!("F_SETFL({wanted:#o})"),
        ))?;
    }
    Ok(())
}

/// Both ends of a recreated pipe; an end is handed out once, then reopened by /proc/self/fd.
struct PipeEnds {
    read: Option<OwnedFd>,
    write: Option<OwnedFd>,
    read_raw: RawFd,
    write_raw: RawFd,
}

struct Builder<'a> {
    images: &'a [FdImage],
    opts: &'a RecreateOptions,
    built: Vec<RecreatedFd>,
    index: HashMap<i32, usize>,
    pipes: HashMap<u64, PipeEnds>,
    /// Socketpairs by pair id: the side not handed out yet.
    pairs: HashMap<u64, [Option<OwnedFd>; 2]>,
    fifos_filled: HashSet<u64>,
}

fn side_index(side: PairSide) -> usize {
    match side {
        PairSide::A => 0,
        PairSide::B => 1,
    }
}

impl Builder<'_> {
    fn build(&mut self, image: &FdImage) -> Result<OwnedFd, FilesRestoreError> {
        let n = image.fd;
        let kind = image.kind.name();
        let accmode = image.flags as i32 & libc::O_ACCMODE;
        match &image.kind {
            FdKindImage::Dup { of } => {
                let original = &self.built[self.index[of]].fd;
                original
                    .try_clone()
                    .map_err(|e| FilesRestoreError::Syscall {
                        fd: n,
                        kind,
                        what: format!("dup of fd {of}"),
                        errno: Errno(e.raw_os_error().unwrap_or(libc::EIO)),
                    })
            }
            FdKindImage::Regular {
                path,
                offset,
                identity,
            } => {
                let st = stat_existing(n, path)?;
                self.compare(n, path, identity, &st)?;
                let mut flags = image.flags as i32 & OPEN_MASK;
                if flags & libc::O_PATH == 0 {
                    flags |= libc::O_NOFOLLOW;
                }
                let file = os::open(Path::new(path), flags, 0).map_err(|errno| match errno {
                    Errno(libc::ENOENT) => FilesRestoreError::Missing {
                        fd: n,
                        path: path.clone(),
                    },
                    errno => sys(n, kind, format!("open {path}"))(errno),
                })?;
                let st = os::fstat(file.as_fd()).map_err(sys(n, kind, "fstat"))?;
                self.compare(n, path, identity, &st)?;
                if flags & libc::O_PATH == 0 {
                    seek(n, kind, file.as_fd(), *offset)?;
                }
                Ok(file)
            }
            FdKindImage::Deleted {
                path,
                offset,
                size,
                mode,
                uid,
                gid,
                content,
            } => {
                let file = create_ghost(n, path, *mode)?;
                let f = file.as_fd();
                os::pwrite_all(f, &content.0, 0).map_err(sys(n, kind, "writing the content"))?;
                os::ftruncate(f, *size).map_err(sys(n, kind, "ftruncate"))?;
                os::fchmod(f, *mode).map_err(sys(n, kind, "fchmod"))?;
                os::fchown(f, *uid, *gid).map_err(sys(n, kind, "fchown"))?;
                let file = reopen_if_needed(n, kind, file, accmode)?;
                seek(n, kind, file.as_fd(), *offset)?;
                Ok(file)
            }
            FdKindImage::Directory { path, offset } => {
                let flags = (image.flags as i32 & (libc::O_PATH | libc::O_ACCMODE))
                    | libc::O_DIRECTORY
                    | libc::O_NOFOLLOW;
                let dir = os::open(Path::new(path), flags, 0).map_err(|errno| match errno {
                    Errno(libc::ENOENT) => FilesRestoreError::Missing {
                        fd: n,
                        path: path.clone(),
                    },
                    errno => sys(n, kind, format!("open {path}"))(errno),
                })?;
                if *offset != 0 && flags & libc::O_PATH == 0 {
                    seek(n, kind, dir.as_fd(), *offset)?;
                }
                Ok(dir)
            }
            FdKindImage::Device { path, major, minor } => {
                let dev = os::open(Path::new(path), image.flags as i32 & OPEN_MASK, 0).map_err(
                    |errno| match errno {
                        Errno(libc::ENOENT) => FilesRestoreError::Missing {
                            fd: n,
                            path: path.clone(),
                        },
                        errno => sys(n, kind, format!("open {path}"))(errno),
                    },
                )?;
                let st = os::fstat(dev.as_fd()).map_err(sys(n, kind, "fstat"))?;
                let (ma, mi) = crate::proc::fd::dev_major_minor(st.st_rdev);
                if st.st_mode & libc::S_IFMT != libc::S_IFCHR || (ma, mi) != (*major, *minor) {
                    return Err(FilesRestoreError::DeviceMismatch {
                        fd: n,
                        path: path.clone(),
                        major: *major,
                        minor: *minor,
                    });
                }
                Ok(dev)
            }
            FdKindImage::Pipe {
                id,
                end,
                pipe_size,
                data,
            } => self.pipe_end(n, *id, *end, *pipe_size, data.as_ref().map(|d| &d.0[..])),
            FdKindImage::Fifo {
                path,
                id,
                pipe_size,
                data,
            } => self.fifo(
                n,
                image.flags as i32,
                path,
                *id,
                *pipe_size,
                data.as_ref().map(|d| &d.0[..]),
            ),
            FdKindImage::Eventfd { count, semaphore } => {
                let flags = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
                let efd =
                    os::eventfd(flags | libc::EFD_NONBLOCK).map_err(sys(n, kind, "eventfd"))?;
                if *count > 0 {
                    let written = os::write(efd.as_fd(), &count.to_ne_bytes()).map_err(sys(
                        n,
                        kind,
                        format!("writing the count {count}"),
                    ))?;
                    if written != 8 {
                        return Err(invalid(n, "short eventfd write"));
                    }
                }
                Ok(efd)
            }
            FdKindImage::Epoll { .. } => os::epoll_create().map_err(sys(n, kind, "epoll_create1")),
            FdKindImage::Signalfd { sigmask } => {
                os::signalfd(*sigmask, 0).map_err(sys(n, kind, format!("signalfd({sigmask:#x})")))
            }
            FdKindImage::Timerfd {
                clockid,
                settime_flags,
                value,
                interval,
                ticks,
                realtime_deadline,
            } => rebuild_timer(
                n,
                *clockid,
                *settime_flags,
                *value,
                *interval,
                *ticks,
                *realtime_deadline,
            ),
            FdKindImage::Memfd {
                name,
                offset,
                size,
                seals,
                content,
            } => {
                let memfd = os::memfd_create(name, libc::MFD_ALLOW_SEALING).map_err(sys(
                    n,
                    kind,
                    format!("memfd_create({name})"),
                ))?;
                os::pwrite_all(memfd.as_fd(), &content.0, 0).map_err(sys(
                    n,
                    kind,
                    "writing the content",
                ))?;
                os::ftruncate(memfd.as_fd(), *size).map_err(sys(n, kind, "ftruncate"))?;
                // Seals need a writable fd: add them before any read-only reopen.
                if *seals != 0 {
                    os::fcntl_int(memfd.as_fd(), libc::F_ADD_SEALS, *seals as i32).map_err(sys(
                        n,
                        kind,
                        format!("F_ADD_SEALS({seals:#x})"),
                    ))?;
                }
                let memfd = reopen_if_needed(n, kind, memfd, accmode)?;
                seek(n, kind, memfd.as_fd(), *offset)?;
                Ok(memfd)
            }
            FdKindImage::UnixPair { pair, side, .. } => self.unix_side(n, *pair, *side),
            FdKindImage::TcpListen {
                family,
                local,
                backlog,
                options,
                ..
            } => {
                let s = inet_socket(
                    n,
                    kind,
                    *family,
                    libc::SOCK_STREAM,
                    libc::IPPROTO_TCP,
                    options,
                )?;
                bind(n, kind, s.as_fd(), local)?;
                os::listen(s.as_fd(), i32::try_from(*backlog).unwrap_or(i32::MAX)).map_err(sys(
                    n,
                    kind,
                    format!("listen({backlog})"),
                ))?;
                Ok(s)
            }
            FdKindImage::TcpClosed {
                family,
                local,
                options,
            } => {
                let s = inet_socket(
                    n,
                    kind,
                    *family,
                    libc::SOCK_STREAM,
                    libc::IPPROTO_TCP,
                    options,
                )?;
                if let Some(local) = local {
                    bind(n, kind, s.as_fd(), local)?;
                }
                Ok(s)
            }
            FdKindImage::TcpEstablished {
                family,
                local,
                peer,
                options,
                repair,
            } => {
                let s = inet_socket(
                    n,
                    kind,
                    *family,
                    libc::SOCK_STREAM,
                    libc::IPPROTO_TCP,
                    options,
                )?;
                let local_addr = socket_addr(n, local)?;
                let peer_addr = socket_addr(n, peer)?;
                super::tcp::restore_connection(
                    &s,
                    &local_addr,
                    &peer_addr,
                    options.reuseaddr,
                    repair,
                )
                .map_err(|source| FilesRestoreError::TcpRepair {
                    fd: n,
                    local: local.to_string(),
                    peer: peer.to_string(),
                    source: Box::new(source),
                })?;
                Ok(s)
            }
            FdKindImage::Udp {
                family,
                local,
                peer,
                options,
            } => {
                let s = inet_socket(
                    n,
                    kind,
                    *family,
                    libc::SOCK_DGRAM,
                    libc::IPPROTO_UDP,
                    options,
                )?;
                if let Some(local) = local {
                    bind(n, kind, s.as_fd(), local)?;
                }
                if let Some(peer) = peer {
                    let addr = socket_addr(n, peer)?;
                    os::connect(s.as_fd(), &addr).map_err(sys(
                        n,
                        kind,
                        format!("connect({peer})"),
                    ))?;
                }
                Ok(s)
            }
        }
    }

    fn compare(
        &self,
        n: i32,
        path: &str,
        want: &FileIdentity,
        st: &libc::stat,
    ) -> Result<(), FilesRestoreError> {
        let changed = |what: String| FilesRestoreError::FileChanged {
            fd: n,
            path: path.to_owned(),
            what,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(changed("it is no longer a regular file".into()));
        }
        if self.opts.check_inode && (st.st_dev, st.st_ino) != (want.dev, want.ino) {
            return Err(changed(format!(
                "inode {}:{} is now {}:{}",
                want.dev, want.ino, st.st_dev, st.st_ino
            )));
        }
        if st.st_size as u64 != want.size {
            return Err(changed(format!("size {} is now {}", want.size, st.st_size)));
        }
        if (st.st_mtime, st.st_mtime_nsec) != (want.mtime_sec, want.mtime_nsec) {
            return Err(changed(format!(
                "mtime {}.{:09} is now {}.{:09}",
                want.mtime_sec, want.mtime_nsec, st.st_mtime, st.st_mtime_nsec
            )));
        }
        Ok(())
    }

    fn pipe_end(
        &mut self,
        n: i32,
        id: u64,
        end: PipeEnd,
        pipe_size: u32,
        data: Option<&[u8]>,
    ) -> Result<OwnedFd, FilesRestoreError> {
        let kind = "pipe";
        match self.pipes.entry(id) {
            Entry::Vacant(vacant) => {
                let (r, w) = os::pipe().map_err(sys(n, kind, "pipe2"))?;
                set_pipe_size(n, kind, w.as_fd(), pipe_size)?;
                if let Some(data) = data {
                    write_all(n, kind, w.as_fd(), data)?;
                }
                vacant.insert(PipeEnds {
                    read_raw: r.as_raw_fd(),
                    write_raw: w.as_raw_fd(),
                    read: Some(r),
                    write: Some(w),
                });
            }
            Entry::Occupied(_) if data.is_some_and(|d| !d.is_empty()) => {
                return Err(invalid(
                    n,
                    format!("pipe {id} carries its data on more than one fd"),
                ));
            }
            Entry::Occupied(_) => {}
        }
        let ends = self.pipes.get_mut(&id).expect("inserted above");
        let (slot, raw, flags) = match end {
            PipeEnd::Read => (&mut ends.read, ends.read_raw, libc::O_RDONLY),
            PipeEnd::Write => (&mut ends.write, ends.write_raw, libc::O_WRONLY),
        };
        match slot.take() {
            Some(fd) => Ok(fd),
            // A second open file description on the same end: a fresh open of the pipe.
            None => os::open(
                Path::new(&format!("/proc/self/fd/{raw}")),
                flags | libc::O_NONBLOCK,
                0,
            )
            .map_err(sys(n, kind, "reopening the pipe end")),
        }
    }

    fn fifo(
        &mut self,
        n: i32,
        flags: i32,
        path: &str,
        id: u64,
        pipe_size: u32,
        data: Option<&[u8]>,
    ) -> Result<OwnedFd, FilesRestoreError> {
        let kind = "fifo";
        let st = stat_existing(n, path)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return Err(FilesRestoreError::FileChanged {
                fd: n,
                path: path.to_owned(),
                what: "it is no longer a FIFO".into(),
            });
        }
        // Reader and writer at once: opening it never blocks, and lets the real open below not
        // block either, whatever its access mode.
        let helper = os::open(Path::new(path), libc::O_RDWR | libc::O_NONBLOCK, 0).map_err(sys(
            n,
            kind,
            format!("open {path} O_RDWR"),
        ))?;
        let fifo = os::open(
            Path::new(path),
            (flags & OPEN_MASK & !libc::O_PATH) | libc::O_NONBLOCK,
            0,
        )
        .map_err(sys(n, kind, format!("open {path}")))?;
        if let Some(data) = data {
            if self.fifos_filled.insert(id) {
                set_pipe_size(n, kind, helper.as_fd(), pipe_size)?;
                let queued = os::fionread(helper.as_fd()).map_err(sys(n, kind, "FIONREAD"))?;
                if queued == 0 {
                    write_all(n, kind, helper.as_fd(), data)?;
                } else {
                    // Someone else still holds the FIFO open with data in it (on one host: the
                    // frozen source). Only exactly our data is acceptable.
                    let present = os::peek_pipe(helper.as_fd(), pipe_size).map_err(|_| {
                        FilesRestoreError::FifoBusy {
                            fd: n,
                            path: path.to_owned(),
                            queued,
                        }
                    })?;
                    if present != data {
                        return Err(FilesRestoreError::FifoBusy {
                            fd: n,
                            path: path.to_owned(),
                            queued,
                        });
                    }
                }
            }
        }
        Ok(fifo)
    }

    fn unix_side(
        &mut self,
        n: i32,
        pair: u64,
        side: PairSide,
    ) -> Result<OwnedFd, FilesRestoreError> {
        let kind = "unix-pair";
        if !self.pairs.contains_key(&pair) {
            let find = |s: PairSide| {
                self.images.iter().find_map(|i| match &i.kind {
                    FdKindImage::UnixPair {
                        pair: p,
                        side: sd,
                        socket_type,
                        queue,
                        sndbuf,
                        rcvbuf,
                    } if *p == pair && *sd == s => Some((*socket_type, queue, *sndbuf, *rcvbuf)),
                    _ => None,
                })
            };
            let (Some(a), Some(b)) = (find(PairSide::A), find(PairSide::B)) else {
                return Err(invalid(
                    n,
                    format!("socketpair {pair} has only one side in the image"),
                ));
            };
            if a.0 != b.0 {
                return Err(invalid(
                    n,
                    format!("socketpair {pair} sides have different types"),
                ));
            }
            let (sa, sb) = os::socketpair(a.0.raw()).map_err(sys(n, kind, "socketpair"))?;
            for (s, (_, _, sndbuf, rcvbuf)) in [(&sa, &a), (&sb, &b)] {
                force_buf(
                    n,
                    kind,
                    s.as_fd(),
                    libc::SO_SNDBUF,
                    libc::SO_SNDBUFFORCE,
                    *sndbuf,
                )?;
                force_buf(
                    n,
                    kind,
                    s.as_fd(),
                    libc::SO_RCVBUF,
                    libc::SO_RCVBUFFORCE,
                    *rcvbuf,
                )?;
            }
            // A side's receive queue is what the other side sent: re-send it from there.
            for (from, queue) in [(&sb, a.1), (&sa, b.1)] {
                for message in queue {
                    let sent = os::send(from.as_fd(), &message.0).map_err(sys(
                        n,
                        kind,
                        format!("re-sending a {}-byte queued message", message.0.len()),
                    ))?;
                    if sent != message.0.len() {
                        return Err(FilesRestoreError::Syscall {
                            fd: n,
                            kind,
                            what: format!(
                                "re-sending queued data ({sent} of {} bytes fit)",
                                message.0.len()
                            ),
                            errno: Errno(libc::EAGAIN),
                        });
                    }
                }
            }
            self.pairs.insert(pair, [Some(sa), Some(sb)]);
        }
        self.pairs
            .get_mut(&pair)
            .and_then(|sides| sides[side_index(side)].take())
            .ok_or_else(|| invalid(n, format!("socketpair {pair} side {side:?} listed twice")))
    }
}

fn stat_existing(n: i32, path: &str) -> Result<libc::stat, FilesRestoreError> {
    os::stat_path(Path::new(path)).map_err(|errno| match errno {
        Errno(libc::ENOENT) | Errno(libc::ENOTDIR) => FilesRestoreError::Missing {
            fd: n,
            path: path.to_owned(),
        },
        errno => sys(n, "file", format!("stat {path}"))(errno),
    })
}

fn seek(
    n: i32,
    kind: &'static str,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> Result<(), FilesRestoreError> {
    let at = os::lseek(fd, offset as i64, libc::SEEK_SET).map_err(sys(
        n,
        kind,
        format!("lseek({offset})"),
    ))?;
    if at != offset {
        return Err(invalid(n, format!("lseek landed at {at}, not {offset}")));
    }
    Ok(())
}

fn write_all(
    n: i32,
    kind: &'static str,
    fd: BorrowedFd<'_>,
    data: &[u8],
) -> Result<(), FilesRestoreError> {
    let mut done = 0;
    while done < data.len() {
        match os::write(fd, &data[done..]) {
            Ok(w) => done += w,
            Err(Errno(libc::EINTR)) => {}
            Err(errno) => {
                return Err(sys(
                    n,
                    kind,
                    format!("writing {} buffered bytes back", data.len()),
                )(errno))
            }
        }
    }
    Ok(())
}

fn set_pipe_size(
    n: i32,
    kind: &'static str,
    fd: BorrowedFd<'_>,
    size: u32,
) -> Result<(), FilesRestoreError> {
    let current = os::fcntl_int(fd, libc::F_GETPIPE_SZ, 0).map_err(sys(n, kind, "F_GETPIPE_SZ"))?;
    if size != 0 && current as u32 != size {
        os::fcntl_int(fd, libc::F_SETPIPE_SZ, size as i32).map_err(sys(
            n,
            kind,
            format!("F_SETPIPE_SZ({size})"),
        ))?;
    }
    Ok(())
}

/// A deleted file's stand-in: created at its old path (O_EXCL) and unlinked at once, or an
/// O_TMPFILE in the same directory when the name is taken.
fn create_ghost(n: i32, path: &str, mode: u32) -> Result<OwnedFd, FilesRestoreError> {
    let kind = "deleted";
    let p = Path::new(path);
    match os::open(
        p,
        libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode & 0o7777,
    ) {
        Ok(file) => {
            os::unlink(p).map_err(sys(n, kind, format!("unlink {path}")))?;
            Ok(file)
        }
        Err(Errno(libc::EEXIST)) => {
            let dir = p.parent().unwrap_or(Path::new("/"));
            os::open(dir, libc::O_RDWR | libc::O_TMPFILE, mode & 0o7777).map_err(
                |errno| match errno {
                    Errno(libc::ENOENT) => FilesRestoreError::Missing {
                        fd: n,
                        path: dir.display().to_string(),
                    },
                    errno => sys(n, kind, format!("O_TMPFILE in {}", dir.display()))(errno),
                },
            )
        }
        Err(Errno(libc::ENOENT)) => Err(FilesRestoreError::Missing {
            fd: n,
            path: p.parent().unwrap_or(Path::new("/")).display().to_string(),
        }),
        Err(errno) => Err(sys(n, kind, format!("creating {path}"))(errno)),
    }
}

/// A file built O_RDWR reopened with the image's access mode (through /proc/self/fd, which works
/// for unlinked files and memfds).
fn reopen_if_needed(
    n: i32,
    kind: &'static str,
    file: OwnedFd,
    accmode: i32,
) -> Result<OwnedFd, FilesRestoreError> {
    if accmode == libc::O_RDWR {
        return Ok(file);
    }
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    os::open(Path::new(&path), accmode, 0).map_err(sys(n, kind, "reopening with the access mode"))
}

fn to_itimerspec(value: TimeSpec, interval: TimeSpec) -> libc::itimerspec {
    libc::itimerspec {
        it_value: libc::timespec {
            tv_sec: value.sec,
            tv_nsec: value.nsec,
        },
        it_interval: libc::timespec {
            tv_sec: interval.sec,
            tv_nsec: interval.nsec,
        },
    }
}

fn rebuild_timer(
    n: i32,
    clockid: i32,
    settime_flags: u32,
    value: TimeSpec,
    interval: TimeSpec,
    ticks: u64,
    realtime_deadline: Option<TimeSpec>,
) -> Result<OwnedFd, FilesRestoreError> {
    let kind = "timerfd";
    let timer =
        os::timerfd_create(clockid).map_err(sys(n, kind, format!("timerfd_create({clockid})")))?;
    let abstime = settime_flags & libc::TFD_TIMER_ABSTIME as u32 != 0;
    if !value.is_zero() {
        let (flags, value) = match (abstime, realtime_deadline) {
            // A wall-clock deadline means the same on every host.
            (true, Some(deadline)) => (settime_flags as i32, deadline),
            // Other clocks differ between hosts: keep the time left, and the flag.
            (true, None) => {
                let now = os::clock_now(clockid).map_err(sys(n, kind, "clock_gettime"))?;
                let now = TimeSpec {
                    sec: now.tv_sec,
                    nsec: now.tv_nsec,
                };
                (
                    libc::TFD_TIMER_ABSTIME,
                    TimeSpec::from_nanos(now.as_nanos() + value.as_nanos()),
                )
            }
            (false, _) => (0, value),
        };
        os::timerfd_settime(timer.as_fd(), flags, &to_itimerspec(value, interval)).map_err(sys(
            n,
            kind,
            "timerfd_settime",
        ))?;
    }
    // After settime, which resets the count.
    if ticks > 0 {
        os::timerfd_set_ticks(timer.as_fd(), ticks).map_err(sys(
            n,
            kind,
            format!("TFD_IOC_SET_TICKS({ticks})"),
        ))?;
    }
    Ok(timer)
}

/// Sets a socket buffer size to `want` (as getsockopt reports it, i.e. doubled) when it differs.
fn force_buf(
    n: i32,
    kind: &'static str,
    fd: BorrowedFd<'_>,
    name: i32,
    force: i32,
    want: u32,
) -> Result<(), FilesRestoreError> {
    let current = os::getsockopt_int(fd, libc::SOL_SOCKET, name).map_err(sys(
        n,
        kind,
        "getsockopt(SO_*BUF)",
    ))?;
    if want == 0 || current as u32 == want {
        return Ok(());
    }
    let half = (want / 2) as i32;
    os::setsockopt_int(fd, libc::SOL_SOCKET, force, half)
        .or_else(|_| os::setsockopt_int(fd, libc::SOL_SOCKET, name, half))
        .map_err(sys(n, kind, format!("setsockopt(SO_*BUF, {half})")))
}

fn inet_socket(
    n: i32,
    kind: &'static str,
    family: InetFamily,
    socket_type: i32,
    protocol: i32,
    options: &SocketOptions,
) -> Result<OwnedFd, FilesRestoreError> {
    let s = os::socket(family.raw(), socket_type, protocol).map_err(sys(n, kind, "socket"))?;
    let f = s.as_fd();
    let set = |level, name, value: bool, what: &str| {
        os::setsockopt_int(f, level, name, i32::from(value)).map_err(sys(
            n,
            kind,
            format!("setsockopt({what})"),
        ))
    };
    if options.reuseaddr {
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, true, "SO_REUSEADDR")?;
    }
    if options.reuseport {
        set(libc::SOL_SOCKET, libc::SO_REUSEPORT, true, "SO_REUSEPORT")?;
    }
    if options.keepalive {
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, true, "SO_KEEPALIVE")?;
    }
    if options.broadcast {
        set(libc::SOL_SOCKET, libc::SO_BROADCAST, true, "SO_BROADCAST")?;
    }
    if let Some(nodelay) = options.nodelay {
        set(libc::IPPROTO_TCP, libc::TCP_NODELAY, nodelay, "TCP_NODELAY")?;
    }
    if let (Some(v6only), InetFamily::Inet6) = (options.v6only, family) {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only, "IPV6_V6ONLY")?;
    }
    force_buf(
        n,
        kind,
        f,
        libc::SO_SNDBUF,
        libc::SO_SNDBUFFORCE,
        options.sndbuf,
    )?;
    force_buf(
        n,
        kind,
        f,
        libc::SO_RCVBUF,
        libc::SO_RCVBUFFORCE,
        options.rcvbuf,
    )?;
    Ok(s)
}

fn socket_addr(n: i32, addr: &InetAddr) -> Result<SocketAddr, FilesRestoreError> {
    os::parse_inet(&addr.address, addr.port, addr.scope_id)
        .ok_or_else(|| invalid(n, format!("{:?} is not an IP address", addr.address)))
}

fn bind(
    n: i32,
    kind: &'static str,
    fd: BorrowedFd<'_>,
    local: &InetAddr,
) -> Result<(), FilesRestoreError> {
    let addr = socket_addr(n, local)?;
    os::bind(fd, &addr).map_err(|errno| match errno {
        Errno(libc::EADDRINUSE) => FilesRestoreError::AddressInUse {
            fd: n,
            kind,
            address: local.to_string(),
        },
        errno => sys(n, kind, format!("bind({local})"))(errno),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fd::{Blob, UnixSocketType};

    fn img(fd: i32, flags: i32, kind: FdKindImage) -> FdImage {
        FdImage {
            fd,
            cloexec: fd % 2 == 0,
            flags: flags as u32,
            kind,
        }
    }

    fn fdinfo(fd: BorrowedFd<'_>) -> String {
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap()
    }

    fn find(r: &RecreatedFds, target: i32) -> BorrowedFd<'_> {
        r.fds
            .iter()
            .find(|f| f.target_fd == target)
            .unwrap()
            .fd
            .as_fd()
    }

    #[test]
    fn synthetic_kinds_recreate() {
        let dir = std::env::temp_dir().join(format!("tern-files-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ghost = dir.join("ghost").to_string_lossy().into_owned();
        let secs = |s| TimeSpec { sec: s, nsec: 0 };
        let wall = os::clock_now(libc::CLOCK_REALTIME).unwrap();
        let images = vec![
            img(
                100,
                libc::O_RDONLY,
                FdKindImage::Eventfd {
                    count: 3,
                    semaphore: true,
                },
            ),
            img(101, libc::O_RDONLY, FdKindImage::Dup { of: 100 }),
            img(
                102,
                libc::O_RDONLY,
                FdKindImage::Memfd {
                    name: "unit".into(),
                    offset: 2,
                    size: 8,
                    seals: (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) as u32,
                    content: Blob(b"abcd".to_vec()),
                },
            ),
            img(
                103,
                libc::O_RDONLY | libc::O_APPEND,
                FdKindImage::Deleted {
                    path: ghost.clone(),
                    offset: 1,
                    size: 3,
                    mode: 0o640,
                    uid: 0,
                    gid: 0,
                    content: Blob(b"xyz".to_vec()),
                },
            ),
            img(
                104,
                libc::O_WRONLY | libc::O_NONBLOCK,
                FdKindImage::Pipe {
                    id: 9,
                    end: PipeEnd::Write,
                    pipe_size: 1 << 16,
                    data: Some(Blob(b"hi".to_vec())),
                },
            ),
            img(
                105,
                libc::O_WRONLY,
                FdKindImage::Pipe {
                    id: 9,
                    end: PipeEnd::Write,
                    pipe_size: 1 << 16,
                    data: None,
                },
            ),
            img(
                106,
                libc::O_RDWR,
                FdKindImage::Timerfd {
                    clockid: libc::CLOCK_REALTIME,
                    settime_flags: libc::TFD_TIMER_ABSTIME as u32,
                    value: secs(5),
                    interval: secs(0),
                    ticks: 0,
                    realtime_deadline: Some(TimeSpec {
                        sec: wall.tv_sec + 5,
                        nsec: wall.tv_nsec,
                    }),
                },
            ),
            img(
                107,
                libc::O_RDWR,
                FdKindImage::Timerfd {
                    clockid: libc::CLOCK_MONOTONIC,
                    settime_flags: libc::TFD_TIMER_ABSTIME as u32,
                    value: secs(7),
                    interval: secs(1),
                    ticks: 4,
                    realtime_deadline: None,
                },
            ),
            img(
                108,
                libc::O_RDWR,
                FdKindImage::UnixPair {
                    pair: 5,
                    socket_type: UnixSocketType::Dgram,
                    side: PairSide::B,
                    queue: vec![Blob(b"one".to_vec()), Blob(b"three".to_vec())],
                    sndbuf: 0,
                    rcvbuf: 0,
                },
            ),
            img(
                109,
                libc::O_RDWR,
                FdKindImage::UnixPair {
                    pair: 5,
                    socket_type: UnixSocketType::Dgram,
                    side: PairSide::A,
                    queue: vec![],
                    sndbuf: 0,
                    rcvbuf: 0,
                },
            ),
        ];
        let r = recreate_fds(&images, &RecreateOptions::default()).unwrap();
        assert_eq!(
            r.fds.iter().map(|f| f.target_fd).collect::<Vec<_>>(),
            (100..110).collect::<Vec<_>>()
        );
        assert!(r.fds.iter().all(|f| f.cloexec == (f.target_fd % 2 == 0)));
        // eventfd: semaphore reads 1 at a time, the dup shares the counter.
        let mut b = [0u8; 8];
        os::read(find(&r, 101), &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 1);
        assert!(fdinfo(find(&r, 100)).contains("eventfd-count:                2"));
        // memfd: content, size, seals, read-only, offset.
        let m = find(&r, 102);
        assert_eq!(os::pread_all(m, 16).unwrap(), b"abcd\0\0\0\0");
        assert_eq!(
            os::fcntl_int(m, libc::F_GET_SEALS, 0).unwrap(),
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK
        );
        assert_eq!(
            os::fcntl_int(m, libc::F_GETFL, 0).unwrap() & libc::O_ACCMODE,
            libc::O_RDONLY
        );
        assert_eq!(os::lseek(m, 0, libc::SEEK_CUR).unwrap(), 2);
        // deleted file: unlinked, content, mode, read-only + O_APPEND, offset.
        let g = find(&r, 103);
        let st = os::fstat(g).unwrap();
        assert_eq!(
            (st.st_nlink, st.st_mode & 0o7777, st.st_size),
            (0, 0o640, 3)
        );
        assert_eq!(os::pread_all(g, 8).unwrap(), b"xyz");
        let fl = os::fcntl_int(g, libc::F_GETFL, 0).unwrap();
        assert_eq!(
            (fl & libc::O_ACCMODE, fl & libc::O_APPEND),
            (libc::O_RDONLY, libc::O_APPEND)
        );
        assert_eq!(os::lseek(g, 0, libc::SEEK_CUR).unwrap(), 1);
        assert!(!Path::new(&ghost).exists());
        // pipe held by its write end only, twice (two descriptions): data is in it, O_NONBLOCK
        // only on the first.
        assert_eq!(os::fionread(find(&r, 104)).unwrap(), 2);
        assert_ne!(
            os::fcntl_int(find(&r, 104), libc::F_GETFL, 0).unwrap() & libc::O_NONBLOCK,
            0
        );
        assert_eq!(
            os::fcntl_int(find(&r, 105), libc::F_GETFL, 0).unwrap() & libc::O_NONBLOCK,
            0
        );
        assert_eq!(
            os::fstat(find(&r, 104)).unwrap().st_ino,
            os::fstat(find(&r, 105)).unwrap().st_ino
        );
        // timers: wall-clock abstime kept absolute; monotonic abstime re-based; ticks restored.
        let t = os::timerfd_gettime(find(&r, 106)).unwrap();
        assert!(
            t.it_value.tv_sec <= 5 && t.it_value.tv_sec >= 3,
            "{}",
            t.it_value.tv_sec
        );
        assert!(fdinfo(find(&r, 106)).contains("settime flags: 01"));
        let info = fdinfo(find(&r, 107));
        assert!(
            info.contains("settime flags: 01") && info.contains("ticks: 4"),
            "{info}"
        );
        let t = os::timerfd_gettime(find(&r, 107)).unwrap();
        assert!(t.it_value.tv_sec <= 7 && t.it_value.tv_sec >= 5 && t.it_interval.tv_sec == 1);
        // dgram pair: B's queue re-sent from A, message boundaries kept.
        let mut buf = [0u8; 16];
        assert_eq!(os::read(find(&r, 108), &mut buf).unwrap(), 3);
        assert_eq!(os::read(find(&r, 108), &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"three");
        assert_eq!(os::fionread(find(&r, 109)).unwrap(), 0);
        drop(r);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn invalid_images_are_refused() {
        let dup_first = vec![img(3, 0, FdKindImage::Dup { of: 4 })];
        assert!(matches!(
            recreate_fds(&dup_first, &RecreateOptions::default()),
            Err(FilesRestoreError::InvalidImage { fd: 3, .. })
        ));
        let twice = vec![
            img(3, 0, FdKindImage::Epoll { targets: vec![] }),
            img(3, 0, FdKindImage::Epoll { targets: vec![] }),
        ];
        assert!(recreate_fds(&twice, &RecreateOptions::default()).is_err());
        let lonely = vec![img(
            5,
            libc::O_RDWR,
            FdKindImage::UnixPair {
                pair: 1,
                socket_type: UnixSocketType::Stream,
                side: PairSide::A,
                queue: vec![],
                sndbuf: 0,
                rcvbuf: 0,
            },
        )];
        let err = recreate_fds(&lonely, &RecreateOptions::default()).unwrap_err();
        assert!(err.to_string().contains("only one side"), "{err}");
        let epoll = vec![img(
            6,
            libc::O_RDWR,
            FdKindImage::Epoll {
                targets: vec![crate::image::fd::EpollTargetImage {
                    tfd: 9,
                    events: 1,
                    data: 0,
                }],
            },
        )];
        assert!(recreate_fds(&epoll, &RecreateOptions::default())
            .unwrap_err()
            .to_string()
            .contains("epoll target fd 9"));
    }
}
