//! Remote syscalls in frozen real processes, with the leader blocked in each kind of call, so the
//! restart fix-up of the injected thread is exercised for ERESTARTSYS (read, futex),
//! EINTR-on-stop (epoll_wait), ERESTART_RESTARTBLOCK (nanosleep) and user space (counter).

mod tracee;

use std::time::{Duration, Instant};
use tern_core::ptrace::Tracer;
use tern_core::remote::RemoteSyscallError;
use tracee::Tracee;

fn maps_has(pid: tern_core::sys::Pid, addr: u64) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines().any(|l| l.starts_with(&format!("{addr:x}-")))
}

fn remote_syscalls_with_leader(role: &str) {
    let t = Tracee::spawn(role, 1500);
    t.wait_blocked();
    let tracer = Tracer::new(t.pid).unwrap();
    let err = tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap_err();
    assert!(
        matches!(err, RemoteSyscallError::NotFrozen { .. }),
        "{err:?}"
    );
    tracer.freeze().unwrap();
    let leader = tracer
        .registers()
        .unwrap()
        .into_iter()
        .find(|r| r.tid == t.pid.as_raw());
    let leader = leader.unwrap();
    println!(
        "leader ({role}) inSyscall={} nr={:?} rax={}",
        leader.in_syscall, leader.syscall_nr, leader.regs.rax as i64
    );

    assert_eq!(
        tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        i64::from(t.pid.as_raw())
    );

    let page = 4096u64;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let addr = tracer
        .syscall(libc::SYS_mmap, [0, 2 * page, prot, flags, u64::MAX, 0])
        .unwrap();
    assert!(addr > 0 && addr % 4096 == 0, "mmap returned {addr}");
    let addr = addr as u64;
    assert!(
        maps_has(t.pid, addr),
        "new mapping visible in /proc/PID/maps"
    );

    let data: Vec<u8> = (0..2 * page as usize).map(|i| (i * 7 + 3) as u8).collect();
    tracer.write_memory(addr, &data).unwrap();
    assert_eq!(tracer.read_memory(addr, data.len()).unwrap(), data);
    // Read-only memory is writable through /proc/PID/mem.
    assert_eq!(
        tracer
            .syscall(
                libc::SYS_mprotect,
                [addr, page, libc::PROT_READ as u64, 0, 0, 0]
            )
            .unwrap(),
        0
    );
    tracer.write_memory(addr + 10, b"read-only").unwrap();
    assert_eq!(tracer.read_memory(addr + 10, 9).unwrap(), b"read-only");
    // A failing call returns the negative errno.
    assert_eq!(
        tracer
            .syscall(libc::SYS_close, [987_654, 0, 0, 0, 0, 0])
            .unwrap(),
        -i64::from(libc::EBADF)
    );

    // Round-trip timing.
    let n = 200;
    let start = Instant::now();
    for _ in 0..n {
        tracer.syscall(libc::SYS_getppid, [0; 6]).unwrap();
    }
    println!(
        "remote syscall round trip ({role} leader): {:.1} µs",
        start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );

    assert_eq!(
        tracer
            .syscall(libc::SYS_munmap, [addr, 2 * page, 0, 0, 0, 0])
            .unwrap(),
        0
    );
    assert!(!maps_has(t.pid, addr), "mapping gone after munmap");

    let counter = t.counter();
    let thaw = tracer.thaw().unwrap();
    println!("thaw after injection: {} µs", thaw.elapsed_ns / 1000);
    assert!(t.counter() >= counter);
    t.wait_counter_moves();

    // Once more, to be sure a second freeze of an injected-and-thawed target is clean.
    tracer.freeze().unwrap();
    assert_eq!(
        tracer.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        i64::from(t.pid.as_raw())
    );
    tracer.thaw().unwrap();
    t.wait_counter_moves();
    t.assert_roles_completed_cleanly();
}

#[test]
fn remote_syscalls_leader_running_in_user_space() {
    remote_syscalls_with_leader("counter");
}

#[test]
fn remote_syscalls_leader_blocked_in_read() {
    remote_syscalls_with_leader("read");
}

#[test]
fn remote_syscalls_leader_blocked_in_epoll_wait() {
    remote_syscalls_with_leader("epoll");
}

#[test]
fn remote_syscalls_leader_blocked_in_nanosleep() {
    remote_syscalls_with_leader("nanosleep");
}

#[test]
fn remote_syscalls_leader_blocked_in_futex() {
    remote_syscalls_with_leader("futex");
}

#[test]
fn memory_errors_name_the_address() {
    let t = Tracee::spawn("counter", 100);
    t.wait_blocked();
    let tracer = Tracer::new(t.pid).unwrap();
    let err = tracer.read_memory(0x10, 16).unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("0x10"));
    let _ = Duration::ZERO;
}
