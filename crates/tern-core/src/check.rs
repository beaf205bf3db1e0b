//! Movability: the bad-input gate on a target pid, and the verdict `migrate check` prints.
//!
//! Two steps, both read-only:
//! 1. [`validate_target`] runs BEFORE anything else touches the pid. It refuses what must never be
//!    frozen or inspected as a migration target: non-pids, our own process and its ancestors
//!    (freezing one would freeze the engine), kernel threads, zombies, a pid namespace's init,
//!    and any attempt when the engine lacks the privileges (root + CAP_SYS_PTRACE).
//! 2. [`check`] turns a [`ProcessInventory`] into a [`CheckReport`]: every reason the process
//!    cannot be moved (a [`Blocker`] with a stable machine `kind`), and warnings that do not stop
//!    a migration but change what the destination sees.
//!
//! The supported set follows DESIGN.md: regular files (deleted ones included), directories,
//! pipes, FIFOs, eventfd, epoll, signalfd, timerfd, memfd, unix stream/dgram/seqpacket sockets,
//! UDP sockets, TCP sockets in the states TCP repair restores (listen with an empty accept
//! queue, established and the half-closed ones), /dev/null, /dev/zero, /dev/full, /dev/random,
//! /dev/urandom. Everything else is a blocker, because a process restored without some of its
//! kernel state would run on wrong.
//! Blockers are listed in a fixed order: process-level rules first, then fds by number, then
//! VMAs by address.

use crate::proc::fd::{FdKind, SocketKind};
use crate::proc::maps::VmaKind;
use crate::proc::net::{SocketState, UnixState, UnixType};
use crate::proc::ns::INIT_USER_NS_INODE;
use crate::proc::stat::{read_stat, StatError, TaskState, PF_KTHREAD};
use crate::proc::status::{read_status, SeccompMode, StatusError};
use crate::proc::{is_gone_error, InventorySummary, ProcessInventory};
use crate::sys::Pid;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// CAP_SYS_PTRACE bit number (include/uapi/linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;

/// Why a pid is refused as a migration target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0} is not a valid pid (pids are 1..=2147483647)")]
    InvalidPid(i64),
    #[error("refusing pid {pid}: the engine must run as root, it runs with effective uid {euid}")]
    NotRoot { pid: Pid, euid: u32 },
    #[error("refusing pid {pid}: the engine lacks CAP_SYS_PTRACE in its effective capabilities")]
    NoPtraceCapability { pid: Pid },
    #[error("no process with pid {0}")]
    NoSuchProcess(Pid),
    #[error("pid {0} is the engine's own process")]
    OwnProcess(Pid),
    #[error("pid {tid} is a thread of process {tgid}, not a process: pass {tgid}")]
    NotAProcess { tid: Pid, tgid: i32 },
    #[error("pid {0} is a kernel thread")]
    KernelThread(Pid),
    #[error("pid {0} is a zombie (it exited and its parent has not reaped it)")]
    Zombie(Pid),
    #[error("pid {0} is an ancestor of the engine: freezing it would freeze the engine itself")]
    Ancestor(Pid),
    #[error(
        "pid {0} is the init (pid 1) of its pid namespace: moving it would kill the namespace"
    )]
    PidNamespaceInit(Pid),
    #[error("checking pid {pid}: {source}")]
    Stat { pid: Pid, source: StatError },
    #[error("checking pid {pid}: {source}")]
    Status { pid: Pid, source: StatusError },
}

/// The privilege rule: root, and CAP_SYS_PTRACE effective (root in a user namespace, or with a
/// dropped capability set, is not enough to seize another process).
pub fn check_privileges(pid: Pid, euid: u32, cap_eff: u64) -> Result<(), TargetError> {
    if euid != 0 {
        return Err(TargetError::NotRoot { pid, euid });
    }
    if cap_eff & (1 << CAP_SYS_PTRACE) == 0 {
        return Err(TargetError::NoPtraceCapability { pid });
    }
    Ok(())
}

fn stat_or_gone(pid: Pid) -> Result<crate::proc::Stat, TargetError> {
    read_stat(pid).map_err(|error| match &error {
        StatError::Read { source, .. } if is_gone_error(source) => TargetError::NoSuchProcess(pid),
        _ => TargetError::Stat { pid, source: error },
    })
}

