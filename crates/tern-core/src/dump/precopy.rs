//! Pre-copy on the source: pages move while the process runs, the freeze carries only the rest.
//!
//! ```text
//!  PrecopySession::start(pid)   freeze; start dirty tracking (crate::dirty); a dry dump (image,
//!        │                      no pages) measures the fixed switchover cost; thaw
//!  round(sink) ×N               target RUNNING: send the pending set (round 0: every page of every
//!        │                      copied VMA; pages may be torn, they are dirty and go again), then
//!        │                      collect the dirty set = next pending. Measured per round: pages,
//!        │                      bytes, elapsed, dirty rate, bandwidth, predicted downtime =
//!        │                      pending bytes ÷ bandwidth + fixed cost (QEMU's expected downtime)
//!  decide(history, options)     Converged (prediction under max-downtime) | NotShrinking (the
//!        │                      pending set failed to shrink by 10 % twice) | RoundCap | Continue
//!  finish(sink)                 FREEZE; collect the last dirty set; stop tracking (nothing left
//!        │                      registered); dump = image + pages of pending ∪ last dirty set only;
//!        │                      pages sent earlier that are gone since (unmapped and re-mapped,
//!        │                      MADV_DONTNEED) are overwritten (zero marker / file content); the
//!        ▼                      frozen process is then a cold SourceSession: commit | abort
//! ```
//! Every round is its own page stream into the same destination store (later pages win). Any
//! failure before `finish` returns stops tracking and thaws the target: it runs on as before.
use super::pages::{dump_pages, PassTrack, PM_FILE, PM_PRESENT, PM_SWAP};
use super::{dump_selected, vma_image, DumpError, DumpStats, PagePolicy, SessionError, SourceSession};
use crate::dirty::{pagemap_scan_matching, tracker_for, DirtyError, DirtyTracker, RangeSet};
use crate::image::mm::VmaImage;
use crate::image::ProcessImage;
use crate::pages::{PageSink, PAGE_SIZE};
use crate::probe::DirtyTracking;
use crate::proc::VmaKind;
use crate::ptrace::{FreezeError, ThawError, Tracer, TracerError};
use crate::sys::{Errno, Pid};
use crate::uapi::{PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const PAGE: u64 = PAGE_SIZE as u64;
/// Added to the measured setup freeze when no dry dump measured the image part of the final
/// dump (inspection, registers, remote syscalls, fds): ~5-10 ms measured on the test fixtures.
const IMAGE_ALLOWANCE_NS: u64 = 8_000_000;

/// When to stop the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrecopyOptions {
    /// Stop once the predicted downtime is under this.
    pub max_downtime_ns: u64,
    /// At most this many rounds (round 0 included).
    pub max_rounds: u32,
    /// The fixed switchover cost; `None`: measured by a dry dump at start.
    pub fixed_cost_ns: Option<u64>,
    /// A round "shrinks" when its pending set is under this fraction of the previous one.
    pub shrink_ratio: f64,
}

impl Default for PrecopyOptions {
    fn default() -> Self {
        PrecopyOptions {
            max_downtime_ns: 300_000_000,
            max_rounds: 30,
            fixed_cost_ns: None,
            shrink_ratio: 0.9,
        }
    }
}

/// What one round did and what it predicts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoundStats {
    pub round: u32,
    /// Pages put into the round's stream (data + zero markers).
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    /// Sending the round (read + sink + flush).
    pub elapsed_ns: u64,
    /// The dirty collect after the round (PAGEMAP_SCAN + re-protect, or pagemap + clear_refs).
    pub scan_ns: u64,
    /// The pending set after the round: what the next round (or the freeze) must send.
    pub dirty_pages: u64,
    pub dirty_bytes: u64,
    /// Bytes written by the target per second since the previous collect.
    pub dirty_rate_bps: f64,
    /// Bytes per second the rounds have moved so far (cumulative: bytes ÷ send time).
    pub bandwidth_bps: f64,
    /// dirty bytes ÷ bandwidth + fixed cost.
    pub predicted_downtime_ns: u64,
    /// Pages whose read failed (VMA changed under us), carried into the pending set.
    pub failed_pages: u64,
}

