//! Linux UAPI the engine uses that the 6.1 headers (and the libc crate) here lack: PAGEMAP_SCAN
//! (Linux 6.7) and the userfaultfd ioctls, structs and feature bits. One definition, used by the
//! kernel probe and by the dirty tracker; values from include/uapi/linux/fs.h and userfaultfd.h.

/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// A page-cache (not anonymous) page: pagemap's PM_FILE. The kernel only computes it when a mask
/// asks for it.
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Any non-present, non-empty pte: a swap entry, and also a uffd-wp marker (what the uffd-wp
/// tracker leaves in empty ptes) or a guard marker. pagemap's PM_SWAP says the same of those.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
pub const UFFD_API: u64 = 0xaa;
/// userfaultfd(2) flag: handle user-mode faults only (no CAP_SYS_PTRACE needed for it).
pub const UFFD_USER_MODE_ONLY: u64 = 1;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioRegister {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct page_region`: one run of pages PAGEMAP_SCAN reports.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}


// --- userfaultfd, MISSING mode (lazy restore / post-copy) -------------------------------------

/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `struct uffdio_copy`: `copy` is bytes copied, or a negative errno.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`: `zeropage` is bytes mapped, or a negative errno.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdioZeropage {
    pub start: u64,
    pub len: u64,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): the event byte, padding, then the 24-byte union as three words.
/// pagefault: [flags, address, ptid]; fork: [ufd (low 32 bits), _, _]; remap: [from, to, len];
/// remove / unmap: [start, end, _].
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_ioctl_numbers() {
        // _IOC_SIZE is bits 16..30 of the request.
        let size = |req: libc::c_ulong| ((req >> 16) & 0x3fff) as usize;
        assert_eq!(size(PAGEMAP_SCAN), std::mem::size_of::<PmScanArg>());
        assert_eq!(size(UFFDIO_API), std::mem::size_of::<UffdioApi>());
        assert_eq!(size(UFFDIO_REGISTER), std::mem::size_of::<UffdioRegister>());
        assert_eq!(size(UFFDIO_UNREGISTER), std::mem::size_of::<UffdioRange>());
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(size(UFFDIO_WAKE), std::mem::size_of::<UffdioRange>());
        assert_eq!(size(UFFDIO_COPY), std::mem::size_of::<UffdioCopy>());
        assert_eq!(size(UFFDIO_ZEROPAGE), std::mem::size_of::<UffdioZeropage>());
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
