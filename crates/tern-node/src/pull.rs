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

use std::net::SocketAddr;
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
        let expected = credentials(migration_id, token)?;
        let pages = extents.pages();
        let server = PageSourceServer::bind(socket_addr(&serve.address, 0.0)?, expected, pid, extents, SourceServerOptions::default())
            .map_err(engine_err)?;
        let port = server.local_addr().port();
        if let Some(old) = self.0.lock().unwrap_or_else(|p| p.into_inner()).replace(server) {
            old.shutdown();
        }
        Ok(PageSourceInfo { address: serve.address.clone(), port, pages })
    }

    /// Stops serving (before the original is killed or thawed). Returns what it served, final:
    /// after the stop no HOMED can be answered any more, so `homed` can be trusted to decide
    /// whether the original may still resume.
    pub(crate) fn stop(&self) -> Option<SourceServeStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take().map(PageSourceServer::shutdown)
    }

    /// Stops serving and refuses if the destination confirmed every page home: its copy may be
    /// running on its own, so thawing the original would run the process twice.
    pub(crate) fn stop_for_rollback(&self) -> Result<(), Error> {
        match self.stop() {
            Some(s) if s.homed => Err(Error::from(
                "the destination confirmed every page home (HOMED): its copy may be running, the original must not resume",
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn stats(&self) -> Option<SourceServeStats> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.stats())
    }
}

/// A page endpoint of the other host and this migration's credentials, as JavaScript passes them:
/// where a pre-copy round streams its pages (the destination's page server:
/// [`crate::precopy::Destination`]) or where a restore pulls the pages the source kept (the
/// source's page source: [`PullFrom`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PageEndpoint {
    address: String,
    port: f64,
    pub(crate) migration_id: String,
    pub(crate) token: String,
    /// Cap on the wire (a pull: the background only, faults are never capped); absent, null or
    /// ≤ 0: unlimited.
    #[serde(default)]
    bandwidth_bytes_per_sec: Option<f64>,
    /// Pull only: how long a lost connection is retried before the pull gives up (the process is
    /// killed). Absent: None; present, even null: Some (a page stream refuses it).
    #[serde(default, deserialize_with = "present")]
    pub(crate) give_up_after_ms: Option<Option<f64>>,
}

/// A migration's id and token (hex, as JavaScript holds them), parsed.
pub(crate) fn credentials(migration_id: &str, token: &str) -> Result<Expected, Error> {
    Ok(Expected {
        migration_id: MigrationId::from_hex(migration_id).map_err(engine_err)?,
        token: Token::from_hex(token).map_err(engine_err)?,
    })
}

/// Tells a field given as null from an absent one (with `#[serde(default)]`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

impl PageEndpoint {
    /// The endpoint's address and the migration's credentials, parsed.
    pub(crate) fn parse(&self) -> Result<(SocketAddr, Expected), Error> {
        Ok((socket_addr(&self.address, self.port)?, credentials(&self.migration_id, &self.token)?))
    }

    /// The bandwidth cap in bytes per second, if any: at least one byte per second (a cap of
    /// 0.3 B/s still means "capped", not "unlimited").
    pub(crate) fn bandwidth(&self) -> Option<u64> {
        self.bandwidth_bytes_per_sec.filter(|b| b.is_finite() && *b > 0.0).map(|b| (b as u64).max(1))
    }
}

/// Where a restore pulls the pages the source kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub(crate) struct PullFrom(PageEndpoint);

impl PullFrom {
    /// Connects to the source's page source for the pages `image` left there.
    pub(crate) fn connect(&self, image: &ProcessImage) -> Result<std::sync::Arc<RemotePages>, Error> {
        let mut options = PullOptions { bandwidth: self.0.bandwidth(), ..PullOptions::default() };
        if let Some(ms) = self.0.give_up_after_ms.flatten().filter(|m| m.is_finite() && *m > 0.0) {
            options.give_up_after = std::time::Duration::from_millis(ms as u64);
        }
        let (addr, e) = self.0.parse()?;
        RemotePages::connect(addr, e.migration_id, e.token, RangeSet::from_ranges(image.mm.remote_pages.iter().copied()), options)
            .map_err(engine_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(extra: &str) -> Result<PageEndpoint, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"address":"127.0.0.1","port":7000,"migrationId":"{}","token":"{}"{extra}}}"#,
            "ab".repeat(16),
            "cd".repeat(32)
        ))
    }

    #[test]
    fn endpoints_parse_from_the_js_shape() {
        let e = endpoint("").unwrap();
        let (addr, creds) = e.parse().unwrap();
        assert_eq!(addr, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(creds.migration_id, MigrationId([0xab; 16]));
        assert_eq!((e.bandwidth(), e.give_up_after_ms), (None, None));
        // A cap under one byte per second is still a cap; 0, negative or null: none.
        assert_eq!(endpoint(r#","bandwidthBytesPerSec":0.3"#).unwrap().bandwidth(), Some(1));
        assert_eq!(endpoint(r#","bandwidthBytesPerSec":2e6"#).unwrap().bandwidth(), Some(2_000_000));
        for none in ["0", "-5", "null"] {
            assert_eq!(endpoint(&format!(r#","bandwidthBytesPerSec":{none}"#)).unwrap().bandwidth(), None);
        }
        assert_eq!(endpoint(r#","giveUpAfterMs":null"#).unwrap().give_up_after_ms, Some(None));
        assert_eq!(endpoint(r#","giveUpAfterMs":250"#).unwrap().give_up_after_ms, Some(Some(250.0)));
        assert!(endpoint(r#","giveUpAfter":250"#).is_err(), "a misspelt field is an error");
        let pull: PullFrom = serde_json::from_str(r#"{"address":"::1","port":1,"migrationId":"00","token":"11","giveUpAfterMs":9}"#).unwrap();
        assert_eq!(pull.0.give_up_after_ms, Some(Some(9.0)));
        let bad = PageEndpoint { port: 70000.0, ..e.clone() };
        assert!(bad.parse().is_err());
        let bad = PageEndpoint { token: "zz".into(), ..e };
        assert!(bad.parse().is_err());
    }
}
