//! Open files: dump every fd of a frozen process into [`FdImage`]s, recreate them on the
//! destination.
//!
//! # Where it runs
//!
//! - [`dump::dump_fds`] runs on the SOURCE while the process is frozen under ptrace. Each fd is
//!   stolen with `pidfd_getfd` (a second reference to the same open file description) and read
//!   from the stolen fd plus /proc/PID/fdinfo. Nothing of the process changes: offsets are read
//!   with `lseek(SEEK_CUR)` and content with `pread`, buffered data is `tee`d or peeked, never
//!   consumed.
//! - [`restore::recreate_fds`] runs in the DESTINATION agent, inside the destination host's
//!   namespaces. It builds every file object and returns the fds with their target numbers plus
//!   the post-placement plan ([`FdFixup`]s). The core's restore sends the fds to tern-stub with
//!   SCM_RIGHTS; the stub dup2()s each to its number, sets FD_CLOEXEC where
//!   [`RecreatedFd::cloexec`] says so and closes everything else; then the fixups run, in order
//!   (see "The post-placement plan" below).
//!
//! # Sequence per kind (dump → recreate)
//!
//! ```text
//! every fd     dump:    pidfd_getfd; fdinfo `flags` → cloexec; F_GETFL → access mode + status
//!                       flags (O_ASYNC refused); fstat ino must equal the inventory's (else the
//!                       inventory is stale); kcmp(KCMP_FILE) against lower fds on the same inode →
//!                       Dup{of} (one open file description, shared offset/flags).
//!              restore: build the object (below), then F_SETFL(status flags) if they differ;
//!                       Dup → dup(2) of the fd already built.
//! regular      dump:    path, lseek(SEEK_CUR) offset, identity (dev, ino, size, mtime) by fstat.
//!              restore: stat path (missing → Missing), compare identity (→ FileChanged), open
//!                       with the access mode + status flags (never O_CREAT/O_TRUNC/O_EXCL,
//!                       O_NOFOLLOW), fstat again (race), lseek(offset).
//! deleted      dump:    fstat size (> 64 MiB → TooLarge), pread content, mode/uid/gid, offset.
//!              restore: create at its old path with O_EXCL (or O_TMPFILE in that directory when
//!                       the name is taken), write content, fchmod/fchown, unlink; reopen through
//!                       /proc/self/fd for a read-only access mode; lseek(offset).
//! directory    dump:    path, offset.             restore: open O_DIRECTORY, lseek.
//! device       dump:    path, major:minor (only null, zero, full, random, urandom).
//!              restore: open path, fstat rdev must match.
//! pipe         dump:    id = inode, end from the access mode, F_GETPIPE_SZ; on the first fd of
//!                       the pipe: FIONREAD bytes are tee(2)d into a temporary pipe of the same
//!                       size (one call, nothing consumed; the read side is reopened through
//!                       /proc/PID/fd when only the write end is held) and read from there.
//!              restore: first fd of the id: pipe2, F_SETPIPE_SZ, write the data back. Each end
//!                       is handed out once; a second description of the same end is a reopen of
//!                       /proc/self/fd/N. Ends the process did not hold are closed.
//! fifo         dump:    as a pipe (data once per id), plus the path.
//!              restore: helper = open(path, O_RDWR|O_NONBLOCK) (never blocks: it is both reader
//!                       and writer), then open(path, flags). Data is written through the helper
//!                       only if the FIFO is empty; a FIFO already holding exactly the data (same
//!                       host, source still holding it open) is left as is; other content → error.
//! eventfd      dump:    fdinfo eventfd-count, eventfd-semaphore.
//!              restore: eventfd(0, EFD_SEMAPHORE?) + write(count).
//! epoll        dump:    fdinfo tfd lines; each target must be an fd of the process that IS the
//!                       registered file (kcmp KCMP_EPOLL_TFD) — a stale registration is refused.
//!              restore: epoll_create1 empty; one FdFixup::EpollAdd per target (needs final fds).
//! signalfd     dump:    fdinfo sigmask.           restore: signalfd4(-1, mask, flags).
//! timerfd      dump:    fdinfo clockid, ticks, settime flags; timerfd_gettime on the stolen fd
//!                       (value = time left, interval). ABSTIME on CLOCK_REALTIME(_ALARM): the wall
//!                       clock deadline = now + value is recorded too.
//!              restore: timerfd_create(clockid); timerfd_settime: realtime abstime → absolute at
//!                       the recorded deadline (CANCEL_ON_SET kept); other abstime → absolute at
//!                       destination now + value (the flag survives, the time left is the same);
//!                       relative → value. Then TFD_IOC_SET_TICKS if expirations were unread
//!                       (settime resets them). Disarmed timers stay disarmed.
//! memfd        dump:    name from the link, fstat size (cap 64 MiB), pread content, F_GET_SEALS,
//!                       offset.
//!              restore: memfd_create(name, MFD_ALLOW_SEALING), pwrite content, ftruncate(size),
//!                       F_ADD_SEALS(seals) (needs a writable fd), then a read-only access mode
//!                       via a /proc/self/fd reopen.
//! unix pair    dump:    SO_TYPE; the peer inode from sock_diag (UDIAG_SHOW_PEER, in the
//!                       target's netns); the peer must be another fd of the process (else
//!                       refused: the other end would break). Receive queue: SO_PEEK_OFF saved,
//!                       set to 0, recvmsg(MSG_PEEK|MSG_DONTWAIT) repeatedly (each peek moves the
//!                       peek offset, so datagrams come one by one and streams continue) until
//!                       EAGAIN, SO_PEEK_OFF put back. In-flight SCM_RIGHTS are refused.
//!              restore: first side of the pair: socketpair(type); SO_SNDBUF/SO_RCVBUF forced to
//!                       the dumped sizes when they differ; each side's queue is re-sent FROM
//!                       THE OTHER side, message by message, in order.
//! tcp listen   dump:    SO_ACCEPTCONN; getsockname; TCP_INFO tcpi_sacked (= max backlog);
//!                       options (SO_REUSEADDR/REUSEPORT/KEEPALIVE, TCP_NODELAY, IPV6_V6ONLY,
//!                       SO_SNDBUF/RCVBUF).
//!              restore: socket, options, bind (EADDRINUSE → AddressInUse), listen(backlog).
//! tcp closed   a TCP socket never connected: socket, options, bind if it was bound.
//! tcp estab.   TCP repair, sequence in [`tcp`]: ESTABLISHED only; half-closed states refused.
//! udp          dump:    getsockname, getpeername, options (+SO_BROADCAST).
//!              restore: socket, options, bind, connect if it had a peer. Queued datagrams are
//!                       not carried (a datagram socket may lose them anyway).
//! ```
//!
//! # The post-placement plan
//!
//! Registrations that the kernel keys on fd NUMBERS must be made after every fd is at its final
//! number: epoll keys each registration on (file, fd number). They are [`FdFixup`]s, plain data,
//! to run in order after all dup2()s and after every fd that is not part of the process was
//! closed. Two ways to run them, both fine:
//!
//! 1. by remote syscall from the tracer once the stub is seized (what tern-stub's protocol allows
//!    today: it places fds from `FdSlot { target, fd_flags }` — `fd_flags` is
//!    [`RecreatedFd::cloexec`] as FD_CLOEXEC — then pauses): EpollAdd is
//!    `epoll_ctl(epfd, EPOLL_CTL_ADD = 1, tfd, ptr)` with `ptr` pointing at a 12-byte PACKED
//!    x86-64 `struct epoll_event { u32 events; u64 data }` written into the target first;
//! 2. by the stub itself, from a message in the fixed binary encoding below ([`encode_fixups`]):
//!    a sequence of [`FIXUP_RECORD_LEN`]-byte little-endian records
//!
//! ```text
//! offset  size  field
//!  0      4     op      u32   1 = EpollAdd
//!  4      4     a       i32   EpollAdd: epfd (final number)
//!  8      4     b       i32   EpollAdd: target fd (final number)
//! 12      4     c       u32   EpollAdd: events
//! 16      8     d       u64   EpollAdd: data
//! 24      8     reserved, zero
//! ```
//!
//! Either way each EpollAdd must succeed (report the record index and errno otherwise), and an
//! unknown op must be refused, not skipped. [`apply_fixup`] is the reference implementation
//! (the tests run it). Nothing else needs final numbers: timers are armed, queues refilled and
//! offsets set here, before the fds travel.
//!
//! Coordination notes for the restore core: a memfd or deleted file that is also MAPPED must be
//! mapped from the fd recreated here (same file), not a copy; the agent must recreate files in
//! the destination's mount namespace; sockets must be created in the destination's network
//! namespace (call recreate_fds on a thread that has entered it).

