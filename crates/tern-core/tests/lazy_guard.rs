//! The guard of a lazy restore (restore/guard.rs): if the process holding the lazy memory's
//! userfaultfd (the agent) dies while pages are pending, the restored process is killed — it
//! never runs on zero pages — and when memory comes home normally the guard goes away without a
//! trace. Real processes: test/workloads memcheck (it verifies every page it reads), restored
//! lazily by a copy of this very test binary acting as the agent, which the test then SIGKILLs.
mod support;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tern_core::restore::LazyState;

use support::{migrate_held, num, read_status, OwnedProc};

/// Set (to memcheck's status file) in the copy of this binary that acts as the agent.
const AGENT_ENV: &str = "TERN_GUARD_TEST_AGENT_STATUS";
/// The agent's line on stdout with the restored process.
const AGENT_LINE: &str = "tern-guard-test restored";

/// The tests look at this process's children (guards reparented here, see
/// [`become_subreaper`]): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A memcheck of `mib` MiB writing its status to `status`, running.
fn memcheck_at(status: &Path, mib: u32) -> OwnedProc {
    let mut cmd = Command::new(support::memcheck_bin());
    cmd.arg("--status").arg(status).args(["--mib", &mib.to_string()]);
    let ready = |s: &support::Status| num(s, "tick") >= 20 && s.get("phase").is_some_and(|p| p == "running");
    support::start_with_status(&mut cmd, status, ready, "memcheck to start", Duration::from_secs(60)).0
}

fn status_file(name: &str) -> PathBuf {
    support::scratch_dir("lazy-guard").join(format!("{name}.status"))
}

/// `(pid, ppid, state, comm)` of every process.
fn processes() -> Vec<(i32, i32, char, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, state, comm));
    }
    out
}

/// Guard processes (live or zombie) whose parent is `parent`: `(pid, state)`.
fn guards_of(parent: i32) -> Vec<(i32, char)> {
    processes().into_iter().filter(|p| p.1 == parent && p.3 == "tern-guard").map(|p| (p.0, p.2)).collect()
}

/// Orphans among our descendants (the agent's restored process and guard, once we killed it)
/// become our children, so that this test can reap them.
fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
}

fn pidfd_open(pid: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes two integers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(fd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Whether the process of `pidfd` exits within `timeout`.
fn exits_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one live pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) == 1 }
}

/// Reaps our child `pid` (which has exited or is about to): its wait status.
fn reap(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid by the pid of a child of this test, into a local.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid({pid}): {}", std::io::Error::last_os_error());
    status
}

