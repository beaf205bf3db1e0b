/**
 * The migration roles of the engine, as this agent reaches them: through @tern/native only.
 *
 * packages/native/src/migration.ts is the contract; its Rust glue is being built. Until the functions
 * below exist (or while they throw EngineError('unavailable', …)), the routes that need them answer
 * 501 instead of pretending. We look them up at run time, not at compile time, so that this agent
 * builds against either version of @tern/native and starts using the engine the moment it lands.
 *
 * The exact calls, in the order the agent makes them:
 *   destination  PageServer.start({ address, port: 0, migrationId, token })   → { address, port, stats(), close() }
 *                (migrationId: 32 hex digits, token: 64 — fresh per migration, made by the agent)
 *   source       SourceSession.open(pid)                                      → session
 *   source       session.freeze()                                             → FreezeReport
 *   source       session.dump(destination: PageDestination)                   → { image: Buffer, dump, transfer }
 *   destination  restoreProcess(image: Buffer, server)                        → RestoreReport
 *   source       session.commit()   (the original is killed)
 *   source       session.abort()    (before commit: the original thawed exactly as it was)
 *   destination  server.close()
 */
import * as native from '@tern/native';
import { EngineError } from '@tern/native';
import type { DumpStats, PageDestination, RestoreReport, TransferStats } from '@tern/native';
import type { FreezeReport } from '@tern/protocol';

export interface PageServerHandle {
  readonly address: string;
  readonly port: number;
  /** If the engine chose the token itself; otherwise the one we passed is in force. */
  readonly token?: string;
  stats?(): TransferStats | undefined;
  close(): Promise<void>;
}

export interface SourceSessionHandle {
  freeze(): Promise<FreezeReport>;
  dump(destination: PageDestination): Promise<{ image: Buffer; dump?: DumpStats; transfer?: TransferStats } | Buffer>;
  commit(): Promise<void>;
  abort(): Promise<void>;
  close?(): Promise<void>;
}

export interface MigrationEngine {
  startPageServer(opts: { address: string; port: number; migrationId: string; token: string }): Promise<PageServerHandle>;
  openSource(pid: number): Promise<SourceSessionHandle>;
  restore(image: Buffer, server: PageServerHandle): Promise<RestoreReport>;
}

interface NativeMigrationExports {
  PageServer?: { start?: (opts: { address: string; port: number; migrationId: string; token: string }) => Promise<PageServerHandle> };
  SourceSession?: { open?: (pid: number) => SourceSessionHandle | Promise<SourceSessionHandle> };
  restoreProcess?: (image: Buffer, server: PageServerHandle) => Promise<RestoreReport>;
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
    async restore(image, server) {
      if (typeof m.restoreProcess !== 'function') throw new EngineUnavailableError(['restoreProcess']);
      return m.restoreProcess(image, server);
    },
  };
}
