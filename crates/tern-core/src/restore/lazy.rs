//! Lazy memory at the destination: the restored process runs before its private anonymous memory
//! is written; a userfaultfd made inside it lets one engine thread fill that memory from a
//! [`LazySource`] (the local page store today, the source host in post-copy later) on demand and
//! in the background.
//!
//! # The mechanism
//!
//! ```text
//!  restore thread (the tracer, process stopped)           lazy thread (after registration)
//!  ---------------------------------------------          --------------------------------------
//!  remote  userfaultfd(O_CLOEXEC|O_NONBLOCK) -> fd N      loop:
//!  local   pidfd_open + pidfd_getfd(N)  -> our dup          poll(pidfd, every uffd, timeout 0
//!  remote  close(N): the process holds no stray fd                 while there is work)
//!  local   UFFDIO_API(EVENT_FORK|REMAP|REMOVE|UNMAP)        read uffd_msgs, in order:
//!  remote  mmap every VMA (lazy ones with their own prot)     PAGEFAULT  UFFDIO_COPY the pending
//!  local   start the guard (guard.rs): a process holding                 pages of the aligned
//!          a dup of the uffd, it kills this process if                   window (64 KiB) around
//!          the engine dies; wait for 'armed' (<= 2 s)                    it; not pending (hole,
//!  local   UFFDIO_REGISTER(MISSING) each lazy VMA                        removed) -> ZEROPAGE
//!  local   spawn the lazy thread (faults may start now:           REMOVE/UNMAP  drop the range
//!          rseq registration writes into lazy memory)                      from pending forever
//!  eager   every other VMA written as before                      REMAP   move pending + regs
//!  ...     task, threads, registers, detach: it runs              FORK    a new space: the
//!                                                                          child's uffd (a dup
//!                                                                          sent to the guard
//!                                                                          first), a copy of
//!                                                                          the pending map
//!                                                          one background chunk (1 MiB) of the
//!                                                          next pending run, UFFDIO_COPY (once
//!                                                          released, see below)
//!                                                        all pending maps empty: confirm_home
//!                                                        (remote: HOMED, the source's OK; else
//!                                                        kill, see below), UFFDIO_UNREGISTER
//!                                                        every range, close every uffd, drop
//!                                                        the source
//!                                                        then release the guard (Failed: close it
//!                                                        unreleased: the guard kills the process)
//! ```
//!
//! "Lazy" VMAs are private anonymous ones (anon, heap, stack) holding data pages in the store.
//! Zero pages and holes need nothing (fresh anonymous memory reads zero; a fault there gets
//! UFFDIO_ZEROPAGE). File-backed and shared VMAs are still written eagerly by the restore.
//!
//! # Why one thread, and why it is correct
//!
//! Everything (faults, events, background copies) runs on one thread, in the order the kernel
//! queues messages. The kernel guarantees the rest: every non-cooperative event (fork, mremap,
//! munmap, MADV_DONTNEED) raises the context's `mmap_changing` before it changes the mm and the
//! changing task waits until the event is read; while it is raised UFFDIO_COPY/ZEROPAGE fail with
//! EAGAIN. So a copy either lands before the change (and is zapped / moved / inherited with it),
//! or fails until we have read the event and updated the pending map — a removed range is never
//! filled again (that would resurrect stale data), a remapped one is filled at its new address.
//! A second thread doing background copies could pass the check, lose the CPU, and copy after
//! the event was read and the range zapped: that is why there is no second thread. The price: a
//! fault waits for at most one background chunk in flight.
//!
//! Errors of UFFDIO_COPY, and what they mean here:
//! - `copy` > 0 with an error: partial; continue after the bytes copied.
//! - EEXIST: the page is already there (we or the kernel put it there): skip it.
//! - EAGAIN: the mm is changing; read events, then retry.
//! - ENOENT: no registered VMA covers the whole range (the process split a VMA with mprotect, no
//!   event for that): halve the length; a single page with ENOENT is gone for good.
//! - ESRCH: the mm is gone (exit, exec): that space is finished.
//!
//! Fork: the parent's fork waits until the FORK message is read. Pages still missing in the
//! parent then are missing in the child too, and never written by either since the restore, so
//! the store holds their content for both: the child gets a copy of the parent's pending map
//! (with the removals already applied) and is served from the same source on its own uffd.
//!
//! The thread never abandons a live process: dropping the [`LazyHandle`] detaches it, it ends
//! when every page is home or every served process has exited. If a fill fails in a way that
//! cannot be retried the process is killed (by pid, it is ours) rather than left reading zeros.
//!
//! Post-copy: the original stays frozen on the source, which resumes it if this side is silent
//! for longer than its give-up time, and never once it heard every page is home. So before
//! reporting Homed (or Exited: an exec'd process runs on) the thread tells it
//! ([`LazySource::confirm_home`]); if that fails for good the process is killed: the source may
//! resume the original, and at most one copy may run.
//!
//! # If the engine dies: the guard
//!
//! The engine's userfaultfd dies with the engine's process, and with the last fd of a context the
//! kernel unregisters every range: a missing page would then read as zeros, and the process run
//! on, silently corrupted. So before the process runs, the restore starts a guard process
//! (guard.rs) that holds its own dup of the root userfaultfd (faults then wait instead)
//! and watches the engine: if the engine dies while pages are pending, the guard kills the process
//! and lets the context go only once it has exited. A child the process forks before its memory
//! is home has its own uffd (FORK above): the thread hands the guard a dup of it
//! ([`super::guard::Guard::hold`]) before it serves anything of that child, and the guard kills
//! the process's descendants with it (failures to hand over, e.g. beyond the guard's 256, are
//! counted in [`LazyStats::forks_unguarded`]; see guard.rs Limits). The lazy thread releases the
//! guard when every range is unregistered and every uffd closed (Homed), or when every served
//! process has exited; on Failed, or if the thread's Server is dropped (a panic), the guard is
//! closed unreleased and kills the process and its descendants.
//!
//! # The background fill waits for the switchover to end
//!
//! The thread serves faults and events from the moment it starts, but copies nothing in the
//! background until released: the rest of the restore (threads, registers), the resumed process
//! and the caller's answer that ends the downtime (an HTTP reply from a Node event loop) must not
//! compete with a gigabyte of UFFDIO_COPY for the CPU. The caller releases it with
//! [`LazyHandle::release_background`] once its answer is out; if it never does, the fill starts
//! anyway [`LazyOptions::background_delay`] after the process resumed
//! ([`LazyHandle::resumed`]), and at once when the handle is dropped (nobody can release it
//! then). While held the thread sleeps in poll() on the process's pidfd, every userfaultfd and an
//! eventfd the release writes to: a fault is read and answered as soon as it is queued, exactly as
//! when released. Nothing waits for the background fill except homing, which ends later by that
//! delay at most.

