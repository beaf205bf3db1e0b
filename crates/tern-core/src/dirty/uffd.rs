//! [`UffdWpTracker`]: userfaultfd write-protect async + PAGEMAP_SCAN (see the module header of
//! [`crate::dirty`] for the whole sequence).
use super::{tracked, DirtyError, DirtyTracker, RangeSet};
use crate::pidfd::PidFd;
use crate::probe::DirtyTracking;
use crate::proc::{Vma, VmaKind};
use crate::ptrace::Tracer;
use crate::sys::{Errno, Pid};
pub(crate) use crate::uapi::{PageRegion, PmScanArg, PAGEMAP_SCAN, PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING};
use crate::uapi::{
    UffdioApi, UffdioRange, UffdioRegister, UFFDIO_API, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_WP,
    UFFDIO_UNREGISTER, UFFD_API, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY,
};
use std::os::fd::{AsRawFd, OwnedFd};

/// Regions per PAGEMAP_SCAN call: above 512 walk_end comes back stale (DESIGN.md).
pub(crate) const SCAN_VEC_LEN: usize = 512;

fn ioctl_ptr<T>(fd: i32, request: libc::c_ulong, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: every request used here takes a pointer to exactly a `T` (the struct its ioctl
    // number encodes), exclusively borrowed for the call.
    Errno::result(unsafe { libc::ioctl(fd, request, arg as *mut T) })
}

/// One PAGEMAP_SCAN walk over `[start, end)` of an open pagemap, in calls of at most
/// [`SCAN_VEC_LEN`] regions, continuing from walk_end while a call fills its vector. Every
/// matching region is appended to `out`. Returns the number of ioctl calls.
pub(crate) fn pagemap_scan(
    pagemap: i32,
    start: u64,
    end: u64,
    flags: u64,
    inverted: u64,
    mask: u64,
    out: &mut RangeSet,
) -> Result<u32, Errno> {
    let query = PmScanArg { flags, category_inverted: inverted, category_mask: mask, return_mask: mask, ..Default::default() };
    scan_walk(pagemap, start, end, query, out)
}

/// The pages of `[start, end)` that have ANY of the `anyof` categories (e.g. present or
/// swapped: the pages holding data), appended to `out`. Read-only: no write-protect change.
pub(crate) fn pagemap_scan_any(pagemap: i32, start: u64, end: u64, anyof: u64, out: &mut RangeSet) -> Result<u32, Errno> {
    let query = PmScanArg { category_anyof_mask: anyof, return_mask: anyof, ..Default::default() };
    scan_walk(pagemap, start, end, query, out)
}

/// A read-only scan with the kernel's whole category test: a page matches when its categories,
/// XORed with `inverted`, hold every bit of `mask` and, if `anyof` is not 0, at least one bit of
/// `anyof` (fs/proc/task_mmu.c, pagemap_scan_is_interesting_page). E.g. the pages holding no
/// data: `inverted = mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED`.
pub(crate) fn pagemap_scan_matching(
    pagemap: i32,
    start: u64,
    end: u64,
    inverted: u64,
    mask: u64,
    anyof: u64,
    out: &mut RangeSet,
) -> Result<u32, Errno> {
    let query = PmScanArg {
        category_inverted: inverted,
        category_mask: mask,
        category_anyof_mask: anyof,
        return_mask: mask | anyof,
        ..Default::default()
    };
    scan_walk(pagemap, start, end, query, out)
}

/// The walk both scans share; `query` carries the flags and category masks.
fn scan_walk(pagemap: i32, start: u64, end: u64, query: PmScanArg, out: &mut RangeSet) -> Result<u32, Errno> {
    let mut vec = [PageRegion::default(); SCAN_VEC_LEN];
    let mut calls = 0;
    let mut from = start;
    while from < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: from,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: SCAN_VEC_LEN as u64,
            ..query
        };
        let n = ioctl_ptr(pagemap, PAGEMAP_SCAN, &mut arg)? as usize;
        calls += 1;
        for r in &vec[..n.min(SCAN_VEC_LEN)] {
            out.push(r.start, r.end);
        }
        if n < SCAN_VEC_LEN || arg.walk_end <= from {
            break;
        }
        from = arg.walk_end;
    }
    Ok(calls)
}

