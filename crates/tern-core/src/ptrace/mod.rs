//! Freezing a process with ptrace: seize, interrupt, collect stops, read registers, detach.
//!
//! # The whole sequence
//!
//! Ptrace is per *thread* (the kernel calls them tasks) and belongs to the OS thread that
//! attached: only that thread may issue requests to, or `waitpid` for, its tracees. [`Tracer`]
//! therefore owns one dedicated tracer thread per target and sends it commands over a channel.
//!
//! **Freeze.**
//! 1. List `/proc/PID/task`. For every tid not yet held: `PTRACE_SEIZE` with
//!    `PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE` (seize, unlike `PTRACE_ATTACH`, sends no
//!    SIGSTOP, so the target's signal state is untouched), then `PTRACE_INTERRUPT`, which makes
//!    the thread stop at its next return towards user space (a blocked syscall is interrupted with
//!    `-ERESTART*`, see [`crate::remote`] for what that means when it resumes).
//!    - `ESRCH` from seize: the thread exited between the listing and the seize; skip it.
//!    - `EPERM`: a zombie (e.g. a leader that called `pthread_exit`) is skipped; a thread whose
//!      `/proc/TID/status` shows a non-zero `TracerPid` is already traced by someone else and the
//!      freeze fails with [`FreezeError::AlreadyTraced`] after releasing what it holds.
//! 2. Collect stops with `waitpid(-1, __WALL | __WNOTHREAD)` (only this OS thread's tracees are
//!    reported, so several [`Tracer`]s in one process never see each other's events) until every
//!    seized thread sits in a ptrace-stop. Each status is decoded by [`decode_wait_status`]:
//!    - `PTRACE_EVENT_STOP` with SIGTRAP (interrupt) or a stop signal (group-stop): frozen.
//!    - signal-delivery-stop for signal S: the thread had S pending when the interrupt arrived.
//!      It is *kept* in that stop ("parked"): it is as frozen as any other, and detaching it later
//!      with S as the data re-injects S with its original siginfo, so nothing is lost or doubled.
//!    - `PTRACE_EVENT_CLONE`: the thread created a thread while being seized. The new tid
//!      (`PTRACE_GETEVENTMSG`) was auto-attached by `PTRACE_O_TRACECLONE` and will report its
//!      own initial `PTRACE_EVENT_STOP`; it joins the set. Any trap clears a pending interrupt, so
//!      the parent is resumed (`PTRACE_CONT`, 0) and interrupted again, exactly as CRIU's
//!      `compel_wait_task` does. Other event and syscall stops are handled the same way.
//!    - exit (`WIFEXITED`/`WIFSIGNALED`): the thread is gone (the wait reaped it); drop it.
//! 3. Rescan `/proc/PID/task`; repeat 1–2 until a scan shows no new tid. With every known thread
//!    stopped nobody is left to create one, so this terminates after one extra scan normally.
//! 4. Save every thread's registers (`PTRACE_GETREGS`): they are what [`Tracer::registers`]
//!    reports and what thaw puts back.
//!
//! If anything fails mid-way, every thread already seized is waited for and detached before the
//! error is returned: a failed freeze never leaves the target stopped.
//!
//! **While frozen.** Registers (general + `NT_X86_XSTATE` via `PTRACE_GETREGSET`, rseq via
//! `PTRACE_GET_RSEQ_CONFIGURATION`) can be read, memory read and written (`process_vm_readv`,
//! `/proc/PID/mem`), and syscalls run inside the target ([`crate::remote`]). A signal sent to
//! the target now simply stays pending: stopped threads dequeue nothing. The thread used for
//! syscall injection gets all signals blocked (`PTRACE_SETSIGMASK`) while it runs our syscalls, so
//! it does not dequeue them either; signals it still reports (SIGSTOP, which cannot be blocked)
//! are suppressed and re-sent with `tgkill` at thaw. If the target dies (SIGKILL) while frozen,
//! its threads' exits are reaped as they are reported; nothing waits for a thread that is gone.
//!
//! **Thaw.** For every held thread: if syscalls were injected into it, set its registers to the
//! saved ones with the in-place restart fix-up ([`crate::remote::resume_fixup`]) and restore its
//! signal mask; re-send suppressed signals (`tgkill`); then `PTRACE_DETACH` with the parked signal
//! (or 0). Threads we never ran keep their registers untouched: they resume inside the kernel's
//! signal path, which applies the syscall restart itself — except a call that a stop alone makes
//! fail with EINTR (epoll_wait & co.), which is re-executed (see [`crate::remote::thaw_regs`]). A thread that vanished meanwhile
//! (`ESRCH`) is skipped. Detach is attempted for every thread even if one fails.
//!
//! **Failure of the engine.** If the tracer thread panics, the panic is caught, every thread is
//! thawed as above, and later calls fail with `TracerGone`. Dropping a frozen [`Tracer`] thaws it.
//! If the whole engine process dies, the kernel detaches every tracee itself (`exit_ptrace`).

