//! The dump: turn a frozen process into a [`ProcessImage`] plus a page stream.
//!
//! # The checkpoint sequence (cold migration, source side)
//!
//! ```text
//!  SourceSession::freeze(pid)     Tracer::new + freeze: every thread seized and interrupted
//!        │                        (see crate::ptrace for the whole freeze protocol)
//!  SourceSession::dump(sink)      dump() below, target stays frozen throughout
//!        │   1. /proc: inspect(pid) — maps, stat (mm fields), auxv, status (creds, umask, sid…)
//!        │   2. tracer: registers (+xstate, rseq) and each thread's own signal state (real
//!        │      blocked mask, a dequeued "parked" signal), BEFORE any injection
//!        │   3. ptrace from the tracer thread: PTRACE_PEEKSIGINFO, per thread and shared
//!        │   4. remote syscalls (on a helper thread, while 5 and 6 run on this one: ~80 ptrace
//!        │      round trips, the longest part of the image): mmap one scratch page, then
//!        │        rt_sigaction(sig, NULL, scratch) ×62, getitimer ×3, brk(0),
//!        │        prctl(PR_GET_DUMPABLE / PDEATHSIG / CHILD_SUBREAPER),
//!        │        per thread: sigaltstack(NULL, scratch), prctl(PR_GET_TID_ADDRESS, scratch)
//!        │      read the scratch page back, munmap it (the address space is as before)
//!        │   5. from outside: prlimit, get_robust_list(tid), /proc/PID/personality,
//!        │      stat of /proc/PID/exe and /proc/PID/map_files/* (file identities), fds
//!        │   6. pages: per VMA, /proc/PID/pagemap in 64 MiB windows; selected pages read with
//!        │      process_vm_readv in ~4 MiB vectored batches; all-zero pages become markers
//!        ▼
//!  ── wait for the destination ──
//!  SourceSession::commit()        SIGKILL the frozen original: from now on only the copy runs
//!  SourceSession::abort()         thaw: every thread resumes exactly as before (the restart
//!                                 fix-up of crate::remote for threads the dump injected into)
//! ```
//!
//! Which pages travel (pagemap bits: 63 present, 62 swapped, 61 file/shared, see
//! Documentation/admin-guide/mm/pagemap.rst):
//! - private anonymous memory (anon, heap, stack, guard): present or swapped pages;
//! - MAP_SHARED|MAP_ANONYMOUS: present or swapped pages (the mapping is recreated private to the
//!   restored process; sharing with other processes is not migrated);
//! - private file mappings: only pages that were written (present/swapped with bit 61 clear, i.e.
//!   an anonymous COW copy). Clean pages come from the file again on the destination;
//! - shared file mappings: none (the file is the truth); vdso, vvar, vvar_vclock, vsyscall: never
//!   read (the destination has its own vdso, checked identical with [`MmImage::vdso_hash`]).
//!
//! Any failure returns an error and leaves the target frozen exactly as it was (the scratch page
//! is unmapped on every path); the caller thaws or kills it.

mod pages;
mod precopy;
mod session;

pub use pages::page_wanted;
pub use precopy::{
    decide, FinishTimings, PrecopyError, PrecopyFinal, PrecopyOptions, PrecopySession, RoundStats, Verdict,
};
pub use session::{SessionError, SourceSession};

use crate::image::mm::{fnv1a, MmImage, VmaImage};
use crate::image::task::{
    Creds, FileIdentity, IdSet, ItimerImage, Itimers, RlimitImage, SigactionImage, SiginfoImage,
    TaskImage,
};
use crate::image::thread::{AltStack, RegsImage, RseqImage, ThreadImage};
use crate::image::{ProcessImage, SourceInfo, IMAGE_VERSION};
use crate::pages::PageSink;
use crate::proc::{self, VmaKind};
use crate::ptrace::{self, Tracer};
use crate::remote::{self, MemoryError, RemoteSyscallError};
use crate::sys::{Errno, Pid, Tid};
use serde::Serialize;
use std::time::Instant;

