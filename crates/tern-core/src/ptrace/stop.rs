//! Decoding a `waitpid` status of a seized tracee into what actually happened.
//!
//! Under `PTRACE_SEIZE` with `PTRACE_O_TRACESYSGOOD` the kernel reports (man 2 ptrace):
//! - `WIFEXITED` / `WIFSIGNALED`: the thread is gone;
//! - `WIFSTOPPED` with `status >> 16 == PTRACE_EVENT_STOP`: a group-stop (WSTOPSIG is the stop
//!   signal) or an interrupt / new-thread stop (WSTOPSIG is SIGTRAP);
//! - `WIFSTOPPED` with another non-zero event: a `PTRACE_EVENT_*` stop (clone, exec, ...);
//! - `WIFSTOPPED` with `WSTOPSIG == SIGTRAP | 0x80`: a syscall-enter or syscall-exit stop;
//! - any other `WIFSTOPPED`: a signal-delivery-stop for WSTOPSIG, which the tracer may deliver,
//!   change or suppress when it resumes the thread.

use serde::Serialize;

/// The `PTRACE_EVENT_*` codes found in bits 16..24 of a stop status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PtraceEvent {
    Fork,
    Vfork,
    Clone,
    Exec,
    VforkDone,
    Exit,
    Seccomp,
    Other(i32),
}

impl PtraceEvent {
    fn from_raw(event: i32) -> PtraceEvent {
        match event {
            libc::PTRACE_EVENT_FORK => PtraceEvent::Fork,
            libc::PTRACE_EVENT_VFORK => PtraceEvent::Vfork,
            libc::PTRACE_EVENT_CLONE => PtraceEvent::Clone,
            libc::PTRACE_EVENT_EXEC => PtraceEvent::Exec,
            libc::PTRACE_EVENT_VFORK_DONE => PtraceEvent::VforkDone,
            libc::PTRACE_EVENT_EXIT => PtraceEvent::Exit,
            libc::PTRACE_EVENT_SECCOMP => PtraceEvent::Seccomp,
            other => PtraceEvent::Other(other),
        }
    }
}

/// What a tracee's `waitpid` status means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "kind"
)]
pub enum Stop {
    /// The thread exited with this code.
    Exited { code: i32 },
    /// The thread was killed by this signal.
    Killed { signal: i32, core_dumped: bool },
    /// `PTRACE_EVENT_STOP` with SIGTRAP: the stop `PTRACE_INTERRUPT` asked for, or the first stop
    /// of a thread auto-attached through `PTRACE_O_TRACECLONE`.
    Interrupt,
    /// `PTRACE_EVENT_STOP` with a stop signal: the process is in a group-stop (SIGSTOP & co.).
    GroupStop { signal: i32 },
    /// Any other `PTRACE_EVENT_*` stop.
    Event { event: PtraceEvent },
    /// A syscall-enter or syscall-exit stop (`PTRACE_SYSCALL`, with TRACESYSGOOD).
    Syscall,
    /// A signal-delivery-stop: `signal` is about to be delivered unless the tracer says otherwise.
    Signal { signal: i32 },
}

impl Stop {
    /// The thread no longer exists.
    pub fn is_exit(self) -> bool {
        matches!(self, Stop::Exited { .. } | Stop::Killed { .. })
    }
}

fn is_stop_signal(signal: i32) -> bool {
    matches!(
        signal,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// Decodes a raw `waitpid` status (pure: the tested heart of stop handling).
pub fn decode_wait_status(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        return Stop::Exited {
            code: libc::WEXITSTATUS(status),
        };
    }
    if libc::WIFSIGNALED(status) {
        return Stop::Killed {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        };
    }
    // Only stops remain (we never pass WCONTINUED).
    let signal = libc::WSTOPSIG(status);
    let event = (status >> 16) & 0xff;
    if event == libc::PTRACE_EVENT_STOP {
        return if is_stop_signal(signal) {
            Stop::GroupStop { signal }
        } else {
            Stop::Interrupt
        };
    }
    if event != 0 {
        return Stop::Event {
            event: PtraceEvent::from_raw(event),
        };
    }
    if signal == libc::SIGTRAP | 0x80 {
        return Stop::Syscall;
    }
    Stop::Signal { signal }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(signal: i32, event: i32) -> i32 {
        (event << 16) | (signal << 8) | 0x7f
    }

    #[test]
    fn exits() {
        assert_eq!(decode_wait_status(3 << 8), Stop::Exited { code: 3 });
        assert_eq!(decode_wait_status(0), Stop::Exited { code: 0 });
        assert_eq!(
            decode_wait_status(libc::SIGKILL),
            Stop::Killed {
                signal: libc::SIGKILL,
                core_dumped: false
            }
        );
        assert_eq!(
            decode_wait_status(libc::SIGSEGV | 0x80),
            Stop::Killed {
                signal: libc::SIGSEGV,
                core_dumped: true
            }
        );
    }

    #[test]
    fn event_stops() {
        let ev_stop = libc::PTRACE_EVENT_STOP;
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTRAP, ev_stop)),
            Stop::Interrupt
        );
        assert_eq!(
            decode_wait_status(stopped(libc::SIGSTOP, ev_stop)),
            Stop::GroupStop {
                signal: libc::SIGSTOP
            }
        );
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTSTP, ev_stop)),
            Stop::GroupStop {
                signal: libc::SIGTSTP
            }
        );
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_CLONE)),
            Stop::Event {
                event: PtraceEvent::Clone
            }
        );
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_EXEC)),
            Stop::Event {
                event: PtraceEvent::Exec
            }
        );
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTRAP, 42)),
            Stop::Event {
                event: PtraceEvent::Other(42)
            }
        );
    }

    #[test]
    fn syscall_and_signal_delivery_stops() {
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTRAP | 0x80, 0)),
            Stop::Syscall
        );
        // Without the 0x80 bit a SIGTRAP is an ordinary signal (e.g. a breakpoint).
        assert_eq!(
            decode_wait_status(stopped(libc::SIGTRAP, 0)),
            Stop::Signal {
                signal: libc::SIGTRAP
            }
        );
        assert_eq!(
            decode_wait_status(stopped(libc::SIGUSR1, 0)),
            Stop::Signal {
                signal: libc::SIGUSR1
            }
        );
        // A SIGSTOP outside PTRACE_EVENT_STOP is its signal-delivery-stop, not yet a group-stop.
        assert_eq!(
            decode_wait_status(stopped(libc::SIGSTOP, 0)),
            Stop::Signal {
                signal: libc::SIGSTOP
            }
        );
    }

    #[test]
    fn serializes_with_kind_tag() {
        let json = serde_json::to_string(&Stop::Killed {
            signal: 9,
            core_dumped: false,
        })
        .unwrap();
        assert_eq!(json, r#"{"kind":"killed","signal":9,"coreDumped":false}"#);
    }
}
