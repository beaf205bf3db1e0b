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
 * Pre-copy replaces open/freeze/dump on the source (the process keeps running until finish):
 *
 *   source:      PrecopySession.open(pid)      → dirty tracking on (a brief freeze), process runs
 *   source:      precopy.round(destination)    → one page stream per round: round 0 every page,
 *                  ×N, with precopy.decide()      then each round's dirty set (later rounds win at
 *                                                 the destination); decide() says when to stop
 *   source:      precopy.finish(destination)   → freeze, last dirty set, tracking off; the image
 *   destination: restoreProcess(image, server) → uses every stream committed so far, merged
 *   source:      precopy.commit() | precopy.abort()
 * abort() before finish only stops tracking: the process runs on exactly as before.
 *
 * The Rust side: crates/tern-node (glue) → tern-core dump::{SourceSession, PrecopySession},
 * pages::{PageServer, PageSender}, restore::restore_with_files.
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
  /** Data pages left on the source for the destination to pull (post-copy, hybrid). */
  remotePages: number;
  pagesElapsedNs: number;
  elapsedNs: number;
}

/** Where the destination pulls the pages a post-copy or hybrid dump left on the source. */
export interface PageSourceInfo {
  address: string;
  port: number;
  /** Data pages left on the source. */
  pages: number;
}

/** What the source's page source has served (post-copy, hybrid). */
export interface PageSourceStats {
  connections: number;
  rejected: number;
  requests: number;
  pages: number;
  bytes: number;
  refusedRequests: number;
  /** Pull connections open now. */
  activeConnections: number;
  /** The destination confirmed every page home (HOMED, acknowledged); stays true. */
  homed: boolean;
  /** Milliseconds since the last pull connection closed (or the page source started); null while one is open. */
  idleMs: number | null;
}

/** The destination's pull connection to the source (LazyStats.remote). */
export interface RemotePullStats {
  /** connected | reconnecting (faulting threads wait) | closed (all home) | failed (source gone for good). */
  state: 'connected' | 'reconnecting' | 'closed' | 'failed';
  reconnects: number;
  disconnectedNs: number;
  faultRequests: number;
  faultPages: number;
  prefetchPages: number;
  bytes: number;
  requestP50Ns: number;
  requestP99Ns: number;
  lastError: string | null;
}

/** Where a restore pulls the pages the image left on the source. */
export interface PullFrom {
  address: string;
  port: number;
  migrationId: string;
  token: string;
  /** Background pull cap; faults are never capped. */
  bandwidthBytesPerSec?: number;
  /** How long a lost connection is retried before the pull gives up (the process is killed). */
  giveUpAfterMs?: number;
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

/**
 * Where a restore's time went (ns). cloneNs/memoryNs/threadsNs are the coarse phases of totalNs (the
 * rebuild); the rest split them step by step. filesNs (the fds recreated before the rebuild) is not
 * part of totalNs. remoteSyscalls / remoteRoundTrips: syscalls run inside the process and the ptrace
 * stop/resume round trips they took (a batch takes one).
 */
export interface RestoreTimings {
  cloneNs: number;
  memoryNs: number;
  threadsNs: number;
  totalNs: number;
  filesNs?: number;
  precheckNs?: number;
  spawnNs?: number;
  handoverNs?: number;
  seizeNs?: number;
  layoutNs?: number;
  mmapNs?: number;
  lazyStartNs?: number;
  writeNs?: number;
  protectNs?: number;
  mmNs?: number;
  taskNs?: number;
  threadCloneNs?: number;
  threadStateNs?: number;
  finishNs?: number;
  remoteSyscalls?: number;
  remoteRoundTrips?: number;
}

export interface RestoreReport {
  /** The restored process's pid in the destination's pid namespace (equal to the original's). */
  pid: number;
  /** Every thread, leader first, with its original tid. */
  threads: number[];
  timings: RestoreTimings;
  pagesWritten: number;
  bytesWritten: number;
  /** Things restored differently from the image (e.g. a session that does not exist here). */
  warnings: string[];
  /** Connected TCP sockets whose peers were prompted (ICMP, RFC 6069) to retransmit at once after the resume. */
  nudgedConnections: number;
  /** What was left to the lazy fill (restoreProcess with `lazy`), null when every page was written. */
  lazy: LazySummary | null;
}

/** What a lazy restore registered with its userfaultfd instead of writing. */
export interface LazySummary {
  /** VMAs registered (private anonymous memory with data). */
  ranges: number;
  registeredPages: number;
  /** Data pages filled after the process runs (faults + background). */
  lazyPages: number;
  /** UFFD_FEATURE_* bits the kernel granted. */
  features: number;
}

/** Progress of a lazy fill (PageServer.lazyStats / lazyWait). */
export interface LazyStats {
  pid: number;
  /** running → homed (every page home, userfaultfd gone, pages dropped) | exited | failed (the process was killed). */
  state: { state: 'running' | 'homed' | 'exited' } | { state: 'failed'; detail: string };
  summary: LazySummary;
  faults: number;
  faultPages: number;
  zeroPages: number;
  backgroundPages: number;
  /** Pending pages the process unmapped or discarded before they were filled. */
  droppedPages: number;
  pendingPages: number;
  eventsFork: number;
  /** Forked children whose userfaultfd the guard could not take: they read zeros if the engine dies before their memory is home. 0 normally. */
  forksUnguarded: number;
  eventsRemap: number;
  eventsRemove: number;
  eventsUnmap: number;
  retries: number;
  /** Fault service time (message read → page mapped). */
  faultP50Ns: number;
  faultP99Ns: number;
  faultMaxNs: number;
  elapsedNs: number;
  /** Restore → every page home; null until then. */
  homeNs: number | null;
  /** The pull connection to the source (post-copy, hybrid); null when every page was here. */
  remote: RemotePullStats | null;
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

/** The page server's live counters (all streams so far, failed and in-flight ones included). */
export interface ServerProgress {
  connectionsAccepted: number;
  connectionsRejected: number;
  streamsActive: number;
  streamsCompleted: number;
  streamsFailed: number;
  dataPagesReceived: number;
  zeroPagesReceived: number;
  wireBytesReceived: number;
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

