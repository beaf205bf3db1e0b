//! The restore driver: everything after the checks runs here, on the restore thread.
use super::guard::Guard;
use super::lazy::{self, LazyHandle, LazyOptions, LazySource, LazySummary};
use super::stub::{self, CloneArgs};
use super::{RestoreError, RestoreOptions, RestoreTimings, RestoredProcess};
use crate::image::mm::{fnv1a, VmaImage};
use crate::image::{FileIdentity, ProcessImage};
use crate::pages::{PageRun, PageStore, PAGE_SIZE};
use crate::proc::{self, VmaKind};
use crate::ptrace::{self, PtraceError, Regs, Stop};
use crate::remote::{self, StopSource};
use crate::sys::{Errno, Pid, Tid};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// The trampoline: `syscall; int3` at 0 (single remote syscalls), the batch runner at
/// [`BATCH_CODE_OFF`], scratch space for single calls from [`SCRATCH_OFF`], batch tables and
/// their data from [`BATCH_OFF`] to the end.
const TRAMPOLINE_LEN: u64 = 16 * PAGE_SIZE as u64;
/// `syscall; int3`.
const TRAMPOLINE_CODE: [u8; 3] = [0x0f, 0x05, 0xcc];
const BATCH_CODE_OFF: u64 = 16;
const SCRATCH_OFF: u64 = 256;
const BATCH_OFF: u64 = 2 * PAGE_SIZE as u64;
/// One batch table entry: nr, six arguments, the result (u64 each).
const BATCH_ENTRY: u64 = 64;
/// What a batch entry's result holds until the call has run (not a value any syscall returns).
const BATCH_NOT_RUN: u64 = 0xdead_0000_0000_beef;
const PAGE: u64 = PAGE_SIZE as u64;
const SEIZE_OPTIONS: i32 =
    libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const SYS_RSEQ: i64 = 334;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;

// The batch runner, copied into the trampoline (never executed in the engine: it is data in
// .rodata, assembled by rustc so that no hand-encoded bytes are needed). With r12 = the first
// table entry, r13 = the end of the table, r14 = the tgid, r15 = the tid, it runs every entry's
// syscall in order, stores each result in the entry and stops at the first error (a result in
// -4095..-1); then it stops itself with tgkill(tgid, tid, SIGTRAP), which the tracer sees as a
// signal-delivery-stop and suppresses. r12 then points past the last entry run.
//
// Why tgkill and not int3: int3 raises a *forced* SIGTRAP, and the kernel resets a forced
// signal's disposition to SIG_DFL when the process ignores it; a plain queued signal changes
// nothing, and a traced task's signals always reach the tracer (even ignored ones). SIGTRAP is
// the only signal unblocked while a batch runs (PTRACE_SETSIGMASK), so nothing else is
// delivered; a fault in the code would be a forced signal, which the runner treats as failure.
// If resumed without new registers, the runner only stops itself again.
core::arch::global_asm!(
    ".pushsection .rodata.tern_restore_batch,\"a\",@progbits",
    ".balign 16",
    ".globl tern_restore_batch_start",
    ".hidden tern_restore_batch_start",
    ".globl tern_restore_batch_end",
    ".hidden tern_restore_batch_end",
    "tern_restore_batch_start:",
    "2:",
    "cmp r12, r13",
    "jae 3f",
    "mov rax, qword ptr [r12]",
    "mov rdi, qword ptr [r12 + 8]",
    "mov rsi, qword ptr [r12 + 16]",
    "mov rdx, qword ptr [r12 + 24]",
    "mov r10, qword ptr [r12 + 32]",
    "mov r8, qword ptr [r12 + 40]",
    "mov r9, qword ptr [r12 + 48]",
    "syscall",
    "mov qword ptr [r12 + 56], rax",
    "add r12, 64",
    "cmp rax, -4095",
    "jb 2b",
    "3:",
    "mov eax, 234", // tgkill
    "mov rdi, r14",
    "mov rsi, r15",
    "mov edx, 5", // SIGTRAP
    "syscall",
    "jmp 3b",
    "tern_restore_batch_end:",
    ".popsection",
);

extern "C" {
    static tern_restore_batch_start: u8;
    static tern_restore_batch_end: u8;
}