/// The convergence decision after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Continue,
    Converged,
    NotShrinking,
    RoundCap,
}

/// QEMU-style convergence (pure): see the module header.
pub fn decide(history: &[RoundStats], opts: &PrecopyOptions) -> Verdict {
    let Some(last) = history.last() else {
        return Verdict::Continue;
    };
    if last.predicted_downtime_ns <= opts.max_downtime_ns {
        return Verdict::Converged;
    }
    if history.len() as u32 >= opts.max_rounds {
        return Verdict::RoundCap;
    }
    let stalls = history
        .windows(2)
        .rev()
        .take_while(|w| w[1].dirty_bytes as f64 >= w[0].dirty_bytes as f64 * opts.shrink_ratio)
        .count();
    if stalls >= 2 {
        return Verdict::NotShrinking;
    }
    Verdict::Continue
}

/// A failed pre-copy step (the target was thawed and tracking removed, unless said otherwise).
#[derive(Debug, thiserror::Error)]
pub enum PrecopyError {
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Thaw(#[from] ThawError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Dump(#[from] DumpError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("pre-copy of pid {pid}: the page stream failed: {msg}")]
    Sink { pid: Pid, msg: String },
    #[error("pre-copy of pid {pid} is over (finished or aborted)")]
    Over { pid: Pid },
}

/// What the final freeze produced: the frozen process (commit or abort as in cold mode), its
/// image and what moved inside the freeze.
#[derive(Debug)]
pub struct PrecopyFinal {
    pub session: SourceSession,
    pub image: ProcessImage,
    pub stats: DumpStats,
    /// Pages of the final dirty set (pending ∪ written since the last round).
    pub final_dirty_pages: u64,
    /// Pages sent in a round whose content has gone since (overwritten in the final stream).
    pub stale_pages: u64,
    /// From the freeze to the end of the final dump (the engine's part of the downtime).
    pub frozen_ns: u64,
    /// Where `frozen_ns` went.
    pub timings: FinishTimings,
    pub rounds: Vec<RoundStats>,
}

/// A tracker whose tracking went to the final SourceSession (nothing left to do here).
struct Finished;

impl DirtyTracker for Finished {
    fn kind(&self) -> crate::probe::DirtyTracking {
        crate::probe::DirtyTracking::None
    }
    fn start(&mut self, _: &Tracer) -> Result<RangeSet, DirtyError> {
        Err(DirtyError::Unavailable)
    }
    fn collect(&mut self, _: &Tracer) -> Result<RangeSet, DirtyError> {
        Err(DirtyError::Unavailable)
    }
    fn stop(&mut self, _: &Tracer) -> Result<(), DirtyError> {
        Ok(())
    }
}

/// The steps of the final freeze, each in ns: what the switchover's fixed cost is made of
/// (removing the dirty tracking is not among them: see SourceSession's `tracking`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FinishTimings {
    /// Seize and interrupt every thread.
    pub freeze_ns: u64,
    /// The last dirty scan.
    pub collect_ns: u64,
    /// Image (inventory, registers, fds) and the final pages streamed.
    pub dump_ns: u64,
    /// Pages sent earlier whose VMA has gone since, overwritten.
    pub stale_ns: u64,
}

/// Setup figures.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrecopySetup {
    pub tracking: DirtyTracking,
    /// The whole setup freeze (tracking start + dry dump).
    pub frozen_ns: u64,
    pub fixed_cost_ns: u64,
    pub full_pages: u64,
}

/// A page sink that drops everything (the dry dump).
struct NullSink;

impl PageSink for NullSink {
    type Error = std::convert::Infallible;
    fn put_pages(&mut self, _: u64, _: &[u8]) -> Result<(), Self::Error> {
        Ok(())
    }
    fn put_zero_pages(&mut self, _: u64, _: u64) -> Result<(), Self::Error> {
        Ok(())
    }
}

