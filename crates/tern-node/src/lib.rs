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

mod precopy;
mod pull;

/// A tracer as JavaScript holds it: a cheap clone of the engine handle inside a JsBox.
#[derive(Clone)]
struct TracerHandle(Arc<Tracer>);

impl Finalize for TracerHandle {}

pub(crate) fn to_pid(raw: f64) -> Result<Pid, Error> {
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

/// Node reaps the children it spawned with waitpid(pid) from its main thread; for a child that
/// our tracer thread traces, that wait would also consume its ptrace stops (any thread of the
/// tracer's process may collect them) and the tracer would wait forever. So a child of this
/// process is refused unless the engine restored it itself (its reaper never steals stops);
/// a process started in its own session by a helper (setsid, a lab host, systemd) is fine.
pub(crate) fn refuse_node_child(pid: Pid) -> Result<(), Error> {
    let stat = tern_core::proc::stat::read_stat(pid).map_err(engine_err)?;
    if stat.ppid == std::process::id() as i32 && !tern_core::restore::is_restored_child(pid) {
        return Err(Error::from(format!(
            "pid {pid} is a child of this Node process: its ptrace stops would be taken by Node's child reaping; start it from another process"
        )));
    }
    Ok(())
}

/// Starts the dedicated tracer thread for a target; attaches nothing yet.
#[neon::export]
fn tracer_open(pid: f64) -> Result<Boxed<TracerHandle>, Error> {
    let pid = to_pid(pid)?;
    refuse_node_child(pid)?;
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

// ---------------------------------------------------------------------------------------------
// Migration roles (see packages/native/src/migration.ts for the sequence across hosts)
// ---------------------------------------------------------------------------------------------

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;
use tern_core::dump::SourceSession;
use tern_core::pages::{PageSender, PageServer, PageStore, SenderOptions};

/// The destination's page server and, once a stream has completed, the pages it received.
struct PageServerState {
    server: PageServer,
    store: Mutex<Option<PageStore>>,
    /// The lazy fill of the process restored from this server's pages (restore with lazy).
    lazy: Mutex<Option<Arc<tern_core::restore::LazyHandle>>>,
}

#[derive(Clone)]
struct PageServerHandle(Arc<PageServerState>);

impl Finalize for PageServerHandle {}

/// The source side of one migration: the frozen original (until commit or abort), its freeze
/// report and the statistics of the last dump.
struct SourceState {
    session: Mutex<Option<SourceSession>>,
    freeze: tern_core::ptrace::FreezeReport,
    last_dump: Mutex<Option<DumpOutcome>>,
    /// Post-copy: the frozen original's pages served to the destination until commit/abort.
    page_source: pull::PageSourceSlot,
}

#[derive(Clone)]
struct SourceHandle(Arc<SourceState>);

impl Finalize for SourceHandle {}

pub(crate) fn engine_err(e: impl std::fmt::Display) -> Error {
    Error::from(e.to_string())
}

pub(crate) fn socket_addr(address: &str, port: f64) -> Result<SocketAddr, Error> {
    let ip: IpAddr = address.parse().map_err(|_| Error::from(format!("{address} is not an IP address")))?;
    if port.fract() != 0.0 || !(0.0..=65535.0).contains(&port) {
        return Err(Error::from(format!("{port} is not a TCP port")));
    }
    Ok(SocketAddr::new(ip, port as u16))
}

/// Binds the destination's page server for one migration (port 0: any free port).
#[neon::export]
fn page_server_start(address: String, port: f64, migration_id: String, token: String) -> Result<Boxed<PageServerHandle>, Error> {
    let expected = pull::credentials(&migration_id, &token)?;
    let server = PageServer::bind(socket_addr(&address, port)?, expected).map_err(engine_err)?;
    Ok(Boxed(PageServerHandle(Arc::new(PageServerState { server, store: Mutex::new(None), lazy: Mutex::new(None) }))))
}

#[neon::export]
fn page_server_port(Boxed(handle): Boxed<PageServerHandle>) -> f64 {
    f64::from(handle.0.server.port())
}

/// Waits until a complete, valid stream has arrived and keeps its pages for restore.
#[neon::export(task)]
fn page_server_wait(Boxed(handle): Boxed<PageServerHandle>, timeout_ms: f64) -> Result<Json<tern_core::pages::TransferStats>, Error> {
    let (store, stats) = handle.0.server.wait(Duration::from_millis(timeout_ms.max(0.0) as u64)).map_err(engine_err)?;
    let mut slot = handle.0.store.lock().map_err(|_| Error::from("page store lock poisoned"))?;
    merge_newer(&mut slot, store);
    Ok(Json(stats))
}

/// Puts `newer` (streams committed later) on top of what the slot holds: where both have a page,
/// the later stream's content wins (a later pre-copy round, or the final stream).
fn merge_newer(slot: &mut Option<PageStore>, newer: PageStore) {
    match slot.as_mut() {
        Some(existing) => existing.merge_from(newer),
        None if newer.is_empty() => {}
        None => *slot = Some(newer),
    }
}

/// Live counters of the server (connections, streams, pages and bytes received so far).
#[neon::export]
fn page_server_progress(Boxed(handle): Boxed<PageServerHandle>) -> Json<tern_core::pages::ServerProgress> {
    Json(handle.0.server.progress())
}

/// Stops the server and drops every page it holds (commit done, or abort).
#[neon::export]
fn page_server_close(Boxed(handle): Boxed<PageServerHandle>) {
    handle.0.server.shutdown();
    if let Ok(mut slot) = handle.0.store.lock() {
        slot.take();
    }
}

/// Freezes every thread of the source process (the downtime starts here).
#[neon::export(task)]
fn source_freeze(pid: f64) -> Result<Boxed<SourceHandle>, Error> {
    let pid = to_pid(pid)?;
    refuse_node_child(pid)?;
    let session = SourceSession::freeze(pid).map_err(engine_err)?;
    let freeze = session.freeze_report().clone();
    Ok(Boxed(SourceHandle(Arc::new(SourceState {
        session: Mutex::new(Some(session)),
        freeze,
        last_dump: Mutex::new(None),
        page_source: pull::PageSourceSlot::default(),
    }))))
}

#[neon::export]
fn source_freeze_report(Boxed(handle): Boxed<SourceHandle>) -> Json<tern_core::ptrace::FreezeReport> {
    Json(handle.0.freeze.clone())
}

/// Statistics of the last successful dump of this session (null before one).
#[neon::export]
fn source_dump_stats(Boxed(handle): Boxed<SourceHandle>) -> Result<Json<Option<DumpOutcome>>, Error> {
    let last = handle.0.last_dump.lock().map_err(|_| Error::from("source session lock poisoned"))?;
    Ok(Json(last.clone()))
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DumpOutcome {
    pub(crate) dump: tern_core::dump::DumpStats,
    pub(crate) transfer: tern_core::pages::TransferStats,
    /// Post-copy: where the destination pulls the pages left on the source.
    pub(crate) page_source: Option<pull::PageSourceInfo>,
}

/// Dumps the frozen process, streaming its pages to the destination's page server; resolves to
/// the image (msgpack) and the statistics. On failure the process stays frozen: abort or retry.
/// With `lazy` (post-copy) private anonymous pages stay in the frozen process and a page source
/// bound on `lazy.address` serves them (its port in the dump stats' `pageSource`).
#[neon::export(task)]
fn source_dump(
    Boxed(handle): Boxed<SourceHandle>,
    address: String,
    port: f64,
    migration_id: String,
    token: String,
    bandwidth_bytes_per_sec: f64,
    Json(lazy): Json<Option<pull::ServeLazy>>,
) -> Result<Buffer<Vec<u8>>, Error> {
    let guard = handle.0.session.lock().map_err(|_| Error::from("source session lock poisoned"))?;
    let session = guard.as_ref().ok_or_else(|| Error::from("the source session is already committed or aborted"))?;
    let options = SenderOptions {
        bandwidth_limit_bytes_per_sec: (bandwidth_bytes_per_sec > 0.0).then_some(bandwidth_bytes_per_sec as u64),
        ..SenderOptions::default()
    };
    let credentials = pull::credentials(&migration_id, &token)?;
    let mut sender = PageSender::connect(
        socket_addr(&address, port)?,
        credentials.migration_id,
        credentials.token,
        options,
    )
    .map_err(engine_err)?;
    let policy = if lazy.is_some() { tern_core::dump::PagePolicy::LeaveOnSource } else { tern_core::dump::PagePolicy::Send };
    let (image, dump) = session.dump_with(&mut sender, policy).map_err(engine_err)?;
    let transfer = sender.finish().map_err(engine_err)?;
    let bytes = image.to_msgpack().map_err(engine_err)?;
    let page_source = match &lazy {
        Some(serve) => Some(handle.0.page_source.start(serve, session.pid(), &image, &migration_id, &token)?),
        None => None,
    };
    *handle.0.last_dump.lock().map_err(|_| Error::from("source session lock poisoned"))? =
        Some(DumpOutcome { dump, transfer, page_source });
    Ok(Buffer(bytes))
}

/// Kills the frozen original: the destination has the process (the commit point has passed).
#[neon::export(task)]
fn source_commit(Boxed(handle): Boxed<SourceHandle>) -> Result<(), Error> {
    let session = handle.0.session.lock().map_err(|_| Error::from("source session lock poisoned"))?.take();
    // Nothing may read the original once it is being killed.
    handle.0.page_source.stop();
    match session {
        Some(session) => session.commit().map_err(engine_err),
        None => Err(Error::from("the source session is already committed or aborted")),
    }
}

/// Thaws the original exactly as it was. Idempotent: a finished session is left alone.
#[neon::export(task)]
fn source_abort(Boxed(handle): Boxed<SourceHandle>) -> Result<(), Error> {
    // The page source first: once stopped its `homed` is final (no HOMED can slip in between the
    // check and the thaw).
    handle.0.page_source.stop_for_rollback()?;
    let session = handle.0.session.lock().map_err(|_| Error::from("source session lock poisoned"))?.take();
    if let Some(session) = session {
        session.abort().map_err(engine_err)?;
    }
    Ok(())
}

/// What the page source served (null: none running).
#[neon::export]
fn source_page_source_stats(Boxed(handle): Boxed<SourceHandle>) -> Json<Option<tern_core::pages::pull::SourceServeStats>> {
    Json(handle.0.page_source.stats())
}

/// Rebuilds the process described by `image` from the pages the server received, with the same
/// pid in this process's pid namespace, and lets it run. With `lazy` the store moves into the
/// lazy thread (private anonymous memory is filled after the process runs; see
/// [`page_server_lazy_wait`]); the server holds no pages afterwards. With `remote` (post-copy,
/// hybrid) the pages the image left on the source are pulled from its page source.
#[neon::export(task)]
fn restore_process(
    Buffer(image): Buffer<Vec<u8>>,
    Boxed(server): Boxed<PageServerHandle>,
    check_inode: bool,
    lazy: Option<bool>,
    Json(remote): Json<Option<pull::PullFrom>>,
) -> Result<Json<tern_core::restore::RestoredProcess>, Error> {
    let image = tern_core::image::ProcessImage::from_msgpack(&image).map_err(engine_err)?;
    let remote = match &remote {
        Some(from) if !image.mm.remote_pages.is_empty() => {
            Some(from.connect(&image)? as Arc<dyn tern_core::restore::LazySource>)
        }
        _ => None,
    };
    let mut slot = server.0.store.lock().map_err(|_| Error::from("page store lock poisoned"))?;
    // Streams committed since the last wait (pre-copy: later rounds and the final stream, which
    // nobody has to wait for one by one) are newer than what the slot holds: merge them on top.
    merge_newer(&mut slot, server.0.server.take_store());
    let options = tern_core::files::RecreateOptions { check_inode };
    if !lazy.unwrap_or(false) && remote.is_none() {
        let store = slot.as_ref().ok_or_else(|| Error::from("no complete page stream has arrived for this migration"))?;
        let restored = tern_core::restore::restore_with_files(&image, store, &options).map_err(engine_err)?;
        tern_core::restore::reap_when_exited(restored.pid);
        return Ok(Json(restored));
    }
    let store = match slot.take() {
        Some(store) => store,
        // Post-copy: every page the final stream carried may have stayed on the source (an
        // empty stream leaves nothing in the slot).
        None if remote.is_some() => PageStore::new(),
        None => return Err(Error::from("no complete page stream has arrived for this migration")),
    };
    let store = Arc::new(store);
    match tern_core::restore::restore_with_files_remote(&image, store.clone(), remote, &options, true) {
        Ok((restored, handle)) => {
            drop(store); // the lazy thread holds the only reference now
            tern_core::restore::reap_when_exited(restored.pid);
            *server.0.lazy.lock().map_err(|_| Error::from("lazy handle lock poisoned"))? = handle.map(Arc::new);
            Ok(Json(restored))
        }
        Err(e) => {
            // Nothing kept a reference: the pages go back to the slot for another attempt.
            *slot = Arc::try_unwrap(store).ok();
            Err(engine_err(e))
        }
    }
}

fn lazy_of(server: &PageServerHandle) -> Option<Arc<tern_core::restore::LazyHandle>> {
    server.0.lazy.lock().ok().and_then(|l| l.clone())
}

/// Progress of the lazy fill (null: no lazy restore from this server).
#[neon::export]
fn page_server_lazy_stats(Boxed(server): Boxed<PageServerHandle>) -> Json<Option<tern_core::restore::LazyStats>> {
    Json(lazy_of(&server).map(|h| h.stats()))
}

/// Lets the lazy fill's background copy start now (the restore's answer is out): until then, or
/// until its delay has passed, the lazy thread serves faults only. False: no lazy restore here.
#[neon::export]
fn page_server_lazy_release(Boxed(server): Boxed<PageServerHandle>) -> bool {
    lazy_of(&server).map(|h| h.release_background()).is_some()
}

/// Fault service times (ns) recorded since the last call (empty: none, or no lazy restore).
#[neon::export]
fn page_server_lazy_fault_samples(Boxed(server): Boxed<PageServerHandle>) -> Vec<f64> {
    lazy_of(&server).map(|h| h.take_fault_samples().into_iter().map(|ns| ns as f64).collect()).unwrap_or_default()
}

/// Waits until every page is home (or the process exited), at most `timeout_ms`.
#[neon::export(task)]
fn page_server_lazy_wait(
    Boxed(server): Boxed<PageServerHandle>,
    timeout_ms: f64,
) -> Result<Json<Option<tern_core::restore::LazyStats>>, Error> {
    match lazy_of(&server) {
        None => Ok(Json(None)),
        Some(h) => h.wait(Duration::from_millis(timeout_ms.max(0.0) as u64)).map(|s| Json(Some(s))).map_err(engine_err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::pages::PageSink;

    const P: u64 = 4096;

    fn first_byte(store: &PageStore, addr: u64) -> Option<u8> {
        store.range(addr, addr + P).next().map(|(_, run)| match run {
            tern_core::pages::PageRun::Data(d) => d[0],
            tern_core::pages::PageRun::Zero { .. } => 0,
        })
    }

    #[test]
    fn a_later_stream_wins_in_the_slot_restore_reads() {
        let mut slot = None;
        merge_newer(&mut slot, PageStore::new());
        assert!(slot.is_none(), "an empty store is not a complete stream");
        let mut round0 = PageStore::new();
        round0.put_pages(0x10000, &vec![1u8; 4 * P as usize]).unwrap();
        merge_newer(&mut slot, round0);
        let mut round1 = PageStore::new();
        round1.put_pages(0x10000 + P, &vec![2u8; P as usize]).unwrap();
        round1.put_zero_pages(0x10000 + 3 * P, 1).unwrap();
        merge_newer(&mut slot, round1);
        let store = slot.as_ref().unwrap();
        let tags: Vec<_> = (0..4).map(|i| first_byte(store, 0x10000 + i * P)).collect();
        assert_eq!(tags, vec![Some(1), Some(2), Some(1), Some(0)]);
    }
}
