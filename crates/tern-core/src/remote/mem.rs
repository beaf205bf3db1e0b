//! Reading and writing a target's memory from outside.
//!
//! Reads use `process_vm_readv` (one syscall, no page-by-page loop) and fall back to
//! `/proc/PID/mem` for whatever it could not read (e.g. special mappings it refuses). Writes use
//! `/proc/PID/mem`, which as the tracer (or root) writes with FOLL_FORCE: read-only private
//! mappings included, where `process_vm_writev` fails with EFAULT.

use crate::sys::{Errno, Pid};
use std::os::unix::fs::FileExt;

/// A failed memory access: which target, where, how much.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot open /proc/{pid}/mem: {source}")]
    Open { pid: Pid, source: std::io::Error },
    #[error("reading {len} bytes at {addr:#x} of pid {pid} failed after {done} bytes: {source}")]
    Read {
        pid: Pid,
        addr: u64,
        len: usize,
        done: usize,
        source: std::io::Error,
    },
    #[error("writing {len} bytes at {addr:#x} of pid {pid} failed: {source}")]
    Write {
        pid: Pid,
        addr: u64,
        len: usize,
        source: std::io::Error,
    },
    #[error("the tracer thread of pid {pid} is gone")]
    TracerGone { pid: Pid },
}

/// `process_vm_readv` of `[addr, addr + buf.len())` into `buf`: bytes read (may be short).
fn process_vm_readv(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, exclusively borrowed and alive for the call; the kernel
    // writes at most iov_len bytes there. `remote` is only interpreted in the target's address
    // space. One iovec each.
    let n = unsafe { libc::process_vm_readv(pid.as_raw(), &local, 1, &remote, 1, 0) };
    Errno::result(n).map(|n| n as usize)
}

fn proc_mem(pid: Pid, write: bool) -> Result<std::fs::File, MemoryError> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|source| MemoryError::Open { pid, source })
}

/// Reads `len` bytes at `addr` of `pid`'s address space.
pub fn read_memory(pid: Pid, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let done = process_vm_readv(pid, addr, &mut buf).unwrap_or(0);
    if done == len {
        return Ok(buf);
    }
    let file = proc_mem(pid, false)?;
    let offset = addr + done as u64;
    file.read_exact_at(&mut buf[done..], offset)
        .map_err(|source| MemoryError::Read {
            pid,
            addr,
            len,
            done,
            source,
        })?;
    Ok(buf)
}

/// Writes `data` at `addr` of `pid`'s address space (read-only mappings included).
pub fn write_memory(pid: Pid, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
    if data.is_empty() {
        return Ok(());
    }
    let file = proc_mem(pid, true)?;
    file.write_all_at(data, addr)
        .map_err(|source| MemoryError::Write {
            pid,
            addr,
            len: data.len(),
            source,
        })
}