  /** Live counters: connections, streams, pages and bytes received so far. */
  progress(): ServerProgress {
    if (this.closed) throw new EngineError('page server', `page server on port ${this.port} is closed`);
    return callSync('page server', () => load().pageServerProgress(this.box));
  }

  /** Progress of the lazy fill of the process restored from this server (null: none). */
  lazyStats(): LazyStats | null {
    return callSync('lazy pages', () => load().pageServerLazyStats(this.box));
  }

  /** Fault service times (ns) recorded since the last call: feed a histogram (the first 65536 faults are sampled). */
  lazyFaultSamples(): number[] {
    return callSync('lazy pages', () => load().pageServerLazyFaultSamples(this.box));
  }

  /**
   * Lets the lazy fill's background copy start now. After a lazy restore the engine serves faults
   * at once but holds the background copy (a gigabyte of UFFDIO_COPY) until this call, or until a
   * short delay has passed, so that it does not compete with the answer that ends the downtime.
   * False: no lazy restore from this server. Idempotent.
   */
  lazyRelease(): boolean {
    return callSync('lazy pages', () => load().pageServerLazyRelease(this.box));
  }

  /** Waits until the lazily restored process has all its memory (or exited); null: no lazy restore. */
  async lazyWait(timeoutMs = 60_000): Promise<LazyStats | null> {
    return call('lazy pages', () => load().pageServerLazyWait(this.box, timeoutMs));
  }

  /** Stops the server and drops every page it holds (a lazy fill in progress keeps its own). Idempotent. */
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

  /**
   * Dumps the frozen process into the destination's page server. With `lazy` (post-copy) private
   * anonymous memory stays here: a page source bound on `lazy.address` serves it until commit()
   * or abort(), and `pageSource` says where.
   */
  async dump(
    destination: PageDestination,
    lazy?: { address: string },
  ): Promise<{ image: Buffer; dump: DumpStats; transfer: TransferStats; pageSource: PageSourceInfo | null }> {
    const box = this.live();
    const image = await call('dump', () =>
      load().sourceDump(box, destination.address, destination.port, destination.migrationId, destination.token, destination.bandwidthBytesPerSec ?? 0, lazy ?? null),
    );
    const stats = load().sourceDumpStats(box);
    if (!stats) throw new EngineError('dump', 'the engine returned no dump statistics');
    return { image, dump: stats.dump, transfer: stats.transfer, pageSource: stats.pageSource };
  }

