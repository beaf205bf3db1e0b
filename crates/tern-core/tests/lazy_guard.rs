//! The guard of a lazy restore (restore/guard.rs): if the process holding the lazy memory's
//! userfaultfd (the agent) dies while pages are pending, the restored process is killed — it
//! never runs on zero pages — and when memory comes home normally the guard goes away without a
//! trace. Real processes: test/workloads memcheck (it verifies every page it reads), restored
//! lazily by a copy of this very test binary acting as the agent, which the test then SIGKILLs;
//! and tests/lazy/fixture.c forkslow, which forks right after the restore, parent and child
//! then checking their (still lazy) memory page by page: the guard kills the child too, and
//! neither ever reads a wrong page.
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
/// Set (to the fixture's status file) in the copy that acts as the agent of a forking process.
const FORK_AGENT_ENV: &str = "TERN_GUARD_TEST_FORK_AGENT_STATUS";
/// The fixture's executable, for that agent.
const FIXTURE_ENV: &str = "TERN_GUARD_TEST_FIXTURE";
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
/// restored process, then the child it forked (ours once the restored process is gone; killed
/// by its pidfd: the restored process may have reaped it), then the guard (which exits once the
/// process has).
#[derive(Default)]
struct Started {
    agent: Option<i32>,
    restored: Option<i32>,
    child: Option<(i32, OwnedFd)>,
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
        if let Some((pid, pidfd)) = self.child.take() {
            // SAFETY: SIGKILL by our pidfd of the forked child (it names only that process),
            // then waitpid by its pid: ours once its parent (reaped above) is gone, or ECHILD if
            // that parent reaped it first; either way it returns at once.
            unsafe {
                libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0);
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

/// The agent's part for a process that forks (in the copy of this binary): restore the fixture
/// lazily with the background fill held, make it fork (its trigger), wait until parent and child
/// both check their memory, say which pids and how much is pending, then wait to be killed.
fn act_as_fork_agent(status: &Path) -> ! {
    let fixture = std::env::var_os(FIXTURE_ENV).expect("the fixture's path");
    let trigger = status.with_extension("go");
    let _ = std::fs::remove_file(&trigger);
    let child_status = PathBuf::from(format!("{}.child", status.display()));
    let _ = std::fs::remove_file(&child_status);
    let mut cmd = Command::new(fixture);
    cmd.arg(status).arg(&trigger).args(["128", "forkslow"]);
    let (proc, _) = support::start_with_status(
        &mut cmd,
        status,
        |s| s.get("phase").is_some_and(|p| p == "ready"),
        "the fixture to start",
        Duration::from_secs(60),
    );
    let (restored, handle) = migrate_held(proc.pid);
    std::mem::forget(proc); // killed by the guard, or by the test
    let handle = handle.expect("a lazy handle");
    std::fs::write(&trigger, b"").expect("the trigger");
    let running = |phase: &'static str| {
        move |s: &support::Status| s.get("phase").is_some_and(|p| p == phase) && num(s, "checked") >= 128
    };
    support::wait_for_status(status, running("parent-running"), "the parent to check", Duration::from_secs(30));
    let child = support::wait_for_status(
        &child_status,
        running("child-running"),
        "the child to check",
        Duration::from_secs(30),
    );
    // The thread publishes its figures every 64 rounds (the two processes keep faulting).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stats = handle.stats();
    while stats.events_fork == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        stats = handle.stats();
    }
    println!(
        "{AGENT_LINE} pid={} child={} pending={} forks={} unguarded={}",
        restored.pid,
        num(&child, "pid"),
        stats.pending_pages,
        stats.events_fork,
        stats.forks_unguarded
    );
    std::mem::forget(handle);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts a copy of this binary running `test` as the agent (with `env`; its pid in `started`,
/// killed and reaped by it) and waits for its line: a lookup of the line's `key=value` numbers.
fn start_agent(test: &str, env: &[(&str, &std::ffi::OsStr)], started: &mut Started) -> impl Fn(&str) -> i64 {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture"]).stdin(Stdio::null()).stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("starting the agent");
    started.agent = Some(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    std::mem::forget(child); // reaped by pid
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(AGENT_LINE) {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).expect("the agent's restore");
    move |key: &str| -> i64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    }
}

/// The agent restores the fixture lazily, which forks at once; parent and child check their
/// memory page by page, most of it still lazy (the background fill is held), when the agent is
/// SIGKILLed: the guard, which holds the child's userfaultfd too, kills both within moments, and
/// neither ever read a wrong page (a zero where its data should be).
#[test]
fn agent_death_kills_a_forked_child_too() {
    if let Some(status) = std::env::var_os(FORK_AGENT_ENV) {
        act_as_fork_agent(Path::new(&status));
    }
    if std::env::var_os(AGENT_ENV).is_some() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    become_subreaper();
    let fixture = support::build_fixture("lazy/fixture.c", "lazy-fixture");
    let status = status_file("fork");
    let child_status = PathBuf::from(format!("{}.child", status.display()));
    let mut started = Started::default();
    let field = start_agent(
        "agent_death_kills_a_forked_child_too",
        &[(FORK_AGENT_ENV, status.as_os_str()), (FIXTURE_ENV, fixture.as_os_str())],
        &mut started,
    );
    let agent = started.agent.unwrap();
    let restored = field("pid") as i32;
    started.restored = Some(restored);
    let child = field("child") as i32;
    let pidfd = pidfd_open(restored);
    let child_pidfd = pidfd_open(child);
    started.child = Some((child, child_pidfd.try_clone().unwrap()));
    let guards = guards_of(agent);
    started.guard = guards.first().map(|g| g.0);
    let (pending, forks, unguarded) = (field("pending"), field("forks"), field("unguarded"));
    eprintln!(
        "agent {agent} restored {restored}, which forked {child}; {pending} pages pending, {forks} fork(s),          {unguarded} unguarded; guard {guards:?}"
    );
    assert!(pending > 0, "the agent's restore homed everything already");
    assert_eq!((forks, unguarded), (1, 0), "one fork, its userfaultfd handed to the guard");
    assert_eq!(guards.len(), 1, "one guard, the agent's child: {guards:?}");
    let guard = guards[0].0;
    assert!(!exits_within(&child_pidfd, Duration::ZERO), "the child is not running");

    // SAFETY: SIGKILL by pid to the agent this test started (not reaped yet: the pid is it).
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let killed_at = Instant::now();
    reap(agent);
    started.agent = None;
    let root_gone = exits_within(&pidfd, Duration::from_secs(3));
    let root_after = killed_at.elapsed();
    let child_gone = exits_within(&child_pidfd, Duration::from_secs(3).saturating_sub(root_after));
    let after = killed_at.elapsed();
    let (s, c) = (read_status(&status), read_status(&child_status));
    assert!(root_gone, "the restored process {restored} still runs {root_after:?} after its agent died: {s:?}");
    assert!(child_gone, "the forked child {child} still runs {after:?} after the agent died: {c:?}");
    eprintln!(
        "restored process gone {:.1} ms, forked child gone {:.1} ms after the agent was killed; parent {s:?}, child {c:?}",
        root_after.as_secs_f64() * 1e3,
        after.as_secs_f64() * 1e3
    );
    for (pid, what) in [(restored, "restored process"), (child, "forked child")] {
        let wait_status = reap(pid);
        if pid == restored {
            started.restored = None;
        } else {
            started.child = None;
        }
        assert_sigkilled(wait_status, what);
    }
    assert_eq!(num(&s, "errors"), 0, "the parent read wrong memory: {s:?}");
    assert_eq!(num(&c, "errors"), 0, "the child read wrong memory: {c:?}");
    assert!(num(&c, "checked") > 0 && c.get("phase").is_some_and(|p| p == "child-running"), "{c:?}");
    reap_guard_that_killed(guard, &mut started);
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
    let field = start_agent("agent_death_kills_the_restored_process", &[(AGENT_ENV, status.as_os_str())], &mut started);
    let agent = started.agent.unwrap();
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
    assert_sigkilled(wait_status, "restored process");
    assert_eq!(num(&s, "errors"), 0, "memcheck saw wrong memory: {s:?}");
    reap_guard_that_killed(guard, &mut started);
}

fn assert_sigkilled(wait_status: i32, what: &str) {
    assert!(
        libc::WIFSIGNALED(wait_status) && libc::WTERMSIG(wait_status) == libc::SIGKILL,
        "the {what} ended with wait status {wait_status:#x}, not SIGKILL"
    );
}

/// The guard (the test's child once its agent died) exited 1 (it killed the processes), is
/// reaped, and no other guard is left.
fn reap_guard_that_killed(guard: i32, started: &mut Started) {
    let guard_status = reap(guard);
    started.guard = None;
    assert!(
        libc::WIFEXITED(guard_status) && libc::WEXITSTATUS(guard_status) == 1,
        "guard wait status {guard_status:#x} (exit 1: it killed the processes)"
    );
    assert!(guards_of(std::process::id() as i32).is_empty());
}

/// A lazy restore that homes completely: the guard is released and reaped (no process, no
/// zombie left), and the restored process runs on.
#[test]
fn homing_releases_the_guard() {
    if std::env::var_os(AGENT_ENV).is_some() || std::env::var_os(FORK_AGENT_ENV).is_some() {
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