/// What the agent test started, killed and reaped on every path (also when an assertion fails):
/// the agent first, so that what it started becomes ours (see [`become_subreaper`]), then the
/// restored process, then the guard (which exits once the process has).
#[derive(Default)]
struct Started {
    agent: Option<i32>,
    restored: Option<i32>,
    guard: Option<i32>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for pid in [self.agent.take(), self.restored.take()].into_iter().flatten() {
            // SAFETY: kill/waitpid by the pid of a process this test started (the agent) or
            // that the agent started and that is ours since the agent is gone.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        if let Some(guard) = self.guard.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            // SAFETY: waitpid by the pid of the agent's guard, ours since the agent is gone.
            while unsafe { libc::waitpid(guard, std::ptr::null_mut(), libc::WNOHANG) } == 0 {
                if Instant::now() > deadline {
                    // SAFETY: as above; the process it guarded is dead, nothing left to guard.
                    unsafe {
                        libc::kill(guard, libc::SIGKILL);
                        libc::waitpid(guard, std::ptr::null_mut(), 0);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The agent's part (in the copy of this binary): restore a memcheck lazily with the background
/// fill held, say which pid it has and how much is pending, then wait to be killed.
fn act_as_agent(status: &Path) -> ! {
    let proc = memcheck_at(status, 128);
    let (restored, handle) = migrate_held(proc.pid);
    std::mem::forget(proc); // killed by the guard, or by the test
    let handle = handle.expect("a lazy handle");
    let pending = handle.stats().pending_pages;
    println!("{AGENT_LINE} pid={} pending={pending}", restored.pid);
    std::mem::forget(handle);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The agent (a copy of this test binary) restores a memcheck lazily and is SIGKILLed while
/// pages are still pending: its guard kills the restored process within moments, and memcheck,
/// which verifies every page it reads, never saw a wrong one.
#[test]
fn agent_death_kills_the_restored_process() {
    if let Some(status) = std::env::var_os(AGENT_ENV) {
        act_as_agent(Path::new(&status));
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    become_subreaper();
    let status = status_file("agent");
    let mut started = Started::default();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "agent_death_kills_the_restored_process", "--nocapture"])
        .env(AGENT_ENV, &status)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the agent");
    let agent = child.id() as i32;
    started.agent = Some(agent);
    let stdout = child.stdout.take().unwrap();
    std::mem::forget(child); // reaped here, by pid
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(AGENT_LINE) {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).expect("the agent's restore");
    let field = |key: &str| -> i64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    let restored = field("pid") as i32;
    started.restored = Some(restored);
    let pending = field("pending");
    let pidfd = pidfd_open(restored);
    let guards = guards_of(agent);
    started.guard = guards.first().map(|g| g.0);
    eprintln!("agent {agent} restored {restored} with {pending} pages pending, guard {guards:?}");
    assert!(pending > 0, "the agent's restore homed everything already");
    assert_eq!(guards.len(), 1, "one guard, the agent's child: {guards:?}");
    let guard = guards[0].0;

    // SAFETY: SIGKILL by pid to the agent this test started (not reaped yet: the pid is it).
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let killed_at = Instant::now();
    reap(agent);
    started.agent = None;
    let gone = exits_within(&pidfd, Duration::from_secs(2));
    let after = killed_at.elapsed();
    let s = read_status(&status);
    assert!(gone, "the restored process {restored} still runs {after:?} after its agent died: {s:?}");
    eprintln!("restored process gone {:.1} ms after the agent was killed; memcheck: {s:?}", after.as_secs_f64() * 1e3);
    let wait_status = reap(restored);
    started.restored = None;
    assert!(
        libc::WIFSIGNALED(wait_status) && libc::WTERMSIG(wait_status) == libc::SIGKILL,
        "the restored process ended with wait status {wait_status:#x}, not SIGKILL"
    );
    assert_eq!(num(&s, "errors"), 0, "memcheck saw wrong memory: {s:?}");
    // The guard (ours now) said it killed the process, and is gone.
    let guard_status = reap(guard);
    started.guard = None;
    assert!(
        libc::WIFEXITED(guard_status) && libc::WEXITSTATUS(guard_status) == 1,
        "guard wait status {guard_status:#x} (exit 1: it killed the process)"
    );
    assert!(guards_of(std::process::id() as i32).is_empty());
}

/// A lazy restore that homes completely: the guard is released and reaped (no process, no
/// zombie left), and the restored process runs on.
#[test]
fn homing_releases_the_guard() {
    if std::env::var_os(AGENT_ENV).is_some() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id() as i32;
    let status = status_file("home");
    let proc = memcheck_at(&status, 64);
    let (restored, handle) = migrate_held(proc.pid);
    let handle = handle.expect("a lazy handle");
    let t = restored.timings;
    eprintln!(
        "lazy restore: registration step (guard armed + ranges registered + thread) {:.2} ms, total {:.2} ms",
        t.lazy_start_ns as f64 / 1e6,
        t.total_ns as f64 / 1e6
    );
    let guards = guards_of(me);
    assert_eq!(guards.len(), 1, "one guard while memory is lazy: {guards:?}");
    assert_ne!(guards[0].1, 'Z', "{guards:?}");
    handle.release_background();
    let stats = handle.wait(Duration::from_secs(60)).expect("homing");
    assert_eq!(stats.state, LazyState::Homed, "{stats:?}");
    // Released and reaped before Homed was reported.
    assert!(guards_of(me).is_empty(), "a guard left behind: {:?}", guards_of(me));
    assert!(
        processes().iter().all(|p| p.3 != "tern-guard" || p.0 != guards[0].0),
        "guard {} still exists",
        guards[0].0
    );
    let s = read_status(&status);
    support::wait_for_status(
        &status,
        |x| num(x, "sweeps") > num(&s, "sweeps") + 1,
        "two more sweeps after homing",
        Duration::from_secs(60),
    );
    drop(proc);
}