fn ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The source side of a pre-copy migration (see the module header).
pub struct PrecopySession {
    pid: Pid,
    tracer: Option<Tracer>,
    tracker: Box<dyn DirtyTracker>,
    pending: RangeSet,
    sent: RangeSet,
    history: Vec<RoundStats>,
    last_collect: Instant,
    fixed_cost_ns: u64,
    total_bytes: u64,
    total_send_ns: u64,
    setup: PrecopySetup,
}

impl std::fmt::Debug for PrecopySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrecopySession")
            .field("pid", &self.pid)
            .field("rounds", &self.history.len())
            .field("pending_pages", &self.pending.pages())
            .finish()
    }
}

impl PrecopySession {
    /// Starts tracking with the backend the kernel supports (probed).
    pub fn start(pid: Pid, fixed_cost_ns: Option<u64>) -> Result<PrecopySession, PrecopyError> {
        let kind = crate::probe::probe_kernel().dirty_tracking;
        PrecopySession::start_with(pid, kind, fixed_cost_ns, false)
    }

    /// Starts tracking with a chosen backend: freeze, start, (with `dry_dump`: a dump without
    /// pages, to measure the fixed cost and refuse an undumpable process early), thaw.
    pub fn start_with(
        pid: Pid,
        kind: DirtyTracking,
        fixed_cost_ns: Option<u64>,
        dry_dump: bool,
    ) -> Result<PrecopySession, PrecopyError> {
        let mut tracker = tracker_for(kind, pid)?;
        let tracer = Tracer::new(pid)?;
        let t0 = Instant::now();
        tracer.freeze()?;
        let started = (|| -> Result<(RangeSet, u64), PrecopyError> {
            let full = tracker.start(&tracer)?;
            let measured = match fixed_cost_ns {
                Some(v) => v,
                None if dry_dump => {
                    // Everything the final dump does except pages (it injects into every
                    // thread: see UffdWpTracker's injection_thread for why that is optional).
                    let t = Instant::now();
                    dump_selected(&tracer, &mut NullSink, Some(&RangeSet::new()), PagePolicy::Send)?;
                    ns(t)
                }
                None => 0,
            };
            Ok((full, measured))
        })();
        let last_collect = Instant::now();
        let (full, measured) = match started {
            Ok(v) => v,
            Err(e) => {
                let _ = tracker.stop(&tracer);
                let _ = tracer.thaw();
                return Err(e);
            }
        };
        let thawed = tracer.thaw();
        let frozen_ns = ns(t0);
        if let Err(e) = thawed {
            let _ = tracker.stop(&tracer);
            return Err(e.into());
        }
        // The fixed cost: given, or this setup freeze (a freeze, remote syscalls, a thaw; plus
        // the dry dump when asked) and an allowance for the image the final dump builds.
        let fixed = match fixed_cost_ns {
            Some(v) => v,
            None if dry_dump => frozen_ns,
            None => frozen_ns + IMAGE_ALLOWANCE_NS,
        };
        let _ = measured;
        Ok(PrecopySession {
            pid,
            tracer: Some(tracer),
            setup: PrecopySetup {
                tracking: kind,
                frozen_ns,
                fixed_cost_ns: fixed,
                full_pages: full.pages(),
            },
            tracker,
            pending: full,
            sent: RangeSet::new(),
            history: Vec::new(),
            last_collect,
            fixed_cost_ns: fixed,
            total_bytes: 0,
            total_send_ns: 0,
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn setup(&self) -> PrecopySetup {
        self.setup
    }

    pub fn history(&self) -> &[RoundStats] {
        &self.history
    }

    /// Pages the next round (or the freeze) must send.
    pub fn pending_pages(&self) -> u64 {
        self.pending.pages()
    }

    /// One round while the target runs: send the pending set into `sink`, `flush` it, collect
    /// the next dirty set. On error the session is still usable for `abort`.
    pub fn round<S: PageSink>(
        &mut self,
        sink: &mut S,
        flush: impl FnOnce(&mut S) -> Result<(), String>,
    ) -> Result<RoundStats, PrecopyError> {
        let pid = self.pid;
        let tracer = self.tracer.as_ref().ok_or(PrecopyError::Over { pid })?;
        let t0 = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        let mut track = PassTrack::default();
        let vmas = running_vmas(pid, &mut track.failed)?;
        let result = dump_pages(pid, &vmas, sink, Some(&pending), Some(&mut track), None)
            .and_then(|s| flush(sink).map(|()| s).map_err(|msg| DumpError::Sink { pid, source: msg.into() }));
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                self.pending = pending; // nothing is known to have arrived
                return Err(e.into());
            }
        };
        let send_ns = ns(t0);
        self.sent.extend(&track.sent);
        let tc = Instant::now();
        let dirty = self.tracker.collect(tracer)?;
        let scan_ns = ns(tc);
        let since = tc.duration_since(self.last_collect).as_secs_f64().max(1e-6);
        self.last_collect = tc;
        let failed_pages = track.failed.pages();
        self.pending = dirty.union(&track.failed);
        self.total_bytes += stats.bytes;
        self.total_send_ns += send_ns;
        let bandwidth = if self.total_bytes > 0 {
            self.total_bytes as f64 / (self.total_send_ns.max(1) as f64 / 1e9)
        } else {
            1e9
        };
        let dirty_bytes = self.pending.bytes();
        let round = RoundStats {
            round: self.history.len() as u32,
            pages: stats.data_pages + stats.zero_pages,
            zero_pages: stats.zero_pages,
            bytes: stats.bytes,
            elapsed_ns: send_ns,
            scan_ns,
            dirty_pages: self.pending.pages(),
            dirty_bytes,
            dirty_rate_bps: dirty.bytes() as f64 / since,
            bandwidth_bps: bandwidth,
            predicted_downtime_ns: (dirty_bytes as f64 / bandwidth * 1e9) as u64 + self.fixed_cost_ns,
            failed_pages,
        };
        self.history.push(round);
        Ok(round)
    }

    /// The final freeze: last dirty set, tracking removed, image + final pages into `sink`.
    /// On failure the target is thawed (it runs on) and the error returned.
    pub fn finish<S: PageSink>(self, sink: &mut S) -> Result<PrecopyFinal, PrecopyError> {
        self.finish_with(sink, PagePolicy::Send)
    }

    /// [`Self::finish`]; with [`PagePolicy::LeaveOnSource`] (hybrid) the final dirty pages of
    /// private anonymous memory stay in the frozen process, listed in the image's
    /// `mm.remote_pages`, instead of going into `sink` inside the freeze.
    pub fn finish_with<S: PageSink>(mut self, sink: &mut S, policy: PagePolicy) -> Result<PrecopyFinal, PrecopyError> {
        let pid = self.pid;
        let tracer = self.tracer.take().ok_or(PrecopyError::Over { pid })?;
        let t0 = Instant::now();
        let mut timings = FinishTimings::default();
        let freeze = match tracer.freeze() {
            Ok(f) => f,
            Err(e) => {
                let _ = self.tracker.stop(&tracer);
                let _ = tracer.thaw();
                return Err(e.into());
            }
        };
        timings.freeze_ns = ns(t0);
        // The last dirty set and the end of tracking, inside the freeze.
        let step = Instant::now();
        let collected = self.tracker.collect(&tracer);
        timings.collect_ns = ns(step);
        let only = match collected {
            Ok(dirty) => self.pending.union(&dirty),
            Err(e) => {
                let _ = self.tracker.stop(&tracer);
                let _ = tracer.thaw();
                return Err(e.into());
            }
        };
        // From here on the frozen process is a cold session (it parks the SIGSTOP).
        // Tracking stays installed into the frozen session: removing it is not part of the
        // downtime (SourceSession::tracking).
        let tracking = std::mem::replace(&mut self.tracker, Box::new(Finished));
        let session = SourceSession::from_frozen(tracer, freeze, tracking)?;
        let step = Instant::now();
        let out = dump_selected(session.tracer(), sink, Some(&only), policy).and_then(|(image, stats)| {
            timings.dump_ns = ns(step);
            let step = Instant::now();
            let stale = overwrite_stale(pid, &image.mm.vmas, &self.sent, sink)?;
            timings.stale_ns = ns(step);
            Ok((image, stats, stale))
        });
        match out {
            Ok((image, stats, stale_pages)) => Ok(PrecopyFinal {
                session,
                image,
                stats,
                final_dirty_pages: only.pages(),
                stale_pages,
                frozen_ns: ns(t0),
                timings,
                rounds: std::mem::take(&mut self.history),
            }),
            Err(e) => {
                let _ = session.abort();
                Err(e.into())
            }
        }
    }

    /// The migration is off: tracking removed, the target runs on as before.
    pub fn abort(mut self) -> Result<(), PrecopyError> {
        let Some(tracer) = self.tracer.take() else {
            return Ok(());
        };
        let stopped = self.tracker.stop(&tracer);
        if tracer.is_frozen() {
            tracer.thaw()?;
        }
        Ok(stopped?)
    }
}

impl Drop for PrecopySession {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            let _ = self.tracker.stop(&tracer);
            if tracer.is_frozen() {
                let _ = tracer.thaw();
            }
        }
    }
}