mod stop;
mod tracer;

pub use crate::remote::{MemoryError, RemoteSyscallError};
pub use stop::{decode_wait_status, PtraceEvent, Stop};
pub use tracer::{
    FreezeError, FreezeReport, GeneralRegisters, ParkError, ParkOutcome, RegistersError, RseqConfiguration, ThawError,
    ThawReport, ThreadRegisters, ThreadSignals, Tracer, TracerError, Xstate,
};

use crate::sys::{Errno, Tid};
use std::ffi::c_void;
use std::fmt;
use std::mem::MaybeUninit;

/// The general-purpose register file of a stopped x86-64 thread, as `PTRACE_GETREGS` fills it.
pub type Regs = libc::user_regs_struct;

/// `PTRACE_O_*` options given at seize.
pub const OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE;

/// `NT_X86_XSTATE`: the XSAVE area regset (FPU, SSE, AVX, AVX-512, PKRU, ...).
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Large enough for every XSAVE layout shipped so far (AMX tiles included: ~11 KiB).
const XSTATE_BUF: usize = 16 * 1024;
/// Offset of XSTATE_BV in the XSAVE header (after the 512-byte legacy area).
const XSTATE_BV_OFFSET: usize = 512;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13+), not in every libc.
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// `PTRACE_PEEKSIGINFO_SHARED`: peek the process-wide queue instead of the thread's.
const PEEKSIGINFO_SHARED: u32 = 1;
/// Size of a raw `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;

/// The ptrace requests the engine issues, named for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Seize,
    Interrupt,
    Cont,
    Syscall,
    Detach,
    GetRegs,
    SetRegs,
    GetXstate,
    GetEventMsg,
    GetSigMask,
    SetSigMask,
    GetRseqConfiguration,
    GetSiginfo,
    PeekSiginfo,
    SetXstate,
    SetSiginfo,
}

