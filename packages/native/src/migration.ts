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
 * The Rust side: crates/tern-node (glue) → tern-core dump::SourceSession, pages::{PageServer,
 * PageSender}, restore::restore_with_files.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import type { FreezeReport } from '@tern/protocol';
import { call, callSync, load, validateTarget, EngineError, type OpaqueBox } from './addon.js';
export interface DumpStats {
  /** Pages sent with their content. */
  dataPages: number;
  /** Pages sent as zero markers. */
  zeroPages: number;
  /** Present pages not sent because the destination maps them from the same file. */
  skippedPages: number;
  bytes: number;
  pagesElapsedNs: number;
  elapsedNs: number;
}

export interface TransferStats {
  dataPages: number;
  zeroPages: number;
  records: number;
  payloadBytes: number;
  wireBytes: number;
  elapsedSecs: number;
  throughputBytesPerSec: number;
}

export interface RestoreReport {
  /** The restored process's pid in the destination's pid namespace (equal to the original's). */
  pid: number;
  /** Every thread, leader first, with its original tid. */
  threads: number[];
  timings: { cloneNs: number; memoryNs: number; threadsNs: number; totalNs: number };
  pagesWritten: number;
  bytesWritten: number;
  /** Things restored differently from the image (e.g. a session that does not exist here). */
  warnings: string[];
}

export interface PageDestination {
  address: string;
  port: number;
  /** 32 hex digits (a UUID with or without dashes). */
  migrationId: string;
  /** Per-migration token the page server expects (64 hex digits). */
  token: string;
  bandwidthBytesPerSec?: number;
}

/** A fresh migration id and page token (crypto-random). */
export function newPageCredentials(): { migrationId: string; token: string } {
  return { migrationId: randomUUID().replace(/-/g, ''), token: randomBytes(32).toString('hex') };
}

/** The destination's page server for one migration. */
export class PageServer {
  private closed = false;
  private lastStats: TransferStats | undefined;
  private constructor(
    readonly address: string,
    readonly port: number,
    readonly migrationId: string,
    readonly token: string,
    /** @internal */ readonly box: OpaqueBox<'page-server'>,
  ) {}

  /** Binds the server (port 0: any free port); the source connects with the same id and token. */
  static async start(opts: { address: string; port?: number; migrationId: string; token: string }): Promise<PageServer> {
    const box = callSync('page server', () => load().pageServerStart(opts.address, opts.port ?? 0, opts.migrationId, opts.token));
    const port = load().pageServerPort(box);
    return new PageServer(opts.address, port, opts.migrationId, opts.token, box);
  }

  /** Waits for a complete, valid page stream and keeps its pages for restore. */
  async wait(timeoutMs = 60_000): Promise<TransferStats> {
    if (this.closed) throw new EngineError('page server', `page server on port ${this.port} is closed`);
    this.lastStats = await call('page server', () => load().pageServerWait(this.box, timeoutMs));
    return this.lastStats;
  }

  stats(): TransferStats | undefined {
    return this.lastStats;
  }

  /** Stops the server and drops every page it holds. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    load().pageServerClose(this.box);
  }
}

/**
 * The source side of one migration. open() only validates the pid; freeze() stops every thread;
 * dump() streams pages to the destination and returns the image; then exactly one of commit()
 * (kill the original: the destination has it) or abort() (thaw it exactly as it was).
 */
export class SourceSession {
  private box: OpaqueBox<'source'> | undefined;
  private constructor(readonly pid: number) {}

  static open(pid: number): SourceSession {
    validateTarget(pid);
    return new SourceSession(pid);
  }

  private live(): OpaqueBox<'source'> {
    if (!this.box) throw new EngineError('source', `pid ${this.pid} is not frozen by this session`);
    return this.box;
  }

  async freeze(): Promise<FreezeReport> {
    if (this.box) throw new EngineError('freeze', `pid ${this.pid} is already frozen by this session`);
    this.box = await call('freeze', () => load().sourceFreeze(this.pid));
    return load().sourceFreezeReport(this.box);
  }

  async dump(destination: PageDestination): Promise<{ image: Buffer; dump: DumpStats; transfer: TransferStats }> {
    const box = this.live();
    const image = await call('dump', () =>
      load().sourceDump(box, destination.address, destination.port, destination.migrationId, destination.token, destination.bandwidthBytesPerSec ?? 0),
    );
    const stats = load().sourceDumpStats(box);
    if (!stats) throw new EngineError('dump', 'the engine returned no dump statistics');
    return { image, dump: stats.dump, transfer: stats.transfer };
  }

  async commit(): Promise<void> {
    const box = this.live();
    await call('commit', () => load().sourceCommit(box));
  }

  /** Thaws the original if this session still holds it; a no-op otherwise. */
  async abort(): Promise<void> {
    if (!this.box) return;
    const box = this.box;
    await call('abort', () => load().sourceAbort(box));
  }
}

/**
 * Rebuilds the process of `image` with its original pid in this process's pid namespace from the
 * pages `server` received (waited for first if needed), and lets it run. `checkInode` (default
 * true) also requires regular files to be the same inode: right for hosts that share a filesystem.
 */
export async function restoreProcess(image: Buffer, server: PageServer, opts: { checkInode?: boolean; waitTimeoutMs?: number } = {}): Promise<RestoreReport> {
  if (!server.stats()) await server.wait(opts.waitTimeoutMs ?? 60_000);
  return call('restore', () => load().restoreProcess(image, server.box, opts.checkInode ?? true));
}