/// The uffd-wp async backend.
#[derive(Debug)]
pub struct UffdWpTracker {
    pid: Pid,
    uffd: Option<OwnedFd>,
    pagemap: Option<std::fs::File>,
    /// Writable copied VMAs the kernel refused to register: reported whole every collect.
    untracked: RangeSet,
    /// PAGEMAP_SCAN calls and registrations of the last collect (for figures).
    pub last_scan_calls: u32,
    pub last_registered: u32,
    /// The thread the remote syscalls run in (see [`injection_thread`]).
    inject_tid: Option<crate::sys::Tid>,
}

/// The thread to inject into: one stopped outside any syscall if there is one, else one whose
/// interrupted syscall does not restart through the restart block (-ERESTART_RESTARTBLOCK:
/// nanosleep & co.; after an injection and an in-place thaw those come back EINTR on 6.18),
/// else the tracer's default.
pub fn injection_thread(threads: &[crate::ptrace::ThreadRegisters]) -> Option<crate::sys::Tid> {
    const ERESTART_RESTARTBLOCK: i64 = 516;
    let pick = threads
        .iter()
        .find(|t| !t.in_syscall)
        .or_else(|| threads.iter().find(|t| t.regs.rax as i64 != -ERESTART_RESTARTBLOCK))?;
    Some(crate::sys::Tid::from_raw(pick.tid))
}

impl UffdWpTracker {
    pub fn new(pid: Pid) -> UffdWpTracker {
        UffdWpTracker {
            pid,
            uffd: None,
            pagemap: None,
            untracked: RangeSet::new(),
            last_scan_calls: 0,
            last_registered: 0,
            inject_tid: None,
        }
    }

    fn sys(&self, what: impl Into<String>, errno: Errno) -> DirtyError {
        DirtyError::Sys {
            pid: self.pid,
            what: what.into(),
            errno,
        }
    }

    fn remote(&self, tracer: &Tracer, what: &'static str, nr: i64, args: [u64; 6]) -> Result<i64, DirtyError> {
        tracer.syscall_in(self.inject_tid, nr, args).map_err(|e| DirtyError::Remote {
            pid: self.pid,
            what,
            detail: e.to_string(),
        })
    }

    /// Registers every writable copied VMA (idempotent for ours); refused ones become untracked.
    fn register_all(&mut self, vmas: &[Vma]) -> Result<(), DirtyError> {
        let Some(uffd) = self.uffd.as_ref().map(|f| f.as_raw_fd()) else {
            return Err(DirtyError::NotStarted { pid: self.pid });
        };
        let mut untracked = RangeSet::new();
        let mut n = 0;
        for v in vmas.iter().filter(|v| tracked(v)) {
            let mut reg = UffdioRegister {
                start: v.start,
                len: v.end - v.start,
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            n += 1;
            match ioctl_ptr(uffd, UFFDIO_REGISTER, &mut reg) {
                Ok(_) => {}
                // Gone or changed since maps was read: report the range whole, reads tolerate it.
                Err(_) => untracked.push(v.start, v.end),
            }
        }
        self.last_registered = n;
        self.untracked = untracked;
        Ok(())
    }

    fn scan(&mut self, vmas: &[Vma]) -> Result<RangeSet, DirtyError> {
        let pm = self
            .pagemap
            .as_ref()
            .ok_or(DirtyError::NotStarted { pid: self.pid })?
            .as_raw_fd();
        let end = scan_end(vmas);
        let mut out = RangeSet::new();
        let calls = pagemap_scan(pm, 0, end, PM_SCAN_WP_MATCHING, 0, PAGE_IS_WRITTEN, &mut out)
            .map_err(|e| self.sys("PAGEMAP_SCAN(WP_MATCHING, WRITTEN)", e))?;
        self.last_scan_calls = calls;
        Ok(out)
    }
}

/// The end of the user address space in use (page-aligned; [vsyscall] excluded).
fn scan_end(vmas: &[Vma]) -> u64 {
    vmas.iter()
        .filter(|v| v.kind != VmaKind::Vsyscall)
        .map(|v| v.end)
        .max()
        .unwrap_or(0)
}

impl DirtyTracker for UffdWpTracker {
    fn kind(&self) -> DirtyTracking {
        DirtyTracking::UffdWp
    }