pub mod dump;
mod os;
pub mod restore;
pub mod tcp;

pub use dump::{dump_fds, FilesDumpError};
pub use restore::{recreate_fds, FilesRestoreError, RecreateOptions, RecreatedFd, RecreatedFds};

use crate::image::fd::FdImage;
use crate::sys::Errno;
use serde::{Deserialize, Serialize};
use std::os::fd::RawFd;

/// An action on final fd numbers, run by the stub after every fd is in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", rename_all_fields = "camelCase")]
pub enum FdFixup {
    /// `epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, {events, data})`.
    EpollAdd {
        epfd: i32,
        tfd: i32,
        events: u32,
        data: u64,
    },
}

/// Size of one encoded [`FdFixup`].
pub const FIXUP_RECORD_LEN: usize = 32;
const OP_EPOLL_ADD: u32 = 1;

/// A plan the stub cannot execute.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FixupDecodeError {
    #[error("fixup plan of {0} bytes is not a whole number of {FIXUP_RECORD_LEN}-byte records")]
    Length(usize),
    #[error("fixup record {index}: unknown op {op}")]
    UnknownOp { index: usize, op: u32 },
}

/// The stub's encoding of a plan (see the module header for the layout).
pub fn encode_fixups(fixups: &[FdFixup]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fixups.len() * FIXUP_RECORD_LEN);
    for fixup in fixups {
        let mut record = [0u8; FIXUP_RECORD_LEN];
        match *fixup {
            FdFixup::EpollAdd {
                epfd,
                tfd,
                events,
                data,
            } => {
                record[0..4].copy_from_slice(&OP_EPOLL_ADD.to_le_bytes());
                record[4..8].copy_from_slice(&epfd.to_le_bytes());
                record[8..12].copy_from_slice(&tfd.to_le_bytes());
                record[12..16].copy_from_slice(&events.to_le_bytes());
                record[16..24].copy_from_slice(&data.to_le_bytes());
            }
        }
        out.extend_from_slice(&record);
    }
    out
}