/// The batch runner's machine code.
fn batch_code() -> &'static [u8] {
    // SAFETY: both symbols are defined by the global_asm above, in one read-only section, the
    // start before the end; the bytes between them are the assembled instructions, initialised
    // and never written.
    unsafe {
        let start = std::ptr::addr_of!(tern_restore_batch_start);
        let end = std::ptr::addr_of!(tern_restore_batch_end);
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// One syscall of a batch. With `data`, its bytes are placed in the trampoline next to the table
/// and their address replaces `args[data.0]`.
#[derive(Debug)]
struct Call {
    /// What it is, for the error when it fails.
    what: String,
    nr: i64,
    args: [u64; 6],
    data: Option<(usize, Vec<u8>)>,
}

impl Call {
    fn new(what: impl Into<String>, nr: i64, args: [u64; 6]) -> Call {
        Call { what: what.into(), nr, args, data: None }
    }

    fn with_data(mut self, arg: usize, data: impl Into<Vec<u8>>) -> Call {
        self.data = Some((arg, data.into()));
        self
    }

    fn data_len(&self) -> u64 {
        self.data.as_ref().map_or(0, |(_, d)| (d.len() as u64).next_multiple_of(8))
    }
}

/// Calls packed into a batch area: the table, then the calls' data.
struct Packed {
    /// How many of the calls fit.
    n: usize,
    bytes: Vec<u8>,
    /// The end of the table (where the data starts).
    end: u64,
}

/// Packs as many of `calls` as fit into `room` bytes at `table` (at least one, or an error).
fn pack(calls: &[Call], table: u64, room: u64) -> Result<Packed, BatchError> {
    let mut n = 0usize;
    let mut data_len = 0u64;
    while let Some(c) = calls.get(n) {
        if (n as u64 + 1) * BATCH_ENTRY + data_len + c.data_len() > room {
            break;
        }
        data_len += c.data_len();
        n += 1;
    }
    if n == 0 && !calls.is_empty() {
        let c = &calls[0];
        return Err(BatchError::Restore(RestoreError::at(
            c.what.clone(),
            format!("{} bytes of arguments do not fit the trampoline", c.data_len()),
        )));
    }
    let end = table + n as u64 * BATCH_ENTRY;
    let mut bytes = Vec::with_capacity((n as u64 * BATCH_ENTRY + data_len) as usize);
    let mut data = Vec::with_capacity(data_len as usize);
    for c in &calls[..n] {
        let mut args = c.args;
        if let Some((arg, d)) = &c.data {
            args[*arg] = end + data.len() as u64;
            data.extend_from_slice(d);
            data.resize(data.len().next_multiple_of(8), 0);
        }
        bytes.extend_from_slice(&c.nr.to_le_bytes());
        for a in args {
            bytes.extend_from_slice(&a.to_le_bytes());
        }
        bytes.extend_from_slice(&BATCH_NOT_RUN.to_le_bytes());
    }
    bytes.extend_from_slice(&data);
    Ok(Packed { n, bytes, end })
}

/// A batch error as a restore error naming the call that failed.
fn named(calls: &[Call], e: BatchError) -> RestoreError {
    match e {
        BatchError::Call { index, errno } => RestoreError::at(calls[index].what.clone(), errno),
        BatchError::Restore(e) => e,
    }
}

/// A batch stopped at a call.
#[derive(Debug)]
enum BatchError {
    /// `calls[index]` returned `errno` (every call before it succeeded, none after it ran).
    Call { index: usize, errno: Errno },
    Restore(RestoreError),
}

fn ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Checks before anything is created
// ---------------------------------------------------------------------------------------------

fn identity_of(path: &str, target: &std::path::Path) -> Result<FileIdentity, RestoreError> {
    FileIdentity::of(path, target).map_err(|source| RestoreError::FileMissing {
        path: path.to_owned(),
        source,
    })
}

fn check_file(expected: &FileIdentity, found: FileIdentity) -> Result<(), RestoreError> {
    if expected.same_content(&found) {
        Ok(())
    } else {
        Err(RestoreError::FileChanged {
            path: expected.path.clone(),
            expected: expected.clone(),
            found,
        })
    }
}

/// The engine's own special mappings: (kind, start, end).
fn own_specials() -> Result<Vec<(VmaKind, u64, u64)>, RestoreError> {
    let vmas = proc::maps::read_maps(Pid::this()).map_err(|e| RestoreError::at("reading own maps", e))?;
    Ok(vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
        .map(|v| (v.kind, v.start, v.end))
        .collect())
}

fn image_specials(image: &ProcessImage) -> Vec<(VmaKind, u64, u64)> {
    image
        .mm
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
        .map(|v| (v.kind, v.start, v.end))
        .collect()
}

/// Same kinds, same sizes, same relative layout (vdso code addresses vvar data RIP-relative).
fn compare_specials(
    here: &[(VmaKind, u64, u64)],
    there: &[(VmaKind, u64, u64)],
) -> Result<(), RestoreError> {
    let describe = |v: &[(VmaKind, u64, u64)]| {
        v.iter()
            .map(|(k, s, e)| format!("{}:{:#x}", k.name(), e - s))
            .collect::<Vec<_>>()
            .join(",")
    };
    let same_shape = here.len() == there.len()
        && here.iter().zip(there).all(|(a, b)| a.0 == b.0 && a.2 - a.1 == b.2 - b.1)
        && here
            .iter()
            .zip(there)
            .all(|(a, b)| a.1.wrapping_sub(here[0].1) == b.1.wrapping_sub(there[0].1));
    if same_shape {
        Ok(())
    } else {
        Err(RestoreError::VdsoMismatch(format!(
            "layout here [{}], image [{}]",
            describe(here),
            describe(there)
        )))
    }
}

pub(crate) fn precheck(image: &ProcessImage) -> Result<(), RestoreError> {
    let pid = image.source.ns_pid;
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    if r == 0 || Errno::last() != Errno(libc::ESRCH) {
        return Err(RestoreError::PidTaken { pid });
    }
    if image.leader().is_none() {
        return Err(RestoreError::Unsupported("the image has no leader thread".into()));
    }
    if let Some(exe) = &image.task.exe {
        check_file(exe, identity_of(&exe.path, exe.path.as_ref())?)?;
    }
    for v in &image.mm.vmas {
        if let Some(f) = &v.file {
            check_file(f, identity_of(&f.path, f.path.as_ref())?)?;
        }
    }
    let own = own_vdso()?;
    compare_specials(&own.specials, &image_specials(image))?;
    if own.hash.is_some_and(|h| h != image.mm.vdso_hash) {
        return Err(RestoreError::VdsoMismatch(
            "vdso contents differ (another kernel build)".into(),
        ));
    }
    Ok(())
}

/// The engine's own vdso & co. and the vdso's hash.
#[derive(Debug)]
struct OwnVdso {
    specials: Vec<(VmaKind, u64, u64)>,
    /// None: no [vdso] mapping.
    hash: Option<u64>,
}

/// [`OwnVdso`], read once: the layout and contents of the engine's own vdso never change while
/// it runs (nothing moves it), and reading /proc/self/maps of an agent with a large heap costs a
/// fraction of a millisecond that every restore would pay inside the downtime.
fn own_vdso() -> Result<&'static OwnVdso, RestoreError> {
    static OWN: std::sync::OnceLock<OwnVdso> = std::sync::OnceLock::new();
    if let Some(own) = OWN.get() {
        return Ok(own);
    }
    let specials = own_specials()?;
    let hash = match specials.iter().find(|v| v.0 == VmaKind::Vdso) {
        Some(&(_, s, e)) => Some(fnv1a(
            &remote::read_memory(Pid::this(), s, (e - s) as usize).map_err(|e| RestoreError::at("reading own vdso", e))?,
        )),
        None => None,
    };
    Ok(OWN.get_or_init(|| OwnVdso { specials, hash }))
}

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Slot {
    stopped: bool,
    /// Registers when first stopped (the template for injections).
    base: Option<Regs>,
}

struct Driver<'a> {
    image: &'a ProcessImage,
    pid: Pid,
    threads: BTreeMap<Tid, Slot>,
    site: u64,
    tramp: u64,
    pages_written: u64,
    bytes_written: u64,
    /// Lazy memory: the page source (None: everything is written).
    lazy_source: Option<Arc<dyn LazySource>>,
    lazy_options: LazyOptions,
    lazy: Option<LazyHandle>,
    lazy_summary: Option<LazySummary>,
    warnings: Vec<String>,
    /// The exe, open in the process from the file opens until PR_SET_MM_MAP.
    exe_fd: Option<u64>,
    /// The step-by-step timings and the remote syscall counts, filled as the steps run.
    timings: RestoreTimings,
}

impl StopSource for Driver<'_> {
    fn wait_for(&mut self, tid: Tid) -> Result<Stop, Errno> {
        loop {
            let Some((who, stop)) = ptrace::wait(-1, 0)? else {
                continue;
            };
            if stop.is_exit() {
                self.threads.remove(&who);
            } else if who != tid && matches!(stop, Stop::Interrupt | Stop::GroupStop { .. }) {
                // A thread we just cloned, auto-attached, in its first stop.
                self.threads.entry(who).or_default().stopped = true;
            }
            if who == tid {
                return Ok(stop);
            }
        }
    }

    fn defer_signal(&mut self, _tid: Tid, _signal: i32) {
        // The process is being built: nothing of its own can be pending yet that we would owe it.
    }
}

