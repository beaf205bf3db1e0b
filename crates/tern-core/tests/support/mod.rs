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