  /** What the page source has served (null: none running). */
  pageSourceStats(): PageSourceStats | null {
    if (!this.box) return null;
    return load().sourcePageSourceStats(this.box);
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
 * `lazy` (default false): private anonymous memory is filled after the process runs, from the
 * pages the server holds, which move into the engine's lazy thread (see PageServer.lazyWait).
 */
export async function restoreProcess(
  image: Buffer,
  server: PageServer,
  opts: { checkInode?: boolean; waitTimeoutMs?: number; lazy?: boolean; remote?: PullFrom } = {},
): Promise<RestoreReport> {
  if (!server.stats()) await server.wait(opts.waitTimeoutMs ?? 60_000);
  const remote = opts.remote ? pullFromJson(opts.remote) : null;
  return call('restore', () => load().restoreProcess(image, server.box, opts.checkInode ?? true, opts.lazy ?? false, remote));
}

function pullFromJson(p: PullFrom): PullFrom {
  const out: PullFrom = { address: p.address, port: p.port, migrationId: p.migrationId, token: p.token };
  if (p.bandwidthBytesPerSec !== undefined && p.bandwidthBytesPerSec > 0) out.bandwidthBytesPerSec = p.bandwidthBytesPerSec;
  if (p.giveUpAfterMs !== undefined && p.giveUpAfterMs > 0) out.giveUpAfterMs = p.giveUpAfterMs;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Pre-copy
// ---------------------------------------------------------------------------------------------

/** How dirty pages are found: soft-dirty bits, or userfaultfd write-protect + PAGEMAP_SCAN. */
export type DirtyTracking = 'soft-dirty' | 'uffd-wp' | 'none';

/** What decide() says. Same strings as @tern/protocol's PrecopyVerdict. */
export type PrecopyVerdict = 'continue' | 'converged' | 'not-shrinking' | 'round-cap';

export interface PrecopyOptions {
  /** The fixed switchover cost (ns) added to every downtime prediction; default: measured at open. */
  fixedCostNs?: number;
}

/** What open() did (times in ns). */
export interface PrecopySetup {
  tracking: DirtyTracking;
  /** The setup freeze: tracking started while every thread was stopped. */
  frozenNs: number;
  /** The fixed switchover cost every prediction includes. */
  fixedCostNs: number;
  /** Pages of the first full set (what round 0 sends at most). */
  fullPages: number;
}

/**
 * One pre-copy round. Units: bytes, nanoseconds (…Ns), bytes per second (…BytesPerSec); counts are
 * 4 KiB pages.
 */
export interface RoundStats {
  /** 0 = the full first pass; then each round's dirty set. */
  round: number;
  /** Pages put into the round's stream (data + zero markers). */
  pages: number;
  zeroPages: number;
  /** Page data bytes sent (zero markers carry none). */
  bytes: number;
  /** Sending the round: reading the pages, the stream, END and the destination's STATUS. */
  elapsedNs: number;
  /** Collecting the next dirty set (PAGEMAP_SCAN + re-protect, or pagemap + clear_refs). */
  scanNs: number;
  /** The pending set after the round: what the next round (or the freeze) must send. */
  dirtyPages: number;
  dirtyBytes: number;
  /** Bytes the process wrote per second since the previous collect. */
  dirtyRateBytesPerSec: number;
  /** Bytes per second the rounds moved so far (cumulative). */
  bandwidthBytesPerSec: number;
  /** dirtyBytes ÷ bandwidth + the fixed switchover cost. */
  predictedDowntimeNs: number;
  /** Pages whose read failed (their mapping changed under us); carried into the next round. */
  failedPages: number;
  /** This round's stream, confirmed by the destination's STATUS (absent in finish()'s summary). */
  transfer?: TransferStats;
}

/** Limits for decide(); absent fields take the engine's defaults (300 ms, 30 rounds, 0.9). */
export interface PrecopyLimits {
  maxDowntimeMs?: number;
  /** Round 0 included. */
  maxRounds?: number;
  /** A round "shrinks" when its dirty set is under this fraction of the previous one. */
  shrinkRatio?: number;
}

export interface PrecopyDecision {
  verdict: PrecopyVerdict;
  rounds: number;
  /** The last round's prediction (0 before any round). */
  predictedDowntimeNs: number;
}

/** What finish() moved inside the freeze, and the rounds before it. */
export interface PrecopyFinalStats {
  dump: DumpStats;
  transfer: TransferStats;
  /** Pages of the final dirty set (pending after the last round ∪ written since). */
  finalDirtyPages: number;
  /** Pages sent in a round whose content has gone since (overwritten in the final stream). */
  stalePages: number;
  /** From the final freeze to the end of the final dump (ns; the final STATUS wait comes on top). */
  frozenNs: number;
  /** Where frozenNs went, ns per step. */
  timings: { freezeNs: number; collectNs: number; dumpNs: number; staleNs: number };
  freeze: FreezeReport;
  rounds: RoundStats[];
  /** Hybrid: where the destination pulls the final dirty pages left on the source. */
  pageSource: PageSourceInfo | null;
}

/** @internal the exact shape the glue accepts (unknown fields are refused there). */
export interface PrecopyDestinationJson {
  address: string;
  port: number;
  migrationId: string;
  token: string;
  bandwidthBytesPerSec?: number;
}

function destinationJson(d: PageDestination): PrecopyDestinationJson {
  const out: PrecopyDestinationJson = { address: d.address, port: d.port, migrationId: d.migrationId, token: d.token };
  if (d.bandwidthBytesPerSec !== undefined && d.bandwidthBytesPerSec > 0) out.bandwidthBytesPerSec = d.bandwidthBytesPerSec;
  return out;
}

/**
 * The source side of a pre-copy migration. open() starts dirty tracking (a brief freeze; the
 * process then runs on); each round() streams the pending pages to the destination's page server
 * over its own connection, capped at destination.bandwidthBytesPerSec; decide() applies the
 * convergence rules; finish() freezes the process and sends the rest with the image, returning
 * what SourceSession.dump() returns; then exactly one of commit() or abort(). abort() at any
 * point before commit leaves the process as it was (running, no userfaultfd, no tracking).
 * Steps must not overlap: a round() while another round() or finish() runs is refused.
 */
export class PrecopySession {
  private state: 'tracking' | 'frozen' | 'over' = 'tracking';
  private readonly history: RoundStats[] = [];
  private constructor(
    readonly pid: number,
    readonly setup: PrecopySetup,
    private readonly box: OpaqueBox<'precopy'>,
  ) {}

  static async open(pid: number, opts: PrecopyOptions = {}): Promise<PrecopySession> {
    validateTarget(pid);
    const options = opts.fixedCostNs === undefined ? null : { fixedCostNs: opts.fixedCostNs };
    const box = await call('precopy', () => load().precopyStart(pid, options));
    return new PrecopySession(pid, load().precopySetup(box), box);
  }

  /** The rounds so far, oldest first. */
  get rounds(): readonly RoundStats[] {
    return this.history;
  }

  private tracking(what: string): void {
    if (this.state !== 'tracking') throw new EngineError(what, `pre-copy of pid ${this.pid} is ${this.state === 'frozen' ? 'finished: commit or abort' : 'over'}`);
  }

  /** One round while the process runs. A failed round loses nothing: retry it or abort. */
  async round(destination: PageDestination): Promise<RoundStats> {
    this.tracking('precopy round');
    const stats = await call('precopy round', () => load().precopyRound(this.box, destinationJson(destination)));
    this.history.push(stats);
    return stats;
  }

  /** Whether to go on: 'continue', or why to stop ('converged', 'not-shrinking', 'round-cap'). */
  async decide(limits: PrecopyLimits = {}): Promise<PrecopyVerdict> {
    return (await this.decision(limits)).verdict;
  }

  /** decide() with the figures it used. */
  async decision(limits: PrecopyLimits = {}): Promise<PrecopyDecision> {
    this.tracking('precopy decide');
    return callSync('precopy decide', () => load().precopyDecide(this.box, limits));
  }

  /**
   * The switchover: freeze, last dirty set, tracking off, image + final pages in one stream.
   * Resolves to what SourceSession.dump() returns plus the pre-copy figures; the process stays
   * frozen until commit() or abort(). If the final stream fails the process is thawed (it runs
   * on, untracked) and this session is over; if the destination cannot even be reached, nothing
   * happened and the session is still tracking.
   */
  async finish(
    destination: PageDestination,
    lazy?: { address: string },
  ): Promise<{ image: Buffer; dump: DumpStats; transfer: TransferStats } & Omit<PrecopyFinalStats, 'dump' | 'transfer'>> {
    this.tracking('precopy finish');
    let image: Buffer;
    try {
      image = await call('precopy finish', () => load().precopyFinish(this.box, destinationJson(destination), lazy ?? null));
    } catch (err) {
      // Unreachable destination: still tracking. Failed final stream: thawed, over.
      const phase = load().precopyPhase(this.box);
      if (phase !== 'busy') this.state = phase;
      throw err;
    }
    this.state = 'frozen';
    const stats = load().precopyFinalStats(this.box);
    if (!stats) throw new EngineError('precopy finish', 'the engine returned no statistics for the final dump');
    return { image, ...stats };
  }

  /** What the hybrid page source has served (null: none running). */
  pageSourceStats(): PageSourceStats | null {
    return load().precopyPageSourceStats(this.box);
  }

  /** Kills the frozen original after finish(): the destination has the process. */
  async commit(): Promise<void> {
    if (this.state !== 'frozen') throw new EngineError('commit', `pre-copy of pid ${this.pid} is not finished: nothing to commit`);
    await call('commit', () => load().precopyCommit(this.box));
    this.state = 'over';
  }

  /** Stops tracking (before finish) or thaws the frozen original (after): the process as it was. Idempotent. */
  async abort(): Promise<void> {
    if (this.state === 'over') return;
    await call('abort', () => load().precopyAbort(this.box));
    this.state = 'over';
  }
}
