//! Lazy memory at the destination: restore with `lazy_memory`, the process runs while a
//! userfaultfd thread fills its private anonymous memory (faults + background), then everything
//! is unregistered and closed. Verified by the processes themselves: test/workloads memcheck
//! (continuous sweeps; `--write-rate` also catches stale pages) and tests/lazy/fixture.c
//! (munmap / MADV_DONTNEED / mremap / fork right after the restore, before homing).
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tern_core::dump::SourceSession;
use tern_core::files::RecreateOptions;
use tern_core::pages::PageStore;
use tern_core::restore::{self, LazyHandle, LazyState, LazyStats, RestoreOptions, RestoredProcess};
use tern_core::sys::Pid;

fn tmp() -> PathBuf {
    support::scratch_dir("lazy")
}

fn fixture_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| support::build_fixture("lazy/fixture.c", "lazy-fixture"))
}

use support::OwnedProc as Proc;

struct Workload {
    proc: Proc,
    status: PathBuf,
}

use support::{dump_and_kill, memcheck_bin, migrate_held, num, read_status};

impl Workload {
    fn spawn(mut cmd: Command, status: PathBuf, ready: impl Fn(&HashMap<String, String>) -> bool) -> Workload {
        let (proc, _) = support::start_with_status(&mut cmd, &status, ready, "the workload to start", Duration::from_secs(60));
        Workload { proc, status }
    }

    fn status(&self) -> HashMap<String, String> {
        read_status(&self.status)
    }

    fn wait_for(&self, ok: impl Fn(&HashMap<String, String>) -> bool, what: &str) -> HashMap<String, String> {
        support::wait_for_status(&self.status, ok, what, Duration::from_secs(60))
    }
}

fn uffd_fds(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.contains("userfaultfd"))
        .collect()
}

/// Dump (cold), kill the original, restore with or without lazy memory.
fn migrate(raw_pid: i32, lazy: bool) -> (RestoredProcess, Option<LazyHandle>) {
    let (image, store, stats) = dump_and_kill(raw_pid);
    let (restored, handle) =
        restore::restore_with_files_lazy(&image, Arc::new(store), &RecreateOptions::default(), lazy).unwrap();
    let t = restored.timings;
    eprintln!(
        "restore ({}): {} data pages in the image; memory step {:.1} ms, total {:.1} ms, {} pages written; lazy {:?}; warnings {:?}",
        if lazy { "lazy" } else { "eager" },
        stats.data_pages,
        t.memory_ns as f64 / 1e6,
        t.total_ns as f64 / 1e6,
        restored.pages_written,
        restored.lazy,
        restored.warnings
    );
    assert_eq!(restored.pid.as_raw(), raw_pid);
    assert_eq!(handle.is_some(), lazy);
    (restored, handle)
}

fn print_stats(what: &str, s: &LazyStats) {
    eprintln!("{what}: {}", support::lazy_summary(s));
}

fn memcheck(name: &str, mib: u32, extra: &[&str]) -> Workload {
    let status = tmp().join(format!("{name}.status"));
    let mut cmd = Command::new(memcheck_bin());
    cmd.arg("--status").arg(&status).args(["--mib", &mib.to_string()]).args(extra);
    Workload::spawn(cmd, status, |s| num(s, "tick") >= 20 && s.get("phase").is_some_and(|p| p == "running"))
}

/// Restores a memcheck lazily, waits for homing, then two more sweeps with errors=0.
fn memcheck_lazy(mib: u32, extra: &[&str]) -> (RestoredProcess, LazyStats) {
    let w = memcheck(&format!("lazy-{mib}-{}", extra.len()), mib, extra);
    let (restored, handle) = migrate(w.proc.pid, true);
    let handle = handle.unwrap();
    let summary = restored.lazy.unwrap();
    assert!(summary.lazy_pages >= u64::from(mib) * 256, "{summary:?}");
    let stats = handle.wait(Duration::from_secs(60)).unwrap();
    assert_eq!(stats.state, LazyState::Homed);
    assert_eq!(stats.pending_pages, 0);
    assert!(stats.fault_pages + stats.background_pages >= u64::from(mib) * 256, "{stats:?}");
    assert!(uffd_fds(w.proc.pid).is_empty(), "a userfaultfd left in the process: {:?}", uffd_fds(w.proc.pid));
    let key = "sweeps";
    let s = w.status();
    w.wait_for(|x| num(x, key) > num(&s, key) + 2, "two more sweeps after homing");
    (restored, stats)
}

