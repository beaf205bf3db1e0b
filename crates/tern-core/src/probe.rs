//! Which kernel mechanisms this machine really has, found by trying each one (never by version).
//!
//! # What is tried, in this process, on scratch memory and fds that are released afterwards
//!
//! - **soft-dirty**: touch a fresh page, `echo 4 > /proc/self/clear_refs`, check pagemap bit 55
//!   is clear, write the page, check bit 55 (and bit 63, present) is set. Kernels built without
//!   `CONFIG_MEM_SOFT_DIRTY` accept the write to clear_refs but never set the bit.
//! - **userfaultfd**: `userfaultfd(O_CLOEXEC | O_NONBLOCK)` (retried with `UFFD_USER_MODE_ONLY`
//!   on EPERM), then `UFFDIO_API` with features 0: the kernel answers with every feature it has.
//! - **uffd-wp async tracking** (what the dirty tracker needs end to end): a second userfaultfd
//!   with `WP_ASYNC | WP_UNPOPULATED`, a 4-page mapping registered `MODE_WP`, one PAGEMAP_SCAN
//!   with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` to protect, a write to page 2, a second
//!   scan that must report exactly page 2, a third that must report nothing.
//! - **PAGEMAP_SCAN**: the ioctl on `/proc/self/pagemap` over a small mapping returns >= 0.
//! - **TCP repair**: `setsockopt(TCP_REPAIR, 1)` on a fresh unconnected TCP socket (CAP_NET_ADMIN).
//! - **clone3 set_tid**: `clone3` with a too-small size must fail with EINVAL (not ENOSYS; no task
//!   is created), and CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN must be effective.
//! - **pidfd_getfd**: `pidfd_open(self)` and `pidfd_getfd` of one of our own fds.
//! - **PTRACE_GET_RSEQ_CONFIGURATION**: fork a child that only pauses, seize + interrupt it, ask,
//!   SIGKILL and reap it.
//!
//! `dirtyTracking` is then soft-dirty if it works, else uffd-wp if the end-to-end check passed,
//! else none. Each probe records why it failed. A whole probe takes about a millisecond.

use crate::pidfd::PidFd;
use crate::ptrace;
use crate::sys::{Errno, Pid};
use crate::uapi::{
    PageRegion, PmScanArg, UffdioApi, UffdioRegister, PAGEMAP_SCAN, PAGE_IS_PRESENT, PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, UFFDIO_API, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_WP, UFFD_API,
    UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
};
use serde::Serialize;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Instant;

// --- 6.7+ ABI not in the 6.1 headers --------------------------------------------------------

const PAGE: usize = 4096;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const TCP_REPAIR: libc::c_int = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Names of the `UFFD_FEATURE_*` bits, by bit number.
const UFFD_FEATURE_NAMES: [&str; 17] = [
    "pagefault-flag-wp",
    "event-fork",
    "event-remap",
    "event-remove",
    "missing-hugetlbfs",
    "missing-shmem",
    "event-unmap",
    "sigbus",
    "thread-id",
    "minor-hugetlbfs",
    "minor-shmem",
    "exact-address",
    "wp-hugetlbfs-shmem",
    "wp-unpopulated",
    "poison",
    "wp-async",
    "move",
];

// --- report ---------------------------------------------------------------------------------

/// One mechanism: works or not, and why not.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Capability {
    pub available: bool,
    pub error: Option<String>,
}

impl From<Result<(), String>> for Capability {
    fn from(r: Result<(), String>) -> Self {
        match r {
            Ok(()) => Capability {
                available: true,
                error: None,
            },
            Err(e) => Capability {
                available: false,
                error: Some(e),
            },
        }
    }
}

/// userfaultfd and the features `UFFDIO_API` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserfaultfdProbe {
    pub available: bool,
    pub api_version: u64,
    pub features: u64,
    pub feature_names: Vec<String>,
    pub error: Option<String>,
}

impl UserfaultfdProbe {
    pub fn has(&self, feature: &str) -> bool {
        self.feature_names.iter().any(|f| f == feature)
    }
}

/// The dirty-tracking backend this machine supports, preferred first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DirtyTracking {
    #[serde(rename = "soft-dirty")]
    SoftDirty,
    #[serde(rename = "uffd-wp")]
    UffdWp,
    #[serde(rename = "none")]
    None,
}

