//! Process-wide state of a frozen process: identity, credentials, signals, timers, limits.
//!
//! Everything here is per *process* (shared by all its threads) and is restored either by the
//! stub itself before it stops (cwd, umask, session, credentials: see
//! [`crate::restore::stub_protocol`]) or by remote syscalls in the rebuilt process (sigactions,
//! itimers, personality, prctl bits) or from outside (rlimits, with prlimit).
use serde::{Deserialize, Serialize};

/// What identifies a file on the destination: the path to reopen and what it must still be.
///
/// Restore refuses a file whose size or mtime differ ([`crate::restore::RestoreError::FileChanged`]);
/// dev and inode are recorded for same-host checks and diagnostics (they differ across hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileIdentity {
    pub path: String,
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

impl FileIdentity {
    /// The identity of an open file (or anything `stat` can name, e.g. /proc/PID/map_files/…).
    pub fn of(path: &str, stat_target: &std::path::Path) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(stat_target)?;
        Ok(FileIdentity {
            path: path.to_owned(),
            dev: m.dev(),
            inode: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        })
    }

    /// Whether `other` (the file found on the destination) is the same content as far as size
    /// and mtime tell.
    pub fn same_content(&self, other: &FileIdentity) -> bool {
        self.size == other.size && self.mtime_ns == other.mtime_ns
    }
}

/// Real, effective, saved and filesystem ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdSet {
    pub real: u32,
    pub effective: u32,
    pub saved: u32,
    pub fs: u32,
}

/// Credentials (from /proc/PID/status).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Creds {
    pub uid: IdSet,
    pub gid: IdSet,
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
}

/// One resource limit as prlimit(2) reports it (`u64::MAX` = RLIM_INFINITY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RlimitImage {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The kernel's `struct sigaction` for rt_sigaction on x86-64 (not glibc's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SigactionImage {
    pub signal: i32,
    /// SIG_DFL (0), SIG_IGN (1) or the handler's address.
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl SigactionImage {
    /// Size of the kernel struct (handler, flags, restorer, mask).
    pub const KERNEL_SIZE: usize = 32;

    pub fn to_kernel(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn from_kernel(signal: i32, raw: &[u8]) -> SigactionImage {
        let w = |i: usize| {
            raw.get(i * 8..i * 8 + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .unwrap_or(0)
        };
        SigactionImage {
            signal,
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        }
    }
}

/// One queued signal: its number and the raw 128-byte `siginfo_t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiginfoImage {
    pub signal: i32,
    #[serde(with = "super::bytes")]
    pub raw: Vec<u8>,
}

/// `struct itimerval` in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItimerImage {
    pub interval_us: u64,
    pub value_us: u64,
}

impl ItimerImage {
    pub fn is_armed(&self) -> bool {
        self.value_us != 0
    }

    /// What to arm on the destination, if anything.
    ///
    /// A periodic timer can read as disarmed (value 0, interval ≠ 0) in a frozen process: it
    /// expired while the process was stopped, its signal is pending, and the kernel forwards
    /// ITIMER_REAL to the next period only when that signal is dequeued. setitimer with value 0
    /// would disarm it for good, so it is armed for its next period instead (the pending signal
    /// travels with the image).
    pub fn to_restore(&self) -> Option<ItimerImage> {
        match (self.value_us, self.interval_us) {
            (0, 0) => None,
            (0, interval) => Some(ItimerImage { interval_us: interval, value_us: interval }),
            _ => Some(*self),
        }
    }

    /// The kernel's `struct itimerval` (4 × i64: interval sec/usec, value sec/usec).
    pub fn to_kernel(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let vals = [
            self.interval_us / 1_000_000,
            self.interval_us % 1_000_000,
            self.value_us / 1_000_000,
            self.value_us % 1_000_000,
        ];
        for (i, v) in vals.into_iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn from_kernel(raw: &[u8]) -> ItimerImage {
        let w = |i: usize| {
            raw.get(i * 8..i * 8 + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .unwrap_or(0)
        };
        ItimerImage {
            interval_us: w(0) * 1_000_000 + w(1),
            value_us: w(2) * 1_000_000 + w(3),
        }
    }
}

/// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Itimers {
    pub real: ItimerImage,
    pub virt: ItimerImage,
    pub prof: ItimerImage,
}

/// Process-wide state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskImage {
    pub comm: String,
    /// /proc/PID/exe; the destination reopens it for PR_SET_MM_MAP's exe_fd.
    pub exe: Option<FileIdentity>,
    pub cmdline: Vec<String>,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub creds: Creds,
    pub rlimits: Vec<RlimitImage>,
    /// Signals 1..=64 except SIGKILL and SIGSTOP, ascending.
    pub sigactions: Vec<SigactionImage>,
    /// Signals pending for the whole process (PTRACE_PEEKSIGINFO_SHARED).
    pub shared_pending: Vec<SiginfoImage>,
    pub itimers: Itimers,
    /// Session and process group ids in the process's own pid namespace.
    pub sid: i32,
    pub pgid: i32,
    pub personality: u32,
    pub no_new_privs: bool,
    /// prctl(PR_GET_DUMPABLE).
    pub dumpable: i32,
    /// prctl(PR_GET_PDEATHSIG) (0: none).
    pub pdeathsig: i32,
    /// prctl(PR_GET_CHILD_SUBREAPER).
    pub child_subreaper: bool,
}

#[cfg(test)]
mod tests {
    use super::ItimerImage;

    #[test]
    fn itimer_expired_while_frozen_is_rearmed_for_its_next_period() {
        let disarmed = ItimerImage { interval_us: 0, value_us: 0 };
        assert_eq!(disarmed.to_restore(), None);
        let one_shot = ItimerImage { interval_us: 0, value_us: 500 };
        assert_eq!(one_shot.to_restore(), Some(one_shot));
        let running = ItimerImage { interval_us: 10_000, value_us: 2_500 };
        assert_eq!(running.to_restore(), Some(running));
        // Expired during the freeze: value reads 0, the interval is still set.
        let expired = ItimerImage { interval_us: 10_000, value_us: 0 };
        assert_eq!(expired.to_restore(), Some(ItimerImage { interval_us: 10_000, value_us: 10_000 }));
    }

    #[test]
    fn itimerval_round_trips_through_the_kernel_layout() {
        let t = ItimerImage { interval_us: 1_250_000, value_us: 3_000_001 };
        assert_eq!(ItimerImage::from_kernel(&t.to_kernel()), t);
    }
}
