//! tern-guard: keeps a lazily restored process from ever reading a missing page as zeros (see
//! ../guard_protocol.rs for its fds, and tern-core's restore/guard.rs for why). No libc: raw
//! syscalls, its own `_start` (../rt.rs, shared with the stub).
//!
//! It holds a dup of the process's userfaultfd, and of every forked child's the engine hands it
//! ([`HOLD`]), so the contexts outlive the engine: if the engine dies, faults on missing pages
//! wait instead of the kernel unregistering the ranges and filling them with zeros. Then it kills
//! the process and every descendant of it, waits until they have exited (only then may the
//! contexts go), and exits. It starts with every signal blocked (the engine blocks them around
//! the clone and exec keeps the mask): only SIGKILL stops it.
//!
//! Descendants: there is no /proc/PID/task/TID/children on every kernel (CONFIG_PROC_CHILDREN),
//! so a scan reads the parent of every process in /proc/PID/stat and takes those whose parent is
//! the process or a descendant already found, each by a pidfd (checked against pid reuse, see
//! [`adopt`]). It scans every [`SCAN_MS`] while it holds a forked child's userfaultfd (so a
//! descendant whose parent exits, and which is reparented out of the tree, stays known), and
//! again and again when it kills.
#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

#[path = "../rt.rs"]
mod rt;

#[path = "../guard_protocol.rs"]
#[allow(dead_code)]
mod guard_protocol;

use guard_protocol::{
    ARMED, CHANNEL_FD, ENGINE_FD, EXIT_BAD_FDS, EXIT_DONE, EXIT_KILLED, EXIT_NOT_ARMED, HOLD, MAX_HELD, PROCESS_FD,
    RELEASE, UFFD_FD,
};
use rt::{exit, sys, SYS_CLOSE, SYS_POLL, SYS_READ, SYS_WRITE};

const SYS_NANOSLEEP: i64 = 35;
const SYS_RECVMSG: i64 = 47;
const SYS_FCNTL: i64 = 72;
const SYS_SETSID: i64 = 112;
const SYS_PRCTL: i64 = 157;
const SYS_GETDENTS64: i64 = 217;
const SYS_CLOCK_GETTIME: i64 = 228;
const SYS_OPENAT: i64 = 257;
const SYS_PIDFD_SEND_SIGNAL: i64 = 424;
const SYS_PIDFD_OPEN: i64 = 434;
const F_GETFD: u64 = 1;
const PR_SET_NAME: u64 = 15;
const POLLIN: i16 = 1;
const SIGKILL: u64 = 9;
const EINTR: i64 = 4;
const EAGAIN: i64 = 11;
const AT_FDCWD: i64 = -100;
const O_RDONLY_DIRECTORY_CLOEXEC: u64 = 0o200000 | 0o2000000;
const O_RDONLY_CLOEXEC: u64 = 0o2000000;
const CLOCK_MONOTONIC: u64 = 1;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;

/// How often it looks for descendants while it holds a forked child's userfaultfd.
const SCAN_MS: i64 = 200;
/// Descendants it keeps a pidfd of (beyond: not killed, see restore/guard.rs Limits).
const MAX_KIN: usize = 256;
/// Scan-and-kill rounds when the engine is gone (the last one finds nobody new).
const KILL_ROUNDS: usize = 16;

#[derive(Clone, Copy)]
#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

#[repr(C)]
struct IoVec {
    base: *mut u8,
    len: usize,
}

#[repr(C)]
struct MsgHdr {
    name: *mut u8,
    namelen: u32,
    iov: *mut IoVec,
    iovlen: usize,
    control: *mut u8,
    controllen: usize,
    flags: i32,
}

/// What it holds: the forked children's userfaultfds, and the descendants found (pid, pidfd).
struct Held {
    uffds: [i32; MAX_HELD],
    n_uffds: usize,
    kin: [(i32, i32); MAX_KIN],
    n_kin: usize,
    /// The process's pid as this /proc numbers it (0: unknown, no scan possible).
    root: i32,
}

/// poll() on `fds`; the number ready or a negative errno.
fn poll(fds: &mut [PollFd], timeout_ms: i64) -> i64 {
    sys(SYS_POLL, fds.as_mut_ptr() as u64, fds.len() as u64, timeout_ms as u64)
}

fn sleep_ms(ms: u64) {
    let ts: [u64; 2] = [ms / 1000, (ms % 1000) * 1_000_000];
    sys(SYS_NANOSLEEP, ts.as_ptr() as u64, 0, 0);
}

