//! Restore: rebuild a process from its image and pages, with the same pid and tids.
//!
//! # The restore sequence (destination side)
//!
//! Everything below runs on one dedicated thread (it is the stub's parent and its tracer:
//! ptrace belongs to the thread that attached). Any failure kills the half-built process (by
//! pid, it is ours), reaps it and returns which step failed; nothing is left behind.
//!
//! ```text
//!  checks      pid free (kill(pid, 0) → ESRCH); exe and every mapped file present with the
//!              image's size and mtime (FileMissing / FileChanged); vdso/vvar layout and vdso
//!              bytes (FNV-1a) identical to the source's (VdsoMismatch): nothing is cloned yet
//!  clone       clone3(set_tid = [pid], CLONE_VM | CLONE_VFORK, SIGCHLD) on a small stack of its
//!              own → child: control socket at fd 3, every other fd closed, execveat(memfd
//!              holding tern-stub, AT_EMPTY_PATH). Sharing the engine's memory until the exec is
//!              what keeps this cheap: a fork would copy the page tables of the whole agent
//!              (every page received for the migration) only for the exec to drop them.
//!              EEXIST → PidTaken (someone took the pid meanwhile)
//!  handover    plan + fds over the control socket (see stub_protocol); the stub puts the fds in
//!              place, sets cwd, umask, session, credentials, replies, closes its end, then
//!              pause()s; the engine waits for that close (end of file), or the socket would
//!              stay in the process when the stub is seized before it ran its close
//!  seize       PTRACE_SEIZE (TRACESYSGOOD | TRACECLONE | EXITKILL) + PTRACE_INTERRUPT; all its
//!              signals blocked (PTRACE_SETSIGMASK) while the engine works inside it
//!  trampoline  mmap 64 KiB at an address free in both the stub's and the image's layout (run
//!              with the stub's vdso `syscall`), write `syscall; int3`, the batch runner, scratch
//!              space; every later remote syscall executes there
//!  batches     a remote syscall costs two ptrace stop/resume round trips; the steps below run
//!              their syscalls in batches instead: a table of (nr, args, result) in the
//!              trampoline, a few instructions that run it in order and stop at the first error,
//!              then stop the thread with tgkill(SIGTRAP) — one round trip per batch (see the
//!              runner in rebuild.rs for why tgkill and not int3)
//!  unmap       every stub mapping except the trampoline and vdso/vvar/vvar_vclock (vsyscall stays)
//!  vdso        mremap vvar, vvar_vclock, vdso to the image's addresses (via a free spot first
//!              if the ranges overlap); with the unmaps, one batch
//!  mmap        every VMA at its exact address, MAP_FIXED_NOREPLACE; file VMAs from the file
//!              reopened by path inside the process (one batch of opens), identity re-checked on
//!              /proc/PID/fd/N; VMAs that receive pages are mapped writable first (one batch)
//!  memory      page store → process_vm_writev in vectored batches (/proc/PID/mem for the rest);
//!              zero markers need no write in anonymous memory, are written in file mappings.
//!              With `lazy_memory` ([`restore_lazy`]): a userfaultfd made inside the process
//!              before the mmaps, private anonymous VMAs with data registered MISSING instead of
//!              written, and the lazy thread started at once (see lazy.rs for the mechanism);
//!              first the guard is armed (guard.rs: a process holding a dup of the uffd that
//!              kills this one if the engine dies before its memory is home) or the restore fails
//!  mprotect    final protections (one batch)
//!  mm          prctl(PR_SET_MM, PR_SET_MM_MAP): code/data/brk/stack/arg/env fields, auxv and the
//!              exe fd (the exe opened and checked with the mapped files)
//!  task        rt_sigaction ×62, personality, prctl (dumpable, pdeathsig, subreaper): one
//!              batch; rlimits with prlimit from outside
//!  threads     clone3(set_tid = [tid], CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM) from the
//!              trampoline for every other thread, one batch: PTRACE_O_TRACECLONE catches each
//!              one stopped before its first instruction; in each thread: sigaltstack,
//!              set_robust_list, set_tid_address, rseq(ptr, len, 0, sig), PR_SET_NAME (one batch
//!              per thread, all threads at once); then its pending signals one by one
//!              (rt_tgsigqueueinfo; not in a batch, whose stop is a SIGTRAP); the process-wide
//!              ones from the leader (rt_sigqueueinfo)
//!  itimers     setitimer (late: a timer that fires now just stays pending)
//!  finish      no_new_privs; munmap the trampoline (from the leader, which never returns to
//!              it), then per thread PTRACE_SETREGS (restart fix-up already in the image),
//!              SETREGSET(xstate), SETSIGMASK(blocked), PTRACE_DETACH: the process runs; the lazy
//!              thread's background fill starts after a short delay or when the caller releases
//!              it (LazyHandle::release_background), faults are served from the start
//! ```
//!
//! [`RestoreTimings`] has the time of each of these steps and how many remote syscalls and
//! ptrace round trips they took.
//!
//! The restored process is a child of the engine process (clone3 from the engine): its parent
//! must reap it when it exits.

