//! Everything the kernel tells about a process through /proc, read without touching the process.
//!
//! Files read, all under /proc/PID unless noted:
//! - `stat`, `status`, `auxv`, `limits`, `cmdline`          → [`stat`], [`status`], [`limits`]
//! - `task/` (tids), `task/TID/stat` (comm, state), `task/TID/children` → [`tasks`]
//! - `maps`                                                 → [`maps`]
//! - `fd/` (readlink + stat), `fdinfo/N`                    → [`fd`]
//! - `net/{tcp,tcp6,udp,udp6,unix,netlink}` (the target's network namespace, not ours) → [`net`]
//! - `ns/*` compared with `/proc/self/ns/*`                 → [`ns`]
//! - `cwd`, `root`, `exe` (readlink)
//!
//! Sequence of [`inspect`]: `stat` first (its start time identifies this incarnation of the pid),
//! then everything else, then `stat` again. The process keeps running while we read, so the
//! result is a snapshot taken over a few milliseconds, not an atomic one: an fd or a thread that
//! disappears between the directory listing and its own files is skipped, not an error. If the
//! process itself vanishes (ENOENT/ESRCH on a file, or a different start time at the end, i.e.
//! the pid was reused) the whole inspection is [`InspectError::Gone`].
//!
//! Caveats:
//! - Reading /proc is harmless: nothing here stops, signals or attaches to the process.
//! - Parsers are pure functions over `&str` (unit-tested with fixtures captured on the development
//!   machine); readers are thin wrappers that name the file in their error.
//! - u64 addresses, signal masks and capability sets serialize as `"0x…"` strings, because the JSON
//!   is read by JavaScript whose numbers lose precision above 2^53 (vsyscall lives at
//!   0xffffffffff600000). Sizes and counts stay numbers.

pub mod fd;
pub mod limits;
pub mod maps;
pub mod net;
pub mod ns;
pub mod stat;
pub mod status;
pub mod tasks;

use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub use fd::{Fd, FdKind};
pub use limits::Rlimit;
pub use maps::{Vma, VmaKind};
pub use ns::Namespaces;
pub use stat::{MmFields, Stat, TaskState};
pub use status::Status;
pub use tasks::Thread;

/// A line of a /proc file that does not have the shape the kernel documents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number within the file (0 when the file as a whole is wrong).
    pub line: usize,
    pub reason: String,
}

impl ParseError {
    pub(crate) fn new(line: usize, reason: impl Into<String>) -> ParseError {
        ParseError {
            line,
            reason: reason.into(),
        }
    }
}

/// `/proc/PID/NAME`.
pub(crate) fn proc_path(pid: Pid, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

/// True for the errors a read gets when the process (or thread, or fd) it names has gone away.
pub fn is_gone_error(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

/// Reads a symlink under /proc as a lossy UTF-8 string (paths are shown to humans and to JSON).
pub(crate) fn read_link_string(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_link(path)?.to_string_lossy().into_owned())
}

/// Serde helpers writing a u64 as a `"0x…"` string (see the module header for why).
pub mod hex_u64 {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value:#x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum HexOrNumber {
            Text(String),
            Number(u64),
        }
        match HexOrNumber::deserialize(deserializer)? {
            HexOrNumber::Number(n) => Ok(n),
            HexOrNumber::Text(text) => {
                let digits = text.strip_prefix("0x").unwrap_or(&text);
                u64::from_str_radix(digits, 16).map_err(de::Error::custom)
            }
        }
    }
}

/// Everything [`inspect`] learned about one process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessInventory {
    pub pid: Pid,
    /// The pid as the process's innermost pid namespace sees it (last NSpid value).
    pub ns_pid: i32,
    pub comm: String,
    /// None for kernel threads and zombies, which have no executable.
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub state: TaskState,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// `tty_nr` from stat: 0 when the process has no controlling terminal.
    pub tty_nr: i32,
    /// `flags` from stat (PF_* bits, e.g. PF_KTHREAD).
    pub flags: u32,
    /// Clock ticks since boot at which the process started: with the pid, it names this
    /// incarnation of the process (a pid can be reused, a (pid, start time) pair cannot).
    pub start_time: u64,
    pub threads: Vec<Thread>,
    pub vmas: Vec<Vma>,
    pub mm: MmFields,
    pub status: Status,
    pub fds: Vec<Fd>,
    pub rlimits: Vec<Rlimit>,
    pub cwd: Option<String>,
    pub root: Option<String>,
    pub namespaces: Namespaces,
    /// Direct children of every thread of the process.
    pub children: Vec<Pid>,
}