use crate::pages::{PageRun, PageStore, PAGE_SIZE};
use crate::pidfd::{PidFd, PidFdError};
use crate::sys::{Errno, Pid};
use crate::uapi::{
    UffdMsg, UffdioApi, UffdioCopy, UffdioRange, UffdioRegister, UffdioZeropage, UFFDIO_API, UFFDIO_COPY,
    UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE, UFFD_API,
    UFFD_EVENT_FORK, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP,
    UFFD_FEATURE_EVENT_FORK, UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PAGE: u64 = PAGE_SIZE as u64;

/// The features the lazy restore needs from `UFFDIO_API`.
pub const LAZY_FEATURES: u64 =
    UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;

// ---------------------------------------------------------------------------------------------
// The page source
// ---------------------------------------------------------------------------------------------

/// Where lazy pages come from: the local [`PageStore`] (a cold or pre-copy migration's pages,
/// already here), or the source host (post-copy: [`crate::pages::pull::RemotePages`]), or both
/// layered (hybrid: [`Layered`]).
pub trait LazySource: Send + Sync {
    /// The data runs held in `[start, end)`, as `(address, bytes)`, address order. Zero pages
    /// and holes are not listed: a fault there is answered with UFFDIO_ZEROPAGE.
    fn data_extents(&self, start: u64, end: u64) -> Vec<(u64, u64)>;

    /// Calls `f` once with the data at `addr`: the longest prefix, at most `max_len` bytes, that
    /// the source holds contiguously. Ok(false) (and `f` not called) when it holds no data there.
    /// A remote source blocks here until the data arrives (the faulting thread waits; never a
    /// silent zero page); Err means the data can never be had (the source is gone for good).
    fn with_data(&self, addr: u64, max_len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool, LazySourceError>;

    /// Where the background fill should copy next (a remote source prefers what has arrived).
    fn next_ready(&self) -> Ready {
        Ready::Anywhere
    }

    /// The lazy thread served a fault at `addr` (a remote source moves its prefetch there).
    fn faulted(&self, _addr: u64) {}

    /// The background fill is done with the range [`Ready::At`] offered (copied, or no longer
    /// pending): a remote source frees it.
    fn consumed(&self, _addr: u64, _len: u64) {}

    /// The state of the connection to a remote source (None for local pages).
    fn remote_stats(&self) -> Option<crate::pages::pull::RemoteStats> {
        None
    }

    /// A live view of [`Self::remote_stats`] that does not keep the source alive: the lazy
    /// thread may be blocked inside `with_data` (the connection is down) when someone asks.
    fn remote_probe(&self) -> Option<RemoteProbe> {
        None
    }

    /// Every page is home (the lazy thread calls this before it reports Homed): a remote source
    /// tells the source host and waits for its acknowledgement, which is what forbids the source
    /// to ever resume the original (see [`crate::pages::pull`]). Err: the source could not be
    /// told (for give_up_after); it may resume the original, so the caller kills the copy.
    /// Local pages: nobody to tell, Ok.
    fn confirm_home(&self) -> Result<(), LazySourceError> {
        Ok(())
    }
}

/// See [`LazySource::remote_probe`].
pub type RemoteProbe = Arc<dyn Fn() -> crate::pages::pull::RemoteStats + Send + Sync>;

/// Where [`LazySource::next_ready`] says the background fill should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Any pending page is as cheap as another: continue in address order.
    Anywhere,
    /// Data for `[addr, addr + len)` (source addresses) is at hand: copy the pending pages of it,
    /// then call [`LazySource::consumed`].
    At { addr: u64, len: u64 },
    /// Nothing at hand yet (a remote source's prefetch is in flight): serve faults, come back.
    Wait,
}

/// A lazy source cannot deliver, ever.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lazy pages at {addr:#x}: {detail}")]
pub struct LazySourceError {
    pub addr: u64,
    pub detail: String,
}

impl LazySource for PageStore {
    fn data_extents(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.range(start, end)
            .filter_map(|(a, run)| match run {
                PageRun::Data(d) => Some((a, d.len() as u64)),
                PageRun::Zero { .. } => None,
            })
            .collect()
    }

    fn with_data(&self, addr: u64, max_len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool, LazySourceError> {
        match self.range(addr, addr.saturating_add(max_len)).next() {
            Some((a, PageRun::Data(d))) if a == addr => {
                f(d);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Hybrid migration's pages: the pre-copy rounds' pages here in `local`, the final dirty set
/// (`remote_extents`) still on the source. A page in `remote_extents` comes from `remote` even
/// when `local` holds an older copy of it.
pub struct Layered {
    pub local: Arc<PageStore>,
    pub remote: Arc<dyn LazySource>,
    pub remote_extents: crate::dirty::RangeSet,
}

impl std::fmt::Debug for Layered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layered").field("remote_pages", &self.remote_extents.pages()).finish_non_exhaustive()
    }
}

impl LazySource for Layered {
    fn data_extents(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut set = crate::dirty::RangeSet::new();
        for (a, len) in self.local.data_extents(start, end) {
            set.push(a, a + len);
        }
        for (a, e) in self.remote_extents.intersect_range(start, end) {
            set.push(a, e);
        }
        set.iter().map(|(a, e)| (a, e - a)).collect()
    }

    fn with_data(&self, addr: u64, max_len: u64, f: &mut dyn FnMut(&[u8])) -> Result<bool, LazySourceError> {
        let end = addr.saturating_add(max_len);
        let remote = self.remote_extents.intersect_range(addr, end);
        match remote.first() {
            Some(&(s, e)) if s == addr => self.remote.with_data(addr, e - addr, f),
            // Local pages up to the next remote one.
            Some(&(s, _)) => self.local.with_data(addr, s - addr, f),
            None => self.local.with_data(addr, max_len, f),
        }
    }

    fn next_ready(&self) -> Ready {
        self.remote.next_ready()
    }

    fn faulted(&self, addr: u64) {
        self.remote.faulted(addr);
    }

    fn consumed(&self, addr: u64, len: u64) {
        self.remote.consumed(addr, len);
    }

    fn remote_stats(&self) -> Option<crate::pages::pull::RemoteStats> {
        self.remote.remote_stats()
    }

    fn remote_probe(&self) -> Option<RemoteProbe> {
        self.remote.remote_probe()
    }

    fn confirm_home(&self) -> Result<(), LazySourceError> {
        self.remote.confirm_home()
    }
}

// ---------------------------------------------------------------------------------------------
// The userfaultfd, as an owned type
// ---------------------------------------------------------------------------------------------

/// An ioctl on a userfaultfd failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UffdError {
    #[error("UFFDIO_API (features {features:#x}) failed: {errno}")]
    Api { features: u64, errno: Errno },
    #[error("the kernel's userfaultfd lacks features {missing:#x} (has {available:#x})")]
    MissingFeatures { missing: u64, available: u64 },
    #[error("UFFDIO_REGISTER(MISSING) of {start:#x}-{end:#x} failed: {errno}")]
    Register { start: u64, end: u64, errno: Errno },
}

/// One userfaultfd context held by the engine (closed on drop; when the last fd of a context
/// closes the kernel unregisters every range and wakes every waiting fault).
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

/// A fill ioctl's outcome: bytes done, and the error that stopped it (if any).
#[derive(Debug, Clone, Copy)]
struct Fill {
    done: u64,
    error: Option<Errno>,
}

/// The one unsafe ioctl every userfaultfd call goes through.
fn uffd_ioctl<T>(fd: RawFd, request: libc::c_ulong, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is a live, exclusively borrowed #[repr(C)] struct whose size matches the
    // request's encoded size (checked by the uapi tests); the kernel reads/writes only it.
    let r = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    Errno::result(r).map(drop)
}

impl Uffd {
    pub(crate) fn new(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    /// The fd (the guard gets a dup of it).
    pub(crate) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// UFFDIO_API asking for `features`; all of them must be granted.
    pub(crate) fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|errno| UffdError::Api { features, errno })?;
        if api.features & features != features {
            return Err(UffdError::MissingFeatures { missing: features & !api.features, available: api.features });
        }
        Ok(api.features)
    }

    pub(crate) fn register_missing(&self, start: u64, end: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { start, len: end - start, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg).map_err(|errno| UffdError::Register { start, end, errno })
    }

    fn unregister(&self, start: u64, end: u64) -> Result<(), Errno> {
        let mut range = UffdioRange { start, len: end - start };
        uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range)
    }

    fn wake(&self, start: u64, len: u64) {
        let mut range = UffdioRange { start, len };
        // A failure leaves nothing to do: the range has no waiter or is gone.
        let _ = uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range);
    }

    /// UFFDIO_COPY of `data` to `dst` (waking waiters in the range).
    fn copy(&self, dst: u64, data: &[u8]) -> Fill {
        let mut c = UffdioCopy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
        match uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
            Ok(()) => Fill { done: data.len() as u64, error: None },
            Err(errno) => fill_error(c.copy, errno),
        }
    }

    fn zeropage(&self, start: u64, len: u64) -> Fill {
        let mut z = UffdioZeropage { start, len, mode: 0, zeropage: 0 };
        match uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) {
            Ok(()) => Fill { done: len, error: None },
            Err(errno) => fill_error(z.zeropage, errno),
        }
    }

    /// Reads queued messages (non-blocking fd): how many were read, 0 when none is queued.
    fn read_msgs(&self, buf: &mut [UffdMsg]) -> Result<usize, Errno> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is a live, exclusively borrowed slice of plain-data #[repr(C)] messages
        // of `bytes` bytes; the kernel writes whole messages into it.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        match Errno::result(n) {
            Ok(n) => Ok(n as usize / std::mem::size_of::<UffdMsg>()),
            Err(Errno(libc::EAGAIN)) => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// The kernel reports progress in the struct: > 0 bytes done before an error (then the ioctl
