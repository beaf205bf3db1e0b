//! Pre-copy on the source, as Node drives it (glue over tern-core dump::PrecopySession).
//!
//! ```text
//!  precopy_start(pid, {fixedCostNs?})     task: brief freeze, dirty tracking on, thaw → handle
//!  precopy_round(handle, destination)     task: one page stream (connect, pages, END, STATUS OK)
//!        ×N                                     while the target runs → round stats
//!  precopy_decide(handle, {maxDowntimeMs, maxRounds, shrinkRatio?})   → verdict (pure)
//!  precopy_finish(handle, destination)    task: freeze, last dirty set, tracking off, image +
//!        │                                      final pages in one stream → image (msgpack);
//!        │                                      precopy_final_stats(handle) → what moved
//!        ▼                                      the handle now holds the frozen process:
//!  precopy_commit(handle) | precopy_abort(handle)   kill it | thaw it (abort also works before
//!                                                    finish: tracking off, the target runs on)
//! ```
//!
//! Every round must reach the destination's STATUS OK before the engine forgets its pages: the
//! engine's flush hook (the second argument of `PrecopySession::round`) finishes the stream, so a
//! round whose stream fails keeps its pending set and can be retried (or the pre-copy aborted).
//! Ptrace stays on the session's Tracer thread; the libuv worker running a task only waits for it.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use neon::prelude::*;
use neon::types::extract::{Boxed, Buffer, Error, Json};
use serde::{Deserialize, Serialize};
use tern_core::dump::{decide, PagePolicy, PrecopyOptions, PrecopySession, RoundStats, SourceSession, Verdict};
use tern_core::pages::{PageSender, PageSink, SendError, SenderOptions, TransferStats};
use tern_core::sys::Pid;

use crate::pull::{PageEndpoint, PageSourceSlot, ServeLazy};
use crate::{engine_err, refuse_node_child, to_pid, DumpOutcome};

/// Where a round's pages go: the destination's page server and this migration's credentials
/// (with a cap for this stream on the wire).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "PageEndpoint")]
pub(crate) struct Destination(PageEndpoint);

impl TryFrom<PageEndpoint> for Destination {
    type Error = &'static str;

    fn try_from(endpoint: PageEndpoint) -> Result<Destination, Self::Error> {
        // A page stream has no pull to give up: refused as the unknown field it is here.
        if endpoint.give_up_after_ms.is_some() {
            return Err("unknown field `giveUpAfterMs`, expected one of `address`, `port`, `migrationId`, `token`, `bandwidthBytesPerSec`");
        }
        Ok(Destination(endpoint))
    }
}