/// Decodes [`encode_fixups`]' output.
pub fn decode_fixups(bytes: &[u8]) -> Result<Vec<FdFixup>, FixupDecodeError> {
    if !bytes.chunks_exact(FIXUP_RECORD_LEN).remainder().is_empty() {
        return Err(FixupDecodeError::Length(bytes.len()));
    }
    let u32_at = |r: &[u8], i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
    bytes
        .chunks_exact(FIXUP_RECORD_LEN)
        .enumerate()
        .map(|(index, r)| match u32_at(r, 0) {
            OP_EPOLL_ADD => Ok(FdFixup::EpollAdd {
                epfd: u32_at(r, 4) as i32,
                tfd: u32_at(r, 8) as i32,
                events: u32_at(r, 12),
                data: u64::from_le_bytes(r[16..24].try_into().unwrap_or_default()),
            }),
            op => Err(FixupDecodeError::UnknownOp { index, op }),
        })
        .collect()
}

/// Executes one fixup in the calling process (the stub does the same with raw syscalls).
pub fn apply_fixup(fixup: &FdFixup) -> Result<(), Errno> {
    match *fixup {
        FdFixup::EpollAdd {
            epfd,
            tfd,
            events,
            data,
        } => os::epoll_add(epfd as RawFd, tfd as RawFd, events, data),
    }
}

