//! Freezing and thawing real multi-threaded processes with [`Tracer`].
//!
//! Every test runs its own `tracee` child (see tests/tracee), so the tests run in parallel.

mod tracee;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tern_core::ptrace::{FreezeError, Tracer, TracerError};
use tern_core::sys::Pid;
use tracee::{assert_all_traced, task_states, wait_until, Tracee};

fn not_traced(pid: Pid) -> bool {
    let states = task_states(pid);
    !states.is_empty() && states.iter().all(|&(_, s)| s != 't')
}

#[test]
fn freeze_holds_every_thread_and_blocked_calls_resume_without_eintr() {
    let t = Tracee::spawn("counter", 3000);
    t.wait_blocked();
    let tracer = Tracer::new(t.pid).unwrap();
    assert_eq!(tracer.pid(), t.pid);
    assert!(!tracer.is_frozen());

    let report = tracer.freeze().unwrap();
    assert!(tracer.is_frozen());
    let tids = assert_all_traced(t.pid);
    assert_eq!(
        report.threads, tids,
        "the report names exactly the threads of the process"
    );
    assert_eq!(tids.len(), 5);
    let frozen_counter = t.counter();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(t.counter(), frozen_counter, "nothing runs while frozen");

    let regs = tracer.registers().unwrap();
    assert_eq!(regs.iter().map(|r| r.tid).collect::<Vec<_>>(), tids);
    for r in &regs {
        assert_ne!(r.regs.rip, 0, "tid {} rip", r.tid);
        assert_ne!(r.regs.rsp, 0, "tid {} rsp", r.tid);
        assert_eq!(r.fs_base, r.regs.fs_base);
        assert_ne!(r.fs_base, 0, "glibc threads have a TLS base");
        assert!(r.xstate.size > 512 && r.xstate.bytes.len() == r.xstate.size);
        assert_eq!(r.in_syscall, r.syscall_nr.is_some());
        println!(
            "tid {} rip={:#x} inSyscall={} nr={:?} rax={} xstate={}B bv={:#x} rseq={:?}",
            r.tid,
            r.regs.rip,
            r.in_syscall,
            r.syscall_nr,
            r.regs.rax as i64,
            r.xstate.size,
            r.xstate.xstate_bv,
            r.rseq.as_ref().map(|c| c.signature)
        );
    }
    let blocked = regs.iter().filter(|r| r.in_syscall).count();
    assert!(
        blocked >= 4,
        "the four blocked roles are inside syscalls ({blocked})"
    );
    let json = serde_json::to_value(&regs[0]).unwrap();
    for key in [
        "tid",
        "regs",
        "fsBase",
        "gsBase",
        "xstate",
        "inSyscall",
        "syscallNr",
        "rseq",
    ] {
        assert!(json.get(key).is_some(), "ThreadRegisters JSON has {key}");
    }
    assert!(json["xstate"].get("xstateBv").is_some());
    assert!(json["regs"].get("origRax").is_some());

    let thaw = tracer.thaw().unwrap();
    assert!(!tracer.is_frozen());
    println!(
        "freeze {} µs, thaw {} µs",
        report.elapsed_ns / 1000,
        thaw.elapsed_ns / 1000
    );
    t.wait_counter_moves();

    // 50 more cycles, timed.
    let (mut freeze_ns, mut thaw_ns) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let f = tracer.freeze().unwrap();
        assert_eq!(f.threads.len(), 5);
        freeze_ns.push(f.elapsed_ns);
        thaw_ns.push(tracer.thaw().unwrap().elapsed_ns);
    }
    freeze_ns.sort();
    thaw_ns.sort();
    println!(
        "50 cycles, 5 threads: freeze p50 {} µs max {} µs; thaw p50 {} µs max {} µs",
        freeze_ns[25] / 1000,
        freeze_ns[49] / 1000,
        thaw_ns[25] / 1000,
        thaw_ns[49] / 1000
    );
    t.wait_counter_moves();
    assert!(not_traced(t.pid));
    t.assert_roles_completed_cleanly();
    assert_eq!(t.sigusr1(), 0);
}