impl Destination {
    /// Connects one page stream (hello answered OK) with the destination's bandwidth cap.
    fn connect(&self) -> Result<PageSender, Error> {
        let options = SenderOptions { bandwidth_limit_bytes_per_sec: self.0.bandwidth(), ..SenderOptions::default() };
        let (addr, e) = self.0.parse()?;
        PageSender::connect(addr, e.migration_id, e.token, options).map_err(chain_err)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct StartOptions {
    /// The fixed switchover cost to add to every prediction; absent: measured by the setup freeze.
    #[serde(default)]
    fixed_cost_ns: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DecideOptions {
    /// Absent: the engine's default (300 ms).
    #[serde(default)]
    max_downtime_ms: Option<f64>,
    /// Round 0 included. Absent: the engine's default (30).
    #[serde(default)]
    max_rounds: Option<f64>,
    /// A round "shrinks" when its dirty set is under this fraction of the previous one (0.9).
    #[serde(default)]
    shrink_ratio: Option<f64>,
}

impl DecideOptions {
    fn to_engine(self) -> Result<PrecopyOptions, Error> {
        let defaults = PrecopyOptions::default();
        let max_downtime_ns = match self.max_downtime_ms {
            None => defaults.max_downtime_ns,
            Some(ms) if ms.is_finite() && ms >= 0.0 => (ms * 1e6) as u64,
            Some(ms) => return Err(Error::from(format!("maxDowntimeMs {ms} is not a non-negative number"))),
        };
        let max_rounds = match self.max_rounds {
            None => defaults.max_rounds,
            Some(n) if n.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&n) => n as u32,
            Some(n) => return Err(Error::from(format!("maxRounds {n} is not a positive integer"))),
        };
        let shrink_ratio = match self.shrink_ratio {
            None => defaults.shrink_ratio,
            Some(r) if r > 0.0 && r <= 1.0 => r,
            Some(r) => return Err(Error::from(format!("shrinkRatio {r} is not in (0, 1]"))),
        };
        Ok(PrecopyOptions {
            max_downtime_ns,
            max_rounds,
            fixed_cost_ns: None,
            shrink_ratio,
        })
    }
}

/// One round as JavaScript sees it. Units in the names: bytes, nanoseconds, bytes per second
/// (the engine's `*_bps` fields are bytes per second too; renamed so nobody reads bits).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JsRoundStats {
    round: u32,
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    elapsed_ns: u64,
    scan_ns: u64,
    dirty_pages: u64,
    dirty_bytes: u64,
    dirty_rate_bytes_per_sec: f64,
    bandwidth_bytes_per_sec: f64,
    predicted_downtime_ns: u64,
    failed_pages: u64,
    /// This round's stream as the sender counted it, confirmed by the destination's STATUS
    /// (absent for rounds reported after `finish`, whose streams are summarised elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    transfer: Option<TransferStats>,
}

impl JsRoundStats {
    fn new(r: &RoundStats, transfer: Option<TransferStats>) -> JsRoundStats {
        JsRoundStats {
            round: r.round,
            pages: r.pages,
            zero_pages: r.zero_pages,
            bytes: r.bytes,
            elapsed_ns: r.elapsed_ns,
            scan_ns: r.scan_ns,
            dirty_pages: r.dirty_pages,
            dirty_bytes: r.dirty_bytes,
            dirty_rate_bytes_per_sec: r.dirty_rate_bps,
            bandwidth_bytes_per_sec: r.bandwidth_bps,
            predicted_downtime_ns: r.predicted_downtime_ns,
            failed_pages: r.failed_pages,
            transfer,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JsDecision {
    verdict: Verdict,
    rounds: usize,
    /// The last round's prediction (0 before any round).
    predicted_downtime_ns: u64,
}

/// What `finish` moved: the final dump inside the freeze and the pre-copy that led to it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FinalOutcome {
    #[serde(flatten)]
    outcome: DumpOutcome,
    final_dirty_pages: u64,
    stale_pages: u64,
    /// From the final freeze to the end of the final dump (the engine's part of the downtime;
    /// the final stream's STATUS wait comes on top).
    frozen_ns: u64,
    /// Where the frozen time went (freeze, last scan, stop tracking, dump, stale pages).
    timings: tern_core::dump::FinishTimings,
    /// The final freeze (threads, how each was stopped).
    freeze: tern_core::ptrace::FreezeReport,
    rounds: Vec<JsRoundStats>,
}

enum Phase {
    /// Tracking; the target runs.
    Tracking(PrecopySession),
    /// After finish: frozen, image taken; commit or abort.
    Frozen(SourceSession),
    /// Committed, aborted or failed for good.
    Over,
}

pub(crate) struct PrecopyState {
    pid: Pid,
    /// The engine's PrecopySetup as JSON (tern-core does not re-export the type's name).
    setup: serde_json::Value,
    phase: Mutex<Phase>,
    last_final: Mutex<Option<FinalOutcome>>,
    /// Hybrid: the frozen original's last dirty pages served to the destination.
    page_source: PageSourceSlot,
}

#[derive(Clone)]
pub(crate) struct PrecopyHandle(Arc<PrecopyState>);

impl Finalize for PrecopyHandle {}

impl PrecopyState {
    /// The phase for a step that must not overlap another (round, finish): a second call while
    /// one runs is refused instead of queueing behind it on a worker thread.
    fn exclusive(&self) -> Result<MutexGuard<'_, Phase>, Error> {
        match self.phase.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Error::from(format!(
                "pre-copy of pid {}: another step (round or finish) is still running",
                self.pid
            ))),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        }
    }