/// says EAGAIN whatever stopped it), or the negative errno itself.
fn fill_error(reported: i64, errno: Errno) -> Fill {
    if reported > 0 {
        Fill { done: reported as u64, error: None }
    } else if reported < 0 {
        Fill { done: 0, error: Some(Errno(-reported as i32)) }
    } else {
        Fill { done: 0, error: Some(errno) }
    }
}

// ---------------------------------------------------------------------------------------------
// Range bookkeeping
// ---------------------------------------------------------------------------------------------

/// Disjoint page ranges `[start, end)` of a process, each with the source address of its first
/// page (they differ once the process mremaps). Adjacent ranges are not merged: ranges are built
/// per VMA and a copy must not cross a VMA boundary.
#[derive(Debug, Clone, Default)]
struct RangeMap {
    map: BTreeMap<u64, (u64, u64)>,
    bytes: u64,
}

impl RangeMap {
    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn pages(&self) -> u64 {
        self.bytes / PAGE
    }

    fn insert(&mut self, start: u64, end: u64, src: u64) {
        if end > start {
            self.map.insert(start, (end, src));
            self.bytes += end - start;
        }
    }

    /// Removes `[start, end)`, returning the pieces removed (clipped), in address order.
    fn extract(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let hit: Vec<(u64, u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, src))| (s, e, src))
            .collect();
        let mut out = Vec::with_capacity(hit.len());
        for (s, e, src) in hit.into_iter().rev() {
            self.map.remove(&s);
            self.bytes -= e - s;
            if s < start {
                self.insert(s, start, src);
            }
            if e > end {
                self.insert(end, e, src + (end - s));
            }
            let (lo, hi) = (s.max(start), e.min(end));
            out.push((lo, hi, src + (lo - s)));
        }
        out
    }

    /// Removes `[start, end)`; the bytes that were in the map.
    fn remove(&mut self, start: u64, end: u64) -> u64 {
        self.extract(start, end).iter().map(|(s, e, _)| e - s).sum()
    }

    /// mremap: what was at `[from, from + len)` is now at `[to, to + len)` (and whatever was
    /// there before is gone).
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.extract(from, from + len);
        self.remove(to, to + len);
        for (s, e, src) in moved {
            self.insert(s - from + to, e - from + to, src);
        }
    }

    /// The pieces inside `[start, end)`, clipped: `(dst, src, len)`.
    fn window(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<(u64, u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, src))| {
                let (lo, hi) = (s.max(start), e.min(end));
                (lo, src + (lo - s), hi - lo)
            })
            .collect();
        v.reverse();
        v
    }

    /// The first piece at or after `cursor` (wrapping around), at most `max` bytes.
    fn next_from(&self, cursor: u64, max: u64) -> Option<(u64, u64, u64)> {
        let containing = self.map.range(..=cursor).next_back().filter(|(_, &(e, _))| e > cursor);
        let (s, e, src) = containing
            .or_else(|| self.map.range(cursor..).next())
            .or_else(|| self.map.iter().next())
            .map(|(&s, &(e, src))| (s, e, src))?;
        let lo = if (s..e).contains(&cursor) { cursor } else { s };
        Some((lo, src + (lo - s), (e - lo).min(max)))
    }

    fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &(e, _))| (s, e))
    }
}

// ---------------------------------------------------------------------------------------------
// Public handle and statistics
// ---------------------------------------------------------------------------------------------

/// How the lazy thread works.
#[derive(Debug, Clone, Copy)]
pub struct LazyOptions {
    /// Bytes copied around a faulting page (an aligned window; only pages still pending).
    pub fault_window: u64,
    /// Bytes per background UFFDIO_COPY.
    pub background_chunk: u64,
    /// How long after the process resumed the background fill waits for
    /// [`LazyHandle::release_background`] before it starts by itself (faults are served at once
    /// regardless; see the module header).
    pub background_delay: Duration,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions { fault_window: 64 << 10, background_chunk: 1 << 20, background_delay: Duration::from_millis(50) }
    }
}

/// What the restore registered (part of [`super::RestoredProcess`]).
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LazySummary {
    /// VMAs registered with the userfaultfd.
    pub ranges: u64,
    /// Pages of those VMAs.
    pub registered_pages: u64,
    /// Data pages to fill from the source (not written by the restore).
    pub lazy_pages: u64,
    /// Features UFFDIO_API granted.
    pub features: u64,
}

