//! The runtime the crate's `#![no_std]`, `#![no_main]` programs (the stub, the guard) share,
//! included by each with `#[path = "../rt.rs"] mod rt;`: `_start` (which calls the program's
//! `tern_main`), raw syscalls, exit, the panic handler, and the memory functions the compiler may
//! call. No libc, no dynamic loader.
#![allow(dead_code)]

use core::arch::{asm, global_asm};

global_asm!(".globl _start", "_start:", "xor ebp, ebp", "and rsp, -16", "call tern_main", "ud2",);

pub const SYS_READ: i64 = 0;
pub const SYS_WRITE: i64 = 1;
pub const SYS_CLOSE: i64 = 3;
pub const SYS_POLL: i64 = 7;
pub const SYS_EXIT_GROUP: i64 = 231;

/// A raw syscall: the result, or a negative errno.
///
/// # Safety
/// The arguments must be valid for syscall `n` (pointers to live memory of the right size).
#[inline(always)]
pub unsafe fn sc(n: i64, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> i64 {
    let ret: i64;
    // SAFETY: the caller passes arguments valid for syscall `n`.
    unsafe {
        asm!("syscall", inlateout("rax") n => ret, in("rdi") a, in("rsi") b, in("rdx") c,
             in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _,
             options(nostack));
    }
    ret
}

pub fn sys(n: i64, a: u64, b: u64, c: u64) -> i64 {
    // SAFETY: only used for syscalls whose pointer arguments (if any) the caller made valid.
    unsafe { sc(n, a, b, c, 0, 0, 0) }
}

pub fn exit(code: u64) -> ! {
    loop {
        sys(SYS_EXIT_GROUP, code, 0, 0);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(127)
}

// The prebuilt core is compiled for unwinding and references the personality routine; with
// panic=abort nothing ever unwinds, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The compiler may emit calls to these; there is no libc to provide them.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for n bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag, restored afterwards.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _,
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for n bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded.
    unsafe { memcmp(a, b, n) }
}