    /// The phase for commit/abort: waits for a running step to end first.
    fn wait_phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn over(&self) -> Error {
        Error::from(format!("pre-copy of pid {} is over (committed, aborted or failed)", self.pid))
    }
}

/// An error with its causes, so that "connecting failed" also says "connection refused".
fn chain_err(e: impl std::error::Error) -> Error {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    Error::from(msg)
}

/// A round's stream: the sender until the round's flush finishes it, then the STATUS-confirmed
/// statistics. `finish` consumes the sender, which the engine's `&mut` flush hook cannot do
/// directly.
struct RoundSink {
    sender: Option<PageSender>,
    confirmed: Option<TransferStats>,
}

impl RoundSink {
    fn new(sender: PageSender) -> RoundSink {
        RoundSink { sender: Some(sender), confirmed: None }
    }

    fn sender(&mut self) -> Result<&mut PageSender, SendError> {
        // Only reachable if the engine wrote after flushing: treat as a broken stream.
        self.sender.as_mut().ok_or(SendError::Poisoned)
    }

    /// END, then the destination's STATUS: OK means every page of the stream is committed there.
    fn finish(&mut self) -> Result<TransferStats, String> {
        let sender = self.sender.take().ok_or("the round's page stream is already finished")?;
        let stats = sender.finish().map_err(|e| chain_err(e).to_string())?;
        self.confirmed = Some(stats);
        Ok(stats)
    }
}

impl PageSink for RoundSink {
    type Error = SendError;
    fn put_pages(&mut self, vaddr: u64, data: &[u8]) -> Result<(), SendError> {
        self.sender()?.put_pages(vaddr, data)
    }
    fn put_zero_pages(&mut self, vaddr: u64, count: u64) -> Result<(), SendError> {
        self.sender()?.put_zero_pages(vaddr, count)
    }
}

/// Starts dirty tracking on a running process (a brief freeze) and returns the pre-copy handle.
#[neon::export(task)]
fn precopy_start(pid: f64, Json(options): Json<Option<StartOptions>>) -> Result<Boxed<PrecopyHandle>, Error> {
    let pid = to_pid(pid)?;
    refuse_node_child(pid)?;
    let fixed = match options.unwrap_or_default().fixed_cost_ns {
        None => None,
        Some(ns) if ns.is_finite() && ns >= 0.0 => Some(ns as u64),
        Some(ns) => return Err(Error::from(format!("fixedCostNs {ns} is not a non-negative number"))),
    };
    let session = PrecopySession::start(pid, fixed).map_err(chain_err)?;
    let setup = serde_json::to_value(session.setup()).map_err(engine_err)?;
    Ok(Boxed(PrecopyHandle(Arc::new(PrecopyState {
        pid,
        setup,
        phase: Mutex::new(Phase::Tracking(session)),
        last_final: Mutex::new(None),
        page_source: PageSourceSlot::default(),
    }))))
}

/// The setup figures: tracking backend, setup freeze, fixed cost, pages of the first full set.
#[neon::export]
fn precopy_setup(Boxed(handle): Boxed<PrecopyHandle>) -> Json<serde_json::Value> {
    Json(handle.0.setup.clone())
}

/// One round while the target runs: its pending pages in one stream to `destination`, then the
/// next dirty set. On failure nothing is lost (the pending set is kept): retry or abort.
#[neon::export(task)]
fn precopy_round(Boxed(handle): Boxed<PrecopyHandle>, Json(destination): Json<Destination>) -> Result<Json<JsRoundStats>, Error> {
    let mut phase = handle.0.exclusive()?;
    let Phase::Tracking(session) = &mut *phase else {
        return Err(match &*phase {
            Phase::Frozen(_) => Error::from(format!("pre-copy of pid {} is finished: commit or abort", handle.0.pid)),
            _ => handle.0.over(),
        });
    };
    let mut sink = RoundSink::new(destination.connect()?);
    let stats = session.round(&mut sink, |s| s.finish().map(|_| ())).map_err(chain_err)?;
    Ok(Json(JsRoundStats::new(&stats, sink.confirmed)))
}