/// What a dump moved.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpStats {
    /// Pages sent with their content.
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Present pages not sent because the destination gets them from the mapped file.
    pub skipped_pages: u64,
    /// Bytes of page data sent.
    pub bytes: u64,
    /// Data pages left on the source for the destination to pull ([`PagePolicy::LeaveOnSource`]).
    pub remote_pages: u64,
    /// Time spent on pages (pagemap, reads, sink).
    pub pages_elapsed_ns: u64,
    /// The whole dump.
    pub elapsed_ns: u64,
}

/// The dump failed; the target is still frozen and untouched.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("pid {pid} is not frozen: dump needs a frozen target")]
    NotFrozen { pid: Pid },
    #[error("cannot dump pid {pid}: {reason}")]
    Unsupported { pid: Pid, reason: String },
    #[error(transparent)]
    Inspect(#[from] proc::InspectError),
    #[error("dumping pid {pid}: {source}")]
    Registers {
        pid: Pid,
        source: ptrace::RegistersError,
    },
    #[error("dumping pid {pid}: {what}: {source}")]
    Ptrace {
        pid: Pid,
        what: &'static str,
        source: ptrace::PtraceError,
    },
    #[error("dumping pid {pid}: remote {what}: {source}")]
    Remote {
        pid: Pid,
        what: &'static str,
        source: RemoteSyscallError,
    },
    #[error("dumping pid {pid}: remote {what} failed inside the target: {errno}")]
    RemoteErrno {
        pid: Pid,
        what: &'static str,
        errno: Errno,
    },
    #[error("dumping pid {pid}: {source}")]
    Memory { pid: Pid, source: MemoryError },
    #[error("dumping pid {pid}: {what}: {source}")]
    Io {
        pid: Pid,
        what: String,
        source: std::io::Error,
    },
    #[error("dumping pid {pid}: the page sink refused pages: {source}")]
    Sink {
        pid: Pid,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the tracer thread of pid {pid} is gone")]
    TracerGone { pid: Pid },
    #[error("dumping the fds of pid {pid}: {source}")]
    Files {
        pid: Pid,
        source: crate::files::FilesDumpError,
    },
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

const SCRATCH_LEN: u64 = 4096;
// Scratch page layout.
const SC_SIGACTIONS: u64 = 0; // 64 × 32 bytes = 2048
const SC_ITIMERS: u64 = 2048; // 3 × 32
const SC_INTS: u64 = 2144; // pdeathsig, subreaper (4 bytes each)
const SC_THREAD: u64 = 2176; // per thread: altstack (24) + tid address (8)

/// Dumps the already frozen target of `tracer`: its image, and its pages into `sink`.
pub fn dump<S: PageSink>(
    tracer: &Tracer,
    sink: &mut S,
) -> Result<(ProcessImage, DumpStats), DumpError> {
    dump_selected(tracer, sink, None, PagePolicy::Send)
}

/// What the dump does with the data pages of private anonymous memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePolicy {
    /// Into the sink, like every other page.
    Send,
    /// Left in the frozen process: listed in the image's `mm.remote_pages` for the destination
    /// to pull (post-copy, and hybrid's final dirty set).
    LeaveOnSource,
}

/// [`dump`], sending only the pages inside `only` when given (pre-copy's final dirty set: the
/// destination already holds the rest from the rounds).
pub fn dump_selected<S: PageSink>(
    tracer: &Tracer,
    sink: &mut S,
    only: Option<&crate::dirty::RangeSet>,
    policy: PagePolicy,
) -> Result<(ProcessImage, DumpStats), DumpError> {
    let start = Instant::now();
    let pid = tracer.pid();
    if !tracer.is_frozen() {
        return Err(DumpError::NotFrozen { pid });
    }
    let inv = proc::inspect(pid)?;
    check_supported(pid, &inv)?;

    // Thread state that an injection would change: read it first.
    let regs = tracer
        .registers()
        .map_err(|source| DumpError::Registers { pid, source })?;
    let signals = tracer
        .signals()
        .map_err(|source| DumpError::Registers { pid, source })?;
    let tids: Vec<Tid> = regs.iter().map(|r| Tid::from_raw(r.tid)).collect();
    let peek = {
        let tids = tids.clone();
        tracer
            .on_tracer_thread(move || -> Result<_, ptrace::PtraceError> {
                let mut per_thread = Vec::new();
                for &tid in &tids {
                    per_thread.push(ptrace::peek_siginfo(tid, false)?);
                }
                let shared = ptrace::peek_siginfo(pid, true)?;
                Ok((per_thread, shared))
            })
            .ok_or(DumpError::TracerGone { pid })?
    };
    let (per_thread_pending, shared_pending) = peek.map_err(|source| DumpError::Ptrace {
        pid,
        what: "PTRACE_PEEKSIGINFO",
        source,
    })?;
    let (per_thread_pending, shared_pending) =
        without_parked_stop(tracer, per_thread_pending, shared_pending);

    // The remote syscalls (some 80 ptrace round trips through the tracer thread, most of the
    // image's time) run on a helper thread while this one does all that is read from outside,
    // the final pages included: none of it depends on them, and they change nothing it reads
    // (their one memory effect is the scratch page, a new mapping outside every VMA the
    // inventory listed, unmapped before they return; a syscall-stop moves no other state).
    let (remote, outside) = std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name(format!("dump-remote-{pid}"))
            .spawn_scoped(scope, || gather_remote(tracer, &tids));
        match helper {
            Ok(helper) => {
                let outside = from_outside(tracer, &inv, &regs, sink, only, policy);
                let remote = helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (remote, outside)
            }
            // No thread to be had: one after the other, as it works just as well.
            Err(_) => {
                let remote = gather_remote(tracer, &tids);
                (remote, from_outside(tracer, &inv, &regs, sink, only, policy))
            }
        }
    });
    let remote = remote?;
    let Outside { rlimits, personality, exe, vmas, vdso_hash, per_thread, fds, mut stats, remote_pages } = outside?;

    let mut threads = Vec::with_capacity(regs.len());
    for (i, r) in regs.iter().enumerate() {
        let tid = Tid::from_raw(r.tid);
        let saved = libc::user_regs_struct::from(&r.regs);
        let sig = signals.iter().find(|s| s.tid == r.tid);
        let deliverable = sig.is_some_and(|s| {
            s.held.is_some() || !per_thread_pending[i].is_empty() || !shared_pending.is_empty()
        });
        let fixed = image_regs(&saved, deliverable);
        let mut pending = Vec::new();
        if let Some((signal, raw)) = sig.and_then(|s| s.held.clone()) {
            pending.push(SiginfoImage { signal, raw });
        }
        pending.extend(per_thread_pending[i].iter().map(|raw| siginfo(raw)));
        let comm = inv
            .threads
            .iter()
            .find(|t| t.tid == tid)
            .map(|t| t.comm.clone())
            .unwrap_or_default();
        let ThreadOutside { ns_tid, robust_list, robust_list_len } = per_thread[i];
        threads.push(ThreadImage {
            tid: ns_tid,
            comm,
            regs: RegsImage::from(&fixed),
            in_syscall: r.syscall_nr,
            xstate: r.xstate.bytes.clone(),
            blocked: sig.map(|s| s.blocked).unwrap_or(0),
            pending,
            altstack: remote.altstacks[i],
            rseq: r.rseq.as_ref().map(|c| RseqImage {
                ptr: c.rseq_abi_pointer,
                len: c.rseq_abi_size,
                sig: c.signature,
            }),
            robust_list,
            robust_list_len,
            clear_child_tid: remote.tid_addresses[i],
        });
    }
    // Leader first.
    threads.sort_by_key(|t| (t.tid != inv.ns_pid, t.tid));

    let s = &inv.status;
    let ids = |i: &proc::status::Ids| IdSet {
        real: i.real,
        effective: i.effective,
        saved: i.saved,
        fs: i.fs,
    };
    let task = TaskImage {
        comm: inv.comm.clone(),
        exe,
        cmdline: inv.cmdline.clone(),
        cwd: inv.cwd.clone().unwrap_or_else(|| "/".into()),
        root: inv.root.clone().unwrap_or_else(|| "/".into()),
        umask: s.umask.unwrap_or(0o022),
        creds: Creds {
            uid: ids(&s.uid),
            gid: ids(&s.gid),
            groups: s.groups.clone(),
            cap_inh: s.cap_inh,
            cap_prm: s.cap_prm,
            cap_eff: s.cap_eff,
            cap_bnd: s.cap_bnd,
            cap_amb: s.cap_amb,
        },
        rlimits,
        sigactions: remote.sigactions,
        shared_pending: shared_pending.iter().map(|raw| siginfo(raw)).collect(),
        itimers: remote.itimers,
        sid: s.ns_sid.last().copied().unwrap_or(inv.session),
        pgid: s.ns_pgid.last().copied().unwrap_or(inv.pgrp),
        personality,
        no_new_privs: s.no_new_privs,
        dumpable: remote.dumpable,
        pdeathsig: remote.pdeathsig,
        child_subreaper: remote.child_subreaper,
    };
    let m = &inv.mm;
    let mm = MmImage {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: remote.brk,
        start_stack: m.start_stack,
        arg_start: m.arg_start,
        arg_end: m.arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv: m.auxv.iter().flat_map(|e| [e.key, e.value]).collect(),
        vdso_hash,
        vmas,
        remote_pages: remote_pages.iter().collect(),
    };

    let image = ProcessImage {
        version: IMAGE_VERSION,
        source: SourceInfo {
            kernel_release: kernel_release(),
            pid: pid.as_raw(),
            ns_pid: inv.ns_pid,
            start_time: inv.start_time,
            dumped_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        },
        task,
        mm,
        threads,
        fds,
    };
    stats.elapsed_ns = elapsed_ns(start);
    Ok((image, stats))
}