/// The VMAs of a running target as the dump describes them; a VMA that cannot be described
/// right now (its file went away under us) goes to `failed` and is retried later.
fn running_vmas(pid: Pid, failed: &mut RangeSet) -> Result<Vec<VmaImage>, PrecopyError> {
    let vmas = crate::proc::maps::read_maps(pid).map_err(|e| DirtyError::Other {
        pid,
        msg: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(vmas.len());
    for v in &vmas {
        match vma_image(pid, v) {
            Ok(img) => out.push(img),
            Err(_) => failed.push(v.start, v.end),
        }
    }
    Ok(out)
}

/// Pages sent in a round that the final image no longer wants (unmapped and re-created,
/// MADV_DONTNEED, a private file page back to the file's content): a zero marker in anonymous
/// memory, the current content in a file mapping, so the destination's store holds no stale data.
///
/// Inside the freeze, so the stale pages are found by a read-only PAGEMAP_SCAN over the sent
/// spans of each VMA, which returns only them (about 1 ms per GiB sent), instead of reading the
/// pagemap entry of every sent page (10-16 ms per GiB). Which pages are stale: [`StaleQuery`].
/// A kernel without PAGEMAP_SCAN (before 6.7, ENOTTY) reads the pagemap with the same test.
fn overwrite_stale<S: PageSink>(
    pid: Pid,
    vmas: &[VmaImage],
    sent: &RangeSet,
    sink: &mut S,
) -> Result<u64, DumpError> {
    let io = |what: &str, source| DumpError::Io { pid, what: what.into(), source };
    let sink_err = |e: S::Error| DumpError::Sink { pid, source: Box::new(e) };
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| io("open /proc/PID/pagemap", e))?;
    let mut use_scan = true;
    let mut count = 0u64;
    for vma in vmas.iter().filter(|v| v.has_dumpable_pages()) {
        let spans = sent.intersect_range(vma.start, vma.end);
        if spans.is_empty() {
            continue;
        }
        let query = StaleQuery::for_kind(vma.kind);
        let mut stale = RangeSet::new();
        if use_scan {
            match scan_stale(&pagemap, &spans, query, &mut stale) {
                Ok(()) => {}
                Err(Errno(libc::ENOTTY)) => {
                    use_scan = false;
                    stale = RangeSet::new();
                }
                Err(e) => return Err(io("PAGEMAP_SCAN (stale pages) of /proc/PID/pagemap", e.into())),
            }
        }
        if !use_scan {
            read_stale(&pagemap, &spans, query, &mut stale).map_err(|e| io("read /proc/PID/pagemap", e))?;
        }
        // A scan walks small gaps between sent spans too: only sent pages are stale.
        for (s, e) in stale.iter() {
            for (a, b) in sent.intersect_range(s, e) {
                let pages = (b - a) / PAGE;
                if query.zero {
                    sink.put_zero_pages(a, pages).map_err(sink_err)?;
                } else {
                    send_current(pid, a, b, sink)?;
                }
                count += pages;
            }
        }
    }
    Ok(count)
}

/// Which sent pages of a VMA are stale, as PAGEMAP_SCAN's category test (a page matches when its
/// categories XOR `inverted` hold all of `mask` and, if `anyof` is not 0, one of `anyof`), and
/// what replaces them (`zero`: a zero marker; otherwise the page's current content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StaleQuery {
    inverted: u64,
    mask: u64,
    anyof: u64,
    zero: bool,
}