pub(crate) fn run(
    image: &ProcessImage,
    pages: &PageStore,
    lazy_source: Option<Arc<dyn LazySource>>,
    options: RestoreOptions,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    let total = Instant::now();
    let mut warnings = Vec::new();
    precheck(image)?;
    let precheck_ns = ns(total);
    let max_target = options.fds.iter().map(|f| f.target).max().unwrap_or(-1);
    let plan = stub::make_plan(
        image,
        options.fds.len(),
        max_target,
        options.fixups.len(),
        &mut warnings,
    )?;
    let t = Instant::now();
    let started = stub::clone_stub(image.source.ns_pid)?;
    let spawn_ns = ns(t);
    let pid = started.pid;
    let mut driver = Driver {
        image,
        pid,
        threads: BTreeMap::new(),
        site: 0,
        tramp: 0,
        pages_written: 0,
        bytes_written: 0,
        lazy_source,
        lazy_options: options.lazy,
        lazy: None,
        lazy_summary: None,
        warnings: Vec::new(),
        exe_fd: None,
        timings: RestoreTimings { precheck_ns, spawn_ns, ..RestoreTimings::default() },
    };
    let outcome = (|| {
        let t = Instant::now();
        stub::hand_over(
            &started.control,
            &plan,
            &options.fds,
            &options.fixups,
            options.stub_timeout,
        )?;
        drop(options.fds);
        driver.timings.handover_ns = ns(t);
        let t = Instant::now();
        driver.seize()?;
        driver.timings.seize_ns = ns(t);
        driver.timings.clone_ns = ns(total);
        let t = Instant::now();
        driver.build_memory(pages)?;
        driver.timings.memory_ns = ns(t);
        let t = Instant::now();
        driver.build_task()?;
        driver.timings.task_ns = ns(t);
        driver.build_threads()?;
        let t2 = Instant::now();
        driver.finish()?;
        driver.timings.finish_ns = ns(t2);
        driver.timings.threads_ns = ns(t);
        Ok(())
    })();
    if let Err(e) = outcome {
        // The lazy thread (if started) sees the process exit and ends by itself.
        driver.kill_and_reap();
        return Err(e);
    }
    if let Some(lazy) = &driver.lazy {
        // It runs: the lazy thread's background fill starts after its delay unless the caller
        // releases it first (LazyHandle::release_background, once its answer is out).
        lazy.resumed();
    }
    warnings.append(&mut driver.warnings);
    let mut timings = driver.timings;
    timings.total_ns = ns(total);
    let mut threads: Vec<i32> = image.threads.iter().map(|t| t.tid).collect();
    threads.sort_by_key(|&t| (t != pid.as_raw(), t));
    let restored = RestoredProcess {
        pid,
        threads,
        timings,
        pages_written: driver.pages_written,
        bytes_written: driver.bytes_written,
        warnings,
        nudged_connections: 0,
        lazy: driver.lazy_summary,
    };
    Ok((restored, driver.lazy.take()))
}