/// What the dump reads from outside the target (no injection): see [`from_outside`].
struct Outside {
    rlimits: Vec<RlimitImage>,
    personality: u32,
    exe: Option<FileIdentity>,
    vmas: Vec<VmaImage>,
    vdso_hash: u64,
    /// In the order of the registers' threads.
    per_thread: Vec<ThreadOutside>,
    fds: Vec<crate::image::fd::FdImage>,
    stats: DumpStats,
    /// The pages left on the source ([`PagePolicy::LeaveOnSource`]).
    remote_pages: crate::dirty::RangeSet,
}

#[derive(Clone, Copy)]
struct ThreadOutside {
    /// The tid as the process's own pid namespace sees it.
    ns_tid: i32,
    robust_list: u64,
    robust_list_len: u64,
}

/// Everything of the image read from outside the frozen target (prlimit, /proc, stolen fds,
/// get_robust_list) and its pages into `sink`; runs while [`gather_remote`] injects.
fn from_outside<S: PageSink>(
    tracer: &Tracer,
    inv: &proc::ProcessInventory,
    regs: &[ptrace::ThreadRegisters],
    sink: &mut S,
    only: Option<&crate::dirty::RangeSet>,
    policy: PagePolicy,
) -> Result<Outside, DumpError> {
    let pid = tracer.pid();
    let mut rlimits = Vec::with_capacity(16);
    for resource in 0..16u32 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with a null new limit only writes one rlimit64 to `old`.
        let r = unsafe {
            libc::prlimit64(
                pid.as_raw(),
                resource as libc::__rlimit_resource_t,
                std::ptr::null(),
                &mut old,
            )
        };
        Errno::result(r).map_err(|e| DumpError::Io {
            pid,
            what: format!("prlimit({resource})"),
            source: e.into(),
        })?;
        rlimits.push(RlimitImage {
            resource,
            soft: old.rlim_cur,
            hard: old.rlim_max,
        });
    }
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let exe = match &inv.exe {
        Some(path) => Some(
            FileIdentity::of(path, std::path::Path::new(&format!("/proc/{pid}/exe"))).map_err(
                |source| DumpError::Io {
                    pid,
                    what: "stat of /proc/PID/exe".into(),
                    source,
                },
            )?,
        ),
        None => None,
    };

    let mut vmas = Vec::with_capacity(inv.vmas.len());
    let mut vdso_hash = 0;
    for v in &inv.vmas {
        vmas.push(vma_image(pid, v)?);
        if v.kind == VmaKind::Vdso {
            let bytes = tracer
                .read_memory(v.start, v.len() as usize)
                .map_err(|source| DumpError::Memory { pid, source })?;
            vdso_hash = fnv1a(&bytes);
        }
    }

    // A process whose NSpid has one entry lives in the pid namespace of our /proc: so do its
    // threads (they share it), and each tid is already the one it knows itself by.
    let own_namespace = inv.status.ns_pid.len() <= 1;
    let mut per_thread = Vec::with_capacity(regs.len());
    for r in regs {
        let tid = Tid::from_raw(r.tid);
        let (robust_list, robust_list_len) = robust_list(tid).map_err(|e| DumpError::Io {
            pid,
            what: format!("get_robust_list({tid})"),
            source: e.into(),
        })?;
        let ns_tid = if own_namespace { r.tid } else { ns_tid(pid, tid).unwrap_or(r.tid) };
        per_thread.push(ThreadOutside { ns_tid, robust_list, robust_list_len });
    }

    let fds = crate::files::dump_fds(pid, inv).map_err(|source| DumpError::Files { pid, source })?;

    let pages_start = Instant::now();
    let mut remote_pages = crate::dirty::RangeSet::new();
    let lazy = (policy == PagePolicy::LeaveOnSource).then_some(&mut remote_pages);
    let mut stats = pages::dump_pages(pid, &vmas, sink, only, None, lazy)?;
    stats.remote_pages = remote_pages.pages();
    stats.pages_elapsed_ns = elapsed_ns(pages_start);
    Ok(Outside {
        rlimits,
        personality,
        exe,
        vmas,
        vdso_hash,
        per_thread,
        fds,
        stats,
        remote_pages,
    })
}

