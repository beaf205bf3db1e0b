//! Cold migration on one host: dump a live process, kill it, restore it with the same pid (and
//! tids) from the image and the pages, and let it prove it is intact (tests/cold/fixture.c).
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use tern_core::dump::SourceSession;
use tern_core::image::ProcessImage;
use tern_core::pages::PageStore;
use tern_core::files::RecreateOptions;
use tern_core::restore::{self, RestoreError, RestoreOptions};
use tern_core::sys::Pid;

fn tmp() -> PathBuf {
    support::scratch_dir("cold")
}

fn fixture_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_fixture("cold/fixture.c", "cold-fixture"))
}

use support::OwnedProc as Proc;

struct Fixture {
    proc: Proc,
    status: PathBuf,
    mapfile: PathBuf,
}

fn spawn(name: &str, mib: u32, threads: u32) -> Fixture {
    let dir = tmp();
    let status = dir.join(format!("{name}.status"));
    let mapfile = dir.join(format!("{name}.map"));
    let content: Vec<u8> = (0..4 * 4096u32).map(|j| (j.wrapping_mul(7)) as u8).collect();
    std::fs::write(&mapfile, content).unwrap();
    let mut cmd = Command::new(fixture_bin());
    cmd.arg(&status).arg(mib.to_string()).arg(threads.to_string()).arg(&mapfile);
    Fixture::start(cmd, status, mapfile, |s| num(s, "tick") >= 20, "the fixture to start")
}

use support::num;

impl Fixture {
    /// Starts `cmd`, which writes `status`, and waits until it is `ready`.
    fn start(mut cmd: Command, status: PathBuf, mapfile: PathBuf, ready: impl Fn(&HashMap<String, String>) -> bool, what: &str) -> Fixture {
        let (proc, _) = support::start_with_status(&mut cmd, &status, ready, what, Duration::from_secs(20));
        Fixture { proc, status, mapfile }
    }

    fn status(&self) -> HashMap<String, String> {
        support::read_status(&self.status)
    }

    fn wait_for(&self, ok: impl Fn(&HashMap<String, String>) -> bool, what: &str) -> HashMap<String, String> {
        support::wait_for_status(&self.status, ok, what, Duration::from_secs(20))
    }
}

fn mbps(bytes: u64, ns: u64) -> f64 {
    bytes as f64 / 1e6 / (ns.max(1) as f64 / 1e9)
}

/// Dump, kill the original (reaping it), restore: the copy's pid.
fn migrate(f: &Fixture) -> (ProcessImage, restore::RestoredProcess) {
    migrate_pid(f.proc.pid)
}

