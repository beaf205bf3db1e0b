//! Per-thread state: registers, signal mask and queue, alternate stack, rseq, robust list.
use super::task::SiginfoImage;
use serde::{Deserialize, Serialize};

macro_rules! regs_image {
    ($($field:ident),* $(,)?) => {
        /// Every field of `struct user_regs_struct` (x86-64), fs_base/gs_base included.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct RegsImage {
            $(pub $field: u64,)*
        }

        impl From<&libc::user_regs_struct> for RegsImage {
            fn from(r: &libc::user_regs_struct) -> Self {
                RegsImage { $($field: r.$field,)* }
            }
        }

        impl From<&RegsImage> for libc::user_regs_struct {
            fn from(g: &RegsImage) -> Self {
                libc::user_regs_struct { $($field: g.$field,)* }
            }
        }
    };
}

regs_image!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
);

/// `stack_t` of sigaltstack(2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

impl AltStack {
    /// The kernel layout: `{ void *ss_sp; int ss_flags; size_t ss_size; }` (24 bytes).
    pub fn to_kernel(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[0..8].copy_from_slice(&self.sp.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[16..24].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    pub fn from_kernel(raw: &[u8]) -> AltStack {
        let u = |r: std::ops::Range<usize>| {
            raw.get(r).map(|b| {
                let mut a = [0u8; 8];
                a[..b.len()].copy_from_slice(b);
                u64::from_le_bytes(a)
            })
        };
        AltStack {
            sp: u(0..8).unwrap_or(0),
            flags: u(8..12).unwrap_or(0) as u32 as i32,
            size: u(16..24).unwrap_or(0),
        }
    }

    /// SS_DISABLE set: no alternate stack.
    pub fn is_disabled(&self) -> bool {
        self.flags & libc::SS_DISABLE != 0
    }
}

/// A thread's rseq registration (restored with rseq(2) inside the thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RseqImage {
    pub ptr: u64,
    pub len: u32,
    pub sig: u32,
}

/// One thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThreadImage {
    /// Thread id in the process's own pid namespace (the leader's equals the pid).
    pub tid: i32,
    pub comm: String,
    /// General registers with CRIU's restart fix-up already applied
    /// ([`crate::remote::restart_fixup`]): resuming them re-executes an interrupted restartable
    /// syscall, or returns EINTR from one that cannot restart in a new task.
    pub regs: RegsImage,
    /// Stopped inside a syscall (`orig_rax` >= 0 at the freeze), and its number.
    pub in_syscall: Option<i64>,
    /// The raw XSAVE area (NT_X86_XSTATE), as PTRACE_GETREGSET returned it.
    #[serde(with = "super::bytes")]
    pub xstate: Vec<u8>,
    /// Blocked signals (bit n-1 = signal n).
    pub blocked: u64,
    /// Signals queued for this thread only (PTRACE_PEEKSIGINFO), the signal it had dequeued when
    /// it was frozen (a parked signal-delivery-stop) first.
    pub pending: Vec<SiginfoImage>,
    pub altstack: AltStack,
    pub rseq: Option<RseqImage>,
    /// get_robust_list: head pointer and length (0, 0 when none).
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// set_tid_address / CLONE_CHILD_CLEARTID (prctl PR_GET_TID_ADDRESS).
    pub clear_child_tid: u64,
}
