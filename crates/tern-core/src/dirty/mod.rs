//! Dirty tracking: which pages a running process wrote since the last look.
//!
//! One trait, [`DirtyTracker`], two backends chosen by probing the kernel ([`crate::probe`]):
//! soft-dirty where the kernel has it ([`SoftDirtyTracker`]), userfaultfd write-protect async +
//! PAGEMAP_SCAN where it does not ([`UffdWpTracker`], Linux 6.7+; the one that runs here).
//!
//! # The userfaultfd-wp sequence (what [`UffdWpTracker`] does, in order)
//!
//! ```text
//!  start(tracer)            target FROZEN (remote syscalls)
//!    1. remote   userfaultfd(O_CLOEXEC|O_NONBLOCK)     -> fd N inside the target
//!                (retried with UFFD_USER_MODE_ONLY on EPERM: async WP never delivers a fault)
//!    2. local    pidfd_open(pid) + pidfd_getfd(N)      -> our duplicate of the same uffd ctx
//!    3. remote   close(N)                              the target holds no extra fd from here on
//!                                                      (our duplicate keeps the ctx and its mm)
//!    4. local    UFFDIO_API { WP_ASYNC | WP_UNPOPULATED }
//!    5. local    per writable VMA that the dump copies: UFFDIO_REGISTER { MODE_WP } (an ioctl on
//!                our fd acts on the target's mm; a VMA the kernel refuses is "untracked": every
//!                collect reports all of it)
//!    6. local    PAGEMAP_SCAN on /proc/PID/pagemap over [0, TASK_SIZE) with
//!                PM_SCAN_WP_MATCHING, category WRITTEN: write-protects every page (result
//!                discarded: round 0 sends everything anyway)
//!  thaw, the target runs; round 0 reads every present page (torn pages are dirty, resent)
//!  collect()                target RUNNING (nothing is injected)
//!    1. re-read /proc/PID/maps; UFFDIO_REGISTER every writable copied VMA again: idempotent for
//!       VMAs already ours, and it catches VMAs created, grown, moved or re-created at the same
//!       address since (their populated pages carry no wp bit, so the scan reports them written;
//!       unpopulated ones are covered by WP_UNPOPULATED). Unmapped or shrunk VMAs simply vanish.
//!    2. PAGEMAP_SCAN, PM_SCAN_WP_MATCHING (no CHECK_WPASYNC: VMAs not registered with us are
//!       skipped silently instead of failing the walk), category_mask = return_mask =
//!       PAGE_IS_WRITTEN, vec_len 512, looping from walk_end while a call fills the vector
//!       (above 512 regions walk_end is stale on 6.18: see DESIGN.md). Each call returns the
//!       pages written since the last scan AND re-protects them atomically, so a write racing
//!       the scan is either in this answer or in the next one, never lost.
//!  stop()                   target running or frozen
//!    UFFDIO_UNREGISTER every VMA (clears the wp bits), close our fd: the last reference to the
//!    ctx goes and no range can stay registered; the target never held a stray fd after start.
//! ```
//!
//! # The soft-dirty sequence ([`SoftDirtyTracker`], CRIU's pre-dump)
//!
//! start: `echo 4 > /proc/PID/clear_refs`. collect (target frozen for the instant between read
//! and clear, else a write between the two is lost): read /proc/PID/pagemap over every writable
//! copied VMA, bit 55 set = written since the last clear ([`soft_dirty_ranges`]), then clear again.
//! New VMAs are born soft-dirty (VM_SOFTDIRTY), so they are reported whole. stop: nothing to undo.

mod ranges;
mod soft;
mod uffd;

pub use ranges::RangeSet;
pub use soft::{soft_dirty_ranges, SoftDirtyTracker};
pub use uffd::UffdWpTracker;
pub(crate) use uffd::{pagemap_scan_any, pagemap_scan_matching};

use crate::probe::DirtyTracking;
use crate::proc::{Vma, VmaKind};
use crate::ptrace::Tracer;
use crate::sys::{Errno, Pid};

/// A failed tracking step.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("dirty tracking of pid {pid}: the target must be frozen for {what}")]
    NotFrozen { pid: Pid, what: &'static str },
    #[error("dirty tracking of pid {pid}: {what}: {errno}")]
    Sys {
        pid: Pid,
        what: String,
        errno: Errno,
    },
    #[error("dirty tracking of pid {pid}: {what}: {source}")]
    Io {
        pid: Pid,
        what: String,
        source: std::io::Error,
    },
    #[error("dirty tracking of pid {pid}: remote {what}: {detail}")]
    Remote {
        pid: Pid,
        what: &'static str,
        detail: String,
    },
    #[error("dirty tracking of pid {pid}: {msg}")]
    Other { pid: Pid, msg: String },
    #[error("this kernel has no dirty tracking (neither soft-dirty nor uffd-wp async)")]
    Unavailable,
    #[error("dirty tracking of pid {pid} is not started")]
    NotStarted { pid: Pid },
}

/// Tracks the pages a process writes, round after round.
pub trait DirtyTracker: Send {
    /// Which backend this is.
    fn kind(&self) -> DirtyTracking;
    /// Starts tracking; `tracer`'s target must be frozen. Returns the first full set: every range
    /// of every VMA whose pages the dump copies (round 0 sends all of their present pages).
    fn start(&mut self, tracer: &Tracer) -> Result<RangeSet, DirtyError>;
    /// The pages written since `start` or the previous `collect`, re-armed atomically where the
    /// backend allows (uffd-wp: while the target runs; soft-dirty: freezes it for the instant).
    fn collect(&mut self, tracer: &Tracer) -> Result<RangeSet, DirtyError>;
    /// Removes every trace of tracking (no registered range, no fd in the target). Idempotent.
    fn stop(&mut self, tracer: &Tracer) -> Result<(), DirtyError>;
}

/// The tracker this kernel supports (probed: soft-dirty preferred, then uffd-wp).
pub fn tracker_for(kind: DirtyTracking, pid: Pid) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    match kind {
        DirtyTracking::SoftDirty => Ok(Box::new(SoftDirtyTracker::new(pid))),
        DirtyTracking::UffdWp => Ok(Box::new(UffdWpTracker::new(pid))),
        DirtyTracking::None => Err(DirtyError::Unavailable),
    }
}

/// Probes the kernel and returns its tracker.
pub fn probe_tracker(pid: Pid) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    tracker_for(crate::probe::probe_kernel().dirty_tracking, pid)
}

/// Whether the dump copies pages of a VMA of this kind (as `VmaImage::has_dumpable_pages`).
pub(crate) fn copied(v: &Vma) -> bool {
    !matches!(
        v.kind,
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall | VmaKind::FileShared
    )
}

/// Whether writes to this VMA must be tracked: it is copied and writable.
pub(crate) fn tracked(v: &Vma) -> bool {
    copied(v) && v.perms.write
}

/// Every copied VMA of `pid`, as ranges (the first full set).
pub(crate) fn copied_ranges(pid: Pid) -> Result<(Vec<Vma>, RangeSet), DirtyError> {
    let vmas = crate::proc::maps::read_maps(pid).map_err(|e| DirtyError::Other {
        pid,
        msg: e.to_string(),
    })?;
    let set = RangeSet::from_ranges(vmas.iter().filter(|v| copied(v)).map(|v| (v.start, v.end)));
    Ok((vmas, set))
}