/// Everything [`probe_kernel`] found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelProbe {
    pub kernel_release: String,
    pub soft_dirty: Capability,
    pub userfaultfd: UserfaultfdProbe,
    /// userfaultfd WP_ASYNC + PAGEMAP_SCAN found exactly the written page (the uffd-wp backend).
    pub uffd_wp_async: Capability,
    pub pagemap_scan: Capability,
    pub tcp_repair: Capability,
    pub clone3_set_tid: Capability,
    pub pidfd_getfd: Capability,
    pub ptrace_get_rseq_config: Capability,
    pub dirty_tracking: DirtyTracking,
    pub elapsed_ns: u64,
}

/// Tries every mechanism on this machine. Safe to call repeatedly; about a millisecond.
pub fn probe_kernel() -> KernelProbe {
    let start = Instant::now();
    let soft_dirty = Capability::from(probe_soft_dirty());
    let userfaultfd = probe_userfaultfd();
    let pagemap_scan = Capability::from(probe_pagemap_scan());
    let uffd_wp_async = Capability::from(if userfaultfd.has("wp-async") {
        probe_uffd_wp_async()
    } else {
        Err("userfaultfd lacks the wp-async feature".to_string())
    });
    let dirty_tracking = if soft_dirty.available {
        DirtyTracking::SoftDirty
    } else if uffd_wp_async.available && pagemap_scan.available {
        DirtyTracking::UffdWp
    } else {
        DirtyTracking::None
    };
    KernelProbe {
        kernel_release: kernel_release(),
        soft_dirty,
        userfaultfd,
        uffd_wp_async,
        pagemap_scan,
        tcp_repair: probe_tcp_repair().into(),
        clone3_set_tid: probe_clone3_set_tid().into(),
        pidfd_getfd: probe_pidfd_getfd().into(),
        ptrace_get_rseq_config: probe_rseq_config().into(),
        dirty_tracking,
        elapsed_ns: u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
    }
}

// --- helpers ----------------------------------------------------------------------------------

fn err(what: &str, errno: Errno) -> String {
    format!("{what}: {errno}")
}

fn kernel_release() -> String {
    let mut uts = std::mem::MaybeUninit::<libc::utsname>::uninit();
    // SAFETY: uname fills the utsname it is given, which lives for the call.
    if unsafe { libc::uname(uts.as_mut_ptr()) } != 0 {
        return String::new();
    }
    // SAFETY: uname succeeded, so the struct is initialised.
    let uts = unsafe { uts.assume_init() };
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A private anonymous read-write mapping, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(pages: usize) -> Result<Mapping, String> {
        let len = pages * PAGE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        if addr == libc::MAP_FAILED {
            return Err(err("mmap", Errno::last()));
        }
        Ok(Mapping { addr, len })
    }

    fn start(&self) -> u64 {
        self.addr as u64
    }

    fn end(&self) -> u64 {
        self.start() + self.len as u64
    }

    fn write(&self, page: usize, value: u8) {
        assert!(page * PAGE < self.len);
        // SAFETY: the byte lies inside our own live read-write mapping; volatile so the write
        // really happens (the kernel observes it through the page tables).
        unsafe { std::ptr::write_volatile(self.addr.cast::<u8>().add(page * PAGE), value) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; nothing borrows it any more.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn pagemap_entry(pagemap: &std::fs::File, addr: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    pagemap
        .read_exact_at(&mut b, addr / PAGE as u64 * 8)
        .map_err(|e| format!("read /proc/self/pagemap: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

fn open_pagemap() -> Result<std::fs::File, String> {
    std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))
}

/// `ioctl(fd, request, arg)` with a pointer argument.
fn ioctl_ptr<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> Result<i32, Errno> {
    // SAFETY: every request used here takes a pointer to exactly a `T` (the struct its _IOWR
    // encodes), which is exclusively borrowed for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    Errno::result(ret)
}

fn owned_fd(ret: i64) -> OwnedFd {
    // SAFETY: `ret` is a fresh descriptor from a successful syscall that nobody else owns.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

// --- probes -----------------------------------------------------------------------------------

fn probe_soft_dirty() -> Result<(), String> {
    let map = Mapping::new(1)?;
    map.write(0, 1);
    std::fs::write("/proc/self/clear_refs", "4")
        .map_err(|e| format!("write 4 to /proc/self/clear_refs: {e}"))?;
    let pagemap = open_pagemap()?;
    if pagemap_entry(&pagemap, map.start())? >> 55 & 1 == 1 {
        return Err("clear_refs left pagemap bit 55 set".into());
    }
    map.write(0, 2);
    let entry = pagemap_entry(&pagemap, map.start())?;
    if entry >> 63 & 1 == 1 && entry >> 55 & 1 == 1 {
        Ok(())
    } else {
        Err("pagemap bit 55 stays clear after a write (no CONFIG_MEM_SOFT_DIRTY)".into())
    }
}

fn userfaultfd() -> Result<OwnedFd, Errno> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes one integer flag argument and touches no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    match Errno::result(ret) {
        Ok(fd) => Ok(owned_fd(fd)),
        Err(Errno(libc::EPERM)) => {
            // SAFETY: as above.
            let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
            Errno::result(ret).map(owned_fd)
        }
        Err(e) => Err(e),
    }
}

fn uffd_api(fd: &OwnedFd, features: u64) -> Result<UffdioApi, Errno> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_API, &mut api)?;
    Ok(api)
}

/// Names of the set bits of a `UFFD_FEATURE_*` mask (pure).
pub fn uffd_feature_names(features: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| features >> bit & 1 == 1)
        .map(|bit| {
            UFFD_FEATURE_NAMES
                .get(bit)
                .map(|n| n.to_string())
                .unwrap_or_else(|| format!("bit-{bit}"))
        })
        .collect()
}

fn probe_userfaultfd() -> UserfaultfdProbe {
    let result = userfaultfd()
        .map_err(|e| err("userfaultfd()", e))
        .and_then(|fd| uffd_api(&fd, 0).map_err(|e| err("UFFDIO_API", e)));
    match result {
        Ok(api) => UserfaultfdProbe {
            available: true,
            api_version: api.api,
            features: api.features,
            feature_names: uffd_feature_names(api.features),
            error: None,
        },
        Err(error) => UserfaultfdProbe {
            available: false,
            api_version: 0,
            features: 0,
            feature_names: Vec::new(),
            error: Some(error),
        },
    }
}

/// One PAGEMAP_SCAN call over `map`; the regions it returned.
fn pagemap_scan(
    pagemap: &std::fs::File,
    map: &Mapping,
    flags: u64,
    category_mask: u64,
    anyof: u64,
    return_mask: u64,
) -> Result<Vec<(u64, u64)>, String> {
    let mut regions = [PageRegion::default(); 8];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags,
        start: map.start(),
        end: map.end(),
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_mask,
        category_anyof_mask: anyof,
        return_mask,
        ..PmScanArg::default()
    };
    // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most vec_len regions to `vec`, our local
    // array that outlives the call; it also updates arg.walk_end.
    let ret = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN,
            &mut arg as *mut PmScanArg,
        )
    };
    let n = Errno::result(ret).map_err(|e| err("PAGEMAP_SCAN", e))?;
    let n = usize::try_from(n).unwrap_or(0).min(regions.len());
    Ok(regions[..n].iter().map(|r| (r.start, r.end)).collect())
}

