//! [`SourceSession`]: the source side of a cold migration as one object with explicit outcomes.
//!
//! `freeze → dump → (wait for the destination) → commit | abort`. Until `commit` the original is
//! only frozen: `abort` (or dropping the session) thaws it exactly as it was. `commit` kills it:
//! after the destination has restored the copy, the original must never run again.
use super::{dump, DumpError, DumpStats};
use crate::image::ProcessImage;
use crate::pages::PageSink;
use crate::ptrace::{FreezeError, FreezeReport, ThawError, ThawReport, Tracer, TracerError};
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
    #[error("killing pid {pid}: {errno}")]
    Kill { pid: Pid, errno: Errno },
    #[error("pid {pid} did not die within {waited_ms} ms of SIGKILL")]
    StillAlive { pid: Pid, waited_ms: u64 },
}

/// The source side of one migration (see the module header).
#[derive(Debug)]
pub struct SourceSession {
    tracer: Tracer,
    freeze: FreezeReport,
}

impl SourceSession {
    /// Freezes every thread of `pid`.
    pub fn freeze(pid: Pid) -> Result<SourceSession, SessionError> {
        let tracer = Tracer::new(pid)?;
        let freeze = tracer.freeze()?;
        Ok(SourceSession { tracer, freeze })
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

    /// The destination has the process: kill the original (SIGKILL while frozen) and wait until
    /// it is dead (a zombie for its parent to reap, or gone).
    pub fn commit(self) -> Result<(), SessionError> {
        let pid = self.tracer.pid();
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
    pub fn abort(self) -> Result<ThawReport, SessionError> {
        Ok(self.tracer.thaw()?)
    }
}
