//! Running syscalls inside a frozen target: compel's technique, without a parasite.
//!
//! # How one syscall is injected
//!
//! The target thread sits in a ptrace-stop (see [`crate::ptrace`]); its registers at the freeze
//! were saved. To make it execute `nr(args...)`:
//! 1. Find a `syscall` instruction (bytes `0f 05`) the thread can execute: the target's `[vdso]`
//!    always contains one (its clock_gettime & co. fall back to real syscalls). Its address comes
//!    from `/proc/PID/maps` and its bytes are read with `process_vm_readv` (or `/proc/PID/mem`);
//!    the address is cached per target and re-checked (two bytes) before use.
//! 2. Build the injection registers from the saved ones ([`injection_regs`]): `rip` = that
//!    instruction, `rax` = nr, arguments in `rdi rsi rdx r10 r8 r9`, and `orig_rax = -1`.
//!    The last one matters: when a thread leaves a ptrace-stop the kernel's signal code applies the
//!    *restart* logic of an interrupted syscall if `orig_rax >= 0`; with -1 it leaves our
//!    registers alone.
//! 3. `PTRACE_SETREGS`, then `PTRACE_SYSCALL` → syscall-enter stop → `PTRACE_SYSCALL` →
//!    syscall-exit stop. Stopping at the exit means the thread never executes a single user
//!    instruction of ours beyond the `syscall` itself (no `int3` trailer needed, unlike
//!    single-stepping, which would also report a SIGTRAP signal-delivery-stop to tidy up).
//!    Signal-delivery-stops seen meanwhile are suppressed and handed back to the tracer, which
//!    re-sends them at thaw (the tracer also blocks all signals in the thread while it runs our
//!    syscalls, so in practice only SIGSTOP can show up here).
//! 4. `PTRACE_GETREGS`: `rax` is the raw kernel return (a negative errno on failure).
//!
//! Between injections the thread rests in its syscall-exit stop; nothing is restored until thaw.
//!
//! # The restart fix-up
//!
//! A thread frozen while blocked in a syscall was pulled out of it by the interrupt: the syscall
//! returned one of the kernel-internal codes below in `rax`, with the syscall number still in
//! `orig_rax` and `rip` just past the `syscall` instruction. What the kernel does with them when
//! the thread resumes without running a signal handler (arch/x86/kernel/signal.c):
//!
//! | `rax`                     | meaning                         | kernel on resume              |
//! |---------------------------|---------------------------------|-------------------------------|
//! | `-ERESTARTSYS` (512)      | restart unless a handler without SA_RESTART runs | `rax = orig_rax; rip -= 2` |
//! | `-ERESTARTNOINTR` (513)   | always restart                  | `rax = orig_rax; rip -= 2`    |
//! | `-ERESTARTNOHAND` (514)   | restart unless a handler runs   | `rax = orig_rax; rip -= 2`    |
//! | `-ERESTART_RESTARTBLOCK` (516) | restart via `restart_syscall` with the remaining time (nanosleep, poll, futex with timeout) | `rax = __NR_restart_syscall; rip -= 2` |
//!
//! The kernel only applies this on the way out of its signal code, i.e. when the thread leaves
//! the interrupt stop it was frozen in. A thread we **never ran** is therefore detached with its
//! registers untouched and the kernel restarts its call exactly (nanosleep keeps its deadline).
//! A thread we **did run** leaves a syscall-exit stop instead, where no restart logic runs, so
//! the saved registers would hand `-512` to user space as a bogus errno. Thaw therefore writes
//! [`resume_fixup`]`(saved)`: the table above applied by us, so the thread re-executes its own
//! `syscall` instruction with its own arguments (still in its registers). ERESTART_RESTARTBLOCK
//! becomes `restart_syscall`, which works in place because the thread's `restart_block` (its
//! remaining timeout) lives in its kernel task and our injected syscalls do not touch it.
//!
//! One more case the table does not cover: some calls (`epoll_wait` & co., see
//! [`fails_with_eintr_on_stop`]) return a plain `-EINTR` when their thread is merely *stopped*,
//! handler or not (man 7 signal), and a ptrace interrupt is such a stop: measured here, a bare
//! seize/interrupt/detach makes a blocked `epoll_wait` fail with EINTR. Thaw re-executes those
//! (`rax = orig_rax, rip -= 2`) for every thread, injected or not ([`thaw_regs`]), unless a signal
//! the thread does not block is pending (`SigPnd | ShdPnd` in /proc): then the EINTR is real and
//! is kept for the handler that is about to run.
//!
//! [`restart_fixup`] is CRIU's table (compel `get_task_regs`) for registers that will run in a
//! *new* task (a restored image): there is no `restart_block` there, so ERESTART_RESTARTBLOCK
//! turns into `-EINTR` (CRIU warns "Will restore with interrupted system call").