fn probe_pagemap_scan() -> Result<(), String> {
    let map = Mapping::new(2)?;
    map.write(0, 1);
    let pagemap = open_pagemap()?;
    let found = pagemap_scan(&pagemap, &map, 0, 0, PAGE_IS_PRESENT, PAGE_IS_PRESENT)?;
    let want = vec![(map.start(), map.start() + PAGE as u64)];
    if found == want {
        Ok(())
    } else {
        Err(format!(
            "PAGEMAP_SCAN for present pages returned {found:x?}, expected {want:x?}"
        ))
    }
}

fn probe_uffd_wp_async() -> Result<(), String> {
    let uffd = userfaultfd().map_err(|e| err("userfaultfd()", e))?;
    uffd_api(&uffd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
        .map_err(|e| err("UFFDIO_API(WP_ASYNC | WP_UNPOPULATED)", e))?;
    let map = Mapping::new(4)?;
    for page in 0..4 {
        map.write(page, 1);
    }
    let mut reg = UffdioRegister {
        start: map.start(),
        len: map.len as u64,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl_ptr(&uffd, UFFDIO_REGISTER, &mut reg).map_err(|e| err("UFFDIO_REGISTER(WP)", e))?;
    let pagemap = open_pagemap()?;
    let flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    let scan = || pagemap_scan(&pagemap, &map, flags, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN);
    scan()?; // write-protects everything
             // WP_ASYNC: the kernel resolves this write-protect fault itself, no handler needed.
    map.write(2, 2);
    let dirty = scan()?;
    let page2 = map.start() + 2 * PAGE as u64;
    if dirty != vec![(page2, page2 + PAGE as u64)] {
        return Err(format!("after writing page 2 the scan reported {dirty:x?}"));
    }
    let again = scan()?;
    if !again.is_empty() {
        return Err(format!(
            "a second scan reported {again:x?}: not re-protected"
        ));
    }
    Ok(())
}

fn probe_tcp_repair() -> Result<(), String> {
    // SAFETY: socket takes three integers and touches no memory of ours.
    let ret = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    let sock = owned_fd(
        Errno::result(ret)
            .map_err(|e| err("socket(AF_INET)", e))?
            .into(),
    );
    let on: libc::c_int = 1;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let value = (&on as *const libc::c_int).cast();
    // SAFETY: setsockopt reads `len` bytes from `value`, a c_int alive for the call.
    let ret =
        unsafe { libc::setsockopt(sock.as_raw_fd(), libc::IPPROTO_TCP, TCP_REPAIR, value, len) };
    Errno::result(ret)
        .map(drop)
        .map_err(|e| err("setsockopt(TCP_REPAIR)", e))
}

fn effective_caps() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| "no CapEff in /proc/self/status".into())
}