fn now_ms() -> i64 {
    let mut ts: [i64; 2] = [0, 0];
    sys(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, ts.as_mut_ptr() as u64, 0);
    ts[0] * 1000 + ts[1] / 1_000_000
}

/// Whether the process of `pidfd` has exited (its pidfd is readable).
fn exited(pidfd: i32) -> bool {
    let mut fds = [PollFd { fd: pidfd, events: POLLIN, revents: 0 }];
    poll(&mut fds, 0) > 0 && fds[0].revents != 0
}

/// A path in `buf`, NUL-terminated: the pieces, numbers in decimal.
struct Path {
    buf: [u8; 64],
    len: usize,
}

impl Path {
    fn new() -> Path {
        Path { buf: [0; 64], len: 0 }
    }
    fn s(mut self, s: &[u8]) -> Path {
        for &b in s {
            if self.len < self.buf.len() - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }
    fn n(self, mut v: i32) -> Path {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        if v <= 0 {
            v = 0;
        }
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.s(&digits[i..])
    }
    fn ptr(&self) -> u64 {
        self.buf.as_ptr() as u64
    }
}

/// Reads the start of the file at `path` into `buf`: the bytes read (0 on any error).
fn read_file(path: &Path, buf: &mut [u8]) -> usize {
    let fd = sys(SYS_OPENAT, AT_FDCWD as u64, path.ptr(), O_RDONLY_CLOEXEC);
    if fd < 0 {
        return 0;
    }
    let n = sys(SYS_READ, fd as u64, buf.as_mut_ptr() as u64, buf.len() as u64);
    sys(SYS_CLOSE, fd as u64, 0, 0);
    if n > 0 {
        n as usize
    } else {
        0
    }
}

/// A decimal number (an optional '-') at the start of `s`.
fn parse(s: &[u8]) -> Option<i32> {
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let mut v: i32 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add((b - b'0') as i32)?;
        any = true;
    }
    any.then_some(if neg { -v } else { v })
}

/// The pid the pidfd `fd` names, from its fdinfo (`Pid:`): -1 once the process was reaped (the
/// number may belong to another process then), None if unreadable.
fn pidfd_pid(fd: i32) -> Option<i32> {
    let mut buf = [0u8; 256];
    let n = read_file(&Path::new().s(b"/proc/self/fdinfo/").n(fd), &mut buf);
    let text = &buf[..n];
    let key = b"\nPid:\t";
    (0..text.len().saturating_sub(key.len()))
        .find(|&i| &text[i..i + key.len()] == key)
        .and_then(|i| parse(&text[i + key.len()..]))
}

/// The parent (pid) of process `pid` from /proc/PID/stat, None if gone.
fn parent_of(pid: i32) -> Option<i32> {
    let mut buf = [0u8; 256];
    let n = read_file(&Path::new().s(b"/proc/").n(pid).s(b"/stat"), &mut buf);
    // "pid (comm) S ppid ...": comm may hold anything, so after the last ')'.
    let close = buf[..n].iter().rposition(|&b| b == b')')?;
    let rest = buf.get(close + 4..n)?;
    parse(rest)
}

impl Held {
    /// The pidfd of `pid` when it is the process or a descendant known.
    fn known(&self, pid: i32) -> Option<i32> {
        if pid == self.root {
            return Some(PROCESS_FD);
        }
        self.kin[..self.n_kin].iter().find(|k| k.0 == pid).map(|k| k.1)
    }

    /// Takes `pid`, a child of `parent` (known, by `parent_fd`) a moment ago, as a descendant:
    /// true if it was. The pid may have been reused since it was read, so after pidfd_open it
    /// checks that `pid` still names the process of the new pidfd (its fdinfo), that this process's
    /// parent is still `parent`, and that `parent` still names the parent known (its pidfd's
    /// fdinfo: not reaped, so the number was not reused either).
    fn adopt(&mut self, pid: i32, parent: i32, parent_fd: i32) -> bool {
        if self.n_kin == MAX_KIN {
            return false;
        }
        let fd = sys(SYS_PIDFD_OPEN, pid as u64, 0, 0);
        if fd < 0 {
            return false;
        }
        let fd = fd as i32;
        if parent_of(pid) == Some(parent) && pidfd_pid(fd) == Some(pid) && pidfd_pid(parent_fd) == Some(parent) {
            self.kin[self.n_kin] = (pid, fd);
            self.n_kin += 1;
            true
        } else {
            sys(SYS_CLOSE, fd as u64, 0, 0);
            false
        }
    }

