//! [`SourceSession`]: the source side of a cold migration as one object with explicit outcomes.
//!
//! `freeze → dump → (wait for the destination) → commit | abort`. Until `commit` the original is
//! only frozen: `abort` (or dropping the session) thaws it exactly as it was. `commit` kills it:
//! after the destination has restored the copy, the original must never run again.
//!
//! **Never run twice, even if the agent dies.** `freeze` also parks a SIGSTOP under the ptrace
//! stop ([`Tracer::park_stop`]): it stays pending while every thread is ptrace-stopped, so if the
//! process holding this session dies, the kernel's automatic detach lands the source in a
//! group-stop (state T) instead of letting it run on; only a SIGCONT (an operator's decision)
//! resumes it. `dump` leaves that SIGSTOP out of the image (the copy must not start stopped).
//! `commit` SIGKILLs as before (SIGKILL wins over a pending SIGSTOP). `abort` consumes it
//! silently: the park thread dequeues it under ptrace (all its other signals blocked), the
//! signal-delivery-stop is suppressed, and only then is any thread detached, so no group-stop
//! happens and the process sees no SIGSTOP/SIGCONT. Limits: a SIGCONT someone sends while frozen
//! flushes the parked SIGSTOP (the protection is then lost; abort notices and consumes nothing);
//! SIGCONTs pending at the park are flushed by it and re-sent (with our siginfo) at abort; a
//! SIGSTOP already pending (or a stopped process) is left alone and protects the same way.
use super::{dump, DumpError, DumpStats};
use crate::dirty::DirtyTracker;
use crate::image::ProcessImage;
use crate::pages::PageSink;
use crate::ptrace::{
    FreezeError, FreezeReport, ParkError, ParkOutcome, ThawError, ThawReport, Tracer, TracerError,
};
use crate::sys::{Errno, Pid};
use std::time::{Duration, Instant};

/// A failed session step.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Thaw(#[from] ThawError),
    #[error(transparent)]
    Park(#[from] ParkError),
    #[error("killing pid {pid}: {errno}")]
    Kill { pid: Pid, errno: Errno },
    #[error("pid {pid} did not die within {waited_ms} ms of SIGKILL")]
    StillAlive { pid: Pid, waited_ms: u64 },
}

/// The source side of one migration (see the module header).
pub struct SourceSession {
    tracer: Tracer,
    freeze: FreezeReport,
    park: ParkOutcome,
    /// Pre-copy's dirty tracking, still installed: removing it walks every tracked page table
    /// (~25 ms per GiB), so it is not done inside the downtime. abort() removes it before the
    /// thaw; commit() drops it only after the kill, when the kernel tears it down with the mm.
    tracking: Option<Box<dyn DirtyTracker>>,
}

impl std::fmt::Debug for SourceSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSession")
            .field("pid", &self.tracer.pid())
            .field("freeze", &self.freeze)
            .field("park", &self.park)
            .field("tracking", &self.tracking.as_ref().map(|t| t.kind()))
            .finish()
    }
}

impl SourceSession {
    /// Freezes every thread of `pid` and parks a SIGSTOP under the ptrace stop (module header).
    /// If the park fails the process is thawed and the error returned.
    pub fn freeze(pid: Pid) -> Result<SourceSession, SessionError> {
        let tracer = Tracer::new(pid)?;
        let freeze = tracer.freeze()?;
        Self::park(tracer, freeze, None)
    }

    /// What protects the frozen source if this process dies (see the module header).
    pub fn park_outcome(&self) -> ParkOutcome {
        self.park
    }

    /// Wraps a tracer whose target is already frozen (pre-copy's final freeze, with its dirty
    /// tracking still installed) and parks the SIGSTOP as [`SourceSession::freeze`] does. If the
    /// park fails, tracking is removed and the process thawed.
    pub(crate) fn from_frozen(
        tracer: Tracer,
        freeze: FreezeReport,
        tracking: Box<dyn DirtyTracker>,
    ) -> Result<SourceSession, SessionError> {
        Self::park(tracer, freeze, Some(tracking))
    }

    /// Parks the SIGSTOP under the ptrace stop of a frozen target; if that fails, removes the
    /// tracking (if any), thaws the target and returns the error.
    fn park(
        tracer: Tracer,
        freeze: FreezeReport,
        mut tracking: Option<Box<dyn DirtyTracker>>,
    ) -> Result<SourceSession, SessionError> {
        let park = match tracer.park_stop() {
            Ok(park) => park,
            Err(e) => {
                if let Some(t) = tracking.as_mut() {
                    let _ = t.stop(&tracer);
                }
                let _ = tracer.thaw();
                return Err(e.into());
            }
        };
        Ok(SourceSession {
            tracer,
            freeze,
            park,
            tracking,
        })
    }

    pub fn pid(&self) -> Pid {
        self.tracer.pid()
    }

    pub fn freeze_report(&self) -> &FreezeReport {
        &self.freeze
    }

    /// The tracer holding the target (for more remote work while frozen).
    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    /// Dumps the frozen process; on failure it stays frozen (abort or retry).
    pub fn dump<S: PageSink>(
        &self,
        sink: &mut S,
    ) -> Result<(ProcessImage, DumpStats), DumpError> {
        dump(&self.tracer, sink)
    }

    /// [`Self::dump`] with a choice of what happens to private anonymous pages (post-copy
    /// leaves them here: serve them with [`crate::pages::pull::PageSourceServer`] until the
    /// destination has them all, then commit).
    pub fn dump_with<S: PageSink>(
        &self,
        sink: &mut S,
        policy: super::PagePolicy,
    ) -> Result<(ProcessImage, DumpStats), DumpError> {
        super::dump_selected(&self.tracer, sink, None, policy)
    }

    /// The destination has the process: kill the original (SIGKILL while frozen) and wait until
    /// it is dead (a zombie for its parent to reap, or gone).
    pub fn commit(mut self) -> Result<(), SessionError> {
        let pid = self.tracer.pid();
        // Dropped only once the process is dead (see `tracking`).
        let _tracking = self.tracking.take();
        // Connected TCP sockets go into repair mode first: the kill then closes them silently
        // (no FIN/RST reaches the peer, which now talks to the destination). Best effort.
        let _ = crate::files::tcp::silence_process(pid);
        // SAFETY: kill takes two integers; `pid` is the process this session froze (its start
        // time was checked by the inspection of the dump).
        Errno::result(unsafe { libc::kill(pid.as_raw(), libc::SIGKILL) })
            .map_err(|errno| SessionError::Kill { pid, errno })?;
        drop(self.tracer); // reaps the tracees' exit notifications
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return Ok(()),
                Ok(s) => {
                    let state = s.rsplit(')').next().and_then(|r| r.split_whitespace().next());
                    if matches!(state, Some("Z") | Some("X")) {
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(SessionError::StillAlive {
            pid,
            waited_ms: 10_000,
        })
    }

    /// The migration is off: thaw the original, which continues exactly as before.
    pub fn abort(mut self) -> Result<ThawReport, SessionError> {
        if let Some(mut tracking) = self.tracking.take() {
            // Best effort: closing our end of the tracking (the drop) unregisters what is left.
            let _ = tracking.stop(&self.tracer);
        }
        Ok(self.tracer.thaw()?)
    }
}