impl Request {
    fn raw(self) -> libc::c_uint {
        match self {
            Request::Seize => libc::PTRACE_SEIZE,
            Request::Interrupt => libc::PTRACE_INTERRUPT,
            Request::Cont => libc::PTRACE_CONT,
            Request::Syscall => libc::PTRACE_SYSCALL,
            Request::Detach => libc::PTRACE_DETACH,
            Request::GetRegs => libc::PTRACE_GETREGS,
            Request::SetRegs => libc::PTRACE_SETREGS,
            Request::GetXstate => libc::PTRACE_GETREGSET,
            Request::GetEventMsg => libc::PTRACE_GETEVENTMSG,
            Request::GetSigMask => libc::PTRACE_GETSIGMASK,
            Request::SetSigMask => PTRACE_SETSIGMASK,
            Request::GetRseqConfiguration => PTRACE_GET_RSEQ_CONFIGURATION,
            Request::GetSiginfo => libc::PTRACE_GETSIGINFO,
            Request::PeekSiginfo => PTRACE_PEEKSIGINFO,
            Request::SetXstate => libc::PTRACE_SETREGSET,
            Request::SetSiginfo => libc::PTRACE_SETSIGINFO,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Request::Seize => "PTRACE_SEIZE",
            Request::Interrupt => "PTRACE_INTERRUPT",
            Request::Cont => "PTRACE_CONT",
            Request::Syscall => "PTRACE_SYSCALL",
            Request::Detach => "PTRACE_DETACH",
            Request::GetRegs => "PTRACE_GETREGS",
            Request::SetRegs => "PTRACE_SETREGS",
            Request::GetXstate => "PTRACE_GETREGSET(NT_X86_XSTATE)",
            Request::GetEventMsg => "PTRACE_GETEVENTMSG",
            Request::GetSigMask => "PTRACE_GETSIGMASK",
            Request::SetSigMask => "PTRACE_SETSIGMASK",
            Request::GetRseqConfiguration => "PTRACE_GET_RSEQ_CONFIGURATION",
            Request::GetSiginfo => "PTRACE_GETSIGINFO",
            Request::PeekSiginfo => "PTRACE_PEEKSIGINFO",
            Request::SetXstate => "PTRACE_SETREGSET(NT_X86_XSTATE)",
            Request::SetSiginfo => "PTRACE_SETSIGINFO",
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One failed ptrace request: which, on which thread, and the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{request} on tid {tid} failed: {errno}")]
pub struct PtraceError {
    pub request: Request,
    pub tid: Tid,
    pub errno: Errno,
}

impl PtraceError {
    /// The thread no longer exists (or is not stopped under us any more).
    pub fn is_gone(&self) -> bool {
        self.errno == Errno(libc::ESRCH)
    }
}

/// The one place the engine calls `ptrace(2)`.
///
/// # Safety
/// `addr` and `data` must be what `request` expects: null, an integer smuggled as a pointer, or a
/// pointer to memory that is valid (and writable where the kernel writes) for the size the request
/// implies, for the duration of the call.
unsafe fn ptrace_raw(
    request: Request,
    tid: Tid,
    addr: *mut c_void,
    data: *mut c_void,
) -> Result<libc::c_long, PtraceError> {
    // SAFETY: forwarded from the caller's contract on `addr` and `data`.
    let ret = unsafe { libc::ptrace(request.raw(), tid.as_raw(), addr, data) };
    Errno::result(ret).map_err(|errno| PtraceError {
        request,
        tid,
        errno,
    })
}

fn int_arg(value: usize) -> *mut c_void {
    value as *mut c_void
}

/// `PTRACE_SEIZE` with [`OPTIONS`]: attach without stopping and without sending any signal.
pub fn seize(tid: Tid) -> Result<(), PtraceError> {
    // SAFETY: SEIZE takes no address and an options bit mask as data; no memory is accessed.
    unsafe {
        ptrace_raw(
            Request::Seize,
            tid,
            std::ptr::null_mut(),
            int_arg(OPTIONS as usize),
        )
    }
    .map(drop)
}

/// `PTRACE_INTERRUPT`: ask a seized thread to enter a ptrace-stop (reported by `waitpid`).
pub fn interrupt(tid: Tid) -> Result<(), PtraceError> {
    // SAFETY: INTERRUPT ignores addr and data; no memory is accessed.
    unsafe {
        ptrace_raw(
            Request::Interrupt,
            tid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    }
    .map(drop)
}

fn signal_arg(signal: i32) -> *mut c_void {
    int_arg(usize::try_from(signal).unwrap_or(0))
}

/// `PTRACE_CONT`: resume a stopped thread, delivering `signal` (0: none) from a
/// signal-delivery-stop.
pub fn cont(tid: Tid, signal: i32) -> Result<(), PtraceError> {
    // SAFETY: CONT takes a signal number as data; no memory is accessed.
    unsafe { ptrace_raw(Request::Cont, tid, std::ptr::null_mut(), signal_arg(signal)) }.map(drop)
}

/// `PTRACE_SYSCALL`: resume until the next syscall-enter or syscall-exit stop.
pub fn resume_to_syscall(tid: Tid, signal: i32) -> Result<(), PtraceError> {
    // SAFETY: SYSCALL takes a signal number as data; no memory is accessed.
    unsafe {
        ptrace_raw(
            Request::Syscall,
            tid,
            std::ptr::null_mut(),
            signal_arg(signal),
        )
    }
    .map(drop)
}

/// `PTRACE_DETACH`, re-injecting `signal` when the thread sits in a signal-delivery-stop.
///
/// From other stops the kernel treats a non-zero signal differently (syscall stops send it to the
/// thread, event stops drop it), which is why the tracer parks signal-delivery-stops.
pub fn detach(tid: Tid, signal: i32) -> Result<(), PtraceError> {
    // SAFETY: DETACH takes a signal number as data; no memory is accessed.
    unsafe {
        ptrace_raw(
            Request::Detach,
            tid,
            std::ptr::null_mut(),
            signal_arg(signal),
        )
    }
    .map(drop)
}

/// `PTRACE_GETREGS`: the general registers, `fs_base` and `gs_base` included.
pub fn get_regs(tid: Tid) -> Result<Regs, PtraceError> {
    let mut regs = MaybeUninit::<Regs>::uninit();
    // SAFETY: GETREGS writes exactly one user_regs_struct to `data`, which points at one.
    unsafe {
        ptrace_raw(
            Request::GetRegs,
            tid,
            std::ptr::null_mut(),
            regs.as_mut_ptr().cast(),
        )
    }?;
    // SAFETY: the call succeeded, so the kernel filled the whole struct.
    Ok(unsafe { regs.assume_init() })
}

/// `PTRACE_SETREGS`.
pub fn set_regs(tid: Tid, regs: &Regs) -> Result<(), PtraceError> {
    let data = (regs as *const Regs).cast_mut().cast();
    // SAFETY: SETREGS only reads one user_regs_struct from `data`, which points at one.
    unsafe { ptrace_raw(Request::SetRegs, tid, std::ptr::null_mut(), data) }.map(drop)
}

/// The raw XSAVE area of a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawXstate {
    /// As many bytes as the kernel wrote (its XSAVE layout size for this CPU).
    pub bytes: Vec<u8>,
    /// XSTATE_BV from the XSAVE header: which components hold non-init state.
    pub xstate_bv: u64,
}

/// `PTRACE_GETREGSET(NT_X86_XSTATE)`.
pub fn get_xstate(tid: Tid) -> Result<RawXstate, PtraceError> {
    let mut bytes = vec![0u8; XSTATE_BUF];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    let addr = int_arg(NT_X86_XSTATE as usize);
    // SAFETY: GETREGSET writes at most iov_len bytes to iov_base (our buffer, alive for the call)
    // and updates iov_len, and `data` points at that iovec.
    unsafe {
        ptrace_raw(
            Request::GetXstate,
            tid,
            addr,
            (&mut iov as *mut libc::iovec).cast(),
        )
    }?;
    bytes.truncate(iov.iov_len);
    let xstate_bv = bytes
        .get(XSTATE_BV_OFFSET..XSTATE_BV_OFFSET + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0);
    Ok(RawXstate { bytes, xstate_bv })
}

/// `PTRACE_GETEVENTMSG`: after a `PTRACE_EVENT_CLONE` stop, the new thread's tid.
pub fn get_event_msg(tid: Tid) -> Result<u64, PtraceError> {
    let mut msg: libc::c_ulong = 0;
    let data = (&mut msg as *mut libc::c_ulong).cast();
    // SAFETY: GETEVENTMSG writes one unsigned long to `data`, which points at one.
    unsafe { ptrace_raw(Request::GetEventMsg, tid, std::ptr::null_mut(), data) }?;
    Ok(msg)
}

const SIGSET_SIZE: usize = std::mem::size_of::<u64>();

/// `PTRACE_GETSIGMASK`: the thread's blocked-signal mask (bit n-1 = signal n).
pub fn get_sigmask(tid: Tid) -> Result<u64, PtraceError> {
    let mut mask = 0u64;
    let data = (&mut mask as *mut u64).cast();
    // SAFETY: GETSIGMASK writes `addr` (= 8, the kernel sigset size) bytes to `data`, a u64.
    unsafe { ptrace_raw(Request::GetSigMask, tid, int_arg(SIGSET_SIZE), data) }?;
    Ok(mask)
}

/// `PTRACE_SETSIGMASK` (the kernel silently keeps SIGKILL and SIGSTOP unblocked).
pub fn set_sigmask(tid: Tid, mask: u64) -> Result<(), PtraceError> {
    let data = (&mask as *const u64).cast_mut().cast();
    // SAFETY: SETSIGMASK reads `addr` (= 8) bytes from `data`, a u64 alive for the call.
    unsafe { ptrace_raw(Request::SetSigMask, tid, int_arg(SIGSET_SIZE), data) }.map(drop)
}

/// `struct ptrace_rseq_configuration` (include/uapi/linux/ptrace.h).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRseqConfiguration {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`: where the thread's `struct rseq` lives and its signature.
pub fn get_rseq_configuration(tid: Tid) -> Result<RawRseqConfiguration, PtraceError> {
    let mut conf = MaybeUninit::<RawRseqConfiguration>::zeroed();
    let size = std::mem::size_of::<RawRseqConfiguration>();
    // SAFETY: the request writes at most `addr` (= size of the struct) bytes to `data`, which
    // points at a zero-initialised struct of exactly that size.
    unsafe {
        ptrace_raw(
            Request::GetRseqConfiguration,
            tid,
            int_arg(size),
            conf.as_mut_ptr().cast(),
        )
    }?;
    // SAFETY: the struct was zero-initialised (a valid value for all-integer fields) and the kernel
    // only overwrote bytes within it.
    Ok(unsafe { conf.assume_init() })
}

/// `PTRACE_GETSIGINFO`: the raw siginfo of the signal a thread in signal-delivery-stop holds.
pub fn get_siginfo(tid: Tid) -> Result<Vec<u8>, PtraceError> {
    let mut buf = vec![0u8; SIGINFO_SIZE];
    // SAFETY: GETSIGINFO writes one siginfo_t (128 bytes) to `data`, a buffer of that size.
    unsafe {
        ptrace_raw(
            Request::GetSiginfo,
            tid,
            std::ptr::null_mut(),
            buf.as_mut_ptr().cast(),
        )
    }?;
    Ok(buf)
}

/// `PTRACE_SETSIGINFO`: replace the siginfo of the signal a thread in signal-delivery-stop holds
/// (`raw`: a raw siginfo of at most [`SIGINFO_SIZE`] bytes, e.g. one [`get_siginfo`] returned).
pub fn set_siginfo(tid: Tid, raw: &[u8]) -> Result<(), PtraceError> {
    let mut buf = [0u8; SIGINFO_SIZE];
    let n = raw.len().min(SIGINFO_SIZE);
    buf[..n].copy_from_slice(&raw[..n]);
    // SAFETY: SETSIGINFO reads one siginfo_t (128 bytes) from `data`, a local buffer of that size.
    unsafe {
        ptrace_raw(
            Request::SetSiginfo,
            tid,
            std::ptr::null_mut(),
            buf.as_mut_ptr().cast(),
        )
    }
    .map(drop)
}

/// `PTRACE_PEEKSIGINFO`: every queued signal of the thread (`shared`: of the whole process),
/// oldest first, each a raw 128-byte siginfo, without dequeuing anything.
pub fn peek_siginfo(tid: Tid, shared: bool) -> Result<Vec<Vec<u8>>, PtraceError> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const BATCH: usize = 32;
    let mut out = Vec::new();
    loop {
        let mut args = PeekArgs {
            off: out.len() as u64,
            flags: if shared { PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        let mut buf = vec![0u8; SIGINFO_SIZE * BATCH];
        // SAFETY: PEEKSIGINFO reads the args struct at `addr` and writes at most `nr` siginfos
        // (128 bytes each) to `data`, a buffer of exactly that size; both outlive the call.
        let n = unsafe {
            ptrace_raw(
                Request::PeekSiginfo,
                tid,
                (&mut args as *mut PeekArgs).cast(),
                buf.as_mut_ptr().cast(),
            )
        }? as usize;
        for chunk in buf.chunks(SIGINFO_SIZE).take(n) {
            out.push(chunk.to_vec());
        }
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// `PTRACE_SETREGSET(NT_X86_XSTATE)`: loads a raw XSAVE area into a stopped thread.
pub fn set_xstate(tid: Tid, bytes: &[u8]) -> Result<(), PtraceError> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let addr = int_arg(NT_X86_XSTATE as usize);
    // SAFETY: SETREGSET only reads iov_len bytes from iov_base (our slice, alive for the call).
    unsafe {
        ptrace_raw(
            Request::SetXstate,
            tid,
            addr,
            (&mut iov as *mut libc::iovec).cast(),
        )
    }
    .map(drop)
}

/// `waitpid(which, __WALL | __WNOTHREAD | extra)`: `which` is -1 (any tracee of this OS thread) or
/// a tid. Returns `None` only with `WNOHANG` when nothing changed state.
pub fn wait(which: i32, extra_flags: libc::c_int) -> Result<Option<(Tid, Stop)>, Errno> {
    let mut status: libc::c_int = 0;
    let flags = libc::__WALL | libc::__WNOTHREAD | extra_flags;
    loop {
        // SAFETY: waitpid writes one int to `status`, a local that outlives the call.
        let ret = unsafe { libc::waitpid(which, &mut status, flags) };
        match Errno::result(ret) {
            Ok(0) => return Ok(None),
            Ok(tid) => return Ok(Some((Tid::from_raw(tid), decode_wait_status(status)))),
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `tgkill(tgid, tid, signal)`: queue a signal for exactly one thread.
pub fn tgkill(tgid: Tid, tid: Tid, signal: i32) -> Result<(), Errno> {
    // SAFETY: tgkill takes three integers and touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), signal) };
    Errno::result(ret).map(drop)
}