mod mem;

pub use mem::{read_memory, write_memory, MemoryError};

use crate::ptrace::{self, PtraceError, Regs, Stop};
use crate::sys::{Errno, Pid, Tid};

pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;
/// Length of the x86-64 `syscall` instruction.
pub const SYSCALL_INSN_LEN: u64 = 2;
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// A failed remote syscall: what failed, in which target or thread.
#[derive(Debug, thiserror::Error)]
pub enum RemoteSyscallError {
    #[error("pid {pid} is not frozen: remote syscalls need a frozen target")]
    NotFrozen { pid: Pid },
    #[error("pid {pid} has no thread left that can run a syscall")]
    NoThread { pid: Pid },
    #[error("cannot read /proc/{pid}/maps to find the vdso: {source}")]
    ReadMaps { pid: Pid, source: std::io::Error },
    #[error("pid {pid} has no [vdso] mapping to borrow a syscall instruction from")]
    NoVdso { pid: Pid },
    #[error("cannot read the [vdso] of pid {pid}: {source}")]
    ReadVdso { pid: Pid, source: MemoryError },
    #[error("no syscall instruction (0f 05) in the [vdso] of pid {pid}")]
    NoSyscallInstruction { pid: Pid },
    #[error("remote syscall {nr} in tid {tid}: {source}")]
    Ptrace {
        nr: i64,
        tid: Tid,
        source: PtraceError,
    },
    #[error("remote syscall {nr} in tid {tid}: waitpid failed: {errno}")]
    Wait { nr: i64, tid: Tid, errno: Errno },
    #[error("remote syscall {nr}: tid {tid} exited ({stop:?}) while running it")]
    TargetExited { nr: i64, tid: Tid, stop: Stop },
    #[error("the tracer thread of pid {pid} is gone{}", panic_suffix(.panic))]
    TracerGone { pid: Pid, panic: Option<String> },
}

pub(crate) fn panic_suffix(panic: &Option<String>) -> String {
    panic
        .as_ref()
        .map(|p| format!(" (it panicked: {p})"))
        .unwrap_or_default()
}

/// What the injector needs from whoever owns the tracees (the tracer thread).
pub trait StopSource {
    /// Blocks until `tid` reports a state change. Events of other tracees that arrive meanwhile
    /// (typically exits, when the target is being killed) are the implementor's to record.
    fn wait_for(&mut self, tid: Tid) -> Result<Stop, Errno>;
    /// `tid` reported a signal-delivery-stop for `signal` while running an injected syscall; it
    /// was suppressed and must be re-sent to `tid` before detaching.
    fn defer_signal(&mut self, tid: Tid, signal: i32);
}