fn probe_clone3_set_tid() -> Result<(), String> {
    let args = [0u64; 1];
    // SAFETY: clone3 with a size (8) below CLONE_ARGS_SIZE_VER0 (64) is rejected with EINVAL
    // before anything is read beyond those 8 bytes or any task is created.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), 8usize) };
    match Errno::result(ret) {
        Err(Errno(libc::EINVAL)) => {}
        Err(e) => return Err(err("clone3 (size probe)", e)),
        Ok(_) => return Err("clone3 with a too-small size unexpectedly succeeded".into()),
    }
    let caps = effective_caps()?;
    if caps >> CAP_CHECKPOINT_RESTORE & 1 == 1 || caps >> CAP_SYS_ADMIN & 1 == 1 {
        Ok(())
    } else {
        Err("clone3 exists but neither CAP_CHECKPOINT_RESTORE nor CAP_SYS_ADMIN is held".into())
    }
}

fn probe_pidfd_getfd() -> Result<(), String> {
    let pidfd = PidFd::open(Pid::this()).map_err(|e| e.to_string())?;
    pidfd
        .get_fd(pidfd.as_raw_fd())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A forked child that only pauses; SIGKILLed and reaped on drop.
struct PausedChild(Pid);

impl PausedChild {
    fn fork() -> Result<PausedChild, String> {
        // SAFETY: the child runs only async-signal-safe calls (pause, _exit), so forking a
        // multi-threaded process is sound.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(err("fork", Errno::last())),
            0 => loop {
                // SAFETY: pause has no arguments; the child waits here to be killed.
                unsafe { libc::pause() };
            },
            pid => Ok(PausedChild(Pid::from_raw(pid))),
        }
    }
}

impl Drop for PausedChild {
    fn drop(&mut self) {
        let mut status = 0;
        // SAFETY: kill and waitpid take integers and a pointer to a local int; the pid is the
        // child this value owns, not yet reaped.
        unsafe {
            libc::kill(self.0.as_raw(), libc::SIGKILL);
            libc::waitpid(self.0.as_raw(), &mut status, libc::__WALL);
        }
    }
}

fn probe_rseq_config() -> Result<(), String> {
    let child = PausedChild::fork()?;
    ptrace::seize(child.0).map_err(|e| e.to_string())?;
    ptrace::interrupt(child.0).map_err(|e| e.to_string())?;
    match ptrace::wait(child.0.as_raw(), 0) {
        Ok(Some((_, ptrace::Stop::Interrupt))) => {}
        other => return Err(format!("waiting for the probe child's stop: {other:?}")),
    }
    ptrace::get_rseq_configuration(child.0)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_decode_bits() {
        let names = uffd_feature_names(UFFD_FEATURE_WP_ASYNC | 1 | (1 << 16) | (1 << 40));
        assert_eq!(names, ["pagefault-flag-wp", "wp-async", "move", "bit-40"]);
    }

    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(PAGEMAP_SCAN, (3 << 30) | (96 << 16) | (0x66 << 8) | 16);
        assert_eq!(UFFDIO_API, (3 << 30) | (24 << 16) | (0xaa << 8) | 0x3f);
        assert_eq!(UFFDIO_REGISTER, (3 << 30) | (32 << 16) | (0xaa << 8));
    }

    #[test]
    fn dirty_tracking_serializes_as_kebab_names() {
        assert_eq!(
            serde_json::to_string(&DirtyTracking::UffdWp).unwrap(),
            "\"uffd-wp\""
        );
        assert_eq!(
            serde_json::to_string(&DirtyTracking::SoftDirty).unwrap(),
            "\"soft-dirty\""
        );
        assert_eq!(
            serde_json::to_string(&DirtyTracking::None).unwrap(),
            "\"none\""
        );
    }
}