/// True when `pid` is on the engine's chain of parents (up to the root of our pid namespace).
fn is_engine_ancestor(pid: Pid) -> bool {
    // SAFETY: getppid has no arguments and cannot fail.
    let mut current = unsafe { libc::getppid() };
    // A chain longer than this is a cycle we read mid-reparenting; stop rather than loop.
    for _ in 0..4096 {
        if current <= 0 {
            return false;
        }
        if current == pid.as_raw() {
            return true;
        }
        // The top of the chain: init's parent is 0, so there is nothing above it to read (and
        // /proc/1 is not ours to look at).
        if current == 1 {
            return false;
        }
        match read_stat(Pid::from_raw(current)) {
            Ok(stat) => current = stat.ppid,
            Err(_) => return false,
        }
    }
    false
}

/// The bad-input gate: a pid the engine may inspect, freeze and move, or why not. Read-only.
pub fn validate_target(pid_raw: i64) -> Result<Pid, TargetError> {
    let pid = i32::try_from(pid_raw)
        .ok()
        .and_then(Pid::new)
        .ok_or(TargetError::InvalidPid(pid_raw))?;
    let own_status = read_status(Pid::this()).map_err(|source| TargetError::Status {
        pid: Pid::this(),
        source,
    })?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    check_privileges(pid, euid, own_status.cap_eff)?;
    if pid == Pid::this() {
        return Err(TargetError::OwnProcess(pid));
    }
    // Decided from our own ancestry alone, before reading anything of the target.
    if is_engine_ancestor(pid) {
        return Err(TargetError::Ancestor(pid));
    }
    // stat alone settles kernel threads and zombies: nothing else of theirs is read.
    let stat = stat_or_gone(pid)?;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(TargetError::KernelThread(pid));
    }
    if matches!(stat.state, TaskState::Zombie | TaskState::Dead) {
        return Err(TargetError::Zombie(pid));
    }
    let status = read_status(pid).map_err(|error| match &error {
        StatusError::Read { source, .. } if is_gone_error(source) => {
            TargetError::NoSuchProcess(pid)
        }
        _ => TargetError::Status { pid, source: error },
    })?;
    // /proc/TID exists (unlisted) for every thread: a tid is not a process.
    if status.tgid != pid.as_raw() {
        return Err(TargetError::NotAProcess {
            tid: pid,
            tgid: status.tgid,
        });
    }
    if status.kthread == Some(true) {
        return Err(TargetError::KernelThread(pid));
    }
    // Kernels without PF_KTHREAD in stat or the Kthread line: a task with no mm is one too.
    let maps_empty =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.is_empty());
    if maps_empty && std::fs::read_link(format!("/proc/{pid}/exe")).is_err() {
        return Err(TargetError::KernelThread(pid));
    }
    if status.ns_pid.last() == Some(&1) {
        return Err(TargetError::PidNamespaceInit(pid));
    }
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(TargetError::NoSuchProcess(pid));
    }
    Ok(pid)
}

/// One reason a process cannot be moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocker {
    /// What is blocking: "process", "fd 7", "vma 7f00..-7f00..".
    pub subject: String,
    /// Stable machine code: kernel-thread, zombie, traced, children, user-namespace, terminal,
    /// io-uring, inotify, fanotify, netlink-socket, unsupported-socket, tcp-state, block-device,
    /// unsupported-char-device, unsupported-fd, sysv-shm, unsupported-vma.
    pub kind: String,
    /// A sentence for humans.
    pub reason: String,
}

/// The verdict of `migrate check`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub pid: Pid,
    /// True exactly when there are no blockers.
    pub movable: bool,
    pub blockers: Vec<Blocker>,
    pub warnings: Vec<String>,
    pub summary: InventorySummary,
    /// VmRSS: roughly what pre-copy will have to stream.
    pub resident_bytes: u64,
}

struct Verdict {
    blockers: Vec<Blocker>,
    warnings: Vec<String>,
}