/// Registers that make a stopped thread execute `nr(args)` at `syscall_insn` (pure).
pub fn injection_regs(saved: &Regs, syscall_insn: u64, nr: i64, args: [u64; 6]) -> Regs {
    let mut regs = *saved;
    regs.rip = syscall_insn;
    regs.rax = nr as u64;
    regs.orig_rax = u64::MAX; // -1: "not in a syscall", keeps the restart logic away
    regs.rdi = args[0];
    regs.rsi = args[1];
    regs.rdx = args[2];
    regs.r10 = args[3];
    regs.r8 = args[4];
    regs.r9 = args[5];
    regs
}

/// The syscall a thread was stopped in, if any: `orig_rax >= 0`.
pub fn interrupted_syscall(regs: &Regs) -> Option<i64> {
    let nr = regs.orig_rax as i64;
    (nr >= 0).then_some(nr)
}

fn is_restart_code(rax: i64) -> bool {
    matches!(-rax, ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND)
}

/// CRIU's fix-up, for registers that will be resumed in a new task (a restored image).
///
/// In a syscall with `-ERESTART{SYS,NOINTR,NOHAND}`: `rax = orig_rax, rip -= 2` (re-execute);
/// with `-ERESTART_RESTARTBLOCK`: `rax = -EINTR` (the restart block cannot move). Else unchanged.
pub fn restart_fixup(regs: &Regs) -> Regs {
    let mut out = *regs;
    if interrupted_syscall(regs).is_none() {
        return out;
    }
    let rax = regs.rax as i64;
    if is_restart_code(rax) {
        out.rax = regs.orig_rax;
        out.rip = regs.rip.wrapping_sub(SYSCALL_INSN_LEN);
    } else if rax == -ERESTART_RESTARTBLOCK {
        out.rax = i64::from(-libc::EINTR) as u64;
    }
    out
}

/// The fix-up for resuming the *same* thread in place after syscalls were injected into it.
///
/// Like [`restart_fixup`] but `-ERESTART_RESTARTBLOCK` becomes `rax = __NR_restart_syscall,
/// rip -= 2`: the thread's kernel restart block is intact, so e.g. nanosleep resumes with its
/// remaining time instead of failing with EINTR. This is exactly what the kernel itself would
/// have done had the thread left its original stop.
pub fn resume_fixup(regs: &Regs) -> Regs {
    let mut out = restart_fixup(regs);
    if interrupted_syscall(regs).is_some() && regs.rax as i64 == -ERESTART_RESTARTBLOCK {
        out.rax = libc::SYS_restart_syscall as u64;
        out.rip = regs.rip.wrapping_sub(SYSCALL_INSN_LEN);
    }
    out
}

/// Syscalls that fail with a bare `-EINTR` (not a restart code) when their thread is merely
/// stopped, even with no signal handler involved (man 7 signal, "Interruption of system calls
/// and library functions by stop signals"): a ptrace interrupt is such a stop, so a freeze alone
/// would make them fail spuriously.
pub fn fails_with_eintr_on_stop(nr: i64) -> bool {
    matches!(
        nr,
        libc::SYS_epoll_wait
            | libc::SYS_epoll_pwait
            | libc::SYS_epoll_pwait2
            | libc::SYS_semop
            | libc::SYS_semtimedop
            | libc::SYS_rt_sigtimedwait
            | libc::SYS_accept
            | libc::SYS_accept4
            | libc::SYS_recvfrom
            | libc::SYS_recvmsg
            | libc::SYS_recvmmsg
            | libc::SYS_sendto
            | libc::SYS_sendmsg
            | libc::SYS_sendmmsg
    )
}