fn migrate_pid(raw_pid: i32) -> (ProcessImage, restore::RestoredProcess) {
    let pid = Pid::new(raw_pid).unwrap();
    let session = SourceSession::freeze(pid).unwrap();
    let mut store = PageStore::new();
    let (image, stats) = session.dump(&mut store).unwrap();
    eprintln!(
        "dump: {} data + {} zero pages, {} skipped, {:.1} MB in {:.1} ms ({:.0} MB/s pages, {:.1} ms total)",
        stats.data_pages,
        stats.zero_pages,
        stats.skipped_pages,
        stats.bytes as f64 / 1e6,
        stats.pages_elapsed_ns as f64 / 1e6,
        mbps(stats.bytes, stats.pages_elapsed_ns),
        stats.elapsed_ns as f64 / 1e6
    );
    // The image survives its wire format.
    let image = ProcessImage::from_msgpack(&image.to_msgpack().unwrap()).unwrap();
    session.commit().unwrap();
    // SAFETY: reaping our own child by pid.
    unsafe { libc::waitpid(raw_pid, std::ptr::null_mut(), 0) };
    let restored = restore::restore_with_files(&image, &store, &RecreateOptions::default()).unwrap();
    let t = restored.timings;
    eprintln!(
        "restore: pid {} threads {:?}: clone {:.1} ms, memory {:.1} ms ({:.0} MB/s), threads {:.1} ms, total {:.1} ms; warnings {:?}",
        restored.pid,
        restored.threads,
        t.clone_ns as f64 / 1e6,
        t.memory_ns as f64 / 1e6,
        mbps(restored.bytes_written, t.memory_ns),
        t.threads_ns as f64 / 1e6,
        t.total_ns as f64 / 1e6,
        restored.warnings
    );
    assert_eq!(restored.pid.as_raw(), raw_pid, "same pid");
    // Exactly the image's descriptors: nothing of the restore's own (the stub's control socket,
    // the userfaultfd, map fds) stays behind in the process.
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{raw_pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    let mut expected: Vec<i32> = image.fds.iter().map(|f| f.fd).collect();
    expected.sort();
    assert_eq!(fds, expected, "the restored process's fds");
    (image, restored)
}

fn tids(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

fn sigqueue(pid: i32, sig: i32, value: i32) {
    // SAFETY: rt_sigqueueinfo-style sigqueue to our own child process.
    let r = unsafe { libc::sigqueue(pid, sig, libc::sigval { sival_ptr: value as usize as *mut libc::c_void }) };
    assert_eq!(r, 0);
}

#[test]
fn single_threaded_process_continues_after_restore() {
    let f = spawn("single", 8, 0);
    let before = f.status();
    let (image, _restored) = migrate(&f);
    assert_eq!(image.threads.len(), 1);
    let tick = num(&before, "tick");
    let alarms = num(&before, "alarms");
    let s = f.wait_for(|s| num(s, "tick") > tick + 60 && num(s, "alarms") > alarms + 20, "the restored copy to run on");
    assert_eq!(num(&s, "pid"), f.proc.pid as u64);
    assert_eq!(std::fs::read_to_string(format!("/proc/{}/comm", f.proc.pid)).unwrap().trim(), "cold-fixture");
}

#[test]
fn threads_signals_and_timers_survive() {
    let f = spawn("mt", 64, 4);
    let before_tids = tids(f.proc.pid);
    assert_eq!(before_tids.len(), 5);
    let before = f.status();
    let (_image, restored) = migrate(&f);
    assert_eq!(tids(f.proc.pid), before_tids, "same tids");
    let mut sorted = restored.threads.clone();
    sorted.sort();
    assert_eq!(sorted, before_tids);
    let rt_min = libc::SIGRTMIN();
    for v in [5, 7, 11] {
        sigqueue(f.proc.pid, rt_min, v);
    }
    let s = f.wait_for(
        |s| {
            num(s, "tick") > num(&before, "tick") + 60
                && (0..4).all(|i| num(s, &format!("w{i}")) > num(&before, &format!("w{i}")) + 3)
                && num(s, "rt") == 3
        },
        "threads, timers and signals after restore",
    );
    assert_eq!(num(&s, "rtsum"), 23);
    assert!(num(&s, "alarms") > num(&before, "alarms"));
}

#[test]
fn pid_taken_is_refused_and_leaves_the_original_alone() {
    let f = spawn("taken", 4, 1);
    let pid = Pid::new(f.proc.pid).unwrap();
    let session = SourceSession::freeze(pid).unwrap();
    let mut store = PageStore::new();
    let (image, _) = session.dump(&mut store).unwrap();
    session.abort().unwrap();
    let err = restore::restore(&image, &store, RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, RestoreError::PidTaken { pid } if pid == f.proc.pid), "{err}");
    let tick = num(&f.status(), "tick");
    f.wait_for(|s| num(s, "tick") > tick + 20, "the original to keep running");
}

#[test]
fn changed_mapped_file_is_refused_and_nothing_is_left() {
    let f = spawn("changed", 4, 1);
    let pid = Pid::new(f.proc.pid).unwrap();
    let session = SourceSession::freeze(pid).unwrap();
    let mut store = PageStore::new();
    let (image, _) = session.dump(&mut store).unwrap();
    session.commit().unwrap();
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(f.proc.pid, std::ptr::null_mut(), 0) };
    std::fs::write(&f.mapfile, vec![1u8; 4 * 4096 + 1]).unwrap();
    let err = restore::restore(&image, &store, RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, RestoreError::FileChanged { ref path, .. } if Path::new(path) == f.mapfile), "{err}");
    assert!(!Path::new(&format!("/proc/{}", f.proc.pid)).exists(), "nothing left behind");
}

fn big_round_trip(mib: u32) {
    let f = spawn(&format!("big{mib}"), mib, 1);
    let tick = num(&f.status(), "tick");
    let _ = migrate(&f);
    f.wait_for(|s| num(s, "tick") > tick + 30, "the big copy to run on");
}

#[test]
fn region_256_mib_round_trip() {
    big_round_trip(256);
}

#[test]
#[ignore = "1 GiB: run with --ignored for the figures"]
fn region_1_gib_round_trip() {
    big_round_trip(1024);
}

// --- the repo's self-verifying workloads (test/workloads, wl.h status protocol) -------------

