//! Dump the fds of a real, frozen fdzoo (test/workloads/fdzoo.c) and recreate them here.
//!
//! fdzoo verifies every one of its fds each 50 ms without consuming anything; it must keep
//! `errors=0` after the dump (proof that the dump read nothing destructively) and after the
//! recreate (which runs on the same host, so its FIFO is the same inode). Network objects are
//! recreated inside a fresh network namespace made by a thread of this test (`unshare`), so the
//! TCP listener gets the same port while fdzoo still holds its own.
//!
//! Every fdzoo is killed by pid when its test ends (`Zoo` on drop). The tests take one lock so
//! that counting this process's open fds (the leak checks) sees no other test's fds.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tern_core::files::{
    apply_fixup, decode_fixups, dump_fds, encode_fixups, recreate_fds, FdFixup, FilesRestoreError,
    RecreateOptions, RecreatedFds,
};
use tern_core::image::fd::{FdImage, FdKindImage, PipeEnd};
use tern_core::proc::inspect;
use tern_core::ptrace::Tracer;
use tern_core::sys::Pid;

static SERIAL: Mutex<()> = Mutex::new(());

fn workloads() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../test/workloads")
}

fn build_fdzoo() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new("make")
                .arg("-C")
                .arg(workloads())
                .arg("bin/fdzoo")
                .status()
                .expect("run make");
            assert!(status.success(), "building fdzoo failed");
            workloads().join("bin/fdzoo")
        })
        .clone()
}

/// A running fdzoo, killed (SIGKILL, by pid) and reaped on drop; its scratch directory removed.
struct Zoo {
    child: Child,
    dir: PathBuf,
    status: PathBuf,
    keys: HashMap<String, String>,
}

impl Zoo {
    fn start(tag: &str) -> Zoo {
        let bin = build_fdzoo();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let status = dir.join("status");
        let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
        let mut child = Command::new(bin)
            .arg("--status")
            .arg(&status)
            .arg("--no-inotify")
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn fdzoo");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("ready "), "fdzoo said {line:?}");
        let keys = parse_keys(&line);
        Zoo {
            child,
            dir,
            status,
            keys,
        }
    }

    fn pid(&self) -> Pid {
        Pid::new(self.child.id() as i32).unwrap()
    }

    fn fd(&self, kind: &str) -> i32 {
        self.keys[&format!("fd_{kind}")].parse().unwrap()
    }

    fn num(&self, key: &str) -> u64 {
        self.keys[key].parse().unwrap()
    }

    fn status(&self) -> HashMap<String, String> {
        parse_keys(&std::fs::read_to_string(&self.status).unwrap_or_default())
    }

    /// Waits until fdzoo ran `more` further self-checks, and asserts it found no error.
    fn assert_intact(&self, more: u64, when: &str) {
        let start: u64 = self
            .status()
            .get("checks")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status();
            assert_eq!(
                s.get("errors").map(String::as_str),
                Some("0"),
                "fdzoo found an error {when}: {:?}",
                s.get("lasterror")
            );
            let checks: u64 = s.get("checks").and_then(|c| c.parse().ok()).unwrap_or(0);
            if checks >= start + more {
                return;
            }
            assert!(Instant::now() < deadline, "fdzoo stopped checking {when}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn dump(&self) -> Vec<FdImage> {
        let tracer = Tracer::new(self.pid()).unwrap();
        tracer.freeze().unwrap();
        let inventory = inspect(self.pid()).unwrap();
        let images = dump_fds(self.pid(), &inventory);
        tracer.thaw().unwrap();
        images.unwrap()
    }
}

impl Drop for Zoo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_keys(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn image(images: &[FdImage], fd: i32) -> &FdImage {
    images
        .iter()
        .find(|i| i.fd == fd)
        .unwrap_or_else(|| panic!("fd {fd} dumped"))
}

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Runs `f` on a thread that entered a new network namespace with lo up.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                assert_eq!(
                    // SAFETY: unshare takes a flag only; it moves this (scoped) thread alone into a
                    // new network namespace, which dies with its last socket.
                    unsafe { libc::unshare(libc::CLONE_NEWNET) },
                    0,
                    "unshare(CLONE_NEWNET)"
                );
                // A child forked from this thread starts in its network namespace.
                let up = Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .unwrap();
                assert!(up.success());
                f()
            })
            .join()
            .unwrap()
    })
}