/// The registers a frozen thread must get back at thaw, or `None` to leave them untouched (pure).
///
/// - `injected`: we ran syscalls in it, so it leaves a syscall-exit stop where the kernel applies
///   no restart logic: apply [`resume_fixup`] ourselves.
/// - A call interrupted with `-ERESTART_RESTARTBLOCK` (nanosleep, clock_nanosleep, futex and poll
///   with a timeout) is re-executed from its start (`rax = orig_rax, rip -= 2`), injected or not,
///   instead of being left to the kernel's `restart_syscall`: a thread parked in restart_syscall
///   can never be moved (its restart block stays in the source kernel; a later dump could only
///   hand it EINTR), so a freeze must not leave one behind. Known deviation, the same as for a
///   restored process: a relative timeout restarts from its full length. A thread that was
///   already in restart_syscall (an earlier job-control stop), or one about to take a signal
///   (whose handler must see EINTR), keeps the kernel's restart.
/// - A syscall from [`fails_with_eintr_on_stop`] that returned `-EINTR` because of our interrupt
///   is re-executed (`rax = orig_rax, rip -= 2`), unless `signal_pending` says a deliverable signal
///   is waiting: then the EINTR is genuine (a handler is about to run) and is kept. Known
///   deviation: a finite timeout restarts from its full length.
pub fn thaw_regs(saved: &Regs, injected: bool, signal_pending: bool) -> Option<Regs> {
    let mut out = if injected {
        resume_fixup(saved)
    } else {
        *saved
    };
    let eintr = saved.rax as i64 == i64::from(-libc::EINTR);
    let restart_block = saved.rax as i64 == -ERESTART_RESTARTBLOCK;
    if let Some(nr) = interrupted_syscall(saved) {
        let reexecute = (eintr && fails_with_eintr_on_stop(nr) && !signal_pending)
            || (restart_block && nr != libc::SYS_restart_syscall && !signal_pending);
        if reexecute {
            out.rax = saved.orig_rax;
            out.rip = saved.rip.wrapping_sub(SYSCALL_INSN_LEN);
        }
    }
    (injected || !regs_equal(&out, saved)).then_some(out)
}

fn regs_equal(a: &Regs, b: &Regs) -> bool {
    a.rax == b.rax && a.rip == b.rip && a.orig_rax == b.orig_rax
}

/// Offset of the first `syscall` instruction in `code` (pure).
pub fn find_syscall_insn(code: &[u8]) -> Option<usize> {
    code.windows(2).position(|w| w == SYSCALL_INSN)
}

/// The `[start, end)` of the `[vdso]` line of a `/proc/PID/maps` text (pure).
pub fn vdso_range(maps: &str) -> Option<(u64, u64)> {
    let line = maps.lines().find(|l| l.trim_end().ends_with("[vdso]"))?;
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// Where a target's threads can execute a `syscall` instruction; found once, re-checked cheaply.
#[derive(Debug)]
pub struct SyscallSite {
    pid: Pid,
    cached: Option<u64>,
}

impl SyscallSite {
    pub fn new(pid: Pid) -> SyscallSite {
        SyscallSite { pid, cached: None }
    }

    /// The instruction's address: the cached one if its two bytes are still `0f 05`, else a
    /// fresh scan of the vdso.
    pub fn address(&mut self) -> Result<u64, RemoteSyscallError> {
        if let Some(addr) = self.cached {
            if read_memory(self.pid, addr, 2).is_ok_and(|b| b == SYSCALL_INSN) {
                return Ok(addr);
            }
            self.cached = None;
        }
        let addr = self.scan()?;
        self.cached = Some(addr);
        Ok(addr)
    }

    fn scan(&self) -> Result<u64, RemoteSyscallError> {
        let pid = self.pid;
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|source| RemoteSyscallError::ReadMaps { pid, source })?;
        let (start, end) = vdso_range(&maps).ok_or(RemoteSyscallError::NoVdso { pid })?;
        let len = usize::try_from(end - start).unwrap_or(0);
        let code = read_memory(pid, start, len)
            .map_err(|source| RemoteSyscallError::ReadVdso { pid, source })?;
        let offset =
            find_syscall_insn(&code).ok_or(RemoteSyscallError::NoSyscallInstruction { pid })?;
        Ok(start + offset as u64)
    }
}

