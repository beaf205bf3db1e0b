//! [`Tracer`]: one dedicated tracer thread per target, driven over a channel.
//!
//! The public methods send a command and block on its reply; the tracer thread owns every ptrace
//! relationship (see the module header of [`crate::ptrace`] for the whole sequence).

use super::{PtraceError, Regs, Stop};
use crate::ptrace;
use crate::remote::{self, MemoryError, RemoteSyscallError, StopSource, SyscallSite};
use crate::sys::{Errno, Pid, Tid};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

fn hex<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{value:#x}"))
}

/// What [`Tracer::freeze`] did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FreezeReport {
    /// Every thread now held in a ptrace-stop, ascending.
    pub threads: Vec<i32>,
    pub elapsed_ns: u64,
}

/// What [`Tracer::thaw`] did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ThawReport {
    pub elapsed_ns: u64,
}

/// What [`Tracer::park_stop`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum ParkOutcome {
    /// A SIGSTOP is now queued for thread `tid` (tgkill): if the tracer dies, the kernel's
    /// automatic detach turns it into a group-stop. Thaw consumes it silently.
    Parked { tid: i32 },
    /// A SIGSTOP someone else sent is already pending: it protects the target the same way and
    /// is the target's own, so it is left alone (thaw lets the process stop, as it would have).
    AlreadyPending,
    /// The process was already in a group-stop when frozen: the kernel re-enters it at any
    /// detach (`SIGNAL_STOP_STOPPED`), so nothing is needed.
    GroupStopped,
}

macro_rules! general_registers {
    ($($field:ident),* $(,)?) => {
        /// Every field of `struct user_regs_struct`, named as in the kernel (camelCase in JSON).
        ///
        /// Serialised as `"0x…"` strings: registers are arbitrary 64-bit values and JSON numbers
        /// lose precision above 2^53 (in TypeScript: `BigInt(regs.rip)`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
        #[serde(rename_all = "camelCase")]
        pub struct GeneralRegisters {
            $(#[serde(serialize_with = "hex")] pub $field: u64,)*
        }

        impl From<&Regs> for GeneralRegisters {
            fn from(r: &Regs) -> Self {
                GeneralRegisters { $($field: r.$field,)* }
            }
        }

        impl From<&GeneralRegisters> for Regs {
            fn from(g: &GeneralRegisters) -> Self {
                Regs { $($field: g.$field,)* }
            }
        }
    };
}

general_registers!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
);

/// The XSAVE area (`NT_X86_XSTATE`) of a thread.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Xstate {
    pub size: usize,
    #[serde(serialize_with = "hex")]
    pub xstate_bv: u64,
    pub bytes: Vec<u8>,
}

/// A thread's rseq registration (`PTRACE_GET_RSEQ_CONFIGURATION`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RseqConfiguration {
    #[serde(serialize_with = "hex")]
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
}

/// One frozen thread's own signal state (see [`Tracer::signals`]).
#[derive(Debug, Clone)]
pub struct ThreadSignals {
    pub tid: i32,
    /// The thread's blocked mask before the engine touched it.
    pub blocked: u64,
    /// A signal it had dequeued when it stopped: its number and raw 128-byte siginfo.
    pub held: Option<(i32, Vec<u8>)>,
}

/// One frozen thread's registers, as they were when it was frozen.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ThreadRegisters {
    pub tid: i32,
    pub regs: GeneralRegisters,
    #[serde(serialize_with = "hex")]
    pub fs_base: u64,
    #[serde(serialize_with = "hex")]
    pub gs_base: u64,
    pub xstate: Xstate,
    /// Stopped inside a syscall (`orig_rax >= 0`); `rax` then holds its (restart) result.
    pub in_syscall: bool,
    pub syscall_nr: Option<i64>,
    /// A signal this thread had dequeued when it stopped; it is delivered at thaw.
    pub held_signal: Option<i32>,
    /// `None` when the kernel has no rseq support or the thread has none registered.
    pub rseq: Option<RseqConfiguration>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn panic_suffix(panic: &Option<String>) -> String {
    crate::remote::panic_suffix(panic)
}

/// [`Tracer::new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: Pid },
    #[error("{tid} is a thread of process {tgid}, not a process id")]
    NotAProcess { tid: Tid, tgid: i32 },
    #[error("pid {pid} is the engine itself; a process cannot trace itself")]
    SelfTrace { pid: Pid },
    #[error("cannot spawn the tracer thread for pid {pid}: {source}")]
    Spawn { pid: Pid, source: std::io::Error },
}

/// [`Tracer::freeze`] failed; the target was left running.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("pid {pid} is already frozen by this tracer")]
    AlreadyFrozen { pid: Pid },
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: Pid },
    #[error("pid {pid} exited while being frozen")]
    ProcessExited { pid: Pid },
    #[error("tid {tid} of pid {pid} is already traced by {tracer} (EPERM): refusing to freeze")]
    AlreadyTraced { pid: Pid, tid: Tid, tracer: i32 },
    #[error("cannot list the threads of pid {pid}: {source}")]
    ListThreads { pid: Pid, source: std::io::Error },
    #[error("freezing pid {pid}: {source}")]
    Ptrace { pid: Pid, source: PtraceError },
    #[error("freezing pid {pid}: waitpid failed: {errno}")]
    Wait { pid: Pid, errno: Errno },
    #[error("the tracer thread of pid {pid} is gone{}", panic_suffix(.panic))]
    TracerGone { pid: Pid, panic: Option<String> },
}

