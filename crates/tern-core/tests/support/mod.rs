//! Shared by the integration tests that run C fixtures: build one with `cc` and give each test
//! binary run a scratch directory of its own.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tern_core::pages::pull::RemoteStats;
use tern_core::restore::LazyStats;

/// A directory under cargo's test tmpdir, private to this test binary run.
pub fn scratch_dir(prefix: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// Compiles `tests/<source>` (relative to the crate) with `cc -O2 -pthread -Wall` into cargo's test
/// tmpdir as `name`. Built under a private name and renamed into place, so a concurrent run of
/// another test binary never executes a half-written file. Callers cache the result per binary.
pub fn build_fixture(source: &str, name: &str) -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join(name);
    let partial = tmp.join(format!("{name}-{}.partial", std::process::id()));
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join(source);
    let status = Command::new("cc")
        .args(["-O2", "-pthread", "-Wall", "-o"])
        .arg(&partial)
        .arg(&src)
        .status()
        .expect("running cc");
    assert!(status.success(), "compiling {} failed", src.display());
    std::fs::rename(&partial, &out).expect("moving the fixture into place");
    out
}

/// A process a test started (or restored), SIGKILLed and reaped by pid on drop.
pub struct OwnedProc {
    pub pid: i32,
}

impl Drop for OwnedProc {
    fn drop(&mut self) {
        // SAFETY: kill/waitpid by the pid of a process this test started (or restored).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Starts `cmd` (stdin, stdout and stderr to /dev/null) after removing the status file it will
/// write, and waits until that file says `ready` (see [`wait_for_status`]): the process (killed
/// and reaped on drop, also when the wait panics) and the status that was ready.
pub fn start_with_status(
    cmd: &mut Command,
    status: &Path,
    ready: impl Fn(&Status) -> bool,
    what: &str,
    timeout: Duration,
) -> (OwnedProc, Status) {
    let _ = std::fs::remove_file(status);
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starting the process");
    let proc = OwnedProc { pid: child.id() as i32 };
    std::mem::forget(child); // reaped by OwnedProc
    let s = wait_for_status(status, ready, what, timeout);
    (proc, s)
}

/// A fixture's status file (`key=value` words, rewritten by the fixture; see test/workloads/README).
pub type Status = std::collections::HashMap<String, String>;

/// Parses `key=value` words (anything else is skipped).
pub fn parse_status(text: &str) -> Status {
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// The status file as it is now (empty while it does not exist yet).
pub fn read_status(path: &Path) -> Status {
    parse_status(&std::fs::read_to_string(path).unwrap_or_default())
}

/// A numeric key, 0 when absent or not a number.
pub fn num(s: &Status, key: &str) -> u64 {
    s.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Polls the status file until `ok`, asserting on every read that the fixture reports no error;
/// panics naming `what` after `timeout`.
pub fn wait_for_status(path: &Path, ok: impl Fn(&Status) -> bool, what: &str, timeout: Duration) -> Status {
    let start = std::time::Instant::now();
    loop {
        let s = read_status(path);
        assert_eq!(num(&s, "errors"), 0, "the process reports errors: {s:?}");
        if ok(&s) {
            return s;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One line on how lazy memory came home (printed by the tests: run with --nocapture), with the
/// pull's figures when the pages came from the source host.
pub fn lazy_summary(s: &LazyStats) -> String {
    let mut line = format!(
        "{:?}; faults {} ({} data pages, {} zero), background {} pages, dropped {}, retries {}, \
         events fork/remap/remove/unmap {}/{}/{}/{}; fault service p50 {:.1} µs p99 {:.1} µs max {:.1} µs; home in {:.1} ms",
        s.state,
        s.faults,
        s.fault_pages,
        s.zero_pages,
        s.background_pages,
        s.dropped_pages,
        s.retries,
        s.events_fork,
        s.events_remap,
        s.events_remove,
        s.events_unmap,
        s.fault_p50_ns as f64 / 1e3,
        s.fault_p99_ns as f64 / 1e3,
        s.fault_max_ns as f64 / 1e3,
        s.home_ns.unwrap_or(0) as f64 / 1e6
    );
    if let Some(r) = &s.remote {
        line.push_str("; remote: ");
        line.push_str(&remote_summary(r));
    }
    line
}

/// One line on a page pull's figures.
pub fn remote_summary(r: &RemoteStats) -> String {
    format!(
        "{:?}, {} fault requests ({} pages, round trip p50 {:.1} µs p99 {:.1} µs), {} pages prefetched, {} reconnects",
        r.state,
        r.fault_requests,
        r.fault_pages,
        r.request_p50_ns as f64 / 1e3,
        r.request_p99_ns as f64 / 1e3,
        r.prefetch_pages,
        r.reconnects
    )
}

/// test/workloads' memcheck, built with `make` if it is not there yet.
pub fn memcheck_bin() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../test/workloads"));
    let bin = dir.join("bin/memcheck");
    if !bin.exists() {
        assert!(Command::new("make").arg("-C").arg(&dir).status().unwrap().success());
    }
    bin
}

/// Dump (cold) our child `raw_pid` into a local store, kill and reap the original.
pub fn dump_and_kill(
    raw_pid: i32,
) -> (tern_core::image::ProcessImage, tern_core::pages::PageStore, tern_core::dump::DumpStats) {
    let pid = tern_core::sys::Pid::new(raw_pid).unwrap();
    let session = tern_core::dump::SourceSession::freeze(pid).unwrap();
    let mut store = tern_core::pages::PageStore::new();
    let (image, stats) = session.dump(&mut store).unwrap();
    session.commit().unwrap();
    // SAFETY: reaping our own child by pid.
    unsafe { libc::waitpid(raw_pid, std::ptr::null_mut(), 0) };
    (image, store, stats)
}

/// [`dump_and_kill`], then a lazy restore whose background fill waits for its release (an hour).
pub fn migrate_held(raw_pid: i32) -> (tern_core::restore::RestoredProcess, Option<tern_core::restore::LazyHandle>) {
    use tern_core::restore::{self, LazyOptions, RestoreOptions};
    let (image, store, _) = dump_and_kill(raw_pid);
    let recreated = tern_core::files::recreate_fds(&image.fds, &Default::default()).unwrap();
    let options = RestoreOptions {
        lazy_memory: true,
        lazy: LazyOptions { background_delay: Duration::from_secs(3600), ..Default::default() },
        ..RestoreOptions::with_files(recreated)
    };
    restore::restore_lazy(&image, std::sync::Arc::new(store), options).unwrap()
}
