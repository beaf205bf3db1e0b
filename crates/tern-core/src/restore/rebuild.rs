//! The restore driver: everything after the checks runs here, on the restore thread.
use super::lazy::{self, LazyHandle, LazyOptions, LazySource, LazySummary};
use super::stub::{self, CloneArgs};
use super::{RestoreError, RestoreOptions, RestoreTimings, RestoredProcess};
use crate::image::mm::{fnv1a, VmaImage};
use crate::image::{FileIdentity, ProcessImage};
use crate::pages::{PageRun, PageStore, PAGE_SIZE};
use crate::proc::{self, VmaKind};
use crate::ptrace::{self, Regs, Stop};
use crate::remote::{self, StopSource};
use crate::sys::{Errno, Pid, Tid};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

const TRAMPOLINE_LEN: u64 = 4 * PAGE_SIZE as u64;
/// `syscall; int3`.
const TRAMPOLINE_CODE: [u8; 3] = [0x0f, 0x05, 0xcc];
const SCRATCH_OFF: u64 = 256;
const PAGE: u64 = PAGE_SIZE as u64;
const SEIZE_OPTIONS: i32 =
    libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const SYS_RSEQ: i64 = 334;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;

fn ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Checks before anything is created
// ---------------------------------------------------------------------------------------------

fn identity_of(path: &str, target: &std::path::Path) -> Result<FileIdentity, RestoreError> {
    FileIdentity::of(path, target).map_err(|source| RestoreError::FileMissing {
        path: path.to_owned(),
        source,
    })
}

fn check_file(expected: &FileIdentity, found: FileIdentity) -> Result<(), RestoreError> {
    if expected.same_content(&found) {
        Ok(())
    } else {
        Err(RestoreError::FileChanged {
            path: expected.path.clone(),
            expected: expected.clone(),
            found,
        })
    }
}

/// The engine's own special mappings: (kind, start, end).
fn own_specials() -> Result<Vec<(VmaKind, u64, u64)>, RestoreError> {
    let vmas = proc::maps::read_maps(Pid::this()).map_err(|e| RestoreError::at("reading own maps", e))?;
    Ok(vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
        .map(|v| (v.kind, v.start, v.end))
        .collect())
}

fn image_specials(image: &ProcessImage) -> Vec<(VmaKind, u64, u64)> {
    image
        .mm
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
        .map(|v| (v.kind, v.start, v.end))
        .collect()
}

/// Same kinds, same sizes, same relative layout (vdso code addresses vvar data RIP-relative).
fn compare_specials(
    here: &[(VmaKind, u64, u64)],
    there: &[(VmaKind, u64, u64)],
) -> Result<(), RestoreError> {
    let describe = |v: &[(VmaKind, u64, u64)]| {
        v.iter()
            .map(|(k, s, e)| format!("{}:{:#x}", k.name(), e - s))
            .collect::<Vec<_>>()
            .join(",")
    };
    let same_shape = here.len() == there.len()
        && here.iter().zip(there).all(|(a, b)| a.0 == b.0 && a.2 - a.1 == b.2 - b.1)
        && here
            .iter()
            .zip(there)
            .all(|(a, b)| a.1.wrapping_sub(here[0].1) == b.1.wrapping_sub(there[0].1));
    if same_shape {
        Ok(())
    } else {
        Err(RestoreError::VdsoMismatch(format!(
            "layout here [{}], image [{}]",
            describe(here),
            describe(there)
        )))
    }
}