/// [`Tracer::thaw`] failed for some thread; every other thread was still released.
#[derive(Debug, thiserror::Error)]
pub enum ThawError {
    #[error("pid {pid} is not frozen")]
    NotFrozen { pid: Pid },
    #[error("thawing pid {pid}: {source}")]
    Ptrace { pid: Pid, source: PtraceError },
    #[error("the tracer thread of pid {pid} is gone{}", panic_suffix(.panic))]
    TracerGone { pid: Pid, panic: Option<String> },
}

/// [`Tracer::park_stop`] failed; the target stays frozen, nothing was parked.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    #[error("pid {pid} is not frozen: a SIGSTOP is only parked under the ptrace stop")]
    NotFrozen { pid: Pid },
    #[error("pid {pid} has no thread left to park a SIGSTOP on")]
    NoThread { pid: Pid },
    #[error("parking SIGSTOP on tid {tid} of pid {pid}: tgkill failed: {errno}")]
    Kill { pid: Pid, tid: Tid, errno: Errno },
    #[error("the tracer thread of pid {pid} is gone{}", panic_suffix(.panic))]
    TracerGone { pid: Pid, panic: Option<String> },
}

/// [`Tracer::registers`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistersError {
    #[error("pid {pid} is not frozen: registers are only read from a frozen target")]
    NotFrozen { pid: Pid },
    #[error("reading registers of pid {pid}: {source}")]
    Ptrace { pid: Pid, source: PtraceError },
    #[error("the tracer thread of pid {pid} is gone{}", panic_suffix(.panic))]
    TracerGone { pid: Pid, panic: Option<String> },
}

// ---------------------------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------------------------

type Reply<T> = mpsc::Sender<T>;

enum Command {
    Freeze(Reply<Result<FreezeReport, FreezeError>>),
    Thaw(Reply<Result<ThawReport, ThawError>>),
    ParkStop(Reply<Result<ParkOutcome, ParkError>>),
    Registers(Reply<Result<Vec<ThreadRegisters>, RegistersError>>),
    Syscall {
        tid: Option<Tid>,
        nr: i64,
        args: [u64; 6],
        reply: Reply<Result<i64, RemoteSyscallError>>,
    },
    Signals(Reply<Result<Vec<ThreadSignals>, RegistersError>>),
    Run(Box<dyn FnOnce() + Send>),
    Panic(Reply<()>),
}

#[derive(Debug, Default)]
struct Shared {
    frozen: AtomicBool,
    /// A SIGSTOP of ours is parked (see [`Tracer::park_stop`]).
    parked: AtomicBool,
    panic: Mutex<Option<String>>,
}

/// A handle on one target process, served by its own tracer thread. `Send + Sync`.
///
/// Dropping it thaws the target if it is frozen and joins the tracer thread.
#[derive(Debug)]
pub struct Tracer {
    pid: Pid,
    commands: Option<mpsc::Sender<Command>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Freeze(_) => "Freeze",
            Command::Thaw(_) => "Thaw",
            Command::ParkStop(_) => "ParkStop",
            Command::Registers(_) => "Registers",
            Command::Syscall { .. } => "Syscall",
            Command::Signals(_) => "Signals",
            Command::Run(_) => "Run",
            Command::Panic(_) => "Panic",
        })
    }
}

fn read_tgid(pid: Pid) -> std::io::Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status_field(&status, "Tgid:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(pid.as_raw()))
}

