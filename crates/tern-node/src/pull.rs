//! Post-copy glue: the page source a frozen original serves its remaining pages from, and the
//! destination's connection to it (tern-core pages::pull).
//!
//! ```text
//!  source agent                                         destination agent
//!  source_dump / precopy_finish(…, {address})  task:
//!    final dump leaves private anonymous pages in the
//!    frozen process (image.mm.remote_pages) and binds
//!    a PageSourceServer on address:0 → stats.pageSource
//!                                                       restore_process(image, server, …,
//!                                                         {remote: {address, port, …}}) task:
//!                                                         RemotePages::connect, then the lazy
//!                                                         restore layered over the local store
//!                                                       page_server_lazy_stats → …remote state
//!  source_commit / precopy_commit: page source shut
//!  down, then the original killed (after "homed")
//!  source_abort / precopy_abort: shut down, thawed
//! ```

use std::sync::Mutex;

use neon::types::extract::Error;
use serde::{Deserialize, Serialize};
use tern_core::dirty::RangeSet;
use tern_core::image::ProcessImage;
use tern_core::pages::pull::{PageSourceServer, PullOptions, RemotePages, SourceServeStats, SourceServerOptions};
use tern_core::pages::{Expected, MigrationId, Token};
use tern_core::sys::Pid;

use crate::{engine_err, socket_addr};

/// Asked of a final dump: leave private anonymous pages on the source and serve them here.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ServeLazy {
    /// Address to bind the page source on (port chosen by the kernel).
    pub(crate) address: String,
}

/// Where the destination pulls from (reported in the dump's outcome).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PageSourceInfo {
    pub(crate) address: String,
    pub(crate) port: u16,
    /// Data pages left on the source.
    pub(crate) pages: u64,
}

/// The page source of one frozen original, until commit or abort.
#[derive(Default)]
pub(crate) struct PageSourceSlot(Mutex<Option<PageSourceServer>>);

impl PageSourceSlot {
    /// Binds the page source for the pages `image` left on the source.
    pub(crate) fn start(
        &self,
        serve: &ServeLazy,
        pid: Pid,
        image: &ProcessImage,
        migration_id: &str,
        token: &str,
    ) -> Result<PageSourceInfo, Error> {
        let extents = RangeSet::from_ranges(image.mm.remote_pages.iter().copied());
        let expected = Expected {
            migration_id: MigrationId::from_hex(migration_id).map_err(engine_err)?,
            token: Token::from_hex(token).map_err(engine_err)?,
        };
        let pages = extents.pages();
        let server = PageSourceServer::bind(socket_addr(&serve.address, 0.0)?, expected, pid, extents, SourceServerOptions::default())
            .map_err(engine_err)?;
        let port = server.local_addr().port();
        if let Some(old) = self.0.lock().unwrap_or_else(|p| p.into_inner()).replace(server) {
            old.shutdown();
        }
        Ok(PageSourceInfo { address: serve.address.clone(), port, pages })
    }

    /// Stops serving (before the original is killed or thawed).
    pub(crate) fn stop(&self) {
        if let Some(server) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            server.shutdown();
        }
    }

    pub(crate) fn stats(&self) -> Option<SourceServeStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.stats())
    }
}

/// Where a restore pulls the pages the source kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PullFrom {
    address: String,
    port: f64,
    migration_id: String,
    token: String,
    /// Background pull cap (faults are never capped); absent or ≤ 0: unlimited.
    #[serde(default)]
    bandwidth_bytes_per_sec: Option<f64>,
    /// How long a lost connection is retried before the pull gives up (the process is killed).
    #[serde(default)]
    give_up_after_ms: Option<f64>,
}

impl PullFrom {
    /// Connects to the source's page source for the pages `image` left there.
    pub(crate) fn connect(&self, image: &ProcessImage) -> Result<std::sync::Arc<RemotePages>, Error> {
        let mut options = PullOptions {
            bandwidth: self.bandwidth_bytes_per_sec.filter(|b| b.is_finite() && *b > 0.0).map(|b| (b as u64).max(1)),
            ..PullOptions::default()
        };
        if let Some(ms) = self.give_up_after_ms.filter(|m| m.is_finite() && *m > 0.0) {
            options.give_up_after = std::time::Duration::from_millis(ms as u64);
        }
        RemotePages::connect(
            socket_addr(&self.address, self.port)?,
            MigrationId::from_hex(&self.migration_id).map_err(engine_err)?,
            Token::from_hex(&self.token).map_err(engine_err)?,
            RangeSet::from_ranges(image.mm.remote_pages.iter().copied()),
            options,
        )
        .map_err(engine_err)
    }
}