fn fd_of(r: &RecreatedFds, target: i32) -> BorrowedFd<'_> {
    r.fds
        .iter()
        .find(|f| f.target_fd == target)
        .unwrap_or_else(|| panic!("target fd {target} recreated"))
        .fd
        .as_fd()
}

fn fionread(fd: BorrowedFd<'_>) -> i32 {
    let mut n = -1;
    assert_eq!(
        // SAFETY: FIONREAD writes one int to `n`.
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) },
        0
    );
    n
}

fn pread(fd: BorrowedFd<'_>, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is valid for len bytes of writes.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, 0) };
    assert!(n >= 0);
    buf.truncate(n as usize);
    buf
}

fn read(fd: BorrowedFd<'_>, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is valid for len bytes of writes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) };
    assert!(n >= 0, "read: {}", std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf
}

fn offset(fd: BorrowedFd<'_>) -> i64 {
    // SAFETY: integers only.
    unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_CUR) }
}

fn link(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn fdinfo_value(fd: BorrowedFd<'_>, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
        .unwrap_or_else(|| panic!("{key} in fdinfo"))
        .trim()
        .to_owned()
}

fn getflags(fd: BorrowedFd<'_>) -> i32 {
    // SAFETY: F_GETFL takes no argument.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
}

fn timerfd_gettime(fd: BorrowedFd<'_>) -> libc::itimerspec {
    // SAFETY: zeroed itimerspec is valid; the kernel fills it.
    let mut it: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: writes one itimerspec.
    assert_eq!(unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut it) }, 0);
    it
}

