//! Inspection and checking of real processes.
//!
//! Every process here is started by the test itself and killed by pid when the test ends, pass
//! or fail ([`Spawned`] does it on drop). The only process not ours that is looked at is pid 2
//! (kthreadd), and only its /proc/2/stat, read-only. Needs root (the engine's own requirement).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tern_core::check::{check, validate_target, TargetError};
use tern_core::proc::fd::{FdKind, SocketKind};
use tern_core::proc::net::{SocketState, UnixState, UnixType};
use tern_core::proc::{inspect, InspectError, ProcessInventory, TaskState, VmaKind};
use tern_core::sys::Pid;

/// A child process of this test, killed and reaped on drop, with any grandchildren we learned
/// about killed first (while the child is alive their pids cannot be reused).
struct Spawned {
    child: Child,
    grandchildren: Vec<i32>,
    scratch: Option<PathBuf>,
}

impl Spawned {
    fn new(child: Child) -> Spawned {
        Spawned {
            child,
            grandchildren: Vec::new(),
            scratch: None,
        }
    }

    fn pid(&self) -> Pid {
        Pid::new(self.child.id() as i32).expect("a child has a valid pid")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for &pid in &self.grandchildren {
            // SAFETY: kill(2) with a pid we learned from our own child's children list; the child
            // has not been reaped by us yet, so its unreaped children's pids are still theirs.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("inspect-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating scratch dir");
    dir
}

/// Compiles tests/workloads/fd_zoo.c once per test binary.
fn fd_zoo_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/fd_zoo.c");
        // Named exactly fd_zoo, since the test checks its comm; one directory per test binary run.
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fd_zoo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating fd_zoo build dir");
        let out = dir.join("fd_zoo");
        let status = Command::new("cc")
            .arg("-O1")
            .arg("-o")
            .arg(&out)
            .arg(&source)
            .status()
            .expect("running cc");
        assert!(status.success(), "compiling {}", source.display());
        out
    })
}

/// Detaches a child from our session so it never has a controlling terminal, and makes it start
/// with only the fds the test gives it (not whatever the test runner let this process inherit).
fn isolated(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and makes only two raw syscalls,
    // both async-signal-safe, touching no memory. CLOSE_RANGE_CLOEXEC (rather than closing) keeps
    // std's own exec-error pipe working until the exec.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        })
    }
}

/// Starts fd_zoo, waits for "ready", returns the process and its "name value" lines.
fn spawn_zoo(tag: &str, fork: bool) -> (Spawned, HashMap<String, i64>) {
    let dir = scratch_dir(tag);
    let mut command = Command::new(fd_zoo_binary());
    command
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if fork {
        command.arg("fork");
    }
    let mut spawned = Spawned::new(isolated(&mut command).spawn().expect("spawning fd_zoo"));
    spawned.scratch = Some(dir);
    let stdout = spawned.child.stdout.take().unwrap();
    let mut values = HashMap::new();
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line == "ready" {
            ready = true;
            break;
        }
        let (name, value) = line.split_once(' ').unwrap();
        values.insert(name.to_owned(), value.parse().unwrap());
    }
    if !ready {
        let mut errors = String::new();
        let _ = spawned
            .child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut errors);
        panic!("fd_zoo failed before ready: {errors}");
    }
    if let Some(&child) = values.get("child") {
        spawned.grandchildren.push(child as i32);
    }
    (spawned, values)
}

fn fd_kind(inventory: &ProcessInventory, fd: i64) -> &FdKind {
    &inventory
        .fds
        .iter()
        .find(|f| i64::from(f.fd) == fd)
        .unwrap_or_else(|| panic!("fd {fd} listed"))
        .kind
}