/// The convergence verdict over the rounds so far (QEMU's rules; pure, nothing is touched).
#[neon::export]
fn precopy_decide(Boxed(handle): Boxed<PrecopyHandle>, Json(options): Json<Option<DecideOptions>>) -> Result<Json<JsDecision>, Error> {
    let options = options.unwrap_or_default().to_engine()?;
    let phase = handle.0.exclusive()?;
    let Phase::Tracking(session) = &*phase else {
        return Err(handle.0.over());
    };
    Ok(Json(decision(session.history(), &options)))
}

fn decision(history: &[RoundStats], options: &PrecopyOptions) -> JsDecision {
    JsDecision {
        verdict: decide(history, options),
        rounds: history.len(),
        predicted_downtime_ns: history.last().map_or(0, |r| r.predicted_downtime_ns),
    }
}

/// The switchover: freeze, last dirty set, tracking off, image + final pages in one stream.
/// Resolves to the image (msgpack); the handle then holds the frozen process (commit or abort).
/// If the final stream fails the process is thawed (it runs on, untracked) and the handle is over.
/// With `lazy` (hybrid) the final dirty pages of private anonymous memory stay in the frozen
/// process and a page source bound on `lazy.address` serves them (final stats' `pageSource`).
#[neon::export(task)]
fn precopy_finish(
    Boxed(handle): Boxed<PrecopyHandle>,
    Json(destination): Json<Destination>,
    Json(lazy): Json<Option<ServeLazy>>,
) -> Result<Buffer<Vec<u8>>, Error> {
    let mut phase = handle.0.exclusive()?;
    if !matches!(&*phase, Phase::Tracking(_)) {
        return Err(handle.0.over());
    }
    // Connect while still tracking: a destination that cannot be reached leaves the pre-copy
    // intact (retry or abort), no freeze happened.
    let mut sender = destination.connect()?;
    let Phase::Tracking(session) = std::mem::replace(&mut *phase, Phase::Over) else {
        unreachable!("checked above under the same lock");
    };
    // On error the engine has already thawed the target and removed tracking.
    let policy = if lazy.is_some() { PagePolicy::LeaveOnSource } else { PagePolicy::Send };
    let fin = session.finish_with(&mut sender, policy).map_err(chain_err)?;
    let transfer = match sender.finish() {
        Ok(t) => t,
        Err(e) => {
            // The destination does not have the final state: the original must run on.
            let err = chain_err(e);
            return Err(match fin.session.abort() {
                Ok(_) => err,
                Err(a) => Error::from(format!("{err}; thawing the original failed too: {}", chain_err(a))),
            });
        }
    };
    let page_source = match &lazy {
        Some(serve) => match handle.0.page_source.start(serve, handle.0.pid, &fin.image, &destination.0.migration_id, &destination.0.token) {
            Ok(info) => Some(info),
            Err(err) => {
                return Err(match fin.session.abort() {
                    Ok(_) => err,
                    Err(a) => Error::from(format!("{err}; thawing the original failed too: {}", chain_err(a))),
                });
            }
        },
        None => None,
    };
    let image = fin.image.to_msgpack().map_err(engine_err);
    let outcome = FinalOutcome {
        outcome: DumpOutcome { dump: fin.stats, transfer, page_source },
        final_dirty_pages: fin.final_dirty_pages,
        stale_pages: fin.stale_pages,
        frozen_ns: fin.frozen_ns,
        timings: fin.timings,
        freeze: fin.session.freeze_report().clone(),
        rounds: fin.rounds.iter().map(|r| JsRoundStats::new(r, None)).collect(),
    };
    *phase = Phase::Frozen(fin.session);
    let image = image?;
    *handle.0.last_final.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
    Ok(Buffer(image))
}