#[test]
fn memcheck_64_mib_lazy() {
    let (_, stats) = memcheck_lazy(64, &[]);
    print_stats("memcheck 64 MiB", &stats);
}

#[test]
fn memcheck_256_mib_lazy_vs_eager() {
    let eager = memcheck("eager-256", 256, &[]);
    let (restored_eager, _) = migrate(eager.proc.pid, false);
    let s = eager.status();
    eager.wait_for(|x| num(x, "sweeps") > num(&s, "sweeps") + 1, "eager copy to sweep");
    drop(eager);
    let (restored_lazy, stats) = memcheck_lazy(256, &[]);
    print_stats("memcheck 256 MiB", &stats);
    eprintln!(
        "256 MiB restore: eager {:.1} ms (memory {:.1} ms), lazy {:.1} ms (memory {:.1} ms); lazy home {:.1} ms, fault p50 {:.1} µs p99 {:.1} µs",
        restored_eager.timings.total_ns as f64 / 1e6,
        restored_eager.timings.memory_ns as f64 / 1e6,
        restored_lazy.timings.total_ns as f64 / 1e6,
        restored_lazy.timings.memory_ns as f64 / 1e6,
        stats.home_ns.unwrap_or(0) as f64 / 1e6,
        stats.fault_p50_ns as f64 / 1e3,
        stats.fault_p99_ns as f64 / 1e3,
    );
}

#[test]
fn memcheck_256_mib_writer_lazy_no_stale_pages() {
    let (_, stats) = memcheck_lazy(256, &["--write-rate", "200", "--threads", "none"]);
    print_stats("memcheck 256 MiB --write-rate 200", &stats);
    assert!(stats.faults > 0, "a writer right after restore faults: {stats:?}");
}

fn lazy_fixture(name: &str, mib: u32, mode: &str) -> (Workload, PathBuf) {
    let status = tmp().join(format!("{name}.status"));
    let trigger = tmp().join(format!("{name}.go"));
    let _ = std::fs::remove_file(&trigger);
    let _ = std::fs::remove_file(trigger.with_extension("go.2"));
    let mut cmd = Command::new(fixture_bin());
    cmd.arg(&status).arg(&trigger).arg(mib.to_string()).arg(mode);
    let w = Workload::spawn(cmd, status, |s| s.get("phase").is_some_and(|p| p == "ready"));
    (w, trigger)
}

fn trigger2(trigger: &Path) -> PathBuf {
    PathBuf::from(format!("{}.2", trigger.display()))
}

#[test]
fn discarded_unmapped_and_moved_memory_before_homing() {
    let (w, trigger) = lazy_fixture("discard", 128, "discard");
    let (_, handle) = migrate(w.proc.pid, true);
    let handle = handle.unwrap();
    std::fs::write(&trigger, b"").unwrap();
    w.wait_for(|s| s.get("phase").is_some_and(|p| p == "changed"), "the fixture to change its memory");
    let stats = handle.wait(Duration::from_secs(60)).unwrap();
    print_stats("discard fixture 128 MiB", &stats);
    assert_eq!(stats.state, LazyState::Homed);
    assert!(stats.events_remove >= 1 && stats.events_unmap >= 1 && stats.events_remap >= 1, "{stats:?}");
    assert!(stats.dropped_pages > 0, "the discards came before the fill reached them: {stats:?}");
    std::fs::write(trigger2(&trigger), b"").unwrap();
    w.wait_for(|s| s.get("phase").is_some_and(|p| p == "verified"), "the fixture to verify after homing");
    assert!(uffd_fds(w.proc.pid).is_empty());
}