/// Failure of [`inspect`].
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("process {0} is gone (exited, or its pid was reused, while it was being inspected)")]
    Gone(Pid),
    #[error(transparent)]
    Stat(#[from] stat::StatError),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error(transparent)]
    Tasks(#[from] tasks::TasksError),
    #[error(transparent)]
    Maps(#[from] maps::MapsError),
    #[error(transparent)]
    Fds(#[from] fd::FdError),
    #[error(transparent)]
    Limits(#[from] limits::LimitsError),
    #[error(transparent)]
    Namespaces(#[from] ns::NsError),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// Reads everything /proc tells about `pid`. Read-only: the process is never stopped or signalled.
pub fn inspect(pid: Pid) -> Result<ProcessInventory, InspectError> {
    let gone_or = |error: InspectError| -> InspectError {
        if error_means_gone(&error) || !Path::new(&format!("/proc/{pid}")).exists() {
            InspectError::Gone(pid)
        } else {
            error
        }
    };
    let first = stat::read_stat(pid).map_err(|e| gone_or(e.into()))?;
    let inventory = gather(pid, first).map_err(gone_or)?;
    // Same pid, different start time: the process we started reading exited and the pid was
    // handed to someone else in the meantime; what we gathered mixes two processes.
    let last = stat::read_stat(pid).map_err(|e| gone_or(e.into()))?;
    if last.start_time != inventory.start_time {
        return Err(InspectError::Gone(pid));
    }
    Ok(inventory)
}

fn error_means_gone(error: &InspectError) -> bool {
    let io_error = match error {
        InspectError::Gone(_) => return true,
        InspectError::Stat(stat::StatError::Read { source, .. })
        | InspectError::Status(status::StatusError::Read { source, .. })
        | InspectError::Tasks(tasks::TasksError::Read { source, .. })
        | InspectError::Maps(maps::MapsError::Read { source, .. })
        | InspectError::Fds(fd::FdError::Read { source, .. })
        | InspectError::Limits(limits::LimitsError::Read { source, .. })
        | InspectError::Namespaces(ns::NsError::Read { source, .. })
        | InspectError::Read { source, .. } => source,
        _ => return false,
    };
    is_gone_error(io_error)
}

/// Reads a readlink-able file that legitimately has no target for some processes (a zombie has
/// no exe, cwd or root): ENOENT gives None, the process being gone is caught by [`inspect`].
fn read_optional_link(pid: Pid, name: &str) -> Result<Option<String>, InspectError> {
    let path = proc_path(pid, name);
    match read_link_string(&path) {
        Ok(target) => Ok(Some(target)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(InspectError::Read { path, source }),
    }
}

/// Splits /proc/PID/cmdline (NUL-terminated arguments) into its arguments.
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let trimmed = raw.strip_suffix(&[0]).unwrap_or(raw);
    if trimmed.is_empty() {
        return Vec::new();
    }
    trimmed
        .split(|b| *b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

fn gather(pid: Pid, stat: Stat) -> Result<ProcessInventory, InspectError> {
    let status = status::read_status(pid)?;
    let threads = tasks::read_threads(pid)?;
    let vmas = maps::read_maps(pid)?;
    // A zombie has released its mm: its auxv read fails with ESRCH though it is still there.
    let auxv = match stat.state {
        TaskState::Zombie | TaskState::Dead => Vec::new(),
        _ => stat::read_auxv(pid)?,
    };
    let fds = fd::read_fds(pid)?;
    let rlimits = limits::read_limits(pid)?;
    let namespaces = ns::read_namespaces(pid)?;
    let children = tasks::read_children(pid)?;
    let cmdline_path = proc_path(pid, "cmdline");
    let cmdline = std::fs::read(&cmdline_path)
        .map(|raw| parse_cmdline(&raw))
        .map_err(|source| InspectError::Read {
            path: cmdline_path,
            source,
        })?;
    let ns_pid = status.ns_pid.last().copied().unwrap_or(pid.as_raw());
    Ok(ProcessInventory {
        pid,
        ns_pid,
        comm: stat.comm,
        exe: read_optional_link(pid, "exe")?,
        cmdline,
        state: stat.state,
        ppid: stat.ppid,
        pgrp: stat.pgrp,
        session: stat.session,
        tty_nr: stat.tty_nr,
        flags: stat.flags,
        start_time: stat.start_time,
        threads,
        vmas,
        mm: MmFields { auxv, ..stat.mm },
        status,
        fds,
        rlimits,
        cwd: read_optional_link(pid, "cwd")?,
        root: read_optional_link(pid, "root")?,
        namespaces,
        children,
    })
}

/// VMAs of one kind: how many and how many bytes of address space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmaKindSummary {
    pub kind: VmaKind,
    pub count: usize,
    pub bytes: u64,
}

/// Fds of one kind (the `kind` string of [`FdKind`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FdKindSummary {
    pub kind: String,
    pub count: usize,
}

/// A short account of an inventory, for humans and dashboards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventorySummary {
    pub threads: usize,
    /// Sorted by kind name.
    pub vma_kinds: Vec<VmaKindSummary>,
    /// Sorted by kind name.
    pub fd_kinds: Vec<FdKindSummary>,
}

impl ProcessInventory {
    /// VMAs grouped by kind (count + bytes) and fds grouped by kind (count).
    pub fn summary(&self) -> InventorySummary {
        let mut vma_kinds: BTreeMap<&'static str, VmaKindSummary> = BTreeMap::new();
        for vma in &self.vmas {
            let entry = vma_kinds.entry(vma.kind.name()).or_insert(VmaKindSummary {
                kind: vma.kind,
                count: 0,
                bytes: 0,
            });
            entry.count += 1;
            entry.bytes += vma.len();
        }
        let mut fd_kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
        for fd in &self.fds {
            *fd_kinds.entry(fd.kind.name()).or_default() += 1;
        }
        InventorySummary {
            threads: self.threads.len(),
            vma_kinds: vma_kinds.into_values().collect(),
            fd_kinds: fd_kinds
                .into_iter()
                .map(|(kind, count)| FdKindSummary {
                    kind: kind.to_owned(),
                    count,
                })
                .collect(),
        }
    }

    /// Resident set size in bytes (VmRSS), 0 for a process without an mm.
    pub fn resident_bytes(&self) -> u64 {
        self.status.memory.vm_rss.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_splits_on_nul() {
        assert_eq!(parse_cmdline(b"sleep\x00100\x00"), vec!["sleep", "100"]);
        assert_eq!(parse_cmdline(b"a b\x00\x00c\x00"), vec!["a b", "", "c"]);
        assert!(parse_cmdline(b"").is_empty());
        // A process that rewrote its argv may drop the final NUL.
        assert_eq!(parse_cmdline(b"nginx: worker"), vec!["nginx: worker"]);
    }

    #[test]
    fn hex_round_trip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Wrapper {
            #[serde(with = "hex_u64")]
            value: u64,
        }
        let json = serde_json::to_string(&Wrapper {
            value: 0xffff_ffff_ff60_0000,
        })
        .unwrap();
        assert_eq!(json, r#"{"value":"0xffffffffff600000"}"#);
        assert_eq!(
            serde_json::from_str::<Wrapper>(&json).unwrap(),
            Wrapper {
                value: 0xffff_ffff_ff60_0000
            }
        );
        assert_eq!(
            serde_json::from_str::<Wrapper>(r#"{"value":42}"#)
                .unwrap()
                .value,
            42
        );
    }

    #[test]
    fn inspect_self_is_complete() {
        let inventory = inspect(Pid::this()).expect("inspecting ourselves");
        assert_eq!(inventory.pid, Pid::this());
        assert!(!inventory.threads.is_empty());
        assert!(inventory.vmas.iter().any(|v| v.kind == VmaKind::Stack));
        assert!(inventory.vmas.iter().any(|v| v.kind == VmaKind::Vdso));
        assert!(inventory
            .mm
            .auxv
            .iter()
            .any(|entry| entry.key == libc::AT_PAGESZ));
        assert!(inventory.exe.is_some());
        assert!(inventory
            .namespaces
            .net
            .as_ref()
            .is_some_and(|ns| ns.same_as_engine));
        let summary = inventory.summary();
        assert_eq!(summary.threads, inventory.threads.len());
        assert_eq!(
            summary.vma_kinds.iter().map(|k| k.count).sum::<usize>(),
            inventory.vmas.len()
        );
        assert!(inventory.resident_bytes() > 0);
        // The inventory must survive the JSON round trip TypeScript puts it through.
        let json = serde_json::to_string(&inventory).unwrap();
        let back: ProcessInventory = serde_json::from_str(&json).unwrap();
        assert_eq!(back.vmas.len(), inventory.vmas.len());
        assert_eq!(back.fds.len(), inventory.fds.len());
    }

    #[test]
    fn inspect_missing_pid_is_gone() {
        let pid = Pid::from_raw(i32::MAX - 7);
        assert!(matches!(inspect(pid), Err(InspectError::Gone(p)) if p == pid));
    }
}