fn workload(name: &str) -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../test/workloads"));
    let bin = dir.join("bin").join(name);
    if !bin.exists() {
        let ok = Command::new("make").arg("-C").arg(&dir).status().unwrap().success();
        assert!(ok, "make -C test/workloads");
    }
    bin
}

fn spawn_workload(name: &str, args: &[&str]) -> Fixture {
    let dir = tmp();
    let status = dir.join(format!("wl-{name}.status"));
    let mut cmd = Command::new(workload(name));
    cmd.arg("--status").arg(&status).args(args);
    Fixture::start(cmd, status, PathBuf::new(), |s| num(s, "tick") >= 20 && s.get("phase").is_some_and(|p| p == "running"), name)
}

#[test]
fn memcheck_with_four_workers_keeps_verifying() {
    let f = spawn_workload("memcheck", &["--mib", "64"]);
    let before_tids = tids(f.proc.pid);
    assert_eq!(before_tids.len(), 5);
    let before = f.status();
    let _ = migrate(&f);
    assert_eq!(tids(f.proc.pid), before_tids, "same tids");
    let keys = ["epoll_wakeups", "read_wakeups", "sleeps", "futex_wakeups", "sweeps"];
    let s = f.wait_for(
        |s| num(s, "tick") > num(&before, "tick") + 100 && keys.iter().all(|k| num(s, k) > num(&before, k)),
        "memcheck to run on with every worker waking",
    );
    assert_eq!(num(&s, "errors"), 0, "{s:?}");
}

#[test]
fn sigcount_handlers_and_masks_survive() {
    let f = spawn_workload("sigcount", &[]);
    let before = f.status();
    let _ = migrate(&f);
    let rtmin = num(&before, "rtmin") as i32;
    assert!(rtmin > 0, "{before:?}");
    for v in [3, 4, 5, 6] {
        sigqueue(f.proc.pid, rtmin, v);
    }
    let s = f.wait_for(
        |s| num(s, "rt") == num(&before, "rt") + 4 && num(s, "reads") > num(&before, "reads") + 3,
        "sigcount to count the queued signals",
    );
    assert_eq!(num(&s, "rt_sum"), num(&before, "rt_sum") + 18);
    // SAFETY: signal to our own restored child.
    unsafe { libc::kill(f.proc.pid, libc::SIGUSR1) };
    f.wait_for(|s| num(s, "usr1") == num(&before, "usr1") + 1, "SIGUSR1 to be handled");
}

/// The restore stops its batches of remote syscalls with a SIGTRAP (rebuild.rs): a process that
/// ignores SIGTRAP must still ignore it afterwards, with its masks and other dispositions as they
/// were (a forced SIGTRAP, as int3 raises, would have reset the disposition to SIG_DFL).
#[test]
fn ignored_sigtrap_and_dispositions_survive_the_batches() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sleep");
    cmd.arg("1000");
    // SAFETY: between fork and exec only async-signal-safe signal(2) calls on constants.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGTRAP, libc::SIG_IGN);
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let proc = Proc { pid: child.id() as i32 };
    std::mem::forget(child); // reaped by Proc
    let field = |pid: i32, key: &str| -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_default().trim().to_owned()
    };
    // Frozen while the dynamic loader still runs, it would close what it opened after the
    // restore: wait until it sleeps (clock_nanosleep, or nanosleep).
    for _ in 0..400 {
        let syscall = std::fs::read_to_string(format!("/proc/{}/syscall", proc.pid)).unwrap_or_default();
        if syscall.starts_with("230 ") || syscall.starts_with("35 ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let before: Vec<String> = ["SigIgn:", "SigCgt:", "SigBlk:"].iter().map(|k| field(proc.pid, k)).collect();
    let trap = 1u64 << (libc::SIGTRAP - 1);
    assert_ne!(u64::from_str_radix(&before[0], 16).unwrap() & trap, 0, "{before:?}");
    let _ = migrate_pid(proc.pid);
    let after: Vec<String> = ["SigIgn:", "SigCgt:", "SigBlk:"].iter().map(|k| field(proc.pid, k)).collect();
    assert_eq!(after, before, "SigIgn, SigCgt, SigBlk after the restore");
    // Right after the restore it may still be running (back from the restarted syscall, on its way
    // into the next nanosleep): it must be asleep again soon, not stopped, not gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut state = field(proc.pid, "State:");
    while !state.starts_with('S') && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        state = field(proc.pid, "State:");
    }
    assert_eq!(state.chars().next(), Some('S'), "the restored sleep sleeps on ({state})");
}