impl Driver<'_> {
    fn leader(&self) -> Tid {
        self.pid
    }

    fn kill_and_reap(&mut self) {
        // SAFETY: kill by pid: the half-built process is our child, nobody else's.
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        // Reap every tracee of this thread (the stub and the threads cloned in it).
        loop {
            match ptrace::wait(-1, 0) {
                Ok(Some((who, stop))) => {
                    if who == self.pid && stop.is_exit() {
                        // The leader is reaped last by the kernel's rules; keep draining.
                    }
                }
                _ => break,
            }
        }
    }

    fn seize(&mut self) -> Result<(), RestoreError> {
        let pid = self.pid;
        // SAFETY: SEIZE takes an options bit mask as data; no memory is accessed.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SEIZE,
                pid.as_raw(),
                std::ptr::null_mut::<libc::c_void>(),
                SEIZE_OPTIONS as usize as *mut libc::c_void,
            )
        };
        Errno::result(r).map_err(|e| RestoreError::at("PTRACE_SEIZE of the stub", e))?;
        ptrace::interrupt(pid).map_err(|e| RestoreError::at("PTRACE_INTERRUPT of the stub", e))?;
        self.threads.insert(pid, Slot::default());
        loop {
            let stop = self
                .wait_for(pid)
                .map_err(|e| RestoreError::at("waiting for the stub to stop", e))?;
            match stop {
                Stop::Interrupt | Stop::GroupStop { .. } => break,
                Stop::Exited { .. } | Stop::Killed { .. } => {
                    return Err(RestoreError::at("seizing the stub", format!("it died: {stop:?}")))
                }
                Stop::Signal { .. } | Stop::Syscall | Stop::Event { .. } => {
                    // Suppress and ask again.
                    let _ = ptrace::cont(pid, 0);
                    let _ = ptrace::interrupt(pid);
                }
            }
        }
        self.stopped(pid)?;
        ptrace::set_sigmask(pid, u64::MAX).map_err(|e| RestoreError::at("blocking signals", e))?;
        Ok(())
    }

    /// Marks `tid` stopped and saves its registers as the injection template.
    fn stopped(&mut self, tid: Tid) -> Result<(), RestoreError> {
        let regs = ptrace::get_regs(tid).map_err(|e| RestoreError::at("PTRACE_GETREGS", e))?;
        let slot = self.threads.entry(tid).or_default();
        slot.stopped = true;
        slot.base = Some(regs);
        Ok(())
    }

    /// A remote syscall in `tid`; a negative return is an error naming `what`.
    fn sys(&mut self, tid: Tid, what: &str, nr: i64, args: [u64; 6]) -> Result<u64, RestoreError> {
        let base = self
            .threads
            .get(&tid)
            .and_then(|s| s.base)
            .ok_or_else(|| RestoreError::at(what, format!("thread {tid} is not held")))?;
        let site = self.site;
        self.timings.remote_syscalls += 1;
        self.timings.remote_round_trips += 2;
        let ret = remote::inject_syscall(tid, &base, site, nr, args, self)
            .map_err(|e| RestoreError::at(what, e))?;
        if (-4095..0).contains(&ret) {
            return Err(RestoreError::at(what, Errno(-ret as i32)));
        }
        Ok(ret as u64)
    }

    /// Runs `calls` in order in the stopped thread `tid` with as few ptrace round trips as the
    /// trampoline's batch area allows (one for most batches), stopping at the first failure.
    /// Returns every call's result. Needs the trampoline (from step 1 of build_memory on).
    fn run_batch(&mut self, tid: Tid, calls: &[Call]) -> Result<Vec<u64>, RestoreError> {
        self.run_batch_raw(tid, calls).map_err(|e| named(calls, e))
    }

    fn run_batch_raw(&mut self, tid: Tid, calls: &[Call]) -> Result<Vec<u64>, BatchError> {
        let table = self.tramp + BATCH_OFF;
        let room = TRAMPOLINE_LEN - BATCH_OFF;
        let mut results = Vec::with_capacity(calls.len());
        while results.len() < calls.len() {
            let first = results.len();
            let packed = pack(&calls[first..], table, room)?;
            self.write(table, &packed.bytes).map_err(BatchError::Restore)?;
            self.start_batch(tid, table, packed.end).map_err(BatchError::Restore)?;
            let mut waiting = vec![tid];
            let after = self.finish_batches(&mut waiting).map_err(BatchError::Restore)?;
            results.extend(self.batch_results(&calls[first..first + packed.n], first, table, after[0].1)?);
        }
        Ok(results)
    }

    /// [`Self::run_batch`] in several threads at once: each runs its own calls from its own part
    /// of the batch area, all started before any is waited for, so that N threads cost about one
    /// round trip instead of N. Threads whose calls do not fit their part run alone afterwards.
    fn run_batches(&mut self, work: &[(Tid, Vec<Call>)]) -> Result<(), RestoreError> {
        // At most 32 threads at a time: each gets 1/32 of the area at least (about 1.7 KiB).
        for group in work.chunks(32) {
            let part = ((TRAMPOLINE_LEN - BATCH_OFF) / group.len() as u64) & !(BATCH_ENTRY - 1);
            let mut started: Vec<(usize, u64, usize)> = Vec::new(); // (index in group, table, calls packed)
            let mut alone: Vec<usize> = Vec::new();
            for (i, (tid, calls)) in group.iter().enumerate() {
                let table = self.tramp + BATCH_OFF + i as u64 * part;
                let packed = match pack(calls, table, part) {
                    Ok(p) if p.n == calls.len() => p,
                    // Too much for its part: it gets the whole area to itself below.
                    _ => {
                        alone.push(i);
                        continue;
                    }
                };
                self.write(table, &packed.bytes)?;
                self.start_batch(*tid, table, packed.end)?;
                started.push((i, table, packed.n));
            }
            let mut waiting: Vec<Tid> = started.iter().map(|&(i, _, _)| group[i].0).collect();
            let stopped = self.finish_batches(&mut waiting)?;
            for (i, table, n) in started {
                let (tid, calls) = &group[i];
                let after = stopped.iter().find(|(t, _)| t == tid).map(|&(_, r12)| r12).unwrap_or(table);
                self.batch_results(&calls[..n], 0, table, after).map_err(|e| named(calls, e))?;
            }
            for i in alone {
                let (tid, calls) = &group[i];
                self.run_batch(*tid, calls)?;
            }
        }
        Ok(())
    }

    /// The results of a batch's `chunk` (whose first call is `calls[first]`) from its table; r12
    /// was `after` at the stop (past the last call that ran).
    fn batch_results(&mut self, chunk: &[Call], first: usize, table: u64, after: u64) -> Result<Vec<u64>, BatchError> {
        let n = chunk.len();
        self.timings.remote_syscalls += n as u64;
        self.timings.remote_round_trips += 1;
        let ran = (after.saturating_sub(table) / BATCH_ENTRY).min(n as u64) as usize;
        let raw = remote::read_memory(self.pid, table, ran * BATCH_ENTRY as usize)
            .map_err(|e| BatchError::Restore(RestoreError::at("reading a batch's results", e)))?;
        let mut results = Vec::with_capacity(n);
        for (i, entry) in raw.chunks_exact(BATCH_ENTRY as usize).enumerate() {
            let ret = u64::from_le_bytes(entry[56..64].try_into().unwrap_or_default());
            if ret == BATCH_NOT_RUN {
                return Err(BatchError::Restore(RestoreError::at(
                    chunk[i].what.clone(),
                    "the batch stopped before this call ran",
                )));
            }
            if (-4095..0).contains(&(ret as i64)) {
                return Err(BatchError::Call { index: first + i, errno: Errno(-(ret as i64) as i32) });
            }
            results.push(ret);
        }
        if ran < n {
            return Err(BatchError::Restore(RestoreError::at(
                chunk[ran].what.clone(),
                format!("the batch stopped after {ran} of {n} calls"),
            )));
        }
        Ok(results)
    }

    /// Points the stopped thread `tid` at the batch runner over the table `[table, end)` and
    /// lets it run ([`Self::finish_batches`] waits for its stop).
    fn start_batch(&mut self, tid: Tid, table: u64, end: u64) -> Result<(), RestoreError> {
        let base = self
            .threads
            .get(&tid)
            .and_then(|s| s.base)
            .ok_or_else(|| RestoreError::at("a batch of syscalls", format!("thread {tid} is not held")))?;
        let mut regs = base;
        regs.rip = self.tramp + BATCH_CODE_OFF;
        regs.orig_rax = u64::MAX; // not in a syscall: no restart logic on the way out
        regs.r12 = table;
        regs.r13 = end;
        regs.r14 = self.pid.as_raw() as u64;
        regs.r15 = tid.as_raw() as u64;
        let fail = |what: &str, e: PtraceError| RestoreError::at(format!("a batch of syscalls in {tid}: {what}"), e);
        ptrace::set_regs(tid, &regs).map_err(|e| fail("PTRACE_SETREGS", e))?;
        // Only SIGTRAP may be delivered: it is how the runner stops (see the runner's comment).
        let trap = 1u64 << (libc::SIGTRAP - 1);
        ptrace::set_sigmask(tid, !trap).map_err(|e| fail("PTRACE_SETSIGMASK", e))?;
        ptrace::cont(tid, 0).map_err(|e| fail("PTRACE_CONT", e))
    }

    /// Waits until every thread of `waiting` (each started by [`Self::start_batch`]) has stopped
    /// at the end of its batch; blocks their signals again. Returns each one's r12 then.
    fn finish_batches(&mut self, waiting: &mut Vec<Tid>) -> Result<Vec<(Tid, u64)>, RestoreError> {
        let fail = |tid: Tid, what: &str, e: &dyn std::fmt::Display| {
            RestoreError::at(format!("a batch of syscalls in {tid}: {what}"), e)
        };
        let mut done = Vec::with_capacity(waiting.len());
        while !waiting.is_empty() {
            let Some((who, stop)) = ptrace::wait(-1, 0).map_err(|e| fail(waiting[0], "waitpid", &e))? else {
                continue;
            };
            if !waiting.contains(&who) {
                // Another tracee: the bookkeeping wait_for does (exits, first stops of new threads).
                if stop.is_exit() {
                    self.threads.remove(&who);
                } else if matches!(stop, Stop::Interrupt | Stop::GroupStop { .. }) {
                    self.threads.entry(who).or_default().stopped = true;
                }
                continue;
            }
            match stop {
                Stop::Signal { signal: libc::SIGTRAP } => {
                    waiting.retain(|t| *t != who);
                    ptrace::set_sigmask(who, u64::MAX).map_err(|e| fail(who, "PTRACE_SETSIGMASK", &e))?;
                    let regs = ptrace::get_regs(who).map_err(|e| fail(who, "PTRACE_GETREGS", &e))?;
                    done.push((who, regs.r12));
                }
                Stop::Signal { signal } => {
                    // Every other signal is blocked: this one was forced by a fault in the
                    // runner (SIGSEGV, SIGILL...). Resuming would only fault again.
                    return Err(fail(who, "stopped", &format!("signal {signal} while running the batch")));
                }
                Stop::Exited { .. } | Stop::Killed { .. } => {
                    self.threads.remove(&who);
                    return Err(fail(who, "stopped", &format!("the thread exited: {stop:?}")));
                }
                // A clone3 in the batch reports PTRACE_EVENT_CLONE; nothing else is expected.
                Stop::Interrupt | Stop::GroupStop { .. } | Stop::Event { .. } | Stop::Syscall => {
                    ptrace::cont(who, 0).map_err(|e| fail(who, "PTRACE_CONT", &e))?;
                }
            }
        }
        Ok(done)
    }

    /// Writes into the trampoline (scratch, batch tables): one process_vm_writev (the trampoline
    /// is writable), /proc/PID/mem for whatever it could not write.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), RestoreError> {
        write_pages(self.pid, &[(addr, data)]).map(drop)
    }

    fn scratch(&self) -> u64 {
        self.tramp + SCRATCH_OFF
    }

    // --- memory -----------------------------------------------------------------------------

    fn build_memory(&mut self, pages: &PageStore) -> Result<(), RestoreError> {
        let step = Instant::now();
        let pid = self.pid;
        let leader = self.leader();
        let stub_vmas =
            proc::maps::read_maps(pid).map_err(|e| RestoreError::at("reading the stub's maps", e))?;
        // 1. Trampoline, with the stub's own vdso `syscall` for the mmap (found in the maps just
        // read: no second pass over /proc).
        let vdso = stub_vmas
            .iter()
            .find(|v| v.kind == VmaKind::Vdso)
            .ok_or_else(|| RestoreError::at("finding a syscall in the stub's vdso", "the stub has no [vdso]"))?;
        let code = remote::read_memory(pid, vdso.start, vdso.len() as usize)
            .map_err(|e| RestoreError::at("reading the stub's vdso", e))?;
        self.site = vdso.start
            + remote::find_syscall_insn(&code)
                .ok_or_else(|| RestoreError::at("finding a syscall in the stub's vdso", "no 0f 05 in it"))? as u64;
        let mut taken: Vec<(u64, u64)> = stub_vmas.iter().map(|v| (v.start, v.end)).collect();
        taken.extend(self.image.mm.vmas.iter().map(|v| (v.start, v.end)));
        let tramp = free_gap(&taken, TRAMPOLINE_LEN)
            .ok_or_else(|| RestoreError::at("placing the trampoline", "no free address"))?;
        let got = self.sys(
            leader,
            "mmap(trampoline)",
            libc::SYS_mmap,
            [
                tramp,
                TRAMPOLINE_LEN,
                (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE,
                u64::MAX,
                0,
            ],
        )?;
        if got != tramp {
            return Err(RestoreError::at("mmap(trampoline)", format!("got {got:#x}")));
        }
        self.tramp = tramp;
        let runner = batch_code();
        if runner.len() as u64 > SCRATCH_OFF - BATCH_CODE_OFF {
            return Err(RestoreError::at("placing the batch runner", format!("{} bytes of code", runner.len())));
        }
        let mut code = vec![0u8; (BATCH_CODE_OFF as usize) + runner.len()];
        code[..TRAMPOLINE_CODE.len()].copy_from_slice(&TRAMPOLINE_CODE);
        code[BATCH_CODE_OFF as usize..].copy_from_slice(runner);
        self.write(tramp, &code)?;
        self.site = tramp;

        // 2. Unmap the stub and 3. move vdso & co. to the image's addresses: one batch, in order
        // (the moves may land where the stub was).
        let mut calls: Vec<Call> = stub_vmas
            .iter()
            .filter(|v| !matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall))
            .map(|v| Call::new("munmap(stub)", libc::SYS_munmap, [v.start, v.len(), 0, 0, 0, 0]))
            .collect();
        let here: Vec<(VmaKind, u64, u64)> = stub_vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
            .map(|v| (v.kind, v.start, v.end))
            .collect();
        let there = image_specials(self.image);
        compare_specials(&here, &there)?;
        let overlap = there
            .iter()
            .any(|t| here.iter().any(|h| t.1 < h.2 && h.1 < t.2));
        let mut current: Vec<u64> = here.iter().map(|h| h.1).collect();
        // Where each mremap must land, checked after the batch.
        let mut moves: Vec<u64> = Vec::new();
        let mut mremap = |calls: &mut Vec<Call>, from: u64, len: u64, to: u64| {
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            calls.push(Call::new("mremap(vdso)", libc::SYS_mremap, [from, len, len, flags, to, 0]));
            moves.push(to);
        };
        if overlap {
            let span = here.last().map(|h| h.2).unwrap_or(0) - here.first().map(|h| h.1).unwrap_or(0);
            let mut taken = taken.clone();
            taken.push((tramp, tramp + TRAMPOLINE_LEN));
            let tmp = free_gap(&taken, span)
                .ok_or_else(|| RestoreError::at("moving the vdso", "no free address"))?;
            for (i, h) in here.iter().enumerate() {
                let to = tmp + (h.1 - here[0].1);
                mremap(&mut calls, current[i], h.2 - h.1, to);
                current[i] = to;
            }
        }
        for (i, t) in there.iter().enumerate() {
            if current[i] != t.1 {
                mremap(&mut calls, current[i], t.2 - t.1, t.1);
            }
        }
        let results = self.run_batch(leader, &calls)?;
        for (got, to) in results[results.len() - moves.len()..].iter().zip(&moves) {
            if got != to {
                return Err(RestoreError::at("mremap(vdso)", format!("landed at {got:#x}, not {to:#x}")));
            }
        }

        self.timings.layout_ns = ns(step);
        let step = Instant::now();

        // 4. Map every VMA.
        let vmas: Vec<VmaImage> = self
            .image
            .mm
            .vmas
            .iter()
            .filter(|v| !v.is_special())
            .cloned()
            .collect();
        // Lazy memory: the userfaultfd exists before the VMAs (it belongs to the mm); if it
        // cannot be made, everything is written as usual.
        let mut opens: Vec<Call> = Vec::new();
        let uffd = match self.lazy_source.clone() {
            Some(source) => match self.make_uffd(&mut opens)? {
                Ok(u) => Some((u, source)),
                Err(e) if !self.image.mm.remote_pages.is_empty() => {
                    // Post-copy: part of the memory is only on the source; nothing to write it
                    // from. Failing here is before the commit point (the source thaws).
                    return Err(RestoreError::at("lazy memory for the pages left on the source", e));
                }
                Err(e) => {
                    self.warnings.push(format!("lazy memory off, pages written instead: {e}"));
                    None
                }
            },
            None => None,
        };
        // Every file once per access mode (and the exe, for PR_SET_MM_MAP), opened by path in one
        // batch, then each checked to be the image's file before anything maps it.
        let mut files: Vec<(FileIdentity, bool)> = Vec::new();
        let mut seen: std::collections::BTreeSet<(&str, bool)> = std::collections::BTreeSet::new();
        let exe = self.image.task.exe.clone();
        let mapped_files = vmas.iter().filter_map(|v| {
            let writable = v.is_shared() && v.prot & libc::PROT_WRITE as u32 != 0;
            v.file.as_ref().map(|f| (f, writable))
        });
        for (file, writable) in mapped_files.chain(exe.as_ref().map(|e| (e, false))) {
            if seen.insert((file.path.as_str(), writable)) {
                files.push((file.clone(), writable));
            }
        }
        let uffd_close = opens.len();
        for (file, writable) in &files {
            opens.push(open_call(file, *writable)?);
        }
        let opened = match self.run_batch_raw(leader, &opens) {
            Ok(r) => r,
            Err(BatchError::Call { index, errno }) if index >= uffd_close => {
                return Err(RestoreError::FileMissing {
                    path: files[index - uffd_close].0.path.clone(),
                    source: std::io::Error::from_raw_os_error(errno.0),
                })
            }
            Err(BatchError::Call { index, errno }) => return Err(RestoreError::at(opens[index].what.clone(), errno)),
            Err(BatchError::Restore(e)) => return Err(e),
        };
        let mut fds: BTreeMap<(String, bool), u64> = BTreeMap::new();
        for ((file, writable), fd) in files.iter().zip(&opened[uffd_close..]) {
            let found = identity_of(&file.path, format!("/proc/{}/fd/{fd}", self.pid).as_ref())?;
            check_file(file, found)?;
            fds.insert((file.path.clone(), *writable), *fd);
        }
        self.exe_fd = exe.as_ref().and_then(|e| fds.get(&(e.path.clone(), false)).copied());
        let mut written = Vec::with_capacity(vmas.len());
        let mut lazy_vmas: Vec<(u64, u64)> = Vec::new();
        let mut maps: Vec<Call> = Vec::with_capacity(vmas.len() + fds.len());
        for v in &vmas {
            let is_lazy = uffd.as_ref().is_some_and(|(_, source)| lazy::is_lazy_vma(v, source.as_ref()));
            if is_lazy {
                lazy_vmas.push((v.start, v.end));
            }
            let has_pages = pages.range(v.start, v.end).next().is_some();
            let fill = has_pages && v.kind != VmaKind::FileShared && !is_lazy;
            let prot = if fill {
                v.prot | (libc::PROT_READ | libc::PROT_WRITE) as u32
            } else {
                v.prot
            };
            let mut flags = u64::from(v.flags) | MAP_FIXED_NOREPLACE;
            let mut fd = u64::MAX;
            if let Some(file) = &v.file {
                let writable = v.is_shared() && v.prot & libc::PROT_WRITE as u32 != 0;
                fd = fds[&(file.path.clone(), writable)];
            } else {
                flags |= libc::MAP_ANONYMOUS as u64;
            }
            maps.push(Call::new(
                format!("mmap of {:#x}-{:#x}", v.start, v.end),
                libc::SYS_mmap,
                [v.start, v.len(), u64::from(prot), flags, fd, v.pgoff],
            ));
            written.push((v, fill, prot));
        }
        // The map fds go with the mappings (the exe's stays for PR_SET_MM_MAP).
        for fd in fds.values().filter(|&&fd| Some(fd) != self.exe_fd) {
            maps.push(Call::new("close(map fd)", libc::SYS_close, [*fd, 0, 0, 0, 0, 0]));
        }
        let mapped = self.run_batch(leader, &maps)?;
        for ((v, _, _), got) in written.iter().zip(&mapped) {
            if *got != v.start {
                return Err(RestoreError::at(
                    format!("mmap of {:#x}-{:#x}", v.start, v.end),
                    format!("landed at {got:#x}"),
                ));
            }
        }

        self.timings.mmap_ns = ns(step);
        let step = Instant::now();

        // 4b. Lazy VMAs: the guard armed (it holds a dup of the uffd and kills the process if
        // this engine dies before its memory is home; failing here is before the commit point),
        // then registered and the thread started now, before anything below can touch them
        // (rseq registration writes into the thread's TLS).
        if let Some(((uffd, features), source)) = uffd {
            let guard = Guard::arm(pid, uffd.as_fd()).map_err(|e| RestoreError::at("arming the lazy memory guard", e))?;
            let handle = lazy::start(pid, uffd, features, &lazy_vmas, source, self.lazy_options, guard)
                .map_err(|e| RestoreError::at("starting lazy memory", e))?;
            self.lazy_summary = Some(handle.stats().summary);
            self.lazy = Some(handle);
        }

        self.timings.lazy_start_ns = ns(step);
        let step = Instant::now();

        // 5. Pages: gathered into batches, then written by parallel writers (write_parallel).
        let mut batches = Vec::new();
        for (v, fill, _) in &written {
            if *fill {
                self.collect_pages(v, pages, &mut batches);
            }
        }
        self.bytes_written += write_parallel(self.pid, &batches)?;

        self.timings.write_ns = ns(step);
        let step = Instant::now();

        // 6. Final protections.
        let protects: Vec<Call> = written
            .iter()
            .filter(|(v, _, prot)| *prot != v.prot)
            .map(|(v, _, _)| Call::new("mprotect", libc::SYS_mprotect, [v.start, v.len(), u64::from(v.prot), 0, 0, 0]))
            .collect();
        self.run_batch(leader, &protects)?;
        self.timings.protect_ns = ns(step);
        let step = Instant::now();

        // 7. The mm fields, auxv and exe.
        self.set_mm()?;
        self.timings.mm_ns = ns(step);
        Ok(())
    }

    /// userfaultfd(O_CLOEXEC|O_NONBLOCK) inside the process, taken with pidfd_getfd, closed in
    /// the process by the next batch (`then` gets the close: it must not keep a stray fd),
    /// features negotiated. The inner error means "no lazy memory" (nothing registered yet); the
    /// outer one fails the restore.
    #[allow(clippy::type_complexity)]
    fn make_uffd(&mut self, then: &mut Vec<Call>) -> Result<Result<(lazy::Uffd, u64), lazy::LazySetupError>, RestoreError> {
        let pid = self.pid;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = match self.sys(self.leader(), "userfaultfd", libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0]) {
            Ok(fd) => fd,
            Err(e) => return Ok(Err(lazy::LazySetupError::Create { pid, detail: e.to_string() })),
        };
        then.push(Call::new("close(userfaultfd)", libc::SYS_close, [fd, 0, 0, 0, 0, 0]));
        Ok(lazy::steal(pid, fd as i32))
    }

    /// Gathers the VMA's pages from the store into write batches (at most 512 runs or 16 MiB
    /// each): data runs as they are, zero runs only for file mappings (fresh anonymous memory is
    /// zero already).
    fn collect_pages<'p>(&mut self, v: &VmaImage, pages: &'p PageStore, batches: &mut Vec<Vec<(u64, &'p [u8])>>) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let zeros_matter = matches!(v.kind, VmaKind::File);
        let mut batch: Vec<(u64, &[u8])> = Vec::new();
        let mut batch_bytes = 0usize;
        for (addr, run) in pages.range(v.start, v.end) {
            match run {
                PageRun::Data(data) => {
                    self.pages_written += (data.len() / PAGE_SIZE) as u64;
                    batch.push((addr, data));
                    batch_bytes += data.len();
                }
                PageRun::Zero { count } if zeros_matter => {
                    self.pages_written += count;
                    let mut a = addr;
                    let end = addr + count * PAGE;
                    while a < end {
                        let n = (end - a).min(ZEROS.len() as u64);
                        batch.push((a, &ZEROS[..n as usize]));
                        batch_bytes += n as usize;
                        a += n;
                    }
                }
                PageRun::Zero { .. } => {}
            }
            if batch.len() >= 512 || batch_bytes >= 16 << 20 {
                batches.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
    }

    fn set_mm(&mut self) -> Result<(), RestoreError> {
        let mm = &self.image.mm;
        let leader = self.leader();
        // The exe was opened and checked with the mapped files (build_memory).
        let exe_fd = self.exe_fd.unwrap_or(u64::from(u32::MAX));
        let auxv_addr = self.scratch() + 256;
        let mut st = Vec::with_capacity(104);
        for w in [
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv_addr,
        ] {
            st.extend_from_slice(&w.to_le_bytes());
        }
        st.extend_from_slice(&((mm.auxv.len() * 8) as u32).to_le_bytes());
        st.extend_from_slice(&(exe_fd as u32).to_le_bytes());
        let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
        if auxv.len() > 2048 {
            return Err(RestoreError::Unsupported("auxv larger than 2 KiB".into()));
        }
        // prctl_mm_map then the auxv 256 bytes further, one write.
        let len = st.len();
        st.resize(256, 0);
        st.extend_from_slice(&auxv);
        self.write(self.scratch(), &st)?;
        let mut calls = vec![Call::new(
            "prctl(PR_SET_MM_MAP)",
            libc::SYS_prctl,
            [PR_SET_MM, PR_SET_MM_MAP, self.scratch(), len as u64, 0, 0],
        )];
        if let Some(fd) = self.exe_fd.take() {
            calls.push(Call::new("close(exe fd)", libc::SYS_close, [fd, 0, 0, 0, 0, 0]));
        }
        self.run_batch(leader, &calls).map(drop)
    }

    // --- task -------------------------------------------------------------------------------

    fn build_task(&mut self) -> Result<(), RestoreError> {
        let leader = self.leader();
        let t = &self.image.task;
        // Every sigaction, the personality and the prctls: one batch.
        let mut calls: Vec<Call> = t
            .sigactions
            .iter()
            .map(|sa| {
                Call::new(format!("rt_sigaction({})", sa.signal), libc::SYS_rt_sigaction, [sa.signal as u64, 0, 0, 8, 0, 0])
                    .with_data(1, sa.to_kernel())
            })
            .collect();
        if t.personality != 0 {
            calls.push(Call::new("personality", libc::SYS_personality, [u64::from(t.personality), 0, 0, 0, 0, 0]));
        }
        let prctl = |opt: i32, arg: u64| [opt as u64, arg, 0, 0, 0, 0];
        if t.dumpable != 1 {
            calls.push(Call::new("PR_SET_DUMPABLE", libc::SYS_prctl, prctl(libc::PR_SET_DUMPABLE, t.dumpable as u64)));
        }
        if t.pdeathsig != 0 {
            calls.push(Call::new("PR_SET_PDEATHSIG", libc::SYS_prctl, prctl(libc::PR_SET_PDEATHSIG, t.pdeathsig as u64)));
        }
        if t.child_subreaper {
            calls.push(Call::new("PR_SET_CHILD_SUBREAPER", libc::SYS_prctl, prctl(libc::PR_SET_CHILD_SUBREAPER, 1)));
        }
        self.run_batch(leader, &calls)?;
        // Resource limits, from outside.
        for r in &t.rlimits {
            let mut cur = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
            let res = r.resource as libc::__rlimit_resource_t;
            // SAFETY: prlimit64 reads/writes one rlimit64 each, locals alive for the call.
            unsafe { libc::prlimit64(self.pid.as_raw(), res, std::ptr::null(), &mut cur) };
            if cur.rlim_cur == r.soft && cur.rlim_max == r.hard {
                continue;
            }
            let new = libc::rlimit64 { rlim_cur: r.soft, rlim_max: r.hard };
            // SAFETY: as above.
            let ret = unsafe { libc::prlimit64(self.pid.as_raw(), res, &new, std::ptr::null_mut()) };
            Errno::result(ret).map_err(|e| {
                RestoreError::at(format!("prlimit(resource {})", r.resource), e)
            })?;
        }
        Ok(())
    }

    // --- threads ----------------------------------------------------------------------------

    fn build_threads(&mut self) -> Result<(), RestoreError> {
        let step = Instant::now();
        let leader = self.leader();
        let image = self.image;
        let s = self.scratch();
        // Every other thread: clone3(set_tid = [tid]) from the leader, in batches. Each call's
        // clone_args and its set_tid word sit in the scratch area (the args point into it).
        let others: Vec<&crate::image::ThreadImage> = image.threads.iter().filter(|t| t.tid != image.source.ns_pid).collect();
        const PER_THREAD: u64 = 96; // clone_args (88) + set_tid (pid_t, padded)
        let per_batch = ((BATCH_OFF - SCRATCH_OFF) / PER_THREAD) as usize;
        for chunk in others.chunks(per_batch) {
            let mut bytes = Vec::with_capacity(chunk.len() * PER_THREAD as usize);
            let mut calls = Vec::with_capacity(chunk.len());
            for (i, t) in chunk.iter().enumerate() {
                let at = s + i as u64 * PER_THREAD;
                let args = CloneArgs {
                    flags: (libc::CLONE_VM
                        | libc::CLONE_FS
                        | libc::CLONE_FILES
                        | libc::CLONE_SIGHAND
                        | libc::CLONE_THREAD
                        | libc::CLONE_SYSVSEM) as u64,
                    set_tid: at + 88,
                    set_tid_size: 1,
                    ..CloneArgs::default()
                };
                bytes.extend_from_slice(&args.to_bytes());
                bytes.extend_from_slice(&i64::from(t.tid).to_le_bytes());
                calls.push(Call::new(format!("clone3(thread {})", t.tid), libc::SYS_clone3, [at, 88, 0, 0, 0, 0]));
            }
            self.write(s, &bytes)?;
            let got = self.run_batch(leader, &calls)?;
            for (t, got) in chunk.iter().zip(got) {
                if got as i32 != t.tid {
                    return Err(RestoreError::at("clone3(thread)", format!("got tid {got}, wanted {}", t.tid)));
                }
            }
        }
        // PTRACE_O_TRACECLONE attached each new thread; it reports a first stop before its
        // first instruction (most were seen already while the batch ran).
        for t in &others {
            let tid = Tid::from_raw(t.tid);
            while !self.threads.get(&tid).is_some_and(|s| s.stopped) {
                let stop = self
                    .wait_for(tid)
                    .map_err(|e| RestoreError::at("waiting for a new thread", e))?;
                if stop.is_exit() {
                    return Err(RestoreError::at("new thread", format!("{tid} died: {stop:?}")));
                }
                if matches!(stop, Stop::Interrupt | Stop::GroupStop { .. }) {
                    break;
                }
            }
            self.stopped(tid)?;
            ptrace::set_sigmask(tid, u64::MAX).map_err(|e| RestoreError::at("blocking signals", e))?;
        }
        self.timings.thread_clone_ns = ns(step);
        let step = Instant::now();
        // Each thread's own state, set by itself: one batch per thread, all running at once.
        let mut work: Vec<(Tid, Vec<Call>)> = Vec::with_capacity(image.threads.len());
        for t in &image.threads {
            let mut calls = Vec::with_capacity(5);
            if !t.altstack.is_disabled() {
                calls.push(Call::new("sigaltstack", libc::SYS_sigaltstack, [0, 0, 0, 0, 0, 0]).with_data(0, t.altstack.to_kernel()));
            }
            if t.robust_list != 0 {
                calls.push(Call::new(
                    "set_robust_list",
                    libc::SYS_set_robust_list,
                    [t.robust_list, t.robust_list_len, 0, 0, 0, 0],
                ));
            }
            calls.push(Call::new("set_tid_address", libc::SYS_set_tid_address, [t.clear_child_tid, 0, 0, 0, 0, 0]));
            if let Some(r) = t.rseq {
                calls.push(Call::new("rseq", SYS_RSEQ, [r.ptr, u64::from(r.len), 0, u64::from(r.sig), 0, 0]));
            }
            let mut comm = t.comm.as_bytes().to_vec();
            comm.truncate(15);
            comm.push(0);
            calls.push(Call::new("PR_SET_NAME", libc::SYS_prctl, [libc::PR_SET_NAME as u64, 0, 0, 0, 0, 0]).with_data(1, comm));
            work.push((Tid::from_raw(t.tid), calls));
        }
        self.run_batches(&work)?;
        // Pending signals one by one, after every batch: a batch runs with SIGTRAP deliverable
        // (its stop), and a pending SIGTRAP queued before would be taken for that stop.
        for t in &image.threads {
            let tid = Tid::from_raw(t.tid);
            for p in &t.pending {
                self.write(s, &p.raw)?;
                self.sys(
                    tid,
                    "rt_tgsigqueueinfo",
                    libc::SYS_rt_tgsigqueueinfo,
                    [self.pid.as_raw() as u64, t.tid as u64, p.signal as u64, s, 0, 0],
                )?;
            }
        }
        for p in &image.task.shared_pending {
            self.write(s, &p.raw)?;
            self.sys(
                leader,
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                [self.pid.as_raw() as u64, p.signal as u64, s, 0, 0, 0],
            )?;
        }
        self.timings.thread_state_ns = ns(step);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RestoreError> {
        let leader = self.leader();
        let image = self.image;
        let s = self.scratch();
        let it = &image.task.itimers;
        for (which, timer) in [(0u64, it.real), (1, it.virt), (2, it.prof)] {
            if let Some(timer) = timer.to_restore() {
                self.write(s, &timer.to_kernel())?;
                self.sys(leader, "setitimer", libc::SYS_setitimer, [which, s, 0, 0, 0, 0])?;
            }
        }
        if image.task.no_new_privs {
            self.sys(leader, "PR_SET_NO_NEW_PRIVS", libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0])?;
        }
        // The leader runs the trampoline's munmap; it never returns there (its registers are
        // replaced below before it resumes).
        self.sys(leader, "munmap(trampoline)", libc::SYS_munmap, [self.tramp, TRAMPOLINE_LEN, 0, 0, 0, 0])?;
        for t in &image.threads {
            let tid = Tid::from_raw(t.tid);
            let regs = Regs::from(&t.regs);
            ptrace::set_regs(tid, &regs).map_err(|e| RestoreError::at("PTRACE_SETREGS", e))?;
            if !t.xstate.is_empty() {
                ptrace::set_xstate(tid, &t.xstate).map_err(|e| RestoreError::at("PTRACE_SETREGSET(xstate)", e))?;
            }
            ptrace::set_sigmask(tid, t.blocked).map_err(|e| RestoreError::at("PTRACE_SETSIGMASK", e))?;
        }
        for t in &image.threads {
            ptrace::detach(Tid::from_raw(t.tid), 0).map_err(|e| RestoreError::at("PTRACE_DETACH", e))?;
        }
        Ok(())
    }
}

/// openat(AT_FDCWD, file's path) inside the process, read-only or read-write, close-on-exec.
fn open_call(file: &FileIdentity, writable: bool) -> Result<Call, RestoreError> {
    let mut path = file.path.as_bytes().to_vec();
    path.push(0);
    if path.len() > libc::PATH_MAX as usize {
        return Err(RestoreError::Unsupported(format!("path too long: {}", file.path)));
    }
    let flags = if writable { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
    Ok(Call::new(format!("open({})", file.path), libc::SYS_openat, [libc::AT_FDCWD as u64, 0, flags as u64, 0, 0, 0])
        .with_data(1, path))
}

/// The lowest page-aligned gap of `len` bytes above 1 MiB not overlapping `taken` (pure).
fn free_gap(taken: &[(u64, u64)], len: u64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = taken.to_vec();
    v.sort();
    let mut cursor: u64 = 0x10_0000;
    for (s, e) in v {
        if s >= cursor + len && s > cursor {
            if s - cursor >= len {
                return Some(cursor);
            }
        }
        cursor = cursor.max((e + PAGE - 1) & !(PAGE - 1));
    }
    (cursor + len <= 0x7fff_ffff_0000).then_some(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(bytes: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap())
    }

    #[test]
    fn batches_are_packed_table_first_then_data() {
        let calls = vec![
            Call::new("a", 1, [10, 11, 12, 13, 14, 15]),
            Call::new("b", 2, [0, 21, 0, 0, 0, 0]).with_data(0, *b"path\0"),
            Call::new("c", 3, [30, 0, 32, 0, 0, 0]).with_data(1, [7u8; 9]),
        ];
        let p = pack(&calls, 0x1000, 4096).unwrap();
        assert_eq!(p.n, 3);
        assert_eq!(p.end, 0x1000 + 3 * 64);
        // Entry: nr, six args, the not-run marker.
        assert_eq!((0..8).map(|i| word(&p.bytes, i)).collect::<Vec<_>>(), vec![1, 10, 11, 12, 13, 14, 15, BATCH_NOT_RUN]);
        // Data follow the table, each 8-aligned; their addresses replace the argument named.
        assert_eq!(word(&p.bytes, 8 + 1), p.end);
        assert_eq!(word(&p.bytes, 8 + 2), 21);
        assert_eq!(word(&p.bytes, 16 + 2), p.end + 8);
        assert_eq!(word(&p.bytes, 16 + 3), 32);
        assert_eq!(&p.bytes[3 * 64..3 * 64 + 5], b"path\0");
        assert_eq!(&p.bytes[3 * 64 + 8..3 * 64 + 17], &[7u8; 9]);
        assert_eq!(p.bytes.len(), 3 * 64 + 8 + 16);
        // Only what fits: two entries and the first call's data, then the rest next time.
        let p = pack(&calls, 0x1000, 2 * 64 + 8 + 15).unwrap();
        assert_eq!(p.n, 2);
        // Nothing fits: an error naming the call.
        let err = pack(&calls[2..], 0x1000, 64).err().unwrap();
        assert!(matches!(err, BatchError::Restore(RestoreError::Failed { ref step, .. }) if step == "c"), "{err:?}");
        assert_eq!(pack(&[], 0x1000, 64).unwrap().n, 0);
    }

    #[test]
    fn the_batch_runner_fits_before_the_scratch_area() {
        let code = batch_code();
        assert!(!code.is_empty() && code.len() as u64 <= SCRATCH_OFF - BATCH_CODE_OFF, "{} bytes", code.len());
        // It contains the two syscalls: its calls' and its tgkill.
        assert_eq!(code.windows(2).filter(|w| w == &[0x0f, 0x05]).count(), 2);
    }

    #[test]
    fn gaps() {
        assert_eq!(free_gap(&[], 0x4000), Some(0x10_0000));
        assert_eq!(free_gap(&[(0x10_0000, 0x20_0000)], 0x4000), Some(0x20_0000));
        assert_eq!(
            free_gap(&[(0x10_2000, 0x20_0000), (0x20_0000, 0x30_0000)], 0x4000),
            Some(0x30_0000)
        );
        assert_eq!(free_gap(&[(0x10_4000, 0x20_0000)], 0x4000), Some(0x10_0000));
    }
}

/// Writes the batches into `pid` with one writer per CPU (at most 4). Most of a restore's time
/// is the target's page faults on first touch (allocation, zeroing) and the copy; writers on
/// disjoint ranges fault in parallel under the target's mmap read lock. Returns the bytes written.
fn write_parallel(pid: Pid, batches: &[Vec<(u64, &[u8])>]) -> Result<u64, RestoreError> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(batches.len());
    if workers <= 1 {
        return batches.iter().try_fold(0u64, |sum, b| Ok(sum + write_pages(pid, b)?));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<u64, RestoreError> {
                    let mut sum = 0u64;
                    while let Some(batch) = batches.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        sum += write_pages(pid, batch)?;
                    }
                    Ok(sum)
                })
            })
            .collect();
        let mut total = 0u64;
        let mut first_error = None;
        for w in writers {
            match w.join() {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => first_error = first_error.or(Some(RestoreError::at("writing pages", "a writer thread panicked"))),
            }
        }
        first_error.map_or(Ok(total), Err)
    })
}