mod guard;
pub mod lazy;
mod rebuild;
mod stub;

pub use lazy::{LazyError, LazyHandle, LazyOptions, LazySource, LazyState, LazyStats, LazySummary};

/// The protocol between the engine and `tern-stub` (one shared source file, see its header).
pub mod stub_protocol {
    pub use tern_stub::protocol::*;
}

use crate::image::{FileIdentity, ProcessImage};
use crate::pages::PageStore;
use crate::sys::{Errno, Pid};
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// One descriptor the restored process must hold, recreated by the files work.
#[derive(Debug)]
pub struct StubFd {
    /// Its number in the restored process.
    pub target: i32,
    /// The recreated open file (the engine's copy is closed once handed over).
    pub fd: OwnedFd,
    pub cloexec: bool,
}

/// How to restore.
#[derive(Debug)]
pub struct RestoreOptions {
    /// The fds to install (the seam to `crate::files`: [`crate::files::recreate_fds`] turns
    /// `image.fds` into these, see [`RestoreOptions::with_files`]).
    pub fds: Vec<StubFd>,
    /// Run by the stub once every fd is at its number (epoll registrations).
    pub fixups: Vec<crate::files::FdFixup>,
    /// How long the stub may take to answer the handover.
    pub stub_timeout: Duration,
    /// Leave private anonymous memory to a userfaultfd and a background thread instead of
    /// writing it before the process runs (only [`restore_lazy`] can: the thread needs the
    /// store). If the userfaultfd cannot be set up the memory is written as usual, with a
    /// warning.
    pub lazy_memory: bool,
    /// How the lazy thread works (window, chunk sizes).
    pub lazy: LazyOptions,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            fds: Vec::new(),
            fixups: Vec::new(),
            stub_timeout: Duration::from_secs(10),
            lazy_memory: false,
            lazy: LazyOptions::default(),
        }
    }
}

impl RestoreOptions {
    /// Options that install what [`crate::files::recreate_fds`] built.
    pub fn with_files(recreated: crate::files::RecreatedFds) -> RestoreOptions {
        RestoreOptions {
            fds: recreated
                .fds
                .into_iter()
                .map(|f| StubFd {
                    target: f.target_fd,
                    fd: f.fd,
                    cloexec: f.cloexec,
                })
                .collect(),
            fixups: recreated.fixups,
            ..RestoreOptions::default()
        }
    }
}

const _: () = assert!(crate::files::FIXUP_RECORD_LEN == stub_protocol::FIXUP_RECORD_LEN);

/// Where the time went. The first four are the coarse phases (kept for existing readers); the
/// rest split them step by step, so that a slow restore says which step was slow.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTimings {
    /// Checks, clone3, stub handover, seize.
    pub clone_ns: u64,
    /// Trampoline, unmap, vdso, mmap, page writes, mprotect, PR_SET_MM_MAP.
    pub memory_ns: u64,
    /// Task state, threads and their state, registers, detach.
    pub threads_ns: u64,
    /// The rebuild, checks to detach (the files below come before it and are not included).
    pub total_ns: u64,
    /// Recreating the image's fds in the engine (sockets in repair mode, pipes, files), before
    /// the rebuild starts.
    pub files_ns: u64,
    /// Pid free, files present and unchanged, vdso identical.
    pub precheck_ns: u64,
    /// clone3 of the stub until the parent has its pid.
    pub spawn_ns: u64,
    /// Plan and fds sent until the stub's reply (its exec and setup run meanwhile).
    pub handover_ns: u64,
    /// PTRACE_SEIZE + INTERRUPT until the stub is stopped and its signals blocked.
    pub seize_ns: u64,
    /// Trampoline, unmapping the stub, moving vdso/vvar.
    pub layout_ns: u64,
    /// The userfaultfd (lazy) and every VMA mapped at its address, files reopened and checked.
    pub mmap_ns: u64,
    /// Registering the lazy VMAs and starting the lazy thread.
    pub lazy_start_ns: u64,
    /// Gathering and writing the pages that are not lazy.
    pub write_ns: u64,
    /// Final protections.
    pub protect_ns: u64,
    /// PR_SET_MM_MAP (exe reopened and checked).
    pub mm_ns: u64,
    /// Sigactions, personality, prctls, rlimits.
    pub task_ns: u64,
    /// clone3 of every other thread until each is stopped.
    pub thread_clone_ns: u64,
    /// Per-thread state: sigaltstack, robust list, tid address, rseq, name, pending signals.
    pub thread_state_ns: u64,
    /// Itimers, unmapping the trampoline, registers, sigmasks, detach.
    pub finish_ns: u64,
    /// Syscalls run inside the process by the tracer (each a ptrace round trip).
    pub remote_syscalls: u64,
    /// ptrace stop/resume round trips those took (a batch of syscalls takes one).
    pub remote_round_trips: u64,
}