/// Where the lazy thread is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state", content = "detail")]
pub enum LazyState {
    Running,
    /// Every page is home; the ranges are unregistered, the uffds closed, the source dropped.
    Homed,
    /// Every served process exited before its memory was home.
    Exited,
    /// A fill failed in a way that cannot be retried; the process was killed.
    Failed(String),
}

/// Progress of one lazy restore.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LazyStats {
    pub pid: Pid,
    pub state: LazyState,
    pub summary: LazySummary,
    /// Faults answered (each with one window copy or one zero page).
    pub faults: u64,
    /// Data pages copied in answer to faults.
    pub fault_pages: u64,
    /// Zero pages mapped in answer to faults (holes, removed ranges).
    pub zero_pages: u64,
    /// Data pages copied by the background fill.
    pub background_pages: u64,
    /// Pending pages the process unmapped or discarded before they were filled.
    pub dropped_pages: u64,
    /// Data pages still to fill (all spaces).
    pub pending_pages: u64,
    pub events_fork: u64,
    /// Forked children whose userfaultfd could not be handed to the guard (it is gone, or holds
    /// its maximum, `tern_stub::guard_protocol::MAX_HELD`): they read zeros if the engine dies
    /// before their memory is home. 0 normally.
    pub forks_unguarded: u64,
    pub events_remap: u64,
    pub events_remove: u64,
    pub events_unmap: u64,
    /// Copies retried because the mm was changing (EAGAIN).
    pub retries: u64,
    /// Fault service time (message read → page mapped), from the samples kept.
    pub fault_p50_ns: u64,
    pub fault_p99_ns: u64,
    pub fault_max_ns: u64,
    /// Since the lazy thread started (the process still stopped by the restore).
    pub elapsed_ns: u64,
    /// Time from the start to every page home.
    pub home_ns: Option<u64>,
    /// The connection to the source host, when pages come from there (post-copy, hybrid).
    pub remote: Option<crate::pages::pull::RemoteStats>,
}

/// Waiting for homing failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("memory of pid {pid} not home after {waited:?} ({pending} pages pending)")]
    Timeout { pid: Pid, waited: Duration, pending: u64 },
    #[error("lazy memory of pid {pid} failed: {detail}")]
    Failed { pid: Pid, detail: String },
}

/// Setting up lazy memory failed (before anything was registered the restore falls back to
/// writing the memory; after, it fails).
#[derive(Debug, thiserror::Error)]
pub enum LazySetupError {
    #[error("userfaultfd() inside pid {pid} failed: {detail}")]
    Create { pid: Pid, detail: String },
    #[error("taking the userfaultfd of pid {pid}: {source}")]
    Steal { pid: Pid, source: PidFdError },
    #[error("userfaultfd of pid {pid}: {source}")]
    Uffd { pid: Pid, source: UffdError },
    #[error("starting the lazy page thread for pid {pid}: {source}")]
    Thread { pid: Pid, source: std::io::Error },
    #[error("creating the wakeup eventfd of the lazy page thread for pid {pid}: {errno}")]
    Wakeup { pid: Pid, errno: Errno },
}

const MAX_SAMPLES: usize = 1 << 16;

#[derive(Debug)]
struct Progress {
    stats: LazyStats,
    samples: Vec<u64>,
    /// How many of `samples` [`LazyHandle::take_fault_samples`] has handed out.
    taken: usize,
}

struct Shared {
    progress: Mutex<Progress>,
    done: Condvar,
    started: Instant,
    /// When the background fill may run (see the module header).
    background: Mutex<Background>,
    /// Written by whoever changes `background`: wakes the lazy thread out of its poll().
    wake: OwnedFd,
    /// A remote source's live figures, read while the fill runs (see [`LazySource::remote_probe`]).
    probe: Option<RemoteProbe>,
}

/// Whether the lazy thread may copy in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Background {
    /// Not yet: the process is still being built (no deadline), or it runs and the fill starts
    /// by itself at the deadline unless released before.
    Held { deadline: Option<Instant> },
    Released,
}