#[test]
fn fork_right_after_restore() {
    let (w, trigger) = lazy_fixture("fork", 128, "fork");
    let (_, handle) = migrate(w.proc.pid, true);
    let handle = handle.unwrap();
    std::fs::write(&trigger, b"").unwrap();
    w.wait_for(|s| s.get("phase").is_some_and(|p| p == "changed"), "parent and child to verify");
    let child = read_status(&PathBuf::from(format!("{}.child", w.status.display())));
    assert_eq!(child.get("phase").map(String::as_str), Some("child-done"), "{child:?}");
    assert_eq!(num(&child, "errors"), 0, "{child:?}");
    let stats = handle.wait(Duration::from_secs(60)).unwrap();
    print_stats("fork fixture 128 MiB", &stats);
    assert!(stats.events_fork >= 1, "{stats:?}");
    std::fs::write(trigger2(&trigger), b"").unwrap();
    w.wait_for(|s| s.get("phase").is_some_and(|p| p == "verified"), "the parent to verify after homing");
}

#[test]
fn process_exit_before_homing_stops_the_thread() {
    let w = memcheck("exit-256", 256, &["--threads", "none"]);
    let (_, handle) = migrate(w.proc.pid, true);
    let handle = handle.unwrap();
    drop(w); // SIGKILL + reap at once
    let stats = handle.wait(Duration::from_secs(30)).unwrap();
    eprintln!("exit before homing: {:?}, pending {}", stats.state, stats.pending_pages);
    assert!(matches!(stats.state, LazyState::Exited | LazyState::Homed), "{stats:?}");
    assert!(handle.is_finished() || {
        std::thread::sleep(Duration::from_millis(100));
        handle.is_finished()
    });
}

#[test]
fn lazy_needs_a_shared_store() {
    let image = return_image();
    let options = RestoreOptions { lazy_memory: true, ..RestoreOptions::default() };
    let err = restore::restore(&image, &PageStore::new(), options).unwrap_err();
    assert!(err.to_string().contains("restore_lazy"), "{err}");
}

fn return_image() -> tern_core::image::ProcessImage {
    let w = memcheck("image-only", 8, &["--threads", "none"]);
    let session = SourceSession::freeze(Pid::new(w.proc.pid).unwrap()).unwrap();
    let mut store = PageStore::new();
    let (image, _) = session.dump(&mut store).unwrap();
    session.abort().unwrap();
    image
}

/// The background fill waits for release_background (or its delay) while faults are served from
/// the start: the restored memcheck verifies its memory (faulting) with no background copy at
/// all, then the release homes the rest. Dropping the handle releases too (nobody could later).
#[test]
fn background_fill_waits_for_its_release_faults_do_not() {
    let w = memcheck("held", 128, &[]);
    let (restored, handle) = migrate_held(w.proc.pid);
    let handle = handle.unwrap();
    let lazy_pages = restored.lazy.unwrap().lazy_pages;
    // The process runs and faults; nothing is copied in the background.
    let s = w.status();
    w.wait_for(|x| num(x, "tick") > num(&s, "tick") + 10, "the held copy to run");
    std::thread::sleep(Duration::from_millis(300));
    let held = handle.stats();
    print_stats("held", &held);
    assert!(handle.background_held());
    assert!(held.faults > 0, "{held:?}");
    assert_eq!(held.background_pages, 0, "background copies before the release: {held:?}");
    assert_eq!(held.state, LazyState::Running);
    assert!(held.pending_pages > 0 && held.pending_pages < lazy_pages, "{held:?}");
    handle.release_background();
    assert!(!handle.background_held());
    let stats = handle.wait(Duration::from_secs(60)).unwrap();
    print_stats("released", &stats);
    assert_eq!(stats.state, LazyState::Homed);
    assert!(stats.background_pages > 0, "{stats:?}");
    let s = w.status();
    let s = w.wait_for(|x| num(x, "sweeps") > num(&s, "sweeps") + 1, "two more sweeps after homing");
    assert_eq!(num(&s, "errors"), 0, "{s:?}");

    // Dropping the handle of a held fill releases it.
    let w = memcheck("held-drop", 64, &[]);
    let (_, handle) = migrate_held(w.proc.pid);
    drop(handle);
    // Homed: memcheck's own sweeps go on; the userfaultfd is gone from the process.
    let s = w.status();
    w.wait_for(|x| num(x, "sweeps") > num(&s, "sweeps") + 2, "sweeps after the handle was dropped");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !uffd_fds(w.proc.pid).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the fill did not finish after the drop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(num(&w.status(), "errors"), 0);
}