    fn start(&mut self, tracer: &Tracer) -> Result<RangeSet, DirtyError> {
        let pid = self.pid;
        if !tracer.is_frozen() {
            return Err(DirtyError::NotFrozen { pid, what: "creating the userfaultfd" });
        }
        if self.uffd.is_some() {
            return Err(DirtyError::Other { pid, msg: "tracking already started".into() });
        }
        self.inject_tid = tracer.registers().ok().and_then(|t| injection_thread(&t));
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let mut fd = self.remote(tracer, "userfaultfd", libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
        if fd == -i64::from(libc::EPERM) {
            fd = self.remote(
                tracer,
                "userfaultfd(UFFD_USER_MODE_ONLY)",
                libc::SYS_userfaultfd,
                [flags | UFFD_USER_MODE_ONLY, 0, 0, 0, 0, 0],
            )?;
        }
        if fd < 0 {
            return Err(self.sys("remote userfaultfd()", Errno(-fd as i32)));
        }
        let stolen = PidFd::open(pid).and_then(|p| p.get_fd(fd as i32));
        // Close the target's fd whatever happened: our duplicate (if any) keeps the ctx alive.
        let closed = self.remote(tracer, "close(userfaultfd)", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
        let uffd = stolen.map_err(|e| DirtyError::Other { pid, msg: e.to_string() })?;
        closed?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        ioctl_ptr(uffd.as_raw_fd(), UFFDIO_API, &mut api)
            .map_err(|e| self.sys("UFFDIO_API(WP_ASYNC|WP_UNPOPULATED)", e))?;
        self.uffd = Some(uffd);
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|source| DirtyError::Io {
            pid,
            what: "open /proc/PID/pagemap".into(),
            source,
        })?;
        self.pagemap = Some(pagemap);
        let result = (|| {
            let (vmas, full) = super::copied_ranges(pid)?;
            self.register_all(&vmas)?;
            self.scan(&vmas)?; // protects everything; round 0 sends all anyway
            Ok(full)
        })();
        if result.is_err() {
            let _ = self.stop(tracer);
        }
        result
    }

    fn collect(&mut self, _tracer: &Tracer) -> Result<RangeSet, DirtyError> {
        let (vmas, _) = super::copied_ranges(self.pid)?;
        self.register_all(&vmas)?;
        let mut dirty = self.scan(&vmas)?;
        dirty.extend(&self.untracked);
        Ok(dirty)
    }

    fn stop(&mut self, _tracer: &Tracer) -> Result<(), DirtyError> {
        let Some(uffd) = self.uffd.take() else {
            return Ok(());
        };
        self.pagemap = None;
        // Unregister what is ours (clears the wp bits); VMAs of nobody are skipped by the kernel.
        if let Ok(vmas) = crate::proc::maps::read_maps(self.pid) {
            for v in vmas.iter().filter(|v| v.kind != VmaKind::Vsyscall) {
                let mut r = UffdioRange {
                    start: v.start,
                    len: v.end - v.start,
                };
                let _ = ioctl_ptr(uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r);
            }
        }
        // Dropping the last reference releases the ctx, which unregisters anything left.
        drop(uffd);
        Ok(())
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        self.pagemap = None;
        // The fd closes by itself; the kernel's release unregisters every VMA.
    }
}
