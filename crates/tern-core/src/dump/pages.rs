//! Reading a frozen target's pages: pagemap-driven, vectored, never page by page.
use super::{DumpError, DumpStats};
use crate::dirty::RangeSet;
use crate::image::mm::VmaImage;
use crate::pages::{PageSink, PAGE_SIZE};
use crate::proc::VmaKind;
use crate::sys::{Errno, Pid};
use crate::dirty::pagemap_scan_any;
use crate::uapi::{PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

const PAGE: u64 = PAGE_SIZE as u64;
pub(crate) const PM_PRESENT: u64 = 1 << 63;
pub(crate) const PM_SWAP: u64 = 1 << 62;
pub(crate) const PM_FILE: u64 = 1 << 61;
/// Pagemap window: 64 MiB of address space per read (128 KiB of entries).
const WINDOW_PAGES: u64 = 16 * 1024;
/// Pages per vectored read.
const BATCH_PAGES: usize = 1024;
/// Remote iovecs per process_vm_readv (IOV_MAX).
const MAX_IOV: usize = 1024;

/// Whether a page with pagemap entry `pm` of a VMA of this kind must travel (pure).
pub fn page_wanted(vma: &VmaImage, pm: u64) -> bool {
    if pm & (PM_PRESENT | PM_SWAP) == 0 {
        return false;
    }
    match vma.kind {
        // Private file mapping: only anonymous (COWed, i.e. written) pages.
        VmaKind::File => pm & PM_FILE == 0,
        VmaKind::FileShared => false,
        _ => vma.has_dumpable_pages(),
    }
}

/// Whether a present page is a clean page of a file mapping (skipped, counted).
fn page_from_file(vma: &VmaImage, pm: u64) -> bool {
    pm & (PM_PRESENT | PM_SWAP) != 0 && matches!(vma.kind, VmaKind::File | VmaKind::FileShared)
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (pre, mid, post) = unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// A run of wanted pages: start address and page count.
#[derive(Debug, Clone, Copy)]
struct Run {
    addr: u64,
    pages: u64,
}

struct Batch {
    runs: Vec<Run>,
    pages: usize,
}

/// Where a pass over a RUNNING target records what it sent and what it could not read.
#[derive(Debug, Default)]
pub(crate) struct PassTrack {
    /// Pages put into the sink (data or zero marker).
    pub sent: RangeSet,
    /// Pages whose read failed (their VMA changed under us): to be sent again later.
    pub failed: RangeSet,
}

/// Sends the wanted pages of `vmas`, only those inside `only` when given. With `track` the
/// target may be running: a failed read is recorded instead of failing the pass. With `lazy`
/// (post-copy's final dump) the data pages of lazy-candidate VMAs are not read at all: their
/// ranges go into `lazy` (the destination pulls them from the frozen process later).
pub(crate) fn dump_pages<S: PageSink>(
    pid: Pid,
    vmas: &[VmaImage],
    sink: &mut S,
    only: Option<&RangeSet>,
    mut track: Option<&mut PassTrack>,
    mut lazy: Option<&mut RangeSet>,
) -> Result<DumpStats, DumpError> {
    let io = |what: &str, source: std::io::Error| DumpError::Io {
        pid,
        what: what.to_owned(),
        source,
    };
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| io("open /proc/PID/pagemap", e))?;
    let mut stats = DumpStats::default();
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    let mut pm_raw = vec![0u8; WINDOW_PAGES as usize * 8];
    let mut batch = Batch {
        runs: Vec::new(),
        pages: 0,
    };
    for vma in vmas {
        if !vma.has_dumpable_pages() {
            continue;
        }
        let spans = match only {
            Some(set) => set.intersect_range(vma.start, vma.end),
            None => vec![(vma.start, vma.end)],
        };
        let leave = lazy.is_some() && vma.is_lazy_candidate();
        for (span_start, span_end) in spans {
        if let Some(out) = lazy.as_deref_mut().filter(|_| leave) {
            // The pages holding data (present or swapped), without reading a byte. A kernel
            // without PAGEMAP_SCAN takes the pagemap walk below instead.
            if pagemap_scan_any(pagemap.as_raw_fd(), span_start, span_end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, out).is_ok() {
                continue;
            }
        }
        let mut addr = span_start;
        while addr < span_end {
            let n = ((span_end - addr) / PAGE).min(WINDOW_PAGES);
            let raw = &mut pm_raw[..n as usize * 8];
            pagemap
                .read_exact_at(raw, addr / PAGE * 8)
                .map_err(|e| io("read /proc/PID/pagemap", e))?;
            let mut i = 0u64;
            while i < n {
                let pm = u64::from_le_bytes(
                    raw[i as usize * 8..i as usize * 8 + 8]
                        .try_into()
                        .unwrap_or_default(),
                );
                if !page_wanted(vma, pm) {
                    if page_from_file(vma, pm) {
                        stats.skipped_pages += 1;
                    }
                    i += 1;
                    continue;
                }
                let page_addr = addr + i * PAGE;
                if let Some(out) = lazy.as_deref_mut().filter(|_| leave) {
                    out.push(page_addr, page_addr + PAGE);
                    i += 1;
                    continue;
                }
                match batch.runs.last_mut() {
                    Some(r) if r.addr + r.pages * PAGE == page_addr => r.pages += 1,
                    _ => batch.runs.push(Run {
                        addr: page_addr,
                        pages: 1,
                    }),
                }
                batch.pages += 1;
                if batch.pages == BATCH_PAGES || batch.runs.len() == MAX_IOV {
                    flush(pid, &mut batch, &mut buf, sink, &mut stats, track.as_deref_mut())?;
                }
                i += 1;
            }
            addr += n * PAGE;
        }
        }
        // Runs never span VMAs (a neighbour may need different treatment on restore).
        flush(pid, &mut batch, &mut buf, sink, &mut stats, track.as_deref_mut())?;
    }
    Ok(stats)
}

fn flush<S: PageSink>(
    pid: Pid,
    batch: &mut Batch,
    buf: &mut [u8],
    sink: &mut S,
    stats: &mut DumpStats,
    track: Option<&mut PassTrack>,
) -> Result<(), DumpError> {
    if batch.pages == 0 {
        return Ok(());
    }
    let total = batch.pages * PAGE_SIZE;
    let data = &mut buf[..total];
    if let Err(e) = read_runs(pid, &batch.runs, data) {
        let Some(track) = track else { return Err(e) };
        for r in &batch.runs {
            track.failed.push(r.addr, r.addr + r.pages * PAGE);
        }
        batch.runs.clear();
        batch.pages = 0;
        return Ok(());
    }
    let mut track = track;
    if let Some(t) = track.as_deref_mut() {
        for r in &batch.runs {
            t.sent.push(r.addr, r.addr + r.pages * PAGE);
        }
    }
    let sink_err = |e: S::Error| DumpError::Sink {
        pid,
        source: Box::new(e),
    };
    let mut off = 0usize;
    for run in &batch.runs {
        // Split the run into maximal data and zero spans.
        let mut i = 0u64;
        while i < run.pages {
            let p = off + i as usize * PAGE_SIZE;
            let zero = is_zero(&data[p..p + PAGE_SIZE]);
            let mut j = i + 1;
            while j < run.pages {
                let q = off + j as usize * PAGE_SIZE;
                if is_zero(&data[q..q + PAGE_SIZE]) != zero {
                    break;
                }
                j += 1;
            }
            let vaddr = run.addr + i * PAGE;
            if zero {
                sink.put_zero_pages(vaddr, j - i).map_err(sink_err)?;
                stats.zero_pages += j - i;
            } else {
                let end = off + j as usize * PAGE_SIZE;
                sink.put_pages(vaddr, &data[p..end]).map_err(sink_err)?;
                stats.data_pages += j - i;
                stats.bytes += (end - p) as u64;
            }
            i = j;
        }
        off += run.pages as usize * PAGE_SIZE;
    }
    batch.runs.clear();
    batch.pages = 0;
    Ok(())
}

/// Reads every run into `out` (concatenated): one process_vm_readv, then /proc/PID/mem for
/// whatever it could not read (PROT_NONE pages, for instance).
fn read_runs(pid: Pid, runs: &[Run], out: &mut [u8]) -> Result<(), DumpError> {
    let remote: Vec<libc::iovec> = runs
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.addr as *mut libc::c_void,
            iov_len: (r.pages * PAGE) as usize,
        })
        .collect();
    let local = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: out.len(),
    };
    // SAFETY: `local` describes `out`, exclusively borrowed for the call; the kernel writes at
    // most its length. `remote` addresses are only interpreted in the target.
    let n = unsafe {
        libc::process_vm_readv(
            pid.as_raw(),
            &local,
            1,
            remote.as_ptr(),
            remote.len() as libc::c_ulong,
            0,
        )
    };
    let mut done = Errno::result(n).map(|n| n as usize).unwrap_or(0);
    if done == out.len() {
        return Ok(());
    }
    // Finish run by run from where it stopped.
    let mut off = 0usize;
    for r in runs {
        let len = (r.pages * PAGE) as usize;
        if off + len > done {
            let skip = done.saturating_sub(off);
            let bytes = crate::remote::read_memory(pid, r.addr + skip as u64, len - skip)
                .map_err(|source| DumpError::Memory { pid, source })?;
            out[off + skip..off + len].copy_from_slice(&bytes);
            done = off + len;
        }
        off += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(kind: VmaKind) -> VmaImage {
        VmaImage {
            start: 0x1000,
            end: 0x3000,
            prot: 3,
            flags: 2,
            pgoff: 0,
            file: None,
            kind,
        }
    }

    #[test]
    fn page_selection() {
        let anon = vma(VmaKind::Anon);
        assert!(page_wanted(&anon, PM_PRESENT));
        assert!(page_wanted(&anon, PM_SWAP));
        assert!(!page_wanted(&anon, 0));
        let file = vma(VmaKind::File);
        assert!(page_wanted(&file, PM_PRESENT), "a COWed page of a private file map");
        assert!(!page_wanted(&file, PM_PRESENT | PM_FILE), "clean file page");
        assert!(!page_wanted(&vma(VmaKind::FileShared), PM_PRESENT));
        assert!(!page_wanted(&vma(VmaKind::Vdso), PM_PRESENT));
        assert!(!page_wanted(&vma(VmaKind::Vvar), PM_PRESENT | PM_FILE));
        assert!(page_wanted(&vma(VmaKind::SharedAnon), PM_PRESENT | PM_FILE));
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
