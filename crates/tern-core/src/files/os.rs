//! Small safe wrappers, one unsafe call each, over the syscalls the files work uses.
//!
//! Every wrapper returns `Result<_, Errno>` and every new descriptor comes back as an [`OwnedFd`]
//! (close-on-exec: the agent never execs them into anything; the stub sets the final flag).

use crate::sys::{Errno, Pid};
use std::ffi::CString;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Wraps a descriptor the kernel just returned.
fn owned(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` is a fresh, valid descriptor returned by a successful syscall and owned by
    // nobody else; OwnedFd takes over closing it exactly once.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn cstring(path: &Path) -> Result<CString, Errno> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno(libc::EINVAL))
}

pub fn open(path: &Path, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    let c = cstring(path)?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let raw = Errno::result(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(owned(raw))
}

pub fn unlink(path: &Path) -> Result<(), Errno> {
    let c = cstring(path)?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    Errno::result(unsafe { libc::unlink(c.as_ptr()) }).map(drop)
}

pub fn stat_path(path: &Path) -> Result<libc::stat, Errno> {
    let c = cstring(path)?;
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `c` is NUL-terminated; stat writes one struct stat to `st`.
    Errno::result(unsafe { libc::stat(c.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: stat succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

pub fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat, Errno> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one struct stat to `st`.
    Errno::result(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// fcntl with an integer argument (F_GETFL, F_SETFL, F_GETPIPE_SZ, F_SETPIPE_SZ, F_GET_SEALS,
/// F_ADD_SEALS, F_GETFD, F_SETFD).
pub fn fcntl_int(fd: BorrowedFd<'_>, cmd: i32, arg: i32) -> Result<i32, Errno> {
    // SAFETY: these commands take an int argument and touch no memory of ours.
    Errno::result(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) })
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> Result<u64, Errno> {
    // SAFETY: lseek takes integers only.
    Errno::result(unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) }).map(|o| o as u64)
}

/// pread until `len` bytes or end of file.
pub fn pread_all(fd: BorrowedFd<'_>, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of rest.len() bytes for the call.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                done as i64,
            )
        };
        match Errno::result(n) {
            Ok(0) => break,
            Ok(n) => done += n as usize,
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

pub fn pwrite_all(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        // SAFETY: `rest` is valid for reads of rest.len() bytes for the call.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                (offset + done as u64) as i64,
            )
        };
        match Errno::result(n) {
            Ok(n) => done += n as usize,
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One write(2); the caller checks the count.
pub fn write(fd: BorrowedFd<'_>, data: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `data` is valid for reads of data.len() bytes for the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    Errno::result(n).map(|n| n as usize)
}

/// One read(2).
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: `buf` is valid for writes of buf.len() bytes for the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    Errno::result(n).map(|n| n as usize)
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> Result<(), Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// ioctl(FIONREAD): bytes queued for reading (pipes, FIFOs, sockets).
pub fn fionread(fd: BorrowedFd<'_>) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, a local alive for the call.
    Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) })?;
    Ok(n.max(0) as usize)
}

pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two fds into the 2-element array.
    Errno::result(unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((owned(ends[0]), owned(ends[1])))
}

/// tee(2) with SPLICE_F_NONBLOCK: duplicates up to `len` buffered bytes of pipe `from` into pipe
/// `to` without consuming them.
pub fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> Result<usize, Errno> {
    // SAFETY: tee takes integers only.
    let n = unsafe {
        libc::tee(
            from.as_raw_fd(),
            to.as_raw_fd(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    Errno::result(n).map(|n| n as usize)
}

pub fn eventfd(flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) }).map(owned)
}

/// signalfd4(-1, mask, 8, flags): the kernel sigset is one u64 on x86-64.
pub fn signalfd(mask: u64, flags: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: the kernel reads 8 bytes (the size passed) from `mask`, a local alive for the call.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            &mask as *const u64,
            8usize,
            flags | libc::SFD_CLOEXEC,
        )
    };
    Errno::result(raw).map(|r| owned(r as RawFd))
}

pub fn timerfd_create(clockid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::timerfd_create(clockid, libc::TFD_CLOEXEC) }).map(owned)
}

pub fn timerfd_gettime(fd: BorrowedFd<'_>) -> Result<libc::itimerspec, Errno> {
    let mut it = MaybeUninit::<libc::itimerspec>::uninit();
    // SAFETY: timerfd_gettime writes one itimerspec to `it`.
    Errno::result(unsafe { libc::timerfd_gettime(fd.as_raw_fd(), it.as_mut_ptr()) })?;
    // SAFETY: the call succeeded and filled the struct.
    Ok(unsafe { it.assume_init() })
}

pub fn timerfd_settime(
    fd: BorrowedFd<'_>,
    flags: i32,
    value: &libc::itimerspec,
) -> Result<(), Errno> {
    // SAFETY: the kernel reads one itimerspec from `value`; old_value is null.
    Errno::result(unsafe {
        libc::timerfd_settime(fd.as_raw_fd(), flags, value, std::ptr::null_mut())
    })
    .map(drop)
}

/// TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE): set the unread expiration count.
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> Result<(), Errno> {
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    // SAFETY: the ioctl reads one u64 from the pointer, a local alive for the call.
    Errno::result(unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks as *const u64) })
        .map(drop)
}

pub fn clock_now(clockid: i32) -> Result<libc::timespec, Errno> {
    let mut ts = MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: clock_gettime writes one timespec to `ts`.
    Errno::result(unsafe { libc::clock_gettime(clockid, ts.as_mut_ptr()) })?;
    // SAFETY: the call succeeded and filled the struct.
    Ok(unsafe { ts.assume_init() })
}

pub fn memfd_create(name: &str, flags: u32) -> Result<OwnedFd, Errno> {
    let c = CString::new(name).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    Errno::result(unsafe { libc::memfd_create(c.as_ptr(), flags | libc::MFD_CLOEXEC) }).map(owned)
}

pub fn epoll_create() -> Result<OwnedFd, Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(owned)
}

/// epoll_ctl(EPOLL_CTL_ADD) on raw numbers (what the stub runs after placement).
pub fn epoll_add(epfd: RawFd, tfd: RawFd, events: u32, data: u64) -> Result<(), Errno> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: the kernel reads one epoll_event from the pointer, a local alive for the call. The
    // fd numbers are plain integers: a wrong one fails with EBADF, it cannot corrupt memory.
    Errno::result(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, tfd, &mut event) }).map(drop)
}

/// kcmp(pid, pid, KCMP_FILE, fd1, fd2) == 0: the two fds of `pid` are one open file description.
/// None when the kernel has no kcmp (CONFIG_KCMP off).
pub fn same_file(pid: Pid, fd1: i32, fd2: i32) -> Result<Option<bool>, Errno> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: KCMP_FILE takes integers only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid.as_raw(),
            pid.as_raw(),
            KCMP_FILE,
            fd1,
            fd2,
        )
    };
    match Errno::result(r) {
        Ok(r) => Ok(Some(r == 0)),
        Err(Errno(libc::ENOSYS)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// kcmp(KCMP_EPOLL_TFD): is fd `tfd` of `pid` the file registered as target `tfd` in epoll `epfd`?
/// Some(false) when the registration is for another file (the fd was closed and reused); None
/// when kcmp is missing.
pub fn epoll_target_is_fd(pid: Pid, epfd: i32, tfd: i32) -> Result<Option<bool>, Errno> {
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    #[repr(C)]
    struct KcmpEpollSlot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = KcmpEpollSlot {
        efd: epfd as u32,
        tfd: tfd as u32,
        toff: 0,
    };
    // SAFETY: the kernel reads one kcmp_epoll_slot from the pointer, a local alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid.as_raw(),
            pid.as_raw(),
            KCMP_EPOLL_TFD,
            tfd,
            &slot as *const KcmpEpollSlot,
        )
    };
    match Errno::result(r) {
        Ok(r) => Ok(Some(r == 0)),
        Err(Errno(libc::ENOSYS)) => Ok(None),
        Err(Errno(libc::ENOENT)) => Ok(Some(false)),
        Err(e) => Err(e),
    }
}

// ---- sockets ----

pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> Result<i32, Errno> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` (4) bytes to `value` and updates `len`.
    Errno::result(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> Result<(), Errno> {
    // SAFETY: the kernel reads 4 bytes from `value`, a local alive for the call.
    Errno::result(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// TCP_INFO's first bytes: state, and for a listener the accept backlog (tcpi_sacked =
/// sk_max_ack_backlog, tcpi_unacked = sk_ack_backlog).
#[derive(Debug, Clone, Copy)]
pub struct TcpInfoHead {
    pub state: u8,
    pub unacked: u32,
    pub sacked: u32,
}

pub fn tcp_info(fd: BorrowedFd<'_>) -> Result<TcpInfoHead, Errno> {
    // struct tcp_info: 8 u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked, ...
    let mut buf = [0u8; 104];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes to `buf` and updates `len`.
    Errno::result(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().unwrap_or_default());
    Ok(TcpInfoHead {
        state: buf[0],
        unacked: word(24),
        sacked: word(28),
    })
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large enough for.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which it is large enough for.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn std_to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: storage is larger than and suitably aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: storage is larger than and suitably aligned for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

type NameFn =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

fn socket_name(fd: BorrowedFd<'_>, call: NameFn) -> Result<Option<SocketAddr>, Errno> {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `call` is getsockname or getpeername, which write at most `len` bytes to `storage`.
    Errno::result(unsafe {
        call(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    Ok(sockaddr_to_std(&storage))
}

pub fn getsockname(fd: BorrowedFd<'_>) -> Result<Option<SocketAddr>, Errno> {
    socket_name(fd, libc::getsockname)
}

/// None when not connected (ENOTCONN).
pub fn getpeername(fd: BorrowedFd<'_>) -> Result<Option<SocketAddr>, Errno> {
    match socket_name(fd, libc::getpeername) {
        Err(Errno(libc::ENOTCONN)) => Ok(None),
        other => other,
    }
}

pub fn socket(family: i32, socket_type: i32, protocol: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::socket(family, socket_type | libc::SOCK_CLOEXEC, protocol) })
        .map(owned)
}

pub fn socketpair(socket_type: i32) -> Result<(OwnedFd, OwnedFd), Errno> {
    let mut sv = [0; 2];
    // SAFETY: socketpair writes two fds into the 2-element array.
    Errno::result(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            socket_type | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    })?;
    Ok((owned(sv[0]), owned(sv[1])))
}

pub fn bind(fd: BorrowedFd<'_>, addr: &SocketAddr) -> Result<(), Errno> {
    let (storage, len) = std_to_sockaddr(addr);
    // SAFETY: the kernel reads `len` bytes of `storage`, alive for the call.
    Errno::result(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

pub fn connect(fd: BorrowedFd<'_>, addr: &SocketAddr) -> Result<(), Errno> {
    let (storage, len) = std_to_sockaddr(addr);
    // SAFETY: the kernel reads `len` bytes of `storage`, alive for the call.
    Errno::result(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> Result<(), Errno> {
    // SAFETY: integers only.
    Errno::result(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(drop)
}

/// send(2) of one whole message with MSG_DONTWAIT | MSG_NOSIGNAL.
pub fn send(fd: BorrowedFd<'_>, data: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `data` is valid for reads of data.len() bytes for the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    Errno::result(n).map(|n| n as usize)
}

/// One peeked message: its bytes, and whether it was truncated or carried fds.
#[derive(Debug)]
pub struct Peeked {
    pub data: Vec<u8>,
    pub truncated: bool,
    /// SCM_RIGHTS fds were attached (the kernel installed copies in this process; they are
    /// already closed again here).
    pub had_fds: bool,
}

/// recvmsg(MSG_PEEK | MSG_DONTWAIT) into a `cap`-byte buffer; None at EAGAIN or end of stream.
pub fn recv_peek(fd: BorrowedFd<'_>, cap: usize) -> Result<Option<Peeked>, Errno> {
    let mut data = vec![0u8; cap];
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 256];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain integers and pointers; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at one iovec over `data` and at `control`, all alive for the call; the
    // kernel writes at most their lengths.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    let n = match Errno::result(n) {
        Ok(0) => return Ok(None),
        Ok(n) => n as usize,
        Err(Errno(libc::EAGAIN)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut had_fds = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: the kernel shortened msg_controllen to what it wrote; CMSG_* walk whole headers.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg points at a complete header inside `control`.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            had_fds = true;
            // SAFETY: 0 is a valid length argument.
            let payload = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: CMSG_DATA points at `payload` bytes of ints inside `control`.
            let fds = unsafe { libc::CMSG_DATA(cmsg) }.cast::<libc::c_int>();
            for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                // SAFETY: i is within the payload; the int may be unaligned, so read_unaligned.
                let raw = unsafe { fds.add(i).read_unaligned() };
                if raw >= 0 {
                    drop(owned(raw));
                }
            }
        }
        // SAFETY: msg and cmsg are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    data.truncate(n.min(cap));
    Ok(Some(Peeked {
        data,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        had_fds,
    }))
}

/// Parses an address of an image back into a socket address.
pub fn parse_inet(address: &str, port: u16, scope_id: u32) -> Option<SocketAddr> {
    match address.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip) => Some(SocketAddr::V4(SocketAddrV4::new(ip, port))),
        IpAddr::V6(ip) => Some(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope_id))),
    }
}

// ---- sock_diag: the peer of a unix socket ----

/// The inode of the peer of unix socket `inode`, asked from sock_diag over `netlink` (a
/// NETLINK_SOCK_DIAG socket in the socket's network namespace). None: unconnected.
pub fn unix_peer_inode(netlink: BorrowedFd<'_>, inode: u64) -> Result<Option<u64>, Errno> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_PEER: u32 = 0x4;
    const UNIX_DIAG_PEER: u16 = 2;
    #[repr(C)]
    struct Request {
        nlh: libc::nlmsghdr,
        family: u8,
        protocol: u8,
        pad: u16,
        states: u32,
        ino: u32,
        show: u32,
        cookie: [u32; 2],
    }
    let ino = u32::try_from(inode).map_err(|_| Errno(libc::EOVERFLOW))?;
    let request = Request {
        nlh: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: ino,
            nlmsg_pid: 0,
        },
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: u32::MAX,
        ino,
        show: UDIAG_SHOW_PEER,
        cookie: [u32::MAX; 2],
    };
    // SAFETY: the kernel reads size_of::<Request>() bytes from `request`, alive for the call.
    let sent = unsafe {
        libc::send(
            netlink.as_raw_fd(),
            (&request as *const Request).cast(),
            std::mem::size_of::<Request>(),
            0,
        )
    };
    Errno::result(sent)?;
    let mut buf = vec![0u8; 8192];
    let n = read(netlink, &mut buf)?;
    parse_unix_diag_reply(&buf[..n], ino, UNIX_DIAG_PEER)
}

/// Parses one sock_diag reply: NLMSG_ERROR → Err; the unix_diag_msg's UNIX_DIAG_PEER attribute.
pub(crate) fn parse_unix_diag_reply(
    reply: &[u8],
    ino: u32,
    peer_attr: u16,
) -> Result<Option<u64>, Errno> {
    let u16_at = |i: usize| {
        reply
            .get(i..i + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |i: usize| {
        reply
            .get(i..i + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let len = u32_at(0).ok_or(Errno(libc::EPROTO))? as usize;
    let kind = u16_at(4).ok_or(Errno(libc::EPROTO))?;
    if kind == libc::NLMSG_ERROR as u16 {
        let error = u32_at(16).ok_or(Errno(libc::EPROTO))? as i32;
        return Err(Errno(-error));
    }
    // nlmsghdr (16) + unix_diag_msg {family, type, state, pad, ino u32, cookie [u32; 2]} (16).
    if len > reply.len() || len < 32 || u32_at(20) != Some(ino) {
        return Err(Errno(libc::EPROTO));
    }
    let mut at = 32;
    while at + 4 <= len {
        let attr_len = usize::from(u16_at(at).ok_or(Errno(libc::EPROTO))?);
        let attr_type = u16_at(at + 2).ok_or(Errno(libc::EPROTO))?;
        if attr_len < 4 {
            return Err(Errno(libc::EPROTO));
        }
        if attr_type == peer_attr {
            return Ok(Some(u64::from(u32_at(at + 4).ok_or(Errno(libc::EPROTO))?)));
        }
        at += (attr_len + 3) & !3;
    }
    Ok(None)
}

/// A NETLINK_SOCK_DIAG socket in the network namespace of `pid` (a netlink socket answers for
/// the namespace it was created in, so it is created from a thread that entered that namespace).
pub fn sock_diag_socket_for(pid: Pid) -> Result<OwnedFd, Errno> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net"));
    let ours = std::fs::metadata("/proc/self/ns/net");
    let create = || socket(libc::AF_NETLINK, libc::SOCK_DGRAM, libc::NETLINK_SOCK_DIAG);
    use std::os::unix::fs::MetadataExt;
    match (theirs, ours) {
        (Ok(t), Ok(o)) if t.ino() == o.ino() && t.dev() == o.dev() => create(),
        _ => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = open(Path::new(&format!("/proc/{pid}/ns/net")), libc::O_RDONLY, 0)?;
                    // SAFETY: setns takes integers only; it changes only this (scoped) thread's
                    // network namespace, and the thread ends right after creating the socket.
                    Errno::result(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
                    create()
                })
                .join()
                .unwrap_or(Err(Errno(libc::EIO)))
        }),
    }
}

// ---- reading queued data without consuming it ----

/// Why [`peek_pipe`] failed.
#[derive(Debug)]
pub enum PeekPipeError {
    Sys(&'static str, Errno),
    /// tee duplicated fewer bytes than were queued (a second tee would start over from the head).
    Short {
        queued: usize,
        copied: usize,
    },
}

/// Every byte buffered in pipe/FIFO `reader`, duplicated with one tee(2) into a temporary pipe
/// of `pipe_size` (so it has as many buffer slots) and read back from there: the original queue
/// is untouched.
pub fn peek_pipe(reader: BorrowedFd<'_>, pipe_size: u32) -> Result<Vec<u8>, PeekPipeError> {
    let queued = fionread(reader).map_err(|e| PeekPipeError::Sys("ioctl(FIONREAD)", e))?;
    if queued == 0 {
        return Ok(Vec::new());
    }
    let (tmp_r, tmp_w) = pipe().map_err(|e| PeekPipeError::Sys("pipe2", e))?;
    let current = fcntl_int(tmp_w.as_fd(), libc::F_GETPIPE_SZ, 0)
        .map_err(|e| PeekPipeError::Sys("F_GETPIPE_SZ", e))?;
    if (current as u32) < pipe_size {
        fcntl_int(tmp_w.as_fd(), libc::F_SETPIPE_SZ, pipe_size as i32)
            .map_err(|e| PeekPipeError::Sys("F_SETPIPE_SZ on the temporary pipe", e))?;
    }
    let copied = loop {
        match tee(reader, tmp_w.as_fd(), queued) {
            Err(Errno(libc::EINTR)) => continue,
            other => break other.map_err(|e| PeekPipeError::Sys("tee", e))?,
        }
    };
    if copied != queued {
        return Err(PeekPipeError::Short { queued, copied });
    }
    drop(tmp_w);
    let mut data = vec![0u8; queued];
    let mut done = 0;
    while done < queued {
        match read(tmp_r.as_fd(), &mut data[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(PeekPipeError::Sys("read of the temporary pipe", e)),
        }
    }
    data.truncate(done);
    Ok(data)
}

/// Why [`peek_socket_queue`] failed.
#[derive(Debug)]
pub enum PeekQueueError {
    Sys(&'static str, Errno),
    FdsInFlight,
    Truncated,
}

/// Every message in a socket's receive queue, peeked without consuming it (CRIU's sk-queue
/// technique): SO_PEEK_OFF is saved and set to 0 so that each MSG_PEEK continues where the last
/// ended, the queue is walked until EAGAIN, and SO_PEEK_OFF is put back whatever happened.
/// Stream sockets come back as one chunk.
pub fn peek_socket_queue(
    fd: BorrowedFd<'_>,
    stream: bool,
    cap: usize,
) -> Result<Vec<Vec<u8>>, PeekQueueError> {
    let old = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(|e| PeekQueueError::Sys("getsockopt(SO_PEEK_OFF)", e))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)
        .map_err(|e| PeekQueueError::Sys("setsockopt(SO_PEEK_OFF)", e))?;
    let mut queue = Vec::new();
    let walked = (|| loop {
        match recv_peek(fd, cap) {
            Ok(None) => return Ok(()),
            Ok(Some(p)) if p.had_fds => return Err(PeekQueueError::FdsInFlight),
            Ok(Some(p)) if p.truncated => return Err(PeekQueueError::Truncated),
            Ok(Some(p)) => queue.push(p.data),
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(PeekQueueError::Sys("recvmsg(MSG_PEEK)", e)),
        }
    })();
    let restored = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old)
        .map_err(|e| PeekQueueError::Sys("setsockopt(SO_PEEK_OFF) back", e));
    walked?;
    restored?;
    if stream && queue.len() > 1 {
        queue = vec![queue.concat()];
    }
    Ok(queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_peek_leaves_data() {
        let (r, w) = pipe().unwrap();
        for chunk in [&b"one"[..], b"two", b"three"] {
            assert_eq!(write(w.as_fd(), chunk).unwrap(), chunk.len());
        }
        let size = fcntl_int(r.as_fd(), libc::F_GETPIPE_SZ, 0).unwrap() as u32;
        assert_eq!(peek_pipe(r.as_fd(), size).unwrap(), b"onetwothree");
        assert_eq!(peek_pipe(r.as_fd(), size).unwrap(), b"onetwothree");
        let mut buf = [0u8; 64];
        assert_eq!(read(r.as_fd(), &mut buf).unwrap(), 11);
        assert_eq!(peek_pipe(r.as_fd(), size).unwrap(), b"");
    }

    #[test]
    fn socket_queue_peek_leaves_messages() {
        for (kind, stream) in [
            (libc::SOCK_DGRAM, false),
            (libc::SOCK_SEQPACKET, false),
            (libc::SOCK_STREAM, true),
        ] {
            let (a, b) = socketpair(kind).unwrap();
            for m in [&b"alpha"[..], b"be", b"gamma!"] {
                assert_eq!(send(a.as_fd(), m).unwrap(), m.len());
            }
            setsockopt_int(b.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1).unwrap();
            let q = peek_socket_queue(b.as_fd(), stream, 1 << 16).unwrap();
            if stream {
                assert_eq!(q, vec![b"alphabegamma!".to_vec()]);
            } else {
                assert_eq!(
                    q,
                    vec![b"alpha".to_vec(), b"be".to_vec(), b"gamma!".to_vec()]
                );
            }
            assert_eq!(
                getsockopt_int(b.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap(),
                -1
            );
            assert!(peek_socket_queue(a.as_fd(), stream, 1 << 16)
                .unwrap()
                .is_empty());
            let mut buf = [0u8; 64];
            let first = read(b.as_fd(), &mut buf).unwrap();
            assert_eq!(
                &buf[..first],
                if stream {
                    &b"alphabegamma!"[..]
                } else {
                    b"alpha"
                }
            );
            // A peek offset the process set is put back as it was.
            if !stream {
                setsockopt_int(b.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, 1).unwrap();
                let q = peek_socket_queue(b.as_fd(), stream, 1 << 16).unwrap();
                assert_eq!(q, vec![b"be".to_vec(), b"gamma!".to_vec()]);
                assert_eq!(
                    getsockopt_int(b.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap(),
                    1
                );
            }
        }
    }

    #[test]
    fn fds_in_flight_are_refused() {
        let (a, b) = socketpair(libc::SOCK_STREAM).unwrap();
        let (r, _w) = pipe().unwrap();
        let raw = r.as_raw_fd();
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: b"x".as_ptr().cast_mut().cast(),
            iov_len: 1,
        };
        // SAFETY: zeroed msghdr is valid; the fields set below point at live locals.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: the control buffer holds one cmsghdr + an int; the pointers are into it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            libc::CMSG_DATA(c).cast::<i32>().write_unaligned(raw);
        }
        // SAFETY: msg is fully initialised and points at live buffers.
        assert_eq!(unsafe { libc::sendmsg(a.as_raw_fd(), &msg, 0) }, 1);
        assert!(matches!(
            peek_socket_queue(b.as_fd(), true, 1024),
            Err(PeekQueueError::FdsInFlight)
        ));
        // The message is still queued, fd and all.
        assert_eq!(fionread(b.as_fd()).unwrap(), 1);
    }
}