/// The fixups an image implies (what [`recreate_fds`] returns in `fixups`).
pub fn fixups_for(images: &[FdImage]) -> Vec<FdFixup> {
    use crate::image::fd::FdKindImage;
    images
        .iter()
        .flat_map(|image| match &image.kind {
            FdKindImage::Epoll { targets } => targets
                .iter()
                .map(|t| FdFixup::EpollAdd {
                    epfd: image.fd,
                    tfd: t.tfd,
                    events: t.events,
                    data: t.data,
                })
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixup_encoding_roundtrip_and_layout() {
        let plan = vec![
            FdFixup::EpollAdd {
                epfd: 7,
                tfd: 3,
                events: 0x8000_0001,
                data: 0xE1E1,
            },
            FdFixup::EpollAdd {
                epfd: 7,
                tfd: -1,
                events: 0,
                data: u64::MAX,
            },
        ];
        let bytes = encode_fixups(&plan);
        assert_eq!(bytes.len(), 2 * FIXUP_RECORD_LEN);
        assert_eq!(&bytes[0..4], &[1, 0, 0, 0]);
        assert_eq!(&bytes[4..8], &[7, 0, 0, 0]);
        assert_eq!(&bytes[12..16], &[1, 0, 0, 0x80]);
        assert_eq!(&bytes[16..24], &[0xE1, 0xE1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[24..32], &[0; 8]);
        assert_eq!(decode_fixups(&bytes).unwrap(), plan);
        assert_eq!(
            decode_fixups(&bytes[..31]),
            Err(FixupDecodeError::Length(31))
        );
        let mut bad = bytes.clone();
        bad[32] = 9;
        assert_eq!(
            decode_fixups(&bad),
            Err(FixupDecodeError::UnknownOp { index: 1, op: 9 })
        );
        let json = serde_json::to_value(plan[0]).unwrap();
        assert_eq!(json["op"], "epoll-add");
        assert_eq!(json["epfd"], 7);
    }

    #[test]
    fn unix_diag_reply_parsing() {
        // nlmsghdr(len 40, type 20) + unix_diag_msg(ino 1234) + rtattr(len 8, type 2, peer 99).
        let mut reply = Vec::new();
        reply.extend_from_slice(&40u32.to_ne_bytes());
        reply.extend_from_slice(&20u16.to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&[1, 1, 1, 0]);
        reply.extend_from_slice(&1234u32.to_ne_bytes());
        reply.extend_from_slice(&[0; 8]);
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&2u16.to_ne_bytes());
        reply.extend_from_slice(&99u32.to_ne_bytes());
        assert_eq!(os::parse_unix_diag_reply(&reply, 1234, 2), Ok(Some(99)));
        assert_eq!(
            os::parse_unix_diag_reply(&reply[..32], 1234, 2),
            Err(Errno(libc::EPROTO))
        );
        assert_eq!(
            os::parse_unix_diag_reply(&reply, 1235, 2),
            Err(Errno(libc::EPROTO))
        );
        let mut no_peer = reply[..32].to_vec();
        no_peer[0] = 32;
        assert_eq!(os::parse_unix_diag_reply(&no_peer, 1234, 2), Ok(None));
        let mut error = vec![0u8; 36];
        error[0] = 36;
        error[4] = 2; // NLMSG_ERROR
        error[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(
            os::parse_unix_diag_reply(&error, 1, 2),
            Err(Errno(libc::ENOENT))
        );
    }

    #[test]
    fn live_unix_peer_lookup() {
        use std::os::fd::AsFd;
        let (a, b) = os::socketpair(libc::SOCK_STREAM).unwrap();
        let ino = |fd: &std::os::fd::OwnedFd| os::fstat(fd.as_fd()).unwrap().st_ino;
        let netlink = os::sock_diag_socket_for(crate::sys::Pid::this()).unwrap();
        assert_eq!(
            os::unix_peer_inode(netlink.as_fd(), ino(&a)),
            Ok(Some(ino(&b)))
        );
        assert_eq!(
            os::unix_peer_inode(netlink.as_fd(), ino(&b)),
            Ok(Some(ino(&a)))
        );
    }
}