/// Runs `nr(args)` in the stopped thread `tid`, whose registers at the freeze were `saved`.
///
/// Leaves the thread in its syscall-exit stop with the injection registers; the caller restores
/// (with [`resume_fixup`]) before detaching. Returns the raw kernel return value.
pub fn inject_syscall(
    tid: Tid,
    saved: &Regs,
    syscall_insn: u64,
    nr: i64,
    args: [u64; 6],
    stops: &mut dyn StopSource,
) -> Result<i64, RemoteSyscallError> {
    let ptrace_err = |source| RemoteSyscallError::Ptrace { nr, tid, source };
    let regs = injection_regs(saved, syscall_insn, nr, args);
    ptrace::set_regs(tid, &regs).map_err(ptrace_err)?;
    run_to_syscall_stop(tid, nr, stops)?; // enter
    run_to_syscall_stop(tid, nr, stops)?; // exit
    let after = ptrace::get_regs(tid).map_err(ptrace_err)?;
    Ok(after.rax as i64)
}

/// `PTRACE_SYSCALL` until the next syscall stop, absorbing stops that are not ours.
fn run_to_syscall_stop(
    tid: Tid,
    nr: i64,
    stops: &mut dyn StopSource,
) -> Result<(), RemoteSyscallError> {
    loop {
        ptrace::resume_to_syscall(tid, 0).map_err(|source| RemoteSyscallError::Ptrace {
            nr,
            tid,
            source,
        })?;
        let stop = stops
            .wait_for(tid)
            .map_err(|errno| RemoteSyscallError::Wait { nr, tid, errno })?;
        match stop {
            Stop::Syscall => return Ok(()),
            Stop::Signal { signal } => {
                // Resuming with 0 suppresses it; the tracer re-sends it at thaw.
                stops.defer_signal(tid, signal);
            }
            Stop::Exited { .. } | Stop::Killed { .. } => {
                return Err(RemoteSyscallError::TargetExited { nr, tid, stop })
            }
            Stop::Interrupt | Stop::GroupStop { .. } | Stop::Event { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Regs {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rip = 0x401002;
        r.rsp = 0x7ffd_0000_1000;
        r.rdi = 7;
        r
    }

    fn in_syscall(nr: i64, rax: i64) -> Regs {
        let mut r = regs();
        r.orig_rax = nr as u64;
        r.rax = rax as u64;
        r
    }

    #[test]
    fn restart_codes_reexecute_the_syscall() {
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            let r = in_syscall(libc::SYS_read, -code);
            for fixed in [restart_fixup(&r), resume_fixup(&r)] {
                assert_eq!(fixed.rax, libc::SYS_read as u64, "code {code}");
                assert_eq!(fixed.rip, 0x401000);
                assert_eq!(fixed.orig_rax, libc::SYS_read as u64);
                assert_eq!(fixed.rdi, 7, "arguments stay in place");
                assert_eq!(fixed.rsp, r.rsp);
            }
        }
    }

    #[test]
    fn restart_block_differs_between_image_and_in_place() {
        let r = in_syscall(libc::SYS_nanosleep, -ERESTART_RESTARTBLOCK);
        let image = restart_fixup(&r);
        assert_eq!(image.rax as i64, i64::from(-libc::EINTR));
        assert_eq!(image.rip, r.rip, "CRIU returns EINTR from where it stopped");
        let in_place = resume_fixup(&r);
        assert_eq!(in_place.rax, libc::SYS_restart_syscall as u64);
        assert_eq!(in_place.rip, 0x401000);
    }

    #[test]
    fn other_states_are_untouched() {
        // Stopped in user space: orig_rax = -1, whatever rax holds.
        let mut user = regs();
        user.orig_rax = u64::MAX;
        user.rax = (-ERESTARTSYS) as u64;
        assert_eq!(restart_fixup(&user).rax, user.rax);
        assert_eq!(resume_fixup(&user).rip, user.rip);
        // A syscall that completed (result or a normal errno) is left alone.
        for rax in [
            0,
            5,
            i64::from(-libc::EAGAIN),
            i64::from(-libc::EINTR),
            -515,
            -517,
        ] {
            let r = in_syscall(libc::SYS_read, rax);
            assert_eq!(restart_fixup(&r).rax, r.rax);
            assert_eq!(resume_fixup(&r).rip, r.rip);
        }
    }

    #[test]
    fn thaw_registers() {
        // Untouched thread in a restartable call: the kernel restarts it, leave regs alone.
        let read = in_syscall(libc::SYS_read, -ERESTARTSYS);
        assert!(thaw_regs(&read, false, false).is_none());
        // Injected thread: our fix-up.
        let t = thaw_regs(&read, true, false).unwrap();
        assert_eq!((t.rax, t.rip), (libc::SYS_read as u64, 0x401000));
        let sleep = in_syscall(libc::SYS_nanosleep, -ERESTART_RESTARTBLOCK);
        let t = thaw_regs(&sleep, true, true).unwrap();
        assert_eq!((t.rax, t.rip), (libc::SYS_restart_syscall as u64, 0x401000));
        // A sleep cut by the freeze alone is re-executed, injected or not: no thread is ever left
        // in restart_syscall by a freeze (such a thread could not be migrated later).
        for injected in [false, true] {
            let t = thaw_regs(&sleep, injected, false).unwrap();
            assert_eq!((t.rax, t.rip), (libc::SYS_nanosleep as u64, 0x401000));
        }
        // A signal about to be handled: the kernel's own restart (EINTR for a handler) stays.
        assert!(thaw_regs(&sleep, false, true).is_none());
        // Already inside restart_syscall: only the kernel can restart it, in place.
        let restarting = in_syscall(libc::SYS_restart_syscall, -ERESTART_RESTARTBLOCK);
        assert!(thaw_regs(&restarting, false, false).is_none());
        // epoll_wait's EINTR caused by the freeze: re-execute, injected or not.
        let ep = in_syscall(libc::SYS_epoll_wait, i64::from(-libc::EINTR));
        for injected in [false, true] {
            let t = thaw_regs(&ep, injected, false).unwrap();
            assert_eq!((t.rax, t.rip), (libc::SYS_epoll_wait as u64, 0x401000));
        }
        // ... but not when a signal is pending: that EINTR is real.
        assert!(thaw_regs(&ep, false, true).is_none());
        assert_eq!(thaw_regs(&ep, true, true).unwrap().rax, ep.rax);
        // read() returning EINTR is a genuine result (its freeze code is ERESTARTSYS).
        let r = in_syscall(libc::SYS_read, i64::from(-libc::EINTR));
        assert!(thaw_regs(&r, false, false).is_none());
    }

    #[test]
    fn injection_registers() {
        let r = in_syscall(libc::SYS_futex, -ERESTARTSYS);
        let inj = injection_regs(&r, 0x7fff_1234, libc::SYS_mmap, [1, 2, 3, 4, 5, 6]);
        assert_eq!(inj.rip, 0x7fff_1234);
        assert_eq!(inj.rax, libc::SYS_mmap as u64);
        assert_eq!(inj.orig_rax as i64, -1);
        assert_eq!(
            [inj.rdi, inj.rsi, inj.rdx, inj.r10, inj.r8, inj.r9],
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(inj.rsp, r.rsp);
    }

    #[test]
    fn finds_syscall_and_vdso() {
        assert_eq!(find_syscall_insn(&[0x90, 0x0f, 0x05, 0xc3]), Some(1));
        assert_eq!(find_syscall_insn(&[0x0f, 0x90, 0x05]), None);
        let maps = "55d0-55e0 r-xp 00000000 08:01 1 /bin/x\n\
                    7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]\n";
        assert_eq!(vdso_range(maps), Some((0x7ffd1000, 0x7ffd3000)));
        assert_eq!(vdso_range("0-1 r-xp 0 0 0 [vvar]\n"), None);
    }
}
