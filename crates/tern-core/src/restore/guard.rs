//! The guard of a lazy restore: a tiny process that keeps the restored process from ever running
//! on zeros if the engine dies while its memory is still lazy.
//!
//! # Why
//!
//! Lazy memory (lazy.rs) is a userfaultfd the engine holds. If the engine's process dies (SIGKILL,
//! OOM, crash) while pages are still pending, its fds close; with the last fd of the context the
//! kernel releases it — every range is unregistered, every waiting fault woken — and from then on
//! a missing page is an ordinary anonymous page: it reads as zeros. The migrated process would run
//! on, silently corrupted. The guard holds a second fd of the same context, so it is not released:
//! faults on missing pages wait. Then the guard kills the process, waits until it has exited, and
//! only then exits itself (closing the last fd). The same holds for every child the process forks
//! while its memory is lazy: each has a context of its own (UFFD_EVENT_FORK, lazy.rs), and the
//! lazy thread hands the guard an fd of it ([`Guard::hold`]) before it serves that child; so the
//! guard kills the process's descendants too (a lazy child left alive would wait forever on a
//! missing page, or read zeros once the guard lets go).
//!
//! # The mechanism
//!
//! ```text
//!  engine (restore thread, process stopped)        guard (tern_stub::GUARD_ELF, ~6 KiB)
//!  ----------------------------------------        -------------------------------------------
//!  userfaultfd stolen from the process (lazy.rs)
//!  pidfd_open(engine), pidfd_open(process),
//!  socketpair(AF_UNIX, SOCK_STREAM)
//!  clone3(CLONE_VM|CLONE_VFORK|CLONE_PIDFD) on a    fds placed by the vfork child: 0 channel,
//!   small stack + execveat(memfd, AT_EMPTY_PATH)     3 uffd, 4 engine pidfd, 5 process pidfd;
//!   (stub.rs spawn_program: no fork of the           every signal blocked (only SIGKILL stops it)
//!   engine's page tables)                          prctl(PR_SET_NAME "tern-guard"); setsid();
//!                                                   the process's pid (fdinfo of its pidfd)
//!  poll(channel, guard pidfd), ≤ 2 s    <-- 'A' --  write(0, 'A'): armed
//!  register ranges, start the lazy thread          poll(channel, engine pidfd, process pidfd;
//!  ... detach: the process runs (commit point)           every 200 ms while it holds a child's uffd):
//!  lazy thread, UFFD_EVENT_FORK: before serving      'F' + fd (recvmsg)    -> hold it (≤ 256)
//!   the child, sendmsg 'F' + SCM_RIGHTS(child's      timeout               -> scan /proc for
//!   uffd), non-blocking (≤ 100 ms)   -- 'F' -->                               descendants (pidfds)
//!                                                    process exited        -> exit 0, or guard on
//!                                                                             if it holds a child's
//!  lazy thread, Homed: unregister every range,       'R' on the channel    -> exit 0
//!   close every uffd, then release:  -- 'R' -->      EOF on the channel,
//!   send 'R', close, wait ≤ 1 s, reap                 or the engine exited -> scan /proc, SIGKILL
//!  Exited: release (every served process gone)                                the process and every
//!  Failed, or the Server dropped (a panic): close                             descendant (pidfds),
//!   the channel without 'R': the guard kills the                              again until no new one,
//!   process and its descendants and exits only                                wait for all to exit,
//!   once they are dead                                                        exit 1
//! ```
//!
//! Descendants: the guard reads every process's parent in /proc/PID/stat (this kernel has no
//! /proc/PID/task/TID/children, CONFIG_PROC_CHILDREN) and takes those whose parent is the process
//! or a descendant already taken, each by a pidfd: after pidfd_open it checks (fdinfo `Pid:`) that
//! neither the pid nor the parent's was reused meanwhile, so it only ever signals a process
//! descended from the restored one. It scans every 200 ms while it holds a child's userfaultfd
//! (a descendant whose parent exits is reparented out of the tree; its pidfd keeps it known), and
//! when the engine is gone: scan, kill, scan again until no new one (at most 16 rounds), then
//! wait for every one killed to exit. A process whose context the guard holds cannot fork once
//! the engine is gone (its fork waits for the engine to read the fork event), so the rounds only
//! chase descendants without lazy memory (one that exec'd).
//!
//! The restore waits for "armed" before it goes on, and fails (before the commit point: the source
//! resumes) if the guard cannot be started or does not report within [`ARM_TIMEOUT`]. End of file
//! on the channel covers the engine's death (the kernel closes its fds); the engine's pidfd also
//! covers an engine whose end of the channel leaked into another live process.
//!
//! The guard is a child of the engine's process (of the restore thread, until that thread ends),
//! reaped by [`Guard::release`] or [`Drop`] with waitid(P_PIDFD); if a restore thread's
//! waitpid(-1) collected it first (it exited during the restore), waitid says ECHILD and nothing
//! is left to reap. It never needs the engine's memory: starting it costs a clone + exec of a
//! static ~6 KiB program (see [`Guard::armed_in`]).
//!
//! # Limits
//!
//! - A forked child's context is held from the moment [`Guard::hold`] returns; if the engine
//!   dies between reading the fork event and that send (microseconds), the child may read zeros
//!   until the guard's kill reaches it (milliseconds). The guard holds at most 256 children's
//!   userfaultfds (`guard_protocol::MAX_HELD`, the engine counts any beyond in
//!   `LazyStats::forks_unguarded`) and keeps pidfds of at most 256 live descendants; those
//!   beyond are not protected. It never closes a held userfaultfd before it exits (a child that
//!   exited leaves a small unused context until then).
//! - Descendants are found through /proc (the engine's view of it): without /proc only the
//!   process itself is killed. A descendant whose parent exits within a scan interval (200 ms)
//!   of its birth, before the engine dies, is reparented out of the tree unseen: it is not
//!   killed, and if its memory is lazy it reads zeros once the guard exits. One without lazy
//!   memory may fork between the last scan and the kill: that child escapes (harmless: it has
//!   no lazy memory either).
//! - After the engine's death the process is killed, not kept: nobody could fill its memory any
//!   more (post-copy: the pages still on the source are lost with it — see DESIGN.md).
//! - Only SIGKILL stops the guard; SIGKILLing it while the engine is also gone releases the
//!   context (what the guard exists to prevent). It leaves the engine's process group (setsid),
//!   so a signal to that group does not reach it; a cgroup-wide kill (systemd stopping the
//!   agent's unit) reaches the restored process as well, which then dies with it.

