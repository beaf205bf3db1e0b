//! "Never run twice": a frozen source stays frozen if the agent dies (parked SIGSTOP), and an
//! abort consumes that SIGSTOP without a trace (tests/source_safety/fixture.c, memcheck).
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tern_core::dump::SourceSession;
use tern_core::pages::PageStore;
use tern_core::ptrace::ParkOutcome;
use tern_core::sys::Pid;

const HELPER_ENV: &str = "TERN_SOURCE_SAFETY_HELPER_PID";

fn tmp() -> PathBuf {
    support::scratch_dir("source-safety")
}

fn fixture_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_fixture("source_safety/fixture.c", "source-safety-fixture"))
}

/// A process this test started; SIGCONTed, SIGKILLed and reaped by pid on drop.
struct Proc {
    pid: i32,
    shm: Option<std::fs::File>,
    status: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signals and waitpid for the pid of a child this test started.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

impl Proc {
    fn word(&self, i: u64) -> i64 {
        let mut b = [0u8; 8];
        self.shm.as_ref().unwrap().read_exact_at(&mut b, i * 8).unwrap();
        i64::from_ne_bytes(b)
    }
    fn counter(&self) -> i64 {
        self.word(0)
    }
    fn conts(&self) -> i64 {
        self.word(1)
    }
    fn pid(&self) -> Pid {
        Pid::new(self.pid).unwrap()
    }
    fn status(&self) -> HashMap<String, String> {
        support::read_status(&self.status)
    }
}

fn spawn_fixture(name: &str) -> Proc {
    let shm_path = tmp().join(format!("{name}.shm"));
    std::fs::write(&shm_path, vec![0u8; 4096]).unwrap();
    let shm = std::fs::OpenOptions::new().read(true).write(true).open(&shm_path).unwrap();
    let child = Command::new(fixture_bin())
        .arg(&shm_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc {
        pid: child.id() as i32,
        shm: Some(shm),
        status: PathBuf::new(),
    };
    std::mem::forget(child); // reaped by Proc
    wait_until("fixture runs", Duration::from_secs(10), || p.counter() > 20 && p.word(2) > 2);
    p
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (state letter of every thread, SigPnd|ShdPnd of every thread).
fn threads(pid: i32) -> Vec<(char, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = e.unwrap().file_name().into_string().unwrap();
        let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        let field = |k: &str| {
            st.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("").to_owned()
        };
        let mask = |k: &str| u64::from_str_radix(&field(k), 16).unwrap_or(0);
        let state = field("State:").chars().next().unwrap_or('?');
        out.push((state, mask("SigPnd:") | mask("ShdPnd:")));
    }
    out
}

fn assert_running_clean(p: &Proc) {
    for (state, pending) in threads(p.pid) {
        // Running, sleeping or in a brief disk wait (memcheck rewrites its status file): anything
        // but stopped (T) or traced (t).
        assert!(!matches!(state, 'T' | 't' | 'Z'), "thread state {state}");
        assert_eq!(pending, 0, "no signal left pending");
    }
    let c0 = p.counter();
    wait_until("counter advances", Duration::from_secs(5), || p.counter() > c0 + 20);
    assert_eq!(p.conts(), 0, "the fixture never saw a SIGCONT");
}

/// Runs in the helper process (re-exec of this test binary): freeze, say so, wait to be killed.
#[test]
fn helper_freeze_and_wait() {
    let Ok(raw) = std::env::var(HELPER_ENV) else {
        return; // a normal test run: nothing to do
    };
    let pid = Pid::new(raw.parse().unwrap()).unwrap();
    let session = SourceSession::freeze(pid).unwrap();
    println!("FROZEN {:?}", session.park_outcome());
    std::thread::sleep(Duration::from_secs(120));
    drop(session);
}

#[test]
fn agent_death_leaves_the_source_stopped_until_sigcont() {
    let p = spawn_fixture("death");
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["helper_freeze_and_wait", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, p.pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let line = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.contains("FROZEN")))
        .expect("helper reports FROZEN")
        .unwrap();
    assert!(line.contains("Parked"), "{line}");
    assert!(threads(p.pid).iter().all(|&(s, _)| s == 't'), "traced while the helper lives");
    // SAFETY: SIGKILL to the helper process this test spawned, by its pid.
    unsafe { libc::kill(helper.id() as i32, libc::SIGKILL) };
    helper.wait().unwrap();
    wait_until("group-stop", Duration::from_secs(5), || {
        threads(p.pid).iter().all(|&(s, _)| s == 'T')
    });
    let c0 = p.counter();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(p.counter(), c0, "the source does not run on after the agent died");
    assert!(threads(p.pid).iter().all(|&(s, _)| s == 'T'));
    // SAFETY: SIGCONT to the fixture this test spawned.
    unsafe { libc::kill(p.pid, libc::SIGCONT) };
    wait_until("counter resumes", Duration::from_secs(5), || p.counter() > c0 + 20);
    wait_until("SIGCONT handled", Duration::from_secs(5), || p.conts() == 1);
}

#[test]
fn abort_consumes_the_parked_sigstop_silently() {
    let p = spawn_fixture("abort");
    for i in 0..20 {
        let session = SourceSession::freeze(p.pid()).unwrap();
        assert!(
            matches!(session.park_outcome(), ParkOutcome::Parked { .. }),
            "round {i}: {:?}",
            session.park_outcome()
        );
        let c = p.counter();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(p.counter(), c, "frozen");
        session.abort().unwrap();
        let c = p.counter();
        wait_until("counter advances", Duration::from_secs(5), || p.counter() > c + 3);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_running_clean(&p);
}

#[test]
fn abort_after_dump_consumes_it_too_and_the_image_has_no_sigstop() {
    let p = spawn_fixture("dump");
    for _ in 0..3 {
        let session = SourceSession::freeze(p.pid()).unwrap();
        let mut store = PageStore::new();
        let (image, _) = session.dump(&mut store).unwrap();
        for t in &image.threads {
            assert!(t.pending.iter().all(|s| s.signal != libc::SIGSTOP), "tid {}", t.tid);
        }
        assert!(image.task.shared_pending.iter().all(|s| s.signal != libc::SIGSTOP));
        // Still parked after ~100 injected syscalls (the park thread re-parks when it dequeues).
        assert!(session.tracer().has_parked_stop());
        let parked = threads(p.pid).iter().filter(|&&(_, m)| m & (1 << 18) != 0).count();
        assert_eq!(parked, 1, "the SIGSTOP is still queued");
        session.abort().unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_running_clean(&p);
}

#[test]
fn commit_still_kills_promptly() {
    let p = spawn_fixture("commit");
    let session = SourceSession::freeze(p.pid()).unwrap();
    let start = Instant::now();
    session.commit().unwrap();
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());
}

fn workload(name: &str) -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../test/workloads"));
    let bin = dir.join("bin").join(name);
    if !bin.exists() {
        let ok = Command::new("make").arg("-C").arg(&dir).status().unwrap().success();
        assert!(ok, "make -C test/workloads");
    }
    bin
}

use support::num;

#[test]
fn memcheck_survives_twenty_freeze_abort_rounds() {
    let status = tmp().join("memcheck.status");
    let _ = std::fs::remove_file(&status);
    let child = Command::new(workload("memcheck"))
        .arg("--status")
        .arg(&status)
        .args(["--mib", "16"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc {
        pid: child.id() as i32,
        shm: None,
        status,
    };
    std::mem::forget(child);
    let ready = |s: &HashMap<String, String>| {
        num(s, "tick") >= 20 && s.get("phase").is_some_and(|v| v == "running")
    };
    wait_until("memcheck runs", Duration::from_secs(20), || ready(&p.status()));
    for _ in 0..20 {
        let session = SourceSession::freeze(p.pid()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        session.abort().unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(num(&p.status(), "errors"), 0, "{:?}", p.status());
    }
    let before = p.status();
    let keys = ["epoll_wakeups", "read_wakeups", "sleeps", "futex_wakeups"];
    wait_until("every memcheck worker wakes again", Duration::from_secs(20), || {
        let s = p.status();
        assert_eq!(num(&s, "errors"), 0, "{s:?}");
        num(&s, "tick") > num(&before, "tick") + 100 && keys.iter().all(|k| num(&s, k) > num(&before, k))
    });
    for (state, pending) in threads(p.pid) {
        // Running, sleeping or in a brief disk wait (memcheck rewrites its status file): anything
        // but stopped (T) or traced (t).
        assert!(!matches!(state, 'T' | 't' | 'Z'), "thread state {state}");
        assert_eq!(pending, 0);
    }
}
