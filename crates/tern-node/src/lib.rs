//! Neon glue between Node.js and tern-core. Glue only: every function here converts arguments,
//! calls exactly one engine entry point and converts the result back. No engine logic lives here.
//!
//! Calls that may block (reading /proc, ptrace round trips) are exported as `task`s: they run on
//! libuv's worker pool and return a Promise, so the JS event loop never waits on the kernel.
//! Ptrace itself never runs on those worker threads: a [`Tracer`] owns one dedicated OS thread per
//! target and the worker only waits for its reply.
//!
//! Errors cross as JS `Error`s whose message is the engine error's `Display` text;
//! packages/native turns them into typed errors.

use std::sync::Arc;

use neon::prelude::*;
use neon::types::extract::{Boxed, Buffer, Error, Json};
use tern_core::sys::Pid;
use tern_core::{check, probe, proc, ptrace::Tracer};

/// A tracer as JavaScript holds it: a cheap clone of the engine handle inside a JsBox.
#[derive(Clone)]
struct TracerHandle(Arc<Tracer>);

impl Finalize for TracerHandle {}

fn to_pid(raw: f64) -> Result<Pid, Error> {
    if raw.fract() != 0.0 || raw <= 0.0 || raw > f64::from(i32::MAX) {
        return Err(Error::from(format!("{raw} is not a valid pid")));
    }
    Pid::new(raw as i32).ok_or_else(|| Error::from(format!("{raw} is not a valid pid")))
}

fn to_u64(what: &str, raw: f64) -> Result<u64, Error> {
    // Addresses and lengths travel as JS numbers: exact up to 2^53, which covers the 47-bit
    // user address space of x86_64.
    if raw.fract() != 0.0 || raw < 0.0 || raw > 9_007_199_254_740_991.0 {
        return Err(Error::from(format!("{what} {raw} is not a non-negative integer below 2^53")));
    }
    Ok(raw as u64)
}

/// What this kernel supports (soft-dirty, userfaultfd features, PAGEMAP_SCAN, TCP repair, ...).
#[neon::export(json)]
fn probe_kernel() -> probe::KernelProbe {
    probe::probe_kernel()
}

/// The bad-input gate: resolves a raw pid to a target or explains why it cannot be one.
#[neon::export]
fn validate_target(pid: f64) -> Result<f64, Error> {
    let pid = check::validate_target(pid as i64).map_err(|e| Error::from(e.to_string()))?;
    Ok(f64::from(pid.as_raw()))
}

/// Everything /proc says about a process.
#[neon::export(task, json)]
fn inspect_process(pid: f64) -> Result<proc::ProcessInventory, Error> {
    let pid = to_pid(pid)?;
    proc::inspect(pid).map_err(|e| Error::from(e.to_string()))
}

/// The movability verdict for an inventory (pure: no process is touched).
#[neon::export(json)]
fn check_inventory(inventory: proc::ProcessInventory) -> check::CheckReport {
    check::check(&inventory)
}

/// Starts the dedicated tracer thread for a target; attaches nothing yet.
#[neon::export]
fn tracer_open(pid: f64) -> Result<Boxed<TracerHandle>, Error> {
    let pid = to_pid(pid)?;
    let tracer = Tracer::new(pid).map_err(|e| Error::from(e.to_string()))?;
    Ok(Boxed(TracerHandle(Arc::new(tracer))))
}

#[neon::export(task)]
fn tracer_freeze(Boxed(handle): Boxed<TracerHandle>) -> Result<Json<tern_core::ptrace::FreezeReport>, Error> {
    handle.0.freeze().map(Json).map_err(|e| Error::from(e.to_string()))
}

#[neon::export(task)]
fn tracer_thaw(Boxed(handle): Boxed<TracerHandle>) -> Result<Json<tern_core::ptrace::ThawReport>, Error> {
    handle.0.thaw().map(Json).map_err(|e| Error::from(e.to_string()))
}

/// Thaws the target if it is still frozen and stops the tracer thread. Idempotent.
#[neon::export(task)]
fn tracer_close(Boxed(handle): Boxed<TracerHandle>) -> Result<(), Error> {
    if handle.0.is_frozen() {
        handle.0.thaw().map_err(|e| Error::from(e.to_string()))?;
    }
    Ok(())
}

#[neon::export]
fn tracer_is_frozen(Boxed(handle): Boxed<TracerHandle>) -> bool {
    handle.0.is_frozen()
}

#[neon::export(task)]
fn tracer_registers(
    Boxed(handle): Boxed<TracerHandle>,
) -> Result<Json<Vec<tern_core::ptrace::ThreadRegisters>>, Error> {
    handle.0.registers().map(Json).map_err(|e| Error::from(e.to_string()))
}

/// Runs one syscall inside the frozen target; resolves to the raw kernel return value
/// (a negative errno on failure), exactly as the target would have seen it.
#[neon::export(task)]
fn tracer_syscall(Boxed(handle): Boxed<TracerHandle>, nr: f64, Json(args): Json<Vec<f64>>) -> Result<f64, Error> {
    if args.len() > 6 {
        return Err(Error::from(format!("a syscall takes at most 6 arguments, got {}", args.len())));
    }
    let mut raw = [0u64; 6];
    for (slot, value) in raw.iter_mut().zip(&args) {
        // Arguments may be negative (fd -1, AT_FDCWD): they reach the kernel as the two's
        // complement bit pattern, exactly as a C caller's int would.
        if value.fract() != 0.0 || value.abs() > 9_007_199_254_740_991.0 {
            return Err(Error::from(format!("syscall argument {value} is not an integer within ±2^53")));
        }
        *slot = *value as i64 as u64;
    }
    let nr = to_u64("syscall number", nr)? as i64;
    let ret = handle.0.syscall(nr, raw).map_err(|e| Error::from(e.to_string()))?;
    Ok(ret as f64)
}

#[neon::export(task)]
fn tracer_read_memory(Boxed(handle): Boxed<TracerHandle>, addr: f64, len: f64) -> Result<Buffer<Vec<u8>>, Error> {
    let addr = to_u64("address", addr)?;
    let len = to_u64("length", len)? as usize;
    handle.0.read_memory(addr, len).map(Buffer).map_err(|e| Error::from(e.to_string()))
}

#[neon::export(task)]
fn tracer_write_memory(Boxed(handle): Boxed<TracerHandle>, addr: f64, Buffer(data): Buffer<Vec<u8>>) -> Result<(), Error> {
    let addr = to_u64("address", addr)?;
    handle.0.write_memory(addr, &data).map_err(|e| Error::from(e.to_string()))
}

#[neon::main]
fn main(mut cx: ModuleContext) -> NeonResult<()> {
    neon::registered().export(&mut cx)?;
    Ok(())
}
