//! The stub protocol: what the restoring engine tells `tern-stub` over its control socket.
//!
//! Shared verbatim by the stub (a `#![no_std]` static binary, compiled from `src/stub/main.rs`)
//! and the engine (`tern_core::restore::stub_protocol` re-exports this module): `core` only, no
//! allocation, fixed little-endian layouts; both sides are built from this one file.
//!
//! # The conversation
//!
//! The engine creates a `SOCK_SEQPACKET` socketpair, clones the stub with the image's pid and
//! hands it one end as fd [`CONTROL_FD`] (every other fd closed). Then:
//!
//! 1. engine → stub: one [`Plan`] message (no fds): the credentials, umask, session, cwd/root and
//!    how many fds follow.
//! 2. engine → stub: zero or more fd batches: a [`FdBatch`] header, `count` [`FdSlot`]s, and the
//!    `count` descriptors themselves as one SCM_RIGHTS control message (at most [`MAX_BATCH`]).
//! 3. the stub first moves the control socket above every target number, then for each batch moves
//!    the received descriptors above every target and `dup2`s each to its target (setting
//!    FD_CLOEXEC as told); when all arrived it closes everything else.
//! 4. engine → stub: [`Plan::nfixups`] post-placement records (crate::files' encoding,
//!    [`FIXUP_RECORD_LEN`] bytes each, at most [`MAX_FIXUPS_PER_MSG`] per message), which the
//!    stub executes in order as they arrive (epoll registrations keyed on final fd numbers).
//! 5. the stub does chroot (if asked), chdir, umask, session/process group, credentials.
//! 6. stub → engine: one [`Reply`]: status 0, or the negative errno and the [`Step`] that failed.
//! 7. the stub closes the control socket and sleeps in `pause()` forever. The engine waits for
//!    that close (end of file on its end: the stub held the only other reference), then seizes
//!    and interrupts it (PTRACE_SEIZE + PTRACE_INTERRUPT) and rebuilds the process around it
//!    with remote syscalls; the stub's own code and stack are unmapped and never run again.
//!    Seized between its reply and its close, the stub would leave the socket in the process.
//!
//! The stub starts with every signal blocked (the engine blocks them around its vfork-style
//! clone); it never needs one, and the engine replaces the mask with the image's.
//!
//! If the engine goes away before the plan is complete, `recvmsg` returns 0 and the stub exits
//! with status 100 + step.

/// The fd the stub finds its control socket at.
pub const CONTROL_FD: i32 = 3;
/// "TERN" in little endian.
pub const MAGIC: u32 = 0x4e52_4554;
pub const VERSION: u32 = 1;
/// Descriptors per SCM_RIGHTS message (the kernel's SCM_MAX_FD is 253).
pub const MAX_BATCH: usize = 200;
/// Supplementary groups carried in a plan.
pub const MAX_GROUPS: usize = 64;
/// Bytes of cwd or root path.
pub const MAX_PATH: usize = 1024;
/// One post-placement fixup record (tern_core::files::encode_fixups' layout).
pub const FIXUP_RECORD_LEN: usize = 32;
/// Fixup records per message.
pub const MAX_FIXUPS_PER_MSG: usize = 128;
/// Fixup op: `epoll_ctl(a, EPOLL_CTL_ADD, b, {events: c, data: d})`.
pub const FIXUP_EPOLL_ADD: u32 = 1;

/// [`Plan::flags`]: become a session leader (setsid; the process group becomes the pid too).
pub const PLAN_SETSID: u32 = 1;
/// [`Plan::flags`]: become a process-group leader in the inherited session (setpgid(0, 0)).
pub const PLAN_SETPGID: u32 = 2;
/// [`Plan::flags`]: apply [`Plan`]'s credentials (groups, gids, uids, capabilities).
pub const PLAN_CREDS: u32 = 4;
/// [`Plan::flags`]: chroot to [`Plan::root`] before chdir.
pub const PLAN_CHROOT: u32 = 8;

/// Message 1 (fixed size; the paths are NUL-padded arrays).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub umask: u32,
    /// How many fds the batches that follow carry in total.
    pub nfds: u32,
    /// The highest target fd number (-1 when none).
    pub max_target: i32,
    /// How many fixup records follow the fd batches.
    pub nfixups: u32,
    /// real, effective, saved, fs.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub ngroups: u32,
    pub groups: [u32; MAX_GROUPS],
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub cwd: [u8; MAX_PATH],
    pub root: [u8; MAX_PATH],
}