fn nanos(ts: libc::timespec) -> i128 {
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

#[test]
fn fdzoo_dump_keeps_it_intact_and_every_kind_recreates() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let zoo = Zoo::start("roundtrip");
    zoo.assert_intact(2, "before the dump");
    let images = zoo.dump();
    zoo.assert_intact(
        6,
        "after the dump (the dump must consume and change nothing)",
    );

    for i in &images {
        println!(
            "fd {:>2} cloexec={} flags={:#o} {:?}",
            i.fd, i.cloexec, i.flags, i.kind
        );
    }
    // --- the image ---
    let kind_of = |k: &str| image(&images, zoo.fd(k)).kind.clone();
    assert!(
        matches!(kind_of("regular"), FdKindImage::Regular { offset: 3, ref path, .. } if path.ends_with("fdzoo-regular"))
    );
    match kind_of("deleted") {
        FdKindImage::Deleted {
            offset,
            content,
            size,
            ..
        } => {
            assert_eq!((offset, size, &content.0[..]), (5, 5, &b"ghost"[..]))
        }
        other => panic!("deleted: {other:?}"),
    }
    let (
        FdKindImage::Pipe {
            id: rid,
            end: PipeEnd::Read,
            data: rdata,
            ..
        },
        FdKindImage::Pipe {
            id: wid,
            end: PipeEnd::Write,
            data: wdata,
            ..
        },
    ) = (kind_of("pipe_r"), kind_of("pipe_w"))
    else {
        panic!("pipe ends: {:?} {:?}", kind_of("pipe_r"), kind_of("pipe_w"))
    };
    assert_eq!(rid, wid);
    let pipe_data = rdata.or(wdata).expect("pipe data carried once");
    assert_eq!(pipe_data.0, b"pipe!");
    assert!(
        matches!(kind_of("fifo"), FdKindImage::Fifo { data: Some(ref d), .. } if d.0 == b"fif")
    );
    assert_eq!(
        kind_of("eventfd"),
        FdKindImage::Eventfd {
            count: 7,
            semaphore: false
        }
    );
    assert_ne!(
        image(&images, zoo.fd("eventfd")).flags & libc::O_NONBLOCK as u32,
        0
    );
    assert_eq!(
        kind_of("signalfd"),
        FdKindImage::Signalfd {
            sigmask: 1 << (libc::SIGUSR2 - 1)
        }
    );
    let FdKindImage::Timerfd {
        value,
        interval,
        clockid,
        ..
    } = kind_of("timerfd")
    else {
        panic!()
    };
    assert_eq!(
        (clockid, interval.sec, interval.nsec),
        (libc::CLOCK_MONOTONIC, 5, 0)
    );
    assert!(value.sec <= 10 && !value.is_zero());
    let FdKindImage::Epoll { targets } = kind_of("epoll") else {
        panic!()
    };
    let mut tags: Vec<(i32, u64)> = targets.iter().map(|t| (t.tfd, t.data)).collect();
    tags.sort();
    let mut want = vec![(zoo.fd("eventfd"), 0xE1E1), (zoo.fd("pipe_r"), 0xB2B2)];
    want.sort();
    assert_eq!(tags, want);
    assert!(
        matches!(kind_of("memfd"), FdKindImage::Memfd { ref name, size: 4096, .. } if name == "tern-memfd")
    );
    let (
        FdKindImage::UnixPair {
            pair: pa,
            side: sa,
            queue: qa,
            ..
        },
        FdKindImage::UnixPair {
            pair: pb,
            side: sb,
            queue: qb,
            ..
        },
    ) = (kind_of("unix_a"), kind_of("unix_b"))
    else {
        panic!()
    };
    assert_eq!(pa, pb);
    assert_ne!(sa, sb);
    assert!(qa.is_empty());
    assert_eq!(
        qb.iter().map(|b| b.0.clone()).collect::<Vec<_>>(),
        vec![b"unix".to_vec()]
    );
    let tcp_port = zoo.num("tcp_port") as u16;
    let udp_port = zoo.num("udp_port") as u16;
    assert!(
        matches!(kind_of("tcp"), FdKindImage::TcpListen { ref local, backlog: 16, ref options, .. } if local.port == tcp_port && options.reuseaddr)
    );
    assert!(
        matches!(kind_of("udp"), FdKindImage::Udp { local: Some(ref l), peer: None, .. } if l.port == udp_port)
    );
    assert!(matches!(
        kind_of("devnull"),
        FdKindImage::Device {
            major: 1,
            minor: 3,
            ..
        }
    ));
    assert_eq!(
        image(&images, zoo.fd("devnull")).flags as i32 & libc::O_ACCMODE,
        libc::O_WRONLY
    );
    // msgpack round trip of the real image.
    let bytes = rmp_serde::to_vec_named(&images).unwrap();
    let back: Vec<FdImage> = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, images);

    // --- recreate: files here, sockets in a fresh network namespace ---
    let before = open_fd_count();
    let (recreated, netcheck) = in_fresh_netns(|| {
        let r = recreate_fds(&images, &RecreateOptions::default()).expect("recreate");
        // The listener accepts on the same port.
        let client = std::net::TcpStream::connect(("127.0.0.1", tcp_port))
            .expect("connect to the recreated listener");
        let listener = fd_of(&r, zoo.fd("tcp"));
        // SAFETY: accept4 with null address arguments.
        let accepted = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        assert!(accepted >= 0, "accept: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd from accept4, owned here.
        drop(unsafe { OwnedFd::from_raw_fd(accepted) });
        drop(client);
        // The UDP socket is bound to the same port and receives.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"dgram", ("127.0.0.1", udp_port)).unwrap();
        let udp = fd_of(&r, zoo.fd("udp"));
        std::thread::sleep(Duration::from_millis(20));
        let got = read(udp, 64);
        (r, got)
    });
    assert_eq!(netcheck, b"dgram");
    assert_eq!(open_fd_count(), before + recreated.fds.len());
    let fd = |k: &str| fd_of(&recreated, zoo.fd(k));

    assert_eq!(
        (offset(fd("regular")), pread(fd("regular"), 16)),
        (3, b"hello".to_vec())
    );
    assert_eq!(
        (offset(fd("deleted")), pread(fd("deleted"), 16)),
        (5, b"ghost".to_vec())
    );
    assert!(
        link(fd("deleted")).ends_with(" (deleted)"),
        "{}",
        link(fd("deleted"))
    );
    assert_eq!(
        link(fd("dir")),
        zoo.dir.canonicalize().unwrap().to_string_lossy()
    );
    // Pipe: the data is there, once, and the two ends are one pipe.
    assert_eq!(fionread(fd("pipe_r")), 5);
    assert_eq!(read(fd("pipe_r"), 64), b"pipe!");
    assert_eq!(
        // SAFETY: writes 3 bytes from a static buffer.
        unsafe { libc::write(fd("pipe_w").as_raw_fd(), b"abc".as_ptr().cast(), 3) },
        3
    );
    assert_eq!(read(fd("pipe_r"), 64), b"abc");
    // FIFO: same inode as fdzoo's (one host), so its 3 bytes must still be exactly there, once.
    assert_eq!(fionread(fd("fifo")), 3);
    assert!(link(fd("fifo")).ends_with("fdzoo-fifo"));
    // eventfd counter, signalfd mask, timerfd settings.
    assert_eq!(read(fd("eventfd"), 8), 7u64.to_ne_bytes());
    assert_ne!(getflags(fd("eventfd")) & libc::O_NONBLOCK, 0);
    assert_eq!(
        fdinfo_value(fd("signalfd"), "sigmask"),
        format!("{:016x}", 1u64 << (libc::SIGUSR2 - 1))
    );
    let it = timerfd_gettime(fd("timerfd"));
    assert_eq!((it.it_interval.tv_sec, it.it_interval.tv_nsec), (5, 0));
    assert!(nanos(it.it_value) > 0 && nanos(it.it_value) <= value.as_nanos());
    assert_eq!(
        fdinfo_value(fd("timerfd"), "clockid"),
        libc::CLOCK_MONOTONIC.to_string()
    );
    // memfd.
    let pattern: Vec<u8> = (0..4096usize)
        .map(|i| (i * 7 + (i >> 8) * 13 + 1) as u8)
        .collect();
    assert_eq!(pread(fd("memfd"), 8192), pattern);
    assert!(link(fd("memfd")).starts_with("/memfd:tern-memfd"));
    // Unix pair: "unix" waits on b; a is empty; a → b still works.
    assert_eq!((fionread(fd("unix_a")), fionread(fd("unix_b"))), (0, 4));
    assert_eq!(read(fd("unix_b"), 64), b"unix");
    assert_eq!(
        // SAFETY: writes 2 bytes from a static buffer.
        unsafe { libc::write(fd("unix_a").as_raw_fd(), b"ok".as_ptr().cast(), 2) },
        2
    );
    assert_eq!(read(fd("unix_b"), 64), b"ok");
    // Devices and access modes.
    assert_eq!(link(fd("devnull")), "/dev/null");
    assert_eq!(getflags(fd("devnull")) & libc::O_ACCMODE, libc::O_WRONLY);
    assert_eq!(link(fd("urandom")), "/dev/urandom");
    // cloexec is remembered per fd (fdzoo opened everything without O_CLOEXEC).
    for f in &recreated.fds {
        assert_eq!(f.cloexec, image(&images, f.target_fd).cloexec);
    }

    // Epoll: the fixups are the registrations; applied with our numbers for the targets (the
    // stub applies them with the final numbers) they report both tags.
    let epfd = zoo.fd("epoll");
    let mut fixups = recreated.fixups.clone();
    fixups.sort_by_key(|f| match f {
        FdFixup::EpollAdd { tfd, .. } => *tfd,
    });
    let mut want_fixups: Vec<FdFixup> = targets
        .iter()
        .map(|t| FdFixup::EpollAdd {
            epfd,
            tfd: t.tfd,
            events: t.events,
            data: t.data,
        })
        .collect();
    want_fixups.sort_by_key(|f| match f {
        FdFixup::EpollAdd { tfd, .. } => *tfd,
    });
    assert_eq!(fixups, want_fixups);
    assert_eq!(
        decode_fixups(&encode_fixups(&recreated.fixups)).unwrap(),
        recreated.fixups
    );
    // Fill the eventfd and the pipe again, then apply the plan with our fd numbers.
    // SAFETY: writes 8 bytes / 1 byte from locals.
    unsafe {
        libc::write(
            fd("eventfd").as_raw_fd(),
            7u64.to_ne_bytes().as_ptr().cast(),
            8,
        );
        libc::write(fd("pipe_w").as_raw_fd(), b"x".as_ptr().cast(), 1);
    }
    let ours = |n: i32| -> RawFd { fd_of(&recreated, n).as_raw_fd() };
    for f in &recreated.fixups {
        let FdFixup::EpollAdd {
            epfd,
            tfd,
            events,
            data,
        } = *f;
        apply_fixup(&FdFixup::EpollAdd {
            epfd: ours(epfd),
            tfd: ours(tfd),
            events,
            data,
        })
        .unwrap();
    }
    // SAFETY: zeroed epoll_event array is valid; epoll_wait writes at most 8 entries.
    let mut events: [libc::epoll_event; 8] = unsafe { std::mem::zeroed() };
    // SAFETY: as above, timeout 0.
    let n = unsafe { libc::epoll_wait(ours(epfd), events.as_mut_ptr(), 8, 0) };
    let mut seen: Vec<u64> = events[..n.max(0) as usize].iter().map(|e| e.u64).collect();
    seen.sort();
    assert_eq!(seen, vec![0xB2B2, 0xE1E1]);

    zoo.assert_intact(4, "after the recreate");
    drop(recreated);
    assert_eq!(
        open_fd_count(),
        before,
        "dropping the recreated fds closes them all"
    );
}