/// The registers a thread resumes with in the restored process (pure).
///
/// CRIU's fix-up ([`remote::restart_fixup`]) with one difference: a call interrupted with
/// `-ERESTART_RESTARTBLOCK` (nanosleep, clock_nanosleep, poll/futex with a timeout) is
/// re-executed from its start (`rax = orig_rax, rip -= 2`) rather than failing with EINTR; its
/// arguments are still in its registers. Like the in-place thaw, a call that a stop alone makes
/// fail with EINTR (epoll_wait & co.) is re-executed unless a signal is waiting for it. Known
/// deviation: a relative timeout restarts from its full length.
pub fn image_regs(saved: &libc::user_regs_struct, signal_pending: bool) -> libc::user_regs_struct {
    let mut out = remote::restart_fixup(saved);
    if let Some(nr) = remote::interrupted_syscall(saved) {
        let rax = saved.rax as i64;
        let eintr_on_stop = rax == i64::from(-libc::EINTR)
            && remote::fails_with_eintr_on_stop(nr)
            && !signal_pending;
        // A thread already inside restart_syscall cannot be re-executed: the call it restarts
        // lives in the source kernel's restart block. It gets -EINTR (CRIU's rule).
        let restartable_block = rax == -remote::ERESTART_RESTARTBLOCK && nr != libc::SYS_restart_syscall;
        if restartable_block || eintr_on_stop {
            out.rax = saved.orig_rax;
            out.rip = saved.rip.wrapping_sub(remote::SYSCALL_INSN_LEN);
        }
    }
    out
}