pub(crate) fn precheck(image: &ProcessImage) -> Result<(), RestoreError> {
    let pid = image.source.ns_pid;
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    if r == 0 || Errno::last() != Errno(libc::ESRCH) {
        return Err(RestoreError::PidTaken { pid });
    }
    if image.leader().is_none() {
        return Err(RestoreError::Unsupported("the image has no leader thread".into()));
    }
    if let Some(exe) = &image.task.exe {
        check_file(exe, identity_of(&exe.path, exe.path.as_ref())?)?;
    }
    for v in &image.mm.vmas {
        if let Some(f) = &v.file {
            check_file(f, identity_of(&f.path, f.path.as_ref())?)?;
        }
    }
    let here = own_specials()?;
    compare_specials(&here, &image_specials(image))?;
    if let Some(&(_, s, e)) = here.iter().find(|v| v.0 == VmaKind::Vdso) {
        let bytes = remote::read_memory(Pid::this(), s, (e - s) as usize)
            .map_err(|e| RestoreError::at("reading own vdso", e))?;
        if fnv1a(&bytes) != image.mm.vdso_hash {
            return Err(RestoreError::VdsoMismatch(
                "vdso contents differ (another kernel build)".into(),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Slot {
    stopped: bool,
    /// Registers when first stopped (the template for injections).
    base: Option<Regs>,
}

struct Driver<'a> {
    image: &'a ProcessImage,
    pid: Pid,
    threads: BTreeMap<Tid, Slot>,
    site: u64,
    tramp: u64,
    pages_written: u64,
    bytes_written: u64,
    /// Lazy memory: the page source (None: everything is written).
    lazy_source: Option<Arc<dyn LazySource>>,
    lazy_options: LazyOptions,
    lazy: Option<LazyHandle>,
    lazy_summary: Option<LazySummary>,
    warnings: Vec<String>,
}

impl StopSource for Driver<'_> {
    fn wait_for(&mut self, tid: Tid) -> Result<Stop, Errno> {
        loop {
            let Some((who, stop)) = ptrace::wait(-1, 0)? else {
                continue;
            };
            if stop.is_exit() {
                self.threads.remove(&who);
            } else if who != tid && matches!(stop, Stop::Interrupt | Stop::GroupStop { .. }) {
                // A thread we just cloned, auto-attached, in its first stop.
                self.threads.entry(who).or_default().stopped = true;
            }
            if who == tid {
                return Ok(stop);
            }
        }
    }

    fn defer_signal(&mut self, _tid: Tid, _signal: i32) {
        // The process is being built: nothing of its own can be pending yet that we would owe it.
    }
}

pub(crate) fn run(
    image: &ProcessImage,
    pages: &PageStore,
    lazy_source: Option<Arc<dyn LazySource>>,
    options: RestoreOptions,
) -> Result<(RestoredProcess, Option<LazyHandle>), RestoreError> {
    let total = Instant::now();
    let mut timings = RestoreTimings::default();
    let mut warnings = Vec::new();
    precheck(image)?;
    let max_target = options.fds.iter().map(|f| f.target).max().unwrap_or(-1);
    let plan = stub::make_plan(
        image,
        options.fds.len(),
        max_target,
        options.fixups.len(),
        &mut warnings,
    )?;
    let started = stub::clone_stub(image.source.ns_pid)?;
    let pid = started.pid;
    let mut driver = Driver {
        image,
        pid,
        threads: BTreeMap::new(),
        site: 0,
        tramp: 0,
        pages_written: 0,
        bytes_written: 0,
        lazy_source,
        lazy_options: options.lazy,
        lazy: None,
        lazy_summary: None,
        warnings: Vec::new(),
    };
    let outcome = (|| {
        stub::hand_over(
            &started.control,
            &plan,
            &options.fds,
            &options.fixups,
            options.stub_timeout,
        )?;
        drop(options.fds);
        driver.seize()?;
        timings.clone_ns = ns(total);
        let t = Instant::now();
        driver.build_memory(pages)?;
        timings.memory_ns = ns(t);
        let t = Instant::now();
        driver.build_task()?;
        driver.build_threads()?;
        driver.finish()?;
        timings.threads_ns = ns(t);
        Ok(())
    })();
    if let Err(e) = outcome {
        // The lazy thread (if started) sees the process exit and ends by itself.
        driver.kill_and_reap();
        return Err(e);
    }
    warnings.append(&mut driver.warnings);
    timings.total_ns = ns(total);
    let mut threads: Vec<i32> = image.threads.iter().map(|t| t.tid).collect();
    threads.sort_by_key(|&t| (t != pid.as_raw(), t));
    let restored = RestoredProcess {
        pid,
        threads,
        timings,
        pages_written: driver.pages_written,
        bytes_written: driver.bytes_written,
        warnings,
        nudged_connections: 0,
        lazy: driver.lazy_summary,
    };
    Ok((restored, driver.lazy.take()))
}

impl Driver<'_> {
    fn leader(&self) -> Tid {
        self.pid
    }

    fn kill_and_reap(&mut self) {
        // SAFETY: kill by pid: the half-built process is our child, nobody else's.
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        // Reap every tracee of this thread (the stub and the threads cloned in it).
        loop {
            match ptrace::wait(-1, 0) {
                Ok(Some((who, stop))) => {
                    if who == self.pid && stop.is_exit() {
                        // The leader is reaped last by the kernel's rules; keep draining.
                    }
                }
                _ => break,
            }
        }
    }

    fn seize(&mut self) -> Result<(), RestoreError> {
        let pid = self.pid;
        // SAFETY: SEIZE takes an options bit mask as data; no memory is accessed.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SEIZE,
                pid.as_raw(),
                std::ptr::null_mut::<libc::c_void>(),
                SEIZE_OPTIONS as usize as *mut libc::c_void,
            )
        };
        Errno::result(r).map_err(|e| RestoreError::at("PTRACE_SEIZE of the stub", e))?;
        ptrace::interrupt(pid).map_err(|e| RestoreError::at("PTRACE_INTERRUPT of the stub", e))?;
        self.threads.insert(pid, Slot::default());
        loop {
            let stop = self
                .wait_for(pid)
                .map_err(|e| RestoreError::at("waiting for the stub to stop", e))?;
            match stop {
                Stop::Interrupt | Stop::GroupStop { .. } => break,
                Stop::Exited { .. } | Stop::Killed { .. } => {
                    return Err(RestoreError::at("seizing the stub", format!("it died: {stop:?}")))
                }
                Stop::Signal { .. } | Stop::Syscall | Stop::Event { .. } => {
                    // Suppress and ask again.
                    let _ = ptrace::cont(pid, 0);
                    let _ = ptrace::interrupt(pid);
                }
            }
        }
        self.stopped(pid)?;
        ptrace::set_sigmask(pid, u64::MAX).map_err(|e| RestoreError::at("blocking signals", e))?;
        Ok(())
    }

    /// Marks `tid` stopped and saves its registers as the injection template.
    fn stopped(&mut self, tid: Tid) -> Result<(), RestoreError> {
        let regs = ptrace::get_regs(tid).map_err(|e| RestoreError::at("PTRACE_GETREGS", e))?;
        let slot = self.threads.entry(tid).or_default();
        slot.stopped = true;
        slot.base = Some(regs);
        Ok(())
    }

    /// A remote syscall in `tid`; a negative return is an error naming `what`.
    fn sys(&mut self, tid: Tid, what: &str, nr: i64, args: [u64; 6]) -> Result<u64, RestoreError> {
        let base = self
            .threads
            .get(&tid)
            .and_then(|s| s.base)
            .ok_or_else(|| RestoreError::at(what, format!("thread {tid} is not held")))?;
        let site = self.site;
        let ret = remote::inject_syscall(tid, &base, site, nr, args, self)
            .map_err(|e| RestoreError::at(what, e))?;
        if (-4095..0).contains(&ret) {
            return Err(RestoreError::at(what, Errno(-ret as i32)));
        }
        Ok(ret as u64)
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), RestoreError> {
        remote::write_memory(self.pid, addr, data)
            .map_err(|e| RestoreError::at("writing the scratch area", e))
    }

    fn scratch(&self) -> u64 {
        self.tramp + SCRATCH_OFF
    }

    // --- memory -----------------------------------------------------------------------------

    fn build_memory(&mut self, pages: &PageStore) -> Result<(), RestoreError> {
        let pid = self.pid;
        let leader = self.leader();
        let stub_vmas =
            proc::maps::read_maps(pid).map_err(|e| RestoreError::at("reading the stub's maps", e))?;
        // 1. Trampoline, with the stub's own vdso `syscall` for the mmap.
        self.site = remote::SyscallSite::new(pid)
            .address()
            .map_err(|e| RestoreError::at("finding a syscall in the stub's vdso", e))?;
        let mut taken: Vec<(u64, u64)> = stub_vmas.iter().map(|v| (v.start, v.end)).collect();
        taken.extend(self.image.mm.vmas.iter().map(|v| (v.start, v.end)));
        let tramp = free_gap(&taken, TRAMPOLINE_LEN)
            .ok_or_else(|| RestoreError::at("placing the trampoline", "no free address"))?;
        let got = self.sys(
            leader,
            "mmap(trampoline)",
            libc::SYS_mmap,
            [
                tramp,
                TRAMPOLINE_LEN,
                (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE,
                u64::MAX,
                0,
            ],
        )?;
        if got != tramp {
            return Err(RestoreError::at("mmap(trampoline)", format!("got {got:#x}")));
        }
        self.tramp = tramp;
        self.write(tramp, &TRAMPOLINE_CODE)?;
        self.site = tramp;

        // 2. Unmap the stub.
        for v in &stub_vmas {
            if matches!(
                v.kind,
                VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
            ) {
                continue;
            }
            self.sys(leader, "munmap(stub)", libc::SYS_munmap, [v.start, v.len(), 0, 0, 0, 0])?;
        }

        // 3. vdso & co. to the image's addresses.
        let here: Vec<(VmaKind, u64, u64)> = stub_vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
            .map(|v| (v.kind, v.start, v.end))
            .collect();
        let there = image_specials(self.image);
        compare_specials(&here, &there)?;
        let overlap = there
            .iter()
            .any(|t| here.iter().any(|h| t.1 < h.2 && h.1 < t.2));
        let mut current: Vec<u64> = here.iter().map(|h| h.1).collect();
        if overlap {
            let span = here.last().map(|h| h.2).unwrap_or(0) - here.first().map(|h| h.1).unwrap_or(0);
            let mut taken = taken.clone();
            taken.push((tramp, tramp + TRAMPOLINE_LEN));
            let tmp = free_gap(&taken, span)
                .ok_or_else(|| RestoreError::at("moving the vdso", "no free address"))?;
            for (i, h) in here.iter().enumerate() {
                let to = tmp + (h.1 - here[0].1);
                self.mremap(current[i], h.2 - h.1, to)?;
                current[i] = to;
            }
        }
        for (i, t) in there.iter().enumerate() {
            if current[i] != t.1 {
                self.mremap(current[i], t.2 - t.1, t.1)?;
            }
        }

        // 4. Map every VMA.
        let vmas: Vec<VmaImage> = self
            .image
            .mm
            .vmas
            .iter()
            .filter(|v| !v.is_special())
            .cloned()
            .collect();
        let mut fds: BTreeMap<(String, bool), u64> = BTreeMap::new();
        let mut written = Vec::with_capacity(vmas.len());
        // Lazy memory: the userfaultfd exists before the VMAs (it belongs to the mm); if it
        // cannot be made, everything is written as usual.
        let uffd = match self.lazy_source.clone() {
            Some(source) => match self.make_uffd()? {
                Ok(u) => Some((u, source)),
                Err(e) if !self.image.mm.remote_pages.is_empty() => {
                    // Post-copy: part of the memory is only on the source; nothing to write it
                    // from. Failing here is before the commit point (the source thaws).
                    return Err(RestoreError::at("lazy memory for the pages left on the source", e));
                }
                Err(e) => {
                    self.warnings.push(format!("lazy memory off, pages written instead: {e}"));
                    None
                }
            },
            None => None,
        };
        let mut lazy_vmas: Vec<(u64, u64)> = Vec::new();
        for v in &vmas {
            let is_lazy = uffd.as_ref().is_some_and(|(_, source)| lazy::is_lazy_vma(v, source.as_ref()));
            if is_lazy {
                lazy_vmas.push((v.start, v.end));
            }
            let has_pages = pages.range(v.start, v.end).next().is_some();
            let fill = has_pages && v.kind != VmaKind::FileShared && !is_lazy;
            let prot = if fill {
                v.prot | (libc::PROT_READ | libc::PROT_WRITE) as u32
            } else {
                v.prot
            };
            let mut flags = u64::from(v.flags) | MAP_FIXED_NOREPLACE;
            let mut fd = u64::MAX;
            if let Some(file) = &v.file {
                let writable = v.is_shared() && v.prot & libc::PROT_WRITE as u32 != 0;
                fd = match fds.get(&(file.path.clone(), writable)) {
                    Some(&fd) => fd,
                    None => {
                        let fd = self.open_checked(file, writable)?;
                        fds.insert((file.path.clone(), writable), fd);
                        fd
                    }
                };
            } else {
                flags |= libc::MAP_ANONYMOUS as u64;
            }
            let got = self.sys(
                leader,
                "mmap(vma)",
                libc::SYS_mmap,
                [v.start, v.len(), u64::from(prot), flags, fd, v.pgoff],
            )?;
            if got != v.start {
                return Err(RestoreError::at(
                    format!("mmap of {:#x}-{:#x}", v.start, v.end),
                    format!("landed at {got:#x}"),
                ));
            }
            written.push((v, fill, prot));
        }
        for (_, fd) in fds {
            self.sys(leader, "close(map fd)", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        }

        // 4b. Lazy VMAs: registered and the thread started now, before anything below can
        // touch them (rseq registration writes into the thread's TLS).
        if let Some(((uffd, features), source)) = uffd {
            let handle = lazy::start(pid, uffd, features, &lazy_vmas, source, self.lazy_options)
                .map_err(|e| RestoreError::at("starting lazy memory", e))?;
            self.lazy_summary = Some(handle.stats().summary);
            self.lazy = Some(handle);
        }

        // 5. Pages: gathered into batches, then written by parallel writers (write_parallel).
        let mut batches = Vec::new();
        for (v, fill, _) in &written {
            if *fill {
                self.collect_pages(v, pages, &mut batches);
            }
        }
        self.bytes_written += write_parallel(self.pid, &batches)?;

        // 6. Final protections.
        for (v, _, prot) in &written {
            if *prot != v.prot {
                self.sys(
                    leader,
                    "mprotect",
                    libc::SYS_mprotect,
                    [v.start, v.len(), u64::from(v.prot), 0, 0, 0],
                )?;
            }
        }

        // 7. The mm fields, auxv and exe.
        self.set_mm()?;
        Ok(())
    }

    /// userfaultfd(O_CLOEXEC|O_NONBLOCK) inside the process, taken with pidfd_getfd, closed in
    /// the process (it must not keep a stray fd), features negotiated. The inner error means
    /// "no lazy memory" (nothing registered yet); the outer one fails the restore.
    #[allow(clippy::type_complexity)]
    fn make_uffd(&mut self) -> Result<Result<(lazy::Uffd, u64), lazy::LazySetupError>, RestoreError> {
        let pid = self.pid;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = match self.sys(self.leader(), "userfaultfd", libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0]) {
            Ok(fd) => fd,
            Err(e) => return Ok(Err(lazy::LazySetupError::Create { pid, detail: e.to_string() })),
        };
        let stolen = lazy::steal(pid, fd as i32);
        self.sys(self.leader(), "close(userfaultfd)", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
        Ok(stolen)
    }

    fn mremap(&mut self, from: u64, len: u64, to: u64) -> Result<(), RestoreError> {
        let got = self.sys(
            self.leader(),
            "mremap(vdso)",
            libc::SYS_mremap,
            [
                from,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                to,
                0,
            ],
        )?;
        if got != to {
            return Err(RestoreError::at("mremap(vdso)", format!("landed at {got:#x}")));
        }
        Ok(())
    }

    /// Opens `file` inside the process by path and checks it is still the image's file.
    fn open_checked(&mut self, file: &FileIdentity, writable: bool) -> Result<u64, RestoreError> {
        let path = self.scratch();
        let mut bytes = file.path.as_bytes().to_vec();
        bytes.push(0);
        if bytes.len() > (TRAMPOLINE_LEN - SCRATCH_OFF) as usize {
            return Err(RestoreError::Unsupported(format!("path too long: {}", file.path)));
        }
        self.write(path, &bytes)?;
        let flags = if writable { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
        let fd = self
            .sys(
                self.leader(),
                &format!("open({})", file.path),
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, path, flags as u64, 0, 0, 0],
            )
            .map_err(|e| match e {
                RestoreError::Failed { detail, .. } => RestoreError::FileMissing {
                    path: file.path.clone(),
                    source: std::io::Error::other(detail),
                },
                other => other,
            })?;
        let found = identity_of(&file.path, format!("/proc/{}/fd/{fd}", self.pid).as_ref())?;
        check_file(file, found)?;
        Ok(fd)
    }

    /// Gathers the VMA's pages from the store into write batches (at most 512 runs or 16 MiB
    /// each): data runs as they are, zero runs only for file mappings (fresh anonymous memory is
    /// zero already).
    fn collect_pages<'p>(&mut self, v: &VmaImage, pages: &'p PageStore, batches: &mut Vec<Vec<(u64, &'p [u8])>>) {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let zeros_matter = matches!(v.kind, VmaKind::File);
        let mut batch: Vec<(u64, &[u8])> = Vec::new();
        let mut batch_bytes = 0usize;
        for (addr, run) in pages.range(v.start, v.end) {
            match run {
                PageRun::Data(data) => {
                    self.pages_written += (data.len() / PAGE_SIZE) as u64;
                    batch.push((addr, data));
                    batch_bytes += data.len();
                }
                PageRun::Zero { count } if zeros_matter => {
                    self.pages_written += count;
                    let mut a = addr;
                    let end = addr + count * PAGE;
                    while a < end {
                        let n = (end - a).min(ZEROS.len() as u64);
                        batch.push((a, &ZEROS[..n as usize]));
                        batch_bytes += n as usize;
                        a += n;
                    }
                }
                PageRun::Zero { .. } => {}
            }
            if batch.len() >= 512 || batch_bytes >= 16 << 20 {
                batches.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
    }

    fn set_mm(&mut self) -> Result<(), RestoreError> {
        let mm = &self.image.mm;
        let leader = self.leader();
        let exe_fd = match &self.image.task.exe {
            Some(exe) => self.open_checked(&exe.clone(), false)?,
            None => u64::from(u32::MAX),
        };
        let auxv_addr = self.scratch() + 256;
        let mut st = Vec::with_capacity(104);
        for w in [
            mm.start_code,
            mm.end_code,
            mm.start_data,
            mm.end_data,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.arg_start,
            mm.arg_end,
            mm.env_start,
            mm.env_end,
            auxv_addr,
        ] {
            st.extend_from_slice(&w.to_le_bytes());
        }
        st.extend_from_slice(&((mm.auxv.len() * 8) as u32).to_le_bytes());
        st.extend_from_slice(&(exe_fd as u32).to_le_bytes());
        let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
        if auxv.len() > 2048 {
            return Err(RestoreError::Unsupported("auxv larger than 2 KiB".into()));
        }
        self.write(self.scratch(), &st)?;
        self.write(auxv_addr, &auxv)?;
        let r = self.sys(
            leader,
            "prctl(PR_SET_MM_MAP)",
            libc::SYS_prctl,
            [PR_SET_MM, PR_SET_MM_MAP, self.scratch(), st.len() as u64, 0, 0],
        );
        if exe_fd != u64::from(u32::MAX) {
            self.sys(leader, "close(exe fd)", libc::SYS_close, [exe_fd, 0, 0, 0, 0, 0])?;
        }
        r.map(drop)
    }

    // --- task -------------------------------------------------------------------------------

    fn build_task(&mut self) -> Result<(), RestoreError> {
        let leader = self.leader();
        let t = &self.image.task;
        let s = self.scratch();
        for sa in &t.sigactions {
            self.write(s, &sa.to_kernel())?;
            self.sys(
                leader,
                &format!("rt_sigaction({})", sa.signal),
                libc::SYS_rt_sigaction,
                [sa.signal as u64, s, 0, 8, 0, 0],
            )?;
        }
        if t.personality != 0 {
            self.sys(
                leader,
                "personality",
                libc::SYS_personality,
                [u64::from(t.personality), 0, 0, 0, 0, 0],
            )?;
        }
        let prctl = |opt: i32, arg: u64| [opt as u64, arg, 0, 0, 0, 0];
        if t.dumpable != 1 {
            self.sys(leader, "PR_SET_DUMPABLE", libc::SYS_prctl, prctl(libc::PR_SET_DUMPABLE, t.dumpable as u64))?;
        }
        if t.pdeathsig != 0 {
            self.sys(leader, "PR_SET_PDEATHSIG", libc::SYS_prctl, prctl(libc::PR_SET_PDEATHSIG, t.pdeathsig as u64))?;
        }
        if t.child_subreaper {
            self.sys(leader, "PR_SET_CHILD_SUBREAPER", libc::SYS_prctl, prctl(libc::PR_SET_CHILD_SUBREAPER, 1))?;
        }
        // Resource limits, from outside.
        for r in &t.rlimits {
            let mut cur = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
            let res = r.resource as libc::__rlimit_resource_t;
            // SAFETY: prlimit64 reads/writes one rlimit64 each, locals alive for the call.
            unsafe { libc::prlimit64(self.pid.as_raw(), res, std::ptr::null(), &mut cur) };
            if cur.rlim_cur == r.soft && cur.rlim_max == r.hard {
                continue;
            }
            let new = libc::rlimit64 { rlim_cur: r.soft, rlim_max: r.hard };
            // SAFETY: as above.
            let ret = unsafe { libc::prlimit64(self.pid.as_raw(), res, &new, std::ptr::null_mut()) };
            Errno::result(ret).map_err(|e| {
                RestoreError::at(format!("prlimit(resource {})", r.resource), e)
            })?;
        }
        Ok(())
    }

    // --- threads ----------------------------------------------------------------------------

    fn build_threads(&mut self) -> Result<(), RestoreError> {
        let leader = self.leader();
        let image = self.image;
        let s = self.scratch();
        for t in image.threads.iter().filter(|t| t.tid != image.source.ns_pid) {
            let set_tid_at = s + 128;
            let args = CloneArgs {
                flags: (libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_SYSVSEM) as u64,
                set_tid: set_tid_at,
                set_tid_size: 1,
                ..CloneArgs::default()
            };
            self.write(s, &args.to_bytes())?;
            self.write(set_tid_at, &t.tid.to_le_bytes())?;
            let got = self.sys(
                leader,
                &format!("clone3(thread {})", t.tid),
                libc::SYS_clone3,
                [s, 88, 0, 0, 0, 0],
            )?;
            let tid = Tid::from_raw(got as i32);
            if got as i32 != t.tid {
                return Err(RestoreError::at("clone3(thread)", format!("got tid {got}, wanted {}", t.tid)));
            }
            while !self.threads.get(&tid).is_some_and(|s| s.stopped) {
                let stop = self
                    .wait_for(tid)
                    .map_err(|e| RestoreError::at("waiting for a new thread", e))?;
                if stop.is_exit() {
                    return Err(RestoreError::at("new thread", format!("{tid} died: {stop:?}")));
                }
                if matches!(stop, Stop::Interrupt | Stop::GroupStop { .. }) {
                    break;
                }
            }
            self.stopped(tid)?;
            ptrace::set_sigmask(tid, u64::MAX).map_err(|e| RestoreError::at("blocking signals", e))?;
        }
        for t in &image.threads {
            let tid = Tid::from_raw(t.tid);
            if !t.altstack.is_disabled() {
                self.write(s, &t.altstack.to_kernel())?;
                self.sys(tid, "sigaltstack", libc::SYS_sigaltstack, [s, 0, 0, 0, 0, 0])?;
            }
            if t.robust_list != 0 {
                self.sys(
                    tid,
                    "set_robust_list",
                    libc::SYS_set_robust_list,
                    [t.robust_list, t.robust_list_len, 0, 0, 0, 0],
                )?;
            }
            self.sys(tid, "set_tid_address", libc::SYS_set_tid_address, [t.clear_child_tid, 0, 0, 0, 0, 0])?;
            if let Some(r) = t.rseq {
                self.sys(
                    tid,
                    "rseq",
                    SYS_RSEQ,
                    [r.ptr, u64::from(r.len), 0, u64::from(r.sig), 0, 0],
                )?;
            }
            let mut comm = t.comm.as_bytes().to_vec();
            comm.truncate(15);
            comm.push(0);
            self.write(s, &comm)?;
            self.sys(tid, "PR_SET_NAME", libc::SYS_prctl, [libc::PR_SET_NAME as u64, s, 0, 0, 0, 0])?;
            for p in &t.pending {
                self.write(s, &p.raw)?;
                self.sys(
                    tid,
                    "rt_tgsigqueueinfo",
                    libc::SYS_rt_tgsigqueueinfo,
                    [self.pid.as_raw() as u64, t.tid as u64, p.signal as u64, s, 0, 0],
                )?;
            }
        }
        for p in &image.task.shared_pending {
            self.write(s, &p.raw)?;
            self.sys(
                leader,
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                [self.pid.as_raw() as u64, p.signal as u64, s, 0, 0, 0],
            )?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RestoreError> {
        let leader = self.leader();
        let image = self.image;
        let s = self.scratch();
        let it = &image.task.itimers;
        for (which, timer) in [(0u64, it.real), (1, it.virt), (2, it.prof)] {
            if let Some(timer) = timer.to_restore() {
                self.write(s, &timer.to_kernel())?;
                self.sys(leader, "setitimer", libc::SYS_setitimer, [which, s, 0, 0, 0, 0])?;
            }
        }
        if image.task.no_new_privs {
            self.sys(leader, "PR_SET_NO_NEW_PRIVS", libc::SYS_prctl, [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0])?;
        }
        // The leader runs the trampoline's munmap; it never returns there (its registers are
        // replaced below before it resumes).
        self.sys(leader, "munmap(trampoline)", libc::SYS_munmap, [self.tramp, TRAMPOLINE_LEN, 0, 0, 0, 0])?;
        for t in &image.threads {
            let tid = Tid::from_raw(t.tid);
            let regs = Regs::from(&t.regs);
            ptrace::set_regs(tid, &regs).map_err(|e| RestoreError::at("PTRACE_SETREGS", e))?;
            if !t.xstate.is_empty() {
                ptrace::set_xstate(tid, &t.xstate).map_err(|e| RestoreError::at("PTRACE_SETREGSET(xstate)", e))?;
            }
            ptrace::set_sigmask(tid, t.blocked).map_err(|e| RestoreError::at("PTRACE_SETSIGMASK", e))?;
        }
        for t in &image.threads {
            ptrace::detach(Tid::from_raw(t.tid), 0).map_err(|e| RestoreError::at("PTRACE_DETACH", e))?;
        }
        Ok(())
    }
}

/// The lowest page-aligned gap of `len` bytes above 1 MiB not overlapping `taken` (pure).
fn free_gap(taken: &[(u64, u64)], len: u64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = taken.to_vec();
    v.sort();
    let mut cursor: u64 = 0x10_0000;
    for (s, e) in v {
        if s >= cursor + len && s > cursor {
            if s - cursor >= len {
                return Some(cursor);
            }
        }
        cursor = cursor.max((e + PAGE - 1) & !(PAGE - 1));
    }
    (cursor + len <= 0x7fff_ffff_0000).then_some(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps() {
        assert_eq!(free_gap(&[], 0x4000), Some(0x10_0000));
        assert_eq!(free_gap(&[(0x10_0000, 0x20_0000)], 0x4000), Some(0x20_0000));
        assert_eq!(
            free_gap(&[(0x10_2000, 0x20_0000), (0x20_0000, 0x30_0000)], 0x4000),
            Some(0x30_0000)
        );
        assert_eq!(free_gap(&[(0x10_4000, 0x20_0000)], 0x4000), Some(0x10_0000));
    }
}

/// Writes the batches into `pid` with one writer per CPU (at most 4). Most of a restore's time
/// is the target's page faults on first touch (allocation, zeroing) and the copy; writers on
/// disjoint ranges fault in parallel under the target's mmap read lock. Returns the bytes written.
fn write_parallel(pid: Pid, batches: &[Vec<(u64, &[u8])>]) -> Result<u64, RestoreError> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(batches.len());
    if workers <= 1 {
        return batches.iter().try_fold(0u64, |sum, b| Ok(sum + write_pages(pid, b)?));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<u64, RestoreError> {
                    let mut sum = 0u64;
                    while let Some(batch) = batches.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        sum += write_pages(pid, batch)?;
                    }
                    Ok(sum)
                })
            })
            .collect();
        let mut total = 0u64;
        let mut first_error = None;
        for w in writers {
            match w.join() {
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => first_error = first_error.or(Some(RestoreError::at("writing pages", "a writer thread panicked"))),
            }
        }
        first_error.map_or(Ok(total), Err)
    })
}

/// One batch: vectored process_vm_writev, then /proc/PID/mem for whatever it could not write
/// (read-only private mappings, where process_vm_writev stops with EFAULT).
fn write_pages(pid: Pid, batch: &[(u64, &[u8])]) -> Result<u64, RestoreError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let local: Vec<libc::iovec> = batch
        .iter()
        .map(|(_, d)| libc::iovec {
            iov_base: d.as_ptr().cast_mut().cast(),
            iov_len: d.len(),
        })
        .collect();
    let remote_iov: Vec<libc::iovec> = batch
        .iter()
        .map(|(a, d)| libc::iovec {
            iov_base: *a as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let total: usize = batch.iter().map(|(_, d)| d.len()).sum();
    // SAFETY: the local iovecs describe borrowed slices alive for the call; the kernel only
    // reads them. Remote addresses are interpreted in the target.
    let n = unsafe {
        libc::process_vm_writev(
            pid.as_raw(),
            local.as_ptr(),
            local.len() as libc::c_ulong,
            remote_iov.as_ptr(),
            remote_iov.len() as libc::c_ulong,
            0,
        )
    };
    let done = Errno::result(n).map(|n| n as usize).unwrap_or(0);
    if done < total {
        let mut off = 0usize;
        for (addr, data) in batch {
            let len = data.len();
            if off + len > done {
                let skip = done.saturating_sub(off);
                remote::write_memory(pid, addr + skip as u64, &data[skip..]).map_err(|e| RestoreError::at("writing pages", e))?;
            }
            off += len;
        }
    }
    Ok(total as u64)
}