#[test]
fn fd_zoo_is_classified() {
    let (zoo, v) = spawn_zoo("classify", false);
    let inventory = inspect(zoo.pid()).expect("inspecting fd_zoo");
    let dir = zoo.scratch.as_ref().unwrap().to_str().unwrap().to_owned();
    let fd = |name: &str| fd_kind(&inventory, v[name]);
    let raw = |name: &str| {
        inventory
            .fds
            .iter()
            .find(|f| i64::from(f.fd) == v[name])
            .unwrap()
    };

    assert_eq!(inventory.comm, "fd_zoo");
    assert_eq!(inventory.threads.len(), 1);
    assert_eq!(inventory.ns_pid, zoo.pid().as_raw());

    let FdKind::Pipe { inode } = fd("pipe_read") else {
        panic!("{:?}", fd("pipe_read"))
    };
    assert_eq!(fd("pipe_write"), &FdKind::Pipe { inode: *inode });
    assert!(matches!(fd("fifo"), FdKind::Fifo { path, .. } if *path == format!("{dir}/fifo")));
    assert!(matches!(fd("eventfd"), FdKind::Eventfd { count: 42, .. }));

    let FdKind::Epoll { targets } = fd("epoll") else {
        panic!("{:?}", fd("epoll"))
    };
    let targets: Vec<(i64, u64)> = targets.iter().map(|t| (i64::from(t.tfd), t.data)).collect();
    assert_eq!(targets.len(), 2);
    assert!(
        targets.contains(&(v["eventfd"], 0x1111)) && targets.contains(&(v["pipe_read"], 0x2222))
    );

    let FdKind::Timerfd(timer) = fd("timerfd") else {
        panic!("{:?}", fd("timerfd"))
    };
    assert_eq!(timer.clockid, libc::CLOCK_MONOTONIC);
    assert_eq!(
        (timer.it_interval.sec, timer.it_interval.nsec),
        (2, 500_000_000)
    );
    assert!((900..=1000).contains(&timer.it_value.sec), "{timer:?}");

    let usr = (1u64 << (libc::SIGUSR1 - 1)) | (1u64 << (libc::SIGUSR2 - 1));
    assert_eq!(fd("signalfd"), &FdKind::Signalfd { sigmask: usr });
    assert_eq!(inventory.status.sig_blk & usr, usr);

    let FdKind::Inotify { watches } = fd("inotify") else {
        panic!("{:?}", fd("inotify"))
    };
    assert_eq!(watches.len(), 1);
    assert_eq!(watches[0].mask, libc::IN_CREATE | libc::IN_DELETE);

    assert_eq!(
        fd("memfd"),
        &FdKind::Memfd {
            name: "tern-zoo".into(),
            size: 8192
        }
    );
    assert_eq!(fd("io_uring"), &FdKind::IoUring);
    assert_eq!(
        fd("devnull"),
        &FdKind::CharDevice {
            path: "/dev/null".into(),
            major: 1,
            minor: 3
        }
    );
    assert_eq!(fd("directory"), &FdKind::Directory { path: dir.clone() });
    assert_eq!(
        fd("regular"),
        &FdKind::RegularFile {
            path: format!("{dir}/regular"),
            size: 10000,
            deleted: false
        }
    );
    assert_eq!(raw("regular").pos, 1234);
    assert_ne!(raw("regular").flags & libc::O_APPEND as u32, 0);
    assert_eq!(
        fd("deleted"),
        &FdKind::RegularFile {
            path: format!("{dir}/deleted"),
            size: 100,
            deleted: true
        }
    );
    assert_eq!(raw("deleted").pos, 100);

    let socket = |name: &str| match fd(name) {
        FdKind::Socket { socket, .. } => socket.clone(),
        other => panic!("{name} is {other:?}"),
    };
    for name in ["unix_a", "unix_b"] {
        let SocketKind::Unix(unix) = socket(name) else {
            panic!("{name}")
        };
        assert_eq!(
            (unix.socket_type, unix.state, unix.path),
            (UnixType::Stream, UnixState::Connected, None)
        );
    }
    let SocketKind::Unix(listener) = socket("unix_listen") else {
        panic!()
    };
    assert_eq!(listener.socket_type, UnixType::Seqpacket);
    assert!(listener.listening);
    assert_eq!(listener.path, Some(format!("{dir}/sock")));

    let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let SocketKind::Tcp(tcp) = socket("tcp_listen") else {
        panic!("{:?}", socket("tcp_listen"))
    };
    assert_eq!(tcp.state, SocketState::Listen);
    assert_eq!(
        tcp.local.map(|l| (l.address, i64::from(l.port))),
        Some((loopback, v["tcp_port"]))
    );
    let SocketKind::Tcp(client) = socket("tcp_client") else {
        panic!()
    };
    assert_eq!(client.state, SocketState::Established);
    assert_eq!(
        client.local.map(|l| i64::from(l.port)),
        Some(v["tcp_client_port"])
    );
    assert_eq!(
        client.remote.map(|r| (r.address, i64::from(r.port))),
        Some((loopback, v["tcp_port"]))
    );
    let SocketKind::Tcp(accepted) = socket("tcp_accepted") else {
        panic!()
    };
    assert_eq!(accepted.state, SocketState::Established);
    assert_eq!(
        accepted.remote.map(|r| i64::from(r.port)),
        Some(v["tcp_client_port"])
    );
    if v.contains_key("tcp6_listen") {
        let SocketKind::Tcp6(six) = socket("tcp6_listen") else {
            panic!()
        };
        assert_eq!(six.state, SocketState::Listen);
        assert_eq!(
            six.local
                .map(|l| (l.address.to_string(), i64::from(l.port))),
            Some(("::1".into(), v["tcp6_port"]))
        );
    }
    let SocketKind::Udp(udp) = socket("udp") else {
        panic!("{:?}", socket("udp"))
    };
    assert_eq!(
        udp.local.map(|l| (l.address, i64::from(l.port))),
        Some((loopback, v["udp_port"]))
    );
    // Unbound, so absent from /proc/net/netlink: named by sockfs, protocol unknown.
    assert_eq!(
        socket("netlink"),
        SocketKind::Netlink {
            netlink_protocol: None
        }
    );

    let vma_at = |name: &str| {
        let address = v[name] as u64;
        inventory
            .vmas
            .iter()
            .find(|m| m.start == address)
            .unwrap_or_else(|| panic!("vma {name} at {address:#x}"))
    };
    assert_eq!(vma_at("shared_anon").kind, VmaKind::SharedAnon);
    assert_eq!(vma_at("shared_anon").len(), 3 * 4096);
    assert_eq!(vma_at("guard").kind, VmaKind::Guard);
    assert_eq!(vma_at("sysv_shm").kind, VmaKind::SysvShm);
    assert!(inventory.vmas.iter().any(|m| m.kind == VmaKind::VvarVclock));

    let summary = inventory.summary();
    let fd_count = |kind: &str| {
        summary
            .fd_kinds
            .iter()
            .find(|k| k.kind == kind)
            .map_or(0, |k| k.count)
    };
    assert!(fd_count("socket") >= 9);
    assert_eq!(fd_count("io-uring"), 1);

    // The verdict: every blocker of the zoo, in order, by fd number.
    let report = check(&inventory);
    assert!(!report.movable);
    let blocker = |subject: String, kind: &str| {
        report
            .blockers
            .iter()
            .any(|b| b.subject == subject && b.kind == kind)
    };
    assert!(
        blocker(format!("fd {}", v["io_uring"]), "io-uring"),
        "{:#?}",
        report.blockers
    );
    assert!(blocker(format!("fd {}", v["inotify"]), "inotify"));
    assert!(blocker(format!("fd {}", v["netlink"]), "netlink-socket"));
    let sysv = vma_at("sysv_shm");
    assert!(blocker(
        format!("vma {:x}-{:x}", sysv.start, sysv.end),
        "sysv-shm"
    ));
    let expected_kinds = ["inotify", "netlink-socket", "io-uring", "sysv-shm"];
    let kinds: Vec<&str> = report.blockers.iter().map(|b| b.kind.as_str()).collect();
    assert_eq!(
        kinds, expected_kinds,
        "nothing else blocks: {:#?}",
        report.blockers
    );
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("shared anonymous")));

    // What TypeScript receives survives the round trip.
    let json = serde_json::to_string(&inventory).unwrap();
    let back: ProcessInventory = serde_json::from_str(&json).unwrap();
    assert_eq!(back.fds, inventory.fds);
    assert_eq!(back.vmas, inventory.vmas);
}

