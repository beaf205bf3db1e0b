//! tern-guard: keeps a lazily restored process from ever reading a missing page as zeros (see
//! ../guard_protocol.rs for its fds, and tern-core's restore/guard.rs for why). No libc: raw
//! syscalls, its own `_start` (../rt.rs, shared with the stub).
//!
//! It holds a dup of the process's userfaultfd, so the context outlives the engine: if the engine
//! dies, faults on missing pages wait instead of the kernel unregistering the ranges and filling
//! them with zeros. Then it kills the process, waits until it has exited (only then may the
//! context go), and exits. It starts with every signal blocked (the engine blocks them around
//! the clone and exec keeps the mask): only SIGKILL stops it.
#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

#[path = "../rt.rs"]
mod rt;

#[path = "../guard_protocol.rs"]
#[allow(dead_code)]
mod guard_protocol;

use guard_protocol::{
    ARMED, CHANNEL_FD, ENGINE_FD, EXIT_BAD_FDS, EXIT_DONE, EXIT_KILLED, EXIT_NOT_ARMED, PROCESS_FD, RELEASE, UFFD_FD,
};
use rt::{exit, sys, SYS_POLL, SYS_READ, SYS_WRITE};

const SYS_NANOSLEEP: i64 = 35;
const SYS_FCNTL: i64 = 72;
const SYS_SETSID: i64 = 112;
const SYS_PRCTL: i64 = 157;
const SYS_PIDFD_SEND_SIGNAL: i64 = 424;
const F_GETFD: u64 = 1;
const PR_SET_NAME: u64 = 15;
const POLLIN: i16 = 1;
const SIGKILL: u64 = 9;
const EINTR: i64 = 4;
const EAGAIN: i64 = 11;
const ESRCH: i64 = 3;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

/// poll() on `fds`; the number ready or a negative errno.
fn poll(fds: &mut [PollFd], timeout_ms: i64) -> i64 {
    sys(SYS_POLL, fds.as_mut_ptr() as u64, fds.len() as u64, timeout_ms as u64)
}

fn sleep_ms(ms: u64) {
    let ts: [u64; 2] = [ms / 1000, (ms % 1000) * 1_000_000];
    sys(SYS_NANOSLEEP, ts.as_ptr() as u64, 0, 0);
}

/// The engine is gone: kill the process and wait until it has exited. The userfaultfd is held
/// until then, so a fault it takes meanwhile waits (and dies with it) instead of reading zeros.
/// If the kill cannot be sent it retries every second and never exits while the process lives:
/// a hung process is recoverable, one running on zeros is not.
fn kill_and_wait() -> ! {
    loop {
        let r = sys(SYS_PIDFD_SEND_SIGNAL, PROCESS_FD as u64, SIGKILL, 0);
        if r == -ESRCH {
            exit(EXIT_KILLED as u64);
        }
        let mut fds = [PollFd { fd: PROCESS_FD, events: POLLIN, revents: 0 }];
        if poll(&mut fds, 1000) > 0 && fds[0].revents != 0 {
            exit(EXIT_KILLED as u64);
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
    // Armed: it holds the userfaultfd and watches from here on.
    let armed = [ARMED];
    if sys(SYS_WRITE, CHANNEL_FD as u64, armed.as_ptr() as u64, 1) != 1 {
        exit(EXIT_NOT_ARMED as u64);
    }
    loop {
        let mut fds = [
            PollFd { fd: PROCESS_FD, events: POLLIN, revents: 0 },
            PollFd { fd: CHANNEL_FD, events: POLLIN, revents: 0 },
            PollFd { fd: ENGINE_FD, events: POLLIN, revents: 0 },
        ];
        let r = poll(&mut fds, -1);
        if r < 0 {
            if r != -EINTR {
                // ENOMEM: try again shortly; giving up watching is never the answer.
                sleep_ms(10);
            }
            continue;
        }
        if fds[0].revents != 0 {
            // The process exited: there is nothing left to guard.
            exit(EXIT_DONE as u64);
        }
        if fds[1].revents != 0 {
            let mut byte = [0u8; 1];
            let n = sys(SYS_READ, CHANNEL_FD as u64, byte.as_mut_ptr() as u64, 1);
            if n == 1 && byte[0] == RELEASE {
                exit(EXIT_DONE as u64);
            }
            if n == -EINTR || n == -EAGAIN {
                continue;
            }
            // End of file (or anything else) without the release: the engine is gone.
            kill_and_wait();
        }
        if fds[2].revents != 0 {
            kill_and_wait();
        }
    }
}
