//! Process file descriptors: `pidfd_open`, `pidfd_getfd`, and what a pidfd is for afterwards:
//! waiting for the exit (poll), reaping a child (waitid P_PIDFD) and signalling
//! (pidfd_send_signal), all without the pid-reuse race of doing it by pid.
//!
//! # The sequence
//!
//! 1. `pidfd_open(pid, 0)` (Linux 5.3) returns an fd that names the process stably: unlike a pid
//!    it can never come to mean another process after the target exits and its pid is reused.
//! 2. `pidfd_getfd(pidfd, target_fd, 0)` (Linux 5.6) duplicates the target's `target_fd` into the
//!    engine, like an SCM_RIGHTS transfer the target did not have to take part in: same open file
//!    description (offset, flags, socket state), new fd number here, close-on-exec set. It needs
//!    `PTRACE_MODE_ATTACH_REALCREDS` over the target (root, or the tracer). The target's fd is
//!    untouched, so the engine can inspect sockets (TCP repair getsockopts), `tee` pipes, read
//!    eventfd/epoll/timerfd fdinfo, or use a userfaultfd the target created by remote syscall.
//!
//! 3. A pidfd polls readable once the process has exited ([`PidFd::wait_exited`]); for a child of
//!    ours, `waitid(P_PIDFD, fd, WEXITED)` then reaps exactly that child ([`PidFd::reap`]), and
//!    `pidfd_send_signal` signals exactly that process ([`PidFd::send_signal`]) — an error there
//!    means it has exited already, never that another process got the signal.
//!
//! Both fds are [`OwnedFd`]s: dropping them closes them.

use crate::sys::{Errno, Pid};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const SYS_PIDFD_OPEN: libc::c_long = 434;
const SYS_PIDFD_SEND_SIGNAL: libc::c_long = 424;
const SYS_PIDFD_GETFD: libc::c_long = 438;
/// waitid's idtype for a pidfd (Linux 5.4).
const P_PIDFD: libc::idtype_t = 3;

/// How a reaped child ended ([`PidFd::reap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// exit(status).
    Exited(i32),
    /// Killed by this signal.
    Killed(i32),
}

impl std::fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessExit::Exited(status) => write!(f, "exit status {status}"),
            ProcessExit::Killed(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// A failed pidfd operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PidFdError {
    #[error("pidfd_open({pid}) failed: {errno}")]
    Open { pid: Pid, errno: Errno },
    #[error("pidfd_getfd of fd {fd} of pid {pid} failed: {errno}")]
    GetFd { pid: Pid, fd: i32, errno: Errno },
}

/// An open pidfd (closed on drop).
#[derive(Debug)]
pub struct PidFd {
    pid: Pid,
    fd: OwnedFd,
}

/// Wraps a descriptor the kernel just returned.
fn owned(raw: libc::c_long) -> OwnedFd {
    // SAFETY: `raw` is a fresh, valid descriptor returned by a successful syscall and owned by
    // nobody else; OwnedFd takes over closing it exactly once.
    unsafe { OwnedFd::from_raw_fd(raw as RawFd) }
}

impl PidFd {
    /// `pidfd_open(pid, 0)`.
    pub fn open(pid: Pid) -> Result<PidFd, PidFdError> {
        // SAFETY: pidfd_open takes two integers and touches no memory of ours.
        let ret = unsafe { libc::syscall(SYS_PIDFD_OPEN, pid.as_raw(), 0) };
        let raw = Errno::result(ret).map_err(|errno| PidFdError::Open { pid, errno })?;
        Ok(PidFd {
            pid,
            fd: owned(raw),
        })
    }

    /// Takes over a pidfd of `pid` the kernel returned another way (clone3 with CLONE_PIDFD).
    pub(crate) fn from_owned(pid: Pid, fd: OwnedFd) -> PidFd {
        PidFd { pid, fd }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// A second pidfd of the same process (dup).
    pub fn try_clone(&self) -> std::io::Result<PidFd> {
        Ok(PidFd { pid: self.pid, fd: self.fd.try_clone()? })
    }

    /// Waits until the process has exited (the pidfd polls readable), at most `timeout` (None: no
    /// limit; EINTR retried): whether it has.
    pub fn wait_exited(&self, timeout: Option<Duration>) -> Result<bool, Errno> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms = match deadline {
                Some(d) => i32::try_from(d.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(i32::MAX),
                None => -1,
            };
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll on one live pollfd the kernel writes revents into.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            match Errno::result(r) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(Errno(libc::EINTR)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reaps the process, a child of ours, waiting for its exit (`waitid(P_PIDFD, WEXITED |
    /// __WALL)`): how it ended. None when there is nothing to reap here (not our child, or
    /// collected already, e.g. by a `waitpid(-1)`: ECHILD).
    pub fn reap(&self) -> Option<ProcessExit> {
        loop {
            // SAFETY: siginfo_t is plain data the kernel fills; zeroed is a valid initial value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `info` is a live siginfo_t the kernel writes into.
            let r = unsafe {
                libc::waitid(P_PIDFD, self.fd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::__WALL)
            };
            match Errno::result(r) {
                Ok(_) => {
                    // SAFETY: waitid filled `info` for an exited child (si_code CLD_*).
                    let status = unsafe { info.si_status() };
                    return Some(match info.si_code {
                        libc::CLD_EXITED => ProcessExit::Exited(status),
                        _ => ProcessExit::Killed(status),
                    });
                }
                Err(Errno(libc::EINTR)) => continue,
                Err(_) => return None,
            }
        }
    }

    /// `pidfd_send_signal(self, signal)`: Err (ESRCH) once the process has exited.
    pub fn send_signal(&self, signal: i32) -> Result<(), Errno> {
        // SAFETY: pidfd_send_signal with our own pidfd, no siginfo (NULL), no flags.
        let r = unsafe {
            libc::syscall(SYS_PIDFD_SEND_SIGNAL, self.fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        Errno::result(r).map(drop)
    }

    /// `pidfd_getfd(self, target_fd, 0)`: a duplicate of the target's `target_fd`.
    pub fn get_fd(&self, target_fd: i32) -> Result<OwnedFd, PidFdError> {
        let pidfd = self.fd.as_raw_fd();
        // SAFETY: pidfd_getfd takes three integers and touches no memory of ours.
        let ret = unsafe { libc::syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0) };
        let raw = Errno::result(ret).map_err(|errno| PidFdError::GetFd {
            pid: self.pid,
            fd: target_fd,
            errno,
        })?;
        Ok(owned(raw))
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn steals_own_pipe_end() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let pidfd = PidFd::open(Pid::this()).unwrap();
        let dup = pidfd.get_fd(writer.as_raw_fd()).unwrap();
        assert_ne!(dup.as_raw_fd(), writer.as_raw_fd());
        drop(writer);
        let mut dup = std::fs::File::from(dup);
        dup.write_all(b"via pidfd").unwrap();
        drop(dup);
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "via pidfd");
    }

    #[test]
    fn errors_name_the_target() {
        let missing = Pid::new(i32::MAX - 3).unwrap();
        let err = PidFd::open(missing).unwrap_err();
        assert_eq!(
            err,
            PidFdError::Open {
                pid: missing,
                errno: Errno(libc::ESRCH)
            }
        );
        let me = PidFd::open(Pid::this()).unwrap();
        let err = me.get_fd(999_999).unwrap_err();
        assert!(matches!(
            err,
            PidFdError::GetFd {
                fd: 999_999,
                errno: Errno(libc::EBADF),
                ..
            }
        ));
        assert!(err.to_string().contains("fd 999999"));
    }
}