/// One batch: vectored process_vm_writev, then /proc/PID/mem for whatever it could not write
/// (read-only private mappings, where process_vm_writev stops with EFAULT).
fn write_pages(pid: Pid, batch: &[(u64, &[u8])]) -> Result<u64, RestoreError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let local: Vec<libc::iovec> = batch
        .iter()
        .map(|(_, d)| libc::iovec {
            iov_base: d.as_ptr().cast_mut().cast(),
            iov_len: d.len(),
        })
        .collect();
    let remote_iov: Vec<libc::iovec> = batch
        .iter()
        .map(|(a, d)| libc::iovec {
            iov_base: *a as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let total: usize = batch.iter().map(|(_, d)| d.len()).sum();
    // SAFETY: the local iovecs describe borrowed slices alive for the call; the kernel only
    // reads them. Remote addresses are interpreted in the target.
    let n = unsafe {
        libc::process_vm_writev(
            pid.as_raw(),
            local.as_ptr(),
            local.len() as libc::c_ulong,
            remote_iov.as_ptr(),
            remote_iov.len() as libc::c_ulong,
            0,
        )
    };
    let done = Errno::result(n).map(|n| n as usize).unwrap_or(0);
    if done < total {
        let mut off = 0usize;
        for (addr, data) in batch {
            let len = data.len();
            if off + len > done {
                let skip = done.saturating_sub(off);
                remote::write_memory(pid, addr + skip as u64, &data[skip..]).map_err(|e| RestoreError::at("writing pages", e))?;
            }
            off += len;
        }
    }
    Ok(total as u64)
}
