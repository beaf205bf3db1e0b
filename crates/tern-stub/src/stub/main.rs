//! tern-stub: what a restored process is before it becomes the process (see ../lib.rs and
//! ../protocol.rs for the conversation). No libc: raw syscalls, its own `_start` (../rt.rs,
//! shared with the guard).
#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

#[path = "../rt.rs"]
mod rt;

#[path = "../protocol.rs"]
#[allow(dead_code)]
mod protocol;

use protocol::{
    FdBatch, FdSlot, Plan, Pod, Reply, Step, CONTROL_FD, FIXUP_EPOLL_ADD, FIXUP_RECORD_LEN, MAGIC,
    MAX_BATCH, MAX_FIXUPS_PER_MSG, VERSION,
};
use rt::{exit, sc, sys, SYS_CLOSE};

const SYS_DUP2: i64 = 33;
const SYS_PAUSE: i64 = 34;
const SYS_GETPID: i64 = 39;
const SYS_SENDTO: i64 = 44;
const SYS_RECVMSG: i64 = 47;
const SYS_FCNTL: i64 = 72;
const SYS_CHDIR: i64 = 80;
const SYS_UMASK: i64 = 95;
const SYS_SETPGID: i64 = 109;
const SYS_SETSID: i64 = 112;
const SYS_SETRESUID: i64 = 117;
const SYS_SETRESGID: i64 = 119;
const SYS_SETFSUID: i64 = 122;
const SYS_SETFSGID: i64 = 123;
const SYS_CAPSET: i64 = 126;
const SYS_PRCTL: i64 = 157;
const SYS_CHROOT: i64 = 161;
const SYS_SETGROUPS: i64 = 116;
const SYS_CLOSE_RANGE: i64 = 436;
const SYS_EPOLL_CTL: i64 = 233;
const F_DUPFD_CLOEXEC: u64 = 1030;
const F_SETFD: u64 = 2;
const PR_SET_KEEPCAPS: u64 = 8;
const PR_CAPBSET_DROP: u64 = 24;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;

#[repr(C)]
struct Iovec {
    base: *mut u8,
    len: usize,
}

#[repr(C)]
struct Msghdr {
    name: *mut u8,
    namelen: u32,
    iov: *mut Iovec,
    iovlen: usize,
    control: *mut u8,
    controllen: usize,
    flags: i32,
}

/// recvmsg into `buf`, fds (if any) into `fds`; returns (bytes, nfds) or a negative errno.
fn recv(ctl: i32, buf: &mut [u8], fds: &mut [i32; MAX_BATCH]) -> Result<(usize, usize), i64> {
    let mut cbuf = [0u64; (16 + 4 * MAX_BATCH) / 8 + 2];
    let mut iov = Iovec {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    };
    let mut msg = Msghdr {
        name: core::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: cbuf.as_mut_ptr().cast(),
        controllen: core::mem::size_of_val(&cbuf),
        flags: 0,
    };
    let n = sys(SYS_RECVMSG, ctl as u64, &mut msg as *mut Msghdr as u64, 0);
    if n < 0 {
        return Err(n);
    }
    let mut nfds = 0;
    // One SCM_RIGHTS cmsg at most (the engine sends one per batch).
    if msg.controllen >= 16 {
        let c = cbuf.as_ptr().cast::<u8>();
        // SAFETY: the kernel filled at least one cmsghdr (controllen >= 16) into cbuf.
        let (len, level, kind) = unsafe {
            (
                core::ptr::read(c.cast::<usize>()),
                core::ptr::read(c.add(8).cast::<i32>()),
                core::ptr::read(c.add(12).cast::<i32>()),
            )
        };
        if level == SOL_SOCKET && kind == SCM_RIGHTS && len >= 16 {
            nfds = ((len - 16) / 4).min(MAX_BATCH);
            for (i, slot) in fds.iter_mut().enumerate().take(nfds) {
                // SAFETY: within the cmsg the kernel wrote (len bytes from c).
                *slot = unsafe { core::ptr::read_unaligned(c.add(16 + 4 * i).cast::<i32>()) };
            }
        }
    }
    if n == 0 && nfds == 0 {
        return Err(0);
    }
    Ok((n as usize, nfds))
}

fn reply(ctl: i32, status: i64, step: Step) {
    reply_at(ctl, status, step, 0)
}