/// A process restore rebuilt and let run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoredProcess {
    pub pid: Pid,
    /// Every thread, leader first.
    pub threads: Vec<i32>,
    pub timings: RestoreTimings,
    /// Pages written from the store (data) and zero pages written into file mappings.
    pub pages_written: u64,
    pub bytes_written: u64,
    /// Things restored differently from the image (e.g. a session that does not exist here).
    pub warnings: Vec<String>,
    /// Connected TCP sockets whose peers were nudged to retransmit at once
    /// ([`crate::files::tcp::nudge_peers`]), in the background after the process resumed.
    pub nudged_connections: usize,
    /// What was left to the lazy thread (None: every page was written).
    pub lazy: Option<LazySummary>,
}

/// Restore failed; the half-built process (if any) was killed and reaped.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("pid {pid} is already in use here")]
    PidTaken { pid: i32 },
    #[error("{path} is missing on this host: {source}")]
    FileMissing {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} changed since the dump (size {} → {}, mtime {} → {})",
        .expected.size, .found.size, .expected.mtime_ns, .found.mtime_ns)]
    FileChanged {
        path: String,
        expected: FileIdentity,
        found: FileIdentity,
    },
    #[error("the vdso here differs from the source's: {0}")]
    VdsoMismatch(String),
    #[error("cannot restore: {0}")]
    Unsupported(String),
    #[error("the stub failed while {step}: {errno}")]
    Stub { step: String, errno: Errno },
    #[error("recreating the fds: {0}")]
    Files(#[from] crate::files::FilesRestoreError),
    #[error("restore failed at {step}: {detail}")]
    Failed { step: String, detail: String },
}

impl RestoreError {
    pub(crate) fn at(step: impl Into<String>, detail: impl std::fmt::Display) -> RestoreError {
        RestoreError::Failed {
            step: step.into(),
            detail: detail.to_string(),
        }
    }
}

/// Rebuilds `image` with its pid in the calling thread's pid namespace, memory from `pages`.
/// `options.lazy_memory` needs [`restore_lazy`] (the lazy thread must own the store).
pub fn restore(
    image: &ProcessImage,
    pages: &PageStore,
    options: RestoreOptions,
) -> Result<RestoredProcess, RestoreError> {
    if options.lazy_memory {
        return Err(RestoreError::Unsupported(
            "lazy memory needs a shared page store: use restore_lazy".into(),
        ));
    }
    on_restore_thread(image, pages, None, options).map(|(r, _)| r)
}

/// [`restore`] with the store shared: with `options.lazy_memory`, private anonymous memory is
/// filled after the process runs by the returned [`LazyHandle`]'s thread, which holds `pages`
/// until every page is home (then drops its reference). Without it, the same as [`restore`].
pub fn restore_lazy(
    image: &ProcessImage,
    pages: Arc<PageStore>,
    options: RestoreOptions,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    restore_remote(image, pages, None, options)
}

/// [`restore_lazy`] for an image whose `mm.remote_pages` stayed on the source (post-copy,
/// hybrid): `remote` delivers them (a [`crate::pages::pull::RemotePages`]), layered over the
/// local `pages`; lazy memory is then not optional.
pub fn restore_remote(
    image: &ProcessImage,
    pages: Arc<PageStore>,
    remote: Option<Arc<dyn LazySource>>,
    options: RestoreOptions,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    let remote_pages = crate::dirty::RangeSet::from_ranges(image.mm.remote_pages.iter().copied());
    let source: Option<Arc<dyn LazySource>> = match remote {
        Some(remote) => Some(Arc::new(lazy::Layered { local: pages.clone(), remote, remote_extents: remote_pages })),
        None if !remote_pages.is_empty() => {
            return Err(RestoreError::Unsupported(format!(
                "{} pages of this image stayed on the source and no connection to it was given",
                remote_pages.pages()
            )))
        }
        None => options.lazy_memory.then(|| pages.clone() as Arc<dyn LazySource>),
    };
    let options = RestoreOptions { lazy_memory: source.is_some(), ..options };
    on_restore_thread(image, &pages, source, options)
}

