//! The address space of a frozen process: the mm fields PR_SET_MM_MAP takes and every VMA.
//!
//! Pages are not here: they travel as a page stream (see [`crate::pages`]). For each VMA the image
//! says how restore recreates it ([`VmaImage::kind`] plus prot/flags/file), and the page stream
//! holds whatever content cannot come from the file itself.
use super::task::FileIdentity;
use crate::proc::VmaKind;
use serde::{Deserialize, Serialize};

/// One virtual memory area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmaImage {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    /// MAP_SHARED or MAP_PRIVATE, plus MAP_GROWSDOWN for a stack that grows.
    pub flags: u32,
    /// Offset into the file in bytes (0 for anonymous memory).
    pub pgoff: u64,
    /// The mapped file, for file-backed VMAs.
    pub file: Option<FileIdentity>,
    pub kind: VmaKind,
}

impl VmaImage {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn is_shared(&self) -> bool {
        self.flags & libc::MAP_SHARED as u32 != 0
    }

    /// Kernel-provided mappings restore moves (vdso & co.) or leaves alone (vsyscall) instead of
    /// mapping them.
    pub fn is_special(&self) -> bool {
        matches!(
            self.kind,
            VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
        )
    }

    /// Private anonymous memory (anon, heap, stack): what a lazy restore fills through a
    /// userfaultfd and post-copy leaves on the source. Both ends decide with this one test.
    pub fn is_lazy_candidate(&self) -> bool {
        matches!(self.kind, VmaKind::Anon | VmaKind::Heap | VmaKind::Stack) && self.file.is_none() && !self.is_shared()
    }

    /// Whether the dump reads pages of this VMA at all.
    pub fn has_dumpable_pages(&self) -> bool {
        !self.is_special() && self.kind != VmaKind::FileShared
    }
}

/// The mm fields (PR_SET_MM_MAP) and the VMAs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MmImage {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    /// Current program break (brk(0) inside the target).
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// /proc/PID/auxv as (type, value) words, AT_NULL included.
    pub auxv: Vec<u64>,
    /// FNV-1a of the source's vdso bytes: restore refuses a destination whose vdso differs.
    pub vdso_hash: u64,
    /// Ascending, non-overlapping.
    pub vmas: Vec<VmaImage>,
    /// Post-copy: data pages of lazy-candidate VMAs that stayed on the source, `[start, end)`
    /// ranges in address order; the destination pulls them on demand. Empty otherwise.
    #[serde(default)]
    pub remote_pages: Vec<(u64, u64)>,
}

/// 64-bit FNV-1a (vdso fingerprint; not cryptographic, only "same kernel build" evidence).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
