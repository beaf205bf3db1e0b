//! Shared helper of the ptrace tests: builds `tracee.c` once per test binary and runs it as a
//! real child process, killed (by its pid) when the handle drops, even after a failed assertion.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tern_core::sys::Pid;

#[path = "../support/mod.rs"]
mod support;

pub const READ: usize = 0;
pub const EPOLL: usize = 1;
pub const NANOSLEEP: usize = 2;
pub const FUTEX: usize = 3;
pub const ROLE_NAMES: [&str; 4] = ["read", "epoll", "nanosleep", "futex"];

fn scratch_root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tracee-run-{}", std::process::id()))
}

fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    // One binary per test crate (two test binaries include this module).
    BIN.get_or_init(|| support::build_fixture("tracee/tracee.c", concat!("tracee-", env!("CARGO_CRATE_NAME"))))
}

#[derive(Debug, Clone, Copy)]
pub struct RoleResult {
    pub done: bool,
    pub ret: i64,
    pub errno: i64,
    pub eintr: i64,
    pub elapsed_ms: i64,
}

/// A running tracee; SIGKILLed by pid on drop.
#[derive(Debug)]
pub struct Tracee {
    pub pid: Pid,
    pub sleep_ms: u64,
    child: Child,
    dir: PathBuf,
    shm: std::fs::File,
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let ret = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(ret, 0, "mkfifo {path:?}");
}

impl Tracee {
    /// `leader_role`: counter | read | epoll | nanosleep | futex | spawn.
    pub fn spawn(leader_role: &str, sleep_ms: u64) -> Tracee {
        static N: AtomicUsize = AtomicUsize::new(0);
        let bin = binary();
        let dir = scratch_root().join(format!("t{}", N.fetch_add(1, Ordering::SeqCst)));
        std::fs::create_dir_all(&dir).unwrap();
        mkfifo(&dir.join("read.fifo"));
        mkfifo(&dir.join("epoll.fifo"));
        let shm_path = dir.join("shm");
        std::fs::write(&shm_path, vec![0u8; 4096]).unwrap();
        let shm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&shm_path)
            .unwrap();
        let child = Command::new(bin)
            .arg(&shm_path)
            .arg(&dir)
            .arg(leader_role)
            .arg(sleep_ms.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tracee");
        let pid = Pid::new(child.id() as i32).unwrap();
        Tracee {
            pid,
            sleep_ms,
            child,
            dir,
            shm,
        }
    }

    pub fn word(&self, index: usize) -> i64 {
        let mut b = [0u8; 8];
        self.shm.read_exact_at(&mut b, (index * 8) as u64).unwrap();
        i64::from_ne_bytes(b)
    }

    pub fn counter(&self) -> i64 {
        self.word(0)
    }
    pub fn checksum_errors(&self) -> i64 {
        self.word(1)
    }
    pub fn sigusr1(&self) -> i64 {
        self.word(2)
    }
    pub fn spawned(&self) -> i64 {
        self.word(5)
    }

    pub fn role(&self, role: usize) -> RoleResult {
        let w = |f| self.word(16 + 8 * role + f);
        RoleResult {
            done: w(0) == 1,
            ret: w(1),
            errno: w(2),
            eintr: w(3),
            elapsed_ms: w(4),
        }
    }

    /// Waits until the four blocking roles sit in their syscalls and the counter runs.
    pub fn wait_blocked(&self) {
        wait_until("tracee ready", Duration::from_secs(10), || {
            self.word(4) == 4 && self.counter() > 0
        });
        std::thread::sleep(Duration::from_millis(50));
    }

    pub fn wait_counter_moves(&self) {
        let c0 = self.counter();
        wait_until("counter moves", Duration::from_secs(5), || {
            self.counter() > c0 + 2
        });
    }

    fn write_fifo(&self, name: &str) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(self.dir.join(name))
            .unwrap();
        std::io::Write::write_all(&mut f, b"R").unwrap();
    }

    pub fn wake_futex(&self) {
        self.shm.write_all_at(&1i64.to_ne_bytes(), 24).unwrap();
        // SAFETY: maps one page of our own file; unmapped below; no Rust reference to it escapes.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&self.shm),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let word = (map as usize + 24) as *mut u32;
        // SAFETY: `word` lies inside the mapping; FUTEX_WAKE (shared) only reads the word.
        unsafe {
            libc::syscall(libc::SYS_futex, word, libc::FUTEX_WAKE, i32::MAX, 0, 0, 0);
            libc::munmap(map, 4096);
        }
    }

    /// Wakes every blocked role and waits for the results (nanosleep finishes on its own).
    pub fn wake_all_and_collect(&self) -> [RoleResult; 4] {
        self.write_fifo("read.fifo");
        self.write_fifo("epoll.fifo");
        self.wake_futex();
        let budget = Duration::from_millis(self.sleep_ms + 10_000);
        wait_until("all roles done", budget, || {
            (0..4).all(|r| self.role(r).done)
        });
        [self.role(0), self.role(1), self.role(2), self.role(3)]
    }

    /// Asserts that every blocked call completed with its correct result and no EINTR.
    pub fn assert_roles_completed_cleanly(&self) {
        let r = self.wake_all_and_collect();
        for (i, res) in r.iter().enumerate() {
            println!("  {}: {:?}", ROLE_NAMES[i], res);
            assert_eq!(res.eintr, 0, "{} saw EINTR: {res:?}", ROLE_NAMES[i]);
            assert_eq!(res.errno, 0, "{} failed: {res:?}", ROLE_NAMES[i]);
        }
        assert_eq!(r[READ].ret, 1, "read returns the byte written");
        assert_eq!(r[EPOLL].ret, 1, "epoll_wait returns one ready fd");
        assert_eq!(r[NANOSLEEP].ret, 0, "nanosleep completes");
        assert!(
            r[NANOSLEEP].elapsed_ms >= self.sleep_ms as i64 - 1,
            "slept the full time"
        );
        assert_eq!(r[FUTEX].ret, 0, "futex wait returns 0 when woken");
        assert_eq!(self.checksum_errors(), 0);
    }

    /// `(tid, state)` of every thread, from /proc/PID/task/*/stat.
    pub fn task_states(&self) -> Vec<(i32, char)> {
        task_states(self.pid)
    }
}

pub fn task_states(pid: Pid) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim().chars().next());
        out.push((tid, state.unwrap_or('?')));
    }
    out.sort();
    out
}

use std::os::unix::fs::OpenOptionsExt;

impl Drop for Tracee {
    fn drop(&mut self) {
        // SAFETY: kill takes two integers; the pid is our own child, still unreaped or gone.
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir(scratch_root()); // only succeeds once the last one is gone
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Asserts every thread of `pid` is in a tracing stop ('t'), allowing a moment for dying threads
/// to vanish, and returns the tids.
pub fn assert_all_traced(pid: Pid) -> Vec<i32> {
    for _ in 0..50 {
        let states = task_states(pid);
        if states.iter().all(|&(_, s)| s == 't') {
            return states.into_iter().map(|(t, _)| t).collect();
        }
        if states.iter().any(|&(_, s)| !matches!(s, 't' | 'Z' | 'X')) {
            panic!("threads not stopped: {states:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("threads not stopped: {:?}", task_states(pid));
}