#[test]
fn children_block_the_move() {
    let (zoo, v) = spawn_zoo("children", true);
    let inventory = inspect(zoo.pid()).unwrap();
    assert_eq!(
        inventory
            .children
            .iter()
            .map(|p| i64::from(p.as_raw()))
            .collect::<Vec<_>>(),
        vec![v["child"]]
    );
    let report = check(&inventory);
    let children = report
        .blockers
        .iter()
        .find(|b| b.kind == "children")
        .expect("children blocker");
    assert_eq!(children.subject, "process");
    assert!(children.reason.contains(&v["child"].to_string()));
}

fn spawn_sleep() -> Spawned {
    let mut command = Command::new("sleep");
    command
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Spawned::new(isolated(&mut command).spawn().expect("spawning sleep"))
}

/// Waits until /proc/PID/stat shows `wanted` (a child needs a moment to exit).
fn wait_for_state(pid: Pid, wanted: TaskState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = tern_core::proc::stat::read_stat(pid).unwrap();
        if stat.state == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never reached {wanted:?}: {stat:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the exec of `comm` happened (before that, /proc shows a copy of the test binary).
fn wait_for_exec(pid: Pid, comm: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tern_core::proc::stat::read_stat(pid).unwrap().comm != comm {
        assert!(Instant::now() < deadline, "pid {pid} never became {comm}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `pid` is blocked in nanosleep/clock_nanosleep. Right after the exec, sleep is
/// still setting up its locale and briefly holds /usr/lib/locale files open; only once it sleeps
/// is its fd table the steady 0, 1, 2.
fn wait_for_nanosleep(pid: Pid) {
    const NANOSLEEP: i64 = libc::SYS_nanosleep;
    const CLOCK_NANOSLEEP: i64 = libc::SYS_clock_nanosleep;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let number = syscall.split_whitespace().next().and_then(|n| n.parse::<i64>().ok());
        if matches!(number, Some(NANOSLEEP | CLOCK_NANOSLEEP)) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} never went to sleep: {syscall:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn plain_sleep_is_movable() {
    let sleep = spawn_sleep();
    wait_for_exec(sleep.pid(), "sleep");
    wait_for_nanosleep(sleep.pid());
    assert_eq!(
        validate_target(i64::from(sleep.pid().as_raw())).unwrap(),
        sleep.pid()
    );
    let inventory = inspect(sleep.pid()).unwrap();
    assert_eq!(inventory.cmdline, vec!["sleep", "1000"]);
    assert!(inventory
        .exe
        .as_deref()
        .is_some_and(|e| e.ends_with("/sleep")));
    assert_eq!(inventory.fds.len(), 3, "{:#?}", inventory.fds);
    let report = check(&inventory);
    assert!(report.movable, "{:#?}", report.blockers);
    assert!(report.blockers.is_empty());
    assert_eq!(report.summary.threads, 1);
    assert!(report.resident_bytes > 0);
}

#[test]
fn vanished_process_is_gone() {
    let mut sleep = spawn_sleep();
    let pid = sleep.pid();
    sleep.child.kill().unwrap();
    sleep.child.wait().unwrap();
    assert!(matches!(inspect(pid), Err(InspectError::Gone(p)) if p == pid));
    assert!(
        matches!(validate_target(i64::from(pid.as_raw())), Err(TargetError::NoSuchProcess(p)) if p == pid)
    );
}

#[test]
fn refuses_bad_pids() {
    for raw in [0, -1, i64::from(i32::MAX) + 1] {
        assert!(matches!(validate_target(raw), Err(TargetError::InvalidPid(r)) if r == raw));
    }
    let own = validate_target(i64::from(Pid::this().as_raw())).unwrap_err();
    assert!(matches!(own, TargetError::OwnProcess(_)), "{own}");
    assert!(own.to_string().contains(&Pid::this().to_string()));

    let missing = (1..1000)
        .map(|k| i32::MAX - k)
        .find(|n| !Path::new(&format!("/proc/{n}")).exists())
        .unwrap();
    let error = validate_target(i64::from(missing)).unwrap_err();
    assert!(
        matches!(error, TargetError::NoSuchProcess(p) if p.as_raw() == missing),
        "{error}"
    );

    // Our parent (cargo's test runner or a shell): refused from our own ancestry, never read.
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() };
    if parent > 1 {
        assert!(matches!(
            validate_target(i64::from(parent)),
            Err(TargetError::Ancestor(_))
        ));
    }

    // A thread of this process: tests run on threads other than the main one.
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    if tid != Pid::this().as_raw() {
        let error = validate_target(i64::from(tid)).unwrap_err();
        assert!(
            matches!(error, TargetError::NotAProcess { tgid, .. } if tgid == Pid::this().as_raw()),
            "{error}"
        );
    }
}

#[test]
fn refuses_kernel_thread() {
    // pid 2 is kthreadd in the initial pid namespace; only its stat is read.
    let stat = std::fs::read_to_string("/proc/2/stat").unwrap_or_default();
    if !stat.starts_with("2 (kthreadd)") {
        eprintln!("skipping: pid 2 is not kthreadd here");
        return;
    }
    let error = validate_target(2).unwrap_err();
    assert!(matches!(error, TargetError::KernelThread(_)), "{error}");
    assert_eq!(error.to_string(), "pid 2 is a kernel thread");
}

#[test]
fn refuses_zombie() {
    let mut command = Command::new("true");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let zombie = Spawned::new(command.spawn().unwrap());
    // Not reaped until the guard drops: it stays a zombie meanwhile.
    wait_for_state(zombie.pid(), TaskState::Zombie);
    let error = validate_target(i64::from(zombie.pid().as_raw())).unwrap_err();
    assert!(matches!(error, TargetError::Zombie(_)), "{error}");
    let inventory = inspect(zombie.pid()).unwrap();
    assert!(inventory.exe.is_none() && inventory.vmas.is_empty());
    assert!(check(&inventory)
        .blockers
        .iter()
        .any(|b| b.kind == "zombie"));
}

#[test]
fn refuses_pid_namespace_init() {
    if Command::new("unshare").arg("--version").output().is_err() {
        eprintln!("skipping: no unshare(1)");
        return;
    }
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut unshare = Spawned::new(isolated(&mut command).spawn().unwrap());
    let parent = unshare.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    let init = loop {
        let children = tern_core::proc::tasks::read_children(parent).unwrap();
        if let Some(&child) = children.first() {
            break child;
        }
        assert!(Instant::now() < deadline, "unshare never forked");
        std::thread::sleep(Duration::from_millis(10));
    };
    unshare.grandchildren.push(init.as_raw());
    wait_for_exec(init, "sleep");
    let error = validate_target(i64::from(init.as_raw())).unwrap_err();
    assert!(matches!(error, TargetError::PidNamespaceInit(_)), "{error}");
    let inventory = inspect(init).unwrap();
    assert_eq!(inventory.ns_pid, 1);
    assert!(inventory
        .namespaces
        .pid
        .is_some_and(|ns| !ns.same_as_engine));
}