impl StaleQuery {
    fn for_kind(kind: VmaKind) -> StaleQuery {
        const DATA: u64 = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        match kind {
            // A private file mapping's page was sent as its COW copy (present, anonymous). Any
            // other state now means the content may not be that copy: a hole or a page-cache page
            // (PAGE_IS_FILE) reads as the file again; a swap-format pte is, under the uffd-wp
            // tracker, the marker MADV_DONTNEED leaves for a write-protected COW copy (the file's
            // content again, though pagemap calls it swapped, and the tracker never reports it
            // written), else a COW copy swapped out (re-sent unchanged: harmless). So: "not
            // present, or file" = PRESENT inverted, any of PRESENT | FILE. Current content.
            VmaKind::File => StaleQuery {
                inverted: PAGE_IS_PRESENT,
                mask: 0,
                anyof: PAGE_IS_PRESENT | PAGE_IS_FILE,
                zero: false,
            },
            // Anonymous memory (private, shared, heap, stack): a page with no data, neither
            // present nor swapped, reads as zeros. A uffd-wp marker counts as swapped, as it did
            // for pagemap's PM_SWAP: the tracker's collect made it from an empty pte and reported
            // the page written in the same scan, so the final dump or a round sent it as zero.
            _ => StaleQuery {
                inverted: DATA,
                mask: DATA,
                anyof: 0,
                zero: true,
            },
        }
    }