fn siginfo(raw: &[u8]) -> SiginfoImage {
    let signal = raw
        .get(0..4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or(0);
    SiginfoImage {
        signal,
        raw: raw.to_vec(),
    }
}

/// The tid as the process's own pid namespace sees it (last NSpid of the thread).
fn ns_tid(pid: Pid, tid: Tid) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The running kernel's release, read once: it cannot change under a running agent.
fn kernel_release() -> String {
    static RELEASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RELEASE
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        })
        .clone()
}

fn robust_list(tid: Tid) -> Result<(u64, u64), Errno> {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: get_robust_list writes one pointer to `head` and one size_t to `len`, both locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    };
    Errno::result(r)?;
    Ok((head, len))
}

fn check_supported(pid: Pid, inv: &proc::ProcessInventory) -> Result<(), DumpError> {
    let unsupported = |reason: String| DumpError::Unsupported { pid, reason };
    for v in &inv.vmas {
        match v.kind {
            VmaKind::SysvShm | VmaKind::Memfd | VmaKind::DeletedFile | VmaKind::Special => {
                return Err(unsupported(format!(
                    "mapping {:#x}-{:#x} ({}) of kind {} cannot be migrated yet",
                    v.start,
                    v.end,
                    v.path.as_deref().unwrap_or(""),
                    v.kind.name()
                )))
            }
            _ => {}
        }
    }
    if !inv.threads.iter().any(|t| t.tid == pid) {
        return Err(unsupported("its thread-group leader has exited".into()));
    }
    Ok(())
}

