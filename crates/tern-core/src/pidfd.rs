//! Process file descriptors: `pidfd_open` and `pidfd_getfd`.
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
//! Both fds are [`OwnedFd`]s: dropping them closes them.

use crate::sys::{Errno, Pid};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const SYS_PIDFD_OPEN: libc::c_long = 434;
const SYS_PIDFD_GETFD: libc::c_long = 438;

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

    pub fn pid(&self) -> Pid {
        self.pid
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