    /// One pass over /proc: adopts every process whose parent is known. How many it adopted.
    fn scan_once(&mut self) -> usize {
        let dir = sys(SYS_OPENAT, AT_FDCWD as u64, c"/proc".as_ptr() as u64, O_RDONLY_DIRECTORY_CLOEXEC);
        if dir < 0 {
            return 0;
        }
        let mut found = 0;
        let mut buf = [0u64; 512];
        loop {
            let n = sys(SYS_GETDENTS64, dir as u64, buf.as_mut_ptr() as u64, (buf.len() * 8) as u64);
            if n <= 0 {
                break;
            }
            // SAFETY: getdents64 wrote `n` bytes of linux_dirent64 records into `buf`.
            let bytes = unsafe { core::slice::from_raw_parts(buf.as_ptr() as *const u8, n as usize) };
            let mut at = 0;
            while at + 19 < bytes.len() {
                // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name (NUL-terminated).
                let reclen = u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]) as usize;
                if reclen == 0 {
                    break;
                }
                let name = &bytes[at + 19..(at + reclen).min(bytes.len())];
                at += reclen;
                let Some(pid) = parse(name) else { continue };
                if pid <= 0 || self.known(pid).is_some() {
                    continue;
                }
                let Some(parent) = parent_of(pid) else { continue };
                if let Some(parent_fd) = self.known(parent) {
                    if self.adopt(pid, parent, parent_fd) {
                        found += 1;
                    }
                }
            }
        }
        sys(SYS_CLOSE, dir as u64, 0, 0);
        found
    }

    /// Passes over /proc until one adopts nobody new (bounded): how many it adopted.
    fn scan(&mut self) -> usize {
        if self.root <= 0 {
            return 0;
        }
        let mut total = 0;
        for _ in 0..8 {
            let found = self.scan_once();
            total += found;
            if found == 0 {
                break;
            }
        }
        total
    }

    /// Forgets the descendants that have exited (their pidfds readable).
    fn prune(&mut self) {
        let mut i = 0;
        while i < self.n_kin {
            if exited(self.kin[i].1) {
                sys(SYS_CLOSE, self.kin[i].1 as u64, 0, 0);
                self.n_kin -= 1;
                self.kin[i] = self.kin[self.n_kin];
            } else {
                i += 1;
            }
        }
    }

    /// Receives what the engine sent: RELEASE, HOLD (its fds kept, or closed beyond
    /// [`MAX_HELD`]), or end of file. The byte, 0 for end of file or an error, -1 to try again.
    fn receive(&mut self) -> i32 {
        let mut byte = [0u8; 1];
        let mut iov = IoVec { base: byte.as_mut_ptr(), len: 1 };
        // Room for a header and 8 fds (the engine sends one per message); u64s for alignment.
        let mut control = [0u64; 6];
        let mut msg = MsgHdr {
            name: core::ptr::null_mut(),
            namelen: 0,
            iov: &mut iov,
            iovlen: 1,
            control: control.as_mut_ptr() as *mut u8,
            controllen: control.len() * 8,
            flags: 0,
        };
        let n = sys(SYS_RECVMSG, CHANNEL_FD as u64, &mut msg as *mut MsgHdr as u64, 0);
        if n == -EINTR || n == -EAGAIN {
            return -1;
        }
        // Rights attached to the byte: cmsghdr { u64 len; i32 level; i32 type; fds }.
        if n == 1 && msg.controllen >= 16 {
            let len = (control[0] as usize).min(msg.controllen);
            let (level, kind) = (control[1] as u32 as i32, (control[1] >> 32) as i32);
            if level == SOL_SOCKET && kind == SCM_RIGHTS && len > 16 {
                // SAFETY: `control` holds `len` (<= its size) bytes the kernel wrote; the fds
                // are the i32s after the 16-byte header.
                let fds = unsafe {
                    core::slice::from_raw_parts((control.as_ptr() as *const u8).add(16) as *const i32, (len - 16) / 4)
                };
                for &fd in fds {
                    if byte[0] == HOLD && self.n_uffds < MAX_HELD {
                        self.uffds[self.n_uffds] = fd;
                        self.n_uffds += 1;
                    } else {
                        sys(SYS_CLOSE, fd as u64, 0, 0);
                    }
                }
            }
        }
        if n == 1 {
            byte[0] as i32
        } else {
            0
        }
    }

    /// SIGKILL to the process and every descendant known (by their pidfds: an error means that
    /// one has exited already).
    fn kill_all(&self) {
        sys(SYS_PIDFD_SEND_SIGNAL, PROCESS_FD as u64, SIGKILL, 0);
        for k in &self.kin[..self.n_kin] {
            sys(SYS_PIDFD_SEND_SIGNAL, k.1 as u64, SIGKILL, 0);
        }
    }

    /// The engine is gone: find the process's descendants, kill them and the process, again
    /// until a scan finds nobody new (bounded: a descendant that is not lazy may fork on), then
    /// wait until every one has exited. The userfaultfds are held until then, so a fault taken
    /// meanwhile waits (and dies with the process) instead of reading zeros. If a kill cannot be
    /// sent it retries every second and never exits while one lives: a hung process is
    /// recoverable, one running on zeros is not.
    fn kill_and_wait(&mut self) -> ! {
        for _ in 0..KILL_ROUNDS {
            let found = self.scan();
            self.kill_all();
            if found == 0 {
                break;
            }
        }
        let mut fds = [PollFd { fd: -1, events: POLLIN, revents: 0 }; MAX_KIN + 1];
        loop {
            fds[0] = PollFd { fd: PROCESS_FD, events: POLLIN, revents: 0 };
            for (i, k) in self.kin[..self.n_kin].iter().enumerate() {
                fds[i + 1] = PollFd { fd: k.1, events: POLLIN, revents: 0 };
            }
            let n = self.n_kin + 1;
            poll(&mut fds[..n], 1000);
            // A process is gone once its pidfd is readable.
            if fds[..n].iter().all(|f| f.revents != 0) {
                exit(EXIT_KILLED as u64);
            }
            self.kill_all();
        }
    }
}