#[test]
fn threads_created_during_the_freeze_are_caught() {
    let t = Tracee::spawn("spawn", 0);
    wait_until("spawner runs", Duration::from_secs(10), || {
        t.spawned() > 100
    });
    let tracer = Tracer::new(t.pid).unwrap();
    let mut sizes = BTreeSet::new();
    for _ in 0..30 {
        let report = tracer.freeze().unwrap();
        let tids = assert_all_traced(t.pid);
        assert_eq!(report.threads, tids);
        sizes.insert(tids.len());
        let spawned = t.spawned();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(t.spawned(), spawned, "no thread runs while frozen");
        tracer.thaw().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("thread counts seen while frozen: {sizes:?}");
    let before = t.spawned();
    wait_until("spawning resumes", Duration::from_secs(5), || {
        t.spawned() > before + 100
    });
    t.wait_counter_moves();
}

#[test]
fn a_signal_sent_while_frozen_is_delivered_exactly_once() {
    for inject in [false, true] {
        let t = Tracee::spawn("counter", 500);
        t.wait_blocked();
        let tracer = Tracer::new(t.pid).unwrap();
        tracer.freeze().unwrap();
        // SAFETY: kill takes two integers; the pid is our own child.
        assert_eq!(unsafe { libc::kill(t.pid.as_raw(), libc::SIGUSR1) }, 0);
        std::thread::sleep(Duration::from_millis(20));
        if inject {
            assert_eq!(
                tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
                i64::from(t.pid.as_raw())
            );
        }
        assert_eq!(t.sigusr1(), 0, "not delivered while frozen");
        tracer.thaw().unwrap();
        wait_until("SIGUSR1 handled", Duration::from_secs(5), || {
            t.sigusr1() >= 1
        });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(t.sigusr1(), 1, "exactly once (inject={inject})");
        t.wait_counter_moves();
        t.assert_roles_completed_cleanly();
    }
}

#[test]
fn an_already_traced_target_is_refused_and_keeps_running() {
    let t = Tracee::spawn("counter", 500);
    t.wait_blocked();
    let first = Tracer::new(t.pid).unwrap();
    let second = Tracer::new(t.pid).unwrap();
    first.freeze().unwrap();
    let err = second.freeze().unwrap_err();
    println!("second tracer: {err}");
    assert!(
        matches!(err, FreezeError::AlreadyTraced { tid, .. } if tid == t.pid),
        "{err:?}"
    );
    assert!(!second.is_frozen());
    assert!(second.thaw().is_err(), "nothing to thaw");
    first.thaw().unwrap();
    t.wait_counter_moves();
    // Once released, the other tracer may take it.
    second.freeze().unwrap();
    second.thaw().unwrap();
    t.wait_counter_moves();
    t.assert_roles_completed_cleanly();
}

#[test]
fn a_missing_or_vanished_pid_is_a_clear_error() {
    let missing = Pid::new(i32::MAX - 11).unwrap();
    let err = Tracer::new(missing).unwrap_err();
    assert!(matches!(err, TracerError::NoSuchProcess { .. }));
    assert!(err.to_string().contains(&missing.to_string()));

    let t = Tracee::spawn("counter", 100);
    let tracer = Tracer::new(t.pid).unwrap();
    let pid = t.pid;
    drop(t); // SIGKILL + reap
    let err = tracer.freeze().unwrap_err();
    println!("{err}");
    assert!(
        matches!(err, FreezeError::NoSuchProcess { pid: p } if p == pid),
        "{err:?}"
    );
    assert!(!tracer.is_frozen());
}

#[test]
fn a_target_killed_while_frozen_does_not_hang_the_tracer() {
    let t = Tracee::spawn("counter", 100);
    t.wait_blocked();
    let tracer = Tracer::new(t.pid).unwrap();
    tracer.freeze().unwrap();
    // SAFETY: kill takes two integers; the pid is our own child.
    unsafe { libc::kill(t.pid.as_raw(), libc::SIGKILL) };
    let start = Instant::now();
    let err = tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap_err();
    println!("remote syscall into a killed target: {err}");
    let _ = tracer.thaw();
    assert!(!tracer.is_frozen());
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_panicking_tracer_thread_releases_the_target() {
    let t = Tracee::spawn("counter", 500);
    t.wait_blocked();
    let tracer = Tracer::new(t.pid).unwrap();
    tracer.freeze().unwrap();
    assert_eq!(
        tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        i64::from(t.pid.as_raw())
    );
    tracer.panic_tracer_thread_for_tests();
    wait_until("threads released", Duration::from_secs(5), || {
        not_traced(t.pid)
    });
    assert!(!tracer.is_frozen());
    let err = tracer.freeze().unwrap_err();
    assert!(
        matches!(&err, FreezeError::TracerGone { panic: Some(_), .. }),
        "{err:?}"
    );
    println!("{err}");
    t.wait_counter_moves();
    t.assert_roles_completed_cleanly();
}

#[test]
fn dropping_a_frozen_tracer_thaws_the_target() {
    let t = Tracee::spawn("counter", 500);
    t.wait_blocked();
    let tracer = Tracer::new(t.pid).unwrap();
    tracer.freeze().unwrap();
    assert_eq!(
        tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        i64::from(t.pid.as_raw())
    );
    drop(tracer);
    assert!(not_traced(t.pid));
    t.wait_counter_moves();
    t.assert_roles_completed_cleanly();
}