impl Tracer {
    /// Spawns the tracer thread for `pid`; attaches nothing yet.
    pub fn new(pid: Pid) -> Result<Tracer, TracerError> {
        if pid == Pid::this() {
            return Err(TracerError::SelfTrace { pid });
        }
        match read_tgid(pid) {
            Ok(tgid) if tgid != pid.as_raw() => {
                return Err(TracerError::NotAProcess { tid: pid, tgid })
            }
            Ok(_) => {}
            Err(_) => return Err(TracerError::NoSuchProcess { pid }),
        }
        let (commands, inbox) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("tern-tracer-{pid}"))
            .spawn(move || serve(pid, inbox, thread_shared))
            .map_err(|source| TracerError::Spawn { pid, source })?;
        Ok(Tracer {
            pid,
            commands: Some(commands),
            shared,
            thread: Some(thread),
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn is_frozen(&self) -> bool {
        self.shared.frozen.load(Ordering::SeqCst)
    }

    fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (reply, answer) = mpsc::channel();
        self.commands.as_ref()?.send(command(reply)).ok()?;
        answer.recv().ok()
    }

    fn panic_message(&self) -> Option<String> {
        self.shared.panic.lock().ok().and_then(|p| p.clone())
    }

    /// Seizes and interrupts every thread, including threads created meanwhile.
    pub fn freeze(&self) -> Result<FreezeReport, FreezeError> {
        self.call(Command::Freeze).unwrap_or_else(|| {
            Err(FreezeError::TracerGone {
                pid: self.pid,
                panic: self.panic_message(),
            })
        })
    }

    /// Restores what we changed, re-injects held signals and detaches every thread.
    pub fn thaw(&self) -> Result<ThawReport, ThawError> {
        self.call(Command::Thaw).unwrap_or_else(|| {
            Err(ThawError::TracerGone {
                pid: self.pid,
                panic: self.panic_message(),
            })
        })
    }

    /// Parks a SIGSTOP under the ptrace stop of the frozen target (see the module header of
    /// [`crate::ptrace`], "Parked SIGSTOP"): from now on, if this process dies, the target lands
    /// in a group-stop instead of running on. [`Tracer::thaw`] (and drop) consume it silently.
    pub fn park_stop(&self) -> Result<ParkOutcome, ParkError> {
        self.call(Command::ParkStop).unwrap_or_else(|| {
            Err(ParkError::TracerGone {
                pid: self.pid,
                panic: self.panic_message(),
            })
        })
    }

    /// Whether a SIGSTOP of ours is parked in the target (the dump leaves it out of the image).
    pub fn has_parked_stop(&self) -> bool {
        self.shared.parked.load(Ordering::SeqCst)
    }

    /// Every frozen thread's registers as they were at the freeze.
    pub fn registers(&self) -> Result<Vec<ThreadRegisters>, RegistersError> {
        self.call(Command::Registers).unwrap_or_else(|| {
            Err(RegistersError::TracerGone {
                pid: self.pid,
                panic: self.panic_message(),
            })
        })
    }

    /// Runs syscall `nr` inside the frozen target (its leader when possible); returns the raw
    /// kernel result, a negative errno on failure.
    pub fn syscall(&self, nr: i64, args: [u64; 6]) -> Result<i64, RemoteSyscallError> {
        self.syscall_in(None, nr, args)
    }

    /// Runs syscall `nr` inside one chosen frozen thread (`None`: as [`Tracer::syscall`] picks).
    /// Per-thread state (sigaltstack, PR_GET_TID_ADDRESS, rseq, ...) is only reachable this way.
    pub fn syscall_in(
        &self,
        tid: Option<Tid>,
        nr: i64,
        args: [u64; 6],
    ) -> Result<i64, RemoteSyscallError> {
        self.call(|reply| Command::Syscall {
            tid,
            nr,
            args,
            reply,
        })
        .unwrap_or_else(|| {
            Err(RemoteSyscallError::TracerGone {
                pid: self.pid,
                panic: self.panic_message(),
            })
        })
    }

    /// Every frozen thread's signal state as the target itself had it: its real blocked mask
    /// (not the all-blocked mask an injection thread runs with) and the siginfo of a signal it
    /// had dequeued when it stopped (a parked signal-delivery-stop).
    pub fn signals(&self) -> Result<Vec<ThreadSignals>, RegistersError> {
        self.call(Command::Signals).unwrap_or_else(|| {
            Err(RegistersError::TracerGone {
                pid: self.pid,
                panic: self.panic_message(),
            })
        })
    }

    /// Runs `f` on the tracer thread, the only thread allowed to issue ptrace requests to the
    /// target's threads (e.g. PTRACE_PEEKSIGINFO). `None` if the tracer thread is gone.
    pub fn on_tracer_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (reply, answer) = mpsc::channel();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = reply.send(f());
        });
        self.commands.as_ref()?.send(Command::Run(job)).ok()?;
        answer.recv().ok()
    }

    /// Reads target memory (`process_vm_readv`, falling back to `/proc/PID/mem`).
    pub fn read_memory(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        remote::read_memory(self.pid, addr, len)
    }

    /// Writes target memory through `/proc/PID/mem` (read-only mappings included).
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        remote::write_memory(self.pid, addr, data)
    }

    /// Test hook: makes the tracer thread panic, to prove the target is released anyway.
    #[doc(hidden)]
    pub fn panic_tracer_thread_for_tests(&self) {
        let _ = self.call(Command::Panic);
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; its state's Drop thaws a frozen target.
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tracer thread
// ---------------------------------------------------------------------------------------------

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn serve(pid: Pid, inbox: mpsc::Receiver<Command>, shared: Arc<Shared>) {
    let mut state = TracerState::new(pid, Arc::clone(&shared));
    while let Ok(command) = inbox.recv() {
        let alive = match command {
            Command::Freeze(reply) => state.guarded(reply, TracerState::freeze, |panic| {
                FreezeError::TracerGone { pid, panic }
            }),
            Command::Thaw(reply) => state.guarded(reply, TracerState::thaw, |panic| {
                ThawError::TracerGone { pid, panic }
            }),
            Command::ParkStop(reply) => state.guarded(reply, TracerState::park_stop, |panic| {
                ParkError::TracerGone { pid, panic }
            }),
            Command::Registers(reply) => state.guarded(reply, TracerState::registers, |panic| {
                RegistersError::TracerGone { pid, panic }
            }),
            Command::Syscall {
                tid,
                nr,
                args,
                reply,
            } => state.guarded(
                reply,
                |s| s.syscall(tid, nr, args),
                |panic| RemoteSyscallError::TracerGone { pid, panic },
            ),
            Command::Signals(reply) => state.guarded(reply, TracerState::signals, |panic| {
                RegistersError::TracerGone { pid, panic }
            }),
            Command::Run(job) => {
                let r: Reply<Result<(), FreezeError>> = mpsc::channel().0;
                state.guarded(
                    r,
                    |_| {
                        job();
                        Ok(())
                    },
                    |panic| FreezeError::TracerGone { pid, panic },
                )
            }
            Command::Panic(reply) => {
                let r: Reply<Result<(), FreezeError>> = mpsc::channel().0;
                let alive = state.guarded(
                    r,
                    |_| panic!("panic requested by a test"),
                    |panic| FreezeError::TracerGone { pid, panic },
                );
                let _ = reply.send(());
                alive
            }
        };
        if !alive {
            break;
        }
    }
    // `state` drops here: a target still frozen is thawed by TracerState::drop.
}

/// One held thread.
#[derive(Debug, Default)]
struct Slot {
    /// Reported a ptrace-stop (false: seized and interrupted, stop not yet collected).
    stopped: bool,
    /// A signal-delivery-stop we keep; detaching with it re-injects it (0: none).
    held_signal: i32,
    /// Registers at the freeze.
    regs: Option<Regs>,
    /// We ran syscalls in it (it now rests in a syscall-exit stop).
    injected: bool,
    /// Its signal mask before we blocked everything for injection.
    saved_sigmask: Option<u64>,
    /// Signals suppressed during injection, re-sent with tgkill before detach.
    resend: Vec<i32>,
}

/// The SIGSTOP of ours queued for one thread while frozen.
#[derive(Debug)]
struct Park {
    tid: Tid,
    /// An injected syscall's thread dequeued it (and we suppressed it): queue it again.
    repark: bool,
    /// SIGCONTs our SIGSTOP flushed (the kernel drops pending SIGCONTs when a stop signal is
    /// sent): re-sent after it is consumed. `None`: the process-wide queue.
    flushed_conts: Vec<Option<Tid>>,
}

struct TracerState {
    pid: Pid,
    shared: Arc<Shared>,
    frozen: bool,
    /// Some thread reported a group-stop during the freeze (the process was stopped).
    group_stopped: bool,
    park: Option<Park>,
    threads: BTreeMap<Tid, Slot>,
    site: SyscallSite,
}

impl Drop for TracerState {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let _ = self.release_all();
        }
    }
}

