//! Shared by the integration tests that run C fixtures: build one with `cc` and give each test
//! binary run a scratch directory of its own.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

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

/// A fixture's status file (`key=value` words, rewritten by the fixture; see test/workloads/README).
pub type Status = std::collections::HashMap<String, String>;

/// Parses `key=value` words (anything else is skipped).
pub fn parse_status(text: &str) -> Status {
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// The status file as it is now (empty while it does not exist yet).
pub fn read_status(path: &std::path::Path) -> Status {
    parse_status(&std::fs::read_to_string(path).unwrap_or_default())
}

/// A numeric key, 0 when absent or not a number.
pub fn num(s: &Status, key: &str) -> u64 {
    s.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Polls the status file until `ok`, asserting on every read that the fixture reports no error;
/// panics naming `what` after `timeout`.
pub fn wait_for_status(path: &std::path::Path, ok: impl Fn(&Status) -> bool, what: &str, timeout: std::time::Duration) -> Status {
    let start = std::time::Instant::now();
    loop {
        let s = read_status(path);
        assert_eq!(num(&s, "errors"), 0, "the process reports errors: {s:?}");
        if ok(&s) {
            return s;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