use super::stub::{program_memfd, send, spawn_program};
use crate::pidfd::{PidFd, PidFdError};
use crate::sys::{Errno, Pid};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tern_stub::guard_protocol::{ARMED, CHANNEL_FD, ENGINE_FD, HOLD, MAX_HELD, PROCESS_FD, RELEASE, UFFD_FD};

/// How long the restore waits for the guard to report armed.
pub(crate) const ARM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long releasing (or dropping) a guard waits for it to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long handing a forked child's userfaultfd to the guard may wait for room on the channel
/// (one byte and one fd; the guard reads at once, so it never waits in practice).
const HOLD_TIMEOUT: Duration = Duration::from_millis(100);

/// Starting and arming the guard failed (the lazy restore fails with it).
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("putting the guard program in a memfd: {errno}")]
    Memfd { errno: Errno },
    #[error("opening a pidfd of {what} for the guard: {source}")]
    PidFd { what: &'static str, source: PidFdError },
    #[error("socketpair for the guard: {errno}")]
    Channel { errno: Errno },
    #[error("starting the guard (clone3 + execveat of its memfd): {errno}")]
    Spawn { errno: Errno },
    #[error("waiting for the guard of pid {restored} to report armed: {errno}")]
    Wait { restored: Pid, errno: Errno },
    #[error("the guard of pid {restored} exited before it was armed ({status})")]
    Exited { restored: Pid, status: String },
    #[error("the guard of pid {restored} did not report armed within {waited:?} (killed)")]
    NotArmed { restored: Pid, waited: Duration },
}