fn reply_at(ctl: i32, status: i64, step: Step, index: u32) {
    let r = Reply {
        magic: MAGIC,
        status: status as i32,
        step: step as u32,
        pid: sys(SYS_GETPID, 0, 0, 0) as i32,
        index,
    };
    let b = r.as_bytes();
    // SAFETY: sendto with a valid buffer and no address.
    unsafe { sc(SYS_SENDTO, ctl as u64, b.as_ptr() as u64, b.len() as u64, 0, 0, 0) };
}

fn check(ctl: i32, r: i64, step: Step) {
    if r < 0 {
        reply(ctl, r, step);
        exit(100 + step as u64);
    }
}

fn cstr(path: &[u8]) -> u64 {
    path.as_ptr() as u64
}

#[no_mangle]
pub extern "C" fn tern_main() -> ! {
    let mut ctl = CONTROL_FD;
    let mut buf = [0u8; core::mem::size_of::<Plan>() + FIXUP_RECORD_LEN * MAX_FIXUPS_PER_MSG];
    let mut fds = [0i32; MAX_BATCH];
    let n = match recv(ctl, &mut buf, &mut fds) {
        Ok((n, _)) => n,
        Err(e) => {
            reply(ctl, e, Step::ReceivePlan);
            exit(100 + Step::ReceivePlan as u64)
        }
    };
    let plan = match Plan::read_from(&buf[..n]) {
        Some(p) if p.magic == MAGIC && p.version == VERSION => p,
        _ => {
            reply(ctl, -22, Step::BadPlan);
            exit(100 + Step::BadPlan as u64)
        }
    };
    // 1. The control socket moves above every target number.
    let high = (plan.max_target.max(CONTROL_FD) + 1) as u64;
    let moved = sys(SYS_FCNTL, ctl as u64, F_DUPFD_CLOEXEC, high);
    check(ctl, moved, Step::MoveControl);
    sys(SYS_CLOSE, ctl as u64, 0, 0);
    ctl = moved as i32;
    // 2. Fd batches.
    let mut received = 0u32;
    while received < plan.nfds {
        let (n, nfds) = match recv(ctl, &mut buf, &mut fds) {
            Ok(v) => v,
            Err(e) => {
                reply(ctl, if e == 0 { -32 } else { e }, Step::ReceiveFds);
                exit(100 + Step::ReceiveFds as u64)
            }
        };
        let hdr = FdBatch::read_from(&buf[..n]).unwrap_or_default();
        let count = hdr.count as usize;
        if hdr.magic != MAGIC || count != nfds || n < 8 + count * 8 {
            reply(ctl, -22, Step::ReceiveFds);
            exit(100 + Step::ReceiveFds as u64);
        }
        // Everything received moves above the targets first, so no dup2 clobbers a sibling.
        for fd in fds.iter_mut().take(count) {
            if (*fd as u64) < high {
                let up = sys(SYS_FCNTL, *fd as u64, F_DUPFD_CLOEXEC, high);
                check(ctl, up, Step::PlaceFds);
                sys(SYS_CLOSE, *fd as u64, 0, 0);
                *fd = up as i32;
            }
        }
        for (i, &fd) in fds.iter().enumerate().take(count) {
            let slot = FdSlot::read_from(&buf[8 + i * 8..]).unwrap_or_default();
            check(ctl, sys(SYS_DUP2, fd as u64, slot.target as u64, 0), Step::PlaceFds);
            sys(SYS_CLOSE, fd as u64, 0, 0);
            if slot.fd_flags != 0 {
                let r = sys(SYS_FCNTL, slot.target as u64, F_SETFD, slot.fd_flags as u64);
                check(ctl, r, Step::PlaceFds);
            }
        }
        received += count as u32;
    }
    // 3. Nothing else stays open (the control socket goes last, after the reply).
    if (ctl as u64) > high {
        check(ctl, sys(SYS_CLOSE_RANGE, high, ctl as u64 - 1, 0), Step::CloseOthers);
    }
    check(ctl, sys(SYS_CLOSE_RANGE, ctl as u64 + 1, u32::MAX as u64, 0), Step::CloseOthers);
    // 4. Post-placement fixups, in order, as they arrive.
    let mut done = 0u32;
    while done < plan.nfixups {
        let n = match recv(ctl, &mut buf, &mut fds) {
            Ok((n, _)) => n,
            Err(e) => {
                reply_at(ctl, if e == 0 { -32 } else { e }, Step::Fixups, done);
                exit(100 + Step::Fixups as u64)
            }
        };
        for rec in buf[..n].chunks_exact(FIXUP_RECORD_LEN) {
            let w32 = |i: usize| u32::from_le_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
            let r = if w32(0) == FIXUP_EPOLL_ADD {
                // struct epoll_event is packed on x86-64: u32 events, u64 data.
                let mut ev = [0u8; 12];
                ev[..4].copy_from_slice(&rec[12..16]);
                ev[4..].copy_from_slice(&rec[16..24]);
                // SAFETY: epoll_ctl reads 12 bytes from `ev`.
                unsafe { sc(SYS_EPOLL_CTL, w32(4) as u64, 1, w32(8) as u64, ev.as_ptr() as u64, 0, 0) }
            } else {
                -22
            };
            if r < 0 {
                reply_at(ctl, r, Step::Fixups, done);
                exit(100 + Step::Fixups as u64);
            }
            done += 1;
        }
    }
    // 5. Filesystem context.
    if plan.flags & protocol::PLAN_CHROOT != 0 {
        check(ctl, sys(SYS_CHROOT, cstr(&plan.root), 0, 0), Step::Chroot);
    }
    if plan.cwd[0] != 0 {
        check(ctl, sys(SYS_CHDIR, cstr(&plan.cwd), 0, 0), Step::Chdir);
    }
    sys(SYS_UMASK, plan.umask as u64, 0, 0);
    // 6. Session and process group.
    if plan.flags & protocol::PLAN_SETSID != 0 {
        check(ctl, sys(SYS_SETSID, 0, 0, 0), Step::Session);
    } else if plan.flags & protocol::PLAN_SETPGID != 0 {
        check(ctl, sys(SYS_SETPGID, 0, 0, 0), Step::Session);
    }
    // 7. Credentials: groups and gids while still privileged, uids keeping capabilities, then
    //    the capability sets themselves.
    if plan.flags & protocol::PLAN_CREDS != 0 {
        let ng = (plan.ngroups as usize).min(plan.groups.len());
        check(ctl, sys(SYS_SETGROUPS, ng as u64, plan.groups.as_ptr() as u64, 0), Step::Groups);
        let g = plan.gids;
        check(ctl, sys(SYS_SETRESGID, g[0] as u64, g[1] as u64, g[2] as u64), Step::Gids);
        sys(SYS_SETFSGID, g[3] as u64, 0, 0);
        // Bounding set: drop what the image did not have (needs CAP_SETPCAP, so before uids).
        for cap in 0..64u64 {
            if plan.cap_bnd & (1 << cap) == 0 {
                sys(SYS_PRCTL, PR_CAPBSET_DROP, cap, 0); // EINVAL past the last cap: fine
            }
        }
        sys(SYS_PRCTL, PR_SET_KEEPCAPS, 1, 0);
        let u = plan.uids;
        check(ctl, sys(SYS_SETRESUID, u[0] as u64, u[1] as u64, u[2] as u64), Step::Uids);
        sys(SYS_SETFSUID, u[3] as u64, 0, 0);
        sys(SYS_PRCTL, PR_SET_KEEPCAPS, 0, 0);
        // _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
        let header: [u32; 2] = [0x2008_0522, 0];
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        let data: [u32; 6] = [
            lo(plan.cap_eff), lo(plan.cap_prm), lo(plan.cap_inh),
            hi(plan.cap_eff), hi(plan.cap_prm), hi(plan.cap_inh),
        ];
        let r = sys(SYS_CAPSET, header.as_ptr() as u64, data.as_ptr() as u64, 0);
        check(ctl, r, Step::Caps);
        for cap in 0..64u64 {
            if plan.cap_amb & (1 << cap) != 0 {
                // SAFETY: prctl with integer arguments.
                let r = unsafe { sc(SYS_PRCTL, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0, 0) };
                check(ctl, r, Step::Caps);
            }
        }
    }
    // 8. Ready: tell the engine and wait to be taken over.
    reply(ctl, 0, Step::Done);
    sys(SYS_CLOSE, ctl as u64, 0, 0);
    loop {
        sys(SYS_PAUSE, 0, 0, 0);
    }
}
