//! [`SoftDirtyTracker`]: `clear_refs` 4 + pagemap bit 55 (kernels with CONFIG_MEM_SOFT_DIRTY).
use super::{tracked, DirtyError, DirtyTracker, RangeSet};
use crate::pages::PAGE_SIZE;
use crate::probe::DirtyTracking;
use crate::ptrace::Tracer;
use crate::sys::Pid;
use std::os::unix::fs::FileExt;

const PAGE: u64 = PAGE_SIZE as u64;
pub(crate) const PM_PRESENT: u64 = 1 << 63;
pub(crate) const PM_SWAP: u64 = 1 << 62;
pub(crate) const PM_SOFT_DIRTY: u64 = 1 << 55;
/// Pagemap entries per read (64 MiB of address space).
const WINDOW: u64 = 16 * 1024;

/// The written pages among pagemap `entries` of the pages starting at `base` (pure): bit 55
/// (soft-dirty) on a page that is present or swapped. A non-present page of a VMA born since the
/// last clear also shows bit 55 (VM_SOFTDIRTY) but has nothing to copy.
pub fn soft_dirty_ranges(base: u64, entries: &[u64], out: &mut RangeSet) {
    let mut run: Option<u64> = None;
    for (i, &e) in entries.iter().enumerate() {
        let addr = base + i as u64 * PAGE;
        let dirty = e & PM_SOFT_DIRTY != 0 && e & (PM_PRESENT | PM_SWAP) != 0;
        match (dirty, run) {
            (true, None) => run = Some(addr),
            (false, Some(s)) => {
                out.push(s, addr);
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        out.push(s, base + entries.len() as u64 * PAGE);
    }
}

/// The soft-dirty backend.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    pid: Pid,
    started: bool,
}

impl SoftDirtyTracker {
    pub fn new(pid: Pid) -> SoftDirtyTracker {
        SoftDirtyTracker { pid, started: false }
    }

    fn clear(&self) -> Result<(), DirtyError> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "4").map_err(|source| DirtyError::Io {
            pid: self.pid,
            what: "write 4 to /proc/PID/clear_refs".into(),
            source,
        })
    }

    fn read_dirty(&self) -> Result<RangeSet, DirtyError> {
        let pid = self.pid;
        let io = |what: &str, source| DirtyError::Io { pid, what: what.into(), source };
        let (vmas, _) = super::copied_ranges(pid)?;
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(|e| io("open pagemap", e))?;
        let mut out = RangeSet::new();
        let mut raw = vec![0u8; WINDOW as usize * 8];
        let mut entries = vec![0u64; WINDOW as usize];
        for v in vmas.iter().filter(|v| tracked(v)) {
            let mut addr = v.start;
            while addr < v.end {
                let n = ((v.end - addr) / PAGE).min(WINDOW) as usize;
                pagemap
                    .read_exact_at(&mut raw[..n * 8], addr / PAGE * 8)
                    .map_err(|e| io("read pagemap", e))?;
                for (i, e) in entries[..n].iter_mut().enumerate() {
                    *e = u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or_default());
                }
                soft_dirty_ranges(addr, &entries[..n], &mut out);
                addr += n as u64 * PAGE;
            }
        }
        Ok(out)
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn kind(&self) -> DirtyTracking {
        DirtyTracking::SoftDirty
    }

    fn start(&mut self, _tracer: &Tracer) -> Result<RangeSet, DirtyError> {
        self.clear()?;
        self.started = true;
        Ok(super::copied_ranges(self.pid)?.1)
    }

    /// Freezes the target for the read + clear (a write between them would be lost), unless the
    /// caller already holds it frozen.
    fn collect(&mut self, tracer: &Tracer) -> Result<RangeSet, DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted { pid: self.pid });
        }
        let was_frozen = tracer.is_frozen();
        if !was_frozen {
            tracer.freeze().map_err(|e| DirtyError::Other { pid: self.pid, msg: e.to_string() })?;
        }
        let result = self.read_dirty().and_then(|d| self.clear().map(|()| d));
        if !was_frozen {
            tracer.thaw().map_err(|e| DirtyError::Other { pid: self.pid, msg: e.to_string() })?;
        }
        result
    }

    fn stop(&mut self, _tracer: &Tracer) -> Result<(), DirtyError> {
        self.started = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_bit_55_on_present_or_swapped_pages() {
        let base = 0x7f00_0000_0000;
        let sd = PM_SOFT_DIRTY;
        let entries = [
            PM_PRESENT | sd | 0x1234, // dirty
            PM_PRESENT | sd,          // dirty, same run
            PM_PRESENT,               // clean
            sd,                       // VM_SOFTDIRTY but not present: nothing to copy
            PM_SWAP | sd,             // swapped and dirty
            PM_PRESENT | sd,          // run continues
            0,
            PM_PRESENT | sd, // last page dirty: run closed at the end
        ];
        let mut out = RangeSet::new();
        soft_dirty_ranges(base, &entries, &mut out);
        assert_eq!(
            out.iter().collect::<Vec<_>>(),
            vec![(base, base + 2 * PAGE), (base + 4 * PAGE, base + 6 * PAGE), (base + 7 * PAGE, base + 8 * PAGE)]
        );
        let mut none = RangeSet::new();
        soft_dirty_ranges(base, &[PM_PRESENT, 0, sd], &mut none);
        assert!(none.is_empty());
    }
}