    /// The same test on a /proc/PID/pagemap entry (present, swap and file bits, which the kernel
    /// derives from the pte exactly as it does the scan categories).
    fn matches_entry(&self, pm: u64) -> bool {
        let mut categories = 0;
        if pm & PM_PRESENT != 0 {
            categories |= PAGE_IS_PRESENT;
        }
        if pm & PM_SWAP != 0 {
            categories |= PAGE_IS_SWAPPED;
        }
        if pm & PM_FILE != 0 {
            categories |= PAGE_IS_FILE;
        }
        let c = categories ^ self.inverted;
        c & self.mask == self.mask && (self.anyof == 0 || c & self.anyof != 0)
    }
}

/// Sent spans of one VMA closer than this are scanned as one: walking 256 page-table entries
/// costs about what one more ioctl does (~1 µs).
const SCAN_GAP: u64 = 256 * PAGE;

/// The pages of `spans` (sorted, inside one VMA) matching `query`, by PAGEMAP_SCAN; small gaps
/// between spans are walked too (the caller keeps only sent pages).
fn scan_stale(
    pagemap: &std::fs::File,
    spans: &[(u64, u64)],
    query: StaleQuery,
    out: &mut RangeSet,
) -> Result<(), Errno> {
    let fd = pagemap.as_raw_fd();
    let mut i = 0;
    while i < spans.len() {
        let (start, mut end) = spans[i];
        i += 1;
        while i < spans.len() && spans[i].0 - end <= SCAN_GAP {
            end = spans[i].1;
            i += 1;
        }
        pagemap_scan_matching(fd, start, end, query.inverted, query.mask, query.anyof, out)?;
    }
    Ok(())
}