#[test]
fn changed_missing_and_busy_fail_cleanly_without_leaks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let zoo = Zoo::start("failures");
    let images = zoo.dump();
    let regular = zoo.dir.canonicalize().unwrap().join("fdzoo-regular");

    // mtime changed (fdzoo checks content and size, not mtime: it stays intact).
    let before = open_fd_count();
    let c = std::ffi::CString::new(regular.to_str().unwrap()).unwrap();
    let times = [libc::timespec {
        tv_sec: 1_000_000,
        tv_nsec: 0,
    }; 2];
    assert_eq!(
        // SAFETY: c is NUL-terminated; times points at two timespecs.
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let err = recreate_fds(&images, &RecreateOptions::default()).unwrap_err();
    match &err {
        FilesRestoreError::FileChanged { fd, path, what } => {
            assert_eq!(*fd, zoo.fd("regular"));
            assert_eq!(Path::new(path), regular);
            assert!(what.contains("mtime"), "{what}");
        }
        other => panic!("expected FileChanged, got {other}"),
    }
    assert!(err.to_string().contains("fdzoo-regular"), "{err}");
    assert_eq!(open_fd_count(), before, "nothing leaked");

    // Missing on the destination (the image names a path that does not exist).
    let mut moved = zoo.dump();
    for i in &mut moved {
        if let FdKindImage::Regular { path, .. } = &mut i.kind {
            if path.ends_with("fdzoo-regular") {
                *path = format!("{path}-gone");
            }
        }
    }
    match recreate_fds(&moved, &RecreateOptions::default()) {
        Err(FilesRestoreError::Missing { fd, path }) => {
            assert_eq!(fd, zoo.fd("regular"));
            assert!(path.ends_with("fdzoo-regular-gone"));
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    assert_eq!(open_fd_count(), before);

    // The TCP port is still held by fdzoo in this namespace: a clear AddressInUse, after every
    // earlier fd was built — and all of them closed again.
    let fresh = zoo.dump();
    match recreate_fds(&fresh, &RecreateOptions::default()) {
        Err(FilesRestoreError::AddressInUse { fd, address, .. }) => {
            assert_eq!(fd, zoo.fd("tcp"));
            assert_eq!(address, format!("127.0.0.1:{}", zoo.num("tcp_port")));
        }
        other => panic!("expected AddressInUse, got {other:?}"),
    }
    assert_eq!(open_fd_count(), before);
    // A deleted file's stand-in is unlinked at once: nothing new in fdzoo's directory.
    let names: Vec<String> = std::fs::read_dir(&zoo.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fdzoo-"))
        .collect();
    assert!(!names.iter().any(|n| n.contains("ghost")), "{names:?}");
    zoo.assert_intact(4, "after the failed recreates");
}