fn on_restore_thread(
    image: &ProcessImage,
    pages: &PageStore,
    lazy: Option<Arc<dyn LazySource>>,
    options: RestoreOptions,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(format!("tern-restore-{}", image.source.ns_pid))
            .spawn_scoped(scope, move || rebuild::run(image, pages, lazy, options))
            .map_err(|e| RestoreError::at("spawning the restore thread", e))?
            .join()
            .unwrap_or_else(|panic| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(RestoreError::at("the restore thread", format!("panicked: {msg}")))
            })
    })
}

/// The whole destination side: recreate the image's fds here ([`crate::files::recreate_fds`]),
/// then [`restore`] with them.
pub fn restore_with_files(
    image: &ProcessImage,
    pages: &PageStore,
    files: &crate::files::RecreateOptions,
) -> Result<RestoredProcess, RestoreError> {
    let t = std::time::Instant::now();
    let recreated = crate::files::recreate_fds(&image.fds, files)?;
    let files_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut restored = restore(image, pages, RestoreOptions::with_files(recreated))?;
    restored.timings.files_ns = files_ns;
    Ok(nudge(image, restored))
}

/// [`restore_with_files`] through [`restore_lazy`] (`lazy_memory` as asked).
pub fn restore_with_files_lazy(
    image: &ProcessImage,
    pages: Arc<PageStore>,
    files: &crate::files::RecreateOptions,
    lazy_memory: bool,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    restore_with_files_remote(image, pages, None, files, lazy_memory)
}

/// [`restore_with_files`] through [`restore_remote`].
pub fn restore_with_files_remote(
    image: &ProcessImage,
    pages: Arc<PageStore>,
    remote: Option<Arc<dyn LazySource>>,
    files: &crate::files::RecreateOptions,
    lazy_memory: bool,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    let t = std::time::Instant::now();
    let recreated = crate::files::recreate_fds(&image.fds, files)?;
    let files_ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let options = RestoreOptions { lazy_memory, ..RestoreOptions::with_files(recreated) };
    let (mut restored, lazy) = restore_remote(image, pages, remote, options)?;
    restored.timings.files_ns = files_ns;
    Ok((nudge(image, restored), lazy))
}

fn nudge(image: &ProcessImage, mut restored: RestoredProcess) -> RestoredProcess {
    // The peers of its connections may be waiting out a retransmission backoff that grew while
    // the source dropped their segments: prompt them now (RFC 6069 reverts, files/tcp/nudge.rs).
    // On its own thread: the process already runs, and nothing here waits for the ICMPs.
    let targets = crate::files::tcp::nudge_targets(&image.fds);
    restored.nudged_connections = targets.len();
    if !targets.is_empty() {
        let _ = std::thread::Builder::new()
            .name("tern-nudge".into())
            .spawn(move || crate::files::tcp::nudge_peers(&targets, Default::default()));
    }
    restored
}

/// Checks what restore checks before cloning anything (pid free, files, vdso): `migrate check`
/// on the destination.
pub fn check(image: &ProcessImage) -> Result<(), RestoreError> {
    rebuild::precheck(image)
}

/// Pids of processes this engine restored and still parents (see [`reap_when_exited`]).
static RESTORED_CHILDREN: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// True when `pid` is a process this engine restored (and so its parent) that has not exited.
pub fn is_restored_child(pid: Pid) -> bool {
    RESTORED_CHILDREN.lock().map(|v| v.contains(&pid.as_raw())).unwrap_or(false)
}

/// A restored process is a child of the engine (it was cloned from it). The engine's host (Node's
/// libuv reaps only the children it spawned itself) would leave it a zombie when it exits, so one
/// thread waits for its exit and reaps it.
///
/// It must never call a plain blocking waitpid: while any thread of this process traces the
/// child (a later migration away from here), such a wait would also collect its ptrace stops and
/// the tracer would wait forever. So it polls a pidfd, which becomes readable only when the
/// process has exited, and only then reaps it with waitid(P_PIDFD, WEXITED).
pub fn reap_when_exited(pid: Pid) {
    let pidfd = match crate::pidfd::PidFd::open(pid) {
        Ok(fd) => fd,
        // Already gone: nothing to reap from here (or it was reaped by someone else).
        Err(_) => return,
    };
    if let Ok(mut v) = RESTORED_CHILDREN.lock() {
        v.push(pid.as_raw());
    }
    let spawned = std::thread::Builder::new().name(format!("tern-reap-{pid}")).spawn(move || {
        // Only an error of poll itself ends the wait early; the reap then waits anyway.
        let _ = pidfd.wait_exited(None);
        let _ = pidfd.reap();
        if let Ok(mut v) = RESTORED_CHILDREN.lock() {
            v.retain(|p| *p != pid.as_raw());
        }
    });
    // Without the thread the process still runs; it is reaped when the engine's process exits.
    drop(spawned);
}