impl Verdict {
    fn block(&mut self, subject: impl Into<String>, kind: &str, reason: impl Into<String>) {
        self.blockers.push(Blocker {
            subject: subject.into(),
            kind: kind.to_owned(),
            reason: reason.into(),
        });
    }
}

/// Device numbers of character devices that carry no state: reopened by path on the destination.
const STATELESS_CHAR_DEVICES: [(u32, u32, &str); 5] = [
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 7, "/dev/full"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

/// Terminals: tty0..63 + serial (4), /dev/tty, console, ptmx (5), pty slaves (136..=143).
fn is_terminal(major: u32) -> bool {
    matches!(major, 4 | 5 | 136..=143)
}

fn check_process(inv: &ProcessInventory, verdict: &mut Verdict) {
    if inv.flags & PF_KTHREAD != 0 {
        verdict.block(
            "process",
            "kernel-thread",
            format!("pid {} is a kernel thread", inv.pid),
        );
    }
    if matches!(inv.state, TaskState::Zombie | TaskState::Dead) {
        verdict.block(
            "process",
            "zombie",
            format!("pid {} has exited and is not yet reaped", inv.pid),
        );
    }
    if inv.status.tracer_pid != 0 {
        verdict.block(
            "process",
            "traced",
            format!(
                "already being traced by pid {}; Tern must be the process's only tracer",
                inv.status.tracer_pid
            ),
        );
    }
    if !inv.children.is_empty() {
        let list: Vec<String> = inv.children.iter().map(Pid::to_string).collect();
        verdict.block(
            "process",
            "children",
            format!(
                "has {} child process(es) ({}); moving process trees is not supported yet",
                inv.children.len(),
                list.join(", ")
            ),
        );
    }
    if let Some(user) = inv.namespaces.user {
        if !user.same_as_engine && user.inode != INIT_USER_NS_INODE {
            verdict.block(
                "process",
                "user-namespace",
                format!("lives in user namespace {} (not the engine's); user namespaces cannot be recreated", user.inode),
            );
        }
    }
    if inv.tty_nr != 0 {
        let (major, minor) = crate::proc::fd::dev_major_minor(u64::from(inv.tty_nr as u32));
        verdict.block(
            "process",
            "terminal",
            format!(
                "has controlling terminal {major}:{minor}; a controlling terminal is not movable"
            ),
        );
    }
    if inv.status.seccomp == SeccompMode::Filter {
        verdict.warnings.push(format!(
            "process: {} seccomp filter(s) installed; they are not migrated yet and will be missing on the destination",
            inv.status.seccomp_filters
        ));
    }
    if inv.state == TaskState::Stopped {
        verdict
            .warnings
            .push("process: stopped by a signal; it will be restored stopped".to_owned());
    }
    for (name, ns) in inv.namespaces.iter() {
        if !ns.same_as_engine && name != "user" {
            verdict.warnings.push(format!(
                "process: {name} namespace {} differs from the engine's; the destination must provide an equivalent one",
                ns.inode
            ));
        }
    }
}

fn check_socket(fd: i32, socket: &SocketKind, verdict: &mut Verdict) {
    let subject = format!("fd {fd}");
    match socket {
        SocketKind::Tcp(tcp) | SocketKind::Tcp6(tcp) => match tcp.state {
            SocketState::SynSent
            | SocketState::SynRecv
            | SocketState::NewSynRecv
            | SocketState::Unknown => verdict.block(
                subject,
                "tcp-state",
                format!(
                    "TCP socket in state {}: TCP repair cannot restore a connection mid-handshake",
                    tcp.state.name()
                ),
            ),
            // ESTABLISHED and the half-closed states (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK,
            // CLOSING) are carried by TCP repair, FINs included (files::tcp).
            SocketState::TimeWait => verdict.block(
                subject,
                "tcp-state",
                "TCP connection in state time-wait: the connection is over and TCP repair does not rebuild TIME_WAIT",
            ),
            // A listener's rx_queue in /proc/net/tcp is its accept queue: connections the kernel
            // accepted that no fd holds yet. They cannot be carried (and the kill would reset
            // them), so the dump refuses such a listener too; this is a snapshot, the queue of
            // a busy server usually drains within microseconds.
            SocketState::Listen if tcp.rx_queue > 0 => verdict.block(
                subject,
                "tcp-state",
                format!(
                    "listening TCP socket with {} connection(s) accepted by the kernel but not yet accept()ed by the process: they cannot be carried",
                    tcp.rx_queue
                ),
            ),
            _ => {}
        },
        SocketKind::Udp(_) | SocketKind::Udp6(_) => {}
        SocketKind::Unix(unix) => {
            if unix.socket_type == UnixType::Unknown {
                verdict.block(
                    subject,
                    "unsupported-socket",
                    "unix socket of an unknown type",
                );
            } else if matches!(unix.state, UnixState::Connected | UnixState::Connecting) {
                verdict.warnings.push(format!(
                    "fd {fd}: connected unix socket; its peer is not checked, and a peer outside this process will see the connection break"
                ));
            }
        }
        SocketKind::Netlink { netlink_protocol } => {
            let protocol =
                netlink_protocol.map_or_else(|| "unbound".to_owned(), |p| format!("protocol {p}"));
            verdict.block(
                subject,
                "netlink-socket",
                format!(
                    "netlink socket ({protocol}): kernel-side subscriptions cannot be checkpointed"
                ),
            )
        }
        SocketKind::Other { name } => verdict.block(
            subject,
            "unsupported-socket",
            format!("{name} socket: Tern moves only TCP, UDP and unix sockets"),
        ),
    }
}

fn check_fds(inv: &ProcessInventory, verdict: &mut Verdict) {
    for fd in &inv.fds {
        let subject = format!("fd {}", fd.fd);
        match &fd.kind {
            FdKind::RegularFile { .. }
            | FdKind::Directory { .. }
            | FdKind::Pipe { .. }
            | FdKind::Fifo { .. }
            | FdKind::Eventfd { .. }
            | FdKind::Epoll { .. }
            | FdKind::Signalfd { .. }
            | FdKind::Timerfd(_)
            | FdKind::Memfd { .. } => {}
            FdKind::Socket { socket, .. } => check_socket(fd.fd, socket, verdict),
            FdKind::IoUring => verdict.block(
                subject,
                "io-uring",
                "io_uring instances hold kernel-side rings and in-flight requests Tern cannot checkpoint",
            ),
            FdKind::Inotify { watches } => verdict.block(
                subject,
                "inotify",
                format!("inotify instance with {} watch(es): watches and queued events cannot be checkpointed", watches.len()),
            ),
            FdKind::Fanotify => {
                verdict.block(subject, "fanotify", "fanotify instance: marks and queued events cannot be checkpointed")
            }
            FdKind::CharDevice { path, major, minor } => {
                if STATELESS_CHAR_DEVICES.iter().any(|(ma, mi, _)| ma == major && mi == minor) {
                    continue;
                }
                if is_terminal(*major) {
                    verdict.block(
                        subject,
                        "terminal",
                        format!("terminal {path} ({major}:{minor}): a controlling terminal is not movable"),
                    );
                } else {
                    verdict.block(
                        subject,
                        "unsupported-char-device",
                        format!("character device {path} ({major}:{minor}) may hold device state Tern cannot move"),
                    );
                }
            }
            FdKind::BlockDevice { path, major, minor } => verdict.block(
                subject,
                "block-device",
                format!("block device {path} ({major}:{minor}) is local to this host"),
            ),
            FdKind::AnonInodeOther { name } => verdict.block(
                subject,
                "unsupported-fd",
                format!("anonymous inode '{name}' (pidfd, userfaultfd, perf_event, bpf, ...) cannot be checkpointed"),
            ),
            FdKind::Unknown => verdict.block(
                subject,
                "unsupported-fd",
                format!("unrecognised file '{}' cannot be checkpointed", fd.link),
            ),
        }
    }
}

fn check_vmas(inv: &ProcessInventory, verdict: &mut Verdict) {
    for vma in &inv.vmas {
        let subject = format!("vma {:x}-{:x}", vma.start, vma.end);
        match vma.kind {
            VmaKind::SysvShm => verdict.block(
                subject,
                "sysv-shm",
                "System V shared memory segment: the segment and its other attachers cannot be moved",
            ),
            VmaKind::Special => verdict.block(
                subject,
                "unsupported-vma",
                format!("kernel mapping {} Tern does not know how to recreate", vma.path.as_deref().unwrap_or("?")),
            ),
            VmaKind::SharedAnon => verdict.warnings.push(format!(
                "{subject}: shared anonymous memory is copied; sharing with any other process is lost"
            )),
            _ => {}
        }
    }
}

/// The verdict on an inventory: movable, or every reason it is not, in a stable order.
pub fn check(inv: &ProcessInventory) -> CheckReport {
    let mut verdict = Verdict {
        blockers: Vec::new(),
        warnings: Vec::new(),
    };
    check_process(inv, &mut verdict);
    check_fds(inv, &mut verdict);
    check_vmas(inv, &mut verdict);
    CheckReport {
        pid: inv.pid,
        movable: verdict.blockers.is_empty(),
        blockers: verdict.blockers,
        warnings: verdict.warnings,
        summary: inv.summary(),
        resident_bytes: inv.resident_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::fd::Fd;
    use crate::proc::inspect;

    #[test]
    fn privileges() {
        let pid = Pid::from_raw(42);
        assert!(check_privileges(pid, 0, 1 << CAP_SYS_PTRACE).is_ok());
        assert!(matches!(
            check_privileges(pid, 1000, u64::MAX),
            Err(TargetError::NotRoot { euid: 1000, .. })
        ));
        let error = check_privileges(pid, 0, !(1 << CAP_SYS_PTRACE)).unwrap_err();
        assert!(error.to_string().contains("CAP_SYS_PTRACE") && error.to_string().contains("42"));
    }

    #[test]
    fn invalid_numbers() {
        for raw in [0, -1, i64::from(i32::MAX) + 1, i64::MIN] {
            assert!(matches!(validate_target(raw), Err(TargetError::InvalidPid(r)) if r == raw));
        }
    }

    #[test]
    fn rules_on_a_synthetic_inventory() {
        let mut inv = inspect(Pid::this()).unwrap();
        inv.fds.clear();
        inv.children.clear();
        inv.tty_nr = 0;
        inv.status.tracer_pid = 0;
        let fd = |n: i32, kind: FdKind| Fd {
            fd: n,
            link: String::new(),
            pos: 0,
            flags: 0,
            mnt_id: 0,
            ino: 0,
            kind,
        };
        inv.fds = vec![
            fd(
                0,
                FdKind::CharDevice {
                    path: "/dev/null".into(),
                    major: 1,
                    minor: 3,
                },
            ),
            fd(
                1,
                FdKind::CharDevice {
                    path: "/dev/pts/0".into(),
                    major: 136,
                    minor: 0,
                },
            ),
            fd(
                2,
                FdKind::CharDevice {
                    path: "/dev/kvm".into(),
                    major: 10,
                    minor: 232,
                },
            ),
            fd(
                3,
                FdKind::AnonInodeOther {
                    name: "pidfd".into(),
                },
            ),
            fd(
                4,
                FdKind::BlockDevice {
                    path: "/dev/vda".into(),
                    major: 254,
                    minor: 0,
                },
            ),
            fd(
                5,
                FdKind::Socket {
                    inode: 1,
                    socket: SocketKind::Other {
                        name: "packet".into(),
                    },
                },
            ),
        ];
        inv.status.tracer_pid = 77;
        let report = check(&inv);
        let kinds: Vec<(&str, &str)> = report
            .blockers
            .iter()
            .map(|b| (b.subject.as_str(), b.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("process", "traced"),
                ("fd 1", "terminal"),
                ("fd 2", "unsupported-char-device"),
                ("fd 3", "unsupported-fd"),
                ("fd 4", "block-device"),
                ("fd 5", "unsupported-socket"),
            ]
        );
        assert!(report.blockers[0].reason.contains("77"));
        assert!(!report.movable);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["blockers"][0]["kind"], "traced");
        assert!(json["summary"]["fdKinds"].is_array());
        assert!(json["residentBytes"].as_u64().unwrap() > 0);
    }
}
