//! Starting the stub: memfd with the embedded ELF, clone3 with set_tid, the plan and the fds.
use super::stub_protocol::{
    FdBatch, FdSlot, Plan, Pod, Reply, Step, CONTROL_FD, FIXUP_RECORD_LEN, MAGIC, MAX_BATCH,
    MAX_FIXUPS_PER_MSG, MAX_GROUPS,
    PLAN_CHROOT, PLAN_CREDS, PLAN_SETPGID, PLAN_SETSID,
};
use super::{RestoreError, StubFd};
use crate::image::ProcessImage;
use crate::sys::{Errno, Pid};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2 = 88 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

impl CloneArgs {
    pub fn to_bytes(self) -> [u8; 88] {
        let words = [
            self.flags,
            self.pidfd,
            self.child_tid,
            self.parent_tid,
            self.exit_signal,
            self.stack,
            self.stack_size,
            self.tls,
            self.set_tid,
            self.set_tid_size,
            self.cgroup,
        ];
        let mut out = [0u8; 88];
        for (i, w) in words.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `elf` in a sealed memfd named `name`, made once per engine process (`cell` keeps it).
pub(crate) fn program_memfd(
    cell: &'static OnceLock<Result<OwnedFd, Errno>>,
    name: &'static std::ffi::CStr,
    elf: &[u8],
) -> Result<RawFd, Errno> {
    let fd = cell.get_or_init(|| {
        // SAFETY: memfd_create reads the NUL-terminated name; flags are constants.
        let fd = Errno::result(unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        let fd = owned(fd);
        let mut off = 0;
        while off < elf.len() {
            // SAFETY: writes from a valid slice of the embedded ELF.
            let n = unsafe {
                libc::write(fd.as_raw_fd(), elf[off..].as_ptr().cast(), elf.len() - off)
            };
            off += Errno::result(n)? as usize;
        }
        let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: fcntl with integer arguments.
        Errno::result(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
        Ok(fd)
    });
    match fd {
        Ok(fd) => Ok(fd.as_raw_fd()),
        Err(errno) => Err(*errno),
    }
}

/// The stub ELF in a memfd, made once per engine process.
fn stub_memfd() -> Result<RawFd, RestoreError> {
    static MEMFD: OnceLock<Result<OwnedFd, Errno>> = OnceLock::new();
    program_memfd(&MEMFD, c"tern-stub", tern_stub::ELF).map_err(|errno| RestoreError::Failed {
        step: "creating the stub memfd".into(),
        detail: errno.to_string(),
    })
}

/// The plan for the stub, from the image and what this engine itself is.
pub(crate) fn make_plan(
    image: &ProcessImage,
    nfds: usize,
    max_target: i32,
    nfixups: usize,
    warnings: &mut Vec<String>,
) -> Result<Plan, RestoreError> {
    let t = &image.task;
    let pid = image.source.ns_pid;
    let mut plan = Plan::new();
    plan.umask = t.umask;
    plan.nfds = nfds as u32;
    plan.max_target = max_target;
    plan.nfixups = nfixups as u32;
    // Session and process group: what can be rebuilt from here.
    // SAFETY: getsid/getpgid(0) take integers only.
    let (my_sid, my_pgid) = unsafe { (libc::getsid(0), libc::getpgid(0)) };
    if t.sid == pid {
        plan.flags |= PLAN_SETSID;
        if t.pgid != pid {
            warnings.push(format!("process group {} could not be restored (now {pid})", t.pgid));
        }
    } else {
        if t.pgid == pid {
            plan.flags |= PLAN_SETPGID;
        } else if t.pgid != my_pgid {
            warnings.push(format!(
                "process group {} is not available here; the process joins {my_pgid}",
                t.pgid
            ));
        }
        if t.sid != my_sid {
            warnings.push(format!(
                "session {} is not available here; the process joins session {my_sid}",
                t.sid
            ));
        }
    }
    // Credentials: only when they differ from ours (the stub starts with ours).
    let mine = crate::proc::status::read_status(Pid::this()).map_err(|e| RestoreError::Failed {
        step: "reading the engine's own credentials".into(),
        detail: e.to_string(),
    })?;
    let c = &t.creds;
    let same = mine.uid.real == c.uid.real
        && mine.uid.effective == c.uid.effective
        && mine.uid.saved == c.uid.saved
        && mine.uid.fs == c.uid.fs
        && mine.gid.real == c.gid.real
        && mine.gid.effective == c.gid.effective
        && mine.gid.saved == c.gid.saved
        && mine.gid.fs == c.gid.fs
        && mine.groups == c.groups
        && mine.cap_eff == c.cap_eff
        && mine.cap_prm == c.cap_prm
        && mine.cap_inh == c.cap_inh
        && mine.cap_bnd == c.cap_bnd
        && mine.cap_amb == c.cap_amb;
    if !same {
        if c.groups.len() > MAX_GROUPS {
            return Err(RestoreError::Unsupported(format!(
                "{} supplementary groups (the stub takes {MAX_GROUPS})",
                c.groups.len()
            )));
        }
        plan.flags |= PLAN_CREDS;
        plan.uids = [c.uid.real, c.uid.effective, c.uid.saved, c.uid.fs];
        plan.gids = [c.gid.real, c.gid.effective, c.gid.saved, c.gid.fs];
        plan.ngroups = c.groups.len() as u32;
        plan.groups[..c.groups.len()].copy_from_slice(&c.groups);
        plan.cap_inh = c.cap_inh;
        plan.cap_prm = c.cap_prm;
        plan.cap_eff = c.cap_eff;
        plan.cap_bnd = c.cap_bnd;
        plan.cap_amb = c.cap_amb;
    }
    if t.root != "/" {
        plan.flags |= PLAN_CHROOT;
        if !Plan::set_path(&mut plan.root, t.root.as_bytes()) {
            return Err(RestoreError::Unsupported(format!("root path too long: {}", t.root)));
        }
    }
    if !Plan::set_path(&mut plan.cwd, t.cwd.as_bytes()) {
        return Err(RestoreError::Unsupported(format!("cwd path too long: {}", t.cwd)));
    }
    Ok(plan)
}

/// A started stub: its pid and the engine's end of the control socket.
pub(crate) struct Started {
    pub pid: Pid,
    pub control: OwnedFd,
}

/// Fds a program started by [`spawn_program`] may be given (the targets must be below
/// [`FIRST_FREE_FD`]).
const MAX_CHILD_FDS: usize = 8;
/// The lowest fd the vfork child uses for its own copies (above every target).
const FIRST_FREE_FD: i32 = 10;

/// What the vfork child needs, prepared by the parent before the clone (the child shares the
/// parent's memory and reads this from the parent's stack frame, which cannot go away: the
/// parent's thread is suspended until the child has exec'd or exited).
#[repr(C)]
struct ChildArgs {
    memfd: RawFd,
    /// `(fd here, fd number in the program)`, `nfds` of them.
    fds: [(RawFd, RawFd); MAX_CHILD_FDS],
    nfds: usize,
    empty: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
}

/// The vfork child's own stack (16-byte aligned; the child only makes raw syscalls).
#[repr(C, align(16))]
struct ChildStack([u8; 32 << 10]);

/// A raw syscall that does not touch errno: the vfork child runs on the parent's memory and its
/// TLS, so nothing it does may write there (libc's `syscall()` sets errno on failure).
#[inline(always)]
unsafe fn raw_syscall(nr: i64, a: u64, b: u64, c: u64, d: u64, e: u64) -> i64 {
    let ret: i64;
    // SAFETY: the caller passes arguments valid for syscall `nr`; `syscall` clobbers rcx and
    // r11 only, and touches no memory of ours beyond what the arguments point at.
    unsafe {
        core::arch::asm!("syscall", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c,
            in("r10") d, in("r8") e, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// The child between clone3 and execveat: each given fd to its number (all of them moved above
/// [`FIRST_FREE_FD`] first, so that no dup2 clobbers a sibling), every other fd closed (its own
/// copy of the fd table), the program exec'd from the memfd. Runs on [`ChildStack`] with the
/// parent's memory, so it only makes raw syscalls on the prepared [`ChildArgs`] and its own
/// stack; it never returns (exec or exit).
extern "C" fn program_child(args: *const ChildArgs) -> ! {
    // SAFETY: `args` points at the parent's ChildArgs, alive while the parent is suspended
    // (CLONE_VFORK); every syscall below takes integers or pointers into it.
    unsafe {
        let a = &*args;
        let low = FIRST_FREE_FD as u64;
        let n = a.nfds.min(MAX_CHILD_FDS);
        let m = raw_syscall(libc::SYS_fcntl, a.memfd as u64, libc::F_DUPFD_CLOEXEC as u64, low, 0, 0);
        let mut ok = m >= low as i64;
        let mut moved = [-1i64; MAX_CHILD_FDS];
        for (up, &(fd, _)) in moved.iter_mut().zip(&a.fds[..n]) {
            *up = raw_syscall(libc::SYS_fcntl, fd as u64, libc::F_DUPFD_CLOEXEC as u64, low, 0, 0);
            ok &= *up >= low as i64;
        }
        for (&up, &(_, target)) in moved.iter().zip(&a.fds[..n]) {
            // dup2 clears close-on-exec on the new number.
            ok = ok && raw_syscall(libc::SYS_dup2, up as u64, target as u64, 0, 0, 0) >= 0;
        }
        if ok {
            for fd in 0..FIRST_FREE_FD {
                if !a.fds[..n].iter().any(|&(_, target)| target == fd) {
                    raw_syscall(libc::SYS_close, fd as u64, 0, 0, 0, 0);
                }
            }
            raw_syscall(libc::SYS_close_range, low, m as u64 - 1, 0, 0, 0);
            raw_syscall(libc::SYS_close_range, m as u64 + 1, u64::from(u32::MAX), 0, 0, 0);
            raw_syscall(
                libc::SYS_execveat,
                m as u64,
                a.empty as u64,
                a.argv as u64,
                a.envp as u64,
                libc::AT_EMPTY_PATH as u64,
            );
        }
        loop {
            raw_syscall(libc::SYS_exit_group, 127, 0, 0, 0, 0);
        }
    }
}

/// A program started by [`spawn_program`].
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: Pid,
    /// Its pidfd (CLONE_PIDFD), when asked for.
    pub pidfd: Option<OwnedFd>,
}

/// clone3 + execveat of the program in `memfd`, started with `fds` (`(fd here, number there)`,
/// at most [`MAX_CHILD_FDS`], numbers below [`FIRST_FREE_FD`]) and nothing else open, argv
/// `[argv0]`, an empty environment and every signal blocked. `set_tid`: the pid it must have;
/// `pidfd`: also return a pidfd of it (CLONE_PIDFD). The calling thread becomes its parent.
///
/// The child shares the engine's memory until its exec (CLONE_VM | CLONE_VFORK, what
/// posix_spawn does): a plain fork would copy the page tables of the whole engine — the agent's
/// heap and every page received for this migration, a gigabyte and more — only for the exec to
/// tear them down again, tens of milliseconds inside the downtime. The calling thread is
/// suspended until the child has exec'd (or exited: an exec that fails exits 127); the child
/// runs on its own small stack and makes raw syscalls only. Every signal is blocked around the
/// clone so that none of the engine's handlers can run in the child on the shared memory; the
/// program starts with them all blocked (exec keeps the mask).
pub(crate) fn spawn_program(
    memfd: RawFd,
    argv0: &std::ffi::CStr,
    fds: &[(RawFd, RawFd)],
    set_tid: Option<i32>,
    pidfd: bool,
) -> Result<Spawned, Errno> {
    if fds.len() > MAX_CHILD_FDS || fds.iter().any(|&(_, target)| !(0..FIRST_FREE_FD).contains(&target)) {
        return Err(Errno(libc::EINVAL));
    }
    let argv: [*const libc::c_char; 2] = [argv0.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let empty = c"";
    let mut child_args = ChildArgs {
        memfd,
        fds: [(-1, -1); MAX_CHILD_FDS],
        nfds: fds.len(),
        empty: empty.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
    };
    child_args.fds[..fds.len()].copy_from_slice(fds);
    let mut stack = Box::new(ChildStack([0; 32 << 10]));
    let set_tid = set_tid.map(|pid| [pid]);
    let mut pidfd_out: RawFd = -1;
    let mut flags = (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
    if pidfd {
        flags |= libc::CLONE_PIDFD as u64;
    }
    let args = CloneArgs {
        flags,
        pidfd: if pidfd { &mut pidfd_out as *mut RawFd as u64 } else { 0 },
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.0.as_mut_ptr() as u64,
        stack_size: stack.0.len() as u64,
        set_tid: set_tid.as_ref().map_or(0, |t| t.as_ptr() as u64),
        set_tid_size: u64::from(set_tid.is_some()),
        ..CloneArgs::default()
    };
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask write only the local sets.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both point at live local sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let ret: i64;
    // SAFETY: clone3 reads `args`, the set_tid array and nothing else of ours, and writes the
    // pidfd (if asked) into `pidfd_out`. In the parent (rax != 0) only rax, rcx and r11 change.
    // The child (rax == 0) starts on `stack`'s top with every other register as the parent had
    // it, and calls program_child(&child_args), which never returns; `stack`, `child_args` and
    // what it points at live in this frame, which cannot end before the child has exec'd or
    // exited (CLONE_VFORK suspends this thread).
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") &child_args as *const ChildArgs,
            in("r13") program_child as extern "C" fn(*const ChildArgs) -> !,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    // SAFETY: restores this thread's own mask from a live local.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if ret < 0 {
        return Err(Errno(-ret as i32));
    }
    // SAFETY: a live local; read volatile because the kernel wrote it through the address
    // handed to clone3, which the compiler does not see.
    let pidfd_out = unsafe { std::ptr::read_volatile(&pidfd_out) };
    Ok(Spawned { pid: Pid::from_raw(ret as i32), pidfd: (pidfd && pidfd_out >= 0).then(|| owned(pidfd_out)) })
}

/// clone3(set_tid = [pid]) + execveat(stub memfd), the control socket at fd 3 (see
/// [`spawn_program`]). Must run on the thread that will trace it.
pub(crate) fn clone_stub(pid: i32) -> Result<Started, RestoreError> {
    let memfd = stub_memfd()?;
    let mut pair = [0i32; 2];
    // SAFETY: socketpair writes two fds into `pair`.
    Errno::result(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    })
    .map_err(|errno| RestoreError::Failed {
        step: "socketpair for the stub".into(),
        detail: errno.to_string(),
    })?;
    let control = owned(pair[0]);
    let child_end = owned(pair[1]);
    let spawned = spawn_program(memfd, c"tern-stub", &[(child_end.as_raw_fd(), CONTROL_FD)], Some(pid), false)
        .map_err(|errno| {
            if errno == Errno(libc::EEXIST) {
                RestoreError::PidTaken { pid }
            } else {
                RestoreError::Failed {
                    step: format!("clone3(set_tid={pid})"),
                    detail: errno.to_string(),
                }
            }
        })?;
    drop(child_end);
    Ok(Started {
        pid: spawned.pid,
        control,
    })
}

/// One sendmsg of `bytes` on the unix socket `control`, with `fds` (at most [`MAX_BATCH`]) in an
/// SCM_RIGHTS message when there are any: the bytes sent. Used for the stub's plan and fds and for
/// handing a forked child's userfaultfd to the guard (guard.rs).
pub(super) fn send(control: &OwnedFd, bytes: &[u8], fds: &[RawFd], flags: libc::c_int) -> Result<usize, Errno> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    let mut cbuf = vec![0u64; (16 + 4 * MAX_BATCH) / 8 + 2];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        // SAFETY: CMSG_SPACE/LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at cbuf, large enough for one cmsg of `fds.len()` ints.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: msg points at valid iovec/control buffers for the call.
    let n = unsafe { libc::sendmsg(control.as_raw_fd(), &msg, flags) };
    Errno::result(n).map(|n| n as usize)
}

/// Sends the plan and every fd, then waits for the stub's reply.
pub(crate) fn hand_over(
    control: &OwnedFd,
    plan: &Plan,
    fds: &[StubFd],
    fixups: &[crate::files::FdFixup],
    timeout: Duration,
) -> Result<(), RestoreError> {
    let fail = |what: &str, errno: Errno| RestoreError::Failed {
        step: format!("stub handover: {what}"),
        detail: errno.to_string(),
    };
    send(control, plan.as_bytes(), &[], libc::MSG_NOSIGNAL).map_err(|e| fail("sending the plan", e))?;
    for chunk in fds.chunks(MAX_BATCH) {
        let mut msg = FdBatch {
            magic: MAGIC,
            count: chunk.len() as u32,
        }
        .as_bytes()
        .to_vec();
        for f in chunk {
            msg.extend_from_slice(
                FdSlot {
                    target: f.target,
                    fd_flags: if f.cloexec { libc::FD_CLOEXEC as u32 } else { 0 },
                }
                .as_bytes(),
            );
        }
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.fd.as_raw_fd()).collect();
        send(control, &msg, &raw, libc::MSG_NOSIGNAL).map_err(|e| fail("sending fds", e))?;
    }
    let encoded = crate::files::encode_fixups(fixups);
    for chunk in encoded.chunks(FIXUP_RECORD_LEN * MAX_FIXUPS_PER_MSG) {
        send(control, chunk, &[], libc::MSG_NOSIGNAL).map_err(|e| fail("sending fixups", e))?;
    }
    let mut pfd = libc::pollfd {
        fd: control.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if r == 0 {
        return Err(RestoreError::Failed {
            step: "stub handover".into(),
            detail: format!("no reply from the stub within {timeout:?}"),
        });
    }
    let mut buf = [0u8; 64];
    // SAFETY: recv into a local buffer.
    let n = unsafe { libc::recv(control.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = Errno::result(n).map_err(|e| fail("reading the reply", e))? as usize;
    let reply = Reply::read_from(&buf[..n]).ok_or_else(|| RestoreError::Failed {
        step: "stub handover".into(),
        detail: "the stub exited without replying".into(),
    })?;
    if reply.magic != MAGIC {
        return Err(RestoreError::Failed {
            step: "stub handover".into(),
            detail: "bad reply magic".into(),
        });
    }
    if reply.status != 0 {
        let step = Step::from_u32(reply.step);
        let mut step_name = step.map(Step::name).unwrap_or("unknown step").to_owned();
        if step == Some(Step::Fixups) {
            step_name = format!("{step_name}, record {}", reply.index);
        }
        return Err(RestoreError::Stub {
            step: step_name,
            errno: Errno(-reply.status),
        });
    }
    // The stub closes its end right after replying. Until it has, the control socket is still
    // one of its fds, and seizing it now (it is stopped wherever it is and never runs again)
    // would leave that socket in the restored process, at the first number above its own fds.
    // The stub holds the only other reference to the pair, so end of file here means it is
    // closed.
    wait_for_close(control, timeout)
}

/// Waits until the peer of `control` has closed its end (recv returns 0), at most `timeout`.
fn wait_for_close(control: &OwnedFd, timeout: Duration) -> Result<(), RestoreError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd { fd: control.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if r < 0 && Errno::last() == Errno(libc::EINTR) {
            continue;
        }
        if r == 0 && left.is_zero() {
            return Err(RestoreError::Failed {
                step: "stub handover".into(),
                detail: format!("the stub did not close its control socket within {timeout:?}"),
            });
        }
        let mut buf = [0u8; 64];
        // SAFETY: recv into a local buffer, without waiting.
        let n = unsafe { libc::recv(control.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        match n {
            0 => return Ok(()),
            n if n < 0 && Errno::last() == Errno(libc::EAGAIN) => continue,
            n if n < 0 => {
                return Err(RestoreError::Failed {
                    step: "stub handover: waiting for the stub to close its control socket".into(),
                    detail: Errno::last().to_string(),
                })
            }
            _ => {
                return Err(RestoreError::Failed {
                    step: "stub handover".into(),
                    detail: "the stub sent more after its reply".into(),
                })
            }
        }
    }
}