impl Shared {
    /// Changes the background state (never back from Released) and wakes the lazy thread.
    fn set_background(&self, to: Background) {
        {
            let mut b = self.background.lock().unwrap_or_else(|e| e.into_inner());
            if *b == Background::Released {
                return;
            }
            *b = to;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our own eventfd. It cannot block (the
        // counter would have to reach u64::MAX - 1) and a failure only delays the fill until
        // the thread's next wakeup, so the result is not needed.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn background(&self) -> Background {
        *self.background.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("started", &self.started).field("remote", &self.probe.is_some()).finish_non_exhaustive()
    }
}

/// The running lazy fill of one restored process. Dropping it detaches the thread, which still
/// runs until every page is home or the process exits (a live process is never abandoned).
#[derive(Debug)]
pub struct LazyHandle {
    pid: Pid,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// [`LazyOptions::background_delay`].
    background_delay: Duration,
}

impl LazyHandle {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Lets the background fill start now (the switchover is over: the caller's answer is out).
    /// Idempotent; faults are served whether or not this is called.
    pub fn release_background(&self) {
        self.shared.set_background(Background::Released);
    }

    /// The restored process runs: the background fill starts by itself after
    /// [`LazyOptions::background_delay`] unless [`Self::release_background`] comes first.
    /// Called by the restore after the detach.
    pub(crate) fn resumed(&self) {
        let deadline = Instant::now() + self.background_delay;
        self.shared.set_background(Background::Held { deadline: Some(deadline) });
    }

    /// True until the background fill has been released (by the caller or the delay).
    pub fn background_held(&self) -> bool {
        matches!(self.shared.background(), Background::Held { .. })
    }

    /// A snapshot of the progress.
    pub fn stats(&self) -> LazyStats {
        let p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        snapshot(&p, &self.shared)
    }

    /// Waits until the thread ends (homed, or every process exited), at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<LazyStats, LazyError> {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        while p.stats.state == LazyState::Running {
            let now = Instant::now();
            if now >= deadline {
                return Err(LazyError::Timeout { pid: self.pid, waited: timeout, pending: p.stats.pending_pages });
            }
            p = self.shared.done.wait_timeout(p, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        let stats = snapshot(&p, &self.shared);
        match &stats.state {
            LazyState::Failed(detail) => Err(LazyError::Failed { pid: self.pid, detail: detail.clone() }),
            _ => Ok(stats),
        }
    }

    /// Fault service times (ns) recorded since the last call, oldest first (for a histogram;
    /// at most the first 65536 faults of a restore are sampled).
    pub fn take_fault_samples(&self) -> Vec<u64> {
        let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        let from = p.taken.min(p.samples.len());
        p.taken = p.samples.len();
        p.samples[from..].to_vec()
    }

    /// True once the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for LazyHandle {
    fn drop(&mut self) {
        // Nobody can release the background fill after this: it starts now.
        self.shared.set_background(Background::Released);
        // Join only a thread that has ended; a running one finishes on its own (see the type).
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// The `p` quantile (0..=1) of an ascending slice, 0 when empty.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn snapshot(p: &Progress, shared: &Shared) -> LazyStats {
    let mut s = p.stats.clone();
    let mut sorted = p.samples.clone();
    sorted.sort_unstable();
    s.fault_p50_ns = percentile(&sorted, 0.5);
    s.fault_p99_ns = percentile(&sorted, 0.99);
    s.fault_max_ns = sorted.last().copied().unwrap_or(0);
    s.elapsed_ns = s.home_ns.unwrap_or_else(|| shared.started.elapsed().as_nanos() as u64);
    if s.state == LazyState::Running {
        // Live, not as last published: the lazy thread publishes between messages, and it may
        // be waiting for the source right now.
        if let Some(probe) = &shared.probe {
            s.remote = Some(probe());
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Setup (called by the restore driver)
// ---------------------------------------------------------------------------------------------

/// Which VMA ranges are lazy: private anonymous ones with data pages in `source`.
pub(crate) fn is_lazy_vma(v: &crate::image::mm::VmaImage, source: &dyn LazySource) -> bool {
    v.is_lazy_candidate() && !source.data_extents(v.start, v.end).is_empty()
}

/// Takes the target's userfaultfd `target_fd` (the caller closes it in the target afterwards)
/// and negotiates the features. Nothing is registered yet.
pub(crate) fn steal(pid: Pid, target_fd: i32) -> Result<(Uffd, u64), LazySetupError> {
    let fd = PidFd::open(pid)
        .and_then(|p| p.get_fd(target_fd))
        .map_err(|source| LazySetupError::Steal { pid, source })?;
    let uffd = Uffd::new(fd);
    let features = uffd.api(LAZY_FEATURES).map_err(|source| LazySetupError::Uffd { pid, source })?;
    Ok((uffd, features))
}

/// Registers `vmas` (each `[start, end)`, mapped already) and starts the lazy thread, which
/// owns `guard` (armed on `uffd`) from then on and releases it at its end.
pub(crate) fn start(
    pid: Pid,
    uffd: Uffd,
    features: u64,
    vmas: &[(u64, u64)],
    source: Arc<dyn LazySource>,
    options: LazyOptions,
    guard: super::guard::Guard,
) -> Result<LazyHandle, LazySetupError> {
    let mut pending = RangeMap::default();
    let mut registered = RangeMap::default();
    for &(start, end) in vmas {
        uffd.register_missing(start, end).map_err(|source| LazySetupError::Uffd { pid, source })?;
        registered.insert(start, end, start);
        for (a, len) in source.data_extents(start, end) {
            pending.insert(a, a + len, a);
        }
    }
    let pidfd = PidFd::open(pid).map_err(|source| LazySetupError::Steal { pid, source })?;
    // SAFETY: eventfd takes two integers and returns a new fd or -1.
    let wake = Errno::result(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
        .map_err(|errno| LazySetupError::Wakeup { pid, errno })?;
    // SAFETY: the fd was just created by eventfd and is owned by nobody else.
    let wake = unsafe { OwnedFd::from_raw_fd(wake) };
    let summary = LazySummary {
        ranges: vmas.len() as u64,
        registered_pages: registered.pages(),
        lazy_pages: pending.pages(),
        features,
    };
    let shared = Arc::new(Shared {
        progress: Mutex::new(Progress {
            stats: LazyStats {
                pid,
                state: LazyState::Running,
                summary,
                faults: 0,
                fault_pages: 0,
                zero_pages: 0,
                background_pages: 0,
                dropped_pages: 0,
                pending_pages: pending.pages(),
                events_fork: 0,
                forks_unguarded: 0,
                events_remap: 0,
                events_remove: 0,
                events_unmap: 0,
                retries: 0,
                fault_p50_ns: 0,
                fault_p99_ns: 0,
                fault_max_ns: 0,
                elapsed_ns: 0,
                home_ns: None,
                remote: source.remote_stats(),
            },
            samples: Vec::new(),
            taken: 0,
        }),
        done: Condvar::new(),
        started: Instant::now(),
        background: Mutex::new(Background::Held { deadline: None }),
        wake,
        probe: source.remote_probe(),
    });
    let server = Server {
        pid,
        source,
        options,
        pidfd: Some(pidfd),
        spaces: vec![Space { uffd, pending, registered, cursor: 0, root: true, deferred: Vec::new() }],
        shared: shared.clone(),
        counters: Counters::default(),
        samples: Vec::new(),
        guard: Some(guard),
    };
    let thread = std::thread::Builder::new()
        .name(format!("tern-lazy-{pid}"))
        .spawn(move || server.run())
        .map_err(|source| LazySetupError::Thread { pid, source })?;
    Ok(LazyHandle { pid, shared, thread: Some(thread), background_delay: options.background_delay })
}

// ---------------------------------------------------------------------------------------------
// The lazy thread
// ---------------------------------------------------------------------------------------------

/// One mm served: the restored process, or a child it forked.
struct Space {
    uffd: Uffd,
    /// Data pages still to fill, with their source addresses.
    pending: RangeMap,
    /// What is registered (to unregister at the end).
    registered: RangeMap,
    /// Background position.
    cursor: u64,
    root: bool,
    /// Faults to retry after events were read: (page, when read).
    deferred: Vec<(u64, Instant)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    faults: u64,
    fault_pages: u64,
    zero_pages: u64,
    background_pages: u64,
    dropped_pages: u64,
    fork: u64,
    forks_unguarded: u64,
    remap: u64,
    remove: u64,
    unmap: u64,
    retries: u64,
}

/// Why a space stops being served.
enum SpaceEnd {
    /// Its mm is gone (exit, exec).
    Gone,
    Fatal(String),
}

struct Server {
    pid: Pid,
    source: Arc<dyn LazySource>,
    options: LazyOptions,
    /// The restored process: readable once it exited.
    pidfd: Option<PidFd>,
    spaces: Vec<Space>,
    shared: Arc<Shared>,
    counters: Counters,
    samples: Vec<u64>,
    /// The guard process (see [`super::guard`]): released by run() once every uffd is closed;
    /// dropped unreleased (the guard then kills the process) on Failed or if the thread panics.
    guard: Option<super::guard::Guard>,
}

/// The result of filling one range.
enum Filled {
    /// Done (copied or already there): bytes.
    Done(u64),
    /// Stopped after `done` bytes: the mm is changing, read events first.
    Again(u64),
    /// Stopped after `done` bytes: no VMA there any more.
    Gone(u64),
    /// The mm is gone.
    Dead,
    Fatal(String),
}

impl Server {
    fn run(mut self) {
        let state = self.serve();
        let home_ns = (state == LazyState::Homed).then(|| self.shared.started.elapsed().as_nanos() as u64);
        {
            let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            self.publish_into(&mut p);
        }
        // Unregistering happened in serve(). Every uffd is closed and the source dropped (a
        // remote one closes its connections) BEFORE anyone hears it is over: whoever waits for
        // "homed" may kill the source process next.
        let Server { spaces, source, shared, guard, .. } = self;
        drop(spaces);
        drop(source);
        // Only now, with every range unregistered and every uffd closed, may the guard let the
        // context go. Failed: the process was killed but may not have exited yet, and until it
        // has a page it reads must not be a zero: the guard, closed unreleased, waits for its
        // exit before it lets go.
        if let Some(guard) = guard {
            match state {
                LazyState::Failed(_) => drop(guard),
                _ => guard.release(),
            }
        }
        let mut p = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(remote) = p.stats.remote.as_mut() {
            if remote.state != crate::pages::pull::RemoteState::Failed {
                remote.state = crate::pages::pull::RemoteState::Closed;
            }
        }
        p.stats.home_ns = home_ns;
        p.stats.state = state;
        drop(p);
        shared.done.notify_all();
    }

    fn publish_into(&self, p: &mut Progress) {
        let c = self.counters;
        let s = &mut p.stats;
        s.faults = c.faults;
        s.fault_pages = c.fault_pages;
        s.zero_pages = c.zero_pages;
        s.background_pages = c.background_pages;
        s.dropped_pages = c.dropped_pages;
        s.events_fork = c.fork;
        s.forks_unguarded = c.forks_unguarded;
        s.events_remap = c.remap;
        s.events_remove = c.remove;
        s.events_unmap = c.unmap;
        s.retries = c.retries;
        s.pending_pages = self.spaces.iter().map(|s| s.pending.pages()).sum();
        s.remote = self.source.remote_stats();
        let room = MAX_SAMPLES.saturating_sub(p.samples.len());
        p.samples.extend(self.samples.iter().take(room));
    }

    fn publish(&mut self) {
        {
            let mut p = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            self.publish_into(&mut p);
        }
        self.samples.clear();
    }

    /// Whether the background fill may run now, and if not, how long poll() may sleep (None:
    /// until something happens; the restore has not resumed the process yet).
    fn background_gate(&self) -> Result<(), Option<Duration>> {
        match self.shared.background() {
            Background::Released => Ok(()),
            Background::Held { deadline: None } => Err(None),
            Background::Held { deadline: Some(d) } => {
                let now = Instant::now();
                if now >= d {
                    // Nobody released it in time: it starts by itself (and says so to readers
                    // of LazyHandle::background_held).
                    self.shared.set_background(Background::Released);
                    Ok(())
                } else {
                    Err(Some(d - now))
                }
            }
        }
    }

    fn serve(&mut self) -> LazyState {
        let mut msgs = [UffdMsg::default(); 32];
        let mut backoff = false;
        let mut released = false;
        let mut iterations = 0u64;
        loop {
            if self.spaces.iter().all(|s| s.pending.is_empty()) {
                // Nothing more is needed from the source: tell it (see the module header) before
                // anyone hears "homed". Also when every served mm is gone: the process may have
                // exec'd (it runs on), or exited after running here; either way the original
                // must not run again.
                let exited = self.spaces.is_empty();
                if let Err(e) = self.source.confirm_home() {
                    // The wait may have been long: a process that exited meanwhile is not
                    // signalled (its pid may be reused by now).
                    let gone = self.pidfd.as_ref().is_some_and(|p| matches!(p.wait_exited(Some(Duration::ZERO)), Ok(true)));
                    if gone {
                        self.pidfd = None;
                    }
                    if exited && self.pidfd.is_none() {
                        return LazyState::Exited;
                    }
                    return self.fail(format!(
                        "the source could not be told that every page is home ({}); it may resume the original, so this copy was killed",
                        e.detail
                    ));
                }
                if exited {
                    return LazyState::Exited;
                }
                self.unregister_all();
                return LazyState::Homed;
            }
            iterations += 1;
            if iterations.is_multiple_of(64) {
                self.publish();
            }
            // Until released, no background copy: sleep until a fault, an event, an exit, the
            // release or the deadline (see the module header).
            let held = if released {
                None
            } else {
                match self.background_gate() {
                    Ok(()) => {
                        released = true;
                        None
                    }
                    Err(wait) => Some(wait),
                }
            };
            let deferred = self.spaces.iter().any(|s| !s.deferred.is_empty());
            let timeout: i32 = if backoff || deferred {
                1
            } else {
                match held {
                    None => 0,
                    Some(None) => -1,
                    // Rounded up: waking before the deadline would only poll again.
                    Some(Some(left)) => i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX).max(1),
                }
            };
            // Poll: the release eventfd, the pidfd and every uffd.
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.spaces.len() + 2);
            fds.push(libc::pollfd { fd: self.shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            if let Some(p) = &self.pidfd {
                fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            for s in &self.spaces {
                fds.push(libc::pollfd { fd: s.uffd.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: `fds` is a live array of `fds.len()` pollfds the kernel writes revents into.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if r < 0 && Errno::last() != Errno(libc::EINTR) {
                return self.fail(format!("poll: {}", Errno::last()));
            }
            if r > 0 && fds[0].revents != 0 {
                let mut counter = [0u8; 8];
                // SAFETY: reads 8 bytes into a local array from our own non-blocking eventfd;
                // it only resets the counter (the state itself is in `shared.background`).
                let _ = unsafe { libc::read(self.shared.wake.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len()) };
            }
            let mut off = 1;
            if self.pidfd.is_some() {
                off = 2;
                if r > 0 && fds[1].revents != 0 {
                    // The restored process exited: nothing of it is left to fill.
                    self.pidfd = None;
                    if let Some(i) = self.spaces.iter().position(|s| s.root) {
                        self.end_space(i);
                    }
                    continue;
                }
            }
            // Messages, space by space (indices are stable until end_space below).
            let mut ended: Vec<(usize, SpaceEnd)> = Vec::new();
            let mut new_spaces: Vec<Space> = Vec::new();
            for i in 0..self.spaces.len() {
                let readable = r > 0 && fds[off + i].revents != 0;
                if readable || !self.spaces[i].deferred.is_empty() {
                    if let Err(end) = self.drain(i, &mut msgs, &mut new_spaces) {
                        ended.push((i, end));
                    }
                }
            }
            self.spaces.extend(new_spaces);
            for (i, end) in ended.into_iter().rev() {
                if let SpaceEnd::Fatal(detail) = end {
                    return self.fail(detail);
                }
                self.end_space(i);
            }
            backoff = false;
            if !released {
                continue;
            }
            // One background chunk.
            match self.background() {
                Ok(again) => backoff = again,
                Err((i, SpaceEnd::Gone)) => self.end_space(i),
                Err((_, SpaceEnd::Fatal(detail))) => return self.fail(detail),
            }
        }
    }

    /// Reads and handles every queued message of space `i`, then its deferred faults.
    fn drain(&mut self, i: usize, msgs: &mut [UffdMsg], new_spaces: &mut Vec<Space>) -> Result<(), SpaceEnd> {
        loop {
            let n = self.spaces[i]
                .uffd
                .read_msgs(msgs)
                .map_err(|e| SpaceEnd::Fatal(format!("reading the userfaultfd: {e}")))?;
            for m in &msgs[..n] {
                let read_at = Instant::now();
                match m.event {
                    UFFD_EVENT_PAGEFAULT => {
                        let page = m.arg[1] & !(PAGE - 1);
                        self.fault(i, page, read_at)?;
                    }
                    UFFD_EVENT_FORK => {
                        self.counters.fork += 1;
                        let raw = m.arg[0] as u32 as RawFd;
                        // SAFETY: the kernel installed this fd in our table while the message
                        // was read; nobody else knows it, so this is its only owner.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        // The guard gets its own fd of the child's context before anything of
                        // the child is served: from then on the child, like the process, never
                        // reads a zero for a missing page if the engine dies (it is killed).
                        let handed = self.guard.as_mut().map(|g| g.hold(fd.as_fd()));
                        if !matches!(handed, Some(Ok(()))) {
                            self.counters.forks_unguarded += 1;
                        }
                        let parent = &self.spaces[i];
                        new_spaces.push(Space {
                            uffd: Uffd::new(fd),
                            pending: parent.pending.clone(),
                            registered: parent.registered.clone(),
                            cursor: 0,
                            root: false,
                            deferred: Vec::new(),
                        });
                    }
                    UFFD_EVENT_REMAP => {
                        self.counters.remap += 1;
                        let (from, to, len) = (m.arg[0], m.arg[1], m.arg[2]);
                        let s = &mut self.spaces[i];
                        s.pending.remap(from, to, len);
                        s.registered.remap(from, to, len);
                    }
                    UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => {
                        let (start, end) = (m.arg[0], m.arg[1]);
                        if m.event == UFFD_EVENT_REMOVE {
                            self.counters.remove += 1;
                        } else {
                            self.counters.unmap += 1;
                            self.spaces[i].registered.remove(start, end);
                        }
                        let dropped = self.spaces[i].pending.remove(start, end);
                        self.counters.dropped_pages += dropped / PAGE;
                    }
                    _ => {}
                }
            }
            if n < msgs.len() {
                break;
            }
        }
        // Faults that met a changing mm: retry now that the events are read.
        let deferred = std::mem::take(&mut self.spaces[i].deferred);
        for (page, read_at) in deferred {
            self.fault(i, page, read_at)?;
        }
        Ok(())
    }

    /// Answers a fault on `page` of space `i`: the pending pages of its window, else a zero page.
    fn fault(&mut self, i: usize, page: u64, read_at: Instant) -> Result<(), SpaceEnd> {
        let w = self.options.fault_window.max(PAGE);
        let lo = page & !(w - 1);
        self.source.faulted(page);
        let pieces = self.spaces[i].pending.window(lo, lo + w);
        let mut resolved = false;
        let mut again = false;
        let mut copied_pages = 0;
        // The piece with the faulting page first: it is what the thread waits for.
        let mut order: Vec<(u64, u64, u64)> = pieces.iter().copied().filter(|p| (p.0..p.0 + p.2).contains(&page)).collect();
        order.extend(pieces.iter().copied().filter(|p| !(p.0..p.0 + p.2).contains(&page)));
        for (dst, src, len) in order {
            let outcome = self.fill(i, dst, src, len);
            let done = match outcome {
                Filled::Done(d) | Filled::Again(d) | Filled::Gone(d) => d,
                Filled::Dead => return Err(SpaceEnd::Gone),
                Filled::Fatal(e) => return Err(SpaceEnd::Fatal(e)),
            };
            if done > 0 {
                self.spaces[i].pending.remove(dst, dst + done);
                copied_pages += done / PAGE;
            }
            if (dst..dst + done).contains(&page) {
                resolved = true;
            }
            match outcome {
                Filled::Again(_) => again = true,
                Filled::Gone(d) if (dst + d..dst + d + PAGE).contains(&page) => {
                    // The faulting page itself has no VMA now: nothing to fill; wake it.
                    self.spaces[i].pending.remove(page, page + PAGE);
                    self.counters.dropped_pages += 1;
                }
                _ => {}
            }
        }
        self.counters.fault_pages += copied_pages;
        if !resolved && !again && !self.spaces[i].pending.window(page, page + PAGE).is_empty() {
            again = true;
        }
        if !resolved && !again {
            // Not pending: a hole in the source or a range the process discarded.
            match self.spaces[i].uffd.zeropage(page, PAGE) {
                Fill { error: None, .. } => {
                    self.counters.zero_pages += 1;
                    resolved = true;
                }
                Fill { error: Some(Errno(libc::EEXIST)), .. } | Fill { error: Some(Errno(libc::ENOENT)), .. } => {}
                Fill { error: Some(Errno(libc::EAGAIN)), .. } => again = true,
                Fill { error: Some(Errno(libc::ESRCH)), .. } => return Err(SpaceEnd::Gone),
                Fill { error: Some(e), .. } => return Err(SpaceEnd::Fatal(format!("UFFDIO_ZEROPAGE at {page:#x}: {e}"))),
            }
        }
        if again && !resolved {
            self.counters.retries += 1;
            self.spaces[i].deferred.push((page, read_at));
            return Ok(());
        }
        if !resolved {
            // Already present (EEXIST) or gone: the thread retries its access itself.
            self.spaces[i].uffd.wake(page, PAGE);
        }
        self.counters.faults += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(read_at.elapsed().as_nanos() as u64);
        }
        Ok(())
    }

    /// Copies `[dst, dst + len)` of space `i` from the source at `src`.
    fn fill(&mut self, i: usize, dst: u64, src: u64, len: u64) -> Filled {
        let uffd = &self.spaces[i].uffd;
        let mut done = 0u64;
        let mut cap = len;
        while done < len {
            let want = (len - done).min(cap);
            let mut fill = None;
            let had = self.source.with_data(src + done, want, &mut |data| fill = Some(uffd.copy(dst + done, data)));
            let fill = match (had, fill) {
                (Ok(true), Some(f)) => f,
                (Err(e), _) => return Filled::Fatal(e.to_string()),
                // Listed as data but not held (a local store cannot lose a page; the extents
                // are taken from it): a zero page is what a page nobody wrote holds.
                _ => uffd.zeropage(dst + done, PAGE),
            };
            done += fill.done;
            match fill.error {
                None => cap = len,
                Some(Errno(libc::EEXIST)) => {
                    done += PAGE;
                    cap = len;
                }
                Some(Errno(libc::EAGAIN)) => return Filled::Again(done),
                Some(Errno(libc::ENOENT)) if want > PAGE && fill.done == 0 => {
                    // A VMA boundary inside the range (the process split a VMA): smaller pieces.
                    cap = (want / 2).max(PAGE) & !(PAGE - 1);
                }
                Some(Errno(libc::ENOENT)) => return Filled::Gone(done),
                Some(Errno(libc::ESRCH)) => return Filled::Dead,
                Some(e) => return Filled::Fatal(format!("UFFDIO_COPY of {want} bytes at {:#x}: {e}", dst + done)),
            }
        }
        Filled::Done(done.min(len))
    }

    /// One background chunk from the first space with pending pages. Ok(true): the mm was
    /// changing, back off briefly.
    fn background(&mut self) -> Result<bool, (usize, SpaceEnd)> {
        let Some(i) = self.spaces.iter().position(|s| !s.pending.is_empty()) else {
            return Ok(false);
        };
        let (dst, src, len) = match self.source.next_ready() {
            Ready::Wait => return Ok(true),
            Ready::At { addr, len } => {
                // What arrived, where it is still pending (by address: a range the process
                // moved since is fetched again at its new place by the address-order fill).
                let piece = self.spaces[i].pending.window(addr, addr + len).into_iter().find(|p| p.0 == p.1);
                match piece {
                    Some(p) => p,
                    None => {
                        self.source.consumed(addr, len);
                        return Ok(false);
                    }
                }
            }
            Ready::Anywhere => {
                let s = &self.spaces[i];
                match s.pending.next_from(s.cursor, self.options.background_chunk) {
                    Some(p) => p,
                    None => return Ok(false),
                }
            }
        };
        let outcome = self.fill(i, dst, src, len);
        let s = &mut self.spaces[i];
        let (done, again) = match outcome {
            Filled::Done(d) => (d, false),
            Filled::Again(d) => (d, true),
            Filled::Gone(d) => {
                // The page at dst + d has no VMA and no event explains it: it cannot be filled.
                s.pending.remove(dst + d, dst + d + PAGE);
                self.counters.dropped_pages += 1;
                (d, false)
            }
            Filled::Dead => return Err((i, SpaceEnd::Gone)),
            Filled::Fatal(e) => return Err((i, SpaceEnd::Fatal(e))),
        };
        if done > 0 {
            s.pending.remove(dst, dst + done);
            self.counters.background_pages += done / PAGE;
        }
        s.cursor = dst + done;
        if again {
            self.counters.retries += 1;
        }
        Ok(again)
    }

    fn end_space(&mut self, i: usize) {
        let s = self.spaces.remove(i);
        self.counters.dropped_pages += s.pending.pages();
        // Dropping the uffd closes it.
    }

    fn unregister_all(&mut self) {
        for s in &self.spaces {
            for (start, end) in s.registered.ranges() {
                // Errors are harmless: closing the uffd below unregisters whatever is left.
                let _ = s.uffd.unregister(start, end);
            }
        }
    }

    fn fail(&mut self, detail: String) -> LazyState {
        if self.pidfd.is_some() {
            // SAFETY: kill by the pid of the process this engine restored (its pidfd was still
            // open and not readable: it has not exited, the pid is still it).
            unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        }
        LazyState::Failed(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE;

    #[test]
    fn range_map_removes_and_splits() {
        let mut m = RangeMap::default();
        m.insert(0x1000, 0x9000, 0x1000);
        assert_eq!(m.remove(0x3000, 0x5000), 0x2000);
        assert_eq!(m.ranges().collect::<Vec<_>>(), vec![(0x1000, 0x3000), (0x5000, 0x9000)]);
        assert_eq!(m.pages(), 6);
        assert_eq!(m.window(0x2000, 0x6000), vec![(0x2000, 0x2000, P), (0x5000, 0x5000, P)]);
        assert_eq!(m.remove(0, 0x10_000), 6 * P);
        assert!(m.is_empty());
    }

    #[test]
    fn range_map_remap_keeps_sources() {
        let mut m = RangeMap::default();
        m.insert(0x10_000, 0x14_000, 0x10_000);
        m.insert(0x20_000, 0x21_000, 0x20_000);
        // Move the middle two pages of the first range to 0x50_000 over the second range's page.
        m.remap(0x11_000, 0x50_000, 2 * P);
        assert_eq!(m.window(0x50_000, 0x52_000), vec![(0x50_000, 0x11_000, 2 * P)]);
        assert_eq!(
            m.ranges().collect::<Vec<_>>(),
            vec![(0x10_000, 0x11_000), (0x13_000, 0x14_000), (0x20_000, 0x21_000), (0x50_000, 0x52_000)]
        );
        m.remap(0x1f_000, 0x60_000, 3 * P);
        assert_eq!(m.window(0x60_000, 0x70_000), vec![(0x61_000, 0x20_000, P)]);
        assert_eq!(m.pages(), 5);
    }

    #[test]
    fn next_from_wraps_and_clips() {
        let mut m = RangeMap::default();
        m.insert(0x1000, 0x5000, 0x1000);
        m.insert(0x8000, 0x9000, 0x8000);
        assert_eq!(m.next_from(0, 2 * P), Some((0x1000, 0x1000, 2 * P)));
        assert_eq!(m.next_from(0x3000, 8 * P), Some((0x3000, 0x3000, 2 * P)));
        assert_eq!(m.next_from(0x6000, 8 * P), Some((0x8000, 0x8000, P)));
        assert_eq!(m.next_from(0x9000, 8 * P), Some((0x1000, 0x1000, 4 * P)));
    }

    #[test]
    fn layered_prefers_the_remote_copy_of_a_page() {
        use crate::pages::PageSink;
        let mut local = PageStore::new();
        let _ = local.put_pages(0x10_000, &vec![1u8; 4 * PAGE_SIZE]);
        let mut remote = PageStore::new();
        let _ = remote.put_pages(0x12_000, &vec![2u8; PAGE_SIZE]);
        let _ = remote.put_pages(0x20_000, &vec![3u8; PAGE_SIZE]);
        let layered = Layered {
            local: Arc::new(local),
            remote: Arc::new(remote),
            remote_extents: crate::dirty::RangeSet::from_ranges([(0x12_000, 0x13_000), (0x20_000, 0x21_000)]),
        };
        assert_eq!(layered.data_extents(0, 1 << 30), vec![(0x10_000, 4 * P), (0x20_000, P)]);
        let mut seen = Vec::new();
        // Local pages up to the remote one, then the remote one, then local again.
        assert_eq!(layered.with_data(0x10_000, 8 * P, &mut |d| seen.push((d.len(), d[0]))), Ok(true));
        assert_eq!(layered.with_data(0x12_000, 8 * P, &mut |d| seen.push((d.len(), d[0]))), Ok(true));
        assert_eq!(layered.with_data(0x13_000, 8 * P, &mut |d| seen.push((d.len(), d[0]))), Ok(true));
        assert_eq!(seen, vec![(2 * PAGE_SIZE, 1), (PAGE_SIZE, 2), (PAGE_SIZE, 1)]);
        assert_eq!(layered.with_data(0x20_000, P, &mut |d| assert_eq!(d[0], 3)), Ok(true));
    }

    #[test]
    fn store_as_source() {
        let mut store = PageStore::new();
        use crate::pages::PageSink;
        let _ = store.put_pages(0x10_000, &vec![7u8; 3 * PAGE_SIZE]);
        let _ = store.put_zero_pages(0x13_000, 2);
        let src: &dyn LazySource = &store;
        assert_eq!(src.data_extents(0, 1 << 30), vec![(0x10_000, 3 * P)]);
        let mut got = 0;
        assert_eq!(src.with_data(0x11_000, 8 * P, &mut |d| got = d.len()), Ok(true));
        assert_eq!(got, 2 * PAGE_SIZE);
        assert_eq!(src.with_data(0x13_000, P, &mut |_| {}), Ok(false));
    }
}
