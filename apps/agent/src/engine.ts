/**
 * The migration roles of the engine, as this agent reaches them: through @tern/native only.
 *
 * packages/native/src/migration.ts is the contract. The functions are looked up at run time: a build
 * of @tern/native without one of them (or one that throws EngineError('unavailable', …)) makes the
 * routes that need it answer 501 instead of pretending.
 *
 * The exact calls, in the order the agent makes them:
 *   destination  PageServer.start({ address, port: 0, migrationId, token })   → { address, port, stats(), close() }
 *                (migrationId: 32 hex digits, token: 64 — fresh per migration, made by the agent)
 *   source       SourceSession.open(pid)                                      → session
 *   source       session.freeze()                                             → FreezeReport
 *   source       session.dump(destination: PageDestination, lazy?)           → { image: Buffer, dump, transfer, pageSource }
 *                (lazy = { address }: post-copy — private memory stays in the frozen original, a page
 *                source on address serves it; pageSource says where)
 *   destination  restoreProcess(image: Buffer, server, { lazy, remote })       → RestoreReport
 *                (lazy: private memory filled by userfaultfd after the process runs; remote: the
 *                source's page source for what stayed there; server.lazyWait(ms) until every page
 *                is home, server.lazyStats() meanwhile)
 *   source       pre-copy instead of open/freeze/dump:
 *                PrecopySession.open(pid)                                    → precopy (tracking on, process runs)
 *                precopy.round(destination) … precopy.decide(limits)        → one round's stats, then the verdict
 *                precopy.finish(destination, lazy?)                          → freeze, last dirty pages (hybrid:
 *                                                                              left on the source), image
 *   source       session.commit()   (the page source stops, the original is killed; after "homed" in
 *                                    post-copy and hybrid)
 *   source       session.abort()    (before commit: the original thawed exactly as it was)
 *   destination  server.close()
 */
import * as native from '@tern/native';
import { EngineError } from '@tern/native';
import type { DumpStats, LazyStats, PageDestination, PageSourceInfo, PageSourceStats, PullFrom, RestoreReport, TransferStats } from '@tern/native';
import type { FreezeReport, PrecopyRound, PrecopyVerdict } from '@tern/protocol';

export interface PageServerHandle {
  readonly address: string;
  readonly port: number;
  /** If the engine chose the token itself; otherwise the one we passed is in force. */
  readonly token?: string;
  stats?(): TransferStats | undefined;
  /** The lazy fill of the process restored from this server (null: none). */
  lazyStats?(): LazyStats | null;
  lazyWait?(timeoutMs: number): Promise<LazyStats | null>;
  /** Fault service times (ns) since the last call. */
  lazyFaultSamples?(): number[];
  /** Lets the lazy fill's background copy start (held after a restore until this, or a short delay). */
  lazyRelease?(): boolean;
  close(): Promise<void>;
}

/** Asked of a final dump: leave private anonymous pages on the source and serve them on this address. */
export interface ServeLazy {
  address: string;
}

export interface SourceSessionHandle {
  freeze(): Promise<FreezeReport>;
  dump(destination: PageDestination, lazy?: ServeLazy): Promise<{ image: Buffer; dump?: DumpStats; transfer?: TransferStats; pageSource?: PageSourceInfo | null } | Buffer>;
  commit(): Promise<void>;
  abort(): Promise<void>;
  close?(): Promise<void>;
  /** Post-copy: what the page source has served so far (null: none runs). */
  pageSourceStats?(): PageSourceStats | null;
}

/** One pre-copy round as the agent reports it (protocol units: ms, bytes, bytes/s). */
export type PrecopyRoundReport = PrecopyRound;

export interface PrecopyHandle {
  /** Sends the pages dirtied since the last round (round 0: all) while the process runs. */
  round(destination: PageDestination): Promise<PrecopyRoundReport>;
  /** The engine's convergence test over the rounds so far. */
  decide(limits: { maxDowntimeMs?: number; maxRounds?: number }): Promise<PrecopyVerdict>;
  /** Freezes the process and sends the last dirty pages (hybrid: leaves them here); the image as SourceSession.dump returns it. */
  finish(
    destination: PageDestination,
    lazy?: ServeLazy,
  ): Promise<{ image: Buffer; dump?: DumpStats; transfer?: TransferStats; freeze?: FreezeReport; frozenNs?: number; timings?: Record<string, number>; pageSource?: PageSourceInfo | null }>;
  commit(): Promise<void>;
  /** Stops tracking (and thaws, after finish) — the process as it was. */
  abort(): Promise<void>;
  /** Hybrid: what the page source has served so far (null: none runs). */
  pageSourceStats?(): PageSourceStats | null;
}