/// Header of an fd batch message.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct FdBatch {
    pub magic: u32,
    pub count: u32,
}

/// Where one received descriptor goes.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct FdSlot {
    pub target: i32,
    /// FD_CLOEXEC (1) or 0.
    pub fd_flags: u32,
}

/// What the stub was doing when it failed.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Done = 0,
    ReceivePlan = 1,
    BadPlan = 2,
    MoveControl = 3,
    ReceiveFds = 4,
    PlaceFds = 5,
    CloseOthers = 6,
    Chroot = 7,
    Chdir = 8,
    Session = 9,
    Groups = 10,
    Gids = 11,
    Uids = 12,
    Caps = 13,
    Fixups = 14,
}

impl Step {
    pub fn from_u32(v: u32) -> Option<Step> {
        Some(match v {
            0 => Step::Done,
            1 => Step::ReceivePlan,
            2 => Step::BadPlan,
            3 => Step::MoveControl,
            4 => Step::ReceiveFds,
            5 => Step::PlaceFds,
            6 => Step::CloseOthers,
            7 => Step::Chroot,
            8 => Step::Chdir,
            9 => Step::Session,
            10 => Step::Groups,
            11 => Step::Gids,
            12 => Step::Uids,
            13 => Step::Caps,
            14 => Step::Fixups,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Done => "done",
            Step::ReceivePlan => "receiving the plan",
            Step::BadPlan => "checking the plan",
            Step::MoveControl => "moving the control socket",
            Step::ReceiveFds => "receiving fds",
            Step::PlaceFds => "placing fds",
            Step::CloseOthers => "closing other fds",
            Step::Chroot => "chroot",
            Step::Chdir => "chdir",
            Step::Session => "setting session / process group",
            Step::Groups => "setgroups",
            Step::Gids => "setresgid",
            Step::Uids => "setresuid",
            Step::Caps => "setting capabilities",
            Step::Fixups => "running the fd fixups (epoll_ctl)",
        }
    }
}

/// The stub's answer.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Reply {
    pub magic: u32,
    /// 0, or a negative errno.
    pub status: i32,
    /// A [`Step`].
    pub step: u32,
    /// The stub's pid as it sees it (a check that set_tid worked).
    pub pid: i32,
    /// For [`Step::Fixups`]: the index of the failing record.
    pub index: u32,
}

/// Plain-old-data messages that travel as their bytes.
///
/// # Safety
/// Implementors are `repr(C)` structs of integers and integer arrays only, so that every byte
/// pattern of their size is a valid value.
pub unsafe trait Pod: Copy {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Self is repr(C) integers (trait contract), so all its bytes are initialised
        // and may be viewed as u8 for the lifetime of the borrow.
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), core::mem::size_of::<Self>())
        }
    }

    /// Reads one value from the start of `bytes` (`None` if too short).
    fn read_from(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < core::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked; any byte pattern is a valid Self (trait contract); the read
        // is unaligned-safe.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

// SAFETY: repr(C) structs of integers / integer arrays.
unsafe impl Pod for Plan {}
// SAFETY: as above.
unsafe impl Pod for FdBatch {}
// SAFETY: as above.
unsafe impl Pod for FdSlot {}
// SAFETY: as above.
unsafe impl Pod for Reply {}

impl Plan {
    /// An all-zero plan with magic and version set.
    pub fn new() -> Plan {
        // SAFETY: Plan is Pod: all-zero bytes are a valid value.
        let mut p: Plan = unsafe { core::mem::zeroed() };
        p.magic = MAGIC;
        p.version = VERSION;
        p.max_target = -1;
        p
    }

    /// Copies `path` into a NUL-padded field; false if it does not fit.
    pub fn set_path(field: &mut [u8; MAX_PATH], path: &[u8]) -> bool {
        if path.len() >= MAX_PATH || path.contains(&0) {
            return false;
        }
        field.fill(0);
        field[..path.len()].copy_from_slice(path);
        true
    }
}

impl Default for Plan {
    fn default() -> Self {
        Plan::new()
    }
}