#[no_mangle]
pub extern "C" fn tern_main() -> ! {
    // A name for ps, and a session of its own: a signal to the engine's process group (a
    // terminal's ^C, kill -- -PGID) does not reach it; SIGKILL is the only one it does not block.
    sys(SYS_PRCTL, PR_SET_NAME, b"tern-guard\0".as_ptr() as u64, 0);
    sys(SYS_SETSID, 0, 0, 0);
    for fd in [CHANNEL_FD, UFFD_FD, ENGINE_FD, PROCESS_FD] {
        if sys(SYS_FCNTL, fd as u64, F_GETFD, 0) < 0 {
            exit(EXIT_BAD_FDS as u64);
        }
    }
    let mut held = Held { uffds: [-1; MAX_HELD], n_uffds: 0, kin: [(0, -1); MAX_KIN], n_kin: 0, root: 0 };
    // The process's pid as /proc numbers it (no /proc: no descendants found, the process alone
    // is killed).
    held.root = pidfd_pid(PROCESS_FD).filter(|&p| p > 0).unwrap_or(0);
    // Armed: it holds the userfaultfd and watches from here on.
    let armed = [ARMED];
    if sys(SYS_WRITE, CHANNEL_FD as u64, armed.as_ptr() as u64, 1) != 1 {
        exit(EXIT_NOT_ARMED as u64);
    }
    let mut root_exited = false;
    let mut last_scan = now_ms();
    loop {
        let mut fds = [
            PollFd { fd: CHANNEL_FD, events: POLLIN, revents: 0 },
            PollFd { fd: ENGINE_FD, events: POLLIN, revents: 0 },
            PollFd { fd: PROCESS_FD, events: POLLIN, revents: 0 },
        ];
        // Once the process has exited its pidfd stays readable: watched no more.
        let n = if root_exited { 2 } else { 3 };
        let timeout = if held.n_uffds > 0 { (last_scan + SCAN_MS - now_ms()).max(0) } else { -1 };
        let r = poll(&mut fds[..n], timeout);
        if r < 0 {
            if r != -EINTR {
                // ENOMEM: try again shortly; giving up watching is never the answer.
                sleep_ms(10);
            }
            continue;
        }
        if fds[0].revents != 0 {
            match held.receive() {
                -1 => continue,
                b if b == RELEASE as i32 => exit(EXIT_DONE as u64),
                b if b == HOLD as i32 => {}
                // End of file (or anything else) without the release: the engine is gone.
                _ => held.kill_and_wait(),
            }
        }
        if fds[1].revents != 0 {
            held.kill_and_wait();
        }
        if n == 3 && fds[2].revents != 0 {
            // The process exited. Nothing left to guard, unless a child it forked is still
            // lazy: then it guards on (the engine releases it when that child is home or gone).
            if held.n_uffds == 0 {
                exit(EXIT_DONE as u64);
            }
            root_exited = true;
        }
        if held.n_uffds > 0 && now_ms() - last_scan >= SCAN_MS {
            held.prune();
            held.scan();
            last_scan = now_ms();
        }
    }
}