/// "tracking" (rounds may run), "frozen" (finished: commit or abort), "over", or "busy" while a
/// step runs (never waits: this runs on the JS thread). Tells whether a failed finish ended the
/// pre-copy (final stream failed: thawed) or not (destination unreachable: still tracking).
#[neon::export]
fn precopy_phase(Boxed(handle): Boxed<PrecopyHandle>) -> String {
    let phase = match handle.0.phase.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return "busy".into(),
    };
    match &*phase {
        Phase::Tracking(_) => "tracking",
        Phase::Frozen(_) => "frozen",
        Phase::Over => "over",
    }
    .into()
}

/// What the last successful finish moved (null before one).
#[neon::export]
fn precopy_final_stats(Boxed(handle): Boxed<PrecopyHandle>) -> Json<Option<FinalOutcome>> {
    Json(handle.0.last_final.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// What the hybrid page source served (null: none running).
#[neon::export]
fn precopy_page_source_stats(Boxed(handle): Boxed<PrecopyHandle>) -> Json<Option<tern_core::pages::pull::SourceServeStats>> {
    Json(handle.0.page_source.stats())
}

/// Kills the frozen original after finish: the destination has the process.
#[neon::export(task)]
fn precopy_commit(Boxed(handle): Boxed<PrecopyHandle>) -> Result<(), Error> {
    let mut phase = handle.0.wait_phase();
    if matches!(&*phase, Phase::Frozen(_)) {
        // Nothing may read the original once it is being killed.
        handle.0.page_source.stop();
    }
    match std::mem::replace(&mut *phase, Phase::Over) {
        Phase::Frozen(session) => session.commit().map_err(chain_err),
        Phase::Tracking(session) => {
            *phase = Phase::Tracking(session);
            Err(Error::from(format!("pre-copy of pid {} is not finished: nothing to commit", handle.0.pid)))
        }
        Phase::Over => Err(handle.0.over()),
    }
}

/// The migration is off. Before finish: tracking removed, the target runs on untouched. After
/// finish: the frozen original is thawed exactly as it was. Idempotent.
#[neon::export(task)]
fn precopy_abort(Boxed(handle): Boxed<PrecopyHandle>) -> Result<(), Error> {
    let mut phase = handle.0.wait_phase();
    // As source_abort: refuse to thaw once the destination confirmed every page home.
    handle.0.page_source.stop_for_rollback()?;
    match std::mem::replace(&mut *phase, Phase::Over) {
        Phase::Tracking(session) => session.abort().map_err(chain_err),
        Phase::Frozen(session) => session.abort().map(|_| ()).map_err(chain_err),
        Phase::Over => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(n: u32, dirty_mib: u64, predicted_ms: u64) -> RoundStats {
        RoundStats {
            round: n,
            pages: 1000 + u64::from(n),
            zero_pages: 7,
            bytes: 4096 * 993,
            elapsed_ns: 12_345_678,
            scan_ns: 456_789,
            dirty_pages: dirty_mib * 256,
            dirty_bytes: dirty_mib << 20,
            dirty_rate_bps: 1.5e8,
            bandwidth_bps: 2.5e9,
            predicted_downtime_ns: predicted_ms * 1_000_000,
            failed_pages: 3,
        }
    }

    #[test]
    fn round_stats_cross_in_base_units_with_explicit_names() {
        let v = serde_json::to_value(JsRoundStats::new(&round(2, 3, 40), None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "round": 2, "pages": 1002, "zeroPages": 7, "bytes": 4096 * 993,
                "elapsedNs": 12_345_678, "scanNs": 456_789,
                "dirtyPages": 768, "dirtyBytes": 3u64 << 20,
                "dirtyRateBytesPerSec": 1.5e8, "bandwidthBytesPerSec": 2.5e9,
                "predictedDowntimeNs": 40_000_000u64, "failedPages": 3,
            })
        );
        let t = TransferStats { data_pages: 5, ..TransferStats::default() };
        let v = serde_json::to_value(JsRoundStats::new(&round(0, 1, 1), Some(t))).unwrap();
        assert_eq!(v["transfer"]["dataPages"], 5);
    }

    #[test]
    fn decide_options_convert_ms_and_refuse_nonsense() {
        let opts = |ms: f64, n: f64, r: Option<f64>| DecideOptions { max_downtime_ms: Some(ms), max_rounds: Some(n), shrink_ratio: r };
        let o = opts(12.5, 4.0, None).to_engine().unwrap();
        assert_eq!(o.max_downtime_ns, 12_500_000);
        assert_eq!(o.max_rounds, 4);
        assert_eq!(o.shrink_ratio, PrecopyOptions::default().shrink_ratio);
        let d = DecideOptions { max_downtime_ms: None, max_rounds: None, shrink_ratio: None }.to_engine().unwrap();
        let e = PrecopyOptions::default();
        assert_eq!((d.max_downtime_ns, d.max_rounds), (e.max_downtime_ns, e.max_rounds));
        let bad = [
            opts(-1.0, 4.0, None),
            opts(f64::NAN, 4.0, None),
            opts(1.0, 0.0, None),
            opts(1.0, 2.5, None),
            opts(1.0, 2.0, Some(0.0)),
            opts(1.0, 2.0, Some(1.5)),
        ];
        for b in bad {
            assert!(b.to_engine().is_err(), "{b:?} must be refused");
        }
    }

    #[test]
    fn options_parse_from_the_js_shape() {
        let d: DecideOptions = serde_json::from_str(r#"{"maxDowntimeMs":50,"maxRounds":8}"#).unwrap();
        assert_eq!(d.to_engine().unwrap().max_downtime_ns, 50_000_000);
        assert!(serde_json::from_str::<DecideOptions>(r#"{"maxDowntime":50,"maxRounds":8}"#).is_err(), "a misspelt option is an error, not a default");
        let dest: Destination = serde_json::from_str(
            r#"{"address":"127.0.0.1","port":7000,"migrationId":"00","token":"11","bandwidthBytesPerSec":null}"#,
        )
        .unwrap();
        assert_eq!(dest.0.bandwidth(), None);
        // The pull's give-up time is no field of a page stream's destination, not even as null.
        for extra in [r#","giveUpAfterMs":5000"#, r#","giveUpAfterMs":null"#, r#","nonsense":1"#] {
            let json = format!(r#"{{"address":"127.0.0.1","port":7000,"migrationId":"00","token":"11"{extra}}}"#);
            let err = serde_json::from_str::<Destination>(&json).expect_err(&json).to_string();
            assert!(err.contains("unknown field"), "{err}");
        }
        let s: Option<StartOptions> = serde_json::from_str("null").unwrap();
        assert!(s.is_none());
        let s: StartOptions = serde_json::from_str(r#"{"fixedCostNs":5000000}"#).unwrap();
        assert_eq!(s.fixed_cost_ns, Some(5e6));
    }

    #[test]
    fn decision_reports_the_engine_verdict_and_last_prediction() {
        let o = PrecopyOptions { max_downtime_ns: 100_000_000, max_rounds: 5, ..PrecopyOptions::default() };
        let d = decision(&[], &o);
        assert_eq!((d.verdict, d.rounds, d.predicted_downtime_ns), (Verdict::Continue, 0, 0));
        let d = decision(&[round(0, 256, 500), round(1, 8, 90)], &o);
        assert_eq!((d.verdict, d.rounds, d.predicted_downtime_ns), (Verdict::Converged, 2, 90_000_000));
        assert_eq!(serde_json::to_value(&d).unwrap()["verdict"], "converged");
        assert_eq!(serde_json::to_value(Verdict::NotShrinking).unwrap(), "not-shrinking");
        assert_eq!(serde_json::to_value(Verdict::RoundCap).unwrap(), "round-cap");
    }
}