/// [`scan_stale`] without PAGEMAP_SCAN: every pagemap entry of `spans`, in 64 MiB windows.
fn read_stale(
    pagemap: &std::fs::File,
    spans: &[(u64, u64)],
    query: StaleQuery,
    out: &mut RangeSet,
) -> std::io::Result<()> {
    const WINDOW: u64 = 16 * 1024;
    let mut raw = vec![0u8; WINDOW as usize * 8];
    for &(s, e) in spans {
        let mut addr = s;
        while addr < e {
            let n = ((e - addr) / PAGE).min(WINDOW);
            let buf = &mut raw[..n as usize * 8];
            pagemap.read_exact_at(buf, addr / PAGE * 8)?;
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let pm = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                if query.matches_entry(pm) {
                    let page = addr + i as u64 * PAGE;
                    out.push(page, page + PAGE);
                }
            }
            addr += n * PAGE;
        }
    }
    Ok(())
}

/// Sends the current content of `[start, end)`, in reads of at most 1 MiB. Reading faults a
/// file page in, so this is what the process itself would read there.
fn send_current<S: PageSink>(pid: Pid, start: u64, end: u64, sink: &mut S) -> Result<(), DumpError> {
    const MAX_READ: u64 = 256 * PAGE;
    let mut addr = start;
    while addr < end {
        let len = (end - addr).min(MAX_READ);
        let data =
            crate::remote::read_memory(pid, addr, len as usize).map_err(|source| DumpError::Memory { pid, source })?;
        sink.put_pages(addr, &data).map_err(|e| DumpError::Sink { pid, source: Box::new(e) })?;
        addr += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(dirty_mib: u64, predicted_ms: u64) -> RoundStats {
        RoundStats {
            dirty_bytes: dirty_mib << 20,
            predicted_downtime_ns: predicted_ms * 1_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn convergence_like_qemu() {
        let o = PrecopyOptions {
            max_downtime_ns: 100_000_000,
            max_rounds: 5,
            ..Default::default()
        };
        assert_eq!(decide(&[], &o), Verdict::Continue);
        assert_eq!(decide(&[r(256, 500)], &o), Verdict::Continue);
        assert_eq!(decide(&[r(256, 500), r(8, 90)], &o), Verdict::Converged);
        // Shrinking well: go on.
        assert_eq!(decide(&[r(256, 500), r(100, 300), r(50, 200)], &o), Verdict::Continue);
        // One stall is tolerated, two are not.
        assert_eq!(decide(&[r(256, 500), r(100, 300), r(95, 290)], &o), Verdict::Continue);
        assert_eq!(decide(&[r(256, 500), r(100, 300), r(95, 290), r(99, 295)], &o), Verdict::NotShrinking);
        // Cap.
        let five = [r(256, 500), r(128, 400), r(64, 300), r(32, 200), r(16, 150)];
        assert_eq!(decide(&five, &o), Verdict::RoundCap);
    }

    #[test]
    fn stale_queries_say_which_sent_pages_are_gone() {
        use super::super::pages::page_wanted;
        let vma = |kind| VmaImage { start: 0x1000, end: 0x3000, prot: 3, flags: 2, pgoff: 0, file: None, kind };
        // Every pagemap state a page can be in: hole, present (anonymous or page cache), swap
        // entry or uffd-wp marker (both PM_SWAP), a migration entry of a page-cache page.
        let states = [0, PM_PRESENT, PM_PRESENT | PM_FILE, PM_SWAP, PM_SWAP | PM_FILE];
        for kind in [VmaKind::Anon, VmaKind::Heap, VmaKind::Stack, VmaKind::SharedAnon] {
            let q = StaleQuery::for_kind(kind);
            assert!(q.zero, "{kind:?}: zero markers");
            for pm in states {
                // Anonymous memory: exactly the pages the dump would not send (no data left).
                assert_eq!(q.matches_entry(pm), !page_wanted(&vma(kind), pm), "{kind:?} {pm:#x}");
            }
        }
        let q = StaleQuery::for_kind(VmaKind::File);
        assert!(!q.zero, "file mappings: current content");
        for pm in states {
            let anonymous_copy = pm & PM_PRESENT != 0 && pm & PM_FILE == 0;
            assert_eq!(q.matches_entry(pm), !anonymous_copy, "file {pm:#x}");
        }
        // The one state where the file test is stricter than page_wanted: a swap-format pte
        // without a page-cache page, i.e. the uffd-wp marker MADV_DONTNEED leaves.
        assert!(q.matches_entry(PM_SWAP) && page_wanted(&vma(VmaKind::File), PM_SWAP));
    }

    /// Maps `pages` pages (anonymous, or private of `fd`), panicking on failure.
    fn map(pages: u64, fd: Option<i32>) -> u64 {
        let (flags, fd) = match fd {
            Some(fd) => (libc::MAP_PRIVATE, fd),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping at an address the kernel picks; nothing else refers to it.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), (pages * PAGE) as usize, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0)
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        p as u64
    }

    fn touch(addr: u64, write: bool) {
        // SAFETY: `addr` is inside a read/write mapping made by this test and still mapped.
        unsafe {
            if write {
                std::ptr::write_volatile(addr as *mut u8, 0x5a);
            } else {
                std::ptr::read_volatile(addr as *const u8);
            }
        }
    }

    fn dontneed(addr: u64, pages: u64) {
        // SAFETY: drops pages of a private mapping made by this test; nothing holds references.
        let r = unsafe { libc::madvise(addr as *mut libc::c_void, (pages * PAGE) as usize, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn scan_and_pagemap_find_the_same_stale_pages() {
        // This process's own memory: anonymous pages written, some dropped, some never touched;
        // a private file mapping with COW copies, clean page-cache pages and a dropped copy.
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let anon = map(64, None);
        for i in 0..48 {
            touch(anon + i * PAGE, true);
        }
        dontneed(anon + 3 * PAGE, 1);
        dontneed(anon + 10 * PAGE, 3);
        let path = std::env::temp_dir().join(format!("tern-stale-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 16 * PAGE as usize]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let fmap = map(16, Some(file.as_raw_fd()));
        for i in 0..16 {
            touch(fmap + i * PAGE, i < 8);
        }
        dontneed(fmap + 2 * PAGE, 1);
        let _ = std::fs::remove_file(&path);

        let expect = |spans: &[(u64, u64)], kind| {
            let mut by_pagemap = RangeSet::new();
            read_stale(&pagemap, spans, StaleQuery::for_kind(kind), &mut by_pagemap).unwrap();
            let mut by_scan = RangeSet::new();
            match scan_stale(&pagemap, spans, StaleQuery::for_kind(kind), &mut by_scan) {
                Ok(()) => {
                    // The scan may report unsent pages in gaps it walked through: compare on spans.
                    let sent = RangeSet::from_ranges(spans.iter().copied());
                    let clip = |set: &RangeSet| {
                        RangeSet::from_ranges(set.iter().flat_map(|(s, e)| sent.intersect_range(s, e)))
                    };
                    assert_eq!(clip(&by_scan), clip(&by_pagemap), "{kind:?}: scan and pagemap disagree");
                }
                Err(Errno(libc::ENOTTY)) => eprintln!("no PAGEMAP_SCAN here: pagemap only"),
                Err(e) => panic!("PAGEMAP_SCAN: {}", e.desc()),
            }
            by_pagemap
        };
        let p = |i: u64| anon + i * PAGE;
        // Sent: pages 0..20 and 30..40 (a gap the scan walks through) and 47..64 (never touched
        // from 48 on).
        let stale = expect(&[(p(0), p(20)), (p(30), p(40)), (p(47), p(64))], VmaKind::Anon);
        let want = RangeSet::from_ranges([(p(3), p(4)), (p(10), p(13)), (p(48), p(64))]);
        assert_eq!(stale, want, "anonymous: the dropped and the never-touched pages");
        let q = |i: u64| fmap + i * PAGE;
        let stale = expect(&[(q(0), q(16))], VmaKind::File);
        let want = RangeSet::from_ranges([(q(2), q(3)), (q(8), q(16))]);
        assert_eq!(stale, want, "file: the dropped copy and the clean pages");
        // SAFETY: unmapping the mappings this test made; nothing refers to them any more.
        unsafe {
            libc::munmap(anon as *mut libc::c_void, (64 * PAGE) as usize);
            libc::munmap(fmap as *mut libc::c_void, (16 * PAGE) as usize);
        }
    }
}