fn vma_image(pid: Pid, v: &proc::Vma) -> Result<VmaImage, DumpError> {
    let mut prot = 0u32;
    if v.perms.read {
        prot |= libc::PROT_READ as u32;
    }
    if v.perms.write {
        prot |= libc::PROT_WRITE as u32;
    }
    if v.perms.exec {
        prot |= libc::PROT_EXEC as u32;
    }
    let mut flags = if v.perms.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    } as u32;
    if v.kind == VmaKind::Stack {
        flags |= libc::MAP_GROWSDOWN as u32;
    }
    let file = match v.kind {
        VmaKind::File | VmaKind::FileShared => {
            let path = v.path.clone().unwrap_or_default();
            let link = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
            Some(
                FileIdentity::of(&path, std::path::Path::new(&link)).map_err(|source| {
                    DumpError::Io {
                        pid,
                        what: format!("stat of {link} ({path})"),
                        source,
                    }
                })?,
            )
        }
        _ => None,
    };
    Ok(VmaImage {
        start: v.start,
        end: v.end,
        prot,
        flags,
        pgoff: if file.is_some() { v.offset } else { 0 },
        file,
        kind: v.kind,
    })
}

/// Drops the SIGSTOP the tracer parked (see [`crate::ptrace`]) from the captured queues: the
/// copy must not start stopped. Our SIGSTOP is the only one in its thread's private queue (a
/// standard signal sent again merges with it); shared-queue SIGSTOPs are someone else's and kept.
#[allow(clippy::type_complexity)]
fn without_parked_stop(
    tracer: &Tracer,
    mut per_thread: Vec<Vec<Vec<u8>>>,
    shared: Vec<Vec<u8>>,
) -> (Vec<Vec<Vec<u8>>>, Vec<Vec<u8>>) {
    if tracer.has_parked_stop() {
        let is_stop = |raw: &Vec<u8>| {
            raw.len() >= 4 && i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]) == libc::SIGSTOP
        };
        for queue in &mut per_thread {
            queue.retain(|raw| !is_stop(raw));
        }
    }
    (per_thread, shared)
}

/// What the remote syscalls found.
struct Remote {
    sigactions: Vec<SigactionImage>,
    itimers: Itimers,
    brk: u64,
    dumpable: i32,
    pdeathsig: i32,
    child_subreaper: bool,
    altstacks: Vec<AltStack>,
    tid_addresses: Vec<u64>,
}

