/**
 * The engine's migration roles, as the agent drives them (cold mode; pre-copy and post-copy grow
 * from here). The sequence across two hosts, orchestrated by the coordinator through the agents:
 *
 *   destination: PageServer.start()            → address, port (the source connects here)
 *   source:      SourceSession.open(pid)       → validates the pid, starts the tracer thread
 *   source:      session.freeze()              → every thread stopped (the downtime starts)
 *   source:      session.dump(destination)     → image (msgpack) + pages streamed to the server
 *   destination: restoreProcess(image, server) → the process rebuilt with the same pid, running
 *   source:      session.commit()              → the original killed (commit point passed)
 * Any failure before commit: destination closes its server / kills what it built, and the source
 * calls session.abort(), which thaws the original exactly as it was.
 *
 * Contract for the Rust glue in crates/tern-node (tern-core: dump, pages, restore). Functions whose
 * glue is not built yet throw EngineError('unavailable', …) — callers refuse the migration clearly.
 */
export interface DumpStats {
  dataPages: number;
  zeroPages: number;
  skippedPages: number;
  bytes: number;
  elapsedNs: number;
}

export interface TransferStats {
  pages: number;
  zeroPages: number;
  wireBytes: number;
  elapsedNs: number;
}

export interface RestoreReport {
  /** The restored process's pid in the destination's pid namespace (equal to the original's). */
  pid: number;
  threads: number[];
  elapsedNs: { clone: number; memory: number; threads: number; total: number };
}

export interface PageDestination {
  address: string;
  port: number;
  migrationId: string;
  /** Per-migration token the page server expects (64 hex chars). */
  token: string;
  bandwidthBytesPerSec?: number;
}