impl TracerState {
    fn new(pid: Pid, shared: Arc<Shared>) -> TracerState {
        TracerState {
            pid,
            shared,
            frozen: false,
            group_stopped: false,
            park: None,
            threads: BTreeMap::new(),
            site: SyscallSite::new(pid),
        }
    }

    /// Runs one command under `catch_unwind`; on panic releases every thread *before* replying.
    /// Returns whether the thread should keep serving.
    fn guarded<T, E>(
        &mut self,
        reply: Reply<Result<T, E>>,
        op: impl FnOnce(&mut TracerState) -> Result<T, E>,
        gone: impl FnOnce(Option<String>) -> E,
    ) -> bool {
        match catch_unwind(AssertUnwindSafe(|| op(self))) {
            Ok(result) => {
                let _ = reply.send(result);
                true
            }
            Err(payload) => {
                let message = panic_text(payload.as_ref());
                if let Ok(mut slot) = self.shared.panic.lock() {
                    *slot = Some(message.clone());
                }
                let _ = self.release_all();
                let _ = reply.send(Err(gone(Some(message))));
                false
            }
        }
    }

    fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
        self.shared.frozen.store(frozen, Ordering::SeqCst);
    }

    // --- freeze ---------------------------------------------------------------------------

    fn freeze(&mut self) -> Result<FreezeReport, FreezeError> {
        let pid = self.pid;
        if self.frozen {
            return Err(FreezeError::AlreadyFrozen { pid });
        }
        let start = Instant::now();
        self.group_stopped = false;
        let outcome = self.seize_all().and_then(|()| self.save_registers());
        if let Err(e) = outcome {
            let _ = self.release_all();
            return Err(e);
        }
        if self.threads.is_empty() {
            return Err(FreezeError::ProcessExited { pid });
        }
        self.set_frozen(true);
        Ok(FreezeReport {
            threads: self.threads.keys().map(|t| t.as_raw()).collect(),
            elapsed_ns: elapsed_ns(start),
        })
    }

    fn seize_all(&mut self) -> Result<(), FreezeError> {
        let pid = self.pid;
        let mut first_scan = true;
        loop {
            let tids = match list_threads(pid) {
                Ok(tids) if !tids.is_empty() => tids,
                Ok(_) => return Err(FreezeError::ProcessExited { pid }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(if first_scan {
                        FreezeError::NoSuchProcess { pid }
                    } else {
                        FreezeError::ProcessExited { pid }
                    })
                }
                Err(source) => return Err(FreezeError::ListThreads { pid, source }),
            };
            let mut found_new = false;
            for tid in tids {
                if self.threads.contains_key(&tid) {
                    continue;
                }
                if !self.seize_one(tid)? {
                    continue;
                }
                found_new = true;
            }
            self.collect_stops()?;
            if !found_new {
                return Ok(());
            }
            first_scan = false;
        }
    }

    /// Seizes and interrupts `tid`; `Ok(false)` if it is gone or a zombie.
    fn seize_one(&mut self, tid: Tid) -> Result<bool, FreezeError> {
        let pid = self.pid;
        match ptrace::seize(tid) {
            Ok(()) => {}
            Err(e) if e.is_gone() => return Ok(false),
            Err(e) if e.errno == Errno(libc::EPERM) => {
                let status = ThreadStatus::read(pid, tid);
                return match status {
                    None => Ok(false),
                    Some(s) if s.zombie => Ok(false),
                    Some(s) if s.tracer_pid != 0 => Err(FreezeError::AlreadyTraced {
                        pid,
                        tid,
                        tracer: s.tracer_pid,
                    }),
                    Some(_) => Err(FreezeError::Ptrace { pid, source: e }),
                };
            }
            Err(source) => return Err(FreezeError::Ptrace { pid, source }),
        }
        self.threads.insert(tid, Slot::default());
        match ptrace::interrupt(tid) {
            // Gone: its exit is reported by waitpid and collected like any stop.
            Err(e) if !e.is_gone() => Err(FreezeError::Ptrace { pid, source: e }),
            _ => Ok(true),
        }
    }

    /// Waits until every held thread reports a ptrace-stop (or its exit).
    fn collect_stops(&mut self) -> Result<(), FreezeError> {
        let pid = self.pid;
        let mut idle = Duration::from_micros(20);
        let mut idle_total = Duration::ZERO;
        while self.threads.values().any(|s| !s.stopped) {
            match ptrace::wait(-1, libc::WNOHANG) {
                Ok(Some((tid, stop))) => {
                    self.on_freeze_stop(tid, stop)?;
                    idle = Duration::from_micros(20);
                }
                Ok(None) => {
                    // Nothing yet. Stops arrive within microseconds; a thread that never
                    // reports is one that died in a way waitpid will not tell us (a leader
                    // that exited early stays a zombie until the group is gone): prune those.
                    if idle_total > Duration::from_millis(5) {
                        self.prune_dead_pending();
                    }
                    std::thread::sleep(idle);
                    idle_total += idle;
                    idle = (idle * 2).min(Duration::from_millis(2));
                }
                Err(Errno(libc::ECHILD)) => {
                    self.threads.retain(|_, s| s.stopped);
                    return Ok(());
                }
                Err(errno) => return Err(FreezeError::Wait { pid, errno }),
            }
        }
        Ok(())
    }

    fn prune_dead_pending(&mut self) {
        let pid = self.pid;
        self.threads.retain(|&tid, slot| {
            slot.stopped || ThreadStatus::read(pid, tid).is_some_and(|s| !s.zombie)
        });
    }

    fn on_freeze_stop(&mut self, tid: Tid, stop: Stop) -> Result<(), FreezeError> {
        match stop {
            Stop::Exited { .. } | Stop::Killed { .. } => {
                self.threads.remove(&tid);
            }
            Stop::Interrupt => {
                self.threads.entry(tid).or_default().stopped = true;
            }
            Stop::GroupStop { .. } => {
                self.group_stopped = true;
                self.threads.entry(tid).or_default().stopped = true;
            }
            Stop::Signal { signal } => {
                let slot = self.threads.entry(tid).or_default();
                slot.stopped = true;
                slot.held_signal = signal;
            }
            Stop::Event { event } => {
                if event == super::PtraceEvent::Clone {
                    if let Ok(new) = ptrace::get_event_msg(tid) {
                        let new = Tid::from_raw(new as i32);
                        self.threads.entry(new).or_default();
                    }
                }
                self.resume_and_interrupt(tid)?;
            }
            Stop::Syscall => self.resume_and_interrupt(tid)?,
        }
        Ok(())
    }

    /// Any trap consumed our interrupt: let the thread finish what it was doing, ask again.
    fn resume_and_interrupt(&mut self, tid: Tid) -> Result<(), FreezeError> {
        let pid = self.pid;
        if let Some(slot) = self.threads.get_mut(&tid) {
            slot.stopped = false;
        }
        for result in [ptrace::cont(tid, 0), ptrace::interrupt(tid)] {
            match result {
                Err(e) if !e.is_gone() => return Err(FreezeError::Ptrace { pid, source: e }),
                _ => {}
            }
        }
        Ok(())
    }

    fn save_registers(&mut self) -> Result<(), FreezeError> {
        let pid = self.pid;
        let mut gone = Vec::new();
        for (&tid, slot) in self.threads.iter_mut() {
            match ptrace::get_regs(tid) {
                Ok(regs) => slot.regs = Some(regs),
                Err(e) if e.is_gone() => gone.push(tid),
                Err(source) => return Err(FreezeError::Ptrace { pid, source }),
            }
        }
        for tid in gone {
            self.threads.remove(&tid);
        }
        Ok(())
    }

    // --- thaw -----------------------------------------------------------------------------

    fn thaw(&mut self) -> Result<ThawReport, ThawError> {
        if !self.frozen {
            return Err(ThawError::NotFrozen { pid: self.pid });
        }
        let start = Instant::now();
        let outcome = self.release_all();
        outcome.map(|()| ThawReport {
            elapsed_ns: elapsed_ns(start),
        })
    }

    /// Releases every held thread (best effort for all, first real error reported).
    fn release_all(&mut self) -> Result<(), ThawError> {
        let pid = self.pid;
        // Threads seized but not yet stopped cannot be detached: collect their stops first.
        if self.threads.values().any(|s| !s.stopped) {
            let _ = self.collect_stops();
        }
        // Before any thread is detached: a detached thread would dequeue the parked SIGSTOP.
        let mut first_error = self.consume_parked_stop().err().filter(|e| !e.is_gone());
        let threads = std::mem::take(&mut self.threads);
        for (tid, slot) in threads {
            if let Err(e) = self.release_thread(tid, &slot) {
                if !e.is_gone() && first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
        reap_exited();
        self.set_frozen(false);
        match first_error {
            Some(source) => Err(ThawError::Ptrace { pid, source }),
            None => Ok(()),
        }
    }

    fn release_thread(&self, tid: Tid, slot: &Slot) -> Result<(), PtraceError> {
        if let Some(saved) = slot.regs {
            // Injected threads have everything blocked now: judge against their real mask.
            let original_mask = slot.saved_sigmask;
            let needs_check =
                remote::interrupted_syscall(&saved).is_some_and(remote::fails_with_eintr_on_stop);
            let pending = slot.held_signal != 0
                || !slot.resend.is_empty()
                || (needs_check && deliverable_signal_pending(self.pid, tid, original_mask));
            if let Some(regs) = remote::thaw_regs(&saved, slot.injected, pending) {
                ptrace::set_regs(tid, &regs)?;
            }
        }
        if let Some(mask) = slot.saved_sigmask {
            ptrace::set_sigmask(tid, mask)?;
        }
        for &signal in &slot.resend {
            let _ = ptrace::tgkill(self.pid, tid, signal);
        }
        ptrace::detach(tid, slot.held_signal)
    }

    // --- the parked SIGSTOP ---------------------------------------------------------------

    fn park_stop(&mut self) -> Result<ParkOutcome, ParkError> {
        let pid = self.pid;
        if !self.frozen {
            return Err(ParkError::NotFrozen { pid });
        }
        if let Some(park) = &self.park {
            return Ok(ParkOutcome::Parked {
                tid: park.tid.as_raw(),
            });
        }
        if self.group_stopped {
            return Ok(ParkOutcome::GroupStopped);
        }
        let stop = sig_bit(libc::SIGSTOP);
        let foreign = self.threads.iter().any(|(&tid, slot)| {
            slot.held_signal == libc::SIGSTOP
                || ThreadStatus::read(pid, tid).is_some_and(|s| s.pending & stop != 0)
        });
        if foreign {
            return Ok(ParkOutcome::AlreadyPending);
        }
        let tid = self.park_thread().ok_or(ParkError::NoThread { pid })?;
        let flushed_conts = self.pending_conts();
        ptrace::tgkill(pid, tid, libc::SIGSTOP)
            .map_err(|errno| ParkError::Kill { pid, tid, errno })?;
        self.park = Some(Park {
            tid,
            repark: false,
            flushed_conts,
        });
        self.shared.parked.store(true, Ordering::SeqCst);
        Ok(ParkOutcome::Parked {
            tid: tid.as_raw(),
        })
    }

    /// The thread the SIGSTOP is queued for, and that dequeues it again at thaw: one that holds
    /// no signal, is not inside a call with a temporary signal mask (ppoll & co.: the mask
    /// juggling at thaw would make its real mask current), and preferably not the leader (the
    /// usual injection thread, which would dequeue it at every injected syscall).
    fn park_thread(&self) -> Option<Tid> {
        self.threads
            .iter()
            .filter(|(_, s)| s.stopped && s.regs.is_some())
            .min_by_key(|(&tid, s)| {
                let swaps_mask = s
                    .regs
                    .as_ref()
                    .and_then(remote::interrupted_syscall)
                    .is_some_and(swaps_sigmask);
                (s.held_signal != 0, swaps_mask, tid == self.pid, s.injected, tid)
            })
            .map(|(&tid, _)| tid)
    }

    /// Where a SIGCONT is pending now (a SIGSTOP sent now would flush it).
    fn pending_conts(&self) -> Vec<Option<Tid>> {
        let cont = sig_bit(libc::SIGCONT);
        let mut out = Vec::new();
        let mut shared = false;
        for &tid in self.threads.keys() {
            if let Some(s) = ThreadStatus::read(self.pid, tid) {
                if s.private & cont != 0 {
                    out.push(Some(tid));
                }
                shared |= s.shared & cont != 0;
            }
        }
        if shared {
            out.push(None);
        }
        out
    }

    /// After an injected syscall: queue the parked SIGSTOP again if its thread dequeued it.
    fn repark(&mut self) {
        if !self.park.as_ref().is_some_and(|p| p.repark) {
            return;
        }
        let conts = self.pending_conts();
        let pid = self.pid;
        if let Some(park) = self.park.as_mut() {
            park.repark = false;
            for c in conts {
                if !park.flushed_conts.contains(&c) {
                    park.flushed_conts.push(c);
                }
            }
            let _ = ptrace::tgkill(pid, park.tid, libc::SIGSTOP);
        }
    }

    /// Thaw, first step: let the park thread dequeue our SIGSTOP under ptrace and suppress it,
    /// then re-send the SIGCONTs it flushed. Every other thread is still in its ptrace-stop.
    fn consume_parked_stop(&mut self) -> Result<(), PtraceError> {
        let Some(park) = self.park.take() else {
            return Ok(());
        };
        self.shared.parked.store(false, Ordering::SeqCst);
        let result = self.dequeue_parked_stop(park.tid);
        for target in park.flushed_conts {
            match target {
                Some(tid) => {
                    let _ = ptrace::tgkill(self.pid, tid, libc::SIGCONT);
                }
                // SAFETY: kill takes two integers; `pid` is the process this tracer holds.
                None => unsafe {
                    libc::kill(self.pid.as_raw(), libc::SIGCONT);
                },
            }
        }
        result
    }

    fn dequeue_parked_stop(&mut self, tid: Tid) -> Result<(), PtraceError> {
        let pid = self.pid;
        let queued = ThreadStatus::read(pid, tid)
            .is_some_and(|s| s.private & sig_bit(libc::SIGSTOP) != 0);
        let Some(slot) = self.threads.get_mut(&tid).filter(|s| s.stopped) else {
            return Ok(());
        };
        if !queued {
            return Ok(()); // a SIGCONT flushed it meanwhile: nothing to consume
        }
        // A held signal is dropped by PTRACE_CONT(0); its siginfo goes onto the SIGSTOP's stop
        // and the detach with it re-injects it unchanged.
        let held_info = if slot.held_signal != 0 {
            Some(ptrace::get_siginfo(tid)?)
        } else {
            None
        };
        if slot.injected {
            // All signals are blocked already; it must leave its syscall-exit stop with its own
            // registers (thaw sets them again from the SIGSTOP's stop).
            if let Some(regs) = slot.regs.and_then(|r| remote::thaw_regs(&r, true, true)) {
                ptrace::set_regs(tid, &regs)?;
            }
        } else if slot.saved_sigmask.is_none() {
            // Only SIGSTOP (and SIGKILL) can be dequeued now; thaw restores the real mask.
            let mask = ptrace::get_sigmask(tid)?;
            ptrace::set_sigmask(tid, u64::MAX)?;
            slot.saved_sigmask = Some(mask);
        }
        ptrace::cont(tid, 0)?;
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut interrupted = false;
        loop {
            let stop = match ptrace::wait(tid.as_raw(), libc::WNOHANG) {
                Ok(Some((_, stop))) => stop,
                Ok(None) => {
                    if !interrupted && Instant::now() > deadline {
                        // Not there after all (flushed in a race): just stop it again.
                        ptrace::interrupt(tid)?;
                        interrupted = true;
                    }
                    std::thread::sleep(Duration::from_micros(20));
                    continue;
                }
                Err(Errno(libc::ECHILD)) => {
                    self.threads.remove(&tid);
                    return Ok(());
                }
                Err(errno) => {
                    return Err(PtraceError {
                        request: ptrace::Request::Cont,
                        tid,
                        errno,
                    })
                }
            };
            let Some(slot) = self.threads.get_mut(&tid) else {
                return Ok(());
            };
            match stop {
                Stop::Signal { signal } if signal == libc::SIGSTOP => {
                    if let Some(info) = &held_info {
                        ptrace::set_siginfo(tid, info)?;
                    }
                    return Ok(()); // thaw detaches it with its held signal or 0: suppressed
                }
                Stop::Signal { signal } => {
                    slot.resend.push(signal);
                    ptrace::cont(tid, 0)?;
                }
                Stop::Exited { .. } | Stop::Killed { .. } => {
                    self.threads.remove(&tid);
                    return Ok(());
                }
                Stop::Interrupt | Stop::GroupStop { .. } if interrupted => {
                    if slot.held_signal != 0 {
                        slot.resend.push(std::mem::take(&mut slot.held_signal));
                    }
                    return Ok(());
                }
                _ => ptrace::cont(tid, 0)?,
            }
        }
    }

    // --- while frozen ---------------------------------------------------------------------

    fn registers(&mut self) -> Result<Vec<ThreadRegisters>, RegistersError> {
        let pid = self.pid;
        if !self.frozen {
            return Err(RegistersError::NotFrozen { pid });
        }
        let mut out = Vec::with_capacity(self.threads.len());
        for (&tid, slot) in &self.threads {
            let Some(regs) = slot.regs else { continue };
            let xstate = match ptrace::get_xstate(tid) {
                Ok(x) => x,
                Err(e) if e.is_gone() => continue,
                Err(source) => return Err(RegistersError::Ptrace { pid, source }),
            };
            let rseq = ptrace::get_rseq_configuration(tid)
                .ok()
                .filter(|c| c.rseq_abi_pointer != 0)
                .map(|c| RseqConfiguration {
                    rseq_abi_pointer: c.rseq_abi_pointer,
                    rseq_abi_size: c.rseq_abi_size,
                    signature: c.signature,
                    flags: c.flags,
                });
            let syscall_nr = remote::interrupted_syscall(&regs);
            out.push(ThreadRegisters {
                tid: tid.as_raw(),
                regs: GeneralRegisters::from(&regs),
                fs_base: regs.fs_base,
                gs_base: regs.gs_base,
                xstate: Xstate {
                    size: xstate.bytes.len(),
                    xstate_bv: xstate.xstate_bv,
                    bytes: xstate.bytes,
                },
                in_syscall: syscall_nr.is_some(),
                syscall_nr,
                held_signal: (slot.held_signal != 0).then_some(slot.held_signal),
                rseq,
            });
        }
        Ok(out)
    }

    /// The thread syscalls run in: one already used, else the leader, else any thread that
    /// holds no signal, else any.
    fn injection_thread(&self) -> Option<Tid> {
        let candidates = || {
            self.threads
                .iter()
                .filter(|(_, s)| s.stopped && s.regs.is_some())
        };
        candidates()
            .find(|(_, s)| s.injected)
            .or_else(|| candidates().find(|(&t, s)| t == self.pid && s.held_signal == 0))
            .or_else(|| candidates().find(|(_, s)| s.held_signal == 0))
            .or_else(|| candidates().next())
            .map(|(&t, _)| t)
    }

    fn signals(&mut self) -> Result<Vec<ThreadSignals>, RegistersError> {
        let pid = self.pid;
        if !self.frozen {
            return Err(RegistersError::NotFrozen { pid });
        }
        let mut out = Vec::with_capacity(self.threads.len());
        for (&tid, slot) in &self.threads {
            let blocked = match slot.saved_sigmask {
                Some(mask) => mask,
                None => match ptrace::get_sigmask(tid) {
                    Ok(m) => m,
                    Err(e) if e.is_gone() => continue,
                    Err(source) => return Err(RegistersError::Ptrace { pid, source }),
                },
            };
            let held = if slot.held_signal != 0 {
                ptrace::get_siginfo(tid)
                    .ok()
                    .map(|raw| (slot.held_signal, raw))
            } else {
                None
            };
            out.push(ThreadSignals {
                tid: tid.as_raw(),
                blocked,
                held,
            });
        }
        Ok(out)
    }

    fn syscall(
        &mut self,
        tid: Option<Tid>,
        nr: i64,
        args: [u64; 6],
    ) -> Result<i64, RemoteSyscallError> {
        let pid = self.pid;
        if !self.frozen {
            return Err(RemoteSyscallError::NotFrozen { pid });
        }
        let tid = match tid {
            Some(t) if self.threads.get(&t).is_some_and(|s| s.stopped && s.regs.is_some()) => t,
            Some(_) => return Err(RemoteSyscallError::NoThread { pid }),
            None => self
                .injection_thread()
                .ok_or(RemoteSyscallError::NoThread { pid })?,
        };
        let site = self.site.address()?;
        let ptrace_err = |source| RemoteSyscallError::Ptrace { nr, tid, source };
        let slot = self
            .threads
            .get_mut(&tid)
            .ok_or(RemoteSyscallError::NoThread { pid })?;
        if !slot.injected {
            // Block every signal while it runs our syscalls so it dequeues none of the target's
            // (GETSIGMASK returns the real mask even inside ppoll & co.). A held signal cannot
            // stay held once the thread runs: re-send it at thaw.
            let mask = ptrace::get_sigmask(tid).map_err(ptrace_err)?;
            ptrace::set_sigmask(tid, u64::MAX).map_err(ptrace_err)?;
            slot.saved_sigmask = Some(mask);
            if slot.held_signal != 0 {
                slot.resend.push(std::mem::take(&mut slot.held_signal));
            }
            slot.injected = true;
        }
        let saved = slot.regs.ok_or(RemoteSyscallError::NoThread { pid })?;
        let result = remote::inject_syscall(tid, &saved, site, nr, args, self);
        self.repark();
        result
    }
}

impl StopSource for TracerState {
    fn wait_for(&mut self, tid: Tid) -> Result<Stop, Errno> {
        loop {
            let Some((who, stop)) = ptrace::wait(-1, 0)? else {
                continue;
            };
            if who == tid {
                if stop.is_exit() {
                    self.threads.remove(&tid);
                }
                return Ok(stop);
            }
            if stop.is_exit() {
                self.threads.remove(&who);
            }
        }
    }

    fn defer_signal(&mut self, tid: Tid, signal: i32) {
        if let Some(park) = self.park.as_mut().filter(|p| p.tid == tid) {
            if signal == libc::SIGSTOP {
                // Our parked SIGSTOP (private signals are dequeued before shared ones).
                park.repark = true;
                return;
            }
        }
        if let Some(slot) = self.threads.get_mut(&tid) {
            slot.resend.push(signal);
        }
    }
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Reaps tracees that exited meanwhile (their zombies wait for us, the tracer).
fn reap_exited() {
    while let Ok(Some(_)) = ptrace::wait(-1, libc::WNOHANG) {}
}

/// Threads of `pid`, leader first.
fn list_threads(pid: Pid) -> std::io::Result<Vec<Tid>> {
    let mut tids: Vec<Tid> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(Pid::new)
        .collect();
    tids.sort_by_key(|&t| (t != pid, t));
    Ok(tids)
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// The few `/proc/PID/task/TID/status` facts the tracer needs.
#[derive(Debug)]
struct ThreadStatus {
    zombie: bool,
    tracer_pid: i32,
    /// `SigPnd`: the thread's own queue.
    private: u64,
    /// `ShdPnd`: the process-wide queue.
    shared: u64,
    pending: u64,
    blocked: u64,
}

impl ThreadStatus {
    fn read(pid: Pid, tid: Tid) -> Option<ThreadStatus> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
        let mask = |key| {
            status_field(&text, key)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .unwrap_or(0)
        };
        let state = status_field(&text, "State:").unwrap_or("");
        Some(ThreadStatus {
            zombie: state.starts_with('Z') || state.starts_with('X'),
            tracer_pid: status_field(&text, "TracerPid:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            private: mask("SigPnd:"),
            shared: mask("ShdPnd:"),
            pending: mask("SigPnd:") | mask("ShdPnd:"),
            blocked: mask("SigBlk:"),
        })
    }
}

fn sig_bit(signal: i32) -> u64 {
    1u64 << (signal - 1)
}

/// Syscalls that run with a temporary signal mask (restored via TIF_RESTORE_SIGMASK).
fn swaps_sigmask(nr: i64) -> bool {
    matches!(
        nr,
        libc::SYS_ppoll
            | libc::SYS_pselect6
            | libc::SYS_epoll_pwait
            | libc::SYS_epoll_pwait2
            | libc::SYS_rt_sigsuspend
            | 333 // io_pgetevents
    )
}

/// Whether a signal the thread does not block is pending for it (or its process).
fn deliverable_signal_pending(pid: Pid, tid: Tid, mask_override: Option<u64>) -> bool {
    match ThreadStatus::read(pid, tid) {
        Some(s) => s.pending & !mask_override.unwrap_or(s.blocked) != 0,
        None => true, // unknown: keep the kernel's EINTR, the conservative choice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tracer>();
    }

    #[test]
    fn general_registers_round_trip_and_serialize_as_hex() {
        // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
        let mut regs: Regs = unsafe { std::mem::zeroed() };
        regs.rip = 0x7fff_dead_beef;
        regs.orig_rax = u64::MAX;
        regs.fs_base = 0x7f00_0000_0740;
        let general = GeneralRegisters::from(&regs);
        let back = Regs::from(&general);
        assert_eq!(back.rip, regs.rip);
        assert_eq!(back.fs_base, regs.fs_base);
        let json = serde_json::to_value(general).unwrap();
        assert_eq!(json["rip"], "0x7fffdeadbeef");
        assert_eq!(json["origRax"], "0xffffffffffffffff");
        assert_eq!(json["fsBase"], "0x7f0000000740");
    }

    #[test]
    fn reports_serialize_camel_case() {
        let f = serde_json::to_value(FreezeReport {
            threads: vec![1, 2],
            elapsed_ns: 5,
        })
        .unwrap();
        assert_eq!(f, serde_json::json!({"threads": [1, 2], "elapsedNs": 5}));
        let t = serde_json::to_value(ThawReport { elapsed_ns: 7 }).unwrap();
        assert_eq!(t, serde_json::json!({"elapsedNs": 7}));
    }

    #[test]
    fn self_and_missing_pids_are_refused() {
        assert!(matches!(
            Tracer::new(Pid::this()),
            Err(TracerError::SelfTrace { .. })
        ));
        let missing = Pid::new(i32::MAX - 7).unwrap();
        assert!(matches!(
            Tracer::new(missing),
            Err(TracerError::NoSuchProcess { .. })
        ));
    }
}