fn gather_remote(tracer: &Tracer, tids: &[Tid]) -> Result<Remote, DumpError> {
    let pid = tracer.pid();
    let call = |tid: Option<Tid>, what: &'static str, nr: i64, args: [u64; 6]| {
        let ret = tracer
            .syscall_in(tid, nr, args)
            .map_err(|source| DumpError::Remote { pid, what, source })?;
        if (-4095..0).contains(&ret) {
            return Err(DumpError::RemoteErrno {
                pid,
                what,
                errno: Errno(-ret as i32),
            });
        }
        Ok(ret)
    };
    let scratch = call(
        None,
        "mmap(scratch)",
        libc::SYS_mmap,
        [
            0,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )? as u64;
    let body = || -> Result<Remote, DumpError> {
        let mut signals = Vec::new();
        for sig in 1..=64i32 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let at = scratch + SC_SIGACTIONS + (sig as u64 - 1) * 32;
            call(
                None,
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [sig as u64, 0, at, 8, 0, 0],
            )?;
            signals.push(sig);
        }
        for which in 0..3u64 {
            call(
                None,
                "getitimer",
                libc::SYS_getitimer,
                [which, scratch + SC_ITIMERS + which * 32, 0, 0, 0, 0],
            )?;
        }
        let brk = call(None, "brk(0)", libc::SYS_brk, [0; 6])? as u64;
        let dumpable = call(
            None,
            "prctl(PR_GET_DUMPABLE)",
            libc::SYS_prctl,
            [libc::PR_GET_DUMPABLE as u64, 0, 0, 0, 0, 0],
        )? as i32;
        call(
            None,
            "prctl(PR_GET_PDEATHSIG)",
            libc::SYS_prctl,
            [libc::PR_GET_PDEATHSIG as u64, scratch + SC_INTS, 0, 0, 0, 0],
        )?;
        call(
            None,
            "prctl(PR_GET_CHILD_SUBREAPER)",
            libc::SYS_prctl,
            [
                libc::PR_GET_CHILD_SUBREAPER as u64,
                scratch + SC_INTS + 4,
                0,
                0,
                0,
                0,
            ],
        )?;
        let max_threads = ((SCRATCH_LEN - SC_THREAD) / 32) as usize;
        let mut altstacks = Vec::new();
        let mut tid_addresses = Vec::new();
        for chunk in tids.chunks(max_threads) {
            for (i, &tid) in chunk.iter().enumerate() {
                let at = scratch + SC_THREAD + i as u64 * 32;
                call(
                    Some(tid),
                    "sigaltstack",
                    libc::SYS_sigaltstack,
                    [0, at, 0, 0, 0, 0],
                )?;
                call(
                    Some(tid),
                    "prctl(PR_GET_TID_ADDRESS)",
                    libc::SYS_prctl,
                    [libc::PR_GET_TID_ADDRESS as u64, at + 24, 0, 0, 0, 0],
                )?;
            }
            let raw = tracer
                .read_memory(scratch + SC_THREAD, chunk.len() * 32)
                .map_err(|source| DumpError::Memory { pid, source })?;
            for rec in raw.chunks(32) {
                altstacks.push(AltStack::from_kernel(&rec[..24]));
                tid_addresses.push(u64::from_le_bytes(rec[24..32].try_into().unwrap_or_default()));
            }
        }
        let page = tracer
            .read_memory(scratch, SC_THREAD as usize)
            .map_err(|source| DumpError::Memory { pid, source })?;
        let sigactions = signals
            .iter()
            .map(|&sig| {
                let off = (SC_SIGACTIONS as usize) + (sig as usize - 1) * 32;
                SigactionImage::from_kernel(sig, &page[off..off + 32])
            })
            .collect();
        let it = |which: usize| {
            let off = SC_ITIMERS as usize + which * 32;
            ItimerImage::from_kernel(&page[off..off + 32])
        };
        let int_at = |off: usize| i32::from_le_bytes(page[off..off + 4].try_into().unwrap_or_default());
        Ok(Remote {
            sigactions,
            itimers: Itimers {
                real: it(0),
                virt: it(1),
                prof: it(2),
            },
            brk,
            dumpable,
            pdeathsig: int_at(SC_INTS as usize),
            child_subreaper: int_at(SC_INTS as usize + 4) != 0,
            altstacks,
            tid_addresses,
        })
    };
    let result = body();
    let unmapped = call(
        None,
        "munmap(scratch)",
        libc::SYS_munmap,
        [scratch, SCRATCH_LEN, 0, 0, 0, 0],
    );
    let remote = result?;
    unmapped?;
    Ok(remote)
}