/// A running, armed guard (see the module header). [`Guard::release`] when it is no longer
/// needed; dropping it unreleased tells it the engine abandons the process, which it then kills.
#[derive(Debug)]
pub(crate) struct Guard {
    restored: Pid,
    pid: Pid,
    pidfd: PidFd,
    /// The engine's end of the channel (None once released or abandoned).
    channel: Option<OwnedFd>,
    armed_in: Duration,
    /// Forked children's userfaultfds handed over ([`Guard::hold`]).
    held: usize,
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl Guard {
    /// Starts the guard of `restored` holding a dup of `uffd` (its root userfaultfd) and waits
    /// until it reports armed, at most [`ARM_TIMEOUT`]. The calling thread becomes its parent.
    pub(crate) fn arm(restored: Pid, uffd: BorrowedFd<'_>) -> Result<Guard, GuardError> {
        Self::arm_within(restored, uffd, ARM_TIMEOUT)
    }

    fn arm_within(restored: Pid, uffd: BorrowedFd<'_>, timeout: Duration) -> Result<Guard, GuardError> {
        static MEMFD: OnceLock<Result<OwnedFd, Errno>> = OnceLock::new();
        let started = Instant::now();
        let memfd =
            program_memfd(&MEMFD, c"tern-guard", tern_stub::GUARD_ELF).map_err(|errno| GuardError::Memfd { errno })?;
        let engine = PidFd::open(Pid::this()).map_err(|source| GuardError::PidFd { what: "the engine", source })?;
        let process =
            PidFd::open(restored).map_err(|source| GuardError::PidFd { what: "the restored process", source })?;
        let mut pair = [0i32; 2];
        // SAFETY: socketpair writes two fds into `pair`.
        Errno::result(unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr())
        })
        .map_err(|errno| GuardError::Channel { errno })?;
        let channel = owned(pair[0]);
        let theirs = owned(pair[1]);
        let fds = [
            (theirs.as_raw_fd(), CHANNEL_FD),
            (uffd.as_raw_fd(), UFFD_FD),
            (engine.as_raw_fd(), ENGINE_FD),
            (process.as_raw_fd(), PROCESS_FD),
        ];
        let spawned =
            spawn_program(memfd, c"tern-guard", &fds, None, true).map_err(|errno| GuardError::Spawn { errno })?;
        drop((theirs, engine, process));
        let Some(pidfd) = spawned.pidfd else {
            // CLONE_PIDFD always gives one; should it not, the guard cannot be reaped safely
            // later: stop it now, by the pid just returned (it is our child, not yet reaped).
            // SAFETY: kill/waitpid by the pid of the child this thread just created.
            unsafe {
                libc::kill(spawned.pid.as_raw(), libc::SIGKILL);
                libc::waitpid(spawned.pid.as_raw(), std::ptr::null_mut(), libc::__WALL);
            }
            return Err(GuardError::Spawn { errno: Errno(libc::EBADF) });
        };
        let pidfd = PidFd::from_owned(spawned.pid, pidfd);
        let mut guard =
            Guard { restored, pid: spawned.pid, pidfd, channel: Some(channel), armed_in: Duration::ZERO, held: 0 };
        match guard.wait_armed(timeout) {
            Ok(()) => {
                guard.armed_in = started.elapsed();
                Ok(guard)
            }
            Err(e) => {
                // Not armed: it watches nothing yet, so stopping it cannot hurt the process.
                guard.kill();
                let _ = guard.reap();
                guard.channel = None;
                Err(e)
            }
        }
    }

    /// Waits for [`ARMED`] on the channel, or the guard's exit, at most `timeout`.
    fn wait_armed(&self, timeout: Duration) -> Result<(), GuardError> {
        let restored = self.restored;
        let Some(channel) = &self.channel else {
            return Err(GuardError::Wait { restored, errno: Errno(libc::EBADF) });
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [
                libc::pollfd { fd: channel.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: poll on a live array of two pollfds.
            let r =
                unsafe { libc::poll(fds.as_mut_ptr(), 2, i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)) };
            match Errno::result(r) {
                Ok(0) if left.is_zero() => return Err(GuardError::NotArmed { restored, waited: timeout }),
                Ok(0) | Err(Errno(libc::EINTR)) => continue,
                Err(errno) => return Err(GuardError::Wait { restored, errno }),
                Ok(_) => {}
            }
            if fds[0].revents != 0 {
                let mut byte = [0u8; 1];
                // SAFETY: recv of at most one byte into a local buffer, without waiting.
                let n = unsafe { libc::recv(channel.as_raw_fd(), byte.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
                match Errno::result(n) {
                    Ok(1) if byte[0] == ARMED => return Ok(()),
                    Err(Errno(libc::EAGAIN | libc::EINTR)) => continue,
                    Err(errno) => return Err(GuardError::Wait { restored, errno }),
                    // End of file (it exited) or a byte it never sends.
                    Ok(_) => {}
                }
            }
            // It exited (or closed its end, which it only does by exiting).
            let status = self.reap().unwrap_or_else(|| "already reaped".into());
            return Err(GuardError::Exited { restored, status });
        }
    }

    /// The guard's pid.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    /// How long arming took: from the start of [`Guard::arm`] to "armed" read.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn armed_in(&self) -> Duration {
        self.armed_in
    }

    /// Hands the guard the userfaultfd of a child the process forked ([`HOLD`] with the fd in an
    /// SCM_RIGHTS message; the guard gets its own dup): from the moment this returns Ok, that
    /// child's faults wait if the engine dies, and the guard kills it with the process. Never
    /// waits more than [`HOLD_TIMEOUT`]. Err: the guard holds the maximum already (ENOSPC), is
    /// gone (EPIPE, ECONNRESET) or the channel stayed full (EAGAIN): that child is not guarded.
    pub(crate) fn hold(&mut self, uffd: BorrowedFd<'_>) -> Result<(), Errno> {
        let Some(channel) = &self.channel else {
            return Err(Errno(libc::EPIPE));
        };
        if self.held >= MAX_HELD {
            return Err(Errno(libc::ENOSPC));
        }
        let deadline = Instant::now() + HOLD_TIMEOUT;
        loop {
            // MSG_NOSIGNAL: a guard that is gone makes this EPIPE, not SIGPIPE; MSG_DONTWAIT: a
            // full channel is waited for below, boundedly.
            match send(channel, &[HOLD], &[uffd.as_raw_fd()], libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) {
                Ok(1) => {
                    self.held += 1;
                    return Ok(());
                }
                Ok(_) => return Err(Errno(libc::EIO)),
                Err(Errno(libc::EINTR)) => continue,
                Err(Errno(libc::EAGAIN)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Errno(libc::EAGAIN));
                    }
                    let mut pfd = libc::pollfd { fd: channel.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                    // SAFETY: poll on one live pollfd.
                    unsafe { libc::poll(&mut pfd, 1, i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1)) };
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The guard is no longer needed: every page is home and every range unregistered (or the
    /// process has exited). Sends [`RELEASE`], closes the channel, waits for it to exit (at most
    /// [`EXIT_TIMEOUT`]; then it is killed, which is harmless now) and reaps it.
    pub(crate) fn release(mut self) {
        if let Some(channel) = self.channel.take() {
            let byte = [RELEASE];
            // SAFETY: send of one byte from a local buffer; MSG_NOSIGNAL: a guard that already
            // exited (the process did) makes this EPIPE, not SIGPIPE. Nothing to do on failure:
            // closing the channel below says the same or more.
            let _ = unsafe { libc::send(channel.as_raw_fd(), byte.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        }
        if !matches!(self.pidfd.wait_exited(Some(EXIT_TIMEOUT)), Ok(true)) {
            self.kill();
        }
        let _ = self.reap();
    }

    /// SIGKILL to the guard (by its pidfd: it names only this child; an error means it has
    /// exited already).
    fn kill(&self) {
        let _ = self.pidfd.send_signal(libc::SIGKILL);
    }

    /// Reaps the guard (waiting for its exit): how it ended, None if a `waitpid(-1)` of the
    /// restore thread collected it first (see the header).
    fn reap(&self) -> Option<String> {
        self.pidfd.reap().map(|exit| exit.to_string())
    }
}

impl Drop for Guard {
    /// Unreleased: closing the channel tells the guard the engine abandons the process; it kills
    /// the process, waits for its exit and exits. It is reaped here if that takes at most
    /// [`EXIT_TIMEOUT`], else by a thread that waits for it (it must not be killed: it may still
    /// be waiting for the process to die, and its fd is what keeps the process's faults waiting).
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        drop(channel);
        if matches!(self.pidfd.wait_exited(Some(EXIT_TIMEOUT)), Ok(true)) {
            let _ = self.reap();
            return;
        }
        // Without a dup of the pidfd (or the thread) it stays a zombie once it exits, until the
        // engine's process ends: harmless.
        if let Ok(pidfd) = self.pidfd.try_clone() {
            let _ = std::thread::Builder::new().name(format!("tern-guard-{}", self.pid)).spawn(move || {
                if matches!(pidfd.wait_exited(None), Ok(true)) {
                    let _ = pidfd.reap();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::process::{Child, Command};

    /// A userfaultfd of the test process itself (the guard only holds it).
    fn uffd() -> OwnedFd {
        // SAFETY: userfaultfd takes flags only.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        owned(Errno::result(fd).expect("userfaultfd") as RawFd)
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().expect("starting sleep")
    }

    fn exited_within(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    fn alive(pid: Pid) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    }

    #[test]
    fn release_leaves_the_process_and_no_guard() {
        let uffd = uffd();
        let mut child = sleeper();
        let pid = Pid::from_raw(child.id() as i32);
        let mut times = Vec::new();
        for _ in 0..5 {
            let guard = Guard::arm(pid, uffd.as_fd()).expect("arming the guard");
            times.push(guard.armed_in());
            let gpid = guard.pid();
            let comm = std::fs::read_to_string(format!("/proc/{gpid}/comm")).unwrap_or_default();
            assert_eq!(comm.trim(), "tern-guard");
            guard.release();
            assert!(!std::path::Path::new(&format!("/proc/{gpid}")).exists(), "guard {gpid} left behind");
        }
        eprintln!("guard armed in {times:?}");
        assert!(
            exited_within(&mut child, Duration::from_millis(200)).is_none(),
            "the released guard killed the process"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn dropped_unreleased_kills_the_process() {
        let uffd = uffd();
        let mut child = sleeper();
        let pid = Pid::from_raw(child.id() as i32);
        let guard = Guard::arm(pid, uffd.as_fd()).expect("arming the guard");
        let gpid = guard.pid();
        assert!(alive(pid));
        drop(guard);
        let status = exited_within(&mut child, Duration::from_secs(2)).expect("the process was not killed");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!std::path::Path::new(&format!("/proc/{gpid}")).exists(), "guard {gpid} left behind");
    }

    #[test]
    fn guard_exits_with_the_process() {
        let uffd = uffd();
        let mut child = sleeper();
        let pid = Pid::from_raw(child.id() as i32);
        let guard = Guard::arm(pid, uffd.as_fd()).expect("arming the guard");
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            guard.pidfd.wait_exited(Some(Duration::from_secs(2))).unwrap(),
            "the guard outlived the process"
        );
        guard.release();
    }

    #[test]
    fn a_guard_for_a_gone_process_is_an_error() {
        let uffd = uffd();
        let mut child = sleeper();
        let pid = Pid::from_raw(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        let err = Guard::arm(pid, uffd.as_fd()).unwrap_err();
        assert!(matches!(err, GuardError::PidFd { what: "the restored process", .. }), "{err}");
    }
}