export interface MigrationEngine {
  startPageServer(opts: { address: string; port: number; migrationId: string; token: string }): Promise<PageServerHandle>;
  openSource(pid: number): Promise<SourceSessionHandle>;
  /** fixedCostMs: what a switchover costs beyond moving the last dirty pages (freeze, image, restore). */
  openPrecopy(pid: number, opts?: { fixedCostMs?: number }): Promise<PrecopyHandle>;
  restore(image: Buffer, server: PageServerHandle, opts?: { lazy?: boolean; remote?: PullFrom }): Promise<RestoreReport>;
}

interface NativePrecopySession {
  round(dest: PageDestination): Promise<native.RoundStats>;
  decide(limits?: { maxDowntimeMs?: number; maxRounds?: number }): Promise<PrecopyVerdict>;
  finish(
    dest: PageDestination,
    lazy?: ServeLazy,
  ): Promise<{ image: Buffer; dump: DumpStats; transfer: TransferStats; freeze: FreezeReport; frozenNs?: number; timings?: Record<string, number>; pageSource?: PageSourceInfo | null }>;
  commit(): Promise<void>;
  abort(): Promise<void>;
  pageSourceStats(): PageSourceStats | null;
}

interface NativeMigrationExports {
  PrecopySession?: { open?: (pid: number, opts?: { fixedCostNs?: number }) => Promise<NativePrecopySession> };
  PageServer?: { start?: (opts: { address: string; port: number; migrationId: string; token: string }) => Promise<PageServerHandle> };
  SourceSession?: { open?: (pid: number) => SourceSessionHandle | Promise<SourceSessionHandle> };
  restoreProcess?: (image: Buffer, server: PageServerHandle, opts?: { lazy?: boolean; remote?: PullFrom }) => Promise<RestoreReport>;
}

export const UNAVAILABLE_MESSAGE = 'cold migration engine is not built in this version';

/** Thrown where a role needs an engine function this build does not have; the app answers 501. */
export class EngineUnavailableError extends Error {
  override name = 'EngineUnavailableError';
  constructor(readonly missing: string[]) {
    super(UNAVAILABLE_MESSAGE);
  }
}

/** True for the engine's own "not built" answer (EngineError('unavailable', …)). */
export function isUnavailable(err: unknown): boolean {
  return err instanceof EngineUnavailableError || (err instanceof EngineError && err.operation === 'unavailable');
}

/** Which of the migration roles' native functions are missing from @tern/native (empty: all there). */
export function missingNativeFunctions(mod: unknown = native): string[] {
  const m = mod as NativeMigrationExports;
  const missing: string[] = [];
  if (typeof m.PageServer?.start !== 'function') missing.push('PageServer.start');
  if (typeof m.SourceSession?.open !== 'function') missing.push('SourceSession.open');
  if (typeof m.restoreProcess !== 'function') missing.push('restoreProcess');
  return missing;
}

/** The engine's migration roles through @tern/native; each call throws EngineUnavailableError if its function is missing. */
export function nativeMigrationEngine(mod: unknown = native): MigrationEngine {
  const m = mod as NativeMigrationExports;
  return {
    async startPageServer(opts) {
      const start = m.PageServer?.start;
      if (typeof start !== 'function') throw new EngineUnavailableError(['PageServer.start']);
      return start.call(m.PageServer, opts);
    },
    async openSource(pid) {
      const open = m.SourceSession?.open;
      if (typeof open !== 'function') throw new EngineUnavailableError(['SourceSession.open']);
      return open.call(m.SourceSession, pid);
    },
    async openPrecopy(pid, opts = {}) {
      const open = m.PrecopySession?.open;
      if (typeof open !== 'function') throw new EngineUnavailableError(['PrecopySession.open']);
      const session = await open.call(m.PrecopySession, pid, opts.fixedCostMs !== undefined ? { fixedCostNs: Math.round(opts.fixedCostMs * 1e6) } : {});
      const ms = (ns: number | null | undefined) => (ns === null || ns === undefined ? null : ns / 1e6);
      return {
        async round(destination) {
          const r = await session.round(destination);
          return {
            round: r.round,
            pages: r.pages,
            bytes: r.bytes,
            elapsedMs: ms(r.elapsedNs) ?? 0,
            scanMs: ms(r.scanNs) ?? 0,
            dirtyRateBytesPerSec: r.dirtyRateBytesPerSec ?? null,
            bandwidthBytesPerSec: r.bandwidthBytesPerSec ?? null,
            predictedDowntimeMs: ms(r.predictedDowntimeNs),
          };
        },
        decide: (limits) => session.decide(limits),
        finish: (destination, lazy) => session.finish(destination, lazy),
        commit: () => session.commit(),
        abort: () => session.abort(),
        pageSourceStats: () => session.pageSourceStats(),
      };
    },
    async restore(image, server, opts = {}) {
      if (typeof m.restoreProcess !== 'function') throw new EngineUnavailableError(['restoreProcess']);
      return m.restoreProcess(image, server, opts);
    },
  };
}
